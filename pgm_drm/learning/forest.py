"""E-DRM decision trees and forests: InfoMax learning (Eq. 33), leaf histograms
(§4.2.1) and bagging (Eq. 32).

Inference in an E-DRM is a decision tree (Eq. 31): at each internal node the image
``I0`` goes to the child whose filter responds most,
``argmax_j <w_j | I0> + b_j`` (``ChooseChild(Filter(I0))``). This module *learns*
such trees from labelled images:

1. **Generative filters.** At a node, the label classes present are grouped into
   ``branching`` coarse categories (weighted k-means on the class means); each child
   ``j`` gets the template ``mu_j`` (mean of its images, i.e. the parent template
   plus a mutation ``alpha_j``), the prior ``pi_j`` (its share of the images) and a
   pooled pixel variance ``s^2``, which make the Gaussian E-DRM filter
   ``w_j = mu_j / s^2``, ``b_j = -||mu_j||^2 / (2 s^2) + log pi_j`` (Eqs. 8, 31).
2. **Discriminative relaxation** (§4.2.1, last paragraph; Eq. 25). The filters are
   then freed: starting from the generative ones (rescaled so the logit gaps have
   unit spread), ``(w, b)`` maximise a differentiable information gain in which
   each image is sent to child ``j`` with probability
   ``softmax_j(beta_t (<w_j|x> + b_j))`` (``beta_t`` anneals from 1 to 4 so the
   soft routing approaches the hard one), with optax Adam. All frontier nodes of
   one level are optimised together in one jitted ``lax.scan`` (fixed array
   shapes: every training row is present, rows outside the frontier carry weight 0).
3. **InfoMax choice** (Eq. 33). Per node, the generative and the relaxed filter
   are both scored by the exact (hard-routing) information gain
   ``H[c] - H[c | g]`` of the training labels reaching the node; the better one is
   kept. A node becomes a leaf when it is pure, too small, at ``max_depth``, or
   when no split has positive gain. Learning proceeds level by level, coarse to
   fine, as in the paper's split of Eq. 33.
4. **Leaf histograms** (§4.2.1). Every node stores the (weighted) label counts of
   the training images reaching it; a leaf's normalised counts are ``p(c~ | tau*)``.
5. **Bagging** (Eq. 32). :func:`fit_infomax_forest` trains each tree on a
   bootstrap resample (as integer sample weights) and :func:`forest_predict_proba`
   averages the trees' leaf posteriors with ``p(t) = 1 / T``.

The hyperparameters are defined once, in :class:`TreeParams` (one tree) and
:class:`ForestParams` (plus the bagging); the scikit-learn estimators
:class:`~pgm_drm.sklearn.EDRMTreeClassifier` and
:class:`~pgm_drm.sklearn.EDRMForestClassifier` take their fields as arguments.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgm_drm._typing import Array, ArrayLike

__all__ = [
    "ForestParams",
    "InfoMaxForest",
    "InfoMaxTree",
    "TreeParams",
    "entropy",
    "fit_infomax_forest",
    "fit_infomax_tree",
    "forest_predict_proba",
    "generative_split",
    "information_gain",
    "leaf_histograms",
    "soft_information_gain",
    "tree_apply",
    "tree_apply_naive",
    "tree_predict_proba",
]

#: Deepest tree :func:`fit_infomax_tree` grows when ``max_depth`` is ``None``.
DEPTH_CAP = 64
#: A split must gain more than this many nats (float rounding of entropies of
#: counts up to ~1e4 is ~1e-12; 1e-9 rejects only splits that gain nothing).
MIN_GAIN = 1e-9
#: Logit gaps are multiplied by beta_t, annealed geometrically from 1 to this.
BETA_MAX = 4.0
#: The relaxation's frontier is padded to at least this many slots (then to powers
#: of two) and its rows to :func:`_bucket` sizes, so that the jitted step compiles
#: for few shapes: one per tree for small frontiers, and datasets of nearby sizes
#: share programs. Padding slots and rows carry no data (weight 0): the relaxed
#: filters of the real slots are bit-identical to an unpadded run.
MIN_SLOTS = 16


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of ``2 ** (bit_length(n) - 3)``: at most 8
    distinct sizes per octave and under 25% padding (e.g. 150 -> 160, 1347 ->
    1536)."""
    step = 1 << max(n.bit_length() - 3, 0)
    return -(-n // step) * step


@dataclass(kw_only=True, eq=False)
class TreeParams:
    """The hyperparameters of one InfoMax E-DRM tree (Eq. 33, §4.2.1).

    Mutable (scikit-learn's ``set_params`` sets these fields on the estimators
    that subclass it) and compared by identity (``eq=False``: such estimators
    stay hashable); validated by :func:`fit_infomax_tree`, not here.

    Attributes:
        branching: Children per internal node ``B >= 2``.
        max_depth: Deepest level (``None``: :data:`DEPTH_CAP`, i.e. grow until
            the nodes are pure or too small).
        min_samples_split: A node needs this much (weighted) data to be split.
        min_samples_leaf: Every child of a split needs this much (weighted) data.
        relax_steps: Adam steps of the discriminative relaxation (0: the
            generative E-DRM filters only).
        learning_rate: Adam step size of the relaxation.
        max_features: Pixels each node's filter may use (a random subset):
            ``None`` (all), ``"sqrt"``, an int in ``[1, D]`` or a fraction in
            ``(0, 1]``.
    """

    branching: int = 2
    max_depth: int | None = None
    min_samples_split: float = 2
    min_samples_leaf: float = 1
    relax_steps: int = 100
    learning_rate: float = 0.02
    max_features: Any = None

    @classmethod
    def of(cls, obj: Any) -> TreeParams:
        """The fields of this class read from ``obj`` (e.g. an estimator that
        subclasses it), as a plain instance of ``cls``."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})


@dataclass(kw_only=True, eq=False)
class ForestParams(TreeParams):
    """The hyperparameters of a bagged E-DRM forest (Eq. 32): every tree's
    :class:`TreeParams`, plus the bagging.

    Attributes:
        n_estimators: Number of trees ``T >= 1``.
        bootstrap: Train each tree on a bootstrap resample (drawn with
            replacement, as integer sample weights); ``False``: every tree sees
            all the data.
    """

    n_estimators: int = 50
    bootstrap: bool = True


class InfoMaxTree(NamedTuple):
    """A fitted E-DRM decision tree in flat arrays (node 0 is the root).

    Attributes:
        filters: ``(n_nodes, B, D)`` child filters ``w`` of each internal node.
        biases: ``(n_nodes, B)`` child biases ``b`` (``-inf``: child not used).
        children: ``(n_nodes, B)`` child node ids; ``-1`` everywhere at a leaf.
        counts: ``(n_nodes, K)`` weighted training-label counts (histograms) at
            every node, internal ones included (§4.2.1).
        depth: ``(n_nodes,)`` node depth.
        relaxed: ``(n_nodes,)`` True where the relaxed (discriminative) filter beat
            the generative one.
        gain: ``(n_nodes,)`` information gain of the chosen split (0 at leaves).
    """

    filters: np.ndarray
    biases: np.ndarray
    children: np.ndarray
    counts: np.ndarray
    depth: np.ndarray
    relaxed: np.ndarray
    gain: np.ndarray

    @property
    def is_leaf(self) -> np.ndarray:
        return self.children[:, 0] < 0

    @property
    def n_leaves(self) -> int:
        return int(np.sum(self.is_leaf))


# ---------------------------------------------------------------- information
def entropy(counts: ArrayLike, axis: int = -1) -> np.ndarray:
    """Entropy (nats) of the distribution proportional to ``counts`` along ``axis``;
    0 for all-zero counts."""
    c = np.asarray(counts, dtype=float)
    n = c.sum(axis=axis, keepdims=True)
    p = np.divide(c, n, out=np.zeros_like(c), where=n > 0)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -np.sum(p * logp, axis=axis)


def information_gain(child_counts: ArrayLike) -> float:
    """``H[c~] - H[c~ | g]`` of Eq. 33 from the label counts of each child.

    Args:
        child_counts: ``(B, K)`` (weighted) label counts per child.

    Example:
        >>> round(information_gain([[5, 0], [0, 5]]), 6)  # ln 2
        0.693147
    """
    c = np.asarray(child_counts, dtype=float)
    n_child = c.sum(axis=1)
    n = n_child.sum()
    if n <= 0:
        return 0.0
    return float(entropy(c.sum(axis=0)) - np.sum(n_child / n * entropy(c, axis=1)))


def soft_information_gain(q: Array, y_onehot: Array, weights: Array) -> Array:
    """Differentiable information gain with soft routing ``q``.

    Args:
        q: ``(N, B)`` routing probabilities of each image to each child.
        y_onehot: ``(N, K)``.
        weights: ``(N,)`` sample weights.

    Returns:
        Scalar ``H[c~] - sum_j (n_j / n) H[c~ | j]`` from soft counts
        ``n_jk = sum_i w_i q_ij y_ik``; equals :func:`information_gain` for one-hot
        ``q``.
    """
    counts = jnp.einsum("n,nb,nk->bk", weights, q, y_onehot)
    return _soft_gain_from_counts(counts)


def _entropy_j(counts: Array) -> Array:
    n = jnp.sum(counts, axis=-1, keepdims=True)
    p = counts / jnp.maximum(n, 1e-12)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)


def _soft_gain_from_counts(counts: Array) -> Array:
    """``counts (..., B, K)`` -> information gain ``(...)``."""
    n_child = jnp.sum(counts, axis=-1)
    n = jnp.maximum(jnp.sum(n_child, axis=-1), 1e-12)
    h_cond = jnp.sum(n_child / n[..., None] * _entropy_j(counts), axis=-1)
    return _entropy_j(jnp.sum(counts, axis=-2)) - h_cond


def leaf_histograms(
    leaves: ArrayLike,
    labels: ArrayLike,
    n_leaves: int,
    n_classes: int,
    weights: ArrayLike | None = None,
) -> np.ndarray:
    """Label histograms per leaf (§4.2.1): ``counts[b, c] = sum_{n: leaf_n=b,
    label_n=c} w_n``; normalise rows for ``p(c~ | tau* = b)``.

    Args:
        leaves: ``(N,)`` inferred leaf (or any node / path) ids in ``[0, n_leaves)``.
        labels: ``(N,)`` class indices in ``[0, n_classes)``.
        weights: ``(N,)`` sample weights (ones when ``None``).

    Returns:
        ``(n_leaves, n_classes)`` counts.

    Example:
        >>> leaf_histograms([0, 0, 1], [1, 1, 0], 2, 2).tolist()
        [[0.0, 2.0], [1.0, 0.0]]
    """
    b = np.asarray(leaves, dtype=np.int64)
    c = np.asarray(labels, dtype=np.int64)
    w = np.ones(b.shape) if weights is None else np.asarray(weights, dtype=float)
    if b.shape != c.shape or b.shape != w.shape or b.ndim != 1:
        raise ValueError(
            f"leaves, labels and weights must be 1-d of one length, got "
            f"{b.shape}, {c.shape}, {w.shape}"
        )
    if b.size and (b.min() < 0 or b.max() >= n_leaves):
        raise ValueError(f"leaf ids must lie in [0, {n_leaves})")
    if c.size and (c.min() < 0 or c.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    out = np.zeros((int(n_leaves), int(n_classes)))
    np.add.at(out, (b, c), w)
    return out


# ---------------------------------------------------------------- the splits
def generative_split(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    n_classes: int,
    branching: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The E-DRM child filters of one node (Eqs. 29, 31): see the module docstring.

    Args:
        x: ``(n, D)`` images reaching the node (masked features already zeroed).
        y: ``(n,)`` class indices; w: ``(n,)`` positive weights.
        branching: Number of children ``B``.
        rng: Picks the k-means++ seeds.

    Returns:
        ``w`` ``(B, D)`` and ``b`` ``(B,)``; children left without classes get
        ``b = -inf`` (never chosen).
    """
    counts = np.bincount(y, weights=w, minlength=n_classes)
    present = np.flatnonzero(counts > 0)
    sums = np.zeros((n_classes, x.shape[1]))
    np.add.at(sums, y, w[:, None] * x)
    means = sums[present] / counts[present, None]
    cw = counts[present]
    k = min(branching, len(present))
    # weighted k-means++ on the class means, then Lloyd iterations
    centers = [means[rng.choice(len(present), p=cw / cw.sum())]]
    for _ in range(1, k):
        d2 = np.min([np.sum((means - c) ** 2, axis=1) for c in centers], axis=0)
        p = cw * d2
        idx = rng.choice(len(present), p=p / p.sum()) if p.sum() > 0 else 0
        centers.append(means[idx])
    centers = np.array(centers)
    for _ in range(20):
        d2 = np.sum((means[:, None] - centers[None]) ** 2, axis=2)
        group = np.argmin(d2, axis=1)
        new = np.array(
            [
                np.average(means[group == j], axis=0, weights=cw[group == j])
                if np.any(group == j)
                else centers[j]
                for j in range(k)
            ]
        )
        if np.allclose(new, centers):
            break
        centers = new
    group_of_class = np.full(n_classes, -1)
    group_of_class[present] = group
    g = group_of_class[y]
    filt = np.zeros((branching, x.shape[1]))
    bias = np.full(branching, -np.inf)
    tot = w.sum()
    resid = 0.0
    for j in range(k):
        sel = g == j
        if not np.any(sel):
            continue
        wj = w[sel]
        mu = np.average(x[sel], axis=0, weights=wj)
        resid += np.sum(wj[:, None] * (x[sel] - mu) ** 2)
        filt[j] = mu
        bias[j] = np.log(wj.sum() / tot)
    s2 = resid / (tot * x.shape[1]) + 1e-3  # pooled pixel variance (+ a floor)
    used = np.isfinite(bias)
    bias[used] += -np.sum(filt[used] ** 2, axis=1) / (2 * s2)
    return filt / s2, bias


@partial(jax.jit, static_argnames=("n_slots", "steps"))
def _relax(
    w0: Array,
    b0: Array,
    x: Array,
    y: Array,
    weight: Array,
    slot: Array,
    mask: Array,
    lr: float,
    n_slots: int,
    steps: int,
) -> tuple[Array, Array, Array]:
    """Adam on the soft information gain of every frontier node at once.

    Args:
        w0: ``(P, B, D)``, b0: ``(P, B)`` initial filters (``-inf`` biases stay).
        x: ``(N, D)``; y: ``(N, K)`` one-hot; weight: ``(N,)`` (0 off-frontier).
        slot: ``(N,)`` frontier slot of each row in ``[0, P)``.
        mask: ``(P, D)`` features each node may use.

    Returns:
        Final ``w``, ``b`` and the per-step summed soft gain ``(steps,)``.
    """
    fixed = jnp.isneginf(b0)
    b_init = jnp.where(fixed, 0.0, b0)
    opt = optax.adam(lr)

    def gain(params, beta):
        w, b = params
        wm = w * mask[:, None, :]
        logits = jnp.einsum("nd,nbd->nb", x, wm[slot]) + b[slot]
        logits = jnp.where(fixed[slot], -1e30, beta * logits)
        q = jax.nn.softmax(logits, axis=-1)
        counts = jax.ops.segment_sum(
            weight[:, None, None] * q[:, :, None] * y[:, None, :], slot, n_slots
        )
        return jnp.sum(_soft_gain_from_counts(counts))

    def step(carry, t):
        params, state = carry
        beta = BETA_MAX ** (t / max(steps - 1, 1))
        g, grads = jax.value_and_grad(gain)(params, beta)
        grads = jax.tree_util.tree_map(lambda v: -v, grads)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), g

    params = (w0, b_init)
    (params, _), trace = jax.lax.scan(
        step, (params, opt.init(params)), jnp.arange(steps, dtype=x.dtype)
    )
    w, b = params
    return w, jnp.where(fixed, -jnp.inf, b), trace


