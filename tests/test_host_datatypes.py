"""Shard(i) -> Shard(j) on the host through MPI derived datatypes (issue 11): no Python pack copies.

The host transport's ``alltoall_dims`` describes each piece as a datatype over the input and the
result and moves it either in one ``MPI_Alltoallw`` ("types") or packed by ``MPI_Pack`` of those
types and moved contiguous ("pack", MPICH's default). Both modes are forced here on every MPI and
checked against NumPy on the full arrays: every (i, j) pair of 2-D and 3-D arrays, uneven shapes,
empty pieces, non-contiguous inputs, big-endian, bool, complex, structured dtypes, and messages
past a small forced count limit (the MPI-3.1 path of Open MPI 4.1).
"""

import math

import numpy as np
import pytest
from conftest import RANK, W, DEVICE, Check, make_mesh, rank0_only
from mpi4py import MPI

import mpilocal.transport as tr
from mpilocal import Replicate, Shard, distribute_tensor
from mpilocal import collectives
from mpilocal.transport import group_for, host

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(DEVICE != "cpu", reason="the host transport's datatypes: NumPy shards only")]

MODES = ("types", "pack")


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    monkeypatch.setattr(host, "_FORCE_MODE", [request.param])
    return request.param


def _chunks(n, k=W):
    """torch.chunk's piece sizes of n over k ranks (ceil-sized pieces, the last ones shorter or empty)."""
    c = -(-n // k) if n else 0
    return [max(0, min(c, n - i * c)) for i in range(k)]


def _piece(G, dim, sizes, r):
    off = sum(sizes[:r])
    idx = [slice(None)] * G.ndim
    idx[dim] = slice(off, off + sizes[r])
    return G[tuple(idx)]


def _global(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    n = math.prod(shape)
    if dt.kind == "b":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if dt.fields is not None:
        raw = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
        return raw.view(dt).reshape(shape)
    raw = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)  # any bits: NaN payloads, -0.0
    return raw.view(dt).reshape(shape)


def _same_bytes(got, want):
    got = np.asarray(got)
    return (got.dtype == want.dtype and got.shape == want.shape
            and np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes())


def _check_pairs(chk, G, g, label, noncontig=False):
    """Every (a, b) pair: this rank's Shard(a) piece of G -> its Shard(b) piece, bit for bit."""
    for a in range(G.ndim):
        for b in range(G.ndim):
            if a == b:
                continue
            src, dst = _chunks(G.shape[a]), _chunks(G.shape[b])
            x = _piece(G, a, src, RANK)
            if noncontig:  # the same values in a Fortran-ordered array (C-contiguous only when tiny)
                x = np.asfortranarray(x)
            want = _piece(G, b, dst, RANK)
            got = collectives.all_to_all_dims(x, a, b, g, src, dst)
            chk(_same_bytes(got, want),
                f"{label} S({a})->S({b}) shape {G.shape} {G.dtype}: {got.shape} vs {want.shape}")
            chk(got.flags.c_contiguous, f"{label} S({a})->S({b}): result not C-contiguous")


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "?", "<i2", ">c16", "u1", "f2"])
def test_every_pair_matches_numpy(mode, dtype):
    g = group_for(MPI.COMM_WORLD)
    chk = Check()
    for shape in [(2 * W + 1, 3 * W - 1), (W * 4, 5), (7, 3, 2 * W + 1), (W + 1, 2, W * 3), (3, W, 1, 2 * W)]:
        _check_pairs(chk, _global(shape, dtype, len(shape)), g, f"{mode} {dtype}")
    chk.done()


def test_empty_pieces_and_empty_arrays(mode):
    g = group_for(MPI.COMM_WORLD)
    chk = Check()
    # dims shorter than the world: some ranks hold nothing, some pieces are empty; zero-length dims
    for shape in [(1, 5), (5, 1), (1, 1, 3), (0, 4), (4, 0), (2, 0, 3), (W - 1 or 1, 2, 1)]:
        _check_pairs(chk, _global(shape, np.float64, 1), g, f"{mode} empty")
    chk.done()


def test_non_contiguous_inputs(mode):
    g = group_for(MPI.COMM_WORLD)
    chk = Check()
    for shape, dtype in [((2 * W + 1, 3, W + 2), "<f4"), ((W * 3, 2 * W + 1), ">i8"), ((5, W + 1, 3), "?")]:
        _check_pairs(chk, _global(shape, dtype, 3), g, f"{mode} fortran", noncontig=True)
    # a strided view (every other column) as the local shard
    G = _global((W * 2 + 1, 10, 3), "<f8", 4)
    for a, b in [(0, 1), (1, 0), (0, 2), (2, 1)]:
        src, dst = _chunks(G.shape[a]), _chunks(G.shape[b])
        big = np.zeros(tuple(2 * n for n in _piece(G, a, src, RANK).shape))
        view = big[::2, ::2, ::2]
        view[...] = _piece(G, a, src, RANK)
        got = collectives.all_to_all_dims(view, a, b, g, src, dst)
        chk(_same_bytes(got, _piece(G, b, dst, RANK)), f"{mode} strided view S({a})->S({b})")
    chk.done()


