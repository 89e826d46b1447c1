"""The DCN-form max-sum pass: the model's own bottom-up computation (Eqs. 7-9, 12-13).

On a tree DRM the max-sum messages from the pixels up to the class are exactly
the layers of a DCN: at every level a unit reads its window of the level below,
matches it against every (state, translation) template (a convolution, Eqs. 7-8;
above the first level with *one-hot* child templates, i.e. a gather), pools over
the translations ``g`` (Eq. 12) and reduces over its ON/OFF switch (the ReLU,
Eq. 9). Any temperature ``T`` replaces max by ``T * logsumexp(. / T)`` (§6.2.1).

This module holds that pass once:

* :func:`windows`: the one window extractor (non-overlapping or strided), and
  :func:`placement_offsets`, where a template's cells land in a window;
* :func:`bottom_up`: the loop ``match -> pool over g -> switch`` over the levels
  of any *DCN-form model*, an object with ``levels``, ``level_scores(level,
  below)`` and ``level_switch(level, pooled, t)``. The tree DRM
  (:class:`pgm_drm.models.DeepRenderingModel`, tied weights: its templates and
  priors), the convolutional DRM and the discriminative relaxation
  (:class:`pgm_drm.learning.DCNNet`, free weights, Eq. 25) are such models;
* :func:`bottom_up_argmax` keeps the argmax of every pooling (one variadic
  reduction: :func:`max_and_argmax`), and :func:`top_down`, the tree DRM's
  coarse-to-fine MAP (§2.4 stage ii, §6.2.2), only follows them (gathers, the
  max-unpooling of deconvnets); :func:`naive_top_down` re-reduces the scores and
  is its twin. A class is clamped by giving the others ``-inf`` (hard EM with
  labels);
* :func:`dcn_pass`: both, jitted with the model as an ordinary (traced) argument,
  so a new parameter value of the same structure reuses the compiled program.

The inference API on top of it is :func:`pgm_drm.inference.dcn_infer` (and
:func:`pgm_drm.inference.conv_dcn_infer` for the convolutional DRM); hard EM
(:mod:`pgm_drm.learning.drm_em`) and the relaxation
(:mod:`pgm_drm.learning.discriminative`) run the same pass. The loop-by-loop twins
that test it stay independent of it, in :mod:`pgm_drm.inference.dcn` and
:mod:`pgm_drm.inference.conv_dcn`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array
from pgm_drm.semiring import reduce_t

__all__ = [
    "DCNOutput",
    "Latents",
    "MaxSumPass",
    "bottom_up",
    "bottom_up_argmax",
    "dcn_pass",
    "latents_to_map",
    "max_and_argmax",
    "naive_top_down",
    "placement_offsets",
    "top_down",
    "windows",
    "windows_to_grid",
]


def windows(x: Array, w: int, stride: int | None = None) -> Array:
    """``(B, H, W, ...)`` -> ``(B, n, n, w*w, ...)``: the ``w x w`` windows at
    ``stride`` (default ``w``: non-overlapping, a tree), ``n = (H - w) // s + 1``.

    Offset ``o = r * w + c`` inside a window (row-major), as in
    ``DeepRenderingModel.placement_table`` and :func:`windows_to_grid`. Windows
    are gathered, never convolved, so ``-inf`` messages pass through unchanged.
    numpy in, numpy out.

    Example:
        >>> x = np.arange(16).reshape(1, 4, 4)
        >>> windows(x, 2)[0, 0, 1].tolist(), windows(x, 2, 1).shape
        ([2, 3, 6, 7], (1, 3, 3, 4))
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    s = w if stride is None else int(stride)
    b, side = x.shape[0], x.shape[1]
    rest = x.shape[3:]
    n = (side - w) // s + 1
    if s == w and n * w == side:  # non-overlapping: a reshape
        x = xp.reshape(x, (b, n, w, n, w) + rest)
        x = xp.moveaxis(x, 2, 3)
        return xp.reshape(x, (b, n, n, w * w) + rest)
    idx = s * np.arange(n)[:, None] + np.arange(w)[None, :]  # (n, w)
    x = x[:, idx[:, None, :, None], idx[None, :, None, :]]  # (B, n, n, w, w, ...)
    return xp.reshape(x, (b, n, n, w * w) + rest)


