"""Random small models and comparison helpers, for tests and for users (STYLE §7).

Every generator returns ``(model, kwargs)``: a NumPyro model function with finite
discrete latents and the observations to condition on. Models are drawn from a
seed, so hypothesis can shrink them. Generators of models that exact inference
must refuse return ``(model, kwargs, match)`` (:data:`BadModel`), ``match`` a
regular expression the refusal must match.
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
from pgm_drm.inference.reference import latent_layout
from pgm_drm.models.rendering import RenderingModel

__all__ = [
    "CONTINUOUS_FAMILIES",
    "NESTED_PLATE_LAYOUTS",
    "OBSERVED_FAMILIES",
    "BadModel",
    "assert_posteriors_close",
    "chain_loop_model",
    "examples",
    "ising_grid",
    "ising_loop_model",
    "log_joint",
    "numpy_forward_backward",
    "numpy_loopy_ising",
    "random_continuous_latent_model",
    "random_factor_model",
    "random_huge_evidence_model",
    "random_nested_plate_model",
    "random_nonfinite_factor_model",
    "random_observed_family_model",
    "random_plate_model",
    "random_plated_tree_model",
    "random_rendering_model",
    "random_subsampled_model",
    "random_tied_model",
    "random_undeclared_batch_model",
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
    return _factor_model(seed, n_vars, max_card, kind, hard_zeros, None)


def _factor_model(
    seed: int,
    n_vars: int,
    max_card: int,
    kind: str,
    hard_zeros: bool,
    rescale: Callable[[list, np.ndarray], tuple[list, np.ndarray]] | None,
) -> Model:
    """:func:`random_factor_model`, with ``rescale(means, y) -> (means, y)``
    applied to the Gaussian means and the evidence once both are drawn."""
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
    if rescale is not None:
        means, y = rescale(means, y)

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
    """The model's own log-joint at a latent assignment (no enumeration).

    ``assignment`` is laid out as a :class:`Posterior`'s ``map`` (a value of
    shape ``plate_shape``, the site's plate sizes leftmost dim first, is reshaped
    to the site's batch shape, with 1s at the dims its plates leave out) or in
    the sites' batch shapes.
    """
    layout = latent_layout(model, **kwargs)
    values = {}
    for site, value in assignment.items():
        lay = layout.get(site)
        if lay is not None and np.shape(value) == lay.plate_shape:
            value = jnp.reshape(jnp.asarray(value), lay.batch_shape)
        values[site] = value
    return float(log_density(model, (), kwargs, values)[0])


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
    (``XLA_FLAGS`` must be set before JAX starts) and assert it printed ``marker``.
    XLA flags already in the environment (``make test``'s) are kept."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={n_devices}".strip(),
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert marker in out.stdout


# --------------------------------------------------------------------------- #
# Fuzzing generators (issue 15): more model shapes for the exactness properties
# (nested plates, exponential-family evidence, ties, huge evidence), and models
# that must be refused.
# --------------------------------------------------------------------------- #

#: A model that :func:`pgm_drm.graph.compile_model` must refuse, its keyword
#: arguments, and a regular expression its error message must match (it names
#: the offending site or plate and the problem).
BadModel = tuple[Callable[..., None], dict[str, Any], str]


def _plate_shape(sizes: Mapping[int, int]) -> tuple[int, ...]:
    """The batch shape of a site inside plates ``{dim: size}`` (1 where no plate)."""
    depth = max([0] + [-d for d in sizes])
    return tuple(sizes.get(d, 1) for d in range(-depth, 0))


#: Plate dims ``(outer, inner)`` of :func:`random_nested_plate_model`'s layouts
#: (``None``: NumPyro allocates them, outer -1 and inner -2).
NESTED_PLATE_LAYOUTS = {
    "default": (None, None),
    "swapped": (-2, -1),
    "gap": (-1, -3),
}


def random_nested_plate_model(seed: int, layout: str | None = None) -> Model:
    """Two nested plates, a discrete latent at every level, evidence at both.

    ``g ~ Cat`` (global); in plate ``outer`` (size 1..3): ``z ~ Cat(cz[g])`` and
    ``u ~ N(mu[z], 1)`` observed; in plate ``inner`` (size 1..2) inside it:
    ``w ~ Cat(cw[z, g])``, ``numpyro.factor("psi", psi[w, g])`` and
    ``y ~ N(m[w] + n[z], s)`` observed. At most 7 latent variables of 2-3 states.

    The plates' dims (:data:`NESTED_PLATE_LAYOUTS`): NumPyro's default (outer -1,
    inner -2), swapped (outer -2, inner -1), or with an unused dim between them
    (outer -1, inner -3). The layout is drawn from the seed unless given; the
    parameters and the evidence do not depend on it (``u`` is drawn as
    ``(outer,)`` and ``y`` as ``(outer, inner)``, then laid out on the plates'
    dims), so one seed in two layouts is the same distribution.
    """
    rng = np.random.default_rng(seed)
    a, b = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)][int(rng.integers(0, 5))]
    drawn = sorted(NESTED_PLATE_LAYOUTS)[int(rng.integers(0, 3))]
    layout = drawn if layout is None else layout
    if layout not in NESTED_PLATE_LAYOUTS:
        raise ValueError(
            f"layout must be one of {sorted(NESTED_PLATE_LAYOUTS)}, got {layout!r}"
        )
    dims = NESTED_PLATE_LAYOUTS[layout]
    d_out, d_in = (-1, -2) if layout == "default" else dims
    kg, kz, kw = (int(k) for k in rng.integers(2, 4, size=3))
    pg = jnp.asarray(rng.dirichlet(np.ones(kg)))
    cz = jnp.asarray(rng.dirichlet(np.ones(kz), size=kg))
    cw = jnp.asarray(rng.dirichlet(np.ones(kw), size=(kz, kg)))
    psi = jnp.asarray(rng.normal(size=(kw, kg)))
    mu = jnp.asarray(rng.normal(scale=1.5, size=kz))
    m = jnp.asarray(rng.normal(scale=1.5, size=kw))
    n = jnp.asarray(rng.normal(size=kz))
    s = float(rng.uniform(0.5, 2.0))
    u = rng.normal(size=a).reshape(_plate_shape({d_out: a}))
    y = rng.normal(size=(a, b))
    if d_in < d_out:  # the inner plate's dim is left of the outer's
        y = y.T
    y = y.reshape(_plate_shape({d_out: a, d_in: b}))

    def model(u=None, y=None):
        g = numpyro.sample("g", dist.Categorical(pg))
        with numpyro.plate("outer", a, dim=dims[0]):
            z = numpyro.sample("z", dist.Categorical(Vindex(cz)[g]))
            numpyro.sample("u", dist.Normal(mu[z], 1.0), obs=u)
            with numpyro.plate("inner", b, dim=dims[1]):
                w = numpyro.sample("w", dist.Categorical(Vindex(cw)[z, g]))
                numpyro.factor("psi", Vindex(psi)[w, g])
                numpyro.sample("y", dist.Normal(m[w] + n[z], s), obs=y)

    return model, {"u": jnp.asarray(u), "y": jnp.asarray(y)}


#: The observation families of :func:`random_observed_family_model`.
OBSERVED_FAMILIES = (
    "normal",
    "normal_scale",
    "bernoulli_probs",
    "bernoulli_logits",
    "categorical_probs",
    "categorical_logits",
    "poisson",
    "gamma",
    "exponential",
)


def _with_zeros(t: np.ndarray, rng: np.random.Generator, fill: float) -> np.ndarray:
    """``t`` with ~30% of its entries set to ``fill``, the largest entry of every
    row along the last axis kept (each row stays a distribution)."""
    zero = rng.random(t.shape) < 0.3
    keep = np.argmax(t, axis=-1)[..., None] == np.arange(t.shape[-1])
    return np.where(zero & ~keep, fill, t)


def _family_params(
    family: str, shape: tuple[int, ...], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Parameter tables of shape ``shape`` (latent states + event; Categorical
    adds a category axis) for one observation family, some with hard zeros."""
    if family == "normal":
        return {"loc": rng.normal(scale=2.0, size=shape), "scale": rng.uniform(0.5, 2)}
    if family == "normal_scale":
        return {
            "loc": rng.normal(scale=2.0, size=shape),
            "scale": rng.uniform(0.3, 2.0, size=shape),
        }
    if family == "bernoulli_probs":
        p = rng.uniform(0.05, 0.95, size=shape)
        edge = rng.random(shape) < 0.2  # exactly 0 or 1: numpyro clamps these
        return {"probs": np.where(edge, np.round(p), p)}
    if family == "bernoulli_logits":
        return {"logits": rng.normal(scale=2.0, size=shape)}
    k = int(rng.integers(2, 5))
    if family == "categorical_probs":
        p = _with_zeros(rng.dirichlet(np.ones(k), size=shape), rng, 0.0)
        return {"probs": p / p.sum(-1, keepdims=True)}
    if family == "categorical_logits":
        # NumPyro refuses -inf logits (validation): very negative ones instead.
        return {"logits": _with_zeros(rng.normal(size=shape + (k,)), rng, -50.0)}
    if family == "poisson":
        rate = rng.uniform(0.2, 6.0, size=shape)
        # NumPyro refuses a rate of 0 (validation): tiny ones instead.
        return {"rate": np.where(rng.random(shape) < 0.2, 1e-6, rate)}
    if family == "gamma":
        return {
            "concentration": rng.uniform(0.5, 3.0, size=shape),
            "rate": rng.uniform(0.5, 3.0, size=shape),
        }
    if family == "exponential":
        return {"rate": rng.uniform(0.2, 3.0, size=shape)}
    raise ValueError(f"unknown family {family!r}; use one of {OBSERVED_FAMILIES}")


