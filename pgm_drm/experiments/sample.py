"""Sampling and inference recipes: the ``pgm-drm sample`` and ``infer`` commands.

:func:`default_model` names the default models (or loads a saved one);
:func:`run_sample` samples images and latents; :func:`run_infer` runs max-sum /
sum-product on images from an npz file (the DRM's DCN-form pass, the compiled
exact schedule for the others).
"""

from __future__ import annotations

import json
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

__all__ = ["MODELS", "default_model", "run_infer", "run_sample"]

#: The default models ``sample`` and ``infer`` know by name.
MODELS = ("rm", "drm", "conv-drm", "edrm")


def default_model(name: str, path: Path | None = None) -> Any:
    """The model a command works on: the one saved at ``path`` (by ``fit``), or
    the default model ``name`` (one of :data:`MODELS`)."""
    if path is not None:
        return load_model(path)
    if name == "rm":
        return RenderingModel(default_templates(8), sigma=0.35, switch_prior=0.9)
    if name == "drm":
        return DeepRenderingModel.default()
    if name == "conv-drm":
        return ConvRenderingModel.random(jax.random.PRNGKey(0), stride=2, sigma=0.5)
    if name == "edrm":
        return EvolutionaryDRM.default()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def run_sample(
    model_name: str,
    n: int,
    out: Path,
    seed: int = 0,
    model_file: Path | None = None,
) -> dict[str, Any]:
    """Sample ``n`` images and their latents; write ``samples.npz`` and a PNG grid."""
    model = default_model(model_name, model_file)
    images, latents = model.sample(jax.random.PRNGKey(seed), n)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {f"latent_{k}": np.asarray(v) for k, v in latents.items()}
    np.savez(out / "samples.npz", images=np.asarray(images), **arrays)
    top = {k: v for k, v in latents.items() if np.ndim(v) == 1}
    fig = plot_samples(images, top)
    fig.savefig(out / "samples.png", dpi=110)
    plt.close(fig)
    return {"model": model_name, "n": n, "image_shape": list(images.shape[1:])}


def run_infer(
    model_name: str,
    images_path: Path,
    out: Path,
    semiring: str = "max",
    temperature: float | None = None,
    model_file: Path | None = None,
) -> dict[str, Any]:
    """Max-sum / sum-product on every image of ``images_path`` (npz with
    ``images``): the DRM's DCN-form pass, the compiled exact schedule otherwise.
    Writes ``posterior.npz`` (log-marginals, MAP, log Z) and ``summary.json``."""
    model = default_model(model_name, model_file)
    with np.load(images_path) as f:
        if "images" not in f:
            raise ValueError(f"{images_path} has no array named 'images'")
        images = f["images"]
    if images.ndim == len(model.image_shape):
        images = images[None]
    arrays: dict[str, Any] = {}
    if model_name == "drm":
        res = model.infer(images, semiring, temperature)
        arrays["log_marginal_c"] = np.asarray(res.class_log_posterior)
        arrays["log_z"] = np.asarray(res.log_z)
        arrays.update({f"map_{k}": np.asarray(v) for k, v in res.map.items()})
        kind = "dcn"
    else:
        check_images(images, model.image_shape)
        fg = compile_model(model.model, image=np.asarray(images[0]))
        post = infer(fg, semiring, temperature=temperature, image=np.asarray(images))
        arrays["log_z"] = np.asarray(post.log_z)
        arrays.update(
            {f"log_marginal_{k}": np.asarray(v) for k, v in post.log_marginals.items()}
        )
        arrays.update({f"map_{k}": np.asarray(v) for k, v in post.map.items()})
        kind = post.schedule
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "posterior.npz", **arrays)
    summary = {
        "model": model_name,
        "n_images": int(images.shape[0]),
        "semiring": semiring,
        "temperature": temperature,
        "schedule": kind,
        "map_c": [int(c) for c in arrays.get("map_c", [])][:20],
        "log_z": [float(z) for z in arrays["log_z"]][:20],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
