"""Activity maximization in closed form (paper §3.2, Eqs. 26-27).

The image that maximises a class's linear score ``<mu(c, g) | I>`` (Eq. 26, the
``1/sigma^2`` and the biases dropped) is cut into patches ``P`` -- here the
receptive fields of the units at one level of the tree DRM. Over a unit-norm
patch ``I_P`` the maximum of ``<mu(c, g)|_P | I_P>`` is ``||mu(c, g)|_P||``,
attained at ``mu(c, g)|_P / ||mu(c, g)|_P||`` (Cauchy-Schwarz), so every patch picks
its own pose ``g*_P = argmax_g ||mu(c, g)|_P||`` and (Eq. 27)

    ``I*(c) = sum_P mu(c, g*_P)|_P / ||mu(c, g*_P)|_P||``.

``g`` is the *joint* nuisance of the whole tree (every unit's translation, all
switches ON: switching a unit off only removes non-negative energy), so there are
exponentially many ``mu(c, g)``. :func:`activity_maximization` never lists them:

1. bottom-up, the best energy of a level-``l`` unit in state ``k`` over its
   subtree's translations, ``M_l(k) = max_g sum_o M_{l-1}(t_l[k, g, o])``
   (``M_1(k) = ||mu_0[k]||^2``, ``M(OFF) = 0``): the energy of a subtree is additive
   over its disjoint children, so this is max-sum with a zero "likelihood";
2. along the path from the class unit to each patch unit, which state the
   ancestors' translations can put there: ``V_l(k) = max_g V_{l-1}(t_l[k, g, o_l])``
   with ``V_level = M_level`` and ``o_l`` the path's offset in the level-``l`` window;
3. top-down, the argmaxes give the poses, and the patch is the rendering of the
   chosen state with its subtree at the energy-maximising translations.

:func:`naive_activity_maximization` is the twin that enumerates every joint
configuration with :mod:`itertools` (tiny DRMs only).

Energy is translation invariant, so many poses tie (a level-1 unit's own
translation never changes ``||mu|_P||``); ties go to the first index, as ``argmax``.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np

from pgm_drm.models.drm import DeepRenderingModel
from pgm_drm.models.maxsum import windows, windows_to_grid

__all__ = [
    "ActivityMaximization",
    "activity_maximization",
    "enumerate_nuisances",
    "naive_activity_maximization",
    "plot_activity_maximization",
    "subtree_max_energy",
]


class ActivityMaximization(NamedTuple):
    """Class-maximising images of Eq. 27 with one pose per patch.

    With ``C`` classes and patches the level-``level`` units on an ``h x h`` grid
    (``h = grid_shape(level)[0]``, patch side ``p = prod(windows[:level])``):

    Attributes:
        images: ``(C, H, W)``: ``I*(c)``; every patch has unit norm (or is zero
            where class ``c`` can render nothing); with ``normalize=False`` the
            un-normalised ``sum_P mu(c, g*_P)|_P`` instead.
        poses: The joint nuisance ``g*_P`` of every (class, patch), as latents
            with leading dims ``(C, h, h)`` that ``drm.render`` accepts: ``"c"``
            and ``"g{L}"`` ``(C, h, h)``; ``"g{l}"``, ``"a{l}"`` (all ON)
            ``(C, h, h, *grid_shape(l))``. ``drm.render(poses)[c, y, x]`` is
            ``mu(c, g*_P)`` for the patch at ``(y, x)``. Units off the patch's
            path keep their energy-maximising translation.
        states: ``(C, h, h)``: state of the patch unit under ``g*_P``
            (``K_level`` = OFF).
        patch_norms: ``(C, h, h)``: ``||mu(c, g*_P)|_P||``.
        scores: ``(C,)``: Eq. 26's value ``sum_P ||mu(c, g*_P)|_P||``, the linear
            score ``sum_P max_g <mu(c, g)|I*_P>`` that ``I*(c)`` attains.
        level: The level whose receptive fields are the patches.
    """

    images: np.ndarray
    poses: dict[str, np.ndarray]
    states: np.ndarray
    patch_norms: np.ndarray
    scores: np.ndarray
    level: int


def _check_level(drm: DeepRenderingModel, level: int) -> int:
    if isinstance(level, bool) or int(level) != level:
        raise ValueError(f"level must be an integer, got {level!r}")
    level = int(level)
    if not 1 <= level <= drm.levels:
        raise ValueError(f"level must be in 1..{drm.levels}, got {level}")
    return level


def subtree_max_energy(
    drm: DeepRenderingModel,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Bottom-up max-energy recursion (step 1 of Eq. 26's maximisation).

    Returns:
        ``(M, best_g)``, lists over levels ``l = 1..L``: ``M[l-1]`` ``(K_l + 1,)``
        is ``max ||rendering||^2`` of a level-``l`` unit in each state over its
        subtree's translations (OFF: 0); ``best_g[l-1]`` ``(K_l + 1,)`` int, the
        unit's own translation attaining it (first index on ties).

    Example:
        >>> from pgm_drm.models import DeepRenderingModel
        >>> energy, best = subtree_max_energy(DeepRenderingModel.default())
        >>> energy[0].tolist()  # four 3-pixel strokes, then OFF
        [3.0, 3.0, 3.0, 3.0, 0.0]
        >>> energy[2].tolist()  # classes: parts of 3 or 4 strokes (9 or 12), OFF
        [27.0, 24.0, 42.0, 0.0]
    """
    energies, best = [], []
    m = None
    for level in range(1, drm.levels + 1):
        table = np.asarray(drm.placement_table(level))  # (K+1, G, O)
        if level == 1:
            e = np.sum(table**2, axis=-1)  # (K+1, G), translation invariant
        else:
            e = np.sum(m[table], axis=-1)  # children's energies add up
        m = np.max(e, axis=-1)
        energies.append(m)
        best.append(np.argmax(e, axis=-1))
    return energies, best


