"""DTensor.redistribute: every placement transition against a NumPy oracle.

Inputs are built with ``distribute_tensor`` from a global array generated identically on every rank,
or, for Partial sources, with ``DTensor.from_local`` from per-rank partial values chosen so that
their reduction is the global array. After redistributing, ``to_local()`` must be the slice
``layout.local_slices(global.shape, mesh.shape, placements, coordinate)`` of the global array and
``full_tensor()`` the global array.
"""

import numpy as np
import pytest
from conftest import (
    RANK, W, make_mesh, mesh_or_skip, Check, DEVICE, assert_all, assert_close_all, on_device, to_device, to_host,
)
from mpi4py import MPI

from mpilocal import CommDebugMode, DeviceMesh, DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from mpilocal.layout import local_slices


pytestmark = pytest.mark.mpi

S0, S1, S2, R = Shard(0), Shard(1), Shard(2), Replicate()
SHAPES = [(8, 6), (7, 5), (3, 2), (0, 4)]
PARTIAL_ERRORS = (ValueError, NotImplementedError, RuntimeError)


# ------------------------------------------------------------------------------------------------
# helpers




def global_array(shape, dtype, seed=0, low=-9, high=10):
    """The same integer-valued array on every rank."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    vals = rng.integers(low, high, size=shape)
    if dtype.kind == "c":
        vals = vals + 1j * rng.integers(low, high, size=shape)
    return vals.astype(dtype)


def tol(dtype):
    d = np.dtype(dtype)
    if d in (np.float32, np.complex64):
        return {"rtol": 1e-6, "atol": 1e-6}
    return {"rtol": 1e-12, "atol": 1e-12}


def expected_local(G, mesh, placements):
    return G[local_slices(G.shape, mesh.shape, tuple(placements), tuple(mesh.get_coordinate()))]


def check_dtensor(chk, dt, G, mesh, placements, full=True, what=""):
    """to_local() is the layout's slice of G, full_tensor() is G, metadata are right."""
    what = what or f"{list(placements)}"
    local = dt.to_local()
    chk(on_device(local), f"{what}: to_local() is {type(local).__name__}, not a {DEVICE} array")
    local = to_host(local)
    exp = expected_local(G, mesh, placements)
    chk(tuple(dt.placements) == tuple(placements), f"{what}: placements {dt.placements}")
    chk(tuple(dt.shape) == G.shape, f"{what}: global shape {dt.shape} != {G.shape}")
    chk(local.shape == exp.shape, f"{what}: local shape {local.shape} != {exp.shape} at {mesh.get_coordinate()}")
    chk(local.dtype == G.dtype, f"{what}: local dtype {local.dtype} != {G.dtype}")
    if local.shape == exp.shape:
        chk.close(local, exp, f"{what}: to_local()", **tol(G.dtype))
    if full:
        whole = to_host(dt.full_tensor())
        chk(whole.shape == G.shape and whole.dtype == G.dtype, f"{what}: full_tensor {whole.shape} {whole.dtype}")
        chk.close(whole, G, f"{what}: full_tensor()", **tol(G.dtype))


def redistribute_and_check(chk, G, mesh, src, dst):
    what = f"{list(src)} -> {list(dst)} {G.shape} {G.dtype}"
    dt = distribute_tensor(G, mesh, list(src))
    check_dtensor(chk, dt, G, mesh, src, full=False, what=what + " (source)")
    out = dt.redistribute(mesh, list(dst))
    check_dtensor(chk, out, G, mesh, dst, what=what)
    # the source is untouched
    chk.close(to_host(dt.to_local()), expected_local(G, mesh, src), what + " (source after)", **tol(G.dtype))


def _flat(coord, dims, mesh_shape):
    g = 0
    for m in dims:
        g = g * mesh_shape[m] + coord[m]
    return g


def partial_local(G, mesh, placements, op, seed=1):
    """This rank's partial value: reducing over the Partial mesh dims by ``op`` gives G's slice."""
    coord = tuple(mesh.get_coordinate())
    pdims = [m for m, p in enumerate(placements) if isinstance(p, Partial)]
    value_pl = tuple(R if isinstance(p, Partial) else p for p in placements)
    sl = local_slices(G.shape, mesh.shape, value_pl, coord)
    n = int(np.prod([mesh.shape[m] for m in pdims]))
    g = _flat(coord, pdims, mesh.shape)
    rng = np.random.default_rng(seed)
    owner = (np.arange(G.size).reshape(G.shape) % n) if G.size else np.zeros(G.shape, dtype=int)
    if op in ("sum", "avg"):
        noise = [rng.integers(-5, 6, size=G.shape) for _ in range(n - 1)]
        if G.dtype.kind == "c":
            noise = [z + 1j * rng.integers(-5, 6, size=G.shape) for z in noise]
        noise.append(-sum(noise) if noise else np.zeros(G.shape))
        base = G if (op == "avg" or g == 0) else np.zeros_like(G)
        val = base + noise[g]
    elif op == "max":
        val = np.where(owner == g, G, G - 1 - rng.integers(0, 4, size=G.shape))
    elif op == "min":
        val = np.where(owner == g, G, G + 1 + rng.integers(0, 4, size=G.shape))
    elif op == "product":
        val = np.where(owner == g, G, np.ones_like(G))
    else:
        raise AssertionError(op)
    return np.ascontiguousarray(val.astype(G.dtype)[sl])


