"""The lean hot path (issue 11): the public collectives' speculative argument signature, and
metadata whose size per rank does not depend on the world size.

The default argument check of ``mpilocal.functional`` is one fixed-size non-blocking reduction per
call (``"signature"`` in CommDebugMode's metadata), completed after the data collective of a call
that repeats the agreed pattern; a rank with other arguments (or failed checks) makes every rank
fall back to the full agreement, so the error is raised on every rank and no rank is left in a
data collective. These tests drive that protocol through its branches: the fast path, a divergence
after a fast history (shape, dtype, op, invalid argument on one rank), valid rank-varying sizes
after a fast history, alternating call patterns. Nothing here is timed.
"""

import numpy as np
import pytest

import mpilocal.functional as funcol
from conftest import RANK, W, assert_all, raises_all
from mpilocal import CommDebugMode, agreement, init_device_mesh

LAST = W - 1
SIG_BYTES = 48  # [h, -h] fast, [h, -h] slow, -slow, -error: six int64, whatever the world size


def on_last(bad, good):
    return bad if RANK == LAST else good


signature_path = pytest.mark.skipif(not agreement.signature_checks(), reason="MPILOCAL_DEBUG=1 or MPILOCAL_CHECK_ARGS=0: "
                                    "not the signature path (the full agreement, or none, on every call)")


@pytest.fixture(scope="module")
def mesh():
    return init_device_mesh("cpu", (W,))


def _warm(mesh, x, n=4):
    for _ in range(n):
        out = funcol.all_reduce(x, "sum", mesh)
        assert_all(np.array_equal(out, x * W), f"all_reduce gave {out}")


@pytest.mark.mpi
@signature_path
def test_steady_state_is_one_fixed_size_signature_per_call(mesh):
    """Once a call repeats, each public call exchanges only the fixed-size signature
    (48 bytes per rank at any world size; nothing at 1 rank), and the results stay exact."""
    x = np.arange(12.0).reshape(3, 4) + RANK
    calls = {
        "all_reduce": (lambda: funcol.all_reduce(x, "max", mesh), lambda: np.arange(12.0).reshape(3, 4) + LAST),
        "all_gather_tensor": (lambda: funcol.all_gather_tensor(x, 1, mesh),
                              lambda: np.concatenate([np.arange(12.0).reshape(3, 4) + r for r in range(W)], 1)),
        "broadcast": (lambda: funcol.broadcast(x, 0, mesh), lambda: np.arange(12.0).reshape(3, 4)),
        "all_to_all_single": (lambda: funcol.all_to_all_single(np.repeat(np.arange(W, dtype=float), 2) + 10 * RANK,
                                                               None, None, mesh),
                              lambda: np.array([RANK + 10.0 * r for r in range(W) for _ in range(2)])),
    }
    for name, (call, ref) in calls.items():
        for _ in range(3):  # the pattern is agreed (a run of the call, whatever came before in the session)
            call()
        before = agreement.SIG_STATS["fast"]
        with CommDebugMode() as mode:
            for _ in range(3):
                out = call()
                assert_all(np.array_equal(out, ref()), f"{name}: {out} vs {ref()}")
        meta, nbytes = dict(mode.get_metadata_counts()), dict(mode.get_metadata_bytes())
        want = {} if W == 1 else {"signature": 3}
        assert_all(meta == want, f"{name}: metadata {meta}, expected {want}")
        assert_all(nbytes == ({} if W == 1 else {"signature": 3 * SIG_BYTES}), f"{name}: metadata bytes {nbytes}")
        assert_all(agreement.SIG_STATS["fast"] - before == (0 if W == 1 else 3), f"{name}: not on the fast path")


