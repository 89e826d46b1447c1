"""Saving fitted models and checkpoints: one ``.npz`` per file, written atomically.

A model file holds every dataclass field of the model as arrays plus a JSON
header (``__meta__``) naming the class and how to rebuild each field, so any
frozen dataclass whose fields are arrays, numbers, ``None`` or tuples of those
round-trips: every model class in :data:`MODEL_CLASSES` is registered.
A checkpoint holds any pytree state keyed by pytree path, restored into the
structure of a template state and validated (:func:`save_checkpoint`,
:func:`load_checkpoint`); :func:`pgm_drm.learning.loop.run_loop` writes them.

Every array keeps its dtype bit for bit: bool, (unsigned) integers, floats and
complex numbers as ``.npy`` stores them, and JAX's extension types from
``ml_dtypes`` (``bfloat16``, the ``float8``/``float4`` types, ``int4``, ...),
which ``.npy`` cannot describe, as their raw bits in an unsigned integer array
of the same item size, with the dtype's name in the header to view them back.
Any other dtype (object, string, structured) is refused when saving.
No pickles: files load with ``allow_pickle=False``. Files get the mode the
umask gives a new file, and temporary files orphaned by a kill during a write
are removed by the next write to the same path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm.models.conv_drm import ConvRenderingModel
from pgm_drm.models.drm import DeepRenderingModel
from pgm_drm.models.edrm import EvolutionaryDRM
from pgm_drm.models.factor import FactorRenderingModel
from pgm_drm.models.rendering import RenderingModel

__all__ = [
    "MODEL_CLASSES",
    "fingerprint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_model",
]

#: Classes :func:`load_model` may rebuild, by name.
MODEL_CLASSES: dict[str, type] = {
    "ConvRenderingModel": ConvRenderingModel,
    "DeepRenderingModel": DeepRenderingModel,
    "EvolutionaryDRM": EvolutionaryDRM,
    "FactorRenderingModel": FactorRenderingModel,
    "RenderingModel": RenderingModel,
}

#: Format of model files (2: every array's dtype in the header; 1 could not
#: store ``ml_dtypes`` types such as ``bfloat16``). Both are read.
FORMAT_VERSION = 2
_MODEL_FORMATS = (1, 2)
#: Format of checkpoints (3: every array's dtype in the header; 2: pytree paths
#: only; 1 held per-fit array names). Formats 2 and 3 are read.
CHECKPOINT_FORMAT = 3
_CHECKPOINT_FORMATS = (2, 3)
_META = "__meta__"
_STATE = "state"
_EXTRA = "extra/"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _orphans(path: Path) -> list[Path]:
    """Temporary files of :func:`_atomic_savez` for ``path`` left by a kill."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to a temporary file in the same folder, then ``os.replace``.

    A reader (or a resumed fit) never sees a half-written file: the rename is
    atomic on POSIX and Windows within one file system. The file gets the mode
    a new file gets under the umask (``mkstemp`` alone gives 0600); temporary
    files of an earlier write to ``path`` that was killed are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for orphan in _orphans(path):
        orphan.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _npy_native(dt: np.dtype) -> bool:
    """Whether ``.npy`` stores ``dt`` as itself: bool, integer, float, complex."""
    if dt.kind not in "biufc" or dt.names is not None:
        return False
    try:
        return np.dtype(dt.str) == dt  # float8_e5m2's "<f1" is not understood
    except TypeError:
        return False


def _is_extension(dt: np.dtype) -> bool:
    """Whether ``dt`` is one of JAX's ``ml_dtypes`` types (``bfloat16``, ...)."""
    if _npy_native(dt) or dt.names is not None:
        return False
    try:
        return jnp.issubdtype(dt, jnp.number) and jnp.dtype(dt.name) == dt
    except TypeError:
        return False


