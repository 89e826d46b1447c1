"""Soft and hard EM for the factor-analyser Rendering Model (paper Eq. 34, §5.1;
semi-supervised as in §6.3.3).

The model is :class:`~pgm_drm.models.factor.FactorRenderingModel`: a mixture of
factor analysers over ``(c, g)`` with a continuous nuisance ``z``. One EM
iteration (an ECM step in the sense of Meng & Rubin 1993; the factor-analyser
updates are Ghahramani & Hinton 1996):

1. E-step over the discrete latents, exactly as for the RM (Eqs. 14 / 16):
   ``gamma_ncg = p(c, g | I_n)`` (soft, sum-product) or the one-hot joint MAP
   (hard, max-sum), with labelled images clamping ``c``.
2. Closed-form ``pi_c``, ``pi_g`` and ``mu_cg = sum_n gamma_ncg I_n / N_cg``
   (for any covariance this maximises the weighted Gaussian log-likelihood).
3. One factor-analyser EM step per component on its weighted scatter
   ``S = sum_n gamma_n (I_n - mu)(I_n - mu)^T / N_cg``, with the posterior of
   ``z`` taken at the old ``Lambda, Psi``: ``beta = Lambda^T C^-1``,
   ``E[zz^T] = I - beta Lambda + beta S beta^T``,
   ``Lambda' = S beta^T E[zz^T]^-1``, ``Psi' = max(diag(S - Lambda' beta S),
   min_sigma^2)``; the floor is the constrained maximiser of each pixel's term.

Step 2 maximises the weighted Gaussian log-likelihood of each component for its
current covariance; step 3 is one EM step over ``z`` with ``mu`` fixed, which
does not decrease that ``z``-marginal log-likelihood (an AECM/GEM iteration).
So the soft-EM log-likelihood (and the hard-EM ``max`` objective) never
decreases in exact arithmetic; in float32 rounding makes dips of ~1e-5 nats per
image (use float64, or a ``tol`` above that). A component with no
responsibility mass keeps its parameters, and its prior is 0: in hard EM a
component that loses every image stays empty (:func:`fit_fa_em` warns when a
whole class ends with prior 0).

Initialisation (:func:`fa_em_init`): every image starts in one class (its
label; else the label of its nearest labelled image; with no labels at all,
scikit-learn k-means), split into ``G`` sub-types by k-means within the class;
then a probabilistic-PCA M-step (Tipping & Bishop 1999, closed form by
eigendecomposition) gives ``Lambda`` and an isotropic ``Psi``.

The state (:class:`FAState`) holds the :class:`FactorRenderingModel` itself, a
pytree that the jitted E- and M-steps take as an ordinary argument; the steps
work on flat images ``(N, D)``. With several devices :func:`fit_fa_em` spreads
them over the devices (:func:`pgm_drm.sharding.shard_with_mask`); the padding of
a batch the device count does not divide has no responsibility and weight 0 in
the objective and the log-likelihood, so the fit equals the single-device one.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._random import np_rng
from pgm_drm._typing import Array, ArrayLike, PRNGKey
from pgm_drm.learning.base import (
    FitResult,
    Mode,
    check_fit_inputs,
    check_labels,
    check_min_sigma,
    kmeans,
    mode_temperature,
)
from pgm_drm.learning.io import fingerprint
from pgm_drm.learning.likelihood import e_step_table
from pgm_drm.learning.loop import (
    Algorithm,
    LoopOptions,
    check_n_iter,
    run_loop,
    tolerance,
)
from pgm_drm.models.factor import FactorRenderingModel, fa_log_joint, woodbury_terms
from pgm_drm.models.pytree import replace
from pgm_drm.sharding import replicate, shard_with_mask, valid_mean, where_valid

__all__ = [
    "FAInfo",
    "FAState",
    "fa_em_init",
    "fa_em_step",
    "fa_m_step",
    "fit_fa_em",
    "naive_fa_m_step",
]

#: Default floor on each pixel's noise standard deviation ``sqrt(Psi_d)``.
DEFAULT_MIN_SIGMA = 1e-2


#: The parameters of a :class:`FactorRenderingModel`, in field order.
FIELDS = ("templates", "loadings", "noise", "class_prior", "nuisance_prior")


class FAState(NamedTuple):
    """EM state: the current model (its leaves are arrays of the images' dtype,
    not validated) and how many steps produced it."""

    model: FactorRenderingModel
    iteration: Array


class FAInfo(NamedTuple):
    """Diagnostics of one EM step, at the parameters *before* the step.

    Attributes:
        objective: Mean per-image ``log p(I_n[, c_n])`` (soft) or
            ``max_{c,g} log p(c, g, I_n[, c_n])`` (hard), labels clamped.
        log_likelihood: Mean per-image ``log p(I_n)`` (labels ignored).
        counts: ``(C, G)`` responsibility mass ``N_cg``.
    """

    objective: Array
    log_likelihood: Array
    counts: Array


def _finish(model: FactorRenderingModel) -> FactorRenderingModel:
    """The validated :class:`FactorRenderingModel` a fit returns from the model
    of its last step; the priors are renormalised to absorb float rounding of
    the M-step sums."""
    pc = np.asarray(model.class_prior, dtype=float)
    pg = np.asarray(model.nuisance_prior, dtype=float)
    return FactorRenderingModel(
        templates=model.templates,
        loadings=model.loadings,
        noise=model.noise,
        class_prior=pc / pc.sum(),
        nuisance_prior=pg / pg.sum(),
    )


def _table(model: FactorRenderingModel, x: Array) -> Array:
    mu, psi = model.flat_parameters()
    return fa_log_joint(
        x, mu, model.loadings, psi, model.class_prior, model.nuisance_prior
    )


def _moments(x: Array, resp: Array) -> tuple[Array, Array, Array]:
    """Per component: the mass ``N_cg``, the weighted mean ``(C, G, D)`` and
    the weighted scatter about it ``(C, G, D, D)`` (0 for an empty one)."""
    counts = resp.sum(0)
    safe = jnp.where(counts > 0, counts, 1.0)
    mu = jnp.einsum("ncg,nd->cgd", resp, x) / safe[..., None]
    r = x[:, None, None, :] - mu[None]  # (N, C, G, D)
    scatter = jnp.einsum("ncg,ncgd,ncge->cgde", resp, r, r) / safe[..., None, None]
    return counts, mu, scatter


def fa_m_step(
    model: FactorRenderingModel,
    x: Array,
    resp: Array,
    min_sigma: float = DEFAULT_MIN_SIGMA,
) -> FactorRenderingModel:
    """The M-step for Eq. 34's parameters (steps 2-3 of the module docstring;
    the factor-analyser counterpart of Eqs. 15/17), from responsibilities.

    Args:
        model: The old model (the ``z`` posterior uses its ``Lambda, Psi``;
            empty components keep theirs).
        x: ``(N, D)`` flat images.
        resp: ``(N, C, G)`` responsibilities, each row summing to 1 (0 for a
            padding row).
        min_sigma: Floor on ``sqrt(Psi_d)``.

    Returns:
        The model with the new parameters (not validated: jit-friendly).
    """
    total = jnp.sum(resp)
    counts, mu, scatter = _moments(x, resp)
    full = counts > 0
    mu_old, psi = model.flat_parameters()
    lam = model.loadings
    q = lam.shape[-1]
    lw, m = woodbury_terms(lam, psi)
    beta = jnp.linalg.solve(m, jnp.swapaxes(lw, -1, -2))  # M^-1 Lambda^T Psi^-1
    s_bt = jnp.einsum("cgde,cgqe->cgdq", scatter, beta)  # S beta^T
    ezz = (
        jnp.eye(q)
        - jnp.einsum("cgqd,cgdr->cgqr", beta, lam)
        + jnp.einsum("cgqd,cgdr->cgqr", beta, s_bt)
    )
    lam_new = jnp.swapaxes(
        jnp.linalg.solve(ezz, jnp.swapaxes(s_bt, -1, -2)), -1, -2
    )  # S beta^T E[zz^T]^-1 (E[zz^T] is symmetric)
    diag_s = jnp.diagonal(scatter, axis1=-2, axis2=-1)
    psi_new = jnp.maximum(
        diag_s - jnp.einsum("cgdq,cgdq->cgd", lam_new, s_bt), min_sigma**2
    )
    shape = model.templates.shape
    return replace(
        model,
        templates=jnp.where(full[..., None], mu, mu_old).reshape(shape),
        loadings=jnp.where(full[..., None, None], lam_new, lam),
        noise=jnp.where(full[..., None], psi_new, psi).reshape(shape),
        class_prior=resp.sum((0, 2)) / total,
        nuisance_prior=resp.sum((0, 1)) / total,
    )


def naive_fa_m_step(
    model: FactorRenderingModel,
    x: ArrayLike,
    resp: ArrayLike,
    min_sigma: float = DEFAULT_MIN_SIGMA,
) -> FactorRenderingModel:
    """Twin of :func:`fa_m_step` in float64 loops, in the per-image form of
    Ghahramani & Hinton (1996): ``E[z_n] = beta (I_n - mu)``, ``E[z_n z_n^T] =
    I - beta Lambda + E[z_n] E[z_n]^T``, ``Lambda' = (sum_n gamma_n (I_n - mu)
    E[z_n]^T)(sum_n gamma_n E[z_n z_n^T])^-1`` and ``Psi' = diag(sum_n gamma_n
    ((I_n - mu)(I_n - mu)^T - Lambda' E[z_n] (I_n - mu)^T)) / N_cg``."""
    x = np.asarray(x, np.float64)
    resp = np.asarray(resp, np.float64)
    n, c_, g_ = resp.shape
    shape = model.templates.shape
    mu = np.array(model.templates, np.float64).reshape(c_, g_, -1)
    psi = np.array(model.noise, np.float64).reshape(c_, g_, -1)
    lam = np.array(model.loadings, np.float64)
    q = lam.shape[-1]
    old_lam, old_psi = lam.copy(), psi.copy()
    for c in range(c_):
        for g in range(g_):
            w = resp[:, c, g]
            if w.sum() <= 0:
                continue
            m = (w[:, None] * x).sum(0) / w.sum()
            l_old, p_old = old_lam[c, g], old_psi[c, g]
            cov = l_old @ l_old.T + np.diag(p_old)
            beta = l_old.T @ np.linalg.inv(cov)
            sxz = np.zeros((x.shape[1], q))
            szz = np.zeros((q, q))
            ez = []
            for i in range(n):
                e = beta @ (x[i] - m)
                ez.append(e)
                sxz += w[i] * np.outer(x[i] - m, e)
                szz += w[i] * (np.eye(q) - beta @ l_old + np.outer(e, e))
            l_new = sxz @ np.linalg.inv(szz)
            diag = np.zeros(x.shape[1])
            for i in range(n):
                r = x[i] - m
                diag += w[i] * (r * r - (l_new @ ez[i]) * r)
            mu[c, g] = m
            lam[c, g] = l_new
            psi[c, g] = np.maximum(diag / w.sum(), min_sigma**2)
    total = resp.sum()
    return replace(
        model,
        templates=mu.reshape(shape),
        loadings=lam,
        noise=psi.reshape(shape),
        class_prior=resp.sum((0, 2)) / total,
        nuisance_prior=resp.sum((0, 1)) / total,
    )


def _e_step(model: FactorRenderingModel, x: Array, labels: Array, temperature: float):
    return e_step_table(_table(model, x), labels, temperature)


@partial(jax.jit, static_argnames=("temperature",))
def _e_step_jit(
    model: FactorRenderingModel,
    x: Array,
    labels: Array,
    temperature: float,
    valid: Array | None = None,
):
    resp, obj, ll = _e_step(model, x, labels, temperature)
    resp = where_valid(resp, valid)  # padding: no mass in any M-step sum
    info = FAInfo(valid_mean(obj, valid), valid_mean(ll, valid), resp.sum(0))
    return resp, info


_m_step_jit = jax.jit(fa_m_step, static_argnames=("min_sigma",))


def fa_em_step(
    state: FAState,
    x: Array,
    labels: Array,
    mode: Mode = "soft",
    min_sigma: float = DEFAULT_MIN_SIGMA,
    valid: Array | None = None,
) -> tuple[FAState, FAInfo]:
    """One EM iteration: the E-step (Eq. 14 or 16 over ``c, g``) then
    :func:`fa_m_step`, each a compiled program of its own.

    Compiled as one program, the step deadlocked XLA's CPU runtime (jaxlib
    0.10.1: every worker thread idle, the caller waiting for the result
    forever) on 2 of 3 runs of a 6735-image, 25-factor fit; as two programs it
    finished 13 of 13 runs.

    Args:
        state: Current :class:`FAState`.
        x: ``(N, D)`` flat float images.
        labels: ``(N,)`` ints, -1 for unlabelled.
        mode: "soft" or "hard".
        min_sigma: Floor on ``sqrt(Psi_d)``.
        valid: ``(N,)`` bool, false for padding rows (weight 0 everywhere), as
            :func:`~pgm_drm.sharding.shard_with_mask` returns it; ``None``:
            every row is real.

    Returns:
        The new state and an :class:`FAInfo` at the old parameters.
    """
    t = mode_temperature(mode)
    resp, info = _e_step_jit(state.model, x, labels, t, valid)
    new = _m_step_jit(state.model, x, resp, min_sigma=float(min_sigma))
    return FAState(new, state.iteration + 1), info


@partial(jax.jit, static_argnames=("mode",))
def _objectives(model, x, labels, mode, valid=None):
    _, obj, ll = _e_step(model, x, labels, mode_temperature(mode))
    return valid_mean(obj, valid), valid_mean(ll, valid)


def _initial_classes(x: np.ndarray, y: np.ndarray, n_classes: int, rng) -> np.ndarray:
    """Each image's starting class: its label, else its nearest labelled
    image's label, else (no labels at all) a k-means cluster."""
    lab = y >= 0
    if lab.any():
        xl = x[lab]
        d2 = (x**2).sum(1)[:, None] - 2 * x @ xl.T + (xl**2).sum(1)[None]
        return np.where(lab, y, y[lab][np.argmin(d2, axis=1)])
    return _kmeans_labels(x, n_classes, rng)


def _kmeans_labels(x: np.ndarray, k: int, rng) -> np.ndarray:
    """k-means cluster of each row; fewer rows than clusters: one row per
    cluster, the rest empty."""
    if len(x) <= k:
        return np.arange(len(x))
    return kmeans(x, k, rng).labels_


def _ppca_m_step(
    x: Array, resp: Array, q: int, min_sigma: float, image_shape: tuple[int, ...]
) -> FactorRenderingModel:
    """Closed-form probabilistic PCA per component (Tipping & Bishop 1999):
    ``Lambda = U_q (L_q - s^2)^(1/2)``, ``Psi = s^2`` = the mean of the other
    eigenvalues of the weighted scatter (floored); the initial M-step."""
    _, mu, scatter = _moments(x, resp)
    evals, evecs = jnp.linalg.eigh(scatter)  # ascending
    evals, evecs = evals[..., ::-1], evecs[..., ::-1]
    s2 = jnp.maximum(evals[..., q:].mean(-1), min_sigma**2)
    lam = (
        evecs[..., :q]
        * jnp.sqrt(jnp.maximum(evals[..., :q] - s2[..., None], 0.0))[..., None, :]
    )
    c, g, d = mu.shape
    shape = (c, g) + tuple(image_shape)
    total = jnp.sum(resp)
    return FactorRenderingModel(
        templates=mu.reshape(shape),
        loadings=lam,
        noise=jnp.broadcast_to(s2[..., None], (c, g, d)).reshape(shape),
        class_prior=resp.sum((0, 2)) / total,
        nuisance_prior=resp.sum((0, 1)) / total,
    )


def fa_em_init(
    images: ArrayLike,
    n_classes: int,
    n_nuisances: int = 1,
    n_factors: int = 10,
    *,
    labels: ArrayLike | None = None,
    key: PRNGKey | None = None,
    min_sigma: float = DEFAULT_MIN_SIGMA,
) -> FAState:
    """Initial :class:`FAState` (see the module docstring).

    Args:
        images: ``(N, *image_shape)``.
        n_classes, n_nuisances: ``C`` and ``G``; n_factors: ``q``, ``1 <= q < D``.
        labels: ``(N,)`` with -1 for unlabelled, or ``None``.
        key: PRNG key for the k-means starts (default ``PRNGKey(0)``).
        min_sigma: Floor on ``sqrt(Psi_d)``.
    """
    x, c_, g_ = check_fit_inputs(images, n_classes, n_nuisances)
    y = check_labels(labels, x.shape[0], c_)
    _check_every_class_labelled(y, c_)
    flat = x.reshape(x.shape[0], -1)
    return _init_state(flat, x.shape[1:], c_, g_, n_factors, y, key, min_sigma)


def _check_every_class_labelled(y: Array, n_classes: int) -> None:
    """Semi-supervised starts put each unlabelled image in its nearest labelled
    image's class: a class without a label would start (and in hard EM stay)
    empty."""
    yn = np.asarray(y)
    if (yn >= 0).any():
        missing = sorted(set(range(n_classes)) - set(yn[yn >= 0].tolist()))
        if missing:
            raise ValueError(
                f"classes {missing} have no labelled image; label at least one "
                "image of every class, or none (unsupervised)"
            )


def _check_factors(n_factors: int, d: int) -> int:
    if int(n_factors) != n_factors or not 1 <= int(n_factors) < d:
        raise ValueError(
            f"n_factors must be an integer in 1..{d - 1} (fewer than the {d} "
            f"pixels), got {n_factors}"
        )
    return int(n_factors)


def _init_state(x, image_shape, c_, g_, q, y, key, min_sigma) -> FAState:
    q = _check_factors(q, x.shape[1])
    rng = np_rng(key)
    xn, yn = np.asarray(x, np.float64), np.asarray(y)
    cls = _initial_classes(xn, yn, c_, rng)
    sub = np.zeros(len(xn), dtype=np.int64)
    if g_ > 1:
        for c in range(c_):
            idx = np.flatnonzero(cls == c)
            if len(idx):
                sub[idx] = _kmeans_labels(xn[idx], g_, rng)
    resp = np.zeros((len(xn), c_, g_))
    resp[np.arange(len(xn)), cls, sub] = 1.0
    empty = resp.sum(0) == 0  # start an empty component from all the images
    resp = resp + empty[None] * (1.0 / len(xn)) * 1e-3
    resp = resp / resp.sum((1, 2), keepdims=True)
    model = _ppca_m_step(x, jnp.asarray(resp, x.dtype), q, min_sigma, image_shape)
    return _state(jax.tree.map(lambda a: jnp.asarray(a, dtype=x.dtype), model))


def _state(model: FactorRenderingModel) -> FAState:
    """The state at iteration 0 (the loop's ``init``)."""
    return FAState(model, jnp.asarray(0, dtype=jnp.int32))


def fit_fa_em(
    images: ArrayLike,
    n_classes: int,
    n_nuisances: int = 1,
    n_factors: int = 10,
    *,
    mode: Mode = "soft",
    labels: ArrayLike | None = None,
    n_iter: int = 100,
    tol: float | None = 1e-6,
    key: PRNGKey | None = None,
    min_sigma: float = DEFAULT_MIN_SIGMA,
    loop: LoopOptions | None = None,
) -> FitResult:
    """Fit a :class:`FactorRenderingModel` (Eq. 34) by soft or hard EM.

    Unsupervised with ``labels=None``; supervised when every label is given;
    semi-supervised (§6.3.3) with -1 for unlabelled images, which marginalise
    (soft) or maximise (hard) over ``c``. On scikit-learn's digits with 100
    labels this is the project's best semi-supervised classifier (README).

    Args:
        images: ``(N, *image_shape)`` training images.
        n_classes: ``C``; n_nuisances: ``G`` sub-types per class;
            n_factors: ``q``, the dimension of the continuous nuisance.
        mode: "soft" (sum-product E-step, Eq. 14) or "hard" (max-sum, Eq. 16).
        labels: ``(N,)`` ints in ``0..C-1``, -1 for unlabelled; or ``None``.
        n_iter: Maximum number of iterations.
        tol: Stop when the mean per-image objective changes by less than
            ``tol`` nats; ``None`` runs all ``n_iter``.
        key: PRNG key for the k-means starts (default ``PRNGKey(0)``).
        min_sigma: Floor on each pixel's noise standard deviation.
        loop: Progress bar and checkpoints
            (:class:`~pgm_drm.learning.loop.LoopOptions`; every 10 iterations
            by default), as in :func:`~pgm_drm.learning.fit_em`.

    Returns:
        A :class:`~pgm_drm.learning.FitResult` whose ``model`` is a
        :class:`FactorRenderingModel`; ``objective`` never decreases (up to
        float32 rounding, ~1e-5 nats per image).

    Raises:
        ValueError: Bad images, sizes, ``n_factors``, labels (also: some but
            not all classes labelled, which the nearest-label start cannot
            seed), mode, loop arguments, or a checkpoint from a different fit
            or not consistent.

    Warns:
        UserWarning: A class ends with prior 0 (hard EM emptied it).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> truth = FactorRenderingModel(
        ...     jnp.stack([jnp.zeros((1, 4, 4)), jnp.ones((1, 4, 4))]),
        ...     0.3 * jax.random.normal(jax.random.PRNGKey(1), (2, 1, 16, 2)),
        ...     0.01 * jnp.ones((2, 1, 4, 4)))
        >>> images, _ = truth.sample(jax.random.PRNGKey(0), 60)
        >>> from pgm_drm.learning.loop import LoopOptions
        >>> quiet = LoopOptions(progress=False)
        >>> fit = fit_fa_em(images, 2, 1, 2, n_iter=10, loop=quiet)
        >>> fit.model.loadings.shape, bool(fit.objective[-1] >= fit.objective[0])
        ((2, 1, 16, 2), True)
    """
    mode_temperature(mode)
    x, c_, g_ = check_fit_inputs(images, n_classes, n_nuisances)
    image_shape = tuple(x.shape[1:])
    x = x.reshape(x.shape[0], -1)
    q = _check_factors(n_factors, x.shape[1])
    y = check_labels(labels, x.shape[0], c_)
    check_n_iter(n_iter)
    stop = tolerance(tol, "objective")
    check_min_sigma(min_sigma)
    _check_every_class_labelled(y, c_)
    start = _init_state(x, image_shape, c_, g_, q, y, key, float(min_sigma)).model
    meta = {
        "kind": "fa_em",
        "mode": mode,
        "n_classes": c_,
        "n_nuisances": g_,
        "n_factors": q,
        "min_sigma": float(min_sigma),
        "data": fingerprint(x, y),
    }
    # The images spread over every device (padded if need be; one device: as is).
    (x, y), valid = shard_with_mask((x, y))
    algorithm = Algorithm(
        init=lambda model: replicate(_state(model)),
        step=lambda st: fa_em_step(st, x, y, mode, float(min_sigma), valid),
    )
    out = run_loop(
        algorithm,
        start,
        n_iter,
        loop,
        history=("objective", "log_likelihood"),
        stop=stop,
        meta=meta,
        desc=f"FA-EM ({mode})",
        default_every=10,
    )
    state = out.state
    dead = np.flatnonzero(np.asarray(state.model.class_prior) == 0)
    if dead.size:
        warnings.warn(
            f"classes {dead.tolist()} ended with prior 0: hard EM assigned them "
            "no image (try mode='soft' or another key)",
            stacklevel=2,
        )
    obj_end, ll_end = _objectives(state.model, x, y, mode, valid)
    return FitResult(
        model=_finish(state.model),
        objective=np.asarray(out.history["objective"] + [float(obj_end)]),
        log_likelihood=np.asarray(out.history["log_likelihood"] + [float(ll_end)]),
        n_iter=int(state.iteration),
        converged=out.converged,
    )
