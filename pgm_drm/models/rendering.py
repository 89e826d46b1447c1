"""The (Gaussian) Rendering Model, paper §2.1-2.2, Eqs. 3-9."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive
from numpyro.ops.indexing import Vindex

from pgm_drm._typing import Array, ArrayLike, PRNGKey, Semiring
from pgm_drm.models.pytree import pytree_model
from pgm_drm.models.validation import check_images, check_prior, check_probability
from pgm_drm.semiring import reduce_t, resolve_temperature

__all__ = ["RenderingModel", "default_templates"]


@pytree_model()
@dataclass(frozen=True, eq=False)
class RenderingModel:
    """Gaussian Rendering Model with an optional ON/OFF switch (Eqs. 3-4, 9).

    ``c ~ Cat(class_prior)``, ``g ~ Cat(nuisance_prior)``,
    ``a ~ Bernoulli(switch_prior)`` (omitted when ``switch_prior is None``),
    ``image ~ N(a * templates[c, g], sigma^2 I)``.

    Args:
        templates: Rendered templates ``mu_cg = R(c, g)``, shape
            ``(C, G, *image_shape)``.
        sigma: Pixel noise standard deviation (> 0).
        class_prior: ``(C,)`` probabilities; uniform when ``None``.
        nuisance_prior: ``(G,)`` probabilities; uniform when ``None``.
        switch_prior: Probability that the renderer is ON, or ``None`` for no switch.

    A JAX pytree (:func:`~pgm_drm.models.pytree.pytree_model`): every field is a
    parameter leaf, so the model is an ordinary argument of ``jax.jit`` and a new
    parameter value of the same shapes reuses the compiled program. The structure
    is the shapes and whether there is a switch (``switch_prior=None`` is an empty
    subtree). Validation runs when a model is built (``__post_init__``), never on
    the tracers of ``jit`` or ``grad``; ``sigma`` and ``switch_prior`` stay Python
    floats (weakly typed leaves), so every built or fitted model of one shape
    shares a program.

    Example:
        >>> import jax
        >>> rm = RenderingModel(default_templates(), sigma=0.5, switch_prior=0.9)
        >>> images, latents = rm.sample(jax.random.PRNGKey(0), 4)
        >>> images.shape, sorted(latents)
        ((4, 6, 6), ['a', 'c', 'g'])
    """

    templates: ArrayLike
    sigma: float = 1.0
    class_prior: ArrayLike | None = None
    nuisance_prior: ArrayLike | None = None
    switch_prior: float | None = None

    def __post_init__(self) -> None:
        mu = jnp.asarray(self.templates)
        if jnp.issubdtype(mu.dtype, jnp.integer) or jnp.issubdtype(mu.dtype, jnp.bool_):
            # bool / int templates (e.g. uint8 prototype images): as the factor
            # model, float, or ||mu||^2 and 2 <I | mu> wrap around in the int dtype
            mu = mu.astype(jnp.result_type(float))
        if mu.ndim < 3:
            raise ValueError(
                f"templates must have shape (C, G, *image_shape), got {mu.shape}"
            )
        if not bool(jnp.all(jnp.isfinite(mu))):
            raise ValueError("templates contain NaN or inf values")
        c, g = mu.shape[:2]
        sigma = float(self.sigma)
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        pc = np.full(c, 1.0 / c) if self.class_prior is None else self.class_prior
        pg = np.full(g, 1.0 / g) if self.nuisance_prior is None else self.nuisance_prior
        object.__setattr__(self, "templates", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "class_prior", check_prior(pc, "class_prior", c))
        object.__setattr__(self, "nuisance_prior", check_prior(pg, "nuisance_prior", g))
        if self.switch_prior is not None:
            check_probability(self.switch_prior, "switch_prior")
            object.__setattr__(self, "switch_prior", float(self.switch_prior))

    @property
    def n_classes(self) -> int:
        return int(self.templates.shape[0])

    @property
    def n_nuisances(self) -> int:
        return int(self.templates.shape[1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.templates.shape[2:])

    def model(self, image: ArrayLike | None = None) -> None:
        """The NumPyro model (Eqs. 3-4; the switch of §2.2 / Eq. 9).

        Sites: ``c``, ``g``, ``a`` (if switched) and ``image`` (Normal, event over
        all pixels).
        """
        c = numpyro.sample("c", dist.Categorical(self.class_prior))
        g = numpyro.sample("g", dist.Categorical(self.nuisance_prior))
        mean = Vindex(self.templates)[c, g]
        if self.switch_prior is not None:
            a = numpyro.sample("a", dist.Bernoulli(self.switch_prior))
            mean = jnp.expand_dims(a, tuple(range(-len(self.image_shape), 0))) * mean
        numpyro.sample(
            "image",
            dist.Normal(mean, self.sigma).to_event(len(self.image_shape)),
            obs=image,
        )

    def sample(self, key: PRNGKey, n: int) -> tuple[Array, dict[str, Array]]:
        """Draw ``n`` images with their latents from the model itself.

        Returns:
            ``images`` of shape ``(n, *image_shape)`` and ``latents``
            (``"c"``, ``"g"``, ``"a"`` if switched), each of shape ``(n,)``.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        draws = Predictive(self.model, num_samples=int(n))(key)
        images = draws.pop("image")
        return images, draws

    def natural_parameters(self) -> tuple[Array, Array]:
        """Natural parameters of Eq. 8 (with the sign of ``||mu||^2`` corrected).

        ``w_cg = mu_cg / sigma^2`` and
        ``b_cg = -||mu_cg||^2 / (2 sigma^2) + ln pi_c + ln pi_g`` (+ ``ln pi_a`` of
        the ON state when the model is switched).

        Returns:
            ``w`` of shape ``(C, G, *image_shape)`` and ``b`` of shape ``(C, G)``.
        """
        s2 = self.sigma**2
        w = self.templates / s2
        axes = tuple(range(2, self.templates.ndim))
        b = (
            -jnp.sum(self.templates**2, axis=axes) / (2 * s2)
            + jnp.log(self.class_prior)[:, None]
            + jnp.log(self.nuisance_prior)[None, :]
        )
        if self.switch_prior is not None:
            b = b + jnp.log(self.switch_prior)
        return w, b

    def class_log_scores(self, images: ArrayLike, semiring: Semiring = "max") -> Array:
        """Class scores of the MS-RMC / SP-RMC (Eqs. 5-7, 9).

        An affine template match ``<w_cg | I> + b_cg``; with the switch, the max
        over ``a`` is a ReLU against the OFF branch (Eq. 9) and the sum a softplus;
        then max (MS-RMC, Eq. 6) or logsumexp (SP-RMC, Eq. 5) over ``g``.
        Up to a per-image constant (``-||I||^2 / 2 sigma^2`` and the Gaussian
        normaliser), the scores are ``max_{g,a} log p(c, g, a, I)`` (max) or
        ``log p(c, I)`` (sum).

        Args:
            images: ``(*image_shape)`` or ``(N, *image_shape)``.
            semiring: "max" (MS-RMC) or "sum" (SP-RMC).

        Returns:
            Scores of shape ``(N, C)`` (or ``(C,)`` for one image).
        """
        t = resolve_temperature(semiring, None)
        x, single = check_images(images, self.image_shape, dtype=self.templates.dtype)
        scores = _class_log_scores(self, x, t)
        return scores[0] if single else scores

    def classify(self, images: ArrayLike, semiring: Semiring = "max") -> Array:
        """MS-RMC (Eq. 6) or SP-RMC (Eq. 5) class decisions, shape ``(N,)``/``()``."""
        return jnp.argmax(self.class_log_scores(images, semiring), axis=-1)

    def replace(self, **changes: Any) -> RenderingModel:
        """A copy with some parameters replaced (validated again; learning loops
        use :func:`pgm_drm.models.pytree.replace`, which skips the checks)."""
        fields = {
            "templates": self.templates,
            "sigma": self.sigma,
            "class_prior": self.class_prior,
            "nuisance_prior": self.nuisance_prior,
            "switch_prior": self.switch_prior,
        }
        return RenderingModel(**{**fields, **changes})