def _family_dist(family: str, params: Mapping[str, Any]) -> dist.Distribution:
    """The NumPyro distribution of a family at (indexed) parameters."""
    if family in ("normal", "normal_scale"):
        return dist.Normal(params["loc"], params["scale"])
    if family == "bernoulli_probs":
        return dist.Bernoulli(probs=params["probs"])
    if family == "bernoulli_logits":
        return dist.Bernoulli(logits=params["logits"])
    if family == "categorical_probs":
        return dist.Categorical(probs=params["probs"])
    if family == "categorical_logits":
        return dist.Categorical(logits=params["logits"])
    if family == "poisson":
        return dist.Poisson(params["rate"])
    if family == "gamma":
        return dist.Gamma(params["concentration"], params["rate"])
    return dist.Exponential(params["rate"])


def _family_sample(
    family: str, params: Mapping[str, Any], shape: tuple, rng: np.random.Generator
) -> np.ndarray:
    """A numpy draw of ``shape`` from a family at one latent configuration's
    parameters (a value of positive probability, hard zeros included)."""
    cat = family.startswith("categorical")
    p = {
        k: np.broadcast_to(np.asarray(v, float), shape + np.shape(v)[-1:] * cat)
        for k, v in params.items()
    }
    if family in ("normal", "normal_scale"):
        return p["loc"] + p["scale"] * rng.normal(size=shape)
    if family == "bernoulli_probs":
        return (rng.random(shape) < p["probs"]).astype(float)
    if family == "bernoulli_logits":
        return (rng.random(shape) < 1.0 / (1.0 + np.exp(-p["logits"]))).astype(float)
    if family.startswith("categorical"):
        probs = p.get("probs")
        if probs is None:
            e = np.exp(p["logits"] - p["logits"].max(-1, keepdims=True))
            probs = e / e.sum(-1, keepdims=True)
        cdf = np.cumsum(probs, axis=-1)
        u = np.asarray(rng.random(shape))[..., None] * cdf[..., -1:]
        return np.minimum((u >= cdf).sum(-1), probs.shape[-1] - 1)
    if family == "poisson":
        return np.asarray(rng.poisson(p["rate"]), float)
    if family == "gamma":
        return rng.gamma(p["concentration"], 1.0 / p["rate"])
    return rng.exponential(1.0 / p["rate"])


