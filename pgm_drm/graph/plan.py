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
- ``"exact"``: a junction tree (the ``"exact"`` :class:`~pgm_drm.graph.Schedule`'s
  clusters), re-rooted at its centre. Clusters are sorted into *cluster classes*
  by their cardinality tuple; the edges at each depth, split by (child class,
  parent class, separator axes), are one batched operation each
  (:class:`JunctionTree`), so a DRM's tree runs in about ``levels`` steps.

Pure numpy and scipy: nothing here imports JAX.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

if TYPE_CHECKING:
    from pgm_drm.graph.compile import FactorGraph

__all__ = [
    "UNROLL_MIN_WIDTH",
    "UNROLL_STEPS",
    "FlatPlan",
    "JunctionEdges",
    "JunctionTree",
    "instance_forest",
    "make_flat_plan",
    "split_classes",
]

#: Tree plans with more steps than this run the steps inside ``lax.scan``
#: (padded index arrays) instead of unrolled; below it every step is exact-sized.
UNROLL_STEPS = 24
#: A query of ONE evidence set (no batch axis) runs a narrow tree plan's steps in
#: ``lax.scan`` too, from three steps on: fewer factor instances per step than
#: this, on average (a chain has one). Unrolled, each step is its own code for XLA
#: to compile, for nothing at run time on one query: a 24-site chain took 5.1 s to
#: its first result and 297 us per run, scanned 0.7 s and 179 us. Batched queries
#: (EM's E-steps) keep the unrolled steps: an 8-step HMM with a batch of 300 ran
#: 1.02 ms per run scanned against 0.79 ms unrolled (:func:`scanned_twin`).
UNROLL_MIN_WIDTH = 8


@dataclass(frozen=True, eq=False)
class JunctionEdges:
    """The junction-tree edges of one step that share their shapes: child clusters
    of class ``child`` (rows ``child_rows`` of that class) under parents of class
    ``parent`` (rows ``parent_rows``).

    Clusters list their variables sorted, so a separator's variables are in the
    same order in both: at axes ``child_sep`` of the child, ``parent_sep`` of the
    parent.

    Attributes:
        sep_of_parent: ``(|P|,)`` the flat separator state of each flat parent
            state (MAP backtracking).
        compose: ``(|S|, |R|)`` the flat child state of (separator state, state of
            the child's other axes in order).
    """

    child: int
    parent: int
    child_rows: np.ndarray
    parent_rows: np.ndarray
    child_sep: tuple[int, ...]
    parent_sep: tuple[int, ...]
    sep_of_parent: np.ndarray
    compose: np.ndarray


