"""Convolutional (overlapping) rendering: the DRM whose windows overlap (DESIGN §2).

Two levels. The class ``c`` places its template -- a ``t_c x t_c`` map of part
states -- at translation ``g`` inside an ``n x n`` grid of part units; uncovered
units are OFF. Each unit has an ON/OFF switch ``a[i,j]``; a unit ON in part state
``k`` renders the ``t x t`` pixel template ``mu[k]`` at pixel ``(i*stride,
j*stride)``. Rendered patches *add*, so with ``stride < t`` neighbouring patches
overlap by ``t - stride`` pixels and a pixel's mean depends on every unit covering
it: the factor graph has loops (Eq. 10 with true convolutional rendering).

With ``stride == t`` the windows tile the image and the model is a two-level tree
DRM; the DCN-form pass (:func:`pgm_drm.inference.conv_dcn_infer`, the one pass
of :mod:`pgm_drm.models.maxsum` over this model's :meth:`~ConvRenderingModel.
level_scores` and :meth:`~ConvRenderingModel.level_switch`) is then exact.
With overlap the DCN pass scores every patch as if its unit alone rendered it --
what a convolution with stride < kernel size computes -- and the toolkit measures
how far that is from exact inference (:func:`pgm_drm.experiments.dcn_exactness_study`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive
from numpyro.ops.indexing import Vindex

from pgm_drm._typing import Array, ArrayLike, PRNGKey
from pgm_drm.models.maxsum import placement_offsets, windows
from pgm_drm.models.pytree import pytree_model
from pgm_drm.models.validation import check_images, check_prior, check_probability
from pgm_drm.semiring import switch_reduce

__all__ = ["ConvRenderingModel"]


@pytree_model(static=("grid", "stride"))
@dataclass(frozen=True, eq=False)
class ConvRenderingModel:
    """A two-level DRM with convolutional (possibly overlapping) rendering.

    Args:
        pixel_templates: ``(K, t, t)`` pixel templates of the part states.
        class_templates: int ``(C, t_c, t_c)`` maps of part states in ``0..K``
            (``K`` = OFF) that a class places on the unit grid.
        grid: ``n``: the part units form an ``n x n`` grid (``t_c <= n``).
        stride: Pixel distance of neighbouring units, ``1 <= stride <= t``;
            overlap ``= t - stride``.
        class_prior: ``(C,)``.
        nuisance_prior: ``(G,)`` with ``G = (n - t_c + 1)**2`` class translations.
        switch_prior: Probability a unit is ON.
        sigma: Pixel noise (> 0).

    Image side ``= (n - 1) * stride + t``. A JAX pytree: ``grid`` and ``stride``
    are static, the rest are leaves (stored with fixed types, as in
    :class:`pgm_drm.models.DeepRenderingModel`).
    """

    pixel_templates: ArrayLike
    class_templates: ArrayLike
    grid: int
    stride: int
    class_prior: ArrayLike
    nuisance_prior: ArrayLike
    switch_prior: float = 0.9
    sigma: float = 0.5

    def __post_init__(self) -> None:
        pix = jnp.asarray(self.pixel_templates, dtype=float)
        if pix.ndim != 3 or pix.shape[1] != pix.shape[2]:
            raise ValueError(
                f"pixel_templates must have shape (K, t, t), got {pix.shape}"
            )
        if not bool(jnp.all(jnp.isfinite(pix))):
            raise ValueError("pixel_templates contain NaN or inf values")
        k, t = pix.shape[0], pix.shape[1]
        tmpl = np.asarray(self.class_templates)
        if tmpl.ndim != 3 or tmpl.shape[1] != tmpl.shape[2]:
            raise ValueError(
                f"class_templates must have shape (C, t_c, t_c), got {tmpl.shape}"
            )
        if not np.issubdtype(tmpl.dtype, np.integer):
            raise ValueError("class_templates must be integers (part states)")
        if tmpl.min() < 0 or tmpl.max() > k:
            raise ValueError(
                f"class_templates hold states outside 0..{k} (K={k} is OFF)"
            )
        n, s = int(self.grid), int(self.stride)
        if n < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if tmpl.shape[1] > n:
            raise ValueError(
                f"class template size {tmpl.shape[1]} exceeds the unit grid {n}"
            )
        if not 1 <= s <= t:
            raise ValueError(
                f"stride must be in 1..t={t} (stride > t leaves pixels no unit "
                f"renders), got {self.stride}"
            )
        sigma = float(self.sigma)
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        g = (n - tmpl.shape[1] + 1) ** 2
        object.__setattr__(self, "pixel_templates", pix)
        object.__setattr__(self, "class_templates", jnp.asarray(tmpl, jnp.int32))
        object.__setattr__(self, "grid", n)
        object.__setattr__(self, "stride", s)
        object.__setattr__(
            self,
            "class_prior",
            jnp.asarray(
                check_prior(self.class_prior, "class_prior", len(tmpl)), dtype=float
            ),
        )
        object.__setattr__(
            self,
            "nuisance_prior",
            jnp.asarray(check_prior(self.nuisance_prior, "nuisance_prior", g), float),
        )
        object.__setattr__(
            self, "switch_prior", check_probability(self.switch_prior, "switch_prior")
        )
        object.__setattr__(self, "sigma", sigma)

    # ---- structure -----------------------------------------------------------
    @property
    def n_states(self) -> int:
        """``K``: part states (``K`` is OFF)."""
        return int(self.pixel_templates.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.class_templates.shape[0])

    @property
    def n_nuisances(self) -> int:
        return int(self.nuisance_prior.shape[0])

    @property
    def patch(self) -> int:
        """``t``: pixel template side."""
        return int(self.pixel_templates.shape[1])

    @property
    def overlap(self) -> int:
        """Pixels shared by neighbouring patches, ``t - stride``."""
        return self.patch - self.stride

    @property
    def image_shape(self) -> tuple[int, int]:
        side = (self.grid - 1) * self.stride + self.patch
        return (side, side)

    def unit_table(self) -> Array:
        """Part state of every unit for each (class, translation):
        int ``(C, G, n*n)``, ``K`` = OFF where the class template does not reach."""
        n, k = self.grid, self.n_states
        c, tc, _ = self.class_templates.shape
        offs = placement_offsets(n, tc)  # the class template placed in the grid
        g = np.arange(offs.shape[0])[:, None]
        src = jnp.reshape(self.class_templates, (c, 1, tc * tc))
        out = jnp.full((c, offs.shape[0], n * n), k, src.dtype)
        return out.at[:, g, offs].set(src)

    # ---- the DCN-form pass (pgm_drm.models.maxsum) --------------------------------
    @property
    def levels(self) -> int:
        """Two: the part units, then the class."""
        return 2

    def level_scores(self, level: int, below: Array) -> Array:
        """Pre-pooling scores of the pass (:func:`pgm_drm.models.maxsum.bottom_up`).

        Level 1 (Eqs. 7-8, a convolution with stride ``s``): the log-likelihood of
        each unit's ``t x t`` patch of the images ``below`` under each state
        (``<mu_k / sigma^2 | I_patch> - ||mu_k||^2 / (2 sigma^2)`` plus the
        state-independent ``-||I_patch||^2 / (2 sigma^2)`` and normaliser; OFF,
        last, renders zeros): ``(B, n, n, K + 1, 1)``, each unit alone rendering
        its patch. Level 2 (Eqs. 12-13, a one-hot filter): ``log pi_g + sum_u
        m_u[state(c, g, u)]`` of the unit messages ``below``: ``(B, 1, 1, C, G)``.
        """
        if level == 1:
            s2 = self.sigma**2
            t = self.patch
            patches = windows(below[..., None], t, self.stride)[..., 0]
            kernel = jnp.concatenate(
                [jnp.reshape(self.pixel_templates, (-1, t * t)), jnp.zeros((1, t * t))]
            )  # (K+1, t*t)
            match = jnp.einsum("bxyp,kp->bxyk", patches, kernel / s2)
            bias = -jnp.sum(kernel**2, axis=-1) / (2 * s2)
            const = -jnp.sum(patches**2, axis=-1) / (2 * s2) - 0.5 * t * t * jnp.log(
                2 * jnp.pi * s2
            )
            return (match + bias + const[..., None])[..., None]
        table = self.unit_table()  # (C, G, n*n)
        win = windows(below, self.grid)  # (B, 1, 1, n*n, K+1)
        u = jnp.arange(table.shape[-1])
        picked = win[:, :, :, u, table]  # (B, 1, 1, C, G, n*n)
        return jnp.sum(picked, axis=-1) + jnp.log(self.nuisance_prior)

    def level_switch(self, level: int, pooled: Array, t: float) -> Array:
        """Eq. 9: the unit messages, reduced over the switch (the ReLU at ``t = 0``)."""
        return switch_reduce(pooled, self.switch_prior, t)

    def class_scores(self, pooled: Array) -> Array:
        """``(B, C)``: the pooled top scores plus ``log pi_c``."""
        return pooled[:, 0, 0] + jnp.log(self.class_prior)

    def cover(self) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """Pixels grouped by the set of units whose patch covers them.

        Returns:
            ``[(units, pixels)]``: unit indices ``u = i*n + j`` and the flat pixel
            indices they (and only they) cover, in a fixed order.
        """
        side, n, s, t = self.image_shape[0], self.grid, self.stride, self.patch
        groups: dict[tuple[int, ...], list[int]] = {}
        for y in range(side):
            for x in range(side):
                rows = [i for i in range(n) if i * s <= y < i * s + t]
                cols = [j for j in range(n) if j * s <= x < j * s + t]
                units = tuple(i * n + j for i in rows for j in cols)
                groups.setdefault(units, []).append(y * side + x)
        return [(u, np.asarray(p)) for u, p in groups.items()]

    # ---- the NumPyro model ---------------------------------------------------
    def model(
        self, image: ArrayLike | None = None, sigma: ArrayLike | None = None
    ) -> None:
        """Eq. 10 with overlapping (additive) patches.

        ``sigma`` overrides the model's pixel noise; passing it as an array lets
        one compiled graph serve every noise level (``infer(fg, sigma=...)``).

        Sites: ``c``, ``g``, a switch ``a_{i}_{j}`` per unit, and one observed
        Normal site ``x{m}`` per group of pixels covered by the same units (so each
        likelihood factor touches only those units' switches: the graph's loops
        are the overlaps).
        """
        n, k, t, s = self.grid, self.n_states, self.patch, self.stride
        side = self.image_shape[0]
        flat = None if image is None else jnp.reshape(jnp.asarray(image), (-1,))
        noise = self.sigma if sigma is None else sigma
        table = self.unit_table()
        pix = jnp.concatenate([self.pixel_templates, jnp.zeros((1, t, t))])
        c = numpyro.sample("c", dist.Categorical(self.class_prior))
        g = numpyro.sample("g", dist.Categorical(self.nuisance_prior))
        states = {}
        for u in range(n * n):
            a = numpyro.sample(f"a_{u // n}_{u % n}", dist.Bernoulli(self.switch_prior))
            states[u] = jnp.where(a > 0.5, Vindex(table)[c, g, u], k)
        for m, (units, pixels) in enumerate(self.cover()):
            y, x = pixels // side, pixels % side
            mean = 0.0
            for u in units:
                dy, dx = y - (u // n) * s, x - (u % n) * s
                mean = mean + Vindex(pix)[states[u][..., None], dy, dx]
            obs = None if flat is None else flat[pixels]
            numpyro.sample(f"x{m}", dist.Normal(mean, noise).to_event(1), obs=obs)

    def render(self, latents: dict[str, ArrayLike]) -> Array:
        """Noise-free mean image(s) for ``c`` ``(...)``, ``g`` ``(...)`` and the
        switch grid ``a`` ``(..., n, n)``: ``(..., H, W)``."""
        n, k, t, s = self.grid, self.n_states, self.patch, self.stride
        c = jnp.asarray(latents["c"])
        g = jnp.asarray(latents["g"])
        a = jnp.reshape(jnp.asarray(latents["a"]), c.shape + (n * n,))
        state = jnp.where(a > 0.5, self.unit_table()[c, g], k)  # (..., n*n)
        pix = jnp.concatenate([self.pixel_templates, jnp.zeros((1, t, t))])
        side = self.image_shape[0]
        out = jnp.zeros(c.shape + (side, side))
        for u in range(n * n):
            i, j = u // n, u % n
            out = out.at[..., i * s : i * s + t, j * s : j * s + t].add(
                pix[state[..., u]]
            )
        return out

    def sample(self, key: PRNGKey, n: int) -> tuple[Array, dict[str, Array]]:
        """Draw ``n`` images ``(n, H, W)`` and latents ``c``, ``g`` ``(n,)``, the
        switches ``a`` ``(n, grid, grid)`` and unit states ``s`` ``(n, grid, grid)``
        (``K`` = OFF)."""
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        key_latent, key_noise = jax.random.split(key)
        m = self.grid
        draws = Predictive(
            self.model,
            num_samples=int(n),
            return_sites=["c", "g"] + [f"a_{u // m}_{u % m}" for u in range(m * m)],
        )(key_latent)
        a = jnp.stack([draws[f"a_{u // m}_{u % m}"] for u in range(m * m)], -1)
        latents = {
            "c": draws["c"],
            "g": draws["g"],
            "a": jnp.reshape(a, (int(n), m, m)).astype(jnp.int32),
        }
        mean = self.render(latents)
        images = mean + self.sigma * jax.random.normal(key_noise, mean.shape)
        state = jnp.where(
            latents["a"] > 0,
            jnp.reshape(self.unit_table()[latents["c"], latents["g"]], (-1, m, m)),
            self.n_states,
        )
        return images, {**latents, "s": state}

    def check_images(self, images: ArrayLike) -> tuple[Array, bool]:
        """Validate images of shape ``image_shape`` or ``(N, *image_shape)``
        (integer pixels become the templates' float dtype)."""
        return check_images(images, self.image_shape, dtype=self.pixel_templates.dtype)

    # ---- constructors ----------------------------------------------------------
    @classmethod
    def random(
        cls,
        key: PRNGKey,
        stride: int = 2,
        patch: int = 3,
        grid: int = 3,
        n_states: int = 3,
        n_classes: int = 3,
        class_size: int = 2,
        sigma: float = 0.5,
        switch_prior: float = 0.9,
    ) -> ConvRenderingModel:
        """Random parameters: Gaussian pixel templates scaled to unit pixel
        variance, random class templates without OFF entries, Dirichlet priors."""
        k1, k2, k3, k4 = jax.random.split(key, 4)
        pix = jax.random.normal(k1, (n_states, patch, patch))
        tmpl = np.asarray(
            jax.random.randint(k2, (n_classes, class_size, class_size), 0, n_states)
        )
        g = (grid - class_size + 1) ** 2
        pc = np.asarray(jax.random.dirichlet(k3, 5.0 * jnp.ones(n_classes)))
        pg = np.asarray(jax.random.dirichlet(k4, 5.0 * jnp.ones(g)))
        return cls(
            pixel_templates=pix,
            class_templates=tmpl,
            grid=grid,
            stride=stride,
            class_prior=pc / pc.sum(),
            nuisance_prior=pg / pg.sum(),
            switch_prior=switch_prior,
            sigma=sigma,
        )
