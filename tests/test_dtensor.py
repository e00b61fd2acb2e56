"""DTensor construction and attributes: distribute_tensor (src_data_rank), from_local (shape inference,
run_check), to_local, full_tensor, placements, device_mesh, shape, dtype, ndim, size(), repr."""

import numpy as np
import pytest
from conftest import (
    RANK, W, make_mesh, mesh_or_skip, Check, DEVICE, on_device, to_device, to_host, assert_all, raises_all,
)

from mpilocal import DeviceMesh, DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from mpilocal.layout import chunk_sizes, local_slices


pytestmark = pytest.mark.mpi

S0, S1, R = Shard(0), Shard(1), Replicate()




def base_array(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).integers(-50, 50, size=shape).astype(dtype)


def rank_data(world_rank, shape, seed=0):
    """Different data on every rank: the base array plus 1000 * world rank."""
    return base_array(shape, seed) + 1000.0 * world_rank


def my_slice(G, mesh, placements):
    return G[local_slices(G.shape, mesh.shape, tuple(placements), tuple(mesh.get_coordinate()))]


# ------------------------------------------------------------------------------------------------
# distribute_tensor and src_data_rank


PLACEMENTS_1D = [[S0], [S1], [R]]
PLACEMENTS_2D = [[S0, R], [R, S1], [S0, S0], [S0, S1], [R, R]]


@pytest.mark.parametrize("src_data_rank", [0, 1, None], ids=lambda s: f"src{s}")
@pytest.mark.parametrize("placements", PLACEMENTS_1D, ids=repr)
def test_distribute_tensor_src_data_rank_1d(src_data_rank, placements):
    chk = Check()
    mesh = make_mesh("1d")
    if src_data_rank is not None and src_data_rank >= W:
        pytest.skip("src_data_rank=1 needs 2 ranks")
    shape = (7, 5)
    mine = rank_data(RANK, shape)
    dt = distribute_tensor(mine, mesh, placements, src_data_rank=src_data_rank)
    source = mine if src_data_rank is None else rank_data(src_data_rank, shape)
    exp = my_slice(source, mesh, placements)
    chk(to_host(dt.to_local()).shape == exp.shape, f"{to_host(dt.to_local()).shape} != {exp.shape}")
    chk.close(to_host(dt.to_local()), exp)
    chk(tuple(dt.shape) == shape and tuple(dt.placements) == tuple(placements))
    if src_data_rank is not None:
        chk.close(to_host(dt.full_tensor()), source)
    chk.done()


@pytest.mark.parametrize("src_data_rank", [0, 1, None], ids=lambda s: f"src{s}")
@pytest.mark.parametrize("placements", PLACEMENTS_2D, ids=repr)
@pytest.mark.parametrize("kind", ["2x2", "2x2_permuted", "Nx1", "1xN"])
def test_distribute_tensor_src_data_rank_2d(kind, src_data_rank, placements):
    chk = Check()
    mesh = mesh_or_skip(kind)
    if src_data_rank is not None and src_data_rank >= min(mesh.shape):
        pytest.skip(f"src_data_rank={src_data_rank} is not a group rank on every dim of {mesh.shape}")
    shape = (7, 6)
    mine = rank_data(RANK, shape, seed=1)
    dt = distribute_tensor(mine, mesh, placements, src_data_rank=src_data_rank)
    if src_data_rank is None:
        source = mine
    else:
        # PyTorch scatters/broadcasts from group rank src_data_rank along every mesh dim in turn,
        # so the data come from the rank at coordinate (src_data_rank, ..., src_data_rank)
        source = rank_data(int(mesh.mesh[(src_data_rank,) * mesh.ndim]), shape, seed=1)
    exp = my_slice(source, mesh, placements)
    chk(to_host(dt.to_local()).shape == exp.shape, f"{to_host(dt.to_local()).shape} != {exp.shape}")
    chk.close(to_host(dt.to_local()), exp)
    chk.done()


