"""Evaluate a model's per-site log-prob tables in groups of identical structure.

A model written as a Python loop (a chain, a grid, one site per node) traces to a
jaxpr with one *slice* of equations per site, all alike but for which inputs they
read. Evaluating that jaxpr op by op under the colour vmaps
(:class:`pgm_drm.graph.compile._Evaluator`) costs one dispatch per equation per
site; here each distinct slice is evaluated once, vmapped over its sites:

1. **Known part.** Equations that read no latent value (slicing a closed-over
   potential, normalising a prior's logits, anything of the evidence) are run
   once, op by op (``jax.core.eval_jaxpr``); their results that latent
   equations read become the slices' inputs.
2. **Slices.** A reverse pass labels every latent-dependent equation with the one
   output (site) it feeds. A site whose slice shares an equation with another
   site's, or whose output is a latent value itself, is left to the caller.
3. **Signatures.** A slice's signature is its equations (primitive, parameters,
   wiring renumbered in first-use order, literal values, avals) and the kind of
   each input: a latent input (with its support grid) or a known value (its
   aval). Sites with equal signatures compute the same function of their inputs.
4. **Groups.** Each signature's slice becomes one small jaxpr, vmapped over the
   support of each latent input (the table's axes) and over the group's sites
   (known inputs stacked; one input every site reads is passed once), and jitted:
   one compile per distinct slice, whatever the number of sites.

Nothing here knows about NumPyro: :func:`grouped_tables` takes a closed jaxpr
whose first inputs are latent values and returns tables in input-slot order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal, jaxpr_as_fun

__all__ = ["SiteTable", "grouped_tables"]

_SHARED = -1


class SiteTable(NamedTuple):
    """One site's log-prob table from :func:`grouped_tables`.

    Attributes:
        table: ``(K_1, ..., K_m, *lp_shape)`` numpy array: the log-prob with latent
            input ``latents[j]`` set to its ``j``-th support grid entry on axis ``j``.
        latents: The latent input positions of the table's leading axes.
    """

    table: np.ndarray
    latents: tuple[int, ...]


def _params_key(params: dict) -> tuple:
    """A hashable key of equation parameters; objects that do not hash (and
    sub-jaxprs) are keyed by identity, so equal keys mean equal parameters."""
    out = []
    for k in sorted(params):
        v = params[k]
        if hasattr(v, "eqns") or hasattr(v, "jaxpr"):
            v = ("id", id(v))
        else:
            try:
                hash(v)
            except TypeError:
                v = ("id", id(v))
        out.append((k, v))
    return tuple(out)


def _literal_key(v: Literal) -> tuple:
    val = np.asarray(v.val)
    return ("L", v.aval.shape, v.aval.dtype, val.dtype.str, val.tobytes())


def grouped_tables(
    closed: ClosedJaxpr,
    grids: Sequence[np.ndarray],
    evidence: Sequence[Any],
    min_group: int = 2,
    eager_eqns: int = 64,
) -> tuple[dict[int, SiteTable], list[int]]:
    """Every output's table over its latent inputs, evaluated by structure.

    Args:
        closed: A closed jaxpr ``(latent values..., evidence...) -> outputs``.
        grids: Per latent input, its support values broadcast to the input's
            shape on a new leading axis ``(K, *value_shape)``.
        evidence: The remaining inputs' values.
        min_group: Slices shared by fewer sites than this are not compiled (one
            compile each would cost more than op-by-op evaluation): those of at
            most ``eager_eqns`` equations are run op by op here, longer ones are
            left to the caller. (Left to the caller, even a loop's one-off first
            site cost a pass over the whole jaxpr: 0.7 s for a chain of 10,000.)
        eager_eqns: See ``min_group``.

    Returns:
        ``(tables, rest)``: :class:`SiteTable` per output index handled, and the
        output indices left to the caller (shared slices, small groups of long
        slices, outputs that are latent values).
    """
    jaxpr = closed.jaxpr
    n_lat = len(grids)
    lat_pos = {v: i for i, v in enumerate(jaxpr.invars[:n_lat])}
    n_out = len(jaxpr.outvars)
    if any(e.effects for e in jaxpr.eqns):
        return {}, list(range(n_out))

    # 1. Known / latent-dependent equations (forward).
    unknown: set = set(lat_pos)
    known_eqns, unk_eqns = [], []
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in unknown for v in eqn.invars):
            unknown.update(eqn.outvars)
            unk_eqns.append(eqn)
        else:
            known_eqns.append(eqn)

    # 2. Owner of every latent-dependent variable (reverse): the one output it
    #    feeds, or _SHARED.
    owner: dict = {}

    def claim(v, o) -> None:
        prev = owner.get(v)
        owner[v] = o if prev is None or prev == o else _SHARED

    rest: set[int] = set()
    for k, v in enumerate(jaxpr.outvars):
        if isinstance(v, Literal) or v in lat_pos:
            rest.add(k)
        elif v in unknown:
            claim(v, k)
    eqn_owner = {}
    for eqn in reversed(unk_eqns):
        o = None
        for v in eqn.outvars:
            w = owner.get(v)
            if w is not None:
                o = w if o is None or o == w else _SHARED
        if o is None:  # dead code
            continue
        eqn_owner[id(eqn)] = o
        for v in eqn.invars:
            if not isinstance(v, Literal) and v in unknown and v not in lat_pos:
                claim(v, o)
    slices: dict[int, list] = {}
    for eqn in unk_eqns:
        o = eqn_owner.get(id(eqn))
        if o is not None and o != _SHARED:
            slices.setdefault(o, []).append(eqn)

    # 3. Signatures.
    grid_ids: dict = {}
    grid_key = []
    for g in grids:
        g = np.asarray(g)
        grid_key.append(
            grid_ids.setdefault((g.shape, g.dtype.str, g.tobytes()), len(grid_ids))
        )
    groups: dict[tuple, list[tuple[int, list]]] = {}
    for k, v in enumerate(jaxpr.outvars):
        if k in rest:
            continue
        if v not in unknown:  # a latent-free output: its value is its table
            groups.setdefault(("known", k), []).append((k, [v]))
            continue
        if owner.get(v) == _SHARED:
            rest.add(k)
            continue
        sig, out, inputs = _signature(slices.get(k, ()), v)
        ok = True
        kinds = []
        for a in inputs:
            if a in lat_pos:
                kinds.append(("z", grid_key[lat_pos[a]]))
            elif a in unknown:  # produced by a shared equation
                ok = False
                break
            else:
                kinds.append(("x", a.aval.shape, a.aval.dtype))
        if not ok:
            rest.add(k)
            continue
        groups.setdefault((sig, out, tuple(kinds)), []).append((k, inputs))

    # Small groups are run op by op (no compile), or, when their slice is long,
    # go back to the caller; latent-free ones need neither.
    eager: set = set()
    for key in list(groups):
        if key[0] != "known" and len(groups[key]) < min_group:
            if len(key[0]) <= eager_eqns:
                eager.add(key)
            else:
                rest.update(k for k, _ in groups.pop(key))

    # 4. The known part, once (only the values the kept groups read).
    needed_known = {
        a for members in groups.values() for _, ins in members for a in ins
    } - set(lat_pos)
    known_vals = _eval_known(closed, n_lat, known_eqns, needed_known, evidence)

    tables: dict[int, SiteTable] = {}
    for key, members in groups.items():
        if key[0] == "known":
            ((k, (v,)),) = members  # never a Literal: those went to `rest`
            tables[k] = SiteTable(np.asarray(known_vals[v]), ())
            continue
        k0, inputs0 = members[0]
        fn = _group_fn(slices.get(k0, ()), inputs0, jaxpr.outvars[k0], lat_pos, grids)
        args, axes = [], []
        for j, a in enumerate(inputs0):
            if a in lat_pos:
                continue
            column = [inp[j] for _, inp in members]
            if all(c is a for c in column):
                args.append(known_vals[a])
                axes.append(None)
            else:
                args.append(np.stack([np.asarray(known_vals[c]) for c in column]))
                axes.append(0)
        run = (lambda f: f) if key in eager else jax.jit
        if 0 in axes:
            res = np.asarray(run(jax.vmap(fn, in_axes=tuple(axes)))(*args))
        else:  # every site reads the same inputs: one table serves all
            one = np.asarray(run(fn)(*args))
            res = np.broadcast_to(one, (len(members),) + one.shape)
        for g, (k, inp) in enumerate(members):
            lats = tuple(lat_pos[a] for a in inp if a in lat_pos)
            tables[k] = SiteTable(res[g], lats)
    return tables, sorted(rest)


def _signature(eqns: Sequence, outvar) -> tuple[tuple, tuple, list]:
    """A slice's structure with its variables renumbered in first-use order:
    ``(equations, output atom, input variables in slot order)``."""
    local: dict = {}
    slot: dict = {}
    inputs: list = []

    def atom(a) -> tuple:
        if isinstance(a, Literal):
            return _literal_key(a)
        if a in local:
            return ("v", local[a])
        if a not in slot:
            slot[a] = len(inputs)
            inputs.append(a)
        return ("i", slot[a])

    sig = []
    for eqn in eqns:
        ins = tuple(atom(a) for a in eqn.invars)
        for a in eqn.outvars:
            local[a] = len(local)
        sig.append(
            (
                eqn.primitive,
                ins,
                _params_key(eqn.params),
                tuple((a.aval.shape, a.aval.dtype) for a in eqn.outvars),
            )
        )
    return tuple(sig), atom(outvar), inputs


def _eval_known(closed, n_lat, known_eqns, needed, evidence, rules=None) -> dict:
    """Values of the ``needed`` latent-free variables (one pass, in numpy for
    the index and slicing operations a loop-written model makes per site, else
    in JAX: one eager JAX op costs tens of microseconds, and a chain of 10,000
    sites makes about 60,000 of them). The JAX ones are run level by level
    (:func:`_batched`): the same operation on same-shaped operands at one
    dependency level, made once per site by a loop (a ``Categorical(logits)``'s
    normalisation: ten ops per site), runs as one ``vmap`` of it on their
    stacked operands. ``rules={}``: all in JAX, op by op, the naive twin the
    tests hold it to."""
    naive = rules is not None and not rules
    rules = _NUMPY_RULES if rules is None else rules
    jaxpr = closed.jaxpr
    env: dict = {}
    for v, x in zip(jaxpr.constvars, closed.consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars[n_lat:], evidence, strict=True):
        env[v] = x

    def read(a):
        return a.val if isinstance(a, Literal) else env[a]

    def numpy_rule(eqn, ins):
        rule = rules.get(eqn.primitive.name)
        if rule is None or not _numpy_safe(eqn):
            return None
        # Each operand as its aval says (a Python-float literal is a float64
        # in numpy but a float32 operand of a float32 comparison in XLA).
        typed = [_np_cast(x, a.aval) for x, a in zip(ins, eqn.invars, strict=True)]
        out = rule(typed, eqn.params, eqn.outvars[0].aval)
        return None if out is None else [_np_cast(out, eqn.outvars[0].aval)]

    def bind(eqn, ins):
        out = eqn.primitive.bind(*ins, **eqn.params)
        return out if eqn.primitive.multiple_results else [out]

    if naive:
        for eqn in known_eqns:
            for v, x in zip(
                eqn.outvars, bind(eqn, [read(a) for a in eqn.invars]), strict=True
            ):
                env[v] = x
    else:
        for level in _levels(known_eqns):
            pending: dict[tuple, list] = {}
            for eqn in level:
                ins = [read(a) for a in eqn.invars]
                outs = numpy_rule(eqn, ins)
                if outs is None and _batchable(eqn):
                    pending.setdefault(_op_key(eqn), []).append((eqn, ins))
                    continue
                if outs is None:
                    outs = bind(eqn, ins)
                for v, x in zip(eqn.outvars, outs, strict=True):
                    env[v] = x
            for items in pending.values():
                for (eqn, _), outs in zip(items, _batched(items, bind), strict=True):
                    for v, x in zip(eqn.outvars, outs, strict=True):
                        env[v] = x
    needed = [v for v in needed if not isinstance(v, Literal)]
    return {v: env[v] for v in needed}


def _levels(eqns: Sequence) -> list[list]:
    """``eqns`` (in order) by dependency level: each one after every equation
    that makes one of its operands."""
    depth: dict = {}
    out: list[list] = []
    for eqn in eqns:
        d = 1 + max(
            (depth.get(a, 0) for a in eqn.invars if not isinstance(a, Literal)),
            default=0,
        )
        for v in eqn.outvars:
            depth[v] = d
        while len(out) < d:
            out.append([])
        out[d - 1].append(eqn)
    return out


def _batchable(eqn) -> bool:
    """A plain primitive (no sub-jaxpr, no effects) with array operands."""
    if eqn.effects or any(
        hasattr(v, "eqns") or hasattr(v, "jaxpr") for v in eqn.params.values()
    ):
        return False
    return bool(eqn.invars) and not all(isinstance(a, Literal) for a in eqn.invars)


def _op_key(eqn) -> tuple:
    """Equations with equal keys apply the same operation to operands of the
    same shapes and dtypes (literals equal)."""
    ins = tuple(
        _literal_key(a) if isinstance(a, Literal) else ("x", a.aval.shape, a.aval.dtype)
        for a in eqn.invars
    )
    return (eqn.primitive, _params_key(eqn.params), ins)


def _batched(items: list, bind) -> list[list]:
    """The outputs of every ``(eqn, operands)`` in ``items`` (one ``_op_key``):
    one op by itself; several as one ``vmap`` of the operation over their
    stacked (non-literal) operands, the results split back in numpy. ``vmap``
    of an XLA operation is the same function on each row (at XLA's default
    optimisation a batch's ``exp`` and ``log`` may round an ulp apart from one
    small op's; the tables' exactness tests are at 1e-10)."""
    if len(items) < _MIN_BATCH:
        return [bind(eqn, ins) for eqn, ins in items]
    eqn = items[0][0]
    lit = [isinstance(a, Literal) for a in eqn.invars]
    stacked = [
        None if is_lit else np.stack([np.asarray(ins[j]) for _, ins in items])
        for j, is_lit in enumerate(lit)
    ]
    consts = [
        a.val if is_lit else None for a, is_lit in zip(eqn.invars, lit, strict=True)
    ]

    def one(*xs):
        it = iter(xs)
        args = [
            c if is_lit else next(it) for c, is_lit in zip(consts, lit, strict=True)
        ]
        return bind(eqn, args)

    outs = jax.vmap(one)(*[x for x in stacked if x is not None])
    outs = [np.asarray(o) for o in outs]
    return [[o[i] for o in outs] for i in range(len(items))]


#: Fewer equal operations than this at one level run one by one.
_MIN_BATCH = 4


def _np_cast(x, aval):
    return np.asarray(x).astype(aval.dtype, copy=False)


def _numpy_safe(eqn) -> bool:
    """Whether numpy computes ``eqn`` exactly as XLA does: integer and boolean
    arithmetic, and data movement of any dtype. Float arithmetic is left to XLA
    (its CPU backend flushes subnormals to zero; numpy does not)."""
    if eqn.primitive.name in _MOVES:
        return True
    return all(
        np.dtype(a.aval.dtype).kind in "iub" for a in [*eqn.invars, *eqn.outvars]
    )


def _np_binary(op):
    def rule(ins, params, aval):
        return op(ins[0], ins[1])

    return rule


def _np_slice(ins, params, aval):
    x = ins[0]
    strides = params.get("strides") or (1,) * x.ndim
    idx = tuple(
        slice(lo, hi, st)
        for lo, hi, st in zip(
            params["start_indices"], params["limit_indices"], strides, strict=True
        )
    )
    return x[idx]


def _np_reshape(ins, params, aval):
    if params.get("dimensions") is not None:  # transpose first: left to XLA
        return None
    return ins[0].reshape(aval.shape)


def _np_broadcast_in_dim(ins, params, aval):
    x = ins[0]
    shape = tuple(params["shape"])
    expanded = [1] * len(shape)
    for i, d in enumerate(params["broadcast_dimensions"]):
        expanded[d] = x.shape[i]
    return np.broadcast_to(x.reshape(expanded), shape)


def _np_select_n(ins, params, aval):
    which, *cases = ins
    if which.dtype != np.bool_ or len(cases) != 2:
        return None
    return np.where(which, cases[1], cases[0])


def _np_convert(ins, params, aval):
    # Integers and booleans only (float to int rounds NaN and inf differently,
    # and float to float may meet a subnormal): the rest go to XLA.
    if ins[0].dtype.kind not in "iub":
        return None
    return ins[0].astype(np.dtype(params["new_dtype"]))


#: Operations that only move data: exact in numpy for every dtype.
_MOVES = frozenset({"slice", "squeeze", "reshape", "broadcast_in_dim", "select_n"})

#: numpy twins of the latent-free operations a model makes per site; an
#: operation not listed, not numpy-safe (:func:`_numpy_safe`), or whose rule
#: returns None runs in JAX.
_NUMPY_RULES = {
    "slice": _np_slice,
    "squeeze": lambda ins, p, aval: ins[0].reshape(aval.shape),
    "reshape": _np_reshape,
    "broadcast_in_dim": _np_broadcast_in_dim,
    "select_n": _np_select_n,
    "add": _np_binary(np.add),
    "sub": _np_binary(np.subtract),
    "mul": _np_binary(np.multiply),
    "lt": _np_binary(np.less),
    "le": _np_binary(np.less_equal),
    "gt": _np_binary(np.greater),
    "ge": _np_binary(np.greater_equal),
    "eq": _np_binary(np.equal),
    "convert_element_type": _np_convert,
}


def _group_fn(eqns, inputs, outvar, lat_pos, grids):
    """``(known inputs...) -> table``: the slice's jaxpr vmapped over each latent
    input's support grid (axes in input-slot order)."""
    from jax._src import core

    sub = core.Jaxpr([], list(inputs), [outvar], list(eqns))
    f = jaxpr_as_fun(ClosedJaxpr(sub, []))
    lat_slots = [j for j, a in enumerate(inputs) if a in lat_pos]
    n_in = len(inputs)

    def with_latents(lat_vals, known_vals):
        full, it_l, it_k = [], iter(lat_vals), iter(known_vals)
        for j in range(n_in):
            full.append(next(it_l) if j in lat_slots else next(it_k))
        return f(*full)[0]

    fn = with_latents
    # Innermost vmap over the last latent slot, so axes come out in slot order.
    for m in reversed(range(len(lat_slots))):
        fn = _vmap_one(fn, m, len(lat_slots))
    grid_vals = [np.asarray(grids[lat_pos[inputs[j]]]) for j in lat_slots]

    def group(*known_vals):
        return fn(grid_vals, known_vals)

    return group


def _vmap_one(fn, m, n):
    """Map ``fn(lat_vals, known)`` over axis 0 of ``lat_vals[m]``."""

    def mapped(lat_vals, known):
        axes = ([None] * m + [0] + [None] * (n - m - 1), None)
        return jax.vmap(fn, in_axes=axes)(lat_vals, known)

    return mapped