@pytest.mark.mpi
@signature_path
def test_alternating_patterns_stay_on_the_fast_path(mesh):
    """A loop that alternates calls (two shapes, two functions) is predicted from the agreed history:
    after one round only signatures are exchanged."""
    a, b = np.ones(5) * (RANK + 1), np.ones((2, 3), np.float32)
    for _ in range(3):
        funcol.all_reduce(a, "sum", mesh)
        funcol.all_gather_tensor(b, 0, mesh)
    before = dict(agreement.SIG_STATS)
    with CommDebugMode() as mode:
        for _ in range(3):
            ra = funcol.all_reduce(a, "sum", mesh)
            rb = funcol.all_gather_tensor(b, 0, mesh)
            assert_all(np.array_equal(ra, np.ones(5) * W * (W + 1) / 2) and rb.shape == (2 * W, 3))
    meta = dict(mode.get_metadata_counts())
    assert_all(meta == ({} if W == 1 else {"signature": 6}), f"metadata {meta}")
    fast = {k: agreement.SIG_STATS[k] - before[k] for k in before}
    assert_all(fast == ({"fast": 0, "agreed": 0, "diagnose": 0} if W == 1 else {"fast": 6, "agreed": 0, "diagnose": 0}),
               f"outcomes {fast}: every call after the first round should take the fast path")


DIVERGENT = [
    ("shape", lambda x, m: funcol.all_reduce(on_last(np.ones((3, 7)), x), "sum", m), ValueError, "shape"),
    ("dtype", lambda x, m: funcol.all_reduce(on_last(x.astype(np.float32), x), "sum", m), ValueError, "dtype"),
    ("valid ops", lambda x, m: funcol.all_reduce(x, on_last("max", "sum"), m), ValueError, "reduceOp"),
    ("invalid op", lambda x, m: funcol.all_reduce(x, on_last("bogus", "sum"), m), ValueError, "bogus"),
    ("not an array", lambda x, m: funcol.all_reduce(on_last([1.0], x), "sum", m), TypeError, None),
    ("other function", lambda x, m: (funcol.broadcast(x, 0, m) if RANK == LAST else funcol.all_reduce(x, "sum", m)),
     (ValueError, agreement.CollectiveMismatchError), None),  # the latter: MPILOCAL_DEBUG=1's fingerprints
]


@pytest.mark.mpi
@pytest.mark.skipif(W < 2, reason="needs 2 ranks to diverge")
@pytest.mark.parametrize("case", DIVERGENT, ids=[c[0] for c in DIVERGENT])
def test_divergence_after_a_fast_history_raises_everywhere(mesh, case):
    """The other ranks are already in their data collective (the predicted one) when the last rank
    passes something else: it replays that collective, then every rank raises the same error type,
    and the next call is correct again."""
    _, call, exc, match = case
    x = np.arange(14.0).reshape(2, 7)
    _warm(mesh, x)
    raises_all(exc, match, call, x, mesh)
    _warm(mesh, x, 2)


@pytest.mark.mpi
@pytest.mark.skipif(W < 2, reason="needs 2 ranks to diverge")
def test_divergent_all_to_all_after_a_fast_history(mesh):
    x = np.arange(4.0 * W)
    for _ in range(3):
        funcol.all_to_all_single(x, None, None, mesh)
    raises_all(ValueError, None, lambda: funcol.all_to_all_single(on_last(np.ones(4 * W, np.float32), x), None,
                                                                   None, mesh))
    out = funcol.all_to_all_single(x + RANK, None, None, mesh)
    ref = np.concatenate([np.arange(4.0 * W)[4 * RANK:4 * RANK + 4] + r for r in range(W)])
    assert_all(np.array_equal(out, ref), f"{out} vs {ref}")


