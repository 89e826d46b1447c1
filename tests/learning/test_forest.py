"""InfoMax E-DRM trees and forests (Eqs. 32-33, §4.2.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgm_drm.inference.edrm import exact_map_path
from pgm_drm.learning.forest import (
    ForestParams,
    TreeParams,
    _relax,
    entropy,
    fit_infomax_forest,
    fit_infomax_tree,
    forest_predict_proba,
    generative_split,
    information_gain,
    leaf_histograms,
    soft_information_gain,
    tree_apply,
    tree_apply_naive,
    tree_predict_proba,
)
from pgm_drm.models.edrm import EvolutionaryDRM
from pgm_drm.testing import examples

# Relaxation kept short in tests: the jitted scan compiles once per frontier size.
FAST = dict(relax_steps=10, max_depth=4)


@pytest.fixture(scope="module")
def data():
    """240 noisy images from the default E-DRM, label = coarse category (6)."""
    m = EvolutionaryDRM.default(sigma=0.3)
    x, path = m.sample_fast(jax.random.PRNGKey(0), 240)
    return np.asarray(x), np.asarray(path[:, 1]), m


def test_entropy_and_gain_by_hand():
    np.testing.assert_allclose(entropy([1, 1, 0]), np.log(2))
    assert entropy([0, 0]) == 0.0
    # parent [4, 4] -> children [3, 1], [1, 3]: ln2 - H(3/4, 1/4)
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    np.testing.assert_allclose(information_gain([[3, 1], [1, 3]]), np.log(2) - h)
    assert information_gain([[2, 2], [0, 0]]) == 0.0


@settings(max_examples=examples(8))
@given(st.integers(0, 2**16))
def test_soft_gain_equals_hard_gain_for_hard_routing(seed):
    rng = np.random.default_rng(seed)
    n, b, k = 30, 3, 4
    route, y, w = rng.integers(b, size=n), rng.integers(k, size=n), rng.random(n)
    soft = soft_information_gain(jnp.eye(b)[route], jnp.eye(k)[y], jnp.asarray(w))
    hard = information_gain(leaf_histograms(route, y, b, k, w))
    # the same sums of ~30 float64 terms in a different order: 1e-10
    np.testing.assert_allclose(float(soft), hard, atol=1e-10)


def test_leaf_histograms_of_edrm_paths(data):
    """§4.2.1: exact E-DRM paths mapped to labels; with labels = coarse category,
    each leaf's histogram is pure (a leaf lies below one coarse node)."""
    x, y, m = data
    leaves = np.asarray(exact_map_path(m, x)[:, -1])
    h = leaf_histograms(leaves, y, m.n_nodes[-1], 6)
    assert h.sum() == len(y)
    reached = h.sum(axis=1) > 0
    assert np.all(np.count_nonzero(h[reached], axis=1) == 1)
    with pytest.raises(ValueError, match="lie in"):
        leaf_histograms([5], [0], 2, 2)


def test_generative_split_is_nearest_template(data):
    x, y, _ = data
    x2 = x.reshape(len(x), -1)
    f, b = generative_split(x2, y, np.ones(len(y)), 6, 2, np.random.default_rng(0))
    route = np.argmax(x2 @ f.T + b, axis=1)
    assert set(np.unique(route)) == {0, 1}
    assert information_gain(leaf_histograms(route, y, 2, 6)) > 0.5


def test_relaxation_increases_soft_gain(data):
    x, y, _ = data
    x2 = jnp.asarray(x.reshape(len(x), -1))
    f, b = generative_split(
        np.asarray(x2), y, np.ones(len(y)), 6, 2, np.random.default_rng(0)
    )
    *_, trace = _relax(
        jnp.asarray(f[None] * 0.01),
        jnp.asarray(b[None] * 0.01),
        x2,
        jnp.eye(6)[y],
        jnp.ones(len(y)),
        jnp.zeros(len(y), dtype=int),
        jnp.ones((1, x2.shape[1])),
        0.05,
        n_slots=1,
        steps=30,
    )
    assert float(trace[-1]) > float(trace[0])


def test_tree_apply_matches_loop_twin(data):
    x, y, _ = data
    x2 = x.reshape(len(x), -1)
    tree = fit_infomax_tree(x2, y, 6, TreeParams(branching=3, relax_steps=0))
    leaves = tree_apply(tree, x2)
    assert all(leaves[i] == tree_apply_naive(tree, x2[i]) for i in range(0, 240, 7))
    assert np.all(tree.is_leaf[leaves])
    # every node's histogram is the sum of its children's (§4.2.1)
    for node in np.flatnonzero(~tree.is_leaf):
        kids = tree.children[node][tree.children[node] >= 0]
        np.testing.assert_allclose(tree.counts[kids].sum(0), tree.counts[node])


def test_forest_averages_its_trees_and_replays_their_seeds(data):
    """Eq. 32 with p(t) = 1/T; tree t is the tree grown alone from seeds[t] on
    its bootstrap weights (drawn from the same generator, after the seeds)."""
    x, y, _ = data
    x2 = x.reshape(len(x), -1)
    params = ForestParams(n_estimators=2, **FAST)
    forest = fit_infomax_forest(x2, y, 6, params, rng=np.random.default_rng(5))
    rng = np.random.default_rng(5)
    seeds = rng.integers(2**31 - 1, size=2)
    np.testing.assert_array_equal(forest.seeds, seeds)
    for tree, seed in zip(forest.trees, seeds, strict=True):
        w = np.bincount(rng.integers(len(y), size=len(y)), minlength=len(y))
        alone = fit_infomax_tree(
            x2, y, 6, TreeParams.of(params), weights=w, rng=np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(tree.children, alone.children)
        np.testing.assert_array_equal(tree.counts, alone.counts)
        assert tree.counts[0].sum() == len(y)  # a resample of N rows
    mean = (
        tree_predict_proba(forest.trees[0], x2)
        + tree_predict_proba(forest.trees[1], x2)
    ) / 2
    np.testing.assert_allclose(forest_predict_proba(forest, x2), mean, atol=1e-15)
    with pytest.raises(ValueError, match="n_estimators"):
        fit_infomax_forest(x2, y, 6, ForestParams(n_estimators=0))


def test_tree_params_are_validated_by_the_fit(data):
    x, y, _ = data
    x2 = x.reshape(len(x), -1)
    with pytest.raises(ValueError, match="branching"):
        fit_infomax_tree(x2, y, 6, TreeParams(branching=1))
    with pytest.raises(ValueError, match="max_features"):
        fit_infomax_tree(x2, y, 6, TreeParams(max_features=65, relax_steps=0))
