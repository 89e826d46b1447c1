"""The naive twin: one traced update per message, for every per-instance schedule.

The flat kernel (:mod:`pgm_drm.inference.flat`) is the fast path for tree,
junction-tree ("exact") and loopy schedules; this kernel stays as its reference
(tests compare them) and runs any explicit :class:`~pgm_drm.graph.Schedule`.

The semiring is the temperature ``T`` of the reduction
``reduce_T(x) = T * logsumexp(x / T)``: ``T = 1`` is sum-product, ``T -> 0`` is
max-sum (``T = 0`` uses ``max`` exactly), anything in between is the paper's soft
inference (§6.2.1). A message from cluster ``i`` to cluster ``j`` is

    m_ij(S_ij) = reduce_T over C_i \\ S_ij of [ psi_i + sum_{k != j} m_ki ]

with ``psi_i`` the sum of the log-tables assigned to ``i`` and ``S_ij`` the
separator. Two-pass schedules (tree, junction tree) run it once per message;
the loopy schedule runs a flooding sweep inside ``lax.scan``.

Everything structural (shapes, axes, neighbours) is fixed in a :class:`Plan`
built once per (graph, schedule) in numpy; the jitted functions only see tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr

from pgm_drm._typing import Array
from pgm_drm.graph.compile import FactorGraph
from pgm_drm.graph.schedule import Schedule
from pgm_drm.semiring import reduce_t

__all__ = [
    "KernelResult",
    "Plan",
    "make_plan",
    "naive_run_plan",
]


@dataclass(frozen=True)
class Plan:
    """Static index data for running a schedule on a compiled graph.

    Attributes:
        shapes: Dense shape of each cluster.
        factor_moves: Per cluster, ``(factor, perm, shape)``: transpose the
            factor table by ``perm`` then reshape to ``shape`` (cluster domain).
        reduce_axes: Per directed message, the source-cluster axes reduced away.
        expand_shape: Per directed message, the message reshaped for the target.
        incoming: Per cluster, the neighbours that send it messages.
        roots: Root clusters (one per connected component; two-pass only).
        children: Per cluster, its children in the rooted tree.
        degree: Per cluster, its number of neighbours.
    """

    schedule: Schedule
    cards: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    factor_moves: tuple[tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...], ...]
    reduce_axes: dict
    expand_shape: dict
    incoming: tuple[tuple[int, ...], ...]
    roots: tuple[int, ...]
    children: tuple[tuple[int, ...], ...]
    degree: tuple[int, ...]


def make_plan(fg: FactorGraph, schedule: Schedule) -> Plan:
    """Precompute the static index data of ``schedule`` on ``fg`` (numpy only)."""
    cards = tuple(v.cardinality for v in fg.variables)
    vindex = fg.variable_index
    clusters = schedule.clusters
    shapes = tuple(tuple(cards[v] for v in c) for c in clusters)
    moves = []
    for c, fids in zip(clusters, schedule.factors, strict=True):
        pos = {v: a for a, v in enumerate(c)}
        cm = []
        for fi in fids:
            scope = [vindex[v] for v in fg.factors[fi].scope]
            perm = tuple(int(p) for p in np.argsort([pos[v] for v in scope]))
            present = set(scope)
            shape = tuple(cards[v] if v in present else 1 for v in c)
            cm.append((fi, perm, shape))
        moves.append(tuple(cm))
    reduce_axes, expand_shape = {}, {}
    neighbours: list[set[int]] = [set() for _ in clusters]
    for i, j in schedule.messages:
        sep = set(schedule.separator(i, j))
        reduce_axes[(i, j)] = tuple(
            a for a, v in enumerate(clusters[i]) if v not in sep
        )
        expand_shape[(i, j)] = tuple(cards[v] if v in sep else 1 for v in clusters[j])
        neighbours[j].add(i)
    for i, j in schedule.edges:
        neighbours[i].add(j)
        neighbours[j].add(i)
    children: list[list[int]] = [[] for _ in clusters]
    for c, p in enumerate(schedule.parent):
        if p >= 0:
            children[p].append(c)
    roots = tuple(c for c in schedule.order if schedule.parent[c] < 0)
    return Plan(
        schedule=schedule,
        cards=cards,
        shapes=shapes,
        factor_moves=tuple(moves),
        reduce_axes=reduce_axes,
        expand_shape=expand_shape,
        incoming=tuple(tuple(sorted(n)) for n in neighbours),
        roots=roots,
        children=tuple(tuple(c) for c in children),
        degree=tuple(len(n) for n in neighbours),
    )


class KernelResult(NamedTuple):
    """Output of one kernel run (one evidence instance; vmap adds a batch axis).

    Attributes:
        log_z: Scalar log partition at the run's temperature (T=0: max log joint).
        log_marginals: Per variable, normalised log (max-)marginal of shape (K,).
        map_index: Per variable, the joint MAP state index (scalar int).
        deltas: Loopy: max message change per iteration, shape (max_iters,);
            two-pass: shape (0,).
    """

    log_z: Array
    log_marginals: tuple[Array, ...]
    map_index: tuple[Array, ...]
    deltas: Array


def _potentials(plan: Plan, tables: tuple[Array, ...], dtype) -> list[Array]:
    pots = []
    for shape, moves in zip(plan.shapes, plan.factor_moves, strict=True):
        p = jnp.zeros(shape, dtype)
        for fi, perm, fshape in moves:
            p = p + jnp.reshape(jnp.transpose(tables[fi], perm), fshape)
        pots.append(p)
    return pots


def _incoming_sum(plan: Plan, pots, msgs, c: int, skip: int | None = None) -> Array:
    x = pots[c]
    for k in plan.incoming[c]:
        if k != skip and (k, c) in msgs:
            x = x + jnp.reshape(msgs[(k, c)], plan.expand_shape[(k, c)])
    return x


def _message(plan: Plan, pots, msgs, i: int, j: int, temperature: float) -> Array:
    """The one message update (module docstring); Eqs. 12-13 on a DRM graph."""
    x = _incoming_sum(plan, pots, msgs, i, skip=j)
    return reduce_t(x, plan.reduce_axes[(i, j)], temperature)


def _two_pass(plan: Plan, pots, temperature: float, upward_only: bool = False):
    sched = plan.schedule
    msgs: dict[tuple[int, int], Array] = {}
    messages = sched.messages[: sched.n_upward] if upward_only else sched.messages
    for i, j in messages:
        msgs[(i, j)] = _message(plan, pots, msgs, i, j, temperature)
    return msgs


def _backtrack(plan: Plan, pots, up_msgs) -> dict[int, Array]:
    """Joint MAP by coarse-to-fine backtracking over the rooted tree (max-sum)."""
    clusters = plan.schedule.clusters
    assign: dict[int, Array] = {}
    for c in plan.schedule.order:
        b = pots[c]
        for k in plan.children[c]:
            b = b + jnp.reshape(up_msgs[(k, c)], plan.expand_shape[(k, c)])
        vars_c = clusters[c]
        fixed = [a for a, v in enumerate(vars_c) if v in assign]
        free = [a for a, v in enumerate(vars_c) if v not in assign]
        if not free:
            continue
        b = jnp.transpose(b, fixed + free)
        b = b[tuple(assign[vars_c[a]] for a in fixed)]
        idx = jnp.unravel_index(jnp.argmax(jnp.reshape(b, (-1,))), b.shape)
        for a, i in zip(free, idx, strict=True):
            assign[vars_c[a]] = i
    return assign


def _score(fg_factors_scopes, tables, assign_by_var, constant) -> Array:
    total = constant
    for t, scope in zip(tables, fg_factors_scopes, strict=True):
        if scope:
            total = total + t[tuple(assign_by_var[v] for v in scope)]
    return total


def _shift(x: Array) -> Array:
    """``x - max(x)`` (unchanged when every entry is -inf): a belief may hold the
    absolute log joint (|x| ~ 1e5 for a bright 64x64 image), where ``x -
    logsumexp(x)`` cancels in float32; after the shift the largest entry is 0."""
    m = jnp.max(x)
    return x - jnp.where(jnp.isfinite(m), m, 0.0)


def _normalise(x: Array, temperature: float) -> Array:
    x = _shift(x)
    return x - reduce_t(x, tuple(range(x.ndim)), temperature)


def _marginals(plan: Plan, beliefs, temperature: float) -> tuple[Array, ...]:
    out = []
    for v, c in enumerate(plan.schedule.home):
        pos = plan.schedule.clusters[c].index(v)
        axes = tuple(a for a in range(len(plan.shapes[c])) if a != pos)
        b = reduce_t(_shift(beliefs[c]), axes, temperature)
        out.append(_normalise(b, temperature))
    return tuple(out)


def _beliefs(plan: Plan, pots, msgs) -> list[Array]:
    return [_incoming_sum(plan, pots, msgs, c) for c in range(len(pots))]


def _loopy(plan: Plan, pots, temperature: float):
    sched = plan.schedule
    d = sched.damping
    init = {
        (i, j): jnp.zeros(
            tuple(plan.cards[v] for v in sched.separator(i, j)), pots[0].dtype
        )
        for i, j in sched.messages
    }

    def sweep(msgs, _):
        new = {}
        delta = jnp.zeros((), pots[0].dtype)
        for i, j in sched.messages:
            m = _message(plan, pots, msgs, i, j, temperature)
            norm = reduce_t(m, tuple(range(m.ndim)), temperature)
            m = m - jnp.where(jnp.isfinite(norm), norm, 0.0)
            if d > 0:
                m = (1.0 - d) * m + d * msgs[(i, j)]
            diff = jnp.where(jnp.isfinite(m), jnp.abs(m - msgs[(i, j)]), 0.0)
            delta = jnp.maximum(delta, jnp.max(diff, initial=0.0))
            new[(i, j)] = m
        return new, delta

    return jax.lax.scan(sweep, init, None, length=sched.max_iters)


def _bethe_log_z(plan: Plan, pots, beliefs, temperature: float, constant) -> Array:
    """Bethe approximation at temperature T: sum_f E_bf[psi_f] + T * H_Bethe."""
    n_vars = len(plan.cards)
    total = constant
    for c, b in enumerate(beliefs):
        p = jnp.exp(_normalise(b, temperature) / temperature)
        h = jnp.sum(entr(p))
        if c < n_vars:  # variable cluster: entropy counted (1 - degree) times
            total = total + temperature * (1 - plan.degree[c]) * h
        else:
            energy = jnp.sum(jnp.where(p > 0, p * pots[c], 0.0))
            total = total + energy + temperature * h
    return total


def naive_run_plan(
    plan: Plan, fg: FactorGraph, tables: tuple[Array, ...], temperature: float
) -> KernelResult:
    """Run a schedule on one set of factor tables (pure; jit/vmap it).

    Args:
        plan: Static plan from :func:`make_plan`.
        fg: The compiled graph (only its static structure is read).
        tables: Factor log-tables, as from ``fg.tables(...)``.
        temperature: 0 (max-sum), 1 (sum-product) or any T > 0.

    Returns:
        :class:`KernelResult`. For two-pass schedules everything is exact; for
        "loopy" the marginals are loopy beliefs, ``log_z`` the Bethe estimate
        (T > 0) or the log joint of the decoded assignment (T = 0), and the MAP the
        argmax of loopy max-product beliefs.
    """
    sched = plan.schedule
    dtype = jnp.result_type(*tables) if tables else jnp.float32
    pots = _potentials(plan, tables, dtype)
    constant = jnp.zeros((), dtype)
    for fi in sched.constant_factors:
        constant = constant + tables[fi]
    vindex = fg.variable_index
    scopes = [tuple(vindex[v] for v in f.scope) for f in fg.factors]

    if sched.is_exact:
        msgs = _two_pass(plan, pots, temperature)
        beliefs = _beliefs(plan, pots, msgs)
        log_z = constant
        for r in plan.roots:
            log_z = log_z + reduce_t(
                beliefs[r], tuple(range(beliefs[r].ndim)), temperature
            )
        up = (
            msgs if temperature == 0.0 else _two_pass(plan, pots, 0.0, upward_only=True)
        )
        assign = _backtrack(plan, pots, up)
        return KernelResult(
            log_z=log_z,
            log_marginals=_marginals(plan, beliefs, temperature),
            map_index=tuple(assign[v] for v in range(len(plan.cards))),
            deltas=jnp.zeros((0,), dtype),
        )

    msgs, deltas = _loopy(plan, pots, temperature)
    beliefs = _beliefs(plan, pots, msgs)
    margs = _marginals(plan, beliefs, temperature)
    if temperature == 0.0:
        max_margs = margs
    else:
        max_msgs, _ = _loopy(plan, pots, 0.0)
        max_margs = _marginals(plan, _beliefs(plan, pots, max_msgs), 0.0)
    map_index = tuple(jnp.argmax(m) for m in max_margs)
    if temperature == 0.0:
        log_z = _score(scopes, tables, map_index, constant)
    else:
        log_z = _bethe_log_z(plan, pots, beliefs, temperature, constant)
    return KernelResult(log_z, margs, map_index, deltas)
