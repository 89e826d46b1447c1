"""Compile a NumPyro model with finite discrete latent sites into a factor graph.

The compiler never re-derives model math: every factor table is the model's own
``log_prob`` (DESIGN §3). It is *lifted* (DESIGN §3b): it costs what the model's
structure costs, not what its number of plate instances costs.

1. One abstract trace (``jax.make_jaxpr``) runs the model once. Each latent
   sample site gets a *marker* value (an abstract array of its batch shape, the
   ``pgm_drm_latent`` primitive), lifted afterwards to an input of the jaxpr, so
   the trace is a jaxpr ``J``: "latent values and evidence -> every site's
   log-prob". The same trace checks the sites: finite discrete supports, no
   subsampled plates, observed values of their exact shape, no undeclared batch
   dimensions (read off ``J``'s output shapes), and records plates and supports.
   NumPyro's argument checks cannot judge tracers; every latent table must
   instead sum to one at every parent state. Whatever this trace cannot judge
   falls back to the older two traces (a plain one with the latents at their first
   support value, then an abstract one), which also report a malformed model's
   error; ``ONE_TRACE = False`` forces them, and the tests hold both to the same
   graph.
2. Walking ``J`` gives each site's
   *provenance*: the latent sites and evidence arrays its log-prob depends on
   (the idea of ``numpyro.infer.inspect.get_dependencies``). A site's table is
   read over its *own* parents, so there is no limit on the number of sites
   (NumPyro's enumerator has 25 dims).
3. Latent sites that appear together in some site's scope get different
   *colours* (greedy colouring of that interference graph; a chain or a grid needs
   two). ``J`` is evaluated once under one ``jax.vmap`` per colour, the latent
   inputs of colour ``c`` mapped over their support values: each site's output is
   its whole log-prob table over (its parents' states, its plate instances).
   A big jaxpr (a model written as a loop, over ``GROUP_EQNS`` equations) gets its
   compile-time tables from :mod:`pgm_drm.graph.slices` instead: sites whose
   slices of ``J`` are alike are evaluated together, one jitted vmap per distinct
   slice; the colour evaluator stays for the rest and for new evidence.
4. A site inside plates stays one *group*: one table of shape
   ``(n_instances, *cardinalities)`` and an ``int32`` index array of shape
   ``(n_instances, arity)`` naming its scope's variables. No Python object per
   instance is made unless asked for (``variables``, ``factors``, ``graph``).
5. A *data plate* (a plate that holds no latent site, such as the pixels of an
   image inside its units' plates) gives instances that share one scope: they
   are summed into one factor (exact), inside the natural form's contraction
   (the template match of Eq. 8 as one matrix product per batch). The group's
   plates are the kept ones; ``SiteInfo.summed`` lists the summed ones.

Observed exponential-family sites are scored in natural-parameter form
(``pgm_drm.graph.natural``, Eq. 8): one matmul per batch instead of an
elementwise table over (latent states x pixels). The graph keeps the part of
``J`` that new evidence changes; what in it does not depend on the evidence (the
natural parameters at every latent state) is computed once, at the first call,
so a batch of evidence runs only the contraction (``_Evaluator._staged``). An
observed Normal's state-free part (``x^2`` and the log-normaliser), and a
Bernoulli's or Poisson's (its support test, the Poisson's ``-ln x!``), is kept out
of its table and added to ``log Z`` (``FactorGraph.evidence_parts``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import numpyro
from jax import lax
from jax.extend.core import ClosedJaxpr, Literal, jaxpr_as_fun
from numpyro import handlers
from numpyro.contrib.funsor import config_enumerate, enum
from numpyro.contrib.funsor import trace as packed_trace
from numpyro.distributions import (
    BernoulliLogits,
    BernoulliProbs,
    CategoricalLogits,
    CategoricalProbs,
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
    constraints,
)
from numpyro.distributions.distribution import Unit
from numpyro.primitives import Messenger

from pgm_drm._typing import Array, ScheduleKind
from pgm_drm.graph.natural import natural_log_prob, natural_log_prob_parts
from pgm_drm.graph.slices import grouped_tables
from pgm_drm.models.validation import all_finite

__all__ = [
    "CompileError",
    "Factor",
    "FactorGraph",
    "FactorGroup",
    "SiteInfo",
    "Variable",
    "VariableGroup",
    "compile_model",
    "check_evidence_values",
    "enum_support",
    "max_plate_nesting",
    "model_sites",
    "split_evidence",
    "support_values",
]

#: Evaluate the model's jaxpr as one jitted program up to this many equations.
JIT_EQNS = 3000

#: Models whose jaxpr has more equations than this (loop-written models) get
#: their compile-time tables slice by distinct slice (:mod:`pgm_drm.graph.slices`),
#: and new evidence is split from the rest equation by equation. At 3000 (the
#: jit limit) a loop model just under it compiled its whole jaxpr at once, for
#: seconds: an HMM of 300 steps (2,400 equations) took 5.0 s in compile_model
#: (0.6 s at 300), one of 100 steps 1.7 + 2.1 s to its first result (0.8 +
#: 0.7 s). Models written with plates (RM, DRM: ~125 equations) stay under it.
GROUP_EQNS = 300

#: Most distinct colours (simultaneously enumerated latent sites) one trace uses.
MAX_COLOURS = 48


class CompileError(ValueError):
    """Raised when a model cannot be compiled into a finite factor graph."""


@dataclass(frozen=True)
class Variable:
    """One plate instance of a discrete latent site.

    Attributes:
        name: Node name, ``"site"`` or ``"site[i,j]"``.
        site: The NumPyro sample site it belongs to.
        index: Position in the site's value array (plate shape, numpyro layout).
        support: The values the site can take, in enumeration order.
    """

    name: str
    site: str
    index: tuple[int, ...]
    support: tuple[Any, ...]

    @property
    def cardinality(self) -> int:
        return len(self.support)


@dataclass(frozen=True)
class Factor:
    """One plate instance of a sample site's log-prob.

    Attributes:
        name: Node name, ``"p(site)"`` or ``"p(site[i,j])"``.
        site: The NumPyro sample site whose ``log_prob`` gives the table.
        index: Plate index of this instance.
        scope: Names of the variables the table depends on, in axis order.
    """

    name: str
    site: str
    index: tuple[int, ...]
    scope: tuple[str, ...]


@dataclass(frozen=True)
class SiteInfo:
    """What the compiler learned about one sample site.

    Attributes:
        name: Site name.
        is_observed: Observed (or ``numpyro.factor``) sites only contribute factors.
        plates: Plate names of the site, outermost batch dim first (most negative).
        plate_shape: Sizes of those plates (numpyro layout; the site's value shape
            less its data plates, see ``summed``).
        plate_dims: The plates' batch dims (negative), in the same order.
        support: Support values (latent sites) or ``()``.
        scope: Latent sites the log-prob depends on, in table axis order (the site
            itself first when it is latent).
        evidence: Evidence keyword arguments the log-prob depends on.
        summed: ``(dim, size)`` of the site's *data plates*, plates that hold no
            latent site: every instance along them has the same scope, so their
            log-probs are summed into one factor (exact). ``plates``,
            ``plate_shape`` and ``plate_dims`` are the plates kept.
    """

    name: str
    is_observed: bool
    plates: tuple[str, ...]
    plate_shape: tuple[int, ...]
    plate_dims: tuple[int, ...]
    support: tuple[Any, ...]
    scope: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()
    summed: tuple[tuple[int, int], ...] = ()

    @property
    def n_instances(self) -> int:
        return math.prod(self.plate_shape)


@dataclass(frozen=True, eq=False)
class VariableGroup:
    """All plate instances of one latent site: flat ids ``offset .. offset+size``.

    Attributes:
        site: Site name.
        plate_shape: The site's plate sizes (numpyro layout).
        support: Support values, in enumeration order.
        offset: Flat id of the first instance (instances in C order of the plates).
    """

    site: str
    plate_shape: tuple[int, ...]
    support: tuple[Any, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.plate_shape)

    @property
    def cardinality(self) -> int:
        return len(self.support)


@dataclass(frozen=True, eq=False)
class FactorGroup:
    """All plate instances of one sample site's log-prob, as one table.

    Attributes:
        site: Site name.
        scope_sites: Latent sites of the table's axes (after the instance axis).
        cards: Cardinalities of those axes.
        scope: ``int32`` array ``(n_instances, arity)``: the flat variable id of each
            scope axis, per instance (read-only).
        plate_shape: The site's plate sizes; instance ``i`` is the C-order ravel.
        evidence: Evidence keyword arguments the table depends on.
    """

    site: str
    scope_sites: tuple[str, ...]
    cards: tuple[int, ...]
    scope: np.ndarray
    plate_shape: tuple[int, ...]
    evidence: tuple[str, ...]

    @property
    def arity(self) -> int:
        return len(self.cards)

    @property
    def size(self) -> int:
        return int(self.scope.shape[0])


def _index_str(index: tuple[int, ...]) -> str:
    return "" if not index else "[" + ",".join(str(i) for i in index) + "]"


class _first_value(Messenger):
    """Set every latent sample site to its first support value (no sampling)."""

    def process_message(self, msg):
        if (
            msg["type"] == "sample"
            and not msg["is_observed"]
            and msg["value"] is None
            and getattr(msg["fn"], "has_enumerate_support", False)
            and msg["fn"].event_shape == ()
        ):
            # A numpy value: the model's own indexing by it is then a static
            # slice, not a dispatched gather (most of a plain loop's trace time).
            first = support_values(msg["fn"], msg["name"])[0]
            msg["value"] = np.broadcast_to(first, msg["fn"].batch_shape)
        _refuse_control_flow(msg)


def _refuse_control_flow(msg: Mapping) -> None:
    """NumPyro's ``scan`` and ``cond`` (``numpyro.contrib.control_flow``) trace
    their sites inside a ``lax`` loop or branch, one site for every step: the
    compiler needs one site per node (its error about an undeclared batch
    dimension named the wrong cause)."""
    if msg["type"] == "control_flow":
        raise CompileError(
            "the model uses numpyro.contrib.control_flow (scan or cond), which "
            "compile_model does not support; write the loop as a plain Python loop "
            "(compile_model has no limit on the number of sites)"
        )


def _plain_trace(model: Callable, args: tuple, kwargs: dict) -> dict:
    return handlers.trace(handlers.seed(_first_value(model), 0)).get_trace(
        *args, **kwargs
    )


def _frames(site: Mapping) -> list:
    return sorted(
        (f for f in site["cond_indep_stack"] if f.dim is not None),
        key=lambda f: f.dim,
    )


def _base_dist(fn: Any) -> Any:
    """``fn`` unwrapped from the wrappers that plates, ``.to_event`` and
    ``.mask`` put around it."""
    while isinstance(fn, (ExpandedDistribution, Independent, MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _family_name(fn: Any) -> str:
    """The distribution family's name (``Normal``, not ``ExpandedDistribution``)."""
    return type(_base_dist(fn)).__name__


def model_sites(model: Callable, *args: Any, **kwargs: Any) -> dict[str, dict]:
    """Trace ``model`` once (no enumeration, nothing sampled) and check its sites.

    Latent sites take their first support value.

    Returns:
        The NumPyro trace (an ordered dict of site messages).

    Raises:
        CompileError: A latent site has no finite support (continuous latent), a
            plate is subsampled, or a site has a batch dimension that no plate
            declares (it would collide with enumeration, whatever its size).
    """
    return _checked_sites(model, args, kwargs, log_prob_shapes=True)


def _checked_sites(
    model: Callable, args: tuple, kwargs: dict, log_prob_shapes: bool
) -> dict:
    """:func:`model_sites`; ``log_prob_shapes=False`` leaves the log-prob shape
    check to the caller (``compile_model`` reads the shapes off its jaxpr instead
    of scoring every site once more here)."""
    tr = _plain_trace(model, args, kwargs)
    _check_sites(tr, supports=True)
    if log_prob_shapes:
        for name, site in tr.items():
            if site["type"] == "sample":
                _check_log_prob_shape(name, site, _log_prob_shape(site))
    return tr


def _check_sites(tr: Mapping[str, dict], supports: bool) -> None:
    """The static checks of every site of a trace: plates not subsampled, latent
    sites discrete, scalar and enumerable (``supports``: their supports read, so
    a support that varies across the batch is refused), observed values of the
    site's exact shape."""
    for name, site in tr.items():
        if site["type"] == "plate":
            size, sub = (tuple(site["args"]) + (None, None))[:2]
            if sub is not None and sub != size:
                raise CompileError(
                    f"plate '{name}' is subsampled ({sub} of {size}); subsampled "
                    "plates scale log-probabilities and are not supported by exact "
                    "inference"
                )
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        if not site["is_observed"]:
            _check_latent(name, fn)
            if supports:
                support_values(fn, name)
        else:
            _check_observed_shape(name, site)


def _check_latent(name: str, fn: Any) -> None:
    if not getattr(fn, "has_enumerate_support", False):
        raise CompileError(
            f"latent site '{name}' has distribution {_family_name(fn)}, "
            "which has no finite support; every latent site must be discrete "
            "and enumerable (Categorical, Bernoulli, DiscreteUniform, ...). "
            "Observe it or integrate it out."
        )
    if fn.event_shape != ():
        raise CompileError(
            f"latent site '{name}' has event shape {fn.event_shape}; only "
            "scalar discrete latents (batched by plates) are supported"
        )


def _log_prob_shape(site: Mapping) -> tuple[int, ...]:
    """The shape of a site's log-prob, traced abstractly (no XLA program is
    compiled for it); evaluated when the log-prob reads a concrete value."""
    try:
        return tuple(jax.eval_shape(lambda: _site_log_prob(site)).shape)
    except jax.errors.ConcretizationTypeError:
        return tuple(jnp.shape(_site_log_prob(site)))


def _check_log_prob_shape(name: str, site: Mapping, lp_shape: tuple) -> None:
    """Every batch dim of a site's log-prob is a full plate (or size 1)."""
    frames = {f.dim: f for f in _frames(site)}
    for d in range(-len(lp_shape), 0):
        size = lp_shape[d]
        if d in frames:
            full = frames[d].size
            if size not in (1, full):
                raise CompileError(
                    f"plate '{frames[d].name}' at site '{name}' is subsampled "
                    f"({size} of {full}); subsampled plates are not supported "
                    "by exact inference"
                )
        elif size != 1:
            raise CompileError(
                f"site '{name}' has a batch dimension {d} of size {size} that no "
                "numpyro.plate declares; declare batch dimensions with "
                "numpyro.plate (or use .to_event for event dimensions)"
            )


def _check_observed_shape(name: str, site: Mapping) -> None:
    """An observed value must have exactly the site's shape (plate batch + event):
    NumPyro would broadcast a scalar or a ``(1, 8)`` image against an ``(8, 8)``
    event and score a different image without a word."""
    fn, value = site["fn"], site["value"]
    want, got = tuple(fn.shape()), tuple(jnp.shape(value))
    if got == want or _family_name(fn) == "Unit":
        return  # numpyro.factor: the value is a placeholder, the factor broadcasts
    event = tuple(fn.event_shape)
    hint = ""
    if len(got) > len(want) and got[len(got) - len(want) :] == want:
        hint = (
            "; compile_model takes one example: pass a batch of evidence to "
            "infer(fg, ..., name=batch) instead"
        )
    raise CompileError(
        f"observed site '{name}' got a value of shape {got}, but its distribution "
        f"has shape {want} (batch {tuple(fn.batch_shape)} + event {event}){hint}"
    )


def support_values(fn: Any, name: str = "?") -> np.ndarray:
    """The support of a discrete distribution as a 1-d array (same for every plate
    instance), in ``enumerate_support`` order."""
    k = _arange_support(fn)
    if k is not None:  # NumPyro's own jnp.arange(k), without a device round trip
        return np.arange(k, dtype=jax.dtypes.canonicalize_dtype(np.int64))
    sup = np.asarray(fn.enumerate_support(expand=False))
    k = sup.shape[0]
    sup = sup.reshape(k, -1)
    if sup.shape[1] > 1 and not np.all(sup == sup[:, :1]):
        raise CompileError(
            f"latent site '{name}' has a support that differs across its batch; "
            "every plate instance must share one support"
        )
    return sup[:, 0]


def _arange_support(fn: Any) -> int | None:
    """``k`` when ``fn``'s support is NumPyro's ``jnp.arange(k)`` read off a
    shape (Bernoulli, Categorical, unwrapped from plates' expansion), else None.
    Tested against ``enumerate_support`` itself."""
    while isinstance(fn, ExpandedDistribution):
        fn = fn.base_dist
    method = getattr(type(fn), "enumerate_support", None)
    if method in (BernoulliProbs.enumerate_support, BernoulliLogits.enumerate_support):
        return 2
    if method is CategoricalProbs.enumerate_support:
        return int(jnp.shape(fn.probs)[-1])
    if method is CategoricalLogits.enumerate_support:
        return int(jnp.shape(fn.logits)[-1])
    return None


def _site_log_prob(
    site: Mapping, natural: bool = False, summed: Sequence[tuple[int, int]] = ()
) -> Array:
    """The site's log-prob at its value, with scale and mask applied.

    ``summed`` (``(dim, size)`` of the site's data plates, see
    :class:`SiteInfo`): the log-prob is summed over those dims, kept as size 1.
    For an exponential-family site (the pixels of an image plate) the sum is
    taken in natural form (Eq. 8): the plates join the event dims, so the data
    enter through ONE contraction per sufficient statistic, a matrix product
    under ``jax.vmap``, where the elementwise table would hold (latent states x
    pixels).
    """
    value, fn = site["value"], site["fn"]
    lp, done = None, False
    checked = False  # whether the scoring tests the value's support itself
    plain = site.get("scale") is not None or site.get("mask") is not None
    if site.get("intermediates"):
        lp = fn.log_prob(value, site["intermediates"])
    elif type(fn) in _CATEGORICAL_PARAM:
        lp = _scored(
            getattr(fn, _CATEGORICAL_PARAM[type(fn)]),
            value,
            logits=_CATEGORICAL_PARAM[type(fn)] == "logits",
            observed=bool(site["is_observed"]),
        )
        checked = True
    elif natural and site["is_observed"]:
        dims = () if plain else _natural_sum_dims(fn, summed)
        lp = natural_log_prob(fn, value, dims)
        done = lp is not None and bool(dims)
        checked = lp is not None
    if lp is None:
        lp = fn.log_prob(value)
    if site["is_observed"] and not checked:
        lp = _in_support(fn, value, lp)
    if site.get("scale") is not None:
        lp = site["scale"] * lp
    if site.get("mask") is not None:
        lp = jnp.where(site["mask"], lp, 0.0)
    lp = jnp.asarray(lp)
    return lp if done else _sum_plates(lp, summed)


