"""The digits split and the translational re-rendering of labelled images."""

import numpy as np
import pytest

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
