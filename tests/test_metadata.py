"""The shape agreement's fixed-size SUM (mpilocal.metadata): a recursive doubling over persistent
point-to-point requests, and the DTensors it builds (local_map outputs, from_local without shape=).

References: NumPy (the wrapping uint64 sum of every rank's vector; the full arrays the shards come
from), an independent simulation of the schedule (every rank ends with the total, every message is
received by the rank it is sent to, O(log P) messages per rank), and the errors the checks must
raise on every rank. Uneven and empty shards, non-power-of-two groups (3 ranks, and a 3-rank
sub-communicator at 4), 2-D meshes, many agreements in flight, and a rank that waits for a shape
while the others are already in a plain MPI call. Nothing here is timed.
"""

import math
from collections import deque

import numpy as np
import pytest
from mpi4py import MPI

from conftest import RANK, W, assert_all, raises_all, rank0_only
from mpilocal import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh, local_map, metadata
from mpilocal.layout import chunk_sizes
from mpilocal.transport import group_for


# ------------------------------------------------------------------------------------------------
# the schedule, simulated without MPI
# ------------------------------------------------------------------------------------------------
def _simulate(size, vectors):
    """Run every rank's rounds of :func:`metadata.sum_schedule` as the ring does (a round sends the
    running sum, then adds, or takes, what it receives), over FIFO channels; returns each rank's
    total and its number of messages (sent + received). A round whose message never comes leaves
    the simulation stuck: that fails."""
    rounds = [metadata.sum_schedule(size, r) for r in range(size)]
    acc = [v.copy() for v in vectors]
    step = [0] * size
    chan = {}
    sent = [0] * size
    msgs = [0] * size
    progress = True
    while progress:
        progress = False
        for r in range(size):
            while step[r] < len(rounds[r]):
                dst, src, mode = rounds[r][step[r]]
                if sent[r] <= step[r] and dst >= 0:  # the round's send goes out before its receive completes
                    chan.setdefault((r, dst), deque()).append(acc[r].copy())
                    msgs[r] += 1
                sent[r] = step[r] + 1
                if src >= 0:
                    q = chan.get((src, r))
                    if not q:
                        break  # wait for the partner
                    got = q.popleft()
                    msgs[r] += 1
                    with np.errstate(over="ignore"):
                        acc[r] = got if mode == metadata._SET else acc[r] + got
                step[r] += 1
                progress = True
    done = all(step[r] == len(rounds[r]) for r in range(size))
    leftover = sum(len(q) for q in chan.values())
    return acc, msgs, done, leftover


@rank0_only
@pytest.mark.parametrize("size", list(range(1, 18)) + [31, 32, 33, 48, 64, 100])
def test_schedule_sums_everywhere_with_log_messages(size):
    """Every rank ends with the wrapping sum of all vectors, no message is left unreceived, and a
    rank sends and receives at most 2 * (floor(log2 P) + 1) messages (O(log P), not O(P))."""
    rng = np.random.default_rng(size)
    vecs = [rng.integers(0, 2**64, 5, dtype=np.uint64, endpoint=False) for _ in range(size)]
    vecs[0][0] = np.uint64(2**64 - 1)  # wraps
    with np.errstate(over="ignore"):
        want = np.zeros(5, np.uint64)
        for v in vecs:
            want = want + v
    acc, msgs, done, leftover = _simulate(size, vecs)
    assert done and leftover == 0, f"P={size}: stuck ({done}) or {leftover} messages never received"
    assert all(np.array_equal(a, want) for a in acc), f"P={size}: ranks disagree on the sum"
    bound = 2 * (int(math.log2(size)) + 1) if size > 1 else 0
    assert max(msgs) <= bound, f"P={size}: {max(msgs)} messages on one rank, bound {bound}"
    if size > 1 and size & (size - 1) == 0:  # a power of two: exactly log2(P) exchanges per rank
        assert msgs == [2 * int(math.log2(size))] * size, msgs


@rank0_only
def test_schedule_partners_are_symmetric():
    """A round in which rank r sends to q is a round in which q receives from r (at the same depth
    of the doubling), for every group size up to 40."""
    for size in range(1, 41):
        for r in range(size):
            for dst, src, _ in metadata.sum_schedule(size, r):
                if dst >= 0:
                    assert any(s == r for _, s, _ in metadata.sum_schedule(size, dst)), (size, r, dst)
                if src >= 0:
                    assert any(d == r for d, _, _ in metadata.sum_schedule(size, src)), (size, r, src)


# ------------------------------------------------------------------------------------------------
# the SUM over MPI
# ------------------------------------------------------------------------------------------------
def _wrapping_sum(rows):
    with np.errstate(over="ignore"):
        out = np.zeros_like(rows[0])
        for r in rows:
            out = out + r
    return out


