"""Error contract (README, "A short tour" and "Porting from `torch.distributed.tensor`"): every misuse raises a real
exception (``TypeError`` for kinds, ``ValueError`` for values/shapes/placements), with a message
that names the problem, and it is raised on **every** rank.

Every call is made on all ranks; :func:`conftest.raises_all` catches the exception on each rank and
agrees on the verdict collectively, so a rank that does not raise fails the test on all ranks instead
of leaving the others waiting. Where the error can be detected locally it must come before any
collective runs: those tests also check ``CommDebugMode().get_total_counts() == 0``.

Run: ``mpiexec -n N python -m pytest --with-mpi tests/test_errors.py`` for N = 1, 2, 3, 4.
"""

import re

import numpy as np
import pytest

import mpilocal.functional as funcol
from conftest import RANK, WORLD, W as WORLD_SIZE, assert_all, raises_all
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


def raises_all_before_comm(exc, match, fn, *args, **kwargs):
    """:func:`conftest.raises_all`, and no collective ran before the error (the verdict's own
    agreement goes through mpi4py directly, which CommDebugMode does not count)."""
    with CommDebugMode() as comm_mode:
        err = raises_all(exc, match, fn, *args, **kwargs)
    total = comm_mode.get_total_counts()
    assert_all(total == 0, f"rank {RANK}: {comm_mode.get_comm_counts()} ran before the error")
    return err


@pytest.fixture
def mesh():
    return init_device_mesh("cpu", (WORLD_SIZE,))


@pytest.fixture
def mesh2d():
    return init_device_mesh("cpu", (WORLD_SIZE, 1), mesh_dim_names=("dp", "tp"))


# --------------------------------------------------------------------------- placements vs mesh


@pytest.mark.mpi
def test_wrong_number_of_placements_distribute(mesh):
    x = np.zeros((4, 4))
    raises_all_before_comm(
        ValueError, r"(?i)placement", distribute_tensor, x, mesh, [Shard(0), Replicate()]
    )
    raises_all_before_comm(ValueError, r"(?i)placement", distribute_tensor, x, mesh, [])


@pytest.mark.mpi
def test_wrong_number_of_placements_2d(mesh2d):
    x = np.zeros((4, 4))
    raises_all_before_comm(ValueError, r"(?i)placement", distribute_tensor, x, mesh2d, [Shard(0)])
    raises_all_before_comm(
        ValueError, r"(?i)placement", DTensor.from_local, x, mesh2d, [Replicate(), Replicate(), Replicate()]
    )


@pytest.mark.mpi
def test_wrong_number_of_placements_from_local(mesh):
    x = np.zeros((4, 4))
    raises_all_before_comm(
        ValueError, r"(?i)placement", DTensor.from_local, x, mesh, [Replicate(), Replicate()]
    )


@pytest.mark.mpi
def test_wrong_number_of_placements_redistribute(mesh):
    dt = distribute_tensor(np.zeros((4, 4)), mesh, [Replicate()])
    raises_all_before_comm(ValueError, r"(?i)placement", dt.redistribute, mesh, [Shard(0), Shard(1)])


@pytest.mark.mpi
@pytest.mark.parametrize("dim", [2, 5, -3])
def test_shard_dim_out_of_range(mesh, dim):
    x = np.zeros((4, 4))
    raises_all_before_comm(ValueError, r"(?i)out of range|dim", distribute_tensor, x, mesh, [Shard(dim)])
    raises_all_before_comm(ValueError, r"(?i)out of range|dim", DTensor.from_local, x, mesh, [Shard(dim)])
    dt = distribute_tensor(x, mesh, [Replicate()])
    raises_all_before_comm(ValueError, r"(?i)out of range|dim", dt.redistribute, mesh, [Shard(dim)])


@pytest.mark.mpi
@pytest.mark.parametrize("op", ["mean", "SUM", "add", ""])
def test_partial_invalid_reduce_op(op):
    raises_all(ValueError, re.escape(repr(op)) + r"|reduce", Partial, op)


@pytest.mark.mpi
@pytest.mark.parametrize("src", ["size", "size+3", "-1"])
def test_src_data_rank_out_of_range(mesh, src):
    src_data_rank = {"size": WORLD_SIZE, "size+3": WORLD_SIZE + 3, "-1": -1}[src]
    for placements in ([Shard(0)], [Replicate()]):
        raises_all_before_comm(
            ValueError,
            r"src_data_rank",
            distribute_tensor,
            np.zeros((4, 4)),
            mesh,
            placements,
            src_data_rank=src_data_rank,
        )


