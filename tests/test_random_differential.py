"""Randomized differential test (issue 5): random meshes (1-D, 2-D), global shapes (including empty
and uneven), dtypes, and chains of redistributes and ``local_map`` calls, checked against a NumPy
oracle after every step — the global shape, this rank's shard (against an independent torch.chunk
slicer; ragged ``Shard(d, sizes=...)`` layouts are drawn too) and, at the end, ``full_tensor()``.

Every rank draws the same cases from the same seed. Each case's verdict is agreed across ranks, so
a failure is reported on every rank with the seed and the case's recipe to replay it:

    MPILOCAL_DIFF_SEED=1234 MPILOCAL_DIFF_CASES=300 mpiexec -n 3 python -m pytest --with-mpi -s \\
        tests/test_random_differential.py
    MPILOCAL_DIFF_ONLY=<case seed from a failure> mpiexec -n 3 python -m pytest --with-mpi -s \\
        tests/test_random_differential.py          # replays one case

Data are small integers (in every dtype), so sums are exact and comparisons are exact.
"""

import os
import time

import numpy as np
import pytest

from conftest import RANK, WORLD, W as N, assert_all
from mpilocal import DeviceMesh, DTensor, Partial, Replicate, Shard, distribute_tensor, local_map

SEED = int(os.environ.get("MPILOCAL_DIFF_SEED", "20261126"))
CASES = int(os.environ.get("MPILOCAL_DIFF_CASES", "400"))
DTYPES = (np.float64, np.float32, np.int64, np.int32, np.complex128, np.float16)