def partial_dtensor(G, mesh, placements, op):
    local = partial_local(G, mesh, placements, op)
    return DTensor.from_local(local, mesh, list(placements), shape=G.shape)


def op_dtype_ok(op, dtype):
    k = np.dtype(dtype).kind
    return not ((k == "c" and op in ("max", "min")) or (k in "iu" and op == "avg"))


# ------------------------------------------------------------------------------------------------
# 1-D meshes: Shard / Replicate transitions


TRANSITIONS_1D = [
    (S0, R), (S1, R), (S0, S1), (S1, S0), (R, S0), (R, S1), (S0, S0), (R, R), (S1, S1),
]


@pytest.mark.parametrize("src, dst", TRANSITIONS_1D, ids=lambda p: repr(p))
def test_1d_transitions(src, dst):
    mesh = make_mesh("1d")
    chk = Check()
    for shape in SHAPES:
        G = global_array(shape, np.float64, seed=sum(shape))
        redistribute_and_check(chk, G, mesh, (src,), (dst,))
    chk.done()


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.complex128, np.bool_], ids=lambda d: np.dtype(d).name)
def test_1d_transitions_dtypes(dtype):
    mesh = make_mesh("1d")
    G = global_array((7, 5), dtype, seed=3)
    chk = Check()
    for src, dst in [(S0, R), (S0, S1), (S1, S0), (R, S1)]:
        redistribute_and_check(chk, G, mesh, (src,), (dst,))
    chk.done()


def test_1d_three_dim_array():
    mesh = make_mesh("1d")
    G = global_array((5, 4, 7), np.float64, seed=4)
    chk = Check()
    for src, dst in [(S2, S0), (S0, S2), (S1, S2), (S2, R), (R, S2)]:
        redistribute_and_check(chk, G, mesh, (src,), (dst,))
    chk.done()


def test_negative_shard_dim_is_normalized():
    mesh = make_mesh("1d")
    G = global_array((7, 5), np.float64, seed=5)
    chk = Check()
    dt = distribute_tensor(G, mesh, [Shard(-1)])
    chk(tuple(dt.placements) == (S1,), f"{dt.placements}")
    out = dt.redistribute(mesh, [Shard(-2)])
    check_dtensor(chk, out, G, mesh, (S0,))
    chk.done()


def test_chain_of_redistributes_round_trip():
    mesh = make_mesh("1d")
    G = global_array((7, 6), np.float64, seed=6)
    chk = Check()
    dt = distribute_tensor(G, mesh, [S0])
    for pl in ([S1], [R], [S0], [S1], [S0], [R]):
        dt = dt.redistribute(mesh, pl)
        check_dtensor(chk, dt, G, mesh, tuple(pl), full=False)
    check_dtensor(chk, dt, G, mesh, (R,))
    chk.done()


def test_redistribute_default_mesh_argument():
    mesh = make_mesh("1d")
    G = global_array((6, 4), np.float64, seed=7)
    chk = Check()
    dt = distribute_tensor(G, mesh, [S0])
    out = dt.redistribute(placements=[S1])
    chk(out.device_mesh == mesh, "device_mesh changed")
    check_dtensor(chk, out, G, mesh, (S1,))
    chk.done()


# ------------------------------------------------------------------------------------------------
# Partial sources


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int32, np.complex128], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", ["sum", "avg", "max", "min", "product"])
def test_1d_partial(op, dtype):
    if not op_dtype_ok(op, dtype):
        pytest.skip(f"{op} on {np.dtype(dtype).name}")
    mesh = make_mesh("1d")
    G = global_array((7, 5), dtype, seed=8, low=-3, high=4)
    chk = Check()
    for dst in (R, S0, S1):
        dt = partial_dtensor(G, mesh, (Partial(op),), op)
        chk(tuple(dt.placements) == (Partial(op),), f"placements {dt.placements}")
        out = dt.redistribute(mesh, [dst])
        check_dtensor(chk, out, G, mesh, (dst,), full=(dst != R), what=f"P({op}) -> {dst!r}")
    chk.done()


def test_1d_partial_shapes():
    mesh = make_mesh("1d")
    chk = Check()
    for shape in [(3, 2), (0, 4), (8, 6)]:
        G = global_array(shape, np.float64, seed=9)
        for dst in (R, S0, S1):
            dt = partial_dtensor(G, mesh, (Partial(),), "sum")
            out = dt.redistribute(mesh, [dst])
            check_dtensor(chk, out, G, mesh, (dst,), full=False, what=f"{shape} P -> {dst!r}")
    chk.done()


def test_partial_full_tensor_reduces():
    mesh = make_mesh("1d")
    chk = Check()
    for op in ("sum", "max", "product"):
        G = global_array((5, 3), np.float64, seed=10)
        dt = partial_dtensor(G, mesh, (Partial(op),), op)
        chk.close(to_host(dt.full_tensor()), G, f"full_tensor of Partial({op})")
    chk.done()


def test_partial_to_same_partial_is_noop():
    mesh = make_mesh("1d")
    G = global_array((5, 3), np.float64, seed=11)
    local = partial_local(G, mesh, (Partial(),), "sum")
    dt = DTensor.from_local(local, mesh, [Partial()], shape=G.shape)
    with CommDebugMode() as comm:
        out = dt.redistribute(mesh, [Partial()])
    chk = Check()
    chk(comm.get_total_counts() == 0, f"{comm.get_comm_counts()}")
    chk(tuple(out.placements) == (Partial(),) and np.array_equal(to_host(out.to_local()), local), "changed")
    chk.done()