@dataclass(frozen=True, eq=False)
class JunctionTree:
    """A junction tree as frozen index arrays, for the flat kernel.

    Attributes:
        clusters: Variable ids (sorted) of every cluster: ``clusters[i]`` is row
            ``rows[i]`` of class ``classes[i]``. Rows are numbered breadth-first
            within each class (roots first), and ``home`` and ``moves`` list their
            entries by row.
        classes, rows: Each cluster's class and row within its class.
        shapes: Per class, the cardinality tuple of its clusters.
        sizes: Per class, its number of clusters.
        home: ``(class, axis, var_ids, rows, stride)``: variables whose smallest
            cluster is of that class, at that axis (their unary terms are added
            there and their marginals and MAP read there); a flat cluster state
            ``s`` has ``(s // stride) % card`` at that axis.
        moves: ``(class, pair class, perm, shape, instances, rows)``: pair-factor
            instances added into clusters: each table transposed by ``perm`` and
            reshaped to ``shape`` (1 on the cluster's other axes).
        roots: ``(class, rows)``: one root per connected component.
        steps: Per depth ``1 .. D`` (shallow to deep), the edges from clusters at
            that depth to their parents, batched (:class:`JunctionEdges`).
    """

    clusters: tuple[tuple[int, ...], ...]
    classes: np.ndarray
    rows: np.ndarray
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    home: tuple[tuple[int, int, np.ndarray, np.ndarray, int], ...]
    moves: tuple[
        tuple[int, int, tuple[int, ...], tuple[int, ...], np.ndarray, np.ndarray], ...
    ]
    roots: tuple[tuple[int, np.ndarray], ...]
    steps: tuple[tuple[JunctionEdges, ...], ...]

    @property
    def depth(self) -> int:
        return len(self.steps)


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
        junction: ``"exact"``: the junction tree's clusters and steps.
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
    junction: JunctionTree | None = None

    @property
    def is_exact(self) -> bool:
        return self.kind in ("tree", "exact")

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
    concatenated once, outside the jitted kernel. Cached on ``fg`` (a plan
    reads it up to three times; a loop-written model has a group per site).
    """
    if "split_groups" in fg._cache:
        return fg._cache["split_groups"]
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
    out = tuple(unary), tuple(constant), ordered
    fg._cache["split_groups"] = out
    return out


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
        # Each run's depth and slot read in one go, and the runs cut from one
        # int32 array (views: a chain of 10,000 has a run per depth).
        firsts = order[np.concatenate([[0], cuts])] if len(order) else order
        runs = np.split(order.astype(np.int32), cuts) if len(order) else []
        for chunk, d, p in zip(
            runs, dep[firsts].tolist(), slot[firsts].tolist(), strict=True
        ):
            by_depth.setdefault(d, []).append(((c, p), chunk))
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


def _centre_rooting(n: int, edges) -> tuple[np.ndarray, np.ndarray]:
    """Parent (-1 at roots) and depth of every node of a forest, each component
    rooted at a centre of its longest path (two breadth-first searches), so the
    depth is about half the diameter."""
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    parent = np.full(n, -1, np.int64)
    depth = np.zeros(n, np.int64)
    for comp in nx.connected_components(g):
        start = min(comp)
        dist = nx.single_source_shortest_path_length(g, start)
        a = max(dist, key=lambda v: (dist[v], -v))
        paths = nx.single_source_shortest_path(g, a)
        b = max(paths, key=lambda v: (len(paths[v]), -v))
        path = paths[b]
        root = path[(len(path) - 1) // 2]
        for u, v in nx.bfs_edges(g, root):
            parent[v] = u
            depth[v] = depth[u] + 1
    return parent, depth


def _breadth_first(parent: np.ndarray, key: np.ndarray | None = None) -> list[int]:
    """The nodes of a rooted forest by depth, each parent's children adjacent and
    in their parents' order, siblings (and roots) by ``key`` then node id."""
    key = np.zeros(len(parent), np.int64) if key is None else key
    children: dict[int, list[int]] = {}
    for b in sorted(np.nonzero(parent >= 0)[0], key=lambda b: (key[b], b)):
        children.setdefault(int(parent[b]), []).append(int(b))
    level = sorted(
        (int(b) for b in np.nonzero(parent < 0)[0]), key=lambda b: (key[b], b)
    )
    out: list[int] = []
    while level:
        out.extend(level)
        level = [c for b in level for c in children.get(b, [])]
    assert len(out) == len(parent)
    return out


def _split_hubs(bags, factors, edges, home, cards, scope_of):
    """Each cluster whose separators span at most half of its states becomes a
    *hub* over their union, with the cluster hung from it as a leaf. The factors
    within the hub (``scope_of(f)``: factor ``f``'s variables) move to it, the
    others stay with the leaf, so the leaf keeps only what reaches its own axes
    (fewer distinct blocks over its separator); a variable of the hub is homed
    there, the smallest cluster that holds it.

    The tree is still a junction tree (a variable shared with any other cluster
    is in a separator, so in the hub), with the same factors. A DRM's junction
    tree has one cluster of 768 states, ``(c, g3, g2, a2, g1, a1)`` of the first
    patch, where the other patches' clusters meet: it becomes a hub of 96 states
    ``(c, g3, g2, a2)`` and a leaf, so every patch is a leaf (whose message keyed
    tables compute from its few distinct blocks, ``pgm_drm.inference.flat``) and
    no cluster of 768 states is reduced whole.

    Returns:
        ``(bags, factors, edges, home, key)``: ``key[b]`` the cluster a new hub
        was split from (its place among siblings), else ``b``.
    """
    bags, factors = list(bags), list(factors)
    home = np.asarray(home).copy()
    nbrs: dict[int, set[int]] = {b: set() for b in range(len(bags))}
    for i, j in edges:
        nbrs[i].add(j)
        nbrs[j].add(i)
    origin = list(range(len(bags)))

    def states(vs) -> int:
        return int(np.prod([int(cards[v]) for v in vs], dtype=np.int64))

    for b in range(len(bags)):
        if len(nbrs[b]) < 2:
            continue
        span = sorted({v for n in nbrs[b] for v in set(bags[b]) & set(bags[n])})
        if 2 * states(span) > states(bags[b]):
            continue
        u = len(bags)
        bags.append(tuple(span))
        inside = set(span)
        up = tuple(f for f in factors[b] if set(scope_of(f)) <= inside)
        factors.append(up)
        factors[b] = tuple(f for f in factors[b] if f not in up)
        origin.append(b)
        # u takes b's place among its neighbours; b hangs from u.
        nbrs[u] = nbrs[b] | {b}
        for n in nbrs[b]:
            nbrs[n].discard(b)
            nbrs[n].add(u)
        nbrs[b] = {u}
        for v in span:  # each variable at its smallest cluster
            if states(span) < states(bags[home[v]]):
                home[v] = u
    edges = [(i, j) for i in sorted(nbrs) for j in sorted(nbrs[i]) if i < j]
    return bags, factors, edges, home, np.asarray(origin)


