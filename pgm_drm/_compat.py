"""Old import paths of renamed or moved names: they still work, with a warning."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["EDRM_MOVED", "moved_getattr"]

#: Names that left ``pgm_drm.models`` / ``pgm_drm.models.edrm`` (2026-11).
EDRM_MOVED: dict[str, str] = {
    **{
        n: "pgm_drm.inference.edrm"
        for n in (
            "coarse_to_fine_margin",
            "exact_map_path",
            "greedy_path",
            "greedy_path_naive",
            "leaf_log_joint",
            "path_log_joint",
            "path_posterior",
        )
    },
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
