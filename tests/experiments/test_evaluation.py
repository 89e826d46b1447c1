"""Honest evaluation (issue 15): stratified splits, CV selection that never sees a
test image's label or a test image at all, and tables that report what was
measured. Accuracies are recomputed, never compared with a threshold."""

import json

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from pgm_drm.data import DigitsSplit, load_digits_split
from pgm_drm.experiments import digits as digits_mod
from pgm_drm.experiments.digits import DigitsPrediction, fit_model, label_subset
from pgm_drm.experiments.evaluation import (
    digits_splits,
    evaluate_digits,
    plot_evaluation,
)


def _rows(x: np.ndarray) -> np.ndarray:
    """Images as sorted flat rows (a multiset one can compare)."""
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_digits_splits_are_stratified_partitions():
    x_all, y_all = load_digits(return_X_y=True)
    splits = digits_splits(3)
    np.testing.assert_array_equal(splits[0].x_test, load_digits_split().x_test)
    assert not np.array_equal(splits[1].y_test, splits[2].y_test)
    for s in splits:
        assert s.x_train.shape == (1347, 8, 8) and s.x_test.shape == (450, 8, 8)
        # train and test together are the whole data set, each image once
        both = np.concatenate([s.x_train, s.x_test]) * 16
        np.testing.assert_array_equal(_rows(both), _rows(x_all))
        # stratified: each class's test share is a quarter of it, to one image
        want = np.bincount(y_all) * 0.25
        assert np.all(np.abs(np.bincount(s.y_test, minlength=10) - want) <= 1)


def _tagged_splits(n_splits=2, per_class_train=6, per_class_test=2):
    """Images that carry their id at pixel (0, 0) and their class at (0, 1)."""
    out, next_id = [], 0
    for _ in range(n_splits):
        parts = []
        for per in (per_class_train, per_class_test):
            y = np.repeat(np.arange(10), per)
            x = np.zeros((len(y), 8, 8))
            x[:, 0, 0] = next_id + np.arange(len(y))
            x[:, 0, 1] = y
            next_id += len(y)
            parts += [x, y]
        out.append(DigitsSplit(*parts))
    return out


@pytest.mark.parametrize("labels", [None, 30])
def test_select_never_sees_the_test_split(monkeypatch, labels):
    """A spy replaces the RM step: it records every image and label it is given
    and predicts the true class (pixel (0, 1)) only with 5 templates."""
    calls = []

    def spy(d, y, key, out, report, em, weight, progress, *, n_templates, **kw):
        calls.append(
            {
                "train": d.x_train[:, 0, 0].copy(),
                "y": np.asarray(y).copy(),
                "test": d.x_test[:, 0, 0].copy(),
                "y_test": np.asarray(d.y_test).copy(),
                "n_templates": n_templates,
            }
        )
        truth = d.x_test[:, 0, 1].astype(int)
        return DigitsPrediction(truth if n_templates == 5 else (truth + 1) % 10, None)

    monkeypatch.setattr(digits_mod, "fit_rm", spy)
    splits = _tagged_splits()
    res = evaluate_digits(
        ["rm"],
        splits=splits,
        labels=labels,
        select=True,
        baselines=False,
        progress=False,
        grids={"rm": {"n_templates": (10, 5)}},
    )
    # per split: 2 candidates x 3 folds, then the one final fit
    assert len(calls) == 2 * (2 * 3 + 1)
    for s, block in zip(splits, (calls[:7], calls[7:]), strict=True):
        train_ids, test_ids = s.x_train[:, 0, 0], s.x_test[:, 0, 0]
        y_fit = s.y_train if labels is None else label_subset(s.y_train, labels, 0)
        labelled = set(train_ids[y_fit >= 0])
        for c in block[:-1]:  # cross-validation: inside the training split only
            assert set(c["train"]) | set(c["test"]) <= set(train_ids)
            assert not set(c["train"]) & set(c["test"])
            assert set(c["test"]) <= labelled  # validated on labelled images
            assert set(train_ids) - labelled <= set(c["train"])  # unlabelled stay
            assert np.all(c["y"][np.isin(c["train"], list(labelled))] >= 0)
        final = block[-1]
        np.testing.assert_array_equal(final["train"], train_ids)
        np.testing.assert_array_equal(final["test"], test_ids)
        np.testing.assert_array_equal(final["y"], y_fit)
        assert final["n_templates"] == 5  # the CV winner
        for c in block:
            assert np.all(c["y_test"] == -1)  # no fit is handed a label it predicts
    assert res.accuracy["rm"].tolist() == [[1.0], [1.0]]
    assert [row[0]["n_templates"] for row in res.settings["rm"]] == [5, 5]
    cv = res.cv_accuracy["rm"][0][0]
    assert sorted(cv.values()) == [0.0, 1.0]


