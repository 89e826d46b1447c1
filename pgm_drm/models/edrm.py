"""The Evolutionary Deep Rendering Model (E-DRM), paper §4, Eqs. 28-31.

A root class template ``mu(c_L)`` is mutated level by level down a tree of
categories: at each level the current node chooses one of its children and the
child adds its mutation ``alpha`` (Eq. 29, ``mu(c_l) = mu(c_{l+1}) + alpha(g_{l+1})``),
and the leaf template gets Gaussian pixel noise (Eq. 28).

Node numbering. Depth ``d = 0`` holds the ``C`` root classes; a node ``p`` at depth
``d`` has ``b_{d+1}`` children with ids ``p * b_{d+1} + j`` (``j`` = the local choice),
so depth ``d`` has ``n_d = C * b_1 * ... * b_d`` nodes and every subtree is a
contiguous block of ids. The paper's level of depth ``d >= 1`` is ``l = L - d + 1``
(``L`` = number of mutation levels): depth 1 is ``g_L``, the leaves are ``g_1``.

NumPyro sites. ``"c"`` (the root class ``c_L``) and ``"g{l}"`` for ``l = L..1``.
The value of ``g{l}`` is the *node id* reached at that level, i.e. the partial path
``c_{l-1} = (c_L, g_L, .., g_l)`` of Eq. 29 (its local choice is ``id % b``); its
``Categorical`` probabilities are the parent's row of a block transition matrix
(``Vindex(T)[parent]``, zero outside the parent's children), and the image mean is
the leaf's template. So the compiler and NumPyro's enumeration see a *chain*
``c -> g_L -> .. -> g_1 -> image`` (a tree schedule), and exact inference is one
upward pass over the tree of categories.

Inference here: :func:`path_posterior` (exact max-sum / sum-product over the tree,
a vectorised twin of ``compile_model`` + ``infer``), :func:`greedy_path` (the
coarse-to-fine ``ChooseChild(Filter(I0))`` decision tree of Eq. 31, with a loop twin
:func:`greedy_path_naive`), and :func:`greedy_vs_exact_study`, which measures how
often the two agree as the pixel noise grows.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive
from numpyro.ops.indexing import Vindex

from pgm_drm._typing import Array, ArrayLike, PRNGKey, Semiring
from pgm_drm.inference.api import Posterior, resolve_temperature
from pgm_drm.inference.kernel import reduce_t
from pgm_drm.models.validation import check_images, check_prior

__all__ = [
    "EvolutionaryDRM",
    "GreedyStudyRow",
    "coarse_to_fine_margin",
    "exact_map_path",
    "greedy_path",
    "greedy_path_naive",
    "greedy_vs_exact_study",
    "leaf_log_joint",
    "path_log_joint",
    "path_posterior",
    "plot_greedy_vs_exact",
]

RootRule = Literal["compare", "choose"]

_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _np_rng(key: PRNGKey) -> np.random.Generator:
    """A numpy generator seeded by a JAX key (for draws jax would compile slowly)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


