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

The network family (:class:`DCNNet`, a pytree of :class:`DCNLayer` weights run
by the DRM's own pass, :func:`pgm_drm.models.maxsum.bottom_up`: the relaxation is
that pass with free weights): level ``l`` reads
``w_l x w_l`` windows of the level below at stride ``s_l`` (``s_l = w_l`` is the
tree DRM; ``s_l < w_l`` overlaps), has ``K_l`` units with ``G_l`` pieces each,

    z_l[k] = reduce_T over g of ( sum_{o, i} W_l[k, g, o, i] h_{l-1}[o, i] + b_l[k, g] )
    h_l[k] = act_T(z_l[k])   (l < L),    scores[c] = z_L[c],

where ``act_0 = ReLU``. The top level covers the whole grid (one unit, the
class). A *dense* net reads the flattened image as one window: the max-out
network ``max_g <w_cg | I> + b_cg`` of the shallow RM (Prop. A.1).

* :func:`init_from_rm`: the RM's MS-RMC (or SP-RMC) scores, exactly.
* :func:`init_from_drm`: the DRM's DCN-form class scores, exactly up to a
  per-image constant (the dropped ``-||I||^2 / 2 sigma^2`` terms and the OFF
  branches' constants), so the relaxation starts at the generative model.
* :func:`init_random`: He-style random filters for any structure.
* :func:`fit_discriminative`: optax Adam(W), minibatches, jitted epochs,
  optional early stopping on a validation split of the training data; the
  epochs are the steps of :func:`~pgm_drm.learning.loop.run_loop` (state:
  :class:`RelaxationState`), so the fit checkpoints and resumes like EM.

The label-budget curve of §2.7 (generative vs relaxed as labels grow) is an
experiment: :func:`pgm_drm.experiments.label_budget_curve`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgm_drm._random import np_rng
from pgm_drm._typing import Array, ArrayLike, PRNGKey, Semiring
from pgm_drm.learning.io import fingerprint
from pgm_drm.learning.loop import Algorithm, LoopOptions, check_n_iter, run_loop
from pgm_drm.models.drm import DeepRenderingModel
from pgm_drm.models.maxsum import bottom_up, windows
from pgm_drm.models.pytree import pytree_model, replace
from pgm_drm.models.rendering import RenderingModel
from pgm_drm.models.validation import check_images
from pgm_drm.semiring import reduce_t, resolve_temperature

__all__ = [
    "DCNLayer",
    "DCNNet",
    "DiscriminativeFit",
    "RelaxationState",
    "as_net",
    "calibrate_scale",
    "class_scores",
    "fit_discriminative",
    "init_from_drm",
    "init_from_rm",
    "init_random",
    "predict",
    "predict_proba",
    "stratified_split",
]


# ---- the network family --------------------------------------------------------
class DCNLayer(NamedTuple):
    """One level's free weights: ``w`` ``(K, G, w*w, C_in)`` filters, ``b``
    ``(K, G)`` biases."""

    w: Array
    b: Array


@pytree_model(static=("image_shape", "windows", "strides", "temperature", "dense"))
@dataclass(frozen=True, eq=False)
class DCNNet:
    """The relaxation: a DCN-form model with free weights, run by the DRM's own
    pass (:func:`pgm_drm.models.maxsum.bottom_up`).

    A JAX pytree: the :class:`DCNLayer` weights are the leaves (what Adam
    trains), the rest is static structure.

    Args:
        layers: One :class:`DCNLayer` per level.
        image_shape: Shape of one input image.
        windows: Per level, the window side ``w_l`` (in units of the level below).
        strides: Per level, the stride ``s_l`` between windows (``= w_l``: tree).
        temperature: ``T`` of the pooling and switch reductions (0: max, ReLU).
        dense: Level 1 reads the whole flattened image as one window
            (``windows == strides == (1,)``; any ``image_shape``).

    Raises:
        ValueError: The weights do not fit the windows, or the top level is not
            one unit.
    """

    layers: tuple[DCNLayer, ...]
    image_shape: tuple[int, ...]
    windows: tuple[int, ...]
    strides: tuple[int, ...]
    temperature: float = 0.0
    dense: bool = False

    def __post_init__(self) -> None:
        for name in ("image_shape", "windows", "strides"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "dense", bool(self.dense))
        object.__setattr__(
            self, "layers", tuple(DCNLayer(*layer) for layer in self.layers)
        )
        if len(self.windows) != len(self.strides) or not self.windows:
            raise ValueError("windows and strides must be non-empty and equally long")
        if self.dense:
            if self.windows != (1,) or self.strides != (1,):
                raise ValueError("a dense net has windows == strides == (1,)")
        elif len(self.image_shape) != 2 or self.image_shape[0] != self.image_shape[1]:
            raise ValueError(f"a grid net needs square images, got {self.image_shape}")
        side = 1 if self.dense else self.image_shape[0]
        for w, s in zip(self.windows, self.strides, strict=True):
            if w > side or (side - w) % s:
                raise ValueError(
                    f"window {w} with stride {s} does not tile a grid of side {side}"
                )
            side = (side - w) // s + 1
        if side != 1:
            raise ValueError(f"the top level must be one unit, got a {side}^2 grid")
        if len(self.layers) != len(self.windows):
            raise ValueError(
                f"{len(self.windows)} levels need {len(self.windows)} layers, "
                f"got {len(self.layers)}"
            )
        c_in = int(np.prod(self.image_shape)) if self.dense else 1
        for l, (layer, w) in enumerate(
            zip(self.layers, self.windows, strict=True), start=1
        ):
            k, g = layer.b.shape
            want = (k, g, w * w, c_in)
            if layer.w.shape != want:
                raise ValueError(
                    f"level {l}: w has shape {layer.w.shape}, expected {want}"
                )
            c_in = k

    @property
    def levels(self) -> int:
        return len(self.layers)

    @property
    def n_classes(self) -> int:
        return int(self.layers[-1].w.shape[0])

    # ---- the DCN-form pass (pgm_drm.models.maxsum) ------------------------------
    def level_scores(self, level: int, below: Array) -> Array:
        """``sum_{o, i} W_l[k, g, o, i] h_{l-1}[o, i] + b_l[k, g]``: ``(B, n, n, K,
        G)``; at level 1 ``below`` are the images ``(B, *image_shape)``."""
        if level == 1:
            b = below.shape[0]
            below = below.reshape(b, 1, 1, -1) if self.dense else below[..., None]
        layer = self.layers[level - 1]
        p = windows(below, self.windows[level - 1], self.strides[level - 1])
        return jnp.einsum("bxyoi,kgoi->bxykg", p, layer.w) + layer.b

    def level_switch(self, level: int, pooled: Array, t: float) -> Array:
        """The switch (Eq. 9), its prior folded into the free bias:
        ``reduce_T(z, 0)``, the ReLU at ``T = 0``."""
        return _act(pooled, t)

    def class_scores(self, pooled: Array) -> Array:
        """The top unit's pooled scores ``(B, 1, 1, C)`` as ``(B, C)``."""
        return pooled[:, 0, 0, :]


def _act(z: Array, t: float) -> Array:
    """The switch (Eq. 9): ``reduce_T(z, 0)``; ReLU at ``T = 0``."""
    if t == 0.0:
        return jax.nn.relu(z)
    return t * jax.nn.softplus(z / t)


def _forward(net: DCNNet, x: Array) -> Array:
    """Class scores ``(B, C)`` of images ``(B, *image_shape)`` (no checks): the
    DRM's bottom-up pass with the net's free weights."""
    pooled, _, _ = bottom_up(net, x, net.temperature)
    return net.class_scores(pooled)


_jit_forward = jax.jit(_forward)


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
    x, single = check_images(images, net.image_shape)
    s = _jit_forward(net, x.astype(net.layers[0].w.dtype))
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
    return DCNNet((DCNLayer(w, b),), rm.image_shape, (1,), (1,), t, dense=True)


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
    return DCNNet(tuple(layers), drm.image_shape, drm.windows, drm.windows, t)


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
    return DCNNet(tuple(layers), image_shape, windows, strides, temperature, dense)


def as_net(model: DCNNet | RenderingModel | DeepRenderingModel) -> DCNNet:
    """A :class:`DCNNet` from a net, an RM (:func:`init_from_rm`) or a DRM."""
    if isinstance(model, DCNNet):
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
    xs, _ = check_images(x, net.image_shape)
    ys = _check_labels(y, xs.shape[0], net.n_classes)
    logits = _jit_forward(net, xs.astype(net.layers[0].w.dtype))
    grid = 10.0 ** np.linspace(-4, 1, 51) if grid is None else np.asarray(grid)
    losses = [
        float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(a * logits, ys)))
        for a in grid
    ]
    a = float(grid[int(np.nanargmin(losses))])
    top = net.layers[-1]
    return replace(net, layers=net.layers[:-1] + (DCNLayer(a * top.w, a * top.b),))


