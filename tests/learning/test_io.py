"""Model files and checkpoints (pgm_drm/learning/io.py): round trips, atomic
writes, file modes, refusal of foreign, damaged or mismatched files."""

import os
import stat
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_drm.learning.io import (
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
