"""Independent exact references: NumPyro's own enumeration, and brute force.

Neither uses the factor-graph compiler or the message-passing kernel:

- :func:`enumerate_exact` asks NumPyro/funsor: ``log Z`` from
  ``numpyro.contrib.funsor`` (``log_density``'s variable elimination, with the
  ``max`` semiring for max-sum; funsor's optimizer orders the contractions and
  each pair is contracted in log space, a sum then a logsumexp, where funsor's
  default log einsum underflows), exact marginals by *clamping* each value of each
  latent variable (an additive 0/-inf offset on that site's log-prob) and
  re-computing ``log Z``; the joint MAP from the same clamped contractions in
  the max semiring (the argmax of every max-marginal; one variable at a time by
  clamping where a max-marginal has a tie).
- :func:`brute_force` lists every joint configuration with ``itertools.product``
  and scores each with ``numpyro.infer.util.log_density`` (the model's own
  log-joint). Exponential: for tiny models only.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import funsor
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from funsor.cnf import Contraction
from funsor.interpretations import (
    DispatchedInterpretation,
    PrioritizedInterpretation,
    eager_base,
    normalize_base,
    reflect,
)
from funsor.tensor import Tensor
from numpyro.contrib.funsor import config_enumerate
from numpyro.contrib.funsor.infer_util import _enum_log_density
from numpyro.infer.util import log_density
from numpyro.primitives import Messenger

from pgm_drm._typing import Array, Semiring
from pgm_drm.graph.compile import (
    CompileError,
    check_evidence_values,
    enum_support,
    max_plate_nesting,
    model_sites,
    observed_in_support,
    split_evidence,
    support_values,
)
from pgm_drm.inference.api import Posterior
from pgm_drm.semiring import reduce_t, resolve_temperature

__all__ = [
    "MAX_BRUTE_FORCE_CONFIGS",
    "LatentLayout",
    "as_batch_shape",
    "brute_force",
    "enumerate_exact",
    "latent_layout",
]

#: Largest number of joint configurations :func:`brute_force` will list.
MAX_BRUTE_FORCE_CONFIGS = 2**20

funsor.set_backend("jax")


class LatentLayout(NamedTuple):
    """Where a latent site's values live.

    Attributes:
        plate_shape: The plates' sizes, leftmost dim first: the layout of the
            site's arrays in a :class:`Posterior` (as ``infer`` returns them).
        support: The support values, in ``enumerate_support`` order.
        batch_shape: The site's batch shape in the model: the plates' sizes at
            their dims, 1 at dims no plate of the site declares (a plate at
            ``dim=-2`` gives ``(n, 1)``). Values substituted into the model have
            this shape; it holds the same entries as ``plate_shape``.
    """

    plate_shape: tuple[int, ...]
    support: np.ndarray
    batch_shape: tuple[int, ...]


def latent_layout(
    model: Callable, *args: Any, **kwargs: Any
) -> dict[str, LatentLayout]:
    """``site -> LatentLayout`` for every latent site, from one plain trace."""
    tr = model_sites(model, *args, **kwargs)
    out = {}
    for name, site in tr.items():
        if site["type"] == "sample" and not site["is_observed"]:
            frames = sorted(
                (f for f in site["cond_indep_stack"] if f.dim is not None),
                key=lambda f: f.dim,
            )
            plate_shape = tuple(f.size for f in frames)
            batch_shape = tuple(site["fn"].batch_shape)
            if int(np.prod(batch_shape)) != int(np.prod(plate_shape)):
                raise CompileError(
                    f"latent site '{name}' has batch shape {batch_shape}, which does "
                    f"not hold its plates' sizes {plate_shape}"
                )
            out[name] = LatentLayout(
                plate_shape, support_values(site["fn"], name), batch_shape
            )
    return out


def as_batch_shape(
    layout: dict[str, LatentLayout], values: dict[str, Any], lead: int = 0
) -> dict[str, Any]:
    """``values`` (``site -> (*lead, *plate_shape, *trail)``) with the plate axes
    laid out as the site's batch shape, ``lead`` leading and any trailing axes
    kept: the same entries in the same (C) order, with 1s at the dims no plate
    of the site declares."""
    out = {}
    for s, v in values.items():
        shape = np.shape(v)
        trail = shape[lead + len(layout[s].plate_shape) :]
        out[s] = v.reshape(shape[:lead] + layout[s].batch_shape + trail)
    return out


_log_space_base = DispatchedInterpretation("log_space")


@_log_space_base.register(
    Contraction, funsor.ops.LogaddexpOp, funsor.ops.AddOp, frozenset, Tensor, Tensor
)
def _log_space_contraction(red_op, bin_op, reduced_vars, lhs, rhs):
    """A (logaddexp, add) contraction of two tensors as their sum, then a
    logsumexp over ``reduced_vars`` (shifted by the max of the summed terms)."""
    return (lhs + rhs).reduce(red_op, reduced_vars)


#: funsor's eager interpretation with one rule first: eager funsor contracts
#: (logaddexp, add) pairs with a log einsum that exponentiates each operand
#: shifted by its own max, which underflows to ``-inf`` where the terms of a
#: sum differ by more than ~745 (``log p(z=1|y) = -800`` comes out ``-inf``).
_LOG_SPACE = PrioritizedInterpretation(
    _log_space_base, eager_base, normalize_base, reflect
)


def _contract_in_log_space(lazy: funsor.Funsor):
    """Evaluate NumPyro's lazy ``log Z`` (``_enum_log_density`` with
    ``apply_optimizer=False``): funsor's optimizer picks the pairwise
    contraction order, every pair is contracted in log space."""
    with _LOG_SPACE:
        res = funsor.optimizer.apply_optimizer(lazy)
    if res.inputs:
        raise ValueError(
            f"NumPyro's enumerated log Z has free inputs {list(res.inputs)}"
        )
    return res.data


class _OffsetDist(dist.Distribution):
    """A discrete distribution whose log-prob gets ``offset[..., value index]``."""

    has_enumerate_support = True

    def __init__(self, base, offset, support):
        self.base, self.offset, self.support_values = base, offset, support
        super().__init__(base.batch_shape, base.event_shape)

    @property
    def support(self):
        return self.base.support

    def enumerate_support(self, expand=True):
        return self.base.enumerate_support(expand)

    def sample(self, key, sample_shape=()):
        return self.base.sample(key, sample_shape)

    def log_prob(self, value):
        hit = jnp.asarray(value)[..., None] == self.support_values
        return self.base.log_prob(value) + jnp.sum(
            jnp.where(hit, self.offset, 0.0), axis=-1
        )


class _offsets(Messenger):
    """Add per-value log-offsets (shape ``(*batch_shape, K)``) to latent sites."""

    def __init__(self, fn, offsets, supports):
        self.offsets, self.supports = offsets, supports
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.offsets:
            msg["fn"] = _OffsetDist(
                msg["fn"], self.offsets[msg["name"]], self.supports[msg["name"]]
            )


#: Compiled reference functions, keyed on what they compute (see _fingerprint);
#: bounded, so it keeps at most this many models alive.
_CACHE: OrderedDict = OrderedDict()
CACHE_SIZE = 16


def _fingerprint(closed: jax.extend.core.ClosedJaxpr) -> tuple:
    """What a traced function computes: its jaxpr and the bytes of every constant
    it closed over. A global the model reads, changed between calls, changes the
    fingerprint (a cache keyed on the model object would return the old answer)."""
    consts = tuple(
        (
            np.asarray(c).dtype.str,
            np.shape(c),
            hashlib.sha1(np.asarray(c).tobytes()).hexdigest(),
        )
        for c in closed.consts
    )
    return str(closed.jaxpr), consts


def _enum_log_z(model, args, kwargs, layout, temperature):
    """NumPyro's enumerated ``log Z`` with per-value log-offsets on the latent
    sites (``site -> (n, *batch_shape, K)``, :func:`as_batch_shape`), jitted and
    vmapped over the leading axis of the offsets, and cached on what it computes
    (:func:`_fingerprint`). Returns ``(fn, evidence arrays)``."""
    arrays, static = split_evidence(kwargs)
    nesting = max_plate_nesting(model_sites(model, *args, **kwargs))
    supports = {s: jnp.asarray(sup) for s, (_, sup, _) in layout.items()}
    sum_op = funsor.ops.max if temperature == 0.0 else funsor.ops.logaddexp

    # Positional arguments are structure (plate sizes, shapes): closed over, never
    # traced, as compile_model treats them.
    def log_z(offsets, arrays):
        m = enum_support(
            config_enumerate(_offsets(model, offsets, supports)),
            first_available_dim=-(nesting + 1),
        )
        lazy, _, _ = _enum_log_density(
            m,
            args,
            {**static, **arrays},
            {},
            sum_op,
            funsor.ops.add,
            apply_optimizer=False,
        )
        return _contract_in_log_space(lazy)

    zero = {s: jnp.zeros(batch + (len(sup),)) for s, (_, sup, batch) in layout.items()}
    # One funsor trace: its jaxpr is both the cache key and the function run.
    closed = jax.make_jaxpr(log_z)(zero, arrays)
    key = (_fingerprint(closed), temperature)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], arrays
    run = jax.extend.core.jaxpr_as_fun(closed)

    def traced(offsets, arrays):
        return run(*jax.tree_util.tree_leaves((offsets, arrays)))[0]

    fn = jax.jit(jax.vmap(traced, in_axes=(0, None)))
    _CACHE[key] = fn
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fn, arrays


def _clamps(layout) -> tuple[dict, list]:
    """Offsets that clamp one variable to one value, for every (site, instance, k)."""
    entries = []
    for site, (shape, sup, _) in layout.items():
        for idx in itertools.product(*(range(s) for s in shape)):
            for k in range(len(sup)):
                entries.append((site, idx, k))
    offsets = {
        s: np.zeros((len(entries) + 1,) + shape + (len(sup),))
        for s, (shape, sup, _) in layout.items()
    }
    for m, (site, idx, k) in enumerate(entries, start=1):
        row = np.full(len(layout[site][1]), -np.inf)
        row[k] = 0.0
        offsets[site][(m,) + idx] = row
    return offsets, entries


def _map_by_clamping(layout, max_log_z_fn, arrays, size: int) -> dict:
    """Joint MAP by fixing one variable at a time to its best max-marginal state
    (the decoding that stays consistent under ties). Every call is padded to
    ``size`` rows, the shape ``max_log_z_fn`` was compiled for."""
    fixed = {s: np.zeros(shape + (len(sup),)) for s, (shape, sup, _) in layout.items()}
    values = {
        s: np.zeros(shape, dtype=sup.dtype) for s, (shape, sup, _) in layout.items()
    }
    for site, (shape, sup, _) in layout.items():
        for idx in itertools.product(*(range(n) for n in shape)):
            k_all = len(sup)
            batch = {s: np.repeat(o[None], size, axis=0) for s, o in fixed.items()}
            for k in range(k_all):
                row = np.full(k_all, -np.inf)
                row[k] = 0.0
                batch[site][(k,) + idx] = row
            scores = max_log_z_fn(as_batch_shape(layout, batch, lead=1), arrays)
            best = int(jnp.argmax(scores[:k_all]))
            fixed[site][idx] = batch[site][(best,) + idx]
            values[site][idx] = sup[best]
    return values


#: Two states of one max-marginal closer than this (relative to its size) count
#: as a tie: the clamped maxima are separate float64 contractions of the same
#: terms (~1e-15 relative apart when the states are truly tied).
TIE_RTOL = 1e-9


def _per_site(layout, entries, values) -> dict[str, np.ndarray]:
    """``site -> (*plate_shape, K)``: the clamped ``log Z`` of every
    ``(site, instance, k)`` of :func:`_clamps`, in its place."""
    out = {s: np.zeros(shape + (len(sup),)) for s, (shape, sup, _) in layout.items()}
    for value, (site, idx, k) in zip(values, entries, strict=True):
        out[site][idx + (k,)] = value
    return out


def _map_from_max_marginals(layout, entries, max_marginals) -> dict | None:
    """The joint MAP as the argmax of every max-marginal, or ``None`` when some
    max-marginal has a tie. Without ties the joint maximiser is unique, and each
    of its coordinates is the unique argmax of that variable's max-marginal."""
    values = {}
    for site, m in _per_site(layout, entries, max_marginals).items():
        top2 = np.sort(m, axis=-1)[..., -2:]
        if m.shape[-1] > 1 and np.any(
            top2[..., 0]
            >= top2[..., 1] - TIE_RTOL * np.maximum(1.0, np.abs(top2[..., 1]))
        ):
            return None
        values[site] = layout[site][1][np.argmax(m, axis=-1)]
    return values


