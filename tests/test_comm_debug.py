"""CommDebugMode contract (README, "A short tour"): counts every collective mpilocal issues, one per logical
collective, by name ("all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor",
"all_to_all_single", "broadcast", "scatter"); ``get_total_counts()`` is their sum; bytes per name
via ``get_comm_bytes()``; metadata agreements (global-shape inference of ``from_local`` without
``shape=``, ``run_check``) are counted apart in ``get_metadata_counts()``.

Redistribute/distribute counts are asserted on meshes of 2 or more ranks (on a 1-rank mesh a
library may legitimately skip a no-op collective); functional collectives are explicit user calls
and are counted at every size, as in PyTorch.

Run: ``mpiexec -n N python -m pytest --with-mpi tests/test_comm_debug.py`` for N = 1, 2, 3, 4.
"""

import numpy as np
import pytest

import mpilocal
import mpilocal.functional as funcol
from conftest import RANK, W as WORLD_SIZE, DEVICE, on_device, to_device, to_host, assert_all, assert_close_all
from mpilocal import (
    CommDebugMode,
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
    init_device_mesh,
    local_map,
)


NAMES = (
    "all_gather_into_tensor",
    "all_reduce",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "broadcast",
    "scatter",
)


def nonzero(d):
    return {k: v for k, v in dict(d).items() if v}


def check_counts(mode, expected, what=""):
    """Collective check: the non-zero comm counts equal ``expected`` and the total is their sum."""
    counts = nonzero(mode.get_comm_counts())
    total = mode.get_total_counts()
    assert_all(counts == expected, f"{what}: counts {counts}, expected {expected}")
    assert_all(total == sum(expected.values()), f"{what}: total {total}, expected {sum(expected.values())}")


@pytest.fixture
def mesh():
    return init_device_mesh(DEVICE, (WORLD_SIZE,))


def test_importable_from_debug_module():
    import mpilocal.debug

    assert mpilocal.debug.CommDebugMode is mpilocal.CommDebugMode


@pytest.mark.mpi
def test_fresh_mode_is_empty():
    mode = CommDebugMode()
    with mode:
        pass
    assert_all(mode.get_total_counts() == 0)
    assert_all(nonzero(mode.get_comm_counts()) == {})
    assert_all(sum(nonzero(mode.get_comm_bytes()).values()) == 0)
    assert_all(sum(nonzero(mode.get_metadata_counts()).values()) == 0)


@pytest.mark.mpi
def test_enter_returns_mode():
    mode = CommDebugMode()
    with mode as m:
        pass
    assert_all(m is mode)


# --------------------------------------------------------------------------- redistribute


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "src, dst, expected",
    [
        ([Shard(0)], [Replicate()], {"all_gather_into_tensor": 1}),
        ([Shard(1)], [Replicate()], {"all_gather_into_tensor": 1}),
        ([Partial()], [Replicate()], {"all_reduce": 1}),
        ([Partial("max")], [Replicate()], {"all_reduce": 1}),
        ([Partial()], [Shard(0)], {"reduce_scatter_tensor": 1}),
        ([Partial()], [Shard(1)], {"reduce_scatter_tensor": 1}),
        ([Shard(0)], [Shard(1)], {"all_to_all_single": 1}),
        ([Shard(1)], [Shard(0)], {"all_to_all_single": 1}),
        ([Replicate()], [Shard(0)], {}),
        ([Replicate()], [Shard(1)], {}),
        ([Replicate()], [Replicate()], {}),
        ([Shard(0)], [Shard(0)], {}),
    ],
    ids=lambda v: repr(v),
)
def test_redistribute_counts_1d(mesh, src, dst, expected):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * WORLD_SIZE + 1, 3 * WORLD_SIZE))  # uneven rows at every size
    if src[0].is_partial():
        dt = DTensor.from_local(x / WORLD_SIZE if src[0].reduce_op == "sum" else x, mesh, src)
    else:
        dt = distribute_tensor(x, mesh, src)
    with CommDebugMode() as mode:
        out = dt.redistribute(mesh, dst)
    check_counts(mode, expected, f"{src} -> {dst}")
    assert_all(tuple(out.placements) == tuple(dst), f"{out.placements}")
    assert_close_all(to_host(out.full_tensor()), x)


