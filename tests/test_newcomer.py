"""A newcomer's natural mistakes with DTensors (issue 9, with issue 8's parity items that belong here):
each one that cannot give a right answer raises a clear error on every rank instead of a silently
wrong result or a hang. Oracles: NumPy on the full arrays; PyTorch DTensor's documented semantics.

    mpiexec -n 4 python -m pytest --with-mpi -q tests/test_newcomer.py
"""

import copy

import numpy as np
import pytest
from conftest import RANK, W, assert_all, make_mesh, to_device, to_host, raises_all

from mpilocal import DTensor, Partial, Replicate, Shard, distribute_tensor, local_map, local_shape_and_offset
from mpilocal.layout import chunk_sizes

LAST = W - 1

pytestmark = pytest.mark.mpi


def block_sizes(n, p):
    """The standard MPI block split: rank r holds n // p + (r < n % p) rows."""
    return [n // p + (r < n % p) for r in range(p)]


# ------------------------------------------------------------------------------------------------
# 1. from_local with the MPI block split: a clear error on every rank, never a wrong full_tensor()


@pytest.mark.parametrize("use", ["shape", "full_tensor", "redistribute", "repr-then-full_tensor"])
def test_block_split_from_local_raises_everywhere(use):
    n = 10
    mesh = make_mesh("1d")
    rows = block_sizes(n, W)
    off = sum(rows[:RANK])
    x = to_device(np.arange(off, off + rows[RANK], dtype=np.float64))
    dt = DTensor.from_local(x, mesh, [Shard(0)])
    if rows == list(chunk_sizes(n, W)):  # at 1 and 2 ranks the block split is the chunk split: it works
        assert_all(np.array_equal(to_host(dt.full_tensor()), np.arange(n, dtype=np.float64)))
        return
    act = {"shape": lambda: dt.shape, "full_tensor": dt.full_tensor,
           "redistribute": lambda: dt.redistribute(mesh, [Replicate()]),
           "repr-then-full_tensor": lambda: (repr(dt), dt.full_tensor())}[use]
    bad = next(r for r in range(W) if rows[r] != chunk_sizes(n, W)[r])
    msg = str(raises_all(ValueError, rf"mesh rank {bad} holds {rows[bad]} rows, the torch\.chunk rule gives it "
                                     rf"{chunk_sizes(n, W)[bad]}.*block split.*local_shape_and_offset",
                         act, same_text=True))
    assert_all(str(list(chunk_sizes(n, W))) in msg and str(rows) in msg, msg)


def test_block_split_2d_and_dim1():
    mesh = make_mesh("1d")
    rows = block_sizes(7, W)
    x = to_device(np.ones((3, rows[RANK])))
    dt = DTensor.from_local(x, mesh, [Shard(1)])
    if rows == list(chunk_sizes(7, W)):
        assert_all(dt.shape == (3, 7))
        return
    raises_all(ValueError, r"entries along dim 1.*torch\.chunk", lambda: dt.shape, same_text=True)


def test_block_split_with_run_check_and_with_shape():
    n = 10
    mesh = make_mesh("1d")
    rows = block_sizes(n, W)
    x = to_device(np.ones((rows[RANK], 2)))
    if rows == list(chunk_sizes(n, W)):
        pytest.skip("the block split is the chunk split at this world size")
    raises_all(ValueError, r"torch\.chunk", lambda: DTensor.from_local(x, mesh, [Shard(0)], run_check=True),
               same_text=True)
    # shape= given: nothing is communicated, so each rank checks its own shard; a wrong one raises
    mine_ok = rows[RANK] == chunk_sizes(n, W)[RANK]
    try:
        DTensor.from_local(x, mesh, [Shard(0)], shape=(n, 2))
        err = "" if mine_ok else "no exception for a shard that breaks the chunk rule"
    except ValueError as e:
        err = "" if (not mine_ok and "run_check=True" in str(e) and "chunk" in str(e)) else f"unexpected: {e}"
    assert_all(not err, f"rank {RANK}: {err}")


def test_chunk_layout_via_local_shape_and_offset_works():
    # the fix the message names: read the rows the chunk rule assigns this rank
    n = 10
    mesh = make_mesh("1d")
    G = np.arange(n * 3, dtype=np.float64).reshape(n, 3)
    shape, off = local_shape_and_offset(G.shape, mesh, [Shard(0)])
    x = to_device(np.ascontiguousarray(G[off[0]:off[0] + shape[0]]))
    dt = DTensor.from_local(x, mesh, [Shard(0)])
    assert_all(dt.shape == G.shape and dt.local_offset() == off and np.array_equal(to_host(dt.full_tensor()), G))


def test_local_map_output_breaking_the_chunk_rule_raises():
    # a local function whose output shards are block-split: wrapping it as Shard(0) cannot be right
    mesh = make_mesh("1d")
    rows = block_sizes(10, W)
    if rows == list(chunk_sizes(10, W)):
        pytest.skip("the block split is the chunk split at this world size")
    A = distribute_tensor(to_device(np.ones((W, 2))), mesh, [Shard(0)])
    f = local_map(lambda a: a[:0].sum() + to_device(np.ones((rows[RANK], 2))), out_placements=[Shard(0)],
                  in_placements=([Shard(0)],))
    out = f(A)
    raises_all(ValueError, r"local_map.*torch\.chunk", out.full_tensor, same_text=True)


# ------------------------------------------------------------------------------------------------
# 2. from_local without run_check: dtypes, ndim or unsharded sizes that differ between ranks


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", ["dtype", "unsharded dim", "ndim", "requires_grad"])
def test_from_local_mismatch_without_run_check(case):
    mesh = make_mesh("1d")
    x = np.ones((2, 4))
    if case == "dtype":
        x = x.astype(np.float32) if RANK == LAST else x
        match = r"same dtype: mesh rank 0 passes float64, mesh rank \d+ passes float32"
    elif case == "unsharded dim":
        x = np.ones((2, 5)) if RANK == LAST else x
        match = r"dim 1 is not sharded.*global size 4"
    elif case == "ndim":
        x = np.ones((2, 4, 1)) if RANK == LAST else x
        match = r"same ndim"
    else:
        match = r"requires_grad"
    x = to_device(x)
    if case == "requires_grad":
        w = distribute_tensor(x, mesh, [Replicate()], requires_grad=RANK != LAST)
        x = w.to_local()  # a tracked array on all ranks but the last
    dt = DTensor.from_local(x, mesh, [Shard(0)])  # non-blocking: the check runs when the shape is needed
    raises_all(ValueError, match, dt.full_tensor, same_text=True)
    # run_check=True checks the same at once
    raises_all(ValueError, match, lambda: DTensor.from_local(x, mesh, [Shard(0)], run_check=True),
               same_text=True)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", ["not an array", "placements count", "Shard(5)", "mesh str"])
def test_rank_divergent_bad_argument_on_the_non_blocking_path(case):
    # issue 8: one rank's bad argument raises on every rank, not only there (the others would wait)
    mesh = make_mesh("1d")
    x = to_device(np.ones((2, 4)))
    good = (x, mesh, [Shard(0)])
    bad = {"not an array": ([1.0], mesh, [Shard(0)]), "placements count": (x, mesh, [Shard(0), Shard(1)]),
           "Shard(5)": (x, mesh, [Shard(5)]), "mesh str": (x, "cpu", [Shard(0)])}[case]
    args = bad if RANK == LAST else good
    if case == "mesh str":  # no mesh on the failing rank: it cannot tell the others; the deadline would
        pytest.skip("a rank without a mesh cannot reach the others (the collective deadline ends that job)")
    exc = TypeError if case == "not an array" else ValueError

    def run():
        dt = DTensor.from_local(*args)
        return dt.full_tensor()

    msg = str(raises_all(exc, r"DTensor\.from_local", run))
    if RANK != LAST:
        assert_all(f"mesh rank {LAST} rejected its arguments" in msg, msg)
    else:
        assert_all(True)


def test_deadline_free_after_divergent_error():
    # after such an error every rank goes on in step: a following collective completes
    mesh = make_mesh("1d")
    G = np.arange(12.0).reshape(4, 3)
    dt = distribute_tensor(to_device(G), mesh, [Shard(0)])
    assert_all(np.array_equal(to_host(dt.full_tensor()), G))


# ------------------------------------------------------------------------------------------------
# 4. A == B on DTensors raises (operators come later), instead of returning False


def test_comparing_dtensors_is_elementwise():
    """Since mpilocal.ops (issue 12), A == B is NumPy's elementwise comparison (a DTensor of bools
    with A's placements); an operator without a rule still raises naming local_map."""
    mesh = make_mesh("1d")
    A = distribute_tensor(to_device(np.arange(6.0).reshape(3, 2)), mesh, [Shard(0)])
    B = distribute_tensor(to_device(np.arange(6.0).reshape(3, 2)), mesh, [Shard(0)])
    eq = A == B
    ok = type(eq) is DTensor and eq.dtype == np.bool_ and eq.placements == A.placements
    assert_all(ok and bool(to_host(eq.all().full_tensor())) and not bool(to_host((A != B).any().full_tensor())))
    raises_all(TypeError, r"numpy\.cumsum.*local_map", lambda: np.cumsum(A), same_text=True)
    assert_all(np.array_equal(to_host(A.full_tensor()), to_host(B.full_tensor())))


def test_truth_value_of_a_dtensor_raises():
    """`if A == B:` must not be silently true (a DTensor used to have no __bool__): it raises on
    every rank, as NumPy does for arrays of more than one element, and says how to reduce."""
    mesh = make_mesh("1d")
    A = distribute_tensor(to_device(np.arange(6.0).reshape(3, 2)), mesh, [Shard(0)])
    B = distribute_tensor(to_device(np.zeros((3, 2))), mesh, [Shard(0)])
    raises_all(ValueError, r"truth value of a DTensor is ambiguous.*full_tensor", lambda: bool(A == B),
               same_text=True)
    raises_all(ValueError, r"ambiguous", lambda: 1 if A else 0, same_text=True)


# ------------------------------------------------------------------------------------------------
# 5. outputs never alias inputs (except from_local/to_local, documented): replicas stay equal


@pytest.mark.parametrize("dst", [Shard(0), Shard(1)], ids=repr)
def test_writing_into_a_redistributed_replicate_leaves_the_replicas_equal(dst):
    mesh = make_mesh("1d")
    G = np.arange(4.0 * W * 3).reshape(4 * W, 3)
    A = distribute_tensor(to_device(G), mesh, [Replicate()])
    S = A.redistribute(mesh, [dst])
    S.to_local()[...] = -1.0  # a newcomer's in-place update of "my shard"
    assert_all(np.array_equal(to_host(A.to_local()), G), "the Replicate input changed on this rank alone")


def test_detach_shares_memory_for_in_place_updates():
    # the documented way to update a parameter that requires grad: .detach() shares the local array
    mesh = make_mesh("1d")
    G = np.arange(6.0).reshape(3, 2)
    w = distribute_tensor(to_device(G), mesh, [Replicate()], requires_grad=True)
    w.detach().to_local()[...] -= 1.0
    assert_all(np.array_equal(to_host(w.detach().to_local()), G - 1.0) and w.requires_grad)


# ------------------------------------------------------------------------------------------------
# rank 0 reads the data, the others pass None; copies and pickling


def test_rank0_reads_and_distributes():
    mesh = make_mesh("1d")
    data = np.linspace(0.0, 1.0, 11 * 4).reshape(11, 4) if RANK == 0 else None  # "read from a file"
    dt = distribute_tensor(to_device(data) if data is not None else None, mesh, [Shard(0)])
    G = np.linspace(0.0, 1.0, 11 * 4).reshape(11, 4)
    shape, off = local_shape_and_offset(G.shape, mesh, [Shard(0)])
    ok = dt.shape == G.shape and np.array_equal(to_host(dt.to_local()), G[off[0]:off[0] + shape[0]])
    assert_all(ok, f"rank {RANK}: {dt.shape} {to_host(dt.to_local()).shape}")


def test_deepcopy_and_pickle():
    import pickle

    mesh = make_mesh("1d")
    dt = distribute_tensor(to_device(np.arange(8.0).reshape(4, 2)), mesh, [Shard(0)])
    c = copy.deepcopy(dt)
    c.to_local()[...] = 7.0
    ok = c.device_mesh is dt.device_mesh and np.array_equal(to_host(dt.full_tensor()), np.arange(8.0).reshape(4, 2))
    assert_all(ok)
    raises_all(TypeError, r"cannot be pickled", lambda: pickle.dumps(dt), same_text=True)


def test_partial_from_replicate_grad_is_all_reduced():
    # issue 8: PyTorch all-reduces a Partial .grad arriving through redistribute to the same placements
    mesh = make_mesh("1d")
    w = distribute_tensor(to_device(np.ones((3, 2))), mesh, [Replicate()], requires_grad=True)
    local = w.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    DTensor.from_local(local * float(RANK + 1), mesh, [Partial()]).full_tensor().sum().backward()
    want = np.full((3, 2), W * (W + 1) / 2.0)
    assert_all(w.grad.placements == (Replicate(),) and np.array_equal(to_host(w.grad.to_local()), want),
               f"{w.grad.placements} {to_host(w.grad.to_local()).ravel()[:3]}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("run_check", [False, True])
def test_ranks_passing_different_placements_raise(run_check):
    # Shard(0) on one rank and Shard(1) on the others: both post the agreement, which now compares them
    mesh = make_mesh("1d")
    x = to_device(np.ones((4, 4)))
    pl = [Shard(1)] if RANK == LAST else [Shard(0)]

    def run():
        return DTensor.from_local(x, mesh, pl, run_check=run_check).full_tensor()

    raises_all(ValueError, r"different placements", run)
