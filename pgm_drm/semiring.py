"""The semiring of every pass: the temperature reduction ``T * logsumexp(x / T)``.

The bottom layer of the package: it imports nothing of ours, and models, graph,
inference and learning all reduce through it. Paper §6.2.1 (soft inference):
``T = 1`` is sum-product, ``T -> 0`` is max-sum (``T = 0`` uses ``max`` exactly),
anything in between is the relaxation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array, Semiring

__all__ = [
    "MIN_TEMPERATURE",
    "reduce_t",
    "reduce_t_unrolled",
    "reduce_t_with",
    "resolve_temperature",
    "switch_reduce",
]


#: Smallest positive temperature: ``x / T`` must stay finite in float32 for log-
#: potentials up to ~1e8 (float32 overflows at 3.4e38). The limit T -> 0 is the
#: max semiring, T = 0 exactly.
MIN_TEMPERATURE = 1e-30


def resolve_temperature(semiring: Semiring, temperature: float | None) -> float:
    """Map ``semiring`` / ``temperature`` arguments to one temperature T >= 0."""
    if semiring not in ("max", "sum"):
        raise ValueError(f"semiring must be 'max' or 'sum', got {semiring!r}")
    if temperature is None:
        return 0.0 if semiring == "max" else 1.0
    t = float(temperature)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if 0.0 < t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature {t:g} is too small to divide by in float32 (below "
            f"{MIN_TEMPERATURE:g}); use temperature=0 (the max semiring) for the "
            "T -> 0 limit"
        )
    return t


def reduce_t(x: Array, axes: tuple[int, ...], temperature: float | Array) -> Array:
    """Semiring reduction ``T * logsumexp(x / T)`` over ``axes``; ``max`` at T=0.

    Paper §6.2.1 (soft inference): T=1 is sum-product, T->0 is max-sum. A Python
    ``temperature`` picks the branch statically; a traced one (one compiled
    program serving every T > 0) always takes the logsumexp branch.

    Off T in {0, 1} it is computed as ``m + T * log(sum(exp((x - m) * (1 / T))))``
    with ``m`` the max over ``axes``: the shift comes before the scaling, so
    ``x - m <= 0`` and no ``x / T`` can overflow, whatever the level of ``x``
    (the compiled kernel reduces tables at their own level) and down to
    ``MIN_TEMPERATURE``; ``(x / T)`` first turned a float32 entry of ``-1e10`` at
    ``T = 1e-29`` into ``-inf``. It is the same two passes as
    ``jax.nn.logsumexp``. ``1 / T`` is one division per call instead of one per
    entry, which on XLA's CPU backend halved the time of the compiled kernel's
    sum-product on the rendering model (10 x 16 x 2 states, 8x8 pixels).
    """
    if not axes:
        return x
    if not isinstance(temperature, jax.core.Tracer):
        temperature = float(temperature)  # Python, numpy or concrete JAX scalar
        if temperature == 0.0:
            return jnp.max(x, axis=axes)
        if temperature == 1.0:  # sum-product
            return _logsumexp(x, axes)
    # The shift carries no gradient (as in jax.nn.logsumexp); an all -inf row
    # (max -inf) is shifted by 0 and reduces to -inf.
    m = jax.lax.stop_gradient(jnp.max(x, axis=axes, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    total = jnp.sum(jnp.exp((x - m) * (1.0 / temperature)), axis=axes)
    return jnp.squeeze(m, axis=axes) + temperature * safe_log(total)


def reduce_t_with(
    x: Array, axes: tuple[int, ...], extra: Array, temperature: float | Array
) -> Array:
    """:func:`reduce_t` (paper §6.2.1: ``T * logsumexp(x / T)``, max at T=0)
    over ``x``'s entries along ``axes`` and one more entry, ``extra`` (the shape
    of the result): ``T * logaddexp(T * logsumexp(x / T) / T, extra / T)``
    taken in one pass, ``max`` at T=0.

    The same shift, ``exp`` and ``log`` as :func:`reduce_t`, with the max taken
    over ``extra`` too. Written as one reduction over ``x`` plus an elementwise
    term: joining two reductions elementwise made XLA's CPU backend recompute
    the first for each of its uses in the fused kernel, and a concatenated extra
    state broke the reduction's vector loop (both measured slower on the
    Rendering Model).
    """
    if not isinstance(temperature, jax.core.Tracer) and float(temperature) == 0.0:
        return jnp.maximum(jnp.max(x, axis=axes), extra)
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=axes), extra))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    inv = 1.0 / temperature
    mk = jnp.expand_dims(m, axes)
    total = jnp.sum(jnp.exp((x - mk) * inv), axis=axes) + jnp.exp((extra - m) * inv)
    return m + temperature * safe_log(total)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _logsumexp(x: Array, axes: tuple[int, ...]) -> Array:
    """``jax.nn.logsumexp`` (its forward program, the fastest here at T=1) with
    the derivative ``sum(softmax(x) * dx)`` taken as 0 on an all ``-inf`` row,
    where ``jax.nn.logsumexp``'s is ``0 * inf = NaN``."""
    return jax.nn.logsumexp(x, axis=axes)


