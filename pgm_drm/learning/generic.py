"""Learn any compiled model: the exact log-likelihood as a differentiable function,
EM from the compiled marginals, and Adam on the exact log-likelihood.

A model is any NumPyro model with finite discrete latents, written for *one*
example, whose learnable parameters are ``numpyro.param`` sites. The data is a
dict of the model's observed keyword arguments, each with a leading batch axis.

The parameters become *evidence* of the compiled graph: the model is compiled
once through a wrapper that substitutes each ``numpyro.param`` site with an
extra array keyword argument, so the tables that depend on a parameter are
recomputed from the traced parameter and every other table stays static.
``log Z`` of that graph (:func:`pgm_drm.inference.log_partition_tables`) is
then a pure function of (parameters, one example), vmapped over the batch.

EM uses the gradient identity: the factor marginals ``B_f`` are ``d log Z / d
table_f``, so the E-step is one ``jax.grad``. The M-step maximises the expected
complete-data log-likelihood ``Q(theta) = sum_n sum_f <B_f, table_f(theta)>``
(``B`` fixed at the old parameters; ``Q`` is linear in the tables). Closed forms
are used where ``Q`` has the form of a conjugate exponential-family update, read
from the gradient of ``Q`` itself; a form is used only when the change of ``Q``
it predicts is the actual change and the gradient of ``Q`` vanishes at its
candidate (the first check alone cannot see a wrong form once the step is below
the rounding of ``Q``):

- simplex parameters entering as ``log theta`` (Categorical probabilities):
  ``theta ∝ theta * dQ/dtheta``, the normalised expected counts;
- unit-interval parameters (Bernoulli probabilities): ``p (1 - p) dQ/dp`` is
  affine in ``p`` (``A - N p``), its root ``A / N`` the expected frequency;
- real parameters entering quadratically with a diagonal Hessian (Normal
  means): one Newton step, the weighted mean;
- positive parameters (Normal scales): ``sigma dQ/dsigma`` is affine in
  ``sigma^-2`` (``S sigma^-2 - D``), its root the weighted second moment.

Any other parameter (or one whose closed form fails its checks) gets a few optax
L-BFGS steps on ``Q`` in unconstrained space (generalised EM), in one compiled
program whichever parameters they are. Their zoom line search (Wolfe
conditions) makes every step raise ``Q`` wherever its gradient is not zero, so
the fit does not stall short of a stationary point; a fixed-step optimiser such
as Adam does: near the maximum its first step (``learning_rate`` per
coordinate, whatever the gradient's size) overshoots, every block is rejected,
and the log-likelihood stops short by an amount that grows with
``learning_rate``. Every block is accepted only if ``Q`` does not decrease, so
the log-likelihood never does.
Constrained parameters live in NumPyro's unconstrained space
(``biject_to(constraint)``); nothing is clipped.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from pgm_drm._typing import Array
from pgm_drm.graph.compile import CompileError, compile_model, model_sites
from pgm_drm.inference.api import log_partition_tables
from pgm_drm.learning.io import fingerprint
from pgm_drm.learning.loop import (
    Algorithm,
    LoopOptions,
    check_n_iter,
    run_loop,
    tolerance,
)
from pgm_drm.sharding import pad_to_devices, shard_batch

__all__ = ["ModelFit", "fit", "model_log_likelihood", "model_params"]

#: Keyword-argument prefixes of the wrapper model (parameters, clamped values,
#: clamp masks); a model's own keyword arguments may not start with them.
PARAM = "param__"
CLAMP = "clamp__"
MASK = "clampmask__"

#: Compiled graphs kept for reuse (one per model and data / parameter layout).
CACHE_SIZE = 16
_CACHE: OrderedDict = OrderedDict()


class ParamSpec(NamedTuple):
    """A ``numpyro.param`` site: its initial value, constraint and event dim."""

    init: np.ndarray
    constraint: Any
    event_dim: int | None


class ModelFit(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
        params: ``name -> array``: the fitted ``numpyro.param`` values
            (constrained: probabilities on the simplex, scales positive).
        log_likelihood: ``(n_iter + 1,)`` the total ``sum_n log p(data_n)`` (with
            the clamped latent values where given) at the parameters after
            ``0, 1, ..., n_iter`` iterations.
        n_iter: Iterations run in total (EM steps or Adam steps).
        converged: Whether the total changed by less than ``tol``.
        method: "em" or "adam".
        closed_form: EM: the parameters whose last M-step was a closed form
            (the others got generalised EM steps); empty for Adam.
    """

    params: dict[str, Array]
    log_likelihood: np.ndarray
    n_iter: int
    converged: bool
    method: str
    closed_form: tuple[str, ...] = ()


# --------------------------------------------------------------------------- #
# The wrapped model and its compiled graph.
# --------------------------------------------------------------------------- #


def _wrap(model: Callable, names: tuple[str, ...], clamped: tuple[str, ...]):
    """``model`` with its params read from ``param__<name>`` keyword arguments and
    a hard-zero factor ``clamp__<site>`` for each clamped latent site."""

    def wrapped(**kwargs):
        params = {n: kwargs.pop(PARAM + n) for n in names}
        clamps = {n: (kwargs.pop(CLAMP + n), kwargs.pop(MASK + n)) for n in clamped}
        with handlers.trace() as tr:
            out = handlers.substitute(model, data=params)(**kwargs)
        for site, (value, mask) in clamps.items():
            z = tr[site]["value"]
            value = jnp.reshape(value, jnp.shape(z))
            mask = jnp.reshape(mask, jnp.shape(z))
            frames = sorted(
                (f for f in tr[site]["cond_indep_stack"] if f.dim is not None),
                key=lambda f: f.dim,
            )
            with contextlib.ExitStack() as stack:
                for f in frames:
                    stack.enter_context(numpyro.plate(f.name, f.size, dim=f.dim))
                hit = jnp.where(z == value, 0.0, -jnp.inf)
                numpyro.factor(CLAMP + site, jnp.where(mask, hit, 0.0))
        return out

    return wrapped


