"""Equality keys: which entries of a program's outputs are equal for *every* input.

A compiled graph's evidence tables are computed by a traced program from the
evidence (:meth:`pgm_drm.graph.FactorGraph.evidence_blocks`). Many of their entries
are equal whatever the evidence: a DRM's leaf table over ``(c, g3, g2, a2, g1, a1)``
depends on those 768 states only through the level-1 unit's state and ``g1``
(Eq. 8: ``T(x) . eta(z) - A(z)``, and ``eta`` repeats), about 20 distinct values
per patch. :func:`equality_keys` finds such equalities *statically*, by reading
the program: each output gets an integer array of its shape, and two entries with
the same key are equal for every value of the inputs (the converse need not hold:
distinct keys may happen to hold equal values).

The reading is an abstract interpretation of the jaxpr, sound by construction:

- an input's entries all get distinct keys; a constant's entries are keyed by
  their exact bytes (a constant-only equation is evaluated);
- an elementwise equation keys each entry by the tuple of its operands' keys
  there (same operands in, same result out);
- data movement (reshape, transpose, broadcast, slice, concatenate, ...) moves
  the keys as it moves the data;
- a reduction keys each result by the sequence of keys it reduces;
- ``dot_general`` keys each result by the two key sequences it contracts (a
  constant's by their exact bytes: ``-0.0`` is not ``0.0``, whose products may
  differ in the sign of a zero, which ``1 / x`` tells apart);
- any other equation, or one whose keys would pass :data:`MAX_KEYS` entries, gives
  every entry of its result a distinct key (nothing is claimed).

Pure numpy after the trace: nothing is run on the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax._src import core
from jax.extend.core import Literal

from pgm_drm.graph.gemm import call_body
from pgm_drm.graph.slices import _np_broadcast_in_dim, _np_reshape, _np_slice

__all__ = ["MAX_EQNS", "MAX_KEYS", "equality_keys", "input_dependence", "value_keys"]

#: Programs with more equations than this (calls included) are not read: keys
#: matter for junction-tree models, whose evidence programs are short.
MAX_EQNS = 4000
#: No key array (nor a reduction's or product's key rows) past this many entries.
MAX_KEYS = 1 << 24

_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 cbrt ceil clamp conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp
    exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma log log1p logistic
    lt max min mul ne neg nextafter not or pow real reduce_precision rem round
    rsqrt select_n sign sin sinh sqrt square sub tan tanh xor""".split()
)
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
    "reduce_xor argmax argmin".split()
)
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


class _Keys:
    """A traced value's entry keys (equal key => equal entry, for every input)."""

    __slots__ = ("k",)

    def __init__(self, k: np.ndarray):
        self.k = k


def _compress(k: np.ndarray) -> np.ndarray:
    """``k`` renumbered ``0 .. n_distinct - 1`` (same shape)."""
    if k.size == 0:
        return k.astype(np.int64)
    _, inv = np.unique(k.reshape(-1), return_inverse=True)
    return inv.reshape(k.shape).astype(np.int64)


def value_keys(a: np.ndarray) -> np.ndarray:
    """A concrete array's equality keys: its entries keyed by their exact bytes
    (``-0.0`` apart from ``0.0``: ``1 / x`` tells them apart)."""
    a = np.asarray(a)
    flat = np.ascontiguousarray(a).reshape(-1)
    size = flat.dtype.itemsize
    if size in (1, 2, 4, 8):
        view = flat.view(np.dtype(f"u{size}"))
    else:
        view = _rows(flat.view(np.uint8).reshape(flat.size, size))
    return _compress(view).reshape(a.shape)


def _rows(m: np.ndarray) -> np.ndarray:
    """Each row of the 2-D array ``m`` keyed by its bytes (one opaque item per
    row: a sort of ``n`` items, where ``np.unique(axis=0)`` sorted columns)."""
    n, w = m.shape
    if w == 0 or n == 0:
        return np.zeros(n, np.int64)
    m = np.ascontiguousarray(m)
    rows = m.view(np.dtype((np.void, m.dtype.itemsize * w))).reshape(n)
    _, inv = np.unique(rows, return_inverse=True)
    return inv.reshape(n).astype(np.int64)