def test_distribute_tensor_none_does_not_communicate():
    chk = Check()
    from mpilocal import CommDebugMode

    mesh = make_mesh("1d")
    mine = rank_data(RANK, (6, 3), seed=2)
    with CommDebugMode() as comm:
        dt = distribute_tensor(mine, mesh, [S0], src_data_rank=None)
    chk(comm.get_total_counts() == 0, f"{comm.get_comm_counts()}")
    chk.close(to_host(dt.to_local()), my_slice(mine, mesh, [S0]))
    chk.done()


@pytest.mark.parametrize("shape", [(7, 5), (3, 2), (0, 4), (8,), (2, 3, 4)], ids=str)
def test_distribute_tensor_shapes(shape):
    chk = Check()
    mesh = make_mesh("1d")
    G = base_array(shape, seed=3)
    for placements in ([S0], [R], [Shard(-1)]):
        dt = distribute_tensor(G, mesh, placements)
        norm = [Shard(len(shape) - 1)] if placements == [Shard(-1)] else placements
        chk.close(to_host(dt.to_local()), my_slice(G, mesh, norm))
        chk(tuple(dt.shape) == shape)
        chk.close(to_host(dt.full_tensor()), G)
    chk.done()


def test_distribute_tensor_default_placements_replicate():
    chk = Check()
    mesh = make_mesh("1d")
    G = base_array((4, 3), seed=4)
    dt = distribute_tensor(G, mesh)
    chk(tuple(dt.placements) == (R,))
    chk.close(to_host(dt.to_local()), G)
    chk.done()


def test_distribute_tensor_non_contiguous_input():
    chk = Check()
    mesh = make_mesh("1d")
    G = base_array((6, 9), seed=5).T[:, ::2]  # (9, 3), not C-contiguous
    dt = distribute_tensor(G, mesh, [S0])
    chk.close(to_host(dt.to_local()), my_slice(np.ascontiguousarray(G), mesh, [S0]))
    chk.close(to_host(dt.full_tensor()), G)
    chk.done()


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64, np.complex128, np.bool_], ids=lambda d: np.dtype(d).name)
def test_distribute_tensor_dtypes(dtype):
    chk = Check()
    mesh = make_mesh("1d")
    G = (np.arange(35).reshape(7, 5) % 3).astype(dtype)
    dt = distribute_tensor(G, mesh, [S1])
    local = to_host(dt.to_local())
    chk(local.dtype == np.dtype(dtype) and dt.dtype == np.dtype(dtype), f"{local.dtype}")
    chk(np.array_equal(local, my_slice(G, mesh, [S1])))
    chk(np.array_equal(to_host(dt.full_tensor()), G))
    chk.done()


# ------------------------------------------------------------------------------------------------
# from_local


@pytest.mark.parametrize("rows", [7, 3, 1, 0, 8])
@pytest.mark.parametrize("with_shape", [False, True], ids=["inferred", "shape="])
def test_from_local_uneven_1d(rows, with_shape):
    chk = Check()
    mesh = make_mesh("1d")
    G = base_array((rows, 4), seed=6)
    local = np.ascontiguousarray(my_slice(G, mesh, [S0]))
    assert local.shape[0] == chunk_sizes(rows, W)[RANK]
    kw = {"shape": G.shape} if with_shape else {}
    dt = DTensor.from_local(local, mesh, [S0], **kw)
    chk(tuple(dt.shape) == G.shape, f"global shape {dt.shape} != {G.shape} (local {local.shape})")
    chk(tuple(dt.size()) == G.shape and dt.size(0) == rows and dt.size(1) == 4)
    chk.close(to_host(dt.to_local()), local)
    chk.close(to_host(dt.full_tensor()), G)
    chk.done()


def test_from_local_seven_rows_over_ranks():
    chk = Check()
    # the example of the brief: 7 rows over the world gives (7, ...) without shape=
    mesh = make_mesh("1d")
    local = np.full((chunk_sizes(7, W)[RANK], 3), float(RANK))
    dt = DTensor.from_local(local, mesh, [S0])
    chk(tuple(dt.shape) == (7, 3), f"{dt.shape}")
    chk.done()


