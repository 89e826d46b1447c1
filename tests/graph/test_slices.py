"""Slice-grouped table evaluation equals the colour evaluator (its naive twin)."""

import numpy as np
import pytest

import pgm_drm.graph.compile as C
from pgm_drm.testing import chain_loop_model, ising_grid, ising_loop_model


def _both(model):
    old = C.GROUP_EQNS
    try:
        C.GROUP_EQNS = 0
        grouped = C.compile_model(model)
        C.GROUP_EQNS = 10**12
        naive = C.compile_model(model)
    finally:
        C.GROUP_EQNS = old
    return grouped, naive


@pytest.mark.parametrize("kind", ["chain", "ising"])
def test_grouped_tables_equal_the_colour_evaluator(kind):
    model = (
        chain_loop_model(12, 3)[0]
        if kind == "chain"
        else ising_loop_model(ising_grid(4))
    )
    grouped, naive = _both(model)
    assert len(grouped._static_tables) == len(naive._static_tables)
    for a, b in zip(grouped._static_tables, naive._static_tables, strict=True):
        # the same ops on the same values: equal up to float round-off
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)
