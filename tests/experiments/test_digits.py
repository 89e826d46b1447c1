"""The digits recipe: label draws and the option checks (the fits themselves run
end to end in tests/test_cli.py)."""

import numpy as np
import pytest

from pgm_drm.data import load_digits_split
from pgm_drm.experiments.digits import (
    check_options,
    label_subset,
    max_labels,
    run_fit_digits,
)


def test_label_subset_is_stratified_and_seeded():
    y = np.repeat(np.arange(10), 7)
    sub = label_subset(y, 30, seed=3)
    kept = sub >= 0
    assert kept.sum() == 30
    np.testing.assert_array_equal(sub[kept], y[kept])  # kept labels are the truth
    np.testing.assert_array_equal(np.bincount(sub[kept], minlength=10), 3)
    np.testing.assert_array_equal(label_subset(y, 30, seed=3), sub)
    assert not np.array_equal(label_subset(y, 30, seed=4), sub)


def test_good_options_pass():
    check_options("rm", labels=100, em="soft", unlabelled_weight=0.3)
    check_options("mfa", labels=100, translations=False)
    check_options("dcn", translations=False)
    check_options("edrm-forest")


def test_max_labels():
    d = load_digits_split()
    assert max_labels(d) == 10 * np.bincount(d.y_train).min()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "dcn", "labels": 50}, "--labels"),
        ({"model": "drm", "em": "soft"}, "--em"),
        ({"model": "rm", "labels": 50, "unlabelled_weight": 0.0}, r"\(0, 1\]"),
        ({"model": "rm", "unlabelled_weight": 0.5}, "needs --labels"),
        ({"model": "mfa", "labels": 100, "unlabelled_weight": 0.5}, "the rm model"),
        ({"model": "mfa", "labels": 5}, "multiple of 10"),
        ({"model": "mfa", "labels": 10_000}, "multiple of 10"),
        ({"model": "mfa", "translations": False}, "needs --labels"),
        ({"model": "rm", "translations": False}, "dcn and mfa models"),
        ({"model": "svm"}, "unknown model"),
    ],
)
def test_rejects_bad_options_before_fitting(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_options(**kwargs)
    with pytest.raises(ValueError, match=match):
        run_fit_digits(out=tmp_path / "fit", **kwargs)
    assert not (tmp_path / "fit").exists()  # nothing fitted, nothing written