def random_observed_family_model(seed: int, draw: int = 0) -> Model:
    """Discrete latents observed through several exponential families.

    Latents: ``x0 ~ Cat``, ``x_i ~ Cat(cpt_i[x_parent])`` along a random tree (2-3
    latents of 2-3 states). 3-5 observed sites ``o0, o1, ...``, each of a
    different family of :data:`OBSERVED_FAMILIES` (Normal with a fixed or a
    latent-dependent scale, Bernoulli by probs (some exactly 0 or 1) or logits,
    Categorical by probs with zeros or by logits with some at -50, Poisson with
    some rates 1e-6, Gamma, Exponential), whose parameters are tables indexed by
    one or two latents. Each site is a scalar, a ``to_event(1)`` vector of 2-3
    entries, or sits in its own plate of size 2. Bernoulli and Poisson evidence
    is float or int (drawn), Categorical int. The evidence is sampled at one
    random latent configuration, so it has positive probability despite the
    zeros.

    Args:
        seed: Random seed of the model (structure, parameters, evidence dtypes).
        draw: Which evidence draw: the same model with other observations of
            the same shapes and dtypes (compile on one, infer on another).
    """
    rng = np.random.default_rng(seed)
    n_lat = int(rng.integers(2, 4))
    cards = [int(k) for k in rng.integers(2, 4, size=n_lat)]
    parent = {i: int(rng.integers(0, i)) for i in range(1, n_lat)}
    prior0 = jnp.asarray(rng.dirichlet(np.ones(cards[0])))
    cpts = {
        i: jnp.asarray(rng.dirichlet(np.ones(cards[i]), size=cards[p]))
        for i, p in parent.items()
    }
    star = [int(rng.integers(0, k)) for k in cards]
    n_obs = int(rng.integers(3, 6))
    sites = []
    for j, family in enumerate(rng.permutation(OBSERVED_FAMILIES)[:n_obs]):
        family = str(family)
        k_par = int(rng.integers(1, 3))
        parents = sorted(int(p) for p in rng.choice(n_lat, size=k_par, replace=False))
        form = ("scalar", "event", "plate")[int(rng.integers(0, 3))]
        event = (int(rng.integers(2, 4)),) if form == "event" else ()
        params = _family_params(family, tuple(cards[p] for p in parents) + event, rng)
        as_int = family.startswith("categorical") or (
            family in ("bernoulli_probs", "bernoulli_logits", "poisson")
            and bool(rng.integers(0, 2))
        )
        sites.append((f"o{j}", family, parents, form, event, params, as_int))

    vrng = np.random.default_rng([seed, 1 + draw])
    evidence = {}
    for name, family, parents, form, event, params, as_int in sites:
        at = tuple(star[p] for p in parents)
        here = {k: (np.asarray(v)[at] if np.ndim(v) else v) for k, v in params.items()}
        shape = (2,) if form == "plate" else event
        value = np.asarray(_family_sample(family, here, shape, vrng))
        evidence[name] = jnp.asarray(value.astype(np.int32 if as_int else np.float64))

    jsites = [
        (name, family, parents, form, {k: jnp.asarray(v) for k, v in params.items()})
        for name, family, parents, form, _, params, _ in sites
    ]

    def model(**obs):
        xs = [numpyro.sample("x0", dist.Categorical(prior0))]
        for i in range(1, n_lat):
            xs.append(
                numpyro.sample(
                    f"x{i}", dist.Categorical(Vindex(cpts[i])[xs[parent[i]]])
                )
            )
        for name, family, parents, form, params in jsites:
            idx = tuple(xs[p] for p in parents)
            here = {
                k: (Vindex(v)[idx] if jnp.ndim(v) else v) for k, v in params.items()
            }
            fn = _family_dist(family, here)
            if form == "event":
                fn = fn.to_event(1)
            if form == "plate":
                with numpyro.plate(f"n_{name}", 2):
                    numpyro.sample(name, fn, obs=obs.get(name))
            else:
                numpyro.sample(name, fn, obs=obs.get(name))

    return model, evidence


