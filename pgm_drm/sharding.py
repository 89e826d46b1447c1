"""Spread a batch over every device with JAX's own SPMD machinery.

A 1-D :class:`jax.sharding.Mesh` named ``"batch"`` over ``jax.devices()`` and a
:class:`~jax.sharding.NamedSharding` on the leading (batch) axis: ``jit`` then
partitions the program and reduces whatever sums over the batch by itself; nothing
here is home-made message passing across devices. On one device nothing is moved
or padded (``shard_batch`` and ``replicate`` return their input, ``valid`` is
``None`` and ``valid_mean`` is ``jnp.mean``), so single-device results are
unchanged bit for bit.

Across hosts, call ``jax.distributed.initialize()`` first: ``jax.devices()`` then
lists every host's devices and the same code runs unchanged.

A bottom-layer module (imports nothing of ours): models, inference and learning
all shard through it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "batch_mesh",
    "pad_to_devices",
    "replicate",
    "shard_batch",
    "shard_with_mask",
    "unpad",
    "valid_mean",
    "where_valid",
]

AXIS = "batch"


def batch_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of them), axis name ``"batch"``."""
    devs = list(jax.devices() if devices is None else devices)
    return Mesh(devs, (AXIS,))


def pad_to_devices(n: int, n_devices: int) -> int:
    """The batch size padded up to a multiple of the device count."""
    return -(-n // n_devices) * n_devices


def shard_batch(tree: Any, mesh: Mesh | None = None) -> tuple[Any, int]:
    """Put the leading axis of every leaf of ``tree`` across the mesh.

    A batch that does not divide the device count is padded by repeating its last
    example (a real input: no NaN and no probability-zero padding); drop the
    padding from the results with :func:`unpad`.

    Returns:
        The sharded tree and the original batch size. With one device the tree
        comes back as it is.
    """
    if mesh is None and isinstance(tree, jax.Array) and tree.ndim:  # one array
        if jax.device_count() == 1:
            return tree, int(tree.shape[0])
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return tree, 0
    n = int(jnp.shape(leaves[0])[0])
    if any(int(jnp.shape(x)[0]) != n for x in leaves):
        raise ValueError("every batched input must have the same leading size")
    if mesh is None and jax.device_count() == 1:  # the common case: no mesh built
        return tree, n
    mesh = batch_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if n_dev == 1:
        return tree, n
    size = pad_to_devices(n, n_dev)

    def put(x):
        x = jnp.asarray(x)
        if size > n:
            edge = jnp.broadcast_to(x[-1:], (size - n, *x.shape[1:]))
            x = jnp.concatenate([x, edge], axis=0)
        spec = PartitionSpec(AXIS, *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(put, tree), n


def unpad(tree: Any, n: int) -> Any:
    """Drop :func:`shard_batch`'s padding: the first ``n`` rows of every leaf."""
    return jax.tree_util.tree_map(
        lambda x: x if x is None or jnp.shape(x)[0] == n else x[:n], tree
    )


def shard_with_mask(tree: Any, mesh: Mesh | None = None) -> tuple[Any, Any]:
    """:func:`shard_batch` for code that reduces over the batch itself (the EMs'
    sufficient statistics): also says which rows are real.

    Returns:
        The sharded (and maybe padded) tree and ``valid``: ``None`` when nothing
        was padded (one device, or a batch the device count divides), else a
        ``(padded size,)`` boolean array, sharded like the batch, true for the
        real examples. Reduce with :func:`where_valid` / :func:`valid_mean`.
    """
    out, n = shard_batch(tree, mesh)
    leaves = jax.tree_util.tree_leaves(out)
    size = int(jnp.shape(leaves[0])[0]) if leaves else n
    if size == n:
        return out, None
    mesh = batch_mesh() if mesh is None else mesh
    valid = jax.device_put(
        np.arange(size) < n, NamedSharding(mesh, PartitionSpec(AXIS))
    )
    return out, valid


def where_valid(x: Any, valid: Any, fill: Any = 0) -> Any:
    """``x`` with the padding rows (leading axis) set to ``fill``; ``x`` itself
    when ``valid`` is ``None``. A ``where``, not a product: a padded row that is
    ``-inf`` or NaN does not leak into sums."""
    if valid is None:
        return x
    mask = jnp.reshape(valid, (-1,) + (1,) * (jnp.ndim(x) - 1))
    return jnp.where(mask, x, jnp.asarray(fill, dtype=jnp.result_type(x)))


def valid_mean(x: Any, valid: Any) -> Any:
    """The mean of ``x`` over its real rows (all its entries when ``valid`` is
    ``None``: exactly ``jnp.mean(x)``); the sum is left to XLA."""
    if valid is None:
        return jnp.mean(x)
    per_row = jnp.size(x) // jnp.shape(x)[0]
    n = jnp.sum(valid).astype(jnp.result_type(x))
    return jnp.sum(where_valid(x, valid)) / (n * per_row)


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
    """Every leaf of ``tree`` copied whole to every device of the mesh (the
    parameters a sharded step reads); the tree as it is on one device.

    A step's replicated outputs come back with this sharding, so a loop that
    starts from replicated parameters compiles its step once, not twice."""
    mesh = batch_mesh() if mesh is None else mesh
    if mesh.devices.size == 1:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
