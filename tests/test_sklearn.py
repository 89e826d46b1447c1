"""scikit-learn estimators: estimator checks, input shapes, labels, digits smoke."""

import dataclasses
import inspect
import os

import jax
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils import estimator_checks as ec
from sklearn.utils.estimator_checks import parametrize_with_checks

from pgm_drm.data import load_digits_split
from pgm_drm.learning import ForestParams, TreeParams
from pgm_drm.models.edrm import EvolutionaryDRM
from pgm_drm.sklearn import (
    DRMClassifier,
    EDRMForestClassifier,
    EDRMTreeClassifier,
    RenderingModelClassifier,
    expected_failed_checks,
    image_shape_for,
)

# Small n_iter keeps every fit in the checks cheap; the checks test the API, not
# accuracy (except check_classifiers_train's 0.83 on well-separated blobs).
RM_FAST = [
    RenderingModelClassifier(n_nuisances=2, n_iter=5, random_state=0),
    RenderingModelClassifier(
        n_nuisances=2, mode="soft", semiring="sum", n_iter=5, random_state=0
    ),
]
DRM_FAST = DRMClassifier(n_states=(4, 3), n_iter=2, random_state=0)

#: The full check_estimator run of the DRM takes ~45 s on 2 cores (one jitted
#: hard-EM per class and data shape); set this to run it, else the reduced list.
FULL_DRM = os.environ.get("PGM_DRM_FULL_CHECKS") == "1"


#: E-DRM trees and forests (issue 5), without the relaxation step: fast fits.
EDRM_FAST = [
    EDRMTreeClassifier(relax_steps=0, random_state=0),
    EDRMForestClassifier(n_estimators=3, relax_steps=0, random_state=0),
]