def placement_offsets(window: int, size: int) -> np.ndarray:
    """``(G, t*t)`` window offsets ``o = r * w + c`` of a ``t x t`` template's cells
    at each of the ``G = (w - t + 1)**2`` translations inside a ``w x w`` window
    (translations row-major: ``dy``, then ``dx``; cells row-major).

    Example:
        >>> placement_offsets(3, 2).tolist()
        [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    """
    w, t = int(window), int(size)
    moves = [(dy, dx) for dy in range(w - t + 1) for dx in range(w - t + 1)]
    return np.array(
        [
            [(dy + i) * w + dx + j for i in range(t) for j in range(t)]
            for dy, dx in moves
        ]
    ).reshape(len(moves), t * t)


def windows_to_grid(x: Any, w: int) -> Array:
    """Per-unit window contents ``(..., h, h, w*w)`` -> the grid ``(..., h*w, h*w)``.

    Offset ``o = r * w + c`` of the unit at ``(y, x)`` lands at ``(y*w + r, x*w + c)``
    (the inverse of :func:`windows` at stride ``w``). numpy in, numpy out.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.asarray(x)
    h = x.shape[-2]
    x = xp.reshape(x, x.shape[:-1] + (w, w))
    x = xp.swapaxes(x, -3, -2)
    return xp.reshape(x, x.shape[:-4] + (h * w, h * w))


def bottom_up(
    model: Any, x: Array, t: float, upto: int | None = None
) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
    """The bottom-up pass ``match -> pool over g -> switch``, level by level.

    Args:
        model: A DCN-form model: ``levels``; ``level_scores(level, below)`` the
            pre-pooling scores ``(B, n, n, K, G)`` of level ``level`` (template
            match plus ``ln pi_g`` / bias) from the level below (the input ``x`` at
            level 1); ``level_switch(level, pooled, t)`` the unit messages
            (activations) from the scores pooled over ``g``.
        x: The input of level 1.
        t: Temperature of every reduction (0: max-sum, max-pooling and ReLU).
        upto: Stop after this level (default: the top).

    Returns:
        ``(pooled, messages, scores)``: the last level's pooled scores
        ``(B, n, n, K)`` (at the top ``n = 1``); the messages of the levels below
        it; the scores of every level run.
    """
    out = _levels(model, x, t, upto, lambda u: (reduce_t(u, (u.ndim - 1,), t), None))
    return out.pooled[-1], out.messages, out.scores


class MaxSumPass(NamedTuple):
    """Every level's max-sum quantities, with the argmax of each pooling kept.

    Attributes:
        pooled: Per level, the scores pooled over ``g`` ``(B, n, n, K+1)``.
        g_best: Per level, the argmax over ``g`` of the same reduction ``(B, n,
            n, K+1)`` (int32): the max-unpooling "switches" of a deconvnet.
        messages: Per level below the top, the unit messages (after the switch).
        scores: Per level, the pre-pooling scores ``(B, n, n, K+1, G)``.
    """

    pooled: tuple[Array, ...]
    g_best: tuple[Array, ...]
    messages: tuple[Array, ...]
    scores: tuple[Array, ...]


def _levels(model: Any, x: Array, t: float, upto: int | None, pool) -> MaxSumPass:
    """The one level loop ``match -> pool over g -> switch``; ``pool(u)`` returns
    the pooled scores and (or ``None``) the pooling's argmax."""
    top = model.levels if upto is None else int(upto)
    pooled, best, scores, messages = [], [], [], []
    below = x
    for level in range(1, top + 1):
        u = model.level_scores(level, below)
        scores.append(u)
        value, index = pool(u)  # pooling over translations g (Eq. 12)
        pooled.append(value)
        best.append(index)
        if level < top:
            below = model.level_switch(level, value, t)
            messages.append(below)
    return MaxSumPass(tuple(pooled), tuple(best), tuple(messages), tuple(scores))


