"""The pure rules of ``mpilocal.names``, against NumPy (no MPI needed)."""

import numpy as np
import pytest

from mpilocal import names

UFUNC = {"sum": np.add, "product": np.multiply, "max": np.maximum, "min": np.minimum}
DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint32, np.int64, np.uint64, np.float16, np.float32,
          np.float64]


def _values(dt):
    dt = np.dtype(dt)
    if dt.kind == "b":
        return np.array([False, True])
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.array([info.min, info.min + 1, 0, 1, info.max - 1, info.max], dt)
    return np.array([-np.inf, np.finfo(dt).min, -1.5, -0.0, 0.0, 2.5, np.finfo(dt).max, np.inf, np.nan], dt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", names.TRANSPORT_OPS)
def test_identity_leaves_every_value_unchanged(op, dtype):
    """op(identity, x) == x for every x of the dtype, extremes, infinities and NaN included (what an
    empty shard must contribute to a reduction)."""
    x = _values(dtype)
    e = np.full_like(x, names.identity(op, dtype))
    f = UFUNC[op] if np.dtype(dtype) != np.bool_ else (np.logical_or if names.BOOL_OPS[op] == "or" else np.logical_and)
    with np.errstate(over="ignore", invalid="ignore"):
        got = f(e, x).astype(x.dtype)
    np.testing.assert_array_equal(got, x)


def test_op_tables_and_bool_rule():
    ops, bool_ops = names.op_tables(sum="S", max="MX", min="MN", product="P", logical_or="OR", logical_and="AND")
    assert ops == {"sum": "S", "max": "MX", "min": "MN", "product": "P"}
    # NumPy's reductions of bools: sum > 0 and max are OR; prod and min are AND
    a = np.array([[False, False], [False, True], [True, True]])
    numpy_says = {"sum": a.sum(axis=1) > 0, "max": a.max(axis=1), "min": a.min(axis=1), "product": a.prod(axis=1) > 0}
    logical = {"OR": np.logical_or.reduce(a, axis=1), "AND": np.logical_and.reduce(a, axis=1)}
    for op in names.TRANSPORT_OPS:
        np.testing.assert_array_equal(logical[bool_ops[op]], numpy_says[op])


def test_collective_vocabularies():
    """Every short name maps to PyTorch's name, under which CommDebugMode counts."""
    from mpilocal.debug import COLLECTIVE_NAMES

    assert set(names.REDUCING) <= set(names.COLLECTIVES)
    assert set(names.COLLECTIVES.values()) <= set(COLLECTIVE_NAMES)
    assert names.COLLECTIVES["all_gather"] == "all_gather_into_tensor"
    assert names.COLLECTIVES["reduce_scatter"] == "reduce_scatter_tensor"
    assert names.COLLECTIVES["all_to_all"] == "all_to_all_single"
