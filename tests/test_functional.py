"""Functional collectives (mpilocal.functional) against NumPy oracles built from every rank's input.

Every rank generates every rank's input from a fixed seed, so the oracle is computed locally. Groups
are given as a 1-D DeviceMesh, a (DeviceMesh, mesh_dim) pair, a sub-mesh and mpi4py communicators
(including one whose rank order is reversed against the world).
"""

import functools

import numpy as np
import pytest
from conftest import RANK, W, Check, DEVICE, DeviceFunctional, assert_all
from mpi4py import MPI

import mpilocal.functional as funcol

if DEVICE == "cuda":  # CuPy shards: inputs go to the GPU, results must come back as CuPy arrays
    funcol = DeviceFunctional(funcol)
from mpilocal import init_device_mesh


pytestmark = pytest.mark.mpi

GROUP_KINDS = ["mesh", "mesh_dim1", "mesh_dim0", "submesh", "comm", "comm_reversed"]


def shape2d():
    return (2, 2) if W == 4 else (W, 1)


@functools.lru_cache(maxsize=None)
def _reversed_world():
    return MPI.COMM_WORLD.Split(0, W - 1 - RANK)


def make_group(kind):
    """(group argument, world ranks of this rank's group in group-rank order)."""
    if kind == "mesh":
        return init_device_mesh(DEVICE, (W,)), list(range(W))
    full = np.arange(W).reshape(shape2d())
    i, j = (int(v) for v in np.argwhere(full == RANK)[0])
    if kind == "mesh_dim1":
        mesh = init_device_mesh(DEVICE, shape2d(), mesh_dim_names=("dp", "tp"))
        return (mesh, 1), full[i, :].tolist()
    if kind == "mesh_dim0":
        mesh = init_device_mesh(DEVICE, shape2d(), mesh_dim_names=("dp", "tp"))
        return (mesh, 0), full[:, j].tolist()
    if kind == "submesh":
        mesh = init_device_mesh(DEVICE, shape2d(), mesh_dim_names=("dp", "tp"))
        return mesh["dp"], full[:, j].tolist()
    if kind == "comm":
        return MPI.COMM_WORLD, list(range(W))
    if kind == "comm_reversed":
        return _reversed_world(), list(range(W - 1, -1, -1))
    raise AssertionError(kind)



def rank_input(world_rank, shape, dtype, op=None, seed=0):
    """The input of ``world_rank``: small values so products and sums stay exact."""
    rng = np.random.default_rng(seed * 1009 + world_rank)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if op == "product":
        vals = rng.choice([1, 2, 3, -1] if dtype.kind in "iu" else [0.5, 1.0, 2.0, -1.0, 1.5], size=shape)
    else:
        vals = rng.integers(-20, 20, size=shape)
    if dtype.kind == "c":
        im = rng.integers(-20, 20, size=shape) if op != "product" else rng.choice([0.0, 1.0, -0.5], size=shape)
        return (vals + 1j * im).astype(dtype)
    return vals.astype(dtype)


def np_reduce(arrays, op):
    stack = np.stack(arrays)
    if op == "sum":
        return stack.sum(axis=0).astype(stack.dtype)
    if op == "avg":
        return stack.mean(axis=0).astype(stack.dtype)
    if op == "max":
        return stack.max(axis=0)
    if op == "min":
        return stack.min(axis=0)
    if op == "product":
        return np.prod(stack, axis=0).astype(stack.dtype)
    raise AssertionError(op)


def op_dtype_ok(op, dtype):
    k = np.dtype(dtype).kind
    if k == "c" and op in ("max", "min"):
        return False
    if k == "b" and op not in ("max", "min"):
        return False
    if k in "iu" and op == "avg":
        return False
    return True


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if np.dtype(dtype) in (np.float32, np.complex64) else {"rtol": 1e-12, "atol": 0}


