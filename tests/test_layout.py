"""Pure layout arithmetic (no MPI): chunk sizes, local shapes/offsets, global shapes, redistribute plans.

The oracles here are written independently of ``mpilocal.layout``: ``torch.chunk`` pieces are computed
by walking an index range, nested sharding by splitting index arrays mesh dim by mesh dim, and
redistribute plans are checked by executing them on a whole global NumPy array for every mesh
coordinate at once with a small pure-NumPy executor.
"""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rank0_only
from mpilocal.layout import (
    check_local_shapes,
    chunk_size_and_offset,
    chunk_sizes,
    global_shape_from_locals,
    local_shape_and_offset,
    local_slices,
    normalize_placements,
    redistribute_plan,
)
from mpilocal.placement import Partial, Replicate, Shard

# under ``mpiexec -n N`` every rank would run the same pure property tests: rank 0 is enough
property_test = rank0_only

# ----------------------------------------------------------------------------------------------
# independent oracles


def torch_chunk_oracle(n, k):
    """(sizes, offsets) of the k pieces of n elements per torch.chunk, trailing pieces short/empty."""
    step = (n + k - 1) // k
    sizes, offsets, pos = [], [], 0
    for _ in range(k):
        s = min(step, n - pos)
        sizes.append(s)
        offsets.append(pos)
        pos += s
    return sizes, offsets


def torch_chunk_pieces(idx, k):
    """Split an index array like torch.chunk(idx, k) padded with empty pieces up to k."""
    sizes, offsets = torch_chunk_oracle(len(idx), k)
    return [idx[o:o + s] for s, o in zip(sizes, offsets)]


def nested_indices(global_shape, mesh_shape, placements, coord):
    """Global indices held along each tensor dim at ``coord`` (nested torch.chunk in mesh-dim order)."""
    idx = [np.arange(n) for n in global_shape]
    for m, p in enumerate(placements):
        if isinstance(p, Shard):
            idx[p.dim] = torch_chunk_pieces(idx[p.dim], mesh_shape[m])[coord[m]]
    return idx


def all_coords(mesh_shape):
    return list(itertools.product(*[range(k) for k in mesh_shape]))


# ----------------------------------------------------------------------------------------------
# chunk sizes


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 10, 13, 16])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_chunk_sizes_match_torch_chunk(n, k):
    sizes, offsets = torch_chunk_oracle(n, k)
    assert tuple(chunk_sizes(n, k)) == tuple(sizes)
    assert len(chunk_sizes(n, k)) == k
    assert sum(chunk_sizes(n, k)) == n
    for i in range(k):
        size, off = chunk_size_and_offset(n, k, i)
        assert size == sizes[i]
        if size:
            assert off == offsets[i]
        else:
            assert 0 <= off <= n


def test_chunk_sizes_known_values():
    # torch.chunk(torch.arange(n), k) piece lengths, padded with empty pieces up to k
    assert tuple(chunk_sizes(5, 4)) == (2, 2, 1, 0)
    assert tuple(chunk_sizes(7, 3)) == (3, 3, 1)
    assert tuple(chunk_sizes(6, 4)) == (2, 2, 2, 0)  # not (2, 2, 1, 1) as np.array_split gives
    assert tuple(chunk_sizes(10, 4)) == (3, 3, 3, 1)
    assert tuple(chunk_sizes(3, 4)) == (1, 1, 1, 0)
    assert tuple(chunk_sizes(1, 3)) == (1, 0, 0)
    assert tuple(chunk_sizes(0, 3)) == (0, 0, 0)
    assert tuple(chunk_sizes(8, 4)) == (2, 2, 2, 2)