def _render_unit(
    drm: DeepRenderingModel, level: int, best: list[np.ndarray]
) -> np.ndarray:
    """Pixels of a level-``level`` unit in each state, subtree at ``best``.

    Returns:
        ``(K_level + 1, p, p)`` with ``p = prod(windows[:level])``.
    """
    w1 = drm.windows[0]
    t1 = np.asarray(drm.placement_table(1))
    out = t1[np.arange(t1.shape[0]), best[0]].reshape(-1, w1, w1)
    for l in range(2, level + 1):
        w = drm.windows[l - 1]
        table = np.asarray(drm.placement_table(l))
        kids = table[np.arange(table.shape[0]), best[l - 1]]  # (K+1, w*w)
        blocks = out[kids]  # (K+1, w*w, p, p): the children's pixels
        k, _, p, _ = blocks.shape
        out = windows_to_grid(blocks.reshape(k, w, w, p * p), p)  # (K+1, wp, wp)
    return out


def _path_offsets(drm: DeepRenderingModel, level: int, l: int) -> np.ndarray:
    """``(h, h)`` window offset, inside its level-``l`` ancestor, of the level-
    ``(l-1)`` ancestor of every level-``level`` patch unit (``l > level``)."""
    h = drm.grid_shape(level)[0]
    f = int(np.prod(drm.windows[level : l - 1]))  # patch units per level-(l-1) unit
    w = drm.windows[l - 1]
    y = np.arange(h) // f
    return (y[:, None] % w) * w + (y[None, :] % w)


def _on_path(drm: DeepRenderingModel, level: int, l: int) -> np.ndarray:
    """``(h, h, *grid_shape(l))`` bool: level-``l`` unit is an ancestor of the patch."""
    h = drm.grid_shape(level)[0]
    f = int(np.prod(drm.windows[level:l]))
    side = drm.grid_shape(l)[0]
    anc = np.arange(h) // f
    hit = anc[:, None] == np.arange(side)[None, :]  # (h, side)
    return hit[:, None, :, None] & hit[None, :, None, :]


