"""The flat message-passing kernel: one kernel, parametrised by temperature.

Runs a :class:`pgm_drm.graph.plan.FlatPlan` on a compiled graph's *group* tables
(``(n_instances, *cards)`` per site). The semiring is the temperature ``T`` of
``reduce_T(x) = T * logsumexp(x / T)`` (paper §6.2.1): ``T = 0`` is max-sum
(``max`` exactly, a static branch), any ``T > 0`` is a traced argument, so one
compile serves every positive temperature. A factor-to-variable message is

    m_{f->v}(x_v) = reduce_T over x_{f \\ v} [ psi_f + sum_{u != v} m_{u->f} ]

and a variable-to-factor message is the variable's belief minus that factor's
own message, ``m_{v->f} = U_v + sum_{g != f} m_{g->v}``: the belief is summed
once per variable (a scatter-add) and each outgoing message subtracts its own
incoming one. ``-inf`` (hard zeros) is exact there: beliefs are kept as the sum
of finite parts and the count of ``-inf`` parts.

Numerics: every unary term and message is shifted by its own max as it is
computed, and every table row by its max (loopy) or by its first entry (tree and
junction tree: their reductions shift by their own max, see ``_setup``); the
shifts are added to log Z, so no belief holds the absolute log joint (a float32
image of large magnitude keeps normalised marginals).

On a DRM tree these steps are the paper's Eqs. 12-13: the reduction over a
child's nuisance is the max-pool, over its switch the ReLU, and the table is the
template match.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr

from pgm_drm._typing import Array
from pgm_drm.graph.plan import FlatPlan, split_classes
from pgm_drm.semiring import reduce_t, reduce_t_unrolled, reduce_t_with, safe_log

__all__ = [
    "FlatInputs",
    "FlatResult",
    "FreeSlices",
    "add_dynamic",
    "free_slices",
    "flat_inputs",
    "run_flat_plan",
    "static_inputs",
]


#: A factor-to-variable message reducing over at most this many states is
#: computed elementwise (:func:`pgm_drm.semiring.reduce_t_unrolled`).
UNROLL_STATES = 4


class FlatResult(NamedTuple):
    """Output of one flat-kernel run (one evidence instance; vmap adds a batch axis).

    Attributes:
        log_z: Scalar log partition at the temperature (T=0: max log joint). Loopy
            T>0: the Bethe estimate; loopy T=0: the log joint of the decoded MAP.
        log_marginals: ``(n_vars, kmax)`` normalised log (max-)marginals; states
            past a variable's cardinality are ``-inf``; rows not asked for
            (``run_flat_plan(marginals=ids)``) are ``NaN``.
        map_index: ``(n_vars,)`` joint MAP state indices (``-1`` when not asked).
        deltas: Loopy: max message change per iteration ``(max_iters,)``; else
            ``(0,)``.
    """

    log_z: Array
    log_marginals: Array
    map_index: Array
    deltas: Array


def _reduce(x: Array, axes: tuple[int, ...], t: Array | None) -> Array:
    """``T * logsumexp(x / T)`` over ``axes``; ``max`` when ``t`` is None (T=0)."""
    return reduce_t(x, axes, 0.0 if t is None else t)


def _shift(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """``x - max`` over ``axes`` and the max (``-inf`` rows stay ``-inf``).

    Every caller adds the returned max back (to log Z) or normalises it away, so
    the results do not depend on the shift and it carries no gradient (as in
    ``jax.nn.logsumexp``): the backward program is smaller, and XLA's CPU
    backend at ``-O0`` or with its legacy emitters otherwise returned NaN for
    the vmapped gradient of log Z (the ``where(isfinite(max))`` branch).
    """
    m = jax.lax.stop_gradient(jnp.max(x, axis=axes, keepdims=True))
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    return x - safe, jnp.squeeze(m, axis=axes)


def _shift_message(m: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """:func:`_shift` of a message just reduced from a cluster belief.

    The barrier keeps the shift's max reading the message. Without it XLA's
    simplifier merges ``max(reduce(b))`` into one reduction over the whole
    belief, a second read of it, so the cluster table feeding ``b`` is written
    out for two consumers (DRM 32x32: a 3 MB table read twice per call).
    """
    return _shift(jax.lax.optimization_barrier(m), axes)


def _level(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """``x`` less its first entry over ``axes`` (``0`` where that entry is
    ``-inf``), and that level: :func:`_shift` without its pass over ``x``.

    It removes the table's common level (a state-free term of every entry) for
    the price of a slice: the subtraction fuses into the table's consumers. The
    entries keep their spread, which a max shift keeps too; the consumers reduce
    through ``reduce_t``, which shifts by its own max, so nothing needs the max
    here.
    """
    first = x[(slice(None),) * (x.ndim - len(axes)) + (slice(0, 1),) * len(axes)]
    first = jax.lax.stop_gradient(first)
    level = jnp.where(jnp.isfinite(first), first, 0.0)
    return x - level, jnp.reshape(level, level.shape[: x.ndim - len(axes)])


def _finite_sum(x: Array) -> Array:
    """Sum of finite entries (the -inf offsets are counted by the caller)."""
    return jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0))


def _pack(msg: Array) -> Array:
    """``(..., kmax)`` message -> ``(..., 2, kmax)``: finite part, -inf indicator."""
    neg = jnp.isneginf(msg)
    return jnp.stack([jnp.where(neg, 0.0, msg), neg.astype(msg.dtype)], axis=-2)


def _empty(n: int, kmax: int, dtype) -> Array:
    """Belief accumulator ``(n + 1, 2, kmax)``: sum of the finite incoming parts
    and the number of ``-inf`` incoming parts (row ``n`` is the sink)."""
    return jnp.zeros((n + 1, 2, kmax), dtype)


def _scatter(acc: Array, ids, msg: Array) -> Array:
    return acc.at[ids].add(_pack(msg))


def _total(acc: Array, ids) -> Array:
    a = acc[ids]
    return jnp.where(a[..., 1, :] > 0, -jnp.inf, a[..., 0, :])


def _leave_one_out(acc: Array, ids, msg: Array) -> Array:
    """Sum of a variable's incoming messages except ``msg`` (exact with -inf)."""
    a = acc[ids]
    return _without(a[..., 0, :], a[..., 1, :], msg)


def _without(fin: Array, ninf: Array, msg: Array) -> Array:
    """A sum kept as its finite part ``fin`` and its number ``ninf`` of -inf
    parts, less one of its parts ``msg`` (exact with -inf)."""
    neg = jnp.isneginf(msg)
    return jnp.where(
        neg,
        jnp.where(ninf == 1, fin, -jnp.inf),
        jnp.where(ninf == 0, fin - jnp.where(neg, 0.0, msg), -jnp.inf),
    )


def _rows(index: np.ndarray, inst) -> np.ndarray | Array:
    """Rows of a static index array: numpy when ``inst`` is static, else a gather."""
    if isinstance(inst, np.ndarray):
        return index[inst]
    return jnp.asarray(index)[inst]


def _pad(x: Array, kmax: int, fill: float = 0.0) -> Array:
    k = x.shape[-1]
    if k == kmax:
        return x
    return jnp.concatenate([x, jnp.full(x.shape[:-1] + (kmax - k,), fill, x.dtype)], -1)


def _pick(x: Array, idx: tuple[int, ...], axis: int) -> Array:
    """``x``'s entries ``idx`` along ``axis`` (a slice when they run in a row)."""
    if tuple(idx) == tuple(range(idx[0], idx[0] + len(idx))):
        return jax.lax.slice_in_dim(x, idx[0], idx[0] + len(idx), axis=axis)
    return jnp.take(x, np.asarray(idx), axis=axis)


def _joint(
    table: Array,
    v_in: Array,
    cards: tuple[int, ...],
    skip: int,
    pick: tuple[int, tuple[int, ...]] | None = None,
) -> Array:
    """``table + sum_{i != skip} v_in[:, i]`` broadcast over the table's axes
    (``pick = (axis, states)``: the table holds only those states of ``axis``)."""
    a = len(cards)
    x = table
    for i in range(a):
        if i == skip:
            continue
        msg = v_in[:, i, : cards[i]]
        if pick is not None and pick[0] == i:
            msg = _pick(msg, pick[1], 1)
        shape = [x.shape[0]] + [1] * a
        shape[i + 1] = msg.shape[1]
        x = x + jnp.reshape(msg, shape)
    return x


def _factor_message(
    table: Array,
    v_in: Array,
    cards: tuple[int, ...],
    j: int,
    t,
    kmax: int,
    shift: bool = True,
) -> tuple[Array, Array]:
    """Message from each factor instance to its slot-``j`` variable, shifted by
    its max (``shift=False``: unshifted, for a caller that shifts later)."""
    x = _joint(table, v_in, cards, j)
    axes = tuple(i + 1 for i in range(len(cards)) if i != j)
    if np.prod([cards[a - 1] for a in axes]) <= UNROLL_STATES:
        m = reduce_t_unrolled(x, axes, 0.0 if t is None else t)
    else:
        m = _reduce(x, axes, t)
    if not shift:
        return _pad(m, kmax), jnp.zeros(m.shape[:1], m.dtype)
    m, off = _shift(m, (1,))
    return _pad(m, kmax), off


class FreeSlices(NamedTuple):
    """Slices of a pair class's tables that no evidence changes.

    A Rendering Model's ``a = 0`` states render nothing (Eq. 8 with ``eta = 0``):
    their log-likelihood entries are ``-A(z)``, the same for every image. The
    messages then split into the evidence's states, reduced per image, and the
    free ones, reduced once (under ``jax.vmap`` they carry no batch axis, as
    long as the messages they meet carry none: the RM's priors, and on the way
    down the message of a root whose only pair factor this is), joined in one
    reduction (:func:`_split_message`): the same sum, half the exponentials
    for the RM.

    Attributes:
        axis: The table axis (slot) the free slices lie along.
        live: Its states whose slices may depend on the evidence.
        dead: Its states whose slices never do, in every instance.
        values: ``(n_c, *cards)`` the tables' values (only the ``dead`` slices
            are read; a concrete evaluation, see :func:`free_slices`).
    """

    axis: int
    live: tuple[int, ...]
    dead: tuple[int, ...]
    values: np.ndarray


#: A class's tables are split (:class:`FreeSlices`) only when at least this
#: fraction of one axis's states is free: the split costs a second reduction.
FREE_MIN_FRACTION = 0.25