def model_params(model: Callable, **example: Any) -> dict[str, ParamSpec]:
    """The ``numpyro.param`` sites of ``model`` traced on one example.

    Raises:
        CompileError: A latent site is continuous (not collapsed), or another
            reason :func:`pgm_drm.graph.model_sites` refuses the model.
    """
    return _param_specs(model_sites(model, **example))


def _param_specs(tr: Mapping[str, dict]) -> dict[str, ParamSpec]:
    out = {}
    for name, site in tr.items():
        if site["type"] != "param":
            continue
        kw = site.get("kwargs", {})
        out[name] = ParamSpec(
            np.asarray(site["value"]),
            kw.get("constraint", constraints.real),
            kw.get("event_dim"),
        )
    return out


class _Graph(NamedTuple):
    fg: Any
    names: tuple[str, ...]
    clamped: tuple[str, ...]
    specs: dict[str, ParamSpec]
    log_z: Callable  # (params, example) -> log Z
    tables: Callable  # (params, example) -> {group: table}
    from_tables: Callable  # {group: table} -> log Z
    param_groups: tuple[int, ...]  # groups whose tables depend on a parameter
    total: Callable  # jitted (params, batch, weights) -> sum of log Z
    each: Callable  # jitted (params, batch) -> log Z per example
    jitted: dict  # the fit's jitted steps, by settings


def _placeholder(x: Any) -> np.ndarray:
    """One example of a batched array (zeros when it is traced)."""
    try:
        return np.asarray(x[0])
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return np.zeros(jnp.shape(x)[1:], jnp.result_type(x))


def _check_data(data: Mapping[str, Any], clamp: Mapping[str, Any]) -> int:
    if not isinstance(data, Mapping) or not data:
        raise ValueError(
            "data must be a non-empty dict of the model's observed keyword "
            "arguments, each with a leading batch axis"
        )
    sizes = {}
    for k, v in data.items():
        if jnp.ndim(v) < 1:
            raise ValueError(
                f"data {k!r} is a scalar; every data entry needs a leading batch axis"
            )
        if k.startswith((PARAM, CLAMP, MASK)):
            raise ValueError(f"data name {k!r} uses a reserved prefix")
        _check_data_finite(k, v)
        sizes[k] = jnp.shape(v)[0]
    for site, (value, mask) in clamp.items():
        sizes[f"clamp[{site!r}] values"] = jnp.shape(value)[0]
        if jnp.shape(mask) != jnp.shape(value):
            raise ValueError(
                f"clamp[{site!r}]: mask shape {jnp.shape(mask)} != values shape "
                f"{jnp.shape(value)}"
            )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"data entries have different batch sizes: {sizes}; every entry's "
            "leading axis is the example axis"
        )
    n = next(iter(sizes.values()))
    if n < 1:
        raise ValueError("data is empty (batch size 0)")
    return int(n)


def _traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a JAX tracer (under jit, grad, vmap)."""
    return any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(tree))


def _check_data_finite(name: str, value: Any) -> None:
    """Refuse NaN or inf in a data entry (its log-likelihood would be NaN, and
    a fit would blame the model). A traced entry cannot be checked."""
    if _traced(value):
        return
    # On the host: jnp operations under a user's jit would be traced.
    a = np.asarray(value)
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        return
    if not jnp.issubdtype(a.dtype, jnp.complexfloating):
        a = a.astype(np.float64)  # bfloat16 and the other ml_dtypes too
    bad = ~np.isfinite(a).reshape(a.shape[0], -1).all(1)
    if bad.any():
        idx = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(
            f"data {name!r} holds NaN or inf (example(s) {idx}); every observed "
            "value must be finite"
        )


def _check_clamp_shapes(
    tr: Mapping[str, dict], clamp_ex: Mapping[str, tuple[np.ndarray, Any]]
) -> None:
    """Each clamp's values (per example) must have as many entries as its site
    (its plate shape); they are reshaped to the site's shape."""
    for site, (v, _) in clamp_ex.items():
        want = tuple(np.shape(tr[site]["value"]))
        if v.size != int(np.prod(want)):
            shape = "(N" + "".join(f", {d}" for d in want) + ")"
            raise ValueError(
                f"clamp[{site!r}] values have shape {v.shape} per example, but "
                f"site {site!r} has shape {want} per example (its plates): pass "
                f"values and mask of shape {shape}"
            )