def _patches_to_image(patches: np.ndarray) -> np.ndarray:
    """``(C, h, h, p, p)`` -> ``(C, hp, hp)``, patch ``(y, x)`` at block ``(y, x)``."""
    c, h, _, p, _ = patches.shape
    return windows_to_grid(patches.reshape(c, h, h, p * p), p)


def _finish(
    level: int,
    poses: dict[str, np.ndarray],
    states: np.ndarray,
    patches: np.ndarray,
    normalize: bool,
) -> ActivityMaximization:
    """Normalise every patch (Eq. 26) and assemble the result."""
    norms = np.sqrt(np.sum(patches**2, axis=(-2, -1)))  # (C, h, h)
    if normalize:
        safe = np.where(norms > 0, norms, 1.0)
        patches = patches / safe[..., None, None]
    return ActivityMaximization(
        images=_patches_to_image(patches),
        poses=poses,
        states=states,
        patch_norms=norms,
        scores=np.sum(norms, axis=(-2, -1)),
        level=level,
    )


def activity_maximization(
    drm: DeepRenderingModel, level: int = 1, normalize: bool = True
) -> ActivityMaximization:
    """Closed-form activity-maximising image of every class (Eqs. 26-27).

    For every class ``c`` and patch ``P`` (the receptive field of a level-``level``
    unit) finds ``g*_P = argmax_g ||mu(c, g)|_P||`` over all joint nuisances by
    max-sum recursions (module docstring; cost linear in the tree size), and sums
    the normalised patches ``mu(c, g*_P)|_P / ||mu(c, g*_P)|_P||`` (Eq. 27).

    Args:
        drm: The model.
        level: ``1..L``: the patches are level-``level`` receptive fields,
            ``p x p`` pixels with ``p = prod(windows[:level])``; ``L`` gives one
            patch (the whole image, a single pose).
        normalize: ``False`` returns ``sum_P mu(c, g*_P)|_P`` (Eq. 27's
            right-hand side, at template brightness) as ``images``.

    Returns:
        :class:`ActivityMaximization`; ``images`` ``(C, H, W)``.

    Example:
        >>> from pgm_drm.models import DeepRenderingModel
        >>> drm = DeepRenderingModel.default()
        >>> am = activity_maximization(drm)
        >>> am.images.shape, am.patch_norms.shape
        ((3, 24, 24), (3, 6, 6))
        >>> bool(np.allclose(am.scores, am.patch_norms.sum(axis=(1, 2))))
        True
    """
    level = _check_level(drm, level)
    L = drm.levels
    classes = drm.n_classes
    energy, best = subtree_max_energy(drm)
    h = drm.grid_shape(level)[0]

    # Step 2, bottom-up along every patch's path: V_l(k) for the level-l ancestor.
    value = np.broadcast_to(energy[level - 1], (h, h) + energy[level - 1].shape)
    path_arg = {}
    for l in range(level + 1, L + 1):
        table = np.asarray(drm.placement_table(l))  # (K+1, G, O)
        k, g, _ = table.shape
        kids = np.moveaxis(table[:, :, _path_offsets(drm, level, l)], (0, 1), (2, 3))
        e = np.take_along_axis(value, kids.reshape(h, h, k * g), axis=-1)
        e = e.reshape(h, h, k, g)  # (h, h, K_l + 1, G_l)
        value = np.max(e, axis=-1)
        path_arg[l] = np.argmax(e, axis=-1)

    # Step 3, top-down: each patch's path translations, then its state.
    rows = np.arange(h)[:, None]
    cols = np.arange(h)[None, :]
    c_grid = np.repeat(np.arange(classes), h * h).reshape(classes, h, h)
    state = c_grid
    path_g = {}
    for l in range(L, level, -1):
        g = path_arg[l][rows, cols, state]  # (C, h, h)
        path_g[l] = g
        offsets = _path_offsets(drm, level, l)
        state = np.asarray(drm.placement_table(l))[state, g, offsets]
    patch_states = state  # (C, h, h)

    # Full latents: on-path ancestors at the path translations, all else at best.
    poses: dict[str, np.ndarray] = {"c": c_grid}
    grid_state = c_grid[..., None, None]  # (C, h, h, 1, 1) level-L states
    for l in range(L, 0, -1):
        g = best[l - 1][grid_state]
        if l > level:
            g = np.where(_on_path(drm, level, l), path_g[l][..., None, None], g)
        poses[f"g{l}"] = g[..., 0, 0] if l == L else g
        if l > 1:
            w = drm.windows[l - 1]
            grid_state = np.asarray(
                windows_to_grid(np.asarray(drm.placement_table(l))[grid_state, g], w)
            )
            poses[f"a{l - 1}"] = np.ones(grid_state.shape, dtype=np.int64)
    patches = _render_unit(drm, level, best)[patch_states]  # (C, h, h, p, p)
    return _finish(level, poses, patch_states, patches, normalize)


