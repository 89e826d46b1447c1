"""The digits recipe of each model (scikit-learn's 8x8 digits, the fixed split).

:func:`run_fit_digits` draws the labels (every one, or a class-stratified subset
for semi-supervised EM), fits one model with its hyperparameters below, measures
the test accuracy and writes ``report.json``, ``templates.png`` (the learned
templates or filters) and the model file where there is one. The per-model steps
are :func:`fit_rm`, :func:`fit_mfa`, :func:`fit_drm`, :func:`fit_dcn` and
:func:`fit_edrm_forest`; each returns the test predictions and a figure.
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
    "check_options",
    "fit_dcn",
    "fit_drm",
    "fit_edrm_forest",
    "fit_mfa",
    "fit_rm",
    "label_subset",
    "max_labels",
    "run_fit_digits",
]

DigitsModel = Literal["rm", "mfa", "drm", "dcn", "edrm-forest"]
#: The models :func:`run_fit_digits` fits.
DIGITS_MODELS: tuple[str, ...] = ("rm", "mfa", "drm", "dcn", "edrm-forest")


class DigitsPrediction(NamedTuple):
    """What a per-model step returns.

    Attributes:
        pred: ``(450,)`` predicted test classes.
        figure: The learned templates / filters (``templates.png``).
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
    out: Path,
    report: dict[str, Any],
    em: Literal["hard", "soft"] = "hard",
    unlabelled_weight: float = 1.0,
    progress: bool = True,
) -> DigitsPrediction:
    """A per-class RM with 10 templates per class: hard EM (Eqs. 16-17) or soft EM,
    semi-supervised (§6.3.3) where ``y`` is ``-1``, each unlabelled image weighted
    by ``unlabelled_weight``; MS-RMC (Eq. 6) on the test set. Writes
    ``model.npz``."""
    report["em"] = em
    fit = fit_em(
        d.x_train,
        10,
        10,
        mode=em,
        labels=y,
        n_iter=50,
        key=key,
        min_sigma=0.05,
        unlabelled_weight=unlabelled_weight,
        loop=LoopOptions(progress=progress),
    )
    pred = np.asarray(fit.model.classify(d.x_test, "max"))
    save_model(out / "model.npz", fit.model)
    templates = np.asarray(fit.model.templates).reshape(-1, 8, 8)
    fig = plot_samples(templates, ncols=10, max_images=len(templates))
    return DigitsPrediction(pred, fig)


def fit_mfa(
    d: DigitsSplit,
    y: np.ndarray,
    key: PRNGKey,
    out: Path,
    report: dict[str, Any],
    em: Literal["hard", "soft"] = "soft",
    translated_labels: bool = False,
    progress: bool = True,
) -> DigitsPrediction:
    """The RM with factor-analyser noise (Eq. 34): one factor analyser with 15
    factors per class, soft EM by default; semi-supervised where ``y`` is ``-1``;
    with ``translated_labels`` the labelled images are also re-rendered under the
    four one-pixel translations (Lemma A.2); SP-RMC on the test set. Writes
    ``model.npz``."""
    report["em"] = em
    x_fit, y_fit = d.x_train, y
    if translated_labels:
        x_fit, y_fit = with_translated_labels(x_fit, y_fit)
        report["translated_labelled_images"] = int(len(y_fit) - len(y))
    fit = fit_fa_em(
        x_fit,
        10,
        1,
        15,
        mode=em,
        labels=y_fit,
        n_iter=100,
        key=key,
        min_sigma=0.1,
        loop=LoopOptions(progress=progress),
    )
    pred = np.asarray(fit.model.classify(d.x_test, "sum"))
    save_model(out / "model.npz", fit.model)
    return DigitsPrediction(pred, plot_factor_directions(fit.model))


def fit_drm(
    d: DigitsSplit, key: PRNGKey, out: Path, report: dict[str, Any], progress=True
) -> DigitsPrediction:
    """Per class, a mixture of 4 generative DRMs (windows (4, 2), 16 and 20
    states), each fitted by hard EM from its own start. Writes one model file per
    class and member."""
    clf = fit_drm_classifier(
        d.x_train,
        d.y_train,
        windows=(4, 2),
        n_states=(16, 20),
        template_sizes=(4, 2),
        n_iter=30,
        members=4,
        key=key,
        progress=progress,
    )
    report["members"] = clf.n_members
    pred = clf.predict(d.x_test)
    for k, m in enumerate(clf.models):
        c, r = divmod(k, clf.n_members)
        save_model(out / f"drm_class{c}_member{r}.npz", m)
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
) -> DigitsPrediction:
    """The discriminative relaxation (Eq. 25): a random two-level DCN-form net
    (4x4 windows at stride 2, 64 states; then 3x3) trained with optax on the
    training images and, with ``translations``, their one-pixel translations (the
    rendering model's translational nuisance, Lemma A.2)."""
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
        epochs=20 if translations else 100,
        batch_size=32,
        lr=2e-3,
        weight_decay=0.3,
        key=jax.random.fold_in(key, 1),
        loop=LoopOptions(progress=progress),
    )
    pred = np.asarray(predict(fit.net, d.x_test))
    w = np.asarray(fit.net.layers[0].w)  # (K, G, w*w, 1)
    filters = w[:, 0, :, 0].reshape(-1, 4, 4)
    fig = plot_samples(filters, ncols=16, max_images=len(filters))
    fig.suptitle("first-layer filters (translation 0)", fontsize=8)
    return DigitsPrediction(pred, fig)


def fit_edrm_forest(d: DigitsSplit, seed: int) -> DigitsPrediction:
    """Bagged InfoMax E-DRM trees (Eq. 32): 100 trees, no relaxation (what
    ``pgm_drm.sklearn.EDRMForestClassifier(n_estimators=100, relax_steps=0,
    random_state=seed)`` fits)."""
    forest = fit_infomax_forest(
        d.x_train.reshape(len(d.x_train), -1),
        d.y_train,
        10,
        ForestParams(n_estimators=100, relax_steps=0),
        rng=np.random.default_rng(seed),
    )
    proba = forest_predict_proba(forest, d.x_test.reshape(len(d.x_test), -1))
    pred = np.argmax(proba, axis=1)
    fig = plot_samples(
        d.x_test[:20], ncols=10, titles=[f"pred {int(p)}" for p in pred[:20]]
    )
    return DigitsPrediction(pred, fig)


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
    key = jax.random.PRNGKey(seed)
    report: dict[str, Any] = {"model": model, "n_train": len(d.y_train)}
    y = np.asarray(d.y_train)
    if labels is not None:
        y = label_subset(y, labels, seed)
        report["labels"] = int(np.sum(y >= 0))
        if model == "rm":
            report["unlabelled_weight"] = float(unlabelled_weight)
    progress = not quiet
    t0 = time.perf_counter()
    if model == "rm":
        res = fit_rm(d, y, key, out, report, em or "hard", unlabelled_weight, progress)
    elif model == "mfa":
        shifted = labels is not None and translations
        res = fit_mfa(d, y, key, out, report, em or "soft", shifted, progress)
    elif model == "drm":
        res = fit_drm(d, key, out, report, progress)
    elif model == "dcn":
        res = fit_dcn(d, key, report, translations, progress)
    else:
        res = fit_edrm_forest(d, seed)
    report["fit_seconds"] = time.perf_counter() - t0
    report["test_accuracy"] = float(np.mean(res.pred == np.asarray(d.y_test)))
    res.figure.savefig(out / "templates.png", dpi=110)
    plt.close(res.figure)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
