"""Honest evaluation on scikit-learn's digits: many splits, baselines, CV selection.

One fixed split flatters whoever was tuned on it. :func:`evaluate_digits` fits
each model of :mod:`pgm_drm.experiments.digits` by its recipe, and each baseline
(:data:`BASELINES`), on the same K stratified train/test splits
(:func:`digits_splits`) and seeds, and reports every test accuracy with its
mean ± sd. With ``select=True`` each one's hyperparameters (:data:`SELECT_GRIDS`)
are chosen by stratified k-fold cross-validation inside the training split; the
test split is then predicted once, by the chosen setting. Fits never see a test
label: the test labels handed to a fit are all ``-1``.

:meth:`EvaluationResult.table` is the README's digits table,
:meth:`EvaluationResult.to_json` its record, :func:`plot_evaluation` its figure.
"""

from __future__ import annotations

import functools
import itertools
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from pgm_drm._typing import PRNGKey
from pgm_drm.data import DigitsSplit, load_digits_split
from pgm_drm.experiments import digits as _digits

__all__ = [
    "BASELINES",
    "BASELINE_SETTINGS",
    "DEFAULT_FOLDS",
    "EvaluationResult",
    "SELECT_GRIDS",
    "digits_splits",
    "evaluate_digits",
    "plot_evaluation",
    "run_evaluation",
    "save_evaluation",
]

#: The baselines :func:`evaluate_digits` fits beside the models: scikit-learn's
#: ``SVC`` (RBF, defaults), ``LogisticRegression`` on standardised pixels,
#: ``RandomForestClassifier``, a small JAX CNN (:func:`_fit_small_cnn`) and, with
#: a label budget only, ``LabelSpreading``.
BASELINES: tuple[str, ...] = (
    "svc",
    "logistic-regression",
    "random-forest",
    "small-cnn",
    "label-spreading",
)
#: The baselines' settings when not selected: scikit-learn's defaults (the
#: logistic regression's ``max_iter`` raised to 5000 so that lbfgs converges) and
#: the small CNN's 30 epochs.
BASELINE_SETTINGS: dict[str, dict[str, Any]] = {
    "svc": {"C": 1.0},
    "logistic-regression": {"C": 1.0},
    "random-forest": {"n_estimators": 100, "max_features": "sqrt"},
    "small-cnn": {"epochs": 30},
    "label-spreading": {"kernel": "rbf", "n_neighbors": 7},
}
#: What ``select=True`` searches (the product of each name's values, in this
#: order; ties go to the first). Each grid holds the recipe's own value (``dcn``:
#: its 20 epochs with the translations); where a first 3-fold CV inside one
#: training split (random_state 1) chose the edge of a narrower grid, the grid
#: was widened past it, by those CV accuracies alone.
SELECT_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "rm": {"n_templates": (10, 20, 40)},
    "mfa": {"n_factors": (15, 20, 30), "min_sigma": (0.1, 0.2)},
    "drm": {"members": (1, 4, 8)},
    "dcn": {"epochs": (10, 20, 40)},
    "edrm-forest": {"max_depth": (8, 12, None)},
    "svc": {"C": (1.0, 10.0, 100.0)},
    "logistic-regression": {"C": (0.1, 1.0, 10.0)},
    "random-forest": {"max_features": ("sqrt", 0.3)},
    "small-cnn": {"epochs": (15, 30, 60)},
    "label-spreading": {"kernel": ("rbf", "knn")},
}
#: Cross-validation folds inside each training split.
DEFAULT_FOLDS = 3
#: Settings a model's entry of ``settings`` may hold besides its hyperparameters
#: (:func:`pgm_drm.experiments.digits.fit_model`'s options).
_MODEL_OPTIONS = ("em", "unlabelled_weight", "translations")
#: sd needs two numbers.
_MIN_RUNS = 2