def _real_support(con: Any) -> bool:
    """Whether ``con`` is the reals (possibly as an event): nothing to check
    past finiteness, which ``infer`` checks of all evidence."""
    while isinstance(con, constraints._IndependentConstraint):
        con = con.base_constraint
    return type(con) is type(constraints.real)


def observed_in_support(fn: Any, value: Any) -> Array | None:
    """Whether ``value`` lies in ``fn``'s support, over ``fn``'s batch shape
    (``None``: nothing to test). Masked-out entries count as inside (NumPyro
    scores them 0 whatever the value: a placeholder for missing data), through
    ``mask`` and ``Independent`` / ``Expanded`` wrappers; real and circular
    supports and constraints that cannot be tested (``dependent``) are not
    tested."""
    if isinstance(fn, Independent):
        inner = observed_in_support(fn.base_dist, value)
        n = fn.reinterpreted_batch_ndims
        if inner is None or n == 0:
            return inner
        batch = tuple(fn.base_dist.batch_shape)
        inner = jnp.broadcast_to(inner, jnp.broadcast_shapes(inner.shape, batch))
        return jnp.all(inner, axis=tuple(range(inner.ndim - n, inner.ndim)))
    if isinstance(fn, MaskedDistribution):
        mask = fn._mask
        if mask is False:
            return None
        inner = observed_in_support(fn.base_dist, value)
        if inner is None or mask is True:
            return inner
        return inner | ~jnp.asarray(mask, bool)
    if isinstance(fn, ExpandedDistribution):
        return observed_in_support(fn.base_dist, value)
    con = fn.support
    if _real_support(con) or isinstance(con, constraints._Circular):
        # Circular: the density is periodic, and angles often come in [0, 2 pi).
        return None
    try:
        return con(value)
    except (NotImplementedError, ValueError, TypeError):
        return None


def _in_support(fn: Any, value: Any, lp: Array) -> Array:
    """``lp`` where ``value`` lies in ``fn``'s support, ``-inf`` elsewhere
    (:func:`observed_in_support`).

    NumPyro scores a value by its density's formula, in or out of the support,
    unless validation is on, and then it only warns: ``Uniform(z, z + 1)`` gave
    every ``z`` the same score (``x = 0.5`` cannot come from ``z = 1``), and
    ``Exponential`` a finite score at ``x < 0``. The support may depend on the
    latents, so the test is part of each state's table."""
    ok = observed_in_support(fn, value)
    return lp if ok is None else jnp.where(ok, lp, -jnp.inf)


def _take_last(log_pmf: Array, value: Array) -> Array:
    """``log_pmf[..., value]`` with NumPyro's broadcasting of ``value`` against
    the batch shape: ``take_along_axis`` as a select and a sum (one nonzero term:
    the same number), a handful of traced operations where ``take_along_axis``
    normalises its indices in thirty (a loop-written model scores thousands)."""
    k = jnp.shape(log_pmf)[-1]
    hit = jnp.expand_dims(value, -1) == lax.iota(np.int32, k)  # no constant
    return jnp.sum(jnp.where(hit, log_pmf, 0.0), axis=-1)


def _probs_log_pmf(probs: Array) -> Array:
    """``CategoricalProbs.logits`` as NumPyro computes them (a zero prob is
    ``-inf``, with a gradient-safe ``log``), but NaN for a negative or NaN prob
    (NumPyro scores it ``-inf``, silently, when validation is off): the tables'
    NaN checks then name the site, at compile time and at ``infer``."""
    probs = jnp.asarray(probs)
    pos = probs > 0
    off = jnp.where(probs == 0, -jnp.inf, jnp.nan)
    return jnp.where(pos, jnp.log(jnp.where(pos, probs, 1.0)), off)


def _logits_log_pmf(logits: Array) -> Array:
    """``CategoricalLogits.log_prob``'s normalised log-pmf, the same expression."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return logits - _logsumexp_last(logits)


def _logsumexp_last(a: Array) -> Array:
    """``jax.nn.logsumexp(a, axis=-1, keepdims=True)`` for a real floating ``a``:
    its operations, in its order, written with ``lax`` (a third of the traced
    calls: ``jnp``'s wrappers normalise axes and promote types at every call)."""
    last = a.ndim - 1
    amax = lax.reduce_max(a, (last,))
    amax = lax.stop_gradient(
        lax.select(lax.is_finite(amax), amax, jnp.zeros_like(amax))
    )
    amax = lax.expand_dims(amax, (last,))
    sumexp = lax.reduce_sum(
        lax.exp(lax.sub(a, lax.broadcast_in_dim(amax, a.shape, tuple(range(a.ndim))))),
        (last,),
    )
    sumexp = lax.expand_dims(lax.abs(sumexp), (last,))
    return lax.add(lax.log(sumexp), amax)


@functools.partial(jax.jit, static_argnames=("logits", "observed"))
def _categorical_score(param: Array, value: Array, logits: bool, observed: bool):
    """A Categorical site's log-prob at ``value`` from its ``probs`` or ``logits``
    (:func:`_take_last` of the normalised log-pmf; observed, ``-inf`` outside
    the support ``0..K-1``, as NumPyro's ``CategoricalProbs.support`` judges).

    Jitted, so a model's trace holds ONE call per site, its body traced once per
    shape: a loop-written model has thousands of these sites, and tracing the
    twenty-odd operations of each inline was half the scoring of a 100x100 grid
    (and its known part was then evaluated per site again)."""
    lp = _take_last(_logits_log_pmf(param) if logits else _probs_log_pmf(param), value)
    if observed:  # NumPyro scores out-of-support values as -inf
        k = jnp.shape(param)[-1]
        lp = jnp.where(constraints.integer_interval(0, k - 1)(value), lp, -jnp.inf)
    return lp


def _scorer_call(param: Any, value: Any, logits: bool, observed: bool) -> Any:
    """The one ``jit`` equation a call of :func:`_categorical_score` on these
    avals stages (traced once per avals and dtype mode: x64 and the promotion
    rule change the body's intermediate dtypes), or None where it stages
    anything else."""
    mode = (bool(jax.config.jax_enable_x64), str(jax.config.jax_numpy_dtype_promotion))
    return _scorer_call_in(param, value, logits, observed, mode)


@functools.lru_cache(maxsize=256)
def _scorer_call_in(param: Any, value: Any, logits: bool, observed: bool, mode):
    """:func:`_scorer_call` in dtype mode ``mode`` (its cache key only)."""
    spec = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
        for a in (param, value)
    ]
    closed = jax.make_jaxpr(
        functools.partial(_categorical_score, logits=logits, observed=observed)
    )(*spec)
    (e,) = closed.jaxpr.eqns if len(closed.jaxpr.eqns) == 1 else (None,)
    if (
        e is None
        or closed.consts
        or e.primitive.name not in ("jit", "pjit")
        or list(e.invars) != list(closed.jaxpr.invars)
        or list(e.outvars) != list(closed.jaxpr.outvars)
    ):
        return None
    return e


def _score_abstract_eval(param, value, *, logits, observed):
    return _scorer_call(param, value, logits, observed).outvars[0].aval


def _score_impl(param, value, *, logits, observed):
    return _categorical_score(param, value, logits=logits, observed=observed)


#: A :func:`_categorical_score` call as ONE plain equation while the model is
#: traced (:func:`_scored`): a ``jit`` call costs ~30 us of JAX's Python
#: dispatch per site, a bound primitive ~12 us. ``_lift_latents`` puts the very
#: ``jit`` equation the call would have staged in its place (:func:`_scorer_call`).
_score_p = jax.extend.core.Primitive("pgm_drm_score")
_score_p.def_abstract_eval(_score_abstract_eval)
_score_p.def_impl(_score_impl)


def _scored(param: Array, value: Array, logits: bool, observed: bool) -> Array:
    """:func:`_categorical_score`, as :data:`_score_p` in the model's own trace
    of :func:`_front_one_trace` (where ``_lift_latents`` expands it)."""
    top = getattr(_NONNEG_INDICES, "trace", None)  # set only inside the one trace
    if (
        top is not None
        and _current_trace() is top
        and all(_staged_here(a, top) for a in (param, value))
        and _scorer_call(param.aval, value.aval, logits, observed) is not None
    ):
        return _score_p.bind(param, value, logits=logits, observed=observed)
    return _categorical_score(param, value, logits=logits, observed=observed)


def _staged_here(a: Any, cur: Any) -> bool:
    """``a`` is a tracer of the trace ``cur``, or a concrete JAX array."""
    if isinstance(a, jax.core.Tracer):
        return getattr(a, "_trace", None) is cur
    return isinstance(a, jax.Array)


def _expand_score(e: Any) -> Any:
    """A ``_score_p`` equation as the ``jit`` equation of the call it stands for."""
    avals = tuple(v.aval for v in e.invars)
    call = _scorer_call(*avals, e.params["logits"], e.params["observed"])
    return call.replace(invars=list(e.invars), outvars=list(e.outvars))


#: Categorical sites are scored by :func:`_categorical_score` (the same values
#: as ``fn.log_prob``, tested against it), not through NumPyro's ``log_prob``
#: (nor, observed, in natural form: with no event dims there is nothing to
#: contract); the value is each class's parameter attribute.
_CATEGORICAL_PARAM = {CategoricalProbs: "probs", CategoricalLogits: "logits"}


def _natural_sum_dims(fn: Any, summed: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """The data-plate dims the natural form can contract: all of them when
    ``fn``'s batch shape holds each at its full size (the plate expanded it),
    else none (the log-prob is then summed as it is)."""
    batch = tuple(fn.batch_shape)
    ok = all(-d <= len(batch) and batch[d] == size for d, size in summed)
    return tuple(d for d, _ in summed) if summed and ok else ()


#: Families whose state-free log-prob terms go to log Z apart from the table.
_SPLIT_FAMILIES = frozenset({"Normal", "BernoulliProbs", "BernoulliLogits", "Poisson"})


def _split_log_prob(
    site: Mapping, summed: Sequence[tuple[int, int]] = ()
) -> tuple[Array, Array] | None:
    """An observed Normal, Bernoulli or Poisson site's log-prob as ``(mean
    part, scale part)`` (:func:`pgm_drm.graph.natural.natural_log_prob_parts`),
    each summed over the data plates; ``None`` for other sites (and for masked
    or scaled ones)."""
    if (
        not site["is_observed"]
        or site.get("intermediates")
        or site.get("scale") is not None
        or site.get("mask") is not None
        or _family_name(site["fn"]) not in _SPLIT_FAMILIES
    ):
        return None
    dims = _natural_sum_dims(site["fn"], summed)
    if not dims and not site["fn"].event_shape and _family_name(site["fn"]) == "Normal":
        # Scored as numpyro does (natural._normal_direct): its scale part holds
        # no data, so there is nothing to keep out of the table.
        return None
    parts = natural_log_prob_parts(site["fn"], site["value"], dims)
    if parts is None:
        return None
    if dims:
        return parts
    return _sum_plates(parts[0], summed), _sum_plates(parts[1], summed)


def _sum_plates(lp: Array, summed: Sequence[tuple[int, int]]) -> Array:
    """``lp`` summed over the data-plate dims (kept as size 1). A dim that ``lp``
    broadcasts (size 1) stands for ``size`` equal instances."""
    if not summed:
        return lp
    depth = max(-d for d, _ in summed)
    if lp.ndim < depth:
        lp = jnp.reshape(lp, (1,) * (depth - lp.ndim) + lp.shape)
    for d, size in summed:
        if lp.shape[d] == 1:
            lp = lp * size
        else:
            lp = jnp.sum(lp, axis=d, keepdims=True)
    return lp


# --------------------------------------------------------------------------- #
# Provenance: which inputs of a jaxpr each output depends on.
# --------------------------------------------------------------------------- #


#: Primitives that call a sub-jaxpr once, inputs lined up with the equation's.
#: Loops and branches (scan, while, cond) are not walked: their outputs depend on
#: all their inputs (a carried value can move between slots across iterations).
_CALL_PRIMITIVES = frozenset(
    {
        "pjit",
        "jit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "remat",
        "checkpoint",
    }
)


def _jaxpr_provenance(
    jaxpr, inputs: Sequence[frozenset], _subs: dict | None = None
) -> list[frozenset]:
    """Forward data-flow over a jaxpr: the input labels each output depends on.

    Sub-jaxprs (``jit``, ``custom_jvp_call``, ...) are walked recursively when
    their inputs line up with the equation's; otherwise every output of the
    equation depends on every input (an over-approximation: a bigger scope,
    never a wrong table). A sub-jaxpr is walked once, for which of its inputs
    each output reads (``_subs``, keyed by identity): a loop-written model calls
    the same jitted scorer at every site.
    """
    env: dict = {}
    empty: frozenset = frozenset()
    subs: dict = {} if _subs is None else _subs

    def read(v):
        return empty if isinstance(v, Literal) else env.get(v, empty)

    for v, p in zip(jaxpr.invars, inputs, strict=True):
        env[v] = p
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        sub = None
        if eqn.primitive.name in _CALL_PRIMITIVES:
            for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
                cand = eqn.params.get(key)
                if cand is not None:
                    sub = cand.jaxpr if hasattr(cand, "jaxpr") else cand
                    break
        if (
            sub is not None
            and hasattr(sub, "invars")
            and len(sub.invars) == len(ins)
            and not getattr(sub, "constvars", ())
            and len(sub.outvars) == len(eqn.outvars)
        ):
            key = id(sub)
            if key not in subs:  # which inputs each output reads; sub kept alive
                own = [frozenset({i}) for i in range(len(ins))]
                subs[key] = (sub, _jaxpr_provenance(sub, own, subs))
            outs = [_union([ins[i] for i in reads]) for reads in subs[key][1]]
        else:
            outs = [_union(ins)] * len(eqn.outvars)
        for v, p in zip(eqn.outvars, outs, strict=True):
            env[v] = p
    return [read(v) for v in jaxpr.outvars]


def _union(labels: Sequence[frozenset]) -> frozenset:
    """The union of ``labels``, reusing a set when there is nothing to add (most
    equations read one labelled input, or none)."""
    out: frozenset = frozenset()
    for p in labels:
        if p and p is not out:
            out = p if not out else out | p
    return out


# --------------------------------------------------------------------------- #
# The abstract trace.
# --------------------------------------------------------------------------- #


def check_evidence_values(name: str, x: Any) -> None:
    """Refuse evidence that no likelihood can score: complex, NaN or infinite
    values (each would otherwise surface as "probability zero" or deep inside JAX).
    Shapes are checked against the model by :func:`model_sites`."""
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    # JAX's dtype tests: numpy's say that bfloat16 is not a float.
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"evidence {name!r} is complex ({dtype}); give real values")
    if not jnp.issubdtype(dtype, jnp.inexact):
        return
    if isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices()):
        # On an accelerator, reduce there: np.asarray would copy the whole batch
        # to the host on every call (most of infer's time for an RM on a GPU).
        if bool(all_finite(x)):
            return
    x = np.asarray(x)
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(
            f"evidence {name!r} contains NaN or inf values ({bad} of {x.size} entries)"
        )