@pytest.mark.mpi(min_size=4)
def test_redistribute_counts_2d():
    if WORLD_SIZE != 4:
        pytest.skip("needs a 2x2 mesh")
    mesh = init_device_mesh(DEVICE, (2, 2))
    x = np.arange(8.0 * 6).reshape(8, 6)
    dt = distribute_tensor(x, mesh, [Shard(0), Shard(1)])
    # one logical collective per mesh dim that changes
    with CommDebugMode() as mode:
        r = dt.redistribute(mesh, [Replicate(), Replicate()])
    check_counts(mode, {"all_gather_into_tensor": 2}, "S0,S1 -> R,R")
    assert_close_all(to_host(r.to_local()), x)
    with CommDebugMode() as mode:
        s = dt.redistribute(mesh, [Shard(0), Replicate()])
    check_counts(mode, {"all_gather_into_tensor": 1}, "S0,S1 -> S0,R")
    with CommDebugMode() as mode:
        s = r.redistribute(mesh, [Shard(1), Shard(0)])
    check_counts(mode, {}, "R,R -> S1,S0")
    assert_close_all(to_host(s.full_tensor()), x)


# --------------------------------------------------------------------------- distribute_tensor


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "placements, expected",
    [([Shard(0)], {"scatter": 1}), ([Shard(1)], {"scatter": 1}), ([Replicate()], {"broadcast": 1})],
    ids=["S0", "S1", "R"],
)
def test_distribute_tensor_counts(mesh, placements, expected):
    x = np.arange(5.0 * 3 * WORLD_SIZE).reshape(5, 3 * WORLD_SIZE)
    with CommDebugMode() as mode:
        dt = distribute_tensor(x, mesh, placements)
    check_counts(mode, expected, f"distribute_tensor {placements}")
    assert_close_all(to_host(dt.full_tensor()), x)


@pytest.mark.mpi
def test_distribute_tensor_src_data_rank_none_no_comm(mesh):
    x = np.arange(12.0).reshape(4, 3)
    with CommDebugMode() as mode:
        dt = distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None)
        dr = distribute_tensor(x, mesh, [Replicate()], src_data_rank=None)
    check_counts(mode, {}, "src_data_rank=None")
    assert_close_all(to_host(dt.full_tensor()), x)
    assert_close_all(to_host(dr.to_local()), x)


@pytest.mark.mpi(min_size=2)
def test_distribute_tensor_uses_src_data_rank(mesh):
    src = WORLD_SIZE - 1
    x = np.full((2 * WORLD_SIZE, 2), float(RANK))
    with CommDebugMode() as mode:
        dt = distribute_tensor(x, mesh, [Shard(0)], src_data_rank=src)
    check_counts(mode, {"scatter": 1}, "scatter from last rank")
    assert_close_all(to_host(dt.to_local()), np.full((2, 2), float(src)))


# --------------------------------------------------------------------------- functional collectives


@pytest.mark.mpi
def test_funcol_counts_every_size(mesh):
    x = np.ones((2 * WORLD_SIZE, 3))
    with CommDebugMode() as mode:
        g = funcol.all_gather_tensor(x, 0, mesh)
        r = funcol.all_reduce(x, "sum", mesh)
        rs = funcol.reduce_scatter_tensor(x, "sum", 0, mesh)
        a2a = funcol.all_to_all_single(x, None, None, mesh)
        b = funcol.broadcast(x, 0, mesh)
    check_counts(
        mode,
        {
            "all_gather_into_tensor": 1,
            "all_reduce": 1,
            "reduce_scatter_tensor": 1,
            "all_to_all_single": 1,
            "broadcast": 1,
        },
        "funcol",
    )
    assert_all(g.shape == (2 * WORLD_SIZE * WORLD_SIZE, 3), f"{g.shape}")
    assert_close_all(r, np.full_like(x, WORLD_SIZE))
    assert_close_all(rs, np.full((2, 3), WORLD_SIZE))
    assert_all(a2a.shape == x.shape, f"{a2a.shape}")
    assert_close_all(b, x)


@pytest.mark.mpi
def test_funcol_group_forms_count_the_same(mesh):
    x = np.ones(4)
    with CommDebugMode() as mode:
        funcol.all_reduce(x, "sum", mesh)
        funcol.all_reduce(x, "sum", (mesh, 0))
        funcol.all_reduce(x, "sum", mesh.get_group(0))
    check_counts(mode, {"all_reduce": 3}, "group forms")