def test_from_local_shard_dim1_inferred():
    chk = Check()
    mesh = make_mesh("1d")
    G = base_array((3, 10), seed=7)
    local = np.ascontiguousarray(my_slice(G, mesh, [S1]))
    dt = DTensor.from_local(local, mesh, [S1])
    chk(tuple(dt.shape) == (3, 10), f"{dt.shape}")
    chk.close(to_host(dt.full_tensor()), G)
    chk.done()


@pytest.mark.parametrize("placements", [[S0, S1], [S0, S0], [R, S1], [S1, R]], ids=repr)
@pytest.mark.parametrize("kind", ["2x2", "Nx1", "1xN"])
@pytest.mark.parametrize("with_shape", [False, True], ids=["inferred", "shape="])
def test_from_local_2d(kind, placements, with_shape):
    chk = Check()
    mesh = mesh_or_skip(kind)
    G = base_array((7, 5), seed=8)
    local = np.ascontiguousarray(my_slice(G, mesh, placements))
    kw = {"shape": G.shape} if with_shape else {}
    dt = DTensor.from_local(local, mesh, placements, **kw)
    chk(tuple(dt.shape) == G.shape, f"global shape {dt.shape} != {G.shape}")
    chk.close(to_host(dt.full_tensor()), G)
    chk.done()


def test_from_local_replicate_and_partial_shapes():
    chk = Check()
    mesh = make_mesh("1d")
    x = base_array((3, 4), seed=9)
    dt = DTensor.from_local(x, mesh, [R])
    chk(tuple(dt.shape) == (3, 4))
    p = DTensor.from_local(x / W, mesh, [Partial()])
    chk(tuple(p.shape) == (3, 4) and tuple(p.placements) == (Partial(),))
    chk.close(to_host(p.full_tensor()), x)
    chk.done()


@pytest.mark.parametrize("rows", [7, 3])
def test_from_local_run_check_passes(rows):
    chk = Check()
    mesh = make_mesh("1d")
    G = base_array((rows, 4), seed=10)
    local = np.ascontiguousarray(my_slice(G, mesh, [S0]))
    dt = DTensor.from_local(local, mesh, [S0], run_check=True)
    chk(tuple(dt.shape) == G.shape, f"{dt.shape}")
    chk.close(to_host(dt.to_local()), local)
    dt = DTensor.from_local(local, mesh, [S0], run_check=True, shape=G.shape)
    chk(tuple(dt.shape) == G.shape)
    rep = DTensor.from_local(G.copy(), mesh, [R], run_check=True)
    chk.close(to_host(rep.to_local()), G)
    chk.done()


def test_from_local_run_check_2d():
    chk = Check()
    if W != 4:
        pytest.skip("needs a 2x2 mesh")
    mesh = make_mesh("2x2")
    G = base_array((5, 7), seed=11)
    for placements in ([S0, S1], [S0, S0], [R, S1]):
        local = np.ascontiguousarray(my_slice(G, mesh, placements))
        dt = DTensor.from_local(local, mesh, placements, run_check=True)
        chk(tuple(dt.shape) == G.shape, f"{placements}: {dt.shape}")
        chk.close(to_host(dt.full_tensor()), G)
    chk.done()


def test_from_local_does_not_copy_semantics_of_to_local():
    chk = Check()
    mesh = make_mesh("1d")
    x = base_array((2, 3), seed=12)
    dt = DTensor.from_local(x, mesh, [S0])
    chk.close(to_host(dt.to_local()), x)
    chk(on_device(dt.to_local()))
    chk.done()


# ------------------------------------------------------------------------------------------------
# attributes and repr


def test_attributes():
    chk = Check()
    mesh = make_mesh("1d")
    G = base_array((7, 5), seed=13, dtype=np.float32)
    dt = distribute_tensor(G, mesh, [S0])
    chk(dt.device_mesh == mesh)
    chk(isinstance(dt.placements, tuple) and dt.placements == (S0,))
    chk(tuple(dt.shape) == (7, 5))
    chk(dt.dtype == np.float32)
    chk(dt.ndim == 2)
    chk(tuple(dt.size()) == (7, 5) and dt.size(0) == 7 and dt.size(1) == 5)
    chk(on_device(dt.to_local()))
    chk(to_host(dt.to_local()).shape == (chunk_sizes(7, W)[RANK], 5))
    chk.done()