def random_tied_model(seed: int) -> Model:
    """A model full of ties: many configurations share the maximal log joint.

    Every log-potential comes from a few integer levels: priors and conditionals
    are ``softmax`` of levels in ``{0, -1}`` (some ``-inf``: probability 0, which
    NumPyro accepts as probs, not as logits), ``numpyro.factor`` tables with
    entries in ``{0, -1}`` (some ``-inf``; one random configuration always stays
    possible), and Gaussian evidence ``y = 0.5`` half-way between state means in
    ``{0, 1}``. Shapes: a chain, a tree, a loop (factors on extra edges; 3-5
    latents of 2-3 states), or a global latent and a plate of 2-3 exchangeable
    instances (every permutation of a MAP is a MAP).
    """
    rng = np.random.default_rng(seed)
    kind = ("chain", "tree", "loopy", "plate")[int(rng.integers(0, 4))]

    def logits(shape, keep):
        t = -rng.integers(0, 2, size=shape).astype(float)
        hard = rng.random(shape) < 0.2
        hard[keep] = False
        hard[..., 0] &= ~np.all(hard, axis=-1)  # every row keeps a finite entry
        return np.where(hard, -np.inf, t)

    def probs(shape, keep):  # equal levels in a row give bit-equal probabilities
        e = np.exp(logits(shape, keep))
        return jnp.asarray(e / e.sum(axis=-1, keepdims=True))

    if kind == "plate":
        kc, kz, n = (int(k) for k in rng.integers(2, 4, size=3))
        c_star, z_star = int(rng.integers(0, kc)), int(rng.integers(0, kz))
        pc = probs((kc,), (c_star,))
        pz = probs((kc, kz), (c_star, z_star))
        tab = jnp.asarray(logits((kz, kc), (z_star, c_star)))
        means = jnp.asarray(rng.integers(0, 2, size=kz).astype(float))

        def plate_model(y=None):
            c = numpyro.sample("c", dist.Categorical(pc))
            with numpyro.plate("i", n):
                z = numpyro.sample("z", dist.Categorical(Vindex(pz)[c]))
                numpyro.factor("tie", Vindex(tab)[z, c])
                numpyro.sample("y", dist.Normal(means[z], 1.0), obs=y)

        return plate_model, {"y": jnp.full((n,), 0.5)}

    n_vars = int(rng.integers(3, 6))
    cards = [int(k) for k in rng.integers(2, 4, size=n_vars)]
    tree, extra = _edges(kind, n_vars, rng)
    parent = {c: p for p, c in tree}
    star = [int(rng.integers(0, k)) for k in cards]
    prior = probs((cards[0],), (star[0],))
    cpts = {c: probs((cards[p], cards[c]), (star[p], star[c])) for p, c in tree}
    pair = {
        (i, j): jnp.asarray(logits((cards[i], cards[j]), (star[i], star[j])))
        for i, j in extra
    }
    observed = [i for i in range(n_vars) if rng.random() < 0.6]
    means = {
        i: jnp.asarray(rng.integers(0, 2, size=cards[i]).astype(float))
        for i in observed
    }

    def model(y=None):
        xs = [numpyro.sample("x0", dist.Categorical(prior))]
        for i in range(1, n_vars):
            p = Vindex(cpts[i])[xs[parent[i]]]
            xs.append(numpyro.sample(f"x{i}", dist.Categorical(p)))
        for (i, j), t in pair.items():
            numpyro.factor(f"tie_{i}_{j}", Vindex(t)[xs[i], xs[j]])
        for k, i in enumerate(observed):
            obs = None if y is None else y[k]
            numpyro.sample(f"y{i}", dist.Normal(means[i][xs[i]], 1.0), obs=obs)

    return model, {"y": jnp.full((len(observed),), 0.5)}