def digits_splits(k: int, seed: int = 0) -> list[DigitsSplit]:
    """``k`` stratified train/test splits of scikit-learn's digits (test size
    0.25): split ``i`` is :func:`pgm_drm.data.load_digits_split` with
    ``random_state=seed + i``, so split 0 of ``seed=0`` is the project's fixed
    split.

    Example:
        >>> s = digits_splits(2)
        >>> len(s), s[0].x_train.shape, s[1].x_test.shape
        (2, (1347, 8, 8), (450, 8, 8))
    """
    if int(k) != k or k < 1:
        raise ValueError(f"the number of splits must be an integer >= 1, got {k!r}")
    return [load_digits_split(random_state=seed + i) for i in range(int(k))]


class EvaluationResult(NamedTuple):
    """Test accuracies of every model and baseline over splits and seeds.

    Attributes:
        names: The models, then the baselines, in the order fitted.
        split_ids: ``(K,)`` each split's ``random_state`` (:func:`digits_splits`)
            or, for splits passed in, its index.
        seeds: ``(S,)`` the seeds (PRNG key, label draw, forest seed).
        accuracy: Per name, ``(K, S)`` test accuracies.
        fit_seconds: Per name, ``(K, S)`` wall seconds of the final fit and its
            test prediction (the first fit of a JAX model includes compilation).
        select_seconds: Per name, ``(K, S)`` wall seconds of the cross-validation
            (zeros without ``select``).
        settings: Per name, ``K`` lists of ``S`` dicts: the hyperparameters the
            final fit used (chosen by CV with ``select``).
        cv_accuracy: Per name, ``K`` lists of ``S`` dicts: mean CV accuracy of
            every candidate (its settings as JSON text); empty dicts without
            ``select``.
        labels: The label budget (``None``: every training label).
        select: Whether hyperparameters were chosen by cross-validation.
        folds: CV folds inside each training split.
    """

    names: tuple[str, ...]
    split_ids: tuple[int, ...]
    seeds: tuple[int, ...]
    accuracy: dict[str, np.ndarray]
    fit_seconds: dict[str, np.ndarray]
    select_seconds: dict[str, np.ndarray]
    settings: dict[str, list[list[dict[str, Any]]]]
    cv_accuracy: dict[str, list[list[dict[str, float]]]]
    labels: int | None
    select: bool
    folds: int

    def mean(self, name: str) -> float:
        """Mean test accuracy of ``name`` over every split and seed."""
        return float(np.mean(self.accuracy[name]))

    def sd(self, name: str) -> float:
        """Sample standard deviation (``ddof=1``) over every split and seed
        (``nan`` for a single accuracy)."""
        acc = self.accuracy[name]
        return float(np.std(acc, ddof=1)) if acc.size > 1 else float("nan")

    def table(self) -> str:
        """Markdown: model | mean ± sd | min-max | n | fit seconds (mean per
        fit), and the seconds of selection with ``select``."""
        head = "| model | test accuracy, mean ± sd | min-max | n | fit s |"
        rule = "|---|---|---|---|---|"
        if self.select:
            head += " select s |"
            rule += "---|"
        rows = [head, rule]
        for name in self.names:
            acc = self.accuracy[name]
            row = (
                f"| {name} | {self.mean(name):.3f} ± {self.sd(name):.3f} "
                f"| {acc.min():.3f}-{acc.max():.3f} | {acc.size} "
                f"| {np.mean(self.fit_seconds[name]):.1f} |"
            )
            if self.select:
                row += f" {np.mean(self.select_seconds[name]):.1f} |"
            rows.append(row)
        return "\n".join(rows)

    def selection_table(self) -> str:
        """Markdown: the settings each final fit used, per name, split and seed,
        with their mean CV accuracy (``select``)."""
        rows = [
            "| model | split | seed | settings | CV accuracy |",
            "|---|---|---|---|---|",
        ]
        for name in self.names:
            for i, sid in enumerate(self.split_ids):
                for j, seed in enumerate(self.seeds):
                    chosen = self.settings[name][i][j]
                    cv = self.cv_accuracy[name][i][j].get(_setting_key(chosen))
                    shown = "" if cv is None else f"{cv:.3f}"
                    rows.append(
                        f"| {name} | {sid} | {seed} | {_setting_key(chosen)} "
                        f"| {shown} |"
                    )
        return "\n".join(rows)

    def to_json(self) -> str:
        """Every number measured, as JSON text (accuracies ``[split][seed]``)."""
        models = {}
        for name in self.names:
            acc = self.accuracy[name]
            models[name] = {
                "accuracy": acc.tolist(),
                "mean": self.mean(name),
                "sd": self.sd(name),
                "min": float(acc.min()),
                "max": float(acc.max()),
                "n": int(acc.size),
                "fit_seconds": self.fit_seconds[name].tolist(),
                "select_seconds": self.select_seconds[name].tolist(),
                "settings": self.settings[name],
                "cv_accuracy": self.cv_accuracy[name],
            }
        record = {
            "split_ids": list(self.split_ids),
            "seeds": list(self.seeds),
            "labels": self.labels,
            "select": self.select,
            "folds": self.folds,
            "models": models,
        }
        return json.dumps(record, indent=2, default=_json_default)


