"""The sample / infer recipes: the named default models."""

import pytest

from pgm_drm.experiments.sample import MODELS, default_model


@pytest.mark.parametrize("name", [m for m in MODELS if m != "conv-drm"])  # 8 s
def test_default_models_have_their_names(name):
    model = default_model(name)
    kind = {
        "rm": "RenderingModel",
        "drm": "DeepRenderingModel",
        "conv-drm": "ConvRenderingModel",
        "edrm": "EvolutionaryDRM",
    }[name]
    assert type(model).__name__ == kind


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        default_model("svm")