def free_slices(dependence: np.ndarray, values: np.ndarray) -> FreeSlices | None:
    """The axis of a pair class's tables with the largest fraction of states
    whose slices do not depend on the evidence in any instance.

    Args:
        dependence: ``(n_c, *cards)`` bool, ``True`` where an entry may depend
            on the evidence (:func:`pgm_drm.graph.keys.input_dependence`).
        values: ``(n_c, *cards)`` the tables at any one evidence value (their
            free entries are the same at every value).

    Returns:
        :class:`FreeSlices`, or ``None`` when no axis has at least
        :data:`FREE_MIN_FRACTION` (and not all) of its states free.
    """
    dependence = np.asarray(dependence, bool)
    if dependence.shape[0] == 0 or dependence.ndim < 2:
        return None
    best = None
    for a in range(dependence.ndim - 1):
        other = tuple(d for d in range(dependence.ndim) if d != a + 1)
        dead = np.flatnonzero(~dependence.any(axis=other))
        k = dependence.shape[a + 1]
        frac = len(dead) / k
        if 0 < len(dead) < k and frac >= FREE_MIN_FRACTION:
            if best is None or frac > best[0]:
                best = (frac, a, dead, k)
    if best is None:
        return None
    _, a, dead, k = best
    live = np.setdiff1d(np.arange(k), dead)
    return FreeSlices(
        a, tuple(map(int, live)), tuple(map(int, dead)), np.asarray(values)
    )


def _in_state_order(live: Array, dead: Array, fs: FreeSlices) -> Array:
    """``(n, card)`` from the live and the free states' columns, in state order:
    runs of slices concatenated (a gather here was fused with the reduction
    that makes ``live`` and computed it again per column)."""
    src = {s: (live, i) for i, s in enumerate(fs.live)}
    src.update({s: (dead, i) for i, s in enumerate(fs.dead)})
    pieces, state, n = [], 0, len(src)
    while state < n:
        arr, i = src[state]
        end = state + 1
        while end < n and src[end][0] is arr and src[end][1] == i + end - state:
            end += 1
        pieces.append(jax.lax.slice_in_dim(arr, i, i + end - state, axis=1))
        state = end
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


#: Reduced states are laid out as (S / 4, 4) where S divides: XLA's CPU backend
#: emitted a reduction over one axis of 16 float64 states at about half the
#: speed of the same states as (4, 4) or (8, 2) (measured, 10,000 x 10 rows).
_VECTOR_GROUP = 4


def _split_message(
    table: Array,
    dead_table: Array,
    v_in: Array,
    cards: tuple[int, ...],
    j: int,
    t,
    kmax: int,
    fs: FreeSlices,
) -> tuple[Array, Array]:
    """:func:`_factor_message` of a table split by :class:`FreeSlices`: the
    reduction over the live states (``table`` whole, read at them) and over the
    free ones (``dead_table``, evidence-free, reduced first: under ``vmap`` it
    has no batch axis), the reduction over every state taken in two parts. To
    the split axis's own variable (``j == fs.axis``) the live and the free
    states' entries are reduced apart and placed in state order."""
    live = _joint(
        _pick(table, fs.live, fs.axis + 1), v_in, cards, j, (fs.axis, fs.live)
    )
    dead = _joint(dead_table, v_in, cards, j, (fs.axis, fs.dead))
    if j == fs.axis:
        axes = tuple(i + 1 for i in range(len(cards)) if i != j)
        m, off = _shift(
            _in_state_order(_reduce(live, axes, t), _reduce(dead, axes, t), fs), (1,)
        )
        return _pad(m, kmax), off

    def flat(x):  # the reduced states as (S / 4, 4) (see _VECTOR_GROUP)
        x = jnp.moveaxis(x, j + 1, 1)
        size = math.prod(x.shape[2:])
        tail = (-1, _VECTOR_GROUP) if size % _VECTOR_GROUP == 0 else (-1,)
        x = jnp.reshape(x, x.shape[:2] + tail)
        return x, tuple(range(2, x.ndim))

    # The free states' reduction joins the live ones as one more entry of a
    # single reduction (reduce_t_with), taken first: it has no batch axis.
    once = _reduce(*flat(dead), t)
    m = reduce_t_with(*flat(live), once, 0.0 if t is None else t)
    m, off = _shift(m, (1,))
    return _pad(m, kmax), off


class FlatInputs(NamedTuple):
    """A flat plan's inputs: unary terms, constant, and one table per class.

    Attributes:
        unary: ``(n_vars, kmax)`` sum of every arity-1 table of each variable
            (entries past a variable's cardinality are ignored).
        constant: Scalar sum of the arity-0 tables.
        tables: Per class of the plan, ``(n_c, *cards)``: its member groups'
            tables concatenated in member order.
    """

    unary: Array
    constant: Array
    tables: tuple[Array, ...]


def static_inputs(plan: FlatPlan, tables: Sequence[Array], groups) -> FlatInputs:
    """The part of the inputs from evidence-free groups (numpy, once per plan).

    Args:
        plan: The flat plan.
        tables: Every group's table (``fg.host_tables()`` or ``fg.group_tables()``).
        groups: The compiled graph's factor groups (to read evidence dependence).
    """
    dtype = (
        np.result_type(*[np.asarray(t).dtype for t in tables])
        if tables
        else (np.float32)
    )
    if not np.issubdtype(dtype, np.floating):
        dtype = np.float32
    unary = np.zeros((plan.n_vars, plan.kmax), dtype)
    for k, ids in plan.unary:
        if not groups[k].evidence:
            t = np.asarray(tables[k], dtype)
            np.add.at(unary, (ids[:, None], np.arange(t.shape[1])[None, :]), t)
    constant = np.asarray(
        sum(float(np.sum(tables[k])) for k in plan.constant if not groups[k].evidence),
        dtype,
    )
    parts = []
    for members, n_static, cards in zip(
        plan.pairs, plan.n_static, plan.pair_cards, strict=True
    ):
        chunk = [np.asarray(tables[k], dtype) for k in members[:n_static]]
        parts.append(
            np.concatenate(chunk) if chunk else np.zeros((0,) + tuple(cards), dtype)
        )
    return FlatInputs(
        jnp.asarray(unary), jnp.asarray(constant), tuple(map(jnp.asarray, parts))
    )


def add_dynamic(
    plan: FlatPlan, static: FlatInputs, dynamic: Mapping[int, Array], groups
) -> FlatInputs:
    """Complete :func:`static_inputs` with the evidence-dependent groups' tables."""
    dtype = jnp.result_type(static.unary, *dynamic.values())
    unary = static.unary.astype(dtype)
    # Every evidence unary table in ONE scatter-add (padded to kmax: entries past
    # a cardinality are masked later), not one per group: a loop-written model
    # has thousands of them, and XLA compiles each scatter apart.
    # A TableBlocks (FactorGraph.evidence_blocks) gathers many groups' tables
    # at once; a plain dict of tables is concatenated group by group.
    blocked = hasattr(dynamic, "rows")
    ev_unary = [(k, ids) for k, ids in plan.unary if groups[k].evidence]
    if ev_unary:
        ids_all = np.concatenate([np.asarray(ids) for _, ids in ev_unary])
        if blocked:
            rows = dynamic.rows([k for k, _ in ev_unary], plan.kmax).astype(dtype)
        else:
            rows = jnp.concatenate(
                [_pad(dynamic[k].astype(dtype), plan.kmax) for k, _ in ev_unary]
            )
        unary = unary.at[ids_all].add(rows)
    constant = static.constant.astype(dtype)
    for k in plan.constant:
        if groups[k].evidence:
            constant = constant + jnp.sum(dynamic[k])
    out = []
    for members, n_static, part in zip(
        plan.pairs, plan.n_static, static.tables, strict=True
    ):
        ks = members[n_static:]
        if not ks:
            out.append(part)
        elif blocked:
            rest = dynamic.rows(ks).astype(dtype)
            out.append(jnp.concatenate([part.astype(dtype), rest]))
        else:
            rest = [dynamic[k].astype(dtype) for k in ks]
            out.append(jnp.concatenate([part.astype(dtype)] + rest))
    return FlatInputs(unary, constant, tuple(out))


class _Setup(NamedTuple):
    unary: Array  # (n_vars + 1, kmax), max-shifted, -inf past each cardinality
    tables: tuple[Array, ...]  # per class (n_c + 1, *cards), max-shifted
    offset: Array  # log Z so far (constants and shifts)
    # Junction trees: per class (n_c, *cards) as given, with no sink row. A
    # keyed leaf gathers from these: a gather fuses the elementwise producers
    # of its operand (a DRM's template match), the sink's concatenate does not,
    # and the whole table was written out for it.
    raw: tuple[Array, ...] = ()
    # Trees: per class None, or its FreeSlices and their values (n_c + 1, ...)
    # leveled as the class's tables are (a sink row of zeros last).
    free: tuple = ()


def _free_level(fs: FreeSlices, dtype) -> tuple[np.ndarray, Array]:
    """A split class's level, one per instance: its first free entry (``0``
    where that is ``-inf``), known now, so the leveled free slices stay free of
    the evidence; and those slices leveled, a sink row of zeros last."""
    vals = np.asarray(fs.values, np.float64)
    first = [slice(None)] + [0] * (vals.ndim - 1)
    first[fs.axis + 1] = fs.dead[0]
    level = vals[tuple(first)]
    level = np.where(np.isfinite(level), level, 0.0)
    dead = np.take(vals, fs.dead, axis=fs.axis + 1)
    dead = dead - level.reshape((-1,) + (1,) * (vals.ndim - 1))
    dead = np.concatenate([dead, np.zeros((1,) + dead.shape[1:])])
    return level, jnp.asarray(dead, dtype)


