"""Hard EM for the tree DRM (pgm_drm/learning/drm_em.py).

Every test shares one synthetic data set (same shapes -> the jitted step compiles
once); the whole file runs in well under a minute on two CPU cores.
"""

import os

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from pgm_drm.inference.dcn import dcn_infer
from pgm_drm.learning.drm_em import (
    drm_em_init,
    drm_log_joint,
    drm_map,
    fit_drm_classifier,
    fit_drm_em,
)
from pgm_drm.learning.loop import LoopOptions
from pgm_drm.models.drm import DeepRenderingModel

QUIET = LoopOptions(progress=False)

N = 600
STRUCTURE = {"windows": (4, 2), "n_states": (4, 3), "template_sizes": (3, 2)}


@pytest.fixture(scope="module")
def truth():
    """A 2-level DRM on 8x8 images: four 3x3 strokes placed in 4x4 patches (four
    translations), three classes = 2x2 maps of strokes (20% OFF), sigma 0.2."""
    return DeepRenderingModel.random(
        jax.random.PRNGKey(0),
        image_shape=(8, 8),
        levels=2,
        states=STRUCTURE["n_states"],
        template_sizes=STRUCTURE["template_sizes"],
        sigma=0.2,
    )


@pytest.fixture(scope="module")
def data(truth):
    return truth.sample(jax.random.PRNGKey(5), N)


def _fit(images, **kw):
    kw.setdefault("n_iter", 15)
    kw.setdefault("loop", QUIET)
    return fit_drm_em(images, **STRUCTURE, **kw)


# ---- E-step ------------------------------------------------------------------------
def test_map_equals_dcn_infer_and_log_joint(truth, data):
    images, _ = data
    z, best = drm_map(truth, images)
    ref = dcn_infer(truth, images, "max")
    assert set(z) == set(ref.map)
    for k in ref.map:
        np.testing.assert_array_equal(z[k], ref.map[k], err_msg=k)
    # Same float64 sums in another order (and a direct sum of ~70 site
    # log-probabilities of size <= 1e2): rounding ~1e-13.
    np.testing.assert_allclose(best, ref.log_z, atol=1e-9)
    np.testing.assert_allclose(drm_log_joint(truth, images, z), best, atol=1e-9)


def test_clamped_map_fixes_the_class(truth, data):
    images, latents = data
    labels = (np.asarray(latents["c"]) + 1) % truth.n_classes  # mostly wrong ones
    z, best = drm_map(truth, images, labels=labels)
    free, free_best = drm_map(truth, images)
    np.testing.assert_array_equal(z["c"], labels)
    np.testing.assert_allclose(drm_log_joint(truth, images, z), best, atol=1e-9)
    assert np.all(np.asarray(best) <= np.asarray(free_best) + 1e-9)
    # -1 = unlabelled: the free MAP.
    z_semi, _ = drm_map(truth, images, labels=np.full(N, -1))
    np.testing.assert_array_equal(z_semi["c"], free["c"])


def test_new_parameters_of_one_structure_do_not_trace_again(truth, data, monkeypatch):
    """The model is a pytree traced by jit: a second fit (new parameter values,
    same structure) and inference with its model reuse the compiled programs.
    Traces are counted by a Python side effect in the pass, which runs only
    while jit traces."""
    images, _ = data
    traces = []
    level_scores = DeepRenderingModel.level_scores

    def counted(self, level, below):
        traces.append(level)
        return level_scores(self, level, below)

    monkeypatch.setattr(DeepRenderingModel, "level_scores", counted)
    first = _fit(images, n_iter=2, tol=None, key=jax.random.PRNGKey(0)).model
    dcn_infer(first, images)
    drm_map(first, images[:9])  # a batch size no other test uses: traces here
    assert traces
    before = len(traces)
    second = _fit(images, n_iter=3, tol=None, key=jax.random.PRNGKey(1)).model
    assert not np.array_equal(second.pixel_templates, first.pixel_templates)
    dcn_infer(second, images)
    drm_map(second, images[:9])
    drm_map(truth, images[:9])  # a model built by hand: the same leaf types
    assert len(traces) == before


# ---- learning ----------------------------------------------------------------------
def _template_error(truth, fitted, latents) -> np.ndarray:
    """Max-abs error per pixel template the truth uses, after the best matching."""
    used = np.unique(np.asarray(latents["s1"]))
    used = used[used < truth.n_states[0]]
    a = np.asarray(truth.pixel_templates).reshape(truth.n_states[0], -1)[used]
    b = np.asarray(fitted.pixel_templates).reshape(fitted.n_states[0], -1)
    cost = np.max(np.abs(a[:, None] - b[None]), axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols]


