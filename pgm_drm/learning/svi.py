"""SVI cross-check for RM learning: NumPyro ``TraceEnum_ELBO`` + Adam (DESIGN §5).

The RM parameters are ``numpyro.param`` sites of a model whose discrete
latents ``c, g, a`` are enumerated in parallel (``config_enumerate``); the guide
is empty. With no continuous latents the ELBO *is* the exact observed-data
log-likelihood ``sum_n log p(I_n)``, so SVI is plain gradient ascent on the
quantity EM climbs; it should reach the same optimum, more slowly.

:func:`fit_svi` runs the Adam steps in jitted ``lax.scan`` chunks as the steps
of :func:`~pgm_drm.learning.loop.run_loop` (state: :class:`SVIFitState`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.funsor import config_enumerate
from numpyro.infer import SVI, TraceEnum_ELBO
from numpyro.ops.indexing import Vindex
from numpyro.optim import optax_to_numpyro

from pgm_drm._typing import Array, ArrayLike, PRNGKey
from pgm_drm.learning.base import (
    FitResult,
    check_fit_inputs,
    finish_model,
    initial_model,
)
from pgm_drm.learning.io import fingerprint
from pgm_drm.learning.likelihood import log_likelihood
from pgm_drm.learning.loop import Algorithm, LoopOptions, check_n_iter, run_loop
from pgm_drm.models.pytree import replace
from pgm_drm.models.rendering import RenderingModel

__all__ = ["SVIFitState", "fit_svi", "svi_guide", "svi_model"]

#: Adam steps per compiled chunk (and between checkpoints) by default.
DEFAULT_CHUNK = 100


class SVIFitState(NamedTuple):
    """The loop state of :func:`fit_svi`: NumPyro's ``SVIState`` (the
    unconstrained parameters, the Adam moments and step count, the PRNG key)
    and the number of Adam steps done."""

    svi: Any
    iteration: Array


@config_enumerate
def svi_model(images: jax.Array, init: RenderingModel) -> None:
    """The RM with ``numpyro.param`` parameters and a data plate (Eqs. 3-4, 9).

    Args:
        images: ``(N, *image_shape)``.
        init: The starting model: its parameters are the initial values, its
            pytree structure fixes whether there is a switch.
    """
    pos = dist.constraints.positive
    mu = numpyro.param("templates", init.templates)
    sigma = numpyro.param("sigma", init.sigma, constraint=pos)
    pc = numpyro.param(
        "class_prior", init.class_prior, constraint=dist.constraints.simplex
    )
    pg = numpyro.param(
        "nuisance_prior", init.nuisance_prior, constraint=dist.constraints.simplex
    )
    nd = images.ndim - 1
    with numpyro.plate("data", images.shape[0]):
        c = numpyro.sample("c", dist.Categorical(pc))
        g = numpyro.sample("g", dist.Categorical(pg))
        mean = Vindex(mu)[c, g]
        if init.switch_prior is not None:
            pa = numpyro.param(
                "switch_prior",
                init.switch_prior,
                constraint=dist.constraints.unit_interval,
            )
            a = numpyro.sample("a", dist.Bernoulli(pa))
            mean = jnp.expand_dims(a, tuple(range(-nd, 0))) * mean
        numpyro.sample("image", dist.Normal(mean, sigma).to_event(nd), obs=images)


def svi_guide(images: jax.Array, init: RenderingModel) -> None:
    """Empty guide: every latent is discrete and enumerated in the model."""


def _model_of(svi: SVI, state: Any, init: RenderingModel) -> RenderingModel:
    """``init`` with the current values of the ``numpyro.param`` sites."""
    return replace(init, **svi.get_params(state))


def fit_svi(
    images: ArrayLike,
    n_classes: int,
    n_nuisances: int,
    *,
    switch: bool | None = None,
    n_steps: int = 1000,
    learning_rate: float = 0.05,
    key: PRNGKey | None = None,
    init: RenderingModel | None = None,
    loop: LoopOptions | None = None,
) -> FitResult:
    """Fit an RM's parameters by SVI with ``TraceEnum_ELBO`` and optax Adam.

    Full-batch: each step is one exact gradient of ``sum_n log p(I_n)``. Steps
    run in jitted ``lax.scan`` chunks of ``loop.every`` steps (default 100);
    the progress bar and checkpoints update between chunks. Unsupervised only.

    Args:
        images: ``(N, *image_shape)``.
        n_classes, n_nuisances: ``C`` and ``G``.
        switch: Fit the ON/OFF switch; default: as ``init``, else ``False``.
        n_steps: Adam steps.
        learning_rate: Adam step size.
        key: PRNG key for the k-means++ initialisation (the same one
            :func:`~pgm_drm.learning.fit_em` uses for the same key) and SVI.
        init: Start from this :class:`RenderingModel` instead.
        loop: Progress bar (the log-likelihood per image), checkpoints and
            the chunk length (:class:`~pgm_drm.learning.loop.LoopOptions`); the
            checkpoint holds the Adam moments too.

    Returns:
        A :class:`FitResult`; ``objective`` and ``log_likelihood`` (identical
        here) hold ``mean_n log p(I_n)`` at the start of each chunk and at the end.

    Example:
        >>> import jax
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> truth = RenderingModel(default_templates(4)[:2, :2], sigma=0.1)
        >>> images, _ = truth.sample(jax.random.PRNGKey(0), 40)
        >>> from pgm_drm.learning.loop import LoopOptions
        >>> fit = fit_svi(images, 2, 2, n_steps=20, loop=LoopOptions(progress=False))
        >>> fit.model.templates.shape
        (2, 2, 4, 4)
    """
    x, c_, g_ = check_fit_inputs(images, n_classes, n_nuisances)
    n_steps = check_n_iter(n_steps, "n_steps")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    loop = LoopOptions() if loop is None else loop
    chunk = loop.interval(DEFAULT_CHUNK)
    labels = jnp.full((x.shape[0],), -1, dtype=jnp.int32)
    init_p = initial_model(x, c_, g_, key, switch, labels, init)
    k0 = jax.random.PRNGKey(0) if key is None else key
    svi, run_chunk = _svi_and_runner(float(learning_rate))
    n = x.shape[0]

    def start(model: RenderingModel) -> SVIFitState:
        svi_state = svi.init(jax.random.fold_in(k0, 1), x, model)
        return SVIFitState(svi_state, jnp.asarray(0, dtype=jnp.int32))

    def step(st: SVIFitState) -> tuple[SVIFitState, dict[str, float]]:
        length = min(chunk, n_steps - int(st.iteration))
        new, losses = run_chunk(st.svi, x, init_p, length)
        info = {"log_likelihood": -float(losses[0]) / n}
        return SVIFitState(new, st.iteration + length), info

    meta = {
        "kind": "svi",
        "n_classes": c_,
        "n_nuisances": g_,
        "switch": init_p.switch_prior is not None,
        "learning_rate": float(learning_rate),
        "chunk": chunk,
        "data": fingerprint(x),
    }
    out = run_loop(
        Algorithm(init=start, step=step),
        init_p,
        n_steps,
        loop,
        history=("log_likelihood",),
        meta=meta,
        desc="SVI",
        default_every=DEFAULT_CHUNK,
    )
    model = _model_of(svi, out.state.svi, init_p)
    final = float(jnp.mean(log_likelihood(model, x)))
    hist = np.asarray(out.history["log_likelihood"] + [final])
    return FitResult(
        model=finish_model(model),
        objective=hist,
        log_likelihood=hist.copy(),
        n_iter=int(out.state.iteration),
        converged=False,
    )


@lru_cache(maxsize=16)
def _svi_and_runner(learning_rate: float):
    """The SVI object and a jitted ``(state, x, init, length) -> (state, losses)``
    running ``length`` steps in one ``lax.scan``.

    Cached per learning rate, so repeated fits (restarts, resumes) reuse the
    compiled chunk for the same data shapes instead of re-tracing the ELBO.
    """
    svi = SVI(
        svi_model,
        svi_guide,
        optax_to_numpyro(optax.adam(learning_rate)),
        TraceEnum_ELBO(max_plate_nesting=1),
    )

    def run(state, x, init_p, length):
        def body(s, _):
            return svi.update(s, x, init_p)

        return jax.lax.scan(body, state, None, length=length)

    return svi, jax.jit(run, static_argnames=("length",))
