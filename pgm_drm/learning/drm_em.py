"""Hard EM for the tree Deep Rendering Model (paper §2.6, Eqs. 18-23; DESIGN §5).

One iteration, on ``N`` training images:

* **E-step** (Eq. 18): the joint MAP rendering tree ``tau*_n = argmax log p(tau, I_n)``
  of every image by bottom-up max-sum (conv -> ReLU -> max-pool) and top-down
  backtracking -- the model's own pass (:mod:`pgm_drm.models.maxsum`, the one
  :func:`pgm_drm.inference.dcn_infer` runs at ``"max"``), jitted with the model
  traced, so it compiles once per model *structure*. With labels the class
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
:func:`fit_drm_em` runs the step in :func:`~pgm_drm.learning.loop.run_loop`
(tqdm bar, resumable checkpoints), with the images spread over every device
(:func:`pgm_drm.sharding.shard_with_mask`: the padding of a batch the device
count does not divide is in no count, sum, mean or re-seed, so the fit equals the
single-device one); :func:`fit_drm_classifier` fits one DRM per
class (its "classes" are mixture components) for generative classification.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._random import np_rng
from pgm_drm._typing import Array, ArrayLike, PRNGKey
from pgm_drm.learning.base import check_labels, check_min_sigma, kmeans, real_finite
from pgm_drm.learning.io import fingerprint
from pgm_drm.learning.loop import (
    Algorithm,
    LoopOptions,
    check_n_iter,
    run_loop,
    tolerance,
)
from pgm_drm.models import maxsum
from pgm_drm.models.drm import DeepRenderingModel
from pgm_drm.models.maxsum import (
    Latents,
    bottom_up,
    bottom_up_argmax,
    latents_to_map,
    placement_offsets,
    top_down,
)
from pgm_drm.models.pytree import replace
from pgm_drm.sharding import replicate, shard_with_mask, valid_mean, where_valid

__all__ = [
    "DRMEMInfo",
    "DRMEMState",
    "DRMFitResult",
    "PerClassDRM",
    "drm_em_init",
    "drm_em_step",
    "drm_log_joint",
    "drm_map",
    "fit_drm_classifier",
    "fit_drm_em",
]

#: Default floor on ``sigma``: a template that fits its patches exactly would
#: otherwise drive ``sigma -> 0`` and the log joint to ``+inf``.
DEFAULT_MIN_SIGMA = 1e-3


class DRMEMState(NamedTuple):
    """State of hard EM: the model (a pytree whose leaves are all arrays, see
    :func:`_as_arrays`) and the number of iterations done."""

    model: DeepRenderingModel
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


# ---- the E-step: the model's own max-sum pass -------------------------------------
def _as_arrays(drm: DeepRenderingModel) -> DeepRenderingModel:
    """The model with every leaf a strongly typed array (Python floats become 0-d
    float arrays), so the jitted step sees the same abstract values at every
    iteration and compiles once per structure."""
    return jax.tree.map(lambda v: jnp.asarray(v, dtype=jnp.asarray(v).dtype), drm)


def _as_model(drm: DeepRenderingModel) -> DeepRenderingModel:
    """A validated :class:`DeepRenderingModel` from EM's array leaves; priors
    renormalised (float rounding), switch priors clipped to ``[0, 1]``."""

    def norm(p):
        p = np.asarray(p, dtype=float)
        return p / p.sum()

    return DeepRenderingModel(
        windows=drm.windows,
        pixel_templates=np.asarray(drm.pixel_templates),
        child_templates=tuple(np.asarray(t) for t in drm.child_templates),
        class_prior=norm(drm.class_prior),
        nuisance_priors=tuple(norm(p) for p in drm.nuisance_priors),
        switch_priors=tuple(
            float(np.clip(np.asarray(p), 0.0, 1.0)) for p in drm.switch_priors
        ),
        sigma=float(np.asarray(drm.sigma)),
    )


def _clamp(class_scores: Array, labels: Array) -> Array:
    """Class scores with every class but the label at ``-inf`` (label -1: free)."""
    k = class_scores.shape[-1]
    keep = (labels[:, None] < 0) | (labels[:, None] == jnp.arange(k))
    return jnp.where(keep, class_scores, -jnp.inf)


def _e_step(drm: DeepRenderingModel, images: Array, labels: Array):
    """Eq. 18: the MAP latents (class clamped where labelled) and their log joint."""
    up = bottom_up_argmax(drm, images)
    class_scores = _clamp(drm.class_scores(up.pooled[-1]), labels)
    z = top_down(drm, up, class_scores)
    return z, jnp.max(class_scores, axis=-1)


@jax.jit
def _map_jit(drm, images, labels):
    z, value = _e_step(drm, images, labels)
    return latents_to_map(z), value


@partial(jax.jit, static_argnums=(2,))
def _messages(drm: DeepRenderingModel, images: Array, level: int) -> Array:
    """Bottom-up max-sum messages of the level-``level`` units ``(B, h, h, K+1)``."""
    pooled, _, _ = bottom_up(drm, images, 0.0, upto=level)
    return drm.level_switch(level, pooled, 0.0)


def _check_images(image_shape: tuple[int, int], images: ArrayLike) -> Array:
    x = jnp.asarray(images)
    if x.ndim != 3 or x.shape[1:] != image_shape or x.shape[0] < 1:
        raise ValueError(
            f"images must have shape (N, *{image_shape}) with N >= 1 "
            f"(the model's image_shape), got {x.shape}"
        )
    return real_finite(x)


def drm_map(
    drm: DeepRenderingModel, images: ArrayLike, labels: ArrayLike | None = None
) -> tuple[dict[str, Array], Array]:
    """The E-step (Eq. 18): joint MAP latents, with the class clamped where labelled.

    The pass of ``drm.infer`` (:mod:`pgm_drm.models.maxsum`) at max-sum, with the
    clamped classes' scores set to ``-inf`` before the top-down argmax; jitted
    with the model traced.

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
    x = _check_images(drm.image_shape, images)
    y = check_labels(labels, x.shape[0], drm.n_classes)
    return _map_jit(drm, x, y)


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