def random_huge_evidence_model(
    seed: int,
    magnitude: float = 1e4,
    mode: str = "shift",
    n_vars: int = 4,
    kind: str = "tree",
    hard_zeros: bool = False,
) -> Model:
    """:func:`random_factor_model` with evidence of magnitude ``magnitude``.

    ``mode="shift"``: every variable's evidence and state means move by the same
    offset ``+-magnitude * U(0.5, 1)``: ``|y| ~ magnitude`` while the posterior
    stays that of the unshifted model (the Gaussian's natural form
    ``x^2 eta_2 + x eta_1 - A`` cancels terms of ``~magnitude^2``).
    ``mode="scale"``: evidence and means are multiplied by ``magnitude / max|y|``:
    the largest ``|y|`` is ``magnitude`` and the states' log-likelihoods differ
    by up to ``~magnitude^2`` (near one-hot posteriors, log-marginals ~ -1e8).
    Structure and tables are those of ``random_factor_model(seed, n_vars, 3,
    kind, hard_zeros)``.
    """
    if mode not in ("shift", "scale"):
        raise ValueError(f"mode must be 'shift' or 'scale', got {mode!r}")
    rng = np.random.default_rng([seed, 2])

    def rescale(means: list, y: np.ndarray) -> tuple[list, np.ndarray]:
        if mode == "scale":
            s = magnitude / np.max(np.abs(y))
            return [m * s for m in means], y * s
        off = (
            magnitude
            * rng.choice([-1.0, 1.0], size=len(y))
            * rng.uniform(0.5, 1.0, size=len(y))
        )
        return [m + o for m, o in zip(means, off, strict=True)], y + off

    return _factor_model(seed, n_vars, 3, kind, hard_zeros, rescale)


