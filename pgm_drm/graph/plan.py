"""Flat plans: a compiled graph's message passing as frozen ``int32`` index arrays.

PGMax's habit (DESIGN §3b): the structure is fixed once in numpy; the JAX kernel
(``pgm_drm.inference.flat``) only gathers, reduces and scatter-adds. Factors stay
in their *site groups* (one table of shape ``(n_instances, *cards)`` per site), so
every message of a group at one tree depth is one batched operation, and the
jitted program does not grow with the number of plate instances.

- Factor groups of arity 0 add to log Z; arity 1 (priors, evidence on one latent)
  fold into the variables' unary terms; arity >= 2 exchange messages.
- ``"tree"``: the bipartite instance graph must be a forest. It is rooted (one
  variable per component, breadth-first); the factor instances at each odd depth
  form one *step*, split by (group, parent slot). The two passes run the steps
  deepest-first, then shallowest-first.
- ``"loopy"``: a flooding schedule over the same groups (all messages each
  iteration), factor-to-variable messages as the state, damping on that direction.

Pure numpy and scipy: nothing here imports JAX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

if TYPE_CHECKING:
    from pgm_drm.graph.compile import FactorGraph

__all__ = ["UNROLL_STEPS", "FlatPlan", "instance_forest", "make_flat_plan"]

#: Tree plans with more steps than this run the steps inside ``lax.scan``
#: (padded index arrays) instead of unrolled; below it every step is exact-sized.
UNROLL_STEPS = 24


@dataclass(frozen=True, eq=False)
class FlatPlan:
    """Frozen index data for the flat kernel (see module docstring).

    Attributes:
        kind: "tree" or "loopy".
        n_vars: Number of variables (flat ids ``0 .. n_vars - 1``).
        kmax: Largest cardinality; per-variable arrays are ``(n_vars + 1, kmax)``
            (the extra row is a sink for padded steps).
        cards: ``(n_vars,)`` cardinality of each variable.
        degree: ``(n_vars,)`` number of message-passing factor instances per variable.
        unary: ``(group, var_ids)`` of arity-1 factor groups.
        constant: Factor groups of arity 0.
        pairs: Per *class* (pair groups of one cardinality tuple), its member
            groups: those without evidence first, then those with.
        n_static: Per class, how many leading groups depend on no evidence.
        pair_scope: Per class, ``(n_c + 1, arity)`` variable ids (last row: sink).
        pair_cards: Per class, the cardinality of each scope axis.
        roots: ``(n_roots,)`` root variable of each tree component ("tree").
        steps: Per odd depth, shallow to deep: ``((class c, parent slot p), inst)``.
        padded: When the steps run in ``lax.scan``: per ``(k, p)``, an
            ``(n_steps, width)`` array of instances, padded with ``n_k`` (sink row).
        damping, max_iters: Loopy options.
    """

    kind: str
    n_vars: int
    kmax: int
    cards: np.ndarray
    degree: np.ndarray
    unary: tuple[tuple[int, np.ndarray], ...]
    constant: tuple[int, ...]
    pairs: tuple[tuple[int, ...], ...]
    n_static: tuple[int, ...]
    pair_scope: tuple[np.ndarray, ...]
    pair_cards: tuple[tuple[int, ...], ...]
    roots: np.ndarray
    steps: tuple[tuple[tuple[tuple[int, int], np.ndarray], ...], ...]
    padded: dict | None
    damping: float = 0.0
    max_iters: int = 0

    @property
    def is_exact(self) -> bool:
        return self.kind == "tree"

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def slots(self) -> tuple[tuple[int, int], ...]:
        """Every (pair group, parent slot) that occurs in some step."""
        seen: dict[tuple[int, int], None] = {}
        for step in self.steps:
            for kp, _ in step:
                seen[kp] = None
        return tuple(seen)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _split_groups(fg: FactorGraph):
    """Unary groups, constant groups, and the pair groups sorted into classes.

    A class holds every pair group with one cardinality tuple; within a class the
    groups that depend on no evidence come first, so their tables are
    concatenated once, outside the jitted kernel.
    """
    unary, constant = [], []
    classes: dict[tuple[int, ...], list[int]] = {}
    for k, g in enumerate(fg.factor_groups):
        if g.arity == 0:
            constant.append(k)
        elif g.arity == 1:
            unary.append((k, _frozen(g.scope[:, 0].astype(np.int32))))
        else:
            classes.setdefault(g.cards, []).append(k)
    ordered = tuple(
        tuple(sorted(members, key=lambda k: (bool(fg.factor_groups[k].evidence), k)))
        for members in classes.values()
    )
    return tuple(unary), tuple(constant), ordered


def _class_scope(fg: FactorGraph, members: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([fg.factor_groups[k].scope for k in members]).astype(np.int64)


def _bipartite(fg: FactorGraph, classes: tuple[tuple[int, ...], ...]):
    """Sparse adjacency of variables + pair-factor instances; class offsets."""
    n = fg.n_variables
    rows, cols, offsets, start = [], [], [], n
    for members in classes:
        scope = _class_scope(fg, members)
        offsets.append(start)
        inst = np.arange(scope.shape[0], dtype=np.int64) + start
        for j in range(scope.shape[1]):
            rows.append(inst)
            cols.append(scope[:, j])
        start += scope.shape[0]
    total = start
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    adj = sparse.coo_matrix(
        (np.ones(len(r), np.int8), (r, c)), shape=(total, total)
    ).tocsr()
    adj = (adj + adj.T).tocsr()
    return adj, offsets, total, len(r)


def instance_forest(fg: FactorGraph):
    """Root the bipartite instance graph if it is a forest, else ``None``.

    Returns:
        ``(adjacency, factor offsets, predecessors, depth)`` with a virtual super
        root removed (roots have predecessor -1 and depth 0), or ``None`` when the
        graph has a loop (two factor instances sharing two variables included).
    """
    key = "instance_forest"
    if key in fg._cache:
        return fg._cache[key]
    _, _, classes = _split_groups(fg)
    adj, offsets, total, n_edges = _bipartite(fg, classes)
    n_comp, labels = csgraph.connected_components(adj, directed=False)
    if adj.data.max(initial=0) > 1 or n_edges != total - n_comp:
        fg._cache[key] = None
        return None
    # A super root joined to the smallest node of every component.
    firsts = np.full(n_comp, total, np.int64)
    np.minimum.at(firsts, labels, np.arange(total))
    sup = total
    extra = sparse.coo_matrix(
        (np.ones(n_comp, np.int8), (np.full(n_comp, sup), firsts)),
        shape=(total + 1, total + 1),
    )
    big = sparse.bmat([[adj, None], [None, sparse.csr_matrix((1, 1), dtype=np.int8)]])
    big = (big + extra + extra.T).tocsr()
    order, pred = csgraph.breadth_first_order(
        big, sup, directed=False, return_predecessors=True
    )
    order = order[1:]
    depth = _bfs_depths(order, pred[order], total + 1)[:total] - 1
    pred = pred[:total].astype(np.int64)
    pred[pred == sup] = -1
    out = (adj, offsets, pred, depth)
    fg._cache[key] = out
    return out


def _bfs_depths(order: np.ndarray, pred_o: np.ndarray, n: int) -> np.ndarray:
    """Depth of every node from a BFS order and its predecessors (root depth 0).

    A BFS order lists every node after its predecessor, so one pass is exact.
    """
    depth = [0] * n
    for node, p in zip(order.tolist(), pred_o.tolist(), strict=True):
        depth[node] = depth[p] + 1
    return np.asarray(depth, np.int64)


def _tree_plan(fg: FactorGraph):
    forest = instance_forest(fg)
    if forest is None:
        cycle = _find_cycle(fg)
        raise ValueError(
            "a tree schedule needs a factor graph without loops, but this graph has "
            f"a cycle through {cycle}; use schedule='exact' (junction tree) or "
            "schedule='loopy'"
        )
    _, offsets, pred, depth = forest
    _, _, classes = _split_groups(fg)
    n = fg.n_variables
    roots = np.nonzero(pred[:n] < 0)[0].astype(np.int32)
    by_depth: dict[int, list] = {}
    for c, (members, off) in enumerate(zip(classes, offsets, strict=True)):
        scope = _class_scope(fg, members)
        nodes = np.arange(scope.shape[0]) + off
        parent = pred[nodes]
        slot = np.argmax(scope == parent[:, None], axis=1)
        dep = depth[nodes]
        # One stable sort by (depth, slot) instead of a mask per depth.
        order = np.lexsort((slot, dep))
        keys = dep[order] * scope.shape[1] + slot[order]
        cuts = np.nonzero(np.diff(keys))[0] + 1
        for chunk in np.split(order, cuts):
            if len(chunk) == 0:
                continue
            d, p = int(dep[chunk[0]]), int(slot[chunk[0]])
            by_depth.setdefault(d, []).append(((c, p), chunk.astype(np.int32)))
    steps = tuple(
        tuple((kp, _frozen(inst)) for kp, inst in by_depth[d]) for d in sorted(by_depth)
    )
    return roots, steps


def _pad_steps(steps, pair_sizes) -> dict:
    """Per (k, p): ``(n_steps, width)`` instance arrays padded with the sink row."""
    slots: dict[tuple[int, int], int] = {}
    for step in steps:
        for kp, inst in step:
            slots[kp] = max(slots.get(kp, 0), len(inst))
    out = {}
    for kp, width in slots.items():
        arr = np.full((len(steps), width), pair_sizes[kp[0]], np.int32)
        for s, step in enumerate(steps):
            for kq, inst in step:
                if kq == kp:
                    arr[s, : len(inst)] = inst
        out[kp] = _frozen(arr)
    return out


def _find_cycle(fg: FactorGraph) -> list[str]:
    try:
        return [u for u, _ in nx.find_cycle(fg.graph)]
    except nx.NetworkXNoCycle:  # two groups over the same variables
        return ["(parallel factors)"]


def make_flat_plan(
    fg: FactorGraph,
    kind: str = "auto",
    damping: float = 0.5,
    max_iters: int = 100,
) -> FlatPlan:
    """Build the flat plan of a compiled graph.

    Args:
        fg: The compiled graph.
        kind: "tree", "loopy" or "auto" ("tree" when the instance graph is a
            forest; otherwise a ``ValueError`` that suggests "exact" or "loopy").
        damping: Loopy: ``new = damping * old + (1 - damping) * computed``.
        max_iters: Loopy: number of flooding iterations.

    Raises:
        ValueError: "tree" on a graph with loops (the message names a cycle), bad
            loopy options, unknown kinds.
    """
    if kind == "auto":
        kind = "tree"
    if kind not in ("tree", "loopy"):
        raise ValueError(f"flat plans are 'tree' or 'loopy', got {kind!r}")
    if kind == "loopy":
        if not 0.0 <= damping < 1.0:
            raise ValueError(f"damping must be in [0, 1), got {damping}")
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    unary, constant, pairs = _split_groups(fg)
    n = fg.n_variables
    cards = fg.cardinalities
    kmax = int(cards.max(initial=1))
    pair_scope, pair_cards, n_static = [], [], []
    degree = np.zeros(n, np.int64)
    for members in pairs:
        scope = _class_scope(fg, members)
        sink = np.full((1, scope.shape[1]), n, np.int64)
        pair_scope.append(_frozen(np.concatenate([scope, sink]).astype(np.int32)))
        pair_cards.append(fg.factor_groups[members[0]].cards)
        n_static.append(sum(not fg.factor_groups[k].evidence for k in members))
        np.add.at(degree, scope.reshape(-1), 1)
    roots = np.arange(0, dtype=np.int32)
    steps: tuple = ()
    padded = None
    if kind == "tree":
        roots, steps = _tree_plan(fg)
        if len(steps) > UNROLL_STEPS:
            sizes = [sc.shape[0] - 1 for sc in pair_scope]
            padded = _pad_steps(steps, sizes)
    return FlatPlan(
        kind=kind,
        n_vars=n,
        kmax=kmax,
        cards=_frozen(cards.astype(np.int32)),
        degree=_frozen(degree),
        unary=unary,
        constant=constant,
        pairs=pairs,
        n_static=tuple(n_static),
        pair_scope=tuple(pair_scope),
        pair_cards=tuple(pair_cards),
        roots=_frozen(np.asarray(roots, np.int32)),
        steps=steps,
        padded=padded,
        damping=float(damping) if kind == "loopy" else 0.0,
        max_iters=int(max_iters) if kind == "loopy" else 0,
    )