def _setup(
    plan: FlatPlan,
    inputs: FlatInputs,
    dtype,
    free: Sequence[FreeSlices | None] | None = None,
) -> _Setup:
    """Unary terms shifted by each variable's max and pair tables brought near 0
    per instance, the shifts carried into log Z's offset.

    A loopy sweep reads each table a hundred times and mixes raw messages under
    damping (:func:`_loopy_messages`): its tables are shifted by their max. A
    tree or junction tree reduces a table once or twice, each time through
    ``reduce_t``, which shifts by its own max, and shifts every message it makes:
    its tables are shifted by their first entry (:func:`_level`), which costs no
    pass over the largest arrays (a max did: a tenth to a quarter of the RM's
    and the DRM's runs); a junction tree's tables are left as they are, because
    :func:`_cluster_potentials` levels each cluster, tables and unary terms
    together.
    """
    kmax = plan.kmax
    valid = np.arange(kmax)[None, :] < plan.cards[:, None]
    u = jnp.where(valid, inputs.unary.astype(dtype), -jnp.inf)
    u, off_u = _shift(u, (1,))
    u = jnp.concatenate([u, jnp.zeros((1, kmax), dtype)])
    offset = inputs.constant.astype(dtype) + jnp.sum(off_u)
    pair_tables, raw, splits = [], [], []
    if free is None or plan.kind != "tree":
        free = (None,) * len(inputs.tables)
    for t0, cards, fs in zip(inputs.tables, plan.pair_cards, free, strict=True):
        t = t0.astype(dtype)
        raw.append(t)
        split = None
        if fs is not None:
            # Leveled by a known entry: the free slices stay evidence-free.
            level, dead = _free_level(fs, dtype)
            t = t - jnp.asarray(level, dtype).reshape((-1,) + (1,) * len(cards))
            offset = offset + jnp.asarray(np.sum(level), dtype)
            split = (fs, dead)
        elif plan.kind != "exact":  # a junction tree levels its clusters instead
            axes = tuple(range(1, len(cards) + 1))
            t, off = (_shift if plan.kind == "loopy" else _level)(t, axes)
            offset = offset + jnp.sum(off)
        splits.append(split)
        pair_tables.append(jnp.concatenate([t, jnp.zeros((1,) + t.shape[1:], dtype)]))
    return _Setup(
        u,
        tuple(pair_tables),
        offset,
        tuple(raw) if plan.kind == "exact" else (),
        tuple(splits),
    )


# --------------------------------------------------------------------------- #
# Tree: two passes, depth by depth.
# --------------------------------------------------------------------------- #


class _TreeState(NamedTuple):
    b: Array  # belief accumulator (see _empty)
    v: tuple[Array, ...]  # per pair group (n_k + 1, arity, kmax): var->factor
    m: tuple[Array, ...]  # per pair group (n_k + 1, arity, kmax): factor->var
    log_z: Array


def _class_message(plan: FlatPlan, s: _Setup, k: int, inst, table, v_in, j: int, t):
    """:func:`_factor_message` from instances ``inst`` of pair class ``k`` to
    slot ``j``; :func:`_split_message` when the class has free slices."""
    cards, kmax = plan.pair_cards[k], plan.kmax
    split = s.free[k] if s.free else None
    if split is None:
        return _factor_message(table, v_in, cards, j, t, kmax)
    return _split_message(table, split[1][inst], v_in, cards, j, t, kmax, split[0])


def _up_step(plan: FlatPlan, s: _Setup, t, state: _TreeState, step) -> _TreeState:
    """Factors at one depth send to their parents (children already sent)."""
    b, v, m, log_z = state
    v, m = list(v), list(m)
    sends = []
    for (k, p), inst in step:
        cards = plan.pair_cards[k]
        ids = _rows(plan.pair_scope[k], inst)
        for j in range(len(cards)):
            if j != p:
                up = s.unary[ids[:, j]] + _total(b, ids[:, j])
                v[k] = v[k].at[inst, j].set(up)
        msg, off = _class_message(plan, s, k, inst, s.tables[k][inst], v[k][inst], p, t)
        real = jnp.asarray(inst) < plan.pair_scope[k].shape[0] - 1
        log_z = log_z + jnp.sum(jnp.where(real, off, 0.0))
        m[k] = m[k].at[inst, p].set(msg)
        sends.append((ids[:, p], msg))
    for ids, msg in sends:
        b = _scatter(b, ids, msg)
    return _TreeState(b, tuple(v), tuple(m), log_z)


def _down_step(plan: FlatPlan, s: _Setup, t, state: _TreeState, step) -> _TreeState:
    """Factors at one depth get their parent's message and send to children."""
    b, v, m, log_z = state
    sends = []
    for (k, p), inst in step:
        cards = plan.pair_cards[k]
        ids = _rows(plan.pair_scope[k], inst)
        if isinstance(ids, np.ndarray) and (_pair_degree(plan)[ids[:, p]] == 1).all():
            # The parent's only pair factor is this one: its downward message is
            # the parent's unary term, exactly (no other message to leave in),
            # and stays free of the evidence when that term is.
            down = s.unary[ids[:, p]]
        else:
            down = s.unary[ids[:, p]] + _leave_one_out(b, ids[:, p], m[k][inst, p])
        # The upward pass's var->factor messages with the parent slot replaced
        # (a select, not a write: nothing reads v or m after the downward pass).
        v_up = v[k][inst]
        is_p = (np.arange(len(cards)) == p)[None, :, None]
        v_in = jnp.where(is_p, down[:, None, :], v_up)
        table = s.tables[k][inst]
        for j in range(len(cards)):
            if j != p:
                msg, _ = _class_message(plan, s, k, inst, table, v_in, j, t)
                sends.append((ids[:, j], msg))
    for ids, msg in sends:
        b = _scatter(b, ids, msg)
    return _TreeState(b, v, m, log_z)


def _pair_degree(plan: FlatPlan) -> np.ndarray:
    """``(n_vars + 1,)`` how many pair-factor slots hold each variable."""
    got = _DEGREES.get(plan)
    if got is None:
        ids = [sc[:-1].reshape(-1) for sc in plan.pair_scope]  # less the sink row
        flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        got = np.bincount(flat_ids, minlength=plan.n_vars + 1)
        _DEGREES[plan] = got
    return got


_DEGREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run_steps(plan: FlatPlan, fn, state, reverse: bool):
    """Apply ``fn(state, step)`` over the steps, unrolled or inside ``lax.scan``."""
    if plan.padded is None:
        steps = reversed(plan.steps) if reverse else plan.steps
        for step in steps:
            state = fn(state, step)
        return state
    slots = plan.slots
    xs = {kp: plan.padded[kp] for kp in slots}

    def body(carry, x):
        step = tuple((kp, x[kp]) for kp in slots)
        return fn(carry, step), None

    state, _ = jax.lax.scan(body, state, xs, reverse=reverse)
    return state


def _tree_up(plan: FlatPlan, s: _Setup, t, dtype) -> _TreeState:
    n, kmax = plan.n_vars, plan.kmax
    zeros = tuple(
        jnp.zeros((sc.shape[0], sc.shape[1], kmax), dtype) for sc in plan.pair_scope
    )
    state = _TreeState(
        _empty(n, kmax, dtype),
        zeros,
        zeros,
        s.offset,
    )
    return _run_steps(
        plan, lambda st, step: _up_step(plan, s, t, st, step), state, reverse=True
    )


def _backtrack(plan: FlatPlan, s: _Setup, up: _TreeState) -> Array:
    """Joint MAP by coarse-to-fine backtracking over the rooted tree (max-sum)."""
    n = plan.n_vars
    roots = plan.roots
    x = jnp.zeros((n + 1,), jnp.int32)
    root_b = s.unary[roots] + _total(up.b, roots)
    x = x.at[roots].set(_argmax_last(root_b))

    def step_fn(x, step):
        for (k, p), inst in step:
            cards = plan.pair_cards[k]
            ids = _rows(plan.pair_scope[k], inst)
            scores = _joint(s.tables[k][inst], up.v[k][inst], cards, p)
            xp = x[ids[:, p]]
            # Fix the parent slot at its assigned state.
            idx = jnp.reshape(xp, (-1,) + (1,) * len(cards))
            scores = jnp.take_along_axis(scores, idx, axis=p + 1)
            scores = jnp.squeeze(scores, axis=p + 1)
            rest = [c for i, c in enumerate(cards) if i != p]
            flat = _argmax_last(jnp.reshape(scores, (scores.shape[0], -1)))
            states = jnp.unravel_index(flat, tuple(rest))
            others = [i for i in range(len(cards)) if i != p]
            for i, st in zip(others, states, strict=True):
                x = x.at[ids[:, i]].set(st.astype(jnp.int32))
        return x

    return _run_steps(plan, step_fn, x, reverse=False)[:n]


def _marginals(u: Array, b: Array, n: int, t) -> Array:
    belief = u[:n] + _total(b, slice(0, n))
    shifted, _ = _shift(belief, (1,))
    norm = _reduce(shifted, (1,), t)
    return shifted - jnp.where(jnp.isfinite(norm), norm, 0.0)[:, None]


def _run_tree(
    plan: FlatPlan, s: _Setup, t, want_map: bool, dtype, at_roots: bool
) -> FlatResult:
    n = plan.n_vars
    up = _tree_up(plan, s, t, dtype)
    roots = plan.roots
    root_b = s.unary[roots] + _total(up.b, roots)
    log_z = up.log_z + jnp.sum(_reduce(root_b, (1,), t))
    if at_roots:  # the asked-for variables are roots: no downward pass
        margs = _marginals(s.unary, up.b, n, t)
    else:
        down = _run_steps(
            plan, lambda st, step: _down_step(plan, s, t, st, step), up, reverse=False
        )
        margs = _marginals(s.unary, down.b, n, t)
    if want_map:
        max_up = up if t is None else _tree_up(plan, s, None, dtype)
        map_index = _backtrack(plan, s, max_up)
    else:
        map_index = jnp.full((n,), -1, jnp.int32)
    return FlatResult(log_z, margs, map_index, jnp.zeros((0,), dtype))


# --------------------------------------------------------------------------- #
# Exact: a junction tree, two passes depth by depth.
# --------------------------------------------------------------------------- #


def _all_rows(rows: np.ndarray, n: int) -> bool:
    return len(rows) == n and np.array_equal(rows, np.arange(n))


def _inverse(rows: np.ndarray, n: int) -> np.ndarray:
    """For each of ``n`` rows, its position in the distinct ``rows`` (``len(rows)``
    where absent: the padding row of a gather)."""
    inv = np.full(n, len(rows), np.int32)
    inv[rows] = np.arange(len(rows), dtype=np.int32)
    return inv


def _run_of(rows: np.ndarray) -> tuple[int, int] | None:
    """``(start, stride)`` when the static ``rows`` are an increasing arithmetic
    run (a slice), else None."""
    if len(rows) == 0:
        return None
    if len(rows) == 1:
        return int(rows[0]), 1
    d = np.diff(rows)
    return (int(rows[0]), int(d[0])) if d[0] > 0 and np.all(d == d[0]) else None