def random_nonfinite_factor_model(
    seed: int, value: float
) -> tuple[Callable[..., None], dict[str, Any], str | None]:
    """A chain of discrete latents with a ``numpyro.factor`` holding ``value``
    (NaN, +inf or -inf) at some of its entries.

    ``x0 ~ Cat``, ``x_i ~ Cat(cpt[x_{i-1}])`` (2-4 latents of 2-3 states),
    ``y ~ N(m[x_i], 1)`` observed on each, optionally a plate of size 2 with
    ``w ~ Cat(cw[x_last])``. The factor (named ``f``, ``bonus`` or ``psi``)
    depends on 0-2 latents (inside the plate when it depends on ``w``); its
    ``value`` entries are switched on by the evidence ``gate`` (1.0 in the
    returned kwargs; 0.0 gives a finite table), so they can appear at compile
    time or only in the evidence given to ``infer``. With ``-inf`` (a legal hard
    zero) the factor depends on a latent and one random configuration stays
    possible.

    Returns:
        ``(model, kwargs, match)``: ``match`` is the regular expression
        ``compile_model``'s refusal must match (naming the factor's site), or
        ``None`` for ``-inf``, which must be accepted and handled exactly.
    """
    if not (np.isnan(value) or np.isinf(value)):
        raise ValueError(f"value must be NaN or +-inf, got {value!r}")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5))
    cards = [int(k) for k in rng.integers(2, 4, size=n)]
    star = [int(rng.integers(0, k)) for k in cards]
    prior = jnp.asarray(rng.dirichlet(np.ones(cards[0])))
    cpts = [
        jnp.asarray(rng.dirichlet(np.ones(cards[i]), size=cards[i - 1]))
        for i in range(1, n)
    ]
    means = [jnp.asarray(rng.normal(scale=1.5, size=k)) for k in cards]
    y = rng.normal(size=n)
    plate = bool(rng.integers(0, 2))
    kw = int(rng.integers(2, 4))
    cw = jnp.asarray(rng.dirichlet(np.ones(kw), size=cards[-1]))
    w_star = int(rng.integers(0, kw))
    names = [f"x{i}" for i in range(n)] + (["w"] if plate else [])
    sizes = cards + ([kw] if plate else [])
    stars = star + ([w_star] if plate else [])
    lo = 1 if np.isneginf(value) else 0
    scope = sorted(
        int(v)
        for v in rng.choice(len(names), size=int(rng.integers(lo, 3)), replace=False)
    )
    shape = tuple(sizes[v] for v in scope)
    finite = rng.normal(size=shape)
    hit = np.array(rng.random(shape) < 0.5)  # 0-d when the scope is empty
    hit[np.unravel_index(int(rng.integers(0, max(hit.size, 1))), shape)] = True
    if np.isneginf(value):
        hit[tuple(stars[v] for v in scope)] = False
    bad = jnp.asarray(np.where(hit, value, finite))
    finite = jnp.asarray(finite)
    site = ("f", "bonus", "psi")[int(rng.integers(0, 3))]
    in_plate = plate and (len(names) - 1) in scope

    def model(y=None, gate=None):
        xs = [numpyro.sample("x0", dist.Categorical(prior))]
        for i in range(1, n):
            xs.append(
                numpyro.sample(f"x{i}", dist.Categorical(Vindex(cpts[i - 1])[xs[-1]]))
            )
        for i in range(n):
            obs = None if y is None else y[i]
            numpyro.sample(f"y{i}", dist.Normal(means[i][xs[i]], 1.0), obs=obs)
        table = jnp.where(gate > 0.5, bad, finite)

        def pick(vals):
            return Vindex(table)[tuple(vals[v] for v in scope)] if scope else table

        if not plate:
            numpyro.factor(site, pick(xs))
            return
        with numpyro.plate("p", 2):
            w = numpyro.sample("w", dist.Categorical(Vindex(cw)[xs[-1]]))
            if in_plate:
                numpyro.factor(site, pick(xs + [w]))
        if not in_plate:
            numpyro.factor(site, pick(xs))

    kwargs = {"y": jnp.asarray(y), "gate": jnp.asarray(1.0)}
    if np.isneginf(value):
        return model, kwargs, None
    what = "NaN" if np.isnan(value) else r"\+inf"
    return model, kwargs, rf"site '{site}' has {what} log-probabilities"


