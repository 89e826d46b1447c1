"""Activity maximization (Eqs. 26-27): max-sum recursion vs enumeration, and I*.

Tolerances: energies are sums of at most 64 squared float64 pixels of size ~1 taken
in different orders by the recursion and by the enumeration, so they agree to
~1e-14; 1e-9 leaves room without hiding a wrong maximum (distinct poses differ in
energy by O(0.1) for Gaussian templates).
"""

import itertools

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.diagnostics.activity import (
    activity_maximization,
    enumerate_nuisances,
    naive_activity_maximization,
    plot_activity_maximization,
    subtree_max_energy,
)
from pgm_drm.models import DeepRenderingModel

ATOL = 1e-9

# (levels, windows, template sizes) on 8x8 images with <= 6561 joint nuisances,
# so that the naive twin can enumerate them.
TINY = [
    (1, (8,), (6,)),
    (2, (4, 2), (3, 1)),
    (2, (4, 2), (2, 2)),
    (2, (2, 4), (2, 3)),
    (3, (2, 2, 2), (2, 1, 1)),
    (3, (2, 2, 2), (2, 2, 1)),
    (3, (2, 2, 2), (2, 1, 2)),
]


def _tiny(seed: int, which: int) -> DeepRenderingModel:
    levels, windows, sizes = TINY[which]
    return DeepRenderingModel.random(
        jax.random.PRNGKey(seed),
        (8, 8),
        levels=levels,
        windows=windows,
        template_sizes=sizes,
    )


def _blocks(images: np.ndarray, h: int) -> np.ndarray:
    """``(..., H, W)`` -> ``(..., h, h, p, p)`` patches on an h x h grid."""
    side = images.shape[-1]
    p = side // h
    lead = images.shape[:-2]
    x = images.reshape(lead + (h, p, h, p))
    return np.moveaxis(x, -3, -2)


def _pose_patch_norms(drm, result) -> np.ndarray:
    """``||mu(c, g*_P)|_P||`` recomputed by rendering the returned poses."""
    mu = np.asarray(drm.render(result.poses))  # (C, h, h, H, W)
    c, h = mu.shape[:2]
    blocks = _blocks(mu, h)  # (C, h, h, h, h, p, p)
    y, x = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
    own = blocks[:, y, x, y, x]  # (C, h, h, p, p): each pose on its own patch
    return np.sqrt(np.sum(own**2, axis=(-2, -1))), own


@given(
    seed=st.integers(0, 10_000),
    which=st.integers(0, len(TINY) - 1),
    level=st.integers(1, 3),
)
def test_recursion_equals_enumeration(seed, which, level):
    drm = _tiny(seed, which)
    level = min(level, drm.levels)
    fast = activity_maximization(drm, level)
    naive = naive_activity_maximization(drm, level)
    np.testing.assert_allclose(fast.patch_norms, naive.patch_norms, atol=ATOL)
    np.testing.assert_allclose(fast.scores, naive.scores, atol=ATOL)
    # Ties may pick other poses, but the fast poses must attain the maximum.
    norms, _ = _pose_patch_norms(drm, fast)
    np.testing.assert_allclose(norms, naive.patch_norms, atol=ATOL)
    norms, _ = _pose_patch_norms(drm, naive)
    np.testing.assert_allclose(norms, naive.patch_norms, atol=ATOL)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("which", [1, 4])
def test_images_are_the_pose_renderings_on_their_patches(which, normalize):
    """Eq. 27: I* = sum_P mu(c, g*_P)|_P (/ ||.|| with normalize)."""
    drm = _tiny(3, which)
    for level in range(1, drm.levels + 1):
        res = activity_maximization(drm, level, normalize=normalize)
        norms, own = _pose_patch_norms(drm, res)
        h = own.shape[1]
        expect = own
        if normalize:
            expect = own / np.where(norms > 0, norms, 1.0)[..., None, None]
        got = _blocks(np.asarray(res.images), h)
        np.testing.assert_allclose(got, expect, atol=ATOL)
        np.testing.assert_allclose(res.patch_norms, norms, atol=ATOL)
        if normalize:
            got_norms = np.sqrt(np.sum(got**2, axis=(-2, -1)))
            assert np.all(np.isclose(got_norms, 1.0) | (norms == 0))


def _linear_score(mus: np.ndarray, image: np.ndarray, h: int) -> float:
    """Eq. 26's objective ``sum_P max_g <mu(c, g)|_P | I_P>`` by enumeration."""
    per_patch = np.sum(_blocks(mus, h) * _blocks(image, h)[None], axis=(-2, -1))
    return float(np.sum(np.max(per_patch, axis=0)))


