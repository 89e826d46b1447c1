"""Old import paths of renamed or moved names: they still work, with a warning."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["edrm_moved", "moved_getattr"]


def edrm_moved() -> dict[str, str]:
    """Names that left ``pgm_drm.models`` / ``pgm_drm.models.edrm`` (2026-11): all
    of the E-DRM inference module, and the greedy-vs-exact study.

    A function, not a constant: the inference module imports ``models.edrm``,
    whose ``__getattr__`` calls this, so it must not run at import time.
    """
    import pgm_drm.inference.edrm

    return {
        **{n: "pgm_drm.inference.edrm" for n in pgm_drm.inference.edrm.__all__},
        **{
            n: "pgm_drm.diagnostics.exactness"
            for n in ("GreedyStudyRow", "greedy_vs_exact_study", "plot_greedy_vs_exact")
        },
    }


def moved_getattr(module: str, name: str, table: dict[str, str]) -> Any:
    """Module ``__getattr__`` body: ``table[name]`` is ``"pkg.mod"`` (same name
    there) or ``"pkg.mod:new_name"``; warns with DeprecationWarning."""
    if name not in table:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    target, _, new = table[name].partition(":")
    new = new or name
    warnings.warn(
        f"{module}.{name} has moved to {target}.{new}; import it from there",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(target), new)