@property_test
@given(n=st.integers(0, 200), k=st.integers(1, 17))
@settings(max_examples=100, deadline=None)
def test_chunk_sizes_property(n, k):
    sizes = chunk_sizes(n, k)
    expected, offsets = torch_chunk_oracle(n, k)
    assert tuple(sizes) == tuple(expected)
    # pieces are non-increasing and at most ceil(n / k)
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))
    assert max(sizes) == -(-n // k)
    for i in range(k):
        s, o = chunk_size_and_offset(n, k, i)
        assert s == expected[i]
        if s:
            assert o == offsets[i]


# ----------------------------------------------------------------------------------------------
# local shapes and offsets


def check_local_layout(global_shape, mesh_shape, placements):
    covered = np.zeros(global_shape, dtype=int) if all(global_shape) else None
    for coord in all_coords(mesh_shape):
        shape, offset = local_shape_and_offset(global_shape, mesh_shape, placements, coord)
        idx = nested_indices(global_shape, mesh_shape, placements, coord)
        assert tuple(shape) == tuple(len(i) for i in idx), (coord, shape)
        for d, i in enumerate(idx):
            if len(i):
                # a contiguous block starting at the offset
                assert offset[d] == i[0]
                assert np.array_equal(i, np.arange(i[0], i[0] + len(i)))
            else:
                assert 0 <= offset[d] <= global_shape[d]
        sl = local_slices(global_shape, mesh_shape, placements, coord)
        assert len(sl) == len(global_shape)
        g = np.arange(int(np.prod(global_shape))).reshape(global_shape)
        assert np.array_equal(g[sl], g[np.ix_(*idx)]) if all(len(i) for i in idx) else g[sl].size == 0
        if covered is not None:
            covered[np.ix_(*idx)] += 1
    if covered is not None:
        # every element is held by as many ranks as the non-sharding mesh dims have
        reps = int(np.prod([k for k, p in zip(mesh_shape, placements) if not isinstance(p, Shard)]))
        assert (covered == reps).all()


@pytest.mark.parametrize(
    "global_shape, mesh_shape, placements",
    [
        ((8, 6), (4,), (Shard(0),)),
        ((7, 5), (3,), (Shard(0),)),
        ((7, 5), (3,), (Shard(1),)),
        ((3, 2), (4,), (Shard(0),)),
        ((0, 4), (3,), (Shard(0),)),
        ((0, 4), (3,), (Shard(1),)),
        ((8, 6), (2, 2), (Shard(0), Shard(1))),
        ((8, 6), (2, 2), (Shard(1), Shard(0))),
        ((7, 5), (2, 3), (Shard(0), Replicate())),
        ((7, 5), (2, 3), (Replicate(), Shard(1))),
        ((7, 5), (2, 3), (Partial(), Shard(0))),
        # nested: one tensor dim over several mesh dims
        ((8, 6), (2, 2), (Shard(0), Shard(0))),
        ((7, 5), (2, 3), (Shard(0), Shard(0))),
        ((7, 5), (3, 2), (Shard(0), Shard(0))),
        ((5,), (2, 2, 2), (Shard(0), Shard(0), Shard(0))),
        ((10, 3), (3, 2, 2), (Shard(0), Shard(1), Shard(0))),
        ((3, 3), (4, 4), (Shard(0), Shard(0))),
    ],
)
def test_local_shape_and_offset(global_shape, mesh_shape, placements):
    check_local_layout(global_shape, mesh_shape, placements)


def test_local_shape_nested_known_values():
    # 7 rows over mesh dim 0 (size 2): 4 + 3; each piece over mesh dim 1 (size 3): (2, 2, 0) and (1, 1, 1)
    ms, pl = (2, 3), (Shard(0), Shard(0))
    got = [local_shape_and_offset((7, 2), ms, pl, c)[0][0] for c in all_coords(ms)]
    assert got == [2, 2, 0, 1, 1, 1]
    offs = [local_shape_and_offset((7, 2), ms, pl, c)[1][0] for c in all_coords(ms)]
    assert offs[:2] == [0, 2] and offs[3:] == [4, 5, 6]
    # mesh-dim order matters: the same dim nested the other way
    ms2 = (3, 2)
    got2 = [local_shape_and_offset((7, 2), ms2, pl, c)[0][0] for c in all_coords(ms2)]
    assert got2 == [2, 1, 2, 1, 1, 0]




@st.composite
def layouts(draw, with_partial=True, min_size=0):
    mesh_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    ndim = draw(st.integers(1, 3))
    global_shape = tuple(draw(st.lists(st.integers(min_size, 9), min_size=ndim, max_size=ndim)))

    def placement():
        choices = [Replicate()] + [Shard(d) for d in range(ndim)]
        if with_partial:
            choices.append(Partial("sum"))
        return st.sampled_from(choices)

    src = tuple(draw(placement()) for _ in mesh_shape)
    dst = tuple(draw(placement()) for _ in mesh_shape)
    return global_shape, mesh_shape, src, dst


@property_test
@given(layouts())
@settings(max_examples=60, deadline=None)
def test_local_shape_and_offset_property(layout):
    global_shape, mesh_shape, src, _ = layout
    check_local_layout(global_shape, mesh_shape, src)


# ----------------------------------------------------------------------------------------------
# global shapes from local shapes


@property_test
@given(layouts())
@settings(max_examples=60, deadline=None)
def test_global_shape_from_locals_round_trip(layout):
    global_shape, mesh_shape, placements, _ = layout
    coords = all_coords(mesh_shape)
    local_shapes = [local_shape_and_offset(global_shape, mesh_shape, placements, c)[0] for c in coords]
    for c in coords:
        got = global_shape_from_locals(local_shapes, mesh_shape, placements, c)
        assert tuple(got) == tuple(global_shape), (c, local_shapes)


def test_global_shape_from_locals_uneven_not_assumed_even():
    # 7 rows over 3 ranks: local (3, 3, 1) -> 7, not 3 * 3 = 9 or 1 * 3 = 3
    ms, pl = (3,), (Shard(0),)
    local_shapes = [(3, 4), (3, 4), (1, 4)]
    for c in all_coords(ms):
        assert tuple(global_shape_from_locals(local_shapes, ms, pl, c)) == (7, 4)
    # 3 rows over 4 ranks with an empty trailing shard
    local_shapes = [(1, 2), (1, 2), (1, 2), (0, 2)]
    for c in all_coords((4,)):
        assert tuple(global_shape_from_locals(local_shapes, (4,), pl, c)) == (3, 2)


@property_test
@given(layouts())
@settings(max_examples=50, deadline=None)
def test_check_local_shapes(layout):
    global_shape, mesh_shape, placements, _ = layout
    coords = all_coords(mesh_shape)
    local_shapes = [local_shape_and_offset(global_shape, mesh_shape, placements, c)[0] for c in coords]
    assert list(check_local_shapes(global_shape, local_shapes, mesh_shape, placements)) == []
    # corrupt the last rank's shape
    bad = list(local_shapes)
    wrong = tuple(s + 1 for s in bad[-1])
    bad[-1] = wrong
    got = list(check_local_shapes(global_shape, bad, mesh_shape, placements))
    assert len(got) == 1
    flat, expected, seen = got[0]
    assert flat == len(coords) - 1
    assert tuple(expected) == tuple(local_shapes[-1])
    assert tuple(seen) == wrong


# ----------------------------------------------------------------------------------------------
# placements and their normalization


def test_placement_value_semantics():
    assert Shard(0) == Shard(0) and Shard(0) != Shard(1) and hash(Shard(1)) == hash(Shard(1))
    assert Replicate() == Replicate() and hash(Replicate()) == hash(Replicate())
    assert Partial() == Partial("sum") and Partial("max") != Partial("sum")
    assert Shard(0) != Replicate() and Replicate() != Partial()
    assert len({Shard(0), Shard(0), Replicate(), Partial(), Partial("sum")}) == 3
    assert Shard(2).is_shard() and Shard(2).is_shard(2) and not Shard(2).is_shard(1)
    assert Replicate().is_replicate() and not Replicate().is_shard() and not Replicate().is_partial()
    assert Partial("avg").is_partial() and Partial("avg").reduce_op == "avg"
    for op in ("sum", "avg", "max", "min", "product"):
        assert Partial(op).reduce_op == op
    with pytest.raises(ValueError):
        Partial("mean")
    with pytest.raises(TypeError):
        Shard("0")
    with pytest.raises(TypeError, match="must be an int"):
        Shard(True)  # operator.index(True) == 1: a bool is not a dim
    assert Shard(np.int64(1)) == Shard(1) and Shard(np.int64(1)).dim == 1
    with pytest.raises(AttributeError):
        Shard(0).dim = 1


def test_normalize_placements():
    assert normalize_placements(None, 2, 3) == (Replicate(), Replicate())
    assert normalize_placements([Shard(-1)], 1, 3) == (Shard(2),)
    assert normalize_placements((Shard(-2), Partial("max")), 2, 2) == (Shard(0), Partial("max"))
    assert normalize_placements([Replicate(), Shard(1)], 2, 2) == (Replicate(), Shard(1))
    assert isinstance(normalize_placements([Shard(0)], 1, 1), tuple)


@pytest.mark.parametrize(
    "placements, mesh_ndim, tensor_ndim, exc",
    [
        (Shard(0), 1, 2, TypeError),  # a single placement, not a sequence
        ([Shard(0)], 2, 2, ValueError),  # too few
        ([Shard(0), Replicate(), Replicate()], 2, 2, ValueError),  # too many
        ([Shard(2)], 1, 2, ValueError),  # out of range
        ([Shard(-3)], 1, 2, ValueError),  # out of range (negative)
        ([Shard(0)], 1, 0, ValueError),  # a 0-d array cannot be sharded
        (["S(0)"], 1, 2, TypeError),  # not a placement
        ([0], 1, 2, TypeError),
        (5, 1, 2, TypeError),  # not a sequence
    ],
)
def test_normalize_placements_errors(placements, mesh_ndim, tensor_ndim, exc):
    with pytest.raises(exc):
        normalize_placements(placements, mesh_ndim, tensor_ndim)


def test_normalize_placements_error_message_names_the_problem():
    with pytest.raises(ValueError, match="Shard"):
        normalize_placements([Shard(5)], 1, 2)
    with pytest.raises(ValueError, match="2"):
        normalize_placements([Shard(0)], 2, 2)


# ----------------------------------------------------------------------------------------------
# redistribute plans, executed by a pure-NumPy simulator over all mesh coordinates


COMM_OPS = {"all_gather", "all_reduce", "reduce_scatter", "all_to_all"}
LOCAL_OPS = {"chunk", "to_partial"}


def group_of(coord, mesh_shape, m):
    """Coordinates of the group along mesh dim m that contains coord, in group-rank order."""
    return [coord[:m] + (i,) + coord[m + 1:] for i in range(mesh_shape[m])]


def split_by(arr, axis, sizes):
    assert arr.shape[axis] == sum(sizes), (arr.shape, axis, sizes)
    bounds = np.cumsum([0] + list(sizes))
    return [np.take(arr, np.arange(bounds[j], bounds[j + 1]), axis=axis) for j in range(len(sizes))]


def execute_plan(states, plans, mesh_shape):
    """Run per-coordinate plans on ``states`` ({coord: local array}); partial values reduce by sum."""
    coords = list(states)
    nsteps = {len(p) for p in plans.values()}
    assert len(nsteps) == 1, "every coordinate must run the same number of steps"
    for s in range(nsteps.pop()):
        kinds = {(p[s].op, p[s].mesh_dim, p[s].tensor_dim, p[s].dst_dim, p[s].reduce_op) for p in plans.values()}
        assert len(kinds) == 1, f"coordinates disagree on step {s}: {kinds}"
        new = {}
        for c in coords:
            st_ = plans[c][s]
            m = st_.mesh_dim
            k = mesh_shape[m]
            me = c[m]
            group = group_of(c, mesh_shape, m)
            # the group must agree on the sizes of the pieces
            for g in group:
                assert tuple(plans[g][s].sizes) == tuple(st_.sizes)
                assert tuple(plans[g][s].dst_sizes) == tuple(st_.dst_sizes)
            if st_.op in ("all_gather", "chunk", "reduce_scatter"):
                assert len(st_.sizes) == k
            if st_.op == "all_gather":
                pieces = [states[g] for g in group]
                for j, piece in enumerate(pieces):
                    assert piece.shape[st_.tensor_dim] == st_.sizes[j]
                new[c] = np.concatenate(pieces, axis=st_.tensor_dim)
            elif st_.op == "chunk":
                new[c] = split_by(states[c], st_.tensor_dim, st_.sizes)[me]
            elif st_.op == "all_reduce":
                assert st_.reduce_op == "sum"
                new[c] = sum(states[g] for g in group)
            elif st_.op == "reduce_scatter":
                assert st_.reduce_op == "sum"
                shapes = {states[g].shape for g in group}
                assert len(shapes) == 1
                total = sum(states[g] for g in group)
                new[c] = split_by(total, st_.tensor_dim, st_.sizes)[me]
            elif st_.op == "all_to_all":
                a, b = st_.tensor_dim, st_.dst_dim
                assert a != b
                assert len(st_.sizes) == k and len(st_.dst_sizes) == k
                # sender j splits its piece along b and sends part `me` to us
                received = [split_by(states[g], b, st_.dst_sizes)[me] for g in group]
                for j, piece in enumerate(received):
                    assert piece.shape[a] == st_.sizes[j]
                new[c] = np.concatenate(received, axis=a)
            elif st_.op == "to_partial":
                assert st_.reduce_op == "sum"
                # one valid partition of a replicated value: all of it on group rank 0
                new[c] = states[c] if me == 0 else np.zeros_like(states[c])
            else:
                raise AssertionError(f"unknown step op {st_.op!r}")
        states = new
    return states


def partial_dims(placements):
    return [m for m, p in enumerate(placements) if isinstance(p, Partial)]


def initial_states(G, mesh_shape, src, rng):
    """Each coordinate's local value for layout ``src``: partial dims get zero-sum integer noise."""
    pdims = partial_dims(src)
    value_placements = tuple(Replicate() if isinstance(p, Partial) else p for p in src)
    psub = list(itertools.product(*[range(mesh_shape[m]) for m in pdims]))
    noise = {}
    if pdims:
        acc = np.zeros(G.shape, dtype=G.dtype)
        for sub in psub[:-1]:
            noise[sub] = rng.integers(-50, 50, size=G.shape)
            acc += noise[sub]
        noise[psub[-1]] = -acc
    states = {}
    for c in all_coords(mesh_shape):
        sl = local_slices(G.shape, mesh_shape, value_placements, c)
        val = G[sl]
        if pdims:
            sub = tuple(c[m] for m in pdims)
            # the whole value on the first partial coordinate, zero-sum noise everywhere
            val = (val if sub == psub[0] else np.zeros_like(val)) + noise[sub][sl]
        states[c] = val
    return states


def reduce_partials(states, mesh_shape, placements):
    """Sum each coordinate's value over its group of partial mesh dims."""
    pdims = partial_dims(placements)
    out = {}
    for c, v in states.items():
        total = np.zeros_like(v)
        for sub in itertools.product(*[range(mesh_shape[m]) for m in pdims]):
            cc = list(c)
            for m, i in zip(pdims, sub):
                cc[m] = i
            total = total + states[tuple(cc)]
        out[c] = total if pdims else v
    return out


def nested_dims(src, dst):
    """Mesh dims whose placement does not change but that must be un-sharded (nested inside a change)."""
    out = set()
    for i, (s, t) in enumerate(zip(src, dst)):
        if s != t or not isinstance(s, Shard):
            continue
        for k in range(i):
            if src[k] != dst[k] and (src[k].is_shard(s.dim) or dst[k].is_shard(s.dim)):
                out.add(i)
    return out


def check_plan(global_shape, mesh_shape, src, dst, seed=0):
    rng = np.random.default_rng(seed)
    G = rng.integers(-1000, 1000, size=global_shape)
    coords = all_coords(mesh_shape)
    plans = {c: redistribute_plan(tuple(global_shape), tuple(mesh_shape), c, tuple(src), tuple(dst)) for c in coords}

    # the plan's size: at most one collective per changed mesh dim plus the nested un-shardings,
    # at most one collective and one local step per mesh dim, nothing on untouched mesh dims
    changed = {i for i in range(len(mesh_shape)) if src[i] != dst[i]}
    nested = nested_dims(src, dst)
    for c, plan in plans.items():
        comm = [s for s in plan if s.op in COMM_OPS]
        local = [s for s in plan if s.op in LOCAL_OPS]
        assert len(comm) + len(local) == len(plan)
        assert len(comm) <= len(changed) + len(nested), (plan, changed, nested)
        for m in range(len(mesh_shape)):
            assert sum(s.mesh_dim == m for s in comm) <= 1, plan
            assert sum(s.mesh_dim == m for s in local) <= 1, plan
        assert {s.mesh_dim for s in plan} <= changed | nested, plan
        if src == dst:
            assert plan == ()
        # R -> S only (nothing nested) needs no communication
        if all(isinstance(src[i], Replicate) and isinstance(dst[i], Shard) for i in changed) and not nested:
            assert comm == [], plan

    states = initial_states(G, mesh_shape, src, rng)
    final = execute_plan(states, plans, mesh_shape)
    reduced = reduce_partials(final, mesh_shape, dst)
    for c in coords:
        expected = G[local_slices(G.shape, mesh_shape, dst, c)]
        got = reduced[c]
        assert got.shape == expected.shape, (c, got.shape, expected.shape, plans[c])
        assert np.array_equal(got, expected), (c, plans[c])
        # partial-free destinations: the raw local value is already the layout's slice
        if not partial_dims(dst):
            assert np.array_equal(final[c], expected)
    return plans


@pytest.mark.parametrize(
    "global_shape, mesh_shape, src, dst",
    [
        ((8, 6), (4,), (Shard(0),), (Replicate(),)),
        ((7, 5), (3,), (Shard(0),), (Shard(1),)),
        ((7, 5), (3,), (Shard(1),), (Shard(0),)),
        ((3, 2), (4,), (Shard(0),), (Shard(1),)),
        ((0, 4), (3,), (Shard(0),), (Shard(1),)),
        ((7, 5), (3,), (Replicate(),), (Shard(0),)),
        ((7, 5), (3,), (Partial(),), (Replicate(),)),
        ((7, 5), (3,), (Partial(),), (Shard(1),)),
        ((7, 5), (3,), (Replicate(),), (Partial(),)),
        ((8, 6), (2, 2), (Shard(0), Shard(0)), (Replicate(), Shard(0))),
        ((7, 5), (2, 3), (Shard(0), Shard(0)), (Replicate(), Shard(0))),
        ((7, 5), (2, 3), (Shard(0), Shard(0)), (Shard(0), Replicate())),
        ((8, 6), (2, 2), (Shard(0), Shard(1)), (Shard(1), Shard(0))),
        ((7, 5), (3, 2), (Shard(0), Shard(1)), (Shard(1), Shard(0))),
        ((7, 5), (2, 3), (Replicate(), Shard(0)), (Shard(0), Shard(0))),
        ((7, 5), (2, 3), (Partial(), Shard(0)), (Shard(0), Shard(0))),
        ((7, 5), (2, 2), (Partial(), Partial()), (Shard(1), Replicate())),
        ((5, 3, 4), (2, 2, 2), (Shard(0), Shard(0), Shard(0)), (Shard(2), Replicate(), Shard(0))),
    ],
)
def test_redistribute_plan_examples(global_shape, mesh_shape, src, dst):
    check_plan(global_shape, mesh_shape, src, dst)


def test_redistribute_plan_simple_one_d_ops():
    one = lambda src, dst, shape=(7, 5), mesh=(3,): [  # noqa: E731
        s.op for s in redistribute_plan(shape, mesh, (0,), (src,), (dst,))
    ]
    assert one(Shard(0), Replicate()) == ["all_gather"]
    assert one(Shard(0), Shard(1)) == ["all_to_all"]
    assert one(Replicate(), Shard(1)) == ["chunk"]
    assert one(Partial(), Replicate()) == ["all_reduce"]
    assert one(Partial("max"), Shard(0)) == ["reduce_scatter"]
    assert one(Shard(0), Shard(0)) == []
    assert one(Replicate(), Replicate()) == []
    assert one(Partial(), Partial()) == []


@property_test
@given(layouts())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_redistribute_plan_property(layout):
    global_shape, mesh_shape, src, dst = layout
    check_plan(global_shape, mesh_shape, src, dst)


@property_test
@given(layouts(with_partial=False, min_size=0))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_redistribute_plan_round_trip(layout):
    global_shape, mesh_shape, src, dst = layout
    check_plan(global_shape, mesh_shape, src, dst)
    check_plan(global_shape, mesh_shape, dst, src)


def test_block_size_and_offset_is_numpy_array_split():
    """The MPI block rule that the transports cut buffers by (``cuda_mpi`` all-reduce blocks,
    ``staged`` pipeline pieces) is ``np.array_split``'s: the first ``n % k`` pieces one larger."""
    from mpilocal.layout import block_size_and_offset, block_sizes

    for n in range(0, 23):
        for k in range(1, 9):
            pieces = np.array_split(np.arange(n), k)
            want = [(len(p), int(p[0]) if len(p) else sum(len(q) for q in pieces[:i])) for i, p in enumerate(pieces)]
            got = [block_size_and_offset(n, k, i) for i in range(k)]
            assert got == want, (n, k, got, want)
            assert block_sizes(n, k) == tuple(s for s, _ in want)