def _check_evidence_arrays(arrays: dict) -> None:
    """The references refuse what :func:`~pgm_drm.inference.infer` refuses."""
    for name, x in arrays.items():
        check_evidence_values(name, x)


def _check_log_z(logp) -> None:
    """Refuse evidence of probability zero and NaN/+inf joints, as ``infer`` does."""
    if np.any(np.isnan(np.asarray(logp))):
        raise ValueError("the log joint is NaN for some configuration")
    top = float(np.max(np.asarray(logp)))
    if top == np.inf:
        raise ValueError("the log joint is +inf for some configuration")
    if top == -np.inf:
        raise ValueError("the evidence has probability zero under the model")


def _no_latents(model, args, kwargs, t: float, schedule: str) -> Posterior:
    """A model with no latent site: log Z is its log density, nothing to infer."""
    arrays, static = split_evidence(kwargs)
    log_z = log_density(model, args, {**static, **arrays}, {})[0]
    _check_log_z(np.asarray(log_z))
    return Posterior({}, {}, log_z, t, schedule)


def enumerate_exact(
    model: Callable,
    *args: Any,
    semiring: Semiring = "sum",
    temperature: float | None = None,
    **kwargs: Any,
) -> Posterior:
    """Exact posterior from NumPyro's own enumeration (funsor), no factor graph.

    ``log_z`` is NumPyro's enumerated ``log_density`` (logsumexp, or ``max`` for
    max-sum); ``log_marginals[site][..., k]`` is ``log Z(site clamped to k) -
    log Z``; ``map`` is the joint MAP decoded from NumPyro's max-semiring
    contractions with each value clamped (the argmax of every max-marginal when
    none has a tie; otherwise fixed one variable at a time, as in Viterbi
    backtracking). NumPyro scores an observed value outside its
    distribution's support by the density's formula (``compile_model`` and
    :func:`brute_force` score it ``-inf``): compare on evidence in the support.

    Args:
        model: A NumPyro model with finite discrete latent sites.
        *args, **kwargs: The model's arguments, observations included (one
            instance; loop over a batch yourself).
        semiring: "sum" or "max".
        temperature: Only 0 or 1 (funsor's semirings).

    Returns:
        A :class:`Posterior` with ``schedule="enumeration"``.
    """
    t = resolve_temperature(semiring, temperature)
    if t not in (0.0, 1.0):
        raise ValueError("enumerate_exact supports temperature 0 (max) or 1 (sum)")
    _check_evidence_arrays(split_evidence(kwargs)[0])
    layout = latent_layout(model, *args, **kwargs)
    if not layout:
        return _no_latents(model, args, kwargs, t, "enumeration")
    log_z_fn, arrays = _enum_log_z(model, args, kwargs, layout, t)
    offsets, entries = _clamps(layout)
    offsets = as_batch_shape(layout, offsets, lead=1)
    z = log_z_fn(offsets, arrays)
    log_z = z[0]
    _check_log_z(np.asarray(z))
    zc = np.asarray(z[1:])
    margs = _per_site(layout, entries, zc)
    for site, m in margs.items():
        # log Z(clamped to k), normalised over k by its own reduction (exactly log
        # Z in either semiring), shifted by the max first: at |log Z| ~ 1e5 the
        # difference with the separately computed log Z cancels in float32.
        top = np.max(m, axis=-1, keepdims=True)
        rel = m - np.where(np.isfinite(top), top, 0.0)
        margs[site] = (
            rel - np.asarray(reduce_t(jnp.asarray(rel), (rel.ndim - 1,), t))[..., None]
        )
    # The MAP from the same clamped contractions in the max semiring (one more
    # compile for sum-product), one variable at a time where there are ties.
    max_fn = log_z_fn if t == 0.0 else _enum_log_z(model, args, kwargs, layout, 0.0)[0]
    zmax = zc if t == 0.0 else np.asarray(max_fn(offsets, arrays)[1:])
    maps = _map_from_max_marginals(layout, entries, zmax)
    if maps is None:
        maps = _map_by_clamping(layout, max_fn, arrays, len(entries) + 1)
    return Posterior(
        {s: jnp.asarray(m) for s, m in margs.items()},
        {s: jnp.reshape(jnp.asarray(v), layout[s][0]) for s, v in maps.items()},
        log_z,
        t,
        "enumeration",
    )


