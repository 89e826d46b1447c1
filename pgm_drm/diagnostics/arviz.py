"""Discrete posteriors as :class:`arviz.InferenceData` (issue 6, part 2).

ArviZ works with *draws*; our posteriors are exact *marginal tables*. Every
``InferenceData`` made here therefore carries both, in three groups:

``posterior``
    Draws of every discrete latent site, dims ``(chain, draw[, image], *plates)``,
    values in the site's support. For a sum-product :class:`Posterior` they are
    **exact joint** posterior draws when the model is known (``infer_discrete``
    at ``temperature=1``: forward-filter backward-sample, so correlations between
    sites are kept), else independent draws from each variable's marginal
    (``attrs["draws"] == "marginal"``: the marginals are right, the correlations
    are not). Absent for max-sum / tempered posteriors (max-marginals are not a
    distribution) unless draws are asked for explicitly.
``marginals`` (a custom group)
    The probabilities ``p(site = k | evidence)``, dims ``([image,] *plates,
    <site>_state)`` with the support values as the ``<site>_state`` coordinate.
    From a :class:`Posterior` they are ``exp(log_marginals)`` exactly (max-sum:
    the max-marginals ``exp(max log p - max)``, whose maximum is 1); from draws,
    the empirical frequencies (``attrs["marginals"] == "empirical"``). A
    :class:`Posterior` adds ``log_z`` (dims ``([image])``).
``map_estimate`` (a custom group, :class:`Posterior` only)
    The joint MAP assignment :attr:`Posterior.map`, dims ``([image,] *plates)``.

Plates become dims named after the plates (shared across sites); a batched
posterior (leading ``B``) gets an ``image`` dim. ``az.from_numpyro`` cannot do
this: its MCMC samples contain no enumerated site, and building its
``log_likelihood`` group re-runs the model, which tries to *sample* the
enumerated site without a PRNG key and fails (``AssertionError`` in
``numpyro.distributions``; reproduced in ``tests/diagnostics/test_arviz.py``).
:func:`discrete_posterior_draws` is the fix: ``infer_discrete(temperature=1)``
draws of the discrete sites, optionally conditioned on each continuous
posterior sample (the NumPyro/Pyro "infer_discrete after MCMC" recipe).

The paper's posteriors: ``p(c, g, a | I)`` of the RM (Eqs. 3-9) and the
sum-product / max-sum inference of §2.3-2.4 (Eqs. 5-6, 10-12).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from numpyro import handlers
from numpyro.contrib.funsor import config_enumerate, infer_discrete

from pgm_drm._typing import ArrayLike, PRNGKey
from pgm_drm.graph.compile import FactorGraph, max_plate_nesting
from pgm_drm.graph.compile import support_values as _support_values
from pgm_drm.inference.api import Posterior
from pgm_drm.models.rendering import RenderingModel

with warnings.catch_warnings():
    # arviz 0.2x announces its 1.0 refactor with a FutureWarning on import.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "SiteLayout",
    "discrete_posterior_draws",
    "draws_to_inference_data",
    "from_rendering_model",
    "plot_posterior_comparison_az",
    "posterior_to_inference_data",
    "site_layouts",
    "to_inference_data",
]

#: Name of the dim that indexes the instances of a batched posterior.
IMAGE_DIM = "image"


class SiteLayout(NamedTuple):
    """Where one latent site lives.

    Attributes:
        plates: Plate names, outermost first (the site's value axes).
        plate_shape: Their sizes.
        support: ``(K,)`` support values (the ``<site>_state`` coordinate).
    """

    plates: tuple[str, ...]
    plate_shape: tuple[int, ...]
    support: np.ndarray


def site_layouts(
    model: FactorGraph | Callable, *args: Any, **kwargs: Any
) -> dict[str, SiteLayout]:
    """``site -> SiteLayout`` of every discrete latent site (graph or model).

    Args:
        model: A :class:`FactorGraph` (its sites are used), or a NumPyro model
            traced once with ``*args, **kwargs`` (continuous latents, e.g. of a
            model for MCMC, are skipped).

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> def model(x=None):
        ...     with numpyro.plate("pixels", 3):
        ...         z = numpyro.sample("z", dist.Bernoulli(0.5))
        ...         numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
        >>> lay = site_layouts(model, x=jnp.zeros(3))["z"]
        >>> lay.plates, lay.plate_shape, lay.support.tolist()
        (('pixels',), (3,), [0, 1])
    """
    if isinstance(model, FactorGraph):
        return {
            name: SiteLayout(s.plates, s.plate_shape, np.asarray(s.support))
            for name, s in model.sites.items()
            if not s.is_observed
        }
    out = {}
    for name, site in _trace(model, args, kwargs).items():
        if not _is_discrete_latent(site):
            continue
        frames = sorted(
            (f for f in site["cond_indep_stack"] if f.dim is not None),
            key=lambda f: f.dim,
        )
        out[name] = SiteLayout(
            tuple(f.name for f in frames),
            tuple(f.size for f in frames),
            np.asarray(_support_values(site["fn"], name)),
        )
    return out


def _trace(model: Callable, args: tuple, kwargs: Mapping[str, Any]) -> dict:
    """One seeded trace (continuous latents allowed, unlike the compiler's)."""
    return handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)


def _is_discrete_latent(site: Mapping[str, Any]) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and bool(getattr(site["fn"], "has_enumerate_support", False))
    )