def _stored_dtype(dt: np.dtype, key: str) -> np.dtype:
    """The dtype an array of dtype ``dt`` is written as (raw bits for extensions).

    Raises:
        ValueError: ``dt`` is neither stored natively nor a JAX extension type.
    """
    if _npy_native(dt):
        return dt
    if _is_extension(dt):
        return np.dtype(f"u{dt.itemsize}")
    raise ValueError(
        f"cannot save {key}: dtype {dt} is not a bool, integer, float or "
        "complex dtype, nor one of JAX's ml_dtypes types (bfloat16, float8_*, ...)"
    )


def _to_stored(key: str, value: Any) -> tuple[np.ndarray, str]:
    """``value`` as the array written under ``key`` and its dtype's name."""
    a = np.asarray(value)
    stored = _stored_dtype(a.dtype, key)
    return (a if stored == a.dtype else a.view(stored)), a.dtype.name


def _from_stored(a: np.ndarray, name: Any, key: str, path: Any) -> np.ndarray:
    """The array written by :func:`_to_stored` back in its dtype ``name``.

    ``name`` is ``None`` for files of the formats that recorded no dtype: their
    arrays are taken as stored, which only ``.npy``'s own dtypes can be.

    Raises:
        ValueError: An unknown dtype name, or an array whose stored dtype does
            not match it (a damaged or tampered file).
    """
    if name is None:
        if not _npy_native(a.dtype):
            raise ValueError(
                f"{path}: entry {key} holds {a.dtype.str} data of an unrecorded "
                "dtype (files of older formats could not store bfloat16 and other "
                "ml_dtypes types; save it again)"
            )
        return a
    try:
        dt = jnp.dtype(str(name))
        stored = _stored_dtype(dt, key)
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: damaged file (entry {key} has an unsupported dtype {name!r})"
        ) from None
    if a.dtype.name != stored.name:
        raise ValueError(
            f"{path}: damaged file (entry {key} holds {a.dtype.name}, the header "
            f"says {stored.name} for {dt.name})"
        )
    return a if stored == dt else a.view(dt)