def plot_evaluation(result: EvaluationResult, ax: Any = None):
    """Each name's test accuracies as points (one per split and seed, spread
    sideways by split) with a bar at mean ± sd.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(result.names), 3.5))
    else:
        fig = ax.figure
    k = len(result.split_ids)
    offsets = np.linspace(-0.25, 0.25, k) if k > 1 else np.zeros(1)
    for x, name in enumerate(result.names):
        acc = result.accuracy[name]  # (K, S)
        xs = np.repeat(x + offsets[:, None], acc.shape[1], axis=1)
        ax.plot(xs.ravel(), acc.ravel(), "o", ms=3, alpha=0.5, color=f"C{x % 10}")
        ax.errorbar(
            x,
            result.mean(name),
            yerr=result.sd(name),
            fmt="_",
            ms=18,
            capsize=6,
            color="k",
            lw=1.5,
        )
    ax.set_xticks(range(len(result.names)))
    ax.set_xticklabels(result.names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    what = "labels: all" if result.labels is None else f"labels: {result.labels}"
    sel = f", CV-selected ({result.folds} folds)" if result.select else ""
    ax.set_title(
        f"digits, {k} splits x {len(result.seeds)} seeds ({what}{sel})",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# baselines: (d, y, seed, **settings) -> predicted classes of d.x_test; y holds
# the training labels (-1: unlabelled); supervised ones fit the labelled only.
# The scikit-learn ones run single-threaded (:func:`_predict`): at 1347 x 64 threads
# gain nothing, and on a shared 2-core machine oversubscribed BLAS/OpenMP threads
# made LogisticRegression 50x slower (4 s instead of 0.08 s).


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=float).reshape(len(x), -1)


def _labelled(d: DigitsSplit, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = y >= 0
    return _flat(d.x_train[lab]), y[lab]


def _fit_svc(d: DigitsSplit, y: np.ndarray, seed: int, C: float) -> np.ndarray:
    from sklearn.svm import SVC

    return SVC(C=C).fit(*_labelled(d, y)).predict(_flat(d.x_test))


def _fit_logistic(d: DigitsSplit, y: np.ndarray, seed: int, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    return clf.fit(*_labelled(d, y)).predict(_flat(d.x_test))


def _fit_random_forest(
    d: DigitsSplit, y: np.ndarray, seed: int, n_estimators: int, max_features: Any
) -> np.ndarray:
    from sklearn.ensemble import RandomForestClassifier

    clf = RandomForestClassifier(
        n_estimators=n_estimators, max_features=max_features, random_state=seed
    )
    return clf.fit(*_labelled(d, y)).predict(_flat(d.x_test))


def _fit_label_spreading(
    d: DigitsSplit, y: np.ndarray, seed: int, kernel: str, n_neighbors: int
) -> np.ndarray:
    """Inductive: fitted on the training images (labelled and not), then asked
    for the test images. A test image whose kernel neighbourhood carries no
    label mass gets no class from scikit-learn (0/0); it is predicted ``-1``,
    i.e. counted wrong."""
    from sklearn.semi_supervised import LabelSpreading

    clf = LabelSpreading(kernel=kernel, n_neighbors=n_neighbors)
    clf.fit(_flat(d.x_train), y)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        proba = clf.predict_proba(_flat(d.x_test))
    ok = np.all(np.isfinite(proba), axis=1)
    pred = np.full(len(proba), -1, dtype=np.int64)
    pred[ok] = clf.classes_[np.argmax(proba[ok], axis=1)]
    return pred


#: Adam's step size of the small CNN (constant: the epoch is jitted once per
#: data shape).
_CNN_LR = 1e-3
_CNN_OPT = optax.adam(_CNN_LR)
_CNN_BATCH = 32


def _cnn_init(key: PRNGKey, channels=(16, 32), hidden: int = 64) -> dict:
    """He-initialised weights of conv3x3(16)-pool-conv3x3(32)-pool-dense(64)-10."""
    k = jax.random.split(key, 4)

    def he(k, shape, fan_in):
        # a Python float: a numpy float64 scale would promote under x64
        return jax.random.normal(k, shape, jnp.float32) * float(np.sqrt(2.0 / fan_in))

    c1, c2 = channels
    return {
        "c1": he(k[0], (3, 3, 1, c1), 9),
        "b1": jnp.zeros(c1, jnp.float32),
        "c2": he(k[1], (3, 3, c1, c2), 9 * c1),
        "b2": jnp.zeros(c2, jnp.float32),
        "d1": he(k[2], (4 * c2, hidden), 4 * c2),
        "e1": jnp.zeros(hidden, jnp.float32),
        "d2": he(k[3], (hidden, 10), hidden),
        "e2": jnp.zeros(10, jnp.float32),
    }


def _conv_pool(h: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    dims = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=dims)
    h = jax.nn.relu(h + b)
    return jax.lax.reduce_window(
        h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )


def _cnn_logits(p: dict, x: jax.Array) -> jax.Array:
    """``(N, 8, 8)`` images -> ``(N, 10)`` class scores."""
    h = _conv_pool(x[..., None], p["c1"], p["b1"])  # (N, 4, 4, 16)
    h = _conv_pool(h, p["c2"], p["b2"])  # (N, 2, 2, 32)
    h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p["d1"] + p["e1"])
    return h @ p["d2"] + p["e2"]


def _cnn_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = _cnn_logits(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _cnn_epoch(p, state, x, y, key, batch_size: int):
    """One shuffled pass of Adam steps (the last partial batch dropped)."""
    steps = x.shape[0] // batch_size
    perm = jax.random.permutation(key, x.shape[0])[: steps * batch_size]

    def step(carry, idx):
        p, state = carry
        grads = jax.grad(_cnn_loss)(p, x[idx], y[idx])
        updates, state = _CNN_OPT.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (p, state), _ = jax.lax.scan(step, (p, state), perm.reshape(steps, batch_size))
    return p, state


def _fit_small_cnn(d: DigitsSplit, y: np.ndarray, seed: int, epochs: int):
    """A small CNN (two 3x3 conv + max-pool blocks, 16 and 32 channels, a
    64-unit dense layer) trained by Adam (step 1e-3, batches of 32, softmax
    cross-entropy) on the labelled training images as they are (no
    translations)."""
    xl, yl = _labelled(d, y)
    x = jnp.asarray(xl.reshape(-1, 8, 8), jnp.float32)
    labels = jnp.asarray(yl)
    key = jax.random.PRNGKey(seed)
    p = _cnn_init(key)
    state = _CNN_OPT.init(p)
    batch = min(_CNN_BATCH, len(yl))
    for e in range(epochs):
        p, state = _cnn_epoch(
            p, state, x, labels, jax.random.fold_in(key, e + 1), batch
        )
    logits = _cnn_logits(p, jnp.asarray(d.x_test, jnp.float32))
    return np.asarray(jnp.argmax(logits, axis=1))


_BASELINE_FITS = {
    "svc": _fit_svc,
    "logistic-regression": _fit_logistic,
    "random-forest": _fit_random_forest,
    "small-cnn": _fit_small_cnn,
    "label-spreading": _fit_label_spreading,
}


# ---------------------------------------------------------------------------
# one fit, cross-validation, checks, the loop


def _setting_key(settings: Mapping[str, Any]) -> str:
    """Settings as JSON text with sorted keys (a candidate's name)."""
    return json.dumps(dict(sorted(settings.items())), default=_json_default)


def _predict(
    name: str,
    d: DigitsSplit,
    y: np.ndarray,
    seed: int,
    settings: Mapping[str, Any],
    semi_supervised: bool,
) -> np.ndarray:
    """Fit ``name`` on ``d.x_train`` with labels ``y`` and predict ``d.x_test``;
    the fit is handed ``d`` with its test labels replaced by ``-1``."""
    blind = DigitsSplit(d.x_train, y, d.x_test, np.full(len(d.x_test), -1))
    if name == "small-cnn":
        return _fit_small_cnn(blind, y, seed, **settings)
    if name in _BASELINE_FITS:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return np.asarray(_BASELINE_FITS[name](blind, y, seed, **settings))
    res = _digits.fit_model(
        name,
        blind,
        y,
        seed,
        semi_supervised=semi_supervised,
        figure=False,
        **settings,
    )
    return np.asarray(res.pred)


def _cv_folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """``(train, validation)`` index pairs inside a training split: stratified
    folds of its labelled images; the other images always stay in train."""
    from sklearn.model_selection import StratifiedKFold

    labelled = np.flatnonzero(y >= 0)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for _, va in skf.split(labelled, y[labelled]):
        val = labelled[va]
        out.append((np.setdiff1d(np.arange(len(y)), val), val))
    return out


def _candidates(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, v, strict=True)) for v in itertools.product(*grid.values())]