def random_subsampled_model(seed: int) -> BadModel:
    """A plate with ``subsample_size`` smaller than its size, around a latent, an
    observed site, or as the inner or outer of two nested plates; its name and
    sizes are drawn. The refusal names the plate."""
    rng = np.random.default_rng(seed)
    name = ("N", "data", "batch", "rows")[int(rng.integers(0, 4))]
    size = int(rng.integers(2, 7))
    sub = int(rng.integers(1, size))
    where = ("latent", "observed", "inner", "outer")[int(rng.integers(0, 4))]
    p = float(rng.uniform(0.1, 0.9))

    def model(y=None):
        z = numpyro.sample("z", dist.Bernoulli(p))
        if where == "latent":
            with numpyro.plate(name, size, subsample_size=sub):
                numpyro.sample("w", dist.Bernoulli(p))
        elif where == "observed":
            with numpyro.plate(name, size, subsample_size=sub):
                numpyro.sample("y", dist.Normal(z, 1.0), obs=y)
        else:
            outer = (name, size, sub) if where == "outer" else ("o", 2, None)
            inner = (name, size, sub) if where == "inner" else ("i", 2, None)
            with numpyro.plate(outer[0], outer[1], subsample_size=outer[2]):
                numpyro.sample("v", dist.Bernoulli(p))
                with numpyro.plate(inner[0], inner[1], subsample_size=inner[2]):
                    numpyro.sample("w", dist.Bernoulli(p))

    kwargs = {"y": jnp.asarray(rng.normal(size=sub))} if where == "observed" else {}
    return (
        model,
        kwargs,
        rf"plate '{name}' (at site '\w+' )?is subsampled \({sub} of {size}\)",
    )