def check_result(out, expected, x, x_before, dtype, chk=None, what=""):
    """Result is a new NumPy array of the input's dtype equal to ``expected``; the input is intact."""
    own = chk is None
    chk = Check() if own else chk
    chk(isinstance(out, np.ndarray), f"{what}: result is {type(out).__name__}, not a NumPy array")
    if isinstance(out, np.ndarray):
        chk(out.dtype == np.dtype(dtype), f"{what}: result dtype {out.dtype} != {np.dtype(dtype)}")
        chk(out.shape == expected.shape, f"{what}: result shape {out.shape} != {expected.shape}")
        if np.dtype(dtype) == np.bool_ or np.dtype(dtype).kind in "iu":
            chk(out.shape == expected.shape and np.array_equal(out, expected), f"{what}: {out} != {expected}")
        else:
            chk.close(out, expected, what, **tol(dtype))
        chk(not np.shares_memory(out, x) or out.size == 0, f"{what}: the result aliases the input")
    chk(np.array_equal(x, x_before), f"{what}: the input was modified")
    if own:
        chk.done()


OPS = ["sum", "avg", "max", "min", "product"]
DTYPES = [np.float32, np.float64, np.int64, np.complex64, np.bool_]


# ------------------------------------------------------------------------------------------------
# all_reduce


@pytest.mark.parametrize("op", OPS)
def test_all_reduce_ops_dtypes(op):
    group, members = make_group("mesh")
    chk = Check()
    for dtype in DTYPES:
        if not op_dtype_ok(op, dtype):
            continue
        shape = (3, 4)
        x = rank_input(RANK, shape, dtype, op)
        before = x.copy()
        out = funcol.all_reduce(x, op, group)
        expected = np_reduce([rank_input(r, shape, dtype, op) for r in members], op)
        check_result(out, expected, x, before, dtype, chk, f"{op} {np.dtype(dtype).name}")
    chk.done()


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_all_reduce_groups(kind):
    group, members = make_group(kind)
    chk = Check()
    for op in ("sum", "max", "product", "avg"):
        shape = (5,)
        x = rank_input(RANK, shape, np.float64, op, seed=3)
        before = x.copy()
        out = funcol.all_reduce(x, op, group)
        expected = np_reduce([rank_input(r, shape, np.float64, op, seed=3) for r in members], op)
        check_result(out, expected, x, before, np.float64, chk, op)
    chk.done()


def test_all_reduce_non_contiguous():
    group, members = make_group("mesh")
    chk = Check()
    for layout in ("transposed", "strided"):

        def make(r):
            base = rank_input(r, (6, 4), np.float64, seed=5)
            return base.T if layout == "transposed" else base[::2, 1::2]

        x = make(RANK)
        assert not x.flags.c_contiguous
        before = x.copy()
        out = funcol.all_reduce(x, "sum", group)
        check_result(out, np_reduce([make(r) for r in members], "sum"), x, before, np.float64, chk, layout)
    chk.done()


def test_all_reduce_uppercase_op_names():
    # PyTorch's funcol lowers the op name (reduceOp.lower()), so "SUM" and "MAX" work there
    group, members = make_group("mesh")
    x = rank_input(RANK, (4,), np.float64, seed=2)
    chk = Check()
    for op in ("SUM", "MAX"):
        out = funcol.all_reduce(x, op, group)
        expected = np_reduce([rank_input(r, (4,), np.float64, seed=2) for r in members], op.lower())
        chk.close(out, expected, op)
    chk.done()


def test_all_reduce_0d_and_empty():
    group, members = make_group("mesh")
    chk = Check()
    x = np.full((), float(RANK + 1))
    out = funcol.all_reduce(x, "sum", group)
    chk(out.shape == () and float(out) == sum(r + 1 for r in members), f"0-d: {out!r}")
    e = np.zeros((0, 3), dtype=np.float32)
    out = funcol.all_reduce(e, "max", group)
    chk(out.shape == (0, 3) and out.dtype == np.float32, f"empty: {out!r}")
    chk.done()


