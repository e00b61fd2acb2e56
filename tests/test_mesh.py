"""DeviceMesh and init_device_mesh: shape, names, sub-meshes, groups, coordinates, identity."""

import numpy as np
import pytest
from conftest import assert_all
from mpi4py import MPI

from mpilocal import DeviceMesh, init_device_mesh

W = MPI.COMM_WORLD.Get_size()
RANK = MPI.COMM_WORLD.Get_rank()


def two_d_shapes():
    """2-D mesh shapes that fit the world: 2x2 at 4 ranks, 1xN and Nx1 everywhere."""
    shapes = [(1, W), (W, 1)]
    if W == 4:
        shapes.append((2, 2))
    return shapes


@pytest.mark.mpi
def test_init_device_mesh_1d():
    mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("x",))
    assert mesh.device_type == "cpu"
    assert isinstance(mesh.mesh, np.ndarray) and mesh.mesh.dtype.kind in "iu"
    assert np.array_equal(mesh.mesh, np.arange(W))
    assert tuple(mesh.shape) == (W,)
    assert mesh.ndim == 1
    assert mesh.size() == W and mesh.size(0) == W and mesh.size("x") == W
    assert tuple(mesh.mesh_dim_names) == ("x",)
    assert_all(list(mesh.get_coordinate()) == [RANK], f"coordinate {mesh.get_coordinate()}")
    assert_all(mesh.get_local_rank() == RANK and mesh.get_local_rank(0) == RANK and mesh.get_local_rank("x") == RANK)
    for key in (None, 0, "x"):
        comm = mesh.get_group() if key is None else mesh.get_group(key)
        assert isinstance(comm, MPI.Comm)
        assert_all(comm.Get_size() == W and comm.Get_rank() == RANK, f"group {key}")
        assert_all(comm.allgather(RANK) == list(range(W)), f"members of group {key}")


@pytest.mark.mpi
def test_init_device_mesh_without_names():
    mesh = init_device_mesh("cpu", (W,))
    assert mesh.mesh_dim_names is None
    assert mesh.ndim == 1 and mesh.size() == W
    mesh2 = init_device_mesh("cpu", W)  # an int shape, as PyTorch's mesh_shape=(n,) shorthand
    assert mesh2 == mesh


@pytest.mark.mpi
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 4), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)])
def test_init_device_mesh_2d(shape):
    if shape not in two_d_shapes():
        pytest.skip(f"mesh {shape} does not fit {W} ranks")
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
    expected = np.arange(W).reshape(shape)
    assert np.array_equal(mesh.mesh, expected)
    assert tuple(mesh.shape) == shape and mesh.ndim == 2
    assert mesh.size() == W and mesh.size(0) == shape[0] and mesh.size(1) == shape[1]
    assert mesh.size("dp") == shape[0] and mesh.size("tp") == shape[1]
    assert tuple(mesh.mesh_dim_names) == ("dp", "tp")
    i, j = (int(v) for v in np.argwhere(expected == RANK)[0])
    assert_all(list(mesh.get_coordinate()) == [i, j], f"coordinate {mesh.get_coordinate()} != {[i, j]}")
    assert_all(mesh.get_local_rank("dp") == i and mesh.get_local_rank(0) == i)
    assert_all(mesh.get_local_rank("tp") == j and mesh.get_local_rank(1) == j)
    # the group along each dim: right size, own rank, members in mesh order
    for key, d in (("dp", 0), ("tp", 1), (0, 0), (1, 1)):
        comm = mesh.get_group(key)
        assert isinstance(comm, MPI.Comm)
        members = comm.allgather(RANK)
        want = expected[:, j].tolist() if d == 0 else expected[i, :].tolist()
        assert_all(comm.Get_size() == shape[d], f"group {key} size {comm.Get_size()}")
        assert_all(comm.Get_rank() == (i, j)[d], f"group {key} rank {comm.Get_rank()}")
        assert_all(members == want, f"group {key} members {members} != {want}")


@pytest.mark.mpi
@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (2, 2), (1, 3), (3, 1), (1, 2), (2, 1), (1, 1)])
def test_submesh(shape):
    if shape not in two_d_shapes():
        pytest.skip(f"mesh {shape} does not fit {W} ranks")
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
    full = np.arange(W).reshape(shape)
    i, j = (int(v) for v in np.argwhere(full == RANK)[0])

    tp = mesh["tp"]
    assert isinstance(tp, DeviceMesh)
    assert tp.ndim == 1 and tuple(tp.mesh_dim_names) == ("tp",)
    assert_all(np.array_equal(tp.mesh, full[i, :]), f"mesh['tp'].mesh {tp.mesh} != {full[i, :]}")
    assert_all(list(tp.get_coordinate()) == [j])
    assert_all(tp.get_local_rank() == j)
    assert tp.size() == shape[1]
    comm = tp.get_group()
    assert_all(comm.allgather(RANK) == full[i, :].tolist())

    dp = mesh["dp"]
    assert_all(np.array_equal(dp.mesh, full[:, j]), f"mesh['dp'].mesh {dp.mesh} != {full[:, j]}")
    assert_all(list(dp.get_coordinate()) == [i])
    assert_all(dp.get_group().allgather(RANK) == full[:, j].tolist())

    both = mesh["dp", "tp"]
    assert both == mesh
    assert np.array_equal(both.mesh, full) and tuple(both.mesh_dim_names) == ("dp", "tp")