def enumerate_nuisances(
    drm: DeepRenderingModel, max_configs: int = 1 << 14
) -> dict[str, np.ndarray]:
    """Every joint nuisance ``g`` of the tree (all translations, switches ON).

    Args:
        drm: The model.
        max_configs: Refuse (``ValueError``) models with more configurations.

    Returns:
        Latents without ``"c"``, leading dim ``N`` = number of configurations:
        ``"g{L}"`` ``(N,)``; ``"g{l}"``, ``"a{l}"`` (ones) ``(N, *grid_shape(l))``.

    Example:
        >>> import jax
        >>> from pgm_drm.models import DeepRenderingModel
        >>> drm = DeepRenderingModel.random(
        ...     jax.random.PRNGKey(0), (8, 8), levels=2, windows=(4, 2),
        ...     template_sizes=(3, 1))
        >>> enumerate_nuisances(drm)["g1"].shape  # 4 (top) * 4**4 (level 1)
        (1024, 2, 2)
    """
    L = drm.levels
    sites = [(f"g{L}", ())] + [
        (f"g{l}", drm.grid_shape(l)) for l in range(L - 1, 0, -1)
    ]
    sizes = [drm.n_nuisances[int(name[1:]) - 1] for name, _ in sites]
    counts = [int(np.prod(shape)) for _, shape in sites]
    total = int(np.prod([float(s) ** n for s, n in zip(sizes, counts, strict=True)]))
    if total > max_configs:
        raise ValueError(
            f"{total} joint nuisance configurations exceed max_configs={max_configs}"
        )
    ranges = [range(s) for s, n in zip(sizes, counts, strict=True) for _ in range(n)]
    configs = np.array(list(itertools.product(*ranges)), dtype=np.int64)
    configs = configs.reshape(total, sum(counts))
    latents: dict[str, np.ndarray] = {}
    start = 0
    for (name, shape), k in zip(sites, counts, strict=True):
        latents[name] = configs[:, start : start + k].reshape((total,) + shape)
        start += k
    for l in range(1, L):
        latents[f"a{l}"] = np.ones((total,) + drm.grid_shape(l), dtype=np.int64)
    return latents