def _default_layouts(post: Posterior, batched: bool) -> dict[str, SiteLayout]:
    """Layouts when no model is known: dims ``<site>_dim_<i>``, support 0..K-1."""
    out = {}
    for name, lm in post.log_marginals.items():
        shape = tuple(np.shape(lm)[1 if batched else 0 : -1])
        plates = tuple(f"{name}_dim_{i}" for i in range(len(shape)))
        out[name] = SiteLayout(plates, shape, np.arange(np.shape(lm)[-1]))
    return out


# ------------------------------------------------------------------ draws
def discrete_posterior_draws(
    model: Callable,
    *args: Any,
    key: PRNGKey,
    n_draws: int = 1000,
    posterior_samples: Mapping[str, ArrayLike] | None = None,
    batched_evidence: Mapping[str, ArrayLike] | None = None,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Exact joint draws of the discrete latents, ``infer_discrete(temperature=1)``.

    NumPyro's forward-filter backward-sample: each draw is one exact sample of
    ``p(latents | evidence)`` (all sites jointly). With ``posterior_samples``
    (e.g. ``mcmc.get_samples()`` of the continuous sites, or fitted parameters
    with a leading draw axis) draw ``m`` is conditioned on sample ``m``, which
    gives draws of ``p(latents | evidence)`` marginalised over the continuous
    posterior -- the discrete part that ``az.from_numpyro`` is missing.

    Args:
        model: A NumPyro model whose latent discrete sites have support
            ``0..K-1`` with ``K >= 2`` (``infer_discrete`` enumerates ``arange(K)``).
        *args, **kwargs: The model's arguments, observations included (one
            instance; see :func:`from_rendering_model` for a batch of images).
        key: PRNG key.
        n_draws: Number of draws (ignored with ``posterior_samples``: one per
            sample).
        posterior_samples: ``site -> (M, *site_shape)`` values to condition on.
        batched_evidence: Keyword arguments with a leading ``B`` axis (one
            instance each, e.g. ``{"image": images}``); traced once, vmapped.

    Returns:
        ``site -> (n_draws, [B,] *plate_shape)`` numpy arrays of support values,
        for every latent discrete site not fixed by ``posterior_samples``.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> def model(x=None):
        ...     z = numpyro.sample("z", dist.Bernoulli(0.5))
        ...     numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
        >>> d = discrete_posterior_draws(
        ...     model, key=jax.random.PRNGKey(0), n_draws=4000, x=jnp.array(2.0)
        ... )
        >>> d["z"].shape, round(float(d["z"].mean()), 1)  # exact: 0.8808
        ((4000,), 0.9)
    """
    bev = {k: jnp.asarray(v) for k, v in (batched_evidence or {}).items()}
    first = {**kwargs, **{k: v[0] for k, v in bev.items()}}
    layouts = site_layouts(model, *args, **first)
    fixed = set(posterior_samples or {})
    discrete = {n: lay for n, lay in layouts.items() if n not in fixed}
    for name, lay in discrete.items():
        k = lay.support.shape[0]
        if k < 2 or not np.array_equal(lay.support, np.arange(k)):
            raise ValueError(
                f"site {name!r} has support {lay.support.tolist()}; infer_discrete "
                "needs support 0..K-1 with K >= 2 (use marginal draws instead)"
            )
    nesting = max_plate_nesting(_trace(model, args, first))
    enum_model = config_enumerate(model)

    def one(k, sample, ev):
        m = enum_model if sample is None else handlers.condition(enum_model, sample)
        m = infer_discrete(
            m, first_available_dim=-(nesting + 1), temperature=1, rng_key=k
        )
        tr = handlers.trace(m).get_trace(*args, **{**kwargs, **ev})
        return {n: tr[n]["value"] for n in discrete}

    if posterior_samples is None:
        if int(n_draws) < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        keys = jax.random.split(key, int(n_draws))
        samples, s_axis = None, None
    else:
        samples = {n: jnp.asarray(v) for n, v in posterior_samples.items()}
        m = {v.shape[0] for v in samples.values()}
        if len(m) != 1:
            raise ValueError(f"posterior_samples have different lengths: {m}")
        keys, s_axis = jax.random.split(key, m.pop()), 0
    draw = jax.vmap(one, in_axes=(0, s_axis, None))
    if bev:
        n_b = {v.shape[0] for v in bev.values()}
        if len(n_b) != 1:
            raise ValueError(f"batched_evidence has different batch sizes: {n_b}")
        out = jax.vmap(draw, in_axes=(None, None, 0), out_axes=1)(keys, samples, bev)
        lead = (-1, n_b.pop())
    else:
        out, lead = draw(keys, samples, {}), (-1,)
    return {
        n: np.asarray(v).reshape(lead + discrete[n].plate_shape) for n, v in out.items()
    }


def _marginal_draws(
    post: Posterior, key: PRNGKey, n_draws: int, supports: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``site -> (n_draws, [B,] *plates)``: independent draws per variable."""
    out = {}
    for i, (name, lm) in enumerate(sorted(post.log_marginals.items())):
        lm = jnp.asarray(lm)
        idx = jax.random.categorical(
            jax.random.fold_in(key, i), lm, shape=(int(n_draws),) + lm.shape[:-1]
        )
        out[name] = supports[name][np.asarray(idx)]
    return out