@pytest.mark.parametrize(
    "src, dst",
    [(R, Partial()), (S0, Partial()), (Partial("sum"), Partial("max")), (R, Partial("avg"))],
    ids=repr,
)
def test_redistribute_to_partial_is_rejected(src, dst):
    # PyTorch: "redistributing to Partial is for internal use only"
    mesh = make_mesh("1d")
    G = global_array((4, 4), np.float64, seed=12)
    if src.is_partial():
        dt = partial_dtensor(G, mesh, (src,), src.reduce_op)
    else:
        dt = distribute_tensor(G, mesh, [src])
    with CommDebugMode() as comm:
        with pytest.raises(PARTIAL_ERRORS):
            dt.redistribute(mesh, [dst])
    assert comm.get_total_counts() == 0


IDENTITY = {"sum": 0, "product": 1}


@pytest.mark.parametrize("op", ["sum", "avg", "max", "min", "product"])
@pytest.mark.parametrize("src_data_rank", [0, None], ids=lambda s: f"src{s}")
def test_distribute_tensor_partial(op, src_data_rank):
    # PyTorch (issue 8): Partial(op) puts the value on coordinate 0 of the mesh dim and the identity of
    # op elsewhere (sum/product), or the value everywhere (avg/max/min); reducing gives it back
    mesh = make_mesh("1d")
    G = global_array((5, 3), np.float64, seed=13)
    chk = Check()
    dt = distribute_tensor(G, mesh, [Partial(op)], src_data_rank=src_data_rank)
    local = to_host(dt.to_local())
    want = G if (op not in IDENTITY or RANK == 0) else np.full_like(G, IDENTITY[op])
    chk(tuple(dt.placements) == (Partial(op),) and tuple(dt.shape) == G.shape, f"{dt.placements} {dt.shape}")
    chk(local.shape == G.shape and np.array_equal(local, want), f"{op}: local {local.ravel()[:4]}")
    chk.close(to_host(dt.full_tensor()), G, f"full_tensor of distributed Partial({op})")
    chk.done()


@pytest.mark.parametrize("placements", [(S0, Partial()), (Partial(), S1), (Partial("max"), R),
                                        (Partial(), Partial("product"))], ids=repr)
@pytest.mark.parametrize("kind", ["2x2", "Nx1", "1xN"])
def test_distribute_tensor_partial_2d(kind, placements):
    mesh = mesh_or_skip(kind)
    G = global_array((7, 6), np.float64, seed=14)
    chk = Check()
    dt = distribute_tensor(G, mesh, list(placements))
    coord = mesh.get_coordinate()
    value_pl = tuple(R if p.is_partial() else p for p in placements)
    want = G[local_slices(G.shape, mesh.shape, value_pl, tuple(coord))]
    for m in range(len(placements) - 1, -1, -1):  # partitioned last to first (redistribute reduces first to last)
        p = placements[m]
        if p.is_partial() and p.reduce_op in IDENTITY and coord[m] != 0 and mesh.shape[m] > 1:
            want = np.full_like(want, IDENTITY[p.reduce_op])
    chk(np.array_equal(to_host(dt.to_local()), want), f"{placements} at {coord}")
    chk.close(to_host(dt.full_tensor()), G, f"full_tensor of {placements}")
    chk.done()


# ------------------------------------------------------------------------------------------------
# 2-D meshes


TRANSITIONS_2D = [
    ((S0, S0), (R, S0)),  # nested -> outer unsharded
    ((S0, S0), (S0, R)),  # nested -> inner unsharded
    ((S0, S0), (R, R)),
    ((S0, S1), (S1, S0)),  # swap
    ((S0, S1), (R, R)),
    ((S0, R), (R, S1)),
    ((R, S0), (S0, S0)),  # build a nested sharding
    ((S1, S0), (S0, S0)),
    ((R, R), (S1, S0)),
    ((S0, S0), (S1, S1)),
    ((S0, S1), (S0, S1)),  # unchanged
    ((S1, R), (S1, S0)),
]


@pytest.mark.parametrize("src, dst", TRANSITIONS_2D, ids=lambda p: repr(list(p)))
@pytest.mark.parametrize("kind", ["2x2", "1xN", "Nx1"])
def test_2d_transitions(kind, src, dst):
    mesh = mesh_or_skip(kind)
    chk = Check()
    # every shape on the real 2x2 mesh; the degenerate 1xN / Nx1 meshes get the uneven ones
    for shape in SHAPES if kind == "2x2" else [(7, 5), (3, 2)]:
        G = global_array(shape, np.float64, seed=13)
        redistribute_and_check(chk, G, mesh, src, dst)
    chk.done()


@pytest.mark.parametrize("kind", ["2x2_array", "2x2_permuted"])
def test_2d_transitions_array_meshes(kind):
    mesh = mesh_or_skip(kind)
    G = global_array((7, 5), np.float64, seed=14)
    chk = Check()
    for src, dst in TRANSITIONS_2D[:6]:
        redistribute_and_check(chk, G, mesh, src, dst)
    chk.done()