# ------------------------------------------------------------------------------------------------
# all_gather_tensor


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.complex64, np.bool_], ids=lambda d: np.dtype(d).name)
def test_all_gather_tensor(dtype):
    group, members = make_group("mesh")
    chk = Check()
    for gather_dim in (0, 1, -1):
        for uneven in (False, True):

            def shape_of(r):
                s = [2, 3, 4]
                s[gather_dim] = (r % 3) if uneven else 2  # uneven: rank 0 contributes nothing
                return tuple(s)

            x = rank_input(RANK, shape_of(RANK), dtype, seed=7)
            before = x.copy()
            out = funcol.all_gather_tensor(x, gather_dim, group)
            expected = np.concatenate([rank_input(r, shape_of(r), dtype, seed=7) for r in members], axis=gather_dim)
            check_result(out, expected, x, before, dtype, chk, f"dim {gather_dim} uneven={uneven}")
    chk.done()


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_all_gather_tensor_groups(kind):
    group, members = make_group(kind)
    x = rank_input(RANK, (RANK % 2 + 1, 3), np.float64, seed=11)
    before = x.copy()
    out = funcol.all_gather_tensor(x, 0, group)
    expected = np.concatenate([rank_input(r, (r % 2 + 1, 3), np.float64, seed=11) for r in members])
    check_result(out, expected, x, before, np.float64)


def test_all_gather_tensor_non_contiguous():
    group, members = make_group("mesh")
    chk = Check()
    for layout in ("transposed", "strided"):
        for gather_dim in (0, 1):

            def make(r):
                base = rank_input(r, (6, 4), np.float64, seed=13)
                return base.T if layout == "transposed" else base[::2, ::-1]

            x = make(RANK)
            before = x.copy()
            out = funcol.all_gather_tensor(x, gather_dim, group)
            expected = np.concatenate([make(r) for r in members], axis=gather_dim)
            check_result(out, expected, x, before, np.float64, chk, f"{layout} dim {gather_dim}")
    chk.done()


# ------------------------------------------------------------------------------------------------
# reduce_scatter_tensor


