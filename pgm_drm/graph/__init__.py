"""NumPyro model -> networkx factor graph -> message schedules (no JAX math here)."""

from pgm_drm.graph.compile import (
    CompileError,
    Factor,
    FactorGraph,
    FactorGroup,
    SiteInfo,
    Variable,
    VariableGroup,
    compile_model,
    enumeration_tables,
    model_sites,
)
from pgm_drm.graph.plan import FlatPlan, make_flat_plan
from pgm_drm.graph.schedule import MAX_CLUSTER_SIZE, Schedule, make_schedule

__all__ = [
    "MAX_CLUSTER_SIZE",
    "CompileError",
    "Factor",
    "FactorGraph",
    "FactorGroup",
    "FlatPlan",
    "Schedule",
    "SiteInfo",
    "Variable",
    "VariableGroup",
    "compile_model",
    "enumeration_tables",
    "make_flat_plan",
    "make_schedule",
    "model_sites",
]
