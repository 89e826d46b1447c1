"""The Deep Rendering Model as a tree of renderers (paper §2.3-2.4, Eqs. 10-13).

Levels ``l = L .. 1``; level ``L`` holds one unit whose state is the class ``c``.
A unit at level ``l`` has a state in ``C_l`` or OFF, a translation nuisance
``g_l`` and (below the top) an ON/OFF switch ``a_l``. Its *window* is a
``w_l x w_l`` block of level ``l-1`` units (``l >= 2``) or of pixels (``l = 1``).
Its template (a ``t_l x t_l`` map of child states, or a pixel patch at ``l = 1``) is
placed inside the window at translation ``g_l``; uncovered children are OFF, and an
OFF (or switched-off) unit makes every child OFF / renders zeros (DESIGN §2).
Windows tile the level below, so the graph is a tree written with nested plates:
plate ``p{l}`` (size ``w_l**2``, batch dim ``-(L - l + 1)``) indexes a unit's
children, and a level-``l`` unit is addressed by its path of offsets.

Bottom-up max-sum on this tree is ``conv -> max with OFF (ReLU) -> max-pool``
(Eqs. 12-13): the model's :meth:`~DeepRenderingModel.level_scores` and
:meth:`~DeepRenderingModel.level_switch` are the levels of the one pass in
:mod:`pgm_drm.models.maxsum`; :meth:`~DeepRenderingModel.infer` runs it.

The model is a JAX pytree (:func:`pgm_drm.models.pytree.pytree_model`): the
templates and priors are leaves, ``windows`` is static, so jitted functions take
the model as an ordinary argument and a new parameter value of the same structure
does not compile again.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive
from numpyro.ops.indexing import Vindex

from pgm_drm._typing import Array, ArrayLike, PRNGKey, Semiring
from pgm_drm.models.maxsum import (
    DCNOutput,
    dcn_pass,
    placement_offsets,
    windows,
    windows_to_grid,
)
from pgm_drm.models.pytree import pytree_model
from pgm_drm.models.validation import (
    check_finite_log_z,
    check_images,
    check_prior,
    check_probability,
)
from pgm_drm.semiring import resolve_temperature, switch_reduce
from pgm_drm.sharding import shard_batch, unpad

__all__ = [
    "DeepRenderingModel",
    "grid_to_plates",
    "plates_to_grid",
]


def grid_to_plates(x: ArrayLike, windows: tuple[int, ...]) -> Array:
    """Spatial grid ``(..., H, W)`` -> nested-plate layout ``(..., w_1^2, .., w_n^2)``.

    ``H = W = prod(windows)``; ``windows[0]`` is the finest (fastest-varying)
    level. Row ``r = sum_m r_m prod_{m' < m} w_m'`` and the plate offset of level
    ``m`` is ``r_m * w_m + c_m``.
    """
    x = jnp.asarray(x)
    n = len(windows)
    lead = x.shape[:-2]
    rev = tuple(reversed(windows))
    x = jnp.reshape(x, lead + rev + rev)
    k = len(lead)
    # axes of r_m / c_m for m = 1..n (finest first)
    order = []
    for m in range(n):
        order += [k + n - 1 - m, k + 2 * n - 1 - m]
    x = jnp.transpose(x, tuple(range(k)) + tuple(order))
    return jnp.reshape(x, lead + tuple(w * w for w in windows))


def plates_to_grid(x: ArrayLike, windows: tuple[int, ...]) -> Array:
    """Inverse of :func:`grid_to_plates`."""
    x = jnp.asarray(x)
    n = len(windows)
    lead = x.shape[: x.ndim - n]
    k = len(lead)
    pairs = []
    for w in windows:
        pairs += [w, w]
    x = jnp.reshape(x, lead + tuple(pairs))
    rows = [k + 2 * m for m in reversed(range(n))]
    cols = [k + 2 * m + 1 for m in reversed(range(n))]
    x = jnp.transpose(x, tuple(range(k)) + tuple(rows) + tuple(cols))
    side = int(np.prod(windows)) if windows else 1
    return jnp.reshape(x, lead + (side, side))


@pytree_model(static=("windows",))
@dataclass(frozen=True, eq=False)
class DeepRenderingModel:
    """A tree DRM (DESIGN §2). Level index ``l`` runs 1 (renders pixels) .. L (class).

    Args:
        windows: ``(w_1, ..., w_L)``: a level-``l`` unit's window is ``w_l x w_l``
            children. Image side ``= prod(windows)``.
        pixel_templates: ``(K_1, t_1, t_1)`` patches rendered by level-1 states.
        child_templates: For ``l = 2..L``, int arrays ``(K_l, t_l, t_l)`` of child
            states in ``0..K_{l-1}`` (``K_{l-1}`` = OFF). ``K_L`` is the number of
            classes.
        class_prior: ``(K_L,)``.
        nuisance_priors: For ``l = 1..L``, ``(G_l,)`` with
            ``G_l = (w_l - t_l + 1)**2`` translations.
        switch_priors: For ``l = 1..L-1``, probability a unit is ON.
        sigma: Pixel noise (> 0).

    Leaves are stored with fixed types (float templates and priors, int32 child
    templates, Python-float ``switch_priors`` and ``sigma``), so every model of
    one structure has the same abstract value under ``jit``.
    """

    windows: tuple[int, ...]
    pixel_templates: ArrayLike
    child_templates: tuple[ArrayLike, ...]
    class_prior: ArrayLike
    nuisance_priors: tuple[ArrayLike, ...]
    switch_priors: tuple[float, ...]
    sigma: float = 0.5

    def __post_init__(self) -> None:
        windows = tuple(int(w) for w in self.windows)
        levels = len(windows)
        if levels < 1 or any(w < 1 for w in windows):
            raise ValueError(f"windows must be >= 1 for each level, got {self.windows}")
        pix = jnp.asarray(self.pixel_templates, dtype=float)
        if pix.ndim != 3 or pix.shape[1] != pix.shape[2]:
            raise ValueError(
                f"pixel_templates must have shape (K_1, t_1, t_1), got {pix.shape}"
            )
        if not bool(jnp.all(jnp.isfinite(pix))):
            raise ValueError("pixel_templates contain NaN or inf values")
        if len(self.child_templates) != levels - 1:
            raise ValueError(
                f"{levels} levels need {levels - 1} child_templates (levels 2..L), "
                f"got {len(self.child_templates)}"
            )
        sizes = [pix.shape[1]]
        states = [pix.shape[0]]
        kids = []
        for l, t in enumerate(self.child_templates, start=2):
            t = np.asarray(t)
            if t.ndim != 3 or t.shape[1] != t.shape[2]:
                raise ValueError(
                    f"child_templates for level {l} must have shape (K_{l}, t, t), "
                    f"got {t.shape}"
                )
            if not np.issubdtype(t.dtype, np.integer):
                raise ValueError(f"child_templates for level {l} must be integers")
            if t.min() < 0 or t.max() > states[-1]:
                raise ValueError(
                    f"child_templates for level {l} hold states outside "
                    f"0..{states[-1]} (K_{l - 1}={states[-1]} is OFF)"
                )
            sizes.append(t.shape[1])
            states.append(t.shape[0])
            kids.append(jnp.asarray(t, dtype=jnp.int32))
        for l, (w, t) in enumerate(zip(windows, sizes, strict=True), start=1):
            if t > w:
                raise ValueError(
                    f"level {l}: template size {t} exceeds window size {w}"
                )
        if len(self.nuisance_priors) != levels:
            raise ValueError(
                f"need {levels} nuisance_priors, got {len(self.nuisance_priors)}"
            )
        g_priors = []
        for l, (p, w, t) in enumerate(
            zip(self.nuisance_priors, windows, sizes, strict=True), start=1
        ):
            g_priors.append(
                jnp.asarray(
                    check_prior(p, f"nuisance_priors[level {l}]", (w - t + 1) ** 2),
                    dtype=float,
                )
            )
        if len(self.switch_priors) != levels - 1:
            raise ValueError(
                f"need {levels - 1} switch_priors (levels 1..L-1), "
                f"got {len(self.switch_priors)}"
            )
        switch = tuple(
            check_probability(p, f"switch_priors[level {l}]")
            for l, p in enumerate(self.switch_priors, start=1)
        )
        sigma = float(self.sigma)
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        object.__setattr__(self, "windows", windows)
        object.__setattr__(self, "pixel_templates", pix)
        object.__setattr__(self, "child_templates", tuple(kids))
        object.__setattr__(
            self,
            "class_prior",
            jnp.asarray(
                check_prior(self.class_prior, "class_prior", states[-1]), dtype=float
            ),
        )
        object.__setattr__(self, "nuisance_priors", tuple(g_priors))
        object.__setattr__(self, "switch_priors", switch)
        object.__setattr__(self, "sigma", sigma)

    # ---- structure -----------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.windows)

    @property
    def n_states(self) -> tuple[int, ...]:
        """``(K_1, ..., K_L)``; ``K_L`` is the number of classes."""
        return (int(self.pixel_templates.shape[0]),) + tuple(
            int(t.shape[0]) for t in self.child_templates
        )

    @property
    def n_classes(self) -> int:
        return self.n_states[-1]

    @property
    def template_sizes(self) -> tuple[int, ...]:
        return (int(self.pixel_templates.shape[1]),) + tuple(
            int(t.shape[1]) for t in self.child_templates
        )

    @property
    def n_nuisances(self) -> tuple[int, ...]:
        return tuple(
            (w - t + 1) ** 2
            for w, t in zip(self.windows, self.template_sizes, strict=True)
        )

    @property
    def image_shape(self) -> tuple[int, int]:
        side = math.prod(int(w) for w in self.windows)
        return (side, side)

    def grid_shape(self, level: int) -> tuple[int, int]:
        """Spatial grid of level-``level`` units (level 0 = pixels)."""
        side = math.prod(int(w) for w in self.windows[level:])
        return (side, side)

    def placement_table(self, level: int) -> Array:
        """What a level-``level`` unit renders into each window offset.

        Returns:
            ``level >= 2``: int array ``(K_l + 1, G_l, w_l**2)`` of child states
            (``K_{l-1}`` = OFF), row ``K_l`` (the unit OFF) all OFF.
            ``level == 1``: float array ``(K_1 + 1, G_1, w_1**2)`` of pixel means,
            row ``K_1`` zeros.
        """
        w, t = self.windows[level - 1], self.template_sizes[level - 1]
        k = self.n_states[level - 1]
        offs = placement_offsets(w, t)
        g = np.arange(offs.shape[0])[:, None]
        if level == 1:
            src = jnp.reshape(self.pixel_templates, (k, t * t))
            out = jnp.zeros((k + 1, offs.shape[0], w * w), src.dtype)
        else:
            src = jnp.reshape(self.child_templates[level - 2], (k, t * t))
            off = self.n_states[level - 2]
            out = jnp.full((k + 1, offs.shape[0], w * w), off, src.dtype)
        return out.at[:k, g, offs].set(src[:, None, :])

    # ---- the DCN-form pass (pgm_drm.models.maxsum) --------------------------------
    def level_scores(self, level: int, below: Array) -> Array:
        """Pre-pooling scores ``(B, h, h, K_l + 1, G_l)`` of the level-``level`` units:
        template match plus ``log pi_g`` (last state = OFF).

        Level 1 (Eqs. 7-8): the log-likelihood of each unit's patch of the images
        ``below`` ``(B, H, W)`` under every placed pixel template, ``<mu/sigma^2 |
        I> - ||mu||^2/(2 sigma^2) - ||I||^2/(2 sigma^2) - const`` (a strided
        convolution). Level ``l >= 2`` (Eqs. 12-13): the children's messages
        ``below`` ``(B, h', h', K_{l-1} + 1)`` at the states the template puts
        there, summed over the window (a convolution with *one-hot* templates,
        i.e. a gather).
        """
        table = self.placement_table(level)  # (K+1, G, w*w)
        w = self.windows[level - 1]
        if level == 1:
            s2 = self.sigma**2
            k, g, _ = table.shape
            b, n = below.shape[0], below.shape[1] // w
            # The template match as one strided convolution (HWIO kernel of the
            # k*g placed templates): on CPU about 1.5x faster than gathering the
            # windows and contracting them (measured, batch 1000, 32x32).
            kernel = jnp.transpose(jnp.reshape(table / s2, (k * g, w, w)), (1, 2, 0))
            dt = jnp.result_type(below, kernel)  # as the einsum it replaces promoted
            below = below.astype(dt)
            match = jax.lax.conv_general_dilated(
                below[..., None],
                kernel[:, :, None, :].astype(dt),
                (w, w),
                "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,
            )
            match = jnp.reshape(match, (b, n, n, k, g))
            bias = -jnp.sum(table**2, axis=-1) / (2 * s2)
            sq = jnp.sum(jnp.reshape(below * below, (b, n, w, n, w)), axis=(2, 4))
            const = -sq / (2 * s2) - 0.5 * w * w * jnp.log(2 * jnp.pi * s2)
            raw = match + bias + const[..., None, None]
        else:
            win = windows(below, w)  # (B,h,h,O,K'+1)
            # One gather per window offset, summed in offset order: on CPU about
            # 1.5x faster than one gather of (B,h,h,K+1,G,O) and a sum over O
            # (measured, batch 1000, 32x32); the same values bit for bit there.
            raw = win[:, :, :, 0, :][..., table[:, :, 0]]  # (B,h,h,K+1,G)
            for o in range(1, table.shape[-1]):
                raw = raw + win[:, :, :, o, :][..., table[:, :, o]]
        return raw + jnp.log(self.nuisance_priors[level - 1])

    def level_switch(self, level: int, pooled: Array, t: float) -> Array:
        """Eq. 9: the level-``level`` messages ``(B, h, h, K_l + 1)``, the pooled
        scores reduced over the unit's switch (the ReLU at ``t = 0``)."""
        return switch_reduce(pooled, self.switch_priors[level - 1], t)

    def class_scores(self, pooled: Array) -> Array:
        """``(B, K_L)``: the top unit's pooled scores ``(B, 1, 1, K_L + 1)`` plus
        ``log pi_c`` (its OFF row is never used)."""
        return pooled[:, 0, 0, :-1] + jnp.log(self.class_prior)

    # ---- the NumPyro model ---------------------------------------------------------
    def model(self, image: ArrayLike | None = None) -> None:
        """Eq. 10 as a tree of renderers, with nested plates (DESIGN §2).

        Sites: ``c``, ``g{L}`` (top), and for ``l = L-1..1`` inside plates
        ``p{L}..p{l+1}``: ``g{l}``, ``a{l}``; ``image`` (Normal per pixel) inside
        all plates. Observed ``image`` has shape ``image_shape``.
        """
        L = self.levels
        obs = None if image is None else grid_to_plates(image, self.windows)
        state = numpyro.sample("c", dist.Categorical(self.class_prior))
        g = numpyro.sample(f"g{L}", dist.Categorical(self.nuisance_priors[L - 1]))
        with contextlib.ExitStack() as stack:
            for l in range(L, 0, -1):
                dim = -(L - l + 1)
                size = self.windows[l - 1] ** 2
                stack.enter_context(numpyro.plate(f"p{l}", size, dim=dim))
                offset = jnp.arange(size).reshape((size,) + (1,) * (L - l))
                table = self.placement_table(l)
                if l >= 2:
                    child = Vindex(table)[state, g, offset]
                    g = numpyro.sample(
                        f"g{l - 1}", dist.Categorical(self.nuisance_priors[l - 2])
                    )
                    a = numpyro.sample(
                        f"a{l - 1}", dist.Bernoulli(self.switch_priors[l - 2])
                    )
                    state = jnp.where(a > 0.5, child, self.n_states[l - 2])
                else:
                    mean = Vindex(table)[state, g, offset]
                    numpyro.sample("image", dist.Normal(mean, self.sigma), obs=obs)

    def sample(self, key: PRNGKey, n: int) -> tuple[Array, dict[str, Array]]:
        """Draw ``n`` images and every latent, on spatial grids.

        NumPyro's ``Predictive`` over :meth:`model`, jitted once per structure and
        ``n`` (the model is traced; later calls take milliseconds).

        Returns:
            ``images`` ``(n, H, W)`` and ``latents``: ``"c"`` ``(n,)``;
            ``"g{L}"`` ``(n,)``; for ``l < L``: ``"g{l}"``, ``"a{l}"`` and the unit
            states ``"s{l}"`` (``K_l`` = OFF) as ``(n, *grid_shape(l))``.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return _sample(self, int(n), key)

    def _sample(self, n: int, key: PRNGKey) -> tuple[Array, dict[str, Array]]:
        draws = Predictive(self.model, num_samples=n)(key)
        images = plates_to_grid(draws.pop("image"), self.windows)
        latents = {"c": draws["c"], f"g{self.levels}": draws[f"g{self.levels}"]}
        for l in range(self.levels - 1, 0, -1):
            for s in ("g", "a"):
                latents[f"{s}{l}"] = plates_to_grid(draws[f"{s}{l}"], self.windows[l:])
        latents.update(self.unit_states(latents))
        return images, latents

    def unit_states(self, latents: dict[str, Array]) -> dict[str, Array]:
        """Unit states ``s{l}`` (grids, ``K_l`` = OFF) from the c, g, a grids."""
        L = self.levels
        state = jnp.asarray(latents["c"])[..., None, None]
        out = {}
        for l in range(L, 1, -1):
            w = self.windows[l - 1]
            g = jnp.asarray(latents[f"g{l}"])
            if l == L:
                g = g[..., None, None]
            table = self.placement_table(l)  # (K+1, G, w*w)
            child = windows_to_grid(table[state, g], w)  # (..., h*w, h*w)
            a = jnp.asarray(latents[f"a{l - 1}"])
            state = jnp.where(a > 0.5, child, self.n_states[l - 2])
            out[f"s{l - 1}"] = state
        return out

    def infer(
        self,
        images: ArrayLike,
        semiring: Semiring = "max",
        temperature: float | None = None,
        *,
        scores: bool = False,
    ) -> DCNOutput:
        """DCN-form bottom-up + top-down inference on one image or a batch (jitted,
        the model traced): :func:`pgm_drm.models.maxsum.dcn_pass`.

        Args:
            images: ``image_shape`` or ``(B, *image_shape)``.
            semiring: "max" (max-sum: max-pooling, ReLU) or "sum" (sum-product).
            temperature: Overrides ``semiring`` (``T * logsumexp(x / T)``).
            scores: Also return every level's pre-pooling scores (default
                ``False``: ``scores = ()``, and the pass does not pay for writing
                them: about a fifth of the pass at 32x32, batch 1000, on CPU).

        Returns:
            :class:`pgm_drm.models.maxsum.DCNOutput` (batched; a single image
            gets ``B = 1``).

        Raises:
            ValueError: For a pixel that is NaN or infinite, or (pixels finite) a
                log Z that overflowed the dtype, naming the images.
        """
        t = resolve_temperature(semiring, temperature)
        x, _ = check_images(
            images, self.image_shape, values=False, dtype=self.pixel_templates.dtype
        )
        # Several devices: the batch is sharded over all of them (identity on one).
        xs, n = shard_batch(x)
        out = dcn_pass(self, xs, t, bool(scores))
        out = out if xs is x else unpad(out, n)
        # The pixels are checked only when a log Z is not finite: a NaN or
        # infinite pixel makes its unit's scores NaN or -inf at every state and
        # translation (its patch's ||I||^2 term), which reaches every class
        # score, so a finite log Z vouches for its image. Checking every batch up
        # front cost half the pass (0.65 of 1.4 ms at 32x32, batch 1000, CPU).
        # Finite pixels with a non-finite log Z overflowed the dtype: refused too.
        check_finite_log_z(out.log_z, x)  # returns under a trace
        return out

    def render(self, latents: dict[str, ArrayLike]) -> Array:
        """The noise-free image ``mu(c, g, a)`` of Eq. 10 for latents on grids.

        Args:
            latents: ``c``, every ``g{l}`` and ``a{l}`` as from :meth:`sample` or
                the top-down MAP of :func:`pgm_drm.inference.dcn_infer`.

        Returns:
            ``(..., H, W)`` mean images (a top-down reconstruction).
        """
        L = self.levels
        if L == 1:
            state = jnp.asarray(latents["c"])[..., None, None]
        else:
            state = self.unit_states(latents)["s1"]
        g = jnp.asarray(latents["g1"])
        if L == 1:
            g = g[..., None, None]
        return windows_to_grid(self.placement_table(1)[state, g], self.windows[0])

    def check_images(self, images: ArrayLike) -> tuple[Array, bool]:
        """Validate images of shape ``image_shape`` or ``(N, *image_shape)``
        (integer pixels become the templates' float dtype)."""
        return check_images(images, self.image_shape, dtype=self.pixel_templates.dtype)

    # ---- constructors ----------------------------------------------------------
    @classmethod
    def random(
        cls,
        key: PRNGKey,
        image_shape: tuple[int, int] = (16, 16),
        levels: int = 3,
        states: tuple[int, ...] | None = None,
        windows: tuple[int, ...] | None = None,
        template_sizes: tuple[int, ...] | None = None,
        sigma: float = 0.3,
        switch_prior: float = 0.9,
        off_fraction: float = 0.2,
    ) -> DeepRenderingModel:
        """Random parameters: Dirichlet priors, Gaussian pixel templates, random
        child-state templates (a fraction ``off_fraction`` of entries OFF).

        Args:
            image_shape: Square image; its side must equal ``prod(windows)``.
            levels: ``L``.
            states: ``(K_1, ..., K_L)``; default ``(4, 3, ..., 3)`` with 3 classes.
            windows: Default: 2 at levels 2..L and the rest at level 1.
            template_sizes: Default ``w_l - 1`` (four translations when ``w_l = 2``).
        """
        h, w = image_shape
        if h != w:
            raise ValueError(f"image_shape must be square, got {image_shape}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if windows is None:
            rest = 2 ** (levels - 1)
            if h % rest or h // rest < 1:
                raise ValueError(
                    f"image side {h} is not divisible by 2**(levels-1) = {rest}"
                )
            windows = (h // rest,) + (2,) * (levels - 1)
        windows = tuple(windows)
        if len(windows) != levels:
            raise ValueError(f"windows has {len(windows)} entries for {levels} levels")
        if int(np.prod(windows)) != h:
            raise ValueError(
                f"image side {h} != prod(windows) = {int(np.prod(windows))}"
            )
        if states is None:
            states = (4,) + (3,) * (levels - 1)
        if len(states) != levels:
            raise ValueError(f"states has {len(states)} entries for {levels} levels")
        if template_sizes is None:
            template_sizes = tuple(max(1, w - 1) for w in windows)
        keys = iter(jax.random.split(key, 4 * levels + 2))
        t1 = template_sizes[0]
        pixel = jax.random.normal(next(keys), (states[0], t1, t1))
        kids = []
        for l in range(2, levels + 1):
            t = template_sizes[l - 1]
            k_child = states[l - 2]
            tmpl = jax.random.randint(next(keys), (states[l - 1], t, t), 0, k_child)
            off = jax.random.uniform(next(keys), tmpl.shape) < off_fraction
            kids.append(np.asarray(jnp.where(off, k_child, tmpl)))
        g_priors = tuple(
            np.asarray(
                jax.random.dirichlet(next(keys), 2.0 * jnp.ones((w - t + 1) ** 2))
            )
            for w, t in zip(windows, template_sizes, strict=True)
        )
        class_prior = np.asarray(
            jax.random.dirichlet(next(keys), 3.0 * jnp.ones(states[-1]))
        )
        return cls(
            windows=windows,
            pixel_templates=pixel,
            child_templates=tuple(kids),
            class_prior=class_prior / class_prior.sum(),
            nuisance_priors=tuple(p / p.sum() for p in g_priors),
            switch_priors=(switch_prior,) * (levels - 1),
            sigma=sigma,
        )

    @classmethod
    def default(cls, sigma: float = 0.25) -> DeepRenderingModel:
        """Strokes -> parts -> shapes on 24x24 images, worth looking at.

        Level 1: four 3x3 strokes (|, -, \\, /) placed in 4x4 patches;
        level 2: four parts, 2x2 arrangements of strokes placed in a 3x3 window
        (corners and a cross); level 3: three classes, 2x2 arrangements of parts
        (box, diamond-ish, X).
        """
        s = np.zeros((4, 3, 3))
        s[0, :, 1] = 1  # |
        s[1, 1, :] = 1  # -
        s[2] = np.eye(3)  # \
        s[3] = np.fliplr(np.eye(3))  # /
        V, H, D, A, OFF1 = 0, 1, 2, 3, 4
        parts = np.array(
            [
                [[H, H], [V, OFF1]],  # top-left corner
                [[H, H], [OFF1, V]],  # top-right corner
                [[D, A], [A, D]],  # cross
                [[V, OFF1], [H, H]],  # bottom-left corner
            ]
        )
        TL, TR, X, BL, OFF2 = 0, 1, 2, 3, 4
        shapes = np.array(
            [
                [[TL, TR], [BL, OFF2]],  # box-ish
                [[X, OFF2], [OFF2, X]],  # diagonal crosses
                [[TL, X], [X, BL]],  # mixed
            ]
        )
        return cls(
            windows=(4, 3, 2),
            pixel_templates=s,
            child_templates=(parts, shapes),
            class_prior=np.full(3, 1 / 3),
            nuisance_priors=(np.full(4, 0.25), np.full(4, 0.25), np.ones(1)),
            switch_priors=(0.95, 0.95),
            sigma=sigma,
        )


@partial(jax.jit, static_argnums=(1,))
def _sample(drm: DeepRenderingModel, n: int, key: PRNGKey):
    """:meth:`DeepRenderingModel.sample`, compiled once per structure and ``n``."""
    return drm._sample(n, key)