def _transposed_rows(rows: np.ndarray) -> tuple[int, int] | None:
    """``(a, b)`` when the static ``rows`` are ``0..n-1`` (``n = len(rows)``)
    read as an ``(a, b)`` grid column by column
    (``arange(n).reshape(a, b).T.ravel()``), else None."""
    n = len(rows)
    if n < 4 or rows[0] != 0:
        return None
    b = int(rows[1])  # the stride down a column
    if b < 2 or n % b or n == b:
        return None
    a = n // b
    expect = np.arange(n).reshape(a, b).T.ravel()
    return (a, b) if np.array_equal(rows, expect) else None


def _written_out(x: Array, token: Array) -> Array:
    """``x``, computed once and written out, for a consumer that reads each
    entry many times. XLA's CPU fusion recomputes an elementwise producer
    inside every consumer (and ``optimization_barrier`` does not stop it), but
    it does not fuse across a conditional: ``x`` passes through one whose two
    branches both give ``x``, on ``token == token``, a traced scalar so the
    branch is not folded (its value does not matter). Under ``vmap`` with a
    batched ``token`` the conditional becomes a select: the same value.
    """
    return jax.lax.cond(token == token, lambda y: y, lambda y: y * 1, x)


def _spread(x: Array, rows: np.ndarray) -> Array:
    """``x[rows]`` for static rows that repeat each row of ``x`` in turn
    (``0, 0, 0, 1, 1, 1, ...``): a broadcast, else :func:`_take`."""
    n = len(rows)
    r = n // x.shape[0]
    if r * x.shape[0] == n and np.array_equal(
        rows, np.repeat(np.arange(x.shape[0]), r)
    ):
        y = jnp.broadcast_to(x[:, None], (x.shape[0], r) + x.shape[1:])
        return jnp.reshape(y, (n,) + x.shape[1:])
    return _take(x, rows)


def _take(x: Array, rows: np.ndarray) -> Array:
    """``x[rows]`` for static rows: ``x`` itself when they are all rows in order, a
    strided slice when they are a run (fused into its consumers, where a gather
    is written out), a reshape and transpose when they are a grid's rows read
    column by column (plate instances hosted window by window, as a DRM's
    patches are), else a gather."""
    if _all_rows(rows, x.shape[0]):
        return x
    run = _run_of(rows)
    if run is not None:
        start, stride = run
        stop = start + stride * (len(rows) - 1) + 1
        return jax.lax.slice_in_dim(x, start, stop, stride)
    grid = _transposed_rows(rows)
    if grid is not None:
        a, b = grid
        y = jax.lax.slice_in_dim(x, 0, a * b) if a * b < x.shape[0] else x
        y = jnp.swapaxes(jnp.reshape(y, (a, b) + x.shape[1:]), 0, 1)
        return jnp.reshape(y, (a * b,) + x.shape[1:])
    return x[rows]


def _add_rows(acc: Array, rows: np.ndarray, x: Array) -> Array:
    """``acc.at[rows].add(x)`` for static rows (``x`` broadcast over ``acc``'s
    trailing axes), without XLA's scatter where the rows allow (CPU scatters run
    one row at a time): all rows in order is an add; distinct rows are placed
    by :func:`_placed` (a pad for a run, else a gather); sorted rows hit equally
    often a reshape-sum."""
    n, m = acc.shape[0], len(rows)
    if m == 0:
        return acc
    if _all_rows(rows, n):
        return acc + x
    uniq, counts = np.unique(rows, return_counts=True)
    sorted_rows = bool(np.all(np.diff(rows) >= 0))
    if len(uniq) < m and sorted_rows and np.all(counts == counts[0]):
        x = jnp.broadcast_to(x, (m,) + x.shape[1:])
        x = jnp.sum(jnp.reshape(x, (len(uniq), int(counts[0])) + x.shape[1:]), axis=1)
        rows, m = uniq, len(uniq)
    if len(np.unique(rows)) == m:
        return acc + _placed(x, rows, n)
    return acc.at[rows].add(x)


def _placed(x: Array, rows: np.ndarray, n: int) -> Array:
    """``(n, ...)`` zeros with ``x``'s rows at the distinct static ``rows``: an
    (interior) pad when the rows are a run, elementwise and fused into the
    consumers; else a gather from ``x`` padded with a zero row (which XLA
    writes out, in a transposed layout under vmap)."""
    run = _run_of(rows)
    if run is not None:
        start, stride = run
        last = start + stride * (len(rows) - 1)
        config = [(start, n - 1 - last, stride - 1)] + [(0, 0, 0)] * (x.ndim - 1)
        return jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    pad = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
    return pad[_inverse(rows, n)]


def _set_rows(acc: Array, rows: np.ndarray, x: Array) -> Array:
    """``acc.at[rows].set(x)`` for distinct static rows (:func:`_placed`)."""
    n, m = acc.shape[0], len(rows)
    x = jnp.broadcast_to(x, (m,) + acc.shape[1:]).astype(acc.dtype)
    if _all_rows(rows, n):
        return x
    hit = np.zeros(n, bool)
    hit[rows] = True
    return jnp.where(
        jnp.reshape(hit, (n,) + (1,) * (acc.ndim - 1)), _placed(x, rows, n), acc
    )


def _rows_of_pieces(acc: Array, pieces: list[tuple[np.ndarray, Array]]) -> Array:
    """``acc`` with each piece ``(rows, x)`` set at its static ``rows`` (``x``
    ``(len(rows), *acc.shape[1:])`` or broadcast to it), as a chain of
    :func:`_set_rows` in the pieces' order gives it. When every piece's rows
    are a run ``a, a+1, ...`` in some order (a permuted run is put in order by
    :func:`_take`: a slice or a transpose for a grid) and no two pieces
    overlap, the result is ONE concatenate of the pieces in row order, with
    ``acc``'s rows in the gaps. A chain of placements was a gather each, fused
    in a batch-second layout under vmap that reading the sites back out then
    transposed (a DRM's every marginal and MAP, batch 64, 8x8-32x32: the
    program 5-7% faster; in-process A/B with an A/A control, 2026-12-05)."""
    runs: list | None = []
    for rows, x in pieces:
        rows = np.asarray(rows)
        if len(rows) == 0:
            continue
        order = np.argsort(rows, kind="stable")
        lo = int(rows[order[0]])
        if not np.array_equal(rows[order], np.arange(lo, lo + len(rows))):
            runs = None
            break
        x = jnp.broadcast_to(x, (len(rows),) + acc.shape[1:]).astype(acc.dtype)
        if not np.array_equal(order, np.arange(len(rows))):  # a permuted run
            x = _take(x, order)
        runs.append((lo, len(rows), x))
    if runs is not None:
        runs.sort(key=lambda r: r[0])
        starts = [r[0] for r in runs]
        ends = [r[0] + r[1] for r in runs]
        if all(ends[i] <= starts[i + 1] for i in range(len(runs) - 1)):
            parts, at = [], 0
            for start, size, x in runs:
                if start > at:
                    parts.append(jax.lax.slice_in_dim(acc, at, start))
                parts.append(x)
                at = start + size
            if at < acc.shape[0]:
                parts.append(jax.lax.slice_in_dim(acc, at, acc.shape[0]))
            return jnp.concatenate(parts, axis=0) if parts else acc
    for rows, x in pieces:
        acc = _set_rows(acc, rows, x)
    return acc


#: Off: junction trees ignore ``table_keys`` (an A/B switch for benchmarks and
#: the naive twin of the keyed leaves in tests; the results are the same).
KEYED_LEAVES = True
#: A leaf cluster's message is computed from keyed tables (:func:`_keyed_plan`)
#: when its distinct separator blocks are at most this fraction of its
#: separator's states.
KEYED_FRACTION = 0.5


#: Leaf clusters of fewer states are reduced whole (no keys read for them).
KEYED_MIN_STATES = 32
#: Up to this many blocks per leaf, a keyed message picks each separator
#: state's value by selects (elementwise); past it, by a gather.
KEYED_SELECTS = 8


class _KeyedEdge(NamedTuple):
    """Static data of one batch of leaf clusters' keyed messages.

    A leaf cluster ``C = S + E`` (separator ``S``, the rest ``E``) sends
    ``m(s) = reduce_T over e of psi(s, e)``. Its potential is a sum of unary
    terms, each on one axis, and of pair tables whose entries are equal wherever
    their equality keys are (:func:`pgm_drm.graph.keys.equality_keys`). Two
    separator states whose blocks ``psi(s, .)`` have the same keys, table by
    table, have the same block but for the unary terms on ``S`` axes, which are
    constant over ``E``: so ``m(s) = U_S(s) + R[key(s)]`` with ``R[k]`` reduced
    over ``E`` once per distinct block ``k``.

    Attributes:
        s_shape, e_shape: The separator's and the rest's cardinalities (cluster
            order).
        sep_key: ``(n_e, |S|)`` each separator state's block.
        gathers: ``(pair class, index, has)``: flat indices ``(n_e, nk,
            *e_shape)`` into that class's tables, one per table slot, and
            ``(n_e,)`` whether each cluster has a table in that slot (``None``:
            all have); ``R`` is their sum plus the ``E`` terms.
        unary_e, unary_s: ``(position, var_ids)``: the unary term of variable
            ``var_ids[i]`` (``n_vars``, the zero row, where none is homed) on
            axis ``position`` of ``E`` or of ``S``.
    """

    s_shape: tuple[int, ...]
    e_shape: tuple[int, ...]
    sep_key: np.ndarray
    gathers: tuple[tuple[int, np.ndarray, np.ndarray | None], ...]
    unary_e: tuple[tuple[int, np.ndarray], ...]
    unary_s: tuple[tuple[int, np.ndarray], ...]


class _Keyed(NamedTuple):
    plan: FlatPlan  # the junction tree with keyed leaves in classes of their own
    edges: dict  # (depth, edge index) of ``plan.junction.steps`` -> _KeyedEdge
    classes: frozenset  # the keyed leaves' classes


def _row_tables(jt) -> dict:
    """``(class, row) -> [(pair class, instance, perm, move shape)]``."""
    out: dict = {}
    for k, c, perm, shape, inst, rows in jt.moves:
        for i, r in zip(inst, rows, strict=True):
            out.setdefault((k, int(r)), []).append((c, int(i), perm, shape))
    return out