@pytest.mark.parametrize("kind", ["2x2", "1xN", "Nx1"])
def test_2d_three_dim_array(kind):
    mesh = mesh_or_skip(kind)
    G = global_array((5, 3, 6), np.float64, seed=15)
    chk = Check()
    for src, dst in [((S2, S0), (S0, S2)), ((S0, S0), (S2, S1)), ((S1, S2), (S2, S2)), ((S2, S2), (R, S1))]:
        redistribute_and_check(chk, G, mesh, src, dst)
    chk.done()


@pytest.mark.parametrize("kind", ["2x2", "1xN"])
def test_2d_dtypes(kind):
    mesh = mesh_or_skip(kind)
    chk = Check()
    for dtype in (np.int32, np.complex128, np.float32):
        G = global_array((7, 5), dtype, seed=16)
        redistribute_and_check(chk, G, mesh, (S0, S0), (S1, R))
        redistribute_and_check(chk, G, mesh, (S0, S1), (S1, S0))
    chk.done()


PARTIAL_2D = [
    ((Partial("sum"), S0), (R, S0)),
    ((S0, Partial("sum")), (S0, R)),
    ((Partial("sum"), S0), (S0, S0)),
    ((Partial("sum"), Partial("sum")), (R, S1)),
    ((Partial("sum"), Partial("sum")), (S0, S0)),
    ((Partial("sum"), R), (S1, R)),
    ((R, Partial("sum")), (S0, S1)),
]


@pytest.mark.parametrize("src, dst", PARTIAL_2D, ids=lambda p: repr(list(p)))
@pytest.mark.parametrize("kind", ["2x2", "1xN", "Nx1"])
def test_2d_partial(kind, src, dst):
    mesh = mesh_or_skip(kind)
    chk = Check()
    for op in ("sum", "avg", "max", "min", "product"):
        psrc = tuple(Partial(op) if p.is_partial() else p for p in src)
        G = global_array((7, 5), np.float64, seed=17, low=-3, high=4)
        dt = partial_dtensor(G, mesh, psrc, op)
        out = dt.redistribute(mesh, list(dst))
        check_dtensor(chk, out, G, mesh, dst, full=(op == "sum"), what=f"{list(psrc)} -> {list(dst)}")
    chk.done()


# ------------------------------------------------------------------------------------------------
# communication: one collective per changed mesh dim


ONE_D_COMMS = [
    ((S0,), (R,), "all_gather_into_tensor"),
    ((S1,), (R,), "all_gather_into_tensor"),
    ((S0,), (S1,), "all_to_all_single"),
    ((S1,), (S0,), "all_to_all_single"),
    ((Partial(),), (R,), "all_reduce"),
    ((Partial("max"),), (R,), "all_reduce"),
    ((Partial(),), (S0,), "reduce_scatter_tensor"),
    ((Partial("avg"),), (S1,), "reduce_scatter_tensor"),
    ((R,), (S0,), None),
    ((S0,), (S0,), None),
    ((R,), (R,), None),
]


def test_comm_counts_1d():
    mesh = make_mesh("1d")
    G = global_array((8, 6), np.float64, seed=18)
    chk = Check()
    for src, dst, name in ONE_D_COMMS:
        if src[0].is_partial():
            dt = partial_dtensor(G, mesh, src, src[0].reduce_op)
        else:
            dt = distribute_tensor(G, mesh, list(src))
        _ = dt.shape  # settle any pending metadata outside the counted region
        with CommDebugMode() as comm:
            out = dt.redistribute(mesh, list(dst))
        counts = {k: v for k, v in comm.get_comm_counts().items() if v}
        what = f"{list(src)} -> {list(dst)}"
        if name is None:
            chk(counts == {}, f"{what}: expected no collective, got {counts}")
        elif W == 1:
            # a 1-rank mesh may skip the collective, but must not issue anything else
            chk(set(counts) <= {name} and counts.get(name, 0) <= 1, f"{what}: {counts}")
        else:
            chk(counts == {name: 1}, f"{what}: expected {{{name!r}: 1}}, got {counts}")
            chk(comm.get_total_counts() == 1, f"{what}: total {comm.get_total_counts()}")
        check_dtensor(chk, out, G, mesh, dst, full=False, what=what)
    chk.done()


def test_comm_counts_2d():
    if W != 4:
        pytest.skip("needs a 2x2 mesh")
    mesh = make_mesh("2x2")
    G = global_array((8, 6), np.float64, seed=19)
    cases = [
        ((S0, S1), (R, R), {"all_gather_into_tensor": 2}),
        ((S0, R), (R, R), {"all_gather_into_tensor": 1}),
        ((R, S1), (R, S0), {"all_to_all_single": 1}),
        ((R, R), (S0, S1), {}),
        ((S0, S0), (S0, R), {"all_gather_into_tensor": 1}),
    ]
    chk = Check()
    for src, dst, want in cases:
        dt = distribute_tensor(G, mesh, list(src))
        with CommDebugMode() as comm:
            out = dt.redistribute(mesh, list(dst))
        got = {k: v for k, v in comm.get_comm_counts().items() if v}
        chk(got == want, f"{src} -> {dst}: {got} != {want}")
        check_dtensor(chk, out, G, mesh, dst, full=False)
    # nested: the outer change forces the inner dim to be un-sharded too, still one collective each
    dt = distribute_tensor(G, mesh, [S0, S0])
    with CommDebugMode() as comm:
        out = dt.redistribute(mesh, [R, S0])
    chk(comm.get_total_counts() <= 2, f"nested: {comm.get_comm_counts()}")
    check_dtensor(chk, out, G, mesh, (R, S0), full=False)
    chk.done()


