"""Soft and hard EM for the Rendering Model (paper §2.6.1, Eqs. 14-17; §6.3.3).

E-step: the log-joint table ``log p(c, g, a, I_n)`` (shape ``(N, C, G[, 2])``,
:func:`~pgm_drm.learning.likelihood.rm_log_joint`) is normalised by
sum-product into responsibilities ``gamma_ncga = p(c, g, a | I_n)`` (soft EM,
Eq. 14) or by max-sum into one-hot indicators of the joint MAP (hard EM, Eq. 16).
Labelled images clamp ``c`` (supervised / semi-supervised EM, §6.3.3).
Semi-supervised EM may down-weight the unlabelled images by ``lambda`` in
``(0, 1]`` (EM-lambda, Nigam et al. 2000): every sum over ``n`` below then
weighs image ``n`` by ``w_n = 1`` (labelled) or ``lambda`` (unlabelled), and EM
ascends ``sum_n w_n log p(I_n[, c_n])``.

M-step (Eqs. 15, 17, with a shared isotropic ``sigma``)::

    N_cg    = sum_n gamma_ncg,a=1
    mu_cg   = sum_n gamma_ncg,a=1 I_n / N_cg
    pi_c    = sum_{n,g,a} gamma_ncga / N      pi_g = sum_{n,c,a} gamma_ncga / N
    pi_a    = sum_{n,c,g} gamma_ncg,a=1 / N
    sigma^2 = sum_{n,c,g,a} gamma_ncga ||I_n - a mu_cg||^2 / (N D)

(with weights, ``gamma_n`` sums to ``w_n`` and ``N = sum_n w_n``).

Empty components. Soft EM: a ``(c, g)`` with ``N_cg == 0`` keeps its old
template (it has zero weight in the expected complete-data log-likelihood, so
any template maximises it and the log-likelihood still never decreases). Hard
EM: before the M-step, every empty ``(c, g)`` takes the worst-explained image
(lowest ``max log p(c, g, a, I_n)``) that may move, i.e. whose label allows
class ``c`` and whose own cluster keeps at least one other image; this is the
usual k-means re-seeding, and it keeps every prior above zero. ``sigma`` is
floored at ``min_sigma`` (the constrained maximiser, so soft EM stays monotone).

The algorithm is an ``(em_init, em_step)`` pair over an :class:`EMState`, which
holds the :class:`~pgm_drm.models.RenderingModel` itself (a pytree: the jitted
step takes it as an ordinary argument, so a new start of the same shapes reuses
the compiled step); :func:`fit_em` loops the step with a progress bar and
checkpoints (:func:`~pgm_drm.learning.loop.run_loop`).

With several devices :func:`fit_em` spreads the images over them
(:func:`pgm_drm.sharding.shard_with_mask`): a batch the device count does not
divide is padded, and the padding has no responsibility, weight 0 in every sum
above and in the log-likelihood, so the fit equals the single-device one.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array, ArrayLike, PRNGKey
from pgm_drm.learning.base import (
    PARAMETER_NAMES,
    FitResult,
    Mode,
    check_fit_inputs,
    check_labels,
    check_min_sigma,
    finish_model,
    initial_model,
    mode_temperature,
)
from pgm_drm.learning.io import fingerprint
from pgm_drm.learning.likelihood import e_step_table, rm_log_joint
from pgm_drm.learning.loop import (
    Algorithm,
    LoopOptions,
    check_n_iter,
    run_loop,
    tolerance,
)
from pgm_drm.models.pytree import replace
from pgm_drm.models.rendering import RenderingModel
from pgm_drm.sharding import replicate, shard_with_mask, valid_mean, where_valid

__all__ = [
    "EMInfo",
    "EMState",
    "em_init",
    "em_step",
    "fit_em",
    "m_step",
    "naive_m_step",
]

#: Default floor on ``sigma`` (pixel units): keeps the log-likelihood finite when
#: a hard-EM cluster holds one image and fits it exactly.
DEFAULT_MIN_SIGMA = 1e-3


class EMState(NamedTuple):
    """EM state: the current model (its leaves are arrays of the images' dtype,
    not validated) and how many steps produced it."""

    model: RenderingModel
    iteration: Array


class EMInfo(NamedTuple):
    """Diagnostics of one EM step, all at the parameters *before* the step.

    Attributes:
        objective: Weighted mean per-image EM objective ``sum_n w_n o_n /
            sum_n w_n`` with ``o_n = log p(I_n[, c_n])`` (soft) or
            ``max_{c,g,a} log p(c, g, a, I_n[, c_n])`` (hard), labels clamped;
            ``w_n = 1``, or ``unlabelled_weight`` for an unlabelled image.
        log_likelihood: Mean per-image ``log p(I_n)`` (labels ignored).
        counts: ``(C, G)`` (weighted) responsibility mass ``N_cg`` of the ON
            branch used by the M-step (after hard-EM re-seeding).
    """

    objective: Array
    log_likelihood: Array
    counts: Array


def _check_fix(fix) -> tuple[str, ...]:
    names = (fix,) if isinstance(fix, str) else tuple(fix)
    bad = sorted(set(names) - set(PARAMETER_NAMES))
    if bad:
        raise ValueError(f"fix: unknown parameters {bad}; known: {PARAMETER_NAMES}")
    return tuple(sorted(set(names)))


def m_step(
    model: RenderingModel,
    images: Array,
    resp: Array,
    fix: tuple[str, ...] = (),
    min_sigma: float = DEFAULT_MIN_SIGMA,
) -> RenderingModel:
    """Closed-form M-step (Eqs. 15, 17) from responsibilities.

    Args:
        model: The old model (its parameters are kept for fixed ones and empty
            components).
        images: ``(N, *image_shape)``.
        resp: ``(N, C, G)`` or ``(N, C, G, 2)`` responsibilities; row ``n``
            sums to the image's weight ``w_n`` (1 in plain EM).
        fix: Names of parameters to keep (see ``PARAMETER_NAMES``).
        min_sigma: Floor on the new ``sigma``.

    Returns:
        The model with the new parameters (not validated: jit-friendly).
    """
    n = images.shape[0]
    x = images.reshape(n, -1)
    d = x.shape[1]
    total = jnp.sum(resp)  # sum_n w_n (= N up to rounding in plain EM)
    switched = model.switch_prior is not None
    on = resp[..., 1] if switched else resp  # (N, C, G)
    cg = resp.sum(-1) if switched else resp  # (N, C, G), a marginalised
    counts = on.sum(0)
    mu_old = model.templates.reshape(*counts.shape, d)
    if "templates" in fix:
        mu = mu_old
    else:
        sums = jnp.einsum("ncg,nd->cgd", on, x)
        full = counts > 0
        mu = jnp.where(
            full[..., None], sums / jnp.where(full, counts, 1.0)[..., None], mu_old
        )
    new = {
        "templates": mu.reshape(model.templates.shape),
        "class_prior": cg.sum((0, 2)) / total,
        "nuisance_prior": cg.sum((0, 1)) / total,
        "switch_prior": on.sum() / total if switched else None,
    }
    if "sigma" in fix:
        new["sigma"] = model.sigma
    else:
        xx = jnp.sum(x**2, axis=-1)
        d2 = (
            xx[:, None, None]
            - 2 * jnp.einsum("nd,cgd->ncg", x, mu)
            + jnp.sum(mu**2, -1)[None]
        )
        sse = jnp.sum(on * jnp.maximum(d2, 0.0))
        if switched:
            sse = sse + jnp.sum(resp[..., 0].sum((1, 2)) * xx)
        new["sigma"] = jnp.sqrt(jnp.maximum(sse / (total * d), min_sigma**2))
    for name in fix:
        if name != "sigma" and not (name == "switch_prior" and not switched):
            new[name] = getattr(model, name)
    return replace(model, **new)


def naive_m_step(
    model: RenderingModel,
    images: ArrayLike,
    resp: ArrayLike,
    fix: tuple[str, ...] = (),
    min_sigma: float = DEFAULT_MIN_SIGMA,
) -> RenderingModel:
    """Twin of :func:`m_step`: explicit numpy loops over ``n, c, g, a``."""
    x = np.asarray(images, dtype=float)
    r = np.asarray(resp, dtype=float)
    n = x.shape[0]
    total = 0.0
    for i in range(n):  # sum_n w_n: each row of resp sums to its image's weight
        total += float(np.sum(r[i]))
    switched = model.switch_prior is not None
    if not switched:
        r = r[..., None]  # a single ON state
    c_, g_, a_ = r.shape[1:]
    old = np.asarray(model.templates, dtype=float)
    mu = old.copy()
    pc, pg, pa = np.zeros(c_), np.zeros(g_), 0.0
    for c in range(c_):
        for g in range(g_):
            w = sum(r[i, c, g, -1] for i in range(n))
            if w > 0 and "templates" not in fix:
                mu[c, g] = sum(r[i, c, g, -1] * x[i] for i in range(n)) / w
            for i in range(n):
                for a in range(a_):
                    pc[c] += r[i, c, g, a] / total
                    pg[g] += r[i, c, g, a] / total
                pa += r[i, c, g, -1] / total
    sse = 0.0
    for i in range(n):
        for c in range(c_):
            for g in range(g_):
                for a in range(a_):
                    on = a == a_ - 1
                    sse += r[i, c, g, a] * np.sum((x[i] - on * mu[c, g]) ** 2)
    sigma = max(np.sqrt(sse / (total * x[0].size)), min_sigma)
    new = {
        "templates": mu,
        "sigma": sigma,
        "class_prior": pc,
        "nuisance_prior": pg,
        "switch_prior": pa if switched else None,
    }
    new.update({k: getattr(model, k) for k in fix if new[k] is not None})
    return replace(model, **new)


def _reseed_empty(resp: Array, score: Array, labels: Array) -> Array:
    """Hard EM: give each empty ``(c, g)`` the worst-explained movable image.

    Args:
        resp: ``(N, C, G[, 2])`` one-hot hard responsibilities.
        score: ``(N,)`` each image's best (clamped) log-joint; lowest = worst.
        labels: ``(N,)``, -1 for unlabelled.

    Returns:
        The responsibilities with the moved images re-assigned (ON branch).
    """
    switched = resp.ndim == 4
    on = resp[..., 1] if switched else resp
    off = resp[..., 0].sum((1, 2)) if switched else jnp.zeros(resp.shape[0])
    n, c_, g_ = on.shape

    def body(k, carry):
        on, off, taken = carry
        c, g = k // g_, k % g_
        counts = on.sum(0)
        own = jnp.einsum("ncg,cg->n", on, counts)  # size of each image's cluster
        movable = (own >= 2) | (off > 0.5)
        allowed = (labels < 0) | (labels == c)
        ok = movable & allowed & ~taken
        pick = jnp.argmax(jnp.where(ok, -score, -jnp.inf))
        do = (counts[c, g] < 0.5) & ok[pick]
        row = jnp.zeros((c_, g_), on.dtype).at[c, g].set(1.0)
        on = jnp.where(do, on.at[pick].set(row), on)
        off = jnp.where(do, off.at[pick].set(0.0), off)
        taken = taken.at[pick].set(taken[pick] | do)
        return on, off, taken

    on2, _, moved = jax.lax.fori_loop(
        0, c_ * g_, body, (on, off, jnp.zeros(n, dtype=bool))
    )
    if not switched:
        return on2
    off_rows = jnp.where(moved[:, None, None], 0.0, resp[..., 0])
    return jnp.stack([off_rows, on2], axis=-1)


def _e_step(model: RenderingModel, images: Array, labels: Array, temperature: float):
    """Responsibilities and per-image (objective, log-likelihood)."""
    return e_step_table(rm_log_joint(model, images), labels, temperature)


def _weights(
    labels: Array, unlabelled_weight: Array | float, dtype, valid: Array | None
) -> Array:
    """``w_n``: 1 for a labelled image, ``unlabelled_weight`` for the others, 0 for
    padding rows."""
    w = jnp.where(labels >= 0, 1.0, unlabelled_weight).astype(dtype)
    return where_valid(w, valid)


def _summaries(obj: Array, ll: Array, w: Array, valid: Array | None):
    """The ``w``-weighted mean objective and the mean log-likelihood over the real
    rows (``where_valid`` keeps a padding row's -inf or NaN out of the sums)."""
    objective = jnp.sum(w * where_valid(obj, valid)) / jnp.sum(w)
    return objective, valid_mean(ll, valid)


@partial(jax.jit, static_argnames=("mode", "fix", "min_sigma"))
def em_step(
    state: EMState,
    images: Array,
    labels: Array,
    mode: Mode = "soft",
    fix: tuple[str, ...] = (),
    min_sigma: float = DEFAULT_MIN_SIGMA,
    unlabelled_weight: Array | float = 1.0,
    valid: Array | None = None,
) -> tuple[EMState, EMInfo]:
    """One EM iteration (jitted): E-step (Eq. 14 or 16) then M-step (Eqs. 15/17).

    Args:
        state: Current :class:`EMState`.
        images: ``(N, *image_shape)`` float array.
        labels: ``(N,)`` ints, -1 for unlabelled (all -1: unsupervised).
        mode: "soft" (sum-product responsibilities) or "hard" (max-sum).
        fix: Sorted tuple of parameter names to hold fixed.
        min_sigma: Floor on ``sigma``.
        unlabelled_weight: ``lambda``, the weight of each unlabelled image in
            the M-step and the objective (EM-lambda; 1 = plain EM).
        valid: ``(N,)`` bool, false for padding rows (weight 0 everywhere, and
            never a hard-EM re-seed), as
            :func:`~pgm_drm.sharding.shard_with_mask` returns it; ``None``:
            every row is real.

    Returns:
        The new state and an :class:`EMInfo` at the old parameters.
    """
    t = mode_temperature(mode)
    resp, obj, ll = _e_step(state.model, images, labels, t)
    resp = where_valid(resp, valid)  # padding: in no cluster, so never moved
    if t == 0.0:
        resp = _reseed_empty(resp, obj, labels)
    w = _weights(labels, unlabelled_weight, resp.dtype, valid)
    resp = resp * w.reshape((-1,) + (1,) * (resp.ndim - 1))
    new = m_step(state.model, images, resp, fix, min_sigma)
    on = resp[..., 1] if resp.ndim == 4 else resp
    info = EMInfo(*_summaries(obj, ll, w, valid), on.sum(0))
    return EMState(new, state.iteration + 1), info


@partial(jax.jit, static_argnames=("mode",))
def _objectives(model, images, labels, mode, unlabelled_weight=1.0, valid=None):
    _, obj, ll = _e_step(model, images, labels, mode_temperature(mode))
    return _summaries(
        obj, ll, _weights(labels, unlabelled_weight, obj.dtype, valid), valid
    )


def em_init(
    images: ArrayLike,
    n_classes: int,
    n_nuisances: int,
    *,
    key: PRNGKey | None = None,
    switch: bool | None = None,
    labels: ArrayLike | None = None,
    init: RenderingModel | None = None,
) -> EMState:
    """Initial :class:`EMState`: from ``init`` or by k-means++ picks of images.

    Args:
        images: ``(N, *image_shape)``.
        n_classes, n_nuisances: ``C`` and ``G``.
        key: PRNG key for the k-means++ picks (default ``PRNGKey(0)``).
        switch: Fit the ON/OFF switch ``a``; default: as ``init``, else ``False``.
        labels: ``(N,)`` with -1 for unlabelled: seeds class ``c``'s templates
            from images labelled ``c``; when some but not all images are
            labelled, a short supervised soft EM on the labelled images follows
            (:data:`WARM_START_ITERS`).
        init: A :class:`RenderingModel` to start from (its sizes must match).
    """
    x, c_, g_ = check_fit_inputs(images, n_classes, n_nuisances)
    y = check_labels(labels, x.shape[0], c_)
    return _state(_start(x, c_, g_, key, switch, y, init))


def _state(model: RenderingModel) -> EMState:
    """The state at iteration 0 (the loop's ``init``)."""
    return EMState(model, jnp.asarray(0, dtype=jnp.int32))


def _start(x, c_, g_, key, switch, y, init) -> RenderingModel:
    """The starting model (:func:`initial_model`, warm-started when some but
    not all images are labelled)."""
    model = initial_model(x, c_, g_, key, switch, y, init)
    labelled = np.asarray(y) >= 0
    if init is None and labelled.any() and not labelled.all():
        model = _warm_start(model, x[labelled], y[labelled])
    return model


#: Semi-supervised warm start: at most this many supervised soft-EM iterations
#: on the labelled images alone, stopping when the objective moves < 1e-6.
WARM_START_ITERS = 30


def _warm_start(model: RenderingModel, x: Array, y: Array) -> RenderingModel:
    """Semi-supervised initialisation: supervised soft EM on the labelled images.

    Templates seeded from the labelled images only (k-means++ per class) can
    still sit at the wrong nuisance and let unlabelled images of another class
    take them over; a few supervised EM steps first give each class templates
    that are averages of its own images (on synthetic data this lifted
    semi-supervised accuracy from ~0.55 to ~0.99 on some seeds).
    """
    state = replicate(_state(model))
    (x, y), valid = shard_with_mask((x, y))
    last = None
    for _ in range(WARM_START_ITERS):
        state, info = em_step(state, x, y, "soft", (), DEFAULT_MIN_SIGMA, valid=valid)
        obj = float(info.objective)
        if last is not None and abs(obj - last) < 1e-6:
            break
        last = obj
    return state.model


def fit_em(
    images: ArrayLike,
    n_classes: int,
    n_nuisances: int,
    *,
    mode: Mode = "soft",
    labels: ArrayLike | None = None,
    switch: bool | None = None,
    fix: tuple[str, ...] | str = (),
    n_iter: int = 100,
    tol: float | None = 1e-6,
    key: PRNGKey | None = None,
    init: RenderingModel | None = None,
    min_sigma: float = DEFAULT_MIN_SIGMA,
    unlabelled_weight: float = 1.0,
    loop: LoopOptions | None = None,
) -> FitResult:
    """Fit an RM by soft (Eqs. 14-15) or hard (Eqs. 16-17) EM.

    Unsupervised with ``labels=None``; supervised when every label is given
    (``c`` clamped, EM over ``g, a`` only); semi-supervised (§6.3.3) with -1 for
    the unlabelled images, which marginalise (soft) or maximise (hard) over ``c``.

    Args:
        images: ``(N, *image_shape)`` training images.
        n_classes, n_nuisances: ``C >= 1`` and ``G >= 1``.
        mode: "soft" or "hard".
        labels: ``(N,)`` ints in ``0..C-1``, -1 for unlabelled; or ``None``.
        switch: Fit the ON/OFF switch; default: as ``init``, else ``False``.
        fix: Parameters to hold at their initial values, e.g. ``("sigma",)``.
        n_iter: Maximum number of iterations.
        tol: Stop when the (weighted) mean per-image objective changes by
            less than ``tol`` (nats) between iterations; ``None`` runs all
            ``n_iter``.
        key: PRNG key for the k-means++ initialisation (default ``PRNGKey(0)``).
        init: Start from this :class:`RenderingModel` instead.
        min_sigma: Floor on ``sigma``.
        unlabelled_weight: ``lambda`` in ``(0, 1]``: semi-supervised EM weighs
            each unlabelled image by it (EM-lambda, Nigam et al. 2000), so that
            many unlabelled images cannot outvote the labelled ones; the
            objective becomes the weighted mean. 1 (default) is plain EM.
        loop: Progress bar and checkpoints
            (:class:`~pgm_drm.learning.loop.LoopOptions`; checkpoints every 10
            iterations by default); a resumed fit equals an uninterrupted one.

    Returns:
        A :class:`FitResult`; ``objective[t]`` is at the parameters after ``t``
        iterations (soft EM: never decreases, weighted or not).

    Raises:
        ValueError: Bad images (shape, NaN/inf), sizes, labels, mode, ``fix``,
            ``unlabelled_weight``, ``init``, or a checkpoint from a different
            fit or not consistent.

    Example:
        >>> import jax
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> truth = RenderingModel(default_templates(4)[:2, :2], sigma=0.1)
        >>> images, _ = truth.sample(jax.random.PRNGKey(0), 40)
        >>> from pgm_drm.learning.loop import LoopOptions
        >>> fit = fit_em(images, 2, 2, n_iter=20, loop=LoopOptions(progress=False))
        >>> fit.model.templates.shape, bool(fit.objective[-1] >= fit.objective[0])
        ((2, 2, 4, 4), True)
    """
    mode_temperature(mode)
    fix_t = _check_fix(fix)
    x, c_, g_ = check_fit_inputs(images, n_classes, n_nuisances)
    y = check_labels(labels, x.shape[0], c_)
    check_n_iter(n_iter)
    stop = tolerance(tol, "objective")
    check_min_sigma(min_sigma)
    lam = float(unlabelled_weight)
    if not (np.isfinite(lam) and 0.0 < lam <= 1.0):
        raise ValueError(
            f"unlabelled_weight must lie in (0, 1], got {unlabelled_weight!r}"
        )
    start = _start(x, c_, g_, key, switch, y, init)
    meta = {
        "kind": "em",
        "mode": mode,
        "n_classes": c_,
        "n_nuisances": g_,
        "switch": start.switch_prior is not None,
        "fix": list(fix_t),
        "min_sigma": float(min_sigma),
        "unlabelled_weight": lam,
        "data": fingerprint(x, y),
    }
    # The images spread over every device (padded if need be; one device: as is).
    (x, y), valid = shard_with_mask((x, y))
    algorithm = Algorithm(
        init=lambda model: replicate(_state(model)),
        step=lambda st: em_step(
            st, x, y, mode, fix_t, float(min_sigma), lam, valid=valid
        ),
    )
    out = run_loop(
        algorithm,
        start,
        n_iter,
        loop,
        history=("objective", "log_likelihood"),
        stop=stop,
        meta=meta,
        desc=f"EM ({mode})",
        default_every=10,
    )
    state, converged = out.state, out.converged
    objective, loglik = out.history["objective"], out.history["log_likelihood"]
    obj_end, ll_end = _objectives(state.model, x, y, mode, lam, valid)
    return FitResult(
        model=finish_model(state.model),
        objective=np.asarray(objective + [float(obj_end)]),
        log_likelihood=np.asarray(loglik + [float(ll_end)]),
        n_iter=int(state.iteration),
        converged=converged,
    )