def _blocks(plan, jt, tabs, k: int, row: int, cs, table_keys):
    """One leaf cluster's separator blocks: ``(key of each separator state,
    representative state of each key, [(pair class, instance, index (|S|, |E|))])``."""
    shape = jt.shapes[k]
    rest = tuple(a for a in range(len(shape)) if a not in cs)
    n_s = int(np.prod([shape[a] for a in cs], dtype=np.int64))
    found = []
    for c, inst, perm, mshape in tabs.get((k, row), ()):
        cards = plan.pair_cards[c]
        idx = np.transpose(np.arange(int(np.prod(cards))).reshape(cards), perm)
        idx = np.broadcast_to(idx.reshape(mshape), shape)
        found.append((c, inst, np.transpose(idx, cs + rest).reshape(n_s, -1)))
    if not found:
        return np.zeros(n_s, np.int64), np.zeros(1, np.int64), found
    blocks = np.concatenate(
        [np.asarray(table_keys[c][i]).reshape(-1)[ix] for c, i, ix in found], axis=1
    )
    _, reps, key = np.unique(blocks, axis=0, return_index=True, return_inverse=True)
    return key.reshape(-1), reps, found


def _keyed_edge(plan, jt, tabs, e, table_keys) -> _KeyedEdge:
    """:class:`_KeyedEdge` of the edge batch ``e`` (every child a leaf)."""
    k, cs = e.child, e.child_sep
    shape = jt.shapes[k]
    rest = tuple(a for a in range(len(shape)) if a not in cs)
    got = [_blocks(plan, jt, tabs, k, int(r), cs, table_keys) for r in e.child_rows]
    nk = max(len(reps) for _, reps, _ in got)
    e_shape = tuple(shape[a] for a in rest)
    n_e = len(e.child_rows)
    slots: dict = {}  # (pair class, q) -> index (n_e, nk, |E|)
    for i, (_, reps, found) in enumerate(got):
        reps = np.concatenate([reps, np.full(nk - len(reps), reps[0])])
        seen: dict = {}
        for c, inst, ix in found:
            q = seen.get(c, 0)
            seen[c] = q + 1
            size = int(np.prod(plan.pair_cards[c]))
            if (c, q) not in slots:
                slots[(c, q)] = (
                    np.zeros((n_e, nk, ix.shape[1]), np.int64),
                    np.zeros(n_e, bool),
                )
            slots[(c, q)][0][i] = inst * size + ix[reps]
            slots[(c, q)][1][i] = True
    gathers = []
    for (c, _), (idx, has) in slots.items():
        dt = np.int32 if idx.max(initial=0) < np.iinfo(np.int32).max else np.int64
        idx = idx.reshape((n_e, nk) + e_shape).astype(dt)
        gathers.append((c, idx, None if has.all() else has))
    at = {int(r): i for i, r in enumerate(e.child_rows)}
    unary_e, unary_s = {}, {}
    for kk, axis, var_ids, rows, _ in jt.home:
        if kk != k:
            continue
        side, pos = (
            (unary_s, cs.index(axis)) if axis in cs else (unary_e, rest.index(axis))
        )
        for v, r in zip(var_ids, rows, strict=True):
            if int(r) in at:
                side.setdefault(pos, np.full(n_e, plan.n_vars, np.int32))[
                    at[int(r)]
                ] = v
    return _KeyedEdge(
        s_shape=tuple(shape[a] for a in cs),
        e_shape=e_shape,
        sep_key=np.stack([key for key, _, _ in got]).astype(np.int32),
        gathers=tuple(gathers),
        unary_e=tuple(sorted(unary_e.items())),
        unary_s=tuple(sorted(unary_s.items())),
    )


def _keyed_candidates(jt) -> list:
    """The edge batches whose children may be keyed leaves: clusters of at least
    :data:`KEYED_MIN_STATES` states with a separator of at least 2 states and
    other axes (smaller ones are reduced whole for less than keys cost)."""
    out = []
    for step in jt.steps:
        for e in step:
            shape = jt.shapes[e.child]
            n_s = int(np.prod([shape[a] for a in e.child_sep], dtype=np.int64))
            if n_s >= 2 and len(e.child_sep) < len(shape):
                if int(np.prod(shape, dtype=np.int64)) >= KEYED_MIN_STATES:
                    out.append(e)
    return out


#: The last keyed plan made for each plan: ``(table_keys, result)``. ``infer``
#: asks for it twice per program (to choose the template match, then to run),
#: with the same keys object.
_KEYED_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _keyed_plan(plan: FlatPlan, table_keys: Sequence[np.ndarray]) -> _Keyed | None:
    """The leaf clusters whose messages keyed tables make cheaper (see
    :class:`_KeyedEdge`), moved to classes of their own; ``None`` when none.

    ``table_keys``: per pair class, ``(n_c, *cards)`` equality keys of its tables.
    """
    got = _KEYED_PLANS.get(plan)
    if got is None or got[0] is not table_keys:
        got = (table_keys, _make_keyed_plan(plan, table_keys))
        _KEYED_PLANS[plan] = got
    return got[1]


def _make_keyed_plan(plan: FlatPlan, table_keys) -> _Keyed | None:
    """:func:`_keyed_plan`, made."""
    jt = plan.junction
    parents = {
        (e.parent, int(r)) for step in jt.steps for e in step for r in e.parent_rows
    }
    tabs = _row_tables(jt)
    moving: dict[int, list] = {}
    for e in _keyed_candidates(jt):
        leaves = [int(r) for r in e.child_rows if (e.child, int(r)) not in parents]
        shape = jt.shapes[e.child]
        n_s = int(np.prod([shape[a] for a in e.child_sep], dtype=np.int64))
        # Stop at the first leaf with too many blocks: a model whose leaves do
        # not compress pays for one leaf's look, not for every leaf's.
        if leaves and all(
            len(_blocks(plan, jt, tabs, e.child, r, e.child_sep, table_keys)[1])
            <= KEYED_FRACTION * n_s
            for r in leaves
        ):
            moving.setdefault(e.child, []).extend(leaves)
    if not moving:
        return None
    jt2, new_class = split_classes(jt, {k: np.asarray(r) for k, r in moving.items()})
    keyed_classes = frozenset(new_class.values())
    tabs2 = _row_tables(jt2)
    edges = {
        (d, i): _keyed_edge(plan, jt2, tabs2, e, table_keys)
        for d, step in enumerate(jt2.steps)
        for i, e in enumerate(step)
        if e.child in keyed_classes
    }
    return _Keyed(dataclasses.replace(plan, junction=jt2), edges, keyed_classes)


def _unary_on(s: _Setup, terms, shape: tuple[int, ...], n: int) -> Array:
    """``(n, *shape)``: the sum of the unary ``terms`` ``(position, var_ids)``,
    each on its axis of ``shape``."""
    acc = jnp.zeros((n,) + (1,) * len(shape), s.unary.dtype)
    for pos, var_ids in terms:
        card = shape[pos]
        out = [n] + [1] * len(shape)
        out[pos + 1] = card
        acc = acc + jnp.reshape(s.unary[var_ids, :card], out)
    return acc


def _keyed_message(s: _Setup, ke: _KeyedEdge, t) -> tuple[Array, Array, Array, Array]:
    """A batch of leaf messages from keyed tables, shifted as
    :func:`_shift_message` shifts a message: ``(m (n_e, *S), shift (n_e,), R
    (n_e, nk, *E), red (n_e, nk))`` (:class:`_KeyedEdge`), with ``red`` each
    block's reduction less the shift: ``m(s) = U_S(s) + red[key(s)]``.

    The shift is the max over the blocks, not over the message: every block is
    some separator state's, so it is the message's max but for the unary terms
    on ``S`` (each already shifted to a max of 0). Taken from the blocks, it
    leaves the message to be computed where it is used: the selects fuse into
    the parent's sums, where a max over the message wrote it out first."""
    n_e, nk = ke.sep_key.shape[0], 1
    r = None
    for c, idx, has in ke.gathers:
        nk = idx.shape[1]
        g = jnp.reshape(s.raw[c], (-1,)).at[idx].get(mode="promise_in_bounds")
        if has is not None:  # clusters without a table in this slot
            g = jnp.where(np.reshape(has, (n_e,) + (1,) * (g.ndim - 1)), g, 0.0)
        r = g if r is None else r + g
    u_e = _unary_on(s, ke.unary_e, ke.e_shape, n_e)[:, None]  # (n_e, 1, *E)
    r = jnp.broadcast_to(u_e if r is None else r + u_e, (n_e, nk) + ke.e_shape)
    red, shift = _shift(_reduce(r, tuple(range(2, r.ndim)), t), (1,))
    if nk <= KEYED_SELECTS:
        # Each separator state picks its block's value by a chain of selects:
        # elementwise, fused into the message's consumers. A gather under vmap
        # came out batch-minor, and its transpose back cost as much again.
        m = jnp.broadcast_to(red[:, :1], (n_e, ke.sep_key.shape[1]))
        for k in range(1, nk):
            m = jnp.where(ke.sep_key == k, red[:, k : k + 1], m)
    else:  # one gather of whole entries by flat index
        at = ke.sep_key + nk * np.arange(n_e, dtype=np.int32)[:, None]
        m = jnp.reshape(red, (-1,)).at[at].get(mode="promise_in_bounds")
    m = jnp.reshape(m, (n_e,) + ke.s_shape)
    return m + _unary_on(s, ke.unary_s, ke.s_shape, n_e), shift, r, red


def _cluster_potentials(
    plan: FlatPlan, s: _Setup, dtype, skip: frozenset = frozenset()
) -> tuple[list, Array]:
    """Per cluster class ``(n_k, *shape)``: the unary terms and pair tables
    assigned to each cluster, each brought near 0 by :func:`_level` (the levels
    go into log Z's offset). Classes in ``skip`` (keyed leaves, whose messages
    read the tables themselves) get an unused ``(n_k, 1, ..., 1)`` of zeros."""
    jt = plan.junction
    psi = [
        jnp.zeros((n,) + sh, dtype) for n, sh in zip(jt.sizes, jt.shapes, strict=True)
    ]
    for k, axis, var_ids, rows, _ in jt.home:
        if k in skip:
            continue
        card = jt.shapes[k][axis]
        shape = [len(rows)] + [1] * len(jt.shapes[k])
        shape[axis + 1] = card
        psi[k] = _add_rows(psi[k], rows, jnp.reshape(s.unary[var_ids, :card], shape))
    for k, c, perm, shape, inst, rows in jt.moves:
        if k in skip:
            continue
        t = jnp.transpose(_take(s.tables[c], inst), (0,) + tuple(p + 1 for p in perm))
        psi[k] = _add_rows(psi[k], rows, jnp.reshape(t, (len(rows),) + shape))
    offset = s.offset
    out = []
    for k, p in enumerate(psi):
        if k in skip:
            out.append(jnp.zeros((p.shape[0],) + (1,) * (p.ndim - 1), dtype))
            continue
        p, off = _level(p, tuple(range(1, p.ndim)))
        offset = offset + jnp.sum(off)
        if p.size:
            # Written out, so that its readers (the upward and downward steps,
            # the beliefs) do not each compute it again. Its own entry is the
            # token: a potential free of the evidence (a DRM's upper levels) is
            # then computed once for the whole batch, not once per image (the
            # DRM's every max-marginal, batch 64: 5% faster; in-process A/B with
            # an A/A control, 2026-12-05); under vmap an evidence-dependent one
            # gets a batched token, and the select it becomes is the same value.
            p = _written_out(p, jnp.reshape(p, (-1,))[0])
        out.append(p)
    return out, offset