def _route(x: np.ndarray, filt: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``ChooseChild(Filter(x))``: argmax of ``x @ filt.T + bias``, shape ``(n,)``."""
    return np.argmax(x @ filt.T + bias, axis=1)


def _n_features(max_features: Any, d: int) -> int:
    if max_features is None:
        return d
    if max_features == "sqrt":
        return max(1, int(np.sqrt(d)))
    if isinstance(max_features, numbers.Integral):
        if not 1 <= max_features <= d:
            raise ValueError(f"max_features={max_features} must lie in [1, {d}]")
        return int(max_features)
    if isinstance(max_features, numbers.Real) and 0 < max_features <= 1:
        return max(1, int(round(max_features * d)))
    raise ValueError(
        f"max_features must be None, 'sqrt', an int in [1, D] or a float in (0, 1], "
        f"got {max_features!r}"
    )


def fit_infomax_tree(
    x: ArrayLike,
    y: ArrayLike,
    n_classes: int,
    params: TreeParams | None = None,
    *,
    weights: ArrayLike | None = None,
    rng: np.random.Generator | None = None,
) -> InfoMaxTree:
    """Grow an E-DRM decision tree level by level by InfoMax (Eq. 33).

    Args:
        x: ``(N, D)`` flat images.
        y: ``(N,)`` class indices in ``[0, n_classes)``.
        n_classes: ``K``.
        params: The hyperparameters (:class:`TreeParams`; ``None``: defaults).
        weights: ``(N,)`` non-negative sample weights (bootstrap counts); ones when
            ``None``. Rows of weight 0 are routed but never counted.
        rng: Randomness of k-means seeds and feature subsets (``None``: seed 0).

    Returns:
        The fitted :class:`InfoMaxTree`.

    Example:
        >>> x, y = np.repeat(np.eye(2), 5, axis=0), np.repeat([0, 1], 5)
        >>> tree = fit_infomax_tree(x, y, 2, TreeParams(relax_steps=0))
        >>> tree.n_leaves, tree_predict_proba(tree, np.eye(2)).tolist()
        (2, [[1.0, 0.0], [0.0, 1.0]])
    """
    p = TreeParams() if params is None else params
    rng = np.random.default_rng(0) if rng is None else rng
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=np.int64)
    n, d = x.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if int(p.branching) < 2:
        raise ValueError(f"branching must be >= 2, got {p.branching}")
    br = int(p.branching)
    depth_cap = DEPTH_CAP if p.max_depth is None else int(p.max_depth)
    k_feat = _n_features(p.max_features, d)
    min_samples_split, min_samples_leaf = p.min_samples_split, p.min_samples_leaf
    relax_steps, learning_rate = p.relax_steps, p.learning_rate
    # Rows padded to a bucket size for the relaxation (zero rows, weight 0).
    n_pad = _bucket(n)
    xj = jnp.asarray(np.concatenate([x, np.zeros((n_pad - n, d))]))
    yj = jnp.asarray(
        np.concatenate([np.eye(n_classes)[y], np.zeros((n_pad - n, n_classes))])
    )

    filters, biases, children, counts, depths, relaxed, gains = ([] for _ in range(7))

    def new_node(rows: np.ndarray, depth: int) -> int:
        filters.append(np.zeros((br, d)))
        biases.append(np.full(br, -np.inf))
        children.append(np.full(br, -1))
        counts.append(np.bincount(y[rows], weights=w[rows], minlength=n_classes))
        depths.append(depth)
        relaxed.append(False)
        gains.append(0.0)
        return len(counts) - 1

    node_of = np.zeros(n, dtype=np.int64)
    frontier = [new_node(np.arange(n), 0)]
    for depth in range(depth_cap):
        cands = []
        for node in frontier:
            c = counts[node]
            if c.sum() >= min_samples_split and np.count_nonzero(c) > 1:
                cands.append(node)
        if not cands:
            break
        p = max(MIN_SLOTS, 1 << (len(cands) - 1).bit_length())  # few jit shapes
        w0 = np.zeros((p, br, d))
        b0 = np.zeros((p, br))
        mask = np.zeros((p, d))
        slot = np.zeros(n_pad, dtype=np.int64)
        wt = np.zeros(n_pad)
        for i, node in enumerate(cands):
            rows = np.flatnonzero((node_of == node) & (w > 0))
            feats = np.sort(rng.choice(d, size=k_feat, replace=False))
            mask[i, feats] = 1.0
            f, b = generative_split(
                x[rows] * mask[i], y[rows], w[rows], n_classes, br, rng
            )
            members = np.flatnonzero(node_of == node)
            slot[members], wt[members] = i, w[members]
            # rescale: unit spread of the best-vs-second logit gap on the node
            z = np.sort(x[rows] @ f.T + b, axis=1)
            gap = z[:, -1] - z[:, -2] if np.isfinite(z[:, -2]).all() else z[:, -1]
            scale = max(float(np.std(gap)), 1e-6)
            w0[i], b0[i] = f / scale, b / scale
        if relax_steps > 0:
            wr, brr, _ = _relax(
                jnp.asarray(w0),
                jnp.asarray(b0),
                xj,
                yj,
                jnp.asarray(wt),
                jnp.asarray(slot),
                jnp.asarray(mask),
                float(learning_rate),
                n_slots=p,
                steps=int(relax_steps),
            )
            wr, brr = np.asarray(wr) * mask[:, None, :], np.asarray(brr)
        new_frontier = []
        for i, node in enumerate(cands):
            members = np.flatnonzero(node_of == node)
            xm, ym, wm = x[members], y[members], w[members]
            options = [(w0[i], b0[i], False)]
            if relax_steps > 0:
                options.append((wr[i], brr[i], True))
            best = None
            for f, b, is_relaxed in options:
                route = _route(xm, f, b)
                cc = leaf_histograms(route, ym, br, n_classes, wm)
                child_w = cc.sum(axis=1)
                if np.sum(child_w > 0) < 2 or np.any(
                    (child_w > 0) & (child_w < min_samples_leaf)
                ):
                    continue
                ig = information_gain(cc)
                if ig > MIN_GAIN and (best is None or ig > best[0] + MIN_GAIN):
                    best = (ig, f, b, is_relaxed, route, child_w)
            if best is None:
                continue
            ig, f, b, is_relaxed, route, child_w = best
            b = np.where(child_w > 0, b, -np.inf)  # drop children nobody reaches
            filters[node], biases[node] = f, b
            relaxed[node], gains[node] = is_relaxed, ig
            for j in np.flatnonzero(child_w > 0):
                rows = members[route == j]
                child = new_node(rows, depth + 1)
                children[node][j] = child
                node_of[rows] = child
                new_frontier.append(child)
            # rows of a child nobody (weighted) reaches stay at the node: they carry
            # weight 0, and at prediction time the -inf bias keeps them out.
        frontier = new_frontier
    return InfoMaxTree(
        np.array(filters),
        np.array(biases),
        np.array(children),
        np.array(counts),
        np.array(depths),
        np.array(relaxed),
        np.array(gains),
    )


def tree_apply(tree: InfoMaxTree, x: ArrayLike) -> np.ndarray:
    """Leaf reached by each row of ``x (N, D)``: ``(N,)`` node ids (vectorised)."""
    x = np.asarray(x, dtype=float)
    node = np.zeros(x.shape[0], dtype=np.int64)
    for _ in range(int(tree.depth.max()) + 1):
        internal = tree.children[node, 0] >= 0
        internal |= np.any(tree.children[node] >= 0, axis=1)
        if not internal.any():
            break
        resp = np.einsum("nd,nbd->nb", x, tree.filters[node]) + tree.biases[node]
        choice = np.argmax(resp, axis=1)
        node = np.where(internal, tree.children[node, choice], node)
    return node


def tree_apply_naive(tree: InfoMaxTree, x: ArrayLike) -> int:
    """Loop twin of :func:`tree_apply` for one flat image ``(D,)``."""
    v = np.asarray(x, dtype=float)
    node = 0
    while np.any(tree.children[node] >= 0):
        scores = [
            float(v @ f) + float(b)
            for f, b in zip(tree.filters[node], tree.biases[node], strict=True)
        ]
        node = int(tree.children[node][int(np.argmax(scores))])
    return node


def tree_predict_proba(tree: InfoMaxTree, x: ArrayLike) -> np.ndarray:
    """Leaf histograms of the leaves reached, normalised: ``(N, K)``."""
    c = tree.counts[tree_apply(tree, x)]
    return c / c.sum(axis=1, keepdims=True)


class InfoMaxForest(NamedTuple):
    """Bagged E-DRM trees (Eq. 32).

    Attributes:
        trees: The fitted :class:`InfoMaxTree` of each of the ``T`` trees.
        seeds: ``(T,)`` the seed of each tree's generator
            (``np.random.default_rng(seeds[t])`` grew ``trees[t]``).
    """

    trees: tuple[InfoMaxTree, ...]
    seeds: np.ndarray


def fit_infomax_forest(
    x: ArrayLike,
    y: ArrayLike,
    n_classes: int,
    params: ForestParams | None = None,
    *,
    rng: np.random.Generator | None = None,
) -> InfoMaxForest:
    """Bag ``params.n_estimators`` InfoMax trees (Eq. 32).

    ``rng`` first draws one seed per tree, then (with ``bootstrap``) each tree's
    resample of the ``N`` rows, as integer weights; tree ``t`` grows from
    ``np.random.default_rng(seeds[t])``.

    Args:
        x: ``(N, D)`` flat images.
        y: ``(N,)`` class indices in ``[0, n_classes)``.
        n_classes: ``K``.
        params: The hyperparameters (:class:`ForestParams`; ``None``: defaults).
        rng: Randomness of the seeds and the resamples (``None``: seed 0).

    Returns:
        The fitted :class:`InfoMaxForest`.
    """
    p = ForestParams() if params is None else params
    if int(p.n_estimators) < 1:
        raise ValueError(f"n_estimators must be >= 1, got {p.n_estimators}")
    rng = np.random.default_rng(0) if rng is None else rng
    tree_params = TreeParams.of(p)
    n = np.shape(x)[0]
    seeds = rng.integers(2**31 - 1, size=int(p.n_estimators))
    trees = []
    for seed in seeds:
        weights = None
        if p.bootstrap:
            weights = np.bincount(rng.integers(n, size=n), minlength=n)
        trees.append(
            fit_infomax_tree(
                x,
                y,
                n_classes,
                tree_params,
                weights=weights,
                rng=np.random.default_rng(int(seed)),
            )
        )
    return InfoMaxForest(tuple(trees), seeds)


def forest_predict_proba(forest: InfoMaxForest, x: ArrayLike) -> np.ndarray:
    """``1/T sum_t p(c~ | I, theta_t*)`` (Eq. 32): the trees' leaf posteriors
    averaged, ``(N, K)``; rows sum to 1."""
    return np.mean([tree_predict_proba(t, x) for t in forest.trees], axis=0)