# ------------------------------------------------------------------------------------------------
# a mesh over a subset of the ranks


def subset_ranks(kind):
    return list(range(W - 1)) if kind == "first" else list(range(W - 1, 0, -1))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["first", "reversed_without_0"])
def test_subset_mesh_only_members_call(kind):
    ranks = subset_ranks(kind)
    mesh = DeviceMesh(DEVICE, ranks)  # every world rank constructs it, as in PyTorch
    on = RANK in ranks
    chk = Check()
    chk((mesh.get_coordinate() is None) == (not on), f"coordinate {mesh.get_coordinate()}")
    G = global_array((7, 5), np.float64, seed=20)
    if on:
        try:
            for src, dst in [(S0, R), (S0, S1), (R, S1), (S1, S0)]:
                redistribute_and_check(chk, G, mesh, (src,), (dst,))
        except Exception as exc:  # noqa: BLE001
            chk(False, f"{type(exc).__name__}: {exc}")
    chk.done()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["first", "reversed_without_0"])
def test_subset_mesh_everyone_calls(kind):
    # SPMD style (as in PyTorch): every rank runs the same code; off-mesh ranks take no part
    ranks = subset_ranks(kind)
    mesh = DeviceMesh(DEVICE, ranks)
    on = RANK in ranks
    G = global_array((7, 5), np.float64, seed=21)
    dt = distribute_tensor(G, mesh, [S0])
    out = dt.redistribute(mesh, [S1])
    if on:
        ok = np.array_equal(to_host(out.to_local()), expected_local(G, mesh, (S1,)))
    else:
        ok = mesh.get_coordinate() is None and to_host(out.to_local()).size == 0
    ok = ok and tuple(out.shape) == G.shape and tuple(out.placements) == (S1,)
    assert_all(ok, f"rank {RANK} (on mesh: {on}): local {to_host(out.to_local()).shape}")


@pytest.mark.mpi(min_size=3)
def test_subset_mesh_partial():
    ranks = subset_ranks("first")
    mesh = DeviceMesh(DEVICE, ranks)
    G = global_array((5, 4), np.float64, seed=22)
    err = ""
    if RANK in ranks:
        try:
            local = partial_local(G, mesh, (Partial(),), "sum")
            dt = DTensor.from_local(local, mesh, [Partial()], shape=G.shape)
            out = dt.redistribute(mesh, [S0])
            if not np.array_equal(to_host(out.to_local()), expected_local(G, mesh, (S0,))):
                err = f"rank {RANK}: wrong values"
        except Exception as exc:  # noqa: BLE001
            err = f"rank {RANK}: {type(exc).__name__}: {exc}"
    assert_all(not err, err)



# ------------------------------------------------------------------------------------------------
# no output aliases its input (issue 9 item 5): PyTorch clones the R -> S slice; mpilocal copies it


ALIAS_1D = [S0, S1, R, Partial()]
ALIAS_2D = [(a, b) for a in (S0, S1, R, Partial()) for b in (S0, S1, R, Partial())]


def _alias_source(G, mesh, placements):
    if any(p.is_partial() for p in placements):
        return partial_dtensor(G, mesh, placements, "sum")
    return distribute_tensor(G, mesh, list(placements))


def _alias_pairs(kinds):
    out = []
    for src in kinds:
        for dst in kinds:
            src_t, dst_t = (src if isinstance(src, tuple) else (src,)), (dst if isinstance(dst, tuple) else (dst,))
            if src_t == dst_t:
                continue  # the same placements: the DTensor itself is returned (as PyTorch's, documented)
            if any(d.is_partial() and s != d for s, d in zip(src_t, dst_t)):
                continue  # redistributing to Partial is rejected
            out.append((src_t, dst_t))
    return out


def _check_no_alias(chk, G, mesh, src, dst):
    dt = _alias_source(G, mesh, src)
    before = to_host(dt.to_local()).copy()
    out = dt.redistribute(mesh, list(dst))
    a, b = dt.to_local(), out.to_local()
    xp = np if isinstance(a, np.ndarray) else __import__("cupy")
    chk(not xp.shares_memory(a, b), f"{list(src)} -> {list(dst)}: the result shares memory with the input")
    if b.size:
        b[...] = 12345  # writing into the result must leave the input (this rank's replica) alone
    chk(np.array_equal(to_host(dt.to_local()), before), f"{list(src)} -> {list(dst)}: writing the result "
                                                          f"changed the input")


@pytest.mark.parametrize("shape", [(8, 6), (7, 5)])
def test_redistribute_never_aliases_1d(shape):
    mesh = make_mesh("1d")
    G = global_array(shape, np.float64, seed=30)
    chk = Check()
    for src, dst in _alias_pairs(ALIAS_1D):
        _check_no_alias(chk, G, mesh, src, dst)
    chk.done()


@pytest.mark.parametrize("kind", ["2x2", "Nx1", "1xN"])
def test_redistribute_never_aliases_2d(kind):
    mesh = mesh_or_skip(kind)
    G = global_array((8, 6), np.float64, seed=31)
    chk = Check()
    for src, dst in _alias_pairs(ALIAS_2D):
        _check_no_alias(chk, G, mesh, src, dst)
    chk.done()