def _check_sums(comm, width, n_posts, rng_seed):
    g = group_for(comm)
    metadata.ensure_diag(g)
    rng = np.random.default_rng(rng_seed)
    size = comm.Get_size()
    # every rank draws every rank's vectors from the same seed, so it knows the exact total
    allv = rng.integers(0, 2**64, (n_posts, size, width), dtype=np.uint64, endpoint=False)
    allv[:, :, 0] = np.uint64(2**64 - 1)  # wraps on every post
    futs = [metadata.post_sum(g, allv[k, comm.Get_rank()]) for k in range(n_posts)]
    # complete out of posting order: the newest first, then the rest
    got = {}
    for k in [n_posts - 1] + list(range(n_posts - 1)):
        got[k] = futs[k].result().copy()
    bad = [k for k in range(n_posts) if not np.array_equal(got[k], _wrapping_sum(allv[k]))]
    return bad, futs


@pytest.mark.mpi
@pytest.mark.parametrize("width", [36, 38])
def test_sum_matches_numpy_with_many_in_flight(width):
    """More sums in flight than the ring has slots (K), completed out of order: each is the
    wrapping uint64 sum of that post's vectors on every rank; a second width replaces the ring."""
    bad, futs = _check_sums(MPI.COMM_WORLD, width, 3 * metadata.SumRing.K + 1, 7 + width)
    assert_all(not bad, f"wrong sums at posts {bad}")
    again = [f.result() for f in futs]  # result() is idempotent
    assert_all(all(a is b.result() for a, b in zip(again, futs)))


@pytest.mark.mpi
@pytest.mark.skipif(W < 4, reason="a 3-rank sub-communicator of 4 ranks")
def test_sum_on_a_non_power_of_two_subgroup():
    """Ranks 0..2 of 4 (non-power-of-two: rank 2 folds onto rank 0) sum correctly while rank 3
    sums on its own one-rank group."""
    sub = MPI.COMM_WORLD.Split(0 if RANK < 3 else 1, RANK)
    try:
        bad, _ = _check_sums(sub, 36, 2 * metadata.SumRing.K + 3, 11)
        assert_all(not bad, f"wrong sums at posts {bad} (group of {sub.Get_size()})")
    finally:
        from mpilocal import transport

        transport.release(sub)
        sub.Free()


# ------------------------------------------------------------------------------------------------
# DTensors built on it: uneven, empty, 2-D, errors on every rank, no hang
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh():
    return init_device_mesh("cpu", (W,))


@pytest.mark.mpi
@pytest.mark.parametrize("rows", [0, 1, W - 1, 2 * W + 1, 3 * W])
def test_local_map_uneven_and_empty_shards(mesh, rows):
    """Row counts that leave the last ranks short or empty (torch.chunk): the agreed global shape
    and the values are NumPy's, for a loop of calls whose local shapes repeat (the cached vector)
    and change (a new one)."""
    f = local_map(lambda a: a[:, ::-1] * 2, out_placements=[Shard(0)], in_placements=([Shard(0)],),
                  device_mesh=mesh)
    for n in (rows, rows + 1, rows):
        G = np.arange(n * 3, dtype=np.float64).reshape(n, 3) - 5
        d = distribute_tensor(G, mesh, [Shard(0)])
        ys = [f(d) for _ in range(metadata.SumRing.K + 2)]
        assert_all(all(y.shape == (n, 3) for y in ys), f"{[y.shape for y in ys]} != {(n, 3)}")
        assert_all(np.array_equal(ys[-1].full_tensor(), G[:, ::-1] * 2))


@pytest.mark.mpi
@pytest.mark.skipif(W != 4, reason="a 2 x 2 mesh")
@pytest.mark.parametrize("pl", [[Shard(0), Shard(1)], [Shard(0), Shard(0)], [Replicate(), Shard(1)],
                                [Shard(1), Shard(0)]])
def test_local_map_2d_mesh_uneven(pl):
    """A 2 x 2 mesh with 5 x 3 arrays (uneven along both dims): local_map's output shape and
    values are NumPy's for every layout."""
    m2 = init_device_mesh("cpu", (2, 2))
    G = np.arange(15.0).reshape(5, 3)
    d = distribute_tensor(G, m2, pl)
    f = local_map(lambda a: a + 1, out_placements=pl, in_placements=(pl,), device_mesh=m2)
    ys = [f(d) for _ in range(3)]
    assert_all(all(y.shape == (5, 3) for y in ys), f"{pl}: {[y.shape for y in ys]}")
    assert_all(np.array_equal(ys[0].full_tensor(), G + 1), f"{pl}")


def _bad_rows_on(rank, n):
    """Rows per rank of a chunk-valid split of n over W ranks, except one row more on ``rank`` (for
    rank 0 at W >= 2 that breaks the chunk rule; the sums of the others stay valid)."""
    rows = list(chunk_sizes(n, W))
    rows[rank] += 1
    return rows