def _graph(
    model: Callable,
    data: Mapping[str, Any],
    clamp: Mapping[str, tuple[Any, Any]],
    schedule: str,
) -> _Graph:
    """Compile (or fetch) the wrapped model for this data / parameter layout."""
    example = {k: _placeholder(v) for k, v in data.items()}
    clamp_ex = {
        s: (_placeholder(v), _placeholder(m).astype(bool))
        for s, (v, m) in clamp.items()
    }
    key = (
        model,
        schedule,
        tuple(sorted((k, v.shape, v.dtype.str) for k, v in example.items())),
        tuple(sorted((s, v.shape, v.dtype.str) for s, (v, _) in clamp_ex.items())),
    )
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        tr = model_sites(model, **example)
    except TypeError as err:
        raise ValueError(
            f"the model does not take the data's keyword arguments "
            f"{sorted(example)} ({err})"
        ) from err
    specs = _param_specs(tr)
    latent = [
        n for n, v in tr.items() if v["type"] == "sample" and not v["is_observed"]
    ]
    for site in clamp_ex:
        if site not in latent:
            raise ValueError(
                f"clamp names {site!r}, which is not a latent site of the model; "
                f"latent sites: {latent}"
            )
    _check_clamp_shapes(tr, clamp_ex)
    if not specs:
        raise ValueError("the model has no numpyro.param sites: nothing to learn")
    names = tuple(specs)
    kwargs = dict(example)
    kwargs.update({PARAM + n: jnp.asarray(s.init) for n, s in specs.items()})
    for site, (v, m) in clamp_ex.items():
        kwargs[CLAMP + site] = v
        kwargs[MASK + site] = m
    wrapped = _wrap(model, names, tuple(clamp_ex))
    try:
        fg = compile_model(wrapped, **kwargs)
    except CompileError as err:
        raise CompileError(
            f"{err} (compiling the model on one example of the data: each data "
            "entry's leading axis is the batch)"
        ) from err
    used = {e for g in fg.factor_groups for e in g.evidence}
    unused = [n for n in names if PARAM + n not in used]
    if unused:
        raise ValueError(
            f"parameter(s) {unused} get no gradient: no log-probability of the "
            "model depends on them (unused numpyro.param sites)"
        )
    param_groups = tuple(
        k
        for k, g in enumerate(fg.factor_groups)
        if any(e.startswith(PARAM) for e in g.evidence)
    )
    from_tables = log_partition_tables(fg, schedule)

    def evidence(params, ex):
        ev = dict(ex)
        ev.update({PARAM + n: v for n, v in params.items()})
        return ev

    def tables(params, ex):
        return fg.evidence_tables(**evidence(params, ex))

    def log_z(params, ex):
        return from_tables(tables(params, ex))

    per = jax.vmap(log_z, in_axes=(None, 0))

    @jax.jit
    def total(params, ex, w):
        return jnp.sum(jnp.where(w > 0, per(params, ex), 0.0))

    out = _Graph(
        fg,
        names,
        tuple(clamp_ex),
        specs,
        log_z,
        tables,
        from_tables,
        param_groups,
        total,
        jax.jit(per),
        {},
    )
    _CACHE[key] = out
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def _examples(data: Mapping[str, Any], clamp: Mapping[str, tuple[Any, Any]]) -> dict:
    """The batched evidence of the wrapped model: data plus clamp values/masks."""
    ex = {k: jnp.asarray(v) for k, v in data.items()}
    for site, (v, m) in clamp.items():
        ex[CLAMP + site] = jnp.asarray(v)
        ex[MASK + site] = jnp.asarray(m).astype(bool)
    return ex


def _pad(ex: dict, n: int) -> tuple[dict, Array]:
    """Pad the batch to a multiple of the device count and shard it; the weights
    are 1 for real examples and 0 for the padding."""
    size = pad_to_devices(n, len(jax.devices()))
    w = jnp.concatenate([jnp.ones(n), jnp.zeros(size - n)])
    if size > n:
        ex = {
            k: jnp.concatenate([v, jnp.broadcast_to(v[-1:], (size - n, *v.shape[1:]))])
            for k, v in ex.items()
        }
    (ex, w), _ = shard_batch((ex, w))
    return ex, w