def test_documented_aliases():
    # from_local / to_local share memory (as in PyTorch); so do full_tensor() of an all-Replicate
    # DTensor and redistribute to the same placements (PyTorch returns the same local tensor there)
    mesh = make_mesh("1d")
    x = to_device(np.arange(12.0).reshape(4, 3))
    chk = Check()
    dt = DTensor.from_local(x, mesh, [R])
    chk(dt.to_local() is x, "from_local(...).to_local() is not the array passed in")
    chk(dt.full_tensor() is x, "full_tensor() of a Replicate DTensor is not its local array")
    chk(dt.redistribute(mesh, [R]) is dt, "redistribute to the same placements is not the DTensor itself")
    chk.done()


# ------------------------------------------------------------------------------------------------
# PyTorch parity (issue 8 item 4/5), ported by hand from test/distributed/tensor/test_redistribute.py


def test_replicate_to_replicate_forward_backward():
    mesh = make_mesh("1d")
    G = global_array((12, 3), np.float64, seed=40)
    chk = Check()
    rep = distribute_tensor(G, mesh, [R], requires_grad=True)
    with CommDebugMode() as comm:
        out = rep.redistribute(mesh, [R])
    chk(comm.get_total_counts() == 0, f"forward {comm.get_comm_counts()}")
    chk(out is not rep and out.requires_grad and not out.is_leaf, "R -> R with grad: a new DTensor with a grad_fn")
    chk(np.array_equal(to_host(out.detach().to_local()), G), "R -> R forward values")
    with CommDebugMode() as comm:
        out.backward(DTensor.from_local(to_device(np.ones((12, 3))), mesh, [R]))
    chk(comm.get_total_counts() == 0, f"backward {comm.get_comm_counts()}")
    chk(rep.grad.placements == (R,) and np.array_equal(to_host(rep.grad.to_local()), np.ones((12, 3))), "grad")
    chk.done()


def test_replicate_to_local_partial_grad():
    # PyTorch: replica.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()]) then
    # backward: the Partial gradient is all-reduced to Replicate (one all_reduce)
    mesh = make_mesh("1d")
    G = global_array((12, 3), np.float64, seed=41)
    chk = Check()
    rep = distribute_tensor(G, mesh, [R], requires_grad=True)
    with CommDebugMode() as comm:
        out = rep.redistribute(mesh, [R]).to_local(grad_placements=[Partial()])
        loss = out * to_device(np.full((12, 3), float(RANK + 1)))  # this rank's local contribution
        DTensor.from_local(loss, mesh, [Partial()]).full_tensor().sum().backward()
    counts = comm.get_comm_counts()
    want_n = 2 if W > 1 else 0  # a mesh dim of size 1 communicates nothing
    chk(counts.get("all_reduce", 0) == want_n, f"expected the loss's all_reduce and the gradient's, got {counts}")
    g = rep.grad
    want = np.full((12, 3), W * (W + 1) / 2.0)  # sum over ranks of (rank + 1)
    chk(g is not None and g.placements == (R,), f"grad placements {None if g is None else g.placements}")
    chk(g is not None and np.array_equal(to_host(g.to_local()), want), "grad values are not all-reduced")
    chk.done()


def test_replicate_to_local_partial_grad_counts():
    # the PyTorch test as is: out.backward(ones_like(out)) of the local (tracked) array
    mesh = make_mesh("1d")
    G = global_array((12, 3), np.float64, seed=42)
    chk = Check()
    rep = distribute_tensor(G, mesh, [R], requires_grad=True)
    with CommDebugMode() as comm:
        out = rep.redistribute(placements=[R]).to_local(grad_placements=[Partial()])
        out.backward(to_device(np.ones((12, 3))))
    n = 1 if W > 1 else 0
    chk(comm.get_total_counts() == n and comm.get_comm_counts().get("all_reduce", 0) == n,
        f"{comm.get_comm_counts()}")
    chk(rep.grad.placements == (R,) and np.array_equal(to_host(rep.grad.to_local()), np.full((12, 3), float(W))),
        f"grad {rep.grad.placements}")
    chk.done()


@pytest.mark.parametrize("fwd, bwd", [(np.float32, np.float32), (np.float32, None), (None, np.float32),
                                      (np.float32, np.float64), (None, None)], ids=str)
@pytest.mark.parametrize("src, dst", [((R,), (R,)), ((S0,), (R,)), ((S1,), (R,)), ((R,), (S0,))], ids=str)
def test_redistribute_forward_backward_dtype(src, dst, fwd, bwd):
    # ported: test_*_forward_backward_datatype_conversion. The forward result has forward_dtype; the
    # gradient is redistributed in backward_dtype and reaches the input in the input's dtype
    mesh = make_mesh("1d")
    for shape in [(W * 3, 3), (W * 3 + 1, 3), (3, W * 3 + 2)]:
        G = global_array(shape, np.float64, seed=43)
        chk = Check()
        dt = distribute_tensor(G, mesh, list(src), requires_grad=True)
        with CommDebugMode() as comm:
            out = dt.redistribute(mesh, list(dst), forward_dtype=fwd, backward_dtype=bwd)
        want_dtype = np.dtype(fwd) if fwd is not None else G.dtype
        chk(out.dtype == want_dtype, f"{src}->{dst} forward dtype {out.dtype} != {want_dtype}")
        chk.close(to_host(out.detach().full_tensor()), G.astype(want_dtype), f"{src}->{dst} values")
        chk(comm.get_total_counts() == (1 if src != dst and src[0].is_shard() and W > 1 else 0),
            f"{comm.get_comm_counts()}")
        g = DTensor.from_local(to_device(np.ones(out.to_local().shape, dtype=want_dtype)), mesh, list(dst),
                               shape=shape)
        with CommDebugMode() as comm:
            out.backward(g)
        grad = dt.grad
        chk(grad.placements == tuple(src), f"grad placements {grad.placements}")
        chk(grad.dtype == G.dtype, f"grad dtype {grad.dtype} != the input's {G.dtype}")
        chk(np.array_equal(to_host(grad.to_local()), np.ones(to_host(dt.detach().to_local()).shape)), "grad values")
        chk(comm.get_total_counts() == (1 if dst != src and dst[0].is_shard() and W > 1 else 0),
            f"backward {comm.get_comm_counts()}")
        chk.done()


