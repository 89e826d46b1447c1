"""Batches spread over devices with jax.sharding (issue 14, item 2): infer, the
DRM passes and the E-steps of the hand-written EMs.

Four CPU devices are forced in a subprocess (``XLA_FLAGS`` must be set before JAX
starts); the batched, sharded results must equal the unbatched single-device runs.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_drm.sharding import (
    batch_mesh,
    pad_to_devices,
    shard_batch,
    shard_with_mask,
    unpad,
    valid_mean,
    where_valid,
)
from pgm_drm.testing import run_on_devices

SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from jax.sharding import PartitionSpec
    from pgm_drm.graph import compile_model
    from pgm_drm.inference import infer
    from pgm_drm.models import RenderingModel, default_templates

    assert jax.device_count() == 4, jax.devices()
    rm = RenderingModel(default_templates(), sigma=0.6, switch_prior=0.9)
    images, _ = rm.sample(jax.random.PRNGKey(1), 10)
    fg = compile_model(rm.model, image=images[0])
    # Spread evenly (8) and padded (10 does not divide 4: padded, padding
    # dropped); both kernels' programs, each (pass, size) compiles its own.
    for schedule, n in (("tree", 8), ("exact", 10)):
        batch = infer(fg, "sum", schedule=schedule, image=images[:n])
        assert batch.log_z.shape == (n,)
        if n == 8:  # no padding: the result stays spread over the devices
            assert batch.log_z.sharding.spec == PartitionSpec("batch")
            assert len(batch.log_z.sharding.device_set) == 4
        for i in range(n):  # unbatched: one device, no sharding
            one = infer(fg, "sum", schedule=schedule, image=images[i])
            # float64, the same program per image: round-off only (1e-6 is
            # the issue's bound).
            np.testing.assert_allclose(batch.log_z[i], one.log_z, atol=1e-6)
            for site in one.map:
                assert int(batch.map[site][i]) == int(one.map[site])
                np.testing.assert_allclose(
                    batch.log_marginals[site][i], one.log_marginals[site],
                    atol=1e-6,
                )
    # A batch already spread as shard_batch spreads it is taken as it is; the
    # next batch of that shape, on one device, is spread too (a repeat call
    # may not skip the sharding: found by a review).
    from pgm_drm.sharding import shard_batch

    pre, _ = shard_batch(images[:8])
    infer(fg, "max", image=pre)
    again = infer(fg, "max", image=images[:8] + 0.0)
    assert again.log_z.sharding.spec == PartitionSpec("batch"), again.log_z.sharding
    assert len(again.log_z.sharding.device_set) == 4
    # A padded batch with one NaN pixel: the error counts the entries given,
    # not the padding's copies of the last row.
    bad = np.asarray(images[:10]).copy()
    bad[9, 0, 0] = np.nan
    try:
        infer(fg, "sum", schedule="exact", image=bad)
        raise AssertionError("NaN evidence was not refused")
    except ValueError as err:
        assert f"(1 of {bad.size} entries)" in str(err), err
    from pgm_drm.inference import conv_dcn_infer
    from pgm_drm.models import ConvRenderingModel, DeepRenderingModel

    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(0), image_shape=(8, 8), levels=3, windows=(2, 2, 2),
        states=(3, 3, 3),
    )
    conv = ConvRenderingModel.random(jax.random.PRNGKey(2))
    cases = [
        (8, drm.sample(jax.random.PRNGKey(3), 10)[0], lambda x: drm.infer(x)),
        (10, conv.sample(jax.random.PRNGKey(4), 10)[0],
         lambda x: conv_dcn_infer(conv, x)),
    ]
    for n, images, run in cases:
        batch = run(images[:n])
        assert batch.log_z.shape == (n,)
        if n == 8:
            assert len(batch.log_z.sharding.device_set) == 4
        for i in range(n):
            one = run(images[i])
            # float64 max-sum, the same program per image: round-off only.
            np.testing.assert_allclose(batch.log_z[i], one.log_z[0], atol=1e-6)
            for site in one.map:
                np.testing.assert_array_equal(batch.map[site][i], one.map[site][0])

    # The hand-written EMs on 10 images (padded to 12): every E-step gets the
    # images spread over the 4 devices, and every fit equals the plain one
    # (shard_with_mask replaced by the identity: unsharded, on one device).
    from pgm_drm.learning import drm_em, em, fa_em
    from pgm_drm.learning.loop import LoopOptions

    seen = []  # the sharding of the image batch each E-step got

    def spy(module, name):
        inner = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen.append((args[1].sharding, args[1].shape[0]))
            return inner(*args, **kwargs)

        setattr(module, name, wrapped)

    for module, step in ((em, "em_step"), (fa_em, "_e_step_jit"), (drm_em, "_step")):
        spy(module, step)
    x = images[:, 1:5, 1:5]  # 4x4: the smallest two-level tree DRM
    y = np.array([0, 1, 0, 1] + [-1] * 6)  # semi-supervised
    start = RenderingModel(default_templates(4)[:2, :3], sigma=0.5, switch_prior=0.5)
    tree = DeepRenderingModel(  # pixel and child templates 1x1
        windows=(2, 2),
        pixel_templates=np.array([1.0, 0.0, -1.0]).reshape(3, 1, 1),
        child_templates=(np.array([0, 1], np.int32).reshape(2, 1, 1),),
        class_prior=np.full(2, 0.5),
        nuisance_priors=(np.full(4, 0.25), np.full(4, 0.25)),
        switch_priors=(0.8,),
        sigma=0.5,
    )
    quiet = dict(n_iter=3, tol=None, loop=LoopOptions(progress=False))
    fits = {  # labels, EM-lambda weights, hard-EM re-seeding: padding in every sum
        em: lambda: em.fit_em(
            x, 2, 3, mode="hard", labels=y, unlabelled_weight=0.5, init=start,
            **quiet,
        ),
        fa_em: lambda: fa_em.fit_fa_em(x, 2, 1, 2, labels=y, **quiet),
        drm_em: lambda: drm_em.fit_drm_em(x, tree, labels=y, **quiet),
    }
    for module, fit in fits.items():
        seen.clear()
        sharded = fit()
        assert seen, module.__name__
        for s, n in seen:
            assert s.spec[0] == "batch" and len(s.device_set) == 4, s
            assert n == 12, n  # padded, not dropped
        module.shard_with_mask = lambda tree: (tree, None)
        plain = fit()
        # Traces, n_iter, converged and every parameter; float64, the same sums
        # split over 4 devices: round-off only (1e-6 is the issue's bound).
        for a, b in zip(sharded[1:], plain[1:], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        pairs = zip(jax.tree.leaves(sharded[0]), jax.tree.leaves(plain[0]), strict=True)
        for a, b in pairs:
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    print("SHARDED-OK")
    """
)


