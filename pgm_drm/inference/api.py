"""``infer``: run a schedule on a compiled graph, jitted once, vmapped over evidence."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array, Semiring
from pgm_drm.graph import gemm
from pgm_drm.graph.compile import (
    FactorGraph,
    _gc_paused,
    check_evidence_values,
    split_evidence,
)
from pgm_drm.graph.keys import equality_keys, input_dependence, value_keys
from pgm_drm.graph.plan import FlatPlan, scanned_twin
from pgm_drm.graph.schedule import Schedule
from pgm_drm.inference.flat import (
    FreeSlices,
    add_dynamic,
    dense_reads_evidence,
    free_slices,
    run_flat_plan,
    runs_keyed,
    static_inputs,
)
from pgm_drm.inference.kernel import make_plan, naive_run_plan
from pgm_drm.models.validation import all_finite
from pgm_drm.semiring import resolve_temperature
from pgm_drm.sharding import shard_batch, unpad

__all__ = ["Posterior", "infer", "log_partition", "log_partition_tables"]


class Posterior(NamedTuple):
    """Posterior summaries of every latent site.

    With a batch of ``B`` evidence instances every array gets a leading ``(B,)``.
    Models with more than ``HOST_SPLIT_SITES`` latent sites get numpy arrays per
    site (split on the host in one go); smaller ones get JAX arrays.

    Attributes:
        log_marginals: ``site -> (*plate_shape, K)`` normalised log-marginals
            (sum-product), max-marginals minus the max (max-sum), or the tempered
            marginals ``T*logsumexp``-normalised at temperature T; only the
            sites asked for (``infer(..., marginals=[...])``; none with
            ``marginals=False``).
        map: ``site -> (*plate_shape,)`` the *joint* MAP assignment in support
            values (by backtracking; loopy: argmax of loopy max-product beliefs).
        log_z: Log partition at the temperature: ``log p(evidence)`` for
            sum-product, ``max log p(latents, evidence)`` for max-sum.
        temperature: 0 for max-sum, 1 for sum-product.
        schedule: The schedule kind that produced it ("tree", "exact", "loopy",
            or "enumeration" / "brute-force" for references).
        deltas: Loopy only: max message change per iteration; else ``None``.
    """

    log_marginals: dict[str, Array]
    map: dict[str, Array]
    log_z: Array
    temperature: float
    schedule: str
    deltas: Array | None = None

    @property
    def marginals(self) -> dict[str, Array]:
        """``exp`` of :attr:`log_marginals`."""
        return {
            k: np.exp(v) if isinstance(v, np.ndarray) else jnp.exp(v)
            for k, v in self.log_marginals.items()
        }

    @property
    def converged(self) -> bool | None:
        """Loopy: whether the last sweep changed messages by less than 1e-6."""
        if self.deltas is None:
            return None
        return bool(np.all(np.asarray(self.deltas)[..., -1] < 1e-6))


def _check_evidence(fg: FactorGraph, evidence: dict[str, Any], values: bool = True):
    """Validate evidence; return (arrays, in_axes, batch size or None).

    ``values=False`` checks names, shapes and dtypes only: the flat path checks
    the values for NaN/inf inside its program (:func:`_all_finite_evidence`) and
    reads the verdict, with log Z's, as one status scalar per call.
    """
    arrays, axes, batch = {}, {}, None
    for name, value in evidence.items():
        if not fg.is_evidence(name, value):  # a constant, given its own value
            continue
        ref = np.shape(fg.kwargs[name])
        x = value if isinstance(value, jax.Array) else jnp.asarray(value)
        if x.shape == ref:
            axes[name] = None
        elif x.shape[1:] == ref:
            axes[name] = 0
            if batch is not None and batch != x.shape[0]:
                raise ValueError(
                    f"evidence batch sizes differ: {batch} and {x.shape[0]} ({name!r})"
                )
            batch = x.shape[0]
        else:
            raise ValueError(
                f"evidence {name!r} has shape {x.shape}; the graph was compiled for "
                f"shape {ref} (or a batch of shape (B, *{ref}))"
            )
        if values or np.dtype(x.dtype).kind == "c":  # complex: refused on its dtype
            check_evidence_values(name, x)
        arrays[name] = x
    return arrays, axes, batch


def _evidence_dtype(arrays: Mapping[str, Any]):
    """The floating dtype the evidence comes in (``None``: no floating evidence):
    the kernel computes in it, so float32 images give float32 results even where
    the model's own constants are float64."""
    return _float_result_type(tuple(a.dtype for a in arrays.values()))


@functools.lru_cache(maxsize=256)
def _float_result_type(dtypes: tuple):
    """:func:`_evidence_dtype` of these dtypes (JAX's dtype rules take a few
    microseconds a call, on a path that takes a few hundred)."""
    floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    return jnp.result_type(*floats) if floats else None