@_logsumexp.defjvp
def _logsumexp_jvp(axes, primals, tangents):
    (x,), (dx,) = primals, tangents
    out = _logsumexp(x, axes)
    level = jnp.expand_dims(jnp.where(jnp.isfinite(out), out, 0.0), axes)
    p = jnp.exp(x - level)  # the softmax; 0 on an all -inf row
    return out, jnp.sum(jnp.where(p > 0, p * dx, 0.0), axis=axes)


@jax.custom_jvp
def safe_log(total: Array) -> Array:
    """``log(total)`` for a sum of ``exp`` terms, with a zero derivative where
    ``total`` is 0 (an all ``-inf`` row, whose log is ``-inf``): there ``d log /
    d total`` is ``inf`` and the row's cotangent 0, and ``0 * inf`` made the
    gradient NaN. The forward pass is a plain ``log``; elsewhere the derivative
    is ``1 / total``."""
    return jnp.log(total)


@safe_log.defjvp
def _safe_log_jvp(primals, tangents):
    (total,), (dt,) = primals, tangents
    pos = total > 0
    return jnp.log(total), jnp.where(pos, dt / jnp.where(pos, total, 1.0), 0.0)


def reduce_t_unrolled(
    x: Array, axes: tuple[int, ...], temperature: float | Array
) -> Array:
    """:func:`reduce_t` (paper §6.2.1: ``T * logsumexp(x / T)``, max at T=0)
    written as elementwise operations on the slices along ``axes``: for a few
    states (a factor-to-variable message of binary variables reduces over 2).
    The same numbers: the same max shift, ``exp`` and ``log``; XLA fuses them
    with their producers and consumers, where a reduction over 2 is its own
    kernel on the CPU (JAX 0.10's XLA hands it to YNNPACK, with its input
    written out first): on the 100x100 Ising grid's loopy sweep that halved the
    sum-product's time. Reductions over many states or inside the DCN pass
    were no faster or slower (measured), so only callers that reduce over a
    few states use it.
    """
    if not axes:
        return x
    axes = tuple(a % x.ndim for a in axes)
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    x = jnp.transpose(x, axes + rest)
    x = jnp.reshape(x, (-1,) + x.shape[len(axes) :])
    parts = [x[i] for i in range(x.shape[0])]
    m = parts[0]
    for p in parts[1:]:
        m = jnp.maximum(m, p)
    if not isinstance(temperature, jax.core.Tracer) and float(temperature) == 0.0:
        return m
    # As in reduce_t: the shift carries no gradient, an all -inf row reduces to -inf.
    m = jax.lax.stop_gradient(m)
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    inv = 1.0 / temperature
    total = jnp.exp((parts[0] - m) * inv)
    for p in parts[1:]:
        total = total + jnp.exp((p - m) * inv)
    return m + temperature * safe_log(total)


def switch_reduce(pooled: Array, p_on: float, t: float) -> Array:
    """Eq. 9: reduce a unit's message over its switch; the last state (OFF) stays
    OFF either way. ``pooled`` ``(..., K+1)`` -> ``(..., K+1)``; at ``t = 0`` this
    is ``max(x_s - x_OFF + log(p_on / p_off), 0) + const``, the ReLU."""
    log_on, log_off = jnp.log(p_on), jnp.log1p(-p_on)
    off = pooled[..., -1:]
    on = reduce_t(
        jnp.stack([log_on + pooled, log_off + jnp.broadcast_to(off, pooled.shape)]),
        (0,),
        t,
    )
    both = reduce_t(jnp.stack([log_on + off, log_off + off]), (0,), t)
    return jnp.concatenate([on[..., :-1], both], axis=-1)
