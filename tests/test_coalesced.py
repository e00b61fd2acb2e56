"""funcol's coalesced collectives (PyTorch's names and signatures): ``all_reduce_coalesced``,
``all_gather_into_tensor_coalesced``, ``reduce_scatter_tensor_coalesced``.

Oracle: NumPy on every rank's inputs (each rank's arrays come from a generator seeded by its group
rank, so every rank can rebuild all of them). Each call is ONE collective (per dtype, for reductions
of a mixed list), booked once by CommDebugMode under the coalesced name.

Run: ``mpiexec -n N python -m pytest --with-mpi tests/test_coalesced.py`` for N = 1, 2, 3, 4.
"""

import numpy as np
import pytest

import mpilocal.functional as funcol
from conftest import RANK, W, DEVICE, assert_all, make_mesh, to_device, to_host, raises_all
from mpilocal import CommDebugMode
from mpilocal.layout import chunk_sizes


def groups():
    """(id, group, its size, this rank's index in it): the world mesh, and a 2x2 mesh's dim 1 at 4 ranks."""
    out = [("1d", make_mesh("1d"), W, RANK)]
    m = make_mesh("2x2")
    if m is not None:
        out.append(("2x2:b", (m, "b"), 2, m.get_local_rank("b")))
    return out


GROUPS = groups()


def arrays(r, dtypes, shapes, special=True):
    """Group rank ``r``'s inputs: one array per (dtype, shape), with NaN/inf/overflowing values."""
    rng = np.random.default_rng(1000 + r)
    out = []
    for dt, shape in zip(dtypes, shapes):
        dt = np.dtype(dt)
        if dt.kind == "f":
            a = rng.standard_normal(shape).astype(dt)
            if special and a.size >= 3:
                a.flat[0] = np.inf if r % 2 else -np.inf
                if r == 1:
                    a.flat[2] = np.nan
        elif dt.kind == "c":
            a = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
        elif dt.kind == "b":
            a = rng.random(shape) < 0.5
        else:
            info = np.iinfo(dt)
            a = rng.integers(info.min // 2 if info.min else 0, info.max, size=shape, endpoint=True).astype(dt)
            if special and a.size:
                a.flat[0] = info.max  # sums overflow and must wrap, as in NumPy
        out.append(np.array(a, dtype=dt, order="C"))  # keeps 0-d arrays 0-d (ascontiguousarray would not)
    return out


def np_reduce(stack, op):
    if op == "sum":
        return np.sum(stack, axis=0, dtype=stack.dtype)
    if op == "product":
        return np.prod(stack, axis=0, dtype=stack.dtype)
    if op == "max":
        return np.maximum.reduce(stack, axis=0)
    if op == "min":
        return np.minimum.reduce(stack, axis=0)
    if op == "avg":
        return (np.sum(stack, axis=0) / len(stack)).astype(stack.dtype)
    raise AssertionError(op)


def same(a, b, dtype=None):
    """``a`` equals ``b`` in shape, values and dtype (``dtype`` when given: NumPy's concatenate makes
    byte order native, the gather keeps the input's)."""
    a, b = np.asarray(to_host(a)), np.asarray(b)
    if a.shape != b.shape or a.dtype != (b.dtype if dtype is None else np.dtype(dtype)):
        return False
    if a.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=1e-12 if a.dtype.itemsize >= 8 else 1e-5, equal_nan=True))
    return bool(np.array_equal(a, b))


def counted(mode):
    return {k: v for k, v in mode.get_comm_counts().items() if v}


SHAPES = [(5,), (2, 3), (), (0, 4), (3, 1, 2)]