# --------------------------------------------------------------------------- meshes


@pytest.mark.mpi
@pytest.mark.parametrize("shape", ["N+1", "2N", "(N, 2)"])
def test_init_device_mesh_shape_mismatch(shape):
    mesh_shape = {"N+1": (WORLD_SIZE + 1,), "2N": (2 * WORLD_SIZE,), "(N, 2)": (WORLD_SIZE, 2)}[shape]
    raises_all(ValueError, r"(?i)mesh_shape|size|world", init_device_mesh, "cpu", mesh_shape)


@pytest.mark.mpi
def test_mesh_dim_names_duplicate():
    raises_all(
        ValueError, r"(?i)mesh_dim_names|duplicate|unique", init_device_mesh, "cpu", (WORLD_SIZE, 1),
        mesh_dim_names=("a", "a"),
    )


@pytest.mark.mpi
@pytest.mark.parametrize("names", [("a",), ("a", "b", "c")])
def test_mesh_dim_names_wrong_length(names):
    raises_all(
        ValueError, r"(?i)mesh_dim_names|length|names", init_device_mesh, "cpu", (WORLD_SIZE, 1),
        mesh_dim_names=names,
    )


@pytest.mark.mpi
def test_unknown_mesh_dim_name(mesh2d):
    # PyTorch raises KeyError here; mpilocal's rule is ValueError for values: both are accepted.
    raises_all((KeyError, ValueError), r"x", lambda: mesh2d["x"])
    raises_all((KeyError, ValueError), r"x", lambda: mesh2d["dp", "x"])


@pytest.mark.mpi
def test_mesh_without_names_indexed_by_name(mesh):
    raises_all((KeyError, ValueError, RuntimeError), None, lambda: mesh["dp"])


# --------------------------------------------------------------------------- from_local(run_check=True)


@pytest.mark.mpi(min_size=2)
def test_run_check_local_shapes_disagree(mesh):
    # Shard(0): every rank's shard must have the same number of columns. Rank 1's differs; ranks
    # whose own shape looks fine must raise too.
    cols = 5 if RANK == 1 else 4
    x = np.zeros((3, cols))
    raises_all(ValueError, r"(?i)shape", DTensor.from_local, x, mesh, [Shard(0)], run_check=True)


@pytest.mark.mpi(min_size=2)
def test_run_check_replicate_shapes_disagree(mesh):
    rows = 4 if RANK == WORLD_SIZE - 1 else 3
    x = np.zeros((rows, 2))
    raises_all(ValueError, r"(?i)shape", DTensor.from_local, x, mesh, [Replicate()], run_check=True)


@pytest.mark.mpi(min_size=2)
def test_run_check_ndim_disagree(mesh):
    x = np.zeros((3, 4, 1)) if RANK == 1 else np.zeros((3, 4))
    raises_all(ValueError, r"(?i)ndim|shape|dim", DTensor.from_local, x, mesh, [Shard(0)], run_check=True)


@pytest.mark.mpi(min_size=2)
def test_run_check_dtype_disagree(mesh):
    x = np.zeros((3, 4), dtype=np.float32 if RANK == 1 else np.float64)
    raises_all(ValueError, r"(?i)dtype", DTensor.from_local, x, mesh, [Shard(0)], run_check=True)


@pytest.mark.mpi
def test_run_check_consistent_is_fine(mesh):
    x = np.full((3, 4), float(RANK))
    dt = DTensor.from_local(x, mesh, [Shard(0)], run_check=True)
    assert_all(tuple(dt.shape) == (3 * WORLD_SIZE, 4), f"{dt.shape}")


# --------------------------------------------------------------------------- kinds (TypeError)


@pytest.mark.mpi
def test_distribute_tensor_non_array(mesh):
    raises_all_before_comm(TypeError, None, distribute_tensor, [1, 2], mesh, [Replicate()])
    raises_all_before_comm(TypeError, None, distribute_tensor, [1, 2], mesh, [Shard(0)])


@pytest.mark.mpi
def test_from_local_non_array(mesh):
    raises_all_before_comm(TypeError, None, DTensor.from_local, "x", mesh, [Replicate()])
    raises_all_before_comm(TypeError, None, DTensor.from_local, [1.0, 2.0], mesh, [Shard(0)])