def torch_chunk(arr, k, axis):
    n = arr.shape[axis]
    step = -(-n // k) if n else 0
    out = []
    for i in range(k):
        lo, hi = min(i * step, n), min((i + 1) * step, n)
        out.append(np.take(arr, np.arange(lo, hi), axis=axis))
    return out


@pytest.mark.parametrize("op", OPS)
def test_reduce_scatter_tensor(op):
    group, members = make_group("mesh")
    k = len(members)
    chk = Check()
    for dtype in (np.float64, np.float32, np.int64, np.complex64):
        if not op_dtype_ok(op, dtype):
            continue
        for scatter_dim in (0, 1, -1):
            shape = [3, 2, 2]
            shape[scatter_dim] = 2 * k
            shape = tuple(shape)
            x = rank_input(RANK, shape, dtype, op, seed=17)
            before = x.copy()
            out = funcol.reduce_scatter_tensor(x, op, scatter_dim, group)
            total = np_reduce([rank_input(r, shape, dtype, op, seed=17) for r in members], op)
            expected = torch_chunk(total, k, scatter_dim)[members.index(RANK)]
            check_result(out, expected, x, before, dtype, chk, f"{np.dtype(dtype).name} dim {scatter_dim}")
    chk.done()


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_reduce_scatter_tensor_groups(kind):
    group, members = make_group(kind)
    k = len(members)
    shape = (3 * k, 2)
    x = rank_input(RANK, shape, np.float64, seed=19)
    before = x.copy()
    out = funcol.reduce_scatter_tensor(x, "sum", 0, group)
    total = np_reduce([rank_input(r, shape, np.float64, seed=19) for r in members], "sum")
    expected = torch_chunk(total, k, 0)[members.index(RANK)]
    check_result(out, expected, x, before, np.float64)


def test_reduce_scatter_tensor_non_contiguous():
    group, members = make_group("mesh")
    k = len(members)

    def make(r):
        return rank_input(r, (3, 2 * k), np.float64, seed=23).T  # scatter dim 0 of a transposed view

    x = make(RANK)
    before = x.copy()
    out = funcol.reduce_scatter_tensor(x, "sum", 0, group)
    expected = torch_chunk(np_reduce([make(r) for r in members], "sum"), k, 0)[members.index(RANK)]
    check_result(out, expected, x, before, np.float64)


def test_reduce_scatter_tensor_uneven_follows_torch_chunk():
    # uneven pieces follow the torch.chunk rule (mpilocal documents this; PyTorch requires divisibility)
    group, members = make_group("mesh")
    chk = Check()
    for n in (7, 1, 0):
        x = rank_input(RANK, (n, 2), np.float64, seed=29)
        out = funcol.reduce_scatter_tensor(x, "sum", 0, group)
        total = np_reduce([rank_input(r, (n, 2), np.float64, seed=29) for r in members], "sum")
        expected = torch_chunk(total, len(members), 0)[members.index(RANK)]
        check_result(out, expected, x, x.copy(), np.float64, chk, f"n={n}")
    chk.done()


# ------------------------------------------------------------------------------------------------
# all_to_all_single


def a2a_block(src_rank, dst_index, rows, width, dtype):
    """The rows world rank ``src_rank`` sends to group index ``dst_index``: values name both."""
    base = np.arange(rows * width).reshape(rows, width)
    return (1000 * src_rank + 100 * dst_index + base).astype(dtype)


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_all_to_all_single(kind):
    group, members = make_group(kind)
    k = len(members)
    me = members.index(RANK)
    width = 3
    chk = Check()
    for uneven in (False, True):

        def split(src_idx, dst_idx):
            return (src_idx + 2 * dst_idx) % 3 if uneven else 2

        in_splits = [split(me, j) for j in range(k)]
        out_splits = [split(j, me) for j in range(k)]
        x = np.concatenate([a2a_block(RANK, j, in_splits[j], width, np.float64) for j in range(k)])
        before = x.copy()
        if uneven:
            out = funcol.all_to_all_single(x, out_splits, in_splits, group)
        else:
            out = funcol.all_to_all_single(x, None, None, group)
        expected = np.concatenate([a2a_block(members[j], me, out_splits[j], width, np.float64) for j in range(k)])
        check_result(out, expected, x, before, np.float64, chk, f"uneven={uneven}")
    chk.done()


@pytest.mark.parametrize("dtype", [np.int64, np.complex64, np.float32], ids=lambda d: np.dtype(d).name)
def test_all_to_all_single_dtypes_non_contiguous(dtype):
    group, members = make_group("mesh")
    k = len(members)
    me = members.index(RANK)
    in_splits = [(me + j) % 2 + 1 for j in range(k)]
    out_splits = [(j + me) % 2 + 1 for j in range(k)]
    chk = Check()
    # a Fortran-ordered input (the transpose of a C array): rows are the leading dim of the view
    x_c = np.concatenate([a2a_block(RANK, j, in_splits[j], 4, dtype) for j in range(k)])
    x = np.asfortranarray(x_c)
    before = x.copy()
    out = funcol.all_to_all_single(x, out_splits, in_splits, group)
    expected = np.concatenate([a2a_block(members[j], me, out_splits[j], 4, dtype) for j in range(k)])
    check_result(out, expected, x, before, dtype, chk, "fortran")
    # a strided view
    big = np.repeat(x_c, 2, axis=1)
    xs = big[:, ::2]
    out = funcol.all_to_all_single(xs, out_splits, in_splits, group)
    check_result(out, expected, xs, x_c, dtype, chk, "strided")
    chk.done()


def test_all_to_all_single_with_empty_blocks():
    group, members = make_group("mesh")
    k = len(members)
    me = members.index(RANK)
    # everyone sends everything to group rank 0
    in_splits = [2] + [0] * (k - 1)
    out_splits = [2] * k if me == 0 else [0] * k
    x = a2a_block(RANK, 0, 2, 2, np.float64)
    out = funcol.all_to_all_single(x, out_splits, in_splits, group)
    if me == 0:
        expected = np.concatenate([a2a_block(members[j], 0, 2, 2, np.float64) for j in range(k)])
    else:
        expected = np.zeros((0, 2))
    check_result(out, expected, x, x.copy(), np.float64)


# ------------------------------------------------------------------------------------------------
# broadcast


def test_broadcast_world():
    # on a group of the whole world in rank order, group rank == world rank: unambiguous
    chk = Check()
    for dtype in (np.float64, np.int64, np.complex64, np.bool_):
        for kind in ("mesh", "comm"):
            group, members = make_group(kind)
            for src in range(W):
                x = rank_input(RANK, (3, 2), dtype, seed=31)
                before = x.copy()
                out = funcol.broadcast(x, src, group)
                expected = rank_input(src, (3, 2), dtype, seed=31)
                check_result(out, expected, x, before, dtype, chk, f"{np.dtype(dtype).name} {kind} src={src}")
    chk.done()


def test_broadcast_non_contiguous():
    group, members = make_group("mesh")
    x = rank_input(RANK, (4, 6), np.float64, seed=37).T[::2]
    before = x.copy()
    out = funcol.broadcast(x, 0, group)
    expected = rank_input(0, (4, 6), np.float64, seed=37).T[::2]
    check_result(out, expected, x, before, np.float64)


@pytest.mark.parametrize("kind", ["comm_reversed", "mesh_dim0", "submesh", "mesh_dim1"])
def test_broadcast_src_is_group_rank(kind):
    # PyTorch's funcol.broadcast passes ``src`` straight to ProcessGroup::broadcast as rootRank,
    # i.e. a rank *within the group* (torch/csrc/distributed/c10d/Functional.cpp, broadcast_).
    group, members = make_group(kind)
    chk = Check()
    for src in range(len(members)):
        x = rank_input(RANK, (2, 2), np.float64, seed=41)
        out = funcol.broadcast(x, src, group)
        expected = rank_input(members[src], (2, 2), np.float64, seed=41)
        check_result(out, expected, x, x.copy(), np.float64, chk, f"src={src}")
    chk.done()


# ------------------------------------------------------------------------------------------------
# issue 8: one choice of MPI call for every rank, and debug mode sees the real call
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 4), (5, 2), (2, 7), (0, 3)])
@pytest.mark.parametrize("debug", [False, True])
def test_uneven_shard_to_shard_every_rank_same_call(shape, debug):
    """S(0) -> S(1) with shards that are uneven or empty on some ranks: the count matrix is uniform
    on no rank or on every rank, never on some (Open MPI 4.1 hung on (1, 1) at 2 ranks, where rank 1's
    own counts were all 0 and it chose MPI_Alltoall while rank 0 chose MPI_Alltoallv)."""
    from mpilocal import Shard, deadline, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (W,))
    G = np.arange(float(np.prod(shape))).reshape(shape)
    prev = deadline.debug_enabled()
    deadline.set_debug(debug)
    try:
        out = distribute_tensor(G, mesh, [Shard(0)]).redistribute(mesh, [Shard(1)])
        back = out.redistribute(mesh, [Shard(0)])
        ok = np.array_equal(out.full_tensor(), G) and np.array_equal(back.full_tensor(), G)
    finally:
        deadline.set_debug(prev)
    assert_all(ok, f"shape {shape}")


