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
returns the joint MAP of every latent. :func:`naive_dcn_pass` is a loop-by-loop
twin used to test the vectorised pass.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array, ArrayLike, Semiring
from pgm_drm.models.drm import DeepRenderingModel, windows_to_grid
from pgm_drm.semiring import reduce_t, resolve_temperature, switch_reduce

__all__ = ["DCNOutput", "dcn_infer", "naive_dcn_pass", "windows_of"]


class DCNOutput(NamedTuple):
    """Result of the DCN-form pass on a batch of ``B`` images.

    Attributes:
        class_log_posterior: ``(B, C)`` normalised log-(max-)marginal of the class.
        log_z: ``(B,)`` log partition at the temperature (max: max log joint).
        messages: Per level ``l = 1..L-1``, the bottom-up message maps
            ``(B, *grid_shape(l), K_l + 1)`` (last state = OFF): the DCN's
            activations.
        scores: Per level ``l = 1..L``, pre-pooling maps
            ``(B, *grid_shape(l), K_l + 1, G_l)``: template match + ``log pi_g``.
        map: Joint MAP on spatial grids (``c``, ``g{L}`` ``(B,)``; ``g{l}``,
            ``a{l}``, ``s{l}`` ``(B, *grid_shape(l))`` for ``l < L``; ``s{l}`` is
            the unit's state after its switch, ``K_l`` = OFF), as from
            ``DeepRenderingModel.sample``; ``drm.render(map)`` reconstructs.
    """

    class_log_posterior: Array
    log_z: Array
    messages: tuple[Array, ...]
    scores: tuple[Array, ...]
    map: dict[str, Array]