@pytest.mark.mpi
def test_get_comm_counts_names_are_the_contract(mesh):
    x = np.ones(2 * WORLD_SIZE)
    with CommDebugMode() as mode:
        funcol.all_gather_tensor(x, 0, mesh)
        funcol.all_reduce(x, "sum", mesh)
        funcol.reduce_scatter_tensor(x, "sum", 0, mesh)
        funcol.all_to_all_single(x, None, None, mesh)
        funcol.broadcast(x, 0, mesh)
    counts = nonzero(mode.get_comm_counts())
    assert_all(set(counts) <= set(NAMES), f"unknown names {set(counts) - set(NAMES)}")
    assert_all(all(isinstance(k, str) and isinstance(v, int) for k, v in counts.items()), f"{counts}")


# --------------------------------------------------------------------------- bytes


@pytest.mark.mpi(min_size=2)
def test_comm_bytes(mesh):
    def run(n):
        x = np.ones((WORLD_SIZE * n, 4))
        with CommDebugMode() as mode:
            funcol.all_reduce(x, "sum", mesh)
            funcol.all_gather_tensor(x, 0, mesh)
        return mode

    m1, m2 = run(2), run(4)
    b1, b2 = nonzero(m1.get_comm_bytes()), nonzero(m2.get_comm_bytes())
    # bytes are reported for exactly the names that ran
    assert_all(set(b1) == {"all_reduce", "all_gather_into_tensor"}, f"bytes {b1}")
    assert_all(all(isinstance(v, (int, np.integer)) and v > 0 for v in b1.values()), f"bytes {b1}")
    # twice the data moves twice the bytes
    assert_all(all(b2[k] == 2 * b1[k] for k in b1), f"bytes {b1} vs {b2}")
    # all_reduce of an array moves at least its own size
    assert_all(b1["all_reduce"] >= WORLD_SIZE * 2 * 4 * 8, f"bytes {b1}")


@pytest.mark.mpi(min_size=2)
def test_comm_bytes_dtype_scales(mesh):
    def run(dtype):
        x = np.ones((WORLD_SIZE * 2, 4), dtype=dtype)
        with CommDebugMode() as mode:
            funcol.all_reduce(x, "sum", mesh)
        return nonzero(mode.get_comm_bytes())

    b64, b32 = run(np.float64), run(np.float32)
    assert_all(b64.get("all_reduce", 0) == 2 * b32.get("all_reduce", 0) > 0, f"{b64} vs {b32}")


@pytest.mark.mpi(min_size=2)
def test_comm_bytes_of_redistribute(mesh):
    x = np.ones((2 * WORLD_SIZE, 8))
    dt = distribute_tensor(x, mesh, [Shard(0)])
    with CommDebugMode() as mode:
        dt.redistribute(mesh, [Replicate()])
    b = nonzero(mode.get_comm_bytes())
    assert_all(set(b) == {"all_gather_into_tensor"} and b["all_gather_into_tensor"] > 0, f"{b}")


# --------------------------------------------------------------------------- metadata apart


@pytest.mark.mpi
def test_from_local_shape_inference_is_metadata_not_comm(mesh):
    local = np.ones((3 if RANK < WORLD_SIZE - 1 else 2, 4))  # uneven (torch.chunk): gathered, not assumed
    with CommDebugMode() as mode:
        dt = DTensor.from_local(local, mesh, [Shard(0)])
    check_counts(mode, {}, "from_local shape inference")
    meta = nonzero(mode.get_metadata_counts())
    # one agreement per sharded mesh dim of size > 1; a mesh dim of size 1 shards nothing
    want = 1 if WORLD_SIZE > 1 else 0
    assert_all(sum(meta.values()) == want, f"metadata {meta}, expected {want}")
    assert_all(tuple(dt.shape) == (3 * WORLD_SIZE - 1, 4), f"{dt.shape}")


@pytest.mark.mpi
def test_from_local_with_shape_or_replicate_needs_no_agreement(mesh):
    with CommDebugMode() as mode:
        DTensor.from_local(np.ones((2, 4)), mesh, [Shard(0)], shape=(2 * WORLD_SIZE, 4))
        DTensor.from_local(np.ones((2, 4)), mesh, [Replicate()])
        DTensor.from_local(np.ones((2, 4)), mesh, [Partial()])
    check_counts(mode, {}, "from_local with shape / unsharded")
    meta = nonzero(mode.get_metadata_counts())
    assert_all(sum(meta.values()) == 0, f"metadata {meta}")


@pytest.mark.mpi
def test_run_check_is_metadata_not_comm(mesh):
    with CommDebugMode() as mode:
        dt = DTensor.from_local(np.ones((2, 4)), mesh, [Shard(0)], run_check=True, shape=(2 * WORLD_SIZE, 4))
    check_counts(mode, {}, "run_check")
    meta = nonzero(mode.get_metadata_counts())
    assert_all(sum(meta.values()) >= 1, f"metadata {meta}")
    assert_all(tuple(dt.shape) == (2 * WORLD_SIZE, 4))


