"""scikit-learn estimators: RM, DRM and E-DRM classifiers.

- :class:`RenderingModelClassifier`: one RM with a mixture of ``n_nuisances``
  templates per class, fitted by supervised soft or hard EM (Eqs. 14-17, labels
  clamp ``c``); ``predict`` is the MS-RMC (Eq. 6) or SP-RMC (Eq. 5) argmax,
  ``predict_proba`` the exact SP-RMC posterior ``p(c | I)`` (softmax of the
  sum-product class scores, Eq. 5).
- :class:`DRMClassifier`: one tree DRM per class, fitted by hard EM (Eqs.
  18-23, :func:`~pgm_drm.learning.fit_drm_classifier`); ``predict`` is the
  max-sum class (Eq. 12).
- :class:`EDRMTreeClassifier`, :class:`EDRMForestClassifier`: InfoMax E-DRM trees
  and bagged forests (§4, Eqs. 32-33) of :mod:`pgm_drm.learning.forest`; their
  hyperparameters are the fields of :class:`~pgm_drm.learning.TreeParams` and
  :class:`~pgm_drm.learning.ForestParams`, defined once.

Every estimator takes ``X`` as images ``(n, H, W)`` or as rows ``(n, D)`` (one
input path, :func:`_flat`). The RM and DRM classifiers reshape rows to
``image_shape`` when given, else to a square ``(sqrt(D), sqrt(D))`` when ``D``
is a perfect square, else keep them as 1-d images ``(D,)``; the trees work on
the flat rows. Labels may be any values (``classes_``, encoded as ``0..C-1``).

:data:`EXPECTED_FAILED_CHECKS` lists the ``sklearn.utils.estimator_checks`` that
cannot pass, with reasons; :func:`expected_failed_checks` is the callable for
``parametrize_with_checks(..., expected_failed_checks=...)``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

from pgm_drm.learning.drm_em import fit_drm_classifier
from pgm_drm.learning.em import fit_em
from pgm_drm.learning.forest import (
    ForestParams,
    InfoMaxTree,
    TreeParams,
    fit_infomax_forest,
    fit_infomax_tree,
    tree_apply,
    tree_predict_proba,
)
from pgm_drm.learning.loop import LoopOptions

__all__ = [
    "DRMClassifier",
    "EDRMForestClassifier",
    "EDRMTreeClassifier",
    "EXPECTED_FAILED_CHECKS",
    "MAX_SEMIRING_FAILED_CHECKS",
    "RenderingModelClassifier",
    "expected_failed_checks",
]

#: ``class name -> {check name: reason}`` for checks that are known to fail.
EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {
    "RenderingModelClassifier": {},
    "DRMClassifier": {},
}

#: Extra known failures of ``RenderingModelClassifier(semiring="max")``.
MAX_SEMIRING_FAILED_CHECKS: dict[str, str] = {
    "check_decision_proba_consistency": (
        "with semiring='max', decision_function is the MS-RMC score (Eq. 6, a max "
        "over nuisances) while predict_proba is the exact SP-RMC posterior (Eq. 5, "
        "a sum): different functions, so their rankings may differ"
    ),
}


def expected_failed_checks(estimator: BaseEstimator) -> dict[str, str]:
    """The known-failing estimator checks of ``estimator`` (check -> reason)."""
    out = dict(EXPECTED_FAILED_CHECKS.get(type(estimator).__name__, {}))
    if getattr(estimator, "semiring", None) == "max":
        out.update(MAX_SEMIRING_FAILED_CHECKS)
    return out


def _flat(X: Any) -> tuple[Any, tuple[int, ...] | None]:
    """The one input path: images ``(n, *shape)`` (numpy, JAX or any array with
    ``ndim > 2``) -> ``((n, D), shape)``; anything else unchanged, shape ``None``
    (``validate_data`` then checks it)."""
    if hasattr(X, "ndim") and hasattr(X, "shape") and X.ndim > 2:
        x = np.asarray(X)
        return x.reshape(x.shape[0], -1), tuple(x.shape[1:])
    return X, None


def _seed(random_state: Any) -> int:
    """An int seed from ``None`` (fresh), an int or a ``RandomState``."""
    if random_state is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    raise ValueError(
        f"random_state must be None, an int or a RandomState, got {random_state!r}"
    )


def image_shape_for(
    n_features: int, image_shape: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """The image shape of ``D = n_features`` pixels.

    Args:
        n_features: ``D``.
        image_shape: Explicit shape (its size must be ``D``).

    Returns:
        ``image_shape``, else ``(s, s)`` when ``D = s^2``, else ``(D,)``.

    Example:
        >>> image_shape_for(64), image_shape_for(10), image_shape_for(6, (2, 3))
        ((8, 8), (10,), (2, 3))
    """
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if int(np.prod(shape)) != n_features:
            raise ValueError(
                f"image_shape {shape} has {int(np.prod(shape))} pixels, X has "
                f"{n_features} features"
            )
        return shape
    side = int(round(np.sqrt(n_features)))
    return (side, side) if side * side == n_features else (n_features,)


class _ImageClassifier(ClassifierMixin, BaseEstimator):
    """Shared input handling: validation, label encoding, image reshaping."""

    def _fit_inputs(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        X2, shape = _flat(X)
        X2, y = validate_data(self, X2, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        given = getattr(self, "image_shape", None)
        if shape is not None and given is not None and tuple(given) != shape:
            raise ValueError(f"image_shape={given} but X has images of shape {shape}")
        self.image_shape_ = shape or image_shape_for(X2.shape[1], given)
        return X2.reshape((-1, *self.image_shape_)), y_idx

    def _images(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X2, shape = _flat(X)
        if shape is not None and shape != self.image_shape_:
            raise ValueError(
                f"X has images of shape {shape}; fitted on {self.image_shape_}"
            )
        X2 = validate_data(self, X2, reset=False, dtype=np.float64)
        return X2.reshape((-1, *self.image_shape_))

    def predict(self, X: Any) -> np.ndarray:
        """Class labels, ``(n,)``."""
        scores = self._scores(X, predict=True)  # checks fitted before classes_
        return self.classes_[np.argmax(scores, axis=1)]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n, C)`` (columns in ``classes_`` order)."""
        s = np.asarray(self._scores(X, predict=False), dtype=np.float64)
        s = s - s.max(axis=1, keepdims=True)
        p = np.exp(s)
        return p / p.sum(axis=1, keepdims=True)

    def _scores(self, X: Any, predict: bool) -> np.ndarray:
        raise NotImplementedError