def _select(
    name: str,
    d: DigitsSplit,
    y: np.ndarray,
    seed: int,
    base: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    folds: int,
    semi_supervised: bool,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The candidate of ``grid`` (over ``base``) with the best mean accuracy on
    ``folds`` stratified folds of the training split (first one on ties); only
    ``d.x_train`` and ``y`` are used."""
    splits = _cv_folds(y, folds, seed)
    scores: dict[str, float] = {}
    best, best_acc = None, -np.inf
    for cand in _candidates(grid):
        settings = {**base, **cand}
        accs = []
        for tr, va in splits:
            fold = DigitsSplit(d.x_train[tr], y[tr], d.x_train[va], y[va])
            pred = _predict(name, fold, y[tr], seed, settings, semi_supervised)
            accs.append(float(np.mean(pred == y[va])))
        acc = float(np.mean(accs))
        scores[_setting_key(settings)] = acc
        if acc > best_acc:
            best, best_acc = settings, acc
    assert best is not None  # the grid is checked non-empty
    return best, scores


def _resolve_names(
    models: Sequence[str], baselines: bool | Sequence[str], labels: int | None
) -> list[str]:
    """The models, then the baselines, checked against each other and
    ``labels``."""
    models = [models] if isinstance(models, str) else list(models)
    bad = [m for m in models if m not in _digits.DIGITS_MODELS]
    if bad:
        raise ValueError(f"unknown models {bad}; choose from {_digits.DIGITS_MODELS}")
    if baselines is True:
        base = [b for b in BASELINES if labels is not None or b != "label-spreading"]
    elif baselines is False:
        base = []
    else:
        base = [baselines] if isinstance(baselines, str) else list(baselines)
        bad = [b for b in base if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baselines {bad}; choose from {BASELINES}")
        if "label-spreading" in base and labels is None:
            raise ValueError("the label-spreading baseline needs labels (a budget)")
    names = models + base
    if not names:
        raise ValueError("nothing to evaluate: give at least one model or baseline")
    if len(set(names)) != len(names):
        raise ValueError(f"a name is given twice: {names}")
    if labels is not None:
        sup = [m for m in models if m not in ("rm", "mfa")]
        if sup:
            raise ValueError(f"labels are for the rm and mfa models, not {sup}")
    return names


def _resolve_seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int | np.integer):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return list(range(int(seeds)))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    return out


def _resolve_splits(
    splits: int | Sequence[DigitsSplit], split_seed: int
) -> tuple[list[DigitsSplit], list[int]]:
    if isinstance(splits, int | np.integer):
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        return digits_splits(int(splits), split_seed), [
            split_seed + i for i in range(int(splits))
        ]
    out = list(splits)
    if not out:
        raise ValueError("splits is an empty sequence")
    return out, list(range(len(out)))


def _check_labels(labels: int | None, splits: Sequence[DigitsSplit]) -> None:
    if labels is None:
        return
    most = min(_digits.max_labels(s) for s in splits)
    if int(labels) != labels or not (10 <= labels <= most and labels % 10 == 0):
        raise ValueError(
            f"labels must be a multiple of 10 (as many per class) in 10..{most}, "
            f"the smallest class of a training split allowing {most // 10} each; "
            f"got {labels}"
        )


def _allowed(name: str) -> tuple[set[str], dict[str, Any]]:
    """The settings ``name`` takes and its defaults."""
    if name in BASELINE_SETTINGS:
        return set(BASELINE_SETTINGS[name]), BASELINE_SETTINGS[name]
    own = _digits.MODEL_SETTINGS[name]
    return set(own) | set(_MODEL_OPTIONS), own


def _check_settings(
    names: Sequence[str], settings: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each name's fixed settings: its defaults updated by ``settings``."""
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"settings for {unknown}, which are not evaluated")
    out = {}
    for name in names:
        allowed, default = _allowed(name)
        given = dict(settings.get(name, {}))
        bad = sorted(set(given) - allowed)
        if bad:
            raise ValueError(
                f"unknown settings {bad} for {name!r}; it takes {sorted(allowed)}"
            )
        out[name] = {**default, **given}
    return out