@pytest.mark.mpi
def test_local_map_aligned_inputs_count_zero(mesh):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2 * WORLD_SIZE + 1, 5))
    w = rng.standard_normal((5, 3))
    xd = distribute_tensor(x, mesh, [Shard(0)])
    wd = distribute_tensor(w, mesh, [Replicate()])
    f = local_map(np.matmul, out_placements=[Shard(0)], in_placements=([Shard(0)], [Replicate()]))
    with CommDebugMode() as mode:
        y = f(xd, wd)
    check_counts(mode, {}, "aligned local_map")
    assert_close_all(to_host(y.full_tensor()), x @ w)


# --------------------------------------------------------------------------- contexts


@pytest.mark.mpi
def test_nested_modes(mesh):
    x = np.ones(2 * WORLD_SIZE)
    outer, inner = CommDebugMode(), CommDebugMode()
    with outer:
        funcol.all_reduce(x, "sum", mesh)
        with inner:
            funcol.all_gather_tensor(x, 0, mesh)
            funcol.broadcast(x, 0, mesh)
        funcol.all_reduce(x, "sum", mesh)
    check_counts(inner, {"all_gather_into_tensor": 1, "broadcast": 1}, "inner")
    check_counts(outer, {"all_reduce": 2, "all_gather_into_tensor": 1, "broadcast": 1}, "outer")


@pytest.mark.mpi
def test_counts_reset_per_context(mesh):
    x = np.ones(2 * WORLD_SIZE)
    mode = CommDebugMode()
    with mode:
        funcol.all_reduce(x, "sum", mesh)
        funcol.all_reduce(x, "sum", mesh)
    check_counts(mode, {"all_reduce": 2}, "first context")
    with mode:
        funcol.broadcast(x, 0, mesh)
    check_counts(mode, {"broadcast": 1}, "second context (reset)")
    with mode:
        pass
    check_counts(mode, {}, "third context (reset)")


@pytest.mark.mpi
def test_nothing_counted_outside_context(mesh):
    x = np.ones(2 * WORLD_SIZE)
    mode = CommDebugMode()
    with mode:
        funcol.all_reduce(x, "sum", mesh)
    funcol.all_reduce(x, "sum", mesh)
    funcol.all_gather_tensor(x, 0, mesh)
    check_counts(mode, {"all_reduce": 1}, "after exit")


@pytest.mark.mpi
def test_counts_survive_exception(mesh):
    x = np.ones(2 * WORLD_SIZE)
    mode = CommDebugMode()
    with pytest.raises(RuntimeError, match="boom"):
        with mode:
            funcol.all_reduce(x, "sum", mesh)
            raise RuntimeError("boom")
    check_counts(mode, {"all_reduce": 1}, "after exception")
    # and the mode is no longer active
    funcol.all_reduce(x, "sum", mesh)
    check_counts(mode, {"all_reduce": 1}, "after exception, outside")


@pytest.mark.mpi
def test_total_is_sum_of_counts(mesh):
    x = np.ones((2 * WORLD_SIZE, 2))
    with CommDebugMode() as mode:
        for _ in range(3):
            funcol.all_reduce(x, "max", mesh)
        funcol.all_gather_tensor(x, 1, mesh)
    assert_all(mode.get_total_counts() == sum(mode.get_comm_counts().values()) == 4)


@pytest.mark.mpi
def test_counts_of_collectives_that_never_ran_read_zero(mesh):
    # PyTorch's get_comm_counts() is a defaultdict(int): a porter's `counts[funcol.all_reduce] == 0` works
    from collections import defaultdict

    with CommDebugMode() as mode:
        funcol.all_reduce(np.ones(2), "sum", mesh)
    for getter in (mode.get_comm_counts, mode.get_comm_bytes, mode.get_metadata_counts, mode.get_metadata_bytes):
        got = getter()
        assert isinstance(got, defaultdict) and got.default_factory is int, type(got)
    counts = mode.get_comm_counts()
    assert counts["all_reduce"] == 1
    for name in NAMES:
        if name != "all_reduce":
            assert counts[name] == 0, (name, counts[name])
    assert mode.get_comm_bytes()["broadcast"] == 0
    counts["all_reduce"] += 5  # a copy: the mode's books do not change
    assert mode.get_comm_counts()["all_reduce"] == 1 and mode.get_total_counts() == 1
