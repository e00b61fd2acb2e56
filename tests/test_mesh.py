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


# --------------------------------------------------------------------------- PyTorch parity (issue 8)
@pytest.mark.mpi
def test_unknown_dim_name_is_a_key_error_with_a_clear_message():
    mesh = init_device_mesh("cpu", (1, W), mesh_dim_names=("dp", "tp"))
    for call in (lambda: mesh["pp"], lambda: mesh["dp", "pp"], lambda: mesh.get_group("pp"),
                 lambda: mesh.size("pp"), lambda: mesh.get_local_rank("pp")):
        with pytest.raises(KeyError) as info:
            call()
        text = str(info.value)
        assert "unknown mesh dim name 'pp'" in text and "('dp', 'tp')" in text, text
        assert not text.startswith(('"', "'")), f"KeyError text is quoted: {text}"
        assert isinstance(info.value, ValueError)  # what mpilocal raised before, still caught


def _mesh_3d():
    """A 3-D mesh: 2x2x1 at 4 ranks, else 1xWx1."""
    shape = (2, 2, 1) if W == 4 else (1, W, 1)
    return init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp", "cp")), np.arange(W).reshape(shape)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", [list, tuple])
def test_slice_by_a_list_or_tuple_of_names(kind):
    mesh, full = _mesh_3d()
    i, j, k = (int(v) for v in np.argwhere(full == RANK)[0])
    sub = mesh[kind(["dp", "cp"])]
    want = full[:, j, :]
    assert_all(np.array_equal(sub.mesh, want), f"mesh[['dp', 'cp']].mesh {sub.mesh.tolist()} != {want.tolist()}")
    assert sub.mesh_dim_names == ("dp", "cp")
    assert_all(list(sub.get_coordinate()) == [i, k])
    assert_all(sub.get_group("dp").allgather(RANK) == full[:, j, k].tolist())
    assert_all(sub.get_comm().allgather(RANK) == want.ravel().tolist())
    assert mesh[kind(["dp", "tp", "cp"])] is mesh
    assert mesh[kind(["tp"])] == mesh["tp"]


@pytest.mark.mpi
def test_slice_names_out_of_mesh_order_raise_key_error_as_pytorch():
    # PyTorch's _get_slice_mesh_dims: mesh dim indices must be ascending, else KeyError
    mesh, _ = _mesh_3d()
    for names in (("tp", "dp"), ["cp", "dp"], ("dp", "cp", "tp")):
        with pytest.raises(KeyError, match=r"mesh's own order .*use mesh\["):
            mesh[names]
    with pytest.raises(KeyError, match="repeated"):
        mesh["dp", "dp"]
    with pytest.raises(TypeError):
        mesh[["dp", 1]]
    with pytest.raises(TypeError):
        mesh[[]]


# --------------------------------------------------------------------------- mesh as a context manager
@pytest.mark.mpi
def test_mesh_context_sets_the_default_mesh():
    from mpilocal import DTensor, Replicate, Shard, distribute_tensor
    from mpilocal.mesh import current_mesh

    outer = DeviceMesh("cpu", np.arange(W)[::-1].copy(), mesh_dim_names=("r",))  # not the default mesh
    inner = init_device_mesh("cpu", (1, W), mesh_dim_names=("a", "b"))
    x = np.arange(4.0 * W * 3).reshape(4 * W, 3)
    assert current_mesh() is None
    with outer as m:
        assert m is outer and current_mesh() is outer
        a = distribute_tensor(x, placements=[Shard(0)])
        assert a.device_mesh is outer
        # rows go to mesh coordinates, which run opposite to world ranks here
        c = W - 1 - RANK
        assert_all(np.array_equal(a.to_local(), x[4 * c:4 * c + 4]), "Shard(0) over the context mesh")
        with inner:
            b = distribute_tensor(x, placements=[Replicate(), Shard(1)])
            assert b.device_mesh is inner
            f = DTensor.from_local(np.ones((2, 3)), placements=[Replicate(), Replicate()])
            assert f.device_mesh is inner
        assert current_mesh() is outer
        assert DTensor.from_local(np.ones((2, 3)), placements=[Replicate()]).device_mesh is outer
        np.testing.assert_array_equal(b.full_tensor(), x)
    assert current_mesh() is None
    d = distribute_tensor(x, placements=[Shard(0)])
    assert d.device_mesh == init_device_mesh("cpu", (W,))
    with pytest.raises(ZeroDivisionError):
        with outer:
            1 / 0
    assert current_mesh() is None  # popped on the way out of an exception