def test_full_tensor_grad_placements():
    # PyTorch: full_tensor(grad_placements=[Partial()]) makes the gradient of the full tensor Partial,
    # so backward reduce-scatters it to the Shard input (each rank's local contribution summed)
    mesh = make_mesh("1d")
    G = global_array((2 * W + 1, 3), np.float64, seed=44)
    chk = Check()
    dt = distribute_tensor(G, mesh, [S0], requires_grad=True)
    full = dt.full_tensor(grad_placements=[Partial()])
    chk(np.array_equal(to_host(full.detach() if hasattr(full, "detach") else full), G), "full_tensor values")
    weight = to_device(np.full(G.shape, float(RANK + 1)))
    DTensor.from_local(full * weight, mesh, [Partial()]).full_tensor().sum().backward()
    want = np.full(G.shape, W * (W + 1) / 2.0)[local_slices(G.shape, mesh.shape, (S0,), tuple(mesh.get_coordinate()))]
    chk(dt.grad.placements == (S0,) and np.array_equal(to_host(dt.grad.to_local()), want), "grad")
    # without gradients: checked, the array returned
    plain = distribute_tensor(G, mesh, [S0])
    chk(np.array_equal(to_host(plain.full_tensor(grad_placements=[R])), G), "plain full_tensor(grad_placements)")
    chk.done()


@pytest.mark.mpi(min_size=3)
def test_off_mesh_ranks_report_global_shape_and_empty_local():
    # PyTorch (issue 8): on ranks outside a sub-mesh, from_local and redistribute give the global shape
    # and an empty local array, as distribute_tensor does
    ranks = list(range(0, W, 2))
    mesh = DeviceMesh(DEVICE, ranks)
    on = RANK in ranks
    k = len(ranks)
    G = global_array((3 * k, 4), np.float64, seed=45)
    chk = Check()
    local = to_device(np.ascontiguousarray(G[local_slices(G.shape, (k,), (S0,), (ranks.index(RANK),))]
                                           if on else G[:3]))
    a = DTensor.from_local(local, mesh, [S0])
    b = DTensor.from_local(local, mesh, [S0], shape=G.shape)
    c = DTensor.from_local(local, mesh, [S0], run_check=True)
    for name, dt in (("from_local", a), ("from_local(shape=)", b), ("from_local(run_check)", c)):
        chk(tuple(dt.shape) == G.shape, f"{name}: shape {dt.shape} on rank {RANK} (on mesh: {on})")
        chk(on or to_host(dt.to_local()).size == 0, f"{name}: off-mesh local {to_host(dt.to_local()).shape}")
        out = dt.redistribute(mesh, [R])
        chk(tuple(out.shape) == G.shape, f"{name}: redistribute shape {out.shape}")
        chk(np.array_equal(to_host(out.to_local()), G) if on else to_host(out.to_local()).size == 0,
            f"{name}: redistribute local {to_host(out.to_local()).shape}")
    chk.done()


SIZES_AND_DIM = [((W * 3, 3), 0), ((W * 3 + 1, 3), 0), ((W * 3 + 2, 3), 0), ((3, W * 3), 1), ((3, W * 3 + 1), 1),
                 ((3, W * 3 + 2), 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.complex64], ids=str)
def test_shard_to_replicate_forward_backward(dtype):
    mesh = make_mesh("1d")
    chk = Check()
    n = 1 if W > 1 else 0
    for size, dim in SIZES_AND_DIM:
        G = global_array(size, dtype, seed=50)
        dt = distribute_tensor(G, mesh, [Shard(dim)], requires_grad=True)
        with CommDebugMode() as comm:
            out = dt.redistribute(mesh, [R])
        chk(tuple(out.size()) == size and np.array_equal(to_host(out.detach().to_local()), G), f"{size} forward")
        chk(comm.get_comm_counts()["all_gather_into_tensor"] == n, f"{size} {dict(comm.get_comm_counts())}")
        with CommDebugMode() as comm:
            out.backward(DTensor.from_local(to_device(np.ones(size, dtype)), mesh, [R]))
        chk(dt.grad.placements == (Shard(dim),), f"grad placements {dt.grad.placements}")
        chk(np.array_equal(to_host(dt.grad.to_local()), np.ones(to_host(dt.detach().to_local()).shape, dtype)),
            f"{size} grad")
        chk(comm.get_total_counts() == 0, f"{size} backward {dict(comm.get_comm_counts())}")
    chk.done()


