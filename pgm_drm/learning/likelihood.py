"""The RM's log-joint table over ``(c, g, a)`` and exact log-likelihoods.

The E-step of EM (paper Eq. 14 / Eq. 16) and the held-out log-likelihood both
start from the table ``log p(c, g, a, I_n)`` of shape ``(N, C, G[, 2])``. The
fast routine builds it from the natural parameters of Eq. 8 with one matrix
product; :func:`naive_log_joint_table` is its twin, scoring every configuration
with a NumPyro ``Normal`` log-density.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from pgm_drm._typing import Array, ArrayLike, Semiring
from pgm_drm.models.rendering import RenderingModel
from pgm_drm.models.validation import check_images
from pgm_drm.semiring import reduce_t, resolve_temperature

__all__ = [
    "clamp_labels",
    "log_joint_table",
    "log_likelihood",
    "naive_log_joint_table",
    "responsibilities",
    "rm_log_joint",
]


def rm_log_joint(model: RenderingModel, images: Array) -> Array:
    """``log p(c, g, a, I_n)`` from the natural parameters (Eq. 8), jit-friendly.

    ``log p(c, g, a=1, I) = <w_cg | I> + b_cg + k(I)`` and
    ``log p(c, g, a=0, I) = ln pi_c + ln pi_g + ln(1 - pi_a) + k(I)``, with
    ``w_cg = mu_cg / sigma^2``, ``b_cg = -||mu_cg||^2 / 2 sigma^2 + ln pi_c +
    ln pi_g (+ ln pi_a)`` and ``k(I) = -||I||^2 / 2 sigma^2 - D/2 ln(2 pi sigma^2)``.

    Args:
        model: A :class:`RenderingModel`, possibly with traced leaves (no
            validation: used inside jitted EM steps).
        images: ``(N, *image_shape)``.

    Returns:
        Array of shape ``(N, C, G)``, or ``(N, C, G, 2)`` with the switch
        (last axis: ``a = 0`` OFF, ``a = 1`` ON).
    """
    mu = model.templates
    c, g = mu.shape[:2]
    n = images.shape[0]
    x = images.reshape(n, -1)
    m = mu.reshape(c, g, -1)
    d = x.shape[1]
    s2 = model.sigma**2
    log_pc = jnp.log(model.class_prior)[:, None]
    log_pg = jnp.log(model.nuisance_prior)[None, :]
    w = m / s2
    b = -jnp.sum(m**2, axis=-1) / (2 * s2) + log_pc + log_pg
    k = -jnp.sum(x**2, axis=-1) / (2 * s2) - 0.5 * d * jnp.log(2 * jnp.pi * s2)
    on = jnp.einsum("nd,cgd->ncg", x, w) + b + k[:, None, None]
    if model.switch_prior is None:
        return on
    pa = model.switch_prior
    off = (log_pc + log_pg)[None] + k[:, None, None] + jnp.log1p(-pa)
    return jnp.stack([off, on + jnp.log(pa)], axis=-1)


def naive_log_joint_table(model: RenderingModel, images: ArrayLike) -> Array:
    """Twin of :func:`log_joint_table`: a ``Normal`` log-density per configuration.

    Broadcasts ``dist.Normal(a * mu_cg, sigma).log_prob(I_n)`` over every
    ``(n, c, g, a)`` and adds the log-priors; no natural parameters, no einsum.

    Returns:
        Array of shape ``(N, C, G)`` or ``(N, C, G, 2)``.
    """
    x, _ = check_images(images, model.image_shape)
    nd = len(model.image_shape)
    mu = jnp.asarray(model.templates)[None]  # (1, C, G, *S)
    xi = x[:, None, None]  # (N, 1, 1, *S)
    prior = jnp.log(model.class_prior)[:, None] + jnp.log(model.nuisance_prior)[None, :]

    def lp(mean):
        return dist.Normal(mean, model.sigma).to_event(nd).log_prob(xi)

    if model.switch_prior is None:
        return lp(mu) + prior
    off = lp(0.0 * mu) + prior + jnp.log1p(-model.switch_prior)
    on = lp(mu) + prior + jnp.log(model.switch_prior)
    return jnp.stack([off, on], axis=-1)


#: :func:`rm_log_joint` compiled once per structure (shapes, dtypes, switch): the
#: model is a traced argument, so new parameter values reuse the program.
_table_jit = jax.jit(rm_log_joint)


def log_joint_table(model: RenderingModel, images: ArrayLike) -> Array:
    """``log p(c, g, a, I_n)`` for a batch of images (jitted; Eqs. 3-4, 8-9).

    Args:
        model: A :class:`RenderingModel`.
        images: ``(N, *image_shape)`` (or one image).

    Returns:
        Array of shape ``(N, C, G)``, or ``(N, C, G, 2)`` for a switched RM
        (last axis ``a = 0, 1``).

    Example:
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> rm = RenderingModel(default_templates(), sigma=0.5, switch_prior=0.9)
        >>> log_joint_table(rm, default_templates()[0]).shape
        (4, 3, 4, 2)
    """
    x, _ = check_images(images, model.image_shape)
    return _table_jit(model, x)


def clamp_labels(table: Array, labels: Array) -> Array:
    """Clamp ``c`` to the known labels: ``-inf`` where ``c != c_n`` (§6.3.3).

    Args:
        table: ``(N, C, G[, 2])`` log-joint table.
        labels: ``(N,)`` ints, -1 for unlabelled (left untouched).
    """
    c = jnp.arange(table.shape[1])
    keep = (labels[:, None] < 0) | (labels[:, None] == c[None, :])
    keep = keep.reshape(keep.shape + (1,) * (table.ndim - 2))
    return jnp.where(keep, table, -jnp.inf)


def log_likelihood(model: RenderingModel, images: ArrayLike) -> Array:
    """Exact per-image ``log p(I_n) = logsumexp_{c,g,a} log p(c, g, a, I_n)``.

    Args:
        model: A :class:`RenderingModel`.
        images: ``(N, *image_shape)`` (or one image).

    Returns:
        Array of shape ``(N,)``.

    Example:
        >>> import jax
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> rm = RenderingModel(default_templates(), sigma=0.5)
        >>> images, _ = rm.sample(jax.random.PRNGKey(0), 3)
        >>> log_likelihood(rm, images).shape
        (3,)
    """
    t = log_joint_table(model, images)
    return jax.nn.logsumexp(t.reshape(t.shape[0], -1), axis=-1)


def responsibilities(
    model: RenderingModel,
    images: ArrayLike,
    semiring: Semiring = "sum",
    labels: ArrayLike | None = None,
) -> Array:
    """E-step responsibilities over ``(c, g, a)``: Eq. 14 (sum) or Eq. 16 (max).

    ``sum``: ``gamma_ncga = p(c, g, a | I_n)`` (sum-product normalisation).
    ``max``: ``gamma_ncga = [(c, g, a) = argmax log p(c, g, a, I_n)]`` (max-sum;
    ties go to the first configuration in C-order).

    Args:
        labels: ``(N,)`` with -1 for unlabelled; labelled images clamp ``c``.

    Returns:
        Array of shape ``(N, C, G[, 2])`` summing to 1 over all but the first axis.
    """
    t = log_joint_table(model, images)
    if labels is not None:
        t = clamp_labels(t, jnp.asarray(labels))
    return _normalise(t, resolve_temperature(semiring, None))


def e_step_table(
    table: Array, labels: Array, temperature: float
) -> tuple[Array, Array, Array]:
    """The E-step every EM here shares, from a log-joint table ``(N, C, ...)``.

    Returns:
        Responsibilities (labels clamped, Eq. 14 at temperature 1, Eq. 16 at 0),
        the per-image objective ``log p(I_n[, c_n])`` or ``max log p(., I_n[, c_n])``
        and the per-image ``log p(I_n)`` (labels ignored).
    """
    n = table.shape[0]
    ll = jax.nn.logsumexp(table.reshape(n, -1), axis=-1)
    clamped = clamp_labels(table, labels)
    obj = reduce_t(clamped.reshape(n, -1), (1,), temperature)
    return _normalise(clamped, temperature), obj, ll


def _normalise(table: Array, temperature: float) -> Array:
    """Responsibilities from a log-joint table at temperature 1 (soft) or 0 (hard)."""
    n = table.shape[0]
    flat = table.reshape(n, -1)
    if temperature == 0.0:
        hot = jax.nn.one_hot(jnp.argmax(flat, axis=-1), flat.shape[1], dtype=flat.dtype)
        return hot.reshape(table.shape)
    z = reduce_t(flat, (1,), temperature)
    return jnp.exp(flat - z[:, None]).reshape(table.shape)