def test_attributes_2d():
    chk = Check()
    mesh = mesh_or_skip("2x2") if W == 4 else make_mesh("Nx1")
    G = base_array((6, 4, 3), seed=14)
    dt = distribute_tensor(G, mesh, [S0, Shard(2)])
    chk(dt.device_mesh == mesh and dt.placements == (S0, Shard(2)))
    chk(tuple(dt.shape) == (6, 4, 3) and dt.ndim == 3 and dt.size(2) == 3)
    chk.close(to_host(dt.to_local()), my_slice(G, mesh, [S0, Shard(2)]))
    chk.done()


def _repr_ok(r, mesh, placements, gshape, lshape):
    problems = []
    if "mesh" not in r.lower():
        problems.append("no mesh")
    for p in placements:
        if repr(p) not in r:
            problems.append(f"no {p!r}")
    for what, s in (("global", gshape), ("local", lshape)):
        if str(tuple(s)) not in r and str(list(s)) not in r:
            problems.append(f"no {what} shape {tuple(s)}")
    return problems


def test_repr_with_known_shape():
    chk = Check()
    mesh = make_mesh("1d")
    G = base_array((7, 5), seed=15)
    dt = distribute_tensor(G, mesh, [S1])
    r = repr(dt)
    problems = _repr_ok(r, mesh, dt.placements, (7, 5), to_host(dt.to_local()).shape)
    chk(not problems, f"{problems} in {r}")
    chk.done()


def test_repr_with_inferred_shape():
    chk = Check()
    # DESIGN: __repr__ shows mesh, placements, global and local shape (also before .shape was read)
    mesh = make_mesh("1d")
    local = np.zeros((chunk_sizes(7, W)[RANK], 5))
    dt = DTensor.from_local(local, mesh, [S0])
    r = repr(dt)
    problems = _repr_ok(r, mesh, dt.placements, (7, 5), local.shape)
    chk(not problems, f"{problems} in {r}")
    chk.done()


# ------------------------------------------------------------------------------------------------
# helpers for errors that must be raised on every rank


# ------------------------------------------------------------------------------------------------
# distribute_tensor: None on ranks other than the source (issue 9); Partial; a DTensor (issue 8)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int16, np.complex128, np.bool_, ">f8", "<U3",
                                   "datetime64[s]"], ids=str)
@pytest.mark.parametrize("placements", [[S0], [S1], [R], [Partial()]], ids=repr)
def test_distribute_tensor_none_on_non_source(placements, dtype):
    chk = Check()
    mesh = make_mesh("1d")
    if np.dtype(dtype).kind in "UM" and DEVICE == "cuda":
        pytest.skip("CuPy has no string/datetime arrays")
    if np.dtype(dtype).kind in "bUM" and placements[0].is_partial():
        pytest.skip("Partial(sum) of bool/str/datetime is not a sum")
    G = base_array((7, 5), seed=20).astype(dtype)
    # the dtype the device really holds: CuPy has native byte order only, so to_device('>f8') is '<f8' there
    D = to_device(G).dtype
    for src in range(min(W, 2)):
        dt = distribute_tensor(to_device(G) if RANK == src else None, mesh, placements, src_data_rank=src)
        chk(tuple(dt.shape) == G.shape and dt.dtype == D, f"src {src}: {dt.shape} {dt.dtype}, expected {D}")
        whole = to_host(dt.full_tensor())
        # a reduction's dtype is NumPy's (native byte order); on a 1-rank mesh nothing is reduced
        want = {D, (G + G).dtype} if placements[0].is_partial() else {D}
        chk(whole.dtype in want and np.array_equal(whole, G), f"src {src}: full_tensor {whole.dtype} "
                                                              f"{whole.ravel()[:4]}")
        if not placements[0].is_partial():
            chk(np.array_equal(to_host(dt.to_local()), my_slice(G, mesh, placements)), f"src {src}: local")
    chk.done()


