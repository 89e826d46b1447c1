"""Test configuration: CPU only, float64 for exactness checks, seeded everything."""

import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Exactness tests compare against enumeration at 1e-6: float32 rounding of a sum
# of ~20 log-terms of size ~30 is ~1e-5, so every test runs in float64.
jax.config.update("jax_enable_x64", True)

# Every random model compiles its own JAX programs (~1-4 s each), so make test
# draws 2 (derandomized: the same 2 every run) examples per property, to keep
# the suite within 12 minutes on 2 cores; PGM_DRM_EXAMPLES=200 is the fuzzing run.
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("PGM_DRM_EXAMPLES", "2")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")


FUZZING = int(os.environ.get("PGM_DRM_EXAMPLES", "2")) >= 50


def _run_time_bound_programs_optimised() -> None:
    """make test compiles at ``--xla_backend_optimization_level=0`` (Makefile:
    the suite compiles thousands of small programs, each run a few times, so
    compile time is most of its time). The E-DRM relaxation is the exception:
    one program, a ``lax.scan`` of 100 Adam steps run once per tree level, whose
    run time is what counts; at -O0 it runs 4.5x slower (22 ms against 4.8 ms a
    call, the same compile time), which made each E-DRM forest estimator check
    take ~27 s. It is compiled here with XLA's optimisation back on for it alone:
    the same function, as a user's process compiles it.
    """
    if "--xla_backend_optimization_level=0" not in os.environ.get("XLA_FLAGS", ""):
        return
    from pgm_drm.learning import forest

    forest._relax = jax.jit(
        forest._relax.__wrapped__,
        static_argnames=("n_slots", "steps"),
        compiler_options={"xla_backend_optimization_level": 3},
    )


_run_time_bound_programs_optimised()


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    yield
    if FUZZING:
        # A fuzzing run compiles tens of thousands of programs in one process;
        # each compiled CPU program holds memory maps, and at the kernel's limit
        # (vm.max_map_count, 65530 here) XLA's next compile segfaults. Dropping
        # JAX's caches after each test frees them (make test keeps its caches:
        # its tests share programs).
        jax.clear_caches()


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


def pytest_terminal_summary(terminalreporter):
    """One line per hypothesis property that ran: how many examples it drew.

    The counts come from hypothesis's own per-test statistics (the text that
    ``--hypothesis-show-statistics`` prints in full), which its pytest plugin
    attaches to the reports, so they reach this hook from xdist workers too.
    """
    rows = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            stats = report.__dict__.get("_hypothesis_stats")
            if stats:
                counts = re.findall(r"(\d+) passing, (\d+) failing", stats)
                ok, bad = (sum(int(c[i]) for c in counts) for i in (0, 1))
                rows.append((report.nodeid, ok, bad))
    if rows:
        terminalreporter.section("hypothesis: examples drawn per property")
        for nodeid, ok, bad in sorted(rows):
            failed = f" ({bad} failing)" if bad else ""
            terminalreporter.write_line(f"{ok + bad:4d}{failed}  {nodeid}")
