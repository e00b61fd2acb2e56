"""Every dtype, every size, every rank (issues 8 and 17): NaN and inf in max/min, both byte orders,
overflowing narrow integers, float16 averages, 0-d and 64-D arrays, structured and masked arrays,
messages past MPI-3.1's int counts (with a small forced limit), mixed array kinds, and the checks of
the Partial redistribute path. NumPy on the full arrays is the oracle.

Runs on NumPy shards, and on CuPy shards through every GPU transport with
``MPILOCAL_TEST_DEVICE=cuda`` (``MPILOCAL_TRANSPORT=nccl|cuda_mpi|staged`` picks one).
"""

import numpy as np
import pytest
from conftest import RANK, W, DEVICE, Check, DeviceFunctional, assert_all, make_mesh, to_device, to_host
from mpi4py import MPI

import mpilocal.functional as _funcol
from mpilocal import DTensor, Partial, Replicate, Shard, distribute_tensor

pytestmark = pytest.mark.mpi

funcol = DeviceFunctional(_funcol) if DEVICE == "cuda" else _funcol
CPU_ONLY = pytest.mark.skipif(DEVICE != "cpu", reason="NumPy-only input (CuPy has no such arrays)")


def _per_rank(make):
    """Every rank's input (built alike everywhere from the rank number)."""
    return [make(r) for r in range(W)]


