"""The DCN-vs-exact study: exact at overlap 0, well-formed table and plot."""

import jax
import pytest

from pgm_drm.diagnostics.exactness import dcn_exactness_study, plot_dcn_exactness


def test_study_small():
    study = dcn_exactness_study(
        jax.random.PRNGKey(0),
        overlaps=(0, 1),
        sigmas=(0.5,),
        n_images=4,
        n_models=1,
        grid=2,
        class_size=1,
        progress=False,
    )
    assert len(study.rows) == 2
    zero = study.rows[0]
    # overlap 0: the DCN pass is exact (tested to 1e-6 in test_conv_dcn), so every
    # MAP agrees and the class posteriors coincide up to float64 rounding
    assert zero["dcn_map_exact"] == 1.0 and zero["dcn_class_agree"] == 1.0
    assert zero["dcn_class_tv"] < 1e-9
    for row in study.rows:
        assert 0.0 <= row["dcn_map_exact"] <= 1.0
        assert 0.0 <= row["loopy_map_exact"] <= 1.0
        assert 0.0 <= row["dcn_class_tv"] <= 1.0
    assert study.table().count("\n") == 3
    assert set(study.models) == {(0, 0), (1, 0)}
    fig = plot_dcn_exactness(study)
    assert len(fig.axes) == 2


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