def test_replicate_to_shard_forward_backward():
    mesh = make_mesh("1d")
    chk = Check()
    n = 1 if W > 1 else 0
    for size, dim in SIZES_AND_DIM:
        G = global_array(size, np.float64, seed=51)
        rep = distribute_tensor(G, mesh, [R], requires_grad=True)
        with CommDebugMode() as comm:
            out = rep.redistribute(mesh, [Shard(dim)])
        chk(tuple(out.size()) == size and out.placements == (Shard(dim),), f"{size}")
        chk(np.array_equal(to_host(out.detach().to_local()), expected_local(G, mesh, (Shard(dim),))), f"{size} local")
        chk(comm.get_total_counts() == 0, f"{size} forward {dict(comm.get_comm_counts())}")
        grad = DTensor.from_local(to_device(np.ones(out.to_local().shape)), mesh, [Shard(dim)], shape=size)
        with CommDebugMode() as comm:
            out.backward(grad)
        chk(rep.grad.placements == (R,) and np.array_equal(to_host(rep.grad.to_local()), np.ones(size)), "grad")
        chk(comm.get_total_counts() == n and comm.get_comm_counts()["all_gather_into_tensor"] == n,
            f"{size} backward {dict(comm.get_comm_counts())}")
    chk.done()


@pytest.mark.parametrize("dtype", [np.float32, np.complex64], ids=str)
def test_partial_to_replicate_forward_backward(dtype):
    # from_local's backward passes a Replicate gradient through to a Partial input (no communication)
    mesh = make_mesh("1d")
    chk = Check()
    from mpilocal.autograd import Tracked

    partial_local = Tracked(to_device(np.ones((12, 3), dtype)), requires_grad=True)
    partial = DTensor.from_local(partial_local, mesh, [Partial()])
    with CommDebugMode() as comm:
        out = partial.redistribute(mesh, [R])
    chk(tuple(partial.size()) == (12, 3), f"{partial.size()}")
    chk(np.array_equal(to_host(out.detach().to_local()), np.full((12, 3), float(W), dtype)), "forward")
    chk(comm.get_comm_counts()["all_reduce"] == (1 if W > 1 else 0), f"{dict(comm.get_comm_counts())}")
    with CommDebugMode() as comm:
        out.backward(DTensor.from_local(to_device(np.ones((12, 3), dtype)), mesh, [R]))
    chk(partial_local.grad is not None and np.array_equal(to_host(partial_local.grad), np.ones((12, 3), dtype)),
        "grad of the Partial local")
    chk(comm.get_total_counts() == 0, f"backward {dict(comm.get_comm_counts())}")
    chk.done()


def test_partial_to_partial_forward_backward():
    mesh = make_mesh("1d")
    chk = Check()
    pt = distribute_tensor(to_device(np.ones((12, 3))), mesh, [Partial()], requires_grad=True)
    with CommDebugMode() as comm:
        out = pt.redistribute(mesh, [Partial()])
    chk(comm.get_total_counts() == 0 and np.array_equal(to_host(out.detach().to_local()),
                                                        to_host(pt.detach().to_local())), "forward")
    with CommDebugMode() as comm:
        out.backward(DTensor.from_local(to_device(np.ones((12, 3))), mesh, [Partial()]))
    # PyTorch keeps the Partial gradient here; mpilocal's gradient of a Partial placement is Replicate
    # (the exact gradient of a sum reaches every term), which costs one all_reduce of the Partial grad
    chk(pt.grad.placements == (R,), f"{pt.grad.placements}")
    chk(np.array_equal(to_host(pt.grad.to_local()), np.full((12, 3), float(W))), "grad values")
    chk.done()


# ------------------------------------------------------------------------------------------------
# a loop of redistributes: the compiled transition (mpilocal.redistribute) and its prepared steps
# (mpilocal.collectives.prepared: the transport's call made once, then pointers only) give each call
# its own data's result, for every kind of step and for inputs the steps do not prepare for
@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.bool_])
def test_a_loop_of_redistributes_gives_each_call_its_result(dtype):
    mesh = make_mesh("1d")
    if dtype == np.bool_:
        cases = [("S0->R", [S0], [R])]  # (a bool Partial's sum is OR: checked elsewhere)
    else:
        cases = [("S0->R", [S0], [R]), ("P->R", [Partial()], [R]), ("P->S0", [Partial()], [S0]),
                 ("S0->S1", [S0], [S1])]
    for name, src, dst in cases:
        for shape in [(4 * W, 3), (2 * W + 1, 5)]:  # equal shards (prepared) and uneven ones (generic)
            for it in range(4):
                G = global_array(shape, dtype, seed=it)
                if src[0].is_partial():  # rank 0 holds G, the others zeros: the sum is G
                    loc = G if RANK == 0 else np.zeros_like(G)
                    d = DTensor.from_local(to_device(loc), mesh, src, shape=shape)
                else:
                    d = distribute_tensor(to_device(G), mesh, src)
                if it == 3:  # a strided local array of the same shape: the prepared step falls back
                    loc = d.to_local()
                    wide = to_device(np.zeros((loc.shape[0], 2 * loc.shape[1]), dtype=loc.dtype))
                    wide[:, ::2] = loc
                    d = DTensor.from_local(wide[:, ::2], mesh, src, shape=shape)
                out = d.redistribute(mesh, dst)
                want = G[local_slices(shape, mesh.shape, tuple(dst), mesh.get_coordinate())]
                got = to_host(out.to_local())
                assert_all(on_device(out.to_local()) and got.dtype == G.dtype and np.array_equal(got, want),
                           f"{name} {shape} call {it}: {got.tolist()} != {want.tolist()}")