def _size(x: Array, valid: Array | None):
    """How many entries of ``x`` (leading axis: the batch) are not padding."""
    if valid is None:
        return x.size
    return jnp.sum(valid) * (x.size // x.shape[0])


def _onehot_counts(x: Array, k: int, valid: Array | None = None) -> Array:
    """``(k,)`` how often each value occurs in ``x`` outside the padding."""
    hot = where_valid(jax.nn.one_hot(x, k, dtype=float), valid)
    return jnp.sum(hot, axis=tuple(range(x.ndim)))


def _seed_index(empty: Array, gain: Array, valid: Array | None = None) -> Array:
    """For each state, the flat unit index it is re-seeded from if empty: the
    ``r``-th empty state takes the unit with the ``r``-th largest ``gain``
    (padding units come last and are never taken)."""
    order = jnp.argsort(-jnp.ravel(where_valid(gain, valid, -jnp.inf)))
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, _size(gain, valid) - 1)
    return order[rank]


def _pixel_update(drm: DeepRenderingModel, images, z: Latents, sigma_floor, valid=None):
    """Steps 2-3: level-1 templates (patch means) and sigma (RMS residual)."""
    w, t = drm.windows[0], drm.template_sizes[0]
    k = drm.n_states[0]
    offs = placement_offsets(w, t)
    patches = maxsum.windows(images[..., None], w)[..., 0]  # (B,h,h,w*w)
    subs = patches[..., offs]  # (B,h,h,G,t*t)
    s1, g1 = z.states[0], z.g[0]
    mine = jnp.take_along_axis(subs, g1[..., None, None], axis=-2)[..., 0, :]
    # OFF (= k) and padding -> all zeros
    onehot = where_valid(jax.nn.one_hot(s1, k, dtype=float), valid)
    sums = jnp.einsum("bxyk,bxyp->kp", onehot, mine)
    counts = jnp.sum(onehot, axis=(0, 1, 2))
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    # Residual of each level-1 unit under the new templates: picks the re-seeds.
    new = replace(drm, pixel_templates=mean.reshape(k, t, t))
    rendered = new.placement_table(1)[s1, g1]  # (B,h,h,w*w)
    resid = jnp.sum((patches - rendered) ** 2, axis=-1)
    empty = counts == 0
    unit = _seed_index(empty, resid, valid)
    flat = jnp.reshape(subs, (-1,) + subs.shape[-2:])[unit]  # (K, G, t*t)
    best_g = jnp.argmax(jnp.sum(flat**2, axis=-1), axis=-1)
    seeded = jnp.take_along_axis(flat, best_g[:, None, None], axis=1)[:, 0]
    mean = jnp.where(empty[:, None], seeded, mean)
    sigma = jnp.sqrt(valid_mean(resid, valid) / (w * w))
    sigma = jnp.maximum(sigma, sigma_floor)
    return replace(drm, pixel_templates=mean.reshape(k, t, t), sigma=sigma)


