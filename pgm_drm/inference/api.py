"""``infer``: run a schedule on a compiled graph, jitted once, vmapped over evidence."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array, Semiring
from pgm_drm.graph.compile import FactorGraph
from pgm_drm.graph.schedule import Schedule
from pgm_drm.inference.kernel import make_plan, run_plan

__all__ = ["Posterior", "infer", "resolve_temperature"]


class Posterior(NamedTuple):
    """Posterior summaries of every latent site.

    With a batch of ``B`` evidence instances every array gets a leading ``(B,)``.

    Attributes:
        log_marginals: ``site -> (*plate_shape, K)`` normalised log-marginals
            (sum-product), max-marginals minus the max (max-sum), or the tempered
            marginals ``T*logsumexp``-normalised at temperature T.
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
        return {k: jnp.exp(v) for k, v in self.log_marginals.items()}

    @property
    def converged(self) -> bool | None:
        """Loopy: whether the last sweep changed messages by less than 1e-6."""
        if self.deltas is None:
            return None
        return bool(np.all(np.asarray(self.deltas)[..., -1] < 1e-6))


def resolve_temperature(semiring: Semiring, temperature: float | None) -> float:
    """Map ``semiring`` / ``temperature`` arguments to one temperature T >= 0."""
    if semiring not in ("max", "sum"):
        raise ValueError(f"semiring must be 'max' or 'sum', got {semiring!r}")
    if temperature is None:
        return 0.0 if semiring == "max" else 1.0
    t = float(temperature)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    return t


def _check_evidence(fg: FactorGraph, evidence: dict[str, Any]):
    """Validate evidence; return (arrays, in_axes, batch size or None)."""
    arrays, axes, batch = {}, {}, None
    for name, value in evidence.items():
        if name not in fg.kwargs:
            raise ValueError(
                f"unknown evidence {name!r}; the model was compiled with keyword "
                f"arguments {sorted(fg.kwargs)}"
            )
        ref = np.shape(fg.kwargs[name])
        x = jnp.asarray(value)
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
        if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"evidence {name!r} contains NaN or inf values")
        arrays[name] = x
    return arrays, axes, batch


def _compiled(fg: FactorGraph, schedule: Schedule, temperature: float, axes: dict):
    key = ("infer", schedule, temperature, tuple(sorted(axes.items())))
    if key in fg._cache:
        return fg._cache[key]
    plan = make_plan(fg, schedule)

    def single(ev):
        fg._cache["n_traces"] = fg._cache.get("n_traces", 0) + 1
        return run_plan(plan, fg, fg.tables(**ev), temperature)

    fn = single
    if any(a == 0 for a in axes.values()):
        fn = jax.vmap(single, in_axes=(dict(axes),))
    fg._cache[key] = jax.jit(fn)
    return fg._cache[key]


def infer(
    fg: FactorGraph,
    semiring: Semiring = "sum",
    *,
    temperature: float | None = None,
    schedule: str | Schedule = "auto",
    **evidence: Any,
) -> Posterior:
    """Run max-sum, sum-product or tempered message passing on a compiled graph.

    Args:
        fg: A graph from :func:`pgm_drm.graph.compile_model`.
        semiring: "sum" (T=1) or "max" (T=0).
        temperature: Overrides ``semiring``: ``T * logsumexp(x / T)`` reductions
            (paper §6.2.1); T=0 is max-sum.
        schedule: "auto", "tree", "exact", "loopy" or a :class:`Schedule`.
        **evidence: New values for the array keyword arguments the graph was
            compiled with; a leading extra axis is a batch (vmapped; the graph is
            traced and jitted once per schedule, temperature and batching pattern).

    Returns:
        A :class:`Posterior`.

    Raises:
        ValueError: Unknown evidence names, wrong shapes, NaN/inf evidence, bad
            semiring or temperature, evidence of probability zero.

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
    t = resolve_temperature(semiring, temperature)
    sched = schedule if isinstance(schedule, Schedule) else fg.schedule(schedule)
    arrays, axes, batch = _check_evidence(fg, evidence)
    out = _compiled(fg, sched, t, axes)(arrays)
    log_z = out.log_z
    if bool(jnp.any(jnp.isneginf(log_z))):
        raise ValueError(
            "the evidence has probability zero under the model (log Z = -inf)"
        )
    lead = () if batch is None else (batch,)
    margs: dict[str, Array] = {}
    maps: dict[str, Array] = {}
    for site in fg.latent_sites:
        info = fg.sites[site]
        ids = [k for k, v in enumerate(fg.variables) if v.site == site]
        m = jnp.stack([out.log_marginals[k] for k in ids], axis=len(lead))
        margs[site] = jnp.reshape(m, lead + info.plate_shape + (len(info.support),))
        idx = jnp.stack([out.map_index[k] for k in ids], axis=len(lead))
        support = jnp.asarray(np.asarray(info.support))
        maps[site] = jnp.reshape(support[idx], lead + info.plate_shape)
    deltas = None if sched.is_exact else out.deltas
    return Posterior(margs, maps, log_z, t, sched.kind, deltas)