# ---- training ---------------------------------------------------------------------
class DiscriminativeFit(NamedTuple):
    """Result of :func:`fit_discriminative`.

    Attributes:
        net: The trained network (the best validation epoch when validating).
        history: Per epoch ``(epochs_run + 1,)`` arrays (entry 0: before
            training): ``"train_loss"``, ``"train_acc"`` and, with a validation
            split, ``"val_loss"``, ``"val_acc"``; plus ``"seconds"`` (wall time
            of the epochs and their evaluations so far, 0 at entry 0; a
            resumed fit counts the epochs before the checkpoint too).
        best_epoch: Epoch whose parameters ``net`` holds.
    """

    net: DCNNet
    history: dict[str, np.ndarray]
    best_epoch: int


class RelaxationState(NamedTuple):
    """The loop state of :func:`fit_discriminative` (a pytree: checkpointed whole).

    Attributes:
        net: The current network.
        opt_state: Adam(W)'s state.
        key: PRNG key of the next epoch's shuffle.
        iteration: Epochs done.
        best_net: The best network so far (validation; else the last).
        best_score: ``(2,)`` float64, its score (lexicographic, lower is better).
        best_epoch: Its epoch.
        since: Epochs since it (for ``patience``).
        seconds: Wall time of the epochs and their evaluations.
    """

    net: DCNNet
    opt_state: Any
    key: Array
    iteration: Array
    best_net: DCNNet
    best_score: np.ndarray
    best_epoch: np.ndarray
    since: np.ndarray
    seconds: np.ndarray


