"""Sampling and inference recipes: the ``pgm-drm sample`` and ``infer`` commands.

:func:`default_model` names the default models (or loads a saved one, checking
that it is of the class its name stands for); :func:`load_images` reads and
validates the images of an npz file; :func:`run_sample` samples images and
latents; :func:`run_infer` runs max-sum / sum-product on images from an npz file
(the DRM's DCN-form pass, the compiled exact schedule for the others). Bad input
(a model file of another kind, an empty batch, a file that is not an npz with
real ``images`` of the model's shape) raises ``ValueError`` or ``OSError`` with a
message that names it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import jax
import matplotlib.pyplot as plt
import numpy as np

from pgm_drm.diagnostics import plot_samples
from pgm_drm.graph import compile_model
from pgm_drm.inference import infer
from pgm_drm.learning import load_model
from pgm_drm.models import (
    ConvRenderingModel,
    DeepRenderingModel,
    EvolutionaryDRM,
    RenderingModel,
    check_images,
    default_templates,
)
from pgm_drm.semiring import resolve_temperature

__all__ = [
    "CLASSES",
    "MODELS",
    "default_model",
    "load_images",
    "model_kind",
    "run_infer",
    "run_sample",
]

#: The default models ``sample`` and ``infer`` know by name.
MODELS = ("rm", "drm", "conv-drm", "edrm")
#: The class each name of :data:`MODELS` stands for.
CLASSES: dict[str, type] = {
    "rm": RenderingModel,
    "drm": DeepRenderingModel,
    "conv-drm": ConvRenderingModel,
    "edrm": EvolutionaryDRM,
}


def _a(cls: type) -> str:
    """``"a RenderingModel"``, ``"an EvolutionaryDRM"``."""
    return ("an " if cls.__name__[0] in "AEIOU" else "a ") + cls.__name__


def model_kind(model: Any) -> str:
    """The name in :data:`MODELS` of ``model``'s class; the class name for the
    classes without one (``FactorRenderingModel``)."""
    names = {cls: name for name, cls in CLASSES.items()}
    return names.get(type(model), type(model).__name__)


def default_model(name: str | None = "rm", path: Path | None = None) -> Any:
    """The model a command works on: the one saved at ``path`` (by ``fit``), or
    the default model ``name`` (one of :data:`MODELS`; ``None``: ``"rm"``).

    With both, the file must hold the class ``name`` stands for (``ValueError``
    otherwise); with ``name=None`` any model file is taken as it is.
    """
    if name is not None and name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if path is not None:
        model = load_model(path)
        want = CLASSES[name] if name is not None else type(model)
        if type(model) is not want:
            raise ValueError(
                f"the model file {path} holds {_a(type(model))}; --model {name} "
                f"needs {_a(want)} ("
                + (
                    f"give --model {model_kind(model)} or leave --model out)"
                    if model_kind(model) in MODELS
                    else "leave --model out)"
                )
            )
        return model
    if name in ("rm", None):
        return RenderingModel(default_templates(8), sigma=0.35, switch_prior=0.9)
    if name == "drm":
        return DeepRenderingModel.default()
    if name == "conv-drm":
        return ConvRenderingModel.random(jax.random.PRNGKey(0), stride=2, sigma=0.5)
    return EvolutionaryDRM.default()


def load_images(path: Path, image_shape: tuple[int, ...]) -> np.ndarray:
    """The ``images`` array of the npz file ``path`` as a batch
    ``(N, *image_shape)`` with ``N >= 1``: real (integer or float), finite
    pixels; one image of ``image_shape`` is a batch of one.

    Raises:
        OSError: ``path`` cannot be read (no such file, a folder).
        ValueError: Not an npz file, no ``images`` array in it, or images of
            another dtype or shape, non-finite, or none at all.
    """
    try:
        f = np.load(path, allow_pickle=False)
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"{path} is not an .npz archive numpy can read") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is an .npy array; give an .npz with 'images'")
    with f:
        if "images" not in f.files:
            raise ValueError(f"{path} has no array named 'images' (it has {f.files})")
        try:
            images = f["images"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read 'images' from {path} ({e})") from None
    if not (
        np.issubdtype(images.dtype, np.integer)
        or np.issubdtype(images.dtype, np.floating)
    ):
        raise ValueError(
            f"'images' in {path} has dtype {images.dtype}; give real pixel values"
        )
    x, _ = check_images(images, tuple(image_shape))
    if x.shape[0] == 0:
        raise ValueError(f"{path} holds no images (an empty batch {images.shape})")
    # The CLI computes in float64 (x64 on): float16/float32 pixels are widened
    # exactly, rather than have the graph compiled and solved in their dtype.
    return np.asarray(x, dtype=np.float64)


def run_sample(
    model_name: str | None,
    n: int,
    out: Path,
    seed: int = 0,
    model_file: Path | None = None,
) -> dict[str, Any]:
    """Sample ``n`` images and their latents; write ``samples.npz`` and a PNG grid.

    ``model_name`` and ``model_file`` as in :func:`default_model`; the returned
    ``"model"`` names the model sampled (:func:`model_kind`).
    """
    model = default_model(model_name, model_file)
    images, latents = model.sample(jax.random.PRNGKey(seed), n)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {f"latent_{k}": np.asarray(v) for k, v in latents.items()}
    np.savez(out / "samples.npz", images=np.asarray(images), **arrays)
    top = {k: v for k, v in latents.items() if np.ndim(v) == 1}
    fig = plot_samples(images, top)
    fig.savefig(out / "samples.png", dpi=110)
    plt.close(fig)
    kind = model_kind(model)
    return {"model": kind, "n": n, "image_shape": list(images.shape[1:])}


def run_infer(
    model_name: str | None,
    images_path: Path,
    out: Path,
    semiring: str = "max",
    temperature: float | None = None,
    model_file: Path | None = None,
) -> dict[str, Any]:
    """Max-sum / sum-product on every image of ``images_path`` (npz with
    ``images``, read by :func:`load_images`): the DRM's DCN-form pass, the
    compiled exact schedule for the other models of :data:`CLASSES`
    (``model_name`` and ``model_file`` as in :func:`default_model`; a model file
    of another class, such as ``FactorRenderingModel``, raises ``ValueError``).
    Writes ``posterior.npz`` and ``summary.json``. In ``posterior.npz``,
    ``log_marginal_<site>`` are normalised log-marginals under sum-product
    (their exponentials sum to 1) and, under max-sum, log max-marginals with
    the best state at 0 (so ties show as several 0s), for every model;
    ``map_<site>`` the joint MAP; ``log_z``. ``summary.json`` names the
    semiring and temperature that ran (``--temperature`` overrides
    ``--semiring``)."""
    model = default_model(model_name, model_file)
    name = model_kind(model)
    if name not in CLASSES:
        *kinds, last = (c.__name__ for c in CLASSES.values())
        raise ValueError(
            f"the model file {model_file} holds {_a(type(model))}; infer runs on "
            f"a {', '.join(kinds)} or {last}"
        )
    images = load_images(images_path, model.image_shape)
    arrays: dict[str, Any] = {}
    if name == "drm":
        res = model.infer(images, semiring, temperature)
        arrays["log_marginal_c"] = np.asarray(res.class_log_posterior)
        arrays["log_z"] = np.asarray(res.log_z)
        arrays.update({f"map_{k}": np.asarray(v) for k, v in res.map.items()})
        kind = "dcn"
    else:
        fg = compile_model(model.model, image=images[0])
        post = infer(fg, semiring, temperature=temperature, image=images)
        arrays["log_z"] = np.asarray(post.log_z)
        arrays.update(
            {f"log_marginal_{k}": np.asarray(v) for k, v in post.log_marginals.items()}
        )
        arrays.update({f"map_{k}": np.asarray(v) for k, v in post.map.items()})
        kind = post.schedule
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "posterior.npz", **arrays)
    t = resolve_temperature(semiring, temperature)  # what ran
    summary = {
        "model": name,
        "n_images": int(images.shape[0]),
        "semiring": {0.0: "max", 1.0: "sum"}.get(t, "tempered"),
        "temperature": t,
        "schedule": kind,
        "map_c": [int(c) for c in arrays.get("map_c", [])][:20],
        "log_z": [float(z) for z in arrays["log_z"]][:20],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