def test_debug_names_divergent_mpi_calls():
    """MPILOCAL_DEBUG=1 fingerprints the call the transport makes: ranks that would make different
    MPI calls (here forced: rank 0 claims a uniform count matrix, the others do not) raise
    CollectiveMismatchError on every rank, naming both calls, instead of hanging."""
    from mpilocal import agreement, deadline
    from mpilocal.transport import group_for
    from mpilocal.transport.host import HostTransport

    if W == 1:
        pytest.skip("needs 2 ranks")
    g = group_for(MPI.COMM_WORLD)
    send, recv = np.zeros(W), np.zeros(W)
    prev = deadline.debug_enabled()
    deadline.set_debug(True)
    try:
        with deadline.begin("all_to_all_single", g):
            HostTransport().alltoallv(send, [1] * W, recv, [1] * W, g, uniform=RANK == 0)
        err = "no error"
    except agreement.CollectiveMismatchError as e:
        err = "" if "MPI_Alltoall#" in str(e) and "MPI_Alltoallv#" in str(e) else f"unclear: {e}"
    finally:
        deadline.set_debug(prev)
    assert_all(not err, err)


def test_debug_fingerprint_includes_placements():
    """Internal collectives take the caller's placements into the fingerprint."""
    from mpilocal import Replicate, Shard, agreement, collectives, deadline
    from mpilocal.transport import group_for

    if W == 1:
        pytest.skip("needs 2 ranks")
    g = group_for(MPI.COMM_WORLD)
    pl = ((Shard(0),), (Replicate(),)) if RANK == 0 else ((Shard(1),), (Replicate(),))
    prev = deadline.debug_enabled()
    deadline.set_debug(True)
    try:
        collectives.all_gather(np.ones((1, 2)), 0, g, [1] * W, placements=pl)
        err = "no error"
    except agreement.CollectiveMismatchError as e:
        err = "" if "placements" in str(e) and "Shard(dim=1)" in str(e) else f"unclear: {e}"
    finally:
        deadline.set_debug(prev)
    assert_all(not err, err)


