"""Model files and checkpoints (pgm_drm/learning/io.py): round trips, atomic
writes, file modes, refusal of foreign, damaged or mismatched files; every dtype
JAX allows (ml_dtypes' bfloat16, float8, int4, ... included) round-trips bit for
bit, and other dtypes are refused when saving."""

import hashlib
import json
import os
import re
import stat
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_drm.learning.io import (
    fingerprint,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from pgm_drm.models import (
    ConvRenderingModel,
    DeepRenderingModel,
    EvolutionaryDRM,
    RenderingModel,
    default_templates,
)


def _assert_same_model(a, b):
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        va, vb = getattr(a, name), getattr(b, name)
        if isinstance(va, tuple):
            assert len(va) == len(vb)
            for x, y in zip(va, vb, strict=True):
                np.testing.assert_array_equal(x, y)
        elif va is None:
            assert vb is None
        else:
            np.testing.assert_array_equal(va, vb)  # bit-for-bit


@pytest.mark.parametrize("switch", [None, 0.8])
def test_rendering_model_round_trips(tmp_path, switch):
    rm = RenderingModel(
        default_templates(4), 0.3, np.array([0.2, 0.3, 0.5]), None, switch
    )
    back = load_model(save_model(tmp_path / "rm.npz", rm))
    _assert_same_model(rm, back)
    assert os.listdir(tmp_path) == ["rm.npz"]  # the temporary file was renamed


def test_deep_rendering_model_round_trips(tmp_path):
    drm = DeepRenderingModel.default()
    _assert_same_model(drm, load_model(save_model(tmp_path / "d" / "drm.npz", drm)))


def test_conv_and_evolutionary_models_round_trip(tmp_path):
    conv = ConvRenderingModel.random(jax.random.PRNGKey(0), stride=2)
    _assert_same_model(conv, load_model(save_model(tmp_path / "conv.npz", conv)))
    edrm = EvolutionaryDRM.default()
    _assert_same_model(edrm, load_model(save_model(tmp_path / "edrm.npz", edrm)))


def test_load_rejects_foreign_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a pgm_drm file"):
        load_model(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="cannot save"):
        save_model(tmp_path / "y.npz", object())


# ---- checkpoints: any pytree, keyed by pytree path ------------------------------
class _State(NamedTuple):
    model: RenderingModel
    opt: dict
    key: jax.Array
    typed_key: jax.Array
    step: int
    scale: float


def _state():
    return _State(
        RenderingModel(default_templates(4)[:2, :2], 0.3, switch_prior=0.8),
        {"mu": jnp.arange(3.0), "count": np.int32(4), "none": None},
        jax.random.PRNGKey(1),
        jax.random.key(2),
        7,
        0.5,
    )


def test_checkpoint_round_trips_any_pytree(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "c.npz", state, {"a": [1, 2]}, {"h": [1.0]})
    back, extra = load_checkpoint(path, state, {"a": (1, 2)})  # tuples are lists
    assert extra.keys() == {"h"} and extra["h"].tolist() == [1.0]
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        assert type(a) is type(b)
    _assert_same_model(back.model, state.model)
    assert back.opt["count"] == 4
    np.testing.assert_array_equal(back.key, state.key)
    np.testing.assert_array_equal(
        jax.random.key_data(back.typed_key), jax.random.key_data(state.typed_key)
    )
    assert (back.step, back.scale) == (7, 0.5)
    with np.load(path) as f:  # keyed by pytree path
        assert {"state.model.templates", "state.opt['mu']", "state.step"} <= set(
            f.files
        )


def test_load_checkpoint_refuses_another_fit_or_structure(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "c.npz", state, {"a": 1, "b": "x"})
    with pytest.raises(ValueError, match="different fit; a: checkpoint has 1"):
        load_checkpoint(path, state, {"a": 2, "b": "x"})
    with pytest.raises(ValueError, match="b: only in the checkpoint"):
        load_checkpoint(path, state, {"a": 1})
    meta = {"a": 1, "b": "x"}
    other = state._replace(opt={"mu": jnp.arange(4.0), "count": np.int32(4)})
    with pytest.raises(ValueError, match=r"state\.opt\['mu'\]: checkpoint has"):
        load_checkpoint(path, other, meta)
    other = state._replace(opt={"mu": jnp.arange(3), "count": np.int32(4)})
    with pytest.raises(ValueError, match=r"float64\[3\], this fit has int"):
        load_checkpoint(path, other, meta)
    other = state._replace(opt={"mu": jnp.arange(3.0), "n": np.int32(4)})
    with pytest.raises(ValueError, match=r"state\.opt\['n'\]: missing.*'count'\]: not"):
        load_checkpoint(path, other, meta)


def test_model_files_and_checkpoints_are_not_confused(tmp_path):
    rm = RenderingModel(default_templates(4)[:2, :2], 0.3)
    model_file = save_model(tmp_path / "m.npz", rm)
    ckpt = save_checkpoint(tmp_path / "c.npz", rm, {})
    with pytest.raises(ValueError, match="is a checkpoint, not a model file"):
        load_model(ckpt)
    with pytest.raises(ValueError, match="is a model file, not a checkpoint"):
        load_checkpoint(model_file, rm, {})
    (tmp_path / "t.npz").write_text("not an archive")
    np.save(tmp_path / "a.npy", np.zeros(3))
    np.savez(tmp_path / "j.npz", __meta__=np.asarray("{not json"))
    for bad in ("t.npz", "a.npy", "j.npz"):
        for load in (load_model, lambda p: load_checkpoint(p, rm, {})):
            with pytest.raises(ValueError, match="not a pgm_drm file"):
                load(tmp_path / bad)


def test_files_get_the_umask_mode_and_orphans_are_removed(tmp_path):
    orphan = tmp_path / ".c.npz.abc123.tmp"  # a write killed before its rename
    orphan.write_bytes(b"half a file")
    other = tmp_path / ".d.npz.abc123.tmp"  # another file's: kept
    other.write_bytes(b"")
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "c.npz", {"w": np.zeros(2)}, {})
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == [".d.npz.abc123.tmp", "c.npz"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600


# ---- every dtype JAX allows, bit for bit ------------------------------------------
_NATIVE = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"]
_NATIVE += ["uint64", "float16", "float32", "float64", "complex64", "complex128"]
#: ml_dtypes' types: ``.npy`` cannot describe them (bfloat16 is "<V2",
#: float8_e5m2 "<f1"); those this JAX offers.
_EXTENSION = [
    n
    for n in (
        "bfloat16",
        "float8_e3m4",
        "float8_e4m3",
        "float8_e4m3b11fnuz",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn",
        "int2",
        "int4",
        "uint2",
        "uint4",
    )
    if hasattr(jnp, n)
]
DTYPES = _NATIVE + _EXTENSION


def _bits(dt: np.dtype) -> int:
    if dt == np.bool_:
        return 1
    info = jnp.finfo(dt) if jnp.issubdtype(dt, jnp.inexact) else jnp.iinfo(dt)
    return info.bits


def _patterns(name: str) -> np.ndarray:
    """Values of dtype ``name`` covering its bit patterns: every pattern of a
    one-byte type (NaNs with payloads, -0, infinities, subnormals), random bytes
    for wider ones, every value of the sub-byte types."""
    dt = jnp.dtype(name)
    if dt == np.bool_:
        return np.array([True, False, False, True])
    bits = _bits(dt) * (2 if dt.kind == "c" else 1)
    if bits < 8 and jnp.issubdtype(dt, jnp.integer):
        info = jnp.iinfo(dt)
        return np.arange(info.min, info.max + 1).astype(dt)
    if bits < 8:  # float4_e2m1fn: the low bits of each byte
        return np.arange(2**bits, dtype=np.uint8).view(dt)
    if dt.itemsize == 1:
        return np.arange(256, dtype=np.uint8).view(dt)
    raw = np.random.default_rng(0).integers(0, 256, 64 * dt.itemsize, np.uint8)
    return raw.view(dt)


def _same_bits(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert a.tobytes() == b.tobytes()  # bit for bit, NaN payloads included


@pytest.mark.parametrize("name", DTYPES)
def test_checkpoints_round_trip_every_jax_dtype(tmp_path, name):
    x = _patterns(name)
    state = {"jax": jnp.asarray(x), "numpy": x, "scalar": x[1]}
    path = save_checkpoint(tmp_path / "c.npz", state, {}, {"h": x[::-1]})
    back, extra = load_checkpoint(path, state, {})
    for k in state:
        assert type(back[k]) is type(state[k])
        _same_bits(back[k], state[k])
    _same_bits(extra["h"], x[::-1])
    with np.load(path, allow_pickle=False) as f:  # nothing is an opaque void
        assert all(f[k].dtype.kind != "V" for k in f.files)


@pytest.mark.parametrize("name", DTYPES)
def test_models_round_trip_every_dtype_they_accept(tmp_path, name):
    dt = jnp.dtype(name)
    t = default_templates(4)[:2, :2]  # 0/1 pixels, exact in every dtype but...
    t = t + 1 if name == "float8_e8m0fnu" else t  # ...e8m0 (2^k only, no 0): 1/2
    rm = RenderingModel(np.asarray(t).astype(dt), 0.3, switch_prior=0.8)
    back = load_model(save_model(tmp_path / "rm.npz", rm))
    # Integer and bool templates become float at construction (their squares
    # would wrap around); the file keeps the dtype the model holds.
    kept = jnp.issubdtype(dt, jnp.inexact)
    assert back.templates.dtype == (dt if kept else jnp.result_type(float))
    _assert_same_model(rm, back)
    _same_bits(back.templates, rm.templates)


def test_a_loaded_bfloat16_model_classifies_as_the_saved_one(tmp_path):
    templates = default_templates(4)[:, :2]
    rm = RenderingModel(templates.astype(jnp.bfloat16), 0.3)
    back = load_model(save_model(tmp_path / "rm.npz", rm))
    images = templates[:, 1].astype(jnp.bfloat16)  # one image of each class
    assert back.templates.dtype == jnp.bfloat16
    np.testing.assert_array_equal(back.classify(images), rm.classify(images))
    np.testing.assert_array_equal(back.classify(images), [0, 1, 2])


@pytest.mark.parametrize(
    "bad",
    [
        np.array([object()]),
        np.array(["text"]),
        np.zeros(2, dtype=[("a", "<i4")]),
        np.zeros(2, dtype="V2"),
        np.zeros(2, dtype="datetime64[s]"),
    ],
    ids=["object", "str", "structured", "void", "datetime"],
)
def test_dtypes_jax_does_not_allow_are_refused_when_saving(tmp_path, bad):
    match = re.escape(f"cannot save state['x']: dtype {bad.dtype} is not a bool")
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path / "c.npz", {"x": bad}, {})
    with pytest.raises(ValueError, match="cannot save extra/h: dtype"):
        save_checkpoint(tmp_path / "c.npz", {}, {}, {"h": bad})
    rm = RenderingModel(default_templates(4)[:2, :2], 0.3)
    object.__setattr__(rm, "class_prior", bad)  # past the constructor's checks
    with pytest.raises(ValueError, match="cannot save class_prior: dtype"):
        save_model(tmp_path / "m.npz", rm)
    assert os.listdir(tmp_path) == []  # refused before writing


def _rewrite(path, header=None, **arrays):
    """Rewrite a saved file: its arrays replaced by ``arrays``, its header by
    ``header(old header)``."""
    with np.load(path) as f:
        held = {k: f[k] for k in f.files}
    held.update(arrays)
    if header is not None:
        held["__meta__"] = np.asarray(
            json.dumps(header(json.loads(str(held["__meta__"]))))
        )
    np.savez(path, **held)


def _drop_dtypes(spec):
    """A format-1 field spec: no dtype records."""
    if isinstance(spec, dict):
        return {k: _drop_dtypes(v) for k, v in spec.items() if k != "dtype"}
    if isinstance(spec, list):
        return [_drop_dtypes(v) for v in spec]
    return spec


def test_damaged_dtype_records_are_refused_and_old_files_load(tmp_path):
    rm = RenderingModel(default_templates(4)[:2, :2].astype(jnp.bfloat16), 0.3)
    path = save_model(tmp_path / "m.npz", rm)
    stored = np.asarray(rm.templates).view(np.uint16)
    _rewrite(path, templates=stored.astype(np.float32))
    with pytest.raises(
        ValueError, match="templates holds float32, the header says uint16"
    ):
        load_model(path)

    def retype(meta):
        meta["fields"]["templates"]["dtype"] = "object"
        return meta

    _rewrite(path, retype, templates=stored)
    with pytest.raises(ValueError, match="templates has an unsupported dtype 'object'"):
        load_model(path)

    def format_1(meta):
        return {**meta, "format": 1, "fields": _drop_dtypes(meta["fields"])}

    # A format-1 file (before dtypes were recorded) loads; its bfloat16 arrays
    # were written as raw void blocks, which are refused by name.
    old = RenderingModel(default_templates(4)[:2, :2], 0.3)
    save_model(path, old)
    _rewrite(path, format_1)
    _assert_same_model(load_model(path), old)
    _rewrite(path, templates=np.asarray(rm.templates).view("V2"))
    with pytest.raises(ValueError, match=r"templates holds \|V2 data of an unrecorded"):
        load_model(path)

    # Checkpoints: a contradicted record is refused; format 2 (no records) loads.
    state = {"w": jnp.arange(3.0, dtype=jnp.bfloat16), "n": np.int32(2)}
    ckpt = save_checkpoint(tmp_path / "c.npz", state, {})
    _rewrite(ckpt, **{"state['w']": np.zeros(3, np.int16)})
    with pytest.raises(ValueError, match=r"state\['w'\] holds int16"):
        load_checkpoint(ckpt, state, {})
    native = {"w": jnp.arange(3.0), "n": np.int32(2)}
    ckpt = save_checkpoint(tmp_path / "c.npz", native, {})
    _rewrite(
        ckpt, lambda h: {k: v for k, v in h.items() if k != "dtypes"} | {"format": 2}
    )
    back, _ = load_checkpoint(ckpt, native, {})
    _same_bits(back["w"], native["w"])


def test_fingerprints_tell_extension_dtypes_of_the_same_bytes_apart():
    x = np.arange(8, dtype=np.uint8)
    e4m3, e5m2 = x.view(jnp.float8_e4m3fn), x.view(jnp.float8_e5m2fnuz)
    assert fingerprint(e4m3) != fingerprint(e5m2)  # both "<V1" to numpy
    # Native dtypes hash as before, so existing checkpoints still resume.
    w = np.arange(3.0)
    before = hashlib.sha256(str(((3,), "<f8")).encode() + w.tobytes())
    assert fingerprint(jnp.asarray(w)) == before.hexdigest()[:16]
