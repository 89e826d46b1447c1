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

Inference on it lives in :mod:`pgm_drm.inference.edrm` (exact ``path_posterior``,
the greedy decision tree ``greedy_path`` of Eq. 31); the greedy-vs-exact study in
:mod:`pgm_drm.experiments.studies`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive
from numpyro.ops.indexing import Vindex

from pgm_drm._random import np_rng
from pgm_drm._typing import Array, ArrayLike, PRNGKey
from pgm_drm.models.pytree import pytree_model
from pgm_drm.models.validation import check_prior

__all__ = ["EvolutionaryDRM", "RootRule"]

RootRule = Literal["compare", "choose"]


def _check_child_prior(p: ArrayLike, depth: int, n: int, b: int) -> Array:
    """``child_priors[depth]``: ``(n, b)``, every row a probability vector.

    Returned with each row renormalised by :func:`check_prior` (a row summing to
    1 within its tolerance would otherwise leave the path priors unnormalised).
    """
    arr = np.asarray(p, dtype=float)
    if arr.shape != (n, b):
        raise ValueError(
            f"child_priors[{depth}] must have shape {(n, b)}, got {arr.shape}"
        )
    rows = [check_prior(r, f"child_priors[{depth}][{i}]", b) for i, r in enumerate(arr)]
    return jnp.asarray(jnp.stack(rows) if rows else arr, dtype=float)


@pytree_model()
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

    A JAX pytree whose leaves are all the fields (the tree's shape is in the
    leaves' shapes); the derived templates and path priors are computed from them
    on first use, so a model rebuilt by ``jit`` (unflattened, not re-validated)
    has them too.

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
                p = jnp.asarray(np.full((n, b), 1.0 / b))
            else:
                p = _check_child_prior(raw_priors[d], d, n, b)
            muts.append(a)
            priors.append(p)
            n *= b
        sigma = float(self.sigma)
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        c = int(root.shape[0])
        pc = np.full(c, 1.0 / c) if self.class_prior is None else self.class_prior
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "mutations", tuple(muts))
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(
            self, "class_prior", jnp.asarray(check_prior(pc, "class_prior", c), float)
        )
        object.__setattr__(self, "child_priors", tuple(priors))

    def _derived(self) -> tuple[tuple[Array, ...], ...]:
        """Templates, log path priors and block transition matrices per depth,
        computed from the fields once per object (not fields: ``save_model`` and
        the pytree store only the fields)."""
        cached = self.__dict__.get("_derived_cache")
        if cached is not None:
            return cached
        shape = self.image_shape
        templates, log_prior = [self.root], [jnp.log(self.class_prior)]
        transitions = []
        for a, p in zip(self.mutations, self.child_priors, strict=True):
            nd, b = p.shape
            templates.append((templates[-1][:, None] + a).reshape(nd * b, *shape))
            log_prior.append((log_prior[-1][:, None] + jnp.log(p)).reshape(nd * b))
            t = jnp.zeros((nd, nd, b)).at[jnp.arange(nd), jnp.arange(nd)].set(p)
            transitions.append(t.reshape(nd, nd * b))
        cached = (tuple(templates), tuple(log_prior), tuple(transitions))
        object.__setattr__(self, "_derived_cache", cached)
        return cached

    @property
    def _templates(self) -> tuple[Array, ...]:
        return self._derived()[0]

    @property
    def _log_prior(self) -> tuple[Array, ...]:
        return self._derived()[1]

    @property
    def _transitions(self) -> tuple[Array, ...]:
        return self._derived()[2]

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
        n = [self.n_classes]
        for b in self.branching:
            n.append(n[-1] * b)
        return tuple(n)

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

        NumPyro's ``Predictive`` over :meth:`model`, jitted once per tree shape and
        ``n`` (the model is traced).

        Returns:
            ``images`` ``(n, *image_shape)`` and ``path``: site -> node ids ``(n,)``
            (``"c"``, ``"g{L}"``, .., ``"g1"``); :meth:`path_array` stacks them.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        images, draws = _sample(self, int(n), key)
        return images, {s: draws[s] for s in self.sites}  # jit sorts dict keys

    def sample_fast(self, key: PRNGKey, n: int) -> tuple[Array, Array]:
        """Ancestral sampling without NumPyro (no compile): the leaf is drawn from its
        path prior ``prod p(choice | parent)`` (the same law as :meth:`sample`).

        Returns:
            ``images`` ``(n, *image_shape)`` and node ids ``(n, L + 1)``.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rng = np_rng(key)
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
        rng = np_rng(key)
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


@partial(jax.jit, static_argnums=(1,))
def _sample(edrm: EvolutionaryDRM, n: int, key: PRNGKey):
    """:meth:`EvolutionaryDRM.sample`, compiled once per tree shape and ``n``."""
    return edrm._sample(n, key)
