"""Datasets: scikit-learn's handwritten digits with the project's fixed split."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["DigitsSplit", "load_digits_split"]


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


def load_digits_split() -> DigitsSplit:
    """``sklearn.datasets.load_digits`` (ships with scikit-learn, no download),
    split by ``train_test_split(test_size=0.25, random_state=0, stratify=y)``:
    the split every accuracy in this project is measured on.

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
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return DigitsSplit(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64))
