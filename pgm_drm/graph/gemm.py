"""Template matches against repeated templates, computed once (a jaxpr pass).

A compiled graph scores evidence through its natural parameters (Eq. 8): one
product ``T(x) . eta(z)`` over every latent state ``z``
(:mod:`pgm_drm.graph.natural`). ``eta`` is known when the program is built (it
depends on the model only), and along many latent axes its slices repeat or
vanish: the Rendering Model's ``a = 0`` states render nothing (``eta = 0`` for
half of its ``(c, g, a)`` states), and a DRM's level-1 patch templates do not
depend on most of the higher levels' states (65 distinct of 768 per patch at
32x32, 3 levels). :func:`dedupe_constant_gemms` rewrites every ``dot_general``
with one known (concrete) operand into a product with that operand's distinct
non-zero slices along each such axis (:func:`axis_recipe`), then restores the
axis with broadcasts and selects, which XLA fuses into the product's consumers
(a gather, or a concatenate, is written out whole and read back: on the CPU that
cost more than the product it saved). The numbers are the same: every entry is
the same inner product of the same two vectors, or an exact zero.

With ``rows=True`` (a junction tree whose evidence tables only keyed leaves read,
``pgm_drm.inference.flat``), a product whose known operand holds few distinct
vectors over all its free dims at once runs over those (:func:`_row_dot`): a
DRM patch has 5 distinct templates of 768 states.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core, source_info_util
from jax.extend.core import Literal

__all__ = ["axis_recipe", "call_body", "count_factored", "dedupe_constant_gemms"]

#: Off: :func:`pgm_drm.inference.infer` runs its programs as traced (an A/B switch
#: for benchmarks; the results are the same either way).
ENABLED = True
#: A product is rewritten only when it keeps at most this fraction of its work.
MAX_KEPT_FRACTION = 0.75
#: Only free axes up to this size are cut.
MAX_AXIS = 64
#: At most this many distinct slices per cut axis (one select each).
MAX_KEPT = 8
#: Primitives inlined by the pass (their bodies may hold the products).
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}


def _known(x: Any) -> bool:
    return not isinstance(x, core.Tracer)


def _canonical_rows(mat: np.ndarray) -> np.ndarray:
    """The rows of the 2-D ``mat`` as bytes to compare, ``-0.0`` read as ``0.0``
    (``a * template`` with ``a = 0`` renders ``-0.0`` where the template is
    negative; a product with it differs at most in the sign of a zero, which no
    log-potential can tell apart)."""
    if np.issubdtype(mat.dtype, np.floating):
        mat = mat + mat.dtype.type(0)
    mat = np.ascontiguousarray(mat)
    return mat.view(np.uint8).reshape(mat.shape[0], -1)


def axis_recipe(const: np.ndarray, axis: int) -> tuple[list[int], list[int]] | None:
    """How ``const``'s slices along ``axis`` repeat: ``(keep, source)`` with
    ``keep`` the positions of its distinct non-zero slices and slice ``l`` equal
    to slice ``keep[source[l]]``, or all zero where ``source[l] == -1``. ``None``
    when every slice is distinct and non-zero (nothing to save)."""
    k = const.shape[axis]
    keep, source = _distinct_rows(np.moveaxis(const, axis, 0).reshape(k, -1))
    if len(keep) == k:
        return None
    if not keep:  # all zero: keep one slice so the product keeps its shape
        keep = [0]
    return keep, source.tolist()


def _distinct_rows(m: np.ndarray) -> tuple[list[int], np.ndarray]:
    """``(keep, source)`` of the 2-D ``m``'s rows: ``keep`` its distinct non-zero
    rows (``-0.0`` read as ``0.0``), ``source[f]`` the index in ``keep`` of row
    ``f`` (``-1``: all zero)."""
    rows = _canonical_rows(m)
    zero = ~np.any(m != 0, axis=1)
    seen: dict[bytes, int] = {}
    keep: list[int] = []
    source = np.full(m.shape[0], -1, np.int64)
    for f in range(m.shape[0]):
        if zero[f]:
            continue
        b = rows[f].tobytes()
        if b not in seen:
            seen[b] = len(keep)
            keep.append(f)
        source[f] = seen[b]
    return keep, source


def call_body(eqn, calls: dict | None = None) -> core.ClosedJaxpr | None:
    """The body of a call equation (``jit``, ``closed_call``, ...; ``calls``:
    primitive name -> its body's parameter), or ``None`` for any other."""
    name = (calls or _CALLS).get(eqn.primitive.name)
    if name is None or name not in eqn.params:
        return None
    inner = eqn.params[name]
    return inner if hasattr(inner, "consts") else core.ClosedJaxpr(inner, ())


def _expand(out, axis: int, source: list[int]):
    """``out`` (the product over the kept slices) with ``axis`` restored to
    ``len(source)`` slices: each kept slice broadcast along ``axis`` and selected
    where ``source`` names it, zeros where it is ``-1``. Broadcasts and selects
    are elementwise, so XLA fuses them into every consumer (a gather, or a
    concatenate of slices, is written out whole first and read back)."""
    src = np.asarray(source)
    shape = list(out.shape)
    shape[axis] = len(source)
    pattern = [1] * len(shape)
    pattern[axis] = len(source)

    def slab(u: int):
        piece = lax.slice_in_dim(out, u, u + 1, axis=axis)
        return jnp.broadcast_to(piece, shape)

    used = sorted(set(source) - {-1})
    acc = slab(used[-1]) if -1 not in source else jnp.zeros(shape, out.dtype)
    for u in used if -1 in source else used[:-1]:
        acc = jnp.where((src == u).reshape(pattern), slab(u), acc)
    return acc


class _Sides(NamedTuple):
    """A product with exactly one known operand, read by :func:`_sides`."""

    side: int  # 1: the known operand is rhs
    const: np.ndarray  # the known operand
    other: Any  # the traced one
    contract: tuple  # the known operand's contracting dims
    batch: tuple  # and its batch dims
    o_contract: tuple  # the other's contracting dims
    o_batch: tuple  # and its batch dims
    free: list  # the known operand's free dims
    kw: dict  # dot_general's precision and preferred_element_type


def _sides(lhs, rhs, params: dict) -> _Sides | None:
    """A product's known operand and the other, with their dims (:class:`_Sides`),
    or ``None`` unless exactly one is known."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if _known(lhs) == _known(rhs):
        return None
    side = 1 if _known(rhs) else 0
    const = np.asarray(rhs if side else lhs)
    contract, batch = (rc, rb) if side else (lc, lb)
    return _Sides(
        side=side,
        const=const,
        other=lhs if side else rhs,
        contract=contract,
        batch=batch,
        o_contract=lc if side else rc,
        o_batch=lb if side else rb,
        free=[d for d in range(const.ndim) if d not in contract and d not in batch],
        kw={
            "precision": params.get("precision"),
            "preferred_element_type": params.get("preferred_element_type"),
        },
    )


def _factored_dot(lhs, rhs, params: dict):
    """``lax.dot_general(lhs, rhs, **params)`` with each free axis of its known
    operand cut to that axis's distinct non-zero slices (:func:`axis_recipe`),
    the result's axes restored by :func:`_expand`; ``None`` when the rewrite does
    not apply or would save less than ``1 - MAX_KEPT_FRACTION`` of the work."""
    got = _sides(lhs, rhs, params)
    if got is None:
        return None
    side, const, other, _, batch, o_contract, o_batch, free, kw = got
    n_other_free = other.ndim - len(o_contract) - len(o_batch)
    recipes = []
    for d in free:
        if not 2 <= const.shape[d] <= MAX_AXIS:
            continue
        recipe = axis_recipe(const, d)
        if recipe is not None and len(recipe[0]) <= MAX_KEPT:
            keep, source = recipe
            const = np.take(const, keep, axis=d)
            recipes.append((d, source))
    before = math.prod(len(src) for _, src in recipes)
    after = math.prod(const.shape[d] for d, _ in recipes)
    if not recipes or after > MAX_KEPT_FRACTION * before:
        return None
    dims = params["dimension_numbers"]
    # dot_general's result: batch dims, then lhs's free dims, then rhs's.
    if side:
        out = lax.dot_general(other, const, dims, **kw)
        at = {d: len(batch) + n_other_free + free.index(d) for d, _ in recipes}
    else:
        out = lax.dot_general(const, other, dims, **kw)
        at = {d: len(batch) + free.index(d) for d, _ in recipes}
    for d, source in recipes:
        out = _expand(out, at[d], source)
    return out


#: Row dedupe (:func:`_row_dot`) reads at most this many batch entries of the
#: known operand on the host.
MAX_ROW_BATCH = 4096


def _row_dot(lhs, rhs, params: dict):
    """``lax.dot_general(lhs, rhs, **params)`` over the known operand's distinct
    non-zero *rows*: at each of its batch entries, its free dims flattened hold
    at most :data:`MAX_KEPT` distinct vectors (a DRM's leaf templates: 5 per
    patch of 768 states, where the free axes one by one kept 64). The product
    runs over those; the result's free dims are restored by a chain of selects
    on a static source map (elementwise: fused into the consumers, a gather of
    a keyed leaf included). Equal to the plain product up to the rounding of
    its own blocking (a few ulp: a narrower product may sum an entry's terms in
    another order), or an exact zero.
    ``None`` when the rewrite does not apply or saves too little."""
    got = _sides(lhs, rhs, params)
    if got is None:
        return None
    side, const, other, contract, batch, o_contract, o_batch, free, kw = got
    if not free:
        return None
    bshape = tuple(const.shape[d] for d in batch)
    fshape = tuple(const.shape[d] for d in free)
    cshape = tuple(const.shape[d] for d in contract)
    nb, nf, nc = math.prod(bshape), math.prod(fshape), math.prod(cshape)
    if nb > MAX_ROW_BATCH or nf < 2:
        return None
    m = np.transpose(const, list(batch) + free + list(contract)).reshape(nb, nf, nc)
    if np.issubdtype(m.dtype, np.floating):
        m = m + m.dtype.type(0)  # -0.0 as 0.0 (see _canonical_rows)
    found = [_distinct_rows(m[b]) for b in range(nb)]
    width = max(max(len(k) for k, _ in found), 1)
    if width > MAX_KEPT or width > MAX_KEPT_FRACTION * nf:
        return None
    kept = np.zeros((nb, width, nc), m.dtype)
    source = np.stack([src for _, src in found])  # (nb, nf)
    for b, (keep, _) in enumerate(found):
        if keep:
            kept[b, : len(keep)] = m[b, keep]
            kept[b, len(keep) :] = m[b, keep[0]]
    kept = kept.reshape(bshape + (width,) + cshape)
    k_batch = tuple(range(len(bshape)))
    k_contract = tuple(range(len(bshape) + 1, kept.ndim))
    n_o = other.ndim - len(o_contract) - len(o_batch)
    nbd = len(bshape)
    if side:  # (batch, other's free dims, width)
        dims = ((o_contract, k_contract), (o_batch, k_batch))
        out = lax.dot_general(other, kept, dims, **kw)
        at = nbd + n_o
    else:  # (batch, width, other's free dims)
        dims = ((k_contract, o_contract), (k_batch, o_batch))
        out = lax.dot_general(kept, other, dims, **kw)
        at = nbd
    # Restore the width axis to the flattened free dims by selects.
    shape = list(out.shape)
    shape[at] = nf
    pattern = [1] * len(shape)
    pattern[:nbd] = bshape
    pattern[at] = nf
    src = source.reshape(pattern)

    def slab(j: int):
        return jnp.broadcast_to(lax.slice_in_dim(out, j, j + 1, axis=at), shape)

    acc = jnp.zeros(shape, out.dtype) if (source < 0).any() else slab(0)
    for j in range(width):
        if j or (source < 0).any():
            acc = jnp.where(src == j, slab(j), acc)
    return jnp.reshape(acc, tuple(shape[:at]) + fshape + tuple(shape[at + 1 :]))


def _eval(jaxpr: core.Jaxpr, consts, args, rows: bool = False) -> tuple[list, int]:
    """:func:`jax.core.eval_jaxpr` with products of a known operand factored
    (:func:`_factored_dot`; first :func:`_row_dot` with ``rows``) and calls
    inlined. Returns the outputs and how many products were rewritten."""
    env: dict = {}
    rewritten = 0

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        ans = None
        closed = call_body(eqn)
        call = closed is not None
        if call:
            ans, n = _eval(closed.jaxpr, closed.consts, invals, rows)
            rewritten += n
        elif name == "dot_general":
            ans = _row_dot(*invals, eqn.params) if rows else None
            if ans is None:
                ans = _factored_dot(*invals, eqn.params)
            if ans is not None:
                rewritten += 1
        if ans is None:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            with (
                source_info_util.user_context(eqn.source_info.traceback),
                eqn.ctx.manager,
            ):
                ans = eqn.primitive.bind(*invals, **bind_params)
        if eqn.primitive.multiple_results or call:
            for v, a in zip(eqn.outvars, ans, strict=True):
                env[v] = a
        else:
            env[eqn.outvars[0]] = ans
    return [read(v) for v in jaxpr.outvars], rewritten


def dedupe_constant_gemms(fn: Callable, rows: bool = False) -> Callable:
    """``fn`` with every ``dot_general`` that has one known (concrete) operand
    computed over that operand's distinct non-zero slices along each of its free
    axes (see the module docstring): the same results.

    With ``rows``, a product whose known operand holds few distinct vectors over
    all its free dims at once is computed over those (:func:`_row_dot`). Its
    restore costs a few selects per entry read: a win when the consumers read
    few entries (a junction tree's keyed leaves), a loss when they read the
    whole table several times (a DRM's every max-marginal: 2.5x slower).

    ``fn`` must be pure and traceable; the returned function traces it, then
    replays its jaxpr with the rewrite (nested ``jit`` calls inlined), once per
    call, so wrap it in ``jax.jit``. Products with both operands known or both
    traced, and those the rewrite would save less than a quarter of
    (``MAX_KEPT_FRACTION``), are left as they are.
    """

    def wrapped(*args):
        return _run(fn, args, rows)[0]

    return wrapped


def count_factored(fn: Callable, *args: Any) -> int:
    """How many products :func:`dedupe_constant_gemms` rewrites in ``fn(*args)``
    (traced, as under ``jax.jit``: concrete ``args`` would make every operand
    known)."""
    counts: list[int] = []

    def probe(*a):
        out, n = _run(fn, a)
        counts.append(n)
        return out

    jax.make_jaxpr(probe)(*args)
    return counts[0]


def _run(fn: Callable, args: tuple, rows: bool = False) -> tuple[Any, int]:
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs, n = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), rows)
    return jax.tree.unflatten(jax.tree.structure(shape), outs), n
