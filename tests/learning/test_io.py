"""Model files and resumable checkpoints (issue 4, part 8)."""

import os

import jax
import numpy as np
import pytest

import pgm_drm.learning.em as em_module
from pgm_drm.learning import fit_em, fit_svi, load_model, save_model
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


def _data():
    truth = RenderingModel(default_templates(4)[:2, :2], sigma=0.3, switch_prior=0.8)
    # The same data as the EM-vs-SVI test: SVI's compiled chunk is reused.
    return truth.sample(jax.random.PRNGKey(0), 100)[0]


def test_em_resume_after_crash_is_bit_for_bit(tmp_path, monkeypatch):
    x = _data()[:60]
    kw = dict(switch=True, n_iter=10, tol=None, progress=False)
    straight = fit_em(x, 2, 2, **kw)
    ckpt = tmp_path / "em.npz"
    real_step, calls = em_module.em_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # dies in iteration 7; last checkpoint: iteration 5
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(em_module, "em_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        fit_em(x, 2, 2, checkpoint=ckpt, checkpoint_every=5, **kw)
    monkeypatch.setattr(em_module, "em_step", real_step)
    resumed = fit_em(x, 2, 2, checkpoint=ckpt, resume=True, checkpoint_every=5, **kw)
    assert resumed.n_iter == straight.n_iter == 10
    # Same jitted step on the same float64 inputs: identical bits.
    _assert_same_model(straight.model, resumed.model)
    np.testing.assert_array_equal(straight.objective, resumed.objective)
    # A different fit must not silently resume from this checkpoint.
    with pytest.raises(ValueError, match="different fit"):
        fit_em(x[:50], 2, 2, checkpoint=ckpt, resume=True, **kw)


def test_svi_resume_is_bit_for_bit(tmp_path):
    x = _data()
    kw = dict(switch=True, learning_rate=0.05, progress=False, checkpoint_every=100)
    straight = fit_svi(x, 2, 2, n_steps=300, **kw)
    ckpt = tmp_path / "svi.npz"
    fit_svi(x, 2, 2, n_steps=200, checkpoint=ckpt, **kw)  # "crash" after 200 steps
    resumed = fit_svi(x, 2, 2, n_steps=300, checkpoint=ckpt, resume=True, **kw)
    assert resumed.n_iter == 300
    # Adam moments and step count are restored with the parameters; the scan
    # chunks are the same, so up to 1e-12 (in practice identical bits).
    np.testing.assert_allclose(
        resumed.model.templates, straight.model.templates, rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(resumed.objective, straight.objective, atol=1e-12)