def _to_compiled_dtypes(fg: FactorGraph, arrays: Mapping[str, Any]) -> dict:
    """Evidence in the dtype the graph was compiled with: its tables are a jaxpr
    specialised to that dtype (the kernel still computes in the floating
    evidence's own dtype, :func:`_evidence_dtype`). Floating evidence the
    compile-time dtype cannot hold exactly (wider, or bfloat16 vs float16) is
    refused; other evidence (an int64 or uint8 index compiled as int32, a float
    for an integer) is converted when its values survive the conversion, and
    refused by name when they do not."""
    out = {}
    for name, x in arrays.items():
        ref = _compiled_dtype(fg, name)
        if x.dtype == ref:  # the common case: nothing to convert or refuse
            out[name] = x
            continue
        floats = jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(
            ref, jnp.floating
        )
        if floats and x.dtype != ref:
            if jnp.promote_types(x.dtype, ref) != ref:
                raise ValueError(
                    f"evidence {name!r} is {x.dtype}, but the graph was compiled "
                    f"with {ref} evidence, which would round it: compile the model "
                    f"with {x.dtype} evidence"
                )
            x = x.astype(ref)
        elif not floats:  # integer, bool, or across kinds
            y = x.astype(ref)
            if not isinstance(x, jax.core.Tracer) and not np.array_equal(
                np.asarray(y), np.asarray(x)
            ):
                check_evidence_values(name, x)  # NaN or inf: named as such
                raise ValueError(
                    f"evidence {name!r} is {x.dtype}, but the graph was compiled "
                    f"with {ref} evidence, which cannot hold its values exactly: "
                    f"give {ref} values or compile the model with {x.dtype} evidence"
                )
            x = y
        out[name] = x
    return out


def _compiled_dtype(fg: FactorGraph, name: str):
    """The dtype evidence ``name`` was compiled with (read once per graph: the
    conversion of the compile-time value is a host-to-device copy)."""
    key = ("evidence dtype", name)
    if key not in fg._cache:
        fg._cache[key] = jnp.asarray(fg.kwargs[name]).dtype
    return fg._cache[key]


@functools.lru_cache(maxsize=64)
def _temperature_arg(t: float, x64: bool) -> Array:
    """The traced temperature argument, made once per value (and x64 mode)."""
    return jnp.asarray(t)


def _all_finite_evidence(ev: Mapping[str, Array]) -> Array:
    """Inside the program: whether every floating evidence value is finite (one
    fused reduction each; read on the host with log Z)."""
    ok = jnp.bool_(True)
    for x in ev.values():
        if jnp.issubdtype(x.dtype, jnp.floating):
            ok = ok & all_finite(x)
    return ok


def _cast(tree: Any, dtype) -> Any:
    """Floating leaves of ``tree`` in ``dtype`` (index arrays untouched)."""
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


def _compiled_naive(
    fg: FactorGraph, schedule: Schedule, temperature: float, axes, dtype=None
):
    key = ("naive", schedule, temperature, tuple(sorted(axes.items())), dtype)
    if key in fg._cache:
        return fg._cache[key]
    plan = make_plan(fg, schedule)

    def single(ev):
        fg._cache["n_traces"] = fg._cache.get("n_traces", 0) + 1
        # State-free scale parts go straight to log Z (FactorGraph.evidence_parts).
        groups, offset = fg.group_parts(**ev)
        tables = tuple(t[i] for t in groups for i in range(t.shape[0]))
        out = naive_run_plan(plan, fg, _cast(tables, dtype), temperature)
        return out._replace(log_z=out.log_z + offset.astype(out.log_z.dtype))

    fn = single
    if any(a == 0 for a in axes.values()):
        fn = jax.vmap(single, in_axes=(dict(axes),))
    fg._cache[key] = jax.jit(fn)
    return fg._cache[key]


def _compiled_flat(
    fg: FactorGraph,
    plan: FlatPlan,
    hard: bool,
    want_map: bool,
    want_margs: bool | tuple[str, ...],
    axes,
    dtype=None,
):
    key = (
        "flat",
        id(plan),
        hard,
        want_map,
        want_margs,
        tuple(sorted(axes.items())),
        dtype,
    )
    if key in fg._cache:
        return fg._cache[key][1]

    groups = fg.factor_groups
    # Evidence-free inputs are built once per plan, shared by every variant (the
    # scanned twin below shares the plan's index arrays and so its inputs).
    # The entry holds the plan too: its id stays that plan's while it is cached.
    skey = ("static", id(plan))
    if skey not in fg._cache:
        fg._cache[skey] = (plan, static_inputs(plan, fg.host_tables(), groups))
    static = fg._cache[skey][1]
    if all(a is None for a in axes.values()):
        # One query: a narrow tree plan runs its steps in lax.scan (UNROLL_MIN_WIDTH).
        tkey = ("scanned", id(plan))
        if tkey not in fg._cache:
            fg._cache[tkey] = (plan, scanned_twin(plan))
        plan = fg._cache[tkey][1] or plan

    var_ids = _marginal_vars(fg, want_margs)
    # Leaf messages from keyed tables (flat.run_flat_plan's table_keys); when
    # no other cluster reads an evidence table whole, the template matches run
    # over each patch's distinct templates only.
    # The evidence this call gives, at its compile-time values (one example): the
    # inputs of the static readings of the evidence program below.
    compiled = split_evidence(fg.kwargs)[0]
    example = {k: v for k, v in compiled.items() if k in axes}
    keys = None
    if runs_keyed(plan):  # read at the compile-time evidence's shapes
        keys = _table_keys(fg, plan, example)
    rows = keys is not None and not dense_reads_evidence(plan, keys)
    # Tree tables with evidence-free slices (a switch's OFF states): their part
    # of each message is reduced once, not per evidence instance.
    free = None
    if plan.kind == "tree":
        # Keyed by the evidence names too: a table held at its compile-time
        # value in one call (its evidence not passed) is free there, not in a
        # call that passes that evidence.
        fkey = ("free", id(plan), tuple(sorted(axes)))
        if fkey not in fg._cache:
            fg._cache[fkey] = (plan, _free_tables(fg, plan, example))
        free = fg._cache[fkey][1]

    def single(ev, t, static):
        fg._cache["n_traces"] = fg._cache.get("n_traces", 0) + 1
        # State-free scale parts go straight to log Z (FactorGraph.evidence_parts).
        tables, offset = fg.evidence_blocks(**ev)
        inputs = add_dynamic(plan, _cast(static, dtype), _cast(tables, dtype), groups)
        inputs = inputs._replace(
            constant=inputs.constant
            + _cast(offset, dtype).astype(inputs.constant.dtype)
        )
        t = t if dtype is None else t.astype(dtype)
        out = run_flat_plan(
            plan, inputs, None if hard else t, want_map, var_ids, keys, free
        )
        # Marginals not asked for are not outputs: XLA drops the downward pass.
        margs = out.log_marginals if want_margs else None
        if margs is not None and want_margs is not True:
            # Only the rows asked for leave the program (sites in group order).
            margs = margs[np.asarray(var_ids, np.int32)]
        map_index = out.map_index if want_map else None
        if len(fg.variable_groups) <= HOST_SPLIT_SITES:
            # Per-site arrays inside the program: one dispatch, not a few per site.
            margs, map_index = _flat_posterior(fg, margs, map_index, (), want_margs)
        return out.log_z, margs, map_index, out.deltas

    fn = single
    if any(a == 0 for a in axes.values()):
        fn = jax.vmap(single, in_axes=(dict(axes), None, None))

    def checked(ev, t, static):
        out = fn(ev, t, static)
        # One scalar for the host to read (each array read costs ~30 us there):
        # 0 all well, 1 NaN/inf evidence, 2 a log Z that is not finite.
        status = jnp.where(
            _all_finite_evidence(ev),
            jnp.where(all_finite(out[0]), 0, 2),
            1,
        ).astype(jnp.int32)
        return out, status

    # Template matches against repeated natural parameters, computed once each.
    jitted = jax.jit(
        gemm.dedupe_constant_gemms(checked, rows=rows) if gemm.ENABLED else checked,
        compiler_options=_compiler_options(plan),
    )
    # Keep the plan alive with the cache entry (the key holds its id).
    fg._cache[key] = (plan, lambda ev, t: jitted(ev, t, static))
    return fg._cache[key][1]