def _load_npz(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the JSON header of a file written by :func:`_atomic_savez`.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: Not an ``.npz`` of this package (another file type, no
            header, a header that is not a JSON object, a corrupt archive).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an .npz archive")
        with f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a pgm_drm file ({e})") from None
    if _META not in arrays:
        raise ValueError(f"{path} is not a pgm_drm file (no {_META} entry)")
    try:
        meta = json.loads(str(arrays.pop(_META)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a pgm_drm file (bad header: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a pgm_drm file (bad header)")
    return arrays, meta


def _encode(name: str, value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Store ``value`` under keys starting with ``name``; return how to rebuild it."""
    if value is None:
        return {"kind": "none"}
    if isinstance(value, tuple):
        return {
            "kind": "tuple",
            "items": [_encode(f"{name}/{i}", v, arrays) for i, v in enumerate(value)],
        }
    if isinstance(value, bool | int | float):
        return {"kind": type(value).__name__, "value": value}
    arrays[name], dtype = _to_stored(name, value)
    return {"kind": "array", "key": name, "dtype": dtype}


def _decode(spec: Any, arrays: dict[str, np.ndarray], path: Any) -> Any:
    kind = spec["kind"]
    if kind == "none":
        return None
    if kind == "tuple":
        return tuple(_decode(s, arrays, path) for s in spec["items"])
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](spec["value"])
    key = spec["key"]
    return _from_stored(arrays[key], spec.get("dtype"), key, path)


def save_model(path: str | os.PathLike, model: Any) -> Path:
    """Save a fitted model (a registered frozen dataclass) to ``path`` (``.npz``).

    Args:
        path: Destination; parent folders are created; written atomically.
        model: A :class:`RenderingModel`, :class:`DeepRenderingModel` or another
            class in :data:`MODEL_CLASSES`.

    Returns:
        The path written.

    Raises:
        ValueError: Not a registered model class, or a field holds an array of
            a dtype that cannot be saved (object, string, structured), named.

    Example:
        >>> import tempfile, os, numpy as np
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> rm = RenderingModel(default_templates(), sigma=0.5, switch_prior=0.9)
        >>> path = os.path.join(tempfile.mkdtemp(), "rm.npz")
        >>> back = load_model(save_model(path, rm))
        >>> bool(np.array_equal(back.templates, rm.templates)), back.switch_prior
        (True, 0.9)
    """
    cls = type(model)
    if MODEL_CLASSES.get(cls.__name__) is not cls or not dataclasses.is_dataclass(
        model
    ):
        raise ValueError(
            f"cannot save a {cls.__name__}; known model classes: "
            f"{sorted(MODEL_CLASSES)}"
        )
    arrays: dict[str, np.ndarray] = {}
    fields = {
        f.name: _encode(f.name, getattr(model, f.name), arrays)
        for f in dataclasses.fields(model)
    }
    meta = {"format": FORMAT_VERSION, "class": cls.__name__, "fields": fields}
    arrays[_META] = np.asarray(json.dumps(meta))
    return _atomic_savez(path, arrays)


def load_model(path: str | os.PathLike) -> Any:
    """Load a model written by :func:`save_model` (validated by its constructor).

    Every array comes back with the dtype and bits it was saved with.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: Not a model file, an unknown class / format version, or a
            damaged file (a missing array, one whose dtype the header contradicts).
    """
    arrays, meta = _load_npz(path)
    if meta.get("checkpoint"):
        raise ValueError(f"{path} is a checkpoint, not a model file")
    if meta.get("format") not in _MODEL_FORMATS or not isinstance(
        meta.get("fields"), dict
    ):
        raise ValueError(f"{path}: unsupported model file format {meta.get('format')}")
    name = meta.get("class")
    if name not in MODEL_CLASSES:
        raise ValueError(
            f"{path} holds a {name!r}; known model classes: {sorted(MODEL_CLASSES)}"
        )
    try:
        kwargs = {k: _decode(s, arrays, path) for k, s in meta["fields"].items()}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: damaged model file (entry {e} missing)") from None
    return MODEL_CLASSES[name](**kwargs)


def save_checkpoint(
    path: str | os.PathLike,
    state: Any,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a pytree ``state`` and a fit's configuration ``meta`` atomically.

    Every leaf of ``state`` is stored under its pytree path
    (``jax.tree_util.keystr``, prefixed by ``state``: ``state.model.templates``,
    ``state.iteration``; typed PRNG keys as their raw words); ``extra`` arrays
    (the loop's histories) under ``extra/<name>``; ``meta`` (JSON-able) in the
    header with every array's dtype. :func:`load_checkpoint` restores the state
    into the same structure.

    Raises:
        ValueError: A leaf or ``extra`` array of a dtype that cannot be saved
            (object, string, structured), named by its key.

    Example:
        >>> import tempfile, os, jax.numpy as jnp
        >>> state = {"w": jnp.arange(3.0), "step": jnp.asarray(2)}
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
        >>> _ = save_checkpoint(path, state, {"lr": 0.1})
        >>> back, extra = load_checkpoint(path, state, {"lr": 0.1})
        >>> back["w"].tolist(), int(back["step"]), extra
        ([0.0, 1.0, 2.0], 2, {})
    """
    out: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    named = [(_STATE + k, _leaf_to_array(v)) for k, v in _paths(state)]
    named += [(_EXTRA + k, v) for k, v in (extra or {}).items()]
    for k, v in named:
        out[k], dtypes[k] = _to_stored(k, v)
    header = {
        "format": CHECKPOINT_FORMAT,
        "checkpoint": True,
        "meta": meta,
        "dtypes": dtypes,
    }
    out[_META] = np.asarray(json.dumps(header))
    return _atomic_savez(path, out)


def load_checkpoint(
    path: str | os.PathLike, like: Any, meta: dict[str, Any]
) -> tuple[Any, dict[str, np.ndarray]]:
    """Read a checkpoint of :func:`save_checkpoint` into the structure of ``like``.

    Args:
        path: The ``.npz`` file.
        like: A state of the same structure (the fit's initial state): the
            file must hold exactly its pytree paths, each with the same shape
            and dtype (``bfloat16`` and the other ``ml_dtypes`` types too);
            leaves come back as the same kind (``jax.Array``, numpy array,
            Python scalar, typed key) as in ``like``.
        meta: The fit's configuration; the file's must be equal.

    Returns:
        ``(state, extra)``: the restored state and the ``extra`` arrays.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: Not a checkpoint (e.g. a model file, a foreign or corrupt
            file), another format version, a different configuration (each
            differing entry named), a different structure, shape or dtype
            (each differing leaf named), or a damaged file (an array whose dtype
            the header does not record or contradicts).
    """
    arrays, header = _load_npz(path)
    if "fields" in header:
        raise ValueError(f"{path} is a model file, not a checkpoint (load_model)")
    if header.get("format") not in _CHECKPOINT_FORMATS or not isinstance(
        header.get("meta"), dict
    ):
        raise ValueError(
            f"{path}: checkpoint format {header.get('format')!r}, this version "
            f"reads formats {list(_CHECKPOINT_FORMATS)} (delete it to start over)"
        )
    dtypes = header.get("dtypes", {} if header["format"] == 2 else None)
    if not isinstance(dtypes, dict):
        raise ValueError(f"{path}: damaged checkpoint (no dtype records)")
    found = header["meta"]
    meta = json.loads(json.dumps(meta))  # tuples as lists, as the file holds them
    diffs = [
        f"{k}: checkpoint has {found.get(k)!r}, this fit has {v!r}"
        for k, v in meta.items()
        if found.get(k) != v
    ]
    diffs += [f"{k}: only in the checkpoint" for k in found if k not in meta]
    if diffs:
        raise ValueError(
            f"checkpoint {path} was written by a different fit; "
            + "; ".join(diffs)
            + " (delete it or resume=False to start over)"
        )
    # An array without a record (format 2, or one added to the file) is taken as
    # stored; the structure checks below name it if it does not belong.
    arrays = {k: _from_stored(v, dtypes.get(k), k, path) for k, v in arrays.items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    keys = [_STATE + jax.tree_util.keystr(k) for k, _ in leaves]
    held = {k for k in arrays if k.startswith(_STATE)}
    problems = [f"{k}: missing" for k in keys if k not in held]
    problems += [f"{k}: not in this fit's state" for k in sorted(held - set(keys))]
    values = []
    for k, (_, leaf) in zip(keys, leaves, strict=True):
        if k not in held:
            continue
        a, want = arrays[k], _leaf_to_array(leaf)
        if a.shape != want.shape or a.dtype != want.dtype:
            problems.append(
                f"{k}: checkpoint has {a.dtype.name}{list(a.shape)}, this fit "
                f"has {want.dtype.name}{list(want.shape)}"
            )
        values.append(_array_to_leaf(a, leaf))
    if problems:
        raise ValueError(
            f"checkpoint {path} does not hold this fit's state: " + "; ".join(problems)
        )
    extra = {k[len(_EXTRA) :]: v for k, v in arrays.items() if k.startswith(_EXTRA)}
    return jax.tree.unflatten(treedef, values), extra


def _paths(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(k), v) for k, v in leaves]


def _is_typed_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    )


def _leaf_to_array(leaf: Any) -> np.ndarray:
    if _is_typed_key(leaf):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def _array_to_leaf(a: np.ndarray, like: Any) -> Any:
    """``a`` as the same kind of leaf as ``like``."""
    if _is_typed_key(like):
        return jax.random.wrap_key_data(a, impl=jax.random.key_impl(like))
    if isinstance(like, jax.Array):
        return jnp.asarray(a)
    if isinstance(like, np.ndarray):
        return np.asarray(a)
    if isinstance(like, np.generic):
        return a[()]
    if isinstance(like, bool | int | float | complex):
        return type(like)(a.item())
    return a


def fingerprint(*arrays: Any) -> str:
    """A short hash of arrays (shapes, dtypes, bytes): checkpoints record the data
    and starting state they belong to."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(_leaf_to_array(a))
        described = (a.shape, a.dtype.str)
        if not _npy_native(a.dtype):  # bfloat16's str is "<V2", as float8's "<V1"...
            described += (a.dtype.name,)
        h.update(str(described).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