# ------------------------------------------------------------------ datasets
def _state_dim(site: str) -> str:
    return f"{site}_state"


def _chains(x: np.ndarray, n_chains: int) -> np.ndarray:
    """``(n_draws, ...)`` -> ``(n_chains, n_draws // n_chains, ...)``."""
    n = x.shape[0]
    if int(n_chains) < 1 or n % int(n_chains):
        raise ValueError(f"{n} draws do not split into {n_chains} chains")
    return x.reshape((int(n_chains), n // int(n_chains)) + x.shape[1:])


def _frequencies(values: np.ndarray, support: np.ndarray) -> np.ndarray:
    """``(n, *shape)`` draws -> ``(*shape, K)`` empirical state frequencies."""
    hits = values[..., None] == support.reshape((1,) * values.ndim + (-1,))
    return hits.mean(axis=0)


def _draws_dataset(
    draws: Mapping[str, np.ndarray],
    layouts: Mapping[str, SiteLayout],
    batched: bool,
    n_chains: int,
) -> xr.Dataset:
    lead = (IMAGE_DIM,) if batched else ()
    data, coords = {}, {}
    for name, v in draws.items():
        x = _chains(np.asarray(v), n_chains)
        data[name] = (("chain", "draw") + lead + layouts[name].plates, x)
        coords["chain"] = np.arange(x.shape[0])
        coords["draw"] = np.arange(x.shape[1])
        if batched:
            coords[IMAGE_DIM] = np.arange(x.shape[2])
    return xr.Dataset(data, coords=coords)


def _marginals_dataset(
    probs: Mapping[str, np.ndarray], layouts: Mapping[str, SiteLayout], batched: bool
) -> xr.Dataset:
    lead = (IMAGE_DIM,) if batched else ()
    data, coords = {}, {}
    for name, p in probs.items():
        lay = layouts[name]
        data[name] = (lead + lay.plates + (_state_dim(name),), p)
        coords[_state_dim(name)] = lay.support
        if batched:
            coords[IMAGE_DIM] = np.arange(p.shape[0])
    return xr.Dataset(data, coords=coords)


def _resolve_layouts(
    model: FactorGraph | Callable | None,
    model_args: tuple,
    model_kwargs: Mapping[str, Any] | None,
    evidence: Mapping[str, Any] | None,
    batched: bool,
) -> dict[str, SiteLayout]:
    if isinstance(model, FactorGraph) or model is None:
        return site_layouts(model) if model is not None else {}
    kw = dict(model_kwargs or {})
    if evidence:  # the layout of one instance
        kw.update({k: np.asarray(v)[0] if batched else v for k, v in evidence.items()})
    return site_layouts(model, *model_args, **kw)


def _joint_draws(
    model: FactorGraph | Callable,
    model_args: tuple,
    model_kwargs: Mapping[str, Any] | None,
    evidence: Mapping[str, Any] | None,
    batch: int | None,
    key: PRNGKey,
    n_draws: int,
) -> dict[str, np.ndarray]:
    """Exact joint draws, ``(n_draws, [B,] *plates)``, one run per instance."""
    if isinstance(model, FactorGraph):
        fn, args, base = model.model, model.args, dict(model.kwargs)
    else:
        fn, args, base = model, tuple(model_args), dict(model_kwargs or {})
    ev = dict(evidence or {})
    if batch is None:
        return discrete_posterior_draws(
            fn, *args, key=key, n_draws=n_draws, **{**base, **ev}
        )
    if not ev:
        raise ValueError(
            "a batched Posterior needs its batched evidence (evidence=) for joint "
            "draws; pass draws='marginal' to sample the marginals instead"
        )
    return discrete_posterior_draws(
        fn, *args, key=key, n_draws=n_draws, batched_evidence=ev, **base
    )


def posterior_to_inference_data(
    post: Posterior,
    model: FactorGraph | Callable | None = None,
    *,
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
    evidence: Mapping[str, ArrayLike] | None = None,
    key: PRNGKey | None = None,
    n_draws: int | None = None,
    n_chains: int = 1,
    draws: str = "auto",
) -> az.InferenceData:
    """A :class:`Posterior` (message passing, enumeration or brute force) as ArviZ.

    Groups ``posterior`` (draws), ``marginals`` (``exp(log_marginals)`` exactly,
    plus ``log_z``) and ``map_estimate``; see the module docstring.

    Args:
        post: From :func:`~pgm_drm.inference.infer`,
            :func:`~pgm_drm.inference.enumerate_exact` or
            :func:`~pgm_drm.inference.brute_force`; batched (leading ``B``) or not.
        model: The :class:`FactorGraph` the posterior came from, or the NumPyro
            model (then ``model_args`` / ``model_kwargs`` with the observations):
            plate names and support values for dims and coords, and the model
            for exact joint draws. ``None``: dims ``<site>_dim_<i>``, states 0..K-1.
        evidence: For a batched posterior (or evidence other than the graph's
            compiled one): the ``**evidence`` that was passed to ``infer``.
        key: PRNG key of the draws (default ``PRNGKey(0)``).
        n_draws: Draws per chain x chains in total; default 1000 at temperature
            1 and 0 (no ``posterior`` group) otherwise.
        n_chains: Split the draws into this many chains (iid, so any split is
            fine; ArviZ's ``rhat`` needs >= 2).
        draws: "joint" (``infer_discrete``; needs ``model``), "marginal"
            (independent per variable), or "auto" (joint when ``model`` is given).

    Returns:
        An :class:`arviz.InferenceData`; ``attrs`` of ``marginals`` record the
        ``schedule``, ``temperature`` and how the draws were made.

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from pgm_drm.graph import compile_model
        >>> from pgm_drm.inference import infer
        >>> def model(x=None):
        ...     z = numpyro.sample("z", dist.Bernoulli(0.5))
        ...     numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
        >>> fg = compile_model(model, x=jnp.array(2.0))
        >>> idata = posterior_to_inference_data(infer(fg), fg, n_draws=200)
        >>> p = idata.marginals["z"].values
        >>> idata.posterior["z"].shape, [round(float(v), 4) for v in p]
        ((1, 200), [0.1192, 0.8808])
    """
    sites = sorted(post.log_marginals)
    if not sites:
        raise ValueError("the posterior has no latent sites")
    batched = np.ndim(post.log_z) == 1
    batch = int(np.shape(post.log_z)[0]) if batched else None
    layouts = _default_layouts(post, batched)
    layouts.update(_resolve_layouts(model, model_args, model_kwargs, evidence, batched))
    for s in sites:
        want = tuple(np.shape(post.log_marginals[s])[1 if batched else 0 : -1])
        if layouts[s].plate_shape != want:
            raise ValueError(
                f"site {s!r}: the model's plate shape {layouts[s].plate_shape} does "
                f"not match the posterior's {want}"
            )
    if "log_z" in sites:
        raise ValueError("a latent site named 'log_z' clashes with the log_z entry")
    probs = {s: np.exp(np.asarray(post.log_marginals[s])) for s in sites}
    lead = (IMAGE_DIM,) if batched else ()
    marg = _marginals_dataset(probs, layouts, batched)
    marg["log_z"] = (lead, np.asarray(post.log_z))
    map_ds = xr.Dataset(
        {s: (lead + layouts[s].plates, np.asarray(post.map[s])) for s in sites},
        coords=marg[[]].coords if batched else None,
    )
    t = float(post.temperature)
    if n_draws is None:
        n_draws = 1000 if t == 1.0 else 0
    if draws not in ("auto", "joint", "marginal"):
        raise ValueError(f"draws must be 'auto', 'joint' or 'marginal', got {draws!r}")
    how = draws if draws != "auto" else ("joint" if model is not None else "marginal")
    groups = {"marginals": marg, "map_estimate": map_ds}
    if int(n_draws) > 0:
        if t != 1.0:
            raise ValueError(
                f"draws need a sum-product posterior (temperature 1), got {t}: "
                "max-marginals are not a distribution; use n_draws=0"
            )
        key = jax.random.PRNGKey(0) if key is None else key
        if how == "joint":
            if model is None:
                raise ValueError("draws='joint' needs the model (or FactorGraph)")
            d = _joint_draws(
                model, model_args, model_kwargs, evidence, batch, key, int(n_draws)
            )
        else:
            supports = {s: layouts[s].support for s in sites}
            d = _marginal_draws(post, key, int(n_draws), supports)
        groups["posterior"] = _draws_dataset(
            {s: d[s] for s in sites}, layouts, batched, n_chains
        )
    else:
        how = "none"
    marg.attrs.update(
        marginals="exact" if post.schedule != "loopy" else "loopy",
        schedule=post.schedule,
        temperature=t,
        draws=how,
    )
    idata = az.InferenceData(**groups)
    if "posterior" in groups:
        idata.posterior.attrs.update(draws=how, schedule=post.schedule)
    return idata


def draws_to_inference_data(
    draws: Mapping[str, ArrayLike],
    model: FactorGraph | Callable | None = None,
    *,
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
    batched: bool = False,
    n_chains: int = 1,
) -> az.InferenceData:
    """Draws of discrete sites (``Predictive``, ``infer_discrete``) as ArviZ.

    Groups ``posterior`` (the draws) and ``marginals`` (their empirical state
    frequencies, ``attrs["marginals"] == "empirical"``).

    Args:
        draws: ``site -> (n_draws, [B,] *plate_shape)``, e.g. from
            :func:`discrete_posterior_draws` or ``numpyro.infer.Predictive``
            (sites that the model does not declare as latent are dropped when
            ``model`` is given).
        model: For plate names and support values (as
            :func:`posterior_to_inference_data`); ``None``: dims
            ``<site>_dim_<i>``, states = the sorted values seen.
        batched: The second axis of every draw indexes images (``image`` dim).
        n_chains: Split the draws into this many chains.

    Example:
        >>> import numpy as np
        >>> idata = draws_to_inference_data({"c": np.array([0, 1, 1, 1])})
        >>> idata.marginals["c"].values.tolist()
        [0.25, 0.75]
    """
    arrays = {n: np.asarray(v) for n, v in draws.items()}
    layouts = _resolve_layouts(model, model_args, model_kwargs, None, False)
    if model is not None:
        arrays = {n: v for n, v in arrays.items() if n in layouts}
    skip = 2 if batched else 1
    for name, v in arrays.items():
        if name not in layouts:
            shape = v.shape[skip:]
            plates = tuple(f"{name}_dim_{i}" for i in range(len(shape)))
            layouts[name] = SiteLayout(plates, shape, np.unique(v))
        elif layouts[name].plate_shape != v.shape[skip:]:
            raise ValueError(
                f"draws of {name!r} have shape {v.shape}; expected (n_draws, "
                f"{'B, ' if batched else ''}*{layouts[name].plate_shape})"
            )
    if not arrays:
        raise ValueError("no draws of latent sites")
    probs = {n: _frequencies(v, layouts[n].support) for n, v in arrays.items()}
    marg = _marginals_dataset(probs, layouts, batched)
    marg.attrs.update(
        marginals="empirical", n_draws=next(iter(arrays.values())).shape[0]
    )
    post = _draws_dataset(arrays, layouts, batched, n_chains)
    post.attrs.update(draws="given")
    return az.InferenceData(posterior=post, marginals=marg)


def from_rendering_model(
    rm: RenderingModel,
    images: ArrayLike,
    *,
    key: PRNGKey | None = None,
    n_draws: int = 1000,
    n_chains: int = 1,
) -> az.InferenceData:
    """Exact joint draws of ``c, g[, a]`` given each image, from a fitted RM.

    The RM (e.g. ``fit_svi(...).model`` or ``fit_em(...).model``) is a NumPyro
    model with enumerable sites (Eqs. 3-4, 9); each image gets
    ``infer_discrete(temperature=1)`` draws from ``p(c, g, a | I)``.

    Args:
        rm: A :class:`RenderingModel`.
        images: ``(*image_shape)`` or ``(B, *image_shape)`` (``image`` dim).
        key, n_draws, n_chains: As :func:`discrete_posterior_draws`.

    Returns:
        ``InferenceData`` with ``posterior`` and empirical ``marginals``
        (:func:`draws_to_inference_data`).

    Example:
        >>> import jax
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> rm = RenderingModel(default_templates(4)[:2, :2], sigma=0.3)
        >>> images, _ = rm.sample(jax.random.PRNGKey(0), 3)
        >>> idata = from_rendering_model(rm, images, n_draws=50)
        >>> dict(idata.posterior["c"].sizes)
        {'chain': 1, 'draw': 50, 'image': 3}
    """
    x = np.asarray(images, dtype=float)
    batched = x.ndim == len(rm.image_shape) + 1
    if not batched and x.shape != rm.image_shape:
        raise ValueError(
            f"images must have shape {rm.image_shape} or (B, *{rm.image_shape}), "
            f"got {x.shape}"
        )
    key = jax.random.PRNGKey(0) if key is None else key
    xs = x if batched else x[None]
    d = discrete_posterior_draws(
        rm.model, key=key, n_draws=n_draws, batched_evidence={"image": xs}
    )
    if not batched:
        d = {n: v[:, 0] for n, v in d.items()}
    return draws_to_inference_data(
        d,
        rm.model,
        model_kwargs={"image": xs[0]},
        batched=batched,
        n_chains=n_chains,
    )


def to_inference_data(
    source: Posterior | Mapping[str, ArrayLike], *args: Any, **kwargs: Any
) -> az.InferenceData:
    """Dispatch: a :class:`Posterior` -> :func:`posterior_to_inference_data`;
    a dict of draws -> :func:`draws_to_inference_data`.

    Example:
        >>> import numpy as np
        >>> sorted(to_inference_data({"c": np.zeros(4, int)}).groups())
        ['marginals', 'posterior']
    """
    if isinstance(source, Posterior):
        return posterior_to_inference_data(source, *args, **kwargs)
    if isinstance(source, Mapping):
        return draws_to_inference_data(source, *args, **kwargs)
    raise TypeError(
        f"expected a Posterior or a dict of draws, got {type(source).__name__}"
    )


# ------------------------------------------------------------------ plot
def plot_posterior_comparison_az(
    sources: Mapping[str, az.InferenceData],
    site: str,
    *,
    sel: Mapping[str, Any] | None = None,
    n_se: float = 2.0,
    ax: plt.Axes | None = None,
) -> plt.Figure:
    """Side-by-side bars of one variable's posterior from several sources.

    Reads each source's ``marginals`` group (exact marginals of message passing
    / enumeration, or empirical frequencies of draws, e.g. SVI +
    ``infer_discrete``); empirical bars get ``+- n_se`` binomial standard errors
    ``sqrt(p (1 - p) / n_draws)``.

    Args:
        sources: ``label -> InferenceData`` from this module.
        site: The latent site.
        sel: Picks one variable of a plate site / batch, e.g.
            ``{"image": 0, "pixels": 2}`` (every remaining non-state dim must
            have size 1).
        n_se: Width of the error bars in standard errors.
        ax: Draw into this axes (else a new figure).

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Example:
        >>> import numpy as np
        >>> a = to_inference_data({"c": np.array([0, 1, 1, 1])})
        >>> fig = plot_posterior_comparison_az({"draws": a}, "c")
        >>> type(fig).__name__
        'Figure'
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    names = list(sources)
    if not names:
        raise ValueError("no sources to compare")
    width = 0.8 / len(names)
    state = _state_dim(site)
    support = None
    for k, name in enumerate(names):
        da = sources[name].marginals[site]
        if sel:
            da = da.sel({d: v for d, v in sel.items() if d in da.dims})
        extra = [d for d in da.dims if d != state]
        if any(da.sizes[d] != 1 for d in extra):
            raise ValueError(
                f"{name}: {site} still has dims {extra}; pick one variable with sel="
            )
        p = np.asarray(da.squeeze(extra).values, dtype=float)
        support = np.asarray(da[state].values)
        x = np.arange(p.shape[0]) + (k - (len(names) - 1) / 2) * width
        attrs = sources[name].marginals.attrs
        err = None
        if attrs.get("marginals") == "empirical":
            err = n_se * np.sqrt(p * (1 - p) / float(attrs["n_draws"]))
        ax.bar(x, p, width=width, yerr=err, capsize=2, label=name)
    ax.set_xticks(np.arange(len(support)), [str(v) for v in support])
    ax.set_xlabel(f"{site}")
    ax.set_ylabel("probability")
    ax.set_title(f"posterior of {site}" + (f" at {dict(sel)}" if sel else ""))
    ax.legend(fontsize=7)
    return fig