def test_structured_dtype_moves_as_bytes(mode):
    dt = np.dtype([("a", "<i2"), ("b", ">f8"), ("c", "u1")])  # 11 bytes, unaligned fields
    g = group_for(MPI.COMM_WORLD)
    chk = Check()
    _check_pairs(chk, _global((2 * W + 1, W + 2, 3), dt, 5), g, f"{mode} structured")
    chk.done()


def test_redistribute_through_meshes(mode):
    """The user path: DTensor.redistribute Shard(i) -> Shard(j) on 1-D and (at 4 ranks) 2-D meshes."""
    chk = Check()
    G = _global((2 * W + 3, W + 1, 5), ">f4", 6)
    for kind in ("1d", "2x2", "2x2_permuted"):
        mesh = make_mesh(kind)
        if mesh is None:
            continue
        nd = mesh.ndim
        for src, dst in ([(Shard(0),) * nd, (Shard(1),) * nd], [(Shard(2),) * nd, (Shard(0),) * nd],
                         [(Shard(1), Shard(2))[:nd], (Shard(2), Shard(1))[:nd]],
                         [(Shard(0), Replicate())[:nd], (Shard(2), Replicate())[:nd]]):
            d = distribute_tensor(G, mesh, list(src))
            out = d.redistribute(mesh, list(dst))
            ref = distribute_tensor(G, mesh, list(dst)).to_local()
            chk(_same_bytes(out.to_local(), ref), f"{mode} {kind} {src}->{dst}")
            chk(_same_bytes(out.full_tensor(), G), f"{mode} {kind} {src}->{dst} full")
    chk.done()


def test_past_the_count_limit(monkeypatch):
    """A small forced count limit (as MPI-3.1's int counts for > 2 GiB): runs longer than the limit
    and more runs than the limit are split inside the datatypes, still one MPI_Alltoallw."""
    monkeypatch.setattr(tr, "_COUNT_LIMIT", 40)
    splits = {"contig": 0, "outer": 0}
    real_contig, real_hv = host._contig, MPI.Datatype.Create_hvector

    def contig(n, base, limit, made):
        splits["contig"] += limit is not None and n > limit
        return real_contig(n, base, limit, made)

    monkeypatch.setattr(host, "_contig", contig)
    host._PLANS.clear()
    g = group_for(MPI.COMM_WORLD)
    chk = Check()
    chk(host.dims_mode(1 << 30) == "types", f"past the count limit: one MPI_Alltoallw, not {host.dims_mode(1 << 30)}")
    for shape, dtype in [((W * 50 + 3, 7), "<f8"), ((6, 45 * W + 1), "?"), ((W * 45, 3, 50), ">i4"),
                         ((50, W * 2, 45), "u1")]:
        G = _global(shape, dtype, 8)
        for a in range(G.ndim):
            for b in range(G.ndim):
                if a != b:
                    src, dst = _chunks(G.shape[a]), _chunks(G.shape[b])
                    send, _, _ = host.dims_pieces(_piece(G, a, src, RANK).shape, G.itemsize, a, b, src, dst, RANK)
                    splits["outer"] += any(pc[1] > 40 and pc[2] for pc in send)
        _check_pairs(chk, G, g, f"limit {dtype}")
    chk(splits["contig"] > 0 and splits["outer"] > 0, f"the limit was never passed: {splits}")
    host._PLANS.clear()
    chk.done()


