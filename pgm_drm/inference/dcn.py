"""The DRM's DCN-form inference: bottom-up conv -> ReLU -> pool, top-down backtracking.

On the tree DRM (:mod:`pgm_drm.models.drm`) the max-sum messages from the pixels
up to the class are exactly the layers of a DCN (Eqs. 9, 12-13):

1. level 1: template matching of every (state, translation) pixel template
   against the unit's patch: ``<w_kg | I> + b_kg`` with ``w = mu / sigma^2``,
   ``b = -||mu||^2 / 2 sigma^2`` (a strided convolution, Eq. 7-8);
   level ``l >= 2``: the same with *one-hot* child templates, i.e. gathering the
   children's messages at the states the template puts there;
2. ``+ log pi_g`` and reduce over ``g``: max-pooling over translations (Eq. 12)
   for max-sum, logsumexp (mean-pool-like) for sum-product;
3. the switch: ``reduce(log pi_on + x_s, log pi_off + x_OFF)`` -- for max-sum
   ``max(x_s - x_OFF + log(pi_on / pi_off), 0) + const``, the ReLU (Eq. 9).

Any temperature ``T`` replaces max by ``T * logsumexp(. / T)`` (§6.2.1). The
top-down pass (§2.4 stage ii, §6.2.2) backtracks the argmaxes coarse-to-fine and
returns the joint MAP of every latent.

The pass itself is the model's own computation (:mod:`pgm_drm.models.maxsum`,
shared with hard EM and the discriminative relaxation); this module is the
inference API on top of it, and holds the independent twins that test it:
:func:`naive_dcn_pass` (loop by loop, numpy) and :func:`child_scores_onehot`
(the child level as a dense one-hot contraction).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array, ArrayLike, Semiring
from pgm_drm.models.drm import DeepRenderingModel
from pgm_drm.models.maxsum import DCNOutput, windows

__all__ = ["DCNOutput", "child_scores_onehot", "dcn_infer", "naive_dcn_pass"]


def child_scores_onehot(
    drm: DeepRenderingModel, level: int, child_msgs: Array
) -> Array:
    """Twin of ``drm.level_scores(level, child_msgs)`` (``l >= 2``, without ``log
    pi_g``) written literally as the DCN layer: a dense contraction with the
    one-hot templates ``sum_o sum_j 1[table[k,g,o] = j] m_o(j)``. ``-inf`` messages
    are floored at the dtype's lowest finite value so that ``0 * m`` stays 0. (On
    an H200 the gather was faster: 1.9M vs 1.2M images/s in ``bench/bench_drm.py``
    (c).)
    """
    table = drm.placement_table(level)  # (K+1, G, O) child states
    win = windows(child_msgs, drm.windows[level - 1])  # (B,h,h,O,K'+1)
    win = jnp.maximum(win, jnp.finfo(win.dtype).min)
    onehot = jax.nn.one_hot(table, win.shape[-1], dtype=win.dtype)  # (K+1,G,O,K'+1)
    return jnp.einsum(
        "bxyoj,kgoj->bxykg", win, onehot, precision=jax.lax.Precision.HIGHEST
    )


def dcn_infer(
    drm: DeepRenderingModel,
    images: ArrayLike,
    semiring: Semiring = "max",
    temperature: float | None = None,
    *,
    scores: bool = False,
) -> DCNOutput:
    """DCN-form bottom-up + top-down inference on one image or a batch (jitted,
    the model traced): ``drm.infer``, the pass of :mod:`pgm_drm.models.maxsum`.

    Args:
        drm: The model.
        images: ``image_shape`` or ``(B, *image_shape)``.
        semiring: "max" (max-sum: max-pooling, ReLU) or "sum" (sum-product).
        temperature: Overrides ``semiring`` (``T * logsumexp(x / T)``).
        scores: Also return every level's pre-pooling scores (default ``False``:
            ``()``, not written out).

    Returns:
        :class:`DCNOutput` (batched; a single image gets ``B = 1``).
    """
    return drm.infer(images, semiring, temperature, scores=scores)


def naive_dcn_pass(
    drm: DeepRenderingModel, image: ArrayLike, temperature: float
) -> tuple[np.ndarray, float]:
    """Loop-by-loop twin of the bottom-up pass on one image (numpy, no vectorising).

    Recurses over units with explicit loops over states, translations, switch
    values and window offsets.

    Returns:
        ``(class log-posterior (C,), log Z)``.
    """
    t = float(temperature)

    def red(values):
        v = np.asarray(values, dtype=float)
        if t == 0.0:
            return float(np.max(v))
        m = np.max(v)
        if not np.isfinite(m):
            return float(m)
        return float(m + t * np.log(np.sum(np.exp((v - m) / t))))

    img = np.asarray(image, dtype=float)
    s2 = drm.sigma**2

    def unit_message(level, y, x):
        """m(s) for s in 0..K (K = OFF) of the level-`level` unit at grid (y, x)."""
        w = drm.windows[level - 1]
        table = np.asarray(drm.placement_table(level))
        k_all, g_all, _ = table.shape
        u = np.zeros((k_all, g_all))
        if level == 1:
            patch = img[y * w : (y + 1) * w, x * w : (x + 1) * w].reshape(-1)
            for k, g in itertools.product(range(k_all), range(g_all)):
                mean = table[k, g]
                u[k, g] = np.sum(
                    -((patch - mean) ** 2) / (2 * s2) - 0.5 * np.log(2 * np.pi * s2)
                )
        else:
            child = [
                [unit_message(level - 1, y * w + r, x * w + c) for c in range(w)]
                for r in range(w)
            ]
            for k, g in itertools.product(range(k_all), range(g_all)):
                total = 0.0
                for o in range(w * w):
                    total += child[o // w][o % w][table[k, g, o]]
                u[k, g] = total
        log_pg = np.log(np.asarray(drm.nuisance_priors[level - 1]))
        pooled = [
            red([u[k, g] + log_pg[g] for g in range(g_all)]) for k in range(k_all)
        ]
        if level == drm.levels:
            return pooled
        p = drm.switch_priors[level - 1]
        off = k_all - 1
        out = []
        for s in range(k_all):
            branches = []
            for a, log_pa in ((0, np.log1p(-p)), (1, np.log(p))):
                eff = s if a == 1 else off
                branches.append(log_pa + pooled[eff])
            out.append(red(branches))
        return out

    top = unit_message(drm.levels, 0, 0)
    scores = np.array(top[:-1]) + np.log(np.asarray(drm.class_prior))
    log_z = red(scores)
    return scores - log_z, log_z
