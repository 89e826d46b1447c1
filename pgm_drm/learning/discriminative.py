"""Discriminative relaxation of the RM / DRM (paper §2.7, Eq. 25; DESIGN §2, §5).

The max-sum class scores of a Rendering Model are a DCN pass (Eqs. 9, 12-13):
template matching ``<w_kg | patch> + b_kg`` (a convolution with the natural
parameters of Eq. 8), pooling over the translations ``g`` (max-pool; logsumexp at
a temperature ``T > 0``), the ON/OFF switch as a ReLU (Eq. 9; ``T * softplus(. /
T)`` at ``T > 0``), and above the first level the same with *one-hot* child
templates. The discriminative relaxation (Eq. 25, steps (c)-(e)) frees those
natural parameters -- real-valued filters ``w`` instead of ``mu / sigma^2`` and
one-hot templates, free biases ``b`` -- and maximises the conditional
log-likelihood ``sum_n ln p(c_n | I_n, eta)`` (softmax cross-entropy) by SGD.

The network family (:class:`DCNSpec`, :class:`DCNParams`): level ``l`` reads
``w_l x w_l`` windows of the level below at stride ``s_l`` (``s_l = w_l`` is the
tree DRM; ``s_l < w_l`` overlaps), has ``K_l`` units with ``G_l`` pieces each,

    z_l[k] = reduce_T over g of ( sum_{o, i} W_l[k, g, o, i] h_{l-1}[o, i] + b_l[k, g] )
    h_l[k] = act_T(z_l[k])   (l < L),    scores[c] = z_L[c],

where ``act_0 = ReLU``. The top level covers the whole grid (one unit, the
class). A *dense* spec reads the flattened image as one window: the max-out
network ``max_g <w_cg | I> + b_cg`` of the shallow RM (Prop. A.1).

* :func:`init_from_rm`: the RM's MS-RMC (or SP-RMC) scores, exactly.
* :func:`init_from_drm`: the DRM's DCN-form class scores, exactly up to a
  per-image constant (the dropped ``-||I||^2 / 2 sigma^2`` terms and the OFF
  branches' constants), so the relaxation starts at the generative model.
* :func:`init_random`: He-style random filters for any spec.
* :func:`fit_discriminative`: optax Adam(W), minibatches, jitted epochs,
  optional early stopping on a validation split of the training data.
* :func:`label_budget_curve` / :func:`plot_label_budget`: the bias-variance
  trade-off of §2.7 (generative wins with few labels, discriminative with many).
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from pgm_drm._random import np_rng
from pgm_drm._typing import Array, ArrayLike, PRNGKey, Semiring
from pgm_drm.learning.em import fit_em
from pgm_drm.models.drm import DeepRenderingModel
from pgm_drm.models.rendering import RenderingModel
from pgm_drm.models.validation import check_images
from pgm_drm.semiring import reduce_t, resolve_temperature

__all__ = [
    "DCNLayer",
    "DCNNet",
    "DCNParams",
    "DCNSpec",
    "DiscriminativeFit",
    "LabelBudgetResult",
    "as_net",
    "calibrate_scale",
    "check_spec",
    "class_scores",
    "fit_discriminative",
    "init_from_drm",
    "init_from_rm",
    "init_random",
    "label_budget_curve",
    "plot_label_budget",
    "predict",
    "predict_proba",
    "stratified_split",
]


# ---- the network family --------------------------------------------------------
class DCNSpec(NamedTuple):
    """Static structure of a DCN-form network (hashable; a jit static argument).

    Attributes:
        image_shape: Shape of one input image.
        windows: Per level, the window side ``w_l`` (in units of the level below).
        strides: Per level, the stride ``s_l`` between windows (``= w_l``: tree).
        temperature: ``T`` of the pooling and switch reductions (0: max, ReLU).
        dense: Level 1 reads the whole flattened image as one window
            (``windows == strides == (1,)``; any ``image_shape``).
    """

    image_shape: tuple[int, ...]
    windows: tuple[int, ...]
    strides: tuple[int, ...]
    temperature: float = 0.0
    dense: bool = False


class DCNLayer(NamedTuple):
    """One level: ``w`` ``(K, G, w*w, C_in)`` filters, ``b`` ``(K, G)`` biases."""

    w: Array
    b: Array


class DCNParams(NamedTuple):
    """The free natural parameters ``eta`` of Eq. 25: one :class:`DCNLayer` a level."""

    layers: tuple[DCNLayer, ...]


class DCNNet(NamedTuple):
    """A network: trainable ``params`` (a pytree) and its static ``spec``."""

    params: DCNParams
    spec: DCNSpec

    @property
    def n_classes(self) -> int:
        return int(self.params.layers[-1].w.shape[0])


def _grid_sides(spec: DCNSpec) -> list[int]:
    """Side of the unit grid below each level (index 0: the input map)."""
    side = 1 if spec.dense else int(spec.image_shape[0])
    sides = [side]
    for w, s in zip(spec.windows, spec.strides, strict=True):
        if w > side or (side - w) % s:
            raise ValueError(
                f"window {w} with stride {s} does not tile a grid of side {side}"
            )
        side = (side - w) // s + 1
        sides.append(side)
    return sides


def check_spec(spec: DCNSpec, params: DCNParams) -> None:
    """Raise ValueError unless ``params`` fit ``spec`` and the top is one unit."""
    if len(spec.windows) != len(spec.strides) or not spec.windows:
        raise ValueError("windows and strides must be non-empty and equally long")
    if spec.dense:
        if spec.windows != (1,) or spec.strides != (1,):
            raise ValueError("a dense spec has windows == strides == (1,)")
    elif len(spec.image_shape) != 2 or spec.image_shape[0] != spec.image_shape[1]:
        raise ValueError(f"a grid spec needs square images, got {spec.image_shape}")
    sides = _grid_sides(spec)
    if sides[-1] != 1:
        raise ValueError(f"the top level must be one unit, got a {sides[-1]}^2 grid")
    if len(params.layers) != len(spec.windows):
        raise ValueError(
            f"{len(spec.windows)} levels need {len(spec.windows)} layers, "
            f"got {len(params.layers)}"
        )
    c_in = int(np.prod(spec.image_shape)) if spec.dense else 1
    for l, (layer, w) in enumerate(
        zip(params.layers, spec.windows, strict=True), start=1
    ):
        k, g = layer.b.shape
        want = (k, g, w * w, c_in)
        if layer.w.shape != want:
            raise ValueError(f"level {l}: w has shape {layer.w.shape}, expected {want}")
        c_in = k


def _patches(h: Array, w: int, s: int) -> Array:
    """``(B, H, H, C)`` -> ``(B, n, n, w*w, C)`` windows at stride ``s``.

    Offset ``o = r * w + c`` inside a window, as in
    :func:`pgm_drm.inference.dcn.windows_of` and ``placement_table``.
    """
    b, side = h.shape[:2]
    n = (side - w) // s + 1
    if w == side:
        return h.reshape(b, 1, 1, w * w, h.shape[-1])
    if w == s:  # non-overlapping: a reshape (the tree DRM)
        x = h.reshape(b, n, w, n, w, h.shape[-1])
        return jnp.moveaxis(x, 2, 3).reshape(b, n, n, w * w, h.shape[-1])
    idx = s * np.arange(n)[:, None] + np.arange(w)[None, :]  # (n, w)
    x = h[:, idx[:, None, :, None], idx[None, :, None, :], :]  # (B,n,n,w,w,C)
    return x.reshape(b, n, n, w * w, h.shape[-1])


def _act(z: Array, t: float) -> Array:
    """The switch (Eq. 9): ``reduce_T(z, 0)``; ReLU at ``T = 0``."""
    if t == 0.0:
        return jax.nn.relu(z)
    return t * jax.nn.softplus(z / t)


def _forward(params: DCNParams, spec: DCNSpec, x: Array) -> Array:
    """Class scores ``(B, C)`` of images ``(B, *image_shape)`` (no checks)."""
    b = x.shape[0]
    h = x.reshape(b, 1, 1, -1) if spec.dense else x[..., None]
    t = spec.temperature
    n_levels = len(params.layers)
    for l, layer in enumerate(params.layers):
        p = _patches(h, spec.windows[l], spec.strides[l])  # (B,n,n,O,Ci)
        u = jnp.einsum("bxyoi,kgoi->bxykg", p, layer.w) + layer.b  # template match
        z = reduce_t(u, (4,), t)  # pool over translations g (Eq. 12)
        h = z if l == n_levels - 1 else _act(z, t)
    return h[:, 0, 0, :]


_jit_forward = jax.jit(_forward, static_argnums=(1,))


def class_scores(net: DCNNet, images: ArrayLike) -> Array:
    """Class scores (logits) ``(N, C)`` (or ``(C,)`` for one image).

    Example:
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> rm = RenderingModel(default_templates(), sigma=0.5)
        >>> net = init_from_rm(rm)
        >>> x = default_templates()[:, 0]
        >>> bool(jnp.allclose(class_scores(net, x), rm.class_log_scores(x)))
        True
    """
    x, single = check_images(images, tuple(net.spec.image_shape))
    s = _jit_forward(net.params, net.spec, x.astype(net.params.layers[0].w.dtype))
    return s[0] if single else s


def predict_proba(net: DCNNet, images: ArrayLike) -> Array:
    """``p(c | I, eta)`` (softmax of the class scores), ``(N, C)`` rows sum to 1."""
    return jax.nn.softmax(class_scores(net, images), axis=-1)


def predict(net: DCNNet, images: ArrayLike) -> Array:
    """Class decisions ``argmax_c`` of the scores, ``(N,)`` (``()`` for one image)."""
    return jnp.argmax(class_scores(net, images), axis=-1)


# ---- initialisations -------------------------------------------------------------
def init_from_rm(rm: RenderingModel, semiring: Semiring = "max") -> DCNNet:
    """The max-out network of the RM's MS-RMC (Eq. 6) / SP-RMC (Eq. 5), Prop. A.1.

    ``w_cg = mu_cg / sigma^2``, ``b_cg`` of Eq. 8; with the switch one more
    piece per class with zero filter and bias ``reduce_g(ln pi_OFF pi_c pi_g)``
    (the OFF branch of Eq. 9), so the scores equal ``rm.class_log_scores``.

    Returns:
        A dense :class:`DCNNet` with one layer ``w`` ``(C, G[+1], 1, D)``.
    """
    t = resolve_temperature(semiring, None)
    w, b = rm.natural_parameters()
    c, g = b.shape
    d = int(np.prod(rm.image_shape))
    w = w.reshape(c, g, 1, d)
    if rm.switch_prior is not None:
        off = (
            jnp.log1p(-rm.switch_prior)
            + jnp.log(rm.class_prior)[:, None]
            + jnp.log(rm.nuisance_prior)[None, :]
        )
        w = jnp.concatenate([w, jnp.zeros((c, 1, 1, d), w.dtype)], axis=1)
        b = jnp.concatenate([b, reduce_t(off, (1,), t)[:, None]], axis=1)
    spec = DCNSpec(tuple(rm.image_shape), (1,), (1,), t, dense=True)
    return DCNNet(DCNParams((DCNLayer(w, b),)), spec)


def init_from_drm(drm: DeepRenderingModel, semiring: Semiring = "max") -> DCNNet:
    """The DCN-form pass of a tree DRM with its weights as free parameters.

    Level 1: ``W[k, g] = mu_kg / sigma^2`` (placed pixel templates),
    ``b = -||mu_kg||^2 / 2 sigma^2 + ln pi_g``; level ``l >= 2``: ``W[k, g, o, j] =
    1[template state at o == j]`` (one-hot child templates), the OFF children
    moved into the bias (``delta * #OFF``). Below the top the switch becomes
    ``ReLU(z + ln(pi_ON / pi_OFF) - P)`` with ``P`` the pooled OFF row (Eq. 9);
    the top adds ``ln pi_c``. Each unit's message differs from
    :func:`pgm_drm.inference.dcn_infer`'s by a constant that does not depend on
    its state, so the class scores match up to a per-image constant.

    Raises:
        ValueError: A switch prior of exactly 0 or 1 (the ReLU form needs both
            branches).
    """
    t = resolve_temperature(semiring, None)
    layers = []
    delta = 0.0
    for level in range(1, drm.levels + 1):
        table = np.asarray(drm.placement_table(level))  # (K+1, G, O)
        k = drm.n_states[level - 1]
        log_pg = jnp.log(drm.nuisance_priors[level - 1])
        if level == 1:
            s2 = drm.sigma**2
            mu = jnp.asarray(table[:k])
            w = (mu / s2)[..., None]
            raw_b = -jnp.sum(mu**2, axis=-1) / (2 * s2) + log_pg
            off_raw = log_pg
        else:
            k_child = drm.n_states[level - 2]  # also the OFF state's index
            w = jnp.asarray((table[:k, :, :, None] == np.arange(k_child)).astype(float))
            n_off = jnp.asarray((table[:k] == k_child).sum(-1).astype(float))
            raw_b = delta * n_off + log_pg
            off_raw = delta * table.shape[-1] + log_pg
        if level < drm.levels:
            p = drm.switch_priors[level - 1]
            if not 0.0 < p < 1.0:
                raise ValueError(
                    f"init_from_drm needs switch priors in (0, 1); level {level} "
                    f"has {p}"
                )
            logit = float(np.log(p) - np.log1p(-p))
            b = raw_b - reduce_t(off_raw, (0,), t) + logit
            delta = _act(jnp.asarray(logit), t)
        else:
            b = raw_b + jnp.log(drm.class_prior)[:, None]
        layers.append(DCNLayer(w, b))
    spec = DCNSpec(tuple(drm.image_shape), tuple(drm.windows), tuple(drm.windows), t)
    return DCNNet(DCNParams(tuple(layers)), spec)


def init_random(
    key: PRNGKey,
    image_shape: tuple[int, ...],
    n_classes: int,
    *,
    windows: tuple[int, ...] | None = None,
    strides: tuple[int, ...] | None = None,
    states: tuple[int, ...] = (),
    pieces: tuple[int, ...] | int = 1,
    template_sizes: tuple[int | None, ...] | None = None,
    temperature: float = 0.0,
) -> DCNNet:
    """Random filters (He scale ``sqrt(2 / fan_in)``) and zero biases.

    With ``template_sizes[l] = t`` the level's ``G_l = (w_l - t + 1)**2`` pieces
    start as one random ``t x t`` template per unit placed at every translation
    inside the window -- the DRM's placement structure (``placement_table``),
    i.e. a convolution followed by max-pooling; training then unties them.

    Args:
        key: PRNG key.
        image_shape: Shape of one image (square unless dense).
        n_classes: ``C``, the units of the top level.
        windows: Per level window sides; ``None``: dense (one level, max-out).
        strides: Per level strides; default ``windows`` (a tree).
        states: ``(K_1, ..., K_{L-1})`` units below the top.
        pieces: ``G_l`` per level (an int for all levels).
        template_sizes: Per level ``t_l`` or ``None`` (free pieces); overrides
            ``pieces`` where given.
        temperature: ``T`` of pooling and switch.

    Example:
        >>> net = init_random(jax.random.PRNGKey(0), (8, 8), 10, windows=(3, 2, 3),
        ...                   strides=(1, 2, 1), states=(8, 16), pieces=2)
        >>> class_scores(net, jnp.zeros((5, 8, 8))).shape
        (5, 10)
    """
    dense = windows is None
    windows = (1,) if dense else tuple(int(w) for w in windows)
    strides = windows if strides is None or dense else tuple(int(s) for s in strides)
    sizes = tuple(int(k) for k in states) + (int(n_classes),)
    if len(sizes) != len(windows):
        raise ValueError(
            f"{len(windows)} levels need {len(windows) - 1} states, got {len(states)}"
        )
    g_all = (int(pieces),) * len(sizes) if np.ndim(pieces) == 0 else tuple(pieces)
    t_all = (None,) * len(sizes) if template_sizes is None else tuple(template_sizes)
    if len(g_all) != len(sizes) or min(g_all) < 1 or min(sizes) < 1:
        raise ValueError(f"bad pieces {pieces} or states {states}")
    if len(t_all) != len(sizes):
        raise ValueError(f"need {len(sizes)} template_sizes, got {template_sizes}")
    c_in = int(np.prod(image_shape)) if dense else 1
    keys = jax.random.split(key, len(sizes))
    layers = []
    for kk, k, g, w, t in zip(keys, sizes, g_all, windows, t_all, strict=True):
        if t is None:
            scale = np.sqrt(2.0 / (w * w * c_in))
            filt = jax.random.normal(kk, (k, g, w * w, c_in)) * scale
        else:
            if dense or not 1 <= t <= w:
                raise ValueError(f"template size {t} needs a grid window >= {t}")
            tmpl = jax.random.normal(kk, (k, t, t, c_in)) * np.sqrt(
                2.0 / (t * t * c_in)
            )
            moves = [(dy, dx) for dy in range(w - t + 1) for dx in range(w - t + 1)]
            placed = [
                jnp.zeros((k, w, w, c_in)).at[:, dy : dy + t, dx : dx + t].set(tmpl)
                for dy, dx in moves
            ]
            filt = jnp.stack(placed, axis=1).reshape(k, len(moves), w * w, c_in)
            g = len(moves)
        layers.append(DCNLayer(filt, jnp.zeros((k, g))))
        c_in = k
    spec = DCNSpec(tuple(image_shape), windows, strides, float(temperature), dense)
    params = DCNParams(tuple(layers))
    check_spec(spec, params)
    return DCNNet(params, spec)


def as_net(model: DCNNet | RenderingModel | DeepRenderingModel) -> DCNNet:
    """A :class:`DCNNet` from a net, an RM (:func:`init_from_rm`) or a DRM."""
    if isinstance(model, DCNNet):
        check_spec(model.spec, model.params)
        return model
    if isinstance(model, RenderingModel):
        return init_from_rm(model)
    if isinstance(model, DeepRenderingModel):
        return init_from_drm(model)
    raise TypeError(
        f"expected a DCNNet, RenderingModel or DeepRenderingModel, got {type(model)}"
    )


def calibrate_scale(
    net: DCNNet, x: ArrayLike, y: ArrayLike, grid: ArrayLike | None = None
) -> DCNNet:
    """Temperature scaling: multiply the top layer by the factor ``a`` from
    ``grid`` (default ``10**linspace(-4, 1, 51)``) minimising the cross-entropy on
    ``(x, y)``.

    The class decisions do not change (``max_g`` is positively homogeneous), but
    a generative model with a small ``sigma`` has saturated ``p(c | I)`` (scores
    ~``1 / sigma^2``) whose gradients vanish; after scaling, Eq. 25's gradients
    are informative and Adam's step size is commensurate with the weights.
    """
    net = as_net(net)
    xs, _ = check_images(x, tuple(net.spec.image_shape))
    ys = _check_labels(y, xs.shape[0], net.n_classes)
    logits = _jit_forward(net.params, net.spec, xs.astype(net.params.layers[0].w.dtype))
    grid = 10.0 ** np.linspace(-4, 1, 51) if grid is None else np.asarray(grid)
    losses = [
        float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(a * logits, ys)))
        for a in grid
    ]
    a = float(grid[int(np.nanargmin(losses))])
    top = net.params.layers[-1]
    layers = net.params.layers[:-1] + (DCNLayer(a * top.w, a * top.b),)
    return DCNNet(DCNParams(layers), net.spec)


# ---- training ---------------------------------------------------------------------
class DiscriminativeFit(NamedTuple):
    """Result of :func:`fit_discriminative`.

    Attributes:
        net: The trained network (the best validation epoch when validating).
        history: Per epoch ``(epochs_run + 1,)`` arrays (entry 0: before
            training): ``"train_loss"``, ``"train_acc"`` and, with a validation
            split, ``"val_loss"``, ``"val_acc"``; plus ``"seconds"`` (wall time
            since the start).
        best_epoch: Epoch whose parameters ``net`` holds.
    """

    net: DCNNet
    history: dict[str, np.ndarray]
    best_epoch: int


def _loss(params: DCNParams, spec: DCNSpec, x: Array, y: Array) -> Array:
    """Eq. 25: mean ``-ln p(c_n | I_n, eta)`` (softmax cross-entropy)."""
    logits = _forward(params, spec, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _evaluate(params, spec, x, y, chunk: int = 2048) -> tuple[float, float]:
    losses, hits = [], []
    for i in range(0, x.shape[0], chunk):
        logits = _jit_forward(params, spec, x[i : i + chunk])
        yy = y[i : i + chunk]
        losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, yy))
        hits.append(jnp.argmax(logits, -1) == yy)
    return float(jnp.mean(jnp.concatenate(losses))), float(
        jnp.mean(jnp.concatenate(hits))
    )


def _optimizer(lr: float, weight_decay: float) -> optax.GradientTransformation:
    if weight_decay > 0:
        return optax.adamw(lr, weight_decay=weight_decay)
    return optax.adam(lr)


@functools.lru_cache(maxsize=32)
def _make_epoch(spec: DCNSpec, lr: float, weight_decay: float, batch_size: int):
    """A jitted epoch: shuffle, then ``lax.scan`` the Adam step over minibatches.

    Cached per (spec, settings) so repeated fits reuse the compiled step.
    """
    opt = _optimizer(lr, weight_decay)
    grad = jax.value_and_grad(_loss)

    def step(carry, idx):
        params, state, x, y = carry
        loss, g = grad(params, spec, x[idx], y[idx])
        updates, state = opt.update(g, state, params)
        return (optax.apply_updates(params, updates), state, x, y), loss

    @jax.jit
    def epoch(params, state, x, y, key):
        n = x.shape[0]
        nb = max(n // batch_size, 1)
        perm = jax.random.permutation(key, n)[: nb * batch_size]
        perm = perm.reshape(nb, -1) if n >= batch_size else perm[None]
        (params, state, _, _), losses = jax.lax.scan(step, (params, state, x, y), perm)
        return params, state, jnp.mean(losses)

    return epoch


def _check_labels(y: ArrayLike, n: int, n_classes: int) -> Array:
    arr = np.asarray(y)
    if arr.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError("labels must be integers")
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"labels must lie in 0..{n_classes - 1}, got {arr.min()}..{arr.max()}"
        )
    return jnp.asarray(arr.astype(np.int32))


def fit_discriminative(
    params_or_model: DCNNet | RenderingModel | DeepRenderingModel,
    x: ArrayLike,
    y: ArrayLike,
    *,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    key: PRNGKey | None = None,
    weight_decay: float = 0.0,
    val_fraction: float = 0.0,
    validation: tuple[ArrayLike, ArrayLike] | None = None,
    patience: int | None = None,
    monitor: str = "loss",
    calibrate: bool = False,
    progress: bool = True,
) -> DiscriminativeFit:
    """Train the relaxation by minibatch Adam(W) on Eq. 25's ``L_dis``.

    Args:
        params_or_model: A :class:`DCNNet`, or an RM / DRM to relax
            (:func:`init_from_rm` / :func:`init_from_drm`).
        x: ``(N, *image_shape)`` training images.
        y: ``(N,)`` labels in ``0..C-1``.
        epochs: Maximum number of passes over the data.
        batch_size: Minibatch size (the last partial batch of a shuffle is dropped).
        lr: Adam learning rate.
        key: PRNG key for the validation split and the shuffles (default 0).
        weight_decay: Decoupled weight decay (AdamW) on every parameter.
        val_fraction: Hold out this fraction of ``(x, y)`` (stratified) for
            validation; ignored when ``validation`` is given.
        validation: Explicit ``(x_val, y_val)``.
        patience: With validation, stop after this many epochs without a better
            validation loss; the returned net is the best epoch's. ``None``: run
            all epochs (still returning the best validation epoch).
        monitor: What "better" means on the validation split: "loss" (lower)
            or "acc" (higher accuracy, ties broken by the loss).
        calibrate: First rescale the top layer by :func:`calibrate_scale` on
            the training split (same decisions, unsaturated softmax).
        progress: tqdm bar with the loss and accuracies.

    Returns:
        :class:`DiscriminativeFit`.

    Raises:
        ValueError: Bad images (shape, NaN/inf), labels or settings.

    Example:
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> rm = RenderingModel(default_templates(), sigma=0.5)
        >>> imgs, lat = rm.sample(jax.random.PRNGKey(0), 60)
        >>> fit = fit_discriminative(rm, imgs, lat["c"], epochs=3, batch_size=20,
        ...                          progress=False)
        >>> fit.history["train_loss"].shape
        (4,)
    """
    net = as_net(params_or_model)
    spec = net.spec
    xs, _ = check_images(x, tuple(spec.image_shape))
    c = net.n_classes
    ys = _check_labels(y, xs.shape[0], c)
    if int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if not (np.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if monitor not in ("loss", "acc"):
        raise ValueError(f"monitor must be 'loss' or 'acc', got {monitor!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    key = jax.random.PRNGKey(0) if key is None else key
    key, split_key = jax.random.split(key)
    dtype = net.params.layers[0].w.dtype
    xs = xs.astype(dtype)
    if validation is not None:
        xv, _ = check_images(validation[0], tuple(spec.image_shape))
        yv = _check_labels(validation[1], xv.shape[0], c)
        xv = xv.astype(dtype)
    elif val_fraction > 0:
        tr, va = stratified_split(np.asarray(ys), val_fraction, split_key)
        xs, xv, yv, ys = xs[tr], xs[va], ys[va], ys[tr]
    else:
        xv = yv = None
    if calibrate:
        net = calibrate_scale(net, xs, ys)
    params = net.params
    state = _optimizer(float(lr), float(weight_decay)).init(params)
    bs = int(min(batch_size, xs.shape[0]))
    epoch_fn = _make_epoch(spec, float(lr), float(weight_decay), bs)
    hist: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "seconds": []}
    if xv is not None:
        hist.update(val_loss=[], val_acc=[])
    start = time.perf_counter()

    def record(p) -> tuple[float, float]:
        """Log one epoch; return the (lexicographic) score to minimise."""
        loss, acc = _evaluate(p, spec, xs, ys)
        hist["train_loss"].append(loss)
        hist["train_acc"].append(acc)
        hist["seconds"].append(time.perf_counter() - start)
        if xv is None:
            return (loss, 0.0)
        vloss, vacc = _evaluate(p, spec, xv, yv)
        hist["val_loss"].append(vloss)
        hist["val_acc"].append(vacc)
        return (-vacc, vloss) if monitor == "acc" else (vloss, 0.0)

    best = record(params)
    best_params, best_epoch, since = params, 0, 0
    bar = tqdm(range(1, int(epochs) + 1), disable=not progress, desc="relaxation")
    for ep in bar:
        key, sub = jax.random.split(key)
        params, state, _ = epoch_fn(params, state, xs, ys, sub)
        score = record(params)
        post = {"loss": f"{hist['train_loss'][-1]:.4f}"}
        post["acc"] = f"{hist['train_acc'][-1]:.3f}"
        if xv is not None:
            post["val_acc"] = f"{hist['val_acc'][-1]:.3f}"
        bar.set_postfix(post)
        if not np.all(np.isfinite(score)):
            break
        if xv is None or score < best:
            best, best_params, best_epoch, since = score, params, ep, 0
        else:
            since += 1
            if patience is not None and since >= patience:
                break
    bar.close()
    out = DCNNet(best_params, spec)
    return DiscriminativeFit(
        out, {k: np.asarray(v) for k, v in hist.items()}, best_epoch
    )


def stratified_split(
    y: np.ndarray, fraction: float, key: PRNGKey
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, held_out)``: ``round(fraction * n_c)`` of each class held out
    (at least one of every class with two or more images)."""
    rng = np_rng(key)
    tr, va = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        m = int(round(fraction * len(idx)))
        m = max(m, 1) if len(idx) > 1 else 0
        va.append(idx[:m])
        tr.append(idx[m:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


# ---- the generative classifier and the label-budget curve ----------------------------
class LabelBudgetResult(NamedTuple):
    """Test accuracies per label budget (§2.7's bias-variance trade-off).

    Attributes:
        n_labels: ``(B,)`` labelled training images used.
        generative: ``(B, R)`` test accuracy of the RM's MS-RMC, per repeat.
        discriminative: ``(B, R)`` of its relaxation trained on the same labels.
    """

    n_labels: np.ndarray
    generative: np.ndarray
    discriminative: np.ndarray


def _budget_subset(y: np.ndarray, n: int, n_classes: int, rng) -> np.ndarray:
    """``n`` indices, as balanced over classes as possible (>= 1 per class)."""
    per = [rng.permutation(np.flatnonzero(y == c)) for c in range(n_classes)]
    take = [min(len(p), max(1, n // n_classes)) for p in per]
    chosen = [p[:t] for p, t in zip(per, take, strict=True)]
    rest = rng.permutation(
        np.concatenate([p[t:] for p, t in zip(per, take, strict=True)])
    )
    extra = max(n - sum(take), 0)
    return np.sort(np.concatenate(chosen + [rest[:extra]]))


def label_budget_curve(
    n_labels: tuple[int | None, ...] = (20, 50, 100, 200, 500, None),
    *,
    data: Any = None,
    n_nuisances: int = 10,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    repeats: int = 1,
    key: PRNGKey | None = None,
    progress: bool = True,
) -> LabelBudgetResult:
    """Generative RM vs its discriminative relaxation as labels grow (§2.7).

    For each budget ``n`` (``None``: every training label) and repeat: draw a
    class-balanced subset of ``n`` labelled training images, fit the RM with
    :func:`pgm_drm.learning.fit_em` (supervised hard EM, Eqs. 16-17 with ``c``
    clamped by the labels; ``G = n_nuisances`` templates per class; ``sigma``
    floored at 0.05 so that tiny budgets do not collapse onto their images),
    then relax it (:func:`init_from_rm`) and train on the same ``n`` images for
    ``steps`` minibatch steps (no validation split: the budget is all the labels there
    are), after temperature-scaling its saturated scores
    (:func:`calibrate_scale`, which keeps the generative decisions).

    Args:
        n_labels: Budgets; ``None`` for all.
        data: A :class:`pgm_drm.data.DigitsSplit`-like 4-tuple; default
            :func:`pgm_drm.data.load_digits_split`.
        n_nuisances: ``G``.
        steps: Adam steps per fit (epochs = ``ceil(steps * batch / n)``).
        batch_size, lr, weight_decay: As :func:`fit_discriminative`.
        repeats: Independent subsets per budget.
        key: PRNG key.
        progress: An outer tqdm bar over the fits.

    Returns:
        :class:`LabelBudgetResult`.
    """
    if data is None:
        from pgm_drm.data import load_digits_split

        data = load_digits_split()
    x_tr, y_tr, x_te, y_te = (np.asarray(a) for a in data)
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    key = jax.random.PRNGKey(0) if key is None else key
    budgets = [len(y_tr) if n is None else min(int(n), len(y_tr)) for n in n_labels]
    gen = np.zeros((len(budgets), repeats))
    dis = np.zeros((len(budgets), repeats))
    bar = tqdm(total=len(budgets) * repeats, disable=not progress, desc="budgets")
    for i, n in enumerate(budgets):
        for r in range(repeats):
            key, k_sub, k_gen, k_fit = jax.random.split(key, 4)
            rng = np_rng(k_sub)
            idx = _budget_subset(y_tr, n, n_classes, rng)
            rm = fit_em(
                x_tr[idx],
                n_classes,
                n_nuisances,
                mode="hard",
                labels=y_tr[idx],
                n_iter=30,
                key=k_gen,
                min_sigma=0.05,
                progress=False,
            ).model
            gen[i, r] = float(np.mean(np.asarray(rm.classify(x_te)) == y_te))
            bs = min(batch_size, len(idx))
            epochs = int(np.ceil(steps / max(len(idx) // bs, 1)))
            fit = fit_discriminative(
                rm,
                x_tr[idx],
                y_tr[idx],
                epochs=epochs,
                batch_size=bs,
                lr=lr,
                weight_decay=weight_decay,
                key=k_fit,
                calibrate=True,
                progress=False,
            )
            dis[i, r] = float(np.mean(np.asarray(predict(fit.net, x_te)) == y_te))
            bar.set_postfix(n=n, gen=f"{gen[i, r]:.3f}", dis=f"{dis[i, r]:.3f}")
            bar.update()
    bar.close()
    return LabelBudgetResult(np.asarray(budgets), gen, dis)


def plot_label_budget(result: LabelBudgetResult, ax: Any = None):
    """Test accuracy vs number of labels, generative vs discriminative.

    Returns:
        The matplotlib ``Figure`` (mean over repeats, min-max band).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    n = result.n_labels
    for name, acc, style in (
        ("generative (RM, MS-RMC)", result.generative, "o-"),
        ("discriminative relaxation", result.discriminative, "s-"),
    ):
        ax.plot(n, acc.mean(1), style, label=name)
        if acc.shape[1] > 1:
            ax.fill_between(n, acc.min(1), acc.max(1), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test accuracy")
    ax.set_title("Generative vs discriminative (§2.7)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