#: XLA options for a tree plan run in ``lax.scan`` (one query of a narrow
#: tree, :func:`pgm_drm.graph.plan.scanned_twin`) on the CPU: without XLA's
#: MLIR fusion emitters its small loop bodies compile in 0.27-0.36 s where they
#: took 0.41-0.48 s, and run as fast or faster (chains of 100-10,000 and an HMM
#: of 2,000, sum and max: 17.6 against 17.4 ms, 1.7 against 2.1 ms, ...;
#: measured side by side). Batched programs (a DRM's: 1.7x slower) and loopy
#: sweeps (8-17% slower) keep the default.
SCAN_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def _compiler_options(plan: FlatPlan) -> dict | None:
    """:data:`SCAN_COMPILER_OPTIONS` for a scanned tree plan on the CPU."""
    scanned = plan.kind == "tree" and plan.padded is not None
    return SCAN_COMPILER_OPTIONS if scanned and jax.default_backend() == "cpu" else None


def _specs(ev: Mapping[str, Any]) -> dict:
    """Evidence as shapes and dtypes, for reading the program that takes it."""
    return {
        k: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for k, v in ev.items()
    }


def _table_keys(
    fg: FactorGraph, plan: FlatPlan, ev: Mapping[str, Any]
) -> tuple[np.ndarray, ...] | None:
    """Per pair class of ``plan``, static equality keys ``(n_c, *cards)`` of its
    tables for new evidence ``ev`` (one example's arrays, tracers or shapes): an
    evidence table's from its program (:func:`pgm_drm.graph.keys.equality_keys`),
    an evidence-free one's from its values. ``None`` when the evidence tables
    come in blocks (loop-written models) or their program is too long to read."""
    got = equality_keys(lambda e: fg.evidence_blocks(**e)[0], _specs(ev))
    if not isinstance(got, dict):
        return None
    host = fg.host_tables()
    return tuple(
        np.concatenate([got[k] if k in got else value_keys(host[k]) for k in members])
        for members in plan.pairs
    )


#: Tree plans with more evidence-dependent pair groups than this are not read
#: for evidence-free slices (:func:`_free_tables`).
FREE_MAX_GROUPS = 64


def _free_tables(
    fg: FactorGraph, plan: FlatPlan, ev: Mapping[str, Any]
) -> tuple[FreeSlices | None, ...] | None:
    """Per pair class of a tree ``plan``, the slices of its tables that no
    evidence changes (:func:`pgm_drm.inference.flat.free_slices`), read from the
    evidence program as :func:`infer` runs it (after
    ``gemm.dedupe_constant_gemms``, which makes a switch's OFF states exact
    zeros) by :func:`pgm_drm.graph.keys.input_dependence`; their values from one
    evaluation at ``ev`` (one example's evidence: a free entry is the same at
    every value). ``None`` when no class has such slices, when no pair class
    reads evidence, or when the evidence tables come in blocks."""
    n_dynamic = sum(len(m) - n for m, n in zip(plan.pairs, plan.n_static, strict=True))
    if not 0 < n_dynamic <= FREE_MAX_GROUPS:
        # None to split, or a loop-written model whose evidence program is
        # long: reading it would cost its first result more than a split saves.
        return None

    def tables(e):
        return fg.evidence_blocks(**e)[0]

    fn = gemm.dedupe_constant_gemms(tables) if gemm.ENABLED else tables
    dep = input_dependence(fn, _specs(ev))
    if not isinstance(dep, dict):
        return None
    # Evaluated eagerly, the evidence is known and nothing is rewritten: a free
    # entry is then x . 0 plus its constant, the same for any finite x (and
    # compile_model refuses non-finite evidence).
    values = fn(ev)
    host = fg.host_tables()
    out = []
    for members, n_static in zip(plan.pairs, plan.n_static, strict=True):
        if len(members) == n_static:
            out.append(None)
            continue
        d = np.concatenate(
            [dep[k] if k in dep else np.zeros(np.shape(host[k]), bool) for k in members]
        )
        v = np.concatenate(
            [np.asarray(values[k] if k in values else host[k]) for k in members]
        )
        out.append(free_slices(d, v))
    return tuple(out) if any(o is not None for o in out) else None