def _mesh_shapes():
    shapes = [(N,)]
    for a in range(1, N + 1):
        if N % a == 0:
            shapes.append((a, N // a))
    return shapes


@pytest.fixture(scope="module")
def meshes():
    out = []
    for s in _mesh_shapes():
        out.append(DeviceMesh("cpu", np.arange(N).reshape(s)))
    # a mesh over the ranks in reverse order: group ranks differ from world ranks
    out.append(DeviceMesh("cpu", np.arange(N)[::-1].copy()))
    return out


# -- independent oracle: torch.chunk slicing, nested in mesh-dim order --------------------------------
def oracle_slices(shape, mesh_shape, placements, coord):
    lo = [0] * len(shape)
    hi = list(shape)
    for md, p in enumerate(placements):
        if isinstance(p, Shard):
            d = p.dim % len(shape)
            n = hi[d] - lo[d]
            k = mesh_shape[md]
            if p.sizes is not None:  # ragged: explicit sizes
                start = sum(p.sizes[:coord[md]])
                stop = start + p.sizes[coord[md]]
            else:
                chunk = -(-n // k) if n else 0
                start = min(n, coord[md] * chunk)
                stop = min(n, start + chunk)
            lo[d], hi[d] = lo[d] + start, lo[d] + stop
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def random_placements(rng, mesh_ndim, ndim, allow_partial=False, complex_=False):
    out = []
    op = "sum" if complex_ else str(rng.choice(["sum", "max", "min"]))  # one reduce op per layout
    for _ in range(mesh_ndim):
        r = rng.random()
        if ndim and r < 0.55:
            out.append(Shard(int(rng.integers(-ndim, ndim))))
        elif allow_partial and r < 0.7:
            out.append(Partial(op))
        else:
            out.append(Replicate())
    return out


def raggedize(rng, placements, shape, mesh_shape):
    """Make some shards ragged (issue 14): a dim sharded over one mesh dim gets random explicit sizes
    (empty pieces included) with probability 0.4."""
    out = list(placements)
    for md, p in enumerate(out):
        if isinstance(p, Shard) and p.sizes is None and rng.random() < 0.4:
            d = p.dim % len(shape)
            if sum(isinstance(q, Shard) and q.dim % len(shape) == d for q in out) == 1:
                cuts = np.sort(rng.integers(0, shape[d] + 1, size=mesh_shape[md] - 1))
                out[md] = Shard(p.dim, sizes=np.diff(np.concatenate([[0], cuts, [shape[d]]])).tolist())
    return out


def partial_pieces(rng, local, placements, mesh, coord):
    """This rank's local piece of a Partial layout whose reduction is ``local`` (exact integers)."""
    x = local.copy()
    for md, p in enumerate(placements):
        if not isinstance(p, Partial):
            continue
        k = mesh.shape[md]
        i = coord[md]
        # the same random offsets on every rank of the group: seeded by the case rng's next draw
        sub = np.random.default_rng(int(rng.integers(1 << 30)) + 0)
        offs = sub.integers(0, 3, size=(k,) + x.shape).astype(x.dtype)
        if p.reduce_op == "sum":
            offs[0] = -offs[1:].sum(axis=0) if k > 1 else 0
            x = (x if i == 0 else np.zeros_like(x)) + offs[i]
        elif p.reduce_op == "max":
            offs[0] = 0
            x = x - offs[i]
        elif p.reduce_op == "min":
            offs[0] = 0
            x = x + offs[i]
    return x


def check_dt(dt, expected, mesh, what):
    if tuple(dt.shape) != expected.shape:
        return f"{what}: global shape {tuple(dt.shape)} != oracle {expected.shape}"
    if dt.dtype != expected.dtype:
        return f"{what}: dtype {dt.dtype} != oracle {expected.dtype}"
    if any(isinstance(p, Partial) for p in dt.placements):
        return ""
    coord = mesh.get_coordinate()
    want = expected[oracle_slices(expected.shape, mesh.shape, dt.placements, coord)]
    got = dt.to_local()
    if got.shape != want.shape or not np.array_equal(got, want):
        return (f"{what}: local shard {got.shape} {got.ravel()[:6]} != oracle {want.shape} {want.ravel()[:6]} "
                f"(placements {dt.placements}, coordinate {coord})")
    return ""


def run_case(seed, meshes):
    rng = np.random.default_rng(seed)
    mesh = meshes[int(rng.integers(len(meshes)))]
    ndim = int(rng.integers(1, 4))
    shape = tuple(int(s) for s in rng.integers(0, 8, size=ndim))
    dtype = DTYPES[int(rng.integers(len(DTYPES)))]
    g = rng.integers(-4, 5, size=shape).astype(dtype)
    recipe = [f"mesh {mesh.mesh.tolist()}", f"shape {shape}", np.dtype(dtype).name]
    coord = mesh.get_coordinate()
    # start: distribute (scatter/broadcast), slice (src None) or from_local of pieces (may be Partial)
    start = int(rng.integers(3))
    pl = raggedize(rng, random_placements(rng, mesh.ndim, ndim, allow_partial=start == 2,
                                          complex_=np.dtype(dtype).kind == "c"), shape, mesh.shape)
    if start == 0:
        dt = distribute_tensor(g, mesh, pl)
        recipe.append(f"distribute_tensor {pl}")
    elif start == 1:
        dt = distribute_tensor(g, mesh, pl, src_data_rank=None)
        recipe.append(f"distribute_tensor(src_data_rank=None) {pl}")
    else:
        local = g[oracle_slices(shape, mesh.shape, pl, coord)]
        piece = partial_pieces(rng, local, pl, mesh, coord)
        give_shape = bool(rng.integers(2))
        dt = DTensor.from_local(piece, mesh, pl, shape=shape if give_shape else None,
                                run_check=bool(rng.integers(2)) and not any(isinstance(p, Partial) for p in pl))
        recipe.append(f"from_local {pl} (shape given: {give_shape})")
    expected = g
    # a local check never ends the chain early: every rank must run the same collectives
    problems = [check_dt(dt, expected, mesh, " -> ".join(recipe))]
    for _ in range(int(rng.integers(1, 5))):
        if dtype == np.float16 and expected.size and np.abs(expected).max() > 500:
            break  # keep float16 sums exact
        step = rng.random()
        if step < 0.5:  # redistribute
            cur = dt.placements
            new = raggedize(rng, random_placements(rng, mesh.ndim, ndim), expected.shape, mesh.shape)
            # Partial may only stay itself or go to Replicate/Shard
            new = [c if isinstance(c, Partial) and rng.random() < 0.3 else t for c, t in zip(cur, new)]
            dt = dt.redistribute(mesh, new)
            recipe.append(f"redistribute {new}")
        elif step < 0.75:  # elementwise local_map, same placements (Partial only for linear maps)
            linear = any(isinstance(p, Partial) and p.reduce_op == "sum" for p in dt.placements)
            nonlin = any(isinstance(p, Partial) and p.reduce_op != "sum" for p in dt.placements)
            if nonlin:
                f, fo = (lambda a: a + a), (lambda a: a + a)  # monotone & homogeneous: ok for max/min
            elif linear:
                f, fo = (lambda a: a * 3), (lambda a: a * 3)
            else:
                f, fo = (lambda a: a * 3 - 1), (lambda a: a * 3 - 1)
            pls = list(dt.placements)
            dt = local_map(f, pls, (pls,))(dt)
            expected = fo(expected).astype(dtype)
            recipe.append("local_map elementwise")
        else:  # contraction: sum over a tensor dim; a dim sharded on a mesh dim gives Partial("sum")
            if any(isinstance(p, Partial) for p in dt.placements):
                dt = dt.redistribute(mesh, [Replicate() if isinstance(p, Partial) else p for p in dt.placements])
                recipe.append("redistribute Partial -> Replicate")
                problems.append(check_dt(dt, expected, mesh, " -> ".join(recipe)))
            d = int(rng.integers(ndim))
            out_pl = [Partial() if isinstance(p, Shard) and p.dim % ndim == d else p for p in dt.placements]
            in_pl = list(dt.placements)
            dt = local_map(lambda a, d=d: a.sum(axis=d, keepdims=True, dtype=a.dtype), out_pl, (in_pl,))(dt)
            expected = expected.sum(axis=d, keepdims=True, dtype=dtype)
            recipe.append(f"local_map sum(axis={d}) -> {out_pl}")
        problems.append(check_dt(dt, expected, mesh, " -> ".join(recipe)))
    full = dt.full_tensor()
    if full.shape != expected.shape or full.dtype != expected.dtype or not np.array_equal(full, expected):
        problems.append(f"full_tensor {full.dtype}{full.shape} != oracle {expected.dtype}{expected.shape}")
    return next((p for p in problems if p), ""), recipe


@pytest.mark.mpi
def test_random_chains_against_numpy(meshes):
    t0 = time.monotonic()
    failures = []
    only = os.environ.get("MPILOCAL_DIFF_ONLY")  # replay one case by its case seed
    for i in range(1 if only else CASES):
        seed = int(only) if only else SEED * 1000003 + i
        try:
            problem, recipe = run_case(seed, meshes)
        except Exception as e:  # an error is a failure too (same inputs on every rank: raised everywhere)
            problem, recipe = f"raised {type(e).__name__}: {e}", []
        verdicts = WORLD.allgather(problem)
        bad = [f"rank {r}: {v}" for r, v in enumerate(verdicts) if v]
        if bad:
            failures.append(f"case {i} (replay: MPILOCAL_DIFF_ONLY={seed}): "
                            f"{' -> '.join(recipe)}\n    " + "\n    ".join(bad))
            if len(failures) >= 5:
                break
    if RANK == 0:
        print(f"\n[random differential, {N} rank(s)] seed {SEED}: {i + 1} cases in {time.monotonic() - t0:.1f} s, "
              f"{len(failures)} failed")
    assert_all(not failures, f"seed {SEED}:\n" + "\n".join(failures))
