"""RenderingModel: sampling, natural parameters, MS-/SP-RMC against exact posteriors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import compile_model
from pgm_drm.inference import brute_force, infer
from pgm_drm.models import RenderingModel, default_templates
from pgm_drm.testing import random_rendering_model


def test_sample_shapes_and_latents(key):
    rm = RenderingModel(default_templates(), sigma=0.3, switch_prior=0.8)
    images, latents = rm.sample(key, 50)
    assert images.shape == (50, 6, 6)
    assert set(latents) == {"c", "g", "a"}
    assert all(v.shape == (50,) for v in latents.values())
    # With small noise an ON image is its template plus noise of scale sigma.
    mu = rm.templates[latents["c"], latents["g"]] * latents["a"][:, None, None]
    resid = np.asarray(images - mu)
    assert abs(resid.std() - 0.3) < 0.03  # 1800 draws: std error of std ~ 0.005


def test_no_switch_means_no_a_site(key):
    rm = RenderingModel(default_templates(), sigma=0.3)
    _, latents = rm.sample(key, 3)
    assert set(latents) == {"c", "g"}


def test_natural_parameters_give_the_log_joint():
    rm, kw = random_rendering_model(3, switch=False)
    w, b = rm.natural_parameters()
    img = kw["image"]
    post = brute_force(rm.model, **kw)
    # log p(c, g, I) = <w_cg, I> + b_cg - ||I||^2 / 2s^2 - D/2 log(2 pi s^2)  (Eq. 7-8)
    d = img.size
    const = -jnp.sum(img**2) / (2 * rm.sigma**2) - d / 2 * jnp.log(
        2 * jnp.pi * rm.sigma**2
    )
    logp = (
        jnp.einsum("cgd,d->cg", w.reshape(*w.shape[:2], -1), img.reshape(-1))
        + b
        + const
    )
    np.testing.assert_allclose(
        float(jax.nn.logsumexp(logp)), float(post.log_z), atol=1e-9
    )


@given(
    seed=st.integers(0, 10_000),
    switch=st.booleans(),
    semiring=st.sampled_from(["max", "sum"]),
)
def test_classify_is_argmax_of_exact_posterior(seed, switch, semiring):
    rm, _ = random_rendering_model(seed, switch=switch)
    images, _ = rm.sample(jax.random.PRNGKey(seed), 16)
    fg = compile_model(rm.model, image=images[0])
    post = infer(fg, semiring, image=images)
    expected = jnp.argmax(post.log_marginals["c"], axis=-1)
    np.testing.assert_array_equal(rm.classify(images, semiring), expected)
    # The scores are the exact class log-(max-)marginals up to a per-image shift.
    scores = rm.class_log_scores(images, semiring)
    shift = scores - post.log_marginals["c"]
    # float64 logsumexp over <= 2*4 terms: agreement to 1e-9 is round-off.
    np.testing.assert_allclose(shift - shift[:, :1], 0.0, atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma must be"),
        ({"sigma": -1.0}, "sigma must be"),
        ({"class_prior": [0.5, 0.6, -0.1]}, "negative"),
        ({"class_prior": [0.5, 0.2, 0.2]}, "sum to 1"),
        ({"class_prior": [0.5, 0.5]}, "expected 3"),
        ({"nuisance_prior": [0.25, 0.25, 0.25, np.nan]}, "NaN"),
        ({"switch_prior": 1.5}, "switch_prior"),
        ({"templates": np.zeros((3, 4))}, "templates must have shape"),
        ({"templates": np.full((3, 4, 2, 2), np.inf)}, "templates contain NaN"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    base = {"templates": default_templates(), "sigma": 1.0}
    with pytest.raises(ValueError, match=message):
        RenderingModel(**{**base, **kwargs})


def test_bad_images_are_named():
    rm = RenderingModel(default_templates(), sigma=1.0)
    with pytest.raises(ValueError, match="image has shape"):
        rm.classify(jnp.zeros((5, 5)))
    with pytest.raises(ValueError, match="NaN or inf"):
        rm.classify(jnp.full((6, 6), jnp.nan))
    fg = compile_model(rm.model, image=jnp.zeros((6, 6)))
    with pytest.raises(ValueError, match="evidence 'image' has shape"):
        infer(fg, image=jnp.zeros((2, 5, 6)))
    with pytest.raises(ValueError, match="NaN or inf"):
        infer(fg, image=jnp.full((6, 6), jnp.inf))
    with pytest.raises(ValueError, match="unknown evidence 'img'"):
        infer(fg, img=jnp.zeros((6, 6)))


def test_integer_templates_become_float():
    """uint8 templates (prototype images) are stored as float, as the factor
    model's: ``||mu||^2`` in uint8 wrapped around and changed the argmax class."""
    rng = np.random.default_rng(0)
    t8 = rng.integers(0, 256, size=(3, 1, 2, 2)).astype(np.uint8)
    img = t8[1, 0] + 5 * rng.normal(size=(2, 2))
    a = RenderingModel(t8, sigma=20.0)
    b = RenderingModel(t8.astype(np.float64), sigma=20.0)
    assert jnp.issubdtype(a.templates.dtype, jnp.floating)
    for semiring in ("max", "sum"):
        # the same float64 templates: bitwise the same scores
        np.testing.assert_array_equal(
            a.class_log_scores(img, semiring), b.class_log_scores(img, semiring)
        )
    assert int(a.classify(img)) == 1


def test_model_is_a_pytree_of_its_parameters():
    rm = RenderingModel(default_templates(4), sigma=0.5, switch_prior=0.9)
    assert len(jax.tree.leaves(rm)) == 5  # mu, sigma, pi_c, pi_g, pi_a
    # No switch is another structure (an empty subtree), not another value.
    plain = RenderingModel(default_templates(4), sigma=0.5)
    assert jax.tree.structure(plain) != jax.tree.structure(rm)
    # A traced argument of jit: new parameter values reuse the program.
    traces = []

    def _natural(m):
        traces.append(1)  # runs once per trace, not per call
        return m.natural_parameters()

    natural = jax.jit(_natural)
    for m in (rm, rm.replace(sigma=0.25, switch_prior=0.5)):
        for got, want in zip(natural(m), m.natural_parameters(), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12)
    # Counted by a side effect: jit's C++ cache size was a flaky proxy.
    assert len(traces) == 1
    # Unflattening skips validation, so grad can put tracers in the leaves:
    # d/dsigma sum_cg b_cg = sum_cg ||mu_cg||^2 / sigma^3 and
    # d/dpi_a sum_cg b_cg = C G / pi_a (Eq. 8).
    grad = jax.grad(lambda m: jnp.sum(m.natural_parameters()[1]))(rm)
    assert isinstance(grad, RenderingModel)
    np.testing.assert_allclose(
        grad.sigma, float(jnp.sum(rm.templates**2)) / 0.5**3, rtol=1e-12
    )
    np.testing.assert_allclose(grad.switch_prior, 12 / 0.9, rtol=1e-12)
