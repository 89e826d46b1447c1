"""Soft / hard EM for the RM: M-step twin, monotonicity, recovery, labels, errors,
and one compiled step per structure (the model is a traced pytree)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import pgm_drm.learning.em as em_module
import pgm_drm.learning.likelihood as likelihood_module
from pgm_drm.learning import (
    em_init,
    em_step,
    fit_em,
    log_likelihood,
    m_step,
    naive_m_step,
)
from pgm_drm.learning.loop import LoopOptions
from pgm_drm.models import RenderingModel, default_templates
from pgm_drm.testing import random_rendering_model

QUIET = LoopOptions(progress=False)


def _data(rm, n, seed):
    return rm.sample(jax.random.PRNGKey(seed), n)


@given(
    seed=st.integers(0, 10_000),
    switch=st.booleans(),
    fix=st.sampled_from([(), ("sigma",), ("class_prior", "templates")]),
    weighted=st.booleans(),
)
def test_m_step_matches_naive_twin(seed, switch, fix, weighted):
    rng = np.random.default_rng(seed)
    rm, _ = random_rendering_model(seed, 2, 3, (2, 3), switch=switch)
    x = rng.normal(size=(5, 2, 3))
    shape = (5, 2, 3) + ((2,) if switch else ())
    resp = rng.dirichlet(np.ones(int(np.prod(shape[1:]))), size=5).reshape(shape)
    resp[0] = 0.0  # an empty component (c, g) = (0, 0) keeps its template
    resp[0, 1, 1] = 1.0
    resp[:, 0, 0] = 0.0
    resp /= resp.reshape(5, -1).sum(-1).reshape((5,) + (1,) * (len(shape) - 1))
    if weighted:  # EM-lambda: row n sums to the image's weight w_n
        w = rng.uniform(0.05, 1.0, size=5)
        resp *= w.reshape((5,) + (1,) * (len(shape) - 1))
    fast = m_step(rm, jnp.asarray(x), jnp.asarray(resp), fix)
    slow = naive_m_step(rm, x, resp, fix)
    assert type(fast) is type(slow) is RenderingModel
    # float64 sums of <= 30 terms of size O(1): agreement to ~1e-14; 1e-10 is slack.
    for name in (f.name for f in dataclasses.fields(RenderingModel)):
        a, b = getattr(fast, name), getattr(slow, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-10, err_msg=name)
    np.testing.assert_array_equal(fast.templates[0, 0], rm.templates[0, 0])


@given(
    seed=st.integers(0, 10_000),
    switch=st.booleans(),
    semi=st.booleans(),
    lam=st.sampled_from([1.0, 0.3]),
)
def test_soft_em_objective_never_decreases(seed, switch, semi, lam):
    rm, _ = random_rendering_model(seed, 2, 2, (3, 3), switch=switch)
    rng = np.random.default_rng(seed)
    mu = np.asarray(rm.templates).reshape(4, 9)
    x = mu[rng.integers(0, 4, 30)] + rm.sigma * rng.normal(size=(30, 9))
    labels = (
        np.where(rng.random(30) < 0.3, rng.integers(0, 2, 30), -1) if semi else None
    )
    fit = fit_em(
        x.reshape(30, 3, 3),
        2,
        2,
        switch=switch,
        labels=labels,
        n_iter=25,
        tol=None,
        key=jax.random.PRNGKey(seed),
        unlabelled_weight=lam,
        loop=QUIET,
    )
    # EM ascends log p(images, known labels) (Eqs. 14-15; semi-supervised §6.3.3),
    # weighted by lambda for the unlabelled images (EM-lambda).
    # The per-image objective is O(10) and a sum of 30 logsumexps in float64:
    # rounding ~1e-14 per image, so a drop of more than 1e-9 would be real.
    assert np.all(np.diff(fit.objective) >= -1e-9), np.diff(fit.objective).min()
    assert np.all(np.isfinite(fit.objective))


def _well_separated(switch=False, sigma=0.15, n=200, seed=0):
    # Bar and corner strokes at two diagonal offsets: squared distance >= 6
    # between any two templates, against 2 * 36 * sigma^2 = 1.6 of noise.
    truth = RenderingModel(
        default_templates(6)[np.ix_([0, 2], [0, 3])],
        sigma=sigma,
        class_prior=[0.4, 0.6],
        nuisance_prior=[0.5, 0.5],
        switch_prior=0.85 if switch else None,
    )
    x, lat = _data(truth, n, seed)
    return truth, x, lat


def _match(est, true):
    """Hungarian match of flattened templates; returns (permutation, max error)."""
    e, t = (
        np.asarray(est).reshape(len(est), -1),
        np.asarray(true).reshape(len(true), -1),
    )
    cost = ((e[:, None] - t[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return cols, np.abs(e[rows] - t[cols]).max()


# A template is the mean of ~N/4 = 50 images (fewer with the switch) with pixel
# noise sigma = 0.15: standard error 0.15 / sqrt(40) ~ 0.024; over 4 x 36 pixels
# the max is ~3.5 standard errors ~ 0.085, so 0.12 is a failure of EM, not noise.
RECOVERY_ATOL = 0.12


@pytest.mark.parametrize(("mode", "switch"), [("soft", False), ("hard", True)])
def test_recovers_templates_up_to_permutation(mode, switch):
    truth, x, _ = _well_separated(switch)
    fit = fit_em(x, 2, 2, mode=mode, switch=switch, loop=QUIET)
    assert fit.converged
    # Unsupervised, the C*G components are identifiable only up to a joint
    # permutation (even the grouping into classes), so match all four at once.
    perm, err = _match(
        fit.model.templates.reshape(4, -1), truth.templates.reshape(4, -1)
    )
    assert err < RECOVERY_ATOL, err
    assert abs(fit.model.sigma - 0.15) < 0.01  # 200*36 residuals: rel. s.e. ~1%
    if switch:
        assert abs(fit.model.switch_prior - 0.85) < 0.08  # binomial s.e. 0.025


def test_supervised_recovers_classes_exactly_and_g_up_to_permutation():
    truth, x, lat = _well_separated()
    fit = fit_em(x, 2, 2, labels=lat["c"], loop=QUIET)
    for c in range(2):  # labels fix the class; g is free within each class
        _, err = _match(fit.model.templates[c], truth.templates[c])
        assert err < RECOVERY_ATOL, (c, err)
    # Class prior = label frequencies exactly (clamped c).
    np.testing.assert_allclose(
        fit.model.class_prior, np.bincount(lat["c"], minlength=2) / len(x), atol=1e-12
    )


def _accuracy(model, x, y, best_permutation=False):
    pred = np.asarray(model.classify(x, "sum"))
    perms = itertools.permutations(range(3)) if best_permutation else [range(3)]
    return max(np.mean(np.asarray(list(p))[pred] == y) for p in perms)


def test_semi_supervised_beats_unsupervised_and_matches_supervised():
    truth = RenderingModel(default_templates(6)[:, :2], sigma=0.25)
    x, lat = _data(truth, 150, 0)
    xt, latt = _data(truth, 300, 100)
    y, yt = np.asarray(lat["c"]), np.asarray(latt["c"])
    rng = np.random.default_rng(0)
    idx = rng.choice(150, 24, replace=False)  # 16% labelled
    labels = np.full(150, -1)
    labels[idx] = y[idx]
    un = fit_em(x, 3, 2, loop=QUIET).model
    semi = fit_em(x, 3, 2, labels=labels, loop=QUIET).model
    sup = fit_em(x[idx], 3, 2, labels=y[idx], loop=QUIET).model
    acc_un = _accuracy(un, xt, yt, best_permutation=True)
    acc_semi, acc_sup = _accuracy(semi, xt, yt), _accuracy(sup, xt, yt)
    print(
        f"class accuracy: unsupervised (best perm.) {acc_un:.3f}, "
        f"supervised on 24 labels {acc_sup:.3f}, semi-supervised {acc_semi:.3f}"
    )
    # Unsupervised EM groups the 6 components into classes arbitrarily (same
    # likelihood); labels pin the grouping. 300 test images: s.e. <= 0.03.
    assert acc_semi > acc_un + 0.1
    assert acc_semi >= acc_sup - 0.03
    assert acc_semi > 0.95  # the true model scores 1.0 here


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_unlabelled_weight_interpolates_to_supervised_em(mode):
    """lambda -> 0 is supervised EM on the labelled images alone (soft and hard:
    near-true start, so no component empties and hard EM re-seeds nothing), and
    the weighted objective is what is reported; at lambda = 1 the unlabelled
    images move the fit. (The weighted M-step itself is checked against the
    naive twin in test_m_step_matches_naive_twin.)"""
    truth, x, lat = _well_separated(n=120)
    rng = np.random.default_rng(1)
    labelled = rng.random(120) < 0.2
    labels = np.where(labelled, np.asarray(lat["c"]), -1)
    start = RenderingModel(
        np.asarray(truth.templates) + 0.3 * rng.normal(size=truth.templates.shape),
        sigma=0.5,
    )
    common = {"init": start, "n_iter": 15, "tol": None, "loop": QUIET, "mode": mode}
    tiny = fit_em(x, 2, 2, labels=labels, unlabelled_weight=1e-9, **common)
    sup = fit_em(x[labelled], 2, 2, labels=labels[labelled], **common)
    # Unlabelled images carry 1e-9 of the weight: 96 of them move any mean by at
    # most ~1e-7 (pixel values O(1)); 1e-5 leaves room for 15 iterations of it.
    np.testing.assert_allclose(tiny.model.templates, sup.model.templates, atol=1e-5)
    np.testing.assert_allclose(tiny.model.sigma, sup.model.sigma, atol=1e-5)
    np.testing.assert_allclose(tiny.objective, sup.objective, atol=1e-5)
    one = fit_em(x, 2, 2, labels=labels, **common)
    # The unlabelled images do move the fit when they count (lambda = 1).
    assert not np.allclose(one.model.templates, tiny.model.templates, atol=1e-3)


@pytest.mark.parametrize("lam", [0.0, -0.5, 1.5, float("nan")])
def test_unlabelled_weight_out_of_range_raises(lam):
    with pytest.raises(ValueError, match="unlabelled_weight"):
        fit_em(np.zeros((3, 2, 2)), 2, 2, unlabelled_weight=lam, loop=QUIET)


def test_hard_em_reseeds_empty_components():
    # Two clusters of data, C*G = 4 components: without re-seeding two die.
    truth, x, _ = _well_separated()
    x2 = x[:60].at[:30].set(truth.templates[0, 0]).at[30:].set(truth.templates[1, 1])
    far = RenderingModel(
        jnp.full((2, 2, 6, 6), 50.0).at[0, 0].set(truth.templates[0, 0]), sigma=0.2
    )
    state = em_init(x2, 2, 2, init=far)
    labels = jnp.full((60,), -1)
    state, info = em_step(state, x2, labels, "hard")
    # Three components were empty; each took an image and holds its own now.
    assert np.all(np.asarray(info.counts) >= 1), info.counts
    p = state.model
    assert np.all(np.isfinite(p.templates)) and float(p.sigma) >= 1e-3
    assert np.all(p.class_prior > 0) and np.all(p.nuisance_prior > 0)
    fit = fit_em(x2, 2, 2, mode="hard", init=far, loop=QUIET)
    assert np.all(np.isfinite(fit.objective))


def test_soft_em_keeps_template_of_empty_component():
    truth, x, _ = _well_separated()
    start = RenderingModel(truth.templates.at[1, 1].set(1e3), sigma=0.15)
    state = em_init(x, 2, 2, init=start)
    new, info = em_step(state, x, jnp.full((len(x),), -1), "soft")
    assert float(info.counts[1, 1]) == 0.0  # exp(-huge) underflows to 0
    np.testing.assert_array_equal(new.model.templates[1, 1], start.templates[1, 1])
    assert np.all(np.isfinite(new.model.templates))


def test_fix_keeps_parameters():
    truth, x, _ = _well_separated()
    fit = fit_em(
        x, 2, 2, init=truth, fix=("sigma", "class_prior"), n_iter=3, loop=QUIET
    )
    assert fit.model.sigma == truth.sigma
    np.testing.assert_array_equal(fit.model.class_prior, truth.class_prior)


def test_progress_bar_runs(capsys):
    _, x, _ = _well_separated(n=40)
    fit_em(x, 2, 2, n_iter=2, loop=LoopOptions(progress=True))
    assert "EM (soft)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images": np.zeros(5)}, "shape"),
        ({"images": np.full((3, 2, 2), np.nan)}, "NaN"),
        ({"n_classes": 0}, "n_classes"),
        ({"n_nuisances": 1.5}, "n_nuisances"),
        ({"labels": [0, 1, 2]}, "labels must be in"),
        ({"labels": [0, 1]}, "shape"),
        ({"mode": "medium"}, "mode"),
        ({"fix": ("mu",)}, "fix"),
        ({"tol": -1.0}, "tol"),
        ({"init": RenderingModel(np.zeros((2, 1, 2, 2)))}, "init has"),
        ({"init": RenderingModel(np.zeros((2, 2, 3, 3)))}, "shape"),
        ({"init": RenderingModel(np.zeros((2, 2, 2, 2))), "switch": True}, "switch"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = {"images": np.zeros((3, 2, 2)), "n_classes": 2, "n_nuisances": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        fit_em(
            args.pop("images"),
            args.pop("n_classes"),
            args.pop("n_nuisances"),
            loop=QUIET,
            **args,
        )


def test_new_parameters_of_the_same_structure_do_not_trace_again():
    """The model is a pytree passed to jit as an ordinary argument: the EM step
    and the log-likelihood compile once per structure (shapes, dtypes, switch),
    not once per parameter value (STYLE 13).

    From empty jit caches: the dispatch cache is one LRU shared by every jitted
    function, so in a worker that has run many tests a new entry can evict an
    old one and leave a count unchanged."""
    jax.clear_caches()
    truth, x, _ = _well_separated(switch=True, n=40)
    fit = fit_em(x, 2, 2, switch=True, n_iter=3, tol=None, loop=QUIET)
    log_likelihood(fit.model, x)
    steps, tables = em_step._cache_size(), likelihood_module._table_jit._cache_size()
    # Fits from other starts, then scoring other parameters of the same
    # structure (fitted or built by hand): every program is reused.
    other = RenderingModel(
        truth.templates + 0.1, sigma=0.3, class_prior=[0.3, 0.7], switch_prior=0.5
    )
    fits = [
        fit_em(x, 2, 2, init=m, n_iter=3, tol=None, loop=QUIET) for m in (truth, other)
    ]
    lls = [log_likelihood(m, x) for m in (fits[0].model, fits[1].model, other)]
    assert em_step._cache_size() == steps
    assert likelihood_module._table_jit._cache_size() == tables
    # ... and the programs use the new values (none baked in at trace time).
    assert len({float(ll.sum()) for ll in lls}) == 3
    assert not np.allclose(fits[0].objective, fits[1].objective)
    # A new structure (no switch) is a new program.
    log_likelihood(RenderingModel(truth.templates, sigma=0.3), x)
    assert likelihood_module._table_jit._cache_size() == tables + 1


def test_resume_after_crash_is_bit_for_bit(tmp_path, monkeypatch):
    truth = RenderingModel(default_templates(4)[:2, :2], sigma=0.3, switch_prior=0.8)
    x = truth.sample(jax.random.PRNGKey(0), 100)[0][:60]
    kw = dict(switch=True, n_iter=10, tol=None)
    straight = fit_em(x, 2, 2, loop=QUIET, **kw)
    ckpt = tmp_path / "em.npz"
    resume = LoopOptions(progress=False, checkpoint=ckpt, every=5, resume=True)
    real_step, calls = em_module.em_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # dies in iteration 7; last checkpoint: iteration 5
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(em_module, "em_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        fit_em(x, 2, 2, loop=resume, **kw)  # no file yet: a fresh start
    monkeypatch.setattr(em_module, "em_step", real_step)
    resumed = fit_em(x, 2, 2, loop=resume, **kw)
    assert resumed.n_iter == straight.n_iter == 10
    # Same jitted step on the same float64 inputs: identical bits.
    for name in ("templates", "sigma", "class_prior", "nuisance_prior"):
        np.testing.assert_array_equal(
            getattr(straight.model, name), getattr(resumed.model, name)
        )
    assert straight.model.switch_prior == resumed.model.switch_prior
    np.testing.assert_array_equal(straight.objective, resumed.objective)
    np.testing.assert_array_equal(straight.log_likelihood, resumed.log_likelihood)
    # A different fit must not silently resume from this checkpoint.
    with pytest.raises(ValueError, match="different fit"):
        fit_em(x[:50], 2, 2, loop=resume, **kw)
