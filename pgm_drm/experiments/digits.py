"""The digits recipe of each model (scikit-learn's 8x8 digits, the fixed split).

:func:`run_fit_digits` draws the labels (every one, or a class-stratified subset
for semi-supervised EM), fits one model with its hyperparameters below, measures
the test accuracy and writes ``report.json``, ``templates.png`` (the learned
templates or filters) and the model file where there is one. The per-model steps
are :func:`fit_rm`, :func:`fit_mfa`, :func:`fit_drm`, :func:`fit_dcn` and
:func:`fit_edrm_forest`; each returns the test predictions and a figure, and takes
its hyperparameters as keyword arguments whose defaults are the recipe's.
:func:`fit_model` picks the step by name, as :func:`run_fit_digits` and
:mod:`pgm_drm.experiments.evaluation` do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import matplotlib.pyplot as plt
import numpy as np

from pgm_drm._typing import PRNGKey
from pgm_drm.data import (
    UNIT_SHIFTS,
    DigitsSplit,
    load_digits_split,
    translate_images,
    with_translated_labels,
)
from pgm_drm.diagnostics import plot_factor_directions, plot_samples
from pgm_drm.learning import (
    ForestParams,
    fit_discriminative,
    fit_drm_classifier,
    fit_em,
    fit_fa_em,
    fit_infomax_forest,
    forest_predict_proba,
    init_random,
    predict,
    save_model,
)
from pgm_drm.learning.loop import LoopOptions

__all__ = [
    "DIGITS_MODELS",
    "DigitsPrediction",
    "MODEL_SETTINGS",
    "check_options",
    "fit_dcn",
    "fit_drm",
    "fit_edrm_forest",
    "fit_mfa",
    "fit_model",
    "fit_rm",
    "label_subset",
    "max_labels",
    "run_fit_digits",
]

DigitsModel = Literal["rm", "mfa", "drm", "dcn", "edrm-forest"]
#: The models :func:`run_fit_digits` fits.
DIGITS_MODELS: tuple[str, ...] = ("rm", "mfa", "drm", "dcn", "edrm-forest")
#: The hyperparameters each per-model step takes as keyword arguments, with the
#: recipe's values (``None`` for ``dcn``'s ``epochs``: 20 with the translations,
#: 100 without).
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "rm": {"n_templates": 10, "n_iter": 50, "min_sigma": 0.05},
    "mfa": {"n_factors": 15, "n_iter": 100, "min_sigma": 0.1},
    "drm": {"members": 4, "n_iter": 30},
    "dcn": {"epochs": None, "weight_decay": 0.3},
    "edrm-forest": {"n_estimators": 100, "max_depth": None},
}


class DigitsPrediction(NamedTuple):
    """What a per-model step returns.

    Attributes:
        pred: ``(450,)`` predicted test classes.
        figure: The learned templates / filters (``templates.png``); ``None``
            when the step was asked for no figure.
    """

    pred: np.ndarray
    figure: Any


def max_labels(d: DigitsSplit) -> int:
    """The largest label budget with as many labels of every class."""
    return 10 * int(np.bincount(d.y_train).min())


def label_subset(y: np.ndarray, labels: int, seed: int) -> np.ndarray:
    """``y`` with all but ``labels // 10`` images of each class set to ``-1``
    (unlabelled), drawn by ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[: labels // 10] for c in range(10)]
    )
    out = np.full_like(y, -1)
    out[keep] = y[keep]
    return out


def fit_rm(
    d: DigitsSplit,
    y: np.ndarray,
    key: PRNGKey,
    out: Path | None,
    report: dict[str, Any],
    em: Literal["hard", "soft"] = "hard",
    unlabelled_weight: float = 1.0,
    progress: bool = True,
    *,
    n_templates: int = 10,
    n_iter: int = 50,
    min_sigma: float = 0.05,
    figure: bool = True,
) -> DigitsPrediction:
    """A per-class RM with ``n_templates`` (10) templates per class: ``n_iter`` (50)
    iterations of hard EM (Eqs. 16-17) or soft EM, semi-supervised (§6.3.3) where
    ``y`` is ``-1``, each unlabelled image weighted by ``unlabelled_weight``, the
    noise floored at ``min_sigma``; MS-RMC (Eq. 6) on the test set. Writes
    ``model.npz`` unless ``out`` is ``None``."""
    report["em"] = em
    fit = fit_em(
        d.x_train,
        10,
        n_templates,
        mode=em,
        labels=y,
        n_iter=n_iter,
        key=key,
        min_sigma=min_sigma,
        unlabelled_weight=unlabelled_weight,
        loop=LoopOptions(progress=progress),
    )
    pred = np.asarray(fit.model.classify(d.x_test, "max"))
    if out is not None:
        save_model(out / "model.npz", fit.model)
    if not figure:
        return DigitsPrediction(pred, None)
    templates = np.asarray(fit.model.templates).reshape(-1, 8, 8)
    fig = plot_samples(templates, ncols=n_templates, max_images=len(templates))
    return DigitsPrediction(pred, fig)