def _check_grids(
    names: Sequence[str], grids: Mapping[str, Mapping[str, Sequence[Any]]]
) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Each name's grid: :data:`SELECT_GRIDS` with ``grids``' entries replaced."""
    unknown = sorted(set(grids) - set(names))
    if unknown:
        raise ValueError(f"grids for {unknown}, which are not evaluated")
    out = {}
    for name in names:
        given = {k: tuple(v) for k, v in grids.get(name, {}).items()}
        grid = {**SELECT_GRIDS[name], **given}
        allowed, _ = _allowed(name)
        bad = sorted(set(grid) - allowed)
        if bad:
            raise ValueError(
                f"unknown settings {bad} in the grid of {name!r}; it takes "
                f"{sorted(allowed)}"
            )
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise ValueError(f"the grid of {name!r} has no values for {empty}")
        out[name] = grid
    return out


def _check_folds(folds: int, labels: int | None) -> None:
    if int(folds) != folds or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds}")
    if labels is not None and labels // 10 < folds:
        raise ValueError(
            f"{folds}-fold CV needs >= {folds} labels per class, "
            f"labels={labels} gives {labels // 10}"
        )


def _json_default(obj: Any) -> Any:
    """numpy scalars in settings become Python numbers."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _first_splits(result: EvaluationResult, k: int) -> EvaluationResult:
    """``result`` restricted to its first ``k`` splits."""
    return result._replace(
        split_ids=result.split_ids[:k],
        accuracy={n: a[:k] for n, a in result.accuracy.items()},
        fit_seconds={n: a[:k] for n, a in result.fit_seconds.items()},
        select_seconds={n: a[:k] for n, a in result.select_seconds.items()},
        settings={n: s[:k] for n, s in result.settings.items()},
        cv_accuracy={n: s[:k] for n, s in result.cv_accuracy.items()},
    )