@pytest.mark.mpi
@pytest.mark.parametrize(
    "call",
    [
        lambda m: funcol.all_reduce([1.0, 2.0], "sum", m),
        lambda m: funcol.all_gather_tensor([1.0, 2.0], 0, m),
        lambda m: funcol.reduce_scatter_tensor([1.0] * (2 * WORLD_SIZE), "sum", 0, m),
        lambda m: funcol.all_to_all_single([1.0] * WORLD_SIZE, None, None, m),
        lambda m: funcol.broadcast([1.0, 2.0], 0, m),
    ],
    ids=["all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast"],
)
def test_funcol_with_list(mesh, call):
    raises_all_before_comm(TypeError, None, call, mesh)


@pytest.mark.mpi
def test_placement_not_a_placement(mesh):
    raises_all_before_comm(TypeError, None, distribute_tensor, np.zeros(4), mesh, ["shard"])
    raises_all(TypeError, None, Shard, "0")


# --------------------------------------------------------------------------- local_map


def _mm(a, b):
    return a @ b


@pytest.mark.mpi
def test_local_map_dtensor_with_none_placements(mesh):
    x = distribute_tensor(np.ones((4, 3)), mesh, [Shard(0)])
    w = distribute_tensor(np.ones((3, 2)), mesh, [Replicate()])
    f = local_map(_mm, out_placements=[Shard(0)], in_placements=([Shard(0)], None), device_mesh=mesh)
    raises_all_before_comm(ValueError, "expects placements", f, x, w)


@pytest.mark.mpi
def test_local_map_non_array_with_placements(mesh):
    x = distribute_tensor(np.ones((4, 3)), mesh, [Shard(0)])
    f = local_map(
        lambda a, s: a * s, out_placements=[Shard(0)], in_placements=([Shard(0)], [Replicate()]), device_mesh=mesh
    )
    raises_all_before_comm(ValueError, "expects None placements", f, x, 2.0)


@pytest.mark.mpi(min_size=2)
def test_local_map_mismatch_without_redistribute(mesh):
    x = distribute_tensor(np.ones((4, 3)), mesh, [Shard(0)])
    w = distribute_tensor(np.ones((3, 2)), mesh, [Shard(1)])
    f = local_map(_mm, out_placements=[Shard(0)], in_placements=([Shard(0)], [Replicate()]), device_mesh=mesh)
    raises_all_before_comm(ValueError, "set redistribute_inputs=True", f, x, w)


@pytest.mark.mpi
def test_local_map_mismatch_without_redistribute_any_size(mesh):
    # Partial vs Replicate differs even on a 1-rank mesh
    x = DTensor.from_local(np.ones((4, 3)), mesh, [Partial()])
    f = local_map(lambda a: a, out_placements=[Replicate()], in_placements=([Replicate()],), device_mesh=mesh)
    raises_all_before_comm(ValueError, "set redistribute_inputs=True", f, x)


@pytest.mark.mpi
def test_local_map_output_count_mismatch(mesh):
    x = distribute_tensor(np.ones((4, 3)), mesh, [Shard(0)])
    # two outputs, one placement entry (a tuple of one)
    f = local_map(lambda a: (a, a + 1), out_placements=([Shard(0)],), in_placements=([Shard(0)],), device_mesh=mesh)
    raises_all_before_comm(ValueError, "one PlacementType be provided for each output", f, x)
    # one output, three entries
    g = local_map(
        lambda a: a, out_placements=([Shard(0)], [Shard(0)], None), in_placements=([Shard(0)],), device_mesh=mesh
    )
    raises_all_before_comm(ValueError, "one PlacementType be provided for each output", g, x)


@pytest.mark.mpi
def test_local_map_errors_identical_on_all_ranks(mesh):
    x = distribute_tensor(np.ones((4, 3)), mesh, [Shard(0)])
    w = distribute_tensor(np.ones((3, 2)), mesh, [Replicate()])
    f = local_map(_mm, out_placements=[Shard(0)], in_placements=([Shard(0)], None), device_mesh=mesh)
    err = raises_all(ValueError, "expects placements", f, x, w)
    msgs = WORLD.allgather(str(err))
    assert_all(len(set(msgs)) == 1, f"messages differ across ranks: {msgs}")


@pytest.mark.mpi
def test_local_map_single_placement_instead_of_sequence():
    # a common slip: in_placements=(Shard(0),) for one input on a 1-D mesh means [Shard(0)]
    for kw in ({"out_placements": [Shard(0)], "in_placements": (Shard(0),)},
               {"out_placements": Shard(0)}):
        err = raises_all(TypeError, re.escape("write [Shard(dim=0)]"), local_map, lambda a: a, **kw)
        assert_all("sequence of placements" in str(err), str(err))
