"""Learning (paper §2.6-2.7, §6.3.3; DESIGN §5).

RM: soft and hard EM with closed-form M-steps (:func:`fit_em`, or the
``(em_init, em_step)`` pair), semi-supervised by partial labels, an SVI
cross-check with ``TraceEnum_ELBO`` (:func:`fit_svi`), exact per-image
log-likelihoods. DRM: hard EM with a max-sum E-step (:func:`fit_drm_em`) and a
per-class generative classifier (:func:`fit_drm_classifier`). The discriminative
relaxation (Eq. 25): the DCN-form pass with free weights, trained with optax
(:func:`fit_discriminative`). The RM with factor-analyser noise (Eq. 34): soft
and hard EM, semi-supervised (:func:`fit_fa_em`). E-DRM InfoMax trees (Eq. 33,
:func:`fit_infomax_tree`) and bagged forests (Eq. 32, :func:`fit_infomax_forest`);
their scikit-learn estimators are in :mod:`pgm_drm.sklearn`. Every iterative
fit runs one loop (:func:`run_loop` over an ``(init, step)`` :class:`Algorithm`;
:class:`LoopOptions`: progress bar, resumable checkpoints); model files
(:func:`save_model` / :func:`load_model`). Any other
NumPyro model with finite discrete latents and ``numpyro.param`` sites: its
exact, differentiable log-likelihood (:func:`model_log_likelihood`) and
:func:`fit` (EM from the compiled marginals, or Adam).
"""

from pgm_drm.learning.base import FitResult
from pgm_drm.learning.discriminative import (
    DCNLayer,
    DCNNet,
    DiscriminativeFit,
    calibrate_scale,
    class_scores,
    fit_discriminative,
    init_from_drm,
    init_from_rm,
    init_random,
    predict,
    predict_proba,
)
from pgm_drm.learning.drm_em import (
    DRMFitResult,
    PerClassDRM,
    drm_em_init,
    drm_em_step,
    drm_log_joint,
    drm_map,
    fit_drm_classifier,
    fit_drm_em,
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
from pgm_drm.learning.fa_em import (
    FAInfo,
    FAState,
    fa_em_init,
    fa_em_step,
    fa_m_step,
    fit_fa_em,
    naive_fa_m_step,
)
from pgm_drm.learning.forest import (
    ForestParams,
    InfoMaxForest,
    InfoMaxTree,
    TreeParams,
    entropy,
    fit_infomax_forest,
    fit_infomax_tree,
    forest_predict_proba,
    generative_split,
    information_gain,
    leaf_histograms,
    soft_information_gain,
    tree_apply,
    tree_apply_naive,
    tree_predict_proba,
)
from pgm_drm.learning.generic import ModelFit, fit, model_log_likelihood
from pgm_drm.learning.io import load_checkpoint, load_model, save_checkpoint, save_model
from pgm_drm.learning.likelihood import (
    clamp_labels,
    log_joint_table,
    log_likelihood,
    naive_log_joint_table,
    responsibilities,
)
from pgm_drm.learning.loop import Algorithm, LoopOptions, LoopResult, run_loop
from pgm_drm.learning.svi import fit_svi

__all__ = [
    "Algorithm",
    "DCNLayer",
    "DCNNet",
    "DRMFitResult",
    "DiscriminativeFit",
    "EMInfo",
    "EMState",
    "FAInfo",
    "FAState",
    "FitResult",
    "ForestParams",
    "InfoMaxForest",
    "InfoMaxTree",
    "LoopOptions",
    "LoopResult",
    "ModelFit",
    "PerClassDRM",
    "TreeParams",
    "calibrate_scale",
    "clamp_labels",
    "class_scores",
    "drm_em_init",
    "drm_em_step",
    "drm_log_joint",
    "drm_map",
    "em_init",
    "em_step",
    "entropy",
    "fa_em_init",
    "fa_em_step",
    "fa_m_step",
    "fit",
    "fit_discriminative",
    "fit_drm_classifier",
    "fit_drm_em",
    "fit_em",
    "fit_fa_em",
    "fit_infomax_forest",
    "fit_infomax_tree",
    "fit_svi",
    "forest_predict_proba",
    "generative_split",
    "information_gain",
    "init_from_drm",
    "init_from_rm",
    "init_random",
    "leaf_histograms",
    "load_checkpoint",
    "load_model",
    "log_joint_table",
    "log_likelihood",
    "m_step",
    "model_log_likelihood",
    "naive_log_joint_table",
    "naive_fa_m_step",
    "naive_m_step",
    "predict",
    "predict_proba",
    "responsibilities",
    "run_loop",
    "save_checkpoint",
    "save_model",
    "soft_information_gain",
    "tree_apply",
    "tree_apply_naive",
    "tree_predict_proba",
]