@parametrize_with_checks(
    RM_FAST + EDRM_FAST + ([DRM_FAST] if FULL_DRM else []),
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


#: The reduced DRM list: the DRM-specific paths (padding of tiny inputs, the
#: blobs accuracy, label encoding, one class, unfitted errors). Input validation
#: and the rest are shared with RenderingModelClassifier (``_ImageClassifier``),
#: which runs every check; the full DRM run passed too (``PGM_DRM_FULL_CHECKS``).
DRM_CHECKS = [
    ec.check_classifiers_train,
    ec.check_classifiers_classes,
    ec.check_classifiers_one_label,
    ec.check_estimators_unfitted,
    ec.check_fit2d_1sample,
    ec.check_fit2d_1feature,
    ec.check_methods_subset_invariance,
]


@pytest.mark.skipif(FULL_DRM, reason="the full DRM check_estimator run is on")
@pytest.mark.parametrize("check", DRM_CHECKS, ids=lambda c: c.__name__)
def test_drm_reduced_estimator_checks(check):
    assert check.__name__ not in expected_failed_checks(DRM_FAST)
    check(type(DRM_FAST).__name__, clone(DRM_FAST))


def test_expected_failures_have_reasons():
    assert expected_failed_checks(RM_FAST[1]) == {}
    fails = expected_failed_checks(RM_FAST[0])
    assert set(fails) == {"check_decision_proba_consistency"}
    assert all(len(reason) > 20 for reason in fails.values())


def test_image_shapes():
    assert image_shape_for(64) == (8, 8)
    assert image_shape_for(10) == (10,)
    assert image_shape_for(6, (2, 3)) == (2, 3)
    with pytest.raises(ValueError, match="pixels"):
        image_shape_for(6, (2, 2))


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def test_rm_accepts_images_rows_and_arbitrary_labels(digits):
    x, y = digits.x_train[:200], digits.y_train[:200]
    labels = np.array([f"digit-{v}" for v in y])
    a = RenderingModelClassifier(n_nuisances=2, n_iter=5, random_state=0)
    b = clone(a)
    a.fit(x, labels)
    b.fit(x.reshape(200, 64), labels)
    assert a.image_shape_ == b.image_shape_ == (8, 8)
    assert a.model_.templates.shape == (10, 2, 8, 8)
    assert list(a.classes_) == sorted(set(labels))
    pa, pb = (
        a.predict(digits.x_test[:50]),
        b.predict(digits.x_test[:50].reshape(50, -1)),
    )
    assert np.array_equal(pa, pb) and pa.dtype == labels.dtype
    proba = a.predict_proba(digits.x_test[:50])
    # rows of a softmax: sum to 1 up to float64 rounding of 10 terms
    assert np.allclose(proba.sum(1), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        a.predict(np.zeros((2, 4, 16)))


def test_rm_predict_proba_is_sp_rmc_posterior(digits):
    x = digits.x_train[:200]
    clf = RenderingModelClassifier(n_nuisances=2, n_iter=5, random_state=0)
    clf.fit(x, digits.y_train[:200])
    s = np.asarray(clf.model_.class_log_scores(digits.x_test[:20], "sum"))
    p = np.exp(s - s.max(1, keepdims=True))
    # the same softmax computed two ways; 1e-12 covers float64 rounding
    assert np.allclose(clf.predict_proba(digits.x_test[:20]), p / p.sum(1)[:, None])
    ms = np.asarray(clf.model_.classify(digits.x_test[:20], "max"))
    assert np.array_equal(clf.predict(digits.x_test[:20]), clf.classes_[ms])


def test_rm_digits_accuracy(digits):
    """Supervised hard EM, 4 templates per class, 10 iterations: ~0.956."""
    clf = RenderingModelClassifier(n_nuisances=4, n_iter=10, random_state=0)
    clf.fit(digits.x_train, digits.y_train)
    assert clf.score(digits.x_test, digits.y_test) > 0.9


def test_drm_digits_subset(digits):
    """A small DRM on digits 0, 1, 7 (30 images each: one compiled EM for all
    classes), 3 iterations: far above chance (1/3)."""
    keep = [np.flatnonzero(digits.y_train == c)[:30] for c in (0, 1, 7)]
    idx = np.concatenate(keep)
    clf = DRMClassifier(n_states=(8, 4), n_iter=3, random_state=0)
    clf.fit(digits.x_train[idx], digits.y_train[idx])
    assert clf.image_shape_ == (8, 8)
    test = np.isin(digits.y_test, (0, 1, 7))
    assert clf.score(digits.x_test[test], digits.y_test[test]) > 0.8


def test_drm_pads_small_and_rejects_large_images():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), np.repeat([3, 7], 6)
    clf = DRMClassifier(n_states=(2, 2), n_iter=1, random_state=0).fit(x, y)
    assert clf.image_shape_ == (5,) and set(clf.predict(x)) <= {3, 7}
    # 5 pixels laid out in the first row of the DRM's 8 x 8 image, zeros elsewhere:
    # the estimator's scores are the per-class DRM scores of that image.
    padded = np.zeros((12, 8, 8))
    padded[:, 0, :5] = x
    s = np.asarray(clf.drm_.scores(padded))
    p = np.exp(s - s.max(1, keepdims=True))
    # the same softmax computed two ways: float64 round-off only
    np.testing.assert_allclose(clf.predict_proba(x), p / p.sum(1)[:, None], atol=1e-12)
    np.testing.assert_array_equal(clf.predict(x), clf.classes_[s.argmax(1)])
    with pytest.raises(ValueError, match="do not fit"):
        clone(clf).fit(rng.normal(size=(4, 65)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="larger"):
        clone(clf).fit(rng.normal(size=(4, 9, 3)), [0, 1, 0, 1])


# ---- E-DRM trees and forests ----------------------------------------------------
# Relaxation kept short in tests: the jitted scan compiles once per frontier size.
FAST = dict(relax_steps=10, max_depth=4)


@pytest.fixture(scope="module")
def edrm_data():
    """240 noisy images from the default E-DRM, label = coarse category (6)."""
    m = EvolutionaryDRM.default(sigma=0.3)
    x, path = m.sample_fast(jax.random.PRNGKey(0), 240)
    return np.asarray(x), np.asarray(path[:, 1])


def test_tree_and_forest_hyperparameters_are_the_params_fields():
    """One definition (issue 13): the estimators' arguments are the fields of
    TreeParams / ForestParams (plus random_state), with the same defaults."""
    for cls, params in (
        (EDRMTreeClassifier, TreeParams),
        (EDRMForestClassifier, ForestParams),
    ):
        sig = inspect.signature(cls.__init__).parameters
        fields = {f.name: f.default for f in dataclasses.fields(params)}
        assert set(sig) == {"self", "random_state", *fields}
        assert cls().get_params() == {**fields, "random_state": None}
        assert all(p.kind == p.KEYWORD_ONLY for n, p in sig.items() if n != "self")
    names = {f.name for f in dataclasses.fields(TreeParams)}
    assert names < {f.name for f in dataclasses.fields(ForestParams)}


def test_tree_classifier_fits_edrm_data(edrm_data):
    x, y = edrm_data
    clf = EDRMTreeClassifier(random_state=0, **FAST).fit(x, y)
    assert clf.score(x, y) > 0.95
    proba = clf.predict_proba(x)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    # images and flat rows are the same input
    np.testing.assert_array_equal(clf.predict(x.reshape(len(x), -1)), clf.predict(x))
    assert clf.n_features_in_ == 64 and list(clf.classes_) == list(range(6))


def test_forest_of_one_tree_on_full_data_is_the_tree(edrm_data):
    x, y = edrm_data
    forest = EDRMForestClassifier(
        n_estimators=1, bootstrap=False, random_state=3, **FAST
    ).fit(x, y)
    seed = forest.estimators_[0].random_state
    tree = EDRMTreeClassifier(random_state=seed, **FAST).fit(x, y)
    np.testing.assert_array_equal(forest.predict_proba(x), tree.predict_proba(x))


def test_forest_proba_and_string_labels(edrm_data):
    x, y = edrm_data
    labels = np.array(list("abcdef"))[y]
    forest = EDRMForestClassifier(n_estimators=3, random_state=0, **FAST)
    forest.fit(x, labels)
    proba = forest.predict_proba(x)
    assert proba.shape == (240, 6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert set(forest.predict(x)) <= set("abcdef")
    assert forest.score(x, labels) > 0.9
    assert clone(forest).get_params()["n_estimators"] == 3
    with pytest.raises(ValueError, match="features"):
        forest.predict(x[:, :4])