def windows_of(x: Array, w: int) -> Array:
    """``(B, H, W, ...)`` -> ``(B, H/w, W/w, w*w, ...)`` non-overlapping windows."""
    b, h, wd = x.shape[:3]
    rest = x.shape[3:]
    x = jnp.reshape(x, (b, h // w, w, wd // w, w) + rest)
    x = jnp.moveaxis(x, 2, 3)
    return jnp.reshape(x, (b, h // w, wd // w, w * w) + rest)


def _pixel_scores(drm: DeepRenderingModel, images: Array) -> Array:
    """Level-1 log-likelihood of every patch under every (state, g): ``(B,h,h,K+1,G)``.

    Eq. 7-8: ``<mu/sigma^2 | I> - ||mu||^2/(2 sigma^2) - ||I||^2/(2 sigma^2) - const``.
    """
    s2 = drm.sigma**2
    table = drm.placement_table(1)  # (K+1, G, w*w) pixel means, OFF row zeros
    patches = windows_of(images[..., None], drm.windows[0])[..., 0]  # (B,h,h,w*w)
    match = jnp.einsum("bxyp,kgp->bxykg", patches, table / s2)  # the convolution
    bias = -jnp.sum(table**2, axis=-1) / (2 * s2)
    n = table.shape[-1]
    const = -jnp.sum(patches**2, axis=-1) / (2 * s2) - 0.5 * n * jnp.log(
        2 * jnp.pi * s2
    )
    return match + bias + const[..., None, None]


def _child_scores(drm: DeepRenderingModel, level: int, child_msgs: Array) -> Array:
    """Children's messages at the template states: ``(B,h,h,K+1,G)``.

    Eq. 12-13: a convolution with *one-hot* child templates is a gather of the
    children's messages at the states the template puts there, summed over the
    window offsets.
    """
    table = drm.placement_table(level)  # (K+1, G, O) child states
    win = windows_of(child_msgs, drm.windows[level - 1])  # (B,h,h,O,K'+1)
    o = jnp.arange(table.shape[-1])
    picked = win[:, :, :, o, table]  # (B,h,h,K+1,G,O)
    return jnp.sum(picked, axis=-1)


def _child_scores_onehot(
    drm: DeepRenderingModel, level: int, child_msgs: Array
) -> Array:
    """Twin of :func:`_child_scores` written literally as the DCN layer: a dense
    contraction with the one-hot templates ``sum_o sum_j 1[table[k,g,o] = j]
    m_o(j)``. ``-inf`` messages are floored at the dtype's lowest finite value so
    that ``0 * m`` stays 0. (On an H200 the gather was faster: 1.9M vs 1.2M
    images/s in ``bench/bench_drm.py`` (c).)
    """
    table = drm.placement_table(level)  # (K+1, G, O) child states
    win = windows_of(child_msgs, drm.windows[level - 1])  # (B,h,h,O,K'+1)
    win = jnp.maximum(win, jnp.finfo(win.dtype).min)
    onehot = jax.nn.one_hot(table, win.shape[-1], dtype=win.dtype)  # (K+1,G,O,K'+1)
    return jnp.einsum(
        "bxyoj,kgoj->bxykg", win, onehot, precision=jax.lax.Precision.HIGHEST
    )


def _switch(drm: DeepRenderingModel, level: int, pooled: Array, t: float) -> Array:
    return switch_reduce(pooled, drm.switch_priors[level - 1], t)


def _bottom_up(drm: DeepRenderingModel, images: Array, t: float):
    scores, messages = [], []
    msg = None
    for level in range(1, drm.levels + 1):
        raw = (
            _pixel_scores(drm, images) if level == 1 else _child_scores(drm, level, msg)
        )
        u = raw + jnp.log(drm.nuisance_priors[level - 1])
        scores.append(u)
        pooled = reduce_t(u, (u.ndim - 1,), t)  # pooling over translations g
        if level < drm.levels:
            msg = _switch(drm, level, pooled, t)
            messages.append(msg)
    top = pooled[:, 0, 0, :]  # (B, K_L + 1); the OFF row is never used at the top
    class_scores = top[:, :-1] + jnp.log(drm.class_prior)
    return class_scores, tuple(messages), tuple(scores)


def _top_down(drm: DeepRenderingModel, scores: tuple[Array, ...], class_scores: Array):
    """Coarse-to-fine backtracking of the max-sum argmaxes (§2.4 stage ii)."""
    L = drm.levels
    b = class_scores.shape[0]
    c = jnp.argmax(class_scores, axis=-1)
    top = scores[L - 1][:, 0, 0]  # (B, K+1, G)
    g = jnp.argmax(top[jnp.arange(b), c], axis=-1)
    out = {"c": c, f"g{L}": g}
    eff = c[:, None, None]
    g_grid = g[:, None, None]
    for level in range(L, 1, -1):
        table = drm.placement_table(level)
        children = windows_to_grid(
            table[eff, g_grid], drm.windows[level - 1]
        )  # (B,H,W)
        u = scores[level - 2]  # (B,H,W,K+1,G) of the child level
        best = jnp.max(u, axis=-1)  # (B,H,W,K+1)
        p = drm.switch_priors[level - 2]
        s_best = jnp.take_along_axis(best, children[..., None], axis=-1)[..., 0]
        off_best = best[..., -1]
        # a=0 wins ties, as the first index of an argmax over (OFF, ON) would.
        on_score = jnp.log(p) + s_best
        off_score = jnp.log1p(-p) + off_best
        a = (on_score > off_score).astype(jnp.int32)
        eff = jnp.where(a == 1, children, drm.n_states[level - 2])
        g_grid = jnp.argmax(
            jnp.take_along_axis(u, eff[..., None, None], axis=-2)[..., 0, :], axis=-1
        )
        out[f"s{level - 1}"] = eff
        out[f"a{level - 1}"] = a
        out[f"g{level - 1}"] = g_grid
    return out


@partial(jax.jit, static_argnums=(0, 2))
def _dcn(drm: DeepRenderingModel, images: Array, t: float) -> DCNOutput:
    class_scores, messages, scores = _bottom_up(drm, images, t)
    log_z = reduce_t(class_scores, (1,), t)
    if t == 0.0:
        max_scores, max_class = scores, class_scores
    else:
        max_class, _, max_scores = _bottom_up(drm, images, 0.0)
    return DCNOutput(
        class_log_posterior=class_scores - log_z[:, None],
        log_z=log_z,
        messages=messages,
        scores=scores,
        map=_top_down(drm, max_scores, max_class),
    )


def dcn_infer(
    drm: DeepRenderingModel,
    images: ArrayLike,
    semiring: Semiring = "max",
    temperature: float | None = None,
) -> DCNOutput:
    """DCN-form bottom-up + top-down inference on one image or a batch (jitted).

    Args:
        drm: The model.
        images: ``image_shape`` or ``(B, *image_shape)``.
        semiring: "max" (max-sum: max-pooling, ReLU) or "sum" (sum-product).
        temperature: Overrides ``semiring`` (``T * logsumexp(x / T)``).

    Returns:
        :class:`DCNOutput` (batched; a single image gets ``B = 1``).
    """
    t = resolve_temperature(semiring, temperature)
    x, _ = drm.check_images(images)
    return _dcn(drm, x, t)


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
