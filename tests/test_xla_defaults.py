"""Exactness under XLA's default compiler settings, in a fresh process.

``make test`` compiles at ``--xla_backend_optimization_level=0`` with XLA's legacy
CPU emitters (half the suite's time is compilation; see the Makefile). Users run
the defaults, so the core exactness checks run again here with those two flags
removed: the tree kernel (sum and max) and the junction-tree kernel (sum) on
random models with hard zeros and the rendering model (max) against brute force,
and the vmapped gradient of log Z (the generic EM's M-step input) against the
gradient of the brute-force sum.

Tolerances: 1e-6 on log Z and log-marginals in float64, as in test_exactness (the
same ~10-40 log-terms summed in different orders agree to ~1e-12); 1e-8 on the
gradients (two float64 programs for the same function: round-off only).
"""

import os
import textwrap

from pgm_drm.testing import run_on_devices

SPEED_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
)

SCRIPT = textwrap.dedent(
    """
    import os
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from pgm_drm.graph import compile_model
    from pgm_drm.inference import brute_force, infer, log_partition
    from pgm_drm.testing import (
        assert_posteriors_close, random_factor_model, random_rendering_model,
    )

    flags = os.environ.get("XLA_FLAGS", "")
    assert "optimization_level=0" not in flags, flags
    assert "fusion_emitters=false" not in flags, flags
    cases = [
        (random_factor_model(3, n_vars=6, kind="tree", hard_zeros=True), "tree",
         ("sum", "max")),
        (random_factor_model(5, n_vars=5, kind="loopy", hard_zeros=True), "exact",
         ("sum",)),
        (random_rendering_model(1, switch=True), "auto", ("max",)),
    ]
    for (model, kwargs), schedule, semirings in cases:
        if hasattr(model, "model"):
            model = model.model
        fg = compile_model(model, **kwargs)
        for semiring in semirings:
            post = infer(fg, semiring, schedule=schedule)
            ref = brute_force(model, semiring=semiring, **kwargs)
            assert_posteriors_close(post, ref, 1e-6, model, kwargs)

    def switched(a=None, x=None):
        on = numpyro.sample("on", dist.Bernoulli(0.4))
        numpyro.sample("x", dist.Normal(2.0 * jnp.tanh(a) * on, 1.0), obs=x)

    xs = jnp.asarray(np.random.default_rng(0).normal(1.0, 1.0, 16))
    fg = compile_model(switched, a=jnp.array(0.3), x=xs[0])
    lz = log_partition(fg)
    total = lambda a: jax.vmap(lambda x: lz({"a": a, "x": x}))(xs).sum()

    def brute(a):
        mu = 2.0 * jnp.tanh(a) * jnp.array([0.0, 1.0])
        lp = jnp.log(jnp.array([0.6, 0.4])) + dist.Normal(mu, 1.0).log_prob(
            xs[:, None]
        )
        return jax.scipy.special.logsumexp(lp, axis=1).sum()

    g = jax.jit(jax.grad(total))(jnp.array(0.3))
    np.testing.assert_allclose(g, jax.grad(brute)(jnp.array(0.3)), atol=1e-8)
    print("DEFAULTS-OK")
    """
)


def test_core_exactness_under_xla_defaults(monkeypatch):
    flags = os.environ.get("XLA_FLAGS", "")
    for f in SPEED_FLAGS:
        flags = flags.replace(f, "")
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags.split()))
    run_on_devices(SCRIPT, n_devices=1, marker="DEFAULTS-OK")