def _loss(net: DCNNet, x: Array, y: Array) -> Array:
    """Eq. 25: mean ``-ln p(c_n | I_n, eta)`` (softmax cross-entropy)."""
    logits = _forward(net, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _evaluate(net: DCNNet, x, y, chunk: int = 2048) -> tuple[float, float]:
    losses, hits = [], []
    for i in range(0, x.shape[0], chunk):
        logits = _jit_forward(net, x[i : i + chunk])
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
def _make_epoch(lr: float, weight_decay: float, batch_size: int):
    """A jitted epoch: shuffle, then ``lax.scan`` the Adam step over minibatches.

    Cached per settings, and jitted with the net traced (its structure is static),
    so repeated fits of one structure reuse the compiled step.
    """
    opt = _optimizer(lr, weight_decay)
    grad = jax.value_and_grad(_loss)

    def step(carry, idx):
        net, state, x, y = carry
        loss, g = grad(net, x[idx], y[idx])
        updates, state = opt.update(g, state, net)
        return (optax.apply_updates(net, updates), state, x, y), loss

    @jax.jit
    def epoch(net, state, x, y, key):
        n = x.shape[0]
        nb = max(n // batch_size, 1)
        perm = jax.random.permutation(key, n)[: nb * batch_size]
        perm = perm.reshape(nb, -1) if n >= batch_size else perm[None]
        (net, state, _, _), losses = jax.lax.scan(step, (net, state, x, y), perm)
        return net, state, jnp.mean(losses)

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
    net_or_model: DCNNet | RenderingModel | DeepRenderingModel,
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
    loop: LoopOptions | None = None,
) -> DiscriminativeFit:
    """Train the relaxation by minibatch Adam(W) on Eq. 25's ``L_dis``.

    Args:
        net_or_model: A :class:`DCNNet`, or an RM / DRM to relax
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
        loop: Progress bar (losses and accuracies) and checkpoints
            (:class:`~pgm_drm.learning.loop.LoopOptions`; every 10 epochs by
            default); a resumed fit equals an uninterrupted one (but for
            ``"seconds"``).

    Returns:
        :class:`DiscriminativeFit`.

    Raises:
        ValueError: Bad images (shape, NaN/inf), labels or settings, or a
            checkpoint from a different fit or not consistent.

    Example:
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> rm = RenderingModel(default_templates(), sigma=0.5)
        >>> imgs, lat = rm.sample(jax.random.PRNGKey(0), 60)
        >>> from pgm_drm.learning.loop import LoopOptions
        >>> fit = fit_discriminative(rm, imgs, lat["c"], epochs=3, batch_size=20,
        ...                          loop=LoopOptions(progress=False))
        >>> fit.history["train_loss"].shape
        (4,)
    """
    net = as_net(net_or_model)
    xs, _ = check_images(x, net.image_shape)
    c = net.n_classes
    ys = _check_labels(y, xs.shape[0], c)
    epochs = check_n_iter(epochs, "epochs")
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
    dtype = net.layers[0].w.dtype
    xs = xs.astype(dtype)
    if validation is not None:
        xv, _ = check_images(validation[0], net.image_shape)
        yv = _check_labels(validation[1], xv.shape[0], c)
        xv = xv.astype(dtype)
    elif val_fraction > 0:
        tr, va = stratified_split(np.asarray(ys), val_fraction, split_key)
        xs, xv, yv, ys = xs[tr], xs[va], ys[va], ys[tr]
    else:
        xv = yv = None
    if calibrate:
        net = calibrate_scale(net, xs, ys)
    bs = int(min(batch_size, xs.shape[0]))
    epoch_fn = _make_epoch(float(lr), float(weight_decay), bs)
    names = ("train_loss", "train_acc", "seconds")
    if xv is not None:
        names += ("val_loss", "val_acc")

    def evaluate(p: DCNNet) -> dict[str, float]:
        loss, acc = _evaluate(p, xs, ys)
        out = {"train_loss": loss, "train_acc": acc}
        if xv is not None:
            out["val_loss"], out["val_acc"] = _evaluate(p, xv, yv)
        return out

    def score(h: dict[str, Any], i: int = -1) -> tuple[float, float]:
        """The (lexicographic) score to minimise of epoch ``i`` of ``h``."""
        if xv is None:
            return (h["train_loss"][i], 0.0)
        if monitor == "acc":
            return (-h["val_acc"][i], h["val_loss"][i])
        return (h["val_loss"][i], 0.0)

    first = evaluate(net)
    # Entry 0 is before training: the clock counts the epochs (and their
    # evaluations) only, and is checkpointed with them, so a resumed fit's
    # clock goes on from the checkpoint's.
    first["seconds"] = 0.0

    def init(start: DCNNet) -> RelaxationState:
        opt_state = _optimizer(float(lr), float(weight_decay)).init(start)
        zero = np.asarray(0, dtype=np.int64)
        best = np.asarray(score({k: [v] for k, v in first.items()}), np.float64)
        return RelaxationState(
            start, opt_state, key, zero, start, best, zero, zero, np.float64(0.0)
        )

    def step(st: RelaxationState) -> tuple[RelaxationState, dict[str, float]]:
        t = time.perf_counter()
        next_key, sub = jax.random.split(st.key)
        new, opt_state, _ = epoch_fn(st.net, st.opt_state, xs, ys, sub)
        info = evaluate(new)
        seconds = st.seconds + (time.perf_counter() - t)
        info["seconds"] = float(seconds)
        ep = st.iteration + 1
        sc = score({k: [v] for k, v in info.items()})
        best = (st.best_net, st.best_score, st.best_epoch, st.since)
        if np.all(np.isfinite(sc)):  # a non-finite score stops the loop
            if xv is None or sc < tuple(st.best_score.tolist()):
                best = (new, np.asarray(sc, np.float64), ep, np.zeros_like(st.since))
            else:
                best = best[:3] + (st.since + 1,)
        return RelaxationState(new, opt_state, next_key, ep, *best, seconds), info

    def stop(st: RelaxationState, h: dict[str, list[float]]) -> bool:
        if not np.all(np.isfinite(score(h))):
            return True
        return patience is not None and int(st.since) >= patience

    meta = {
        "kind": "relaxation",
        "batch_size": bs,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "monitor": monitor,
        "patience": patience,
        "data": fingerprint(xs, ys, *(() if xv is None else (xv, yv))),
    }
    out = run_loop(
        Algorithm(init=init, step=step),
        net,
        epochs,
        loop,
        history=names,
        stop=stop,
        meta=meta,
        desc="relaxation",
        default_every=10,
    )
    hist = {k: np.asarray([first[k]] + out.history[k]) for k in names}
    return DiscriminativeFit(out.state.best_net, hist, int(out.state.best_epoch))


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