def _expand(msg: Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> Array:
    """``(n, *separator)`` -> ``(n, *shape)`` with 1 off the separator ``axes``."""
    out = [msg.shape[0]] + [1] * len(shape)
    for a in axes:
        out[a + 1] = shape[a]
    return jnp.reshape(msg, out)


def _with_children(psi: Array, fin: Array, cnt: Array) -> Array:
    """A cluster's potential plus its children's messages (-inf counted)."""
    return jnp.where(cnt > 0, -jnp.inf, psi + fin)


def _up_belief(psi: list, fin: list, cnt: list, k: int, rows: np.ndarray) -> Array:
    """:func:`_with_children` of class ``k``'s clusters at ``rows``."""
    return _with_children(_take(psi[k], rows), _take(fin[k], rows), _take(cnt[k], rows))


class _JunctionUp(NamedTuple):
    fin: list  # per class (n_k, *shape): finite part of the children's messages
    cnt: list  # per class: number of -inf children's messages
    msgs: dict  # (depth, edge batch) -> (n_e, *separator) upward message
    log_z: Array
    keyed: dict  # (depth, edge batch) -> keyed leaves' (R (n_e, nk, *E), shift, red)


def _junction_up(
    plan: FlatPlan,
    psi: list,
    t,
    offset: Array,
    s: _Setup | None = None,
    keyed: Mapping | None = None,
    count: bool = True,
) -> _JunctionUp:
    """Upward pass, deepest clusters first: each sends
    ``reduce_T over C \\ S of [psi_C + its children's messages]`` to its parent
    (keyed leaves ``keyed``, :class:`_KeyedEdge`: from the tables in ``s``).

    ``count``: keep the children's ``-inf`` entries apart (``cnt``), as the
    downward pass needs to take one message back out. Without it they are
    summed into ``fin``: no entry is ``+inf``, so ``-inf`` stays ``-inf``, and
    each message is read once, where it is made (a keyed leaf's selects fuse
    into its parent's sum). A keyed leaf's message is summed so either way: it
    is never taken back out (keyed leaves get no downward message), and ``-inf``
    in ``fin`` stays ``-inf`` through :func:`_without` and
    :func:`_with_children`."""
    jt = plan.junction
    fin = [jnp.zeros_like(p) for p in psi]
    cnt = [jnp.zeros_like(p) for p in psi]
    msgs, rs = {}, {}
    log_z = offset
    for d in reversed(range(jt.depth)):
        sends = []
        for e_i, e in enumerate(jt.steps[d]):
            by_key = bool(keyed) and (d, e_i) in keyed
            if by_key:
                m, off, r, red = _keyed_message(s, keyed[(d, e_i)], t)
                rs[(d, e_i)] = (r, off, red)
            else:
                b = _up_belief(psi, fin, cnt, e.child, e.child_rows)
                nd = len(jt.shapes[e.child])
                axes = tuple(a + 1 for a in range(nd) if a not in e.child_sep)
                m = _reduce(b, axes, t)
                m, off = _shift_message(m, tuple(range(1, len(e.child_sep) + 1)))
            log_z = log_z + jnp.sum(off)
            msgs[(d, e_i)] = m
            sends.append((e, m, by_key))
        for e, m, by_key in sends:
            x = _expand(m, jt.shapes[e.parent], e.parent_sep)
            rows = e.parent_rows
            if not count or by_key:
                fin[e.parent] = _add_rows(fin[e.parent], rows, x)
                continue
            neg = jnp.isneginf(x)
            fin[e.parent] = _add_rows(fin[e.parent], rows, jnp.where(neg, 0.0, x))
            cnt[e.parent] = _add_rows(cnt[e.parent], rows, neg.astype(x.dtype))
    for k, rows in jt.roots:
        b = _up_belief(psi, fin, cnt, k, rows)
        log_z = log_z + jnp.sum(_reduce(b, tuple(range(1, b.ndim)), t))
    return _JunctionUp(fin, cnt, msgs, log_z, rs)


def _junction_down(
    plan: FlatPlan, psi: list, up: _JunctionUp, t, keyed: frozenset = frozenset()
) -> list:
    """Downward pass, shallowest first; returns every cluster's full belief.
    The keyed leaves (classes ``keyed``) get no message: their marginals are
    read from their parents' beliefs (:func:`_keyed_marginals`, which needs the
    upward pass's ``-inf`` counted apart), and their entries are ``None``."""
    jt = plan.junction
    # Each cluster gets one message from its parent, on its separator's axes:
    # zeros of shape (n, 1, ..., 1) plus each message placed at its rows, which
    # broadcasts only as far as the separators reach (a DRM's leaf messages stay
    # (n, sep, 1, 1), not written out over the whole cluster).
    down = [jnp.zeros((p.shape[0],) + (1,) * (p.ndim - 1), p.dtype) for p in psi]
    for d in range(jt.depth):
        for e_i, e in enumerate(jt.steps[d]):
            if e.child in keyed:
                continue
            r = e.parent_rows
            own = _expand(up.msgs[(d, e_i)], jt.shapes[e.parent], e.parent_sep)
            # The parent's other children's messages.
            others = _without(
                _take(up.fin[e.parent], r), _take(up.cnt[e.parent], r), own
            )
            x = _take(psi[e.parent], r) + _take(down[e.parent], r) + others
            nd = len(jt.shapes[e.parent])
            axes = tuple(a + 1 for a in range(nd) if a not in e.parent_sep)
            m = _reduce(x, axes, t)
            m, _ = _shift_message(m, tuple(range(1, len(e.parent_sep) + 1)))
            m = _expand(m, jt.shapes[e.child], e.child_sep)
            n_k = down[e.child].shape[0]
            down[e.child] = down[e.child] + _placed(m, e.child_rows, n_k)
    return [
        None if k in keyed else _with_children(p, f, c) + dn
        for k, (p, f, c, dn) in enumerate(zip(psi, up.fin, up.cnt, down, strict=True))
    ]


def _keyed_marginals(
    plan: FlatPlan, keyed: Mapping, up: _JunctionUp, beliefs: list, t, token: Array
) -> dict:
    """Every axis's log (max-)marginal at the keyed leaves, unnormalised and
    near 0: ``(class, axis) -> (n_k, card)``, from their blocks and their
    parents' beliefs, without their own (:class:`_KeyedEdge`).

    A keyed leaf's belief is ``b(s, e) = D(s) + U_S(s) + R[key(s), e]``, with
    ``D`` its parent's message and ``m(s) = U_S(s) + red[key(s)]`` its own
    upward message (``red``: each block's reduction over ``E``). Reduced over
    ``E`` it is ``D + m = B``, the parent's belief reduced to the separator
    (the parent's belief holds ``m`` as it holds each child's message, and
    ``D`` is that belief less ``m``): the separator axes' marginals, with no
    message down to the leaf and no leave-one-out. Over ``S`` it is
    ``Dk[k] + R[k, e]`` reduced over the blocks ``k``, where ``Dk[k]`` reduces
    ``D + U_S = B - red[k]`` over the separator states of block ``k``: the
    other axes' marginals. Where ``red[k]`` is ``-inf`` so is all of
    ``R[k, .]``, and ``Dk[k]`` does not matter (taken with ``red[k] = 0``).
    ``B`` is shifted to a max of 0 and ``R`` taken less the shift of its
    message, so both sit near 0 (a float32 belief at a level of 1e4 reduced
    and shifted after would be rounded at that level). Each marginal is off
    by a constant per leaf, which normalising removes. ``B`` is computed once
    per parent row and written out (:func:`_written_out`, ``token`` a traced
    scalar) before each child reads it: gathered per child it came out with
    the batch axis second (DRM 32x32: ~150 us with the transpose back), and
    broadcast unwritten, XLA computed it again for every child and block.
    """
    jt = plan.junction
    parts: dict = {}
    for (d, e_i), ke in keyed.items():
        e = jt.steps[d][e_i]
        k, r = e.child, e.child_rows
        n_e, n_s = ke.sep_key.shape
        ns, ne = len(ke.s_shape), len(ke.e_shape)
        rows, inv = np.unique(e.parent_rows, return_inverse=True)
        nd = len(jt.shapes[e.parent])
        off_sep = tuple(a + 1 for a in range(nd) if a not in e.parent_sep)
        # Per parent row, near 0: shifted by the belief's max before reduced.
        b_p = _reduce_shifted(_take(beliefs[e.parent], rows), off_sep, t)
        b_p = _written_out(jnp.reshape(b_p, (len(rows),) + ke.s_shape), token)
        b_s = _spread(b_p, inv.reshape(-1))  # (n_e, *S)
        cs = e.child_sep
        rest = tuple(a for a in range(len(jt.shapes[k])) if a not in cs)
        for j, axis in enumerate(cs):
            other = tuple(i + 1 for i in range(ns) if i != j)
            parts.setdefault((k, axis), []).append((_reduce(b_s, other, t), r))
        if not rest:
            continue
        blocks, shift, red = up.keyed[(d, e_i)]
        nk = blocks.shape[1]
        b2 = jnp.reshape(b_s, (n_e, 1, n_s))
        red = jnp.where(jnp.isfinite(red), red, 0.0)[:, :, None]  # (n_e, nk, 1)
        member = ke.sep_key[:, None, :] == np.arange(nk)[None, :, None]
        dk = _reduce(jnp.where(member, b2 - red, -jnp.inf), (2,), t)
        safe = jnp.where(jnp.isfinite(shift), shift, 0.0)
        b_e = (dk - safe[:, None]).reshape((n_e, nk) + (1,) * ne) + blocks
        if len(rest) > 1:
            # Read by one reduction per axis: written out once, not computed
            # again in each (with the blocks' batch-last layout transposed each
            # time). DRM, every marginal, batch 64, 8x8-32x32 (in-process A/B
            # with an A/A control, 2026-12-05): sum-product 13-15% faster,
            # max-sum 2-4% (at the edge of the A/A control's +-3%).
            b_e = _written_out(b_e, token)
        for j, axis in enumerate(rest):
            other = (1,) + tuple(i + 2 for i in range(ne) if i != j)
            parts.setdefault((k, axis), []).append((_reduce(b_e, other, t), r))
    out = {}
    for (k, axis), got in parts.items():
        n = jt.sizes[k]
        acc = None
        for m, r in got:
            placed = _placed(m, r, n)
            acc = placed if acc is None else acc + placed
        out[(k, axis)] = acc
    return out


def _reduce_shifted(x: Array, axes: tuple[int, ...], t) -> Array:
    """``reduce_T(x - M)`` over ``axes``, with ``M`` the max of each row of ``x``
    (every axis but the first): as precise as shifting ``x`` first, without the
    pass over ``x`` that costs. Reducing first and shifting the result after
    would round the reduction at the belief's own level (float32 marginals off
    by ~1e-3 at a level of 1e4); inside, the shift is the max each reduction
    takes anyway, less its row max. ``-inf`` rows stay ``-inf``."""
    rest = tuple(range(1, x.ndim))
    if not axes:
        return _shift(x, rest)[0]
    raw = jnp.max(x, axis=axes, keepdims=True)
    if t is None:  # max of max: one read of x (see _shift_message)
        raw = jax.lax.optimization_barrier(raw)
    big = jax.lax.stop_gradient(jnp.max(raw, axis=rest, keepdims=True))
    big = jnp.where(jnp.isfinite(big), big, 0.0)
    if t is None:
        return jnp.squeeze(raw - big, axis=axes)
    mo = jax.lax.stop_gradient(jnp.where(jnp.isfinite(raw), raw, 0.0))
    total = jnp.sum(jnp.exp((x - mo) * (1.0 / t)), axis=axes)
    return jnp.squeeze(mo - big, axis=axes) + t * safe_log(total)


def _root_homes(plan: FlatPlan) -> tuple:
    """Every variable of a root cluster, as :attr:`JunctionTree.home` entries
    ``(class, axis, var_ids, rows, stride)`` at the roots: after the upward pass
    alone a root's belief is already its exact marginal."""
    jt = plan.junction
    at = {
        (int(k), int(r)): i
        for i, (k, r) in enumerate(zip(jt.classes, jt.rows, strict=True))
    }
    found: dict[tuple[int, int], tuple[list, list]] = {}
    seen: set[int] = set()
    for k, rows in jt.roots:
        for r in rows:
            for axis, v in enumerate(jt.clusters[at[(int(k), int(r))]]):
                if v not in seen:
                    seen.add(v)
                    entry = found.setdefault((int(k), axis), ([], []))
                    entry[0].append(int(v))
                    entry[1].append(int(r))
    return tuple(
        (k, axis, np.asarray(vs, np.int32), np.asarray(rs, np.int32), 0)
        for (k, axis), (vs, rs) in found.items()
    )


def _readable_at_roots(plan: FlatPlan) -> np.ndarray:
    """The variables whose marginals the upward pass alone gives exactly: a
    tree's roots, or every variable of a junction tree's root clusters."""
    if plan.kind == "tree":
        return np.asarray(plan.roots, np.int64)
    if plan.kind == "exact":
        return np.concatenate([h[2] for h in _root_homes(plan)] + [np.zeros(0, int)])
    return np.zeros(0, np.int64)


def _junction_marginals(
    plan: FlatPlan,
    beliefs: list,
    t,
    dtype,
    homes: tuple | None = None,
    keyed: Mapping | None = None,
) -> Array:
    """Every variable's normalised log (max-)marginal, read at its home cluster.

    The variables homed at the same rows of one class share one pass over those
    beliefs: it reduces away every axis none of them sits on, shifted by the
    belief's max (:func:`_reduce_shifted`: a belief may sit far from 0, where
    ``x - logsumexp(x)`` would cancel), then the small result is reduced to
    each variable. ``reduce_T`` over a union of axes is the reduction over each
    in turn. The keyed leaves' marginals come from ``keyed``
    (:func:`_keyed_marginals`).
    """
    jt = plan.junction
    out = jnp.full((plan.n_vars, plan.kmax), -jnp.inf, dtype)
    pieces: list = []
    shared: dict[tuple[int, bytes], list] = {}
    for k, axis, var_ids, rows, _ in jt.home if homes is None else homes:
        if keyed and (k, axis) in keyed:
            m = _take(keyed[(k, axis)], rows)
            norm = _reduce(m, (1,), t)
            m = m - jnp.where(jnp.isfinite(norm), norm, 0.0)[:, None]
            pieces.append((var_ids, _pad(m, plan.kmax, -jnp.inf)))
            continue
        shared.setdefault((k, rows.tobytes()), []).append((axis, var_ids, rows))
    for (k, _), entries in shared.items():
        rows = entries[0][2]
        keep = sorted({axis for axis, _, _ in entries})
        b = _take(beliefs[k], rows)
        other = tuple(a + 1 for a in range(b.ndim - 1) if a not in keep)
        pre = _reduce_shifted(b, other, t)  # (n, *cards at keep), max 0
        for axis, var_ids, _ in entries:
            j = keep.index(axis)
            rest = tuple(a + 1 for a in range(len(keep)) if a != j)
            m = _reduce(pre, rest, t) if rest else pre
            norm = _reduce(m, (1,), t)
            m = m - jnp.where(jnp.isfinite(norm), norm, 0.0)[:, None]
            pieces.append((var_ids, _pad(m, plan.kmax, -jnp.inf)))
    return _rows_of_pieces(out, pieces)


#: From this many states on, :func:`_argmax_last` takes a max and then the first
#: index that hits it (two plain reductions) instead of XLA's variadic
#: (value, index) reduction, which the CPU backend runs unvectorised: 2x faster on
#: (64, 768); on 8 states the variadic one is faster.
ARGMAX_SPLIT = 64


def _argmax_last(x: Array) -> Array:
    """``jnp.argmax(x, axis=-1)``: the first maximum, or the first NaN."""
    k = x.shape[-1]
    if k < ARGMAX_SPLIT:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)  # one dtype both ways
    m = jnp.max(x, axis=-1, keepdims=True)  # NaN where a NaN is
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where((x == m) | jnp.isnan(x), iota, k), axis=-1)