def _class_accuracy(truth_c, fitted_c, k) -> float:
    """Accuracy up to the best relabelling of the fitted classes."""
    table = np.zeros((k, k))
    np.add.at(table, (np.asarray(truth_c), np.asarray(fitted_c)), 1)
    rows, cols = linear_sum_assignment(-table)
    return table[rows, cols].sum() / len(truth_c)


def test_recovers_the_generating_model(truth, data):
    images, latents = data
    fit = _fit(images, key=jax.random.PRNGKey(0))
    err = _template_error(truth, fit.model, latents)
    # Each template is a mean of >= ~300 noisy patches (sigma 0.2): standard error
    # ~0.2 / sqrt(300) ~ 0.012 per pixel; 0.06 is ~5 standard errors for the
    # largest of 36 pixels.
    assert np.all(err < 0.06), err
    z, _ = drm_map(fit.model, images)
    # The generating model's own MAP class is right on 99.8% of these images
    # (some renderings are ambiguous); the fit must come within 1%.
    acc = _class_accuracy(latents["c"], z["c"], truth.n_classes)
    assert acc >= 0.985, acc
    assert abs(fit.model.sigma - 0.2) < 0.01  # 38k residuals: SE of sigma ~1e-3
    assert np.all(np.diff(fit.objective) >= -1e-9)


def test_from_a_perturbed_model_with_labels(truth, data):
    images, latents = data
    noisy = np.asarray(truth.pixel_templates) + 0.5 * np.asarray(
        jax.random.normal(jax.random.PRNGKey(3), truth.pixel_templates.shape)
    )
    init = DeepRenderingModel(
        windows=truth.windows,
        pixel_templates=noisy,
        child_templates=truth.child_templates,
        class_prior=np.full(3, 1 / 3),
        nuisance_priors=(np.full(4, 0.25), np.ones(1)),
        switch_priors=(0.5,),
        sigma=1.0,
    )
    fit = fit_drm_em(images, init, labels=latents["c"], n_iter=10, loop=QUIET)
    assert np.all(_template_error(truth, fit.model, latents) < 0.06)  # as above
    # Supervised: no relabelling; the class prior is the label frequencies
    # (+ a pseudo-count of 1 on 600 images: error <= 3/600).
    z, _ = drm_map(fit.model, images)
    assert np.mean(np.asarray(z["c"]) == np.asarray(latents["c"])) >= 0.985
    freq = np.bincount(np.asarray(latents["c"]), minlength=3) / N
    np.testing.assert_allclose(fit.model.class_prior, freq, atol=3 / N)


@pytest.mark.parametrize("pseudo_count", [0.0, 1.0])
def test_objective_never_decreases(pseudo_count):
    model = DeepRenderingModel.random(
        jax.random.PRNGKey(7), image_shape=(8, 8), levels=3, sigma=0.3
    )
    images, _ = model.sample(jax.random.PRNGKey(8), 200)
    fit = fit_drm_em(
        images,
        windows=model.windows,
        n_states=(5, 3, 3),  # not the generating sizes: a misspecified fit
        template_sizes=model.template_sizes,
        n_iter=8,
        tol=None,
        pseudo_count=pseudo_count,
        key=jax.random.PRNGKey(1),
        loop=QUIET,
    )
    assert fit.objective.shape == (9,)
    # Every M-step update is an exact maximiser, so the objective can only rise;
    # at a fixed point it repeats up to float64 rounding of ~1e2-sized sums.
    assert np.all(np.diff(fit.objective) >= -1e-9), np.diff(fit.objective)
    assert fit.objective[-1] > fit.objective[0]
    if pseudo_count == 0:
        np.testing.assert_array_equal(fit.objective, fit.max_log_joint)


# ---- checkpoints -----------------------------------------------------------------
def test_resume_equals_an_uninterrupted_fit(data, tmp_path):
    images, _ = data
    path = tmp_path / "ck.npz"
    straight = _fit(images, n_iter=6, tol=None)
    _fit(
        images,
        n_iter=3,
        tol=None,
        loop=LoopOptions(progress=False, checkpoint=path, every=2),
    )
    assert path.exists() and os.listdir(tmp_path) == ["ck.npz"]  # no temp file
    resume = LoopOptions(progress=False, checkpoint=path, resume=True)
    resumed = _fit(images, n_iter=6, tol=None, loop=resume)
    assert resumed.n_iter == 6
    np.testing.assert_array_equal(resumed.objective, straight.objective)
    np.testing.assert_array_equal(
        resumed.model.pixel_templates, straight.model.pixel_templates
    )
    np.testing.assert_array_equal(
        resumed.model.child_templates[0], straight.model.child_templates[0]
    )
    assert resumed.model.sigma == straight.model.sigma
    with pytest.raises(ValueError, match="different fit"):
        _fit(images, n_iter=6, loop=resume, pseudo_count=2.0)