def random_undeclared_batch_model(seed: int) -> BadModel:
    """A site with a batch dimension (size 2-4, possibly the cardinality of a
    latent) that no plate declares: a latent outside any plate, a latent with an
    extra dim left of its plate's, an observed site, or a ``numpyro.factor``.
    The refusal names the site. (A batch dim of size 1 broadcasts harmlessly and
    is accepted.)"""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 4))
    n = int(rng.choice([k, int(rng.integers(2, 5))]))  # often == k: enum-sized
    where = ("latent", "latent_in_plate", "observed", "factor")[int(rng.integers(0, 4))]
    bad = ("z", "h", "state")[int(rng.integers(0, 3))]
    probs = jnp.asarray(rng.dirichlet(np.ones(k)))
    table = jnp.asarray(rng.normal(size=k))
    ones = jnp.ones(n)

    def model(y=None):
        x = numpyro.sample("x", dist.Categorical(probs))
        if where == "latent":
            numpyro.sample(bad, dist.Categorical(probs * ones[:, None]))
        elif where == "latent_in_plate":
            with numpyro.plate("p", 2):
                numpyro.sample(bad, dist.Categorical(probs * jnp.ones((n, 2, 1))))
        elif where == "observed":
            numpyro.sample(bad, dist.Normal(table[x] * ones, 1.0), obs=y)
        else:
            numpyro.factor(bad, table[x] * ones)

    kwargs = {"y": jnp.asarray(rng.normal(size=n))} if where == "observed" else {}
    return (
        model,
        kwargs,
        rf"site '{bad}' has a batch dimension -\d of size {n} that no numpyro\.plate "
        "declares",
    )


#: Continuous latent families of :func:`random_continuous_latent_model`.
CONTINUOUS_FAMILIES = {
    "Normal": lambda: dist.Normal(0.0, 1.0),
    "Gamma": lambda: dist.Gamma(2.0, 1.0),
    "Beta": lambda: dist.Beta(2.0, 2.0),
    "Exponential": lambda: dist.Exponential(1.0),
    "LogNormal": lambda: dist.LogNormal(0.0, 1.0),
    "Uniform": lambda: dist.Uniform(0.0, 1.0),
    "HalfNormal": lambda: dist.HalfNormal(1.0),
    "Dirichlet": lambda: dist.Dirichlet(jnp.ones(3)),
}


def random_continuous_latent_model(seed: int, in_plate: bool | None = None) -> BadModel:
    """Discrete latents and one continuous latent site (a family of
    :data:`CONTINUOUS_FAMILIES`, drawn), before, between or after them, at the
    top level or in a plate (``in_plate``; drawn when ``None``), and scalar ones
    used by an observed site. The refusal names the site and the family."""
    rng = np.random.default_rng(seed)
    family = sorted(CONTINUOUS_FAMILIES)[int(rng.integers(0, len(CONTINUOUS_FAMILIES)))]
    plate = bool(rng.integers(0, 2)) if in_plate is None else in_plate
    at = int(rng.integers(0, 3))
    name = ("mu", "theta", "scale")[int(rng.integers(0, 3))]
    probs = jnp.asarray(rng.dirichlet(np.ones(3)))

    def model(y=None):
        x = None
        for i in range(3):
            if i == at:
                fn = CONTINUOUS_FAMILIES[family]()
                if plate:
                    with numpyro.plate("p", 2):
                        c = numpyro.sample(name, fn)
                else:
                    c = numpyro.sample(name, fn)
                if fn.event_shape == ():
                    numpyro.sample("y", dist.Normal(jnp.sum(c), 1.0), obs=y)
            x = numpyro.sample(f"x{i}", dist.Categorical(probs))
        del x

    kwargs = {"y": jnp.asarray(rng.normal())}
    if family == "Dirichlet":
        kwargs = {}
    return (
        model,
        kwargs,
        rf"latent site '{name}' has distribution {family}, which has no finite support",
    )