def fit_mfa(
    d: DigitsSplit,
    y: np.ndarray,
    key: PRNGKey,
    out: Path | None,
    report: dict[str, Any],
    em: Literal["hard", "soft"] = "soft",
    translated_labels: bool = False,
    progress: bool = True,
    *,
    n_factors: int = 15,
    n_iter: int = 100,
    min_sigma: float = 0.1,
    figure: bool = True,
) -> DigitsPrediction:
    """The RM with factor-analyser noise (Eq. 34): one factor analyser with
    ``n_factors`` (15) factors per class and noise floor ``min_sigma`` (0.1),
    ``n_iter`` (100) iterations of soft EM by default; semi-supervised where ``y``
    is ``-1``; with ``translated_labels`` the labelled images are also re-rendered
    under the four one-pixel translations (Lemma A.2); SP-RMC on the test set.
    Writes ``model.npz`` unless ``out`` is ``None``."""
    report["em"] = em
    x_fit, y_fit = d.x_train, y
    if translated_labels:
        x_fit, y_fit = with_translated_labels(x_fit, y_fit)
        report["translated_labelled_images"] = int(len(y_fit) - len(y))
    fit = fit_fa_em(
        x_fit,
        10,
        1,
        n_factors,
        mode=em,
        labels=y_fit,
        n_iter=n_iter,
        key=key,
        min_sigma=min_sigma,
        loop=LoopOptions(progress=progress),
    )
    pred = np.asarray(fit.model.classify(d.x_test, "sum"))
    if out is not None:
        save_model(out / "model.npz", fit.model)
    fig = plot_factor_directions(fit.model) if figure else None
    return DigitsPrediction(pred, fig)


def fit_drm(
    d: DigitsSplit,
    key: PRNGKey,
    out: Path | None,
    report: dict[str, Any],
    progress: bool = True,
    *,
    members: int = 4,
    n_iter: int = 30,
    figure: bool = True,
) -> DigitsPrediction:
    """Per class, a mixture of ``members`` (4) generative DRMs (windows (4, 2), 16
    and 20 states), each fitted by ``n_iter`` (30) iterations of hard EM from its
    own start. Writes one model file per class and member unless ``out`` is
    ``None``."""
    clf = fit_drm_classifier(
        d.x_train,
        d.y_train,
        windows=(4, 2),
        n_states=(16, 20),
        template_sizes=(4, 2),
        n_iter=n_iter,
        members=members,
        key=key,
        progress=progress,
    )
    report["members"] = clf.n_members
    pred = clf.predict(d.x_test)
    if out is not None:
        for k, m in enumerate(clf.models):
            c, r = divmod(k, clf.n_members)
            save_model(out / f"drm_class{c}_member{r}.npz", m)
    if not figure:
        return DigitsPrediction(pred, None)
    firsts = clf.models[:: clf.n_members]
    pix = np.concatenate([np.asarray(m.pixel_templates) for m in firsts])
    fig = plot_samples(pix, ncols=16, max_images=len(pix))
    fig.suptitle("level-1 templates, one row per digit's first DRM member", fontsize=8)
    return DigitsPrediction(pred, fig)


