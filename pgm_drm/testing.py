"""Random small models and comparison helpers, for tests and for users (STYLE §7).

Every generator returns ``(model, kwargs)``: a NumPyro model function with finite
discrete latents and the observations to condition on. Models are drawn from a
seed, so hypothesis can shrink them.
"""

from __future__ import annotations

import os
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
    "chain_loop_model",
    "examples",
    "ising_grid",
    "ising_loop_model",
    "log_joint",
    "numpy_forward_backward",
    "numpy_loopy_ising",
    "random_factor_model",
    "random_plate_model",
    "random_plated_tree_model",
    "random_rendering_model",
]

Model = tuple[Callable[..., None], dict[str, Any]]


def examples(ci: int) -> int:
    """Hypothesis ``max_examples`` for a property: ``ci`` in ``make test``, or
    ``PGM_DRM_EXAMPLES`` when it is set (``PGM_DRM_EXAMPLES=200 make test`` is
    the fuzzing run). For properties whose every example compiles its own JAX
    programs, which take fewer examples than the suite's default."""
    env = os.environ.get("PGM_DRM_EXAMPLES")
    return int(env) if env else ci


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


def ising_grid(n: int, seed: int = 0, coupling: float = 0.5) -> dict[str, np.ndarray]:
    """Random log-potentials of an ``n x n`` binary grid (the bench's Ising model).

    Returns:
        ``unary`` ``(n, n, 2)`` ~ N(0, 1); ``horizontal`` ``(n, n-1, 2, 2)`` for
        ``(x[i,j], x[i,j+1])`` and ``vertical`` ``(n-1, n, 2, 2)`` for
        ``(x[i,j], x[i+1,j])``, each ``[[J, -J], [-J, J]]`` with ``J ~ N(0,
        coupling)``.
    """
    rng = np.random.default_rng(seed)
    unary = rng.normal(size=(n, n, 2))
    sign = np.array([[1.0, -1.0], [-1.0, 1.0]])
    jh = rng.normal(scale=coupling, size=(n, n - 1))
    jv = rng.normal(scale=coupling, size=(n - 1, n))
    return {
        "unary": unary,
        "horizontal": jh[..., None, None] * sign,
        "vertical": jv[..., None, None] * sign,
    }


def ising_loop_model(potentials: Mapping[str, np.ndarray]) -> Callable[[], None]:
    """The grid as a user writes it: one site per node in a plain double loop.

    ``x[i,j] ~ Categorical(logits=unary[i,j])`` and a ``numpyro.factor`` per edge
    with the pairwise log-potential. No plates, no ``markov``.
    """
    unary = jnp.asarray(potentials["unary"])
    hor = jnp.asarray(potentials["horizontal"])
    ver = jnp.asarray(potentials["vertical"])
    n = unary.shape[0]

    def model() -> None:
        x = {}
        for i in range(n):
            for j in range(n):
                x[i, j] = numpyro.sample(
                    f"x_{i}_{j}", dist.Categorical(logits=unary[i, j])
                )
        for i in range(n):
            for j in range(n):
                if j + 1 < n:
                    numpyro.factor(f"h_{i}_{j}", hor[i, j][x[i, j], x[i, j + 1]])
                if i + 1 < n:
                    numpyro.factor(f"v_{i}_{j}", ver[i, j][x[i, j], x[i + 1, j]])

    return model


def chain_loop_model(
    n: int, k: int = 4, seed: int = 0
) -> tuple[Callable[[], None], dict[str, np.ndarray]]:
    """A Markov chain of ``n`` sites with ``k`` states, written as a plain loop.

    ``x0 ~ Cat(prior)``, ``x_i ~ Cat(trans[i][x_{i-1}])`` (a random transition
    matrix per step) and a ``numpyro.factor`` of random evidence on every site.

    Returns:
        The model and its parameters (``prior``, ``trans`` ``(n-1, k, k)``,
        ``evidence`` ``(n, k)`` log-potentials) for a numpy twin.
    """
    rng = np.random.default_rng(seed)
    params = {
        "prior": rng.dirichlet(np.ones(k)),
        "trans": rng.dirichlet(np.ones(k), size=(n - 1, k)),
        "evidence": rng.normal(size=(n, k)),
    }
    prior = jnp.asarray(params["prior"])
    trans = jnp.asarray(params["trans"])
    evidence = jnp.asarray(params["evidence"])

    def model() -> None:
        x = numpyro.sample("x_0", dist.Categorical(prior))
        numpyro.factor("e_0", evidence[0][x])
        for i in range(1, n):
            x = numpyro.sample(f"x_{i}", dist.Categorical(trans[i - 1][x]))
            numpyro.factor(f"e_{i}", evidence[i][x])

    return model, params