def _warn_if_unresolved(logp: Array) -> None:
    """Warn when the log joints are too large for their dtype to be trusted: each
    is rounded by ``|log p| * eps``, and past one nat the listed posterior may be
    wrong (a float64 image filled with ``1e30`` scores every configuration as the
    same ``-8e63``). ``infer`` carries an observed Normal's state-free part
    apart (``FactorGraph.evidence_parts``) and stays exact there; other
    families at such magnitudes are not helped."""
    finite = np.asarray(logp)[np.isfinite(np.asarray(logp))]
    if not finite.size:
        return
    big = float(np.max(np.abs(finite)))
    err = big * float(jnp.finfo(logp.dtype).eps)
    if err > 1.0:
        warnings.warn(
            f"brute_force: log joints up to {big:.3g} in {logp.dtype} are rounded by "
            f"up to {err:.3g} nats each, so the listed posterior may be wrong; "
            "infer carries an observed Normal's state-free part apart from its "
            "table and stays exact for such sites",
            RuntimeWarning,
            stacklevel=3,
        )


def _observed_in_support(tr: Mapping[str, Any]) -> Array:
    """Whether every observed value lies in its distribution's support (a
    masked-out entry always does). NumPyro's ``log_prob`` scores a value by the
    density's formula, in or out of the support; the model's density is zero
    outside it."""
    ok = jnp.asarray(True)
    for site in tr.values():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        inside = observed_in_support(site["fn"], site["value"])
        if inside is None:  # the reals, or a support that cannot be tested
            continue
        if site.get("mask") is not None:
            inside = inside | ~jnp.asarray(site["mask"], bool)
        ok = ok & jnp.all(inside)
    return ok


