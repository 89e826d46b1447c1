"""EM vs backprop on digits: the same architecture, the same data, one run.

The architecture is the RM's classifier (Eqs. 5-9): C=10 classes x G=10
templates, score ``max_g <w_cg | I> + b_cg`` -- a max-out network. EM fits it
generatively (supervised hard EM, Eqs. 16-17, closed-form M-steps); SGD trains the
same max-out network's weights from a random start with Adam (cross-entropy,
Eq. 25). Both are timed after a warm-up run (JIT compilation excluded; the SGD
clock also runs through its per-epoch test evaluation, a single forward pass) and we
print the wall time each needs to first reach the target test accuracy, and the
ratio. (The related paper reports EM 2-3x faster than backprop for DRMs.)

    python bench/bench_learning.py [--target 0.96] [--iters 30] [--epochs 60]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def em_curve(d, iters, key):
    """(seconds, test accuracy) after each hard-EM iteration (step time only)."""
    from pgm_drm.learning import em_init, em_step
    from pgm_drm.learning.base import finish_model

    state = em_init(d.x_train, 10, 10, key=key, labels=d.y_train)
    x, y = jax.numpy.asarray(d.x_train), jax.numpy.asarray(d.y_train)
    elapsed, curve = 0.0, []
    for _ in range(iters):
        t0 = time.perf_counter()
        state, _ = em_step(state, x, y, "hard", min_sigma=0.05)
        jax.block_until_ready(state.model)
        elapsed += time.perf_counter() - t0
        model = finish_model(state.model)
        acc = float(np.mean(np.asarray(model.classify(d.x_test)) == d.y_test))
        curve.append((elapsed, acc))
    return curve


def sgd_curve(d, epochs, key):
    """(seconds, test accuracy) after each epoch of Adam on the max-out net."""
    from pgm_drm.learning import fit_discriminative, init_random

    net = init_random(key, (8, 8), 10, pieces=10)  # dense: the RM's architecture
    fit = fit_discriminative(
        net,
        d.x_train,
        d.y_train,
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        validation=(d.x_test, d.y_test),
        key=key,
        progress=False,
    )
    h = fit.history
    return list(
        zip(np.asarray(h["seconds"])[1:], np.asarray(h["val_acc"])[1:], strict=True)
    )


def first_reach(curve, target):
    for t, acc in curve:
        if acc >= target:
            return t
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", type=float, default=0.96)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    from pgm_drm.data import load_digits_split

    d = load_digits_split()
    key = jax.random.PRNGKey(0)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind}")
    em_curve(d, 2, key)  # warm-up: compile
    sgd_curve(d, 1, key)
    em = em_curve(d, args.iters, key)
    sgd = sgd_curve(d, args.epochs, key)
    for name, curve in (("EM (hard, closed-form M-step)", em), ("SGD (Adam)", sgd)):
        print(
            f"{name:<31} final test acc {curve[-1][1]:.4f} after {len(curve)} "
            f"steps, {curve[-1][0]:.2f} s; best {max(a for _, a in curve):.4f}"
        )
    for target in sorted({args.target, 0.95, 0.97}):
        t_em, t_sgd = first_reach(em, target), first_reach(sgd, target)
        print(
            f"time to test accuracy >= {target:.2f}: EM {t_em:.3f} s, SGD "
            f"{t_sgd:.3f} s, SGD/EM = {t_sgd / t_em:.1f}x"
        )


if __name__ == "__main__":
    main()
