"""Compiled message passing vs NumPyro enumeration on the same 1000 RM images.

One run, side by side, prints the ratio (goal: >= 100x after compilation).
Both sides are timed after their first (compiling) call; enumerate_exact is
NumPyro's funsor enumeration, jitted once and reused per image (log Z, exact
marginals by clamping, infer_discrete MAP), the kernel is one vmapped call.

    python bench/bench_rm.py [--images 1000]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from pgm_drm.graph import compile_model  # noqa: E402
from pgm_drm.inference import enumerate_exact, infer  # noqa: E402
from pgm_drm.models import RenderingModel, default_templates  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    rm = RenderingModel(default_templates(8), sigma=0.5, switch_prior=0.9)
    images, _ = rm.sample(jax.random.PRNGKey(0), args.images)
    fg = compile_model(rm.model, image=images[0])
    print(
        f"device: {jax.devices()[0].device_kind}; {args.images} images "
        f"{rm.image_shape}, C={rm.n_classes} G={rm.n_nuisances} with switch"
    )
    for semiring in ("sum", "max"):
        infer(fg, semiring, image=images).log_z.block_until_ready()
        t0 = time.perf_counter()
        post = infer(fg, semiring, image=images)
        post.log_z.block_until_ready()
        t_kernel = time.perf_counter() - t0
        enumerate_exact(rm.model, image=images[0], semiring=semiring)
        t0 = time.perf_counter()
        log_z = [
            float(enumerate_exact(rm.model, image=im, semiring=semiring).log_z)
            for im in images
        ]
        t_enum = time.perf_counter() - t0
        err = float(np.max(np.abs(np.asarray(post.log_z) - np.array(log_z))))
        print(
            f"{semiring}-product: kernel {t_kernel * 1e3:8.1f} ms, "
            f"enumerate_exact {t_enum * 1e3:8.1f} ms, ratio {t_enum / t_kernel:7.0f}x "
            f"(max |dlogZ| {err:.1e})"
        )


if __name__ == "__main__":
    main()