def test_plans_are_cached_and_freed(monkeypatch, mode):
    monkeypatch.setattr(host, "_PLANS_MAX", 2)
    host._PLANS.clear()
    g = group_for(MPI.COMM_WORLD)
    chk = Check()
    G = _global((2 * W, 3 * W), "<f4", 9)
    collectives.all_to_all_dims(_piece(G, 0, _chunks(G.shape[0]), RANK), 0, 1, g, _chunks(G.shape[0]),
                                _chunks(G.shape[1]))
    first = next(iter(host._PLANS.values()))
    types = list(first.made)
    used = [t for t in (getattr(first, "send_types", None) or []) + (getattr(first, "recv_types", None) or [])
            if t != MPI.BYTE]  # types mode: the committed per-peer types
    if first.mode == "pack":
        used = [t for t in (first.pack, first.unpack) if t is not None]
        if first.own is not None and first.own[0] != "numpy":
            used.append(first.own[1])
    chk(types and used, f"the first plan made no datatypes ({first.mode})")
    collectives.all_to_all_dims(_piece(G, 0, _chunks(G.shape[0]), RANK), 0, 1, g, _chunks(G.shape[0]),
                                _chunks(G.shape[1]))
    chk(len(host._PLANS) == 1 and next(iter(host._PLANS.values())) is first, "the same shape did not reuse its plan")
    for shape in [(2 * W, 3 * W + 1), (2 * W + 1, 3 * W), (W, W, 2)]:
        H = _global(shape, "<f4", 9)
        src, dst = _chunks(shape[0]), _chunks(shape[1])
        collectives.all_to_all_dims(_piece(H, 0, src, RANK), 0, 1, g, src, dst)
    chk(len(host._PLANS) == 2, f"{len(host._PLANS)} plans kept, the bound is 2")
    chk(first.made == [] and all(t == MPI.DATATYPE_NULL for t in types), "an evicted plan's datatypes were not freed")
    chk(all(t == MPI.DATATYPE_NULL for t in used),
        f"{first.mode}: the committed datatypes of an evicted plan were not freed")
    host._PLANS.clear()
    chk.done()


@rank0_only
def test_unit_is_group_wide_and_divides_every_run():
    """The element unit comes from group-wide values only (the same whatever this rank's own size
    along the source dim) and divides every run of every rank's pieces, so the type signatures of
    any sender and receiver match."""
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(400):
        k = int(rng.integers(1, 6))
        nd = int(rng.integers(2, 5))
        full = [int(n) for n in rng.integers(0, 9, nd)]
        a, b = (int(v) for v in rng.choice(nd, 2, replace=False))
        itemsize = int(rng.choice([1, 2, 3, 4, 8, 16]))
        src = [int(v) for v in rng.integers(0, 5, k)]
        dst = _chunks(full[b], k)
        units = set()
        for r in range(k):
            shape = list(full)
            shape[a] = src[r]
            u = host.dims_unit(tuple(shape), itemsize, a, b, src, dst)
            units.add(u)
            send, recv, _ = host.dims_pieces(tuple(shape), itemsize, a, b, src, dst, r)
            for pc in send + recv:
                assert pc[2] % u == 0, (full, a, b, itemsize, src, dst, r, pc, u)
        assert len(units) == 1, (full, a, b, itemsize, src, dst, units)
        seen |= units
    assert seen == {1, 2, 4, 8}, seen


@rank0_only
def test_mode_choice_and_bound(monkeypatch):
    """The mode comes from the library, the count limit and the group-wide byte bound only, and the
    bound is the most bytes any rank sends or receives (checked against every rank's pieces)."""
    monkeypatch.setattr(host, "_FORCE_MODE", [None])
    big, small = host.PACK_FROM, host.PACK_FROM - 1
    cases = {  # (MPICH?, count limit, bound) -> mode
        (True, None, small): "pack", (True, None, big): "pack", (True, 2**31 - 1, small): "types",
        (False, None, small): "types", (False, None, big): "pack", (False, 2**31 - 1, big): "pack",
        (False, 2**31 - 1, 2**31): "types", (True, 2**31 - 1, 2**31): "types",
    }
    got = {}
    for (mpich, limit, bound), want in cases.items():
        monkeypatch.setattr(host, "_MPICH", mpich)
        monkeypatch.setattr(tr, "_COUNT_LIMIT", limit)
        got[(mpich, limit, bound)] = host.dims_mode(bound)
    assert got == cases, got
    rng = np.random.default_rng(5)
    for _ in range(300):
        k = int(rng.integers(1, 6))
        nd = int(rng.integers(2, 4))
        full = [int(n) for n in rng.integers(0, 7, nd)]
        a, b = (int(v) for v in rng.choice(nd, 2, replace=False))
        src = [int(v) for v in rng.integers(0, 5, k)]
        dst = [int(v) for v in rng.integers(0, 5, k)]
        full[b] = sum(dst)
        most = 0
        for r in range(k):
            shape = list(full)
            shape[a] = src[r]
            send, recv, _ = host.dims_pieces(tuple(shape), 4, a, b, src, dst, r)
            most = max(most, sum(pc[1] * pc[2] for pc in send), sum(pc[1] * pc[2] for pc in recv))
            assert host.dims_bound(tuple(shape), 4, a, b, src, dst) == host.dims_bound(tuple(full), 4, a, b, src, dst)
        assert host.dims_bound(tuple(full), 4, a, b, src, dst) == most, (full, a, b, src, dst, most)