def max_and_argmax(x: Array, axis: int = -1) -> tuple[Array, Array]:
    """``max`` and first ``argmax`` over ``axis`` in ONE reduction (a variadic
    ``lax.reduce`` over (value, index) pairs, as ``jnp.argmax`` itself lowers)."""
    axis = axis % x.ndim
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)

    def pick(a, b):
        (av, ai), (bv, bi) = a, b
        take_a = (av > bv) | ((av == bv) & (ai < bi))
        return jnp.where(take_a, av, bv), jnp.where(take_a, ai, bi)

    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(x.shape[axis], jnp.int32))
    value, arg = jax.lax.reduce((x, index), init, pick, (axis,))
    # A row of -inf keeps the init index: point it at 0, as jnp.argmax does.
    return value, jnp.where(arg == x.shape[axis], 0, arg)


def bottom_up_argmax(model: Any, x: Array, upto: int | None = None) -> MaxSumPass:
    """The max-sum (``T = 0``) bottom-up pass keeping the argmax of every pooling,
    so that the top-down MAP only follows them (:func:`top_down`)."""
    return _levels(model, x, 0.0, upto, lambda u: max_and_argmax(u, -1))


class Latents(NamedTuple):
    """MAP latents of a tree DRM per level ``l = 1..L`` (index ``l - 1``), grids
    ``(B, h_l, h_l)``; level ``L``: ``(B, 1, 1)`` with the class as its state.

    Attributes:
        states: Unit states after the switch (``K_l`` = OFF).
        g: Translations.
        a: Switches, levels ``1..L-1``.
    """

    states: tuple[Array, ...]
    g: tuple[Array, ...]
    a: tuple[Array, ...]


def top_down(drm: Any, up: MaxSumPass, class_scores: Array) -> Latents:
    """Coarse-to-fine MAP of a tree DRM following the bottom-up argmaxes (§2.4
    stage ii, §6.2.2): every pooling's argmax was kept by
    :func:`bottom_up_argmax`, so each level costs gathers only (no reduction over
    the translations is run twice). :func:`naive_top_down`, which re-reduces the
    scores, is its twin.

    Args:
        drm: A :class:`pgm_drm.models.DeepRenderingModel`.
        up: :func:`bottom_up_argmax` of the images.
        class_scores: ``(B, K_L)`` max-sum class scores; give the other classes
            ``-inf`` to clamp the class.
    """
    L = drm.levels
    c = jnp.argmax(class_scores, axis=-1)
    g = jnp.take_along_axis(up.g_best[L - 1][:, 0, 0], c[:, None], axis=-1)[:, 0]
    states, gs, as_ = [c[:, None, None]], [g[:, None, None]], []
    eff, g_grid = states[0], gs[0]
    for level in range(L, 1, -1):
        table = drm.placement_table(level)
        children = windows_to_grid(table[eff, g_grid], drm.windows[level - 1])
        best = up.pooled[level - 2]  # (B, H, W, K+1): max over g of the child
        p = drm.switch_priors[level - 2]
        s_best = jnp.take_along_axis(best, children[..., None], axis=-1)[..., 0]
        # Eq. 9's switch; a = 0 (OFF) wins ties, as in naive_top_down.
        a = (jnp.log(p) + s_best > jnp.log1p(-p) + best[..., -1]).astype(jnp.int32)
        eff = jnp.where(a == 1, children, drm.n_states[level - 2])
        g_grid = jnp.take_along_axis(up.g_best[level - 2], eff[..., None], axis=-1)[
            ..., 0
        ]
        states.insert(0, eff)
        gs.insert(0, g_grid)
        as_.insert(0, a)
    return Latents(tuple(states), tuple(gs), tuple(as_))


