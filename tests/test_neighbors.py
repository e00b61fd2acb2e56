"""Neighbour collectives (halo exchange, permute, shift, send_recv, stencil) against NumPy oracles.

Oracles are independent of mpilocal's layout code: shard offsets follow torch.chunk (DTensors) or
the MPI block split ``N//p + (r < N%p)`` (local arrays), written out here; halos are ``np.pad`` of
the full array (``wrap`` / ``constant``) or a clamped slice (``"none"``); permutations follow JAX's
``ppermute`` (zeros where nothing arrives); gradients are central finite differences of the NumPy
oracle's loss.
"""

import math

import numpy as np
import pytest
from conftest import RANK, W, DEVICE, Check, DeviceFunctional, assert_all, raises_all, to_device, to_host
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol
from mpilocal import CommDebugMode, DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh, local_map
from mpilocal import agreement, deadline

pytestmark = pytest.mark.mpi
#: errors that only the cross-rank argument check raises on every rank (one rank's arguments differ):
#: under MPILOCAL_CHECK_ARGS=0 that rank raises alone and the others wait in the exchange until the
#: deadline ends the job, so these tests do not apply
needs_check = pytest.mark.skipif(W > 1 and not (agreement._CHECK_ARGS or deadline.debug_enabled()),
                                 reason="MPILOCAL_CHECK_ARGS=0: rank-divergent arguments are not agreed (a rank "
                                        "raises alone, the others wait for the deadline)")
fc = DeviceFunctional(funcol) if DEVICE == "cuda" else funcol

BOUNDARIES = ["periodic", "none", 0.0, -2.5, float("nan")]