def _child_update(
    drm: DeepRenderingModel, level: int, msgs: Array, z: Latents, valid=None
):
    """Step 4 at ``level``: ``argmax_v`` of the summed child messages per cell."""
    w, t = drm.windows[level - 1], drm.template_sizes[level - 1]
    k = drm.n_states[level - 1]
    offs = placement_offsets(w, t)
    win = maxsum.windows(msgs, w)[..., offs, :]  # (B,h,h,G,t*t,V)
    s, g = z.states[level - 1], z.g[level - 1]
    sel = jnp.take_along_axis(win, g[..., None, None, None], axis=3)[..., 0, :, :]
    onehot = where_valid(jax.nn.one_hot(s, k, dtype=sel.dtype), valid)
    # OFF-state units (s = k) have no template; a unit in state k' contributes
    # its child messages to every cell of T_k'.
    total = jnp.einsum("bxyk,bxycv->kcv", onehot, sel)
    counts = jnp.sum(onehot, axis=(0, 1, 2))
    updated = jnp.argmax(total, axis=-1).astype(jnp.int32)  # (K, t*t)
    # Re-seed: the gap between a unit's best child arrangement and what it renders.
    old = jnp.reshape(drm.child_templates[level - 2], (k, t * t))
    n_child = msgs.shape[-1]
    cur = jnp.concatenate([old, jnp.full((1, t * t), n_child - 1, old.dtype)])[s]
    rendered = jnp.take_along_axis(sel, cur[..., None], axis=-1)[..., 0]
    gap = jnp.sum(jnp.max(sel, axis=-1) - rendered, axis=-1)
    empty = counts == 0
    unit = _seed_index(empty, gap, valid)
    flat = jnp.reshape(win, (-1,) + win.shape[-3:])[unit]  # (K, G, t*t, V)
    best_g = jnp.argmax(jnp.sum(jnp.max(flat, axis=-1), axis=-1), axis=-1)
    seeded = jnp.argmax(
        jnp.take_along_axis(flat, best_g[:, None, None, None], axis=1)[:, 0], axis=-1
    ).astype(jnp.int32)
    return jnp.where(empty[:, None], seeded, updated).reshape(k, t, t)


def _m_step(
    drm: DeepRenderingModel, images, z: Latents, alpha, sigma_floor, valid=None
):
    L = drm.levels
    # 1. priors from counts (+ alpha per outcome).
    class_prior = _prior(_onehot_counts(z.states[L - 1], drm.n_classes, valid), alpha)
    nuis = tuple(
        _prior(_onehot_counts(z.g[l - 1], drm.n_nuisances[l - 1], valid), alpha)
        for l in range(1, L + 1)
    )
    switch = tuple(
        (
            (jnp.sum(where_valid(a, valid)) + alpha) / (_size(a, valid) + 2 * alpha)
        ).astype(jnp.asarray(p).dtype)
        for a, p in zip(z.a, drm.switch_priors, strict=True)  # levels 1..L-1
    )
    drm = replace(
        drm, class_prior=class_prior, nuisance_priors=nuis, switch_priors=switch
    )
    # 2-3. pixel templates and sigma.
    drm = _pixel_update(drm, images, z, sigma_floor, valid)
    # 4. child templates, bottom-up, each with messages of the updated levels below:
    # the pass of pgm_drm.models.maxsum, one level at a time.
    below = images
    for level in range(1, L):
        pooled = jnp.max(drm.level_scores(level, below), axis=-1)
        below = drm.level_switch(level, pooled, 0.0)
        kids = list(drm.child_templates)
        kids[level - 1] = _child_update(drm, level + 1, below, z, valid)
        drm = replace(drm, child_templates=tuple(kids))
    return drm


