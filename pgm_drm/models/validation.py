"""Input checks shared by the models: clear errors naming the problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from pgm_drm._typing import Array, ArrayLike

__all__ = [
    "check_finite_images",
    "check_finite_log_z",
    "check_images",
    "check_prior",
    "check_probability",
]

#: Tolerance on ``sum(prior) == 1``: priors typed by hand in float32 carry ~1e-7
#: rounding per entry; 1e-5 accepts those and rejects real mistakes.
PRIOR_ATOL = 1e-5


def check_prior(p: ArrayLike, name: str, size: int | None = None) -> Array:
    """A probability vector: finite, >= 0, sums to 1 (within :data:`PRIOR_ATOL`).

    Returned renormalised to sum to 1 in its own dtype: NumPyro's Categorical
    checks its probabilities at 1e-6, tighter than :data:`PRIOR_ATOL`, and would
    otherwise fail deep inside a model that this check accepted.
    """
    arr = np.asarray(p, dtype=float)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-d probability vector, got shape {arr.shape}"
        )
    if size is not None and arr.shape[0] != size:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf values")
    if np.any(arr < 0):
        raise ValueError(f"{name} has negative entries: {arr.tolist()}")
    if abs(arr.sum() - 1.0) > PRIOR_ATOL:
        raise ValueError(f"{name} must sum to 1, sums to {arr.sum():.6g}")
    out = jnp.asarray(p)
    if not jnp.issubdtype(out.dtype, jnp.floating):
        out = jnp.asarray(arr)
    return out / jnp.sum(out)


def check_probability(p: float, name: str) -> float:
    """A single probability in [0, 1]."""
    v = float(p)
    if not np.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return v


@jax.jit
def all_finite(x: Array) -> Array:
    """``all(isfinite(x))`` as one fused reduction (eager ``jnp`` would
    materialise the whole boolean mask first)."""
    return jnp.all(jnp.isfinite(x))


def check_images(
    images: ArrayLike,
    image_shape: tuple[int, ...],
    values: bool = True,
    dtype: DTypeLike | None = None,
) -> tuple[Array, bool]:
    """One image or a batch: right shape, real and (``values``) finite.

    ``values=False`` checks the shape and dtype only, for a caller that checks the
    values itself (``DeepRenderingModel.infer`` checks them only when a result
    is not finite).

    Integer and bool images (e.g. ``uint8`` pixels) are converted to ``dtype``,
    the model's floating dtype (default: JAX's default float dtype): the models'
    ``||I||^2`` and ``-2 <I | mu>`` terms would otherwise be computed in the
    image's integer dtype, where they wrap around. Floating images are returned
    as given.

    Returns:
        The images as ``(N, *image_shape)`` and whether a single image was given.
    """
    x = images if isinstance(images, jax.Array) else jnp.asarray(images)
    if x.shape == image_shape:
        x, single = x[None], True
    elif x.shape[1:] == image_shape:
        single = False
    else:
        raise ValueError(
            f"image has shape {x.shape}; the model renders images of shape "
            f"{image_shape} (or a batch (N, *{image_shape}))"
        )
    if getattr(x.dtype, "kind", "") == "c":  # jnp.iscomplexobj, without its dispatch
        raise ValueError(f"image is complex ({x.dtype}); give real pixel values")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float) if dtype is None else dtype)
    # Values are checked when they are concrete; under jit (traced images) only the
    # shape can be, and the caller's concrete inputs were checked on the way in.
    if values and not isinstance(x, jax.core.Tracer):
        check_finite_images(x)
    return x, single


def check_finite_images(x: Array) -> None:
    """Refuse images with a NaN or infinite pixel."""
    if not bool(all_finite(x)):
        raise ValueError("image contains NaN or inf values")


def check_finite_log_z(log_z: ArrayLike, images: Array) -> None:
    """Refuse a batch whose ``log Z`` is not finite, naming the cause.

    A NaN or infinite pixel is refused by :func:`check_finite_images`. With
    finite pixels a non-finite ``log Z`` means the scores overflowed their dtype
    (``||I||^2 / (2 sigma^2)`` past float32's 3.4e38 for pixels near 1e19): the
    class posterior would be NaN and every argmax class 0, silently.

    Args:
        log_z: ``(N,)`` per-image ``log Z`` of ``images`` ``(N, *image_shape)``.
        images: The checked images the scores came from.
    """
    if isinstance(log_z, jax.core.Tracer):  # under jit: cannot be read
        return
    z = np.asarray(log_z).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(z))
    if bad.size == 0:
        return
    check_finite_images(images)
    shown = bad[:10].tolist()
    more = f" and {bad.size - len(shown)} more" if bad.size > len(shown) else ""
    wider = (
        ""
        if z.dtype == np.float64
        else ", or use float64 (jax.config.update('jax_enable_x64', True))"
    )
    raise ValueError(
        f"log Z is not finite ({z[bad[0]]}) for images {shown}{more} although "
        f"their pixels are finite: the scores overflowed {z.dtype} (pixels too "
        f"large for sigma); rescale the images{wider}"
    )
