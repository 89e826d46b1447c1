"""scikit-learn estimators: RM, DRM and E-DRM classifiers.

- :class:`RenderingModelClassifier`: one RM with a mixture of ``n_nuisances``
  templates per class, fitted by supervised soft or hard EM (Eqs. 14-17, labels
  clamp ``c``); its decision rule is the MS-RMC (``semiring="max"``, the
  default, Eq. 6) or the SP-RMC (``semiring="sum"``, Eq. 5).
- :class:`DRMClassifier`: one tree DRM per class, fitted by hard EM (Eqs.
  18-23, :func:`~pgm_drm.learning.fit_drm_classifier`); its decision rule is the
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

One decision rule per estimator, so its three outputs agree: the RM and DRM
classifiers compute class scores ``s_c(I)`` in one semiring (the rule's), and
``decision_function`` is ``log q(c | I) = s_c - logsumexp_c' s_c'``,
``predict_proba`` is ``q(c | I)`` (the softmax of the same scores) and
``predict`` the argmax of ``decision_function``; with the sum semiring ``q`` is
the exact posterior ``p(c | I)``, with the max semiring the max-sum approximation
of it (the mode's score per class, normalised over classes). The E-DRM trees and
forests have no ``decision_function``: ``predict`` is the argmax of their
``predict_proba``. So ``argmax(predict_proba) == predict`` always (barring two
probabilities equal in float64), and every estimator passes scikit-learn's
``check_estimator`` with its default parameters, none expected to fail.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp
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
    "RenderingModelClassifier",
]


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


def _check_finite_scores(s: np.ndarray) -> None:
    """Refuse class scores ``(n, C)`` with no finite normaliser.

    The pixels were checked finite on the way in, so a row that is NaN or all
    ``-inf`` overflowed the scores' dtype (huge pixels): its posterior would be
    NaN and :meth:`~_ImageClassifier.predict` would return ``classes_[0]``.
    """
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~np.isfinite(logsumexp(s, axis=1)))
    if bad.size:
        shown = bad[:10].tolist()
        more = f" and {bad.size - len(shown)} more" if bad.size > len(shown) else ""
        raise ValueError(
            f"class scores of samples {shown}{more} are not finite although their "
            f"pixels are: the model's {jnp.result_type(float)} scores overflowed "
            f"(pixels too large); rescale X"
        )


#: Images per score evaluation of the RM and DRM classifiers (see
#: ``_ImageClassifier._log_posterior``).
SCORE_BATCH = 64


class _ImageClassifier(ClassifierMixin, BaseEstimator):
    """Shared input handling (validation, label encoding, image reshaping) and the
    one decision rule: ``predict``, ``decision_function`` and ``predict_proba``
    all come from :meth:`_log_posterior`, the subclass's class scores
    (:meth:`_scores`) normalised over classes."""

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

    def _scores(self, x: np.ndarray) -> np.ndarray:
        """Class scores ``(b, C)`` of images ``x`` ``(b, *image_shape_)`` under the
        decision rule, up to a per-image constant."""
        raise NotImplementedError

    def _log_posterior(self, X: Any) -> np.ndarray:
        """``log q(c | I)`` ``(n, C)``, float64: the scores minus their logsumexp.

        The images are scored ``SCORE_BATCH`` at a time (the last batch padded
        with zero images), so an image's scores do not depend on which images
        came with it: float32 matrix products round differently at different
        batch sizes, and scikit-learn checks that a subset's outputs are the
        full batch's.
        """
        x = self._images(X)  # checks fitted
        n, b = len(x), SCORE_BATCH
        x = np.concatenate([x, np.zeros((-n % b, *x.shape[1:]), x.dtype)])
        s = np.concatenate([self._scores(x[i : i + b]) for i in range(0, len(x), b)])
        _check_finite_scores(s[:n])
        s = s[:n].astype(np.float64)
        return s - logsumexp(s, axis=1, keepdims=True)

    def decision_function(self, X: Any) -> np.ndarray:
        """``log q(c | I)``, ``(n, C)`` (columns in ``classes_`` order); binary
        problems: the log-odds ``log q(classes_[1] | I) - log q(classes_[0] | I)``,
        ``(n,)``."""
        d = self._log_posterior(X)
        return d[:, 1] - d[:, 0] if d.shape[1] == 2 else d

    def predict(self, X: Any) -> np.ndarray:
        """Class labels ``(n,)``: the argmax of :meth:`decision_function`."""
        d = self._log_posterior(X)  # checks fitted before classes_
        return self.classes_[np.argmax(d, axis=1)]

    def predict_proba(self, X: Any) -> np.ndarray:
        """``q(c | I)``, ``(n, C)``: the softmax of the class scores (columns in
        ``classes_`` order, rows sum to 1)."""
        p = np.exp(self._log_posterior(X))
        return p / p.sum(axis=1, keepdims=True)


class RenderingModelClassifier(_ImageClassifier):
    """The RM classifier (MS-RMC / SP-RMC, Eqs. 5-6) fitted by supervised EM.

    One Gaussian RM with ``C = len(classes_)`` classes and ``G = n_nuisances``
    templates per class, shared isotropic ``sigma`` (Eqs. 3-4), fitted by
    :func:`~pgm_drm.learning.fit_em` with every label given (``c`` clamped;
    soft EM, Eqs. 14-15, or hard EM, Eqs. 16-17).

    One semiring decides everything. The class scores are
    ``s_c = class_log_scores(X, semiring)``: ``max_{g,a} log p(c, g, a, I)`` for
    ``"max"`` (the MS-RMC, Eq. 6; the default) or ``log p(c, I)`` for ``"sum"``
    (the SP-RMC, Eq. 5), each up to a per-image constant. Then
    ``decision_function`` is ``s_c - logsumexp_c' s_c'``, ``predict`` its
    argmax (the MS- or SP-RMC decision) and ``predict_proba`` its exponential:
    with ``"sum"`` the exact posterior ``p(c | I)``; with ``"max"`` the max-sum
    approximation ``max_{g,a} p(c, g, a | I)`` normalised over ``c`` (sharper
    than ``p(c | I)``; use ``"sum"`` for calibrated probabilities).

    Args:
        n_nuisances: ``G``, templates (nuisance values) per class.
        mode: "soft" or "hard" EM.
        semiring: "max" (MS-RMC, Eq. 6) or "sum" (SP-RMC, Eq. 5): the rule of
            ``predict``, ``decision_function`` and ``predict_proba``.
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

    def _scores(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.class_log_scores(jnp.asarray(x), self.semiring))


class DRMClassifier(_ImageClassifier):
    """Generative tree-DRM classifier: one DRM per class, hard EM (Eqs. 18-23).

    Wraps :func:`~pgm_drm.learning.fit_drm_classifier`. The class scores are
    ``s_y = log pi_y + max_tau log p(tau, I | y)`` (max-sum, Eq. 12);
    ``decision_function`` is ``s_y - logsumexp_y' s_y'``, ``predict`` its argmax
    and ``predict_proba`` its exponential (the max-sum approximation of
    ``p(y | I)``), as for :class:`RenderingModelClassifier` with ``"max"``.

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

    def _scores(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.drm_.scores(jnp.asarray(self._pad(x))))


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