@pytest.mark.parametrize("placements", PLACEMENTS_2D + [[Partial(), S1]], ids=repr)
@pytest.mark.parametrize("kind", ["2x2", "2x2_permuted", "Nx1", "1xN"])
def test_distribute_tensor_none_on_non_source_2d(kind, placements):
    chk = Check()
    mesh = mesh_or_skip(kind)
    G = base_array((7, 6), seed=21)
    src_rank = int(mesh.mesh[(0,) * mesh.ndim])
    dt = distribute_tensor(to_device(G) if RANK == src_rank else None, mesh, placements)
    chk(tuple(dt.shape) == G.shape, f"{dt.shape}")
    chk.close(to_host(dt.full_tensor()), G)
    chk.done()


def test_distribute_tensor_none_errors():
    mesh = make_mesh("1d")
    G = base_array((4, 3), seed=22)
    # the source passes None: every rank raises
    raises_all(TypeError, r"source", lambda: distribute_tensor(None if RANK == 0 else G, mesh, [S0]))
    # src_data_rank=None needs the array everywhere (no communication: each rank raises for itself)
    raises_all(TypeError, r"src_data_rank", lambda: distribute_tensor(None, mesh, [S0], src_data_rank=None))
    if W > 1:
        st = np.zeros(4, dtype=[("a", "i1"), ("b", "f8")])
        raises_all(NotImplementedError, r"structured",
                             lambda: distribute_tensor(st if RANK == 0 else None, mesh, [R]))
        raises_all(ValueError, r"shape", lambda: distribute_tensor(G if RANK != 1 else G[:2], mesh, [S0]))


def test_distribute_tensor_of_a_dtensor():
    # PyTorch: returned as is when mesh and placements match; else a ValueError (use redistribute)
    mesh = make_mesh("1d")
    G = base_array((5, 3), seed=23)
    dt = distribute_tensor(G, mesh, [S0])
    assert_all(distribute_tensor(dt, mesh, [S0]) is dt and distribute_tensor(dt, None, [Shard(-2)]) is dt)
    raises_all(ValueError, r"redistribute", lambda: distribute_tensor(dt, mesh, [R]))
    other = DeviceMesh(DEVICE, np.arange(W)[::-1].copy()) if W > 1 else None
    if other is not None:
        raises_all(ValueError, r"mesh", lambda: distribute_tensor(dt, other, [S0]))


# ------------------------------------------------------------------------------------------------
# where a shard lies: DTensor.local_offset() and mpilocal.local_shape_and_offset (issue 9)


@pytest.mark.parametrize("placements, kind", [([S0], "1d"), ([S1], "1d"), ([R], "1d"), ([S0, S1], "2x2"),
                                              ([S0, S0], "2x2"), ([S1, S0], "2x2_permuted"), ([R, S1], "Nx1"),
                                              ([S0, R], "1xN")], ids=str)
def test_local_offset_places_the_shard(placements, kind):
    import mpilocal

    chk = Check()
    mesh = mesh_or_skip(kind)
    G = base_array((7, 9), seed=24)
    dt = distribute_tensor(G, mesh, placements)
    off = dt.local_offset()
    local = to_host(dt.to_local())
    sl = tuple(slice(o, o + n) for o, n in zip(off, local.shape))
    chk(np.array_equal(G[sl], local), f"{placements}: offset {off} does not locate the shard")
    shape, off2 = mpilocal.local_shape_and_offset(G.shape, mesh, placements)
    chk(shape == local.shape and off2 == off, f"local_shape_and_offset {shape} {off2} vs {local.shape} {off}")
    # every coordinate: the shards of a Shard-only layout tile the global array exactly once
    if all(p.is_shard() for p in placements) and len({p.dim for p in placements}) == len(placements):
        cover = np.zeros(G.shape, dtype=int)
        for c in np.ndindex(*mesh.shape):
            s, o = mpilocal.local_shape_and_offset(G.shape, mesh, placements, c)
            cover[tuple(slice(a, a + n) for a, n in zip(o, s))] += 1
        chk((cover == 1).all(), f"{placements}: shards do not tile the array")
    chk.done()


def test_local_shape_and_offset_errors():
    import mpilocal

    mesh = make_mesh("1d")
    raises_all(TypeError, r"DeviceMesh", lambda: mpilocal.local_shape_and_offset((4,), "cpu", [S0]))
    raises_all(ValueError, r"coordinate", lambda: mpilocal.local_shape_and_offset((4,), mesh, [S0], (W,)))
    raises_all(ValueError, r"out of range", lambda: mpilocal.local_shape_and_offset((4,), mesh, [S1]))


