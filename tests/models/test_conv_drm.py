"""ConvRenderingModel: structure, sampling, rendering and bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density

from pgm_drm.models import ConvRenderingModel


def test_shapes_and_cover():
    m = ConvRenderingModel.random(jax.random.PRNGKey(0), stride=2, patch=3, grid=3)
    assert m.image_shape == (7, 7) and m.overlap == 1 and m.n_nuisances == 4
    # every pixel belongs to exactly one cover group, covered by 1, 2 or 4 units
    groups = m.cover()
    pixels = np.concatenate([p for _, p in groups])
    assert sorted(pixels.tolist()) == list(range(49))
    assert sorted({len(u) for u, _ in groups}) == [1, 2, 4]


def test_sample_render_and_model_agree(key):
    """Images are the rendered mean plus noise, and the NumPyro model's log
    density of the sampled latents is the Gaussian density of that residual."""
    m = ConvRenderingModel.random(key, stride=2, patch=3, grid=3, sigma=0.4)
    images, lat = m.sample(jax.random.PRNGKey(3), 6)
    assert images.shape == (6, 7, 7) and lat["a"].shape == (6, 3, 3)
    mean = m.render(lat)
    for i in range(6):
        values = {"c": lat["c"][i], "g": lat["g"][i]}
        values.update(
            {f"a_{u // 3}_{u % 3}": lat["a"][i].reshape(-1)[u] for u in range(9)}
        )
        lp, _ = log_density(m.model, (), {"image": images[i]}, values)
        resid = images[i] - mean[i]
        expect = (
            jnp.log(m.class_prior[lat["c"][i]])
            + jnp.log(m.nuisance_prior[lat["g"][i]])
            + jnp.sum(jnp.where(lat["a"][i] > 0, jnp.log(0.9), jnp.log(0.1)))
            + jnp.sum(-0.5 * (resid / 0.4) ** 2 - jnp.log(0.4 * jnp.sqrt(2 * jnp.pi)))
        )
        # float64 sums of 49 Gaussian terms: rounding ~1e-13
        assert abs(float(lp) - float(expect)) < 1e-9


def test_overlapping_patches_add():
    pix = np.ones((1, 2, 2))
    m = ConvRenderingModel(
        pixel_templates=pix,
        class_templates=np.zeros((1, 2, 2), dtype=int),
        grid=2,
        stride=1,
        class_prior=[1.0],
        nuisance_prior=[1.0],
    )
    img = m.render({"c": 0, "g": 0, "a": np.ones((2, 2))})
    np.testing.assert_allclose(img, [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stride": 0}, "stride"),
        ({"stride": 4}, "stride"),
        ({"grid": 1}, "exceeds the unit grid"),
        ({"sigma": -1.0}, "sigma"),
        ({"class_prior": [0.5, 0.6]}, "class_prior"),
        ({"class_templates": np.full((2, 2, 2), 7)}, "outside"),
        ({"switch_prior": 1.5}, "switch_prior"),
    ],
)
def test_bad_parameters(kwargs, match):
    base = dict(
        pixel_templates=np.ones((2, 3, 3)),
        class_templates=np.zeros((2, 2, 2), dtype=int),
        grid=3,
        stride=2,
        class_prior=[0.5, 0.5],
        nuisance_prior=np.full(4, 0.25),
    )
    with pytest.raises(ValueError, match=match):
        ConvRenderingModel(**{**base, **kwargs})


def test_wrong_image_shape_is_named(key):
    from pgm_drm.inference import conv_dcn_infer

    m = ConvRenderingModel.random(key)
    with pytest.raises(ValueError, match="shape"):
        conv_dcn_infer(m, np.zeros((4, 6, 6)))
    with pytest.raises(ValueError, match="NaN"):
        conv_dcn_infer(m, np.full(m.image_shape, np.nan))


def test_integer_images_are_the_float_images(key):
    """uint8 pixels are converted to the model's float dtype at the check: the
    patches' ``||I||^2`` wrapped around in uint8 (log Z +2.4e6). The same float64
    numbers after the conversion, so the outputs are bitwise equal."""
    from pgm_drm.inference import conv_dcn_infer

    shape = dict(stride=2, patch=2, grid=2, n_states=2, n_classes=2, class_size=1)
    m = ConvRenderingModel.random(key, **shape, sigma=60.0)
    x = np.random.default_rng(0).integers(0, 256, size=(2, *m.image_shape))
    x = x.astype(np.uint8)
    for semiring in ("sum", "max"):
        a = conv_dcn_infer(m, x, semiring)
        b = conv_dcn_infer(m, x.astype(np.float64), semiring)
        np.testing.assert_array_equal(a.log_z, b.log_z)
        np.testing.assert_array_equal(a.class_log_posterior, b.class_log_posterior)


def test_unit_table_places_class_template():
    m = ConvRenderingModel.random(jax.random.PRNGKey(1), grid=3, class_size=2)
    table = np.asarray(m.unit_table()).reshape(m.n_classes, 4, 3, 3)
    for c, (g, (dy, dx)) in itertools.product(
        range(m.n_classes), enumerate([(0, 0), (0, 1), (1, 0), (1, 1)])
    ):
        np.testing.assert_array_equal(
            table[c, g, dy : dy + 2, dx : dx + 2], m.class_templates[c]
        )
        assert (table[c, g] == m.n_states).sum() == 5


def test_new_parameters_do_not_trace_again(monkeypatch):
    """The model is a pytree (grid, stride static): the DCN pass compiled for one
    model serves another of the same structure. Traces are counted by a Python
    side effect in the pass, which runs only while jit traces."""
    from pgm_drm.inference import conv_dcn_infer

    traces = []
    level_scores = ConvRenderingModel.level_scores

    def counted(self, level, below):
        traces.append(level)
        return level_scores(self, level, below)

    monkeypatch.setattr(ConvRenderingModel, "level_scores", counted)
    rng = np.random.default_rng(0)

    def model():  # by hand: ConvRenderingModel.random compiles a Dirichlet draw
        return ConvRenderingModel(
            pixel_templates=rng.normal(size=(3, 3, 3)),
            class_templates=rng.integers(0, 4, size=(2, 2, 2)),
            grid=2,
            stride=2,
            class_prior=rng.dirichlet(np.ones(2)),
            nuisance_prior=np.ones(1),
            switch_prior=rng.uniform(0.2, 0.8),
            sigma=rng.uniform(0.5, 1.0),
        )

    first, second = model(), model()
    x = jax.random.normal(jax.random.PRNGKey(2), (5, *first.image_shape))
    a = conv_dcn_infer(first, x)
    assert traces
    before = len(traces)
    b = conv_dcn_infer(second, x)
    assert len(traces) == before
    assert not np.allclose(a.log_z, b.log_z)


def test_finite_pixels_whose_scores_overflow_are_refused_by_name():
    """As the DRM's: pixels near 1e200 are finite, ``||I||^2`` is not (float64
    max 1.8e308); conv_dcn_infer returned log Z -inf silently."""
    from pgm_drm.inference import conv_dcn_infer

    m = ConvRenderingModel.random(jax.random.PRNGKey(0), stride=2, sigma=0.3)
    images = np.array(m.sample(jax.random.PRNGKey(1), 3)[0])
    huge = images.copy()
    huge[2] *= 1e200
    with pytest.raises(ValueError, match=r"images \[2\].*overflowed float64"):
        conv_dcn_infer(m, huge)
    assert np.all(np.isfinite(conv_dcn_infer(m, images).log_z))
