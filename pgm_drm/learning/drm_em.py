"""Hard EM for the tree Deep Rendering Model (paper §2.6, Eqs. 18-23; DESIGN §5).

One iteration, on ``N`` training images:

* **E-step** (Eq. 18): the joint MAP rendering tree ``tau*_n = argmax log p(tau, I_n)``
  of every image by bottom-up max-sum (conv -> ReLU -> max-pool) and top-down
  backtracking -- the same pass as :func:`pgm_drm.inference.dcn_infer` (``"max"``),
  re-written here on a parameter pytree so that it is traced once per model
  *structure* instead of once per model (``dcn_infer`` is jitted with the model as
  a static argument and would recompile every iteration). With labels the class
  is clamped by giving the other classes' scores ``-inf`` before the top-down
  argmax: the bottom-up scores of the class ``c`` are already
  ``max_{tau \\ c} log p(tau, I)``, so backtracking from the clamped class returns
  the MAP with ``c`` fixed (-1 = unlabelled: free, i.e. semi-supervised).
* **M-step** (Eqs. 21-23 with hard responsibilities), coordinate ascent on the
  complete-data log joint ``sum_n log p(tau*_n, I_n)``; every update is an exact
  maximiser given the others, so the hard-EM objective
  ``mean_n max_tau log p(tau, I_n)`` never decreases:

  1. priors ``pi_c``, ``pi_g`` (every level), switch priors: counts of the MAP
     latents (every unit samples its ``g`` and ``a``, OFF or not) plus a
     Dirichlet pseudo-count ``alpha`` per outcome (then the maximised quantity is
     the log joint plus the log Dirichlet(``alpha + 1``) prior; the history reports
     it, and with ``alpha = 0`` it is the plain objective);
  2. level-1 pixel templates: the mean of the patches each state renders at its
     MAP translation (exact least squares, Eq. 22 with one-hot ``mu``);
  3. ``sigma``: the RMS residual ``I - render(tau*)`` under the new templates
     (Eq. 23), floored at ``min_sigma``;
  4. child templates, level 2 .. L in turn: a template cell's child state ``v``
     enters the log joint only through the child's subtree, whose best value
     given ``v`` is the child's bottom-up max-sum message ``m(v)`` (computed
     with the already updated levels below). So, holding every parent's state
     and translation, ``T_k[i, j] = argmax_v sum_{units in state k} m_{cell}(v)``
     is the exact maximiser (a max over the lower latents), and OFF and the
     switch are inside ``m``. (The mode of the MAP child states would not
     learn: a child's MAP state is a function of the template -- it is
     ``T_k[i, j]`` or OFF -- so the mode returns the old template. A vote over
     each child's own best state, ``argmax_v m(v)``, is cheaper but not a
     maximiser, so it is not guaranteed to keep the objective rising.)

  A state that no unit uses (empty) is re-seeded from the worst-explained unit
  at its level (largest squared residual at level 1; at level ``l >= 2`` the
  largest gap between the best child arrangement and the one its template
  renders): its template becomes that unit's patch / best child arrangement.
  An unused template does not enter the log joint of the current latents, so
  re-seeding never lowers the objective.

:func:`drm_em_init` / :func:`drm_em_step` are the (init, step) pair;
:func:`fit_drm_em` loops the jitted step with a tqdm bar and resumable
checkpoints; :func:`fit_drm_classifier` fits one DRM per class (its "classes"
are mixture components) for generative classification.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._random import np_rng
from pgm_drm._typing import Array, ArrayLike, PRNGKey
from pgm_drm.learning.base import check_labels, kmeans, real_finite
from pgm_drm.learning.io import check_loop_args, fingerprint, run_em_loop
from pgm_drm.models.drm import DeepRenderingModel, windows_to_grid

__all__ = [
    "DRMEMInfo",
    "DRMEMState",
    "DRMFitResult",
    "DRMParams",
    "DRMStructure",
    "PerClassDRM",
    "drm_em_init",
    "drm_em_step",
    "drm_log_joint",
    "drm_map",
    "fit_drm_classifier",
    "fit_drm_em",
    "params_from_drm",
    "params_to_drm",
]

#: Default floor on ``sigma``: a template that fits its patches exactly would
#: otherwise drive ``sigma -> 0`` and the log joint to ``+inf``.
DEFAULT_MIN_SIGMA = 1e-3


class DRMStructure(NamedTuple):
    """The static shape of a tree DRM (hashable: a jit static argument).

    Attributes:
        windows: ``(w_1, ..., w_L)``.
        template_sizes: ``(t_1, ..., t_L)``.
        n_states: ``(K_1, ..., K_L)``; ``K_L`` classes.
    """

    windows: tuple[int, ...]
    template_sizes: tuple[int, ...]
    n_states: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.windows)

    def n_nuisances(self, level: int) -> int:
        return (self.windows[level - 1] - self.template_sizes[level - 1] + 1) ** 2

    @property
    def image_shape(self) -> tuple[int, int]:
        side = int(np.prod(self.windows))
        return (side, side)


class DRMParams(NamedTuple):
    """The DRM's parameters as a pytree (see :class:`DeepRenderingModel`).

    Attributes:
        pixel_templates: ``(K_1, t_1, t_1)``.
        child_templates: for ``l = 2..L`` int ``(K_l, t_l, t_l)`` (``K_{l-1}`` OFF).
        class_prior: ``(K_L,)``.
        nuisance_priors: for ``l = 1..L`` ``(G_l,)``.
        switch_priors: ``(L - 1,)`` probability a level-``l`` unit is ON.
        sigma: ``()`` pixel noise.
    """

    pixel_templates: Array
    child_templates: tuple[Array, ...]
    class_prior: Array
    nuisance_priors: tuple[Array, ...]
    switch_priors: Array
    sigma: Array


class DRMEMState(NamedTuple):
    """State of hard EM: the parameters and the number of iterations done."""

    params: DRMParams
    iteration: Array


class DRMEMInfo(NamedTuple):
    """Diagnostics of one step, at the parameters *before* the step.

    Attributes:
        objective: ``mean_n max_tau log p(tau, I_n)`` plus ``1/N`` times the log
            Dirichlet(``alpha + 1``) prior of the priors (never decreases).
        max_log_joint: ``mean_n max_tau log p(tau, I_n)`` (labels clamp ``c``).
    """

    objective: Array
    max_log_joint: Array


class DRMFitResult(NamedTuple):
    """What :func:`fit_drm_em` returns.

    Attributes:
        model: The fitted :class:`DeepRenderingModel`.
        objective: ``(n_iter + 1,)`` :attr:`DRMEMInfo.objective` after
            ``0, 1, ..., n_iter`` iterations.
        max_log_joint: ``(n_iter + 1,)`` the same without the prior term.
        n_iter: Iterations run in total.
        converged: The objective changed by less than ``tol``.
    """

    model: DeepRenderingModel
    objective: np.ndarray
    max_log_joint: np.ndarray
    n_iter: int
    converged: bool


# ---- conversions -------------------------------------------------------------------
def params_from_drm(drm: DeepRenderingModel) -> tuple[DRMStructure, DRMParams]:
    """Split a model into its static structure and its parameter pytree."""
    struct = DRMStructure(
        tuple(int(w) for w in drm.windows),
        tuple(int(t) for t in drm.template_sizes),
        tuple(int(k) for k in drm.n_states),
    )
    params = DRMParams(
        pixel_templates=jnp.asarray(drm.pixel_templates, dtype=float),
        child_templates=tuple(
            jnp.asarray(t, dtype=jnp.int32) for t in drm.child_templates
        ),
        class_prior=jnp.asarray(drm.class_prior, dtype=float),
        nuisance_priors=tuple(jnp.asarray(p, dtype=float) for p in drm.nuisance_priors),
        switch_priors=jnp.asarray(drm.switch_priors, dtype=float).reshape(
            drm.levels - 1
        ),
        sigma=jnp.asarray(drm.sigma, dtype=float),
    )
    return struct, params


def params_to_drm(struct: DRMStructure, params: DRMParams) -> DeepRenderingModel:
    """A validated :class:`DeepRenderingModel`; priors renormalised (float rounding)."""

    def norm(p):
        p = np.asarray(p, dtype=float)
        return p / p.sum()

    return DeepRenderingModel(
        windows=struct.windows,
        pixel_templates=np.asarray(params.pixel_templates),
        child_templates=tuple(np.asarray(t) for t in params.child_templates),
        class_prior=norm(params.class_prior),
        nuisance_priors=tuple(norm(p) for p in params.nuisance_priors),
        switch_priors=tuple(
            float(np.clip(p, 0.0, 1.0)) for p in np.asarray(params.switch_priors)
        ),
        sigma=float(params.sigma),
    )


# ---- the pass on the pytree ----------------------------------------------------------
def _offsets(w: int, t: int) -> np.ndarray:
    """``(G, t*t)`` window offsets ``o = r*w + c`` of the template cells, per g.

    Translations in :meth:`DeepRenderingModel.placement_table` order (dy, then dx).
    """
    moves = [(dy, dx) for dy in range(w - t + 1) for dx in range(w - t + 1)]
    return np.array(
        [
            [(dy + i) * w + dx + j for i in range(t) for j in range(t)]
            for dy, dx in moves
        ]
    )


def _table(struct: DRMStructure, params: DRMParams, level: int) -> Array:
    """Traced ``placement_table(level)``: ``(K_l + 1, G_l, w_l**2)``, OFF row last."""
    w, t = struct.windows[level - 1], struct.template_sizes[level - 1]
    k = struct.n_states[level - 1]
    offs = _offsets(w, t)
    g = np.arange(offs.shape[0])[:, None]
    if level == 1:
        src = jnp.reshape(params.pixel_templates, (k, t * t))
        out = jnp.zeros((k + 1, offs.shape[0], w * w), src.dtype)
    else:
        src = jnp.reshape(params.child_templates[level - 2], (k, t * t))
        off = struct.n_states[level - 2]
        out = jnp.full((k + 1, offs.shape[0], w * w), off, src.dtype)
    return out.at[:k, g, offs].set(src[:, None, :])


def _windows(x: Array, w: int) -> Array:
    """``(B, H, W, ...)`` -> ``(B, H/w, W/w, w*w, ...)`` non-overlapping windows."""
    xp = np if isinstance(x, np.ndarray) else jnp
    b, h, wd = x.shape[:3]
    rest = x.shape[3:]
    x = xp.reshape(x, (b, h // w, w, wd // w, w) + rest)
    x = xp.moveaxis(x, 2, 3)
    return xp.reshape(x, (b, h // w, wd // w, w * w) + rest)


def _log(p: Array) -> Array:
    return jnp.log(jnp.asarray(p))


def _level_scores(
    struct: DRMStructure, params: DRMParams, level: int, below: Array
) -> Array:
    """Pre-pooling scores ``(B, h, h, K_l + 1, G_l)`` (Eqs. 7-8, 12): template match
    (pixels at level 1, children's messages at ``l >= 2``) plus ``log pi_g``.

    ``below``: images ``(B, H, W)`` at level 1, else the child messages
    ``(B, h', h', K_{l-1} + 1)``.
    """
    table = _table(struct, params, level)
    w = struct.windows[level - 1]
    if level == 1:
        s2 = params.sigma**2
        patches = _windows(below[..., None], w)[..., 0]  # (B,h,h,w*w)
        match = jnp.einsum("bxyp,kgp->bxykg", patches, table) / s2
        bias = -jnp.sum(table**2, axis=-1) / (2 * s2)
        const = -jnp.sum(patches**2, axis=-1) / (2 * s2) - 0.5 * w * w * jnp.log(
            2 * jnp.pi * s2
        )
        raw = match + bias + const[..., None, None]
    else:
        win = _windows(below, w)  # (B,h,h,O,K'+1)
        o = jnp.arange(table.shape[-1])
        raw = jnp.sum(win[:, :, :, o, table], axis=-1)
    return raw + _log(params.nuisance_priors[level - 1])


def _switch(params: DRMParams, level: int, pooled: Array) -> Array:
    """Eq. 9 (max-sum): ``max(log p + x_s, log(1-p) + x_OFF)``; OFF stays OFF."""
    p = params.switch_priors[level - 1]
    log_on, log_off = _log(p), jnp.log1p(-p)
    off = pooled[..., -1:]
    on = jnp.maximum(log_on + pooled[..., :-1], log_off + off)
    both = off + jnp.maximum(log_on, log_off)
    return jnp.concatenate([on, both], axis=-1)


def _bottom_up(struct: DRMStructure, params: DRMParams, images: Array):
    """Scores per level and the class scores ``(B, K_L)`` (max-sum)."""
    scores = []
    below = images
    for level in range(1, struct.levels + 1):
        u = _level_scores(struct, params, level, below)
        scores.append(u)
        pooled = jnp.max(u, axis=-1)
        if level < struct.levels:
            below = _switch(params, level, pooled)
    class_scores = pooled[:, 0, 0, :-1] + _log(params.class_prior)
    return tuple(scores), class_scores


class _Latents(NamedTuple):
    """MAP latents per level ``l = 1..L`` (index ``l - 1``), grids ``(B, h_l, h_l)``;
    level ``L``: ``(B, 1, 1)`` with the class as its state. ``a`` for ``l < L``."""

    states: tuple[Array, ...]
    g: tuple[Array, ...]
    a: tuple[Array, ...]


def _top_down(
    struct: DRMStructure,
    params: DRMParams,
    scores: tuple[Array, ...],
    class_scores: Array,
    labels: Array,
) -> tuple[_Latents, Array]:
    """Backtrack the argmaxes from the (clamped) class; returns latents and the max."""
    L = struct.levels
    k = class_scores.shape[-1]
    keep = (labels[:, None] < 0) | (labels[:, None] == jnp.arange(k))
    cs = jnp.where(keep, class_scores, -jnp.inf)
    c = jnp.argmax(cs, axis=-1)
    value = jnp.max(cs, axis=-1)
    top = scores[L - 1][:, 0, 0]  # (B, K+1, G)
    g = jnp.argmax(jnp.take_along_axis(top, c[:, None, None], axis=1)[:, 0], axis=-1)
    states, gs, as_ = [c[:, None, None]], [g[:, None, None]], []
    eff, g_grid = states[0], gs[0]
    for level in range(L, 1, -1):
        table = _table(struct, params, level)
        children = windows_to_grid(table[eff, g_grid], struct.windows[level - 1])
        u = scores[level - 2]
        best = jnp.max(u, axis=-1)
        p = params.switch_priors[level - 2]
        s_best = jnp.take_along_axis(best, children[..., None], axis=-1)[..., 0]
        # a = 0 wins ties, as in pgm_drm.inference.dcn.
        a = (_log(p) + s_best > jnp.log1p(-p) + best[..., -1]).astype(jnp.int32)
        eff = jnp.where(a == 1, children, struct.n_states[level - 2])
        g_grid = jnp.argmax(
            jnp.take_along_axis(u, eff[..., None, None], axis=-2)[..., 0, :], axis=-1
        )
        states.insert(0, eff)
        gs.insert(0, g_grid)
        as_.insert(0, a)
    return _Latents(tuple(states), tuple(gs), tuple(as_)), value


@partial(jax.jit, static_argnums=(0, 3))
def _messages(struct, params, images, level: int) -> Array:
    """Bottom-up max-sum messages of the level-``level`` units ``(B, h, h, K+1)``."""
    below = images
    for lv in range(1, level + 1):
        pooled = jnp.max(_level_scores(struct, params, lv, below), axis=-1)
        below = _switch(params, lv, pooled)
    return below


def _e_step(struct, params, images, labels):
    scores, class_scores = _bottom_up(struct, params, images)
    return _top_down(struct, params, scores, class_scores, labels)


def _to_grids(struct: DRMStructure, z: _Latents) -> dict[str, Array]:
    """Internal latents -> the ``dcn_infer(...).map`` / ``sample`` layout."""
    L = struct.levels
    out = {"c": z.states[L - 1][:, 0, 0], f"g{L}": z.g[L - 1][:, 0, 0]}
    for l in range(L - 1, 0, -1):
        out[f"g{l}"] = z.g[l - 1]
        out[f"a{l}"] = z.a[l - 1]
        out[f"s{l}"] = z.states[l - 1]
    return out


@partial(jax.jit, static_argnums=(0,))
def _map_jit(struct, params, images, labels):
    z, value = _e_step(struct, params, images, labels)
    return _to_grids(struct, z), value


def _check_images(struct: DRMStructure, images: ArrayLike) -> Array:
    x = jnp.asarray(images)
    if x.ndim != 3 or x.shape[1:] != struct.image_shape or x.shape[0] < 1:
        raise ValueError(
            f"images must have shape (N, *{struct.image_shape}) with N >= 1 "
            f"(the model's image_shape), got {x.shape}"
        )
    return real_finite(x)


def drm_map(
    drm: DeepRenderingModel, images: ArrayLike, labels: ArrayLike | None = None
) -> tuple[dict[str, Array], Array]:
    """The E-step (Eq. 18): joint MAP latents, with the class clamped where labelled.

    Args:
        drm: The model.
        images: ``(N, H, W)``.
        labels: ``(N,)`` class in ``0..K_L-1`` or -1 (free); ``None``: all free.

    Returns:
        The MAP latents in the layout of ``dcn_infer(drm, images).map`` and
        ``(N,)`` ``max log p(latents, I_n)`` (with ``c`` fixed where labelled).
        Without labels both equal ``dcn_infer``'s ``map`` and ``log_z``.

    Example:
        >>> import jax
        >>> drm = DeepRenderingModel.random(
        ...     jax.random.PRNGKey(1), image_shape=(4, 4), levels=2, sigma=0.1)
        >>> images = jax.numpy.zeros((3, 4, 4))
        >>> z, best = drm_map(drm, images, labels=[2, -1, 2])
        >>> z["c"][0].item(), z["s1"].shape, best.shape
        (2, (3, 2, 2), (3,))
    """
    struct, params = params_from_drm(drm)
    x = _check_images(struct, images)
    y = check_labels(labels, x.shape[0], struct.n_states[-1])
    return _map_jit(struct, params, x, y)


def drm_log_joint(
    drm: DeepRenderingModel, images: ArrayLike, latents: dict[str, ArrayLike]
) -> Array:
    """``log p(c, g, a, I)`` of Eq. 10 for latents on grids (``sample`` layout).

    A direct sum of every site's log-probability (no message passing): the
    reference the E-step's max value is tested against.

    Returns:
        ``(N,)``.
    """
    x = jnp.asarray(images)
    L = drm.levels
    c = jnp.asarray(latents["c"])
    out = jnp.log(drm.class_prior)[c]
    out = out + jnp.log(drm.nuisance_priors[L - 1])[jnp.asarray(latents[f"g{L}"])]
    for l in range(1, L):
        g = jnp.asarray(latents[f"g{l}"])
        a = jnp.asarray(latents[f"a{l}"])
        p = drm.switch_priors[l - 1]
        lp = jnp.log(drm.nuisance_priors[l - 1])[g] + jnp.where(
            a == 1, jnp.log(p), jnp.log1p(-p)
        )
        out = out + jnp.sum(lp, axis=(-2, -1))
    mean = drm.render(latents)
    s2 = drm.sigma**2
    ll = -((x - mean) ** 2) / (2 * s2) - 0.5 * jnp.log(2 * jnp.pi * s2)
    return out + jnp.sum(ll, axis=(-2, -1))


# ---- the M-step --------------------------------------------------------------------
def _prior(counts: Array, alpha: Array) -> Array:
    return (counts + alpha) / (jnp.sum(counts) + alpha * counts.shape[0])


def _onehot_counts(x: Array, k: int) -> Array:
    return jnp.sum(jax.nn.one_hot(jnp.ravel(x), k, dtype=float), axis=0)


def _seed_index(empty: Array, gain: Array) -> Array:
    """For each state, the flat unit index it is re-seeded from if empty: the
    ``r``-th empty state takes the unit with the ``r``-th largest ``gain``."""
    order = jnp.argsort(-jnp.ravel(gain))
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, order.shape[0] - 1)
    return order[rank]


def _pixel_update(struct, params, images, z: _Latents, sigma_floor):
    """Steps 2-3: level-1 templates (patch means) and sigma (RMS residual)."""
    w, t = struct.windows[0], struct.template_sizes[0]
    k = struct.n_states[0]
    offs = _offsets(w, t)
    patches = _windows(images[..., None], w)[..., 0]  # (B,h,h,w*w)
    subs = patches[..., offs]  # (B,h,h,G,t*t)
    s1, g1 = z.states[0], z.g[0]
    mine = jnp.take_along_axis(subs, g1[..., None, None], axis=-2)[..., 0, :]
    onehot = jax.nn.one_hot(s1, k, dtype=float)  # OFF (= k) -> all zeros
    sums = jnp.einsum("bxyk,bxyp->kp", onehot, mine)
    counts = jnp.sum(onehot, axis=(0, 1, 2))
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    # Residual of each level-1 unit under the new templates: picks the re-seeds.
    new = params._replace(pixel_templates=mean.reshape(k, t, t))
    rendered = _table(struct, new, 1)[s1, g1]  # (B,h,h,w*w)
    resid = jnp.sum((patches - rendered) ** 2, axis=-1)
    empty = counts == 0
    unit = _seed_index(empty, resid)
    flat = jnp.reshape(subs, (-1,) + subs.shape[-2:])[unit]  # (K, G, t*t)
    best_g = jnp.argmax(jnp.sum(flat**2, axis=-1), axis=-1)
    seeded = jnp.take_along_axis(flat, best_g[:, None, None], axis=1)[:, 0]
    mean = jnp.where(empty[:, None], seeded, mean)
    sigma = jnp.maximum(jnp.sqrt(jnp.mean(resid) / (w * w)), sigma_floor)
    return params._replace(pixel_templates=mean.reshape(k, t, t), sigma=sigma)


def _child_update(struct, params, level: int, msgs: Array, z: _Latents) -> Array:
    """Step 4 at ``level``: ``argmax_v`` of the summed child messages per cell."""
    w, t = struct.windows[level - 1], struct.template_sizes[level - 1]
    k = struct.n_states[level - 1]
    offs = _offsets(w, t)
    win = _windows(msgs, w)[..., offs, :]  # (B,h,h,G,t*t,V)
    s, g = z.states[level - 1], z.g[level - 1]
    sel = jnp.take_along_axis(win, g[..., None, None, None], axis=3)[..., 0, :, :]
    onehot = jax.nn.one_hot(s, k, dtype=sel.dtype)
    # OFF-state units (s = k) have no template; a unit in state k' contributes
    # its child messages to every cell of T_k'.
    total = jnp.einsum("bxyk,bxycv->kcv", onehot, sel)
    counts = jnp.sum(onehot, axis=(0, 1, 2))
    updated = jnp.argmax(total, axis=-1).astype(jnp.int32)  # (K, t*t)
    # Re-seed: the gap between a unit's best child arrangement and what it renders.
    old = jnp.reshape(params.child_templates[level - 2], (k, t * t))
    n_child = msgs.shape[-1]
    cur = jnp.concatenate([old, jnp.full((1, t * t), n_child - 1, old.dtype)])[s]
    rendered = jnp.take_along_axis(sel, cur[..., None], axis=-1)[..., 0]
    gap = jnp.sum(jnp.max(sel, axis=-1) - rendered, axis=-1)
    empty = counts == 0
    unit = _seed_index(empty, gap)
    flat = jnp.reshape(win, (-1,) + win.shape[-3:])[unit]  # (K, G, t*t, V)
    best_g = jnp.argmax(jnp.sum(jnp.max(flat, axis=-1), axis=-1), axis=-1)
    seeded = jnp.argmax(
        jnp.take_along_axis(flat, best_g[:, None, None, None], axis=1)[:, 0], axis=-1
    ).astype(jnp.int32)
    return jnp.where(empty[:, None], seeded, updated).reshape(k, t, t)


def _m_step(struct, params, images, z: _Latents, labels, alpha, sigma_floor):
    L = struct.levels
    # 1. priors from counts (+ alpha per outcome).
    class_prior = _prior(_onehot_counts(z.states[L - 1], struct.n_states[-1]), alpha)
    nuis = tuple(
        _prior(_onehot_counts(z.g[l - 1], struct.n_nuisances(l)), alpha)
        for l in range(1, L + 1)
    )
    switch = jnp.asarray(
        [(jnp.sum(a) + alpha) / (a.size + 2 * alpha) for a in z.a],  # 1..L-1
        dtype=params.switch_priors.dtype,
    ).reshape(L - 1)
    params = params._replace(
        class_prior=class_prior, nuisance_priors=nuis, switch_priors=switch
    )
    # 2-3. pixel templates and sigma.
    params = _pixel_update(struct, params, images, z, sigma_floor)
    # 4. child templates, bottom-up, each with messages of the updated levels below.
    below = images
    for level in range(1, L):
        pooled = jnp.max(_level_scores(struct, params, level, below), axis=-1)
        below = _switch(params, level, pooled)
        kids = list(params.child_templates)
        kids[level - 1] = _child_update(struct, params, level + 1, below, z)
        params = params._replace(child_templates=tuple(kids))
    return params


def _log_dirichlet(params: DRMParams, alpha: Array) -> Array:
    """``alpha * sum log pi`` over every prior: the log Dirichlet(``alpha + 1``)
    density up to a constant (``0 * log 0`` read as 0)."""

    def s(p):
        return jnp.sum(jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf))

    total = s(params.class_prior) + sum(s(p) for p in params.nuisance_priors)
    sw = params.switch_priors
    total = total + s(sw) + s(1.0 - sw)
    return jnp.where(alpha > 0, alpha * total, 0.0)


@partial(jax.jit, static_argnums=(0,))
def _step(struct, params, images, labels, alpha, sigma_floor):
    z, value = _e_step(struct, params, images, labels)
    mlj = jnp.mean(value)
    obj = mlj + _log_dirichlet(params, alpha) / images.shape[0]
    new = _m_step(struct, params, images, z, labels, alpha, sigma_floor)
    return new, obj, mlj


def drm_em_step(
    struct: DRMStructure,
    state: DRMEMState,
    images: Array,
    labels: Array,
    pseudo_count: float = 1.0,
    min_sigma: float = DEFAULT_MIN_SIGMA,
) -> tuple[DRMEMState, DRMEMInfo]:
    """One hard-EM iteration (E-step Eq. 18, M-step Eqs. 21-23; module docstring).

    Args:
        struct: The static structure.
        state: Current parameters.
        images: ``(N, H, W)`` float.
        labels: ``(N,)`` int, -1 for unlabelled.
        pseudo_count: Dirichlet pseudo-count ``alpha >= 0`` added to every count.
        min_sigma: Floor on ``sigma``.

    Returns:
        The new state and the objective at the *old* parameters.
    """
    new, obj, mlj = _step(
        struct,
        state.params,
        images,
        labels,
        jnp.asarray(pseudo_count, dtype=float),
        jnp.asarray(min_sigma, dtype=float),
    )
    return DRMEMState(new, state.iteration + 1), DRMEMInfo(obj, mlj)


# ---- initialisation ------------------------------------------------------------------
def drm_em_init(
    images: ArrayLike,
    key: PRNGKey,
    *,
    windows: tuple[int, ...],
    n_states: tuple[int, ...],
    template_sizes: tuple[int, ...] | None = None,
    labels: ArrayLike | None = None,
    switch_prior: float = 0.9,
    max_patches: int = 20000,
) -> tuple[DRMStructure, DRMEMState]:
    """A data-driven starting point (every template seeded from the data).

    * level-1 templates: k-means (scikit-learn, greedy k-means++, <= 20 steps) of the
      ``t_1 x t_1`` sub-patches at every translation of every level-1 window,
      excluding near-blank ones (below a tenth of the mean energy: OFF renders
      those), at most ``max_patches`` of them;
    * level ``l >= 2``: with the levels below in place, the child messages of
      units drawn with probability proportional to how much better their best
      child arrangement explains them than all-OFF; a template is the argmax
      child arrangement of one such unit at the central translation. With
      labels, class ``c``'s template is the M-step rule on the images labelled
      ``c`` (summed messages) -- a class with no images is seeded like the rest;
    * priors uniform, switch priors ``switch_prior``, ``sigma`` the RMS of the
      images around their nearest level-1 template (data std as fallback).

    Returns:
        The structure and the initial :class:`DRMEMState`.
    """
    windows = tuple(int(w) for w in windows)
    n_states = tuple(int(k) for k in n_states)
    L = len(windows)
    if template_sizes is None:
        template_sizes = tuple(max(1, w - 1) for w in windows)
    template_sizes = tuple(int(t) for t in template_sizes)
    if len(n_states) != L or len(template_sizes) != L:
        raise ValueError(
            f"windows, n_states and template_sizes need one entry per level; got "
            f"{windows}, {n_states}, {template_sizes}"
        )
    if any(k < 1 for k in n_states) or any(
        not 1 <= t <= w for t, w in zip(template_sizes, windows, strict=True)
    ):
        raise ValueError(
            f"need n_states >= 1 and 1 <= template size <= window; got {n_states}, "
            f"{template_sizes}, {windows}"
        )
    struct = DRMStructure(windows, template_sizes, n_states)
    x = _check_images(struct, images)
    y = np.asarray(check_labels(labels, x.shape[0], n_states[-1]))
    rng = np_rng(key)
    # level 1: k-means on sub-patches.
    w, t = windows[0], template_sizes[0]
    offs = _offsets(w, t)
    patches = _windows(np.asarray(x)[..., None], w)[..., 0]
    subs = patches[..., offs].reshape(-1, t * t)
    energy = np.sum(subs**2, axis=1)
    subs = subs[energy > 0.1 * energy.mean()] if energy.mean() > 0 else subs
    if subs.shape[0] > max_patches:
        subs = subs[rng.choice(subs.shape[0], max_patches, replace=False)]
    if subs.shape[0] >= n_states[0]:
        # <= 20 Lloyd steps; repeated centres are re-seeded by EM
        pix = kmeans(subs, n_states[0], rng, max_iter=20).cluster_centers_
    else:
        pix = rng.normal(size=(n_states[0], t * t))
    d2 = np.min(np.sum((subs[:, None, :] - pix[None]) ** 2, axis=-1), axis=1).mean() / (
        t * t
    )
    sigma = float(np.sqrt(d2)) if d2 > 0 else float(np.std(np.asarray(x)) or 1.0)
    params = DRMParams(
        pixel_templates=jnp.asarray(pix.reshape(n_states[0], t, t)),
        child_templates=tuple(  # placeholders, seeded level by level below
            jnp.zeros((n_states[l - 1],) + (template_sizes[l - 1],) * 2, jnp.int32)
            for l in range(2, L + 1)
        ),
        class_prior=jnp.full(n_states[-1], 1.0 / n_states[-1]),
        nuisance_priors=tuple(
            jnp.full(struct.n_nuisances(l), 1.0 / struct.n_nuisances(l))
            for l in range(1, L + 1)
        ),
        switch_priors=jnp.full(L - 1, float(switch_prior)),
        sigma=jnp.asarray(sigma),
    )
    for level in range(1, L):
        msgs = _messages(struct, params, x, level)
        params = _seed_children(struct, params, level + 1, msgs, y, rng)
    return struct, DRMEMState(params, jnp.asarray(0))


def _seed_children(struct, params, level, msgs, y, rng) -> DRMParams:
    w, t = struct.windows[level - 1], struct.template_sizes[level - 1]
    k = struct.n_states[level - 1]
    offs = _offsets(w, t)
    g0 = offs.shape[0] // 2
    win = _windows(np.asarray(msgs), w)[..., offs[g0], :]  # (B,h,h,t*t,V)
    flat = win.reshape(-1, t * t, win.shape[-1])
    gain = np.sum(flat.max(-1) - flat[..., -1], axis=-1)
    p = gain / gain.sum() if gain.sum() > 0 else None
    picks = rng.choice(flat.shape[0], size=k, replace=flat.shape[0] < k, p=p)
    tmpl = np.argmax(flat[picks], axis=-1)
    if level == struct.levels and np.any(y >= 0):
        for c in range(k):
            if np.any(y == c):
                tmpl[c] = np.argmax(flat[y == c].sum(0), axis=-1)
    kids = list(params.child_templates)
    kids[level - 2] = jnp.asarray(tmpl.reshape(k, t, t), dtype=jnp.int32)
    return params._replace(child_templates=tuple(kids))


# ---- the loop ------------------------------------------------------------------------
def _params_arrays(params: DRMParams) -> dict[str, np.ndarray]:
    out = {
        "pixel_templates": np.asarray(params.pixel_templates),
        "class_prior": np.asarray(params.class_prior),
        "switch_priors": np.asarray(params.switch_priors),
        "sigma": np.asarray(params.sigma),
    }
    for i, t in enumerate(params.child_templates):
        out[f"child_templates_{i}"] = np.asarray(t)
    for i, p in enumerate(params.nuisance_priors):
        out[f"nuisance_priors_{i}"] = np.asarray(p)
    return out


def _params_from_arrays(arrays, levels: int) -> DRMParams:
    return DRMParams(
        pixel_templates=jnp.asarray(arrays["pixel_templates"]),
        child_templates=tuple(
            jnp.asarray(arrays[f"child_templates_{i}"]) for i in range(levels - 1)
        ),
        class_prior=jnp.asarray(arrays["class_prior"]),
        nuisance_priors=tuple(
            jnp.asarray(arrays[f"nuisance_priors_{i}"]) for i in range(levels)
        ),
        switch_priors=jnp.asarray(arrays["switch_priors"]),
        sigma=jnp.asarray(arrays["sigma"]),
    )


def fit_drm_em(
    images: ArrayLike,
    init: DeepRenderingModel | None = None,
    *,
    windows: tuple[int, ...] | None = None,
    n_states: tuple[int, ...] | None = None,
    template_sizes: tuple[int, ...] | None = None,
    labels: ArrayLike | None = None,
    n_iter: int = 20,
    tol: float | None = 1e-9,
    key: PRNGKey | None = None,
    pseudo_count: float = 1.0,
    min_sigma: float = DEFAULT_MIN_SIGMA,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 5,
) -> DRMFitResult:
    """Fit a tree DRM by hard EM (paper §2.6, Eqs. 18-23; module docstring).

    Args:
        images: ``(N, H, W)`` training images, ``H = W = prod(windows)``.
        init: Start from this model; otherwise :func:`drm_em_init` with
            ``windows``, ``n_states`` (``(K_1, .., K_L)``) and ``template_sizes``.
        labels: ``(N,)`` class per image (clamps ``c``), -1 for unlabelled.
        n_iter: Maximum number of iterations.
        tol: Stop when the objective changes by less than ``tol`` (nats per
            image); ``None`` runs all ``n_iter``. Hard EM reaches a fixed point
            (the MAP latents stop changing) after finitely many steps.
        key: PRNG key of the initialisation (default ``PRNGKey(0)``).
        pseudo_count: Dirichlet pseudo-count ``alpha`` added to each prior count
            (keeps every prior > 0, so no translation/class/switch value becomes
            impossible after one iteration without it).
        min_sigma: Floor on ``sigma``.
        progress: tqdm bar with the objective in its postfix.
        checkpoint: ``.npz`` written atomically (temp file + ``os.replace``) every
            ``checkpoint_every`` iterations and at the end.
        resume: Continue from ``checkpoint`` if it exists (same data and settings,
            else ValueError); the result equals an uninterrupted fit.

    Returns:
        :class:`DRMFitResult`; ``objective`` never decreases.

    Raises:
        ValueError: Bad images (shape, NaN/inf), labels, sizes or settings, or a
            checkpoint written by a different fit.

    Example:
        >>> import jax
        >>> truth = DeepRenderingModel.random(
        ...     jax.random.PRNGKey(1), image_shape=(4, 4), levels=2, sigma=0.1)
        >>> images, _ = truth.sample(jax.random.PRNGKey(2), 60)
        >>> fit = fit_drm_em(images, windows=(2, 2), n_states=(4, 3),
        ...                  n_iter=5, progress=False)
        >>> bool(np.all(np.diff(fit.objective) >= -1e-9)), fit.model.n_states
        (True, (4, 3))
    """
    check_loop_args(n_iter, tol, min_sigma, checkpoint_every)
    if not (np.isfinite(pseudo_count) and pseudo_count >= 0):
        raise ValueError(
            f"pseudo_count must be a finite number >= 0, got {pseudo_count}"
        )
    key = jax.random.PRNGKey(0) if key is None else key
    if init is not None and not (windows is n_states is template_sizes is None):
        raise ValueError("give either init or windows/n_states/template_sizes")
    if init is not None:
        struct, params = params_from_drm(init)
        x = _check_images(struct, images)
        y = check_labels(labels, x.shape[0], struct.n_states[-1])
        state = DRMEMState(params, jnp.asarray(0))
    else:
        if windows is None or n_states is None:
            raise ValueError("give either init or both windows and n_states")
        struct, state = drm_em_init(
            images,
            key,
            windows=windows,
            n_states=n_states,
            template_sizes=template_sizes,
            labels=labels,
        )
        x = _check_images(struct, images)
        y = check_labels(labels, x.shape[0], struct.n_states[-1])
    meta = {
        "kind": "drm_em",
        "windows": list(struct.windows),
        "template_sizes": list(struct.template_sizes),
        "n_states": list(struct.n_states),
        "pseudo_count": float(pseudo_count),
        "min_sigma": float(min_sigma),
        "data": fingerprint(x, y),
        "init": fingerprint(*jax.tree.leaves(state.params)),
    }

    def from_arrays(arrays: dict[str, np.ndarray]) -> DRMEMState:
        return DRMEMState(
            _params_from_arrays(arrays, struct.levels),
            jnp.asarray(arrays["iteration"]),
        )

    def to_arrays(st: DRMEMState) -> dict[str, Any]:
        return {**_params_arrays(st.params), "iteration": np.asarray(st.iteration)}

    loop = run_em_loop(
        lambda st: drm_em_step(struct, st, x, y, pseudo_count, min_sigma),
        state,
        n_iter=n_iter,
        tol=tol,
        history=("objective", "max_log_joint"),
        desc="DRM hard EM",
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        meta=meta,
        to_arrays=to_arrays,
        from_arrays=from_arrays,
    )
    state, converged = loop.state, loop.converged
    objective, mlj = loop.history["objective"], loop.history["max_log_joint"]
    # The objective at the final parameters: the E-step part of one more step
    # (its M-step is discarded; reusing the compiled step saves a compilation).
    _, end = drm_em_step(struct, state, x, y, pseudo_count, min_sigma)
    obj_end, mlj_end = end.objective, end.max_log_joint
    return DRMFitResult(
        model=params_to_drm(struct, state.params),
        objective=np.asarray(objective + [float(obj_end)]),
        max_log_joint=np.asarray(mlj + [float(mlj_end)]),
        n_iter=int(state.iteration),
        converged=converged,
    )


# ---- generative classification -------------------------------------------------------
class PerClassDRM(NamedTuple):
    """One DRM per class (its top-level "classes" are mixture components), or
    an equal-weight mixture of ``n_members`` DRMs per class.

    With members, class ``y``'s model is ``p(I | y) = (1/R) sum_r p_r(I | y)``:
    a top-level latent ``r`` picks the member, and the max-sum score maximises
    over it too (Eq. 12 with one more level).

    Attributes:
        models: ``(C * R,)`` fitted models, class-major (class ``y``'s members
            are ``models[y * R:(y + 1) * R]``).
        class_log_prior: ``(C,)`` ``log pi_y`` (label frequencies).
        n_members: ``R``, members per class (1: one DRM per class).
    """

    models: tuple[DeepRenderingModel, ...]
    class_log_prior: np.ndarray
    n_members: int = 1

    def scores(self, images: ArrayLike) -> np.ndarray:
        """``(N, C)``: ``log pi_y + max_{r, tau} log p_r(tau, I | y) - log R``
        (max-sum, Eq. 12)."""
        r = int(self.n_members)
        best = np.stack([np.asarray(drm_map(m, images)[1]) for m in self.models], 1)
        best = best.reshape(best.shape[0], -1, r).max(-1) - np.log(r)
        return best + np.asarray(self.class_log_prior)[None]

    def predict(self, images: ArrayLike) -> np.ndarray:
        """``(N,)`` the MAP class."""
        return np.argmax(self.scores(images), axis=1)


def fit_drm_classifier(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    windows: tuple[int, ...],
    n_states: tuple[int, ...],
    template_sizes: tuple[int, ...] | None = None,
    n_iter: int = 20,
    restarts: int = 1,
    members: int = 1,
    key: PRNGKey | None = None,
    pseudo_count: float = 1.0,
    min_sigma: float = DEFAULT_MIN_SIGMA,
    progress: bool = False,
) -> PerClassDRM:
    """Fit a generative DRM classifier: hard EM per class, best of ``restarts``,
    or a mixture of ``members`` DRMs per class.

    Args:
        images: ``(N, H, W)``.
        labels: ``(N,)`` in ``0..C-1`` (every class present).
        windows, n_states, template_sizes: Each class's DRM (``n_states[-1]``
            mixture components per class).
        restarts: Initialisations per class; the fit with the highest objective
            (on its own training images) is kept.
        members: Keep this many fits per class, from different starts (start
            ``r`` is restart ``r``'s), as an equal-weight mixture: hard EM's
            result moves with its start, the mixture averages that out.
            ``members > 1`` needs ``restarts == 1``.

    Returns:
        A :class:`PerClassDRM`.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError("labels must be a 1-d array of class indices >= 0")
    x = np.asarray(images)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
    n_classes = int(y.max()) + 1
    if int(members) != members or members < 1:
        raise ValueError(f"members must be an integer >= 1, got {members}")
    if members > 1 and restarts != 1:
        raise ValueError("members > 1 keeps every start: use restarts=1 with it")
    key = jax.random.PRNGKey(0) if key is None else key
    models, counts = [], []
    for c in range(n_classes):
        mine = x[y == c]
        if mine.shape[0] == 0:
            raise ValueError(f"class {c} has no training images")
        fits = [
            fit_drm_em(
                mine,
                windows=windows,
                n_states=n_states,
                template_sizes=template_sizes,
                n_iter=n_iter,
                key=jax.random.fold_in(jax.random.fold_in(key, c), r),
                pseudo_count=pseudo_count,
                min_sigma=min_sigma,
                progress=progress,
            )
            for r in range(max(int(members), int(restarts)))
        ]
        if members > 1:
            models.extend(f.model for f in fits)
        else:  # the first start with the highest objective
            models.append(max(fits, key=lambda f: f.objective[-1]).model)
        counts.append(mine.shape[0])
    counts = np.asarray(counts, dtype=float)
    return PerClassDRM(tuple(models), np.log(counts / counts.sum()), int(members))