def _resolve_schedule(fg: FactorGraph, schedule: str | Schedule | FlatPlan):
    if isinstance(schedule, (Schedule, FlatPlan)):
        return schedule
    if schedule == "auto":
        return fg.plan("tree") if fg.is_tree() else fg.plan("exact")
    if schedule in ("tree", "loopy", "exact"):
        return fg.plan(schedule)
    raise ValueError(
        f"unknown schedule kind {schedule!r}; use 'auto', 'tree', 'exact' or 'loopy'"
    )


def log_partition_tables(
    fg: FactorGraph, schedule: str | Schedule | FlatPlan = "auto"
) -> Callable[[Mapping[int, Array]], Array]:
    """The exact sum-product ``log Z`` as a pure function of the graph's
    evidence-dependent tables (jit, vmap and differentiate it).

    The gradient identity: ``d log Z / d tables[k]`` is the posterior marginal of
    factor group ``k`` (``(n_instances, *cards)``, each instance summing to one),
    so ``jax.grad`` of this function is the E-step of EM.

    Args:
        fg: A compiled graph.
        schedule: "auto", "tree" or "exact" (junction tree), both on the flat
            kernel, or a two-pass :class:`~pgm_drm.graph.Schedule` (naive twin) /
            :class:`~pgm_drm.graph.FlatPlan`. Loopy schedules are refused: the
            Bethe estimate is not ``log Z``.

    Returns:
        ``f(tables) -> log Z`` where ``tables`` maps the index of every factor
        group that depends on evidence to its table, as from
        ``fg.evidence_tables(**evidence)``. Evidence-free tables are fixed.

    Raises:
        ValueError: A loopy or unknown schedule.
    """
    sched = _resolve_schedule(fg, schedule)
    if not sched.is_exact:
        raise ValueError(
            f"log_partition needs an exact schedule ('auto', 'tree' or 'exact'), got "
            f"{sched.kind!r}: loopy belief propagation only estimates log Z"
        )
    groups = fg.factor_groups
    if isinstance(sched, FlatPlan):
        static = static_inputs(sched, fg.host_tables(), groups)

        def flat(tables: Mapping[int, Array]) -> Array:
            inputs = add_dynamic(sched, static, dict(tables), groups)
            return run_flat_plan(sched, inputs, 1.0, want_map=False).log_z

        return flat
    plan = make_plan(fg, sched)
    fixed = fg.group_tables()

    def naive(tables: Mapping[int, Array]) -> Array:
        per_instance = []
        for k, t in enumerate(fixed):
            t = tables.get(k, t)
            per_instance.extend(t[i] for i in range(t.shape[0]))
        return naive_run_plan(plan, fg, tuple(per_instance), 1.0).log_z

    return naive


def log_partition(
    fg: FactorGraph, schedule: str | Schedule | FlatPlan = "auto"
) -> Callable[[Mapping[str, Any]], Array]:
    """The exact sum-product ``log Z`` (``log p(evidence)``) as a pure function of
    the evidence: unlike :func:`infer`, nothing is checked on the host, so the
    function can be jitted, vmapped over a batch and differentiated.

    ``jax.grad`` of it with respect to an evidence array that parametrises the
    tables (a parameter passed as a keyword argument) gives the expected
    sufficient statistics: ``d log Z / d eta = E[T]``
    (see :func:`log_partition_tables`).

    Args:
        fg: A compiled graph.
        schedule: As in :func:`log_partition_tables`.

    Returns:
        ``f(evidence) -> log Z`` (a scalar) for one evidence instance; evidence
        not given keeps its compile-time value. ``-inf`` table entries (hard
        zeros) give finite gradients.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from pgm_drm.graph import compile_model
        >>> def model(w=None, x=None):
        ...     z = numpyro.sample("z", dist.Bernoulli(0.5))
        ...     numpyro.sample("x", dist.Normal(w * z, 1.0), obs=x)
        >>> fg = compile_model(model, w=jnp.array(2.0), x=jnp.array(3.0))
        >>> f = log_partition(fg)
        >>> g = jax.grad(lambda w: f({"w": w, "x": jnp.array(3.0)}))(2.0)
        >>> round(float(g), 4)  # E[z (x - w z)] = P(z = 1 | x) = 1 / (1 + e^-4)
        0.982
    """
    from_tables = log_partition_tables(fg, schedule)

    def f(evidence: Mapping[str, Any]) -> Array:
        return from_tables(fg.evidence_tables(**evidence))

    return f