def _junction_tree(fg: FactorGraph, pairs, pair_scope) -> JunctionTree:
    """The ``"exact"`` schedule's junction tree as a :class:`JunctionTree`
    (hubs split off, :func:`_split_hubs`)."""
    sched = fg.schedule("exact")
    cards = fg.cardinalities
    flat_start = np.cumsum([0] + [g.size for g in fg.factor_groups])
    group_of = np.searchsorted(flat_start, np.arange(flat_start[-1]), side="right") - 1

    def scope_of(f: int):
        gk = int(group_of[f])
        return fg.factor_groups[gk].scope[f - int(flat_start[gk])]

    bags, factors, edges, homes, origin = _split_hubs(
        sched.clusters, sched.factors, sched.edges, sched.home, cards, scope_of
    )
    nb = len(bags)
    parent, depth = _centre_rooting(nb, edges)
    # Cluster classes by cardinality tuple; rows in breadth-first order (by depth,
    # the children of one parent adjacent and in their parents' order), so that a
    # step's child rows are usually a contiguous run (a slice, not a gather: not
    # when edges of other shapes interleave with them at that depth) and its
    # parent rows are sorted (children's messages summed by a reshape).
    class_of: dict[tuple[int, ...], int] = {}
    classes = np.zeros(nb, np.int64)
    rows = np.zeros(nb, np.int64)
    sizes: list[int] = []
    shapes: list[tuple[int, ...]] = []
    # Siblings in the order of the first factor instance each hosts: plate order,
    # so a factor group's instances usually land on its class's rows in order, or
    # in an order that is a transpose of it (a reshape, not a gather; see
    # flat._take), where BFS by node id scattered them.
    first = np.array([min(f, default=np.iinfo(np.int64).max) for f in factors])
    first = first[origin]  # a hub among its siblings where its leaf was
    for b in _breadth_first(parent, first):
        bag = bags[b]
        shape = tuple(int(cards[v]) for v in bag)
        if shape not in class_of:
            class_of[shape] = len(shapes)
            shapes.append(shape)
            sizes.append(0)
        k = class_of[shape]
        classes[b], rows[b] = k, sizes[k]
        sizes[k] += 1
    pos = [{v: a for a, v in enumerate(bag)} for bag in bags]

    # Unary terms and marginals: each variable at its smallest cluster.
    home: dict[tuple[int, int], tuple[list, list]] = {}
    for v, b in enumerate(homes):
        key = (int(classes[b]), pos[b][v])
        home.setdefault(key, ([], []))[0].append(v)
        home[key][1].append(int(rows[b]))
    home_t = []
    for (k, axis), (vs, rs) in home.items():
        stride = int(np.prod(shapes[k][axis + 1 :], dtype=np.int64))
        by_row = np.argsort(rs, kind="stable")  # rows in order: a slice, no gather
        home_t.append(
            (
                k,
                axis,
                _frozen(np.asarray(vs, np.int32)[by_row]),
                _frozen(np.asarray(rs, np.int32)[by_row]),
                stride,
            )
        )

    # Pair-factor instances, by the schedule's assignment of flat factor ids.
    where: dict[int, tuple[int, int]] = {}  # group -> (pair class, first index)
    for c, members in enumerate(pairs):
        start = 0
        for k in members:
            where[k] = (c, start)
            start += fg.factor_groups[k].size
    moves: dict[tuple, tuple[list, list]] = {}
    for b, fids in enumerate(factors):
        bag = bags[b]
        for fi in fids:
            gk = int(group_of[fi])
            if gk not in where:  # unary factors come through the unary terms
                continue
            c, first = where[gk]
            i = first + fi - int(flat_start[gk])
            scope = [int(v) for v in pair_scope[c][i]]
            perm = tuple(int(p) for p in np.argsort([pos[b][v] for v in scope]))
            present = set(scope)
            shape = tuple(int(cards[v]) if v in present else 1 for v in bag)
            key = (int(classes[b]), c, perm, shape)
            moves.setdefault(key, ([], []))[0].append(i)
            moves[key][1].append(int(rows[b]))
    moves_t = []
    for (k, c, perm, shape), (ins, rs) in moves.items():
        by_row = np.argsort(rs, kind="stable")  # rows in order: an add, no scatter
        ins_a, rs_a = np.asarray(ins, np.int32)[by_row], np.asarray(rs)[by_row]
        moves_t.append((k, c, perm, shape, _frozen(ins_a), _frozen(rs_a)))

    roots: dict[int, list] = {}
    for b in np.nonzero(parent < 0)[0]:
        roots.setdefault(int(classes[b]), []).append(int(rows[b]))
    roots = {k: sorted(r) for k, r in roots.items()}  # a run of rows: slices
    steps: list[dict] = [dict() for _ in range(int(depth.max(initial=0)))]
    for b in np.nonzero(parent >= 0)[0]:
        p = int(parent[b])
        sep = set(bags[b]) & set(bags[p])
        cs = tuple(a for a, v in enumerate(bags[b]) if v in sep)
        ps = tuple(a for a, v in enumerate(bags[p]) if v in sep)
        key = (int(classes[b]), int(classes[p]), cs, ps)
        steps[depth[b] - 1].setdefault(key, ([], []))[0].append(int(rows[b]))
        steps[depth[b] - 1][key][1].append(int(rows[p]))
    out_steps = []
    for step in steps:
        edges = []
        for (kc, kp, cs, ps), (crs, prs) in step.items():
            # By parent row, so that the children of one parent are adjacent,
            # then by child row (a run where the rows allow).
            order = np.lexsort((crs, prs))
            crs, prs = np.asarray(crs)[order], np.asarray(prs)[order]
            pshape, cshape = shapes[kp], shapes[kc]
            digits = np.indices(pshape).reshape(len(pshape), -1)
            sep_cards = [pshape[a] for a in ps]
            sep_of_parent = (
                np.ravel_multi_index(tuple(digits[a] for a in ps), sep_cards)
                if ps
                else np.zeros(digits.shape[1], np.int64)
            )
            rest = tuple(a for a in range(len(cshape)) if a not in cs)
            n_sep = int(np.prod(sep_cards))
            compose = np.transpose(
                np.arange(int(np.prod(cshape))).reshape(cshape), cs + rest
            ).reshape(n_sep, -1)
            edges.append(
                JunctionEdges(
                    child=kc,
                    parent=kp,
                    child_rows=_frozen(np.asarray(crs, np.int32)),
                    parent_rows=_frozen(np.asarray(prs, np.int32)),
                    child_sep=cs,
                    parent_sep=ps,
                    sep_of_parent=_frozen(sep_of_parent.astype(np.int32)),
                    compose=_frozen(compose.astype(np.int32)),
                )
            )
        out_steps.append(tuple(edges))
    return JunctionTree(
        clusters=tuple(bags),
        classes=_frozen(classes),
        rows=_frozen(rows),
        shapes=tuple(shapes),
        sizes=tuple(sizes),
        home=tuple(home_t),
        moves=tuple(moves_t),
        roots=tuple((k, _frozen(np.asarray(r, np.int32))) for k, r in roots.items()),
        steps=tuple(out_steps),
    )