def save_evaluation(result: EvaluationResult, out: Path) -> None:
    """Write ``evaluation.json`` (:meth:`EvaluationResult.to_json`), ``table.md``
    (the table, and the selection table with ``select``) and
    ``evaluation.png`` (:func:`plot_evaluation`) into ``out``."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(result.to_json())
    text = result.table() + "\n"
    if result.select:
        text += "\n" + result.selection_table() + "\n"
    (out / "table.md").write_text(text)
    fig = plot_evaluation(result)
    fig.savefig(out / "evaluation.png", dpi=110)
    plt.close(fig)


def evaluate_digits(
    models: Sequence[str] = _digits.DIGITS_MODELS,
    splits: int | Sequence[DigitsSplit] = 10,
    seeds: int | Sequence[int] = 1,
    labels: int | None = None,
    select: bool = False,
    baselines: bool | Sequence[str] = True,
    progress: bool = True,
    *,
    split_seed: int = 0,
    folds: int = DEFAULT_FOLDS,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    out: Path | None = None,
) -> EvaluationResult:
    """Test accuracy of each model and baseline over stratified splits and seeds.

    For every split and seed, each model is fitted by its digits recipe
    (:func:`pgm_drm.experiments.digits.fit_model`, the recipe's
    hyperparameters unless ``settings`` or ``select`` change them) and each
    baseline (:data:`BASELINES`) on the same training images and labels; each
    predicts the test images once. With ``labels`` = N the label draw is the
    recipe's (:func:`pgm_drm.experiments.digits.label_subset` with the seed),
    ``rm`` and ``mfa`` run semi-supervised EM, the supervised baselines fit the
    N labelled images only and ``LabelSpreading`` joins them. Every argument is
    checked before the first fit.

    Args:
        models: Names from :data:`pgm_drm.experiments.digits.DIGITS_MODELS`.
        splits: K, for :func:`digits_splits` ``(K, split_seed)``, or the splits.
        seeds: S, for seeds ``0..S-1``, or the seeds. A fit's seed is its PRNG
            key, label draw, forest and CNN seed.
        labels: Label budget (a multiple of 10); ``None``: every label.
        select: Choose each name's hyperparameters among ``grids``
            (:data:`SELECT_GRIDS`) by ``folds``-fold stratified CV on the
            training split (on its labelled images; the unlabelled ones stay in
            every fold's training data), then fit the chosen setting on the
            whole training split.
        baselines: ``True``: every baseline that applies (``label-spreading``
            only with ``labels``); ``False``: none; or their names.
        progress: A tqdm bar over the fits.
        split_seed: ``random_state`` of split 0 (split i: ``split_seed + i``).
        folds: CV folds (``select``).
        settings: Per name, fixed settings over its defaults: a model's
            hyperparameters (:data:`~pgm_drm.experiments.digits.MODEL_SETTINGS`)
            and ``em``, ``unlabelled_weight``, ``translations``; a baseline's
            (:data:`BASELINE_SETTINGS`). With ``select`` the grid overrides them.
        grids: Per name, grids replacing entries of :data:`SELECT_GRIDS`.
        out: If given, ``evaluation.json`` of the splits done so far is written
            there after every split, and :func:`save_evaluation` at the end.

    Returns:
        :class:`EvaluationResult`; the mean ± sd runs over all ``K * S`` fits.
    """
    names = _resolve_names(models, baselines, labels)
    seed_list = _resolve_seeds(seeds)
    split_data, split_ids = _resolve_splits(splits, split_seed)
    if len(split_data) * len(seed_list) < _MIN_RUNS:
        raise ValueError(
            f"{len(split_data)} split(s) x {len(seed_list)} seed(s) give one "
            "accuracy, no sd: use splits >= 2 (or seeds >= 2)"
        )
    _check_labels(labels, split_data)
    fixed = _check_settings(names, settings or {})
    grid = _check_grids(names, grids or {}) if select else {}
    if select:
        _check_folds(folds, labels)

    shape = (len(split_data), len(seed_list))
    result = EvaluationResult(
        names=tuple(names),
        split_ids=tuple(split_ids),
        seeds=tuple(seed_list),
        accuracy={n: np.zeros(shape) for n in names},
        fit_seconds={n: np.zeros(shape) for n in names},
        select_seconds={n: np.zeros(shape) for n in names},
        settings={n: [[{} for _ in seed_list] for _ in split_data] for n in names},
        cv_accuracy={n: [[{} for _ in seed_list] for _ in split_data] for n in names},
        labels=labels,
        select=bool(select),
        folds=int(folds),
    )
    semi = labels is not None
    bar = tqdm(total=len(names) * shape[0] * shape[1], disable=not progress)
    for i, d in enumerate(split_data):
        for j, seed in enumerate(seed_list):
            y = np.asarray(d.y_train, dtype=np.int64)
            if semi:
                y = _digits.label_subset(y, labels, seed)
            for name in names:
                bar.set_description(f"split {split_ids[i]} seed {seed} {name}")
                use = fixed[name]
                t0 = time.perf_counter()
                if select:
                    use, result.cv_accuracy[name][i][j] = _select(
                        name, d, y, seed, use, grid[name], folds, semi
                    )
                t1 = time.perf_counter()
                pred = _predict(name, d, y, seed, use, semi)
                t2 = time.perf_counter()
                acc = float(np.mean(pred == np.asarray(d.y_test)))
                result.accuracy[name][i, j] = acc
                result.fit_seconds[name][i, j] = t2 - t1
                result.select_seconds[name][i, j] = t1 - t0 if select else 0.0
                result.settings[name][i][j] = dict(use)
                bar.set_postfix(acc=f"{acc:.3f}")
                bar.update()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            partial = _first_splits(result, i + 1)
            (out / "evaluation.json").write_text(partial.to_json())
    bar.close()
    if out is not None:
        save_evaluation(result, out)
    return result


def run_evaluation(
    model: str,
    out: Path,
    splits: int | None = None,
    seeds: int | None = None,
    select: bool = False,
    baselines: bool = True,
    seed: int = 0,
    labels: int | None = None,
    **options: Any,
) -> str:
    """``pgm-drm fit digits <model|all> --splits K --seeds S [--select]``: run
    :func:`evaluate_digits`, write :func:`save_evaluation`'s files into ``out``
    and return the table to print.

    ``model`` "all" is every model of the recipes (10 splits unless ``splits``
    or ``seeds`` say otherwise); ``seed`` is the first split's ``random_state``
    (split i uses ``seed + i``), the fits' seeds are ``0..S-1``; ``options``
    (``em``, ``unlabelled_weight``, ``translations``) are the model's recipe
    options, as for :func:`~pgm_drm.experiments.run_fit_digits`.
    """
    models = _digits.DIGITS_MODELS if model == "all" else (model,)
    if model == "all" and splits is None and seeds is None:
        splits = 10
    settings = {model: options} if options and model != "all" else None
    result = evaluate_digits(
        models,
        splits=splits or 1,
        seeds=seeds or 1,
        labels=labels,
        select=select,
        baselines=baselines,
        split_seed=seed,
        settings=settings,
        out=out,
    )
    save_evaluation(result, out)
    text = result.table()
    if result.select:
        text += "\n\n" + result.selection_table()
    return f"{text}\nwrote {out}/evaluation.json, table.md, evaluation.png"