def infer(
    fg: FactorGraph,
    semiring: Semiring = "sum",
    *,
    temperature: float | None = None,
    schedule: str | Schedule | FlatPlan = "auto",
    map: bool = True,  # noqa: A002 - the natural name for "decode the MAP"
    marginals: bool | str | Sequence[str] = True,
    **evidence: Any,
) -> Posterior:
    """Run max-sum, sum-product or tempered message passing on a compiled graph.

    Tree, exact (a junction tree, for graphs with loops) and loopy schedules run
    the flat kernel (:mod:`pgm_drm.inference.flat`) on the graph's grouped
    tables; an explicit :class:`~pgm_drm.graph.Schedule` runs the per-message
    naive twin (:mod:`pgm_drm.inference.kernel`).

    A call like an earlier successful one (the same options, evidence of the
    same names, shapes and dtypes, given as JAX arrays, none of it read by the
    graph's own checks) skips the host-side checks that cannot fail again and
    runs the compiled program directly; the program still checks the values,
    and any problem sends the call down the full path, which names it.

    Args:
        fg: A graph from :func:`pgm_drm.graph.compile_model`.
        semiring: "sum" (T=1) or "max" (T=0).
        temperature: Overrides ``semiring``: ``T * logsumexp(x / T)`` reductions
            (paper §6.2.1); T=0 is max-sum. Flat plans compile once for every
            T > 0 (the temperature is a traced argument).
        schedule: "auto" (tree when the graph is a forest, else "exact"), "tree",
            "exact", "loopy", a :class:`~pgm_drm.graph.Schedule` or a
            :class:`~pgm_drm.graph.FlatPlan` (``fg.plan("loopy", damping=0.5,
            max_iters=100)``).
        map: Decode the joint MAP. ``False`` skips the backtracking (and, for
            T > 0, the extra max-sum pass); ``Posterior.map`` is then empty.
        marginals: ``True``: every latent site's marginals. ``False``: ``log_z``
            (and the MAP) only; on a tree the downward pass is skipped, and
            ``Posterior.log_marginals`` is empty. A site name or a list of them:
            those sites' marginals only; with a tree or junction-tree (flat)
            plan, when each of their variables sits in a root (on a tree its
            root variable; on a junction tree any variable of a root cluster,
            such as a DRM's class ``c``), the upward pass alone gives them
            exactly and the downward pass is skipped too (loopy plans and an
            explicit ``Schedule`` run in full and keep the sites asked for).
        **evidence: New values for the array keyword arguments the graph was
            compiled with; a leading extra axis is a batch (vmapped; the graph is
            traced and jitted once per schedule and batching pattern). With
            several devices the batch is sharded over all of them
            (:func:`pgm_drm.sharding.shard_batch`; padded when it does not divide
            the device count, the padding dropped from the results).

    Returns:
        A :class:`Posterior`.

    Raises:
        ValueError: Unknown evidence names, wrong shapes, NaN/inf evidence,
            evidence the compiled dtype cannot hold, bad semiring or temperature,
            evidence of probability zero, NaN tables; new evidence that changes
            a latent's support, makes a latent's probabilities not sum to one or
            puts a parameter outside its constraint
            (:meth:`~pgm_drm.graph.FactorGraph.check_new_evidence`). Under
            ``jax.grad`` (which gives the gradient of log Z with respect to the
            evidence) NaN/inf evidence and probability zero are still refused,
            without naming the entries or sites.
        TypeError: Inside ``jax.jit`` or ``jax.vmap``: ``infer`` reads a status
            flag on the host. Give it a batch (a leading batch axis), or use
            :func:`log_partition` for log Z as a pure function.

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from pgm_drm.graph import compile_model
        >>> def model(x=None):
        ...     z = numpyro.sample("z", dist.Bernoulli(0.5))
        ...     numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
        >>> post = infer(compile_model(model, x=jnp.array(2.0)), "sum")
        >>> round(float(post.marginals["z"][1]), 4)
        0.8808
    """
    key = _repeat_key(semiring, temperature, schedule, map, marginals, evidence)
    if key is not None:
        run = fg._cache.get(key)
        post = None if run is None else run(evidence)
        if post is not None:
            return post
    return _infer(fg, semiring, temperature, schedule, map, marginals, evidence, key)