def split_classes(
    jt: JunctionTree, moving: dict[int, np.ndarray]
) -> tuple[JunctionTree, dict[int, int]]:
    """``jt`` with rows ``moving[k]`` of each class ``k`` moved to a new class of
    the same shape (appended; rows renumbered in order in both classes).

    Every entry that lists rows (``home``, ``moves``, ``roots``, the edges of each
    step) is split by the classes its rows land in, so the tree is the same with
    more, smaller classes: the flat kernel then builds a class's potentials
    without the moved rows (their leaf messages come from keyed tables,
    ``pgm_drm.inference.flat``).

    Returns:
        The new tree and, per class that lost rows, the class they moved to.
    """
    shapes, sizes = list(jt.shapes), list(jt.sizes)
    cls, row, new_class = [], [], {}
    for k in range(len(jt.shapes)):
        c = np.full(jt.sizes[k], k, np.int64)
        r = np.arange(jt.sizes[k], dtype=np.int64)
        rows = np.asarray(moving.get(k, ()), np.int64)
        if rows.size:
            hit = np.zeros(jt.sizes[k], bool)
            hit[rows] = True
            new_class[k] = len(shapes)
            c[hit] = len(shapes)
            r[hit] = np.arange(int(hit.sum()))
            r[~hit] = np.arange(int((~hit).sum()))
            shapes.append(jt.shapes[k])
            sizes[k] = int((~hit).sum())
            sizes.append(int(hit.sum()))
        cls.append(c)
        row.append(r)

    def parts(k: int, rows: np.ndarray):
        """``(new class, mask)`` for each class the rows ``rows`` of ``k`` go to."""
        where = cls[k][rows]
        return [(int(kk), where == kk) for kk in dict.fromkeys(where.tolist())]

    home = tuple(
        (kk, axis, _frozen(v[m]), _frozen(row[k][rs[m]].astype(np.int32)), stride)
        for k, axis, v, rs, stride in jt.home
        for kk, m in parts(k, rs)
    )
    moves = tuple(
        (kk, c, perm, shape, _frozen(inst[m]), _frozen(row[k][rs[m]]))
        for k, c, perm, shape, inst, rs in jt.moves
        for kk, m in parts(k, rs)
    )
    roots = tuple(
        (kk, _frozen(row[k][rs[m]].astype(np.int32)))
        for k, rs in jt.roots
        for kk, m in parts(k, rs)
    )
    steps = []
    for step in jt.steps:
        edges = []
        for e in step:
            for kc, mc in parts(e.child, e.child_rows):
                for kp, mp in parts(e.parent, e.parent_rows[mc]):
                    sel = np.nonzero(mc)[0][mp]
                    edges.append(
                        JunctionEdges(
                            child=kc,
                            parent=kp,
                            child_rows=_frozen(
                                row[e.child][e.child_rows[sel]].astype(np.int32)
                            ),
                            parent_rows=_frozen(
                                row[e.parent][e.parent_rows[sel]].astype(np.int32)
                            ),
                            child_sep=e.child_sep,
                            parent_sep=e.parent_sep,
                            sep_of_parent=e.sep_of_parent,
                            compose=e.compose,
                        )
                    )
        steps.append(tuple(edges))
    classes = np.array([cls[k][r] for k, r in zip(jt.classes, jt.rows, strict=True)])
    rows_ = np.array([row[k][r] for k, r in zip(jt.classes, jt.rows, strict=True)])
    out = JunctionTree(
        clusters=jt.clusters,
        classes=_frozen(classes.astype(jt.classes.dtype)),
        rows=_frozen(rows_.astype(jt.rows.dtype)),
        shapes=tuple(shapes),
        sizes=tuple(sizes),
        home=home,
        moves=moves,
        roots=roots,
        steps=tuple(steps),
    )
    return out, new_class


