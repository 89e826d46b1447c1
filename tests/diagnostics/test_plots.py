"""Figures: the factor-directions grid shows what it says it shows."""

import matplotlib.pyplot as plt
import numpy as np

from pgm_drm.diagnostics import plot_factor_directions
from pgm_drm.models import FactorRenderingModel


def test_factor_directions_grid_shows_template_plus_minus_scaled_singular_vectors():
    rng = np.random.default_rng(0)
    frm = FactorRenderingModel(
        rng.normal(size=(2, 1, 3, 3)),
        rng.normal(size=(2, 1, 9, 3)),
        np.ones((2, 1, 3, 3)),
    )
    fig = plot_factor_directions(frm, n_dirs=2, scale=1.5)
    shown = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
    assert len(shown) == 2 * (1 + 2 * 2)
    lam = np.asarray(frm.loadings[1, 0])
    u, s, _ = np.linalg.svd(lam, full_matrices=False)
    mu = np.asarray(frm.templates[1, 0])
    # row 2 (class 1): mu, mu + 1.5 s1 u1, mu - 1.5 s1 u1, ...; the direction's
    # sign is the SVD's, so compare the pair as a set.
    np.testing.assert_allclose(shown[5], mu)
    d1 = (1.5 * s[0] * u[:, 0]).reshape(3, 3)
    pair = sorted(
        [shown[6], shown[7]], key=lambda a: float((a - mu).ravel() @ d1.ravel())
    )
    np.testing.assert_allclose(pair[1], mu + d1)
    np.testing.assert_allclose(pair[0], mu - d1)
    assert fig.axes[1].get_title() == "+1.5 f1"
    plt.close(fig)