def naive_top_down(drm: Any, scores: tuple[Array, ...], class_scores: Array) -> Latents:
    """Coarse-to-fine backtracking of the max-sum argmaxes (§2.4 stage ii), the
    naive twin of :func:`top_down`: it reduces every level's scores over the
    translations again.

    Args:
        drm: A :class:`pgm_drm.models.DeepRenderingModel`.
        scores: The max-sum (``t = 0``) scores of every level from
            :func:`bottom_up`.
        class_scores: ``(B, K_L)`` max-sum class scores. To clamp the class, give
            the other classes ``-inf``: the bottom-up scores of class ``c`` are
            already ``max_{tau \\ c} log p(tau, I)``, so backtracking from the
            clamped class is the MAP with ``c`` fixed.
    """
    L = drm.levels
    c = jnp.argmax(class_scores, axis=-1)
    top = scores[L - 1][:, 0, 0]  # (B, K+1, G)
    g = jnp.argmax(jnp.take_along_axis(top, c[:, None, None], axis=1)[:, 0], axis=-1)
    states, gs, as_ = [c[:, None, None]], [g[:, None, None]], []
    eff, g_grid = states[0], gs[0]
    for level in range(L, 1, -1):
        table = drm.placement_table(level)
        children = windows_to_grid(table[eff, g_grid], drm.windows[level - 1])
        u = scores[level - 2]  # (B, H, W, K+1, G) of the child level
        best = jnp.max(u, axis=-1)  # (B, H, W, K+1)
        p = drm.switch_priors[level - 2]
        s_best = jnp.take_along_axis(best, children[..., None], axis=-1)[..., 0]
        # a = 0 wins ties, as the first index of an argmax over (OFF, ON) would.
        on_score = jnp.log(p) + s_best
        off_score = jnp.log1p(-p) + best[..., -1]
        a = (on_score > off_score).astype(jnp.int32)
        eff = jnp.where(a == 1, children, drm.n_states[level - 2])
        g_grid = jnp.argmax(
            jnp.take_along_axis(u, eff[..., None, None], axis=-2)[..., 0, :], axis=-1
        )
        states.insert(0, eff)
        gs.insert(0, g_grid)
        as_.insert(0, a)
    return Latents(tuple(states), tuple(gs), tuple(as_))


def latents_to_map(z: Latents) -> dict[str, Array]:
    """Per-level latents -> the ``sample`` layout: ``c``, ``g{L}`` ``(B,)``; ``g{l}``,
    ``a{l}``, ``s{l}`` ``(B, *grid_shape(l))`` for ``l < L``."""
    L = len(z.states)
    out = {"c": z.states[L - 1][:, 0, 0], f"g{L}": z.g[L - 1][:, 0, 0]}
    for l in range(L - 1, 0, -1):
        out[f"g{l}"] = z.g[l - 1]
        out[f"a{l}"] = z.a[l - 1]
        out[f"s{l}"] = z.states[l - 1]
    return out


class DCNOutput(NamedTuple):
    """Result of the DCN-form pass on a batch of ``B`` images.

    Attributes:
        class_log_posterior: ``(B, C)`` normalised log-(max-)marginal of the class.
        log_z: ``(B,)`` log partition at the temperature (max: max log joint).
        messages: Per level ``l = 1..L-1``, the bottom-up message maps
            ``(B, *grid_shape(l), K_l + 1)`` (last state = OFF): the DCN's
            activations.
        scores: Per level ``l = 1..L``, pre-pooling maps
            ``(B, *grid_shape(l), K_l + 1, G_l)``: template match + ``log pi_g``
            (``()`` unless asked for with ``scores=True``).
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


@partial(jax.jit, static_argnums=(2, 3))
def dcn_pass(drm: Any, images: Array, t: float, scores: bool = False) -> DCNOutput:
    """Bottom-up at temperature ``t`` and the top-down MAP of a tree DRM on a batch
    of checked images ``(B, *image_shape)`` (no input checks: see
    :func:`pgm_drm.inference.dcn_infer`). The model is traced: one compilation
    per structure, image batch shape, ``t`` and ``scores``.

    ``scores=False`` (the default) returns ``DCNOutput.scores = ()``: the
    pre-pooling maps are then never written out (about a fifth of the pass at
    32x32, batch 1000, on CPU); ``scores=True`` adds them, everything else the
    same.
    """
    up = bottom_up_argmax(drm, images)
    max_class = drm.class_scores(up.pooled[-1])
    if t == 0.0:
        class_scores, messages, level_scores = max_class, up.messages, up.scores
    else:
        pooled, messages, level_scores = bottom_up(drm, images, t)
        class_scores = drm.class_scores(pooled)
    log_z = reduce_t(class_scores, (1,), t)
    return DCNOutput(
        class_log_posterior=class_scores - log_z[:, None],
        log_z=log_z,
        messages=messages,
        scores=level_scores if scores else (),
        map=latents_to_map(top_down(drm, up, max_class)),
    )
