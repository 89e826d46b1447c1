"""Shared pieces of the RM learners: results, EM modes, input checks, the starting
model and k-means++ initialisation (paper §2.6.1).

Learners work on the model pytrees themselves (:class:`RenderingModel`,
:class:`FactorRenderingModel`): a step takes the model as an ordinary ``jit``
argument and returns new values with :func:`pgm_drm.models.pytree.replace`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._random import np_rng
from pgm_drm._typing import Array, ArrayLike, PRNGKey
from pgm_drm.models.factor import FactorRenderingModel
from pgm_drm.models.rendering import RenderingModel

__all__ = [
    "FitResult",
    "Mode",
    "check_fit_inputs",
    "check_labels",
    "check_min_sigma",
    "finish_model",
    "init_params",
    "initial_model",
    "mode_temperature",
    "real_finite",
]

#: An EM mode: "soft" (sum-product E-step, Eq. 14) or "hard" (max-sum, Eq. 16).
Mode = Literal["soft", "hard"]

#: The parameters an RM learner may hold fixed (``fix=``).
PARAMETER_NAMES = (
    "class_prior",
    "nuisance_prior",
    "sigma",
    "switch_prior",
    "templates",
)


class FitResult(NamedTuple):
    """What a fit returns.

    Attributes:
        model: The fitted :class:`RenderingModel` (a
            :class:`~pgm_drm.models.FactorRenderingModel` from
            :func:`~pgm_drm.learning.fit_fa_em`).
        objective: ``(n_iter + 1,)`` the objective per image at the parameters
            after ``0, 1, ..., n_iter`` iterations. Soft EM and SVI: the
            observed-data log-likelihood ``mean_n log p(I_n[, c_n])`` (labels
            included where given); hard EM: ``mean_n max_{c,g,a} log p(c,g,a,I_n)``.
            With ``unlabelled_weight`` (EM-lambda) the mean is weighted by
            ``w_n`` (1 labelled, lambda unlabelled).
        log_likelihood: ``(n_iter + 1,)`` ``mean_n log p(I_n)`` (labels ignored)
            at the same parameters.
        n_iter: Iterations (EM) or optimisation steps (SVI) run in total.
        converged: Whether the objective changed by less than ``tol`` (EM);
            always ``False`` for SVI, which runs a fixed number of steps.
    """

    model: RenderingModel | FactorRenderingModel
    objective: np.ndarray
    log_likelihood: np.ndarray
    n_iter: int
    converged: bool


def mode_temperature(mode: str) -> float:
    """The E-step temperature of an EM ``mode``: 1 for "soft" (sum-product
    responsibilities, Eq. 14), 0 for "hard" (max-sum, Eq. 16).

    Raises:
        ValueError: Any other mode.
    """
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
    return 1.0 if mode == "soft" else 0.0


def finish_model(model: RenderingModel) -> RenderingModel:
    """The validated :class:`RenderingModel` a learner returns from the model of
    its last step (whose leaves are arrays, never checked inside ``jit``).

    Priors are renormalised to absorb float rounding of the M-step sums, the
    switch prior is clipped to ``[0, 1]``, and ``sigma`` and ``switch_prior``
    become Python floats as in a model built by hand.
    """
    pc = np.asarray(model.class_prior, dtype=float)
    pg = np.asarray(model.nuisance_prior, dtype=float)
    return RenderingModel(
        templates=model.templates,
        sigma=float(model.sigma),
        class_prior=pc / pc.sum(),
        nuisance_prior=pg / pg.sum(),
        switch_prior=None
        if model.switch_prior is None
        else float(np.clip(float(model.switch_prior), 0.0, 1.0)),
    )


def check_fit_inputs(
    images: ArrayLike, n_classes: int, n_nuisances: int
) -> tuple[Array, int, int]:
    """Validate a training set and the mixture sizes.

    Args:
        images: ``(N, *image_shape)`` with ``N >= 1`` and at least one pixel axis.

    Returns:
        The images as a float array, ``n_classes`` and ``n_nuisances`` as ints.

    Raises:
        ValueError: Wrong rank, no images, non-finite values, ``n_classes < 1``
            or ``n_nuisances < 1``.
    """
    x = jnp.asarray(images)
    if x.ndim < 2:
        raise ValueError(
            f"images must have shape (N, *image_shape) with at least one pixel "
            f"axis, got shape {x.shape}"
        )
    if x.shape[0] < 1:
        raise ValueError("images is empty (N = 0)")
    x = real_finite(x)
    for name, v in (("n_classes", n_classes), ("n_nuisances", n_nuisances)):
        if int(v) != v or int(v) < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v}")
    return x, int(n_classes), int(n_nuisances)


def real_finite(x: Array) -> Array:
    """Images as the default float dtype; rejects complex, non-numeric, NaN, inf."""
    if not jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(
        x.dtype, jnp.complexfloating
    ):
        raise ValueError(f"images must be real numbers, got dtype {x.dtype}")
    x = x.astype(jnp.result_type(float))
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("images contain NaN or inf values")
    return x


def check_min_sigma(min_sigma: float) -> None:
    """Raise ValueError unless the noise floor ``min_sigma`` is a finite number > 0."""
    if not (np.isfinite(min_sigma) and min_sigma > 0):
        raise ValueError(f"min_sigma must be a finite number > 0, got {min_sigma}")


def check_labels(labels: ArrayLike | None, n_images: int, n_classes: int) -> Array:
    """Labels for (semi-)supervised fits: ``c_n`` in ``0..C-1``, or -1 if unknown.

    Returns:
        An int array of shape ``(N,)`` (all -1 when ``labels is None``).
    """
    if labels is None:
        return jnp.full((n_images,), -1, dtype=jnp.int32)
    y = np.asarray(labels)
    if y.shape != (n_images,):
        raise ValueError(f"labels must have shape ({n_images},), got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("labels must be integers (-1 for unlabelled)")
    y = y.astype(np.int64)
    bad = (y < -1) | (y >= n_classes)
    if np.any(bad):
        raise ValueError(
            f"labels must be in 0..{n_classes - 1} or -1 (unlabelled); got "
            f"{sorted(set(y[bad].tolist()))[:5]}"
        )
    return jnp.asarray(y, dtype=jnp.int32)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, max_iter: int = 300):
    """scikit-learn's k-means (greedy k-means++ seeding, one start, at most
    ``max_iter`` Lloyd steps) on the rows of ``x``, fitted and returned.

    One thread: scikit-learn's k-means sums in per-thread chunks, so its result
    (and the fit that starts from it) would otherwise depend on the machine's
    cores. A ``ConvergenceWarning`` (fewer distinct rows than ``k``: repeated
    centres) is silenced; the EM fits that start from it re-seed or drop
    unused components.
    """
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(
            n_clusters=k,
            n_init=1,
            max_iter=max_iter,
            random_state=int(rng.integers(2**31 - 1)),
        ).fit(x)


def _kmeanspp(
    x: np.ndarray, pool: np.ndarray, k: int, chosen: list[int], rng
) -> list[int]:
    """``k`` more picks from ``pool`` by greedy k-means++ D^2 weighting.

    Distances are to the rows of ``x`` listed in ``chosen`` (earlier picks and
    fixed anchors such as the OFF image). Greedy as in scikit-learn: each pick
    draws ``2 + log(k)`` D^2-weighted candidates and keeps the one that lowers
    the total squared distance of ``pool`` most (far fewer doubled-up clusters
    than plain k-means++).
    """
    picks: list[int] = []
    trials = 2 + int(np.log(max(k, 1)))
    for _ in range(k):
        cand = np.setdiff1d(pool, chosen + picks)
        if cand.size == 0:  # fewer images than templates: repeat some
            cand = pool
        centres = chosen + picks
        if not centres:
            picks.append(int(rng.choice(cand)))
            continue
        d2 = np.min(
            np.sum((x[pool, None, :] - x[None, centres, :]) ** 2, axis=-1), axis=1
        )
        w = d2[np.searchsorted(pool, cand)]
        p = w / w.sum() if w.sum() > 0 else None
        tries = rng.choice(cand, size=min(trials, cand.size), replace=False, p=p)
        new_d2 = np.sum((x[pool, None, :] - x[None, tries, :]) ** 2, axis=-1)
        cost = np.minimum(d2[:, None], new_d2).sum(0)
        picks.append(int(tries[np.argmin(cost)]))
    return picks


def _seed_templates(x, n_classes, n_nuisances, rng, switch, y) -> np.ndarray:
    """One (greedy) k-means++ seeding: templates ``(C, G, D)`` picked from ``x``."""
    n, d = x.shape
    # Row n is the OFF image (zeros), an anchor for the D^2 weights when switched.
    xz = np.vstack([x, np.zeros((1, d))])
    anchors = [n] if switch else []
    everyone = np.arange(n)
    picks: list[int] = []
    order = []  # (c, g) of each pick
    if np.any(y >= 0):
        for c in range(n_classes):
            own = everyone[y == c]
            done = anchors + picks
            mine = _kmeanspp(xz, own, min(n_nuisances, len(own)), done, rng)
            mine += _kmeanspp(xz, everyone, n_nuisances - len(mine), done + mine, rng)
            picks += mine
            order += [(c, g) for g in range(n_nuisances)]
    else:
        picks = _kmeanspp(xz, everyone, n_classes * n_nuisances, anchors, rng)
        order = [(c, g) for c in range(n_classes) for g in range(n_nuisances)]
    mu = np.zeros((n_classes, n_nuisances, d))
    for idx, (c, g) in zip(picks, order, strict=True):
        mu[c, g] = x[idx]
    return mu


def init_params(
    images: Array,
    n_classes: int,
    n_nuisances: int,
    key: PRNGKey,
    *,
    switch: bool = False,
    labels: Array | None = None,
    switch_prior: float = 0.9,
    n_seedings: int = 8,
) -> RenderingModel:
    """k-means++ initialisation: templates are data images picked with D^2 weights.

    The best (lowest total squared distance of the images to their nearest
    template) of ``n_seedings`` greedy k-means++ seedings is kept: one seeding
    alone often puts two templates in one cluster, a local optimum EM keeps.

    The ``C * G`` templates are distinct images chosen by k-means++ seeding. With
    labels, the ``G`` templates of class ``c`` are first drawn from the images
    labelled ``c`` (so the class identity of a template is anchored by data), and
    only if those run out from all images. ``sigma`` is the RMS distance of an
    image to its nearest template (the data's pixel std if that is 0); priors
    start uniform and the switch prior at ``switch_prior``. With the switch, the
    all-zero OFF image counts as an already chosen centre, so images that look
    OFF are unlikely picks (a template spent on them is a poor local optimum
    that EM cannot leave: it models OFF with a template and drives
    ``pi_a -> 1``).

    Args:
        images: ``(N, *image_shape)``.
        labels: ``(N,)`` with -1 for unlabelled, or ``None``.

    Returns:
        A :class:`RenderingModel` with templates of shape ``(C, G, *image_shape)``.
    """
    x = np.asarray(images, dtype=float).reshape(images.shape[0], -1)
    n, d = x.shape
    rng = np_rng(key)
    y = np.full(n, -1) if labels is None else np.asarray(labels)
    best = None
    for _ in range(int(n_seedings)):
        mu = _seed_templates(x, n_classes, n_nuisances, rng, switch, y)
        d2 = np.min(
            np.sum((x[:, None, :] - mu.reshape(-1, d)[None]) ** 2, axis=-1), axis=1
        )
        if switch:  # the OFF image is a centre too
            d2 = np.minimum(d2, np.sum(x**2, axis=-1))
        if best is None or d2.sum() < best[1].sum():
            best = (mu, d2)
    mu, d2 = best
    sigma = float(np.sqrt(d2.mean() / d))
    if not sigma > 0:
        sigma = float(x.std()) or 1.0
    return RenderingModel(
        templates=jnp.asarray(mu.reshape(n_classes, n_nuisances, *images.shape[1:])),
        sigma=sigma,
        switch_prior=float(switch_prior) if switch else None,
    )


def initial_model(
    x: Array,
    n_classes: int,
    n_nuisances: int,
    key: PRNGKey | None,
    switch: bool | None,
    labels: Array,
    init: RenderingModel | None,
) -> RenderingModel:
    """The RM a fit starts from: ``init`` (checked against the data) or the
    k-means++ picks of :func:`init_params`, every leaf cast to the images' dtype
    (so that each step of the fit sees the same shapes and dtypes).

    Args:
        x: ``(N, *image_shape)`` checked images (:func:`check_fit_inputs`).
        n_classes, n_nuisances: ``C`` and ``G``.
        key: PRNG key for the k-means++ picks (default ``PRNGKey(0)``).
        switch: Fit the ON/OFF switch; default: as ``init``, else ``False``.
        labels: ``(N,)`` checked labels, -1 for unlabelled (:func:`check_labels`).
        init: A :class:`RenderingModel` to start from, or ``None``.

    Raises:
        ValueError: ``init`` is not an RM, or its sizes, image shape or switch
            do not match.
    """
    if init is not None:
        if not isinstance(init, RenderingModel):
            raise ValueError(f"init must be a RenderingModel, got {type(init)}")
        if (init.n_classes, init.n_nuisances) != (n_classes, n_nuisances):
            raise ValueError(
                f"init has (C, G) = ({init.n_classes}, {init.n_nuisances}), "
                f"expected ({n_classes}, {n_nuisances})"
            )
        if init.image_shape != tuple(x.shape[1:]):
            raise ValueError(
                f"init renders images of shape {init.image_shape}, the data has "
                f"shape {tuple(x.shape[1:])}"
            )
        has = init.switch_prior is not None
        if switch is not None and bool(switch) != has:
            raise ValueError(f"switch={switch} but init has switch_prior={has}")
        model = init
    else:
        k = jax.random.PRNGKey(0) if key is None else key
        model = init_params(
            x, n_classes, n_nuisances, k, switch=bool(switch), labels=labels
        )
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=x.dtype), model)
