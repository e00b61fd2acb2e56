"""The shape agreement's fixed-size SUM (mpilocal.metadata.post_sum: a persistent point-to-point
exchange for 2 ranks, the library's non-blocking all-reduce for more) and the DTensors it builds
(local_map outputs, from_local without shape=).

References: NumPy (the wrapping uint64 sum of every rank's vector; the full arrays the shards come
from) and the errors the checks must raise on every rank. Uneven and empty shards, groups of 1, 2
and 3 ranks (sub-communicators of 3 and 4), 2-D meshes, many agreements in flight completed out of
order, and a rank that waits for a shape while the others are already in a plain MPI call.
Nothing here is timed.
"""

import numpy as np
import pytest
from mpi4py import MPI

from conftest import RANK, W, assert_all, raises_all
from mpilocal import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh, local_map, metadata
from mpilocal.layout import chunk_sizes
from mpilocal.transport import group_for


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
    """More sums in flight than the ring has slots, completed out of order: each is the wrapping
    uint64 sum of that post's vectors on every rank; a second width replaces the ring."""
    bad, futs = _check_sums(MPI.COMM_WORLD, width, 3 * metadata.PairRing.K + 1, 7 + width)
    assert_all(not bad, f"wrong sums at posts {bad}")
    again = [f.result() for f in futs]  # result() is idempotent
    assert_all(all(a is b.result() for a, b in zip(again, futs)))


@pytest.mark.mpi
@pytest.mark.skipif(W < 3, reason="sub-communicators of 2 and 1 (or 3) ranks")
def test_sum_on_subgroups():
    """The world split into a pair (the point-to-point exchange) and the rest (1 rank, or 2 at 4):
    each group sums its own vectors, concurrently; at 4 ranks also ranks 0..2 (3, the all-reduce)."""
    from mpilocal import transport

    splits = [[0 if RANK < 2 else 1]]
    if W == 4:
        splits.append([0 if RANK < 3 else 1])
    for (colour,) in splits:
        sub = MPI.COMM_WORLD.Split(colour, RANK)
        try:
            bad, _ = _check_sums(sub, 36, 2 * metadata.PairRing.K + 3, 11 + colour)
            assert_all(not bad, f"wrong sums at posts {bad} (group of {sub.Get_size()})")
        finally:
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
        ys = [f(d) for _ in range(metadata.PairRing.K + 2)]
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
    after = [good(d) for _ in range(metadata.PairRing.K + 1)]
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
    another mpilocal call on the other ranks, so this does not hang (an exchange that ran its
    rounds only when this rank calls in again would)."""
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
    from mpilocal import deadline

    # MPILOCAL_DEBUG=1 also checks that each Replicate output is the same on every rank
    extra = {"replicate_check": 5} if deadline.DEBUG else {}
    counts, nbytes = dict(mode.get_metadata_counts()), dict(mode.get_metadata_bytes())
    assert_all(counts == {"shape_agreement": 5, **extra} and nbytes.get("shape_agreement") == 5 * want
               and mode.get_total_counts() == 0, f"{counts} {nbytes}")
    assert_all(shapes == [(2 * W, 2)] * 5 + [(2, 2)] * 5)
