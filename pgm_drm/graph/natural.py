"""Observed-site log-prob tables in exponential-family natural form (Eq. 8).

The paper's Rendering Model scores an image against every latent configuration
``(c, g)`` through its *natural parameters* (Eq. 8, Gaussian case):

    w_cg = mu_cg / sigma^2,    b_cg = -||mu_cg||^2 / (2 sigma^2) + ln pi_c pi_g,

so that ``ln p(I | c, g) = <w_cg | I> + b_cg`` up to a term that depends on ``I``
only (Eq. 7): one inner product per configuration, i.e. one matrix product for a
table of configurations. This module applies the same rewrite to any supported
exponential family,

    ln p(x | z) = T(x) . eta(z) - A(eta(z)) + h(x),

with ``T`` the sufficient statistics, ``eta`` the natural parameters (``w_cg``
above), ``A`` the log-partition (``-b_cg`` less the prior) and ``h`` the base
measure. When the compiler enumerates latent sites, an observed site's parameters
carry leading latent dims (e.g. ``loc`` of shape ``(Kc, Kg, 1, 64)`` against an
image of shape ``(64,)``). ``fn.log_prob`` then builds the whole (states x pixels)
table elementwise; here ``eta`` and ``A`` are computed from the parameters alone
and the only data-dependent work is one contraction ``T_i(x) . eta_i`` over all
event dims per sufficient statistic, which under ``jax.vmap`` over images is a
single ``dot_general`` (GEMM) ``(B, P) x (P, K)`` (the Normal's ``x^2`` with a
state-free scale: a ``(B, P) x (P,)`` product).

Supported: ``Normal``, ``BernoulliProbs``/``BernoulliLogits``,
``CategoricalProbs``/``CategoricalLogits`` and ``Poisson``, wrapped in any nesting of
``Independent`` (``.to_event``) and ``ExpandedDistribution`` (``.expand``, plates).
Anything else (``MaskedDistribution`` included) gives ``None``: the caller then
uses ``fn.log_prob``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import gammaln, logsumexp
from numpyro.distributions.util import clamp_probs
from numpyro.util import not_jax_tracer

from pgm_drm._typing import Array, ArrayLike

__all__ = ["natural_log_prob", "natural_log_prob_parts"]

Shape = tuple[int, ...]
# Subscripts for the batch dims of a contraction; "z" is the contracted axis.
_LETTERS = string.ascii_letters.replace("z", "")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def natural_log_prob(
    fn: dist.Distribution, value: ArrayLike, sum_dims: Sequence[int] = ()
) -> Array | None:
    """``fn.log_prob(value)`` in natural form ``T(x) . eta - A(eta) + h(x)`` (Eq. 8).

    The sum over event dims of each ``T_i(x) * eta_i`` is one contraction
    (``jnp.einsum``, i.e. ``dot_general``) over all event dims at once (for
    ``Categorical``, over the event dims and the category axis); ``eta`` and ``A``
    are computed from ``fn``'s parameters without reference to ``value``, so under
    ``jax.vmap`` over ``value`` they stay unbatched and each contraction becomes a
    matrix product.

    Sites with no event dims (``event_shape == ()``) get the elementwise natural
    form ``T(x) * eta - A + h``: the same values and the same amount of work as
    ``fn.log_prob`` (there is nothing to contract, except the category axis of a
    ``Categorical``), returned rather than ``None`` so that callers need not tell
    the two cases apart. An event-free Normal is scored as ``fn.log_prob`` scores
    it, ``-((x - mu) / s)^2 / 2 - ln(sqrt(2 pi) s)``: its natural form would
    cancel large terms where the data sit near the mean and far from 0.

    With event dims, the Normal's ``x . mu / s^2`` and ``||mu||^2 / (2 s^2)``
    still cancel where the data sit near a state's mean: each table entry is
    rounded by about ``eps * sum |x mu| / s^2`` (float32: ``1.2e-7`` times that),
    the price of the matrix product. In float32 that bound is ``3e-5`` nats for
    8x8 images in ``[0, 1]`` with ``s = 0.5``, ``0.05`` for 64x64 ones with
    ``s = 0.1``, and ``0.5`` for 8x8 raw 0-255 intensities with ``s = 1``:
    centre and scale such data, or use float64 (``1e-16`` times the same sums).

    The result is the sum of :func:`natural_log_prob_parts`.

    Args:
        fn: The site's distribution: ``Normal``, ``BernoulliProbs``,
            ``BernoulliLogits``, ``CategoricalProbs``, ``CategoricalLogits`` or
            ``Poisson``, possibly inside any nesting of ``Independent`` and
            ``ExpandedDistribution``.
        value: The observed value, shape ``value_batch + fn.event_shape``.
        sum_dims: Negative batch dims of ``fn`` (plates whose instances share one
            scope, see ``pgm_drm.graph.compile.SiteInfo.summed``) to sum over
            as well. They join the event dims of the contraction, so the data of
            a whole plate (an image's pixels) enter through one matrix product;
            the result keeps them as size-1 dims.

    Returns:
        An array equal to ``fn.log_prob(value)`` (same shape: the broadcast of
        ``fn.batch_shape`` with the value's batch shape; summed over
        ``sum_dims``), or ``None`` when ``fn`` is not a supported family
        (``MaskedDistribution`` included).
    """
    parts = natural_log_prob_parts(fn, value, sum_dims)
    return None if parts is None else parts[0] + parts[1]


def natural_log_prob_parts(
    fn: dist.Distribution, value: ArrayLike, sum_dims: Sequence[int] = ()
) -> tuple[Array, Array] | None:
    """:func:`natural_log_prob` as ``(mean part, scale part)``, their sum.

    The Normal's scale part ``x^2 . eta_2 - sum (ln s + ln(2 pi) / 2)`` does not
    depend on the latent state when the scale does not (the RM's, the DRM's):
    the compiler then carries it into ``log Z`` apart from the table, whose
    entries keep the states' differences at any magnitude (a float64 image
    filled with ``1e30`` has ``|log p| ~ 1e63``, whose float64 spacing ``~1e48``
    would swallow differences of ``~1e32`` between states). For the other
    families the scale part is the support test (``0``, or ``-inf`` for a
    value outside the support), plus the Poisson's ``h(x) = -ln x!``: terms of
    the data alone. Same arguments as :func:`natural_log_prob`; ``None`` for an
    unsupported family.
    """
    leaf = _unwrap(fn)
    form = _FORMS.get(type(leaf))
    if form is None:
        return None
    if sum_dims:
        moved, value, keep = _move_to_event(fn, leaf, jnp.asarray(value), sum_dims)
        dep, free = natural_log_prob_parts(moved, value)
        return jnp.reshape(dep, keep), jnp.reshape(free, keep)
    value = jnp.asarray(value)
    event_shape = tuple(fn.event_shape)
    value_batch = _batch_shape(value.shape, len(event_shape))
    out_shape = lax.broadcast_shapes(tuple(fn.batch_shape), value_batch)
    out = form(leaf, value, event_shape)
    dep, free = out if isinstance(out, tuple) else (out, jnp.zeros((), out.dtype))
    dep = jnp.broadcast_to(dep, out_shape)
    free = jnp.broadcast_to(free, out_shape)
    if not isinstance(leaf, dist.Normal):
        # numpyro scores out-of-support values as -inf; the check reads the data
        # only (B x P work, not B x K x P). These families' supports do not move
        # with the parameters, so the test is a state-free term: it joins the
        # second part, and the first keeps no entry that reads the data except
        # through T(x) . eta (a switch's OFF states, eta = 0, stay free of it).
        ok = leaf.support(value)
        if event_shape:
            ok = jnp.all(ok, axis=tuple(range(ok.ndim - len(event_shape), ok.ndim)))
        free = jnp.where(ok, free, -jnp.inf)
    return dep, free


# --------------------------------------------------------------------------- #
# Shapes and the contraction
# --------------------------------------------------------------------------- #


def _unwrap(fn: dist.Distribution) -> dist.Distribution:
    """The distribution inside any nesting of ``Independent``/``ExpandedDistribution``.

    Both wrappers only move dims between batch and event or broadcast the batch,
    so the leaf's parameters broadcast (right-aligned) to
    ``fn.batch_shape + fn.event_shape``.
    """
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn


#: Each family's parameters; a Categorical's carry a trailing category axis.
_PARAMS: dict[type, tuple[str, ...]] = {
    dist.Normal: ("loc", "scale"),
    dist.BernoulliProbs: ("probs",),
    dist.BernoulliLogits: ("logits",),
    dist.CategoricalProbs: ("probs",),
    dist.CategoricalLogits: ("logits",),
    dist.Poisson: ("rate",),
}


def _move_to_event(
    fn: dist.Distribution, leaf: dist.Distribution, value: Array, sum_dims
) -> tuple[dist.Distribution, Array, Shape]:
    """``fn`` and ``value`` with the batch dims ``sum_dims`` moved to the event
    dims (leftmost of them), and the shape of the summed log-prob with those dims
    kept as 1: the same family, its parameters broadcast to the full shape and
    transposed (the event sum over them is then the plate sum)."""
    batch, event = tuple(fn.batch_shape), tuple(fn.event_shape)
    full = lax.broadcast_shapes(batch, _batch_shape(value.shape, len(event)))
    shape = full + event
    src = sorted({len(full) + d for d in sum_dims})
    dst = list(range(len(full) - len(src), len(full)))

    def move(x: Array, trail: Shape = ()) -> Array:
        x = jnp.broadcast_to(jnp.asarray(x), shape + trail)
        return jnp.moveaxis(x, src, dst) if src else x

    extra = 1 if isinstance(leaf, dist.CategoricalProbs | dist.CategoricalLogits) else 0
    params = {}
    for name in _PARAMS[type(leaf)]:
        p = getattr(leaf, name)
        params[name] = move(p, tuple(jnp.shape(p)[-1:]) if extra else ())
    moved = type(leaf)(**params).to_event(len(src) + len(event))
    keep = tuple(1 if a in src else size for a, size in enumerate(full))
    return moved, move(value), keep


def _batch_shape(shape: Sequence[int], n_event: int) -> Shape:
    """The leading dims of ``shape`` left of its last ``n_event`` (event) dims."""
    return tuple(shape[: max(len(shape) - n_event, 0)])


def _to_event(x: Array, event_shape: Shape) -> Array:
    """``x`` with its trailing dims broadcast to ``event_shape`` (batch dims kept)."""
    x = jnp.asarray(x)
    return jnp.broadcast_to(x, _batch_shape(x.shape, len(event_shape)) + event_shape)


def _event_sum(x: Array, event_shape: Shape) -> Array:
    """Sum of ``x`` (broadcast to ``event_shape``) over its event dims."""
    x = _to_event(x, event_shape)
    n = len(event_shape)
    return x.sum(axis=tuple(range(x.ndim - n, x.ndim))) if n else x


def _contract(t: Array, eta: Array, event_shape: Shape) -> Array:
    """``sum_event T * eta`` as ONE ``einsum`` over all event dims flattened.

    Leading (batch) dims broadcast as in ``T * eta``: a dim that is 1 on one side
    is dropped from that operand and becomes a free dim of the other; equal dims
    are shared. With ``T`` unbatched and ``eta`` carrying latent dims ``K``, this is
    a ``(P,) x (K, P)`` product, and ``jax.vmap`` over ``T`` turns it into a
    ``(B, P) x (P, K)`` GEMM. Computed at ``Precision.HIGHEST`` (no TF32/bf16
    passes on accelerators: the natural form subtracts large terms, see
    ``natural_log_prob``).
    """
    t, eta = _to_event(t, event_shape), _to_event(eta, event_shape)
    n = len(event_shape)
    if n == 0:
        return t * eta
    t_batch, eta_batch = t.shape[: t.ndim - n], eta.shape[: eta.ndim - n]
    out_shape = lax.broadcast_shapes(t_batch, eta_batch)
    rank = len(out_shape)
    t_batch = (1,) * (rank - len(t_batch)) + t_batch
    eta_batch = (1,) * (rank - len(eta_batch)) + eta_batch
    t_sub, eta_sub, out_sub = [], [], []
    # More than 51 batch dims (beyond any numpyro model) fails the strict zip.
    for letter, a, b in zip(_LETTERS[:rank], t_batch, eta_batch, strict=True):
        if a == b == 1:
            continue  # restored by the final reshape
        out_sub.append(letter)
        if a != 1:
            t_sub.append(letter)
        if b != 1:
            eta_sub.append(letter)
    size = math.prod(event_shape)
    t2 = t.reshape(tuple(a for a in t_batch if a != 1) + (size,))
    eta2 = eta.reshape(tuple(b for b in eta_batch if b != 1) + (size,))
    spec = f"{''.join(t_sub)}z,{''.join(eta_sub)}z->{''.join(out_sub)}"
    out = jnp.einsum(spec, t2, eta2, precision=lax.Precision.HIGHEST)
    return out.reshape(out_shape)


def _finite_part(eta: Array) -> tuple[Array, Array | None]:
    """``eta`` with ``-inf`` entries set to 0, and the 0/1 mask of those entries.

    A ``-inf`` natural parameter (probability 0) cannot go through a matrix product
    (``0 * -inf = nan``); instead ``T(x)`` is contracted with the mask too and a
    positive count means ``x`` hits a zero-probability entry (log-prob ``-inf``),
    which is ``xlogy``'s convention. The mask is ``None`` when ``eta`` is concrete
    and finite, so the common case costs one contraction.
    """
    forbidden = jnp.isneginf(eta)
    if not_jax_tracer(forbidden) and not bool(jnp.any(forbidden)):
        return eta, None
    return jnp.where(forbidden, 0.0, eta), forbidden.astype(eta.dtype)


def _contract_masked(t: Array, eta: Array, event_shape: Shape) -> Array:
    """``sum_event T * eta`` with ``-inf`` entries of ``eta`` handled as in ``xlogy``.

    The finite part and the ``-inf`` mask are stacked on a new leading axis of
    ``eta``, so both still go through ONE contraction.
    """
    eta = _to_event(eta, event_shape)
    eta_finite, forbidden = _finite_part(eta)
    if forbidden is None:
        return _contract(t, eta, event_shape)
    t = _to_event(t, event_shape)
    # Pad eta's batch dims to T's so the stacking axis does not meet a dim of T.
    pad = max(t.ndim - eta.ndim, 0)
    stacked = jnp.stack([eta_finite, forbidden]).reshape((2,) + (1,) * pad + eta.shape)
    dot, hits = _contract(t, stacked, event_shape)
    return jnp.where(hits > 0, -jnp.inf, dot)


# --------------------------------------------------------------------------- #
# Families: each returns log_prob with shape broadcast(param batch, value batch)
# --------------------------------------------------------------------------- #


def _float_dtype(*xs: ArrayLike) -> jnp.dtype:
    """The floating dtype ``fn.log_prob`` computes in (float64 under x64)."""
    return jnp.result_type(*xs, float)


def _normal(d: dist.Normal, value: Array, event_shape: Shape) -> tuple[Array, Array]:
    """Normal: ``T = (x, x^2)``, ``eta = (mu / s^2, -1 / (2 s^2))``,
    ``A = mu^2 / (2 s^2) + ln s + ln(2 pi) / 2``, ``h = 0``; returns the pair
    ``(mean part, scale part)`` (their sum is the log-prob; the other families
    return the log-prob itself).

    With ``s = sigma`` shared by all pixels, ``eta_1`` and the event sum of ``-A``
    are the paper's ``w_cg`` and ``b_cg`` less the prior (Eq. 8).

    The two statistics are contracted and summed apart, the mean's terms
    ``x . eta_1 - sum mu eta_1 / 2`` first and the scale's
    ``x^2 . eta_2 - sum (ln s + ln(2 pi) / 2)`` last. With a scale that does not
    depend on the latent state (the RM's), the scale's part is one number shared
    by every state, so its rounding is shared too: on an image filled with
    ``1e4`` (``|log p| ~ 1e12``) float32 tables still order the states as float64
    does and keep tied states tied, where one stacked contraction of ``(x, x^2)``
    per state gave each state its own ``~1e5`` rounding error. A state-dependent
    scale costs the same two contractions as one stacked one.
    """
    x = value.astype(_float_dtype(d.loc, d.scale, value))
    if not event_shape:
        return _normal_direct(d, x)
    precision = 1.0 / jnp.square(d.scale)
    eta1 = d.loc * precision
    eta2 = -0.5 * precision
    mean_part = _contract(x, eta1, event_shape) - _event_sum(
        0.5 * d.loc * eta1, event_shape
    )
    scale_part = _contract(jnp.square(x), eta2, event_shape) - _event_sum(
        jnp.log(d.scale) + _HALF_LOG_2PI, event_shape
    )
    return mean_part, scale_part


def _normal_direct(d: dist.Normal, x: Array) -> tuple[Array, Array]:
    """An event-free Normal site as ``fn.log_prob`` computes it: the mean part
    ``-((x - mu) / s)^2 / 2``, the scale part ``-ln(sqrt(2 pi) s)`` (numpyro's
    operations, so the sum equals its log-prob to the bit).

    With nothing to contract there is no matrix product to gain from the
    natural form, which would only cost precision: ``x mu / s^2`` and
    ``mu^2 / (2 s^2)`` cancel where the data sit near the mean and far from 0
    (x = 1000 +- 0.1, s = 0.1: terms of 5e7 whose float32 rounding, ~4 nats,
    swamped the states' differences and moved a posterior by 0.24). Here the
    error is relative to ``(x - mu)^2 / s^2`` itself.
    """
    z = (x - d.loc) / d.scale
    return -0.5 * z**2, -jnp.log(jnp.sqrt(2 * jnp.pi) * d.scale)


def _bernoulli(
    logits: Array, log1m_p: Array, value: Array, event_shape: Shape
) -> Array:
    """Bernoulli: ``T = x``, ``eta = logit p``, ``A = -ln(1 - p) = softplus(eta)``."""
    x = value.astype(_float_dtype(logits, value))
    return _contract(x, logits, event_shape) + _event_sum(log1m_p, event_shape)


def _bernoulli_probs(d: dist.BernoulliProbs, value: Array, event_shape: Shape) -> Array:
    """``BernoulliProbs``; probs are clamped to ``[tiny, 1 - eps]`` as numpyro does.

    So ``probs`` of exactly 0 or 1 give the same finite values as
    ``fn.log_prob`` (``ln tiny`` or ``ln eps``), never ``0 * -inf``.
    """
    p = clamp_probs(d.probs)
    log1m_p = jnp.log1p(-p)
    return _bernoulli(jnp.log(p) - log1m_p, log1m_p, value, event_shape)


def _bernoulli_logits(
    d: dist.BernoulliLogits, value: Array, event_shape: Shape
) -> Array:
    """``BernoulliLogits``: ``A = softplus(logits)`` (numpyro's stable form)."""
    return _bernoulli(d.logits, -_softplus(d.logits), value, event_shape)


def _softplus(x: Array) -> Array:
    """``log(1 + exp(x))`` as ``max(x, 0) + log1p(exp(-|x|))``: the values of
    ``jax.nn.softplus`` from plain primitives (its derivative is ``sigmoid(x)``
    here too, ``1/2`` at 0), where ``jax.nn.softplus`` is a ``custom_jvp`` call,
    which keeps the compiler from staging a model's evidence-free part
    (``FactorGraph``'s staged evaluator): the logits would be recomputed in
    every evidence program, unknown to ``gemm.dedupe_constant_gemms``."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _categorical(log_pmf: Array, value: Array, event_shape: Shape) -> Array:
    """Categorical: ``T = one_hot(x)``, ``eta = ln p`` (normalised), ``A = 0``.

    The category axis is contracted together with the event dims; zero
    probabilities (``eta = -inf``) are handled by :func:`_contract_masked`.
    """
    k = log_pmf.shape[-1]
    t = jax.nn.one_hot(value, k, dtype=_float_dtype(log_pmf))
    return _contract_masked(t, log_pmf, event_shape + (k,))


def _categorical_probs(
    d: dist.CategoricalProbs, value: Array, event_shape: Shape
) -> Array:
    return _categorical(d.logits, value, event_shape)


def _categorical_logits(
    d: dist.CategoricalLogits, value: Array, event_shape: Shape
) -> Array:
    log_pmf = d.logits - logsumexp(d.logits, axis=-1, keepdims=True)
    return _categorical(log_pmf, value, event_shape)


def _poisson(d: dist.Poisson, value: Array, event_shape: Shape) -> Array:
    """Poisson: ``T = x``, ``eta = ln rate``, ``A = rate``, ``h = -ln x!``;
    returns ``(T . eta - A, h)``, as the Normal returns its two parts.

    A rate of 0 (``eta = -inf``) gives 0 at ``x = 0`` and ``-inf`` above, as
    ``xlogy`` in ``fn.log_prob``.
    """
    ftype = _float_dtype(d.rate, value)
    rate = jnp.asarray(d.rate).astype(ftype)
    x = value.astype(ftype)
    dots = _contract_masked(x, jnp.log(rate), event_shape)
    h = _event_sum(-gammaln(x + 1.0), event_shape)
    return dots - _event_sum(rate, event_shape), h


_FORMS: dict[type, Callable[[dist.Distribution, Array, Shape], Any]] = {
    dist.Normal: _normal,
    dist.BernoulliProbs: _bernoulli_probs,
    dist.BernoulliLogits: _bernoulli_logits,
    dist.CategoricalProbs: _categorical_probs,
    dist.CategoricalLogits: _categorical_logits,
    dist.Poisson: _poisson,
}