def _log_dirichlet(drm: DeepRenderingModel, alpha: Array) -> Array:
    """``alpha * sum log pi`` over every prior: the log Dirichlet(``alpha + 1``)
    density up to a constant (``0 * log 0`` read as 0)."""

    def s(p):
        return jnp.sum(jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf))

    total = s(drm.class_prior) + sum(s(p) for p in drm.nuisance_priors)
    sw = jnp.asarray(drm.switch_priors, dtype=float).reshape(drm.levels - 1)
    total = total + s(sw) + s(1.0 - sw)
    return jnp.where(alpha > 0, alpha * total, 0.0)


@jax.jit
def _step(drm, images, labels, alpha, sigma_floor, valid=None):
    z, value = _e_step(drm, images, labels)
    mlj = valid_mean(value, valid)
    obj = mlj + _log_dirichlet(drm, alpha) / _size(value, valid)
    new = _m_step(drm, images, z, alpha, sigma_floor, valid)
    return new, obj, mlj


def drm_em_step(
    state: DRMEMState,
    images: Array,
    labels: Array,
    pseudo_count: float = 1.0,
    min_sigma: float = DEFAULT_MIN_SIGMA,
    valid: Array | None = None,
) -> tuple[DRMEMState, DRMEMInfo]:
    """One hard-EM iteration (E-step Eq. 18, M-step Eqs. 21-23; module docstring).

    Jitted with the model traced: one compilation per structure and data shape.

    Args:
        state: Current model (all leaves arrays, as :func:`drm_em_init` makes it).
        images: ``(N, H, W)`` float.
        labels: ``(N,)`` int, -1 for unlabelled.
        pseudo_count: Dirichlet pseudo-count ``alpha >= 0`` added to every count.
        min_sigma: Floor on ``sigma``.
        valid: ``(N,)`` bool, false for padding rows (in no count, sum, mean or
            re-seed), as :func:`~pgm_drm.sharding.shard_with_mask` returns it;
            ``None``: every row is real.

    Returns:
        The new state and the objective at the *old* parameters.
    """
    new, obj, mlj = _step(
        state.model,
        images,
        labels,
        jnp.asarray(pseudo_count, dtype=float),
        jnp.asarray(min_sigma, dtype=float),
        valid,
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
) -> DRMEMState:
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
        The initial :class:`DRMEMState` (its model's leaves all arrays).
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
    side = int(np.prod(windows))
    x = _check_images((side, side), images)
    y = np.asarray(check_labels(labels, x.shape[0], n_states[-1]))
    rng = np_rng(key)
    # level 1: k-means on sub-patches.
    w, t = windows[0], template_sizes[0]
    offs = placement_offsets(w, t)
    patches = maxsum.windows(np.asarray(x)[..., None], w)[..., 0]
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
    n_g = [(w - t + 1) ** 2 for w, t in zip(windows, template_sizes, strict=True)]
    drm = DeepRenderingModel(
        windows=windows,
        pixel_templates=pix.reshape(n_states[0], t, t),
        child_templates=tuple(  # placeholders, seeded level by level below
            np.zeros((n_states[l - 1],) + (template_sizes[l - 1],) * 2, np.int32)
            for l in range(2, L + 1)
        ),
        class_prior=np.full(n_states[-1], 1.0 / n_states[-1]),
        nuisance_priors=tuple(np.full(g, 1.0 / g) for g in n_g),
        switch_priors=(float(switch_prior),) * (L - 1),
        sigma=sigma,
    )
    for level in range(1, L):
        msgs = _messages(drm, x, level)
        drm = _seed_children(drm, level + 1, msgs, y, rng)
    return _state(drm)


def _state(drm: DeepRenderingModel) -> DRMEMState:
    """The state at iteration 0 (the loop's ``init``)."""
    return DRMEMState(_as_arrays(drm), jnp.asarray(0))


def _seed_children(drm, level, msgs, y, rng) -> DeepRenderingModel:
    w, t = drm.windows[level - 1], drm.template_sizes[level - 1]
    k = drm.n_states[level - 1]
    offs = placement_offsets(w, t)
    g0 = offs.shape[0] // 2
    win = maxsum.windows(np.asarray(msgs), w)[..., offs[g0], :]  # (B,h,h,t*t,V)
    flat = win.reshape(-1, t * t, win.shape[-1])
    gain = np.sum(flat.max(-1) - flat[..., -1], axis=-1)
    p = gain / gain.sum() if gain.sum() > 0 else None
    picks = rng.choice(flat.shape[0], size=k, replace=flat.shape[0] < k, p=p)
    tmpl = np.argmax(flat[picks], axis=-1)
    if level == drm.levels and np.any(y >= 0):
        for c in range(k):
            if np.any(y == c):
                tmpl[c] = np.argmax(flat[y == c].sum(0), axis=-1)
    kids = list(drm.child_templates)
    kids[level - 2] = jnp.asarray(tmpl.reshape(k, t, t), dtype=jnp.int32)
    return replace(drm, child_templates=tuple(kids))


# ---- the fit -------------------------------------------------------------------------
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
    loop: LoopOptions | None = None,
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
        loop: Progress bar and checkpoints
            (:class:`~pgm_drm.learning.loop.LoopOptions`; every 5 iterations by
            default); a resumed fit equals an uninterrupted one.

    Returns:
        :class:`DRMFitResult`; ``objective`` never decreases.

    Raises:
        ValueError: Bad images (shape, NaN/inf), labels, sizes or settings, or a
            checkpoint written by a different fit or not consistent.

    Example:
        >>> import jax
        >>> truth = DeepRenderingModel.random(
        ...     jax.random.PRNGKey(1), image_shape=(4, 4), levels=2, sigma=0.1)
        >>> images, _ = truth.sample(jax.random.PRNGKey(2), 60)
        >>> from pgm_drm.learning.loop import LoopOptions
        >>> fit = fit_drm_em(images, windows=(2, 2), n_states=(4, 3),
        ...                  n_iter=5, loop=LoopOptions(progress=False))
        >>> bool(np.all(np.diff(fit.objective) >= -1e-9)), fit.model.n_states
        (True, (4, 3))
    """
    check_n_iter(n_iter)
    stop = tolerance(tol, "objective")
    check_min_sigma(min_sigma)
    if not (np.isfinite(pseudo_count) and pseudo_count >= 0):
        raise ValueError(
            f"pseudo_count must be a finite number >= 0, got {pseudo_count}"
        )
    key = jax.random.PRNGKey(0) if key is None else key
    if init is not None and not (windows is n_states is template_sizes is None):
        raise ValueError("give either init or windows/n_states/template_sizes")
    if init is not None:
        x = _check_images(init.image_shape, images)
        y = check_labels(labels, x.shape[0], init.n_classes)
        state = _state(init)
    else:
        if windows is None or n_states is None:
            raise ValueError("give either init or both windows and n_states")
        state = drm_em_init(
            images,
            key,
            windows=windows,
            n_states=n_states,
            template_sizes=template_sizes,
            labels=labels,
        )
        x = _check_images(state.model.image_shape, images)
        y = check_labels(labels, x.shape[0], state.model.n_classes)
    drm = state.model
    meta = {
        "kind": "drm_em",
        "windows": list(drm.windows),
        "template_sizes": list(drm.template_sizes),
        "n_states": list(drm.n_states),
        "pseudo_count": float(pseudo_count),
        "min_sigma": float(min_sigma),
        "data": fingerprint(x, y),
    }
    # The images spread over every device (padded if need be; one device: as is).
    (x, y), valid = shard_with_mask((x, y))
    algorithm = Algorithm(
        init=lambda model: replicate(_state(model)),
        step=lambda st: drm_em_step(st, x, y, pseudo_count, min_sigma, valid),
    )
    out = run_loop(
        algorithm,
        drm,
        n_iter,
        loop,
        history=("objective", "max_log_joint"),
        stop=stop,
        meta=meta,
        desc="DRM hard EM",
        default_every=5,
    )
    state, converged = out.state, out.converged
    objective, mlj = out.history["objective"], out.history["max_log_joint"]
    # The objective at the final parameters: the E-step part of one more step
    # (its M-step is discarded; reusing the compiled step saves a compilation).
    _, end = drm_em_step(state, x, y, pseudo_count, min_sigma, valid)
    obj_end, mlj_end = end.objective, end.max_log_joint
    return DRMFitResult(
        model=_as_model(state.model),
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
        progress: A tqdm bar for each fit (many fits: no checkpoint path, so
            no :class:`~pgm_drm.learning.loop.LoopOptions`).

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
                loop=LoopOptions(progress=progress),
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