@dataclass(frozen=True, eq=False)
class EvolutionaryDRM:
    """Gaussian E-DRM: a tree of categories with additive mutations (Eqs. 28-29).

    ``c ~ Cat(class_prior)``; at depth ``d = 1..L`` the current node ``p`` picks its
    child ``j ~ Cat(child_priors[d-1][p])``; the template is
    ``mu = root[c] + mutations[0][c, j_1] + mutations[1][p_1, j_2] + ...`` and
    ``image ~ N(mu, sigma^2 I)``.

    Args:
        root: Root class templates ``mu(c_L)``, shape ``(C, *image_shape)``.
        mutations: Coarse-to-fine tuple; entry ``d`` has shape
            ``(n_d, b_{d+1}, *image_shape)``: the mutation ``alpha`` of child ``j`` of
            node ``p`` at depth ``d``. Empty: the model is a plain mixture of the roots.
        sigma: Pixel noise standard deviation (> 0).
        class_prior: ``(C,)`` probabilities; uniform when ``None``.
        child_priors: Tuple of ``(n_d, b_{d+1})`` row-stochastic matrices, one per
            mutation level; uniform when ``None``.

    Example:
        >>> import jax
        >>> m = EvolutionaryDRM.default()
        >>> images, path = m.sample_fast(jax.random.PRNGKey(0), 3)
        >>> images.shape, path.shape, m.sites, m.branching, m.n_nodes
        ((3, 8, 8), (3, 3), ('c', 'g2', 'g1'), (3, 2), (2, 6, 12))
    """

    root: ArrayLike
    mutations: tuple[ArrayLike, ...] = ()
    sigma: float = 1.0
    class_prior: ArrayLike | None = None
    child_priors: tuple[ArrayLike, ...] | None = None

    def __post_init__(self) -> None:
        root = jnp.asarray(self.root, dtype=float)
        if root.ndim < 2:
            raise ValueError(
                f"root must have shape (C, *image_shape), got {root.shape}"
            )
        if not bool(jnp.all(jnp.isfinite(root))):
            raise ValueError("root contains NaN or inf values")
        image_shape = tuple(root.shape[1:])
        n = int(root.shape[0])
        muts, priors = [], []
        raw_priors = self.child_priors
        if raw_priors is not None and len(raw_priors) != len(self.mutations):
            raise ValueError(
                f"child_priors has {len(raw_priors)} levels, mutations has "
                f"{len(self.mutations)}"
            )
        for d, a in enumerate(self.mutations):
            a = jnp.asarray(a, dtype=float)
            if a.ndim != 2 + len(image_shape) or a.shape[0] != n:
                raise ValueError(
                    f"mutations[{d}] must have shape (n_{d}={n}, b, *{image_shape}), "
                    f"got {a.shape}"
                )
            if tuple(a.shape[2:]) != image_shape or a.shape[1] < 1:
                raise ValueError(
                    f"mutations[{d}] must have shape (n_{d}={n}, b, *{image_shape}), "
                    f"got {a.shape}"
                )
            if not bool(jnp.all(jnp.isfinite(a))):
                raise ValueError(f"mutations[{d}] contains NaN or inf values")
            b = int(a.shape[1])
            if raw_priors is None:
                p = np.full((n, b), 1.0 / b)
            else:
                p = np.asarray(raw_priors[d], dtype=float)
                if p.shape != (n, b):
                    raise ValueError(
                        f"child_priors[{d}] must have shape {(n, b)}, got {p.shape}"
                    )
                for row in range(n):
                    check_prior(p[row], f"child_priors[{d}][{row}]", b)
            muts.append(a)
            priors.append(jnp.asarray(p))
            n *= b
        sigma = float(self.sigma)
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        c = int(root.shape[0])
        pc = np.full(c, 1.0 / c) if self.class_prior is None else self.class_prior
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "mutations", tuple(muts))
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "class_prior", check_prior(pc, "class_prior", c))
        object.__setattr__(self, "child_priors", tuple(priors))
        # Derived, not fields (save_model stores only the fields above).
        templates, log_prior, transitions = [root], [jnp.log(self.class_prior)], []
        for a, p in zip(muts, priors, strict=True):
            nd, b = p.shape
            templates.append((templates[-1][:, None] + a).reshape(nd * b, *image_shape))
            log_prior.append((log_prior[-1][:, None] + jnp.log(p)).reshape(nd * b))
            t = jnp.zeros((nd, nd, b)).at[jnp.arange(nd), jnp.arange(nd)].set(p)
            transitions.append(t.reshape(nd, nd * b))
        object.__setattr__(self, "_templates", tuple(templates))
        object.__setattr__(self, "_log_prior", tuple(log_prior))
        object.__setattr__(self, "_transitions", tuple(transitions))

    # ------------------------------------------------------------------ shapes
    @property
    def n_classes(self) -> int:
        """Number of root classes ``C = |C_L|``."""
        return int(self.root.shape[0])

    @property
    def levels(self) -> int:
        """Number of mutation levels ``L``."""
        return len(self.mutations)

    @property
    def branching(self) -> tuple[int, ...]:
        """Children per node at each mutation level, coarse to fine."""
        return tuple(int(a.shape[1]) for a in self.mutations)

    @property
    def n_nodes(self) -> tuple[int, ...]:
        """Nodes per depth ``(n_0 = C, n_1, .., n_L)``."""
        return tuple(int(t.shape[0]) for t in self._templates)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.root.shape[1:])

    @property
    def sites(self) -> tuple[str, ...]:
        """Latent site names coarse to fine: ``("c", "g{L}", .., "g1")``."""
        return ("c",) + tuple(f"g{self.levels - d}" for d in range(self.levels))

    def templates(self, depth: int) -> Array:
        """Partial templates ``mu(c_l)`` at ``depth``: ``(n_d, *image)``."""
        return self._templates[depth]

    def log_path_prior(self, depth: int) -> Array:
        """``log p(path to node)`` for every node at ``depth``: ``(n_d,)``."""
        return self._log_prior[depth]

    # ------------------------------------------------------------------ model
    def model(self, image: ArrayLike | None = None) -> None:
        """The NumPyro model (Eqs. 28-29): sites ``c``, ``g{L}``..``g1``, ``image``."""
        node = numpyro.sample("c", dist.Categorical(self.class_prior))
        for d, t in enumerate(self._transitions):
            probs = Vindex(t)[node]
            node = numpyro.sample(f"g{self.levels - d}", dist.Categorical(probs))
        mean = Vindex(self._templates[-1])[node]
        numpyro.sample(
            "image",
            dist.Normal(mean, self.sigma).to_event(len(self.image_shape)),
            obs=image,
        )

    def sample(self, key: PRNGKey, n: int) -> tuple[Array, dict[str, Array]]:
        """Draw ``n`` images and their evolutionary paths.

        NumPyro's ``Predictive`` over :meth:`model`, jitted once per model and ``n``.

        Returns:
            ``images`` ``(n, *image_shape)`` and ``path``: site -> node ids ``(n,)``
            (``"c"``, ``"g{L}"``, .., ``"g1"``); :meth:`path_array` stacks them.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        cache = _SAMPLERS.setdefault(self, {})
        if int(n) not in cache:
            cache[int(n)] = jax.jit(partial(self._sample, int(n)))
        images, draws = cache[int(n)](key)
        return images, {s: draws[s] for s in self.sites}  # jit sorts dict keys

    def sample_fast(self, key: PRNGKey, n: int) -> tuple[Array, Array]:
        """Ancestral sampling without NumPyro (no compile): the leaf is drawn from its
        path prior ``prod p(choice | parent)`` (the same law as :meth:`sample`).

        Returns:
            ``images`` ``(n, *image_shape)`` and node ids ``(n, L + 1)``.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rng = _np_rng(key)
        p = np.exp(np.asarray(self.log_path_prior(self.levels), dtype=np.float64))
        leaf = rng.choice(p.shape[0], size=int(n), p=p / p.sum())
        path = self.path_from_leaf(leaf)
        noise = rng.normal(size=(int(n),) + self.image_shape)
        return self._templates[-1][leaf] + self.sigma * noise, path

    def _sample(self, n: int, key: PRNGKey) -> tuple[Array, dict[str, Array]]:
        draws = Predictive(self.model, num_samples=n)(key)
        images = draws.pop("image")
        return images, {s: draws[s] for s in self.sites}

    # ------------------------------------------------------------------ paths
    def path_array(self, path: Mapping[str, ArrayLike] | ArrayLike) -> Array:
        """A path as node ids ``(..., L + 1)`` coarse to fine, checked.

        Args:
            path: A site dict (as :meth:`sample` returns) or an int array
                ``(..., L + 1)`` of node ids.

        Raises:
            ValueError: Wrong length, ids out of range, or a node that is not a
                child of the previous one.
        """
        if isinstance(path, Mapping):
            missing = [s for s in self.sites if s not in path]
            if missing:
                raise ValueError(f"path is missing sites {missing}")
            arr = np.stack([np.asarray(path[s]) for s in self.sites], axis=-1)
        else:
            arr = np.asarray(path)
        if arr.ndim < 1 or arr.shape[-1] != self.levels + 1:
            raise ValueError(
                f"path must have a last axis of length L + 1 = {self.levels + 1} "
                f"(node ids {self.sites}), got shape {arr.shape}"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"path must hold integer node ids, got {arr.dtype}")
        for d, nd in enumerate(self.n_nodes):
            if np.any((arr[..., d] < 0) | (arr[..., d] >= nd)):
                raise ValueError(f"path ids at depth {d} must lie in [0, {nd})")
        for d, b in enumerate(self.branching):
            if np.any(arr[..., d + 1] // b != arr[..., d]):
                raise ValueError(
                    f"path is not a path of the tree: the node at depth {d + 1} is "
                    "not a child of the node at depth {d}"
                )
        return jnp.asarray(arr)

    def path_from_leaf(self, leaf: ArrayLike) -> Array:
        """Node ids ``(..., L + 1)`` of the path ending at leaf ids ``(...)``."""
        node = np.asarray(leaf)
        out = [node]
        for b in reversed(self.branching):
            node = node // b
            out.append(node)
        return jnp.asarray(np.stack(out[::-1], axis=-1))

    def render(self, path: Mapping[str, ArrayLike] | ArrayLike) -> Array:
        """``mu(c_L, g) = mu(c_L) + alpha(g_L) + .. + alpha(g_1)`` (Eq. 28).

        Args:
            path: Node ids ``(..., L + 1)`` or a site dict (see :meth:`path_array`).

        Returns:
            Templates of shape ``(..., *image_shape)``.
        """
        arr = self.path_array(path)
        return self._templates[-1][arr[..., -1]]

    # ------------------------------------------------------------------ misc
    def replace(self, **changes: Any) -> EvolutionaryDRM:
        """A copy with some parameters replaced (validated again)."""
        fields = {
            "root": self.root,
            "mutations": self.mutations,
            "sigma": self.sigma,
            "class_prior": self.class_prior,
            "child_priors": self.child_priors,
        }
        return EvolutionaryDRM(**{**fields, **changes})

    @classmethod
    def random(
        cls,
        key: PRNGKey,
        n_classes: int = 2,
        branching: Sequence[int] = (2, 2),
        image_shape: Sequence[int] = (4, 4),
        sigma: float = 0.5,
        scale: float = 1.0,
        decay: float = 0.5,
    ) -> EvolutionaryDRM:
        """A random E-DRM: ``N(0, scale^2)`` roots, depth-``d`` mutations
        ``N(0, (scale * decay^d)^2)``, Dirichlet(1) class and child priors.

        Example:
            >>> m = EvolutionaryDRM.random(jax.random.PRNGKey(1), 3, (2,), (2, 2))
            >>> m.n_nodes, m.image_shape
            ((3, 6), (2, 2))
        """
        shape = tuple(int(s) for s in image_shape)
        # numpy draws seeded by the key: jax's Dirichlet sampler takes seconds to
        # compile, numpy's is instant.
        rng = _np_rng(key)
        n = int(n_classes)
        root = scale * rng.normal(size=(n,) + shape)
        prior = rng.dirichlet(np.ones(n))
        muts, priors = [], []
        for d, b in enumerate(branching):
            sd = scale * decay ** (d + 1)
            muts.append(sd * rng.normal(size=(n, int(b)) + shape))
            priors.append(rng.dirichlet(np.ones(int(b)), size=n))
            n *= int(b)
        return cls(root, tuple(muts), sigma, prior, tuple(priors))

    @classmethod
    def default(cls, size: int = 8, sigma: float = 0.15) -> EvolutionaryDRM:
        """A small tree worth looking at: 2 roots -> 3 coarse -> 2 fine (12 leaves).

        Roots: a centred blob and a frame. Coarse mutations (shared by both roots,
        as in the paper: the mutation does not depend on the parent): a horizontal
        bar, a vertical bar, a diagonal. Fine mutations: a dot top-left or
        bottom-right. Pixel values stay within about ``[0, 1.6]``.
        """
        s = int(size)
        if s < 6:
            raise ValueError(f"size must be >= 6, got {size}")
        yy, xx = np.mgrid[:s, :s] - (s - 1) / 2
        blob = 0.8 * np.exp(-(yy**2 + xx**2) / (2 * (s / 5) ** 2))
        frame = np.zeros((s, s))
        frame[[0, -1], :] = frame[:, [0, -1]] = 0.6
        root = np.stack([blob, frame])
        coarse = np.zeros((3, s, s))
        coarse[0, s // 2, 1:-1] = 0.6
        coarse[1, 1:-1, s // 2] = 0.6
        coarse[2, np.arange(1, s - 1), np.arange(1, s - 1)] = 0.6
        fine = np.zeros((2, s, s))
        fine[0, 1:3, 1:3] = 0.5
        fine[1, -3:-1, -3:-1] = 0.5
        muts = (
            np.broadcast_to(coarse, (2, 3, s, s)),
            np.broadcast_to(fine, (6, 2, s, s)),
        )
        return cls(root, muts, sigma)


# ---------------------------------------------------------------------- inference
def _flat(edrm: EvolutionaryDRM, images: ArrayLike) -> tuple[Array, bool]:
    x, single = check_images(images, edrm.image_shape)
    return x.reshape(x.shape[0], -1), single


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
        block = scores.reshape(n, edrm.n_nodes[d], -1)
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
        r = jnp.take_along_axis(resp, children.reshape(n, -1), axis=1)
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
class GreedyStudyRow(NamedTuple):
    """Agreement of the greedy decision tree (Eq. 31) with the exact MAP (Eq. 30).

    Attributes:
        sigma: Pixel noise standard deviation.
        path_agreement: Fraction of images whose greedy path equals the MAP path.
        class_agreement: Fraction with the same root class ``c_L``.
        truth_map: Fraction whose MAP path is the path that generated the image.
        truth_greedy: Same for the greedy path.
        mean_gap: Mean ``log p(MAP path, I) - log p(greedy path, I)`` (>= 0).
        n_images: Images per row (pooled over models).
    """

    sigma: float
    path_agreement: float
    class_agreement: float
    truth_map: float
    truth_greedy: float
    mean_gap: float
    n_images: int


def greedy_vs_exact_study(
    key: PRNGKey,
    sigmas: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0),
    models: Sequence[EvolutionaryDRM] | None = None,
    n_models: int = 4,
    n_images: int = 500,
    root: RootRule = "compare",
) -> list[GreedyStudyRow]:
    """How often the greedy path (Eq. 31) equals the exact MAP path (Eq. 30).

    For each model: sample ``n_images`` paths, render them with pixel noise of
    every ``sigma`` (the same noise draw scaled), decode by :func:`greedy_path`
    and :func:`exact_map_path`, pool the counts over models.

    Args:
        key: PRNG key for the models and the images.
        sigmas: Noise levels.
        models: E-DRMs to study (their ``sigma`` is replaced); default:
            :meth:`EvolutionaryDRM.default` plus ``n_models - 1`` random 8x8
            models with 2 roots, branching (3, 2), mutation decay 0.5.
        n_models: See ``models``.
        n_images: Images per model and noise level.
        root: Root rule of :func:`greedy_path`.

    Returns:
        One :class:`GreedyStudyRow` per ``sigma``.

    Example:
        >>> rows = greedy_vs_exact_study(jax.random.PRNGKey(0), (0.01,), n_models=1,
        ...                              n_images=20)
        >>> float(rows[0].path_agreement)
        1.0
    """
    key, sub = jax.random.split(key)
    if models is None:
        ks = jax.random.split(sub, max(int(n_models) - 1, 1))
        models = [EvolutionaryDRM.default()] + [
            EvolutionaryDRM.random(k, 2, (3, 2), (8, 8), scale=0.6, decay=0.5)
            for k in ks[: int(n_models) - 1]
        ]
    sigmas = [float(s) for s in sigmas]
    counts = np.zeros((len(sigmas), 6))
    for m in models:
        # Draw the paths once, then render them at every noise level (the same
        # distribution as m.replace(sigma=s).sample at each s).
        key, sub = jax.random.split(key)
        _, truth = m.sample_fast(sub, int(n_images))
        clean = m.render(truth)
        key, sub = jax.random.split(key)
        noise = jnp.asarray(_np_rng(sub).normal(size=clean.shape))
        for i, s in enumerate(sigmas):
            ms = m.replace(sigma=s)
            images = clean + s * noise
            g = greedy_path(ms, images, root)
            e = exact_map_path(ms, images)
            gap = path_log_joint(ms, images, e) - path_log_joint(ms, images, g)
            counts[i] += [
                float(jnp.sum(jnp.all(g == e, axis=1))),
                float(jnp.sum(g[:, 0] == e[:, 0])),
                float(jnp.sum(jnp.all(e == truth, axis=1))),
                float(jnp.sum(jnp.all(g == truth, axis=1))),
                float(jnp.sum(gap)),
                images.shape[0],
            ]
    rows = []
    for s, c in zip(sigmas, counts, strict=True):
        rows.append(GreedyStudyRow(s, *(c[:5] / c[5]), int(c[5])))
    return rows


def plot_greedy_vs_exact(rows: Sequence[GreedyStudyRow], ax: Any = None) -> Any:
    """Agreement curves of :func:`greedy_vs_exact_study` against ``sigma``.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    s = [r.sigma for r in rows]
    ax.plot(s, [r.path_agreement for r in rows], "o-", label="greedy = MAP (path)")
    ax.plot(s, [r.class_agreement for r in rows], "s--", label="greedy = MAP (c_L)")
    ax.plot(s, [r.truth_map for r in rows], "^:", label="MAP = true path")
    ax.plot(s, [r.truth_greedy for r in rows], "v:", label="greedy = true path")
    ax.set_xscale("log")
    ax.set_xlabel("pixel noise sigma")
    ax.set_ylabel("fraction of images")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("E-DRM: greedy decision tree (Eq. 31) vs exact MAP (Eq. 30)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