@pytest.mark.mpi
def test_device_mesh_from_array_nd():
    if W != 4:
        mesh = DeviceMesh("cpu", np.arange(W))
        assert np.array_equal(mesh.mesh, np.arange(W)) and mesh.ndim == 1
        assert_all(list(mesh.get_coordinate()) == [RANK])
        pytest.skip("2x2 and 2x1x2 meshes need 4 ranks")
    for arr, names in ((np.arange(4).reshape(2, 2), ("a", "b")), (np.arange(4).reshape(2, 1, 2), ("a", "b", "c"))):
        mesh = DeviceMesh("cpu", arr, mesh_dim_names=names)
        assert mesh.device_type == "cpu"
        assert np.array_equal(mesh.mesh, arr) and tuple(mesh.shape) == arr.shape and mesh.ndim == arr.ndim
        assert mesh.size() == 4
        coord = [int(v) for v in np.argwhere(arr == RANK)[0]]
        assert_all(list(mesh.get_coordinate()) == coord)
        for d in range(arr.ndim):
            assert_all(mesh.get_local_rank(d) == coord[d])
            assert_all(mesh.get_group(d).Get_size() == arr.shape[d])
    # a permuted mesh: coordinates follow the array, not the world rank order
    perm = np.array([[3, 1], [2, 0]])
    mesh = DeviceMesh("cpu", perm)
    coord = [int(v) for v in np.argwhere(perm == RANK)[0]]
    assert_all(list(mesh.get_coordinate()) == coord, f"{mesh.get_coordinate()} != {coord}")
    row = perm[coord[0], :].tolist()
    col = perm[:, coord[1]].tolist()
    assert_all(mesh.get_group(1).allgather(RANK) == row, "row group in mesh order")
    assert_all(mesh.get_group(0).allgather(RANK) == col, "column group in mesh order")
    assert_all(mesh.get_group(1).Get_rank() == coord[1])


@pytest.mark.mpi
def test_device_mesh_accepts_lists():
    mesh = DeviceMesh("cpu", list(range(W)))
    assert mesh == DeviceMesh("cpu", np.arange(W))
    assert isinstance(mesh.mesh, np.ndarray) and mesh.mesh.dtype.kind in "iu"


@pytest.mark.mpi
def test_equality_and_hash():
    a = init_device_mesh("cpu", (W,), mesh_dim_names=("x",))
    b = DeviceMesh("cpu", np.arange(W), mesh_dim_names=("x",))
    c = DeviceMesh("cpu", np.arange(W))
    assert a == b and hash(a) == hash(b)
    assert a != c  # names differ
    assert len({a, b, c}) == 2
    assert a != "not a mesh"
    if W > 1:
        d = DeviceMesh("cpu", np.arange(W)[::-1].copy(), mesh_dim_names=("x",))
        assert a != d  # rank order differs
        e = DeviceMesh("cpu", np.arange(W).reshape(1, W))
        assert c != e  # shape differs
    # equal meshes share behaviour: the same groups
    assert_all(a.get_group().allgather(RANK) == b.get_group().allgather(RANK))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("subset", ["first", "reversed_without_0"])
def test_mesh_over_subset_of_ranks(subset):
    ranks = list(range(W - 1)) if subset == "first" else list(range(W - 1, 0, -1))
    mesh = DeviceMesh("cpu", ranks, mesh_dim_names=("x",))  # every world rank constructs it
    assert mesh.size() == len(ranks) and tuple(mesh.shape) == (len(ranks),)
    assert np.array_equal(mesh.mesh, ranks)
    on = RANK in ranks
    coord = mesh.get_coordinate()
    assert_all((coord is None) == (not on), f"coordinate {coord} for rank {RANK} of mesh {ranks}")
    if on:
        ok = list(coord) == [ranks.index(RANK)] and mesh.get_local_rank() == ranks.index(RANK)
        comm = mesh.get_group()
        ok = ok and comm.Get_size() == len(ranks) and comm.allgather(RANK) == ranks
    else:
        ok = True
    assert_all(ok, f"subset mesh {ranks} on rank {RANK}")


@pytest.mark.mpi(min_size=2)
def test_2d_mesh_over_subset_of_ranks():
    if W < 3:
        pytest.skip("needs a spare rank")
    ranks = np.arange(W - 1).reshape(1, W - 1) if (W - 1) % 2 else np.arange(W - 1).reshape(2, (W - 1) // 2)
    mesh = DeviceMesh("cpu", ranks, mesh_dim_names=("a", "b"))
    coord = mesh.get_coordinate()
    sub = mesh["b"]  # slicing is called by every rank, as in PyTorch
    if RANK < W - 1:
        want = [int(v) for v in np.argwhere(ranks == RANK)[0]]
        ok = coord is not None and list(coord) == want
        ok = ok and sub.get_group().allgather(RANK) == ranks[want[0], :].tolist()
    else:
        ok = coord is None
    assert_all(ok, f"coordinate {coord}")


@pytest.mark.mpi
def test_init_device_mesh_wrong_size_raises():
    with pytest.raises(ValueError):
        init_device_mesh("cpu", (W + 1,))
    with pytest.raises(ValueError):
        init_device_mesh("cpu", (W,), mesh_dim_names=("a", "b"))


@pytest.mark.mpi
def test_unknown_dim_name_raises():
    mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("x",))
    with pytest.raises((KeyError, ValueError)):
        mesh["nope"]
    with pytest.raises((KeyError, ValueError)):
        mesh.get_group("nope")