# --------------------------------------------------------------------------- from_group
@pytest.mark.mpi
def test_from_group_1d():
    import mpilocal.functional as funcol
    from mpilocal import Replicate, Shard, distribute_tensor

    comm = MPI.COMM_WORLD.Split(0, W - 1 - RANK)  # reversed rank order
    ranks = comm.allgather(RANK)
    mesh = DeviceMesh.from_group(comm, "cpu", mesh_dim_names=("x",))
    assert mesh == DeviceMesh("cpu", ranks, mesh_dim_names=("x",))
    assert mesh.get_group() is comm
    assert_all(list(mesh.get_coordinate()) == [comm.Get_rank()])
    assert DeviceMesh.from_group(comm, "cpu", mesh=ranks).mesh.tolist() == ranks  # mesh may repeat the ranks
    if W > 1:
        with pytest.raises(ValueError, match="holds world ranks"):
            DeviceMesh.from_group(comm, "cpu", mesh=list(range(W)))  # not the communicator's order
    x = np.arange(3.0 * W)
    np.testing.assert_array_equal(funcol.all_reduce(x, "sum", mesh), W * x)
    d = distribute_tensor(x.reshape(W, 3), mesh, [Shard(0)])
    np.testing.assert_array_equal(d.to_local(), x.reshape(W, 3)[comm.Get_rank():comm.Get_rank() + 1])
    np.testing.assert_array_equal(d.redistribute(mesh, [Replicate()]).to_local(), x.reshape(W, 3))
    mesh.close()  # frees what mpilocal made for it, never the user's communicator
    assert_all(comm.allreduce(1) == W, "the user's communicator still works after close()")
    with pytest.raises(RuntimeError, match="closed"):
        mesh.get_group()
    comm.Free()


@pytest.mark.mpi(min_size=4)
def test_from_group_2d():
    import mpilocal.functional as funcol
    from mpilocal import Replicate, Shard, distribute_tensor

    if W != 4:
        pytest.skip("a 2x2 mesh needs 4 ranks")
    arr = np.array([[0, 2], [1, 3]])  # dp runs along world ranks 0,1 / 2,3
    i, j = (int(v) for v in np.argwhere(arr == RANK)[0])
    col = MPI.COMM_WORLD.Split(j, i)  # dim 0: same j
    row = MPI.COMM_WORLD.Split(10 + i, j)  # dim 1: same i
    mesh = DeviceMesh.from_group([col, row], "cpu", mesh=arr, mesh_dim_names=("dp", "tp"))
    assert mesh == DeviceMesh("cpu", arr, mesh_dim_names=("dp", "tp"))
    assert mesh.get_group("dp") is col and mesh.get_group("tp") is row
    assert_all(mesh.get_coordinate() == [i, j])
    assert_all(mesh["tp"].get_group() is row and list(mesh["tp"].mesh) == arr[i].tolist())
    x = np.arange(8.0 * 6).reshape(8, 6)
    d = distribute_tensor(x, mesh, [Shard(0), Shard(1)])
    np.testing.assert_array_equal(d.to_local(), x[4 * i:4 * i + 4, 3 * j:3 * j + 3])
    np.testing.assert_array_equal(d.full_tensor(), x)
    np.testing.assert_array_equal(funcol.all_gather_tensor(np.full(1, RANK), 0, (mesh, "dp")), arr[:, j])
    with pytest.raises(ValueError, match="communicator 0 holds world ranks"):
        DeviceMesh.from_group([row, col], "cpu", mesh=arr, mesh_dim_names=("dp", "tp"))
    with pytest.raises(ValueError, match="pass mesh="):
        DeviceMesh.from_group([col, row], "cpu")
    with pytest.raises(ValueError, match="mesh_dim_names"):
        DeviceMesh.from_group([col, row], "cpu", mesh=arr)
    with pytest.raises(ValueError, match="2-D but 1 communicator"):
        DeviceMesh.from_group([col], "cpu", mesh=arr, mesh_dim_names=("dp", "tp"))
    mesh.close()
    assert_all(col.allreduce(1) == 2 and row.allreduce(1) == 2)
    col.Free()
    row.Free()


@pytest.mark.mpi(min_size=2)
def test_from_group_with_ranks_outside():
    import mpilocal.functional as funcol

    inside = RANK < W - 1
    sub = MPI.COMM_WORLD.Split(0 if inside else MPI.UNDEFINED, RANK)
    ranks = list(range(W - 1))
    mesh = DeviceMesh.from_group(sub, "cpu", mesh=ranks)
    assert mesh == DeviceMesh("cpu", ranks)
    assert_all((mesh.get_coordinate() is None) == (not inside))
    if inside:
        assert funcol.all_reduce(np.ones(2), "sum", mesh).tolist() == [W - 1.0] * 2
    if not inside:
        with pytest.raises(ValueError, match="COMM_NULL and no mesh"):
            DeviceMesh.from_group(sub, "cpu")
    mesh.close()
    if inside:
        sub.Free()


@pytest.mark.mpi
def test_from_group_bad_arguments():
    with pytest.raises(TypeError, match="mpi4py communicator"):
        DeviceMesh.from_group("world", "cpu")
    with pytest.raises(TypeError, match="mpi4py communicator"):
        DeviceMesh.from_group([MPI.COMM_WORLD, 3], "cpu", mesh=np.zeros((1, 1), int), mesh_dim_names=("a", "b"))
    with pytest.raises(ValueError, match="at least one"):
        DeviceMesh.from_group([], "cpu", mesh=[0])
    with pytest.raises(ValueError, match="device_type"):
        DeviceMesh.from_group(MPI.COMM_WORLD, "tpu")