@pytest.mark.mpi
@pytest.mark.parametrize("gid", [g[0] for g in GROUPS])
@pytest.mark.parametrize("op", ["sum", "max", "min", "product", "avg"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "int32", "uint8", "complex128"])
def test_all_reduce_coalesced_matches_numpy(gid, op, dtype):
    _, group, k, me = next(g for g in GROUPS if g[0] == gid)
    if (op in ("max", "min") and dtype.startswith("complex")) or (op == "avg" and dtype[0] in "iu"):
        pytest.skip(f"{op} of {dtype} is refused (tested below)")
    shapes = SHAPES + [(17,)]  # 17 elements: Open MPI 4.1's vector code path for narrow ints
    dts = [dtype] * len(shapes)
    mine = [to_device(a) for a in arrays(me, dts, shapes)]
    with CommDebugMode() as mode:
        out = funcol.all_reduce_coalesced(mine, op, group)
    assert_all(counted(mode) == {"all_reduce_coalesced": 1}, f"counts {counted(mode)}")
    everyone = [arrays(r, dts, shapes) for r in range(k)]
    ok = len(out) == len(shapes)
    for i in range(len(shapes)):
        want = np_reduce(np.stack([everyone[r][i] for r in range(k)]), op)
        ok = ok and same(out[i], want)
    assert_all(ok, f"{op} {dtype} on {gid}: {[to_host(o) for o in out]}")
    assert_all(all(same(a, b) for a, b in zip(mine, arrays(me, dts, shapes))), "inputs unchanged")


@pytest.mark.mpi
def test_all_reduce_coalesced_mixed_dtypes_one_collective_per_dtype():
    _, group, k, me = GROUPS[0]
    dts = ["float64", "int64", "float64", ">f8", "int64", "bool"]
    shapes = [(3,), (2, 2), (4,), (3,), (), (5,)]
    if DEVICE == "cuda":
        pytest.skip("CuPy has no big-endian arrays")
    mine = [to_device(a) for a in arrays(me, dts, shapes)]
    with CommDebugMode() as mode:
        out = funcol.all_reduce_coalesced(mine, "max", group)
    # float64, int64, >f8, bool: four dtypes, four collectives, in order of first appearance
    assert_all(counted(mode) == {"all_reduce_coalesced": 4}, f"counts {counted(mode)}")
    everyone = [arrays(r, dts, shapes) for r in range(k)]
    ok = True
    for i in range(len(shapes)):
        want = np.maximum.reduce(np.stack([everyone[r][i] for r in range(k)]), axis=0)
        ok = ok and np.array_equal(to_host(out[i]), want, equal_nan=want.dtype.kind == "f") \
            and to_host(out[i]).shape == shapes[i]
    assert_all(ok, f"mixed max: {out}")
    assert_all(np.dtype(out[3].dtype).isnative, "a big-endian input gives the native dtype, as NumPy's reductions")


@pytest.mark.mpi
@pytest.mark.parametrize("gid", [g[0] for g in GROUPS])
def test_all_gather_into_tensor_coalesced_matches_numpy(gid):
    _, group, k, me = next(g for g in GROUPS if g[0] == gid)
    dts = ["float64", "int8", "bool", "complex64", "float32", "uint16", "float64"]
    shapes = [(3,), (2, 5), (4,), (1, 2), (0, 3), (7,), (2, 1, 2)]
    if DEVICE == "cpu":
        dts.append(">i4")
        shapes.append((3, 2))
    mine = [to_device(a) for a in arrays(me, dts, shapes)]
    with CommDebugMode() as mode:
        out = funcol.all_gather_into_tensor_coalesced(mine, group)
    # bytes in one buffer: one collective whatever the dtypes
    assert_all(counted(mode) == {"all_gather_into_tensor_coalesced": 1}, f"counts {counted(mode)}")
    nbytes = sum(a.nbytes for a in arrays(me, dts, shapes))
    assert_all(mode.get_comm_bytes()["all_gather_into_tensor_coalesced"] == nbytes, f"{mode.get_comm_bytes()}")
    everyone = [arrays(r, dts, shapes) for r in range(k)]
    ok = len(out) == len(dts)
    for i in range(len(dts)):
        want = np.concatenate([everyone[r][i] for r in range(k)], axis=0)
        ok = ok and same(out[i], want, dts[i])
    assert_all(ok, f"gather on {gid}")


