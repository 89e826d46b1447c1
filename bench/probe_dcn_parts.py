"""Where the DCN-form pass's time goes beside a plain forward, part by part.

Issue 14 asks that the DRM pass with the top-down MAP cost at most 1.5x a plain
conv/ReLU/max-pool forward of the same shapes (32x32, 3 levels, batch 1000). On
the 2-core CPU it does (``bench_drm.py`` (a)); on an H200 it was 1.37-1.78x,
where a batch of 1000 is a few hundred microseconds of kernel launches and waits.
This probe splits the gap into its parts, each timed side by side in one
process, so that one run on a GPU says which part to work on:

* ``plain``: the plain forward (its weights closed over: compile-time constants);
* ``up``: the DRM's bottom-up max-sum pass and class scores (plain max-pooling);
* ``up_argmax``: the same keeping every pooling's argmax (the MAP's switches);
* ``lean``: ``dcn_pass`` (bottom-up with argmaxes, top-down MAP, log Z, the
  class posterior and the messages), the model a traced argument;
* ``lean_closed``: the same program with the model closed over, so that its
  parameter-only work (log priors, placed templates, placement tables) is folded
  at compile time, as the plain forward's weights are: the most that hoisting the
  parameter work out of the per-batch program could save.

Each at ``--batch`` (default 1000) and ``--large`` (default 32768; 0: skip)
images, per call (a wait per call) and pipelined (20 calls in flight, one
wait). The MAP of ``lean`` and ``lean_closed`` is checked equal.

    python bench/probe_dcn_parts.py [--quick] [--batch 1000] [--large 32768]
"""

from __future__ import annotations

import argparse
import sys

from common import interleaved, pipelined, platforms_default

platforms_default()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_drm import cast, plain_dcn, random_drm  # noqa: E402


def parts(drm, images, plain) -> dict:
    """The five programs on ``images`` (each returns a pytree, unblocked)."""
    from pgm_drm.models.maxsum import bottom_up, bottom_up_argmax, dcn_pass

    up = jax.jit(lambda m, x: m.class_scores(bottom_up(m, x, 0.0)[0]))

    def up_argmax_fn(m, x):
        p = bottom_up_argmax(m, x)
        return m.class_scores(p.pooled[-1]), p.g_best

    up_argmax = jax.jit(up_argmax_fn)
    closed = jax.jit(lambda x: dcn_pass.__wrapped__(drm, x, 0.0))
    return {
        "plain": lambda: plain(images),
        "up": lambda: up(drm, images),
        "up_argmax": lambda: up_argmax(drm, images),
        "lean": lambda: dcn_pass(drm, images, 0.0),
        "lean_closed": lambda: closed(images),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--large", type=int, default=32768)
    args = ap.parse_args(argv)
    reps = 3 if args.quick else 10
    batches = [64 if args.quick else args.batch]
    batches += [] if args.quick or not args.large else [args.large]
    d = jax.devices()[0]
    print(f"device: {d.platform} {d.device_kind} | jax {jax.__version__}")
    drm = cast(random_drm(32, 3), jnp.float32)
    plain = plain_dcn(drm, jax.random.PRNGKey(2))
    for batch in batches:
        images = jnp.asarray(drm.sample(jax.random.PRNGKey(1), batch)[0], jnp.float32)
        fns = parts(drm, images, plain)
        a, b = fns["lean"]().map, fns["lean_closed"]().map
        same = all(np.array_equal(a[k], b[k]) for k in a)
        blocking = {k: (lambda f=f: jax.block_until_ready(f())) for k, f in fns.items()}
        per_call = interleaved(blocking, reps)
        piped = pipelined(fns, 20, max(2, reps // 2))
        print(f"\nbatch {batch} (32x32, 3 levels, float32); same MAP closed: {same}")
        head = ("part", "per call", "/ plain", "piped", "/ plain")
        print("  {:<12} {:>10} {:>8} {:>10} {:>8}".format(*head))
        for k in fns:
            one, many = per_call[k], piped[k]
            print(
                f"  {k:<12} {one * 1e6:>8.1f}us {one / per_call['plain']:>7.2f}x"
                f" {many * 1e6:>8.1f}us {many / piped['plain']:>7.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