def test_accuracies_table_and_json_report_what_was_measured(tmp_path):
    res = evaluate_digits(
        ["rm"],
        splits=2,
        baselines=["svc"],
        progress=False,
        settings={"rm": {"n_iter": 2}},
        out=tmp_path,
    )
    splits = digits_splits(2)
    # the SVC baseline by hand on split 1: the same numbers exactly
    s = splits[1]
    svc = SVC().fit(s.x_train.reshape(1347, -1), s.y_train)
    assert res.accuracy["svc"][1, 0] == svc.score(s.x_test.reshape(450, -1), s.y_test)
    # the RM recipe by hand on split 0, seed 0: deterministic given its key
    pred = fit_model("rm", splits[0], splits[0].y_train, 0, figure=False, n_iter=2)
    assert res.accuracy["rm"][0, 0] == np.mean(pred.pred == splits[0].y_test)

    assert res.names == ("rm", "svc") and res.split_ids == (0, 1)
    assert not res.select and np.all(res.select_seconds["rm"] == 0)
    assert res.settings["rm"][0][0] == {
        "n_templates": 10,
        "n_iter": 2,
        "min_sigma": 0.05,
    }
    lines = res.table().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model | test accuracy")
    acc = res.accuracy["rm"]
    assert lines[2].startswith(
        f"| rm | {acc.mean():.3f} ± {np.std(acc, ddof=1):.3f} "
        f"| {acc.min():.3f}-{acc.max():.3f} | 2 |"
    )
    record = json.loads((tmp_path / "evaluation.json").read_text())
    assert record == json.loads(res.to_json())
    assert (tmp_path / "table.md").read_text() == res.table() + "\n"
    assert (tmp_path / "evaluation.png").exists()
    assert record["split_ids"] == [0, 1] and record["select"] is False
    assert record["models"]["svc"]["accuracy"] == res.accuracy["svc"].tolist()
    assert record["models"]["rm"]["sd"] == pytest.approx(np.std(acc, ddof=1))
    assert len(res.selection_table().splitlines()) == 2 + 2 * 2
    fig = plot_evaluation(res)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["rm", "svc"]
    plt.close(fig)


def test_seeds_alone_give_the_spread():
    res = evaluate_digits(
        [], splits=_tagged_splits(1), seeds=[3, 4], baselines=["svc"], progress=False
    )
    assert res.seeds == (3, 4) and res.accuracy["svc"].shape == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"splits": 1}, "no sd"),
        ({"models": ["svm"]}, "unknown models"),
        ({"baselines": ["knn"]}, "unknown baselines"),
        ({"baselines": ["label-spreading"]}, "needs labels"),
        ({"labels": 5}, "multiple of 10"),
        ({"labels": 10_000}, "multiple of 10"),
        ({"models": ["drm"], "labels": 100}, "rm and mfa"),
        ({"labels": 20, "select": True}, "labels per class"),
        ({"settings": {"rm": {"n_layers": 3}}}, "unknown settings"),
        ({"settings": {"mfa": {"n_factors": 3}}}, "not evaluated"),
        ({"select": True, "grids": {"rm": {"n_templates": ()}}}, "no values"),
        ({"select": True, "grids": {"rm": {"depth": (2,)}}}, "in the grid"),
        ({"select": True, "folds": 1}, "folds must be"),
        ({"seeds": 0}, "seeds must be"),
    ],
)
def test_bad_arguments_are_refused_before_fitting(monkeypatch, kwargs, match):
    def no_fit(*args, **kw):
        raise AssertionError("fitted before the arguments were checked")

    monkeypatch.setattr(digits_mod, "fit_model", no_fit)
    args = {"models": ["rm"], "splits": 2, "baselines": False, "progress": False}
    with pytest.raises(ValueError, match=match):
        evaluate_digits(**{**args, **kwargs})


def test_small_cnn_baseline_trains_in_float32_under_x64():
    """The test suite (and the CLI) run with jax_enable_x64: the CNN's float32
    weights must not be promoted (conv_general_dilated refuses mixed dtypes)."""
    from pgm_drm.experiments.evaluation import _cnn_init, _fit_small_cnn

    assert all(
        v.dtype == jnp.float32 for v in _cnn_init(jax.random.PRNGKey(0)).values()
    )
    d = load_digits_split()
    pred = _fit_small_cnn(d, d.y_train, 0, epochs=1)
    assert pred.shape == d.y_test.shape and set(pred.tolist()) <= set(range(10))
