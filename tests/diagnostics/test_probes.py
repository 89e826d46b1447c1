"""Linear probes of the DCN's layers (§3.3, Fig. 6) and the jitted sampler."""

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest

from pgm_drm.diagnostics.probes import (
    ProbeResult,
    disentanglement_probe,
    plot_disentanglement,
    probe_drm,
)

N = 120  # draws per split: enough for the easy model, fast to fit


@pytest.fixture(scope="module")
def easy():
    """Low-noise probe model (sigma 0.2: strokes stand 5 sigma above the noise)."""
    return probe_drm(sigma=0.2)


@pytest.fixture(scope="module")
def result(easy):
    return disentanglement_probe(easy, jax.random.PRNGKey(0), N, N)


def test_shapes_and_ranges(easy, result):
    L = easy.levels
    assert result.levels == (0, 1, 2, 3)
    assert result.targets == ("c", "g3", "g2", "g1")
    assert result.accuracy.shape == (L + 1, 4)
    assert result.chance.shape == result.n_train.shape == result.n_test.shape == (4,)
    assert result.converged.shape == (L + 1, 4)
    # pixels, level-1 and level-2 message maps (K + 1 states per unit), C scores
    np.testing.assert_array_equal(result.n_features, [36 * 36, 9 * 9 * 5, 3 * 3 * 5, 3])
    assert np.all((result.accuracy >= 0) & (result.accuracy <= 1))
    assert np.all((result.chance >= 0) & (result.chance <= 1))
    # c and the top translation use every draw; a unit's g only where it is ON
    np.testing.assert_array_equal(result.n_train[:2], [N, N])
    assert np.all(result.n_train[2:] <= N) and np.all(result.n_train[2:] > 10)
    assert set(result.units) == {"g2", "g1"}
    for name, (y, x) in result.units.items():
        side = easy.grid_shape(int(name[1:]))[0]
        assert 0 <= y < side and 0 <= x < side


def test_fig6_shape_on_easy_model(result):
    """The class is separable at the top; the top translation is pooled away.

    Margins are wide (measured: c 0.99+ at the class scores vs chance ~0.35;
    g3 ~0.98 at level 1 vs ~chance at the class scores) so that sampling noise of
    120 test draws (binomial sd <= 0.05) cannot flip them.
    """
    acc = dict(zip(result.targets, result.accuracy.T, strict=True))
    chance = dict(zip(result.targets, result.chance, strict=True))
    assert acc["c"][-1] >= 0.9
    assert acc["c"][-1] > chance["c"] + 0.4
    assert acc["c"][-1] > acc["c"][0]  # pixels are entangled
    assert acc["g3"][1] > acc["g3"][-1] + 0.4  # max-pooled over by the top unit
    assert acc["g2"][1] > acc["g2"][2] + 0.3  # max-pooled over at level 2


def test_deterministic_given_key(easy, result):
    again = disentanglement_probe(easy, jax.random.PRNGKey(0), N, N)
    np.testing.assert_array_equal(again.accuracy, result.accuracy)
    np.testing.assert_array_equal(again.chance, result.chance)
    assert again.units == result.units


def test_units_override(easy):
    res = disentanglement_probe(
        easy, jax.random.PRNGKey(0), N, N, targets=("g1",), units={"g1": (0, 0)}
    )
    assert res.units == {"g1": (0, 0)}
    assert res.accuracy.shape == (4, 1)
    # the corner unit is ON only when the object and its part sit in the corner
    assert res.n_test[0] < N


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 1}, "n_train"),
        ({"n_train": 2.5}, "n_train"),
        ({"n_test": 0}, "n_test"),
        ({"targets": ("h",)}, "unknown target"),
        ({"targets": ()}, "empty"),
        ({"targets": ("c", "c")}, "repeat"),
        ({"units": {"g3": (0, 0)}}, "units"),
        ({"units": {"g1": (9, 0)}}, "outside"),
        ({"semiring": "min"}, "semiring"),
        ({"regularization": 0.0}, "regularization"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_arguments(easy, kwargs, match):
    args = {"n_train": 10, "n_test": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        disentanglement_probe(easy, jax.random.PRNGKey(0), **args)


def test_plot_disentanglement(result):
    fig = plot_disentanglement(result)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 * len(result.targets)  # accuracy + chance each
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "pixels"
    plt.close(fig)


def test_result_is_a_namedtuple(result):
    assert isinstance(result, ProbeResult)
    assert result._fields[:4] == ("levels", "targets", "accuracy", "chance")