def scanned_twin(plan: FlatPlan) -> FlatPlan | None:
    """The same tree plan with its steps run inside ``lax.scan``, when the plan is
    narrow (see :data:`UNROLL_MIN_WIDTH`) and would otherwise run them unrolled;
    else None. The twin shares every index array and differs only in ``padded``,
    so both give the same answers (tested)."""
    if plan.kind != "tree" or plan.padded is not None or plan.n_steps < 3:
        return None
    width = sum(len(inst) for step in plan.steps for _, inst in step)
    if width >= UNROLL_MIN_WIDTH * plan.n_steps:
        return None
    sizes = [sc.shape[0] - 1 for sc in plan.pair_scope]
    return replace(plan, padded=_pad_steps(plan.steps, sizes))


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
        kind: "tree", "loopy", "exact" (a junction tree; exact on any graph) or
            "auto" ("tree" when the instance graph is a forest; otherwise a
            ``ValueError`` that suggests "exact" or "loopy").
        damping: Loopy: ``new = damping * old + (1 - damping) * computed``.
        max_iters: Loopy: number of flooding iterations.

    Raises:
        ValueError: "tree" on a graph with loops (the message names a cycle), bad
            loopy options, unknown kinds.
    """
    if kind == "auto":
        kind = "tree"
    if kind not in ("tree", "loopy", "exact"):
        raise ValueError(f"flat plans are 'tree', 'exact' or 'loopy', got {kind!r}")
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
    junction = _junction_tree(fg, pairs, pair_scope) if kind == "exact" else None
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
        junction=junction,
    )
