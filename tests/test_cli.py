"""Smoke tests for every ``pgm-drm`` command: each runs, writes files a user can
open, and ``--help`` works."""

import json

import numpy as np
import pytest

from pgm_drm.cli import main
from pgm_drm.learning import load_model


@pytest.mark.parametrize(
    "command", ["demo", "sample", "infer", "compare", "fit", "bench"]
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: pgm-drm" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["rm", "edrm", "drm"])
def test_sample_then_infer(model, tmp_path):
    assert main(["sample", "--model", model, "-n", "4", "--out", str(tmp_path)]) == 0
    with np.load(tmp_path / "samples.npz") as f:
        assert f["images"].shape[0] == 4 and "latent_c" in f
    assert (tmp_path / "samples.png").stat().st_size > 0
    out = tmp_path / "inf"
    main(["infer", str(tmp_path / "samples.npz"), "--model", model, "--out", str(out)])
    with np.load(out / "posterior.npz") as f:
        assert f["log_z"].shape == (4,) and f["map_c"].shape == (4,)
    assert json.loads((out / "summary.json").read_text())["n_images"] == 4


def test_infer_rejects_wrong_images(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="shape"):
        main(["infer", str(tmp_path / "bad.npz"), "--model", "rm"])


def test_compare_quick(tmp_path):
    assert main(["compare", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    # the kernel equals NumPyro's enumeration (1e-6, float64)
    assert report["semirings"]["sum"]["max_abs_delta_log_z"] < 1e-6


def test_compare_greedy_quick(tmp_path):
    assert (
        main(["compare", "--study", "greedy", "--quick", "--out", str(tmp_path)]) == 0
    )
    assert (tmp_path / "greedy_study.png").exists()
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 2


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--model", "dcn", "--labels", "50"], "--labels"),
        (["--model", "drm", "--em", "soft"], "--em"),
        (["--model", "rm", "--labels", "50", "--unlabelled-weight", "0"], "(0, 1]"),
        (["--model", "rm", "--unlabelled-weight", "0.5"], "needs --labels"),
        (["--model", "mfa", "--labels", "100", "--unlabelled-weight", "0.5"], "rm"),
        (["--model", "mfa", "--labels", "5"], "multiple of 10"),
        (["--model", "mfa", "--labels", "105"], "multiple of 10"),
        (["--model", "mfa", "--no-translations"], "needs --labels"),
        (["--model", "rm", "--no-translations"], "dcn or mfa"),
    ],
)
def test_fit_rejects_bad_options(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as e:
        main(["fit", "digits", *extra, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_fit_rm_digits(tmp_path):
    main(["fit", "digits", "--model", "rm", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    # supervised hard EM, 10 templates per class: 0.98 measured; 0.95 is a
    # generous floor that still catches a broken fit
    assert report["test_accuracy"] > 0.95
    assert (tmp_path / "templates.png").exists() and (tmp_path / "model.npz").exists()


def test_fit_mfa_digits_semi_supervised(tmp_path):
    main(["fit", "digits", "--model", "mfa", "--labels", "100", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["labels"] == 100 and report["em"] == "soft"
    assert report["translated_labelled_images"] == 400
    # 100 labels, label draw 0: 0.982 measured (mean 0.965 over draws 0-9);
    # 0.95 still catches a broken fit (the isotropic RM gets 0.933 here)
    assert report["test_accuracy"] > 0.95
    back = load_model(tmp_path / "model.npz")
    assert back.n_factors == 15 and (tmp_path / "templates.png").exists()


def test_fit_dcn_digits_with_translations(tmp_path):
    main(["fit", "digits", "--model", "dcn", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["translations"]) == 5
    # seed 0: 1.000 measured (0.984 without the translations); 0.98 still
    # catches a broken fit
    assert report["test_accuracy"] > 0.98


def test_demo_without_drm(tmp_path):
    args = ["demo", "--images", "10", "--reference", "2", "--no-drm"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "posterior_comparison.png").exists()


def test_drm_demo_section(tmp_path):
    from pgm_drm.cli import run_drm_demo

    report = run_drm_demo(tmp_path, n_images=20, n_probe=40)
    # the default DRM's classes are well separated at sigma 0.25 (100% measured)
    assert report["map_class_accuracy"] > 0.9
    assert report["activity_images_own_class"]
    for name in ("samples", "reconstructions", "activity", "probes"):
        assert (tmp_path / f"drm_{name}.png").exists()
