"""Experiments: recipes that put the layers below together (DESIGN: the top layer
under the command line).

* :mod:`~pgm_drm.experiments.demo`: the RM against NumPyro's enumeration, and the
  DRM's DCN pass, reconstructions, activity maximization and layer probes.
* :mod:`~pgm_drm.experiments.digits`: the digits recipe of each model (RM, RM
  with factor-analyser noise, DRM mixture, DCN relaxation, E-DRM forest).
* :mod:`~pgm_drm.experiments.sample`: sampling and inference on saved images.
* :mod:`~pgm_drm.experiments.studies`: when the DCN pass is exact inference
  under overlap, and when the greedy E-DRM path (Eq. 31) is the MAP (Eq. 30).
* :mod:`~pgm_drm.experiments.label_budget`: generative vs discriminative as the
  labels grow (§2.7).
* :mod:`~pgm_drm.experiments.evaluation`: every digits model and the baselines
  over many stratified splits and seeds, hyperparameters chosen by
  cross-validation inside the training split.

Each recipe is a plain function with typed arguments that returns its results
(NamedTuples or dicts) and writes figures and reports where it is given a folder.
``pgm_drm.cli`` parses arguments and calls them; the notebooks call them too.
"""

from pgm_drm.experiments.demo import format_demo_report, run_demo, run_drm_demo
from pgm_drm.experiments.digits import (
    DIGITS_MODELS,
    MODEL_SETTINGS,
    DigitsPrediction,
    check_options,
    fit_dcn,
    fit_drm,
    fit_edrm_forest,
    fit_mfa,
    fit_model,
    fit_rm,
    label_subset,
    max_labels,
    run_fit_digits,
)
from pgm_drm.experiments.evaluation import (
    BASELINE_SETTINGS,
    BASELINES,
    SELECT_GRIDS,
    EvaluationResult,
    digits_splits,
    evaluate_digits,
    plot_evaluation,
    run_evaluation,
    save_evaluation,
)
from pgm_drm.experiments.label_budget import (
    LabelBudgetResult,
    label_budget_curve,
    plot_label_budget,
)
from pgm_drm.experiments.sample import MODELS, default_model, run_infer, run_sample
from pgm_drm.experiments.studies import (
    DCNExactnessStudy,
    GreedyStudyRow,
    StudyReport,
    dcn_exactness_study,
    greedy_table,
    greedy_vs_exact_study,
    plot_dcn_exactness,
    plot_greedy_vs_exact,
    run_study,
)

__all__ = [
    "BASELINES",
    "BASELINE_SETTINGS",
    "DCNExactnessStudy",
    "DIGITS_MODELS",
    "DigitsPrediction",
    "EvaluationResult",
    "GreedyStudyRow",
    "LabelBudgetResult",
    "MODELS",
    "MODEL_SETTINGS",
    "SELECT_GRIDS",
    "StudyReport",
    "check_options",
    "dcn_exactness_study",
    "default_model",
    "digits_splits",
    "evaluate_digits",
    "fit_dcn",
    "fit_drm",
    "fit_edrm_forest",
    "fit_mfa",
    "fit_model",
    "fit_rm",
    "format_demo_report",
    "greedy_table",
    "greedy_vs_exact_study",
    "label_budget_curve",
    "label_subset",
    "max_labels",
    "plot_dcn_exactness",
    "plot_evaluation",
    "plot_greedy_vs_exact",
    "plot_label_budget",
    "run_demo",
    "run_evaluation",
    "run_drm_demo",
    "run_fit_digits",
    "run_infer",
    "run_sample",
    "run_study",
    "save_evaluation",
]
