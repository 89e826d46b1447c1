"""Flat plans (:mod:`pgm_drm.graph.plan`): frozen index arrays of a compiled graph.

The kernel that runs them is tested in ``tests/inference/test_flat.py`` (against
its naive twin, brute force, NumPyro and numpy twins); here, the plans' own
structure.
"""

import numpy as np
import pytest

from pgm_drm.graph import compile_model
from pgm_drm.graph.plan import instance_forest, make_flat_plan
from pgm_drm.inference import infer
from pgm_drm.testing import random_factor_model, random_plated_tree_model


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_tree_plan_sends_every_pair_factor_once_and_is_frozen(kind):
    model, kwargs = random_factor_model(2, n_vars=6, kind=kind)
    fg = compile_model(model, **kwargs)
    plan = make_flat_plan(fg, "tree")
    assert plan.kind == "tree" and plan.n_vars == fg.n_variables == 6
    # every instance of every pair class sits in exactly one step
    for c, scope in enumerate(plan.pair_scope):
        sent = np.concatenate(
            [inst for step in plan.steps for (k, _), inst in step if k == c]
        )
        np.testing.assert_array_equal(np.sort(sent), np.arange(scope.shape[0] - 1))
    # degree: the factors of arity >= 2 each variable belongs to
    vindex = fg.variable_index
    want = np.zeros(fg.n_variables, int)
    for f in fg.factors:
        if len(f.scope) >= 2:
            want[[vindex[v] for v in f.scope]] += 1
    np.testing.assert_array_equal(plan.degree, want)
    np.testing.assert_array_equal(plan.cards, [v.cardinality for v in fg.variables])
    # one connected tree: one root, at depth 0 of the instance forest
    assert len(plan.roots) == 1
    _, _, pred, depth = instance_forest(fg)
    assert pred[plan.roots[0]] == -1 and depth[plan.roots[0]] == 0
    for a in (plan.cards, plan.degree, plan.roots, *plan.pair_scope):
        assert not a.flags.writeable
    assert fg.plan("tree") is fg.plan("tree")  # built once per graph and options


def test_loopy_plan_options_are_checked():
    model, kwargs = random_factor_model(1, n_vars=5, kind="loopy")
    fg = compile_model(model, **kwargs)
    assert instance_forest(fg) is None
    plan = make_flat_plan(fg, "loopy", damping=0.25, max_iters=7)
    assert (plan.damping, plan.max_iters, plan.steps) == (0.25, 7, ())
    for kwargs, match in [
        (dict(kind="junction"), "'tree', 'exact' or 'loopy'"),
        (dict(kind="loopy", damping=1.0), "damping"),
        (dict(kind="loopy", max_iters=0), "max_iters"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_flat_plan(fg, **kwargs)


def test_plated_tree_program_does_not_grow_with_the_plate():
    small_model, small_kw = random_plated_tree_model(0, size=3)
    big_model, big_kw = random_plated_tree_model(0, size=300)
    small = compile_model(small_model, **small_kw).plan("tree")
    big = compile_model(big_model, **big_kw).plan("tree")
    # Steps are tree depths, each one batched op per (class, parent slot).
    assert small.n_steps == big.n_steps
    assert [len(s) for s in small.steps] == [len(s) for s in big.steps]


def test_a_tree_plan_on_a_loopy_graph_names_a_cycle():
    model, kwargs = random_factor_model(1, n_vars=5, kind="loopy")
    fg = compile_model(model, **kwargs)
    assert not fg.is_tree()
    with pytest.raises(ValueError, match="cycle through"):
        fg.plan("tree")
    # auto falls back to the exact junction tree.
    assert infer(fg, "sum").schedule == "exact"


def _assert_junction_tree(plan) -> None:
    """Running intersection: the clusters holding each variable are connected
    by edges whose separators hold it too; every pair factor sits in a cluster
    that holds its scope (a hub split off takes the factors within it)."""
    import networkx as nx

    jt, n_vars = plan.junction, plan.n_vars

    at = {
        (int(k), int(r)): i
        for i, (k, r) in enumerate(zip(jt.classes, jt.rows, strict=True))
    }
    g = nx.Graph()
    g.add_nodes_from(range(len(jt.clusters)))
    for step in jt.steps:
        for e in step:
            for c, p in zip(e.child_rows, e.parent_rows, strict=True):
                g.add_edge(at[(e.child, int(c))], at[(e.parent, int(p))])
    assert nx.is_forest(g)
    for v in range(n_vars):
        holding = [i for i, bag in enumerate(jt.clusters) if v in bag]
        assert holding
        assert nx.is_connected(g.subgraph(holding))
    for k, c, _, _, inst, rows in jt.moves:
        for i, r in zip(inst, rows, strict=True):
            bag = set(jt.clusters[at[(k, int(r))]])
            assert set(plan.pair_scope[c][i].tolist()) <= bag


@pytest.mark.parametrize("seed", range(4))
def test_split_hubs_keep_a_junction_tree(seed):
    model, kwargs = random_factor_model(seed, n_vars=7, kind="loopy")
    fg = compile_model(model, **kwargs)
    plan = make_flat_plan(fg, "exact")
    _assert_junction_tree(plan)


def test_a_drm_patch_cluster_is_split_into_a_hub_and_a_leaf():
    """The first patch's cluster (768 states), where the others meet, becomes
    a hub of 96 states with the patch hung from it: the root is a hub and every
    patch cluster is a leaf."""
    import jax

    from pgm_drm.models import DeepRenderingModel

    drm = DeepRenderingModel.random(jax.random.PRNGKey(0), image_shape=(8, 8), levels=3)
    images, _ = drm.sample(jax.random.PRNGKey(1), 1)
    fg = compile_model(drm.model, image=images[0])
    plan = make_flat_plan(fg, "exact")
    jt = plan.junction
    _assert_junction_tree(plan)
    big = [k for k, sh in enumerate(jt.shapes) if int(np.prod(sh)) == 768]
    assert len(big) == 1 and jt.sizes[big[0]] == 16
    ((root_class, rows),) = jt.roots
    assert int(np.prod(jt.shapes[root_class])) == 96
    parents = {(e.parent, int(r)) for st in jt.steps for e in st for r in e.parent_rows}
    assert not any((big[0], r) in parents for r in range(16))