def _full_params(g: _Graph, params: Mapping[str, Any] | None) -> dict[str, Array]:
    params = dict(params or {})
    unknown = sorted(set(params) - set(g.names))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown}; the model's numpyro.param sites are "
            f"{list(g.names)}"
        )
    out = {}
    for n, s in g.specs.items():
        # The dtype the graph was compiled with (a float32 value under x64 would
        # meet float64 tables), strong: a weakly typed start would trace the
        # steps twice.
        dtype = jax.dtypes.canonicalize_dtype(s.init.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.result_type(float)
        v = jnp.asarray(params.get(n, s.init))
        if jnp.issubdtype(v.dtype, jnp.complexfloating):
            raise ValueError(
                f"parameter {n!r} has dtype {v.dtype}; it must be real (the "
                f"model is compiled with {dtype})"
            )
        v = jnp.asarray(v, dtype=dtype)
        if jnp.shape(v) != s.init.shape:
            raise ValueError(
                f"parameter {n!r} has shape {jnp.shape(v)}, the model's "
                f"numpyro.param site has shape {s.init.shape}"
            )
        out[n] = v
    return out


def _clamps(clamp: Mapping[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    out = {}
    for site, spec in (clamp or {}).items():
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise ValueError(
                f"clamp[{site!r}] must be a (values, mask) pair, values of shape "
                "(N, *plate_shape) and a boolean mask of the same shape"
            )
        out[site] = spec
    return out


def model_log_likelihood(
    model: Callable,
    params: Mapping[str, Any] | None,
    data: Mapping[str, Any],
    *,
    clamp: Mapping[str, tuple[Any, Any]] | None = None,
    schedule: str = "auto",
    per_example: bool = False,
) -> Array:
    """The exact ``sum_n log p(data_n)`` of a NumPyro model, differentiable in
    its parameters.

    The model is compiled once per data layout (cached) with its
    ``numpyro.param`` sites as evidence; ``log Z`` runs through the compiled
    kernel (:func:`pgm_drm.inference.log_partition_tables`), vmapped over the
    batch (sharded over every device). ``jax.grad`` of it with respect to
    ``params`` gives the expected sufficient statistics (``d log Z / d eta =
    E[T]``).

    Args:
        model: A NumPyro model for one example, with finite discrete latents and
            ``numpyro.param`` sites.
        params: ``name -> value`` (constrained) for some or all of the
            ``numpyro.param`` sites; the others keep their initial values.
        data: ``name -> (N, ...)``: the model's observed keyword arguments, each
            with a leading batch axis.
        clamp: ``site -> (values, mask)``: latent sites observed for the examples
            (and plate instances) where ``mask`` is true (semi-supervised).
        schedule: "auto", "tree" or "exact" (see :func:`pgm_drm.inference.infer`).
        per_example: Return ``(N,)`` per-example log-likelihoods instead of
            their sum (e.g. to classify with one fitted model per class).

    The compiled graph is cached by the model *function object* and the data
    / clamp shapes and dtypes (as ``jax.jit`` caches by function): a model that
    reads a module-level constant (a global array, a scale) keeps the value it
    had when it was first compiled, even after the global changes. For a fresh
    compile pass a new function object: a closure over the constant, or
    ``functools.partial(model, scale=...)`` (a new ``partial`` each time);
    better, make the constant an argument or a ``numpyro.param``. The cache
    holds the last :data:`CACHE_SIZE` graphs; there is no function to clear it.

    Returns:
        A scalar: the total log-likelihood over the batch (``-inf`` where an
        example has probability zero); ``(N,)`` with ``per_example``. Under a
        JAX trace (``jax.grad``, ``jit``) of ``params``, where the check
        below cannot raise, ``NaN`` if a parameter leaves its constraint.

    Raises:
        CompileError: A continuous latent site, a data shape the model does not
            accept.
        ValueError: Unknown or unused parameters, a parameter outside its
            constraint (a probability above 1, a simplex row that does not sum
            to 1, a negative scale: as :func:`fit` refuses it), wrong shapes,
            complex parameters, batch sizes that differ, NaN or inf in the
            data, clamp values without one entry per instance of their site.

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> def mixture(x=None):
        ...     w = numpyro.param("w", jnp.array([0.5, 0.5]),
        ...                       constraint=dist.constraints.simplex)
        ...     z = numpyro.sample("z", dist.Categorical(w))
        ...     numpyro.sample("x", dist.Normal(jnp.array([-1.0, 1.0])[z]), obs=x)
        >>> x = jnp.array([-1.0, 1.2, 0.9])
        >>> ll = model_log_likelihood(mixture, {"w": jnp.array([0.3, 0.7])}, {"x": x})
        >>> round(float(ll), 4)
        -4.3181
    """
    clamps = _clamps(clamp)
    n = _check_data(data, clamps)
    g = _graph(model, data, clamps, schedule)
    full = _full_params(g, params)
    if not _traced(full):
        _check_constraints(g.specs, full, "in params", hint="")
    ex, w = _pad(_examples(data, clamps), n)
    out = g.each(full, ex)[:n] if per_example else g.total(full, ex, w)
    if _traced(full):
        # Under jit / grad a violation cannot raise: NaN, never the value at
        # the nearest point of the support.
        inside = _inside(g.specs, full)
        out = jnp.where(jnp.all(jnp.stack(list(inside.values()))), out, jnp.nan)
    return out


# --------------------------------------------------------------------------- #
# fit
# --------------------------------------------------------------------------- #


class _State(NamedTuple):
    """The loop state: parameters (constrained) and, for Adam, the unconstrained
    parameters and the optimiser state; for EM, ``name -> bool``: whether the
    parameter's last M-step was a closed form (checkpointed, so a resumed fit
    reports :attr:`ModelFit.closed_form` as an uninterrupted one)."""

    iteration: Array
    params: dict[str, Array]
    opt_state: Any


class _Info(NamedTuple):
    log_likelihood: float


def _to_unconstrained(specs, params):
    return {n: biject_to(specs[n].constraint).inv(v) for n, v in params.items()}


def _to_constrained(specs, u):
    return {n: biject_to(specs[n].constraint)(v) for n, v in u.items()}


def _inside(specs, params) -> dict[str, Array]:
    """Per parameter: whether every entry is finite and satisfies its constraint
    (traceable: a jitted step returns it with the new parameters)."""
    return {
        n: jnp.all(specs[n].constraint.check(v)) & jnp.all(jnp.isfinite(v))
        for n, v in params.items()
    }


#: Why a step's parameters can leave their constraints.
_STEP_HINT = (
    "; a closed-form or gradient step left the support (a learning rate too "
    "large, or a probability underflowed)"
)


def _check_constraints(
    specs, params, when: str, inside=None, hint: str = _STEP_HINT
) -> None:
    """Raise ValueError naming the first parameter outside its constraint (or
    not finite); ``hint`` says why it can happen ``when``."""
    inside = _inside(specs, params) if inside is None else inside
    for n, v in params.items():
        c = specs[n].constraint
        if not bool(inside[n]):
            arr = np.asarray(v)
            raise ValueError(
                f"parameter {n!r} violates its constraint {c} {when} (values "
                f"{arr.ravel()[:6]}...){hint}"
            )


def _closed_kind(c) -> str | None:
    if c is constraints.simplex:
        return "simplex"
    if c is constraints.unit_interval:
        return "unit"
    if c is constraints.real:
        return "real"
    if c is constraints.positive:
        return "positive"
    return None


class _Closed(NamedTuple):
    """A closed-form M-step candidate for one parameter."""

    new: Array  # the maximiser of Q if Q has the form
    predicted: Array  # the change of Q the form predicts
    stationary: Array  # whether the gradient of Q vanishes at ``new`` as the
    # form says it does (to ``rel`` of the gradient's terms)


def _closed_form(
    kind: str, theta: Array, grad_at: Callable, rel: float = 1e-9
) -> _Closed:
    """Candidate maximiser of Q in one parameter, read from the form of Q, the
    change of Q that form predicts and whether Q's gradient vanishes there.

    The caller accepts the form only if the predicted change is the actual
    change and the candidate is stationary. The first check alone passes
    whatever Q is once the step is so small that both changes are below the
    rounding of Q: near a maximum a wrong form (a diagonal Newton step on a
    coupled or non-quadratic Q, such as a factor analyser's loadings) then
    keeps being accepted, its steps rejected or useless, and EM stalls short of
    the stationary point. The gradient at the candidate tells them apart at any
    step size: it is zero (up to ``rel`` of the gradient's own scale) only if
    the candidate is Q's maximiser. Entries with no information (zero expected
    counts, zero curvature) keep their value."""
    g1 = grad_at(theta)

    def dlog(c, new, old):
        """``sum c (log new - log old)`` over entries with c, new, old > 0 (an
        entry that underflowed to 0 carries no weight)."""
        on = (c > 0) & (new > 0) & (old > 0)
        diff = jnp.log(jnp.where(on, new, 1.0)) - jnp.log(jnp.where(on, old, 1.0))
        return jnp.sum(jnp.where(on, c * diff, 0.0))

    def small(residual, scale):
        return jnp.all(jnp.abs(residual) <= rel * scale)

    if kind == "simplex":  # Q = sum C log theta: theta = C / sum C
        c = jnp.maximum(theta * g1, 0.0)
        tot = jnp.sum(c, axis=-1, keepdims=True)
        rows = tot > 0
        new = jnp.where(rows, c / jnp.where(rows, tot, 1.0), theta)
        # A positive probability stays positive: an expected count that
        # underflows must not become a hard zero (log 0 = -inf in Q).
        tiny = jnp.finfo(theta.dtype).tiny
        new = jnp.where((theta > 0) & rows, jnp.maximum(new, tiny), new)
        # At the maximiser theta dQ/dtheta is still C (dQ/dtheta = sum C there).
        res = jnp.where(rows & (new > 0), new * grad_at(new) - c, 0.0)
        return _Closed(new, dlog(c, new, theta), small(res, tot))
    if kind == "real":  # Q quadratic with a diagonal Hessian: one Newton step
        slope = grad_at(theta + 1.0) - g1
        move = slope < 0
        step = jnp.where(move, -g1 / jnp.where(move, slope, -1.0), 0.0)
        new = theta + step
        pred = jnp.sum(g1 * step + 0.5 * slope * step**2)
        # dQ/dtheta = slope (theta - new): its terms are of size |slope theta|.
        scale = jnp.abs(g1) + jnp.abs(slope) * (jnp.abs(theta) + jnp.abs(new) + 1)
        return _Closed(new, pred, small(grad_at(new), scale))
    if kind == "positive":  # Q = -S / 2 sigma^2 - D log sigma: sigma^2 = S / D
        s2 = 2.0 * theta
        h1, h2 = theta * g1, s2 * grad_at(s2)
        w1, w2 = theta**-2, s2**-2
        a = (h1 - h2) / (w1 - w2)
        d = a * w1 - h1
        move = (a > 0) & (d > 0)
        new = jnp.where(move, jnp.sqrt(jnp.where(move, a / d, 1.0)), theta)
        pred = -0.5 * a * (new**-2 - w1) - d * (jnp.log(new) - jnp.log(theta))
        # sigma dQ/dsigma = S sigma^-2 - D is zero at the maximiser; an entry
        # that does not move must carry no information (h1 = 0).
        res = new * grad_at(new)
        scale = jnp.abs(a) * new**-2 + jnp.abs(d)
        return _Closed(new, jnp.sum(jnp.where(move, pred, 0.0)), small(res, scale))
    # "unit": Q = A log p + (N - A) log(1 - p): p = A / N
    p2 = jnp.where(jnp.abs(theta - 0.5) > 0.1, 0.5, 0.25).astype(theta.dtype)
    h1 = theta * (1 - theta) * g1  # = A - N p
    h2 = p2 * (1 - p2) * grad_at(p2)
    n = -(h2 - h1) / (p2 - theta)
    a = h1 + n * theta
    move = (n > 0) & (a >= 0) & (a <= n)
    new = jnp.where(move, a / jnp.where(move, n, 1.0), theta)
    pred = dlog(a, new, theta) + dlog(n - a, 1 - new, 1 - theta)
    # p (1 - p) dQ/dp = A - N p is zero at the maximiser.
    res = new * (1 - new) * grad_at(new)
    return _Closed(
        new,
        jnp.where(jnp.all(move | (n == 0)), pred, jnp.nan),
        small(res, jnp.abs(a) + jnp.abs(n)),
    )


#: Relative tolerance of the checks that Q has a closed form's shape, by dtype.
_TOL = {np.float32: 1e-4, np.float64: 1e-9}

#: Closed-form M-steps, in the order they run (means before scales, as in the
#: textbook M-step of a Gaussian mixture).
_ORDER = ("simplex", "unit", "real", "positive")


class _EMSteps(NamedTuple):
    e_step: Callable  # (params, batch, weights) -> (total, log Z per example, B)
    closed: Callable  # (params, B, batch) -> (params, Q, closed-form ok, inside)
    gem: Callable  # (params, Q, B, batch, free) -> (params, inside)


def _em_steps(g: _Graph, inner_steps: int) -> _EMSteps:
    """The jitted E- and M-steps of a compiled graph (cached with it)."""
    key = ("em", inner_steps)
    if key not in g.jitted:
        g.jitted[key] = _make_em_steps(g, inner_steps)
    return g.jitted[key]


def _make_em_steps(g: _Graph, inner_steps: int) -> _EMSteps:
    groups, specs = g.param_groups, g.specs

    def per_example(params, e):
        lz, b = jax.value_and_grad(g.from_tables)(g.tables(params, e))
        return lz, {k: b[k] for k in groups}

    @jax.jit
    def e_step(params, ex, w):
        lz, b = jax.vmap(per_example, in_axes=(None, 0))(params, ex)
        b = jax.tree.map(lambda x: x * jnp.reshape(w, (-1,) + (1,) * (x.ndim - 1)), b)
        return jnp.sum(jnp.where(w > 0, lz, 0.0)), lz, b

    def q_fn(params, b, ex):
        def one(e, bn):
            tables = g.tables(params, e)
            return sum(
                jnp.sum(jnp.where(bn[k] > 0, bn[k] * tables[k], 0.0)) for k in groups
            )

        return jnp.sum(jax.vmap(one)(ex, b))

    # Parameters whose Q may have a closed form, in the order they are tried;
    # the others always get the generalised EM steps.
    closed = tuple(
        sorted(
            (n for n in g.names if _closed_kind(specs[n].constraint)),
            key=lambda n: _ORDER.index(_closed_kind(specs[n].constraint)),
        )
    )
    opt = optax.lbfgs()

    def gem(params, b, ex, free):
        """L-BFGS steps (zoom line search) on -Q over the parameters whose
        ``free`` flag is set (unconstrained), keeping the best parameters seen;
        the others keep their values bit for bit."""

        def constrained(u):
            # A fixed parameter is read from ``params`` and its unconstrained
            # coordinates (held at 0) get no gradient.
            c = _to_constrained(specs, u)
            return {n: jnp.where(free[n], c[n], params[n]) for n in params}

        u0 = _to_unconstrained(specs, params)
        u0 = {n: jnp.where(free[n], v, jnp.zeros_like(v)) for n, v in u0.items()}

        def neg_q(u):
            return -q_fn(constrained(u), b, ex)

        # The line search's value and gradient at the accepted point are reused.
        value_and_grad = optax.value_and_grad_from_state(neg_q)

        def body(carry, _):
            u, s, best_u, best = carry
            val, grad = value_and_grad(u, state=s)
            better = val < best
            best_u = jax.tree.map(lambda a, c: jnp.where(better, a, c), u, best_u)
            best = jnp.where(better, val, best)
            upd, s = opt.update(grad, s, u, value=val, grad=grad, value_fn=neg_q)
            return (optax.apply_updates(u, upd), s, best_u, best), None

        init = (u0, opt.init(u0), u0, neg_q(u0))
        (u, _, best_u, best), _ = jax.lax.scan(body, init, None, inner_steps)
        best_u = jax.tree.map(lambda a, c: jnp.where(neg_q(u) < best, a, c), u, best_u)
        return constrained(best_u)

    @jax.jit
    def closed_step(params, b, ex):
        """Closed forms in order, each kept only if Q has its form and does not
        decrease: the new parameters, their Q and which forms held (a failed
        one leaves its parameter as it was)."""
        q_cur = q_fn(params, b, ex)
        oks = {}
        for n in closed:
            kind = _closed_kind(specs[n].constraint)

            def grad_at(v, n=n, params=params):
                return jax.grad(q_fn)({**params, n: v}, b, ex)[n]

            rel = _TOL.get(q_cur.dtype.type, 1e-3)
            new, predicted, stationary = _closed_form(kind, params[n], grad_at, rel)
            cand = {**params, n: new}
            q_new = q_fn(cand, b, ex)
            # Q has the form when the change it predicts is the actual change
            # (up to the rounding of a sum of the size of Q) and its gradient
            # vanishes at the candidate (_closed_form).
            tol = rel * (jnp.abs(q_cur) + jnp.abs(predicted) + 1)
            ok = (jnp.abs(q_new - q_cur - predicted) <= tol) & stationary
            keep = ok & (q_new >= q_cur)
            params = {k: jnp.where(keep, cand[k], v) for k, v in params.items()}
            q_cur = jnp.where(keep, q_new, q_cur)
            oks[n] = ok
        return params, q_cur, oks, _inside(specs, params)

    @jax.jit
    def gem_step(params, q_cur, b, ex, free):
        """Generalised EM on the parameters flagged ``free``, kept only if Q
        does not decrease from ``q_cur``. One program whichever are free."""
        cand = gem(params, b, ex, free)
        keep = q_fn(cand, b, ex) >= q_cur
        params = {k: jnp.where(keep, cand[k], v) for k, v in params.items()}
        return params, _inside(specs, params)

    return _EMSteps(e_step, closed_step, gem_step)


class _EM:
    """One EM fit: its data and compiled steps."""

    def __init__(self, g: _Graph, ex, w, inner_steps: int):
        self.g, self.ex, self.w = g, ex, w
        self.inner_steps = inner_steps
        self.steps = _em_steps(g, inner_steps)

    def step(self, params):
        """One EM iteration: (new params, total log-likelihood at ``params``,
        the parameters updated in closed form, whether each new parameter
        satisfies its constraint).

        A function of ``params`` alone (a resumed fit continues bit for bit):
        every closed form is tried, and the parameters whose ``Q`` lacks its
        form get the generalised EM steps instead, from the same E-step."""
        total, lz, b = self.steps.e_step(params, self.ex, self.w)
        _check_finite(lz, self.w)
        new, q, oks, inside = self.steps.closed(params, b, self.ex)
        closed = tuple(n for n, ok in oks.items() if bool(ok))
        free = {n: n not in closed for n in self.g.names}
        if self.inner_steps > 0 and any(free.values()):
            # A failed closed form left its parameter as it was, so these are
            # the steps a rerun without it would take.
            flags = {n: jnp.asarray(f) for n, f in free.items()}
            new, inside = self.steps.gem(new, q, b, self.ex, flags)
        return new, float(total), closed, inside


def _adam_step(g: _Graph, learning_rate: float):
    """The optimiser and its jitted step on the exact log-likelihood (cached)."""
    key = ("adam", learning_rate)
    if key not in g.jitted:
        opt = optax.adam(learning_rate)

        def loss(u, ex, w):
            return -g.total(_to_constrained(g.specs, u), ex, w)

        @jax.jit
        def step(u, s, ex, w):
            val, grad = jax.value_and_grad(loss)(u, ex, w)
            upd, s = opt.update(grad, s, u)
            u = optax.apply_updates(u, upd)
            new = _to_constrained(g.specs, u)
            return u, s, -val, new, _inside(g.specs, new)

        g.jitted[key] = (opt, step)
    return g.jitted[key]


def _check_finite(lz: Array, w: Array) -> None:
    lz = np.asarray(lz)[np.asarray(w) > 0]
    bad = ~np.isfinite(lz)
    if bad.any():
        idx = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(
            f"example(s) {idx} have probability zero (or NaN log Z) under the "
            "model at the current parameters (a clamped value outside the support, "
            "or a hard zero the data hits)"
        )


#: Examples per call when fingerprinting the model's tables (bounds memory).
_PROBE_CHUNK = 256

#: Shift in unconstrained space of the second point the tables are read at.
_PROBE_SHIFT = 0.25


def _canonical_bytes(a: Any) -> bytes:
    """An array's shape, dtype and bytes, every NaN the same NaN."""
    a = np.ascontiguousarray(np.asarray(a))
    if np.issubdtype(a.dtype, np.floating):
        a = np.where(np.isnan(a), np.array(np.nan, a.dtype), a)
    return repr((a.shape, a.dtype.str)).encode() + a.tobytes()


def _model_fingerprint(
    g: _Graph, params: Mapping[str, Array], ex: Mapping[str, Array], n: int
) -> str:
    """A short hash of the model itself, as the fit sees it: the compiled
    graph's structure (each factor group's site, scope, cardinalities, plates,
    evidence), its evidence-free tables, and every example's evidence tables
    at the start ``params`` and at a second point (``params`` moved by
    ``_PROBE_SHIFT`` in unconstrained space: a constant that multiplies a
    parameter starting at 0 shows there). Any constant of the model that the
    data reaches changes it, so a checkpoint records it and a checkpoint of
    another model (same parameter names, start and data) is refused.

    Exact bits, as a resumed fit is: computed the same way (same backend, JAX
    version, dtype and machine: a matrix product's summation order can follow
    the core count) by the fit that wrote the checkpoint and the one that
    resumes it; elsewhere the checkpoint is refused, never resumed wrongly.
    ``ex`` is the unpadded batch (:func:`_examples`), read ``_PROBE_CHUNK``
    examples per call.
    """
    if "probe" not in g.jitted:
        g.jitted["probe"] = jax.jit(jax.vmap(g.tables, in_axes=(None, 0)))
    probe = g.jitted["probe"]
    u = _to_unconstrained(g.specs, params)
    other = _to_constrained(g.specs, {k: v + _PROBE_SHIFT for k, v in u.items()})
    h = hashlib.sha256()
    for grp, table in zip(g.fg.factor_groups, g.fg.host_tables(), strict=True):
        # The evidence names come from a set: sorted, as string hashing (and so
        # their order) changes from process to process.
        ev = tuple(sorted(grp.evidence))
        head = (grp.site, grp.scope_sites, grp.cards, grp.plate_shape, ev)
        h.update(repr(head).encode() + _canonical_bytes(grp.scope))
        if not grp.evidence:
            h.update(_canonical_bytes(table))
    size = min(n, _PROBE_CHUNK)
    for start in range(0, n, size):
        # The last chunk repeats the last example (one compiled shape).
        idx = np.minimum(np.arange(start, start + size), n - 1)
        chunk = {k: v[idx] for k, v in ex.items()}
        keep = min(size, n - start)
        for at in (params, other):
            tables = probe(at, chunk)
            for k in sorted(tables):
                h.update(_canonical_bytes(np.asarray(tables[k])[:keep]))
    return h.hexdigest()[:16]


def fit(
    model: Callable,
    data: Mapping[str, Any],
    method: str = "em",
    *,
    init: Mapping[str, Any] | None = None,
    clamp: Mapping[str, tuple[Any, Any]] | None = None,
    n_iter: int = 100,
    tol: float | None = None,
    learning_rate: float = 0.05,
    inner_steps: int = 20,
    schedule: str = "auto",
    loop: LoopOptions | None = None,
) -> ModelFit:
    """Fit the ``numpyro.param`` sites of any NumPyro model with finite discrete
    latents by maximum likelihood, exactly (no variational gap).

    Args:
        model: A NumPyro model for one example (see :func:`model_log_likelihood`).
        data: ``name -> (N, ...)``: its observed keyword arguments, batched.
        method: "em" (E-step from the compiled marginals, closed-form M-steps
            where ``Q`` has the form of a conjugate update, else ``inner_steps``
            L-BFGS steps on ``Q``: the module docstring) or "adam" (one Adam
            step on the exact log-likelihood per iteration).
        init: Starting values of some parameters (else the model's own).
        clamp: ``site -> (values, mask)``: latent values observed where ``mask``
            is true (semi-supervised; see :func:`model_log_likelihood`).
        n_iter: Iterations (EM steps or Adam steps).
        tol: Stop when the total log-likelihood changes by less than ``tol``.
        learning_rate: Adam's step size (method "adam"; EM's L-BFGS steps
            choose theirs by line search).
        inner_steps: L-BFGS steps on ``Q`` per EM iteration for parameters
            without a closed form.
        schedule: "auto", "tree" or "exact".
        loop: Progress bar and checkpoints
            (:class:`~pgm_drm.learning.loop.LoopOptions`; checkpoints every 10
            iterations by default); a resumed fit ends where an uninterrupted
            one ends. A checkpoint records the data, the settings, the start
            and a fingerprint of the model itself (its compiled graph and its
            tables on the data at the start: any constant of the model), and is
            refused if any differs. ``n_iter`` and ``tol`` may change: a
            converged fit continues under a smaller ``tol`` (or none); a
            checkpoint past this ``n_iter``, or past the step where this
            ``tol`` is met, is refused and left as it is.

    The compiled graph is cached by the model function object and the data
    layout, as ``jax.jit`` caches by function: a model that reads a
    module-level constant keeps the value it had at its first compile (see
    :func:`model_log_likelihood`; pass a new function object, a closure or
    ``functools.partial``, for a fresh compile).

    Returns:
        A :class:`ModelFit`.

    Raises:
        CompileError: A continuous latent site that is not collapsed, data the
            model does not accept.
        ValueError: An unused parameter, a parameter that leaves its constraint,
            data whose batch sizes differ, NaN or inf in the data, clamp values
            without one entry per instance of their site, an example of
            probability zero, a checkpoint of another fit or model (or one past
            where this fit stops), bad settings.

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from pgm_drm.learning.loop import LoopOptions
        >>> def mixture(x=None):
        ...     w = numpyro.param("w", jnp.array([0.5, 0.5]),
        ...                       constraint=dist.constraints.simplex)
        ...     z = numpyro.sample("z", dist.Categorical(w))
        ...     numpyro.sample("x", dist.Normal(jnp.array([-2.0, 2.0])[z]), obs=x)
        >>> x = jnp.array([-2.0, 2.1, 1.9, 2.2])
        >>> res = fit(mixture, {"x": x}, n_iter=30, loop=LoopOptions(progress=False))
        >>> [round(float(p), 2) for p in res.params["w"]]
        [0.25, 0.75]
    """
    if method not in ("em", "adam"):
        raise ValueError(f"method must be 'em' or 'adam', got {method!r}")
    n_iter = check_n_iter(n_iter)
    stop = tolerance(tol, "log_likelihood")
    if int(inner_steps) != inner_steps or inner_steps < 0:
        raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps}")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    clamps = _clamps(clamp)
    n = _check_data(data, clamps)
    g = _graph(model, data, clamps, schedule)
    params = _full_params(g, init)
    _check_constraints(g.specs, params, "at the start", hint="")
    ex, w = _pad(_examples(data, clamps), n)
    specs = g.specs

    if method == "em":
        em = _EM(g, ex, w, int(inner_steps))

        def flags(closed: tuple[str, ...]) -> dict[str, Array]:
            return {n: jnp.asarray(n in closed) for n in g.names}

        def init_state(p):
            return _State(jnp.asarray(0), p, flags(()))

        def step(st: _State):
            new, total, closed, inside = em.step(st.params)
            it = int(st.iteration) + 1
            _check_constraints(specs, new, f"after EM step {it}", inside)
            return _State(jnp.asarray(it), new, flags(closed)), _Info(total)

    else:
        opt, adam_step = _adam_step(g, float(learning_rate))

        def init_state(p):
            u = _to_unconstrained(specs, p)
            return _State(jnp.asarray(0), p, (u, opt.init(u)))

        def step(st: _State):
            u, s = st.opt_state
            u, s, total, new, inside = adam_step(u, s, ex, w)
            it = int(st.iteration) + 1
            _check_constraints(specs, new, f"after Adam step {it}", inside)
            return _State(jnp.asarray(it), new, (u, s)), _Info(float(total))

    meta = {
        "kind": "fit",
        "method": method,
        "params": list(g.names),
        "data": fingerprint(*[np.asarray(v) for _, v in sorted(ex.items())]),
        "learning_rate": float(learning_rate) if method == "adam" else None,
        "inner_steps": int(inner_steps),
        "schedule": schedule,
        # The model itself (its constants): only a checkpoint compares it.
        "model": (
            _model_fingerprint(g, params, _examples(data, clamps), n)
            if loop is not None and loop.checkpoint is not None
            else None
        ),
    }
    out = run_loop(
        Algorithm(init=init_state, step=step),
        params,
        n_iter,
        loop,
        history=("log_likelihood",),
        stop=stop,
        meta=meta,
        desc=f"fit ({method})",
        default_every=10,
    )
    final = out.state.params
    # The log-likelihood at the end from the programs the fit already compiled.
    if method == "em":
        ll_end = float(em.steps.e_step(final, ex, w)[0])
        flagged = out.state.opt_state
        closed_form = tuple(n for n in sorted(flagged) if bool(flagged[n]))
    else:
        ll_end = float(adam_step(*out.state.opt_state, ex, w)[2])
        closed_form = ()
    return ModelFit(
        params={k: jnp.asarray(final[k]) for k in g.names},
        log_likelihood=np.asarray(out.history["log_likelihood"] + [ll_end]),
        n_iter=int(out.state.iteration),
        converged=out.converged,
        method=method,
        closed_form=closed_form,
    )
