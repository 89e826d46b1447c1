"""Slice-grouped table evaluation equals the colour evaluator (its naive twin)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgm_drm.graph.compile as C
from pgm_drm.graph import slices
from pgm_drm.testing import (
    chain_loop_model,
    ising_grid,
    ising_loop_model,
    random_factor_model,
    random_nested_plate_model,
    random_plate_model,
)


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


def _grouped(model, **kwargs):
    old = C.GROUP_EQNS
    try:
        C.GROUP_EQNS = 0  # every model takes the grouped path
        return C.compile_model(model, **kwargs)
    finally:
        C.GROUP_EQNS = old


@given(
    kind=st.sampled_from(["chain", "ising", "nested", "plate", "factor"]),
    seed=st.integers(0, 10_000),
)
def test_latent_free_values_in_numpy_equal_jax(kind, seed):
    """The numpy rules of the latent-free pass are exact twins of JAX's ops."""
    if kind == "chain":
        model, kwargs = chain_loop_model(8, 3, seed=seed)[0], {}
    elif kind == "ising":
        model, kwargs = ising_loop_model(ising_grid(3, seed=seed)), {}
    elif kind == "nested":
        model, kwargs = random_nested_plate_model(seed)
    elif kind == "plate":
        model, kwargs = random_plate_model(seed)
    else:
        model, kwargs = random_factor_model(seed, kind="loopy", hard_zeros=True)
    fast = _grouped(model, **kwargs)
    mp = pytest.MonkeyPatch()
    mp.setattr(slices, "_NUMPY_RULES", {})
    try:
        naive = _grouped(model, **kwargs)
    finally:
        mp.undo()
    for a, b in zip(fast._static_tables, naive._static_tables, strict=True):
        # The same values into the same compiled programs: bit for bit.
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