@pytest.mark.mpi
@pytest.mark.skipif(W < 2, reason="one rank cannot disagree")
def test_wrong_local_shape_raises_on_every_rank_amid_good_calls(mesh):
    """Between good local_map calls (agreements in flight before and after it), one call whose
    output on rank 0 has a row too many: reading its shape raises the same ValueError on every
    rank, naming rank 0; the good calls around it keep their shapes and values."""
    n = 2 * W + 1
    G = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    d = distribute_tensor(G, mesh, [Shard(0)])
    good = local_map(lambda a: a * 3, out_placements=[Shard(0)], in_placements=([Shard(0)],), device_mesh=mesh)
    bad = local_map(lambda a: np.concatenate([a, a[:1] if len(a) else np.zeros((1, 2))]) if RANK == 0 else a,
                    out_placements=[Shard(0)], in_placements=([Shard(0)],), device_mesh=mesh)
    before = [good(d) for _ in range(3)]
    y = bad(d)
    after = [good(d) for _ in range(metadata.SumRing.K + 1)]
    raises_all(ValueError, r"local_map.*mesh rank 0", lambda: y.shape, same_text=True)
    raises_all(ValueError, r"local_map", lambda: y.shape, same_text=True)  # every later use raises again
    assert_all(all(z.shape == (n, 2) for z in before + after))
    assert_all(np.array_equal(after[-1].full_tensor(), G * 3) and np.array_equal(before[0].full_tensor(), G * 3))


@pytest.mark.mpi
@pytest.mark.skipif(W < 2, reason="one rank cannot disagree")
@pytest.mark.parametrize("what", ["dtype", "ndim", "unsharded", "rows"])
def test_from_local_mismatch_raises_on_every_rank(mesh, what):
    """from_local without shape=: the last rank passes another dtype, ndim, size along an unsharded
    dim, or (on rank 0) a row count off the chunk rule; every rank raises the same ValueError."""
    last = RANK == W - 1
    rows = _bad_rows_on(0, 2 * W + 1) if what == "rows" else list(chunk_sizes(2 * W + 1, W))
    shape = (rows[RANK], 3)
    if what == "ndim" and last:
        shape = (rows[RANK], 3, 1)
    if what == "unsharded" and last:
        shape = (rows[RANK], 4)
    dtype = np.float32 if what == "dtype" and last else np.float64
    d = DTensor.from_local(np.zeros(shape, dtype), mesh, [Shard(0)])
    raises_all(ValueError, r"DTensor\.from_local", lambda: d.shape, same_text=True)


@pytest.mark.mpi
@pytest.mark.skipif(W < 2, reason="needs another rank")
def test_waiting_for_a_shape_needs_no_call_from_the_others(mesh):
    """Rank 0 reads the shape of the newest local_map output while the other ranks are already in a
    plain MPI_Barrier (no mpilocal call): the agreement completes by MPI's own progress, never by
    another mpilocal call on the other ranks, so this does not hang (a doubling that ran its later
    rounds only inside result() would)."""
    n = 3 * W - 1
    G = np.ones((n, 2))
    d = distribute_tensor(G, mesh, [Shard(0)])
    f = local_map(lambda a: a - 1, out_placements=[Shard(0)], in_placements=([Shard(0)],), device_mesh=mesh)
    ys = [f(d) for _ in range(3)]
    seen = ys[-1].shape if RANK == 0 else None
    MPI.COMM_WORLD.Barrier()
    assert_all(RANK != 0 or seen == (n, 2), f"{seen}")
    assert_all(all(y.shape == (n, 2) for y in ys))


@pytest.mark.mpi
@pytest.mark.skipif(W < 2, reason="a 1-rank mesh shards nothing")
def test_one_agreement_per_call_fixed_bytes(mesh):
    """Each sharded local_map output is one shape agreement of the same bytes at any world size
    (docs/scaling.md), counted by CommDebugMode; Replicate outputs agree nothing."""
    from mpilocal import CommDebugMode

    d = distribute_tensor(np.ones((2 * W, 2)), mesh, [Shard(0)])
    r = distribute_tensor(np.ones((2, 2)), mesh, [Replicate()])
    fs = local_map(lambda a: a, out_placements=[Shard(0)], in_placements=([Shard(0)],), device_mesh=mesh)
    fr = local_map(lambda a: a, out_placements=[Replicate()], in_placements=([Replicate()],), device_mesh=mesh)
    with CommDebugMode() as mode:
        ys = [fs(d) for _ in range(5)] + [fr(r) for _ in range(5)]
        shapes = [y.shape for y in ys]
    want = (4 + 30 + 2 * mesh.ndim) * 8
    assert_all(dict(mode.get_metadata_counts()) == {"shape_agreement": 5}
               and dict(mode.get_metadata_bytes()) == {"shape_agreement": 5 * want}
               and mode.get_total_counts() == 0, f"{dict(mode.get_metadata_counts())}")
    assert_all(shapes == [(2 * W, 2)] * 5 + [(2, 2)] * 5)