@given(seed=st.integers(0, 10_000), which=st.integers(1, len(TINY) - 1))
def test_no_unit_norm_patch_image_beats_the_activity_image(seed, which):
    drm = _tiny(seed, which)
    rng = np.random.default_rng(seed)
    res = activity_maximization(drm, 1)
    h = res.patch_norms.shape[1]
    latents = enumerate_nuisances(drm)
    n = latents[f"g{drm.levels}"].shape[0]
    for c in range(drm.n_classes):
        mus = np.asarray(drm.render(latents | {"c": np.full(n, c)}))  # (N, H, W)
        best = _linear_score(mus, np.asarray(res.images[c]), h)
        # I* attains Eq. 26's value (Cauchy-Schwarz with equality per patch).
        np.testing.assert_allclose(best, float(res.scores[c]), atol=ATOL)
        rivals = [np.asarray(res.images[k]) for k in range(drm.n_classes) if k != c]
        rivals += list(rng.normal(size=(10,) + drm.image_shape))
        # Other poses of the same class, each patch from a random configuration.
        picks = rng.integers(0, n, size=(5, h, h))
        y, x = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
        for pick in picks:
            own = _blocks(mus, h)[pick, y, x]  # (h, h, p, p)
            rivals.append(np.moveaxis(own, 1, 2).reshape(drm.image_shape))
        for rival in rivals:
            patches = _blocks(rival, h)
            norm = np.sqrt(np.sum(patches**2, axis=(-2, -1), keepdims=True))
            unit = patches / np.where(norm > 0, norm, 1.0)  # unit-norm patches
            unit = np.moveaxis(unit, 1, 2).reshape(drm.image_shape)
            assert _linear_score(mus, unit, h) <= best + ATOL


def test_max_energy_recursion_matches_rendering_each_state():
    """M_l(k) is the energy of a level-l unit in state k at its best translations."""
    drm = _tiny(7, 5)
    energy, _ = subtree_max_energy(drm)
    assert energy[0].shape == (drm.n_states[0] + 1,)
    np.testing.assert_allclose(energy[0][-1], 0.0)  # OFF renders nothing
    top = naive_activity_maximization(drm, drm.levels)
    np.testing.assert_allclose(
        np.asarray(top.patch_norms[:, 0, 0]) ** 2, energy[-1][:-1], atol=ATOL
    )


def test_default_activity_images_are_classified_as_their_class():
    """Max-sum DCN decision on I*(c) at template brightness (normalize=False).

    The unit-norm image of Eq. 26 is too dark for the generative model's
    likelihood; the un-normalised Eq. 27 image has the strokes' own brightness.
    """
    drm = DeepRenderingModel.default()
    classes = np.arange(drm.n_classes)
    for level in range(1, drm.levels + 1):
        res = activity_maximization(drm, level, normalize=False)
        decided = np.argmax(np.asarray(drm.infer(res.images).class_log_posterior), -1)
        np.testing.assert_array_equal(decided, classes)
    # At level 1 every stroke has norm sqrt(3): rescaling the unit-norm image works.
    res = activity_maximization(drm, 1)
    out = drm.infer(np.sqrt(3.0) * np.asarray(res.images))
    np.testing.assert_array_equal(np.argmax(out.class_log_posterior, -1), classes)


def test_default_patches_have_several_poses():
    """Eq. 27: I* superposes the object in several poses, one per patch."""
    drm = DeepRenderingModel.default()
    res = activity_maximization(drm, 1)
    g2 = np.asarray(res.poses["g2"])  # (C, 6, 6, 2, 2)
    for c in range(drm.n_classes):
        configs = {
            tuple(g2[c, y, x].ravel()) for y, x in itertools.product(range(6), range(6))
        }
        assert len(configs) > 1
    # The box's fourth part is OFF: nothing can be rendered in that quadrant.
    assert np.all(np.asarray(res.patch_norms[0, 3:, 3:]) == 0)
    # The top-left corner part [[-, -], [|, OFF]] reaches its window's last
    # cell only with its OFF entry: one dark patch; every other patch a stroke.
    expect = np.full((3, 3), np.sqrt(3.0))  # every stroke has three unit pixels
    expect[2, 2] = 0.0
    np.testing.assert_allclose(res.patch_norms[0, :3, :3], expect, atol=ATOL)


def test_bad_arguments():
    drm = DeepRenderingModel.default()
    for level in (0, drm.levels + 1, 1.5, True):
        with pytest.raises(ValueError, match="level"):
            activity_maximization(drm, level)
    with pytest.raises(ValueError, match="max_configs"):
        naive_activity_maximization(drm)


def test_plot_activity_maximization():
    drm = _tiny(0, 4)
    res = activity_maximization(drm, 2)
    fig = plot_activity_maximization(drm, res, ncols=2)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == drm.n_classes
    plt.close(fig)
