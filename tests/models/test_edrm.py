"""E-DRM (Eqs. 28-31): model checks, exact inference vs references, greedy path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgm_drm.graph.compile import compile_model
from pgm_drm.inference.api import infer
from pgm_drm.inference.edrm import (
    coarse_to_fine_margin,
    exact_map_path,
    greedy_path,
    greedy_path_naive,
    leaf_log_joint,
    path_log_joint,
    path_posterior,
)
from pgm_drm.inference.reference import brute_force, enumerate_exact
from pgm_drm.models.edrm import EvolutionaryDRM
from pgm_drm.testing import assert_posteriors_close, examples

# Exact inference is compared at 1e-6 in float64 (conftest): every route sums the
# same ~5 log-terms of size <~100, whose rounding is ~1e-13.
ATOL = 1e-6

tiny_models = st.builds(
    lambda seed, c, br, sigma: EvolutionaryDRM.random(
        jax.random.PRNGKey(seed), c, br, (2, 2), sigma=sigma
    ),
    st.integers(0, 2**16),
    st.integers(1, 2),
    st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    st.sampled_from([0.3, 1.0]),
)


def _noisy(m, seed, n=1):
    images, _ = m.sample_fast(jax.random.PRNGKey(seed), n)
    return images


# ------------------------------------------------------------------ the model
def test_default_sample_and_render(key):
    m = EvolutionaryDRM.default()
    images, path = m.sample(key, 50)
    assert images.shape == (50, 8, 8)
    assert list(path) == ["c", "g2", "g1"]
    arr = m.path_array(path)  # checks every node is a child of the previous one
    assert arr.shape == (50, 3)
    # NumPyro's sampler and the ancestral one draw the same law: compare the
    # root-class frequencies loosely (2000 draws: std of a frequency ~0.011)
    _, fast = m.sample_fast(key, 2000)
    assert abs(float(np.mean(np.asarray(fast[:, 0]) == 0)) - 0.5) < 0.05
    resid = np.asarray(images - m.render(path))
    # 3200 N(0, 0.15^2) draws: the sample std is within 5% of sigma w.p. ~1 - 1e-9
    assert abs(resid.std() - m.sigma) < 0.05 * m.sigma
    assert abs(resid.mean()) < 0.02
    # the template of a path is root + each chosen mutation (Eq. 28)
    p = np.array([1, 5, 11])
    expect = m.root[1] + m.mutations[0][1, 5 % 3] + m.mutations[1][5, 11 % 2]
    np.testing.assert_allclose(m.render(p), expect)


def test_random_and_shapes():
    m = EvolutionaryDRM.random(jax.random.PRNGKey(0), 3, (2, 4), (3, 2))
    assert m.n_nodes == (3, 6, 24)
    assert m.sites == ("c", "g2", "g1")
    assert m.image_shape == (3, 2)
    assert m.templates(2).shape == (24, 3, 2)
    np.testing.assert_allclose(jnp.exp(m.log_path_prior(2)).sum(), 1.0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(root=np.zeros(4)), "root must have shape"),
        (dict(root=np.full((2, 2, 2), np.nan)), "NaN"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=np.nan), "sigma"),
        (dict(class_prior=[0.5, 0.6]), "sum to 1"),
        (dict(mutations=(np.zeros((3, 2, 2, 2)),)), "mutations\\[0\\]"),
        (dict(mutations=(np.zeros((2, 2, 3, 2)),)), "mutations\\[0\\]"),
        (dict(mutations=(np.full((2, 2, 2, 2), np.inf),)), "NaN or inf"),
        (
            dict(mutations=(np.zeros((2, 2, 2, 2)),), child_priors=(np.ones((2, 3)),)),
            "child_priors\\[0\\] must have shape",
        ),
        (
            dict(
                mutations=(np.zeros((2, 2, 2, 2)),),
                child_priors=([[0.5, 0.5], [0.9, 0.2]],),
            ),
            "sum to 1",
        ),
        (dict(mutations=(np.zeros((2, 2, 2, 2)),), child_priors=()), "levels"),
    ],
)
def test_bad_parameters(kwargs, match):
    base = dict(root=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=match):
        EvolutionaryDRM(**{**base, **kwargs})


def test_bad_inputs():
    m = EvolutionaryDRM.default()
    with pytest.raises(ValueError, match="shape"):
        path_posterior(m, np.zeros((7, 8)))
    with pytest.raises(ValueError, match="NaN"):
        greedy_path(m, np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="not a child"):
        m.render([0, 4, 9])  # node 4 is a child of root 1
    with pytest.raises(ValueError, match="L \\+ 1"):
        m.render([0, 1])
    with pytest.raises(ValueError, match="lie in"):
        m.render([0, 1, 12])
    with pytest.raises(ValueError, match="root must be"):
        greedy_path(m, np.zeros((8, 8)), root="best")


def test_child_prior_rows_within_tolerance_are_renormalised():
    """A row summing to 1 + 9e-6 (inside PRIOR_ATOL) is kept renormalised, as
    the class prior is: the path priors sum to 1 and log Z is brute force's.
    Unnormalised, the leaves' priors summed to 1 + 4.5e-6, and log Z was off by
    as much, past ATOL."""
    root = np.array([[0.0, 1.0], [1.0, 0.0]])
    muts = (np.array([[[0.1, 0.0], [0.0, 0.1]], [[0.2, 0.0], [0.0, 0.2]]]),)
    rows = np.array([[0.5, 0.5 + 9e-6], [0.5, 0.5]])
    m = EvolutionaryDRM(root, muts, 0.5, [0.5, 0.5], (rows,))
    # float64 division of two entries by their sum: ~1e-16 off 1
    np.testing.assert_allclose(np.asarray(m.child_priors[0]).sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(jnp.exp(m.log_path_prior(1)).sum(), 1.0, atol=1e-12)
    image = np.array([0.3, 0.4])
    ref = brute_force(m.model, image=image)
    np.testing.assert_allclose(path_posterior(m, image).log_z, ref.log_z, atol=ATOL)


def _wide_model():
    """Pixels on a 0..255 scale: uint8 ``x**2`` and ``-2 * x`` wrap around."""
    return EvolutionaryDRM.random(
        jax.random.PRNGKey(0), 2, (2, 3), (2, 2), scale=100.0, sigma=30.0
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.bool_])
def test_integer_images_give_the_float_answers(dtype):
    """Integer / bool pixels are the float image: converted to the model's float
    dtype at the input check, every fast pass computes on the same float64
    numbers, so the answers are bitwise equal."""
    m = _wide_model()
    ints = np.array([[[200, 17], [90, 255]], [[0, 128], [255, 3]], [[7, 99], [1, 0]]])
    x = ints.astype(dtype)
    xf = x.astype(np.float64)
    for semiring in ("sum", "max"):
        a, b = path_posterior(m, x, semiring), path_posterior(m, xf, semiring)
        np.testing.assert_array_equal(a.log_z, b.log_z)
        for s in m.sites:
            np.testing.assert_array_equal(a.log_marginals[s], b.log_marginals[s])
            np.testing.assert_array_equal(a.map[s], b.map[s])
    np.testing.assert_array_equal(leaf_log_joint(m, x), leaf_log_joint(m, xf))
    np.testing.assert_array_equal(exact_map_path(m, x), exact_map_path(m, xf))
    for root in ("compare", "choose"):
        np.testing.assert_array_equal(greedy_path(m, x, root), greedy_path(m, xf, root))
        assert greedy_path_naive(m, x[0], root) == greedy_path_naive(m, xf[0], root)


def test_empty_batch_gives_empty_results():
    """0 images: empty results of the batched shapes (as the DRM, RM, ConvRM)."""
    m = EvolutionaryDRM.random(jax.random.PRNGKey(0), 2, (2, 3), (2, 2))
    empty = np.zeros((0, 2, 2))
    assert leaf_log_joint(m, empty).shape == (0, m.n_nodes[-1])
    assert exact_map_path(m, empty).shape == (0, m.levels + 1)
    for root in ("compare", "choose"):
        assert greedy_path(m, empty, root).shape == (0, m.levels + 1)
    for semiring in ("sum", "max"):
        post = path_posterior(m, empty, semiring)
        assert post.log_z.shape == (0,)
        for d, s in enumerate(m.sites):
            assert post.log_marginals[s].shape == (0, m.n_nodes[d])
            assert post.map[s].shape == (0,)


# ------------------------------------------------------------------ exact
@settings(
    max_examples=examples(2)
)  # ~4 s per example: four compilations per random model
@given(tiny_models, st.integers(0, 100), st.sampled_from(["max", "sum"]))
def test_exact_inference_matches_references(m, seed, semiring):
    """Compiler + infer == tree pass == NumPyro enumeration == brute force."""
    image = _noisy(m, seed)[0]
    fg = compile_model(m.model, image=image)
    fast = path_posterior(m, image, semiring)
    kw = dict(model=m.model, kwargs=dict(image=image), atol=ATOL)
    assert_posteriors_close(infer(fg, semiring, image=image), fast, **kw)
    assert_posteriors_close(
        enumerate_exact(m.model, semiring=semiring, image=image), fast, **kw
    )
    assert_posteriors_close(
        brute_force(m.model, semiring=semiring, image=image), fast, **kw
    )


def test_path_posterior_batch_and_normalised():
    m = EvolutionaryDRM.random(jax.random.PRNGKey(2), 2, (2, 3), (2, 2), sigma=0.8)
    images = _noisy(m, 0, 6)
    post = path_posterior(m, images, "sum")
    for s in m.sites:
        np.testing.assert_allclose(jnp.exp(post.log_marginals[s]).sum(-1), 1.0)
    one = path_posterior(m, images[3], "sum")
    np.testing.assert_allclose(one.log_z, post.log_z[3], atol=1e-12)
    mx = path_posterior(m, images, "max")
    best = exact_map_path(m, images)
    for d, s in enumerate(m.sites):
        np.testing.assert_array_equal(mx.map[s], best[:, d])
    np.testing.assert_allclose(path_log_joint(m, images, best), mx.log_z, atol=1e-12)
    np.testing.assert_allclose(
        jax.nn.logsumexp(leaf_log_joint(m, images), axis=1), post.log_z, atol=1e-12
    )


# ------------------------------------------------------------------ greedy
@settings(max_examples=examples(2))
@given(tiny_models, st.integers(0, 100), st.sampled_from(["compare", "choose"]))
def test_greedy_matches_loop_twin_and_is_bounded_by_map(m, seed, root):
    images = _noisy(m, seed, 5)
    fast = np.asarray(greedy_path(m, images, root))
    for i in range(images.shape[0]):
        assert fast[i].tolist() == greedy_path_naive(m, images[i], root)
    # the greedy path is a path; its log-joint never exceeds brute force's max
    # (1e-9: the two sums are the same float64 terms in a different order)
    ref = brute_force(m.model, semiring="max", image=images[0])
    assert float(path_log_joint(m, images[0], fast[0])) <= float(ref.log_z) + 1e-9
    if fast[0].tolist() == [int(ref.map[s]) for s in m.sites]:
        np.testing.assert_allclose(path_log_joint(m, images[0], fast[0]), ref.log_z)


@settings(max_examples=examples(2))
@given(st.integers(0, 2**16))
def test_greedy_equals_map_in_noise_free_limit(seed):
    """sigma -> 0 with a positive coarse-to-fine margin: greedy == exact MAP."""
    m = EvolutionaryDRM.random(
        jax.random.PRNGKey(seed), 2, (2, 3), (3, 3), sigma=1e-3, decay=0.25
    )
    margin = coarse_to_fine_margin(m)
    leaves = np.arange(m.n_nodes[-1])
    truth = m.path_from_leaf(leaves)
    noise = 1e-3 * jax.random.normal(jax.random.PRNGKey(1), (len(leaves), 3, 3))
    images = m.render(truth) + noise
    exact = exact_map_path(m, images)
    np.testing.assert_array_equal(exact, truth)  # sigma 1e-3 << template gaps
    if margin > 0:  # the condition under which Eq. 30's exchange holds
        np.testing.assert_array_equal(greedy_path(m, images), exact)


def test_greedy_fails_when_a_finer_mutation_points_back():
    """A counterexample to Eq. 30's exchange of max and argmax (negative margin)."""
    m = EvolutionaryDRM(
        np.zeros((1, 2)),
        (
            np.array([[[1.0, 0.0], [0.0, 0.0]]]),
            np.array([[[-1.5, 0.0], [0.0, 3.0]], [[0.0, 1.0], [0.0, 2.0]]]),
        ),
        sigma=1e-2,
    )
    assert coarse_to_fine_margin(m) < 0
    image = m.render([0, 0, 0])  # (-0.5, 0): nearer to the *other* coarse node
    assert exact_map_path(m, image).tolist() == [0, 0, 0]
    assert greedy_path(m, image).tolist() == [0, 1, 2]
    assert greedy_path_naive(m, image) == [0, 1, 2]