# ---- errors ------------------------------------------------------------------------
def test_bad_inputs(truth, data):
    images, _ = data
    with pytest.raises(ValueError, match="shape"):
        _fit(np.zeros((5, 6, 6)))
    with pytest.raises(ValueError, match="shape"):
        fit_drm_em(np.zeros((8, 8)), truth, loop=QUIET)  # one image, no batch
    bad = np.array(images[:10])
    bad[3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _fit(bad)
    with pytest.raises(ValueError, match="labels"):
        fit_drm_em(images, truth, labels=np.full(N, 3), loop=QUIET)
    with pytest.raises(ValueError, match="labels"):
        fit_drm_em(images, truth, labels=np.zeros(5, int), loop=QUIET)
    with pytest.raises(ValueError, match="windows"):
        fit_drm_em(images, loop=QUIET)
    with pytest.raises(ValueError, match="either init"):
        fit_drm_em(images, truth, windows=(4, 2), loop=QUIET)
    with pytest.raises(ValueError, match="pseudo_count"):
        fit_drm_em(images, truth, pseudo_count=-1.0, loop=QUIET)
    with pytest.raises(ValueError, match="template size"):
        drm_em_init(
            images,
            jax.random.PRNGKey(0),
            windows=(4, 2),
            n_states=(4, 3),
            template_sizes=(5, 2),
        )


# ---- generative classification ----------------------------------------------------
def test_drm_classifier_on_synthetic_classes(truth, data):
    images, latents = data
    c = np.asarray(latents["c"])
    # 60 training images per class (equal sizes: one compilation for all three).
    train = np.concatenate([np.flatnonzero(c == k)[:60] for k in range(3)])
    test = np.setdiff1d(np.arange(N), train)
    # One DRM per class with a single top-level component: each is the
    # generating model restricted to its class.
    clf = fit_drm_classifier(
        images[train],
        c[train],
        windows=(4, 2),
        n_states=(4, 1),
        template_sizes=(3, 2),
        n_iter=10,
    )
    assert len(clf.models) == 3
    np.testing.assert_allclose(np.exp(clf.class_log_prior), 1 / 3)
    # Held-out images; the generating model's own MAP is 99.8% right, and 60
    # images per class pin the templates down to ~0.03 (sigma 0.2 / sqrt(60)).
    assert np.mean(clf.predict(images[test]) == c[test]) >= 0.97


def test_drm_mixture_members_score_as_one_more_max(truth, data):
    images, latents = data
    c = np.asarray(latents["c"])
    train = np.concatenate([np.flatnonzero(c == k)[:60] for k in range(3)])
    kw = dict(windows=(4, 2), n_states=(4, 1), template_sizes=(3, 2), n_iter=5)
    mix = fit_drm_classifier(images[train], c[train], members=2, **kw)
    assert mix.n_members == 2 and len(mix.models) == 6
    # Member r of class y is restart r's fit: the same start, the same model.
    single = fit_drm_classifier(images[train], c[train], **kw)
    for y in range(3):
        np.testing.assert_array_equal(
            mix.models[2 * y].pixel_templates, single.models[y].pixel_templates
        )
    # Scores: log pi_y + max over members and tau of log p_r(tau, I | y) - log 2.
    x = images[:7]
    want = np.full((7, 3), -np.inf)
    for y in range(3):
        for r in range(2):
            member = mix.models[2 * y + r]
            for n in range(7):
                one = float(drm_map(member, x[n : n + 1])[1][0])
                want[n, y] = max(want[n, y], one + mix.class_log_prior[y] - np.log(2))
    # float64 max-sum of the same numbers per image: equal to rounding.
    np.testing.assert_allclose(mix.scores(x), want, atol=1e-9)
    with pytest.raises(ValueError, match="restarts=1"):
        fit_drm_classifier(images[train], c[train], members=2, restarts=2, **kw)
    with pytest.raises(ValueError, match="members must be"):
        fit_drm_classifier(images[train], c[train], members=0, **kw)