# The first call builds a plan and traces the kernel: one Python object per
# equation of a loop-written model, which every full collection re-scans (HMM of
# 4,000 steps, first call: 2.2-2.5 s with the collector on, 1.3 s paused).
@_gc_paused()
def _infer(
    fg: FactorGraph,
    semiring: Semiring,
    temperature: float | None,
    schedule: str | Schedule | FlatPlan,
    map: bool,  # noqa: A002
    marginals: bool | str | Sequence[str],
    evidence: dict[str, Any],
    repeat_key: tuple | None = None,
) -> Posterior:
    """:func:`infer`'s full path: every check on the host, the program found
    (or traced and compiled), run, and its status read; a call that
    :func:`_repeat_call` can serve next time is registered for it."""
    fg.check_dtype_mode()
    t = resolve_temperature(semiring, temperature)
    want_margs = _marginal_sites(fg, marginals)
    sched = _resolve_schedule(fg, schedule)
    flat = isinstance(sched, FlatPlan)
    # The flat program checks the values itself (one transfer with log Z).
    try:
        arrays, axes, batch = _check_evidence(fg, evidence, values=not flat)
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
    ) as err:  # the naive path reads the values on the host
        raise TypeError(_TRACED_INFER) from err
    dtype = _evidence_dtype(arrays)
    arrays = _to_compiled_dtypes(fg, arrays)
    fg.check_new_evidence(arrays, {k: axes[k] == 0 for k in arrays})
    lead = () if batch is None else (batch,)
    padded = False  # whether the batch was padded to the device count
    given = arrays  # unpadded: what an error about the evidence counts
    if batch is not None:  # spread the batch over every device (identity on one)
        batched = shard_batch({k: v for k, v in arrays.items() if axes[k] == 0})[0]
        padded = any(jnp.shape(v)[0] != batch for v in batched.values())
        arrays = {**arrays, **batched}
    if flat:
        fn = _compiled_flat(fg, sched, t == 0.0, bool(map), want_margs, axes, dtype)
        t_arg = _temperature_arg(t if t > 0 else 1.0, jax.config.jax_enable_x64)
        out, status = fn(arrays, t_arg)
        # Dropping padding walks every output (tens of microseconds on a
        # DRM's): only when there is some.
        out = unpad(out, batch) if padded else out
        log_z = out[0]
        # The one host read when all is well (_read_status).
        try:
            status = _read_status(out, status)
        except jax.errors.TracerArrayConversionError as err:
            raise TypeError(_TRACED_INFER) from err
        # Under jax.grad, say: the evidence is traced (log Z need not be).
        if status and any(isinstance(v, jax.core.Tracer) for v in given.values()):
            what = (
                "the evidence contains NaN or inf values"
                if status == 1
                else "log Z is not finite (evidence of probability zero, or a "
                "NaN/+inf table)"
            )
            raise ValueError(
                f"{what}; call infer outside the JAX transform to have the "
                "entries or sites named"
            )
        if status == 1:  # names the evidence and counts its NaN/inf entries
            for name, x in given.items():
                check_evidence_values(name, x)
            raise ValueError("the evidence contains NaN or inf values")
        if status:
            _check_log_z(log_z, fg, arrays, axes)
        post = _flat_result(fg, out, t, sched, lead, want_margs)
        if (
            repeat_key is not None
            and not padded
            # Several devices: a batch already spread as shard_batch spreads
            # it comes back as itself, but the next one may not be.
            and (batch is None or jax.device_count() == 1)
            and all(k in arrays and arrays[k] is v for k, v in evidence.items())
            and not fg.checks_new_evidence(evidence)
        ):
            fg._cache[repeat_key] = _repeat_call(
                fg, fn, t_arg, t, sched, lead, want_margs
            )
        return post
    out = _compiled_naive(fg, sched, t, axes, dtype)(arrays)
    out = unpad(out, batch) if padded else out
    _check_log_z(out.log_z, fg, arrays, axes)
    want = fg.latent_sites if want_margs is True else (want_margs or ())
    margs: dict[str, Array] = {}
    maps: dict[str, Array] = {}
    for site in fg.latent_sites:
        info = fg.sites[site]
        ids = [k for k, v in enumerate(fg.variables) if v.site == site]
        if site in want:
            m = jnp.stack([out.log_marginals[k] for k in ids], axis=len(lead))
            shape = lead + info.plate_shape + (len(info.support),)
            margs[site] = jnp.reshape(m, shape)
        if map:
            idx = jnp.stack([out.map_index[k] for k in ids], axis=len(lead))
            support = jnp.asarray(np.asarray(info.support))
            maps[site] = jnp.reshape(support[idx], lead + info.plate_shape)
    deltas = None if sched.is_exact else out.deltas
    return Posterior(margs, maps, out.log_z, t, sched.kind, deltas)


def _read_status(out: Any, status: Array) -> int:
    """The program's status scalar on the host, once every output is ready.

    Waiting for all outputs at once (``jax.block_until_ready``: one batched
    wait) and then reading the ready scalar costs nothing measurable on top
    of the program, where reading the scalar first (or blocking on it alone)
    added 10-35 us to a DRM batch of a few hundred (CPU, 2 cores). The
    caller reads every output next anyway. ``np.asarray``: ``int()`` of a JAX
    scalar takes a slower path (~20 us against ~4). Raises JAX's
    ``TracerArrayConversionError`` under a transform."""
    if not isinstance(status, jax.core.Tracer):
        jax.block_until_ready((out, status))
    return int(np.asarray(status))


def _repeat_key(
    semiring: Any,
    temperature: Any,
    schedule: Any,
    map: Any,  # noqa: A002
    marginals: Any,
    evidence: Mapping[str, Any],
) -> tuple | None:
    """The key of an :func:`infer` call that a repeat call can serve
    (:func:`_repeat_call`), or ``None``: evidence all concrete JAX arrays (its
    names, shapes and dtypes in the key), a schedule named by a string, and
    hashable options. Arguments that are not valid never get an entry: only a
    full call that succeeds registers one."""
    if type(schedule) is not str or type(semiring) is not str:
        return None
    # Keyed by type and repr: 0.5 and 0.5 + 0j, or 0.0 and -0.0, are equal as
    # keys; an argument the full path would refuse must reach it.
    if temperature is not None and type(temperature) not in (int, float):
        return None
    temperature = (type(temperature), repr(temperature))
    if isinstance(marginals, list | tuple):
        marginals = (type(marginals), tuple(marginals))
    elif isinstance(marginals, set | frozenset):
        marginals = (frozenset, frozenset(marginals))
    else:  # a flag or one name (keyed with its type, as the sequences are)
        marginals = (type(marginals), marginals)
    ev = []
    for name, x in evidence.items():
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return None
        ev.append((name, x.shape, x.dtype, x.weak_type))
    key = (
        "repeat",
        semiring,
        temperature,
        schedule,
        (type(map), map),
        marginals,
        jax.config.jax_enable_x64,
        tuple(ev),
    )
    try:
        hash(key)
    except TypeError:  # an option given as an array
        return None
    return key


