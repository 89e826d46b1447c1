"""Learning for the Rendering Model (paper §2.6, §6.3.3; DESIGN §5).

Soft and hard EM with closed-form M-steps (:func:`fit_em`, or the
``(em_init, em_step)`` pair), an SVI cross-check with ``TraceEnum_ELBO``
(:func:`fit_svi`), exact per-image log-likelihoods, resumable checkpoints and
model files (:func:`save_model` / :func:`load_model`).
"""

from pgm_drm.learning.base import (
    FitResult,
    RMParams,
    params_from_model,
    params_to_model,
)
from pgm_drm.learning.em import (
    EMInfo,
    EMState,
    em_init,
    em_step,
    fit_em,
    m_step,
    naive_m_step,
)
from pgm_drm.learning.io import load_checkpoint, load_model, save_checkpoint, save_model
from pgm_drm.learning.likelihood import (
    clamp_labels,
    log_joint_table,
    log_likelihood,
    naive_log_joint_table,
    responsibilities,
)
from pgm_drm.learning.svi import fit_svi

__all__ = [
    "EMInfo",
    "EMState",
    "FitResult",
    "RMParams",
    "clamp_labels",
    "em_init",
    "em_step",
    "fit_em",
    "fit_svi",
    "load_checkpoint",
    "load_model",
    "log_joint_table",
    "log_likelihood",
    "m_step",
    "naive_log_joint_table",
    "naive_m_step",
    "params_from_model",
    "params_to_model",
    "responsibilities",
    "save_checkpoint",
    "save_model",
]
