"""Random small models and comparison helpers, for tests and for users (STYLE §7).

Every generator returns ``(model, kwargs)``: a NumPyro model function with finite
discrete latents and the observations to condition on. Models are drawn from a
seed, so hypothesis can shrink them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.util import log_density
from numpyro.ops.indexing import Vindex

from pgm_drm.inference.api import Posterior
from pgm_drm.models.rendering import RenderingModel

__all__ = [
    "assert_posteriors_close",
    "log_joint",
    "random_factor_model",
    "random_plate_model",
    "random_rendering_model",
]

Model = tuple[Callable[..., None], dict[str, Any]]


def _edges(kind: str, n: int, rng: np.random.Generator) -> tuple[list, list]:
    """Directed tree edges (parent, child) and extra loop-closing edges."""
    if kind == "chain":
        tree = [(i - 1, i) for i in range(1, n)]
    else:
        tree = [(int(rng.integers(0, i)), i) for i in range(1, n)]
    extra: list[tuple[int, int]] = []
    if kind == "loopy":
        pairs = [
            (i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in tree
        ]
        k = min(len(pairs), max(1, n // 2))
        extra = [pairs[p] for p in rng.choice(len(pairs), size=k, replace=False)]
    return tree, extra


def random_factor_model(
    seed: int,
    n_vars: int = 4,
    max_card: int = 3,
    kind: str = "tree",
    hard_zeros: bool = False,
) -> Model:
    """A random discrete Bayesian network with Gaussian evidence on every variable.

    ``x0 ~ Cat``, ``x_child ~ Cat(cpt[x_parent])`` along a chain or random tree,
    ``numpyro.factor`` pairwise potentials on extra edges (``kind="loopy"``), and
    ``y_i ~ N(means_i[x_i], 1)`` observed. With ``hard_zeros`` some conditional
    and pairwise entries are ``-inf`` (but one random configuration stays
    possible, so the evidence has positive probability).

    Args:
        seed: Random seed.
        n_vars: Number of latent variables.
        max_card: Cardinalities are drawn from ``2..max_card``.
        kind: "chain", "tree" or "loopy".
        hard_zeros: Put ``-inf`` log-potentials in the tables.
    """
    if kind not in ("chain", "tree", "loopy"):
        raise ValueError(f"kind must be 'chain', 'tree' or 'loopy', got {kind!r}")
    rng = np.random.default_rng(seed)
    cards = rng.integers(2, max_card + 1, size=n_vars)
    tree, extra = _edges(kind, n_vars, rng)
    star = [int(rng.integers(0, k)) for k in cards]
    parent = {c: p for p, c in tree}
    prior0 = rng.dirichlet(np.ones(cards[0]))
    cpts = {}
    for p, c in tree:
        t = rng.dirichlet(np.ones(cards[c]), size=cards[p])
        if hard_zeros:
            zero = rng.random(t.shape) < 0.3
            zero[star[p], star[c]] = False
            zero[np.arange(cards[p]), np.argmax(t, axis=1)] = (
                False  # rows stay normalisable
            )
            t = np.where(zero, 0.0, t)
            t = t / t.sum(axis=1, keepdims=True)
        cpts[c] = t
    pair = {}
    for i, j in extra:
        t = rng.normal(size=(cards[i], cards[j]))
        if hard_zeros:
            zero = rng.random(t.shape) < 0.3
            zero[star[i], star[j]] = False
            t = np.where(zero, -np.inf, t)
        pair[(i, j)] = t
    means = [rng.normal(scale=1.5, size=k) for k in cards]
    y = np.array([means[i][star[i]] + rng.normal() for i in range(n_vars)])

    def model(y=None):
        xs = [numpyro.sample("x0", dist.Categorical(jnp.asarray(prior0)))]
        for i in range(1, n_vars):
            probs = Vindex(jnp.asarray(cpts[i]))[xs[parent[i]]]
            xs.append(numpyro.sample(f"x{i}", dist.Categorical(probs)))
        for (i, j), t in pair.items():
            numpyro.factor(f"psi_{i}_{j}", Vindex(jnp.asarray(t))[xs[i], xs[j]])
        for i in range(n_vars):
            obs = None if y is None else y[i]
            numpyro.sample(
                f"y{i}", dist.Normal(jnp.asarray(means[i])[xs[i]], 1.0), obs=obs
            )

    return model, {"y": jnp.asarray(y)}


def random_plate_model(seed: int, outer: int = 2, inner: int = 2) -> Model:
    """A model with nested plates and a global discrete latent.

    ``c ~ Cat``; in plate ``i`` (size ``outer``): ``z_i ~ Cat(cpt[c])``; in plate
    ``j`` (size ``inner``) inside it: ``w_ij ~ Bernoulli(p[z_i])`` and
    ``y_ij ~ N(w_ij + m[c], 1)`` observed; plus a ``numpyro.factor`` on ``c``.
    """
    rng = np.random.default_rng(seed)
    kc, kz = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    pc = rng.dirichlet(np.ones(kc))
    cpt = rng.dirichlet(np.ones(kz), size=kc)
    pw = rng.uniform(0.1, 0.9, size=kz)
    m = rng.normal(size=kc)
    bonus = rng.normal(size=kc)
    y = rng.normal(size=(inner, outer))

    def model(y=None):
        c = numpyro.sample("c", dist.Categorical(jnp.asarray(pc)))
        numpyro.factor("bonus", jnp.asarray(bonus)[c])
        with numpyro.plate("i", outer, dim=-1):
            z = numpyro.sample("z", dist.Categorical(Vindex(jnp.asarray(cpt))[c]))
            with numpyro.plate("j", inner, dim=-2):
                w = numpyro.sample("w", dist.Bernoulli(jnp.asarray(pw)[z]))
                numpyro.sample("y", dist.Normal(w + jnp.asarray(m)[c], 1.0), obs=y)

    return model, {"y": jnp.asarray(y)}


def random_rendering_model(
    seed: int,
    n_classes: int = 3,
    n_nuisances: int = 4,
    image_shape=(4, 4),
    switch: bool = True,
) -> tuple[RenderingModel, dict[str, Any]]:
    """A random :class:`RenderingModel` and one image sampled from it."""
    import jax

    rng = np.random.default_rng(seed)
    rm = RenderingModel(
        rng.normal(size=(n_classes, n_nuisances, *image_shape)),
        sigma=float(rng.uniform(0.5, 2.0)),
        class_prior=rng.dirichlet(np.ones(n_classes)),
        nuisance_prior=rng.dirichlet(np.ones(n_nuisances)),
        switch_prior=float(rng.uniform(0.2, 0.95)) if switch else None,
    )
    images, _ = rm.sample(jax.random.PRNGKey(seed % (2**31)), 1)
    return rm, {"image": images[0]}


def log_joint(model: Callable, assignment: Mapping[str, Any], **kwargs: Any) -> float:
    """The model's own log-joint at a latent assignment (no enumeration)."""
    return float(log_density(model, (), kwargs, dict(assignment))[0])


