"""The DCN-form pass on convolutional rendering: conv -> ReLU -> gather -> max-pool.

For :class:`pgm_drm.models.ConvRenderingModel` the DCN computes, per unit, the
template match of its own ``t x t`` patch (a convolution with stride ``s``,
Eqs. 7-8), the switch reduction (the ReLU, Eq. 9), sums the units' messages at
the states the class template puts there (one-hot filter, Eq. 12-13) and pools
over the class translation ``g``. Each patch is scored as if its unit alone
rendered it. With ``stride == t`` that is exact max-sum / sum-product; with
overlap it is the DCN's approximation (pixels in an overlap are counted once per
covering unit, and overlapping templates' sum is never formed). The top-down
pass backtracks ``c, g`` and every switch (§2.4 stage ii). The bottom-up pass is
the one of :mod:`pgm_drm.models.maxsum` (the model's ``level_scores`` and
``level_switch``), jitted with the model traced.

:func:`naive_conv_dcn_pass` is the loop-by-loop twin.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array, ArrayLike, Semiring
from pgm_drm.models.conv_drm import ConvRenderingModel
from pgm_drm.models.maxsum import bottom_up
from pgm_drm.models.validation import check_finite_log_z
from pgm_drm.semiring import reduce_t, resolve_temperature
from pgm_drm.sharding import shard_batch, unpad

__all__ = ["ConvDCNOutput", "conv_dcn_infer", "naive_conv_dcn_pass"]


class ConvDCNOutput(NamedTuple):
    """Result of the DCN-form pass on a batch of ``B`` images.

    Attributes:
        class_log_posterior: ``(B, C)`` normalised class log-(max-)marginals.
        log_z: ``(B,)`` log partition at the temperature under the DCN's
            independent-patch view (exact when the patches do not overlap).
        unit_messages: ``(B, n, n, K + 1)`` unit messages after the switch
            (the DCN's first-layer activations; last state = OFF).
        map: Top-down MAP: ``c``, ``g`` ``(B,)``, switches ``a`` and unit states
            ``s`` ``(B, n, n)`` (``K`` = OFF).
    """

    class_log_posterior: Array
    log_z: Array
    unit_messages: Array
    map: dict[str, Array]


@partial(jax.jit, static_argnums=(2,))
def _conv_dcn(model: ConvRenderingModel, images: Array, t: float) -> ConvDCNOutput:
    """The pass of :mod:`pgm_drm.models.maxsum` and the top-down MAP, jitted with
    the model traced."""
    pooled, (msgs,), scores = bottom_up(model, images, t)
    class_scores = model.class_scores(pooled)
    log_z = reduce_t(class_scores, (1,), t)
    # top-down backtracking of the max-sum argmaxes
    if t == 0.0:
        max_top, max_pooled = scores[1], pooled
    else:
        max_pooled, _, (_, max_top) = bottom_up(model, images, 0.0)
    max_class = model.class_scores(max_pooled)
    max_top = max_top[:, 0, 0]  # (B, C, G)
    unit = scores[0][..., 0]  # (B, n, n, K + 1): each unit's patch score
    c = jnp.argmax(max_class, axis=1)
    b = images.shape[0]
    g = jnp.argmax(max_top[jnp.arange(b), c], axis=1)
    n, k = model.grid, model.n_states
    state = jnp.reshape(model.unit_table()[c, g], (b, n, n))
    on = (
        jnp.log(model.switch_prior)
        + jnp.take_along_axis(unit, state[..., None], axis=-1)[..., 0]
    )
    off = jnp.log1p(-model.switch_prior) + unit[..., -1]
    a = (on > off).astype(jnp.int32)  # a = 0 wins ties
    return ConvDCNOutput(
        class_log_posterior=class_scores - log_z[:, None],
        log_z=log_z,
        unit_messages=msgs,
        map={"c": c, "g": g, "a": a, "s": jnp.where(a == 1, state, k)},
    )


def conv_dcn_infer(
    model: ConvRenderingModel,
    images: ArrayLike,
    semiring: Semiring = "max",
    temperature: float | None = None,
) -> ConvDCNOutput:
    """DCN-form bottom-up + top-down pass on convolutional rendering (jitted).

    Exact when ``model.overlap == 0``; otherwise the DCN's approximation, whose
    error :func:`pgm_drm.experiments.dcn_exactness_study` measures.

    Args:
        model: The model.
        images: ``image_shape`` or ``(B, *image_shape)``.
        semiring: "max" (max-pooling, ReLU) or "sum".
        temperature: Overrides ``semiring`` (``T * logsumexp(x / T)``, §6.2.1).

    Returns:
        :class:`ConvDCNOutput` (a single image gets ``B = 1``).

    Example:
        >>> import jax
        >>> from pgm_drm.models import ConvRenderingModel
        >>> m = ConvRenderingModel.random(jax.random.PRNGKey(0), stride=2, sigma=0.3)
        >>> images, latents = m.sample(jax.random.PRNGKey(1), 4)
        >>> out = conv_dcn_infer(m, images)
        >>> out.class_log_posterior.shape, out.map["a"].shape
        ((4, 3), (4, 3, 3))
    """
    t = resolve_temperature(semiring, temperature)
    x, _ = model.check_images(images)
    # Several devices: the batch is sharded over all of them (identity on one).
    xs, n = shard_batch(x)
    out = _conv_dcn(model, xs, t)
    out = out if xs is x else unpad(out, n)
    check_finite_log_z(out.log_z, x)  # finite pixels, scores that overflowed
    return out


def naive_conv_dcn_pass(
    model: ConvRenderingModel, image: ArrayLike, temperature: float
) -> tuple[np.ndarray, float]:
    """Loop-by-loop twin of the bottom-up pass on one image (numpy).

    Returns:
        ``(class log-posterior (C,), log Z)``.
    """
    t = float(temperature)

    def red(values):
        v = np.asarray(values, dtype=float)
        m = np.max(v)
        if t == 0.0 or not np.isfinite(m):
            return float(m)
        return float(m + t * np.log(np.sum(np.exp((v - m) / t))))

    img = np.asarray(image, dtype=float)
    n, k, s, p = model.grid, model.n_states, model.stride, model.patch
    s2 = model.sigma**2
    pix = np.concatenate([np.asarray(model.pixel_templates), np.zeros((1, p, p))])
    table = np.asarray(model.unit_table())
    pon = model.switch_prior
    log_a = {0: np.log1p(-pon), 1: np.log(pon)}
    msg = np.zeros((n * n, k + 1))
    for u in range(n * n):
        i, j = divmod(u, n)
        patch = img[i * s : i * s + p, j * s : j * s + p]
        like = [
            float(
                np.sum(-((patch - pix[state]) ** 2) / (2 * s2))
                - 0.5 * p * p * np.log(2 * np.pi * s2)
            )
            for state in range(k + 1)
        ]
        for state in range(k + 1):
            msg[u, state] = red(
                [log_a[a] + like[state if a == 1 else k] for a in (0, 1)]
            )
    log_pg = np.log(np.asarray(model.nuisance_prior))
    log_pc = np.log(np.asarray(model.class_prior))
    scores = []
    for c in range(model.n_classes):
        per_g = []
        for g in range(model.n_nuisances):
            per_g.append(log_pg[g] + sum(msg[u, table[c, g, u]] for u in range(n * n)))
        scores.append(log_pc[c] + red(per_g))
    scores = np.asarray(scores)
    log_z = red(scores)
    return scores - log_z, log_z