def chunk(n, k, i):
    """torch.chunk: (offset, size) of piece i."""
    c = -(-n // k) if k else 0
    o = min(c * i, n)
    return o, max(min(c, n - o), 0)


def block(n, k, i):
    """The MPI block split: rank i holds n//k + (i < n%k) rows."""
    sizes = [n // k + (j < n % k) for j in range(k)]
    return sum(sizes[:i]), sizes[i]


def oracle(full, d, o, n, w, b):
    """Rank's halo-padded piece along dim d of the full array (np.pad / slicing)."""
    N = full.shape[d]
    if b == "none":
        idx = [slice(None)] * full.ndim
        idx[d] = slice(max(o - w, 0), min(o + n + w, N))
        return full[tuple(idx)]
    pad = [(0, 0)] * full.ndim
    pad[d] = (w, w)
    ext = np.pad(full, pad, mode="wrap") if b == "periodic" else np.pad(full, pad, mode="constant", constant_values=b)
    idx = [slice(None)] * full.ndim
    idx[d] = slice(o, o + n + 2 * w)
    return ext[tuple(idx)]


def data(shape, dtype=np.float64, seed=0, nans=True):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape) * 10
    if np.dtype(dtype).kind == "f" and nans and a.size > 3:
        a.flat[1] = np.nan
        a.flat[-2] = np.inf
    return a.astype(dtype)


def mesh1d():
    return init_device_mesh(DEVICE, (W,))


# ------------------------------------------------------------------------------------------------
# halo exchange on DTensors (torch.chunk shards), 1-D mesh
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("width", [0, 1, 2, 3])
@pytest.mark.parametrize("n_rows", ["uneven", "even"])
@pytest.mark.parametrize("d", [0, 1])
def test_halo_dtensor_1d(boundary, width, n_rows, d):
    mesh = mesh1d()
    N = 4 * W - 1 if n_rows == "uneven" else 3 * W  # every torch.chunk shard holds >= 3 rows
    shape = (N, 5) if d == 0 else (4, N)
    full = data(shape)
    pl = [Shard(d)]
    X = distribute_tensor(to_device(full), mesh, pl)
    got = to_host(funcol.halo_exchange(X, 0, d, width, boundary))
    o, n = chunk(N, W, RANK)
    ck = Check()
    ck.close(got, oracle(full, d, o, n, width, boundary), f"halo d={d} w={width} b={boundary}")
    ck(got.dtype == full.dtype, f"dtype {got.dtype}")
    ck.done()


@pytest.mark.parametrize("boundary", ["periodic", 0.5, "none"])
@pytest.mark.parametrize("d", [0, 1])
def test_halo_large_interior_copied_alongside_the_exchange(boundary, d):
    """Interiors from neighbors.OVERLAP_BYTES on (CuPy: copied on a side stream while the halos
    move on the current one, joined before the result is used), then an update in place of the
    result: the same values as np.pad, from the first call and the next."""
    from mpilocal import neighbors

    mesh = mesh1d()
    rows = neighbors.OVERLAP_BYTES // (8 * 128) + 3  # rows per shard of 128 float64: just over the size
    shape = (rows * W, 128) if d == 0 else (128, rows * W)
    ck = Check()
    for k in range(2):
        full = data(shape, seed=k)
        X = distribute_tensor(to_device(full), mesh, [Shard(d)])
        got = funcol.halo_exchange(X, 0, d, 2, boundary)
        got += 1  # the stream that uses the result sees the whole copy
        ck.close(to_host(got), oracle(full, d, rows * RANK, rows, 2, boundary) + 1, f"call {k} d={d} b={boundary}")
    if DEVICE == "cuda" and W > 1:
        ck(len(neighbors._SIDE) > 0, "the large interior was not copied on the side stream")
    ck.done()


@pytest.mark.parametrize("dtype,boundary", [(np.float64, "periodic"), (np.float64, float("nan")),
                                            (np.float32, "none"), (np.int8, -3), (np.complex128, 2.5),
                                            (np.bool_, True), (np.dtype(">f8"), 1.5)])
def test_halo_loop_new_data_each_call(dtype, boundary):
    """A loop of halo exchanges of one layout on new data each call (from the second call, the
    prepared exchange on GPUs: one NCCL group that moves the halos and copies the interior and the
    constant rows, 2-D copies for rows that are not runs), then halo_update in place on the result:
    np.pad of each call's global array, bit for bit, dtype and byte order kept. Rows of dim 0 (runs
    of the array) and of dim 1 (packed)."""
    from mpilocal import neighbors

    mesh = mesh1d()
    N = 4 * W - 1  # every torch.chunk shard holds >= 3 rows
    ck = Check()
    for d in (0, 1):
        shape = (N, 5) if d == 0 else (4, N)
        o, n = chunk(N, W, RANK)
        for k in range(4):
            full = data(shape, np.float64, seed=40 + k, nans=np.dtype(dtype).kind in "fc")
            full = (full > 0) if np.dtype(dtype) == np.bool_ else full.astype(dtype)
            X = distribute_tensor(to_device(full), mesh, [Shard(d)])
            got = funcol.halo_exchange(X, 0, d, 2, boundary)
            want = oracle(full, d, o, n, 2, boundary)
            dt = to_device(full).dtype  # CuPy holds native byte order only
            ck(to_host(got).dtype == dt, f"dtype {to_host(got).dtype} for {dt}")
            ck(np.array_equal(to_host(got), want, equal_nan=True), f"call {k} d={d} {np.dtype(dtype)} b={boundary}: "
                                                                 f"{to_host(got).ravel()[:6]} != {want.ravel()[:6]}")
            inner = [slice(None)] * 2
            wl = 2 if (boundary != "none" or RANK > 0) else 0
            inner[d] = slice(wl, wl + n)
            got[tuple(inner)] = to_device(np.ascontiguousarray(np.flip(want[tuple(inner)], 1 - d)))
            funcol.halo_update(got, mesh, d, 2, boundary)
            ref = oracle(np.flip(full, 1 - d), d, o, n, 2, boundary)
            ck(np.array_equal(to_host(got), ref, equal_nan=True), f"update after call {k} d={d} {np.dtype(dtype)} "
                                                                f"b={boundary}")
    if (DEVICE == "cuda" and W > 1 and not deadline.DEBUG
            and mpilocal.transport.select.choose_gpu("sendrecv")[0].name == "nccl"):
        chains = [v for v in mesh._programs.values() if isinstance(v, neighbors._Chain)]
        ck(any(f.state[0] for c in chains for f in c.fast.values()), "the prepared exchange was never made")
    ck.done()


@pytest.mark.parametrize("boundary", ["periodic", -1.0])
def test_halo_and_permute_loops_of_large_messages(boundary):
    """Halo rows and permuted arrays above the host transport's prepared size
    (transport.host.PREPARED_P2P_BYTES: those go straight from the arrays, not staged) and on GPUs well above
    NCCL's small-message sizes, several calls each on new data: np.pad / ppermute bit for bit."""
    from mpilocal.transport import host

    mesh = mesh1d()
    cols = host.PREPARED_P2P_BYTES // 8  # one halo message of 2 rows: 2x the prepared size
    N = 3 * W
    o, n = chunk(N, W, RANK)
    ck = Check()
    for k in range(3):
        full = data((N, cols), seed=60 + k)
        got = funcol.halo_exchange(distribute_tensor(to_device(full), mesh, [Shard(0)]), 0, 0, 2, boundary)
        ck(np.array_equal(to_host(got), oracle(full, 0, o, n, 2, boundary), equal_nan=True), f"halo call {k}")
        funcol.halo_update(got, mesh, 0, 2, boundary)
        ck(np.array_equal(to_host(got), oracle(full, 0, o, n, 2, boundary), equal_nan=True), f"update call {k}")
        mine = _rank_data(RANK, (cols // 2, 3)) + k
        perm = [(i, (i + 1) % W) for i in range(W)]
        ck(np.array_equal(fc.permute(mine, perm, MPI.COMM_WORLD), _rank_data((RANK - 1) % W, (cols // 2, 3)) + k,
                          equal_nan=True), f"permute call {k}")
    ck.done()


@pytest.mark.parametrize("boundary", ["periodic", "none", 7])
def test_halo_int_dtype_and_names(boundary):
    mesh = init_device_mesh(DEVICE, (W,), mesh_dim_names=("x",))
    full = np.arange(3 * W * 2, dtype=np.int16).reshape(3 * W, 2) - 20
    X = distribute_tensor(to_device(full), mesh, [Shard(0)])
    got = to_host(funcol.halo_exchange(X, "x", 0, 2, boundary))
    o, n = chunk(3 * W, W, RANK)
    exp = oracle(full, 0, o, n, 2, boundary)
    assert_all(got.dtype == np.int16 and np.array_equal(got, exp), f"{got} vs {exp}")


# ------------------------------------------------------------------------------------------------
# local arrays (block split, so ragged), every group kind
# ------------------------------------------------------------------------------------------------
def _group(kind):
    if kind == "mesh":
        return mesh1d(), list(range(W))
    if kind == "mesh_dim":
        m = init_device_mesh(DEVICE, (1, W))
        return (m, 1), list(range(W))
    if kind == "comm":
        return MPI.COMM_WORLD, list(range(W))
    if kind == "comm_reversed":
        return MPI.COMM_WORLD.Split(0, W - 1 - RANK), list(range(W - 1, -1, -1))
    raise AssertionError(kind)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("kind", ["mesh", "mesh_dim", "comm", "comm_reversed"])
def test_halo_local_arrays_block_split(boundary, kind):
    group, order = _group(kind)
    gr = order.index(RANK)
    N = 3 * W + 2  # block split: the first two ranks hold one row more
    full = data((2, N, 3), seed=3)
    o, n = block(N, W, gr)
    local = np.ascontiguousarray(full[:, o:o + n])
    ck = Check()
    for w in (0, 1, 3):
        got = fc.halo_exchange(local, group, 1, w, boundary)
        ck.close(got, oracle(full, 1, o, n, w, boundary), f"{kind} w={w} b={boundary}")
    ck.done()


def test_halo_non_contiguous_input():
    mesh = mesh1d()
    N = 3 * W
    full = data((6, N), seed=4)
    o, n = chunk(N, W, RANK)
    local = to_device(np.asfortranarray(full[:, o:o + n]))
    got = to_host(funcol.halo_exchange(local, mesh, 1, 2, "periodic"))
    assert_all(np.allclose(got, oracle(full, 1, o, n, 2, "periodic"), equal_nan=True))


@pytest.mark.parametrize("boundary", ["periodic", -1.5, "none"])
def test_halo_dim0_of_non_contiguous_arrays(boundary):
    """Halos along dim 0 of strided views (Fortran order, every other column): rows that are not
    runs of memory, for halo_exchange and for halo_update into a strided padded view."""
    mesh = mesh1d()
    N = 3 * W
    full = data((N, 5), seed=7)
    o, n = chunk(N, W, RANK)
    ck = Check()
    local = to_device(np.asfortranarray(full[o:o + n]))
    ck.close(to_host(fc.halo_exchange(local, mesh, 0, 2, boundary)), oracle(full, 0, o, n, 2, boundary), "F order")
    wide = to_device(np.zeros((n, 10)))
    wide[:, ::2] = to_device(full[o:o + n])
    ck.close(to_host(fc.halo_exchange(wide[:, ::2], mesh, 0, 2, boundary)), oracle(full, 0, o, n, 2, boundary),
             "strided")
    exp = oracle(full, 0, o, n, 2, boundary)
    big = to_device(np.zeros((exp.shape[0], 10)))
    lo = 0 if (boundary == "none" and RANK == 0) else 2  # halo rows above the interior
    big[lo:lo + n, ::2] = to_device(full[o:o + n])
    view = big[:, ::2]
    out = funcol.halo_update(view, mesh, 0, 2, boundary)
    ck(out is view, "halo_update returns its argument")
    ck.close(to_host(view), exp, "halo_update of a strided view")
    ck.close(to_host(big[:, 1::2]), np.zeros((exp.shape[0], 5)), "the other columns are untouched")
    ck.done()


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("d", [0, 1])
def test_halo_update_in_place_time_loop(boundary, d):
    """A persistent padded array: update the interior, refresh the halos in place, compare every
    step against np.pad of the global array (block split, so ragged)."""
    mesh = mesh1d()
    N = 3 * W + 2
    full = data((N, 4) if d == 0 else (3, N), seed=30)
    o, n = block(N, W, RANK)
    idx = [slice(None)] * 2
    idx[d] = slice(o, o + n)
    P = fc.halo_exchange(np.ascontiguousarray(full[tuple(idx)]), mesh, d, 2, boundary)
    P = to_device(P)
    wl = 2 if (boundary != "none" or RANK > 0) else 0
    ck = Check()
    for step in range(3):
        full = full * 0.5 + step  # the new global field
        inner = [slice(None)] * 2
        inner[d] = slice(wl, wl + n)
        P[tuple(inner)] = to_device(np.ascontiguousarray(full[tuple(idx)]))
        before = id(P)
        out = funcol.halo_update(P, mesh, d, 2, boundary)
        ck(out is P and id(P) == before, "halo_update returns its argument")
        ck.close(P, oracle(full, d, o, n, 2, boundary), f"step {step} d={d} b={boundary}")
    ck.done()


def test_halo_update_errors():
    mesh = mesh1d()
    from mpilocal.autograd import tensor

    with pytest.raises(NotImplementedError, match="not differentiable"):
        funcol.halo_update(tensor(np.ones((4, 2)), requires_grad=True), mesh, 0, 1)
    if W > 1:  # at 1 rank a constant boundary needs no neighbour's rows: nothing is too narrow
        with pytest.raises(ValueError, match="fewer than the halo"):  # interior of 1 row, width 2
            funcol.halo_update(to_device(np.ones((5, 2))), mesh, 0, 2, 0.0)


# ------------------------------------------------------------------------------------------------
# two sharded dims, with corners
# ------------------------------------------------------------------------------------------------
def _mesh2d():
    return init_device_mesh(DEVICE, (2, 2) if W == 4 else (W, 1), mesh_dim_names=("a", "b"))


@pytest.mark.parametrize("bnds", [("periodic", "periodic"), (0.0, 0.0), ("none", "none"), ("periodic", 3.0),
                                  ("none", "periodic")])
@pytest.mark.parametrize("widths", [(1, 1), (2, 1), (0, 2)])
def test_halo_2d_corners(bnds, widths):
    mesh = _mesh2d()
    k0, k1 = mesh.shape
    full = data((3 * k0 + 1, 3 * k1 + 2), seed=5)
    X = distribute_tensor(to_device(full), mesh, [Shard(0), Shard(1)])
    got = to_host(funcol.halo_exchange(X, (0, 1), (0, 1), widths, bnds))
    c = mesh.get_coordinate()
    o0, n0 = chunk(full.shape[0], k0, c[0])
    o1, n1 = chunk(full.shape[1], k1, c[1])
    exp = oracle(oracle(full, 0, o0, n0, widths[0], bnds[0]), 1, o1, n1, widths[1], bnds[1])
    ck = Check()
    ck.close(got, exp, f"2-D halo {widths} {bnds}")
    ck.done()


def test_halo_2d_transposed_mesh_dims():
    """Tensor dim 0 sharded over mesh dim 1 and tensor dim 1 over mesh dim 0."""
    mesh = _mesh2d()
    k0, k1 = mesh.shape
    full = data((3 * k1, 3 * k0 + 1), seed=6)
    X = distribute_tensor(to_device(full), mesh, [Shard(1), Shard(0)])
    got = to_host(funcol.halo_exchange(X, ["b", "a"], [0, 1], 1, "periodic"))
    c = mesh.get_coordinate()
    o0, n0 = chunk(full.shape[0], k1, c[1])
    o1, n1 = chunk(full.shape[1], k0, c[0])
    exp = oracle(oracle(full, 0, o0, n0, 1, "periodic"), 1, o1, n1, 1, "periodic")
    assert_all(np.allclose(got, exp, equal_nan=True))


# ------------------------------------------------------------------------------------------------
# errors: the same on every rank
# ------------------------------------------------------------------------------------------------
def test_halo_shard_narrower_than_width_raises_everywhere():
    mesh = mesh1d()
    X = distribute_tensor(to_device(np.arange(2.0 * W)), mesh, [Shard(0)])  # 2 rows per shard
    with pytest.raises(ValueError, match="fewer than the halo\\s+width 3"):
        funcol.halo_exchange(X, 0, 0, 3, "periodic")


def test_halo_on_a_closed_mesh_raises_everywhere():
    """The DTensor halo plans are cached on the mesh: after close() the call raises the mesh's error
    (on every rank), not an exchange over freed communicators."""
    mesh = init_device_mesh(DEVICE, (W,))
    X = distribute_tensor(to_device(np.arange(3.0 * W)), mesh, [Shard(0)])
    funcol.halo_exchange(X, 0, 0, 1)
    mesh.close()
    raises_all(RuntimeError, "closed", funcol.halo_exchange, X, 0, 0, 1)


@needs_check
@pytest.mark.skipif(W < 2, reason="a ragged layout across ranks")
def test_halo_local_ragged_narrow_shard_raises_everywhere():
    """A ragged local layout where one rank holds a single row: agreed, every rank raises."""
    local = to_device(np.ones((1 if RANK == W - 1 else 4, 2)))
    raises_all(ValueError, "group rank %d holds 1 row" % (W - 1), funcol.halo_exchange, local, mesh1d(), 0, 2, 0.0)


@pytest.mark.skipif(W < 2, reason="the halo of one rank with a constant boundary needs no rows of its own")
def test_halo_narrow_shard_without_argument_check_raises(monkeypatch):
    """MPILOCAL_CHECK_ARGS=0: no agreement, but a rank whose own shard is narrower than the halo
    still raises (here every rank's is), never sends rows it does not have."""
    monkeypatch.setattr(agreement, "_CHECK_ARGS", False)
    mesh = mesh1d()
    raises_all(ValueError, r"group rank \d+ holds 1 row", funcol.halo_exchange, to_device(np.ones((1, 2))), mesh, 0,
               2, 0.0)
    raises_all(ValueError, r"group rank \d+ holds 1 row", funcol.halo_update, to_device(np.ones((5, 2))), mesh, 0,
               2, 0.0)


def test_halo_argument_errors():
    mesh = mesh1d()
    X = distribute_tensor(to_device(np.arange(4.0 * W).reshape(2 * W, 2)), mesh, [Shard(0)])
    with pytest.raises(ValueError, match="not Shard\\(1\\)"):
        funcol.halo_exchange(X, 0, 1, 1)
    with pytest.raises(ValueError, match="boundary 'reflect'"):
        funcol.halo_exchange(X, 0, 0, 1, "reflect")
    with pytest.raises(ValueError, match="width must be a non-negative int"):
        funcol.halo_exchange(X, 0, 0, -1)
    with pytest.raises(ValueError, match="tensor dim 0 is given twice"):
        funcol.halo_exchange(X, (0, 0), (0, 0), 1)
    m2 = _mesh2d()
    Y = distribute_tensor(to_device(np.ones((4 * W, 3))), m2, [Shard(0), Shard(0)])
    with pytest.raises(NotImplementedError, match="sharded over mesh dims \\[0, 1\\]"):
        funcol.halo_exchange(Y, 0, 0, 1)


@needs_check
@pytest.mark.skipif(W < 2, reason="ranks passing different arguments")
def test_halo_rank_divergent_width_raises_everywhere():
    raises_all(ValueError, "ranks pass different", funcol.halo_exchange, to_device(np.ones((3, 2))), mesh1d(), 0,
               1 + (RANK == 0))


# ------------------------------------------------------------------------------------------------
# permute (JAX ppermute), shift, send_recv
# ------------------------------------------------------------------------------------------------
def _perms():
    yield [(i, (i + 1) % W) for i in range(W)]
    yield [(i, W - 1 - i) for i in range(W)]
    yield [(0, W - 1)]
    yield []
    yield [(i, i) for i in range(W)]


def _rank_data(r, shape=(3, 2)):
    a = np.arange(math.prod(shape), dtype=np.float64).reshape(shape) + 100 * r
    a.flat[0] = np.nan if r % 2 else -np.inf
    return a


@pytest.mark.parametrize("which", range(5))
def test_permute_jax_semantics(which):
    perm = list(_perms())[which]
    got = fc.permute(_rank_data(RANK), perm, MPI.COMM_WORLD)
    srcs = [s for s, d in perm if d == RANK]
    exp = _rank_data(srcs[0]) if srcs else np.zeros((3, 2))
    ck = Check()
    ck.close(got, exp, f"perm {perm}")
    ck.done()


@pytest.mark.parametrize("dtype", [np.float64, np.int8, np.complex64, np.bool_])
def test_permute_loop_new_data_each_call(dtype):
    """Each permutation called four times on new data (from the second call, the prepared exchange
    on GPUs: a pair of a rank with itself is a copy inside it, a rank that receives nothing gets
    zeros): JAX's ppermute of each call's data, bit for bit, dtype kept."""
    ck = Check()
    for perm in [list(p) for p in _perms()] + [[(i, (i + 1) % W) for i in range(0, W, 2)]]:
        srcs = [s for s, d in perm if d == RANK]
        for k in range(4):
            def of(r):
                a = _rank_data(r) * (k + 1) - 7 * k
                return (a > 50) if np.dtype(dtype) == np.bool_ else a.astype(dtype)
            with np.errstate(invalid="ignore"):
                mine, exp = of(RANK), (of(srcs[0]) if srcs else np.zeros((3, 2), dtype))
            got = fc.permute(mine, perm, MPI.COMM_WORLD)
            ck(got.dtype == exp.dtype and np.array_equal(got, exp, equal_nan=True),
               f"perm {perm} call {k}: {got.dtype} {got.ravel()[:4]} vs {exp.ravel()[:4]}")
    ck.done()


@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("offset", [1, -1, 2])
def test_shift_is_np_roll_of_ranks(offset, periodic):
    stack = np.stack([_rank_data(r) for r in range(W)])
    got = fc.shift(_rank_data(RANK), offset, mesh1d(), periodic=periodic)
    if periodic:
        exp = np.roll(stack, offset, axis=0)[RANK]
    else:
        src = RANK - offset
        exp = stack[src] if 0 <= src < W else np.zeros((3, 2))
    ck = Check()
    ck.close(got, exp, f"shift {offset} periodic={periodic}")
    ck.done()


def test_send_recv_ring_and_proc_null():
    right, left = (RANK + 1) % W, (RANK - 1) % W
    got = fc.send_recv(_rank_data(RANK), right, left, MPI.COMM_WORLD)
    ck = Check()
    ck.close(got, _rank_data(left), "ring")
    # a line: the last rank sends nowhere, the first receives nothing (MPI_PROC_NULL style)
    got = fc.send_recv(_rank_data(RANK), RANK + 1 if RANK < W - 1 else None, RANK - 1 if RANK else None,
                       MPI.COMM_WORLD)
    ck.close(got, _rank_data(RANK - 1) if RANK else np.zeros((3, 2)), "line")
    ck.done()


def test_permute_errors_everywhere():
    with pytest.raises(ValueError, match="more than once"):
        funcol.permute(to_device(np.ones(2)), [(0, 0), (0, 0)], MPI.COMM_WORLD)
    with pytest.raises(ValueError, match="outside the group"):
        funcol.permute(to_device(np.ones(2)), [(0, W)], MPI.COMM_WORLD)
    with pytest.raises(TypeError, match="perm must be a sequence"):
        funcol.permute(to_device(np.ones(2)), [0, 1], MPI.COMM_WORLD)
    with pytest.raises(ValueError, match="not a group rank"):
        funcol.send_recv(to_device(np.ones(2)), W, None, MPI.COMM_WORLD)


@needs_check
@pytest.mark.skipif(W < 2, reason="ranks passing different arguments")
def test_permute_and_send_recv_rank_divergent_errors_everywhere():
    comm = MPI.COMM_WORLD
    raises_all(ValueError, "ranks pass different", funcol.permute, to_device(np.ones(2)),
               [(0, 1)] if RANK else [(1, 0)], comm)
    # everyone sends right, nobody receives
    raises_all(ValueError, "sends to rank", funcol.send_recv, to_device(np.ones(2)), (RANK + 1) % W, None, comm)
    raises_all(ValueError, "group rank 0 has shape", funcol.send_recv, to_device(np.ones(2 + (RANK == 1))),
               (RANK + 1) % W, (RANK - 1) % W, comm)
    raises_all(ValueError, "not a group rank", funcol.send_recv, to_device(np.ones(2)), W if RANK == 0 else None,
               None, comm)


# ------------------------------------------------------------------------------------------------
# accounting
# ------------------------------------------------------------------------------------------------
def test_comm_debug_mode_counts():
    mesh = _mesh2d()
    k0, k1 = mesh.shape
    X = distribute_tensor(to_device(np.ones((3 * k0, 3 * k1))), mesh, [Shard(0), Shard(1)])
    with CommDebugMode() as cm:
        funcol.halo_exchange(X, (0, 1), (0, 1), 1, "periodic")
    exp = (k0 > 1) + (k1 > 1)
    ck = Check()
    ck(cm.get_comm_counts().get("halo_exchange", 0) == exp, f"{dict(cm.get_comm_counts())} vs {exp}")
    ck(cm.get_total_counts() == exp, f"total {cm.get_total_counts()}")
    # 2x2 mesh, float64: two whole rows of the padded array (5: their corner cells are overwritten by the
    # column exchange that follows), then two padded columns of 5
    nbytes = 8 * (2 * 5 + 2 * 5)
    if W > 1 and k0 > 1 and k1 > 1:
        ck(cm.get_comm_bytes()["halo_exchange"] == nbytes, f"bytes {dict(cm.get_comm_bytes())} vs {nbytes}")
    with CommDebugMode() as cm:
        funcol.permute(to_device(np.ones(3)), [(i, (i + 1) % W) for i in range(W)], MPI.COMM_WORLD)
        funcol.shift(to_device(np.ones(3)), 1, MPI.COMM_WORLD)
        funcol.send_recv(to_device(np.ones(3)), (RANK + 1) % W, (RANK - 1) % W, MPI.COMM_WORLD)
    want = {"permute": 2, "send_recv": 1} if W > 1 else {}
    ck({k: v for k, v in cm.get_comm_counts().items() if v} == want, f"{dict(cm.get_comm_counts())}")
    ck.done()


# ------------------------------------------------------------------------------------------------
# gradients: central finite differences of the NumPy oracle's loss
# ------------------------------------------------------------------------------------------------
def _fd_grad(loss, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in range(x.size):
        xp_, xm = x.copy(), x.copy()
        xp_.flat[i] += eps
        xm.flat[i] -= eps
        g.flat[i] = (loss(xp_) - loss(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize("boundary", ["periodic", "none", 1.5])
@pytest.mark.parametrize("width", [1, 2])
def test_halo_gradient_finite_differences(boundary, width):
    mesh = mesh1d()
    N = 4 * W - 1  # torch.chunk shards of at least 3 rows
    x = data((N, 2), seed=7, nans=False)
    weights = [data(oracle(x, 0, *chunk(N, W, r), width, boundary).shape, seed=10 + r, nans=False) for r in range(W)]

    def np_loss(xf):
        return sum(float(np.sum(weights[r] * oracle(xf, 0, *chunk(N, W, r), width, boundary) ** 2)) for r in range(W))

    Cr = to_device(weights[RANK])
    loss = local_map(lambda a: (Cr * funcol.halo_exchange(a, mesh, 0, width, boundary) ** 2).sum(),
                     out_placements=[Partial()], in_placements=([Shard(0)],))
    ck = Check()
    want = _fd_grad(np_loss, x)
    for k in range(3):  # a training loop: from the second call, the prepared forward exchange
        X = distribute_tensor(to_device(x), mesh, [Shard(0)], requires_grad=True)
        loss(X).backward()
        ck.close(X.grad.full_tensor(), want, f"grad w={width} b={boundary} call {k}", rtol=1e-5, atol=1e-5)
    ck.done()


def test_halo_2d_gradient_through_dtensor_path():
    mesh = _mesh2d()
    k0, k1 = mesh.shape
    x = data((2 * k0 + 1, 2 * k1 + 1), seed=8, nans=False)
    c = mesh.get_coordinate()
    rng = np.random.default_rng(9)
    weights = {}
    for i in range(k0):
        for j in range(k1):
            o0, n0 = chunk(x.shape[0], k0, i)
            o1, n1 = chunk(x.shape[1], k1, j)
            weights[(i, j)] = ((o0, n0, o1, n1), rng.standard_normal((n0 + 2, n1 + 2)))

    def piece(xf, o0, n0, o1, n1):
        return oracle(oracle(xf, 0, o0, n0, 1, "periodic"), 1, o1, n1, 1, 0.5)

    def np_loss(xf):
        return sum(float(np.sum(wt * piece(xf, *s) ** 2)) for s, wt in weights.values())

    X = distribute_tensor(to_device(x), mesh, [Shard(0), Shard(1)], requires_grad=True)
    h = funcol.halo_exchange(X, (0, 1), (0, 1), 1, ("periodic", 0.5))  # Tracked: X requires grad
    loss = (to_device(weights[tuple(c)][1]) * h ** 2).sum()
    DTensor.from_local(loss, mesh, [Partial(), Partial()]).backward()
    ck = Check()
    ck.close(X.grad.full_tensor(), _fd_grad(np_loss, x), "2-D grad", rtol=1e-5, atol=1e-5)
    ck.done()


def test_permute_gradient():
    mesh = mesh1d()
    x = data((W, 3), seed=11, nans=False)
    perm = [(i, W - 1 - i) for i in range(W) if i != 0]  # rank 0 sends nothing; rank W-1 receives nothing
    wts = data((W, 3), seed=12, nans=False)

    def np_loss(xf):
        out = np.zeros_like(xf)
        for s, d in perm:
            out[d] = xf[s]
        return float(np.sum(wts * out ** 2))

    X = distribute_tensor(to_device(x), mesh, [Shard(0)], requires_grad=True)
    wr = to_device(wts[RANK:RANK + 1])
    L = local_map(lambda a: (wr * funcol.permute(a, perm, mesh) ** 2).sum(), out_placements=[Partial()],
                  in_placements=([Shard(0)],))(X)
    L.backward()
    ck = Check()
    ck.close(X.grad.full_tensor(), _fd_grad(np_loss, x), "permute grad", rtol=1e-5, atol=1e-5)
    ck.done()


# ------------------------------------------------------------------------------------------------
# stencil: a heat step is one line
# ------------------------------------------------------------------------------------------------
def _heat_np(u, nu, b):
    p = np.pad(u, 1, mode="wrap") if b == "periodic" else np.pad(u, 1, constant_values=b)
    return u + nu * (p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * u)


@pytest.mark.parametrize("bnds", [("none", "periodic"), (0.5, "none"), ("periodic", -1.0)])
def test_halo_3d_two_dims_in_reverse_order_and_gradient(bnds):
    """A 3-D array, halos along tensor dims 2 then 0 (sharded over mesh dims 1 and 0), widths 2 and
    1: the nested np.pad in that order (corners from the diagonal neighbours), and its gradient
    against finite differences."""
    mesh = _mesh2d()
    k0, k1 = mesh.shape
    x = data((2 * k0 + 2, 2, 2 * k1 + 3), seed=21, nans=False)
    c = mesh.get_coordinate()
    rng = np.random.default_rng(22)

    def piece(xf, i, j):
        o0, n0 = chunk(xf.shape[0], k0, i)
        o2, n2 = chunk(xf.shape[2], k1, j)
        return oracle(oracle(xf, 2, o2, n2, 2, bnds[0]), 0, o0, n0, 1, bnds[1])

    weights = {(i, j): rng.standard_normal(piece(x, i, j).shape) for i in range(k0) for j in range(k1)}

    def np_loss(xf):
        return sum(float(np.sum(wt * piece(xf, i, j) ** 2)) for (i, j), wt in weights.items())

    ck = Check()
    X = distribute_tensor(to_device(x), mesh, [Shard(0), Shard(2)])
    ck.close(to_host(funcol.halo_exchange(X, (1, 0), (2, 0), (2, 1), bnds)), piece(x, *c), f"3-D halo {bnds}")
    X = distribute_tensor(to_device(x), mesh, [Shard(0), Shard(2)], requires_grad=True)
    h = funcol.halo_exchange(X, (1, 0), (2, 0), (2, 1), bnds)  # Tracked: X requires grad
    loss = (to_device(weights[tuple(c)]) * h ** 2).sum()
    DTensor.from_local(loss, mesh, [Partial(), Partial()]).backward()
    ck.close(X.grad.full_tensor(), _fd_grad(np_loss, x), f"3-D grad {bnds}", rtol=1e-5, atol=1e-5)
    ck.done()


@pytest.mark.parametrize("boundary", ["periodic", 0.0, 1.0])
@pytest.mark.parametrize("placements", ["S0S1", "S1R", "RR"])
def test_stencil_heat_steps(boundary, placements):
    mesh = _mesh2d()
    k0, k1 = mesh.shape
    pl = {"S0S1": [Shard(0), Shard(1)], "S1R": [Shard(1), Replicate()], "RR": [Replicate(), Replicate()]}[placements]
    u = data((3 * k0 + 2, 3 * max(k0, k1) + 1), seed=13, nans=False)
    nu = 0.2
    step = mpilocal.stencil(lambda a: a[1:-1, 1:-1] + nu * (a[2:, 1:-1] + a[:-2, 1:-1] + a[1:-1, 2:] + a[1:-1, :-2]
                                                           - 4 * a[1:-1, 1:-1]), boundary=boundary)
    roll_step = mpilocal.stencil(lambda a: a + nu * (np.roll(a, 1, 0) + np.roll(a, -1, 0) + np.roll(a, 1, 1)
                                                     + np.roll(a, -1, 1) - 4 * a), boundary=boundary)
    U = distribute_tensor(to_device(u), mesh, pl)
    V = U
    ref = u
    for _ in range(3):
        U = step(U)
        V = roll_step(V)  # returns the padded shape: the wrapper crops the interior
        ref = _heat_np(ref, nu, boundary)
    ck = Check()
    ck(U.placements == tuple(pl), f"{U.placements}")
    ck.close(U.full_tensor(), ref, "stencil (interior)", rtol=1e-12, atol=1e-12)
    ck.close(V.full_tensor(), ref, "stencil (padded output)", rtol=1e-12, atol=1e-12)
    ck.done()


def test_stencil_gradient():
    mesh = mesh1d()
    u = data((3 * W, 4), seed=14, nans=False)
    wts = data((3 * W, 4), seed=15, nans=False)
    f = mpilocal.stencil(lambda a: a[2:, 1:-1] * a[:-2, 1:-1] - a[1:-1, 2:], halo=1, boundary="periodic")

    def np_loss(x):
        p = np.pad(x, 1, mode="wrap")
        return float(np.sum(wts * (p[2:, 1:-1] * p[:-2, 1:-1] - p[1:-1, 2:])))

    U = distribute_tensor(to_device(u), mesh, [Shard(0)], requires_grad=True)
    Wt = distribute_tensor(to_device(wts), mesh, [Shard(0)])
    out = f(U)
    L = local_map(lambda a, b: (a * b).sum(), out_placements=[Partial()], in_placements=([Shard(0)], [Shard(0)]))(out, Wt)
    L.backward()
    ck = Check()
    ck.close(U.grad.full_tensor(), _fd_grad(np_loss, u), "stencil grad", rtol=1e-5, atol=1e-5)
    ck.done()


# ------------------------------------------------------------------------------------------------
# the argument check of local-array neighbour calls: the public collectives' speculative signature
# (issue 11): one fixed-size reduction per call that repeats the agreed pattern; a rank that
# diverges (width, shape, perm, a too narrow shard) after such a history replays the predicted
# exchange, then every rank raises the same error, and the next call is right again
# ------------------------------------------------------------------------------------------------

signature_path = pytest.mark.skipif(W < 2 or not agreement.signature_checks(),
                                    reason="needs 2 ranks and the signature path (not MPILOCAL_DEBUG=1 or "
                                           "MPILOCAL_CHECK_ARGS=0)")
LAST = W - 1


def _ragged(N=4 * W + 3, cols=3):
    """This rank's block-split rows of a full (N, cols) array (sizes differ between ranks)."""
    full = np.arange(N * cols, dtype=np.float64).reshape(N, cols)
    o, n = block(N, W, RANK)
    return full, o, n, full[o:o + n]


def _halo_ok(mesh, w=1, b="periodic"):
    full, o, n, mine = _ragged()
    out = to_host(fc.halo_exchange(to_device(mine), mesh, 0, w, b))
    assert_all(np.array_equal(out, oracle(full, 0, o, n, w, b), equal_nan=True), f"halo w={w} b={b}")


@signature_path
def test_halo_and_permute_take_the_signature_path_with_ragged_shards():
    """Rank-varying shard sizes along the halo dim stay on the fast path: after warm-up each call
    exchanges the fixed-size signature only (no blocking agreement), and the results are exact."""
    mesh = mesh1d()
    x = np.arange(6.0).reshape(2, 3) + RANK
    perm = [(i, (i + 1) % W) for i in range(W)]
    calls = {
        "halo_exchange": lambda: _halo_ok(mesh, 1, 0.0),
        "permute": lambda: assert_all(np.array_equal(to_host(fc.permute(to_device(x), perm, mesh)),
                                                     np.arange(6.0).reshape(2, 3) + (RANK - 1) % W)),
        "shift": lambda: assert_all(np.array_equal(to_host(fc.shift(to_device(x), 1, mesh)),
                                                   np.arange(6.0).reshape(2, 3) + (RANK - 1) % W)),
    }
    for name, call in calls.items():
        for _ in range(3):
            call()
        before = agreement.SIG_STATS["fast"]
        with CommDebugMode() as mode:
            for _ in range(3):
                call()
        meta = dict(mode.get_metadata_counts())
        assert_all(meta == {"signature": 3}, f"{name}: metadata {meta}, expected only the signature")
        assert_all(agreement.SIG_STATS["fast"] - before == 3, f"{name}: not on the fast path")


@signature_path
@pytest.mark.parametrize("what", ["width", "boundary", "other dim", "dtype", "narrow shard"])
def test_halo_divergence_after_good_calls_raises_everywhere(what):
    """The other ranks are in the predicted halo exchange when the last rank diverges: it replays
    that exchange (else they would hang), then every rank raises, and the next call is right."""
    mesh = mesh1d()
    full, o, n, mine = _ragged()
    for _ in range(4):
        _halo_ok(mesh)
    w, b, a = 1, "periodic", mine
    if RANK == LAST:
        if what == "width":
            w = 2
        elif what == "boundary":
            b = 0.0
        elif what == "other dim":
            a = np.ones((n, 4))
        elif what == "dtype":
            a = mine.astype(np.float32)
        else:
            a, w = mine[:1], 2
    if what == "narrow shard":
        w = 2  # every rank passes width 2; the last rank's shard holds 1 row
    match = "fewer than the halo" if what == "narrow shard" else None
    raises_all(ValueError, match, fc.halo_exchange, to_device(a), mesh, 0, w, b)
    _halo_ok(mesh)
    _halo_ok(mesh)


@signature_path
def test_halo_update_divergence_after_good_calls_raises_everywhere():
    mesh = mesh1d()
    full, o, n, mine = _ragged()
    # funcol itself, not the tests' DeviceFunctional: halo_update writes into P, which must stay on the device
    P = funcol.halo_exchange(to_device(mine), mesh, 0, 1, 0.0)
    for k in range(4):
        P[1:-1] = to_device(mine + k)
        funcol.halo_update(P, mesh, 0, 1, 0.0)
        assert_all(np.array_equal(to_host(P), oracle(full + k, 0, o, n, 1, 0.0)), f"halo_update {k}")
    raises_all(ValueError, None, funcol.halo_update, P, mesh, 0, 1, -1.0 if RANK == LAST else 0.0)
    P[...] = 7
    funcol.halo_update(P, mesh, 0, 1, 0.0)
    ref = oracle(np.full_like(full, 7), 0, o, n, 1, 0.0)
    assert_all(np.array_equal(to_host(P), ref), "halo_update after the error")


@signature_path
@pytest.mark.parametrize("what", ["perm", "shift", "shape"])
def test_permute_divergence_after_good_calls_raises_everywhere(what):
    mesh = mesh1d()
    x = to_device(np.arange(6.0).reshape(2, 3) + RANK)
    perm = [(i, (i + 1) % W) for i in range(W)]
    for _ in range(4):
        fc.permute(x, perm, mesh)
    if what == "perm":
        raises_all(ValueError, None, fc.permute, x, [(0, 0)] if RANK == LAST else perm, mesh)
    elif what == "shift":
        for _ in range(3):
            fc.shift(x, 1, mesh)
        raises_all(ValueError, None, fc.shift, x, 2 if RANK == LAST else 1, mesh)
    else:
        raises_all(ValueError, None, fc.permute, to_device(np.ones((3, 3))) if RANK == LAST else x, perm, mesh)
    out = to_host(fc.permute(x, perm, mesh))
    assert_all(np.array_equal(out, np.arange(6.0).reshape(2, 3) + (RANK - 1) % W), "permute after the error")


# send_recv: every rank names its own peers; a pattern of pairs the ranks agreed once is then
# checked by the signature alone, and any rank leaving it (even for an entry of another agreed
# pattern) makes every rank take the full agreement
def _sr(x, dst, src, mesh):
    return to_host(fc.send_recv(to_device(x), dst, src, mesh))


def _sr_expect(x_of, dst_of, src):
    """What this rank gets: the array of ``src`` if ``src`` sends here (else zeros)."""
    return x_of(src) if src is not None and dst_of(src) == RANK else np.zeros_like(x_of(RANK))


@signature_path
def test_send_recv_takes_the_signature_path_once_its_pattern_is_agreed():
    mesh = mesh1d()
    x = np.arange(6.0).reshape(2, 3) + RANK
    right, left = (RANK + 1) % W, (RANK - 1) % W
    with CommDebugMode() as mode:
        got = _sr(x, right, left, mesh)
    assert_all(np.array_equal(got, x - RANK + left), "ring")
    meta = dict(mode.get_metadata_counts())
    assert_all(meta.get("argument_check") == 1, f"a new pattern is agreed in full once: {meta}")
    for _ in range(2):
        _sr(x, right, left, mesh)
    before = agreement.SIG_STATS["fast"]
    with CommDebugMode() as mode:
        for _ in range(3):
            got = _sr(x, right, left, mesh)
            assert_all(np.array_equal(got, x - RANK + left), "ring, fast")
    meta = dict(mode.get_metadata_counts())
    assert_all(meta == {"signature": 3}, f"metadata {meta}, expected only the signature")
    assert_all(agreement.SIG_STATS["fast"] - before == 3, "not on the fast path")
    assert_all(mode.get_comm_counts().get("send_recv") == 3, f"{dict(mode.get_comm_counts())}")


def _line(r):
    """A line 0 -> 1 -> ... -> W-1: (dst, src) of rank r."""
    return (r + 1 if r < W - 1 else None), (r - 1 if r > 0 else None)


@signature_path
def test_send_recv_patterns_change_and_alternate():
    """Ring, line, ring, line...: each call moves the right data (a rank's entry may belong to
    several agreed patterns), and the shapes may change between calls."""
    mesh = mesh1d()

    def x_of(r, k=0):
        return np.arange(4.0) + 10 * r + 1000 * k

    for k in range(6):
        if k % 2:
            dst, src = _line(RANK)
            got = _sr(x_of(RANK, k), dst, src, mesh)
            exp = _sr_expect(lambda r: x_of(r, k), lambda r: _line(r)[0], src)
        else:
            got = _sr(x_of(RANK, k), (RANK + 1) % W, (RANK - 1) % W, mesh)
            exp = x_of((RANK - 1) % W, k)
        assert_all(np.array_equal(got, exp), f"call {k}: {got} vs {exp}")
    got = _sr(np.ones((2, 2)) * RANK, (RANK + 1) % W, (RANK - 1) % W, mesh)  # a new shape, the ring again
    assert_all(np.array_equal(got, np.ones((2, 2)) * ((RANK - 1) % W)), "new shape")


@signature_path
@pytest.mark.parametrize("what", ["new dst", "mixed patterns", "shape"])
def test_send_recv_divergence_after_good_calls_raises_everywhere(what):
    """After the ranks agreed the swap pattern (and another one), one rank leaves it: every rank
    raises (no hang), and the next call is right. "mixed patterns": rank 0 passes its entry of
    the swap while the others pass theirs of "0 sends to 1": each entry was agreed before, the
    combination does not match."""
    mesh = mesh1d()
    x = np.arange(3.0) + RANK
    swap = (1 - RANK, 1 - RANK) if RANK < 2 else (None, None)  # ranks 0 and 1 swap, the others idle
    one_way = {0: (1, None), 1: (None, 0)}.get(RANK, (None, None))  # only 0 -> 1
    for _ in range(3):
        _sr(x, *one_way, mesh)
    for _ in range(4):
        _sr(x, *swap, mesh)
    if what == "new dst":
        new = (0 if swap[0] is None else None) if RANK == LAST else swap[0]  # sends elsewhere, or nowhere
        raises_all(ValueError, "sends to rank|receives from rank", fc.send_recv, to_device(x), new, swap[1], mesh)
    elif what == "mixed patterns":
        raises_all(ValueError, "sends to rank|receives from rank", fc.send_recv, to_device(x),
                   *(swap if RANK == 0 else one_way), mesh)
    else:
        raises_all(ValueError, "has shape", fc.send_recv, to_device(np.ones(4) if RANK == LAST else x),
                   *swap, mesh)
    got = _sr(x, *swap, mesh)
    exp = x - RANK + (1 - RANK) if RANK < 2 else np.zeros(3)
    assert_all(np.array_equal(got, exp), f"swap after the error: {got} vs {exp}")


@signature_path
@pytest.mark.skipif(DEVICE != "cuda", reason="NumPy on one rank and CuPy on the others")
@pytest.mark.parametrize("what", ["halo_exchange", "halo_update", "permute", "send_recv"])
def test_mixed_array_kinds_after_good_calls_raise_everywhere(what):
    """NumPy and CuPy arrays have the same class name: the signature must still tell them apart
    (they move through different transports), so the last rank passing a NumPy array after calls
    with CuPy arrays raises TypeError on every rank instead of a hang."""
    mesh = mesh1d()
    x = np.arange(8.0).reshape(4, 2) + RANK
    perm = [(i, (i + 1) % W) for i in range(W)]
    right, left = (RANK + 1) % W, (RANK - 1) % W
    P = to_device(np.zeros((6, 2)))
    calls = {"halo_exchange": lambda a: funcol.halo_exchange(a, mesh, 0, 1, 0.0),
             "halo_update": lambda a: funcol.halo_update(a, mesh, 0, 1, 0.0),
             "permute": lambda a: funcol.permute(a, perm, mesh),
             "send_recv": lambda a: funcol.send_recv(a, right, left, mesh)}
    arg = P if what == "halo_update" else to_device(x)
    for _ in range(4):
        calls[what](arg)
    host = np.array(to_host(arg))  # a plain NumPy array (also where tests/fake_cupy's arrays subclass it)
    raises_all(TypeError, "NumPy|CuPy|kind", calls[what], host if RANK == LAST else arg)
    calls[what](arg)


def test_heat2d_example_matches_numpy(tmp_path, capsys):
    """scripts/examples/heat2d.py, the documented 2-D heat example, run in this job (its mesh from
    every rank): its exit code says whether the field matches NumPy's single-process solution, and
    rank 0 writes the PNG."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "examples" / "heat2d.py"
    spec = importlib.util.spec_from_file_location("heat2d_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    png = tmp_path / "heat.png"
    rc = mod.main(["--n", "24", "20", "--steps", "6", "--device", DEVICE, "--png", str(png)])
    out = capsys.readouterr().out
    ck = Check()
    ck(rc == 0, f"heat2d exit code {rc}: {out}")
    if RANK == 0:
        ck(png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no PNG written")
        ck("max |error| vs NumPy" in out, out)
    ck.done()


@pytest.mark.parametrize("boundary", ["periodic", -1.0])
def test_loops_with_contiguous_and_strided_arrays_on_different_ranks(boundary):
    """From the second call, even ranks pass C-contiguous arrays (the prepared exchange) and odd ranks
    Fortran-order copies (the generic path): each rank's choice is its own, so the two paths must
    move the same messages. halo_exchange along dims 0 and 1, halo_update, permute: np.pad /
    ppermute bit for bit."""
    mesh = mesh1d()
    N = 4 * W - 1
    o, n = chunk(N, W, RANK)
    strided = RANK % 2 == 1
    ck = Check()
    for d in (0, 1):
        shape = (N, 6) if d == 0 else (5, N)
        for k in range(4):
            full = data(shape, seed=70 + k)
            idx = [slice(None)] * 2
            idx[d] = slice(o, o + n)
            local = full[tuple(idx)]
            local = np.asfortranarray(local) if strided and k else np.ascontiguousarray(local)
            want = oracle(full, d, o, n, 2, boundary)
            got = fc.halo_exchange(to_device(local), mesh, d, 2, boundary)
            ck(np.array_equal(to_host(got), want, equal_nan=True), f"halo call {k} d={d} strided={strided}")
            pad = to_device(np.asfortranarray(want) if strided and k else want.copy())
            inner = [slice(None)] * 2
            wl = 2 if (boundary != "none" or RANK > 0) else 0
            inner[d] = slice(wl, wl + n)
            pad[tuple(inner)] = pad[tuple(inner)] * 2
            funcol.halo_update(pad, mesh, d, 2, boundary)
            ck(np.array_equal(to_host(pad), oracle(full * 2, d, o, n, 2, boundary), equal_nan=True),
               f"update call {k} d={d} strided={strided}")
    perm = [(i, (i + 1) % W) for i in range(W)]
    for k in range(4):
        mine = _rank_data(RANK) * (k + 1)
        exp = _rank_data((RANK - 1) % W) * (k + 1)
        arg = np.asfortranarray(mine) if strided and k else mine
        got = fc.permute(arg, perm, MPI.COMM_WORLD)
        ck(np.array_equal(to_host(got), exp, equal_nan=True), f"permute call {k} strided={strided}")
    ck.done()
