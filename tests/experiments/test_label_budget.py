"""The label-budget curve (§2.7): budgets, shapes, class-balanced subsets, plot."""

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest

from pgm_drm.experiments.label_budget import (
    _budget_subset,
    label_budget_curve,
    plot_label_budget,
)
from pgm_drm.models import RenderingModel, default_templates


def _toy_problem(n=120):
    """Three stroke classes at four translations, sigma 0.6."""
    rm = RenderingModel(default_templates(), sigma=0.6)
    images, latents = rm.sample(jax.random.PRNGKey(0), n)
    return rm, images, latents["c"]


def test_label_budget_curve_small():
    rm, images, labels = _toy_problem()
    data = (images[:90], labels[:90], images[90:], labels[90:])
    res = label_budget_curve(
        (6, None), data=data, n_nuisances=2, steps=10, progress=False
    )
    assert res.n_labels.tolist() == [6, 90]
    assert res.generative.shape == res.discriminative.shape == (2, 1)
    assert np.all((res.generative >= 0) & (res.generative <= 1))
    fig = plot_label_budget(res)
    assert len(fig.axes[0].lines) == 2
    plt.close(fig)


@pytest.mark.parametrize("n", [3, 7, 20, 30])
def test_budget_subset_is_balanced(n):
    y = np.repeat(np.arange(3), [5, 10, 15])
    idx = _budget_subset(y, n, 3, np.random.default_rng(0))
    assert len(idx) == min(n, len(y)) and len(np.unique(idx)) == len(idx)
    counts = np.bincount(y[idx], minlength=3)
    assert counts.min() >= min(n // 3, 5)  # as many per class as there are
