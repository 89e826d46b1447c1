"""NumPyro model -> plate-grouped factor graph (networkx view) -> schedules, flat plans.

JAX appears here only to trace the model and evaluate its own log-probs (and their
natural-parameter form, Eq. 8); message passing lives in ``pgm_drm.inference``.
"""

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
from pgm_drm.graph.natural import natural_log_prob
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
    "natural_log_prob",
]