def numpy_loopy_ising(
    potentials: Mapping[str, np.ndarray],
    num_iters: int,
    damping: float = 0.5,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Plain-numpy loopy BP on :func:`ising_grid` potentials (the flat kernel's twin).

    Flooding schedule, factor-to-variable messages as the state (shifted to max
    0), damping ``new = damping * old + (1 - damping) * computed`` in log space,
    ``T * logsumexp(x / T)`` reductions (``max`` at T = 0): PGMax's conventions.

    Returns:
        ``marginals`` ``(n, n, 2)`` (softmax of the beliefs at temperature T;
        T = 0: normalised max-marginals ``exp(b - max b)``), ``deltas`` (max
        message change per iteration).
    """

    def reduce(a: np.ndarray, axis: int) -> np.ndarray:
        mx = np.max(a, axis=axis, keepdims=True)
        if temperature == 0.0:
            return np.squeeze(mx, axis=axis)
        s = np.sum(np.exp((a - mx) / temperature), axis=axis, keepdims=True)
        return np.squeeze(mx + temperature * np.log(s), axis=axis)

    u = np.asarray(potentials["unary"], np.float64)
    h = np.asarray(potentials["horizontal"], np.float64)
    v = np.asarray(potentials["vertical"], np.float64)
    n = u.shape[0]
    msgs = [np.zeros((n, n - 1, 2)), np.zeros((n, n - 1, 2))]
    msgs += [np.zeros((n - 1, n, 2)), np.zeros((n - 1, n, 2))]

    def beliefs(hl, hr, vu, vd):
        b = u.copy()
        b[:, :-1] += hl
        b[:, 1:] += hr
        b[:-1, :] += vu
        b[1:, :] += vd
        return b

    deltas = []
    for _ in range(num_iters):
        hl, hr, vu, vd = msgs
        b = beliefs(*msgs)
        n_hl, n_hr = b[:, :-1] - hl, b[:, 1:] - hr
        n_vu, n_vd = b[:-1, :] - vu, b[1:, :] - vd
        sh = h + n_hl[..., :, None] + n_hr[..., None, :]
        sv = v + n_vu[..., :, None] + n_vd[..., None, :]
        computed = [
            reduce(sh, -1) - n_hl,
            reduce(sh, -2) - n_hr,
            reduce(sv, -1) - n_vu,
            reduce(sv, -2) - n_vd,
        ]
        new = []
        for old, c in zip(msgs, computed, strict=True):
            m = damping * old + (1.0 - damping) * c
            new.append(m - np.max(m, axis=-1, keepdims=True))
        change = [np.max(np.abs(a - b)) for a, b in zip(new, msgs, strict=True)]
        deltas.append(float(max(change)))
        msgs = new
    b = beliefs(*msgs)
    b = b - np.max(b, axis=-1, keepdims=True)
    if temperature == 0.0:
        marg = np.exp(b)
    else:
        e = np.exp(b / temperature)
        marg = e / e.sum(-1, keepdims=True)
    return {"marginals": marg, "deltas": np.asarray(deltas)}


def numpy_forward_backward(
    params: Mapping[str, np.ndarray],
) -> tuple[float, np.ndarray]:
    """Exact log Z and marginals of :func:`chain_loop_model` (the chain's twin).

    Normalised forward-backward in float64 on ``prior``, ``trans`` and the
    evidence log-potentials.

    Returns:
        ``(log_z, marginals)`` with marginals of shape ``(n, k)``.
    """
    prior = np.asarray(params["prior"], np.float64)
    trans = np.asarray(params["trans"], np.float64)
    ev = np.asarray(params["evidence"], np.float64)
    n = ev.shape[0]
    shift = ev.max(axis=1, keepdims=True)
    lik = np.exp(ev - shift)
    alpha = np.zeros_like(lik)
    scale = np.zeros(n)
    alpha[0] = prior * lik[0]
    scale[0] = alpha[0].sum()
    alpha[0] /= scale[0]
    for i in range(1, n):
        alpha[i] = (alpha[i - 1] @ trans[i - 1]) * lik[i]
        scale[i] = alpha[i].sum()
        alpha[i] /= scale[i]
    beta = np.ones_like(lik)
    for i in range(n - 2, -1, -1):
        beta[i] = trans[i] @ (lik[i + 1] * beta[i + 1]) / scale[i + 1]
    marg = alpha * beta
    marg /= marg.sum(axis=1, keepdims=True)
    return float(np.log(scale).sum() + shift.sum()), marg


def random_plated_tree_model(seed: int, size: int = 3) -> Model:
    """A tree written with plates: a global ``c``, per-instance children, evidence.

    ``c ~ Cat``; in plate ``i``: ``z_i ~ Cat(cpt[c])``, ``b_i ~ Bernoulli(q[z_i])``
    and ``y_i ~ N(m[b_i], 1)`` observed. Its factor graph is a tree whose
    size grows with the plate, not its program.
    """
    rng = np.random.default_rng(seed)
    kc, kz = int(rng.integers(2, 4)), int(rng.integers(2, 5))
    pc = rng.dirichlet(np.ones(kc))
    cpt = rng.dirichlet(np.ones(kz), size=kc)
    q = rng.uniform(0.1, 0.9, size=kz)
    m = rng.normal(scale=1.5, size=2)
    y = rng.normal(size=size)

    def model(y=None):
        c = numpyro.sample("c", dist.Categorical(jnp.asarray(pc)))
        with numpyro.plate("i", size):
            z = numpyro.sample("z", dist.Categorical(Vindex(jnp.asarray(cpt))[c]))
            b = numpyro.sample("b", dist.Bernoulli(jnp.asarray(q)[z]))
            idx = b.astype(jnp.int32)
            numpyro.sample("y", dist.Normal(jnp.asarray(m)[idx], 1.0), obs=y)

    return model, {"y": jnp.asarray(y)}


def run_on_devices(script: str, n_devices: int = 4, marker: str = "SHARDED-OK") -> None:
    """Run ``script`` in a fresh Python with ``n_devices`` forced CPU devices
    (``XLA_FLAGS`` must be set before JAX starts) and assert it printed ``marker``."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert marker in out.stdout