def fit_dcn(
    d: DigitsSplit,
    key: PRNGKey,
    report: dict[str, Any],
    translations: bool = True,
    progress: bool = True,
    *,
    epochs: int | None = None,
    weight_decay: float = 0.3,
    figure: bool = True,
) -> DigitsPrediction:
    """The discriminative relaxation (Eq. 25): a random two-level DCN-form net
    (4x4 windows at stride 2, 64 states; then 3x3) trained with optax (AdamW,
    ``weight_decay`` 0.3, ``epochs`` epochs: by default 20 with ``translations``,
    100 without) on the training images and, with ``translations``, their
    one-pixel translations (the rendering model's translational nuisance, Lemma
    A.2)."""
    net = init_random(
        key,
        (8, 8),
        10,
        windows=(4, 3),
        strides=(2, 1),
        states=(64,),
        template_sizes=(3, None),
    )
    shifts = UNIT_SHIFTS if translations else ((0, 0),)
    # 5x the images and 1/5 the epochs: the same number of Adam steps
    x_fit, y_fit = translate_images(d.x_train, d.y_train, shifts)
    report["translations"] = [list(s) for s in shifts]
    fit = fit_discriminative(
        net,
        x_fit,
        y_fit,
        epochs=epochs if epochs is not None else (20 if translations else 100),
        batch_size=32,
        lr=2e-3,
        weight_decay=weight_decay,
        key=jax.random.fold_in(key, 1),
        loop=LoopOptions(progress=progress),
    )
    pred = np.asarray(predict(fit.net, d.x_test))
    if not figure:
        return DigitsPrediction(pred, None)
    w = np.asarray(fit.net.layers[0].w)  # (K, G, w*w, 1)
    filters = w[:, 0, :, 0].reshape(-1, 4, 4)
    fig = plot_samples(filters, ncols=16, max_images=len(filters))
    fig.suptitle("first-layer filters (translation 0)", fontsize=8)
    return DigitsPrediction(pred, fig)


def fit_edrm_forest(
    d: DigitsSplit,
    seed: int,
    *,
    n_estimators: int = 100,
    max_depth: int | None = None,
    figure: bool = True,
) -> DigitsPrediction:
    """Bagged InfoMax E-DRM trees (Eq. 32): ``n_estimators`` (100) trees grown to
    ``max_depth`` (``None``: until pure), no relaxation (what
    ``pgm_drm.sklearn.EDRMForestClassifier(n_estimators=100, relax_steps=0,
    random_state=seed)`` fits)."""
    forest = fit_infomax_forest(
        d.x_train.reshape(len(d.x_train), -1),
        d.y_train,
        10,
        ForestParams(n_estimators=n_estimators, max_depth=max_depth, relax_steps=0),
        rng=np.random.default_rng(seed),
    )
    proba = forest_predict_proba(forest, d.x_test.reshape(len(d.x_test), -1))
    pred = np.argmax(proba, axis=1)
    if not figure:
        return DigitsPrediction(pred, None)
    fig = plot_samples(
        d.x_test[:20], ncols=10, titles=[f"pred {int(p)}" for p in pred[:20]]
    )
    return DigitsPrediction(pred, fig)


def fit_model(
    model: str,
    d: DigitsSplit,
    y: np.ndarray,
    seed: int,
    *,
    semi_supervised: bool = False,
    out: Path | None = None,
    report: dict[str, Any] | None = None,
    em: Literal["hard", "soft"] | None = None,
    unlabelled_weight: float = 1.0,
    translations: bool = True,
    progress: bool = False,
    figure: bool = True,
    **settings: Any,
) -> DigitsPrediction:
    """Fit ``model`` by its step above on ``d`` and predict ``d.x_test``.

    Args:
        model: One of :data:`DIGITS_MODELS`.
        d: The images (only ``x_train``, ``x_test`` and, for the supervised
            ``drm``, ``dcn`` and ``edrm-forest``, ``y_train`` are read).
        y: Training labels for ``rm`` and ``mfa`` (``-1``: unlabelled).
        seed: The PRNG key is ``jax.random.PRNGKey(seed)``; ``edrm-forest``
            seeds numpy with it.
        semi_supervised: The labels are a subset (``mfa`` then re-renders the
            labelled images under one-pixel translations when ``translations``).
        out: Folder for model files (``None``: none written).
        report: Filled with what the step reports (``em``, ``members``, ...).
        em, unlabelled_weight, translations: As :func:`run_fit_digits`.
        progress: The steps' own progress bars.
        figure: Draw the step's figure (``None`` in the result otherwise).
        **settings: Hyperparameters of the step, named in
            :data:`MODEL_SETTINGS` (defaults: the recipe's).
    """
    if model not in DIGITS_MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {DIGITS_MODELS}")
    unknown = sorted(set(settings) - set(MODEL_SETTINGS[model]))
    if unknown:
        raise ValueError(
            f"unknown settings {unknown} for {model!r}; it takes "
            f"{sorted(MODEL_SETTINGS[model])}"
        )
    report = {} if report is None else report
    key = jax.random.PRNGKey(seed)
    kw = {"figure": figure, **settings}
    if model == "rm":
        rm_em = em or "hard"
        return fit_rm(d, y, key, out, report, rm_em, unlabelled_weight, progress, **kw)
    if model == "mfa":
        shifted = semi_supervised and translations
        return fit_mfa(d, y, key, out, report, em or "soft", shifted, progress, **kw)
    if model == "drm":
        return fit_drm(d, key, out, report, progress, **kw)
    if model == "dcn":
        return fit_dcn(d, key, report, translations, progress, **kw)
    return fit_edrm_forest(d, seed, **kw)