class RenderingModelClassifier(_ImageClassifier):
    """The RM classifier (MS-RMC / SP-RMC, Eqs. 5-6) fitted by supervised EM.

    One Gaussian RM with ``C = len(classes_)`` classes and ``G = n_nuisances``
    templates per class, shared isotropic ``sigma`` (Eqs. 3-4), fitted by
    :func:`~pgm_drm.learning.fit_em` with every label given (``c`` clamped;
    soft EM, Eqs. 14-15, or hard EM, Eqs. 16-17).

    ``predict`` is the argmax of ``class_log_scores(X, semiring)``: MS-RMC
    (``"max"``, Eq. 6) or SP-RMC (``"sum"``, Eq. 5). ``predict_proba`` is always
    the exact posterior ``p(c | I)``, the softmax of the sum-product scores; so
    ``argmax predict_proba == predict`` holds for ``semiring="sum"`` and, with
    ``"max"``, except where the MS- and SP-RMC disagree.

    Args:
        n_nuisances: ``G``, templates (nuisance values) per class.
        mode: "soft" or "hard" EM.
        semiring: "max" (MS-RMC) or "sum" (SP-RMC) decisions.
        n_iter: EM iterations at most (stops earlier when the objective
            changes by less than ``tol``).
        tol: EM stopping tolerance (nats per image), or ``None``.
        image_shape: Shape to reshape rows of ``X`` to (default: square if
            ``D`` is a perfect square, else 1-d; only the class scores'
            layout changes, not the fit).
        random_state: Seed of the k-means++ initialisation.

    Attributes:
        classes_: ``(C,)`` the labels.
        model_: The fitted :class:`~pgm_drm.models.RenderingModel`.
        fit_: The :class:`~pgm_drm.learning.FitResult`.
        image_shape_: The image shape used.
        n_features_in_: ``D``.

    Expected-failed estimator checks (:func:`expected_failed_checks`): with
    ``semiring="max"`` only ``check_decision_proba_consistency`` (the MS-RMC
    ``decision_function`` and the SP-RMC ``predict_proba`` are different
    functions, so their rankings may differ); none with ``"sum"``.

    Example:
        >>> from pgm_drm.data import load_digits_split
        >>> d = load_digits_split()
        >>> clf = RenderingModelClassifier(n_nuisances=2, n_iter=5, random_state=0)
        >>> clf.fit(d.x_train[:300], d.y_train[:300]).predict(d.x_test[:4]).shape
        (4,)
    """

    def __init__(
        self,
        n_nuisances: int = 4,
        mode: str = "hard",
        semiring: str = "max",
        n_iter: int = 30,
        tol: float | None = 1e-6,
        image_shape: tuple[int, ...] | None = None,
        random_state: Any = None,
    ):
        self.n_nuisances = n_nuisances
        self.mode = mode
        self.semiring = semiring
        self.n_iter = n_iter
        self.tol = tol
        self.image_shape = image_shape
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> RenderingModelClassifier:
        """Fit by supervised EM on images ``X`` with labels ``y``."""
        if self.semiring not in ("max", "sum"):
            raise ValueError(f"semiring must be 'max' or 'sum', got {self.semiring!r}")
        x, y_idx = self._fit_inputs(X, y)
        self.fit_ = fit_em(
            x,
            len(self.classes_),
            self.n_nuisances,
            mode=self.mode,
            labels=y_idx,
            n_iter=self.n_iter,
            tol=self.tol,
            key=jax.random.PRNGKey(_seed(self.random_state)),
            loop=LoopOptions(progress=False),
        )
        self.model_ = self.fit_.model
        return self

    def _scores(self, X: Any, predict: bool) -> np.ndarray:
        x = self._images(X)  # checks fitted before model_
        semiring = self.semiring if predict else "sum"
        return np.asarray(self.model_.class_log_scores(jnp.asarray(x), semiring))

    def decision_function(self, X: Any) -> np.ndarray:
        """Class scores ``(n, C)`` under ``semiring`` (Eqs. 5-6, up to a per-image
        constant); binary problems: score of ``classes_[1]`` minus ``classes_[0]``.
        """
        s = self._scores(X, predict=True)
        return s[:, 1] - s[:, 0] if s.shape[1] == 2 else s