def default_templates(size: int = 6) -> Array:
    """Three stroke classes (bar, cross, corner), each at four translations.

    Returns:
        Array of shape ``(3, 4, size, size)`` with values in ``[0, 1]``.
    """
    k = size // 2
    shapes = np.zeros((3, k, k))
    shapes[0, :, k // 2] = 1.0  # vertical bar
    shapes[1, k // 2, :] = 1.0  # cross
    shapes[1, :, k // 2] = 1.0
    shapes[2, -1, :] = 1.0  # corner
    shapes[2, :, 0] = 1.0
    out = np.zeros((3, 4, size, size))
    offsets = [(0, 0), (0, size - k), (size - k, 0), (size - k, size - k)]
    for c in range(3):
        for g, (dy, dx) in enumerate(offsets):
            out[c, g, dy : dy + k, dx : dx + k] = shapes[c]
    return jnp.asarray(out)


@partial(jax.jit, static_argnums=(2,))
def _class_log_scores(rm: RenderingModel, x: Array, t: float) -> Array:
    """:meth:`RenderingModel.class_log_scores` of checked images ``(N, *image_shape)``
    as one compiled program (the model is traced: one compilation per shapes and
    ``t``): Eqs. 5-7 and 9."""
    w, b = rm.natural_parameters()
    d = int(np.prod(rm.image_shape))
    u = jnp.einsum("nd,cgd->ncg", x.reshape(x.shape[0], d), w.reshape(*w.shape[:2], d))
    u = u + b
    if rm.switch_prior is not None:
        off = (
            jnp.log1p(-rm.switch_prior)
            + jnp.log(rm.class_prior)[:, None]
            + jnp.log(rm.nuisance_prior)[None, :]
        )
        u = reduce_t(jnp.stack([u, jnp.broadcast_to(off, u.shape)]), (0,), t)
    return reduce_t(u, (2,), t)