def _chunks(n):
    """torch.chunk's piece sizes of n over the world (ceil-sized pieces, the last ones shorter)."""
    c = -(-n // W)
    return [max(0, min(c, n - i * c)) for i in range(W)]


def _same_bits_or_nan(got, want):
    """Same dtype and shape, equal values, NaN exactly where NumPy has NaN (signs of zeros not compared)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    return bool(np.array_equal(got, want, equal_nan=True))


# ------------------------------------------------------------------------------------------------
# issue 17.1: NaN and inf in max/min, on every path
# ------------------------------------------------------------------------------------------------
SPECIALS = [np.nan, np.inf, -np.inf, 1.5, -2.0, 0.0, 7.0]


def _special_inputs(dtype, n=40):
    def make(r):
        rng = np.random.default_rng(100 + r)
        a = rng.choice(SPECIALS, n).astype(dtype)
        a[r % n] = np.nan  # a NaN on each rank, at different places
        a[(r + 3) % n] = 1.0 if r else np.nan  # [nan] on rank 0 against numbers elsewhere
        return a
    return _per_rank(make)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f8", "<f4"])
@pytest.mark.parametrize("op", ["max", "min"])
def test_all_reduce_max_min_propagate_nan(dtype, op):
    if DEVICE == "cuda" and not np.dtype(dtype).isnative:
        pytest.skip("CuPy arrays are native-order")
    xs = _special_inputs(dtype)
    ref = {"max": np.maximum, "min": np.minimum}[op].reduce(np.stack(xs), axis=0)
    ref = ref.astype(ref.dtype.newbyteorder("="))
    chk = Check()
    out = funcol.all_reduce(xs[RANK], op, MPI.COMM_WORLD)
    chk(_same_bits_or_nan(out, ref), f"all_reduce {op} {dtype}: {out} vs {ref}")
    counts = _chunks(len(ref))
    off = sum(counts[:RANK])
    rs = funcol.reduce_scatter_tensor(xs[RANK], op, 0, MPI.COMM_WORLD)
    chk(_same_bits_or_nan(rs, ref[off:off + counts[RANK]]), f"reduce_scatter {op} {dtype}: {rs}")
    # Partial(op) -> Replicate and -> Shard(0)
    mesh = make_mesh("1d")
    p = DTensor.from_local(to_device(xs[RANK]), mesh, [Partial(op)], shape=ref.shape)
    native = lambda a: a.astype(a.dtype.newbyteorder("="))  # noqa: E731 (one rank: no reduction runs)
    chk(_same_bits_or_nan(native(to_host(p.redistribute(mesh, [Replicate()]).to_local())), ref), f"Partial({op})->R")
    chk(_same_bits_or_nan(native(to_host(p.redistribute(mesh, [Shard(0)]).full_tensor())), ref), f"Partial({op})->S(0)")
    chk.done()


def test_nan_against_number_is_the_same_on_every_rank():
    """[nan] on rank 0 and [0] elsewhere: NaN on every rank (a Replicate result never differs)."""
    x = np.array([np.nan if RANK == 0 else 0.0])
    out = to_host(funcol.all_reduce(x, "max", MPI.COMM_WORLD))
    got = MPI.COMM_WORLD.allgather(bool(np.isnan(out[0])))
    assert_all(all(got), f"NaN on ranks {got}")


# ------------------------------------------------------------------------------------------------
# issue 17.2: non-native byte order reduces right and gives NumPy's (native) dtype
# ------------------------------------------------------------------------------------------------
@CPU_ONLY
@pytest.mark.parametrize("dtype", [">f8", ">i4", ">c16", ">f4", ">u2", ">i8"])
@pytest.mark.parametrize("op", ["sum", "product", "max", "min", "avg"])
def test_non_native_byte_order(dtype, op):
    dt = np.dtype(dtype)
    if dt.kind == "c" and op in ("max", "min") or dt.kind in "iu" and op == "avg":
        pytest.skip("refused for this dtype (tested elsewhere)")
    xs = _per_rank(lambda r: (np.arange(6) + 2 * r + 1).astype(dt) * (1 if dt.kind != "c" else 1 - 1j))
    stack = np.stack(xs)
    native = dt.newbyteorder("=")
    ref = stack.mean(axis=0).astype(native) if op == "avg" else \
        {"sum": np.add, "product": np.multiply, "max": np.maximum, "min": np.minimum}[op].reduce(
            stack.astype(native), axis=0, dtype=native)  # NumPy's elementwise result: native order
    chk = Check()
    out = funcol.all_reduce(xs[RANK], op, MPI.COMM_WORLD)
    chk(out.dtype == ref.dtype and out.dtype.isnative, f"dtype {out.dtype}, NumPy gives {ref.dtype}")
    chk.close(out, ref, f"all_reduce {op} {dtype}", rtol=1e-12)
    rs = funcol.reduce_scatter_tensor(np.tile(xs[RANK], W), op, 0, MPI.COMM_WORLD)
    chk.close(rs, ref, f"reduce_scatter {op} {dtype}", rtol=1e-12)
    chk.done()


@CPU_ONLY
def test_non_native_gather_keeps_dtype():
    x = np.arange(5, dtype=">f8") + RANK
    out = funcol.all_gather_tensor(x, 0, MPI.COMM_WORLD)
    ref = np.concatenate([np.arange(5, dtype=">f8") + r for r in range(W)])
    assert_all(out.dtype == ref.dtype and np.array_equal(out, ref), f"{out.dtype} {out}")


# ------------------------------------------------------------------------------------------------
# issue 17.4: narrow integer sums wrap as NumPy's on every MPI (Open MPI's AVX sums saturate)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16])
@pytest.mark.parametrize("op", ["sum", "product"])
def test_narrow_int_sums_wrap(dtype, op):
    info = np.iinfo(dtype)
    big = info.max - 5 if op == "sum" else 7
    xs = _per_rank(lambda r: np.full(64, big - r, dtype))  # >= 16 elements: the AVX loop
    ref = {"sum": np.add, "product": np.multiply}[op].reduce(np.stack(xs), axis=0, dtype=dtype)
    chk = Check()
    out = to_host(funcol.all_reduce(xs[RANK], op, MPI.COMM_WORLD))
    chk(out.dtype == ref.dtype and np.array_equal(out, ref),
        f"all_reduce {op} {np.dtype(dtype)}: {out[:3]} vs {ref[:3]}")
    rs = to_host(funcol.reduce_scatter_tensor(xs[RANK], op, 0, MPI.COMM_WORLD))
    sizes = _chunks(64)
    off = sum(sizes[:RANK])
    chk(np.array_equal(rs, ref[off:off + sizes[RANK]]), f"reduce_scatter {op}: {rs[:3]}")
    chk.done()


def test_uint8_200_plus_200():
    x = np.full(32, 200, np.uint8)
    out = to_host(funcol.all_reduce(x, "sum", MPI.COMM_WORLD))
    assert_all(np.all(out == np.uint8((200 * W) % 256)), f"{out[:4]}")


# ------------------------------------------------------------------------------------------------
# issue 17.5: 0-d arrays, 64-D arrays
# ------------------------------------------------------------------------------------------------
def test_zero_d_gather_and_reduce_scatter_raise_on_every_rank():
    x = np.array(float(RANK))
    for fn in (lambda: funcol.all_gather_tensor(x, 0, MPI.COMM_WORLD),
               lambda: funcol.reduce_scatter_tensor(x, "sum", 0, MPI.COMM_WORLD)):
        try:
            fn()
            err = "no error"
        except ValueError as e:
            err = "" if "0-d" in str(e) else f"unclear: {e}"
        assert_all(not err, err)
    out = to_host(funcol.all_reduce(x, "sum", MPI.COMM_WORLD))  # 0-d is fine where no dim is needed
    assert_all(out.shape == () and out == W * (W - 1) / 2, f"{out!r}")


def test_64d_gather_along_last_dim():
    shape = (1,) * 63 + (2,)
    x = np.arange(2.0).reshape(shape) + 10 * RANK
    out = to_host(funcol.all_gather_tensor(x, 63, MPI.COMM_WORLD))
    ref = np.concatenate([np.arange(2.0).reshape(shape) + 10 * r for r in range(W)], axis=63)
    assert_all(out.shape == ref.shape and np.array_equal(out, ref), f"{out.shape}")


# ------------------------------------------------------------------------------------------------
# issue 17.6: float16 avg
# ------------------------------------------------------------------------------------------------
def test_float16_avg_does_not_overflow():
    x = np.full(8, 60000, np.float16)
    x[1] = 1000 * (RANK + 1)
    xs = _per_rank(lambda r: np.where(np.arange(8) == 1, 1000 * (r + 1), 60000).astype(np.float16))
    ref = np.stack(xs).mean(axis=0)  # float16, summed in float32 by NumPy
    out = to_host(funcol.all_reduce(x, "avg", MPI.COMM_WORLD))
    assert_all(out.dtype == np.float16 and np.array_equal(out, ref), f"{out} vs {ref}")
    mesh = make_mesh("1d")
    p = DTensor.from_local(to_device(x), mesh, [Partial("avg")])
    got = to_host(p.redistribute(mesh, [Replicate()]).to_local())
    assert_all(np.array_equal(got, ref), f"Partial(avg): {got}")


# ------------------------------------------------------------------------------------------------
# issue 17.7 / 17.8: structured dtypes from the pool, masked arrays
# ------------------------------------------------------------------------------------------------
@CPU_ONLY
@pytest.mark.parametrize("dt", [
    np.dtype([("a", "i1"), ("b", "f8")], align=True),
    np.dtype({"names": ["b", "a"], "formats": ["f8", "i4"], "offsets": [8, 0], "itemsize": 16}),
])
def test_structured_dtypes_keep_their_dtype(dt):
    n = 40000  # 640 KB: the recycling pool's range
    full = np.zeros(n, dt)
    full["a"] = np.arange(n) % 100
    full["b"] = np.arange(n) * 0.5
    mesh = make_mesh("1d")
    d = distribute_tensor(full, mesh, [Shard(0)])
    out = d.full_tensor()
    chk = Check()
    chk(out.dtype == dt, f"full_tensor dtype {out.dtype} != {dt}")
    chk(np.array_equal(out["a"], full["a"]) and np.array_equal(out["b"], full["b"]), "values")
    g = funcol.all_gather_tensor(full[:n // 2], 0, MPI.COMM_WORLD)
    chk(g.dtype == dt, f"all_gather dtype {g.dtype}")
    chk.done()


@CPU_ONLY
def test_masked_arrays_are_refused():
    x = np.ma.array(np.arange(4.0), mask=[0, 1, 0, 0])
    for fn in (lambda: funcol.all_reduce(x, "sum", MPI.COMM_WORLD),
               lambda: funcol.all_gather_tensor(x, 0, MPI.COMM_WORLD)):
        try:
            fn()
            err = "no error"
        except TypeError as e:
            err = "" if "masked" in str(e) else f"unclear: {e}"
        assert_all(not err, err)


# ------------------------------------------------------------------------------------------------
# issue 17.9: sizes past the MPI count limit (a small forced limit exercises the same code)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_count_limit(monkeypatch):
    import mpilocal.transport as tr

    monkeypatch.setattr(tr, "_COUNT_LIMIT", 40)
    yield 40


def test_chunked_paths_match_numpy(small_count_limit):
    rng = np.random.default_rng(7)
    G = rng.standard_normal((13, 11))  # 8-byte elements: every message passes 40 bytes
    mesh = make_mesh("1d")
    chk = Check()
    for src in ([Shard(0)], [Shard(1)], [Replicate()]):
        d = distribute_tensor(G, mesh, src)  # scatter (Alltoallw) / slice
        for dst in ([Shard(0)], [Shard(1)], [Replicate()]):
            out = d.redistribute(mesh, dst)  # all-gather / all-to-all through Alltoallw
            chk(np.array_equal(to_host(out.full_tensor()), G), f"{src}->{dst}")
    xs = _per_rank(lambda r: (np.arange(50) * (r + 1)).astype(np.int64))
    chk(np.array_equal(funcol.all_reduce(xs[RANK], "sum", MPI.COMM_WORLD), sum(xs)), "all_reduce in pieces")
    rs = funcol.reduce_scatter_tensor(np.tile(xs[RANK], W), "max", 0, MPI.COMM_WORLD)
    chk(np.array_equal(rs, np.maximum.reduce(xs)), "reduce_scatter by rooted reduces")
    b = funcol.broadcast(np.arange(30.0) + RANK, W - 1, MPI.COMM_WORLD)
    chk(np.array_equal(b, np.arange(30.0) + W - 1), "broadcast in pieces")
    ins = [(RANK + p) % 3 + 5 for p in range(W)]
    x = np.concatenate([np.full(ins[p], 100 * RANK + p, np.float64) for p in range(W)])
    out = funcol.all_to_all_single(x, None, ins, MPI.COMM_WORLD)
    ref = np.concatenate([np.full((q + RANK) % 3 + 5, 100 * q + RANK, np.float64) for q in range(W)])
    chk(np.array_equal(out, ref), f"all_to_all_single uneven: {out} vs {ref}")
    chk.done()


# ------------------------------------------------------------------------------------------------
# issue 17.12: the Partial redistribute path checks what funcol checks, before any collective
# ------------------------------------------------------------------------------------------------
@CPU_ONLY
@pytest.mark.parametrize("dtype,op,funcol_call", [
    (np.int32, "avg", lambda x: funcol.all_reduce(x, "avg", MPI.COMM_WORLD)),
    (np.bool_, "avg", lambda x: funcol.all_reduce(x, "avg", MPI.COMM_WORLD)),
    (np.complex128, "max", lambda x: funcol.all_reduce(x, "max", MPI.COMM_WORLD)),
    ("U3", "sum", lambda x: funcol.all_reduce(x, "sum", MPI.COMM_WORLD)),
])
def test_partial_redistribute_checks_like_funcol(dtype, op, funcol_call):
    x = np.zeros(4, dtype)
    try:
        funcol_call(x)
        want = None
    except TypeError as e:
        want = str(e).split(": ", 1)[1]
    mesh = make_mesh("1d")
    p = DTensor.from_local(x, mesh, [Partial(op)])
    try:
        p.redistribute(mesh, [Replicate()])
        err = "no error"
    except TypeError as e:
        err = "" if want is not None and want in str(e) else f"differs from funcol ({want}): {e}"
    assert_all(want is not None and not err, err)


@CPU_ONLY
def test_object_and_string_arrays_in_gathers():
    from numpy.dtypes import StringDType

    mesh = make_mesh("1d")
    for x in (np.array([object()] * (2 * W), dtype=object), np.array(["ab"] * (2 * W), dtype=StringDType())):
        shape = (2 * W * W,)
        for fn in (lambda: funcol.all_gather_tensor(x, 0, MPI.COMM_WORLD),
                   lambda: DTensor.from_local(x, mesh, [Shard(0)], shape=shape).redistribute(mesh, [Replicate()])):
            try:
                fn()
                err = "no error"
            except TypeError as e:
                err = "" if "Python objects" in str(e) else f"unclear: {e}"
            assert_all(not err, f"{x.dtype}: {err}")


# ------------------------------------------------------------------------------------------------
# issue 8: arrays of different kinds across ranks; MPILOCAL_TRANSPORT checked
# ------------------------------------------------------------------------------------------------
def test_mixed_array_kinds_raise_on_every_rank():
    """The agreed metadata carries the array kind; a CuPy array on one rank and NumPy elsewhere is a
    TypeError on every rank (the kind bit is set by hand here: no GPU needed)."""
    from mpilocal import agreement
    from mpilocal.transport import group_for

    if W == 1:
        pytest.skip("needs 2 ranks")
    g = group_for(MPI.COMM_WORLD)
    from mpilocal import metadata

    vec = metadata.meta_vector((3,), np.float64, cupy=RANK == W - 1)
    rows = agreement.agree(g, "test", None, vec)
    try:
        metadata.check_same(rows, "all_reduce")
        err = "no error"
    except TypeError as e:
        err = "" if "NumPy" in str(e) and "CuPy" in str(e) else f"unclear: {e}"
    assert_all(not err, err)


def test_unknown_transport_name_fails_at_import(monkeypatch):
    import importlib

    import mpilocal.transport.select as sel

    monkeypatch.setenv("MPILOCAL_TRANSPORT", "bogus")
    try:
        with pytest.raises(ValueError, match="MPILOCAL_TRANSPORT='bogus'"):
            importlib.reload(sel)
    finally:
        monkeypatch.delenv("MPILOCAL_TRANSPORT")
        importlib.reload(sel)