class DRMClassifier(_ImageClassifier):
    """Generative tree-DRM classifier: one DRM per class, hard EM (Eqs. 18-23).

    Wraps :func:`~pgm_drm.learning.fit_drm_classifier`; ``predict`` is
    ``argmax_y log pi_y + max_tau log p(tau, I | y)`` (max-sum, Eq. 12) and
    ``predict_proba`` its softmax (a max-sum approximation of ``p(y | I)``).

    The DRM renders square images of side ``s = prod(windows)``. Images must
    be 2-d ``(H, W)`` and no larger than ``(s, s)``: smaller ones are
    zero-padded at the bottom and right (constant pixels carry no class
    information). 1-d images (rows of ``D <= s^2`` features that are not a
    perfect square) are first laid out row-major in rows of ``s`` pixels.

    Args:
        windows: Pooling window per level (image side ``prod(windows)``).
        n_states: States per level; ``n_states[-1]`` mixture components per class.
        template_sizes: Template side per level.
        n_iter: Hard-EM iterations per class.
        image_shape: Shape to reshape rows of ``X`` to (default: square if
            ``D`` is a perfect square, else 1-d, laid out as above).
        random_state: Seed of the initialisations.

    Attributes:
        classes_, image_shape_, n_features_in_: As
            :class:`RenderingModelClassifier`.
        drm_: The fitted :class:`~pgm_drm.learning.PerClassDRM`.

    Expected-failed estimator checks: none (see :data:`EXPECTED_FAILED_CHECKS`).

    Example:
        >>> import numpy as np
        >>> x, y = np.random.default_rng(0).random((8, 8, 8)), np.tile([3, 5], 4)
        >>> clf = DRMClassifier(n_states=(4, 2), n_iter=2, random_state=0)
        >>> clf.fit(x, y).predict(x[:3]).shape, clf.classes_.tolist()
        ((3,), [3, 5])
    """

    def __init__(
        self,
        windows: tuple[int, ...] = (4, 2),
        n_states: tuple[int, ...] = (16, 20),
        template_sizes: tuple[int, ...] = (4, 2),
        n_iter: int = 30,
        image_shape: tuple[int, ...] | None = None,
        random_state: Any = None,
    ):
        self.windows = windows
        self.n_states = n_states
        self.template_sizes = template_sizes
        self.n_iter = n_iter
        self.image_shape = image_shape
        self.random_state = random_state

    def _side(self) -> int:
        return int(np.prod(self.windows))

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """``(n, *image_shape_)`` -> ``(n, side, side)``, zero-padded.

        1-d images of ``D <= side^2`` pixels are laid out row-major in rows of
        ``side`` pixels first.
        """
        side = self._side()
        if x.ndim == 2:
            d = x.shape[1]
            if d > side * side:
                raise ValueError(
                    f"{d} features do not fit the DRM's {(side, side)} image "
                    f"(windows={tuple(self.windows)})"
                )
            rows = -(-d // side)
            x = np.pad(x, ((0, 0), (0, rows * side - d))).reshape(-1, rows, side)
        if x.ndim != 3:
            raise ValueError(f"the DRM needs 2-d images, got shape {x.shape[1:]}")
        h, w = x.shape[1:]
        if h > side or w > side:
            raise ValueError(
                f"images of shape {(h, w)} are larger than the DRM's "
                f"{(side, side)} (windows={tuple(self.windows)})"
            )
        return np.pad(x, ((0, 0), (0, side - h), (0, side - w)))

    def fit(self, X: Any, y: Any) -> DRMClassifier:
        """Fit one DRM per class by hard EM on images ``X`` with labels ``y``."""
        x, y_idx = self._fit_inputs(X, y)
        self.drm_ = fit_drm_classifier(
            self._pad(x),
            y_idx,
            windows=tuple(self.windows),
            n_states=tuple(self.n_states),
            template_sizes=None
            if self.template_sizes is None
            else tuple(self.template_sizes),
            n_iter=self.n_iter,
            key=jax.random.PRNGKey(_seed(self.random_state)),
        )
        return self

    def _scores(self, X: Any, predict: bool) -> np.ndarray:
        x = self._pad(self._images(X))  # checks fitted before drm_
        return np.asarray(self.drm_.scores(jnp.asarray(x)))


@dataclass(kw_only=True, eq=False, repr=False)
class EDRMTreeClassifier(ClassifierMixin, BaseEstimator, TreeParams):
    """One E-DRM decision tree (Eqs. 31, 33, §4.2.1) with the scikit-learn API.

    Wraps :func:`~pgm_drm.learning.fit_infomax_tree`. Accepts ``X`` as ``(n, D)``
    or as images ``(n, H, W)`` (flattened).

    Args:
        branching, max_depth, min_samples_split, min_samples_leaf, relax_steps,
        learning_rate, max_features: The fields of
            :class:`~pgm_drm.learning.TreeParams` (keyword-only).
        random_state: Seed (k-means seeds, feature subsets).

    Attributes:
        classes_: ``(K,)`` the class labels.
        tree_: The fitted :class:`~pgm_drm.learning.InfoMaxTree`.
        n_features_in_: ``D``.

    Example:
        >>> from pgm_drm.data import load_digits_split
        >>> d = load_digits_split()
        >>> clf = EDRMTreeClassifier(max_depth=3, relax_steps=0, random_state=0)
        >>> clf.fit(d.x_train[:200], d.y_train[:200]).predict(d.x_test[:4]).shape
        (4,)
    """

    random_state: Any = None

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> EDRMTreeClassifier:
        """Grow the tree on ``X (n, D | H, W)``, labels ``y (n,)``."""
        X, y = validate_data(self, _flat(X)[0], y, y_numeric=False)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        w = None
        if sample_weight is not None:
            w = _check_sample_weight(sample_weight, X, ensure_non_negative=True)
            if not w.sum() > 0:
                raise ValueError("sample_weight must have a positive sum")
        self.tree_ = fit_infomax_tree(
            X,
            y_idx,
            len(self.classes_),
            TreeParams.of(self),
            weights=w,
            rng=np.random.default_rng(_seed(self.random_state)),
        )
        return self

    def apply(self, X: Any) -> np.ndarray:
        """Leaf id reached by each sample (the inferred path's end), ``(n,)``."""
        check_is_fitted(self)
        X = validate_data(self, _flat(X)[0], reset=False)
        return tree_apply(self.tree_, X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Leaf histograms ``p(c~ | tau*)`` (§4.2.1), ``(n, K)``; rows sum to 1."""
        check_is_fitted(self)
        X = validate_data(self, _flat(X)[0], reset=False)
        return tree_predict_proba(self.tree_, X)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class label, ``(n,)``."""
        proba = self.predict_proba(X)  # checks fitted before touching classes_
        return self.classes_[np.argmax(proba, axis=1)]


@dataclass(kw_only=True, eq=False, repr=False)
class EDRMForestClassifier(ClassifierMixin, BaseEstimator, ForestParams):
    """Bagged E-DRM trees (Eq. 32): bootstrap resamples, averaged leaf posteriors.

    Wraps :func:`~pgm_drm.learning.fit_infomax_forest`.

    Args:
        n_estimators, bootstrap, branching, max_depth, min_samples_split,
        min_samples_leaf, relax_steps, learning_rate, max_features: The fields
            of :class:`~pgm_drm.learning.ForestParams` (keyword-only).
        random_state: Seed of the per-tree seeds and the bootstrap draws.

    Attributes:
        classes_, n_features_in_, and ``estimators_``: the fitted
        :class:`EDRMTreeClassifier` of each tree (``estimators_[t].random_state``
        is the seed that tree used).
    """

    random_state: Any = None

    def _tree(self, tree: InfoMaxTree, seed: int) -> EDRMTreeClassifier:
        """Tree ``t`` of the forest as a fitted :class:`EDRMTreeClassifier`."""
        est = EDRMTreeClassifier(**vars(TreeParams.of(self)), random_state=seed)
        est.classes_ = self.classes_
        est.n_features_in_ = self.n_features_in_
        est.tree_ = tree
        return est

    def fit(self, X: Any, y: Any) -> EDRMForestClassifier:
        """Fit ``n_estimators`` trees on bootstrap resamples of ``(X, y)``."""
        X, y = validate_data(self, _flat(X)[0], y)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        forest = fit_infomax_forest(
            X,
            y_idx,
            len(self.classes_),
            ForestParams.of(self),
            rng=np.random.default_rng(_seed(self.random_state)),
        )
        self.estimators_ = [
            self._tree(t, int(s))
            for t, s in zip(forest.trees, forest.seeds, strict=True)
        ]
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """``1/T sum_t p(c~ | I, theta_t*)`` (Eq. 32), ``(n, K)``; rows sum to 1."""
        check_is_fitted(self)
        X = validate_data(self, _flat(X)[0], reset=False)
        return np.mean([tree_predict_proba(t.tree_, X) for t in self.estimators_], 0)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class label, ``(n,)``."""
        proba = self.predict_proba(X)  # checks fitted before touching classes_
        return self.classes_[np.argmax(proba, axis=1)]