# ------------------------------------------------------------------------------------------------
# copy.deepcopy shares the mesh; pickle explains why it cannot work (issue 9)


def test_deepcopy():
    import copy

    chk = Check()
    mesh = make_mesh("1d")
    G = base_array((7, 3), seed=25)
    dt = distribute_tensor(G, mesh, [S0])
    c = copy.deepcopy(dt)
    chk(c is not dt and c.device_mesh is mesh and c.placements == dt.placements and c.shape == dt.shape)
    chk(np.array_equal(to_host(c.to_local()), to_host(dt.to_local())), "values")
    chk(not np.shares_memory(to_host(c.to_local()), to_host(dt.to_local())) or DEVICE == "cuda", "shares memory")
    # a pending shape agreement is shared, not re-issued: both resolve it
    p = DTensor.from_local(to_device(np.ones((chunk_sizes(7, W)[RANK], 2))), mesh, [S0])
    q = copy.deepcopy(p)
    chk(tuple(q.shape) == (7, 2) and tuple(p.shape) == (7, 2), f"{q.shape} {p.shape}")
    # leaves keep requires_grad and a copy of .grad; a non-leaf raises (as in PyTorch)
    w = distribute_tensor(G, mesh, [S0], requires_grad=True)
    w.full_tensor().sum().backward() if False else None
    w.grad = distribute_tensor(np.ones_like(G), mesh, [S0])
    wc = copy.deepcopy(w)
    chk(wc.requires_grad and wc.is_leaf and wc.grad is not w.grad, "requires_grad / grad")
    chk(np.array_equal(to_host(wc.grad.to_local()), to_host(w.grad.to_local())), "grad values")
    chk.done()
    nonleaf = w.redistribute(mesh, [R])
    raises_all(RuntimeError, r"leaves|leaf", lambda: copy.deepcopy(nonleaf))
    # copy.copy: a DTensor on the same local array (as .detach())
    s = copy.copy(dt)
    assert_all(s is not dt and s.to_local() is dt.to_local())


def test_pickle_raises_clearly():
    import pickle

    mesh = make_mesh("1d")
    dt = distribute_tensor(base_array((4, 3), seed=26), mesh, [S0])
    raises_all(TypeError, r"cannot be pickled.*communicators.*to_local", lambda: pickle.dumps(dt))


# ------------------------------------------------------------------------------------------------
# operators raise until sharding propagation exists (issue 9 item 4)


def test_operators_raise_type_error(monkeypatch):
    """Without registered operators (mpilocal.ops registers them; see tests/test_ops.py) every
    operator raises a TypeError that says what to do."""
    import operator as op

    from mpilocal import dtensor as _dtensor

    monkeypatch.setattr(_dtensor, "_OPERATORS", {})
    monkeypatch.setattr(_dtensor, "_METHODS", {})
    mesh = make_mesh("1d")
    A = distribute_tensor(base_array((4, 3), seed=27), mesh, [S0])
    B = distribute_tensor(base_array((4, 3), seed=27), mesh, [S0])
    arr = np.ones((4, 3))
    binary = [op.eq, op.ne, op.lt, op.le, op.gt, op.ge, op.add, op.sub, op.mul, op.truediv, op.floordiv, op.mod,
              op.pow, op.matmul, op.and_, op.or_, op.xor, op.lshift, op.rshift, divmod]
    problems = []
    for f in binary:
        for a, b in ((A, B), (A, arr), (arr, A), (A, 2), (2.0, A)):
            try:
                f(a, b)
                problems.append(f"{f.__name__}: no exception")
            except TypeError as e:
                if "local_map" not in str(e) or "to_local" not in str(e):
                    problems.append(f"{f.__name__}: unclear {e}")
    for f in (op.neg, op.pos, abs, op.invert):
        try:
            f(A)
            problems.append(f"{f.__name__}: no exception")
        except TypeError as e:
            if "local_map" not in str(e):
                problems.append(f"{f.__name__}: unclear {e}")
    for f in (op.iadd, op.isub, op.imul, op.itruediv, op.imatmul):
        try:
            f(A, B)
            problems.append(f"{f.__name__}: no exception")
        except TypeError:
            pass
    try:
        np.add(A, 1)
        problems.append("np.add: no exception")
    except TypeError:
        pass
    # identity semantics stay: hashing, membership, comparison with non-arrays
    ok = (A == None) is False and (A != "x") is True and A in {A} and A in [A] and len({A, B}) == 2  # noqa: E711
    assert_all(ok and not problems, f"{problems}")
    raises_all(TypeError, r"DTensor == DTensor.*np\.array_equal", lambda: A == B, same_text=True)