def test_batched_passes_on_four_devices_equal_single_device():
    run_on_devices(SCRIPT, 4)


@pytest.mark.parametrize(("n", "d", "want"), [(8, 4, 8), (10, 4, 12), (1, 4, 4)])
def test_pad_to_devices(n, d, want):
    assert pad_to_devices(n, d) == want


def test_one_device_is_the_identity():
    x = {"a": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(3)}
    mesh = batch_mesh(jax.devices()[:1])
    y, n = shard_batch(x, mesh)
    assert n == 3 and y["a"] is x["a"] and y["b"] is x["b"]
    np.testing.assert_array_equal(unpad(y, 3)["a"], x["a"])


def test_uneven_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="same leading size"):
        shard_batch({"a": jnp.ones(3), "b": jnp.ones(4)})


def test_one_device_needs_no_mask():
    x = jnp.arange(6.0).reshape(3, 2)
    y, valid = shard_with_mask(x, batch_mesh(jax.devices()[:1]))
    assert y is x and valid is None
    assert where_valid(x, None) is x
    np.testing.assert_array_equal(valid_mean(x, None), jnp.mean(x))


def test_padding_rows_are_out_of_every_reduction():
    x = jnp.array([[1.0, 2.0], [3.0, 6.0], [-jnp.inf, jnp.nan]])
    valid = jnp.array([True, True, False])
    np.testing.assert_array_equal(where_valid(x, valid)[2], [0.0, 0.0])
    # (1 + 2 + 3 + 6) / 4 is exact in binary floating point.
    assert float(valid_mean(x, valid)) == 3.0