def _joint(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Each entry keyed by the tuple of ``parts``' keys there (broadcast)."""
    acc = np.zeros(shape, np.int64)
    for p in parts:
        p = _compress(np.broadcast_to(p, shape))
        acc = _compress(acc * (int(p.max(initial=0)) + 1) + p)
    return acc


def _distinct(aval) -> _Keys:
    return _Keys(np.arange(math.prod(aval.shape), dtype=np.int64).reshape(aval.shape))


def _as_keys(x) -> np.ndarray:
    return x.k if isinstance(x, _Keys) else value_keys(np.asarray(x))


def _row_operand(x) -> np.ndarray:
    """A product's operand as rows to compare: keys, or a constant's values by
    their exact bytes (``-0.0`` apart from ``0.0``: a product with one may
    differ in the sign of a zero, which ``1 / x`` tells apart)."""
    return x.k if isinstance(x, _Keys) else np.asarray(x)


def _contracted_rows(params: dict, lhs: np.ndarray, rhs: np.ndarray):
    """``dot_general``'s operands laid out as ``(batch, free, contracted)``:
    the rows each result entry reads."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    out = []
    for x, c, b in ((lhs, lc, lb), (rhs, rc, rb)):
        f = [d for d in range(x.ndim) if d not in c and d not in b]
        nb = math.prod(x.shape[d] for d in b)
        nf = math.prod(x.shape[d] for d in f)
        out.append(np.transpose(x, list(b) + f + list(c)).reshape(nb, nf, -1))
    return out


def _dot_keys(lhs, rhs, params: dict, out_shape) -> np.ndarray:
    lk, rk = _contracted_rows(params, _row_operand(lhs), _row_operand(rhs))
    (nb, nlf, nc), nrf = lk.shape, rk.shape[1]
    lrow = _rows(lk.reshape(nb * nlf, nc)).reshape(nb, nlf, 1)
    rrow = _rows(rk.reshape(nb * nrf, nc)).reshape(nb, 1, nrf)
    return _joint([lrow, rrow], (nb, nlf, nrf)).reshape(out_shape)


def _reduce_keys(k: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    keep = [d for d in range(k.ndim) if d not in axes]
    shape = tuple(k.shape[d] for d in keep)
    m = np.transpose(k, keep + list(axes)).reshape(math.prod(shape), -1)
    return _rows(m).reshape(shape)


#: Data movement, applied to keys as to data (numpy twins shared with
#: :mod:`pgm_drm.graph.slices`); a rule returning ``None`` claims nothing.
_MOVES = {
    "reshape": _np_reshape,
    "broadcast_in_dim": _np_broadcast_in_dim,
    "slice": _np_slice,
    "squeeze": lambda ins, p, aval: ins[0].reshape(aval.shape),
    "expand_dims": lambda ins, p, aval: ins[0].reshape(aval.shape),
    "transpose": lambda ins, p, aval: np.transpose(ins[0], p["permutation"]),
    "rev": lambda ins, p, aval: np.flip(ins[0], tuple(p["dimensions"])),
}


def _concrete(x, aval, free=None):
    """A known value as numpy; one numpy cannot hold (a PRNG key) is free
    (``free(aval)``: :func:`_distinct` keys by default)."""
    try:
        return np.asarray(x)
    except TypeError:
        return (free or _distinct)(aval)


def _evaluated(eqn, invals: list, free) -> list:
    """An equation with known inputs, run now: its outputs as numpy."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    ans = eqn.primitive.bind(*invals, **bind_params)
    ans = ans if eqn.primitive.multiple_results else [ans]
    return [_concrete(a, v.aval, free) for a, v in zip(ans, eqn.outvars, strict=True)]


def _keys_of(eqn, invals: list) -> list:
    """One equation's outputs: concrete values or :class:`_Keys`."""
    name = eqn.primitive.name
    outs = eqn.outvars
    if not any(isinstance(v, _Keys) for v in invals):
        return _evaluated(eqn, invals, _distinct)
    closed = call_body(eqn, _CALLS)
    if closed is not None:
        return _interpret(closed.jaxpr, closed.consts, invals)
    shape = tuple(outs[0].aval.shape) if len(outs) == 1 else None
    if shape is not None and math.prod(shape) > MAX_KEYS:
        return [_distinct(v.aval) for v in outs]
    got = None
    if name in _ELEMENTWISE:
        got = _joint([_as_keys(v) for v in invals], shape)
    elif name in _REDUCTIONS:
        k = _as_keys(invals[0])
        if k.size <= MAX_KEYS:
            got = _reduce_keys(k, tuple(eqn.params["axes"]))
    elif name == "dot_general":
        lhs, rhs = invals
        width = math.prod(np.shape(lhs)) + math.prod(np.shape(rhs))
        if width <= MAX_KEYS:
            got = _dot_keys(lhs, rhs, eqn.params, shape)
    elif name == "concatenate":
        parts, top = [], 0
        for v in invals:
            k = _compress(_as_keys(v))
            parts.append(k + top)
            top += int(k.max(initial=-1)) + 1
        got = np.concatenate(parts, axis=eqn.params["dimension"])
    elif name == "optimization_barrier":
        return list(invals)
    elif name in _MOVES and len(invals) == 1:
        got = _MOVES[name]([_as_keys(invals[0])], eqn.params, outs[0].aval)
    if got is None:
        return [_distinct(v.aval) for v in outs]
    return [_Keys(np.asarray(got, np.int64))]


def _count(jaxpr: core.Jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        closed = call_body(eqn, _CALLS)
        if closed is not None:
            n += _count(closed.jaxpr)
    return n


def _interpret(jaxpr: core.Jaxpr, consts, args, rule=None, free=None) -> list:
    """Run ``jaxpr`` abstractly: ``rule(eqn, invals)`` gives each equation's
    outputs (:func:`_keys_of` by default, :func:`_dep_of`), ``free(aval)`` the
    value of an input nothing is known of (:func:`_distinct` keys by default)."""
    rule, free = rule or _keys_of, free or _distinct
    env: dict = {}

    def read(v):
        return np.asarray(v.val) if isinstance(v, Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        # A value closed over from an enclosing trace is free, like an input.
        env[v] = (
            free(v.aval) if isinstance(c, core.Tracer) else _concrete(c, v.aval, free)
        )
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        got = rule(eqn, [read(v) for v in eqn.invars])
        for v, a in zip(eqn.outvars, got, strict=True):
            env[v] = a
    return [read(v) for v in jaxpr.outvars]


def equality_keys(fn: Callable, *args: Any) -> Any | None:
    """Static equality keys of ``fn(*args)``'s outputs (see the module docstring).

    Args:
        fn: A pure, traceable function.
        *args: Its arguments, arrays or ``jax.ShapeDtypeStruct``; only their
            shapes and dtypes are read. Every entry of every argument is taken
            as free.

    Returns:
        The outputs' pytree with an ``int64`` array of each output's shape in
        place of each leaf: entries with equal keys are equal for every value of
        ``args``. ``None`` when the program is longer than :data:`MAX_EQNS`.
    """
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if _count(closed.jaxpr) > MAX_EQNS:
        return None
    ins = [_distinct(v.aval) for v in closed.jaxpr.invars]
    # Constant-only equations are evaluated now, even under an enclosing trace.
    with jax.ensure_compile_time_eval():
        outs = _interpret(closed.jaxpr, closed.consts, ins)
    keys = [_as_keys(o) for o in outs]
    return jax.tree.unflatten(jax.tree.structure(shape), keys)


# --------------------------------------------------------------------------- #
# Dependence: which entries of a program's outputs do not depend on its inputs.
# --------------------------------------------------------------------------- #


class _Dep:
    """A traced value's dependence mask: ``True`` where the entry may depend on
    the inputs, ``False`` where it is the same for every input."""

    __slots__ = ("d",)

    def __init__(self, d: np.ndarray):
        self.d = d


def _as_dep(x, shape=None) -> np.ndarray:
    if isinstance(x, _Dep):
        d = x.d
    else:
        d = np.zeros(np.shape(x), bool)
    return d if shape is None else np.broadcast_to(d, shape)


def _all_dep(aval) -> _Dep:
    return _Dep(np.ones(tuple(aval.shape), bool))


def _dot_dep(lhs, rhs, params: dict, out_shape) -> np.ndarray:
    """``dot_general``'s result depends on the inputs where any entry of either
    contracted row does (a known operand's rows never do)."""
    ld, rd = _contracted_rows(params, _as_dep(lhs), _as_dep(rhs))
    return (ld.any(-1)[:, :, None] | rd.any(-1)[:, None, :]).reshape(out_shape)


def _dep_of(eqn, invals: list) -> list:
    """One equation's outputs: concrete values or :class:`_Dep` masks."""
    outs = eqn.outvars
    if not any(isinstance(v, _Dep) for v in invals):
        return _evaluated(eqn, invals, _all_dep)
    closed = call_body(eqn, _CALLS)
    if closed is not None:
        return _interpret(closed.jaxpr, closed.consts, invals, _dep_of, _all_dep)
    name = eqn.primitive.name
    shape = tuple(outs[0].aval.shape) if len(outs) == 1 else None
    if shape is None or math.prod(shape) > MAX_KEYS:
        return [_all_dep(v.aval) for v in outs]
    got = None
    if name == "select_n" and not isinstance(invals[0], _Dep):
        # A known selector: each entry depends as the case it picks.
        which = np.broadcast_to(np.asarray(invals[0]).astype(np.int64), shape)
        cases = [_as_dep(c, shape) for c in invals[1:]]
        got = np.choose(which, cases)
    elif name in _ELEMENTWISE:
        got = np.zeros(shape, bool)
        for v in invals:
            got = got | _as_dep(v, shape)
    elif name in _REDUCTIONS:
        axes = tuple(eqn.params["axes"])
        got = _as_dep(invals[0]).any(axis=axes) if axes else _as_dep(invals[0])
    elif name == "dot_general":
        got = _dot_dep(invals[0], invals[1], eqn.params, shape)
    elif name == "concatenate":
        got = np.concatenate([_as_dep(v) for v in invals], eqn.params["dimension"])
    elif name == "optimization_barrier":
        return list(invals)
    elif name in _MOVES and len(invals) == 1:
        got = _MOVES[name]([_as_dep(invals[0])], eqn.params, outs[0].aval)
    if got is None:
        return [_all_dep(v.aval) for v in outs]
    return [_Dep(np.asarray(got, bool).reshape(shape))]


def input_dependence(fn: Callable, *args: Any) -> Any | None:
    """Which entries of ``fn(*args)``'s outputs may depend on ``args``, read
    statically from the program (an abstract interpretation, sound like
    :func:`equality_keys`): ``False`` entries are the same for every value of
    ``args``. Elementwise equations depend where an operand does (a ``select_n``
    with a known selector, where the case it picks does), data movement moves
    the masks, a reduction or a product depends where anything it reads does,
    and any other equation depends everywhere. A product with a known zero is
    *not* taken as free (``inf * 0`` is NaN); a program whose known zeros are
    explicit (``gemm.dedupe_constant_gemms``) shows them free.

    Args:
        fn: A pure, traceable function.
        *args: Its arguments, arrays or ``jax.ShapeDtypeStruct``; only their
            shapes and dtypes are read.

    Returns:
        The outputs' pytree with a ``bool`` array of each output's shape in place
        of each leaf; ``None`` when the program is longer than :data:`MAX_EQNS`.
    """
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if _count(closed.jaxpr) > MAX_EQNS:
        return None
    ins = [_all_dep(v.aval) for v in closed.jaxpr.invars]
    with jax.ensure_compile_time_eval():
        outs = _interpret(closed.jaxpr, closed.consts, ins, _dep_of, _all_dep)
    masks = [_as_dep(o).copy() for o in outs]
    return jax.tree.unflatten(jax.tree.structure(shape), masks)
