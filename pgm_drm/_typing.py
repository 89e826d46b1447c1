"""Type aliases shared across the package (STYLE §10)."""

from __future__ import annotations

from typing import Any, Literal

import jax

Array = jax.Array
PRNGKey = jax.Array
ArrayLike = Any
Semiring = Literal["max", "sum"]
ScheduleKind = Literal["auto", "tree", "exact", "loopy"]

__all__ = ["Array", "ArrayLike", "PRNGKey", "ScheduleKind", "Semiring"]
