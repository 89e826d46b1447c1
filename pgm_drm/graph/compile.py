"""Compile a NumPyro model with finite discrete latent sites into a factor graph.

The compiler never re-derives model math: it traces the user's model under
NumPyro's enumeration handlers (``numpyro.contrib.funsor.enum`` +
``config_enumerate``) and reads every sample site's ``log_prob`` tensor, whose
named batch dimensions (``site["infer"]["dim_to_name"]``) say which enumerated
latent sites and which plates the tensor depends on. Each plate instance of a
latent site becomes one variable node; each plate instance of any sample site
(latent, observed, or ``numpyro.factor``) becomes one factor node whose table is
the slice of that site's log-prob tensor (DESIGN §3).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
from numpyro import handlers
from numpyro.contrib.funsor import config_enumerate, enum
from numpyro.contrib.funsor import trace as packed_trace

from pgm_drm._typing import Array, ScheduleKind

__all__ = [
    "CompileError",
    "Factor",
    "FactorGraph",
    "SiteInfo",
    "Variable",
    "compile_model",
    "enum_support",
    "model_sites",
    "support_values",
]


class CompileError(ValueError):
    """Raised when a model cannot be compiled into a finite factor graph."""


@dataclass(frozen=True)
class Variable:
    """One plate instance of a discrete latent site.

    Attributes:
        name: Node name, ``"site"`` or ``"site[i,j]"``.
        site: The NumPyro sample site it belongs to.
        index: Position in the site's value array (plate shape, numpyro layout).
        support: The values the site can take, in enumeration order.
    """

    name: str
    site: str
    index: tuple[int, ...]
    support: tuple[Any, ...]

    @property
    def cardinality(self) -> int:
        return len(self.support)


@dataclass(frozen=True)
class Factor:
    """One plate instance of a sample site's log-prob.

    Attributes:
        name: Node name, ``"p(site)"`` or ``"p(site[i,j])"``.
        site: The NumPyro sample site whose ``log_prob`` gives the table.
        index: Plate index of this instance.
        scope: Names of the variables the table depends on, in axis order.
    """

    name: str
    site: str
    index: tuple[int, ...]
    scope: tuple[str, ...]


@dataclass(frozen=True)
class SiteInfo:
    """What the compiler learned about one sample site.

    Attributes:
        name: Site name.
        is_observed: Observed (or ``numpyro.factor``) sites only contribute factors.
        plates: Plate names of the site, outermost batch dim first (most negative).
        plate_shape: Sizes of those plates (the site's value shape, numpyro layout).
        support: Support values (latent sites) or ``()``.
        enum_names: Latent sites the log-prob tensor depends on, in table axis order.
        dims: Batch dims of those names and plates in the traced tensor.
    """

    name: str
    is_observed: bool
    plates: tuple[str, ...]
    plate_shape: tuple[int, ...]
    support: tuple[Any, ...]
    enum_names: tuple[str, ...]
    enum_dims: tuple[int | None, ...]
    plate_dims: tuple[int, ...]


def _index_str(index: tuple[int, ...]) -> str:
    return "" if not index else "[" + ",".join(str(i) for i in index) + "]"


def _plain_trace(model: Callable, args: tuple, kwargs: dict) -> dict:
    return handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)


def model_sites(model: Callable, *args: Any, **kwargs: Any) -> dict[str, dict]:
    """Trace ``model`` once (no enumeration) and check its latent sites.

    Returns:
        The NumPyro trace (an ordered dict of site messages).

    Raises:
        CompileError: A latent site has no finite support (continuous latent),
            or a plate is subsampled.
    """
    tr = _plain_trace(model, args, kwargs)
    for name, site in tr.items():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            if frame.dim is None:
                continue
            if jnp.shape(site["fn"].log_prob(site["value"]))[frame.dim] not in (
                1,
                frame.size,
            ):
                raise CompileError(
                    f"plate '{frame.name}' at site '{name}' is subsampled; "
                    "subsampled plates are not supported by exact inference"
                )
        if site["is_observed"]:
            continue
        fn = site["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise CompileError(
                f"latent site '{name}' has distribution {type(fn).__name__}, which "
                "has no finite support; every latent site must be discrete and "
                "enumerable (Categorical, Bernoulli, DiscreteUniform, ...). "
                "Observe it or integrate it out."
            )
        if fn.event_shape != ():
            raise CompileError(
                f"latent site '{name}' has event shape {fn.event_shape}; only "
                "scalar discrete latents (batched by plates) are supported"
            )
        support_values(fn, name)
    return tr


def support_values(fn: Any, name: str = "?") -> np.ndarray:
    """The support of a discrete distribution as a 1-d array (same for every plate
    instance), in ``enumerate_support`` order."""
    sup = np.asarray(fn.enumerate_support(expand=False))
    k = sup.shape[0]
    sup = sup.reshape(k, -1)
    if sup.shape[1] > 1 and not np.all(sup == sup[:, :1]):
        raise CompileError(
            f"latent site '{name}' has a support that differs across its batch; "
            "every plate instance must share one support"
        )
    return sup[:, 0]


class enum_support(enum):
    """``numpyro.contrib.funsor.enum`` that enumerates *support values*.

    NumPyro's funsor ``enum`` enumerates ``arange(K)``, which is wrong for
    distributions whose support is not ``0..K-1`` (``DiscreteUniform(2, 5)``
    would be scored at 0..3). This handler maps the enumerated indices through
    ``enumerate_support``; dims and names are unchanged.
    """

    def process_message(self, msg):
        enumerated = (
            msg["type"] == "sample"
            and not msg.get("done", False)
            and not msg["is_observed"]
            and msg["infer"].get("enumerate") == "parallel"
            and not msg["infer"].get("expand", False)
            and msg["fn"].has_enumerate_support
        )
        super().process_message(msg)
        if enumerated:
            sup = msg["fn"].enumerate_support(expand=False)
            sup = jnp.reshape(sup, (sup.shape[0], -1))[:, 0]
            msg["value"] = sup[msg["value"]]


def _max_plate_nesting(tr: Mapping[str, dict]) -> int:
    depth = 0
    for site in tr.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.dim is not None:
                depth = max(depth, -frame.dim)
    return depth


def _enum_trace(model: Callable, args: tuple, kwargs: dict, nesting: int) -> dict:
    enumerated = enum_support(
        config_enumerate(model), first_available_dim=-(nesting + 1)
    )
    try:
        return packed_trace(handlers.seed(enumerated, 0)).get_trace(*args, **kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, CompileError):
            raise
        raise CompileError(
            f"tracing the model under parallel enumeration failed ({err}); "
            "index arrays with numpyro.ops.indexing.Vindex and declare every batch "
            "dimension with numpyro.plate so enumerated dims can broadcast"
        ) from err


def _site_log_prob(site: dict) -> Array:
    value = site["value"]
    if site.get("intermediates"):
        lp = site["fn"].log_prob(value, site["intermediates"])
    else:
        lp = site["fn"].log_prob(value)
    if site.get("scale") is not None:
        lp = site["scale"] * lp
    if site.get("mask") is not None:
        lp = jnp.where(site["mask"], lp, 0.0)
    return jnp.asarray(lp)


def _site_infos(
    tr: Mapping[str, dict], supports: Mapping[str, tuple]
) -> dict[str, SiteInfo]:
    latent = set(supports)
    infos: dict[str, SiteInfo] = {}
    for name, site in tr.items():
        if site["type"] != "sample":
            continue
        lp = _site_log_prob(site)
        frames = sorted(
            (f for f in site["cond_indep_stack"] if f.dim is not None),
            key=lambda f: f.dim,
        )
        plate_dims = tuple(f.dim for f in frames)
        dim_to_name = dict(site["infer"].get("dim_to_name", {}))
        enum_names: list[str] = []
        enum_dims: list[int | None] = []
        if name in latent:
            enum_names.append(name)
            own = [d for d, n in dim_to_name.items() if n == name]
            enum_dims.append(own[0] if own else None)
        for d in sorted(dim_to_name):
            n = dim_to_name[d]
            if d in plate_dims or n == name:
                continue
            if n not in latent:
                raise CompileError(
                    f"site '{name}' has a batch dimension {d} ('{n}') that is "
                    "neither a plate nor an enumerated latent site; declare "
                    "batch dimensions with numpyro.plate"
                )
            enum_names.append(n)
            enum_dims.append(d)
        known = set(plate_dims) | {d for d in enum_dims if d is not None}
        for d in range(-lp.ndim, 0):
            if d not in known and lp.shape[d] != 1:
                raise CompileError(
                    f"site '{name}' has an undeclared batch dimension {d} of size "
                    f"{lp.shape[d]}; declare batch dimensions with numpyro.plate"
                )
        support: tuple[Any, ...] = supports.get(name, ())
        infos[name] = SiteInfo(
            name=name,
            is_observed=name not in latent,
            plates=tuple(f.name for f in frames),
            plate_shape=tuple(f.size for f in frames),
            support=support,
            enum_names=tuple(enum_names),
            enum_dims=tuple(enum_dims),
            plate_dims=plate_dims,
        )
    return infos


def _site_tensor(lp: Array, info: SiteInfo, cards: Mapping[str, int]) -> Array:
    """Rearrange a traced log-prob tensor to axes ``(*enum_names, *plates)``."""
    dims = [d for d in info.enum_dims if d is not None] + list(info.plate_dims)
    length = max([lp.ndim] + [-d for d in dims]) if dims else lp.ndim
    x = jnp.reshape(lp, (1,) * (length - lp.ndim) + lp.shape)
    target = list(x.shape)
    for n, d in zip(info.enum_names, info.enum_dims, strict=True):
        if d is not None:
            target[length + d] = cards[n]
    for d, size in zip(info.plate_dims, info.plate_shape, strict=True):
        target[length + d] = size
    x = jnp.broadcast_to(x, tuple(target))
    order = [length + d for d in dims]
    rest = [a for a in range(length) if a not in order]
    x = jnp.transpose(x, order + rest)
    x = jnp.reshape(x, tuple(target[a] for a in order))
    # A latent site of cardinality one has no enumerated dim: add its axis.
    for k, d in enumerate(info.enum_dims):
        if d is None:
            x = jnp.expand_dims(x, k)
    return x


@dataclass(eq=False)
class FactorGraph:
    """A NumPyro model compiled to a bipartite factor graph.

    Attributes:
        graph: ``networkx.Graph`` with node attribute ``kind`` ("variable" or
            "factor"); variables carry ``cardinality``, ``site``, ``index``;
            factors carry ``scope`` and ``table`` (log-potentials for the
            evidence the graph was compiled with).
        variables: Variable nodes in a fixed order (site order, then plate index).
        factors: Factor nodes in a fixed order.
        sites: What the compiler learned about each sample site.
        model, args, kwargs: The model and the arguments it was compiled with.

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> def model(x=None):
        ...     z = numpyro.sample("z", dist.Bernoulli(0.3))
        ...     numpyro.sample("x", dist.Normal(z * 2.0, 1.0), obs=x)
        >>> fg = compile_model(model, x=jnp.array(1.5))
        >>> [v.name for v in fg.variables], [f.scope for f in fg.factors]
        (['z'], [('z',), ('z',)])
    """

    model: Callable
    args: tuple
    kwargs: dict
    sites: dict[str, SiteInfo]
    variables: tuple[Variable, ...]
    factors: tuple[Factor, ...]
    plate_nesting: int
    graph: nx.Graph
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def variable_index(self) -> dict[str, int]:
        return {v.name: i for i, v in enumerate(self.variables)}

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.sites.items() if not s.is_observed)

    @property
    def evidence_names(self) -> tuple[str, ...]:
        """Keyword arguments whose arrays can be swapped in ``tables``/``infer``."""
        return tuple(_split_evidence(self.kwargs)[0])

    @property
    def n_traces(self) -> int:
        """How many times ``infer`` traced (and so jitted) a kernel for this graph."""
        return self._cache.get("n_traces", 0)

    def tables(self, **evidence: Any) -> tuple[Array, ...]:
        """Log-potential tables of every factor, for new evidence.

        Pure and jit/vmap-compatible: re-traces the model under enumeration with
        ``kwargs`` updated by ``evidence``.

        Returns:
            One array per factor, of shape ``[cardinality of v for v in scope]``.
        """
        kwargs = {**self.kwargs, **evidence}
        tr = _enum_trace(self.model, self.args, kwargs, self.plate_nesting)
        cards = {n: len(s.support) for n, s in self.sites.items() if s.support}
        per_site: dict[str, Array] = {}
        for name, info in self.sites.items():
            per_site[name] = _site_tensor(_site_log_prob(tr[name]), info, cards)
        out = []
        for f in self.factors:
            t = per_site[f.site]
            n_enum = len(self.sites[f.site].enum_names)
            out.append(t[(slice(None),) * n_enum + f.index])
        return tuple(out)

    def schedule(self, kind: ScheduleKind = "auto", **options: Any):
        """Derive a message schedule; see :func:`pgm_drm.graph.make_schedule`."""
        from pgm_drm.graph.schedule import make_schedule

        key = (kind, tuple(sorted(options.items())))
        if key not in self._cache:
            self._cache[key] = make_schedule(self, kind, **options)
        return self._cache[key]

    def is_tree(self) -> bool:
        """True when the bipartite factor graph has no loops (a forest)."""
        return nx.is_forest(self.graph)

    def draw(self, ax=None, **kwargs: Any):
        """Draw the factor graph with matplotlib (variables round, factors square)."""
        from pgm_drm.diagnostics.plots import draw_factor_graph

        return draw_factor_graph(self, ax=ax, **kwargs)


def _split_evidence(kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    """Array keyword arguments (evidence, traced) and the rest (static)."""
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
    return arrays, {k: v for k, v in kwargs.items() if k not in arrays}


def compile_model(model: Callable, *args: Any, **kwargs: Any) -> FactorGraph:
    """Compile a NumPyro model with finite discrete latents into a factor graph.

    Every latent sample site must have finite support (``has_enumerate_support``);
    plates are unrolled, one variable node per plate instance. Observed sites,
    ``numpyro.factor`` sites and latent sites each give one factor per plate
    instance, whose table is the site's own ``log_prob`` traced under
    enumeration (DESIGN §3).

    Args:
        model: A NumPyro model function.
        *args, **kwargs: Arguments for the model, including the observations.
            Array keyword arguments are evidence that ``infer`` may replace
            (a batch of them is vmapped).

    Returns:
        The compiled :class:`FactorGraph`.

    Raises:
        CompileError: Continuous latent sites, subsampled plates, or batch
            dimensions not declared by plates.
    """
    plain = model_sites(model, *args, **kwargs)
    supports = {
        n: tuple(support_values(s["fn"], n).tolist())
        for n, s in plain.items()
        if s["type"] == "sample" and not s["is_observed"]
    }
    nesting = _max_plate_nesting(plain)
    holder: dict[str, Any] = {}
    arrays, static = _split_evidence(kwargs)

    def read_structure(arrays):
        # Structure depends on shapes only: trace abstractly (no eager XLA ops).
        tr = _enum_trace(model, args, {**static, **arrays}, nesting)
        holder["infos"] = _site_infos(tr, supports)
        return 0

    jax.eval_shape(read_structure, arrays)
    infos = holder["infos"]

    variables: list[Variable] = []
    for name, info in infos.items():
        if info.is_observed:
            continue
        for idx in itertools.product(*(range(s) for s in info.plate_shape)):
            variables.append(
                Variable(f"{name}{_index_str(idx)}", name, tuple(idx), info.support)
            )

    factors: list[Factor] = []
    for name, info in infos.items():
        pos = {p: k for k, p in enumerate(info.plates)}
        for idx in itertools.product(*(range(s) for s in info.plate_shape)):
            scope = []
            for n in info.enum_names:
                parent = infos[n]
                missing = [p for p in parent.plates if p not in pos]
                if missing:
                    raise CompileError(
                        f"site '{name}' depends on '{n}' inside plate(s) {missing} "
                        f"that '{name}' is not in; such reductions are not supported"
                    )
                sub = tuple(idx[pos[p]] for p in parent.plates)
                scope.append(f"{n}{_index_str(sub)}")
            factors.append(
                Factor(f"p({name}{_index_str(tuple(idx))})", name, idx, tuple(scope))
            )

    graph = nx.Graph()
    for v in variables:
        graph.add_node(
            v.name,
            kind="variable",
            cardinality=v.cardinality,
            site=v.site,
            index=v.index,
            support=v.support,
        )
    fg = FactorGraph(
        model=model,
        args=args,
        kwargs=dict(kwargs),
        sites=infos,
        variables=tuple(variables),
        factors=tuple(factors),
        plate_nesting=nesting,
        graph=graph,
    )
    tables = jax.jit(lambda ev: fg.tables(**ev))(arrays)
    for f, t in zip(factors, tables, strict=True):
        graph.add_node(f.name, kind="factor", scope=f.scope, site=f.site, table=t)
        for v in f.scope:
            graph.add_edge(f.name, v)
    return fg