def assert_posteriors_close(
    actual: Posterior,
    expected: Posterior,
    atol: float = 1e-6,
    model: Callable | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Assert equal log Z and log-marginals, and an equally good joint MAP.

    Log-marginals are compared where the expected value is finite; ``-inf``
    entries (impossible states) must be ``-inf`` (or below ``-1e10``, what a
    float64 sum over -inf produces) on both sides. The MAP is compared through the
    model's log-joint (``model`` given): both assignments must reach the max
    within ``atol``, which is the right notion of "same MAP" under ties (tests
    that need the identical assignment compare ``map`` directly).
    """
    np.testing.assert_allclose(float(actual.log_z), float(expected.log_z), atol=atol)
    assert set(actual.log_marginals) == set(expected.log_marginals)
    for site, exp in expected.log_marginals.items():
        a, e = np.asarray(actual.log_marginals[site]), np.asarray(exp)
        assert a.shape == e.shape, (site, a.shape, e.shape)
        finite = np.isfinite(e)
        np.testing.assert_allclose(a[finite], e[finite], atol=atol, err_msg=site)
        assert np.all(a[~finite] < -1e10), (site, a[~finite])
    if model is not None:
        kw = dict(kwargs or {})
        la = log_joint(model, actual.map, **kw)
        le = log_joint(model, expected.map, **kw)
        np.testing.assert_allclose(la, le, atol=atol, err_msg="MAP log-joint")
