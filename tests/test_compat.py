"""Old import paths of moved / renamed names still resolve, with a warning."""

import pytest

import pgm_drm.diagnostics.exactness as exactness
import pgm_drm.inference.edrm as inference_edrm
from pgm_drm._compat import edrm_moved
from pgm_drm.learning.drm_em import PerClassDRM

EDRM_MOVED = edrm_moved()


@pytest.mark.parametrize("name", sorted(EDRM_MOVED))
@pytest.mark.parametrize("module", ["pgm_drm.models", "pgm_drm.models.edrm"])
def test_moved_edrm_names(module, name):
    import importlib

    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match="has moved to"):
        old = getattr(mod, name)
    new = getattr(
        inference_edrm if EDRM_MOVED[name].endswith("edrm") else exactness, name
    )
    assert old is new


def test_renamed_drm_classifier():
    import pgm_drm.learning

    with pytest.warns(DeprecationWarning, match="PerClassDRM"):
        assert pgm_drm.learning.DRMClassifier is PerClassDRM


def test_unknown_names_still_raise():
    import pgm_drm.learning
    import pgm_drm.models

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pgm_drm.models.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pgm_drm.learning.nope  # noqa: B018
