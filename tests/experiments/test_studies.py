"""The studies: the DCN pass is exact at overlap 0 (and the table and plot are
well formed); the greedy E-DRM study's rows, table and plot."""

import json

import jax
import matplotlib.pyplot as plt
import pytest

from pgm_drm.experiments.studies import (
    GreedyStudyRow,
    dcn_exactness_study,
    greedy_table,
    plot_dcn_exactness,
    plot_greedy_vs_exact,
    run_study,
)


def test_study_small():
    # One cell (overlap 0): the study's code is the same for every overlap, and
    # each cell compiles four schedules of its own graph (~25 s); the DCN pass
    # under overlap is checked against exact inference in test_conv_dcn.
    study = dcn_exactness_study(
        jax.random.PRNGKey(0),
        overlaps=(0,),
        sigmas=(0.5,),
        n_images=4,
        n_models=1,
        grid=2,
        class_size=1,
        progress=False,
    )
    assert len(study.rows) == 1
    zero = study.rows[0]
    # overlap 0: the DCN pass is exact (tested to 1e-6 in test_conv_dcn), so every
    # MAP agrees and the class posteriors coincide up to float64 rounding
    assert zero["dcn_map_exact"] == 1.0 and zero["dcn_class_agree"] == 1.0
    assert zero["dcn_class_tv"] < 1e-9
    for row in study.rows:
        assert 0.0 <= row["dcn_map_exact"] <= 1.0
        assert 0.0 <= row["loopy_map_exact"] <= 1.0
        assert 0.0 <= row["dcn_class_tv"] <= 1.0
    assert study.table().count("\n") == 2
    assert set(study.models) == {(0, 0)}
    fig = plot_dcn_exactness(study)
    assert len(fig.axes) == 2
    plt.close(fig)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_images": 0}, "n_images"),
        ({"sigmas": (0.0,)}, "sigmas"),
        ({"overlaps": (3,)}, "overlap"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dcn_exactness_study(jax.random.PRNGKey(0), progress=False, **kwargs)


def _rows():
    return [
        GreedyStudyRow(s, 1.0 - s / 4, 1.0, 1.0 - s / 2, 0.9, s, 10) for s in (0.1, 1.0)
    ]


def test_plot_greedy_vs_exact():
    fig = plot_greedy_vs_exact(_rows())
    assert len(fig.axes[0].lines) == 4
    plt.close(fig)


def test_greedy_table():
    lines = greedy_table(_rows()).splitlines()
    assert lines[0] == "| " + " | ".join(GreedyStudyRow._fields) + " |"
    assert len(lines) == 4
    # floats to 3 significant digits, ints as they are
    assert lines[2] == "| 0.1 | 0.975 | 1 | 0.95 | 0.9 | 0.1 | 10 |"


def test_run_study_writes_table_rows_and_figure(tmp_path):
    # the quick greedy study: the default E-DRM, 50 images, sigma 0.1 and 1.0
    report = run_study("greedy", tmp_path, quick=True)
    assert [r["sigma"] for r in report.rows] == [0.1, 1.0]
    assert list(report.rows[0]) == list(GreedyStudyRow._fields)
    for r in report.rows:
        assert r["n_images"] == 50
        for k in ("path_agreement", "class_agreement", "truth_map", "truth_greedy"):
            assert 0.0 <= r[k] <= 1.0
        # the exact MAP path's log-joint is never below the greedy path's
        assert r["mean_gap"] >= -1e-9
        # a path equal to the MAP path has the MAP's class
        assert r["class_agreement"] >= r["path_agreement"]
    # little noise: the greedy tree finds the MAP path (README: sigma <= 0.2)
    assert report.rows[0]["path_agreement"] == 1.0
    assert json.loads((tmp_path / "rows.json").read_text()) == report.rows
    assert (tmp_path / "table.md").read_text() == report.table + "\n"
    assert (tmp_path / "greedy_study.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown study"):
        run_study("nope", tmp_path)