def _repeat_call(
    fg: FactorGraph,
    fn: Callable,
    t_arg: Array,
    t: float,
    plan: FlatPlan,
    lead: tuple,
    want_margs: bool | tuple[str, ...],
) -> Callable[[Mapping[str, Array]], Posterior | None]:
    """A repeat of an :func:`infer` call whose host checks cannot fail again
    (same evidence names, shapes and dtypes; none the graph's own checks read;
    nothing converted, sharded or padded): only the program and its status
    read, where the full path costs tens of microseconds of Python per call (a
    DRM batch takes a few hundred). ``None`` when the status is not 0, or
    under a JAX transform: the full path then runs, and names the problem."""

    def run(evidence: Mapping[str, Array]) -> Posterior | None:
        out, status = fn(evidence, t_arg)
        try:
            if _read_status(out, status):
                return None
        except jax.errors.TracerArrayConversionError:
            return None
        return _flat_result(fg, out, t, plan, lead, want_margs)

    return run


def _flat_result(
    fg: FactorGraph,
    out: tuple,
    t: float,
    plan: FlatPlan,
    lead: tuple,
    want_margs: bool | tuple[str, ...],
) -> Posterior:
    """The :class:`Posterior` of a flat program's checked outputs ``(log_z,
    marginals, MAP, deltas)``: per-site arrays split in the program up to
    ``HOST_SPLIT_SITES`` sites, on the host past it."""
    log_z, margs, maps, deltas = out
    if len(fg.variable_groups) > HOST_SPLIT_SITES:
        margs, maps = _flat_posterior(fg, margs, maps, lead, want_margs)
    else:
        margs, maps = margs or {}, maps or {}
    deltas = None if plan.is_exact else deltas
    return Posterior(margs, maps, log_z, t, plan.kind, deltas)


def _where(bad: np.ndarray) -> str:
    """`` at batch index [i, ...]`` for a batched log Z, else nothing."""
    if bad.ndim == 0:
        return ""
    idx = np.argwhere(bad)
    shown = ", ".join(str(tuple(int(j) for j in i)) for i in idx[:5])
    more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
    return f" at batch index {shown}{more}"


def _offending_sites(
    fg: FactorGraph, arrays: Mapping[str, Array], axes: Mapping, bad: np.ndarray, test
) -> list[str]:
    """The sites whose evidence-dependent table holds an entry ``test`` flags,
    read at the first flagged batch index (only on the error path: the tables
    are recomputed on the host for that one instance). Evidence-free tables were
    checked at compile time."""
    first = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else ()
    ev = {k: (v[first] if axes.get(k) == 0 and first else v) for k, v in arrays.items()}
    tables = fg.evidence_tables(**ev)
    return [
        fg.factor_groups[k].site for k, t in tables.items() if test(np.asarray(t)).any()
    ]


def _neginf_in_every_state(table: np.ndarray) -> np.ndarray:
    """Per instance (axis 0) of a group's table: ``-inf`` at every state."""
    t = np.isneginf(table)
    return t.reshape(t.shape[0], -1).all(axis=1) if t.ndim > 1 else t


#: Why ``infer`` cannot run inside ``jax.jit`` or ``jax.vmap``.
_TRACED_INFER = (
    "infer reads a status flag on the host after each run (on a two-pass "
    "Schedule, the evidence itself) to name NaN evidence, evidence of probability "
    "zero, ..., which it cannot do inside jax.jit or jax.vmap (nor, on a two-pass "
    "Schedule, jax.grad). Give it a batch instead (evidence with a leading batch "
    "axis: one compiled, vmapped run), or, for log Z as a pure function to jit, "
    "vmap and differentiate, use pgm_drm.inference.log_partition"
)


def _check_log_z(
    log_z: Array, fg: FactorGraph, arrays: Mapping[str, Array], axes: Mapping
) -> None:
    log_z = np.asarray(log_z)
    if np.isfinite(log_z).all():  # the common case: one test, not three
        return

    def culprits(bad, test) -> str:
        sites = _offending_sites(fg, arrays, axes, bad, test)
        return f" (site(s) {sites})" if sites else ""

    if np.any(np.isnan(log_z)):
        bad = np.isnan(log_z)
        raise ValueError(
            f"log Z is NaN{_where(bad)}: a factor table holds NaN"
            f"{culprits(bad, np.isnan)} (only -inf, a hard zero, is a legal "
            "non-finite log-potential)"
        )
    if np.any(np.isneginf(log_z)):
        bad = np.isneginf(log_z)
        impossible = _offending_sites(fg, arrays, axes, bad, _neginf_in_every_state)
        raise ValueError(
            "the evidence has probability zero under the model (log Z = -inf)"
            f"{_where(bad)}"
            + (
                f"; whatever the latents, the evidence of site(s) {impossible} "
                "scores -inf (a value outside its distribution's support?)"
                if impossible
                else ""
            )
        )
    if np.any(np.isposinf(log_z)):
        bad = np.isposinf(log_z)
        raise ValueError(
            f"log Z is +inf{_where(bad)}: a factor table holds +inf"
            f"{culprits(bad, np.isposinf)}"
        )


#: Above this many latent sites, per-site arrays are split on the host and returned
#: as numpy arrays: a model written as a loop has thousands of sites, and one device
#: dispatch (or one program output) per site would cost more than the run itself.
#: Up to it, the jitted program returns the per-site arrays itself.
HOST_SPLIT_SITES = 64


