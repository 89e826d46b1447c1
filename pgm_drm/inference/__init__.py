"""Schedules executed in JAX under a semiring; exact references from NumPyro."""

from pgm_drm.inference.api import (
    Posterior,
    infer,
    log_partition,
    log_partition_tables,
)
from pgm_drm.inference.conv_dcn import (
    ConvDCNOutput,
    conv_dcn_infer,
    naive_conv_dcn_pass,
)
from pgm_drm.inference.dcn import DCNOutput, dcn_infer, naive_dcn_pass
from pgm_drm.inference.edrm import (
    coarse_to_fine_margin,
    exact_map_path,
    greedy_path,
    greedy_path_naive,
    leaf_log_joint,
    path_log_joint,
    path_posterior,
)
from pgm_drm.inference.flat import FlatResult, run_flat_plan
from pgm_drm.inference.kernel import (
    KernelResult,
    Plan,
    make_plan,
    naive_run_plan,
)
from pgm_drm.inference.reference import (
    MAX_BRUTE_FORCE_CONFIGS,
    brute_force,
    enumerate_exact,
    latent_layout,
)

__all__ = [
    "MAX_BRUTE_FORCE_CONFIGS",
    "ConvDCNOutput",
    "DCNOutput",
    "FlatResult",
    "KernelResult",
    "Plan",
    "Posterior",
    "brute_force",
    "coarse_to_fine_margin",
    "conv_dcn_infer",
    "dcn_infer",
    "enumerate_exact",
    "exact_map_path",
    "greedy_path",
    "greedy_path_naive",
    "infer",
    "latent_layout",
    "leaf_log_joint",
    "log_partition",
    "log_partition_tables",
    "make_plan",
    "naive_run_plan",
    "naive_conv_dcn_pass",
    "naive_dcn_pass",
    "path_log_joint",
    "path_posterior",
    "run_flat_plan",
]
