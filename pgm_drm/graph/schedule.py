"""Message schedules as data: clusters, the factors they hold, and message order.

All three schedules are *cluster graphs* over the compiled factor graph, so one
kernel (``pgm_drm.inference.kernel``) runs any of them:

- ``"tree"``: the factor graph itself (Bethe clusters: one per variable, one per
  factor), two passes leaves -> root -> leaves. Needs a graph without loops.
- ``"exact"``: a junction tree: the elimination tree of a greedy elimination order
  of the variables' primal graph (networkx's min-fill-in or min-degree heuristic);
  two passes. Exact on any
  graph, costs ``prod(cardinalities)`` of the largest cluster.
- ``"loopy"``: the Bethe cluster graph with flooding updates (every directed edge
  each iteration), damping, a fixed number of iterations and per-iteration deltas.
- ``"auto"``: ``"tree"`` when the factor graph is a forest, else ``"exact"``.

Pure Python and numpy: nothing here imports JAX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx
from networkx.algorithms.approximation.treewidth import (
    MinDegreeHeuristic,
    min_fill_in_heuristic,
)

if TYPE_CHECKING:
    from pgm_drm.graph.compile import FactorGraph

__all__ = ["MAX_CLUSTER_SIZE", "Schedule", "make_schedule"]

#: The largest dense cluster table (entries) an exact schedule may build.
MAX_CLUSTER_SIZE = 50_000_000


@dataclass(frozen=True)
class Schedule:
    """An ordered list of messages over a cluster graph.

    Attributes:
        kind: "tree", "exact" or "loopy".
        clusters: Variable indices (sorted) of each cluster.
        factors: Factor indices assigned to each cluster (each factor exactly once;
            factors with an empty scope are in ``constant_factors`` instead).
        constant_factors: Factors with no latent variable (add to log Z).
        edges: Undirected cluster-graph edges ``(i, j)``.
        messages: Ordered directed messages ``(src, dst)``. For two-pass schedules:
            the upward sweep then the downward sweep; for "loopy": one flooding
            sweep, repeated ``max_iters`` times, every message from the last sweep.
        parent: Parent cluster of each cluster in the rooted tree (-1 for roots);
            empty for "loopy".
        order: Clusters in root-first order (backtracking order).
        home: For each variable, the smallest cluster containing it.
        damping, max_iters, tol: Loopy options (ignored by two-pass schedules).
    """

    kind: str
    clusters: tuple[tuple[int, ...], ...]
    factors: tuple[tuple[int, ...], ...]
    constant_factors: tuple[int, ...]
    edges: tuple[tuple[int, int], ...]
    messages: tuple[tuple[int, int], ...]
    parent: tuple[int, ...]
    order: tuple[int, ...]
    home: tuple[int, ...]
    damping: float = 0.0
    max_iters: int = 0
    tol: float = 1e-6

    @property
    def is_exact(self) -> bool:
        return self.kind in ("tree", "exact")

    @property
    def n_upward(self) -> int:
        """Number of messages in the upward (collect) sweep of a two-pass schedule."""
        return len(self.messages) // 2 if self.is_exact else 0

    @property
    def width(self) -> int:
        """Largest cluster size in variables (treewidth + 1 for "exact")."""
        return max((len(c) for c in self.clusters), default=0)

    def separator(self, i: int, j: int) -> tuple[int, ...]:
        """Variables shared by clusters ``i`` and ``j`` (sorted)."""
        return tuple(sorted(set(self.clusters[i]) & set(self.clusters[j])))

    def to_networkx(self, fg: FactorGraph | None = None) -> nx.DiGraph:
        """The schedule as a DiGraph; edge attribute ``step`` is the message order."""
        g = nx.DiGraph()
        for k, c in enumerate(self.clusters):
            label = (
                ",".join(fg.variables[v].name for v in c) if fg is not None else str(c)
            )
            g.add_node(k, variables=c, label="{" + label + "}")
        for step, (i, j) in enumerate(self.messages):
            g.add_edge(i, j, step=step)
        return g


def _bethe_clusters(fg: FactorGraph):
    vindex = fg.variable_index
    clusters: list[tuple[int, ...]] = [(i,) for i in range(len(fg.variables))]
    factors: list[tuple[int, ...]] = [() for _ in fg.variables]
    constant: list[int] = []
    edges: list[tuple[int, int]] = []
    for fi, f in enumerate(fg.factors):
        scope = tuple(sorted(vindex[v] for v in f.scope))
        if not scope:
            constant.append(fi)
            continue
        k = len(clusters)
        clusters.append(scope)
        factors.append((fi,))
        edges.extend((k, v) for v in scope)
    return clusters, factors, constant, edges


def _two_pass(clusters, edges):
    """Root each component, return (messages, parent, order)."""
    g = nx.Graph()
    g.add_nodes_from(range(len(clusters)))
    g.add_edges_from(edges)
    parent = [-1] * len(clusters)
    order: list[int] = []
    for comp in nx.connected_components(g):
        root = min(comp)
        bfs = [root] + [v for _, v in nx.bfs_edges(g, root)]
        for u, v in nx.bfs_edges(g, root):
            parent[v] = u
        order.extend(bfs)
    up = [(c, parent[c]) for c in reversed(order) if parent[c] >= 0]
    down = [(parent[c], c) for c in order if parent[c] >= 0]
    return tuple(up + down), tuple(parent), tuple(order)


def _home(clusters, n_vars):
    home = [-1] * n_vars
    for k, c in enumerate(clusters):
        for v in c:
            if home[v] < 0 or len(clusters[home[v]]) > len(c):
                home[v] = k
    return tuple(home)


def _tree_schedule(fg: FactorGraph) -> Schedule:
    if not nx.is_forest(fg.graph):
        cycle = [u for u, _ in nx.find_cycle(fg.graph)]
        raise ValueError(
            "a tree schedule needs a factor graph without loops, but this graph has "
            f"a cycle through {cycle}; use schedule='exact' (junction tree) or "
            "schedule='loopy'"
        )
    clusters, factors, constant, edges = _bethe_clusters(fg)
    messages, parent, order = _two_pass(clusters, edges)
    return Schedule(
        kind="tree",
        clusters=tuple(clusters),
        factors=tuple(factors),
        constant_factors=tuple(constant),
        edges=tuple(edges),
        messages=messages,
        parent=parent,
        order=order,
        home=_home(clusters, len(fg.variables)),
    )


def _elimination_tree(primal: nx.Graph, heuristic: str):
    """Bags and edges of the elimination tree of a greedy elimination order.

    Eliminating ``v`` (the heuristic's choice) gives the bag ``{v} + N(v)`` and
    fills in ``N(v)``; the bag's parent is the bag of the first-eliminated
    vertex of ``N(v)`` (or the last clique's), which is a junction tree. Unlike
    networkx's ``treewidth_decomp`` (which joins each bag to the first bag found
    that holds its neighbours), the tree follows the model's hierarchy: on a DRM
    the pixel bags hang under their unit's bag, and those under the class's.
    """
    if heuristic == "min_fill_in":
        choose = min_fill_in_heuristic
    elif heuristic == "min_degree":
        choose = MinDegreeHeuristic(primal).best_node
    else:
        raise ValueError(f"unknown elimination heuristic {heuristic!r}")
    # Ties go to the vertex met first: the latest site first (a model is traced
    # parents first, so leaves are eliminated before the units they hang under).
    graph = {n: set(primal[n]) - {n} for n in sorted(primal, reverse=True)}
    order: list[int] = []
    neighbours: list[frozenset] = []
    v = choose(graph)
    while v is not None:
        nbrs = graph.pop(v)
        for u in nbrs:
            graph[u] |= nbrs
            graph[u] -= {u, v}
        order.append(v)
        neighbours.append(frozenset(nbrs))
        v = choose(graph)
    pos = {v: i for i, v in enumerate(order)}
    bags = [tuple(sorted({v} | nb)) for v, nb in zip(order, neighbours, strict=True)]
    last = None
    if graph:  # what the heuristic left: one clique
        last = len(bags)
        bags.append(tuple(sorted(graph)))
    edges = []
    for i, nb in enumerate(neighbours):
        if nb:  # no neighbours left: the root of its component
            first = min(nb, key=lambda u: pos.get(u, len(order)))
            edges.append((i, pos.get(first, last)))
    return bags, edges, pos, last


def _contract_chains(bags: list, edges: list, factors: list):
    """Drop every bag that holds one child only and is a subset of it (the child
    takes its place and its factors): eliminating a unit's switch, then its
    nuisance, gives two nested bags where one does the work."""
    parent = {c: p for c, p in edges}
    children: dict[int, list[int]] = {}
    for c, p in edges:
        children.setdefault(p, []).append(c)
    merged = {}  # dropped bag -> the child that took its place
    for b in range(len(bags)):
        kids = children.get(b, [])
        if len(kids) == 1 and set(bags[b]) <= set(bags[kids[0]]):
            child = kids[0]
            merged[b] = child
            p = parent.pop(b, None)
            if p is None:
                parent.pop(child)
            else:
                parent[child] = p
                children[p] = [child if k == b else k for k in children[p]]
    keep = [b for b in range(len(bags)) if b not in merged]
    new_id = {b: i for i, b in enumerate(keep)}

    def final(b: int) -> int:
        while b in merged:
            b = merged[b]
        return b

    new_factors: list[list[int]] = [[] for _ in keep]
    for b, fs in enumerate(factors):
        new_factors[new_id[final(b)]].extend(fs)
    new_edges = [(new_id[c], new_id[p]) for c, p in parent.items()]
    return [bags[b] for b in keep], new_edges, new_factors


def _exact_schedule(fg: FactorGraph, heuristic: str = "min_fill_in") -> Schedule:
    vindex = fg.variable_index
    primal = nx.Graph()
    primal.add_nodes_from(range(len(fg.variables)))
    scopes = []
    for f in fg.factors:
        scope = sorted(vindex[v] for v in f.scope)
        scopes.append(scope)
        primal.add_edges_from(
            (a, b) for i, a in enumerate(scope) for b in scope[i + 1 :]
        )
    bags, edges, pos, last = _elimination_tree(primal, heuristic)
    cards = [v.cardinality for v in fg.variables]
    for b in bags:
        size = 1
        for v in b:
            size *= cards[v]
        if size > MAX_CLUSTER_SIZE:
            raise ValueError(
                f"exact schedule needs a cluster over {len(b)} variables with {size} "
                f"joint states (> {MAX_CLUSTER_SIZE}); use schedule='loopy'"
            )
    factors: list[list[int]] = [[] for _ in bags]
    constant: list[int] = []
    for fi, scope in enumerate(scopes):
        if not scope:
            constant.append(fi)
            continue
        # A scope is a clique of the primal graph: the bag of its first-eliminated
        # variable holds all of it.
        first = min(scope, key=lambda u: pos.get(u, len(pos)))
        factors[pos.get(first, last)].append(fi)
    bags, edges, factors = _contract_chains(bags, edges, factors)
    messages, parent, order = _two_pass(bags, edges)
    return Schedule(
        kind="exact",
        clusters=tuple(bags),
        factors=tuple(tuple(f) for f in factors),
        constant_factors=tuple(constant),
        edges=tuple(edges),
        messages=messages,
        parent=parent,
        order=order,
        home=_home(bags, len(fg.variables)),
    )


def _loopy_schedule(
    fg: FactorGraph, damping: float = 0.5, max_iters: int = 100, tol: float = 1e-6
) -> Schedule:
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"damping must be in [0, 1), got {damping}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    clusters, factors, constant, edges = _bethe_clusters(fg)
    messages = tuple(edges) + tuple((j, i) for i, j in edges)
    return Schedule(
        kind="loopy",
        clusters=tuple(clusters),
        factors=tuple(factors),
        constant_factors=tuple(constant),
        edges=tuple(edges),
        messages=messages,
        parent=(),
        order=(),
        home=tuple(range(len(fg.variables))),
        damping=float(damping),
        max_iters=int(max_iters),
        tol=float(tol),
    )


def make_schedule(fg: FactorGraph, kind: str = "auto", **options) -> Schedule:
    """Derive a message schedule for a compiled factor graph.

    Args:
        fg: The compiled factor graph.
        kind: "auto", "tree", "exact" or "loopy".
        **options: ``heuristic`` ("min_fill_in" / "min_degree") for "exact";
            ``damping``, ``max_iters``, ``tol`` for "loopy".

    Raises:
        ValueError: "tree" on a graph with loops, unknown kinds, too-large clusters.
    """
    if kind == "auto":
        kind = "tree" if fg.is_tree() else "exact"
    if kind == "tree":
        if options:
            raise TypeError(f"tree schedule takes no options, got {sorted(options)}")
        return _tree_schedule(fg)
    if kind == "exact":
        return _exact_schedule(fg, **options)
    if kind == "loopy":
        return _loopy_schedule(fg, **options)
    raise ValueError(
        f"unknown schedule kind {kind!r}; use 'auto', 'tree', 'exact' or 'loopy'"
    )
