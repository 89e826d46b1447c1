"""Discriminative relaxation (§2.7, Eq. 25): exact generative start, training, I/O.

Tolerances: the relaxed network and the generative passes compute the same sums
in float64 in a different order (and drop per-image constants of size ~1e2), so
they agree to ~1e-12; 1e-6 leaves room and still catches any wrong bias term
(the smallest, ``ln pi_g`` differences, are ~1e-2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgm_drm.inference.dcn import dcn_infer
from pgm_drm.learning.discriminative import (
    DCNNet,
    calibrate_scale,
    class_scores,
    fit_discriminative,
    init_from_drm,
    init_from_rm,
    init_random,
    predict,
    predict_proba,
)
from pgm_drm.learning.loop import LoopOptions
from pgm_drm.models import DeepRenderingModel, RenderingModel, default_templates
from pgm_drm.testing import examples

ATOL = 1e-6
QUIET = LoopOptions(progress=False)


def _shifted(scores, semiring):
    """Remove the per-image constant: normalise as ``dcn_infer`` does."""
    if semiring == "max":
        return scores - jnp.max(scores, axis=-1, keepdims=True)
    return jax.nn.log_softmax(scores, axis=-1)


@settings(max_examples=examples(2))
@given(
    seed=st.integers(0, 2**16),
    shape_levels=st.sampled_from(
        [((4, 4), 1), ((8, 8), 2), ((8, 8), 3), ((16, 16), 3)]
    ),
    semiring=st.sampled_from(["max", "sum"]),
)
def test_init_from_drm_equals_generative_class_scores(seed, shape_levels, semiring):
    shape, levels = shape_levels
    key = jax.random.PRNGKey(seed)
    drm = DeepRenderingModel.random(key, shape, levels=levels)
    # Any image will do for an identity of score functions; Gaussian noise
    # around 0.5 is cheaper than drm.sample and exercises both switch branches.
    images = 0.5 + jax.random.normal(jax.random.fold_in(key, 1), (5, *shape))
    net = init_from_drm(drm, semiring)
    got = _shifted(class_scores(net, images), semiring)
    want = dcn_infer(drm, images, semiring).class_log_posterior
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_init_from_drm_default_model_and_off_images():
    drm = DeepRenderingModel.default()
    images, _ = drm.sample(jax.random.PRNGKey(3), 4)  # mostly-OFF units
    images = jnp.concatenate([images, jnp.zeros((1, 24, 24))])  # all-OFF image
    got = _shifted(class_scores(init_from_drm(drm), images), "max")
    want = dcn_infer(drm, images, "max").class_log_posterior
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_init_from_drm_rejects_deterministic_switch():
    drm = DeepRenderingModel.random(jax.random.PRNGKey(0), (8, 8), levels=2)
    import dataclasses

    on = dataclasses.replace(drm, switch_priors=(1.0,))
    with pytest.raises(ValueError, match="switch priors in"):
        init_from_drm(on)


@pytest.mark.parametrize("switch", [None, 0.7])
@pytest.mark.parametrize("semiring", ["max", "sum"])
def test_init_from_rm_equals_rm_class_scores(switch, semiring):
    rm = RenderingModel(
        default_templates(),
        sigma=0.4,
        class_prior=np.array([0.2, 0.3, 0.5]),
        nuisance_prior=np.array([0.1, 0.2, 0.3, 0.4]),
        switch_prior=switch,
    )
    images = jax.random.uniform(jax.random.PRNGKey(0), (7, 6, 6))
    got = class_scores(init_from_rm(rm, semiring), images)
    np.testing.assert_allclose(got, rm.class_log_scores(images, semiring), atol=ATOL)


def test_init_from_rm_non_square_images():
    rm = RenderingModel(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 5)))
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5))
    got = class_scores(init_from_rm(rm), images)
    np.testing.assert_allclose(got, rm.class_log_scores(images), atol=ATOL)


@functools.cache
def _toy_problem(n=120):
    """Three stroke classes at four translations, sigma 0.6 (cached: sampling
    through Predictive costs seconds)."""
    rm = RenderingModel(default_templates(), sigma=0.6)
    images, latents = rm.sample(jax.random.PRNGKey(0), n)
    return rm, images, latents["c"]


@pytest.mark.parametrize("start", ["rm", "placed"])
def test_training_decreases_loss(start):
    rm, images, labels = _toy_problem()
    key = jax.random.PRNGKey(2)
    net = {
        "rm": rm,
        "placed": init_random(
            key, (6, 6), 3, windows=(3, 2), states=(4,), template_sizes=(2, None)
        ),
    }[start]
    fit = fit_discriminative(
        net, images, labels, epochs=5, batch_size=20, lr=1e-2, loop=QUIET
    )
    loss = fit.history["train_loss"]
    assert loss.shape == (6,)
    # Adam at lr 1e-2 over 30 steps on a 3-class problem: the loss drops well
    # below its start; comparing ends (not every epoch) allows SGD noise.
    assert loss[-1] < loss[0]
    assert fit.best_epoch == 5


def test_validation_split_and_early_stopping():
    rm, images, labels = _toy_problem()
    fit = fit_discriminative(
        rm,
        images,
        labels,
        epochs=30,
        batch_size=16,
        lr=3e-2,
        val_fraction=0.25,
        patience=2,
        monitor="acc",
        loop=QUIET,
    )
    h = fit.history
    assert set(h) == {"train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    assert len(h["val_acc"]) == len(h["train_acc"]) <= 31
    assert h["val_acc"][fit.best_epoch] == h["val_acc"].max()


def test_resume_equals_an_uninterrupted_fit(tmp_path):
    """The epochs are the loop's steps: the net, Adam's moments, the shuffle key
    and the best epoch so far are checkpointed, so a resumed fit ends where an
    uninterrupted one ends (bit for bit; only the wall times differ)."""
    rm, images, labels = _toy_problem()
    kw = dict(batch_size=16, lr=3e-2, val_fraction=0.25, patience=3)
    straight = fit_discriminative(rm, images, labels, epochs=6, loop=QUIET, **kw)
    path = tmp_path / "relax.npz"
    ckpt = LoopOptions(progress=False, checkpoint=path, every=2, resume=True)
    fit_discriminative(rm, images, labels, epochs=3, loop=ckpt, **kw)
    resumed = fit_discriminative(rm, images, labels, epochs=6, loop=ckpt, **kw)
    assert resumed.best_epoch == straight.best_epoch
    assert set(resumed.history) == set(straight.history)
    for k in set(straight.history) - {"seconds"}:
        np.testing.assert_array_equal(resumed.history[k], straight.history[k])
    assert np.all(np.diff(resumed.history["seconds"]) > 0)
    for a, b in zip(
        jax.tree.leaves(resumed.net), jax.tree.leaves(straight.net), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="different fit"):
        fit_discriminative(
            rm, images, labels, epochs=6, loop=ckpt, **(kw | {"lr": 1e-2})
        )


def test_predict_proba_rows_sum_to_one_and_predict_is_argmax():
    net = init_random(
        jax.random.PRNGKey(0),
        (8, 8),
        10,
        windows=(3, 2, 3),
        strides=(1, 2, 1),
        states=(4, 5),
        pieces=2,
    )
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8))
    p = predict_proba(net, x)
    assert p.shape == (6, 10)
    # float64 softmax: rows sum to 1 within a few ulp.
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(predict(net, x), jnp.argmax(p, -1))
    assert predict(net, x[0]).shape == ()


def test_bad_inputs():
    rm, images, labels = _toy_problem()
    net = init_from_rm(rm)
    with pytest.raises(ValueError, match="shape"):
        class_scores(net, jnp.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="shape"):
        fit_discriminative(net, images[:, :5], labels, epochs=1, loop=QUIET)
    with pytest.raises(ValueError, match="NaN"):
        fit_discriminative(
            net, images.at[0, 0, 0].set(jnp.nan), labels, epochs=1, loop=QUIET
        )
    with pytest.raises(ValueError, match="NaN"):
        predict(net, images.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="labels must lie"):
        fit_discriminative(net, images, labels.at[0].set(3), epochs=1, loop=QUIET)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_discriminative(net, images, labels.at[0].set(-1), epochs=1, loop=QUIET)
    with pytest.raises(ValueError, match="labels must have shape"):
        fit_discriminative(net, images, labels[:-1], epochs=1, loop=QUIET)
    with pytest.raises(ValueError, match="integers"):
        fit_discriminative(net, images, labels + 0.5, epochs=1, loop=QUIET)
    with pytest.raises(TypeError):
        fit_discriminative("net", images, labels, epochs=1, loop=QUIET)
    with pytest.raises(ValueError, match="top level"):
        init_random(jax.random.PRNGKey(0), (8, 8), 3, windows=(2, 2), states=(4,))
    with pytest.raises(ValueError, match="tile"):
        init_random(jax.random.PRNGKey(0), (8, 8), 3, windows=(3, 3), states=(4,))


def test_calibrate_scale_keeps_decisions_and_lowers_loss():
    rm, images, labels = _toy_problem()
    sharp = init_from_rm(rm.replace(sigma=0.05))  # saturated scores ~1/sigma^2
    calibrated = calibrate_scale(sharp, images, labels)
    np.testing.assert_array_equal(predict(calibrated, images), predict(sharp, images))
    fit0 = fit_discriminative(sharp, images, labels, epochs=0, loop=QUIET)
    fit1 = fit_discriminative(
        sharp, images, labels, epochs=0, calibrate=True, loop=QUIET
    )
    assert fit1.history["train_loss"][0] <= fit0.history["train_loss"][0]


def test_net_is_a_pytree_of_params():
    net = init_from_rm(RenderingModel(default_templates(), sigma=0.5))
    assert isinstance(net, DCNNet)
    leaves = jax.tree.leaves(net)
    assert [leaf.shape for leaf in leaves] == [(3, 4, 1, 36), (3, 4)]
