"""The digits split and the translational re-rendering of labelled images."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from pgm_drm.data import (
    UNIT_SHIFTS,
    load_digits_split,
    translate_images,
    with_translated_labels,
)


def _shift_by_slicing(img, dy, dx):
    out = np.zeros_like(img)
    h, w = img.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_split_is_the_fixed_one():
    d = load_digits_split()
    assert d.x_train.shape == (1347, 8, 8) and d.x_test.shape == (450, 8, 8)
    # stratified: each class keeps its share of the 1797 images (+/- 1 image)
    full = np.bincount(np.concatenate([d.y_train, d.y_test]))
    assert np.all(np.abs(np.bincount(d.y_test) - 0.25 * full) <= 1)
    # a partition of scikit-learn's digits (pixels / 16), rows and labels together
    x, y = load_digits(return_X_y=True)
    rows = np.hstack([x / 16.0, y[:, None]])
    split = np.vstack(
        [
            np.hstack([d.x_train.reshape(-1, 64), d.y_train[:, None]]),
            np.hstack([d.x_test.reshape(-1, 64), d.y_test[:, None]]),
        ]
    )
    np.testing.assert_array_equal(np.unique(split, axis=0), np.unique(rows, axis=0))
    assert len(np.unique(rows, axis=0)) == len(split) == 1797  # no duplicate rows
    # ... and the same one every time (every accuracy in the README is on it):
    # pinned labels and pixel sums (multiples of 1/16: exact in float64)
    assert d.y_test[:12].tolist() == [2, 0, 4, 9, 4, 1, 2, 4, 6, 7, 9, 1]
    assert d.y_train[:12].tolist() == [7, 3, 6, 6, 7, 6, 7, 9, 2, 9, 0, 9]
    assert float(d.x_test.sum()) == 8794.5625 and float(d.x_train.sum()) == 26312.8125


@pytest.mark.parametrize("shifts", [UNIT_SHIFTS, ((2, -1), (-3, 3))])
def test_translations_match_slicing_with_zero_fill(shifts):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 1.0, size=(4, 6, 5))  # no zeros: the fill is visible
    y = np.arange(4)
    xs, ys = translate_images(x, y, shifts)
    assert xs.shape == (4 * len(shifts), 6, 5)
    np.testing.assert_array_equal(ys, np.tile(y, len(shifts)))
    for k, (dy, dx) in enumerate(shifts):
        for n in range(4):
            np.testing.assert_array_equal(
                xs[k * 4 + n], _shift_by_slicing(x[n], dy, dx)
            )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(images=np.zeros((2, 4))), "images must have shape"),
        (dict(labels=np.zeros(3)), "labels must have shape"),
        (dict(shifts=((0.5, 0),)), "integer"),
        (dict(shifts=((4, 0),)), "out"),
    ],
)
def test_bad_translations_raise(kwargs, match):
    args = dict(images=np.zeros((2, 4, 4)), labels=np.zeros(2), shifts=UNIT_SHIFTS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        translate_images(**args)


def test_only_labelled_images_are_translated():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 1.0, size=(5, 4, 4))
    y = np.array([3, -1, 0, -1, -1])
    xs, ys = with_translated_labels(x, y)
    assert xs.shape == (5 + 4 * 2, 4, 4)
    np.testing.assert_array_equal(xs[:5], x)  # every original, unlabelled included
    np.testing.assert_array_equal(ys, np.concatenate([y, np.tile([3, 0], 4)]))
    for k, (dy, dx) in enumerate(UNIT_SHIFTS[1:]):
        np.testing.assert_array_equal(xs[5 + 2 * k], _shift_by_slicing(x[0], dy, dx))
        np.testing.assert_array_equal(xs[6 + 2 * k], _shift_by_slicing(x[2], dy, dx))
    with pytest.raises(ValueError, match="labels must have shape"):
        with_translated_labels(x, y[:3])
