"""DCN-form DRM inference: cost vs a plain DCN, vs NumPyro enumeration, throughput.

One run, side by side, prints ratios:
 (a) max-sum DCN-form pass (bottom-up only, and with the top-down MAP) vs a plain
     ``lax.conv`` + ReLU + max-pool forward with the same shapes (goal <= 1.5x);
 (b) vs ``enumerate_exact`` on an 8x8, 3-level DRM (the size NumPyro enumerates
     in seconds; goal >= 100x);
 (c) images/s on 32x32 images, 3 levels, batch 1000, with the number of joint
     latent configurations each image's pass marginalises.

    python bench/bench_drm.py [--batch 1000] [--x64]
"""

import argparse
import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def timed(fn, *args, repeat=5):
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def plain_dcn(drm, key):
    """A plain DCN with the DRM's layer shapes: conv(k=w, stride=w) -> ReLU -> max
    over the G translation channels of each state; random weights."""
    params = []
    c_in = 1
    for level in range(1, drm.levels + 1):
        k, g = drm.n_states[level - 1] + 1, drm.n_nuisances[level - 1]
        w = drm.windows[level - 1]
        key, sub = jax.random.split(key)
        params.append(jax.random.normal(sub, (w, w, c_in, k * g)) * 0.1)
        c_in = k

    @jax.jit
    def forward(images):
        x = images[..., None]
        for level, wgt in enumerate(params, start=1):
            w = drm.windows[level - 1]
            k, g = drm.n_states[level - 1] + 1, drm.n_nuisances[level - 1]
            x = jax.lax.conv_general_dilated(
                x, wgt, (w, w), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = x.reshape(x.shape[:3] + (k, g)).max(-1)  # max-pool over translations
            x = jax.nn.relu(x)
        return x[:, 0, 0, :]

    return forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--x64", action="store_true")
    parser.add_argument("--enum-images", type=int, default=10)
    args = parser.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from pgm_drm.graph import compile_model  # noqa: F401
    from pgm_drm.inference import enumerate_exact
    from pgm_drm.inference.dcn import dcn_infer
    from pgm_drm.models import DeepRenderingModel
    from pgm_drm.models.maxsum import bottom_up as drm_bottom_up

    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} {dev.device_kind}; float{'64' if args.x64 else '32'}"
    )

    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(0), image_shape=(32, 32), levels=3
    )
    images, _ = drm.sample(jax.random.PRNGKey(1), args.batch)
    bottom_up = jax.jit(lambda x: drm.class_scores(drm_bottom_up(drm, x, 0.0)[0]))
    t_up = timed(bottom_up, images)
    t_full = timed(lambda x: dcn_infer(drm, x, "max"), images)
    t_plain = timed(plain_dcn(drm, jax.random.PRNGKey(2)), images)
    print(
        f"(a) 32x32, L=3, batch {args.batch}: plain DCN {t_plain * 1e3:.2f} ms, "
        f"DCN-form bottom-up {t_up * 1e3:.2f} ms ({t_up / t_plain:.2f}x), "
        f"+ top-down MAP {t_full * 1e3:.2f} ms ({t_full / t_plain:.2f}x)"
    )

    small = DeepRenderingModel.random(
        jax.random.PRNGKey(3), image_shape=(8, 8), levels=3, states=(3, 2, 2)
    )
    imgs, _ = small.sample(jax.random.PRNGKey(4), args.enum_images)
    enumerate_exact(small.model, image=imgs[0], semiring="max")  # compile
    t0 = time.perf_counter()
    for im in imgs:
        enumerate_exact(small.model, image=im, semiring="max")
    t_enum = (time.perf_counter() - t0) / len(imgs)
    t_dcn = timed(lambda x: dcn_infer(small, x, "max"), imgs) / len(imgs)
    print(
        f"(b) 8x8, L=3: enumerate_exact {t_enum * 1e3:.1f} ms/image, DCN-form "
        f"{t_dcn * 1e6:.1f} us/image, ratio {t_enum / t_dcn:.0f}x"
    )

    units = [int(np.prod(drm.grid_shape(level))) for level in range(1, drm.levels)]
    log10_configs = (
        math.log10(drm.n_classes)
        + math.log10(drm.n_nuisances[-1])
        + sum(
            n * math.log10(2 * drm.n_nuisances[level]) for level, n in enumerate(units)
        )
    )
    for semiring in ("max", "sum"):
        t = timed(lambda x, s=semiring: dcn_infer(drm, x, s), images)
        name = "max-sum" if semiring == "max" else "sum-product"
        print(
            f"(c) {name} 32x32 L=3: {args.batch / t:,.0f} images/s "
            f"(each marginalises 10^{log10_configs:.0f} joint configurations)"
        )


if __name__ == "__main__":
    main()
