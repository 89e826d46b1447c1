"""Exact and greedy inference in the Evolutionary DRM (paper §4, Eqs. 28-31).

:func:`path_posterior` is exact max-sum / sum-product over the tree of
categories (a vectorised twin of ``compile_model`` + ``infer``);
:func:`greedy_path` is the coarse-to-fine ``ChooseChild(Filter(I0))`` decision
tree of Eq. 31, with a loop twin :func:`greedy_path_naive`;
:func:`coarse_to_fine_margin` is the noise-free condition under which the two agree.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import Array, ArrayLike, Semiring
from pgm_drm.inference.api import Posterior
from pgm_drm.models.edrm import EvolutionaryDRM, RootRule
from pgm_drm.models.validation import check_finite_log_z, check_images
from pgm_drm.semiring import reduce_t, resolve_temperature

__all__ = [
    "coarse_to_fine_margin",
    "exact_map_path",
    "greedy_path",
    "greedy_path_naive",
    "leaf_log_joint",
    "path_log_joint",
    "path_posterior",
]


def _flat(edrm: EvolutionaryDRM, images: ArrayLike) -> tuple[Array, bool]:
    """Checked images as float ``(N, D)`` (integer pixels converted: ``x**2`` and
    ``-2 * x`` would wrap around in ``uint8``; ``N = 0`` allowed) and whether one
    image was given."""
    x, single = check_images(images, edrm.image_shape, dtype=edrm.root.dtype)
    return x.reshape(x.shape[0], math.prod(edrm.image_shape)), single


def _gauss_log_lik(x: Array, templates: Array, sigma: float) -> Array:
    """``log N(x_n; mu_k, sigma^2 I)`` for flat ``x (N, D)``, ``templates (K, D)``."""
    d = x.shape[1]
    sq = (
        jnp.sum(x**2, axis=1)[:, None]
        - 2 * x @ templates.T
        + jnp.sum(templates**2, axis=1)[None]
    )
    return -sq / (2 * sigma**2) - 0.5 * d * jnp.log(2 * jnp.pi * sigma**2)


def leaf_log_joint(edrm: EvolutionaryDRM, images: ArrayLike) -> Array:
    """``log p(path to leaf, I)`` for every leaf (Eq. 28).

    Args:
        images: ``(*image_shape)`` or ``(N, *image_shape)``.

    Returns:
        ``(N, n_L)`` (or ``(n_L,)`` for one image).
    """
    x, single = _flat(edrm, images)
    leaves = edrm.templates(edrm.levels).reshape(edrm.n_nodes[-1], -1)
    out = edrm.log_path_prior(edrm.levels)[None] + _gauss_log_lik(x, leaves, edrm.sigma)
    # Finite pixels whose best leaf is not finite overflowed the dtype: every
    # result read from these scores (marginals, MAP path) would be wrong.
    check_finite_log_z(jnp.max(out, axis=-1), x)
    return out[0] if single else out


def path_log_joint(edrm: EvolutionaryDRM, images: ArrayLike, path: ArrayLike) -> Array:
    """``log p(path, I)`` for paths ``(N, L + 1)`` / ``(L + 1,)``: ``(N,)`` / ``()``."""
    arr = edrm.path_array(path)
    scores = leaf_log_joint(edrm, images)
    return jnp.take_along_axis(scores, arr[..., -1:], axis=-1)[..., 0]


def path_posterior(
    edrm: EvolutionaryDRM, images: ArrayLike, semiring: Semiring = "sum"
) -> Posterior:
    """Exact max-sum / sum-product over the tree of categories, vectorised.

    The image factor depends only on the leaf, so one upward pass is exact:
    leaf scores ``log p(leaf path, I)`` reduced (logsumexp or max) over each node's
    contiguous block of descendant leaves give ``log p(node, I)`` (or its
    max-marginal); ``log Z`` is the reduction over all leaves; the joint MAP is the
    best leaf's path. The fast twin of ``infer(compile_model(edrm.model, ...))``.

    Args:
        images: ``(*image_shape)`` or ``(N, *image_shape)``.
        semiring: "sum" or "max".

    Returns:
        A :class:`~pgm_drm.inference.Posterior` with ``schedule="edrm-tree"``, site
        names of :attr:`EvolutionaryDRM.sites`, a leading ``(N,)`` for a batch.

    Example:
        >>> m = EvolutionaryDRM.default()
        >>> post = path_posterior(m, m.render([1, 4, 9]), "max")
        >>> [int(post.map[s]) for s in m.sites]
        [1, 4, 9]
    """
    t = resolve_temperature(semiring, None)
    scores = leaf_log_joint(edrm, images)
    single = scores.ndim == 1
    scores = jnp.atleast_2d(scores)
    n = scores.shape[0]
    log_z = reduce_t(scores, (1,), t)
    best = jnp.argmax(scores, axis=1)
    path = edrm.path_from_leaf(best)
    margs, maps = {}, {}
    for d, site in enumerate(edrm.sites):
        block = scores.reshape(n, edrm.n_nodes[d], edrm.n_nodes[-1] // edrm.n_nodes[d])
        margs[site] = reduce_t(block, (2,), t) - log_z[:, None]
        maps[site] = path[:, d]
    if single:
        margs = {k: v[0] for k, v in margs.items()}
        maps = {k: v[0] for k, v in maps.items()}
        log_z = log_z[0]
    return Posterior(margs, maps, log_z, t, "edrm-tree")


def exact_map_path(edrm: EvolutionaryDRM, images: ArrayLike) -> Array:
    """Joint MAP path ``argmax_{c, g} log p(c, g, I)`` (Eq. 30): ``(N, L + 1)``."""
    scores = leaf_log_joint(edrm, images)
    return edrm.path_from_leaf(jnp.argmax(scores, axis=-1))


def _child_filters(edrm: EvolutionaryDRM, depth: int) -> tuple[Array, Array]:
    """Filters of the nodes at ``depth`` (Eq. 31, the RM's Eq. 8 form).

    ``w = mu(node) / sigma^2`` (the node's *partial* template: root plus the
    mutations chosen so far, finer mutations left out) and
    ``b = -||mu(node)||^2 / (2 sigma^2) + log p(choice | parent)``.

    Returns:
        ``w`` ``(n_d, D)`` and ``b`` ``(n_d,)``.
    """
    mu = edrm.templates(depth).reshape(edrm.n_nodes[depth], -1)
    s2 = edrm.sigma**2
    if depth == 0:
        local = jnp.log(edrm.class_prior)
    else:
        local = jnp.log(edrm.child_priors[depth - 1]).reshape(-1)
    return mu / s2, -jnp.sum(mu**2, axis=1) / (2 * s2) + local


def greedy_path(
    edrm: EvolutionaryDRM, images: ArrayLike, root: RootRule = "compare"
) -> Array:
    """The coarse-to-fine decision tree of Eqs. 30-31: ``ChooseChild(Filter(I0))``.

    Decision rule. At node ``p`` (depth ``d``) the filter response of each child
    ``q`` is the template match of the RM (Eq. 8) against the *input image* ``I0``
    (never a transformed one), using the child's partial template
    ``mu(q) = mu(c_L) + alpha(g_L) + .. + alpha(g_q)`` - the posterior of the
    subtree under the approximation that all finer mutations are zero:
    ``<w_q | I0> + b_q = <mu(q) | I0> / sigma^2 - ||mu(q)||^2 / (2 sigma^2) +
    log p(q | p)``; ``ChooseChild`` is the argmax over the children (ties: the
    lowest id). Equivalently ``argmax_q log N(I0; mu(q), sigma^2) + log p(q | p)``.

    Root rule. ``"compare"`` follows Eq. 30 literally: descend greedily from every
    root class, then ``c_L* = argmax_c log p(c, g*(c), I0)`` (the full leaf
    scores). ``"choose"`` makes the root a decision node too (``c_L*`` by the root
    filters), so the whole procedure is a single decision tree.

    Args:
        images: ``(*image_shape)`` or ``(N, *image_shape)``.
        root: "compare" or "choose".

    Returns:
        Node ids ``(N, L + 1)`` (or ``(L + 1,)``) coarse to fine.

    Example:
        >>> m = EvolutionaryDRM.default()
        >>> [int(v) for v in greedy_path(m, m.render([0, 2, 5]))]
        [0, 2, 5]
    """
    if root not in ("compare", "choose"):
        raise ValueError(f"root must be 'compare' or 'choose', got {root!r}")
    x, single = _flat(edrm, images)
    n = x.shape[0]
    if root == "compare":
        node = jnp.broadcast_to(jnp.arange(edrm.n_classes), (n, edrm.n_classes))
    else:
        w, b = _child_filters(edrm, 0)
        node = jnp.argmax(x @ w.T + b, axis=1)[:, None]
    nodes = [node]
    for d, br in enumerate(edrm.branching):
        w, b = _child_filters(edrm, d + 1)
        resp = x @ w.T + b  # (N, n_{d+1}): every node's filter response
        children = node[..., None] * br + jnp.arange(br)  # (N, R, br)
        r = jnp.take_along_axis(
            resp, children.reshape(n, math.prod(children.shape[1:])), axis=1
        )
        choice = jnp.argmax(r.reshape(children.shape), axis=-1)
        node = node * br + choice
        nodes.append(node)
    paths = jnp.stack(nodes, axis=-1)  # (N, R, L + 1)
    if root == "compare":
        scores = jnp.take_along_axis(
            jnp.atleast_2d(leaf_log_joint(edrm, x.reshape(n, *edrm.image_shape))),
            node,
            axis=1,
        )
        pick = jnp.argmax(scores, axis=1)
        paths = paths[jnp.arange(n), pick]
    else:
        paths = paths[:, 0]
    return paths[0] if single else paths


def greedy_path_naive(
    edrm: EvolutionaryDRM, image: ArrayLike, root: RootRule = "compare"
) -> list[int]:
    """Loop twin of :func:`greedy_path` for one image (plain numpy, no batching)."""
    x = np.asarray(check_images(image, edrm.image_shape)[0][0], dtype=float).ravel()
    s2 = edrm.sigma**2

    def response(depth: int, node: int) -> float:
        mu = np.asarray(edrm.templates(depth)[node], dtype=float).ravel()
        if depth == 0:
            lp = np.log(float(edrm.class_prior[node]))
        else:
            br = edrm.branching[depth - 1]
            lp = np.log(float(edrm.child_priors[depth - 1][node // br, node % br]))
        return float(x @ mu / s2 - mu @ mu / (2 * s2) + lp)

    def descend(c: int) -> list[int]:
        path = [c]
        for d, br in enumerate(edrm.branching):
            kids = [path[-1] * br + j for j in range(br)]
            path.append(max(kids, key=lambda q, d=d: (response(d + 1, q), -q)))
        return path

    if root == "choose":
        c = max(range(edrm.n_classes), key=lambda q: (response(0, q), -q))
        return descend(c)
    paths = [descend(c) for c in range(edrm.n_classes)]
    leaves = np.asarray(leaf_log_joint(edrm, x.reshape(edrm.image_shape)))
    return paths[int(np.argmax([leaves[p[-1]] for p in paths]))]


def coarse_to_fine_margin(edrm: EvolutionaryDRM) -> float:
    """Smallest noise-free margin of the greedy descent below the root.

    For every leaf ``k`` with noise-free image ``I = mu(k)`` and every depth, the
    greedy rule compares the true node ``q`` with each sibling ``s`` by
    ``||I - mu(s)||^2 - ||I - mu(q)||^2`` (priors vanish as ``sigma -> 0``).
    Writing ``Delta = mu(q) - mu(s)`` and ``r = I - mu(q)`` (the finer mutations
    still to come) this is ``||Delta||^2 + 2 <Delta | r>``: positive for all leaves
    and depths iff greedy (root rule "compare") recovers every leaf in the
    noise-free limit. It can be negative: a finer mutation may point back toward
    a sibling's template, which is when Eq. 30's exchange of max and argmax fails.

    Returns:
        The minimum margin (``inf`` when no node has siblings).
    """
    leaves = np.asarray(edrm.templates(edrm.levels)).reshape(edrm.n_nodes[-1], -1)
    path = np.asarray(edrm.path_from_leaf(np.arange(edrm.n_nodes[-1])))
    best = np.inf
    for d, br in enumerate(edrm.branching):
        mu = np.asarray(edrm.templates(d + 1)).reshape(edrm.n_nodes[d + 1], -1)
        q = path[:, d + 1]
        sib = (q // br)[:, None] * br + np.arange(br)
        dist_true = np.sum((leaves - mu[q]) ** 2, axis=1)
        dist_sib = np.sum((leaves[:, None] - mu[sib]) ** 2, axis=2)
        margin = dist_sib - dist_true[:, None]
        margin[sib == q[:, None]] = np.inf
        best = min(best, float(margin.min()))
    return best


# ---------------------------------------------------------------------- study