def test_all_to_all_single_output_sizes_on_some_ranks_only():
    """Rank 0 passes its output split sizes, the others let them be agreed: the split agreement is
    one collective that every rank joins (a choice made from the agreed flags, not from this rank's
    arguments), and every rank gets the right blocks."""
    ins = [(RANK + p) % 3 + 1 for p in range(W)]
    x = np.concatenate([np.full(ins[p], 10 * RANK + p, np.float64) for p in range(W)])
    outs = [(q + RANK) % 3 + 1 for q in range(W)]
    out = funcol.all_to_all_single(x, outs if RANK == 0 else None, ins, MPI.COMM_WORLD)
    ref = np.concatenate([np.full(outs[q], 10 * q + RANK, np.float64) for q in range(W)])
    assert_all(np.array_equal(out, ref), f"{out} vs {ref}")


# ------------------------------------------------------------------------------------------------
# a loop of public calls of one shape: device arrays take the prepared collective after the first
# call (mpilocal.collectives.*_looped); each call must still give its own data's result
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_a_loop_of_funcol_calls_gives_each_call_its_result(dtype):
    mesh = init_device_mesh("cpu", (W,))  # DeviceFunctional moves the inputs and results
    n = 3 * W
    for it in range(4):
        xs = [np.random.default_rng(100 * it + r).integers(-50, 50, size=(n, 2)).astype(dtype) for r in range(W)]
        total = sum(xs)
        ar = funcol.all_reduce(xs[RANK], "sum", mesh)
        ag = funcol.all_gather_tensor(xs[RANK], 0, mesh)
        rs = funcol.reduce_scatter_tensor(xs[RANK], "sum", 0, mesh)
        mx = funcol.all_reduce(xs[RANK], "max", mesh)
        ok = (np.array_equal(ar, total) and np.array_equal(ag, np.concatenate(xs))
              and np.array_equal(rs, total[3 * RANK:3 * RANK + 3]) and np.array_equal(mx, np.maximum.reduce(xs))
              and ar.dtype == rs.dtype == ag.dtype == np.dtype(dtype))
        assert_all(ok, f"call {it}: {ar.tolist()} {ag.tolist()} {rs.tolist()} {mx.tolist()}")