def _marginal_sites(fg: FactorGraph, marginals) -> bool | tuple[str, ...]:
    """``infer``'s ``marginals`` argument as True, False or a sorted tuple of
    latent site names (checked); a name, or a list, tuple or set of names."""
    if isinstance(marginals, str):
        names: tuple = (marginals,)
    elif isinstance(marginals, (list, tuple, set, frozenset)):
        names = tuple(marginals)
    else:  # True / False / None / a 0-d boolean array, as before
        return bool(marginals)
    unknown = [n for n in names if n not in fg.latent_sites]
    if unknown:
        raise ValueError(
            f"marginals: no latent site named {unknown}; the graph's latent sites "
            f"are {list(fg.latent_sites)}"
        )
    return tuple(sorted(set(names)))


def _marginal_vars(fg: FactorGraph, want) -> bool | tuple[int, ...]:
    """The flat variable ids of the sites in ``want`` (or ``want`` itself)."""
    if isinstance(want, bool):
        return want
    return tuple(
        i
        for g in fg.variable_groups
        if g.site in want
        for i in range(g.offset, g.offset + g.size)
    )


def _site_layout(fg: FactorGraph) -> tuple:
    """Per latent site, once per graph: ``(site, offset, size, cardinality,
    plate_shape, support as numpy, support is 0..K-1)``."""
    key = ("site_layout",)
    if key not in fg._cache:
        out = []
        # support -> (array, identity): a loop's sites share one. Keyed by the
        # values' reprs: (0, 1), (0.0, 1.0), (False, True) and (-0.0, 1.0) are
        # equal as tuples.
        seen: dict = {}
        for g in fg.variable_groups:
            skey = tuple(map(repr, g.support))
            got = seen.get(skey)
            if got is None:
                sup = np.asarray(g.support)
                ident = bool(
                    np.issubdtype(sup.dtype, np.integer)
                    and np.array_equal(sup, np.arange(len(sup)))
                )
                got = seen[skey] = (sup, ident)
            out.append((g.site, g.offset, g.size, g.cardinality, g.plate_shape, *got))
        fg._cache[key] = tuple(out)
    return fg._cache[key]


def _site_runs(fg: FactorGraph) -> tuple:
    """:func:`_site_layout` cut into runs of consecutive sites alike in size,
    cardinality, plate shape and support (a loop's sites): ``(names, offset,
    size, cardinality, plate_shape, support, identity)``, once per graph."""
    key = ("site_runs",)
    if key not in fg._cache:
        runs: list = []
        for site, off, size, card, shape, sup, ident in _site_layout(fg):
            if runs:
                names, off0, size0, card0, shape0, sup0, ident0 = runs[-1]
                if (
                    (size, card, shape, ident) == (size0, card0, shape0, ident0)
                    and off == off0 + len(names) * size0
                    and (
                        sup is sup0
                        or (sup.dtype == sup0.dtype and np.array_equal(sup, sup0))
                    )
                ):
                    names.append(site)
                    continue
            runs.append(([site], off, size, card, shape, sup, ident))
        fg._cache[key] = tuple((tuple(r[0]), *r[1:]) for r in runs)
    return fg._cache[key]


def _host_posterior(fg: FactorGraph, margs, map_index, lead: tuple, sites):
    """:func:`_flat_posterior` on numpy arrays, a run of alike sites at a time:
    one slice, reshape and support lookup per run, then a view per site (a
    10,000-site loop model: about 0.5 µs a site, where slicing each site cost
    1.7 µs)."""
    b = (slice(None),) * len(lead)
    out_m: dict[str, Array] = {}
    out_map: dict[str, Array] = {}
    row = 0  # where the next asked-for site's rows start in ``margs``
    for names, off, size, card, shape, sup, ident in _site_runs(fg):
        n = len(names)
        if margs is not None and sites is True:
            blk = margs[(*b, slice(off, off + n * size), slice(0, card))]
            blk = blk.reshape(lead + (n,) + shape + (card,))
            for i, site in enumerate(names):
                out_m[site] = blk[(*b, i, ...)]
        elif margs is not None:
            for site in names:
                if site in sites:
                    m = margs[(*b, slice(row, row + size), slice(0, card))]
                    out_m[site] = m.reshape(lead + shape + (card,))
                    row += size
        if map_index is not None:
            idx = map_index[(*b, slice(off, off + n * size))]
            val = idx.astype(sup.dtype) if ident else sup[idx]
            val = val.reshape(lead + (n,) + shape)
            for i, site in enumerate(names):
                out_map[site] = val[(*b, i, ...)]
    return out_m, out_map


def _flat_posterior(fg: FactorGraph, margs, map_index, lead: tuple, sites=True):
    """Per-site arrays from the flat ``(.., n_vars, kmax)`` / ``(.., n_vars)``
    ones; marginals only of ``sites`` (True: all; else ``margs`` holds only
    their rows, in group order, as the program returns them)."""
    layout = _site_layout(fg)
    host = len(layout) > HOST_SPLIT_SITES
    if host:
        margs = None if margs is None else np.asarray(margs)
        map_index = None if map_index is None else np.asarray(map_index)
        return _host_posterior(fg, margs, map_index, lead, sites)
    b = (slice(None),) * len(lead)
    out_m: dict[str, Array] = {}
    out_map: dict[str, Array] = {}
    row = 0  # where the next asked-for site's rows start in ``margs``
    for site, off, size, card, plate_shape, sup, _ in layout:
        if margs is not None and (sites is True or site in sites):
            at = slice(off, off + size) if sites is True else slice(row, row + size)
            row += size
            m = margs[(*b, at, slice(0, card))]
            out_m[site] = m.reshape(lead + plate_shape + (card,))
        if map_index is not None:
            idx = map_index[(*b, slice(off, off + size))]
            out_map[site] = jnp.asarray(sup)[idx].reshape(lead + plate_shape)
    return out_m, out_map
