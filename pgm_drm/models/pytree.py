"""Models as JAX pytrees: parameters are leaves, structure is static aux data.

A model registered with :func:`pytree_model` can be passed to ``jax.jit`` as an
ordinary argument: a new parameter value of the same structure reuses the compiled
program, and only a change of structure (a static field, or a leaf's shape or dtype)
traces again.

Unflattening bypasses ``__init__``/``__post_init__``: validation runs when a user
builds a model, never on the tracers that ``jit``, ``vmap`` or ``grad`` put in the
leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax

__all__ = ["pytree_model", "replace"]

T = TypeVar("T")


def pytree_model(*, static: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
    """Register a (frozen) dataclass as a pytree.

    Args:
        static: Names of the fields that are structure (hashable: ints, tuples,
            strings, ``None``); every other field is a leaf or a sub-pytree (``None``
            is an empty subtree, so an optional parameter changes the structure).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> @pytree_model(static=("n",))
        ... @dataclasses.dataclass(frozen=True, eq=False)
        ... class M:
        ...     w: jax.Array
        ...     n: int = 2
        >>> [x.shape for x in jax.tree_util.tree_leaves(M(jnp.ones(3)))]
        [(3,)]
    """

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(static) - set(names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
        data = tuple(n for n in names if n not in static)
        meta = tuple(static)

        def flatten_with_keys(obj: Any):
            children = tuple(
                (jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data
            )
            return children, tuple(getattr(obj, n) for n in meta)

        def flatten(obj: Any):
            return tuple(getattr(obj, n) for n in data), tuple(
                getattr(obj, n) for n in meta
            )

        def unflatten(aux: tuple, children: tuple) -> T:
            obj = object.__new__(cls)
            for n, v in zip(meta, aux, strict=True):
                object.__setattr__(obj, n, v)
            for n, v in zip(data, children, strict=True):
                object.__setattr__(obj, n, v)
            return obj

        jax.tree_util.register_pytree_with_keys(
            cls, flatten_with_keys, unflatten, flatten_func=flatten
        )
        cls.__pytree_static__ = meta  # type: ignore[attr-defined]
        return cls

    return register


def replace(obj: T, **changes: Any) -> T:
    """A copy of a pytree model with some leaves replaced, *without* re-validation
    (for learning loops, whose new values are traced or already checked)."""
    leaves = {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)  # type: ignore[arg-type]
    }
    unknown = set(changes) - set(leaves)
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no fields {sorted(unknown)}")
    static = getattr(type(obj), "__pytree_static__", ())
    bad = set(changes) & set(static)
    if bad:
        raise TypeError(
            f"{sorted(bad)} are structure, not parameters: build a new model"
        )
    leaves.update(changes)
    new = object.__new__(type(obj))
    for n, v in leaves.items():
        object.__setattr__(new, n, v)
    return new