def test_default_model_is_coarse_to_fine():
    m = EvolutionaryDRM.default()
    assert coarse_to_fine_margin(m) > 0
    leaves = m.path_from_leaf(np.arange(12))
    np.testing.assert_array_equal(greedy_path(m, m.render(leaves)), leaves)


def test_save_load_roundtrip(tmp_path, monkeypatch):
    """Works once io.MODEL_CLASSES registers the class (tuple fields round-trip)."""
    from pgm_drm.learning import io

    monkeypatch.setitem(io.MODEL_CLASSES, "EvolutionaryDRM", EvolutionaryDRM)
    m = EvolutionaryDRM.random(jax.random.PRNGKey(0), 2, (2, 3), (2, 2))
    path = io.save_model(tmp_path / "edrm.npz", m)
    back = io.load_model(path)
    assert back.n_nodes == m.n_nodes and back.sigma == m.sigma
    for a, b in zip(back.mutations, m.mutations, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.templates(2), m.templates(2))


def test_is_a_pytree_and_new_parameters_do_not_trace_again():
    """Leaves are the fields; the derived templates and path priors follow the
    leaves through jit (unflattening skips __post_init__)."""
    m = EvolutionaryDRM.random(jax.random.PRNGKey(0), 2, (3, 2), (2, 2))
    other = EvolutionaryDRM.random(jax.random.PRNGKey(1), 2, (3, 2), (2, 2))
    traces = []

    @jax.jit
    def derived(model):
        traces.append(1)
        return model.templates(2), model.log_path_prior(2)

    for model in (m, other):
        templates, log_prior = derived(model)
        np.testing.assert_array_equal(templates, model.templates(2))
        np.testing.assert_array_equal(log_prior, model.log_path_prior(2))
    assert len(traces) == 1
    assert len(jax.tree.leaves(m)) == 1 + 2 + 1 + 1 + 2  # root, muts, sigma, priors


def test_finite_pixels_whose_scores_overflow_are_refused_by_name():
    """As the DRM's: the leaf scores of pixels near 1e200 overflow float64; the
    marginals and the MAP path read from them were wrong, silently."""
    m = EvolutionaryDRM.default()
    images = np.stack([m.render([1, 4, 9]), m.render([0, 2, 5])])
    huge = images.copy()
    huge[0] *= 1e200
    for fn in (path_posterior, exact_map_path, leaf_log_joint):
        with pytest.raises(ValueError, match=r"images \[0\].*overflowed float64"):
            fn(m, huge)
    assert np.all(np.isfinite(path_posterior(m, images).log_z))