@pytest.mark.mpi
def test_rank_varying_sizes_after_a_fast_history(mesh):
    """Valid: all_gather_tensor with sizes along the gather dim that differ between ranks, right
    after equal-size calls were agreed (the fast ranks' speculative collective is discarded)."""
    eq = np.ones((2, 3))
    for _ in range(3):
        funcol.all_gather_tensor(eq, 0, mesh)
    parts = [np.full((r % 3, 3), float(r)) for r in range(W)]
    for _ in range(2):
        out = funcol.all_gather_tensor(parts[RANK], 0, mesh)
        assert_all(np.array_equal(out, np.concatenate(parts, 0)), f"{out}")
    out = funcol.all_gather_tensor(eq * RANK, 0, mesh)
    assert_all(np.array_equal(out, np.concatenate([eq * r for r in range(W)], 0)))


@pytest.mark.mpi
@pytest.mark.skipif(W < 2, reason="needs 2 ranks to diverge")
def test_error_on_first_call_of_a_group():
    """No history yet (a fresh group): every rank is slow, the error is found by the full agreement."""
    m = init_device_mesh("cpu", (W,))
    sub = m.get_group(0).Dup()
    try:
        raises_all(ValueError, "bogus", lambda: funcol.all_reduce(np.ones(3), on_last("bogus", "sum"), sub))
        out = funcol.all_reduce(np.ones(3), "sum", sub)
        assert_all(np.array_equal(out, np.full(3, float(W))))
    finally:
        from mpilocal import transport

        transport.release(sub)
        sub.Free()