def check_options(
    model: str,
    labels: int | None = None,
    em: str | None = None,
    unlabelled_weight: float = 1.0,
    translations: bool = True,
    most: int | None = None,
) -> None:
    """Raise ``ValueError`` for options :func:`run_fit_digits` does not take
    together (``most``: the largest label budget, default :func:`max_labels` of
    the digits split)."""
    if most is None:
        most = max_labels(load_digits_split())
    if model not in DIGITS_MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {DIGITS_MODELS}")
    if model not in ("rm", "mfa") and (em is not None or labels is not None):
        raise ValueError("--labels and --em are for the rm and mfa models")
    if model != "rm" and unlabelled_weight != 1.0:
        raise ValueError("--unlabelled-weight is for the rm model")
    if not 0.0 < unlabelled_weight <= 1.0:
        raise ValueError(
            f"unlabelled_weight must be in (0, 1], got {unlabelled_weight}"
        )
    if unlabelled_weight != 1.0 and labels is None:
        raise ValueError("--unlabelled-weight needs --labels (every image is labelled)")
    if model not in ("dcn", "mfa") and not translations:
        raise ValueError("--no-translations is for the dcn and mfa models")
    if labels is not None and not (10 <= labels <= most and labels % 10 == 0):
        raise ValueError(
            f"--labels must be a multiple of 10 (as many per class) in 10..{most}, "
            f"got {labels}"
        )
    if model == "mfa" and labels is None and not translations:
        raise ValueError("--no-translations with the mfa model needs --labels")


def run_fit_digits(
    model: DigitsModel,
    out: Path,
    labels: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    em: Literal["hard", "soft"] | None = None,
    unlabelled_weight: float = 1.0,
    translations: bool = True,
) -> dict[str, Any]:
    """Fit a classifier on scikit-learn's digits (the project's fixed split).

    ``model``: ``rm`` (supervised hard EM of a per-class RM with 10 templates
    per class, Eqs. 16-17, or soft EM with ``em="soft"``; with ``labels`` = N,
    semi-supervised EM on N labels, §6.3.3, each unlabelled image weighted by
    ``unlabelled_weight``), ``mfa`` (the RM with factor-analyser noise, Eq. 34:
    one factor analyser with 15 factors per class, soft EM by default; with
    ``labels``, semi-supervised, the labelled images also re-rendered under
    one-pixel translations unless ``translations`` is off), ``drm`` (per class,
    a mixture of 4 generative DRMs, each fitted by hard EM from its own start),
    ``dcn`` (the discriminative relaxation, Eq. 25, trained with optax on the
    training images and, with ``translations``, their one-pixel translations,
    the rendering model's translational nuisance of Lemma A.2) or
    ``edrm-forest`` (bagged InfoMax E-DRM trees, Eq. 32). Writes
    ``report.json``, the learned templates/filters as ``templates.png`` and the
    model file where there is one.

    ``labels`` (a multiple of 10, as many per class) and ``em`` are for ``rm``
    and ``mfa``, ``unlabelled_weight`` (in ``(0, 1]``) for ``rm`` with
    ``labels``, ``translations=False`` for ``dcn`` and for ``mfa`` with
    ``labels``; other combinations raise ``ValueError``.
    """
    d = load_digits_split()
    check_options(model, labels, em, unlabelled_weight, translations, max_labels(d))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": model, "n_train": len(d.y_train)}
    y = np.asarray(d.y_train)
    if labels is not None:
        y = label_subset(y, labels, seed)
        report["labels"] = int(np.sum(y >= 0))
        if model == "rm":
            report["unlabelled_weight"] = float(unlabelled_weight)
    t0 = time.perf_counter()
    res = fit_model(
        model,
        d,
        y,
        seed,
        semi_supervised=labels is not None,
        out=out,
        report=report,
        em=em,
        unlabelled_weight=unlabelled_weight,
        translations=translations,
        progress=not quiet,
    )
    report["fit_seconds"] = time.perf_counter() - t0
    report["test_accuracy"] = float(np.mean(res.pred == np.asarray(d.y_test)))
    res.figure.savefig(out / "templates.png", dpi=110)
    plt.close(res.figure)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