def _junction_map(
    plan: FlatPlan, psi: list, up: _JunctionUp, keyed: Mapping | None = None
) -> Array:
    """Joint MAP: each root's argmax, then each child's argmax with the separator
    fixed by its parent's state (max-sum upward messages ``up``; a keyed leaf's
    from its blocks, the argmax of each block of ``up.keyed``)."""
    jt = plan.junction
    assign = [jnp.zeros((n,), jnp.int32) for n in jt.sizes]
    for k, rows in jt.roots:
        b = _up_belief(psi, up.fin, up.cnt, k, rows)
        flat = _argmax_last(jnp.reshape(b, (len(rows), -1)))
        assign[k] = _set_rows(assign[k], rows, flat)
    for d in range(jt.depth):
        for e_i, e in enumerate(jt.steps[d]):
            sep = jnp.asarray(e.sep_of_parent)[_take(assign[e.parent], e.parent_rows)]
            r = e.child_rows
            if keyed and (d, e_i) in keyed:
                blocks = up.keyed[(d, e_i)][0]
                best = _argmax_last(jnp.reshape(blocks, blocks.shape[:2] + (-1,)))
                key = jnp.take_along_axis(
                    jnp.asarray(keyed[(d, e_i)].sep_key), sep[:, None], axis=1
                )
                rest = jnp.take_along_axis(best, key, axis=1)[:, 0]
                flat = jnp.asarray(e.compose)[sep, rest]
                assign[e.child] = _set_rows(assign[e.child], r, flat)
                continue
            b = _up_belief(psi, up.fin, up.cnt, e.child, r)
            nd = b.ndim - 1
            rest = tuple(a for a in range(nd) if a not in e.child_sep)
            b = jnp.transpose(b, (0,) + tuple(a + 1 for a in e.child_sep + rest))
            b = jnp.reshape(b, (len(r),) + e.compose.shape)
            b = jnp.take_along_axis(b, sep[:, None, None], axis=1)[:, 0]
            flat = jnp.asarray(e.compose)[sep, _argmax_last(b)]
            assign[e.child] = _set_rows(assign[e.child], r, flat)
    pieces = [
        (var_ids, (_take(assign[k], rows) // stride) % jt.shapes[k][axis])
        for k, axis, var_ids, rows, stride in jt.home
    ]
    return _rows_of_pieces(jnp.zeros((plan.n_vars,), jnp.int32), pieces)


#: Junction beliefs of at least this many entries (per evidence set) are
#: written out before the marginals read them (:func:`_run_junction`).
WRITE_OUT_BELIEF = 256


def _run_junction(
    plan: FlatPlan,
    s: _Setup,
    t,
    want_map: bool,
    dtype,
    at_roots: bool,
    keyed: _Keyed | None = None,
) -> FlatResult:
    edges: dict = {}
    skip: frozenset = frozenset()
    if keyed is not None:
        plan, edges, skip = keyed
    psi, offset = _cluster_potentials(plan, s, dtype, skip)
    up = _junction_up(plan, psi, t, offset, s, edges, count=not at_roots)
    if at_roots:  # the asked-for variables sit in root clusters: no downward pass
        beliefs = [
            _with_children(p, f, c) for p, f, c in zip(psi, up.fin, up.cnt, strict=True)
        ]
        margs = _junction_marginals(plan, beliefs, t, dtype, _root_homes(plan))
    else:
        beliefs = _junction_down(plan, psi, up, t, skip)
        # Each belief is read by several reductions (marginals, the keyed
        # leaves' parents): written out once, they do not each add up its
        # potential and messages again (DRM 32x32, every max-marginal: 572 ->
        # 535 us); small ones are not worth the conditional.
        beliefs = [
            _written_out(b, s.unary[0, 0])
            if b is not None and b.size >= WRITE_OUT_BELIEF
            else b
            for b in beliefs
        ]
        by_leaf = (
            _keyed_marginals(plan, edges, up, beliefs, t, s.unary[0, 0])
            if edges
            else None
        )
        margs = _junction_marginals(plan, beliefs, t, dtype, keyed=by_leaf)
    if want_map:
        max_up = (
            up
            if t is None
            else _junction_up(plan, psi, None, offset, s, edges, count=False)
        )
        map_index = _junction_map(plan, psi, max_up, edges)
    else:
        map_index = jnp.full((plan.n_vars,), -1, jnp.int32)
    return FlatResult(up.log_z, margs, map_index, jnp.zeros((0,), dtype))


# --------------------------------------------------------------------------- #
# Loopy: flooding with factor-to-variable messages as the state.
# --------------------------------------------------------------------------- #


def _gather_beliefs(plan: FlatPlan, m: tuple[Array, ...], dtype) -> Array:
    """Every variable's incoming factor messages, summed in one segment sum."""
    n, kmax = plan.n_vars, plan.kmax
    if not plan.pair_scope:
        return _empty(n, kmax, dtype)
    ids = jnp.asarray(np.concatenate([sc[:-1].reshape(-1) for sc in plan.pair_scope]))
    msgs = jnp.concatenate([mk.reshape(-1, kmax) for mk in m])
    return jax.ops.segment_sum(_pack(msgs), ids, num_segments=n + 1)


def _var_to_factor(plan: FlatPlan, s: _Setup, b: Array, m) -> list[Array]:
    """``U_v + sum_{g != f} m_{g->v}`` for every slot of every factor instance."""
    out = []
    for k, sc in enumerate(plan.pair_scope):
        ids = sc[:-1]
        out.append(s.unary[ids] + _leave_one_out(b, ids, m[k]))
    return out


def _loopy_messages(plan: FlatPlan, s: _Setup, t, dtype):
    kmax, d = plan.kmax, plan.damping
    init = tuple(
        jnp.zeros((sc.shape[0] - 1, sc.shape[1], kmax), dtype) for sc in plan.pair_scope
    )
    masks = []
    for cards in plan.pair_cards:
        mk = np.zeros((len(cards), kmax), bool)
        for j, c in enumerate(cards):
            mk[j, :c] = True
        masks.append(mk)

    def sweep(m, _):
        b = _gather_beliefs(plan, m, dtype)
        v = _var_to_factor(plan, s, b, m)
        new, delta = [], jnp.zeros((), dtype)
        for k, cards in enumerate(plan.pair_cards):
            table = s.tables[k][:-1]
            # With damping, one shift after mixing suffices (a per-edge constant).
            cols = [
                _factor_message(table, v[k], cards, j, t, kmax, shift=d == 0)[0]
                for j in range(len(cards))
            ]
            fresh = jnp.stack(cols, axis=1)
            if d > 0:
                fresh = d * m[k] + (1.0 - d) * fresh
                fresh, _ = _shift(fresh, (2,))
            if not masks[k].all():
                fresh = jnp.where(masks[k], fresh, 0.0)
            diff = jnp.where(jnp.isfinite(fresh), jnp.abs(fresh - m[k]), 0.0)
            delta = jnp.maximum(delta, jnp.max(diff, initial=0.0))
            new.append(fresh)
        return tuple(new), delta

    return jax.lax.scan(sweep, init, None, length=plan.max_iters)


def _bethe_log_z(plan: FlatPlan, s: _Setup, m, t) -> Array:
    """Bethe estimate at temperature T: sum of energies plus T times the Bethe
    entropy (unary terms folded into the variables, counted ``1 - degree``)."""
    n = plan.n_vars
    b = _gather_beliefs(plan, m, s.unary.dtype)
    logp = _marginals(s.unary, b, n, t) / t
    p = jnp.exp(logp)
    u = s.unary[:n]
    energy = jnp.sum(jnp.where(p > 0, p * u, 0.0))
    h = jnp.sum(entr(p), axis=1)
    total = s.offset + energy + t * jnp.sum((1.0 - plan.degree) * h)
    v = _var_to_factor(plan, s, b, m)
    for k, cards in enumerate(plan.pair_cards):
        table = s.tables[k][:-1]
        x = _joint(table, v[k], cards, -1)
        axes = tuple(range(1, len(cards) + 1))
        shifted, _ = _shift(x, axes)
        lq = shifted - jnp.expand_dims(_reduce(shifted, axes, t), axes)
        q = jnp.exp(lq / t)
        total = total + jnp.sum(jnp.where(q > 0, q * table, 0.0)) + t * jnp.sum(entr(q))
    return total


def _score(plan: FlatPlan, s: _Setup, x: Array) -> Array:
    n = plan.n_vars
    total = s.offset + jnp.sum(s.unary[jnp.arange(n), x])
    for k, sc in enumerate(plan.pair_scope):
        ids = sc[:-1]
        table = s.tables[k][:-1]
        idx = (jnp.arange(ids.shape[0]),) + tuple(
            x[ids[:, j]] for j in range(ids.shape[1])
        )
        total = total + jnp.sum(table[idx])
    return total


def _run_loopy(plan: FlatPlan, s: _Setup, t, want_map: bool, dtype) -> FlatResult:
    n = plan.n_vars
    m, deltas = _loopy_messages(plan, s, t, dtype)
    margs = _marginals(s.unary, _gather_beliefs(plan, m, dtype), n, t)
    if t is None:
        max_margs = margs
    elif want_map:
        mm, _ = _loopy_messages(plan, s, None, dtype)
        max_margs = _marginals(s.unary, _gather_beliefs(plan, mm, dtype), n, None)
    else:
        max_margs = None
    if max_margs is not None:
        map_index = _argmax_last(max_margs)
    else:
        map_index = jnp.full((n,), -1, jnp.int32)
    if t is None:
        log_z = _score(plan, s, map_index)
    else:
        log_z = _bethe_log_z(plan, s, m, t)
    return FlatResult(log_z, margs, map_index, deltas)


def flat_inputs(plan: FlatPlan, tables: Sequence[Array], groups) -> FlatInputs:
    """All of a plan's inputs from every group's concrete table (outside jit)."""
    dynamic = {k: jnp.asarray(t) for k, t in enumerate(tables) if groups[k].evidence}
    return add_dynamic(plan, static_inputs(plan, tables, groups), dynamic, groups)


def _at_roots(plan: FlatPlan, want: np.ndarray | None) -> bool:
    """Whether the upward pass alone gives the marginals of variables ``want``
    (``None``: every variable)."""
    return want is not None and bool(np.isin(want, _readable_at_roots(plan)).all())


def runs_keyed(plan: FlatPlan) -> bool:
    """Whether :func:`run_flat_plan` may key leaves given ``table_keys``: a
    junction tree with leaf clusters big enough (:data:`KEYED_MIN_STATES`)."""
    return (
        KEYED_LEAVES and plan.kind == "exact" and bool(_keyed_candidates(plan.junction))
    )


def dense_reads_evidence(plan: FlatPlan, table_keys: Sequence[np.ndarray]) -> bool:
    """Whether a cluster that is not a keyed leaf adds an evidence-dependent
    table whole (then a template match restored by selects would be read
    whole, see ``gemm.dedupe_constant_gemms(rows=True)``)."""
    keyed = _keyed_plan(plan, table_keys) if runs_keyed(plan) else None
    jt = plan.junction if keyed is None else keyed.plan.junction
    skip = frozenset() if keyed is None else keyed.classes
    return any(
        k not in skip and plan.n_static[c] < len(plan.pairs[c]) for k, c, *_ in jt.moves
    )


def run_flat_plan(
    plan: FlatPlan,
    inputs: FlatInputs,
    temperature: Array | None,
    want_map: bool = True,
    marginals: bool | Sequence[int] = True,
    table_keys: Sequence[np.ndarray] | None = None,
    free: Sequence[FreeSlices | None] | None = None,
) -> FlatResult:
    """Run a flat plan on one set of inputs (pure; jit/vmap it).

    Max-sum, sum-product or tempered message passing (paper §6.2.1: reductions
    ``T * logsumexp(x / T)``; on a DRM tree each step is Eqs. 12-13).

    Args:
        plan: From :func:`pgm_drm.graph.make_flat_plan`.
        inputs: :class:`FlatInputs` (see :func:`flat_inputs`).
        temperature: ``None`` for max-sum (T=0, exact ``max``), else T > 0 (may be
            a traced scalar).
        want_map: Also decode the joint MAP (tree and junction tree:
            backtracking, with a second max-sum upward pass when T > 0; loopy: a
            max-product run when T > 0).
        marginals: ``True``: every variable's marginal. A sequence of variable
            ids: those rows only, the others ``NaN``; when every one sits in a
            root (a tree's root variable, or any variable of a junction tree's
            root cluster) the upward pass alone gives them, exactly, and the
            downward pass is not run. ``False``: every row ``NaN`` (XLA drops
            the downward pass when its result is not used).
        table_keys: Junction trees: per pair class, ``(n_c, *cards)`` static
            equality keys of its tables (entries with equal keys are equal,
            :func:`pgm_drm.graph.keys.equality_keys`). Leaf clusters then send
            their messages, and give their marginals, from their distinct
            blocks only (:class:`_KeyedEdge`, :func:`_keyed_marginals`): a DRM
            patch reduces 2 blocks of 8 states, not 96 separator states.
        free: Trees: per pair class, ``None`` or the :class:`FreeSlices` of its
            tables (slices no evidence changes, with their values): messages,
            upward and downward, reduce those once, not per evidence instance.

    Returns:
        :class:`FlatResult`. Tree and junction-tree ("exact") plans are exact;
        loopy plans give loopy beliefs.
    """
    dtype = jnp.result_type(inputs.unary, inputs.constant, *inputs.tables)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    s = _setup(plan, inputs, dtype, free)
    t = None if temperature is None else jnp.asarray(temperature, dtype)
    if marginals is True:
        want = None
    else:
        want = np.asarray([] if marginals is False else list(marginals), np.int64)
        if want.size and (want.min() < 0 or want.max() >= plan.n_vars):
            raise ValueError(
                f"marginals: variable ids must be in [0, {plan.n_vars}), got "
                f"{want.min()}..{want.max()}"
            )
    at_roots = _at_roots(plan, want)
    if plan.kind == "tree":
        out = _run_tree(plan, s, t, want_map, dtype, at_roots)
    elif plan.kind == "exact":
        keyed = None
        if table_keys is not None and runs_keyed(plan):
            keyed = _keyed_plan(plan, table_keys)
        out = _run_junction(plan, s, t, want_map, dtype, at_roots, keyed)
    else:
        out = _run_loopy(plan, s, t, want_map, dtype)
    if want is None:
        return out
    keep = np.zeros((plan.n_vars, 1), bool)
    keep[want] = True
    return out._replace(log_marginals=jnp.where(keep, out.log_marginals, jnp.nan))