# ------------------------------------------------------------------------------------------------
# Shard(i) -> Shard(j) on the CPU: the pieces are packed with one strided copy (bit-exact)
# ------------------------------------------------------------------------------------------------
def _special(shape, dtype):
    """An array of ``shape`` whose values include NaN with payloads, -0.0, inf and extremes."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = (np.arange(n * dt.itemsize, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
    a = raw.view(dt).reshape(shape).copy() if dt.fields is None else raw.view(dt).reshape(shape).copy()
    if dt.kind == "f" and n >= 4:
        flat = a.reshape(-1)
        flat[0], flat[1], flat[2] = -0.0, np.inf, np.nan
        flat[3:4].view(np.uint8)[:] = 0xFF  # a NaN with a payload (all bits set)
    return a


SS_CASES = [((12, 7), 0, 1, np.float64), ((7, 12), 1, 0, np.float32), ((10, 9, 3), 0, 1, np.int8),
            ((5, 4, 11), 0, 2, np.complex128), ((9, 10), 0, 1, np.dtype([("a", "<i2"), ("b", "<f8")])),
            ((6, 2, 5), 2, 0, np.float16), ((8, 0, 3), 0, 2, np.float64), ((3 * 4, 16), 0, 1, np.uint64)]


@pytest.mark.mpi
@pytest.mark.parametrize("case", SS_CASES, ids=[f"{c[0]}:S{c[1]}->S{c[2]}:{np.dtype(c[3]).str}" for c in SS_CASES])
def test_shard_to_shard_bit_exact(mesh, case):
    """S(i) -> S(j) gives exactly the bytes of the NumPy slice of the global array (uneven splits,
    NaN payloads, -0.0, structured and narrow dtypes, empty dims), and back."""
    from mpilocal import Shard, distribute_tensor
    from mpilocal.layout import local_slices

    shape, i, j, dt = case
    G = _special(shape, dt)
    d = distribute_tensor(G, mesh, [Shard(i)])
    e = d.redistribute(mesh, [Shard(j)])
    want = G[local_slices(shape, (W,), (Shard(j),), (RANK,))]
    got = e.to_local()
    assert_all(got.dtype == G.dtype and got.shape == want.shape and got.tobytes() == np.ascontiguousarray(want).tobytes(),
               f"S{i}->S{j} {shape} {G.dtype}: {got.shape} vs {want.shape}")
    back = e.redistribute(mesh, [Shard(i)]).to_local()
    assert_all(back.tobytes() == np.ascontiguousarray(G[local_slices(shape, (W,), (Shard(i),), (RANK,))]).tobytes())


# ------------------------------------------------------------------------------------------------
# shape agreement: fixed-size metadata, whatever the world size
# ------------------------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.skipif(W < 2, reason="a 1-rank mesh shards nothing: no agreement")
def test_shape_agreement_bytes_do_not_grow_with_the_world(mesh):
    """from_local without shape= (and local_map outputs) agree on one fixed-width vector: what a rank
    sends and what it receives is (4 + 30 + 2 * mesh.ndim) * 8 bytes at any number of ranks (it was
    66 int64 per rank of the mesh, received by every rank)."""
    from mpilocal import DTensor, Shard, local_map

    from mpilocal.layout import chunk_sizes

    want = (4 + 30 + 2 * mesh.ndim) * 8
    rows = list(chunk_sizes(2 * W + 1, W))
    x = np.ones((rows[RANK], 3))
    with CommDebugMode() as mode:
        d = DTensor.from_local(x, mesh, [Shard(0)])
        f = local_map(lambda a: a * 2, out_placements=[Shard(0)], in_placements=([Shard(0)],), device_mesh=mesh)
        y = f(d)
    sent = dict(mode.get_metadata_bytes())
    received = [d._future.fut.result().nbytes, y._future.fut.result().nbytes]
    assert_all(sent == {"shape_agreement": 2 * want} and received == [want, want], f"sent {sent}, received {received}")
    assert_all(d.shape == (sum(rows), 3) and y.shape == (sum(rows), 3), f"{d.shape} {y.shape}")


@pytest.mark.mpi
@pytest.mark.skipif(W != 4, reason="a 2 x 2 mesh")
def test_shape_agreement_2d_lines_that_differ():
    """Each column of a 2 x 2 mesh holds a chunk-valid split, but of different totals (6 and 4 rows):
    not one DTensor. Every rank raises the same error; valid 2-D layouts still agree."""
    from mpilocal import DTensor, Replicate, Shard, distribute_tensor
    from conftest import raises_all as _raises_all

    m2 = init_device_mesh("cpu", (2, 2))
    col = m2._coordinate[1]
    x = np.ones((3 if col == 0 else 2, 4))
    d = DTensor.from_local(x, m2, [Shard(0), Replicate()])
    _raises_all(ValueError, r"DTensor\.from_local", lambda: d.shape, same_text=True)
    G = np.arange(7.0 * 5).reshape(7, 5)
    for pl in ([Shard(0), Shard(1)], [Shard(0), Shard(0)], [Replicate(), Shard(1)], [Shard(1), Shard(0)]):
        ref = distribute_tensor(G, m2, pl)
        e = DTensor.from_local(ref.to_local(), m2, pl)
        assert_all(e.shape == G.shape and np.array_equal(e.full_tensor(), G), f"{pl}: {e.shape}")


@pytest.mark.mpi
@signature_path
@pytest.mark.skipif(W < 2, reason="no signature at 1 rank")
def test_cycles_and_runs_are_predicted(mesh):
    """A cycle with a repeated call (A, A, B) and a run after another history are predicted from
    the agreed history: after two rounds every call takes the fast path, results exact."""
    a, b = np.arange(3.0) + RANK, np.arange(4.0) + RANK
    ra, rb = np.arange(3.0) * W + W * (W - 1) / 2, np.arange(4.0) * W + W * (W - 1) / 2
    for _ in range(2):
        funcol.all_reduce(a, "sum", mesh), funcol.all_reduce(a, "sum", mesh), funcol.all_reduce(b, "sum", mesh)
    before = agreement.SIG_STATS["fast"]
    for _ in range(3):
        out = [funcol.all_reduce(a, "sum", mesh), funcol.all_reduce(a, "sum", mesh), funcol.all_reduce(b, "sum", mesh)]
        assert_all(all(np.array_equal(o, r) for o, r in zip(out, (ra, ra, rb))))
    assert_all(agreement.SIG_STATS["fast"] - before == 9, f"{agreement.SIG_STATS['fast'] - before} of 9 fast")