@pytest.mark.mpi
def test_all_gather_into_tensor_coalesced_structured_dtype():
    if DEVICE == "cuda":
        pytest.skip("structured dtypes are NumPy only")
    _, group, k, me = GROUPS[0]
    dt = np.dtype([("a", "i1"), ("b", "f8")], align=True)
    x = np.zeros(3, dt)
    x["a"], x["b"] = me, np.arange(3) + 0.5 * me
    out = funcol.all_gather_into_tensor_coalesced([x, np.full(2, me)], group)
    want = np.concatenate([np.array([(r, i + 0.5 * r) for i in range(3)], dt) for r in range(k)])
    assert_all(out[0].dtype == dt and np.array_equal(out[0], want), f"{out[0]!r}")
    assert_all(np.array_equal(out[1], np.repeat(np.arange(k), 2)))


@pytest.mark.mpi
@pytest.mark.parametrize("gid", [g[0] for g in GROUPS])
@pytest.mark.parametrize("op", ["sum", "max", "avg"])
def test_reduce_scatter_tensor_coalesced_matches_numpy(gid, op):
    _, group, k, me = next(g for g in GROUPS if g[0] == gid)
    dts = ["float64"] * 5
    shapes = [(2 * k + 1, 3), (4, 3 * k - 1), (1,), (k, 2, 2), (0, 2)]  # uneven pieces follow torch.chunk
    dims = [0, 1, 0, -1, 0]
    mine = [to_device(a) for a in arrays(me, dts, shapes)]
    with CommDebugMode() as mode:
        out = funcol.reduce_scatter_tensor_coalesced(mine, op, dims, group)
    assert_all(counted(mode) == {"reduce_scatter_tensor_coalesced": 1}, f"counts {counted(mode)}")
    everyone = [arrays(r, dts, shapes) for r in range(k)]
    ok = len(out) == len(shapes)
    for i, d in enumerate(dims):
        full = np_reduce(np.stack([everyone[r][i] for r in range(k)]), op)
        d = d % full.ndim
        sizes = chunk_sizes(full.shape[d], k)
        off = sum(sizes[:me])
        want = np.take(full, np.arange(off, off + sizes[me]), axis=d)
        ok = ok and same(out[i], want)
    assert_all(ok, f"reduce_scatter {op} on {gid}: {[to_host(o).shape for o in out]}")


@pytest.mark.mpi
def test_reduce_scatter_tensor_coalesced_mixed_dtypes_and_int_dim():
    _, group, k, me = GROUPS[0]
    dts = ["int32", "float32", "int32"]
    shapes = [(k, 2), (3 * k,), (2 * k + 1,)]
    mine = [to_device(a) for a in arrays(me, dts, shapes)]
    with CommDebugMode() as mode:
        out = funcol.reduce_scatter_tensor_coalesced(mine, "sum", 0, group)  # an int: the same dim for all
    assert_all(counted(mode) == {"reduce_scatter_tensor_coalesced": 2}, f"counts {counted(mode)}")
    everyone = [arrays(r, dts, shapes) for r in range(k)]
    ok = True
    for i in range(3):
        full = np_reduce(np.stack([everyone[r][i] for r in range(k)]), "sum")
        sizes = chunk_sizes(full.shape[0], k)
        off = sum(sizes[:me])
        ok = ok and same(out[i], full[off:off + sizes[me]])
    assert_all(ok, "mixed reduce_scatter")


@pytest.mark.mpi
def test_coalesced_empty_list_is_no_collective():
    _, group, _, _ = GROUPS[0]
    with CommDebugMode() as mode:
        assert funcol.all_reduce_coalesced([], "sum", group) == []
        assert funcol.all_gather_into_tensor_coalesced([], group) == []
        assert funcol.reduce_scatter_tensor_coalesced([], "sum", [], group) == []
    assert_all(mode.get_total_counts() == 0)