# ------------------------------------------------------------------------------------------------
# ported by hand from PyTorch's test/distributed/tensor/test_dtensor.py (issue 8)


def test_to_local_grad_hint():
    from mpilocal import CommDebugMode

    mesh = make_mesh("1d")
    G = np.ones((8, 3))
    sharded = distribute_tensor(to_device(G), mesh, [S0], requires_grad=True)
    with CommDebugMode() as comm:
        local_out = sharded.redistribute(placements=[R]).to_local(grad_placements=[Partial()])
        local_out.backward(to_device(np.ones((8, 3))))
    counts = comm.get_comm_counts()
    n = 1 if W > 1 else 0
    ok = counts["all_gather_into_tensor"] == n and counts["reduce_scatter_tensor"] == n
    ok = ok and np.array_equal(to_host(sharded.grad.full_tensor()), G * W)
    assert_all(ok, f"{dict(counts)} {to_host(sharded.grad.full_tensor()).ravel()[:3]}")


def test_full_tensor_grad_hint():
    mesh = make_mesh("1d")
    G = np.ones((8, 3))
    sharded = distribute_tensor(to_device(G), mesh, [S0], requires_grad=True)
    sharded.full_tensor(grad_placements=[Partial()]).sum().backward()
    assert_all(np.array_equal(to_host(sharded.grad.full_tensor()), G * W))


@pytest.mark.mpi(min_size=3)
def test_from_local_sub_mesh():
    mesh = DeviceMesh(DEVICE, [0, 2])
    dt = DTensor.from_local(to_device(np.ones((3, 4))), mesh, [S0])
    ok = tuple(dt.size()) == (6, 4)
    local = to_host(dt.to_local())
    ok = ok and (np.array_equal(local, np.ones((3, 4))) if RANK in (0, 2) else local.size == 0)
    # an operation on it runs on the mesh ranks only; the others keep the global shape, no data
    full = to_host(dt.full_tensor())
    ok = ok and (np.array_equal(full, np.ones((6, 4))) if RANK in (0, 2) else full.size == 0)
    assert_all(ok, f"rank {RANK}: {dt.size()} {local.shape} {full.shape}")


@pytest.mark.mpi(min_size=4)
def test_dtensor_spec_local_shard_offset():
    if W % 2:
        pytest.skip("needs an even world size")
    half = W // 2
    mesh = DeviceMesh(DEVICE, np.arange(W).reshape(2, half))
    shape = (3 * W, 3 * W)
    cases = [([S0, R], (3 * half * (RANK // half), 0)), ([S1, R], (0, 3 * half * (RANK // half))),
             ([R, S0], (3 * 2 * (RANK % half), 0)), ([R, S1], (0, 3 * 2 * (RANK % half)))]
    G = base_array(shape, seed=30)
    bad = []
    for placements, want in cases:
        dt = distribute_tensor(G, mesh, placements)
        import mpilocal

        got = mpilocal.local_shape_and_offset(dt.shape, mesh, dt.placements)[1]
        if got != want or dt.local_offset() != want:
            bad.append((placements, got, dt.local_offset(), want))
    assert_all(not bad, f"{bad}")


def test_from_local_negative_dim():
    mesh = make_mesh("1d")
    dt = DTensor.from_local(to_device(np.ones((3, 3))), mesh, [Shard(-1)])
    assert_all(dt.placements[0].dim == 1 and tuple(dt.shape) == (3, 3 * W))
