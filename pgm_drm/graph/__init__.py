"""NumPyro model -> networkx factor graph -> message schedules (no JAX math here)."""

from pgm_drm.graph.compile import (
    CompileError,
    Factor,
    FactorGraph,
    SiteInfo,
    Variable,
    compile_model,
    model_sites,
)
from pgm_drm.graph.schedule import MAX_CLUSTER_SIZE, Schedule, make_schedule

__all__ = [
    "MAX_CLUSTER_SIZE",
    "CompileError",
    "Factor",
    "FactorGraph",
    "Schedule",
    "SiteInfo",
    "Variable",
    "compile_model",
    "make_schedule",
    "model_sites",
]