@pytest.mark.mpi
def test_coalesced_errors_on_every_rank():
    _, group, k, me = GROUPS[0]
    x = to_device(np.ones(4))
    if k > 1:
        n = 2 if me == 0 else 3  # rank-divergent list lengths
        raises_all(ValueError, "different list of arrays",
                   lambda: funcol.all_reduce_coalesced([x] * n, "sum", group))
    if k > 1:
        shape = (4,) if me == 0 else (5,)  # rank-divergent shapes
        raises_all(ValueError, "different list of arrays",
                   lambda: funcol.all_gather_into_tensor_coalesced([to_device(np.ones(shape))], group))
        op = "sum" if me == 0 else "max"
        raises_all(ValueError, "parameters", lambda: funcol.all_reduce_coalesced([x], op, group))
        dims = [0] if me == 0 else [-1]
        y = to_device(np.ones((2 * k, 2 * k)))
        raises_all(ValueError, "parameters", lambda: funcol.reduce_scatter_tensor_coalesced([y], "sum", dims, group))
        bad = "nope" if me == k - 1 else x  # one rank passes a non-array
        raises_all(TypeError, r"inputs\[1\] must be a NumPy or CuPy array",
                   lambda: funcol.all_reduce_coalesced([x, bad], "sum", group))
    raises_all(ValueError, "0-d array", lambda: funcol.all_gather_into_tensor_coalesced(
        [x, to_device(np.array(1.0))], group))
    raises_all(TypeError, "'avg' of int", lambda: funcol.all_reduce_coalesced(
        [to_device(np.ones(2, np.int64))], "avg", group))
    raises_all(TypeError, "complex", lambda: funcol.all_reduce_coalesced(
        [to_device(np.ones(2, np.complex128))], "max", group))
    raises_all(ValueError, "one dim per array", lambda: funcol.reduce_scatter_tensor_coalesced(
        [x, x], "sum", [0], group))
    raises_all(TypeError, "must be a list", lambda: funcol.all_reduce_coalesced(x, "sum", group))
    if DEVICE == "cpu":
        raises_all(TypeError, "Python objects", lambda: funcol.all_gather_into_tensor_coalesced(
            [np.array([None, 1], dtype=object)], group))


@pytest.mark.mpi
def test_coalesced_refuse_autograd():
    import mpilocal
    from mpilocal import Replicate, distribute_tensor, local_map

    mesh = make_mesh("1d")
    w = distribute_tensor(to_device(np.ones(3)), mesh, [Replicate()], requires_grad=True)

    def f(a):
        return funcol.all_reduce_coalesced([a], "sum", mesh)[0]

    g = local_map(f, out_placements=[Replicate()], in_placements=([Replicate()],))
    raises_all(NotImplementedError, "not differentiable.*all_reduce once per array", lambda: g(w))
    assert mpilocal  # imported for the local_map/autograd machinery


@pytest.mark.mpi
def test_funcol_given_a_dtensor_says_to_local():
    """Issue 9: funcol.all_reduce(DTensor) suggested numpy.asarray(...) (which raises) and cut the repr
    mid-word. The hint is .to_local(); the repr is cut at a word boundary."""
    from mpilocal import Shard, distribute_tensor

    _, group, _, _ = GROUPS[0]
    d = distribute_tensor(to_device(np.arange(100.0 * W).reshape(10 * W, 10)), make_mesh("1d"), [Shard(0)])
    for call in (lambda: funcol.all_reduce(d, "sum", group), lambda: funcol.all_gather_tensor(d, 0, group),
                 lambda: funcol.all_reduce_coalesced([d], "sum", group)):
        with pytest.raises(TypeError) as info:
            call()
        text = str(info.value)
        assert ".to_local()" in text and "numpy.asarray" not in text, text
        shown = text.split("got DTensor (", 1)[1].split("); ", 1)[0]
        assert shown.endswith(" ...") and shown[:-4] == repr(d)[:len(shown) - 4], shown
        assert repr(d)[len(shown) - 4] in " ,(=", f"cut mid-word: {shown!r}"
    with pytest.raises(TypeError, match=r"got list \(\[0, 1, 2, .* \.\.\.\); convert it with numpy.asarray"):
        funcol.all_reduce(list(range(100)), "sum", group)