def split_evidence(kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    """Array keyword arguments (evidence, traced) and the rest (static)."""
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
    return arrays, {k: v for k, v in kwargs.items() if k not in arrays}


def _log_prob_fn(
    model: Callable,
    args: tuple,
    static: Mapping[str, Any],
    latent: Sequence[str],
    sites: Sequence[str],
    summed: Sequence[tuple[tuple[int, int], ...]],
    split: list[str] | None = None,
    checks: list | None = None,
) -> Callable:
    """``(latent values, evidence) -> log-prob of every site`` (pure), in
    natural form, each summed over its data plates (``summed[i]``).

    With ``split`` (a list, filled while tracing): after the sites' log-probs
    come ``(mean part, scale part)`` of every site :func:`_split_log_prob`
    splits, in the order of the names it appends to ``split``. With ``checks``
    (a list, filled while tracing): then the observed sites' parameter checks
    (:func:`_param_checks`), their ``(site, parameter, constraint)`` appended."""

    def fn(values, evidence):
        data = dict(zip(latent, values, strict=True))
        seeded = handlers.seed(handlers.substitute(model, data=data), 0)
        tr = handlers.trace(seeded).get_trace(*args, **{**static, **evidence})
        missing = [n for n in sites if n not in tr]
        if missing:  # e.g. sampled inside a jax.jit body, run once then cached
            raise CompileError(
                f"site '{missing[0]}' was sampled when the model first ran but "
                "not when it ran again: a numpyro.sample inside a jax.jit (or "
                "otherwise cached) function runs only when JAX traces it; sample "
                "every site from the model's own Python code"
            )
        if split is not None:
            split.clear()
        out = _score_sites(tr, sites, summed, split)
        if checks is None:
            return out
        checks.clear()
        found = _param_checks(tr, sites)
        checks.extend(c[:3] for c in found)
        return out + [c[3] for c in found]

    return fn


def _score_sites(
    tr: Mapping[str, dict],
    sites: Sequence[str],
    summed: Sequence[tuple[tuple[int, int], ...]],
    split: list[str] | None,
) -> list:
    """Every site's log-prob in natural form, summed over its data plates, then
    ``(mean part, scale part)`` of each site :func:`_split_log_prob` splits (its
    name appended to ``split``; none when ``split`` is None)."""
    out, extra = [], []
    for n, sm in zip(sites, summed, strict=True):
        parts = None if split is None else _split_log_prob(tr[n], sm)
        if parts is None:
            out.append(_site_log_prob(tr[n], True, sm))
        else:  # the same sum natural_log_prob takes, traced once
            out.append(parts[0] + parts[1])
            split.append(n)
            extra.extend(parts)
    return out + extra


def _greedy_colours(scopes: Sequence[Sequence[str]], latent: Sequence[str]) -> dict:
    """Colour the latent sites so that no scope holds two of one colour."""
    g = nx.Graph()
    g.add_nodes_from(latent)
    for scope in scopes:
        g.add_edges_from(itertools.combinations(scope, 2))
    return nx.greedy_color(g, strategy="largest_first") if latent else {}


#: Jitted scorers whose calls a restricted evaluator inlines (:func:`_inline_scorers`).
_INLINED = frozenset({"_categorical_score", "_constraint_bad"})


def _inline_scorers(closed: ClosedJaxpr) -> ClosedJaxpr:
    """``closed`` with every call of :func:`_categorical_score` and
    :func:`_constraint_bad` replaced by the equations of its body.

    A call is one equation while the model is traced (cheap to trace and to
    group by slice), but a call that reads evidence is kept whole when the
    evidence-free part is split off (:func:`_split_by_evidence`): a site's
    normalisation then ran, and compiled, with every new evidence (HMM of 300
    steps: first ``infer`` 1.05 -> 5-6 s). The evaluator a graph keeps for new
    evidence holds the plain operations, as before the calls."""

    eqns, changed = [], False
    for e in closed.jaxpr.eqns:
        body = _scorer_body(e)
        changed |= body is not None
        eqns.extend([e] if body is None else body)
    return (
        ClosedJaxpr(closed.jaxpr.replace(eqns=eqns), closed.consts)
        if changed
        else closed
    )


def _scorer_body(e) -> list | None:
    """The equations of a scorer call ``e`` (see :func:`_inline_scorers`), its
    variables renamed and its outputs written to ``e``'s; None for any other
    equation, or a body this cannot copy (constants, an input passed through)."""
    from jax._src import core

    if e.primitive.name not in ("jit", "pjit") or e.params.get("name") not in _INLINED:
        return None
    inner = e.params["jaxpr"]
    made = {v for ie in inner.jaxpr.eqns for v in ie.outvars}
    outs = inner.jaxpr.outvars
    if inner.consts or len(set(outs)) != len(outs) or not all(v in made for v in outs):
        return None
    env = dict(zip(inner.jaxpr.invars, e.invars, strict=True))
    env.update(zip(outs, e.outvars, strict=True))
    body = []
    for ie in inner.jaxpr.eqns:
        ins = [a if isinstance(a, Literal) else env[a] for a in ie.invars]
        new = []
        for v in ie.outvars:
            if v not in env:
                env[v] = core.Var(v.aval)
            new.append(env[v])
        body.append(ie.replace(invars=ins, outvars=new))
    return body


class _NoStaging(Exception):
    """The evaluator keeps the whole jaxpr (see ``_Evaluator._staged``)."""


_CUSTOM_RULES = frozenset(
    {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
)


def _has_custom_rules(jaxpr) -> bool:
    """True when ``jaxpr`` (or a sub-jaxpr) calls a function with its own
    derivative rule."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CUSTOM_RULES:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _has_custom_rules(inner):
                    return True
    return False


def _colour_vmap(
    f: Callable,
    arg_colours: Sequence[tuple[int, ...]],
    out_colours: Sequence[tuple[int, ...]],
    n_col: int,
) -> Callable:
    """``f`` vmapped once per colour: argument ``i`` is mapped (its leading axes,
    in colour order) at the colours ``arg_colours[i]``, output ``o`` carries the
    axes of ``out_colours[o]``. Colour 0 is the outermost vmap."""
    fn = f
    for c in reversed(range(n_col)):
        in_axes = tuple(0 if c in ac else None for ac in arg_colours)
        out_axes = [0 if c in oc else None for oc in out_colours]
        fn = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes)
    return fn


def _trace_clean() -> bool:
    """Whether no JAX trace is active (a jitted call then runs, not stages)."""
    try:
        from jax._src import core

        return bool(core.trace_state_clean())
    except Exception:  # pragma: no cover - internal API moved: assume a trace
        return False


def _stack(xs: Sequence[Any]) -> Array:
    """``jnp.stack(xs)``, on the host when every ``x`` is concrete: under
    ``ensure_compile_time_eval`` (:func:`_concrete`) ``jnp.stack`` compiles one
    XLA concatenate of ``len(xs)`` operands, and a loop-written HMM's 1,000
    observed sites made each such compile take 0.6 s (4.8 s of its first
    ``infer``); one transfer of the 1,000 small arrays to the host takes
    milliseconds."""
    if any(isinstance(x, jax.core.Tracer) for x in xs):
        return jnp.stack(xs)
    return jnp.asarray(np.stack(jax.device_get(list(xs))))


def _concrete(fn: Callable, args: Sequence[Any]) -> Any:
    """``fn(*args)`` as concrete arrays, even when called under a JAX trace (a
    user's ``jit``): outside one, a jitted ``fn`` is one XLA program; inside, it
    runs op by op under ``ensure_compile_time_eval`` (each op its own small
    program: 63 of them, 1.6 s, for a 32x32 DRM's evidence-free part)."""
    if _trace_clean():
        return fn(*args)
    with jax.ensure_compile_time_eval():
        return fn(*args)


def _split_by_evidence(
    closed: ClosedJaxpr, n_lat: int
) -> tuple[ClosedJaxpr, ClosedJaxpr, list]:
    """``closed`` (latents..., evidence...) -> outputs, split equation by equation:
    ``(known, data, residual avals)`` with ``known: latents -> residuals`` (every
    equation that reads no evidence) and ``data: (residuals..., evidence...) ->
    outputs``. The same contract as JAX's ``partial_eval_jaxpr_nounits`` with
    every output instantiated, without re-tracing (which costs seconds on a
    jaxpr of 100,000 equations); an equation that reads evidence is kept whole
    (sub-jaxprs are not split), so custom derivative rules stay intact."""
    from jax._src.interpreters import partial_eval as pe

    jaxpr = closed.jaxpr
    unknown = set(jaxpr.invars[n_lat:])
    known_eqns, data_eqns = [], []
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in unknown for v in eqn.invars):
            unknown.update(eqn.outvars)
            data_eqns.append(eqn)
        else:
            known_eqns.append(eqn)
    consts = set(jaxpr.constvars)
    residuals: dict = {}
    for eqn in data_eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal) and v not in unknown and v not in consts:
                residuals.setdefault(v, None)
    for v in jaxpr.outvars:
        if not isinstance(v, Literal) and v not in unknown and v not in consts:
            residuals.setdefault(v, None)
    res = list(residuals)
    known = jaxpr.replace(
        invars=list(jaxpr.invars[:n_lat]),
        outvars=res,
        eqns=known_eqns,
        debug_info=None,
    )
    known, _ = pe.dce_jaxpr(known, [True] * len(res), instantiate=True)
    data = jaxpr.replace(
        invars=res + list(jaxpr.invars[n_lat:]), eqns=data_eqns, debug_info=None
    )
    return (
        ClosedJaxpr(known, closed.consts),
        ClosedJaxpr(data, closed.consts),
        [v.aval for v in res],
    )


@dataclass(frozen=True, eq=False)
class _Evaluator:
    """Evaluates the model's jaxpr over every site's parents' supports.

    ``jaxpr`` maps (latent values, evidence arrays) to every site's log-prob.
    ``inputs[c]`` holds, for colour ``c``, the latent input positions and their
    value arrays ``(K_c, *value_shape)``. Each site's output is mapped over the
    colours of its scope (``out_axes`` per output), so no table is broadcast over
    latents it does not depend on.

    Everything that does not depend on the evidence (a Normal's natural
    parameters ``mu / sigma^2`` at every latent state, Eq. 8) is computed once by
    a restricted evaluator (:meth:`restrict`, the one a compiled graph keeps for
    new evidence; :meth:`_staged`, which ``compile_model`` calls right away when
    no trace is active, else the first call does): the jaxpr is split by
    ``partial_eval_jaxpr_nounits`` and its evidence-free part's results
    (*residuals*, each over only the colours it depends on) are kept, so a call
    runs only the data-dependent part (the template match).
    """

    jaxpr: ClosedJaxpr
    colour_inputs: tuple[tuple[int, ...], ...]
    colour_values: tuple[tuple[np.ndarray, ...], ...]
    out_colours: tuple[tuple[int, ...], ...]
    latent_fill: tuple[np.ndarray, ...]
    stage: bool = False
    _staged_cache: dict = field(default_factory=dict, repr=False)

    def restrict(self, outputs: Sequence[int]) -> _Evaluator:
        """An evaluator of only ``outputs`` (renumbered ``0..``): the rest of the
        jaxpr is dropped (a graph keeps only what new evidence can change). It
        stages its evidence-free part (:meth:`_staged`) once, when first asked."""
        from jax._src.interpreters import partial_eval as pe

        wanted = set(outputs)
        if wanted:
            used = [i in wanted for i in range(len(self.jaxpr.jaxpr.outvars))]
            dced, _ = pe.dce_jaxpr(self.jaxpr.jaxpr, used, instantiate=True)
            closed = _inline_scorers(ClosedJaxpr(dced, self.jaxpr.consts))
        else:  # nothing kept: no pass over the jaxpr (0.35 s for a 10,000 chain)
            empty = self.jaxpr.jaxpr.replace(
                constvars=[], eqns=[], outvars=[], effects=frozenset(), debug_info=None
            )
            closed = ClosedJaxpr(empty, [])
        keep = sorted(wanted)
        return _Evaluator(
            jaxpr=closed,
            colour_inputs=self.colour_inputs,
            colour_values=self.colour_values,
            out_colours=tuple(self.out_colours[o] for o in keep),
            latent_fill=self.latent_fill,
            stage=True,
        )

    def _latents(self, coloured: Sequence[Sequence[Array]]) -> list:
        """Every latent input: colour ``c``'s members from ``coloured[c]``, the
        rest at their fill value."""
        latents = list(self.latent_fill)
        for positions, values in zip(self.colour_inputs, coloured, strict=True):
            for pos, val in zip(positions, values, strict=True):
                latents[pos] = val
        return latents

    def _staged(self):
        """``(data part, residuals, residual colours)``, computed once.

        The data part is a closed jaxpr ``(residuals..., evidence...) -> every
        output``. Residual ``r`` has shape ``(K_c for c in colours[r], ...)``.
        ``None`` when the split is not possible (the caller evaluates the whole
        jaxpr).
        """
        if "staged" in self._staged_cache:
            return self._staged_cache["staged"]
        staged = None
        try:
            from jax._src.interpreters import partial_eval as pe

            n_lat = len(self.latent_fill)
            n_in = len(self.jaxpr.jaxpr.invars)
            if len(self.jaxpr.jaxpr.eqns) > GROUP_EQNS:
                # A big (loop-written) model: split equation by equation, which
                # also keeps custom_jvp/vjp calls whole (see below).
                known, data, res_avals = _split_by_evidence(self.jaxpr, n_lat)
            else:
                if _has_custom_rules(self.jaxpr.jaxpr):
                    # partial_eval inlines custom_jvp/vjp calls that meet the
                    # evidence and drops their derivative rules (xlogy,
                    # softplus): gradients of the tables w.r.t. evidence would
                    # change. Unstaged.
                    raise _NoStaging
                known, data, _, res_avals = pe.partial_eval_jaxpr_nounits(
                    self.jaxpr,
                    [False] * n_lat + [True] * (n_in - n_lat),
                    instantiate=True,
                )
            if len(known.jaxpr.outvars) == len(res_avals):
                colour_of_input = {}
                for c, positions in enumerate(self.colour_inputs):
                    for pos in positions:
                        colour_of_input[pos] = c
                labels = [
                    frozenset({colour_of_input[i]})
                    if i in colour_of_input
                    else frozenset()
                    for i in range(n_lat)
                ]
                res_colours = tuple(
                    tuple(sorted(p)) for p in _jaxpr_provenance(known.jaxpr, labels)
                )
                residuals = self._residuals(known, res_colours)
                staged = (data, residuals, res_colours)
        except Exception:  # _NoStaging, or internal API moved: no split
            staged = None
        self._staged_cache["staged"] = staged
        return staged

    def _residuals(self, known: ClosedJaxpr, res_colours) -> tuple:
        """The evidence-free part's results, residual ``r`` over the colours
        ``res_colours[r]``. A big part (a model written as a loop) is evaluated
        slice by distinct slice (:func:`grouped_tables`); the rest, or all of a
        small part, by the colour vmap (one XLA program when small)."""
        n_col = len(self.colour_inputs)
        out: list = [None] * len(res_colours)
        todo = list(range(len(res_colours)))
        if len(known.jaxpr.eqns) > GROUP_EQNS:
            colour_of, grids = {}, list(self.latent_fill)
            for c, (positions, values) in enumerate(
                zip(self.colour_inputs, self.colour_values, strict=True)
            ):
                for pos, val in zip(positions, values, strict=True):
                    colour_of[pos], grids[pos] = c, val
            got, _ = _concrete(grouped_tables, [known, grids, []])
            for k, st in got.items():
                cols = [colour_of.get(p, -1) for p in st.latents]
                if len(set(cols)) == len(cols) and sorted(cols) == list(res_colours[k]):
                    order = tuple(int(a) for a in np.argsort(cols))
                    rest = tuple(range(len(cols), st.table.ndim))
                    out[k] = np.transpose(st.table, order + rest)
            todo = [k for k in todo if out[k] is None]
        if todo:
            part = _keep_outputs(known, todo) if len(todo) < len(out) else known
            f = jaxpr_as_fun(part)

            def run(*coloured):
                return f(*self._latents(coloured))

            cols = [res_colours[k] for k in todo]
            fn = _colour_vmap(run, [(c,) for c in range(n_col)], cols, n_col)
            if len(part.jaxpr.eqns) <= JIT_EQNS:
                fn = jax.jit(fn)
            for k, r in zip(todo, _concrete(fn, self.colour_values), strict=True):
                out[k] = r
        # One transfer, kept on the device (concrete even under a user's jit).
        return tuple(_concrete(jax.device_put, [out]))

    def __call__(self, evidence: Sequence[Array], outputs: Sequence[int]) -> list:
        """Tables of the chosen outputs, each ``(K_c for its colours, *lp_shape)``
        with colours in increasing order."""
        outputs = list(outputs)
        staged = self._staged() if self.stage else None
        if staged is not None:
            try:
                return self._call(evidence, outputs, staged)
            except ValueError:  # residual axes the data part cannot map: unstaged
                self._staged_cache["staged"] = None
        return self._call(evidence, outputs, None)

    def _call(
        self, evidence: Sequence[Array], outputs: list, staged, grouped: bool = True
    ) -> list:
        n_col = len(self.colour_inputs)
        if staged is not None:
            data, residuals, res_colours = staged
            if grouped and GROUP_DATA and len(data.jaxpr.eqns) > GROUP_EQNS:
                return self._call_grouped(evidence, outputs, staged)
        else:
            data, residuals, res_colours = self.jaxpr, None, ()
        jaxpr = data
        try:  # keep only what the chosen outputs need
            from jax._src.interpreters import partial_eval as pe

            wanted = set(outputs)
            used = [i in wanted for i in range(len(jaxpr.jaxpr.outvars))]
            dced, used_in = pe.dce_jaxpr(jaxpr.jaxpr, used, instantiate=True)
            jaxpr = ClosedJaxpr(dced, jaxpr.consts)
            out_ids = sorted(wanted)
            rank = {o: r for r, o in enumerate(out_ids)}
            picked = [rank[o] for o in outputs]
        except Exception:  # pragma: no cover - internal API moved
            picked, out_ids = outputs, list(range(len(jaxpr.jaxpr.outvars)))
            used_in = [True] * len(jaxpr.jaxpr.invars)
        f = jaxpr_as_fun(jaxpr)
        out_colours = [self.out_colours[o] for o in out_ids]
        if residuals is not None:
            n_res = len(residuals)
            # dce_jaxpr with instantiate=True keeps every input; drop nothing.
            del used_in
            dummies = [np.zeros(len(self.colour_values[c][0])) for c in range(n_col)]

            def run(*args):
                return f(*args[:n_res], *evidence)

            fn = _colour_vmap(
                run,
                list(res_colours) + [(c,) for c in range(n_col)],
                out_colours,
                n_col,
            )
            args = list(residuals) + dummies
        else:

            def run(*coloured):
                return f(*self._latents(coloured), *evidence)

            fn = _colour_vmap(run, [(c,) for c in range(n_col)], out_colours, n_col)
            args = list(self.colour_values)
        # One XLA program for small models; op by op for big ones (a model written
        # as a loop of thousands of sites compiles slower than it dispatches).
        if len(jaxpr.jaxpr.eqns) <= JIT_EQNS:
            fn = jax.jit(fn)
        outs = fn(*args)
        return [outs[k] for k in picked]

    def _groups_plan(self, outputs: Sequence[int], staged) -> tuple[list, list]:
        """:func:`_data_groups` of ``outputs``, planned once per output set."""
        key = ("groups", tuple(sorted(set(outputs))))
        if key not in self._staged_cache:
            data, residuals, res_colours = staged
            # The plan is cached: its arrays (gather indices, stacked residuals)
            # must be concrete even when the first call is under a JAX trace (a
            # user's jit, or infer's own), or a later call would see a tracer.
            self._staged_cache[key] = _concrete(
                _data_groups,
                [
                    data,
                    residuals,
                    res_colours,
                    self.out_colours,
                    sorted(set(outputs)),
                    [
                        len(self.colour_values[c][0])
                        for c in range(len(self.colour_inputs))
                    ],
                ],
            )
        return self._staged_cache[key]

    def _call_grouped(self, evidence: Sequence[Array], outputs: list, staged) -> list:
        """:meth:`_call` for a big (loop-written) model's data part: outputs whose
        slices share a structure are evaluated as one vmapped program per
        structure (:func:`_data_groups`), the rest as :meth:`_call` does. One
        XLA program per site would take seconds per thousand sites to compile."""
        groups, rest = self._groups_plan(outputs, staged)
        got: dict[int, Any] = {}
        for members, runner in groups:
            res = runner(evidence)
            for g, o in enumerate(members):
                got[o] = res[g]
        if rest:
            for o, r in zip(
                rest, self._call_plain(evidence, rest, staged), strict=True
            ):
                got[o] = r
        return [got[o] for o in outputs]

    def blocks(self, evidence: Sequence[Array], outputs: Sequence[int]) -> list | None:
        """The outputs as ``[(positions in outputs, stacked tables)]`` when the
        data part runs group by group (:meth:`_call_grouped`), else ``None``.
        ``outputs`` must be distinct."""
        staged = self._staged() if self.stage else None
        if staged is None or not GROUP_DATA or len(staged[0].jaxpr.eqns) <= GROUP_EQNS:
            return None
        outputs = list(outputs)
        groups, rest = self._groups_plan(outputs, staged)
        pos = {o: i for i, o in enumerate(outputs)}
        out = [
            ([pos[o] for o in members], runner(evidence)) for members, runner in groups
        ]
        if rest:
            for o, r in zip(
                rest, self._call_plain(evidence, rest, staged), strict=True
            ):
                out.append(([pos[o]], jnp.expand_dims(r, 0)))
        return out

    def _call_plain(self, evidence: Sequence[Array], outputs: list, staged) -> list:
        """:meth:`_call` without the grouped path."""
        return self._call(evidence, outputs, staged, grouped=False)


class TableBlocks:
    """Evidence tables kept stacked as evaluated (:meth:`FactorGraph.evidence_blocks`):
    ``blocks[b]`` is ``(G_b, n_instances, *cards)`` and ``where[k] = (b, g)``
    places group ``k``'s table. :meth:`rows` concatenates many groups' tables
    with one gather, where a dict of tables would cost one slice each and a
    concatenation of thousands (XLA compiles that in minutes). A pytree."""

    def __init__(self, blocks: Sequence[Array], where: Mapping[int, tuple[int, int]]):
        self.blocks = tuple(blocks)
        self.where = dict(where)

    def __getitem__(self, k: int) -> Array:
        b, g = self.where[k]
        return self.blocks[b][g]

    def __contains__(self, k: int) -> bool:
        return k in self.where

    def keys(self):
        return self.where.keys()

    def values(self):
        return self.blocks

    def rows(self, ks: Sequence[int], width: int | None = None) -> Array:
        """``concatenate([table[k] for k in ks])`` (last axis padded with zeros
        to ``width``), as one gather from the blocks involved."""
        used = sorted({self.where[k][0] for k in ks})
        flat, base, off = [], {}, 0
        for b in used:
            blk = self.blocks[b]
            f = jnp.reshape(blk, (-1,) + blk.shape[2:])
            if width is not None and f.shape[-1] < width:
                pad = [(0, 0)] * (f.ndim - 1) + [(0, width - f.shape[-1])]
                f = jnp.pad(f, pad)
            base[b], off = off, off + f.shape[0]
            flat.append(f)
        big = flat[0] if len(flat) == 1 else jnp.concatenate(flat)
        idx = []
        for k in ks:
            b, g = self.where[k]
            n = self.blocks[b].shape[1]
            idx.append(base[b] + g * n + np.arange(n))
        idx = np.concatenate(idx) if idx else np.zeros((0,), np.int64)
        if len(idx) == big.shape[0] and np.array_equal(idx, np.arange(len(idx))):
            return big
        return big[idx]


jax.tree_util.register_pytree_node(
    TableBlocks,
    lambda t: (t.blocks, tuple(sorted(t.where.items()))),
    lambda aux, blocks: TableBlocks(blocks, dict(aux)),
)


#: The data part of a big model is evaluated group by group (:func:`_data_groups`);
#: False evaluates it as one program (the naive twin the tests hold it to).
GROUP_DATA = True

#: Evidence data movement resolved to one gather per group (:func:`_data_groups`).
_ACCESS = frozenset({"slice", "squeeze", "reshape", "broadcast_in_dim"})


def _evidence_access(jaxpr, ev_pos: Mapping) -> tuple[dict, set]:
    """Variables that are pure data movement of one evidence input (``y[i]``):
    ``var -> (evidence position, int64 flat index array)``, found by running
    the movement on index arrays (numpy twins, :mod:`pgm_drm.graph.slices`);
    and the ids of those equations."""
    from pgm_drm.graph.slices import _NUMPY_RULES

    index: dict = {}
    ids: set = set()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name not in _ACCESS or len(eqn.invars) != 1 or len(eqn.outvars) != 1:
            continue
        if name == "reshape" and eqn.params.get("dimensions") is not None:
            continue
        src = eqn.invars[0]
        if isinstance(src, Literal):
            continue
        if src in ev_pos:
            size = int(np.prod(src.aval.shape, dtype=np.int64))
            j, base = (
                ev_pos[src],
                np.arange(size, dtype=np.int64).reshape(src.aval.shape),
            )
        elif src in index:
            j, base = index[src]
        else:
            continue
        out = _NUMPY_RULES[name]([base], eqn.params, eqn.outvars[0].aval)
        if out is None or np.shape(out) != tuple(eqn.outvars[0].aval.shape):
            continue
        index[eqn.outvars[0]] = (j, np.asarray(out, dtype=np.int64))
        ids.add(id(eqn))
    return index, ids


def _data_groups(
    data: ClosedJaxpr,
    residuals: Sequence[Array],
    res_colours: Sequence[tuple[int, ...]],
    out_colours: Sequence[tuple[int, ...]],
    outputs: Sequence[int],
    colour_sizes: Sequence[int],
    min_group: int = 2,
) -> tuple[list, list[int]]:
    """The data part ``(residuals..., evidence...) -> outputs`` as groups of
    outputs that share a structure: ``([(outputs, runner)], rest)``, where
    ``runner(evidence)`` returns the group's tables stacked on a leading axis.

    Each output's *slice* (the equations only it needs) is keyed by its
    structure (:func:`pgm_drm.graph.slices._signature`) and the kinds of its
    inputs. Within a group, residual inputs are stacked once (here), evidence
    reached by data movement alone (``y[i]``) is read by ONE gather whose
    indices were found by running that movement on index arrays, and the slice
    runs vmapped over the colours (as :meth:`_Evaluator._call`) and over the
    group. Outputs with a slice shared with others, or alone in their group,
    are left in ``rest``.
    """
    from jax._src import core

    from pgm_drm.graph.slices import _SHARED, _signature

    jaxpr = data.jaxpr
    n_res = len(residuals)
    n_col = len(colour_sizes)
    res_pos = {v: i for i, v in enumerate(jaxpr.invars[:n_res])}
    ev_pos = {v: j for j, v in enumerate(jaxpr.invars[n_res:])}
    const_val = dict(zip(jaxpr.constvars, data.consts, strict=True))
    index, access = _evidence_access(jaxpr, ev_pos)

    owner: dict = {}

    def claim(v, o) -> None:
        prev = owner.get(v)
        owner[v] = o if prev is None or prev == o else _SHARED

    for o in outputs:
        v = jaxpr.outvars[o]
        if not isinstance(v, Literal):
            claim(v, o)
    eqn_owner: dict = {}
    for eqn in reversed(jaxpr.eqns):
        if id(eqn) in access:
            continue
        o = None
        for v in eqn.outvars:
            w = owner.get(v)
            if w is not None:
                o = w if o is None or o == w else _SHARED
        if o is None:
            continue
        eqn_owner[id(eqn)] = o
        for v in eqn.invars:
            if not isinstance(v, Literal):
                claim(v, o)
    slices: dict[int, list] = {}
    for eqn in jaxpr.eqns:
        o = eqn_owner.get(id(eqn))
        if o is not None and o != _SHARED:
            slices.setdefault(o, []).append(eqn)

    keyed: dict[tuple, list] = {}
    rest: list[int] = []
    for o in outputs:
        v = jaxpr.outvars[o]
        if isinstance(v, Literal) or owner.get(v) == _SHARED or o not in slices:
            rest.append(o)
            continue
        sig, out, inputs = _signature(slices[o], v)
        kinds = []
        for a in inputs:
            if a in res_pos:
                kinds.append(("r", res_colours[res_pos[a]], str(a.aval)))
            elif a in index:
                kinds.append(("a", index[a][0], str(a.aval)))
            elif a in ev_pos:
                kinds.append(("e", ev_pos[a]))
            elif a in const_val:
                kinds.append(("c", a))
            else:  # made by a shared equation
                kinds = None
                break
        if kinds is None:
            rest.append(o)
            continue
        keyed.setdefault((sig, out, tuple(kinds), out_colours[o]), []).append(
            (o, inputs)
        )

    groups = []
    dummies = [np.zeros(k) for k in colour_sizes]
    for (_, _, kinds, ocol), members in keyed.items():
        if len(members) < min_group:
            rest.extend(o for o, _ in members)
            continue
        o0, ins0 = members[0]
        sub = core.Jaxpr([], list(ins0), [jaxpr.outvars[o0]], slices[o0])
        f = jaxpr_as_fun(ClosedJaxpr(sub, []))
        arg_colours = [k[1] if k[0] == "r" else () for k in kinds]
        n_in = len(ins0)

        def one(*xs, f=f, n_in=n_in):
            return f(*xs[:n_in])

        member = _colour_vmap(
            one, arg_colours + [(c,) for c in range(n_col)], [ocol], n_col
        )
        slots = []  # per input: (how, value)
        for j, kind in enumerate(kinds):
            column = [ins[j] for _, ins in members]
            if kind[0] == "r":
                rs = [res_pos[a] for a in column]
                if all(r == rs[0] for r in rs):
                    slots.append(("shared", residuals[rs[0]]))
                else:
                    slots.append(("stacked", _stack([residuals[r] for r in rs])))
            elif kind[0] == "a":
                idx = np.stack([index[a][1] for a in column])
                slots.append(("gather", (kind[1], jnp.asarray(idx))))
            elif kind[0] == "e":
                slots.append(("evidence", kind[1]))
            else:
                slots.append(("shared", const_val[column[0]]))
        in_axes = [0 if how in ("stacked", "gather") else None for how, _ in slots]
        grouped = jax.vmap(
            lambda *xs, m=member: m(*xs)[0],
            in_axes=tuple(in_axes) + (None,) * n_col,
        )

        def runner(evidence, slots=slots, grouped=grouped):
            args = []
            for how, val in slots:
                if how == "gather":
                    j, idx = val
                    args.append(jnp.ravel(evidence[j])[idx])
                elif how == "evidence":
                    args.append(evidence[val])
                else:
                    args.append(val)
            return grouped(*args, *dummies)

        groups.append((tuple(o for o, _ in members), runner))
    return groups, sorted(rest)


def _rearrange(
    table: Array,
    colours: Sequence[int],
    info: SiteInfo,
    colour_of: Mapping[str, int],
    cards: Mapping[str, int],
    xp: Any = jnp,
) -> Array:
    """``(K_c..., *lp_shape)`` -> ``(n_instances, *cards of scope)`` (``xp``:
    ``jax.numpy``, or ``numpy`` for tables computed once at compile time)."""
    nc = len(colours)
    pos = {c: k for k, c in enumerate(colours)}
    perm = [pos[colour_of[s]] for s in info.scope]
    if not info.plates and table.ndim == nc:  # one instance, a scalar log-prob
        lp = table if perm == list(range(nc)) else xp.transpose(table, perm)
        if any(lp.shape[i] != cards[s] for i, s in enumerate(info.scope)):
            lp = lp[tuple(slice(0, cards[s]) for s in info.scope)]
        return lp[None]
    lead, lp_shape = table.shape[:nc], table.shape[nc:]
    length = max([len(lp_shape)] + [-d for d in info.plate_dims])
    lp = xp.reshape(table, lead + (1,) * (length - len(lp_shape)) + lp_shape)
    plate_axes = [nc + length + d for d in info.plate_dims]
    other = [a for a in range(nc, nc + length) if a not in plate_axes]
    if any(lp.shape[a] != 1 for a in other):
        raise CompileError(
            f"site '{info.name}' has a batch dimension that no numpyro.plate declares"
        )
    lp = xp.squeeze(lp, axis=tuple(other)) if other else lp
    lp = xp.broadcast_to(lp, lead + info.plate_shape)
    # Colour axes -> scope order, slicing padded states off.
    lp = xp.transpose(lp, [nc + k for k in range(len(info.plates))] + perm)
    lp = xp.reshape(lp, (info.n_instances,) + lp.shape[len(info.plates) :])
    index = (slice(None),) + tuple(slice(0, cards[s]) for s in info.scope)
    return lp[index]


# --------------------------------------------------------------------------- #
# The compiled graph.
# --------------------------------------------------------------------------- #


@dataclass(eq=False)
class FactorGraph:
    """A NumPyro model compiled to a plate-lifted factor graph.

    The primary structure is grouped: :attr:`variable_groups` (one per latent
    site) and :attr:`factor_groups` (one per sample site), with tables from
    :meth:`group_tables`. The per-instance view (:attr:`variables`,
    :attr:`factors`, :meth:`tables`, :attr:`graph`) is built on demand, for
    inspection, drawing and the naive reference kernel.

    Attributes:
        sites: What the compiler learned about each sample site.
        variable_groups: One group per latent site (flat variable ids).
        factor_groups: One group per sample site.
        model, args, kwargs: The model and the arguments it was compiled with.

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> def model(x=None):
        ...     z = numpyro.sample("z", dist.Bernoulli(0.3))
        ...     numpyro.sample("x", dist.Normal(z * 2.0, 1.0), obs=x)
        >>> fg = compile_model(model, x=jnp.array(1.5))
        >>> [v.name for v in fg.variables], [f.scope for f in fg.factors]
        (['z'], [('z',), ('z',)])
    """

    model: Callable
    args: tuple
    kwargs: dict
    sites: dict[str, SiteInfo]
    variable_groups: tuple[VariableGroup, ...]
    factor_groups: tuple[FactorGroup, ...]
    plate_nesting: int
    _evaluator: _Evaluator = field(repr=False)
    _colour_of: dict = field(repr=False)
    _out_index: dict = field(repr=False)
    #: Every group's table at the compile-time evidence, numpy (on the host).
    _static_tables: tuple = field(repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    #: Site -> evaluator outputs of its (mean part, state-free scale part), for
    #: the sites whose scale part is kept out of the tables (new evidence only).
    _split_index: dict = field(default_factory=dict, repr=False)
    #: What new evidence can fail (an ``_EvidenceChecks``; None: nothing).
    _evidence_checks: Any = field(default=None, repr=False)
    #: Whether ``jax_enable_x64`` was on at compile time (see
    #: :meth:`check_dtype_mode`).
    _x64: bool = field(default=False, repr=False)

    def _evidence_values(self, evidence: Mapping[str, Any]) -> list[Array]:
        """The evidence arrays in compile order, each given value or its
        compile-time one; a name the model was not compiled with, or a new
        value for a keyword compiled as a constant, is refused
        (:meth:`check_constant`)."""
        for name, value in evidence.items():
            self.is_evidence(name, value)
        arrays, _ = split_evidence(self.kwargs)
        return [jnp.asarray(evidence.get(k, v)) for k, v in arrays.items()]

    def is_evidence(self, name: str, value: Any) -> bool:
        """Whether keyword ``name`` given ``value`` is evidence (an array at
        compile time: its new values are read); ``False`` for a constant given
        its compile-time value again (:meth:`check_constant`).

        Raises:
            ValueError: A name the model was not compiled with, or a new value
                for a constant.
        """
        if name not in self.kwargs:
            raise ValueError(
                f"unknown evidence {name!r}; the model was compiled with keyword "
                f"arguments {sorted(self.kwargs)}"
            )
        if name in self.evidence_names:
            return True
        self.check_constant(name, value)
        return False

    def check_constant(self, name: str, value: Any) -> None:
        """Refuse a new value for a keyword compiled as a constant.

        Keywords given as arrays (``jax.Array``, ``numpy.ndarray``) are
        evidence: new values are read. Any other (a Python or NumPy scalar, a
        list) is a constant of the graph: given again it must be the same
        value, since the graph would ignore another one.

        Raises:
            ValueError: ``name`` is a constant and ``value`` another value (or
                a traced one).
        """
        if name not in self.kwargs or name in self.evidence_names:
            return
        given = self.kwargs[name]
        try:
            same = np.shape(value) == np.shape(given) and bool(
                np.all(np.asarray(value) == np.asarray(given))
            )
        except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
            same = False  # a tracer, or values that do not compare
        if not same:
            raise ValueError(
                f"{name!r} was compiled as a constant ({given!r}, a "
                f"{type(given).__name__}), part of the graph: it cannot take "
                "another value. To make it evidence, compile with an array: "
                f"compile_model(model, {name}=jnp.asarray(...))"
            )

    def check_dtype_mode(self) -> None:
        """Refuse a graph used in another ``jax_enable_x64`` mode than it was
        compiled in.

        Its programs were traced with the compile-time mode's integer and
        float widths (the staged model, its supports and constants); in the
        other mode they meet values of the other width (before this check,
        ``TypeError: lax.ge requires arguments to have the same dtypes`` deep in
        ``lax``, on some schedules and evidence only).

        Raises:
            ValueError: the mode is not the compile-time one.
        """
        now = bool(jax.config.jax_enable_x64)
        if self._x64 != now:
            was, is_ = ("on", "off") if self._x64 else ("off", "on")
            raise ValueError(
                f"this graph was compiled with jax_enable_x64 {was}, and it is "
                f"{is_} now: a graph runs in the mode it was compiled in; "
                "compile the model again (compile_model) after changing the "
                f"setting, or turn x64 back {was}"
            )

    # ---- sizes -------------------------------------------------------------
    @property
    def n_variables(self) -> int:
        return sum(g.size for g in self.variable_groups)

    @property
    def n_factors(self) -> int:
        return sum(g.size for g in self.factor_groups)

    @property
    def cardinalities(self) -> np.ndarray:
        """``int32`` array ``(n_variables,)`` of every variable's cardinality."""
        if "cards" not in self._cache:
            self._cache["cards"] = np.concatenate(
                [np.full(g.size, g.cardinality, np.int32) for g in self.variable_groups]
                or [np.zeros(0, np.int32)]
            )
        return self._cache["cards"]

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.sites.items() if not s.is_observed)

    @property
    def evidence_names(self) -> tuple[str, ...]:
        """Keyword arguments whose arrays can be swapped in ``tables``/``infer``."""
        return tuple(split_evidence(self.kwargs)[0])

    @property
    def n_traces(self) -> int:
        """How many times ``infer`` traced (and so jitted) a kernel for this graph."""
        return self._cache.get("n_traces", 0)

    def check_new_evidence(
        self, evidence: Mapping[str, Any], batched: Mapping[str, bool] | None = None
    ) -> None:
        """Refuse new evidence the graph cannot take as it was compiled, as
        ``compile_model`` refused it at the compile-time values (``infer`` calls
        this; a review found each case returning finite, wrong answers):

        - a new value of evidence that sets a latent's support (the states are
          the graph's variables);
        - evidence that makes a latent site's probabilities not sum to one, at
          some state of its parents;
        - evidence that puts a site's parameter outside its constraint
          (NumPyro's own check).

        Args:
            evidence: Name -> new value (validated names and shapes).
            batched: Name -> whether the value has a leading batch axis.

        Raises:
            ValueError: Naming the evidence, the site and the parameter.
        """
        checks = self._evidence_checks
        if checks is None or not evidence:
            return
        if any(isinstance(x, jax.core.Tracer) for x in evidence.values()):
            return  # abstract values: nothing to read
        try:
            self._check_new_evidence(checks, evidence, dict(batched or {}))
        except ValueError:
            # NaN or inf evidence fails these checks too; name it as such.
            for name, x in evidence.items():
                check_evidence_values(name, x)
            raise

    def checks_new_evidence(self, names: Iterable[str]) -> bool:
        """Whether :meth:`check_new_evidence` reads any of the evidence ``names``
        (a latent's support, a latent table's normalisation or a parameter's
        constraint depends on it); if not, new values of them cannot fail it."""
        checks = self._evidence_checks
        if checks is None:
            return False
        names = set(names)
        return not names.isdisjoint(checks.supports) or not names.isdisjoint(
            self._evidence_read(checks)
        )

    def _evidence_read(self, checks: Any) -> frozenset[str]:
        """The evidence the normalisation and parameter checks read (once per
        graph)."""
        key = ("evidence read by checks",)
        read = self._cache.get(key)
        if read is None:
            read = {n for c in checks.params for n in c[1]}
            read.update(
                n for c in checks.normalised for n in self.factor_groups[c[0]].evidence
            )
            read = self._cache[key] = frozenset(read)
        return read

    def _check_new_evidence(
        self, checks: Any, evidence: Mapping[str, Any], batched: dict
    ) -> None:
        def changed(name: str) -> bool:  # every row, when batched
            return not np.all(
                np.asarray(evidence[name]) == np.asarray(self.kwargs[name])
            )

        for name, sites in checks.supports.items():
            if name in evidence and changed(name):
                raise ValueError(
                    f"evidence {name!r} sets the support of latent site(s) "
                    f"{list(sites)}: their states were fixed when the graph was "
                    "compiled (they are its variables), and this value changes "
                    "them; compile the model again with it"
                )
        # The evidence these checks read; values equal to the compile-time ones
        # passed them there.
        given = {k for k in self._evidence_read(checks) & set(evidence) if changed(k)}
        groups = [
            c
            for c in checks.normalised
            if given & set(self.factor_groups[c[0]].evidence)
        ]
        params = [c for c in checks.params if given & set(c[1])]
        if not groups and not params:
            return
        lead = any(batched.get(k) for k in evidence)
        axes = {k: (0 if batched.get(k) else None) for k in evidence}
        gk, outs = [c[0] for c in groups], [c[0] for c in params]
        on_batch = tuple(sorted(k for k in evidence if batched.get(k)))
        key = (
            "evidence_checks",
            tuple(gk),
            tuple(outs),
            tuple(sorted(evidence)),
            on_batch,
        )
        fn = self._cache.get(key)
        if fn is None:  # one program per pattern: verdicts only, one transfer
            fn = self._cache[key] = jax.jit(self._evidence_fn(gk, outs, axes, lead))
        bad_table, bad_params = jax.device_get(fn(dict(evidence)))
        if bad_table:  # the error path: every table on the host, for the message
            raw = jax.jit(self._evidence_fn(gk, [], axes, lead, raw=True))
            tables, _ = jax.device_get(raw(dict(evidence)))
            for (k, site, family), t in zip(groups, tables, strict=True):
                t = np.asarray(t)
                if lead:  # batch rows as more instances
                    t = t.reshape((-1,) + t.shape[2:])
                scope = self.factor_groups[k].scope_sites
                try:
                    _refuse_unnormalised(
                        site, family, scope, t, " with the evidence given"
                    )
                except CompileError as err:  # nothing is compiled here
                    raise ValueError(str(err)) from None
        for (_, names, site, name, con), bad in zip(params, bad_params, strict=True):
            if bad:
                raise ValueError(
                    f"site '{site}': parameter '{name}' is outside its constraint "
                    f"({con}) with the evidence given ({', '.join(names)}), at some "
                    "state of the latents it depends on (e.g. probs that do not "
                    "sum to one)"
                )

    def _evidence_fn(
        self, gk: list, outs: list, axes: dict, lead: bool, raw: bool = False
    ) -> Callable:
        """``evidence -> (tables verdict, parameter verdicts)`` of groups ``gk``
        and check outputs ``outs`` (``raw``: the tables and check arrays). The
        tables' verdict is :func:`_refuse_unnormalised`'s test, in their dtype,
        over every table at once: a loop's groups come stacked as evaluated
        (:meth:`_evaluate_blocks`), one test per block."""
        compiled = split_evidence(self.kwargs)[0]

        def run(ev):
            values = [jnp.asarray(ev.get(k, v)) for k, v in compiled.items()]
            checks = self._evaluator(values, outs) if outs else []
            got = None if raw or not gk else self._evaluate_blocks(values, gk)
            if got is not None:
                tables = [b.reshape((-1,) + b.shape[2:]) for b in got[0].blocks]
            else:
                tables = self._evaluate(values, gk) if gk else []
            if raw:
                return tables, checks
            bad = [_unnormalised_anywhere(t) for t in tables]
            return jnp.any(jnp.stack(bad)) if bad else jnp.array(False), [
                jnp.any(c != 0) for c in checks
            ]

        if not lead:
            return run

        def batched_run(ev):
            got = jax.vmap(run, in_axes=(axes,))(ev)
            return got if raw else jax.tree.map(jnp.any, got)

        return batched_run

    # ---- grouped tables ----------------------------------------------------
    def host_tables(self) -> tuple[np.ndarray, ...]:
        """Every factor group's table at the compile-time evidence, as numpy
        arrays: what :meth:`group_tables` returns without new evidence, before
        any transfer to the device (building a flat plan's inputs reads them
        on the host; 20,000 small transfers took 0.5 s)."""
        return self._static_tables

    def _device_tables(self) -> tuple[Array, ...]:
        """:meth:`host_tables` on the device: one batched transfer, when first
        asked."""
        got = self._cache.get("device_tables")
        if got is None:  # concrete even when first asked under a trace (a jit)
            got = tuple(_concrete(jax.device_put, [list(self._static_tables)]))
            self._cache["device_tables"] = got
        return got

    def group_tables(self, **evidence: Any) -> tuple[Array, ...]:
        """Every factor group's table ``(n_instances, *cards)`` for new evidence.

        Tables that do not depend on evidence were computed once at compile time;
        the others are evaluated from the model's jaxpr (pure; jit/vmap it).
        """
        values = self._evidence_values(evidence)
        dynamic = [
            k
            for k, g in enumerate(self.factor_groups)
            if set(g.evidence) & set(evidence)
        ]
        if not dynamic:
            return self._device_tables()
        fresh = self._evaluate(values, dynamic)
        out = list(self._device_tables())
        for k, t in zip(dynamic, fresh, strict=True):
            out[k] = t
        return tuple(out)

    def evidence_tables(self, **evidence: Any) -> dict[int, Array]:
        """Tables of the groups that depend on evidence, keyed by group index.

        Evidence not given keeps its compile-time value. Pure: jit/vmap it.
        """
        values = self._evidence_values(evidence)
        dynamic = [k for k, g in enumerate(self.factor_groups) if g.evidence]
        if not dynamic:
            return {}
        return dict(zip(dynamic, self._evaluate(values, dynamic), strict=True))

    def evidence_parts(self, **evidence: Any) -> tuple[dict[int, Array], Array]:
        """:meth:`evidence_tables` with the state-free scale part of every
        observed Normal site (``x^2 . eta_2 - sum ln(s sqrt(2 pi))``; for a
        Bernoulli or Poisson site its support test and ``h(x)``, see
        :func:`pgm_drm.graph.natural.natural_log_prob_parts`) left out of its
        table and summed into one offset: ``log Z`` of the tables plus the offset
        is ``log Z``. The tables then hold only what tells the states apart, at
        any magnitude of the data (a float64 image filled with ``1e30``).
        Pure: jit/vmap it.

        Returns:
            ``(tables, offset)``: tables keyed by group index, scalar offset.
        """
        values = self._evidence_values(evidence)
        dynamic = [k for k, g in enumerate(self.factor_groups) if g.evidence]
        if not dynamic:
            return {}, jnp.zeros(())
        tables, offset = self._evaluate(values, dynamic, split=True)
        return dict(zip(dynamic, tables, strict=True)), offset

    def evidence_blocks(
        self, **evidence: Any
    ) -> tuple[TableBlocks | dict[int, Array], Array]:
        """:meth:`evidence_parts`, with the tables of a big model's groups of
        sites kept stacked (:class:`TableBlocks`; a dict when the data part
        runs as one program). Pure: jit/vmap it."""
        values = self._evidence_values(evidence)
        dynamic = [k for k, g in enumerate(self.factor_groups) if g.evidence]
        if not dynamic:
            return {}, jnp.zeros(())
        got = self._evaluate_blocks(values, dynamic)
        if got is None:
            tables, offset = self._evaluate(values, dynamic, split=True)
            return dict(zip(dynamic, tables, strict=True)), offset
        return got

    def _evaluate_blocks(self, evidence: Sequence[Array], groups: Sequence[int]):
        """:meth:`_evaluate` (``split=True``) block by block: each block's
        members that rearrange alike are rearranged as one vmapped call."""
        cards = {g.site: g.cardinality for g in self.variable_groups}
        sites = [self.factor_groups[k].site for k in groups]
        free = [n for n in sites if n in self._split_index]
        outs = [
            self._split_index[n][0] if n in free else self._out_index[n] for n in sites
        ] + [self._split_index[n][1] for n in free]
        blocks = self._evaluator.blocks(evidence, outs)
        if blocks is None:
            return None
        n_s = len(sites)
        out_blocks, where = [], {}
        offset = jnp.zeros(())
        for positions, stacked in blocks:
            subs: dict[tuple, list[int]] = {}
            for j, p in enumerate(positions):
                n = sites[p] if p < n_s else free[p - n_s]
                info = self.sites[n]
                if p >= n_s:
                    info = dataclasses.replace(info, scope=())
                colours = tuple(sorted(self._colour_of[s] for s in info.scope))
                key = (
                    p >= n_s,
                    colours,
                    tuple(self._colour_of[s] for s in info.scope),
                    tuple(cards[s] for s in info.scope),
                    info.plate_dims,
                    info.plate_shape,
                )
                subs.setdefault(key, []).append(j)
            for key, rows in subs.items():
                j0 = rows[0]
                p0 = positions[j0]
                n0 = sites[p0] if p0 < n_s else free[p0 - n_s]
                info = self.sites[n0]
                if key[0]:
                    info = dataclasses.replace(info, scope=())
                part = stacked
                if rows != list(range(stacked.shape[0])):
                    part = stacked[np.asarray(rows)]
                t = jax.vmap(
                    lambda x, info=info, colours=key[1]: _rearrange(
                        x, colours, info, self._colour_of, cards, jnp
                    )
                )(part)
                if key[0]:  # scale parts: summed into the offset
                    offset = offset + jnp.sum(t)
                    continue
                b = len(out_blocks)
                out_blocks.append(t)
                for g, j in enumerate(rows):
                    where[groups[positions[j]]] = (b, g)
        return TableBlocks(out_blocks, where), offset

    def group_parts(self, **evidence: Any) -> tuple[tuple[Array, ...], Array]:
        """:meth:`group_tables` split as in :meth:`evidence_parts`: every group's
        table and the scalar offset of the evidence groups' scale parts (every
        evidence group is evaluated; evidence not given keeps its compile-time
        value)."""
        fresh, offset = self.evidence_parts(**evidence)
        out = list(self._device_tables())
        for k, t in fresh.items():
            out[k] = t
        return tuple(out), offset

    def _evaluate(
        self,
        evidence: Sequence[Array],
        groups: Sequence[int],
        split: bool = False,
        xp: Any = jnp,
    ):
        """The groups' tables (``split``: and the summed scale parts apart; else
        the whole log-probs, as one output each). ``xp=numpy``: concrete tables
        rearranged on the host (compile time: no small XLA program per shape)."""
        self.check_dtype_mode()
        cards = {g.site: g.cardinality for g in self.variable_groups}
        sites = [self.factor_groups[k].site for k in groups]
        free = [n for n in sites if split and n in self._split_index]
        outs = [
            self._split_index[n][0] if n in free else self._out_index[n] for n in sites
        ] + [self._split_index[n][1] for n in free]
        raw = self._evaluator(evidence, outs)
        if xp is np:
            raw = [np.asarray(r) for r in raw]
        extra = dict(zip(free, raw[len(sites) :], strict=True))
        tables, offset = [], jnp.zeros(())
        for n, t in zip(sites, raw[: len(sites)], strict=True):
            info = self.sites[n]
            colours = sorted(self._colour_of[s] for s in info.scope)
            t = _rearrange(t, colours, info, self._colour_of, cards, xp)
            if n in extra:  # the scale part, (n_instances,)
                bare = dataclasses.replace(info, scope=())
                f = _rearrange(extra[n], (), bare, self._colour_of, cards, xp)
                offset = offset + jnp.sum(f)
            tables.append(t)
        return (tables, offset) if split else tables

    # ---- per-instance view (on demand) -------------------------------------
    @functools.cached_property
    def variables(self) -> tuple[Variable, ...]:
        """Variable nodes in flat-id order (site order, then plate index)."""
        out = []
        for g in self.variable_groups:
            for idx in itertools.product(*(range(s) for s in g.plate_shape)):
                out.append(
                    Variable(f"{g.site}{_index_str(idx)}", g.site, idx, g.support)
                )
        return tuple(out)

    @functools.cached_property
    def factors(self) -> tuple[Factor, ...]:
        """Factor nodes, group by group, instances in C order of the plates."""
        names = [v.name for v in self.variables]
        out = []
        for g in self.factor_groups:
            for i, idx in enumerate(
                itertools.product(*(range(s) for s in g.plate_shape))
            ):
                scope = tuple(names[v] for v in g.scope[i])
                out.append(Factor(f"p({g.site}{_index_str(idx)})", g.site, idx, scope))
        return tuple(out)

    @property
    def variable_index(self) -> dict[str, int]:
        return {v.name: i for i, v in enumerate(self.variables)}

    def tables(self, **evidence: Any) -> tuple[Array, ...]:
        """Per-instance factor tables (the naive view of :meth:`group_tables`).

        Returns:
            One array per factor, of shape ``[cardinality of v for v in scope]``.
        """
        out = []
        for t in self.group_tables(**evidence):
            out.extend(t[i] for i in range(t.shape[0]))
        return tuple(out)

    @functools.cached_property
    def graph(self) -> nx.Graph:
        """Bipartite ``networkx.Graph`` of every instance (built on demand).

        Node attribute ``kind`` is "variable" or "factor"; variables carry
        ``cardinality``, ``site``, ``index``, ``support``; factors carry ``scope``,
        ``site`` and ``table`` (for the evidence the graph was compiled with).
        """
        g = nx.Graph()
        for v in self.variables:
            g.add_node(
                v.name,
                kind="variable",
                cardinality=v.cardinality,
                site=v.site,
                index=v.index,
                support=v.support,
            )
        for f, t in zip(self.factors, self.tables(), strict=True):
            g.add_node(f.name, kind="factor", scope=f.scope, site=f.site, table=t)
            for v in f.scope:
                g.add_edge(f.name, v)
        return g

    def grouped_graph(self) -> nx.Graph:
        """One node per site group (for drawing big models).

        Variable-group nodes carry ``kind="variable"``, ``plate_shape`` and
        ``cardinality``; factor-group nodes ``kind="factor"``, ``plate_shape``,
        ``size`` (instances) and ``scope`` (site names).
        """
        g = nx.Graph()
        for v in self.variable_groups:
            g.add_node(
                v.site,
                kind="variable",
                plate_shape=v.plate_shape,
                cardinality=v.cardinality,
                size=v.size,
            )
        for f in self.factor_groups:
            name = f"p({f.site})"
            g.add_node(
                name,
                kind="factor",
                plate_shape=f.plate_shape,
                size=f.size,
                scope=f.scope_sites,
            )
            for s in f.scope_sites:
                g.add_edge(name, s)
        return g

    # ---- structure ---------------------------------------------------------
    def is_tree(self) -> bool:
        """True when the bipartite instance graph has no loops (a forest)."""
        from pgm_drm.graph.plan import instance_forest

        return instance_forest(self) is not None

    def schedule(self, kind: ScheduleKind = "auto", **options: Any):
        """Per-instance message schedule (naive kernel); see ``make_schedule``."""
        from pgm_drm.graph.schedule import make_schedule

        key = ("schedule", kind, tuple(sorted(options.items())))
        if key not in self._cache:
            self._cache[key] = make_schedule(self, kind, **options)
        return self._cache[key]

    def plan(self, kind: str = "auto", **options: Any):
        """Flat plan (frozen index arrays); see :func:`pgm_drm.graph.make_flat_plan`."""
        from pgm_drm.graph.plan import make_flat_plan

        key = ("plan", kind, tuple(sorted(options.items())))
        if key not in self._cache:
            self._cache[key] = make_flat_plan(self, kind, **options)
        return self._cache[key]


def _site_info(
    name: str,
    site: Mapping,
    supports: Mapping[str, tuple],
    latent_plates: frozenset[str],
) -> SiteInfo:
    """The site's plates, split into kept plates and *data plates* (plates of
    an observed site that hold no latent site; ``latent_plates`` names the
    others), whose instances are summed into one factor."""
    frames = _frames(site)
    kept = [f for f in frames if f.name in latent_plates or name in supports]
    return SiteInfo(
        name=name,
        is_observed=name not in supports,
        plates=tuple(f.name for f in kept),
        plate_shape=tuple(f.size for f in kept),
        plate_dims=tuple(f.dim for f in kept),
        support=supports.get(name, ()),
        summed=tuple((f.dim, f.size) for f in frames if f not in kept),
    )


def _scope_index(
    info: SiteInfo, infos: Mapping[str, SiteInfo], offsets: Mapping[str, int]
) -> np.ndarray:
    """``(n_instances, arity)`` flat variable ids of a site's scope."""
    n = info.n_instances
    if not info.plates and not any(infos[s].plates for s in info.scope):
        # One instance of unplated parents (a loop-written model's every site).
        arr = np.array([[offsets[s] for s in info.scope]], np.int32).reshape(1, -1)
        arr.setflags(write=False)
        return arr
    grid = np.indices(info.plate_shape).reshape(len(info.plate_shape), n)
    pos = {p: k for k, p in enumerate(info.plates)}
    cols = []
    for s in info.scope:
        parent = infos[s]
        missing = [p for p in parent.plates if p not in pos]
        if missing:
            raise CompileError(
                f"site '{info.name}' depends on '{s}' inside plate(s) {missing} that "
                f"'{info.name}' is not in; such reductions are not supported"
            )
        sub = tuple(grid[pos[p]] for p in parent.plates)
        flat = (
            np.ravel_multi_index(sub, parent.plate_shape) if sub else np.zeros(n, int)
        )
        cols.append(offsets[s] + flat)
    arr = np.stack(cols, axis=1) if cols else np.zeros((n, 0), np.int64)
    arr = arr.astype(np.int32)
    arr.setflags(write=False)
    return arr


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector: tracing a loop-written model makes
    one object per equation, and every full collection re-scans all of them (a
    third of the compile time of a 2,000-site chain)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


#: ``compile_model`` traces the model once (:func:`_front_one_trace`); False
#: forces the older two traces (a plain one, then an abstract one), which is also
#: the fallback for anything the one trace cannot judge (and the path whose errors
#: a malformed model gets).
ONE_TRACE = True


class _Front(NamedTuple):
    """What ``compile_model``'s front half reads off the model."""

    sites: dict  # the trace's site messages, by name
    sample_sites: list[str]
    latent: list[str]
    supports: dict[str, tuple]
    infos: dict[str, SiteInfo]
    nesting: int
    closed: ClosedJaxpr  # (latent values..., evidence...) -> log-probs
    split: list[str]
    lat_values: list[Array]  # each latent at its first support value
    # (site, parameter, constraint) of each parameter-check output, which follow
    # the log-probs and split parts in ``closed`` (:func:`_param_checks`).
    checks: tuple[tuple[str, str, str], ...] = ()
    # Evidence name -> the latent sites whose support it sets (two-trace path
    # only: the one trace fails on such a support, see _support_evidence).
    support_evidence: Mapping[str, tuple[str, ...]] = {}


def _site_infos(tr: Mapping[str, dict], supports: Mapping[str, tuple]) -> tuple:
    """``(sample sites, latent sites, infos, plate nesting)`` of a checked trace."""
    sample_sites = [n for n, s in tr.items() if s["type"] == "sample"]
    latent = [n for n in sample_sites if not tr[n]["is_observed"]]
    latent_plates = frozenset(f.name for n in latent for f in _frames(tr[n]))
    infos = {n: _site_info(n, tr[n], supports, latent_plates) for n in sample_sites}
    nesting = max([0] + [-f.dim for n in sample_sites for f in _frames(tr[n])])
    return sample_sites, latent, infos, nesting


def _abstract_error(err: Exception) -> CompileError:
    return CompileError(
        "the model uses a latent value or evidence in Python control flow or as "
        "a shape (an `if`, `int(...)`, a Python index); write it with array ops "
        f"(jnp.where, Vindex) so every value can be enumerated ({err})"
    )


def _front_two_traces(
    model: Callable,
    args: tuple,
    kwargs: dict,
    static: Mapping[str, Any],
    ev_names: list[str],
    ev_values: list[Array],
) -> _Front:
    """A plain trace (latents at their first support value, NumPyro's checks on
    concrete values), then an abstract one of every site's log-prob."""
    plain = _checked_sites(model, args, kwargs, log_prob_shapes=False)
    latent = [
        n for n, s in plain.items() if s["type"] == "sample" and not s["is_observed"]
    ]
    supports = {n: tuple(support_values(plain[n]["fn"], n).tolist()) for n in latent}
    sample_sites, latent, infos, nesting = _site_infos(plain, supports)
    summed = [infos[n].summed for n in sample_sites]
    split: list[str] = []
    checks: list = []
    fn = _log_prob_fn(model, args, static, latent, sample_sites, summed, split, checks)
    lat_values = [jnp.asarray(plain[n]["value"]) for n in latent]
    try:
        # NumPyro's argument and support checks cannot judge tracers (the plain
        # trace above ran them on concrete values); here they would only add
        # operations to trace.
        with numpyro.validation_enabled(False):
            closed = jax.make_jaxpr(
                lambda lv, ev: fn(lv, dict(zip(ev_names, ev, strict=True)))
            )(lat_values, ev_values)
    except jax.errors.ConcretizationTypeError as err:
        raise _abstract_error(err) from err
    return _Front(
        plain,
        sample_sites,
        latent,
        supports,
        infos,
        nesting,
        closed,
        split,
        lat_values,
        tuple(checks),
        _support_evidence(model, args, static, plain, latent, ev_names, ev_values),
    )


def _support_bounds(fn: Any) -> list:
    """The bounds of a latent distribution's support (``integer_interval``'s
    ``lower_bound`` and ``upper_bound``), through the plate and event wrappers."""
    con = _base_dist(fn).support
    while hasattr(con, "base_constraint"):
        con = con.base_constraint
    return [getattr(con, a) for a in ("lower_bound", "upper_bound") if hasattr(con, a)]


def _support_evidence(
    model: Callable,
    args: tuple,
    static: Mapping[str, Any],
    plain: Mapping[str, dict],
    latent: Sequence[str],
    ev_names: Sequence[str],
    ev_values: Sequence[Array],
) -> dict[str, tuple[str, ...]]:
    """Evidence name -> the latent sites whose support it sets
    (``DiscreteUniform(0, h)`` with ``h`` a keyword array): the support is read
    once, at compile time, and is the graph's variables, so ``infer`` must refuse
    a new value of that evidence (a review found it silently kept the old
    states). Found by provenance: the model is traced with the latents at their
    plain-trace values and the evidence abstract, and the bounds of each
    array-bounded support are its outputs."""
    cand = [
        n
        for n in latent
        if any(not isinstance(b, (int, float)) for b in _support_bounds(plain[n]["fn"]))
    ]
    if not cand or not ev_names:
        return {}
    data = {n: plain[n]["value"] for n in latent}

    def bounds(ev):
        seeded = handlers.seed(handlers.substitute(model, data=data), 0)
        tr = handlers.trace(seeded).get_trace(
            *args, **{**static, **dict(zip(ev_names, ev, strict=True))}
        )
        return [[jnp.asarray(b) for b in _support_bounds(tr[n]["fn"])] for n in cand]

    with numpyro.validation_enabled(False):
        closed, shape = jax.make_jaxpr(bounds, return_shape=True)(list(ev_values))
    prov = _jaxpr_provenance(closed.jaxpr, [frozenset({k}) for k in ev_names])
    out: dict[str, list[str]] = {}
    pos = 0
    for n, bs in zip(cand, shape, strict=True):
        for name in frozenset().union(*prov[pos : pos + len(bs)]):
            out.setdefault(name, []).append(n)
        pos += len(bs)
    return {k: tuple(v) for k, v in out.items()}


class _OneTraceUnfit(Exception):
    """The one-trace path cannot judge this model (``compile_model`` falls back)."""


def _latent_abstract_eval(*, shape, dtype, name):
    from jax._src.core import ShapedArray

    return ShapedArray(shape, dtype)


def _latent_impl(*, shape, dtype, name):
    raise _OneTraceUnfit(f"latent site '{name}' evaluated outside compile_model")


#: Marks a latent site's value in the one trace; ``_lift_latents`` turns each
#: marker's output into an input of the jaxpr.
_latent_p = jax.extend.core.Primitive("pgm_drm_latent")
_latent_p.def_abstract_eval(_latent_abstract_eval)
_latent_p.def_impl(_latent_impl)


@functools.lru_cache(maxsize=1024)
def _take_avals(arr: Any, starts: tuple, slice_sizes: tuple, dimensions: tuple):
    """The avals of ``dynamic_slice(arr, *starts)`` and of its squeeze, by JAX's
    own rules (so the expanded equations type exactly as bound ones would)."""
    mid = lax.dynamic_slice_p.abstract_eval(arr, *starts, slice_sizes=slice_sizes)
    mid = mid[0] if isinstance(mid, tuple) else mid
    out = lax.squeeze_p.abstract_eval(mid, dimensions=dimensions)
    return mid, out[0] if isinstance(out, tuple) else out


def _take_abstract_eval(arr, *starts, slice_sizes, dimensions):
    return _take_avals(arr, tuple(starts), slice_sizes, dimensions)[1]


def _take_impl(arr, *starts, slice_sizes, dimensions):
    out = lax.dynamic_slice_p.bind(arr, *starts, slice_sizes=slice_sizes)
    return lax.squeeze_p.bind(out, dimensions=dimensions)


#: ``dynamic_slice`` + ``squeeze`` as ONE equation while the model is traced
#: (:func:`_marked_take`): each bound primitive costs ~15 us of JAX's staging, and
#: a loop-written model indexes thousands of tables by latents. ``_lift_latents``
#: expands every one into the two standard equations (:func:`_expand_take`), so
#: no later pass (nor any JAX transform) ever sees it.
_take_p = jax.extend.core.Primitive("pgm_drm_take")
_take_p.def_abstract_eval(_take_abstract_eval)
_take_p.def_impl(_take_impl)


def _expand_take(e: Any) -> list:
    """A ``_take_p`` equation as the ``dynamic_slice`` and ``squeeze`` equations
    :func:`_marked_take` would otherwise have bound (same parameters, same
    avals by JAX's rules, the same source info)."""
    arr, *starts = e.invars
    sizes, dims = e.params["slice_sizes"], e.params["dimensions"]
    mid_aval, _ = _take_avals(arr.aval, tuple(v.aval for v in starts), sizes, dims)
    mid = jax.extend.core.gensym()(mid_aval)
    return [
        e.replace(
            primitive=lax.dynamic_slice_p, params={"slice_sizes": sizes}, outvars=[mid]
        ),
        e.replace(primitive=lax.squeeze_p, invars=[mid], params={"dimensions": dims}),
    ]


class _marked_latents(Messenger):
    """Give every latent sample site a marker value (an abstract array of the
    site's batch shape) and read its support, concretely."""

    def __init__(self, fn: Callable | None = None):
        self.supports: dict[str, np.ndarray] = {}
        super().__init__(fn)

    def process_message(self, msg):
        _refuse_control_flow(msg)
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        if msg["value"] is not None:
            raise _OneTraceUnfit(f"latent site '{msg['name']}' already has a value")
        name, fn = msg["name"], msg["fn"]
        _check_latent(name, fn)
        top, cur = getattr(_NONNEG_INDICES, "trace", None), _current_trace()
        if top is not None and cur is not top and type(cur) is type(top):
            # Inside a jax.jit (or scan) body: a marker bound there would be
            # cached with that function's jaxpr and break its later calls.
            raise _OneTraceUnfit(
                f"latent site '{name}' is sampled inside a nested JAX trace"
            )
        with jax.ensure_compile_time_eval():
            sup = support_values(fn, name)
        self.supports[name] = sup
        dtype = jax.dtypes.canonicalize_dtype(sup.dtype)
        shape = tuple(int(d) for d in fn.batch_shape)
        msg["value"] = _latent_p.bind(shape=shape, dtype=dtype, name=name)
        if shape == () and np.issubdtype(dtype, np.integer) and sup.min() >= 0:
            _mark_nonnegative(msg["value"])


#: The thread's latent markers that index arrays without JAX's negative-index
#: normalisation (``id -> tracer``; the tracer is held so its id stays its own).
_NONNEG_INDICES = threading.local()

#: Not a marker (``None`` is a valid index item, so it cannot be the default).
_UNMARKED = object()


def _mark_nonnegative(tracer: Any) -> None:
    """Record a scalar latent marker whose support is ``0, 1, ...`` (see
    :func:`_fast_indexing`)."""
    marks = getattr(_NONNEG_INDICES, "marks", None)
    if marks is not None:
        marks[id(tracer)] = tracer


def _marked_take(arr: Any, idx: Any, marks: dict) -> Array | None:
    """``arr[idx]`` as one ``lax.dynamic_slice`` and a squeeze, when ``idx`` is a
    marked latent, or a tuple of marked latents, non-negative ints in range and
    full slices, with at least one marked latent (all of one dtype); else None.
    Equal to JAX's own indexing wherever each marked latent lies on its support,
    the only values the compiler evaluates the trace at."""
    items = idx if isinstance(idx, tuple) else (idx,)
    shape = np.shape(arr)
    if len(items) > len(shape):
        return None
    marked = [i for i in items if marks.get(id(i), _UNMARKED) is i]
    dtypes = {np.dtype(i.dtype) for i in marked}
    if len(dtypes) != 1:
        return None
    # Only in the trace the markers belong to (the model's own, whose equations
    # _lift_latents expands): inside a nested trace (a jit or scan body) the
    # index goes through JAX's own code.
    cur = _current_trace()
    if cur is None or not all(_staged_here(i, cur) for i in marked):
        return None
    (dtype,) = dtypes
    zero, top = _int_facts(dtype)  # an int start is cast to the latent's dtype
    starts, sizes, squeeze = [], [], []
    for axis, (i, n) in enumerate(zip(items, shape, strict=False)):
        if marks.get(id(i), _UNMARKED) is i:
            starts.append(i)
        elif isinstance(i, slice) and i == slice(None):
            starts.append(zero)
            sizes.append(n)
            continue
        elif _is_int(i) and 0 <= i < n and i <= top:
            starts.append(np.asarray(i, dtype))
        else:
            return None
        sizes.append(1)
        squeeze.append(axis)
    rest = shape[len(items) :]
    starts += [zero] * len(rest)
    sizes += list(rest)
    # One equation, expanded into lax.dynamic_slice and lax.squeeze after the
    # trace (_take_p); lax's wrappers would only re-check what these starts are
    # (one dtype, non-negative).
    return _take_p.bind(
        arr, *starts, slice_sizes=tuple(sizes), dimensions=tuple(squeeze)
    )


@functools.lru_cache(maxsize=32)
def _int_facts(dtype: np.dtype) -> tuple[np.ndarray, int]:
    """A zero start of ``dtype`` and the largest int it holds."""
    return np.zeros((), dtype), int(np.iinfo(dtype).max)


def _current_trace() -> Any:
    """The trace JAX stages into now (private API; None where it moved)."""
    ctx = getattr(getattr(jax._src, "core", None), "trace_ctx", None)
    return getattr(ctx, "trace", None)


def _static_take(arr: Any, idx: Any) -> Array | None:
    """``arr[idx]`` read on the host, when ``arr`` is a concrete (not traced)
    array on one device and ``idx`` is in-range ints and basic slices; else
    None. Traced, JAX stages such a slice (~140 us per index) and the compiler
    then evaluates it op by op (the known part of ``slices.grouped_tables``); a
    model's ``potentials[i]`` in a loop is mostly this. numpy's and JAX's
    indexing agree on these indices (ints in ``[-n, n)``, slices of ints)."""
    if isinstance(arr, jax.core.Tracer) or not isinstance(arr, jax.Array):
        return None
    items = idx if isinstance(idx, tuple) else (idx,)
    if len(items) > arr.ndim:
        return None
    for i, n in zip(items, arr.shape, strict=False):
        if isinstance(i, slice):
            fields = (i.start, i.stop, i.step)
            if not all(f is None or _is_int(f) for f in fields):
                return None
        elif not (_is_int(i) and -n <= i < n):
            return None
    if (
        not isinstance(arr.dtype, np.dtype)  # PRNG keys and other extended dtypes
        or arr.weak_type
        or len(arr.sharding.device_set) != 1
    ):
        return None
    return jnp.asarray(np.asarray(arr)[idx])


def _is_int(i: Any) -> bool:
    return isinstance(i, int | np.integer) and not isinstance(i, bool)


@contextlib.contextmanager
def _fast_indexing():
    """During the one trace, index the way the compiler needs, not the general
    way: ``table[z]`` of a latent ``z`` of support ``0..k-1`` (never negative)
    without JAX's negative-index normalisation, and ``table[i]`` of a closed-over
    array read on the host; and give ``numpyro.factor`` its (empty) value
    concretely (:func:`_unit_sample`).

    For a scalar traced ``z``, JAX's ``table[z]`` tries a static slice (which
    raises), then stages ``select(z < 0, z + n, z)`` (and, for a table of two
    or more axes, a cast of every start index) through jitted ``jnp`` wrappers
    before the ``dynamic_slice``: ~430 us per index under tracing, half the
    trace of a plain loop. On the support the select is the identity, so
    :func:`_marked_take` stages only the slice and the squeeze (as one stand-in
    equation, :data:`_take_p`, expanded into the two after the trace), and the
    jaxpr computes the same tables. :func:`_static_take` turns a closed-over
    ``potentials[i]`` into a constant. A chain of 10,000 sites:
    ``compile_model`` 17.5 s -> 9.2 s (latents) -> 7.2 s (static). Every other
    index (a derived ``z - 1``, a support that may be negative, an unmarked
    tracer, an array index) goes through JAX's own code.

    The hooks are JAX's private ``indexing.rewriting_take`` and NumPyro's
    ``Unit.sample``, replaced while at least one thread is inside this context
    (installed once, counted under a lock, the originals kept aside) and acting
    only for the threads inside it: any other call goes to the original. Where
    ``rewriting_take`` is missing, indexing is left alone.
    """
    if getattr(_NONNEG_INDICES, "marks", None) is not None:  # nested: already on
        yield
        return
    _install_hooks()
    _NONNEG_INDICES.marks = {}
    try:
        yield
    finally:
        _NONNEG_INDICES.marks = _NONNEG_INDICES.trace = None
        _remove_hooks()


_HOOK_LOCK = threading.Lock()
#: Threads inside :func:`_fast_indexing`, and the functions the hooks replace.
_HOOKS: dict[str, Any] = {"count": 0, "take": None, "unit": None}


def _indexing_module() -> Any:
    try:
        from jax._src.numpy import indexing
    except ImportError:  # pragma: no cover - a JAX that moved its indexing
        return None
    return indexing if callable(getattr(indexing, "rewriting_take", None)) else None


def _install_hooks() -> None:
    indexing = _indexing_module()
    with _HOOK_LOCK:
        if _HOOKS["count"] == 0:
            if indexing is not None and indexing.rewriting_take is not _take_hook:
                _HOOKS["take"] = indexing.rewriting_take
                indexing.rewriting_take = _take_hook
            if Unit.sample is not _unit_sample:
                _HOOKS["unit"] = Unit.sample
                Unit.sample = _unit_sample
        _HOOKS["count"] += 1


def _remove_hooks() -> None:
    indexing = _indexing_module()
    with _HOOK_LOCK:
        _HOOKS["count"] -= 1
        if _HOOKS["count"] == 0:
            if indexing is not None and indexing.rewriting_take is _take_hook:
                indexing.rewriting_take = _HOOKS["take"]
            if Unit.sample is _unit_sample:
                Unit.sample = _HOOKS["unit"]


def _take_hook(arr: Any, idx: Any, *args: Any, **kwargs: Any) -> Array:
    """JAX's ``rewriting_take`` with :func:`_fast_indexing`'s fast paths for the
    threads inside it."""
    marks = getattr(_NONNEG_INDICES, "marks", None)
    if marks is not None and not args and not kwargs:
        out = _static_take(arr, idx)
        if out is None and marks:
            out = _marked_take(arr, idx, marks)
        if out is not None:
            return out
    return _HOOKS["take"](arr, idx, *args, **kwargs)


#: Concrete empty arrays by (shape, dtype), for :func:`_unit_sample`.
_EMPTY: dict[tuple, Array] = {}


def _unit_sample(self: Any, key: Any, sample_shape: tuple[int, ...] = ()) -> Array:
    """``Unit.sample`` (the value ``numpyro.factor`` observes: an array with a
    zero-length event axis, so no values) as a concrete, cached array, for the
    threads inside :func:`_fast_indexing`. NumPyro's own ``jnp.empty`` is staged
    into the trace (~60 us; a third of an Ising grid's factor sites' trace)."""
    if getattr(_NONNEG_INDICES, "marks", None) is None:
        return _HOOKS["unit"](self, key, sample_shape)
    shape = tuple(sample_shape) + tuple(self.batch_shape) + tuple(self.event_shape)
    dtype = jax.dtypes.canonicalize_dtype(float)
    out = _EMPTY.get((shape, dtype))
    if out is None:
        with jax.ensure_compile_time_eval():
            out = jnp.empty(shape, dtype)
        if len(_EMPTY) < 1024:
            _EMPTY[(shape, dtype)] = out
    return out


def _lift_latents(closed: ClosedJaxpr, latent: Sequence[str]) -> ClosedJaxpr:
    """``closed`` with every latent marker's output made an input, in ``latent``
    order, ahead of the evidence inputs, and every :data:`_take_p` expanded
    into its two standard equations."""
    jaxpr = closed.jaxpr
    found, eqns = {}, []
    for e in jaxpr.eqns:
        if e.primitive is _latent_p:
            found[e.params["name"]] = e.outvars[0]
        elif e.primitive is _take_p:
            eqns.extend(_expand_take(e))
        elif e.primitive is _score_p:
            eqns.append(_expand_score(e))
        else:
            eqns.append(e)
    if sorted(found) != sorted(latent):  # a marker inside a nested jaxpr (scan, jit)
        raise _OneTraceUnfit("a latent site is sampled inside a nested JAX trace")
    lifted = jaxpr.replace(
        invars=[found[n] for n in latent] + list(jaxpr.invars),
        eqns=eqns,
        debug_info=None,
    )
    return ClosedJaxpr(lifted, closed.consts)


def _front_one_trace(
    model: Callable,
    args: tuple,
    static: Mapping[str, Any],
    ev_names: list[str],
    ev_values: list[Array],
) -> _Front:
    """One abstract trace of the model: latent values are marker primitives
    (lifted to inputs afterwards), the site checks are the plain trace's static
    ones, and every site's log-prob is scored in the same trace.

    NumPyro's parameter checks cannot judge tracers; ``compile_model`` checks
    the latent tables instead (:func:`_check_normalised`), at every parent state.
    Raises whatever the model raises: ``compile_model`` then takes the
    two-trace path, which reports it.
    """
    found: dict[str, Any] = {}

    def fn(ev):
        _NONNEG_INDICES.trace = _current_trace()  # the model's own (see _scored)
        marker = _marked_latents(model)
        seeded = handlers.seed(marker, 0)
        tr = handlers.trace(seeded).get_trace(
            *args, **{**static, **dict(zip(ev_names, ev, strict=True))}
        )
        _check_sites(tr, supports=False)
        supports = {n: tuple(v.tolist()) for n, v in marker.supports.items()}
        sample_sites, latent, infos, nesting = _site_infos(tr, supports)
        split: list[str] = []
        scores = _score_sites(
            tr, sample_sites, [infos[n].summed for n in sample_sites], split
        )
        checks = _param_checks(tr, sample_sites)
        first = {n: marker.supports[n][0] for n in latent}
        found.update(
            tr=dict(tr),
            sample_sites=sample_sites,
            latent=latent,
            supports=supports,
            infos=infos,
            nesting=nesting,
            split=split,
            first=first,
            checks=tuple(c[:3] for c in checks),
        )
        return scores + [c[3] for c in checks]

    with numpyro.validation_enabled(False), _fast_indexing():
        closed = jax.make_jaxpr(fn)(ev_values)
    latent = found["latent"]
    closed = _lift_latents(closed, latent)
    lat_values = [
        np.broadcast_to(np.asarray(found["first"][n], v.aval.dtype), v.aval.shape)
        for n, v in zip(latent, closed.jaxpr.invars, strict=False)
    ]
    return _Front(
        found["tr"],
        found["sample_sites"],
        latent,
        found["supports"],
        found["infos"],
        found["nesting"],
        closed,
        found["split"],
        lat_values,
        found["checks"],
    )


# Constraints whose violation can give a finite, wrong table. A parameter outside
# the others (a negative scale or rate, probs outside [0, 1]) makes the log-prob
# NaN, which _check_table refuses by name.
_SKIP_CONSTRAINTS = (
    "_Real",
    "_RealVector",
    "_IndependentConstraint",
    "_Dependent",
)


def _param_checks(tr: Mapping[str, dict], sites: Sequence[str]) -> list:
    """``(site, parameter, constraint, bad)`` for each constrained parameter of
    each site, ``bad`` a float array (1 where the constraint fails). Latent
    sites too: their tables are checked to sum to one (:func:`_check_normalised`),
    but NumPyro clamps a ``Bernoulli(1.5)`` to probability 1 and scores a
    negative ``Categorical`` prob ``-inf``, so such tables still sum to one.

    NumPyro validates a distribution's arguments only when they are concrete;
    ``compile_model`` traces with latent markers, so a parameter that depends on a
    latent (``Categorical(probs=P[z])``) is checked here instead, at every parent
    state, with NumPyro's own ``constraint.check`` (and its tolerance).
    """
    out = []
    for n in sites:
        fn = tr[n]["fn"]
        while isinstance(fn, Independent | ExpandedDistribution):
            fn = fn.base_dist
        if isinstance(fn, MaskedDistribution):
            continue
        if type(fn) in _CATEGORICAL_PARAM and not tr[n]["is_observed"]:
            continue  # its table is the check: sums to one, NaN at a negative prob
        for name, con in getattr(fn, "arg_constraints", {}).items():
            base = con.base_constraint if hasattr(con, "base_constraint") else con
            if type(base).__name__ in _SKIP_CONSTRAINTS or name not in fn.__dict__:
                continue
            value = fn.__dict__[name]
            try:
                bad = _constraint_bad(con, value)
            except Exception:  # noqa: BLE001 - a constraint that cannot check
                continue
            out.append((n, name, type(base).__name__.strip("_"), bad))
    return out


@jax.jit
def _constraint_bad(con: Any, value: Array) -> Array:
    """1.0 where ``value`` breaks NumPyro's constraint ``con`` (a pytree), else
    0.0. Jitted, as :func:`_categorical_score`: one call per site in a trace, not
    the check's half-dozen operations (a chain of 10,000 latent ``Categorical``
    sites: 6 s of tracing and grouping otherwise)."""
    return jnp.where(jnp.asarray(con.check(value)), 0.0, 1.0)


#: One compile at a time: NumPyro's handler stack is one list for the whole
#: process, so two models run under handlers at once in two threads would see
#: each other's sites ("duplicated site", "already has a value").
_COMPILE_LOCK = threading.RLock()


def _one_at_a_time(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _COMPILE_LOCK:
            return fn(*args, **kwargs)

    return locked


@_one_at_a_time
@_gc_paused()
def compile_model(model: Callable, *args: Any, **kwargs: Any) -> FactorGraph:
    """Compile a NumPyro model with finite discrete latents into a factor graph.

    Every latent sample site must have finite support (``has_enumerate_support``).
    Each sample site (latent, observed or ``numpyro.factor``) gives one factor
    group: its ``log_prob`` over its own latent parents, found by provenance, with
    its plates as an instance axis (module docstring). The number of sites is not
    limited by NumPyro's enumeration dims. Calls from several threads run one at
    a time (NumPyro's handler stack is shared by the whole process).

    Args:
        model: A NumPyro model function.
        *args, **kwargs: Arguments for the model, including the observations.
            Array keyword arguments are evidence that ``infer`` may replace
            (a batch of them is vmapped).

    Returns:
        The compiled :class:`FactorGraph`.

    Raises:
        CompileError: Continuous latent sites, subsampled plates, batch
            dimensions not declared by plates, NaN or +inf log-probabilities.
    """
    for name, x in split_evidence(kwargs)[0].items():
        check_evidence_values(name, x)
    arrays, static = split_evidence(kwargs)
    ev_names = list(arrays)
    ev_values = [jnp.asarray(arrays[k]) for k in ev_names]
    front = None
    if ONE_TRACE:
        try:
            front = _front_one_trace(model, args, static, ev_names, ev_values)
        except Exception:  # noqa: BLE001 - the two-trace path raises the real error
            front = None
    if front is None:
        front = _front_two_traces(model, args, kwargs, static, ev_names, ev_values)
    sample_sites, latent, supports, infos, nesting, closed, split, lat_values = (
        front.sample_sites,
        front.latent,
        front.supports,
        front.infos,
        front.nesting,
        front.closed,
        front.split,
        front.lat_values,
    )
    n_sites = len(sample_sites)
    for n, aval in zip(sample_sites, closed.out_avals[:n_sites], strict=True):
        _check_log_prob_shape(n, front.sites[n], tuple(aval.shape))
    labels = [frozenset({("z", n)}) for n in latent] + [
        frozenset({("e", k)}) for k in ev_names
    ]
    prov = _jaxpr_provenance(closed.jaxpr, labels)
    pos = {n: k for k, n in enumerate(latent)}
    # Scale parts that depend on no latent are carried apart (see _split_log_prob).
    split_out = {
        n: n_sites + 2 * i
        for i, n in enumerate(split)
        if not any(kind == "z" for kind, _ in prov[n_sites + 2 * i + 1])
    }
    for n, p in zip(sample_sites, prov[:n_sites], strict=True):
        parents = sorted((s for kind, s in p if kind == "z" and s != n), key=pos.get)
        scope = ((n,) if n in supports else ()) + tuple(parents)
        evidence = tuple(k for kind, k in p if kind == "e")
        infos[n] = dataclasses.replace(infos[n], scope=scope, evidence=evidence)

    _check_table_sizes(infos, supports)
    colour_of = _greedy_colours([i.scope for i in infos.values()], latent)
    n_col = max(colour_of.values(), default=-1) + 1
    if n_col > MAX_COLOURS:
        worst = max(infos.values(), key=lambda i: len(i.scope))
        raise CompileError(
            f"the model needs {n_col} simultaneously enumerated latent sites; site "
            f"'{worst.name}' alone depends on {len(worst.scope)}: {worst.scope}"
        )
    colour_inputs, colour_values = [], []
    for c in range(n_col):
        members = [n for n in latent if colour_of[n] == c]
        kmax = max(len(supports[n]) for n in members)
        colour_inputs.append(tuple(pos[n] for n in members))
        colour_values.append(
            tuple(_support_grid(supports[n], lat_values[pos[n]], kmax) for n in members)
        )
    out_colours = [
        tuple(sorted(colour_of[s] for s in infos[n].scope)) for n in sample_sites
    ]
    site_pos = {n: k for k, n in enumerate(sample_sites)}
    for n in split:  # mean part over the site's scope, scale part over none
        out_colours += [out_colours[site_pos[n]], ()]
    n_main = len(out_colours)
    for p in prov[n_main:]:  # parameter checks, over their own latents
        out_colours.append(tuple(sorted(colour_of[s] for kind, s in p if kind == "z")))
    out_colours = tuple(out_colours)
    evaluator = _Evaluator(
        jaxpr=closed,
        colour_inputs=tuple(colour_inputs),
        colour_values=tuple(colour_values),
        out_colours=out_colours,
        latent_fill=tuple(lat_values),
    )

    offsets, start = {}, 0
    vgroups = []
    for n in latent:
        info = infos[n]
        offsets[n] = start
        vgroups.append(VariableGroup(n, info.plate_shape, info.support, start))
        start += info.n_instances
    fgroups = tuple(
        FactorGroup(
            site=n,
            scope_sites=infos[n].scope,
            cards=tuple(len(supports[s]) for s in infos[n].scope),
            scope=_scope_index(infos[n], infos, offsets),
            plate_shape=infos[n].plate_shape,
            evidence=infos[n].evidence,
        )
        for n in sample_sites
    )
    fg = FactorGraph(
        model=model,
        args=args,
        kwargs=dict(kwargs),
        sites=infos,
        variable_groups=tuple(vgroups),
        factor_groups=fgroups,
        plate_nesting=nesting,
        _evaluator=evaluator,
        _colour_of=colour_of,
        _out_index={n: k for k, n in enumerate(sample_sites)},
        _static_tables=(),
        _x64=bool(jax.config.jax_enable_x64),
    )
    _check_params(fg, evaluator, front.checks, n_main, lat_values, ev_values)
    if len(closed.jaxpr.eqns) > GROUP_EQNS:
        main = closed
        if len(closed.jaxpr.outvars) > n_sites:  # split parts, parameter checks
            main = _keep_outputs(closed, range(n_sites))
        tables = _grouped_static_tables(fg, main, lat_values, ev_values)
    else:
        tables = tuple(fg._evaluate(ev_values, range(len(fgroups)), xp=np))
    _check_tables(fgroups, tables, front.sites, supports)
    fg._static_tables = tables
    # Keep only the part of the jaxpr that new evidence can change.
    dynamic = [n for n in sample_sites if infos[n].evidence]
    wanted = []
    for n in dynamic:
        o = split_out.get(n)
        wanted += [site_pos[n]] if o is None else [site_pos[n], o, o + 1]
    # Parameter checks that new evidence can fail, kept for infer to run.
    ev_checks = []
    for i, check in enumerate(front.checks):
        names = tuple(k for kind, k in prov[n_main + i] if kind == "e")
        if names:
            wanted.append(n_main + i)
            ev_checks.append((n_main + i, names, check))
    fg._evaluator = evaluator.restrict(wanted)
    if wanted and _trace_clean():
        # Stage the evidence-free part now, as one XLA program: at a first call
        # under `infer`'s trace it could only run op by op.
        fg._evaluator._staged()
    rank = {o: r for r, o in enumerate(sorted(wanted))}  # restrict renumbers
    fg._out_index = {n: rank[site_pos[n]] for n in dynamic}
    fg._split_index = {
        n: (rank[split_out[n]], rank[split_out[n] + 1])
        for n in dynamic
        if n in split_out
    }
    fg._evidence_checks = _EvidenceChecks(
        supports=front.support_evidence,
        normalised=tuple(
            (k, g.site, _family_name(front.sites[g.site]["fn"]))
            for k, g in enumerate(fgroups)
            if g.site in supports
            and g.evidence
            and _normalising_scale(front.sites[g.site]) == 1.0
        ),
        params=tuple((rank[o], names, *check) for o, names, check in ev_checks),
    )
    return fg


class _EvidenceChecks(NamedTuple):
    """What ``compile_model`` checked at the compile-time evidence that new
    evidence can change (:meth:`FactorGraph.check_new_evidence`).

    Attributes:
        supports: Evidence name -> the latent sites whose support it sets.
        normalised: ``(group, site, family)`` of each latent site whose table
            depends on evidence (it must sum to one over the site's states).
        params: ``(evaluator output, evidence names, site, parameter,
            constraint)`` of each parameter check that depends on evidence.
    """

    supports: Mapping[str, tuple[str, ...]] = {}
    normalised: tuple = ()
    params: tuple = ()


def _keep_outputs(closed: ClosedJaxpr, keep: Sequence[int]) -> ClosedJaxpr:
    """``closed`` with only the outputs ``keep`` (in order), the rest dropped."""
    from jax._src.interpreters import partial_eval as pe

    keep = list(keep)
    used = [False] * len(closed.jaxpr.outvars)
    for o in keep:
        used[o] = True
    dced, _ = pe.dce_jaxpr(closed.jaxpr, used, instantiate=True)
    return ClosedJaxpr(dced, closed.consts)


def _support_grid(support: Sequence, value: Array, k: int) -> np.ndarray:
    """``(k, *value.shape)``: each support value broadcast to the latent's value
    shape, in ``value``'s dtype, padded to ``k`` entries with the first value
    (read-only). A loop-written model's scalar latents share cached grids, keyed
    by the support's exact bytes (``0.0`` and ``-0.0`` are equal, not alike)."""
    sup = np.asarray(support)
    shape, dtype = tuple(np.shape(value)), np.dtype(value.dtype)
    if math.prod(shape) > 1:
        return _support_grid_cached.__wrapped__(
            sup.tobytes(), sup.dtype.str, shape, dtype, k
        )
    return _support_grid_cached(sup.tobytes(), sup.dtype.str, shape, dtype, k)


@functools.lru_cache(maxsize=1024)
def _support_grid_cached(
    raw: bytes, sup_dtype: str, shape: tuple[int, ...], dtype: np.dtype, k: int
) -> np.ndarray:
    sup = np.frombuffer(raw, dtype=np.dtype(sup_dtype))
    sup = np.concatenate([sup, np.repeat(sup[:1], k - len(sup))])
    grid = np.broadcast_to(sup.reshape((k,) + (1,) * len(shape)), (k,) + shape)
    grid = grid.astype(dtype)
    grid.setflags(write=False)
    return grid


def _grouped_static_tables(
    fg: FactorGraph,
    closed: ClosedJaxpr,
    lat_values: Sequence[Array],
    ev_values: Sequence[Array],
) -> tuple:
    """Every group's table at the compile-time evidence, evaluated slice by
    distinct slice (:mod:`pgm_drm.graph.slices`); outputs it leaves (shared or
    one-off slices) go through the colour evaluator."""
    latent = [g.site for g in fg.variable_groups]
    cards = {g.site: g.cardinality for g in fg.variable_groups}
    grids = [
        _support_grid(g.support, val, g.cardinality)
        for g, val in zip(fg.variable_groups, lat_values, strict=True)
    ]
    got, rest = grouped_tables(closed, grids, ev_values)
    tables: list = [None] * len(fg.factor_groups)
    for k, st in got.items():
        info = fg.sites[fg.factor_groups[k].site]
        slots = {latent[i]: j for j, i in enumerate(st.latents)}
        if set(slots) != set(info.scope):  # a scope the slice does not read
            rest.append(k)
            continue
        tables[k] = _rearrange(st.table, range(len(slots)), info, slots, cards, xp=np)
    if rest:
        rest = sorted(rest)
        for k, t in zip(rest, fg._evaluate(ev_values, rest), strict=True):
            tables[k] = np.asarray(t)
    return tuple(tables)


def _check_params(
    fg: FactorGraph,
    evaluator: _Evaluator,
    checks: Sequence[tuple[str, str, str]],
    first: int,
    lat_values: Sequence[Array],
    ev_values: Sequence[Array],
) -> None:
    """Refuse an observed site whose parameter breaks its constraint at some state
    of the latents it depends on (outputs ``first ..`` of ``evaluator``'s jaxpr,
    see :func:`_param_checks`)."""
    if not checks:
        return
    outs = list(range(first, first + len(checks)))
    closed = _keep_outputs(evaluator.jaxpr, outs)
    raw: dict[int, Any] = {}
    if len(closed.jaxpr.eqns) > GROUP_EQNS:
        grids = [
            _support_grid(g.support, val, g.cardinality)
            for g, val in zip(fg.variable_groups, lat_values, strict=True)
        ]
        got, rest = grouped_tables(closed, grids, ev_values)
        raw = {k: st.table for k, st in got.items()}
        outs = [first + k for k in rest]
    if outs:
        for o, r in zip(outs, evaluator(ev_values, outs), strict=True):
            raw[o - first] = r
    for k, (site, name, con) in enumerate(checks):
        if np.any(np.asarray(raw[k]) != 0):
            raise CompileError(
                f"site '{site}': parameter '{name}' is outside its constraint "
                f"({con}) at some state of the latents it depends on (e.g. probs "
                "that do not sum to one)"
            )


def _check_table_sizes(infos: Mapping[str, SiteInfo], supports: Mapping) -> None:
    """Refuse a site whose table would pass ``MAX_CLUSTER_SIZE``, before any
    table is allocated (its states times its plate instances)."""
    from pgm_drm.graph.schedule import MAX_CLUSTER_SIZE

    for info in infos.values():
        states = math.prod(len(supports[s]) for s in info.scope)
        # Data plates count: a log-prob outside natural form is summed over them
        # only after it is computed.
        n = info.n_instances * math.prod(k for _, k in info.summed)
        if states * max(n, 1) > MAX_CLUSTER_SIZE:
            raise CompileError(
                f"site '{info.name}' depends on {list(info.scope)}: its table has "
                f"{states} joint states x {n} plate instances "
                f"(> {MAX_CLUSTER_SIZE} entries); reduce the site's parents or "
                "their cardinalities"
            )


def _check_tables(
    groups: Sequence[FactorGroup],
    tables: Sequence[Array],
    sites: Mapping[str, Mapping],
    supports: Mapping[str, Any],
) -> None:
    """:func:`_check_table` and (latent sites) :func:`_check_normalised` of every
    group's table. Tables of one shape and dtype are checked stacked (a
    loop-written model has thousands of small ones: ~15 us each alone); a stack
    that fails is checked table by table, for the error naming the site."""
    by_kind: dict[tuple, list[int]] = {}
    for k, (g, t) in enumerate(zip(groups, tables, strict=True)):
        t = np.asarray(t)
        scale = _normalising_scale(sites[g.site]) if g.site in supports else None
        by_kind.setdefault((t.shape, t.dtype.str, scale), []).append(k)
    suspects: list[int] = []
    for (shape, _, scale), ks in by_kind.items():
        if len(ks) > 1:
            stack = np.stack([np.asarray(tables[k]) for k in ks])
            ok = not (np.isnan(stack).any() or np.isposinf(stack).any())
            if ok and scale is not None:  # the stack's rows, as one table's
                rows = stack if scale == 1.0 else stack / scale
                rows = _host_unnormalised_rows(rows.reshape((-1,) + shape[1:]))
                ok = rows is None or not rows[0].any()
            if ok:
                continue
        suspects += ks
    for k in sorted(suspects):  # group order: the first bad table is named
        g = groups[k]
        _check_table(g.site, tables[k])
        if g.site in supports:
            _check_normalised(g.site, sites[g.site], g.scope_sites, tables[k])


def _check_table(site: str, table: Array) -> None:
    """Only -inf is a legal non-finite log-potential (a hard zero)."""
    t = np.asarray(table)
    if np.isnan(t).any():
        raise CompileError(f"site '{site}' has NaN log-probabilities")
    if np.isposinf(t).any():
        raise CompileError(
            f"site '{site}' has +inf log-probabilities; only -inf (a hard zero) is "
            "allowed"
        )


def _check_normalised(
    site: str, msg: Mapping, scope: Sequence[str], table: Array
) -> None:
    """A latent site's probabilities sum to one over its support at every state
    of its parents: a parameter outside its constraint (probs that do not sum to
    one), or a support that moves with another latent (``Binomial(k)`` with
    ``k`` latent: the support is read at one state of ``k``), would otherwise
    give a finite, wrong table. NumPyro's own argument checks see only concrete
    values, and ``compile_model`` traces abstractly.

    Tolerance: NumPyro's simplex tolerance (1e-6), or 64 ulps of the table's
    dtype times the row's largest finite ``|log p|`` when that is larger (a
    log-prob carries the rounding of the terms it is computed from: about 3e-5
    for a float32 ``Binomial(100, 0.3)``). A row where every state is impossible
    (probability zero at a parent state the model never reaches) is allowed: it
    is a hard zero, and exact inference handles it. A site under a constant
    ``handlers.scale`` is checked unscaled (its table divided by the scale);
    under a scale that varies, or a mask, it is not normalised by design.
    """
    scale = _normalising_scale(msg)
    if scale is not None:
        t = table if scale == 1.0 else np.asarray(table) / scale
        _refuse_unnormalised(site, _family_name(msg["fn"]), scope, t)


def _normalising_scale(msg: Mapping) -> float | None:
    """The factor a latent site's table is scaled by, for the sums-to-one test:
    1 unscaled, the scale of a constant positive ``handlers.scale``; ``None``
    under a mask or a scale that varies (or is traced), which re-weight the
    table by design."""
    if msg.get("mask") is not None or isinstance(msg["fn"], MaskedDistribution):
        return None
    scale = msg.get("scale")
    if scale is None:
        return 1.0
    if isinstance(scale, jax.core.Tracer):
        return None
    values = np.unique(np.asarray(scale, dtype=np.float64))
    if values.size != 1 or not np.isfinite(values[0]) or values[0] <= 0:
        return None
    return float(values[0])


def _unnormalised_rows(t: Array, eps: float, xp: Any = np) -> tuple[Array, Array]:
    """``(bad, total)`` of a table ``t`` ``(n, K, *parents)``: each row's sum of
    probabilities over the site's states (axis 1), and where it is neither one
    (to :func:`_check_normalised`'s tolerance, ``eps`` that of the table's
    dtype) nor zero. ``xp``: numpy on the host, ``jax.numpy`` in a program."""
    total = xp.sum(xp.exp(t), axis=1)
    scale = xp.max(xp.where(xp.isfinite(t), xp.abs(t), 0.0), axis=1)
    tol = xp.maximum(1e-6, 64 * eps * xp.maximum(scale, 1.0))
    return ~((xp.abs(total - 1.0) <= tol) | (total == 0.0)), total


def _unnormalised_anywhere(table: Array) -> Array:
    """Whether :func:`_refuse_unnormalised` would refuse ``table``, computed in
    its dtype (jit-friendly; a scalar bool)."""
    if table.ndim < 2 or table.size == 0:
        return jnp.array(False)
    eps = float(jnp.finfo(table.dtype).eps)
    return jnp.any(_unnormalised_rows(table, eps, jnp)[0])


def _host_unnormalised_rows(table: Array) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_unnormalised_rows` on the host, in float64 with the tolerance of
    the table's own dtype; None for a table with no rows to sum."""
    t = np.asarray(table)
    if t.ndim < 2 or t.size == 0:
        return None
    eps = float(np.finfo(t.dtype).eps)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _unnormalised_rows(t.astype(np.float64), eps)


def _refuse_unnormalised(
    site: str, family: str, scope: Sequence[str], table: Array, given: str = ""
) -> None:
    """:func:`_check_normalised`'s test and error (``given``: where the values
    came from, appended to the message)."""
    rows = _host_unnormalised_rows(table)
    if rows is None:
        return
    bad, total = rows
    if bad.any():
        err = np.where(bad, np.abs(np.nan_to_num(total - 1, nan=np.inf)), 0)
        worst = np.unravel_index(np.argmax(err), bad.shape)
        parents = {s: int(i) for s, i in zip(scope[1:], worst[1:], strict=True)}
        at = f" at parent state index {parents}" if parents else ""
        raise CompileError(
            f"latent site '{site}' ({family}) has probabilities summing to "
            f"{float(total[worst]):.9g}, not 1{at}{given}: a parameter is outside "
            "its constraint (e.g. probs that do not sum to one), or its support "
            "depends on another latent site (e.g. Binomial(k) with k latent), "
            "which the compiler reads at one state and cannot enumerate"
        )


# --------------------------------------------------------------------------- #
# Reference path: NumPyro's own parallel enumeration (25 dims at most).
# --------------------------------------------------------------------------- #


class enum_support(enum):
    """``numpyro.contrib.funsor.enum`` that enumerates *support values*.

    NumPyro's funsor ``enum`` enumerates ``arange(K)``, which is wrong for
    distributions whose support is not ``0..K-1`` (``DiscreteUniform(2, 5)``
    would be scored at 0..3). This handler maps the enumerated indices through
    ``enumerate_support``; dims and names are unchanged.
    """

    def process_message(self, msg):
        enumerated = (
            msg["type"] == "sample"
            and not msg.get("done", False)
            and not msg["is_observed"]
            and msg["infer"].get("enumerate") == "parallel"
            and not msg["infer"].get("expand", False)
            and msg["fn"].has_enumerate_support
        )
        super().process_message(msg)
        if enumerated:
            sup = msg["fn"].enumerate_support(expand=False)
            sup = jnp.reshape(sup, (sup.shape[0], -1))[:, 0]
            msg["value"] = sup[msg["value"]]


def max_plate_nesting(tr: Mapping[str, dict]) -> int:
    """The deepest plate dim of a trace (``-dim`` of the outermost plate), as
    NumPyro's ``enum``/``infer_discrete`` want for ``max_plate_nesting``."""
    depth = 0
    for site in tr.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.dim is not None:
                depth = max(depth, -frame.dim)
    return depth


def _enum_trace(model: Callable, args: tuple, kwargs: dict, nesting: int) -> dict:
    enumerated = enum_support(
        config_enumerate(model), first_available_dim=-(nesting + 1)
    )
    try:
        return packed_trace(handlers.seed(enumerated, 0)).get_trace(*args, **kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, CompileError):
            raise
        raise CompileError(
            f"tracing the model under NumPyro's parallel enumeration failed ({err})"
        ) from err


def enumeration_tables(fg: FactorGraph, **evidence: Any) -> tuple[Array, ...]:
    """Per-instance tables read through NumPyro's enumeration (reference path).

    Independent of the compiler's provenance and colouring: the model is traced
    under ``numpyro.contrib.funsor.enum`` and each site's log-prob tensor is
    rearranged by its ``dim_to_name``. Limited to NumPyro's 25 enumeration dims.
    """
    kwargs = {**fg.kwargs, **evidence}
    tr = _enum_trace(fg.model, fg.args, kwargs, fg.plate_nesting)
    cards = {g.site: g.cardinality for g in fg.variable_groups}
    out = []
    for g in fg.factor_groups:
        site = tr[g.site]
        info = fg.sites[g.site]
        lp = _site_log_prob(site, summed=info.summed)
        dim_to_name = dict(site["infer"].get("dim_to_name", {}))
        name_to_dim = {n: d for d, n in dim_to_name.items()}
        dims = [name_to_dim.get(s) for s in info.scope]
        length = max(
            [lp.ndim]
            + [-d for d in dims if d is not None]
            + [-d for d in info.plate_dims]
        )
        x = jnp.reshape(lp, (1,) * (length - lp.ndim) + lp.shape)
        for d in range(-length, 0):
            if d not in info.plate_dims and d not in dims and x.shape[d] != 1:
                raise CompileError(
                    f"site '{g.site}' depends on a latent outside its scope (dim {d})"
                )
        target = list(x.shape)
        for s, d in zip(info.scope, dims, strict=True):
            if d is not None:
                target[length + d] = cards[s]
        for d, size in zip(info.plate_dims, info.plate_shape, strict=True):
            target[length + d] = size
        x = jnp.broadcast_to(x, tuple(target))
        order = [length + d for d in info.plate_dims] + [
            length + d for d in dims if d is not None
        ]
        rest = [a for a in range(length) if a not in order]
        x = jnp.transpose(x, order + rest)
        x = jnp.reshape(x, tuple(target[a] for a in order))
        x = jnp.reshape(x, (info.n_instances,) + x.shape[len(info.plate_dims) :])
        for k, d in enumerate(dims):
            if d is None:  # cardinality-one latent: no enumerated dim
                x = jnp.expand_dims(x, k + 1)
        out.extend(x[i] for i in range(x.shape[0]))
    return tuple(out)