def brute_force(
    model: Callable,
    *args: Any,
    semiring: Semiring = "sum",
    temperature: float | None = None,
    **kwargs: Any,
) -> Posterior:
    """Ground truth by listing every joint configuration (``itertools.product``).

    Each configuration is scored by ``numpyro.infer.util.log_density`` (the
    model's own log-joint, no enumeration, with ``-inf`` where an observed value
    lies outside its support), vmapped over configurations. The MAP
    is the first maximiser in ``itertools.product`` order.

    Raises:
        ValueError: More than :data:`MAX_BRUTE_FORCE_CONFIGS` configurations.
    """
    t = resolve_temperature(semiring, temperature)
    _check_evidence_arrays(split_evidence(kwargs)[0])
    layout = latent_layout(model, *args, **kwargs)
    if not layout:
        return _no_latents(model, args, kwargs, t, "brute-force")
    slots = [
        (site, idx)
        for site, (shape, _, _) in layout.items()
        for idx in itertools.product(*(range(s) for s in shape))
    ]
    sizes = [len(layout[s][1]) for s, _ in slots]
    n = int(np.prod(sizes, dtype=np.int64)) if sizes else 1
    if n > MAX_BRUTE_FORCE_CONFIGS:
        raise ValueError(
            f"brute force would list {n} configurations (> {MAX_BRUTE_FORCE_CONFIGS})"
        )
    states = np.array(list(itertools.product(*(range(k) for k in sizes))), dtype=int)
    states = states.reshape(n, len(slots))
    params = {
        s: np.zeros((n,) + shape, dtype=sup.dtype)
        for s, (shape, sup, _) in layout.items()
    }
    for col, (site, idx) in enumerate(slots):
        params[site][(slice(None),) + idx] = layout[site][1][states[:, col]]
    arrays, static = split_evidence(kwargs)

    def joint(p, arrays):
        logp, tr = log_density(model, args, {**static, **arrays}, p)
        return jnp.where(_observed_in_support(tr), logp, -jnp.inf)

    logp = jax.jit(jax.vmap(joint, in_axes=(0, None)))(
        as_batch_shape(layout, params, lead=1), arrays
    )
    _check_log_z(logp)
    _warn_if_unresolved(logp)
    best = int(jnp.argmax(logp))
    # Marginals from log-joints shifted by their max: at |log p| ~ 1e5 (a bright
    # 64x64 image) the difference of two absolute log-sums cancels in float32.
    top = logp[best]
    rel = logp - top
    rel_z = reduce_t(rel, (0,), t)
    log_z = top + rel_z
    margs = {s: np.zeros(shape + (len(sup),)) for s, (shape, sup, _) in layout.items()}
    for col, (site, idx) in enumerate(slots):
        for k in range(sizes[col]):
            sel = rel[states[:, col] == k]
            margs[site][idx + (k,)] = float(reduce_t(sel, (0,), t) - rel_z)
    maps = {s: jnp.asarray(v[best]) for s, v in params.items()}
    return Posterior(
        {s: jnp.asarray(m) for s, m in margs.items()}, maps, log_z, t, "brute-force"
    )