def naive_activity_maximization(
    drm: DeepRenderingModel,
    level: int = 1,
    normalize: bool = True,
    max_configs: int = 1 << 14,
) -> ActivityMaximization:
    """Twin of :func:`activity_maximization` by enumerating every joint nuisance.

    Lists every ``g`` (all units' translations, switches ON) with
    :func:`enumerate_nuisances`, renders ``mu(c, g)`` with ``drm.render`` and takes
    ``argmax_g ||mu(c, g)|_P||`` patch by patch (Eq. 26). Tiny DRMs only.

    Args:
        drm: The model.
        level: As in :func:`activity_maximization`.
        normalize: As in :func:`activity_maximization`.
        max_configs: Refuse (``ValueError``) models with more joint nuisances.

    Returns:
        :class:`ActivityMaximization` (ties may pick other poses than the fast
        routine; values agree).

    Example:
        >>> import jax
        >>> from pgm_drm.models import DeepRenderingModel
        >>> drm = DeepRenderingModel.random(
        ...     jax.random.PRNGKey(0), (8, 8), levels=2, windows=(4, 2),
        ...     template_sizes=(3, 1))
        >>> naive = naive_activity_maximization(drm)
        >>> fast = activity_maximization(drm)
        >>> bool(np.allclose(naive.patch_norms, fast.patch_norms))
        True
    """
    level = _check_level(drm, level)
    L = drm.levels
    latents = enumerate_nuisances(drm, max_configs)
    n = latents[f"g{L}"].shape[0]
    h = drm.grid_shape(level)[0]
    p = drm.image_shape[0] // h
    classes = drm.n_classes
    poses = {name: [] for name in latents} | {"c": []}
    chosen_patches, states = [], []
    for c in range(classes):
        mu = np.asarray(drm.render(latents | {"c": np.full(n, c)}))  # (N, H, W)
        blocks = windows(mu, p).reshape(n, h, h, p, p)
        energy = np.sum(blocks**2, axis=(-2, -1))  # (N, h, h)
        best = np.argmax(energy, axis=0)  # (h, h)
        chosen_patches.append(blocks[best, np.arange(h)[:, None], np.arange(h)])
        for name, v in latents.items():
            poses[name].append(v[best])
        poses["c"].append(np.full((h, h), c))
        if level == L:
            states.append(np.full((h, h), c))
        else:
            s = np.asarray(
                drm.unit_states(
                    {k: v[best] for k, v in latents.items()} | {"c": np.full((h, h), c)}
                )[f"s{level}"]
            )
            states.append(
                s[
                    np.arange(h)[:, None],
                    np.arange(h),
                    np.arange(h)[:, None],
                    np.arange(h),
                ]
            )
    poses = {k: np.asarray(np.stack(v)) for k, v in poses.items()}
    return _finish(
        level,
        poses,
        np.asarray(np.stack(states)),
        np.asarray(np.stack(chosen_patches)),
        normalize,
    )


def plot_activity_maximization(
    drm: DeepRenderingModel,
    result: ActivityMaximization,
    ncols: int | None = None,
    cmap: str = "gray",
    show_patches: bool = True,
) -> plt.Figure:
    """One panel per class: ``I*(c)`` of Eq. 27, patch boundaries dotted.

    Args:
        drm: The model ``result`` was computed for.
        result: From :func:`activity_maximization`.
        ncols: Panels per row (default: all classes in one row).
        cmap: Matplotlib colormap.
        show_patches: Draw the patch grid of ``result.level``.

    Returns:
        The figure.

    Example:
        >>> from pgm_drm.models import DeepRenderingModel
        >>> drm = DeepRenderingModel.default()
        >>> fig = plot_activity_maximization(drm, activity_maximization(drm))
        >>> len(fig.axes)
        3
        >>> plt.close(fig)
    """
    images = np.asarray(result.images)
    n = images.shape[0]
    ncols = n if ncols is None else max(1, min(int(ncols), n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.2 * ncols, 2.4 * nrows), squeeze=False
    )
    p = int(np.prod(drm.windows[: result.level]))
    side = images.shape[-1]
    lim = float(np.max(np.abs(images))) or 1.0
    low = -lim if float(np.min(images)) < 0 else 0.0
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.set_axis_off()
            continue
        ax.imshow(images[k], cmap=cmap, vmin=low, vmax=lim)
        if show_patches and p < side:
            for edge in range(p, side, p):
                ax.axhline(edge - 0.5, color="tab:orange", lw=0.5, ls=":")
                ax.axvline(edge - 0.5, color="tab:orange", lw=0.5, ls=":")
        ax.set_title(f"c={k}  score={float(result.scores[k]):.2f}", fontsize=8)
    fig.suptitle(f"activity maximization (Eq. 27), level-{result.level} patches")
    fig.tight_layout()
    return fig
