"""Schedules are data: check their shape, not just their results."""

import networkx as nx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import compile_model
from pgm_drm.testing import random_factor_model


@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["chain", "tree", "loopy"]))
def test_exact_schedule_is_a_junction_tree(seed, kind):
    model, kwargs = random_factor_model(seed, n_vars=5, kind=kind)
    fg = compile_model(model, **kwargs)
    s = fg.schedule("exact")
    tree = nx.Graph()
    tree.add_nodes_from(range(len(s.clusters)))
    tree.add_edges_from(s.edges)
    assert nx.is_forest(tree)
    # Running intersection: the clusters holding any variable form a subtree.
    for v in range(len(fg.variables)):
        holding = [k for k, c in enumerate(s.clusters) if v in c]
        assert holding and nx.is_connected(tree.subgraph(holding))
    # Every factor sits in exactly one cluster that covers its scope.
    vindex = fg.variable_index
    placed = sorted(fi for fs in s.factors for fi in fs)
    assert placed == sorted(i for i, f in enumerate(fg.factors) if f.scope)
    for k, fs in enumerate(s.factors):
        for fi in fs:
            assert {vindex[v] for v in fg.factors[fi].scope} <= set(s.clusters[k])
    # Two passes: each tree edge carries one message each way.
    assert len(s.messages) == 2 * len(s.edges)
    assert set(s.messages) == {(i, j) for i, j in s.edges} | {
        (j, i) for i, j in s.edges
    }


def test_upward_sweep_sends_children_before_parents():
    model, kwargs = random_factor_model(1, n_vars=6, kind="tree")
    fg = compile_model(model, **kwargs)
    s = fg.schedule("tree")
    sent: set[int] = set()
    for i, j in s.messages[: s.n_upward]:
        assert s.parent[i] == j
        children = [c for c, p in enumerate(s.parent) if p == i]
        assert all(c in sent for c in children)
        sent.add(i)


def test_tree_schedule_on_loops_names_the_cycle():
    model, kwargs = random_factor_model(0, n_vars=4, kind="loopy")
    fg = compile_model(model, **kwargs)
    assert not fg.is_tree()
    with pytest.raises(ValueError, match="cycle through.*schedule='exact'"):
        fg.schedule("tree")
    assert fg.schedule("auto").kind == "exact"


def test_auto_picks_tree_on_trees_and_options_are_checked():
    model, kwargs = random_factor_model(0, n_vars=4, kind="tree")
    fg = compile_model(model, **kwargs)
    assert fg.schedule().kind == "tree"
    with pytest.raises(ValueError, match="unknown schedule kind"):
        fg.schedule("bogus")
    with pytest.raises(ValueError, match="damping"):
        fg.schedule("loopy", damping=1.5)
    loopy = fg.schedule("loopy", damping=0.2, max_iters=7)
    assert loopy.max_iters == 7 and len(loopy.messages) == 2 * len(loopy.edges)
    assert fg.schedule("exact", heuristic="min_degree").kind == "exact"
