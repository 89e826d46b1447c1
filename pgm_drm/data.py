"""Datasets: scikit-learn's handwritten digits with the project's fixed split."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "UNIT_SHIFTS",
    "DigitsSplit",
    "load_digits_split",
    "translate_images",
    "with_translated_labels",
]

#: The identity and the four one-pixel translations (down, up, right, left).
UNIT_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


class DigitsSplit(NamedTuple):
    """Train/test split of the 8x8 digits.

    Attributes:
        x_train: ``(1347, 8, 8)`` float images in ``[0, 1]`` (raw values / 16).
        y_train: ``(1347,)`` int labels ``0..9``.
        x_test: ``(450, 8, 8)``.
        y_test: ``(450,)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(random_state: int = 0) -> DigitsSplit:
    """``sklearn.datasets.load_digits`` (ships with scikit-learn, no download),
    split by ``train_test_split(test_size=0.25, random_state=random_state,
    stratify=y)``. ``random_state=0`` is the project's fixed split, the one a
    single ``pgm-drm fit digits`` measures on; other values give the further
    stratified splits of :func:`pgm_drm.experiments.evaluation.digits_splits`.

    Example:
        >>> d = load_digits_split()
        >>> d.x_train.shape, d.x_test.shape, float(d.x_train.max())
        ((1347, 8, 8), (450, 8, 8), 1.0)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.25, random_state=random_state, stratify=y
    )
    return DigitsSplit(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64))


def translate_images(
    images: np.ndarray,
    labels: np.ndarray,
    shifts: tuple[tuple[int, int], ...] = UNIT_SHIFTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-render labelled images under the translational nuisance (Lemma A.2).

    The rendering model's nuisance ``g`` includes where the object sits: the
    class does not change when the image is translated by ``T_g``. Tied
    weights ``T_g w_c`` give the generative classifier that invariance; the
    discriminative relaxation (Eq. 25) frees them, and these re-rendered copies
    hand the invariance back as data. Pixels moved in from outside are 0 (the
    background); ``scipy.ndimage.shift`` with ``order=0`` moves whole pixels.

    Args:
        images: ``(N, H, W)``.
        labels: ``(N,)``.
        shifts: Integer ``(dy, dx)`` translations; ``(0, 0)`` keeps the originals.

    Returns:
        ``(len(shifts) * N, H, W)`` images, shift-major, and their labels.

    Example:
        >>> x = np.arange(9.0).reshape(1, 3, 3)
        >>> xs, ys = translate_images(x, np.array([7]), ((0, 0), (0, 1)))
        >>> xs[1].tolist(), ys.tolist()
        ([[0.0, 0.0, 1.0], [0.0, 3.0, 4.0], [0.0, 6.0, 7.0]], [7, 7])
    """
    from scipy.ndimage import shift as nd_shift

    x = np.asarray(images, dtype=float)
    y = np.asarray(labels)
    if x.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
    out = []
    for s in shifts:
        if len(s) != 2 or any(int(v) != v for v in s):
            raise ValueError(f"shifts must be integer (dy, dx) pairs, got {s!r}")
        if abs(s[0]) >= x.shape[1] or abs(s[1]) >= x.shape[2]:
            raise ValueError(f"shift {s!r} moves the whole {x.shape[1:]} image out")
        out.append(nd_shift(x, (0, int(s[0]), int(s[1])), order=0, cval=0.0))
    return np.concatenate(out), np.tile(y, len(shifts))


def with_translated_labels(
    images: np.ndarray,
    labels: np.ndarray,
    shifts: tuple[tuple[int, int], ...] = UNIT_SHIFTS[1:],
) -> tuple[np.ndarray, np.ndarray]:
    """All images, plus translated copies of the labelled ones (label >= 0).

    For semi-supervised learning: the few labels reach further when each
    labelled image is also re-rendered under the translational nuisance
    (:func:`translate_images`), while the unlabelled images stay as they are.

    Returns:
        ``(N + len(shifts) * N_labelled, H, W)`` images and their labels
        (-1 for the unlabelled, as given).
    """
    x = np.asarray(images, dtype=float)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
    lab = y >= 0
    xs, ys = translate_images(x[lab], y[lab], shifts)
    return np.concatenate([x, xs]), np.concatenate([y, ys])
