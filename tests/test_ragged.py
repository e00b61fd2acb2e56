"""Ragged shards (``Shard(d, sizes=...)``) against NumPy: every layout transition, full_tensor,
from_local, local_map, halos and gradients, at any rank count.

The oracle slices the full NumPy array by offsets written out here (cumulative sums of the sizes,
torch.chunk for plain ``Shard``), independent of mpilocal.layout.
"""

import itertools

import numpy as np
import pytest
from conftest import RANK, W, WORLD, DEVICE, Check, assert_all, to_device, to_host

import mpilocal
import mpilocal.functional as funcol
from mpilocal import CommDebugMode, DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh, local_map
from mpilocal import layout

pytestmark = pytest.mark.mpi


def offsets(sizes):
    return [sum(sizes[:i]) for i in range(len(sizes))]


def chunk(n, k):
    c = -(-n // k)
    return [max(min(c, n - min(c * i, n)), 0) for i in range(k)]


def ragged_sizes(n, k, kind):
    """Per-rank sizes of n rows: the MPI block split, an empty rank, everything on the last rank."""
    if kind == "block":
        return [n // k + (i < n % k) for i in range(k)]
    if kind == "empty_first":
        return [0] + [n // (k - 1) + (i < n % (k - 1)) for i in range(k - 1)] if k > 1 else [n]
    if kind == "last":
        return [0] * (k - 1) + [n]
    raise AssertionError(kind)


def piece(full, d, sizes, i):
    o = offsets(sizes)[i]
    idx = [slice(None)] * full.ndim
    idx[d] = slice(o, o + sizes[i])
    return full[tuple(idx)]


def expected_local(full, pl, mesh_shape, coord):
    """The oracle's local shard for 1-D or 2-D meshes (sizes written out, no mpilocal.layout)."""
    out = full
    for m, p in enumerate(pl):
        if isinstance(p, Shard):
            n = out.shape[p.dim]
            sizes = list(p.sizes) if p.sizes is not None else chunk(n, mesh_shape[m])
            out = piece(out, p.dim, sizes, coord[m])
    return out


def data(shape, seed=0):
    a = np.random.default_rng(seed).standard_normal(shape)
    if a.size > 2:
        a.flat[1] = np.nan
    return a


KINDS = ["block", "empty_first", "last"]


# ------------------------------------------------------------------------------------------------
# pure layout (no communication)
# ------------------------------------------------------------------------------------------------
def test_layout_shards_and_block_sizes():
    assert layout.block_sizes(10, 4) == (3, 3, 2, 2)
    assert layout.block_sizes(3, 4) == (1, 1, 1, 0)
    pl = (Shard(0, sizes=(3, 3, 2, 2)), Replicate())
    got = layout.shards((10, 5), (4, 2), pl)
    assert [(c, s, o) for c, s, o in got][:3] == [((0, 0), (3, 5), (0, 0)), ((0, 1), (3, 5), (0, 0)),
                                                  ((1, 0), (3, 5), (3, 0))]
    assert got[-1] == ((3, 1), (2, 5), (8, 0))
    # chunk rule for comparison: torch.chunk(10, 4) = 3, 3, 3, 1
    assert [s[1][0] for s in layout.shards((10,), (4,), (Shard(0),))] == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="gives 3 sizes summing to 10, but the mesh dim has 4 ranks"):
        layout.local_shape_and_offset((10,), (4,), (Shard(0, sizes=(4, 4, 2)),), (0,))
    with pytest.raises(ValueError, match="a ragged dim is sharded over one mesh dim only"):
        layout.normalize_placements([Shard(0, sizes=(5, 5)), Shard(0)], 2, 1)
    assert layout.normalize_placements([Shard(-1, sizes=(1, 2))], 1, 2) == (Shard(1, sizes=(1, 2)),)
    assert Shard(0, sizes=(3, 3)) != Shard(0) and repr(Shard(0, sizes=[1, 2])) == "Shard(dim=0, sizes=(1, 2))"
    with pytest.raises(TypeError):
        Shard(0, sizes=(1.5, 2))
    with pytest.raises(ValueError):
        Shard(0, sizes=(-1, 2))


# ------------------------------------------------------------------------------------------------
# distribute / from_local / full_tensor
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_distribute_full_tensor_and_from_local(kind):
    mesh = init_device_mesh(DEVICE, (W,))
    N = 2 * W + 3
    full = data((N, 3))
    sizes = ragged_sizes(N, W, kind)
    pl = [Shard(0, sizes=sizes)]
    X = distribute_tensor(to_device(full), mesh, pl)
    ck = Check()
    ck.close(X.to_local(), piece(full, 0, sizes, RANK), "distribute_tensor local")
    ck.close(X.full_tensor(), full, "full_tensor")
    # from_local: shapes inferred from the local arrays; run_check verifies them against the sizes
    Y = DTensor.from_local(to_device(piece(full, 0, sizes, RANK)), mesh, pl, run_check=True)
    ck(Y.shape == (N, 3), f"from_local shape {Y.shape}")
    ck.close(Y.full_tensor(), full, "from_local full_tensor")
    ck(mpilocal.layout.shards((N, 3), (W,), tuple(Y.placements))[RANK][1] == (sizes[RANK], 3), "shards()")
    ck.done()


def test_from_local_run_check_rejects_wrong_sizes():
    if W == 1:
        pytest.skip("needs 2+ ranks")
    mesh = init_device_mesh(DEVICE, (W,))
    sizes = [2] * W
    local = to_device(np.ones((3 if RANK == 0 else 2, 2)))  # rank 0 holds 3 rows, the placement says 2
    with pytest.raises(ValueError):
        DTensor.from_local(local, mesh, [Shard(0, sizes=sizes)], run_check=True)


# ------------------------------------------------------------------------------------------------
# every transition, 1-D mesh
# ------------------------------------------------------------------------------------------------
def _layouts_1d(N, M):
    return {
        "R": [Replicate()],
        "S0": [Shard(0)],
        "S1": [Shard(1)],
        "G0block": [Shard(0, sizes=ragged_sizes(N, W, "block"))],
        "G0empty": [Shard(0, sizes=ragged_sizes(N, W, "empty_first"))],
        "G1last": [Shard(1, sizes=ragged_sizes(M, W, "last"))],
        "G1block": [Shard(1, sizes=ragged_sizes(M, W, "block"))],
    }


@pytest.mark.parametrize("src,dst", [(a, b) for a, b in itertools.product(
    ["R", "S0", "S1", "G0block", "G0empty", "G1last", "G1block"], ["R", "S0", "S1", "G0block", "G0empty", "G1last",
                                                                   "G1block"]) if a != b or a.startswith("G")])
def test_redistribute_transitions_1d(src, dst):
    mesh = init_device_mesh(DEVICE, (W,))
    N, M = W + 3, 2 * W + 1
    L = _layouts_1d(N, M)
    full = data((N, M), seed=2)
    X = distribute_tensor(to_device(full), mesh, L[src])
    Y = X.redistribute(mesh, L[dst])
    ck = Check()
    ck(Y.placements == tuple(L[dst]), f"placements {Y.placements}")
    ck.close(Y.to_local(), expected_local(full, L[dst], (W,), (RANK,)), f"{src}->{dst} local")
    ck.close(Y.full_tensor(), full, f"{src}->{dst} full")
    ck.done()


def test_partial_to_ragged_reduce_scatter():
    mesh = init_device_mesh(DEVICE, (W,))
    N = 2 * W + 1
    sizes = ragged_sizes(N, W, "block")
    parts = [data((N, 2), seed=10 + r) for r in range(W)]
    X = DTensor.from_local(to_device(parts[RANK]), mesh, [Partial()])
    with CommDebugMode() as cm:
        Y = X.redistribute(mesh, [Shard(0, sizes=sizes)])
    ck = Check()
    ck.close(Y.to_local(), piece(sum(parts), 0, sizes, RANK), "P -> ragged", rtol=1e-12)
    ck(cm.get_comm_counts().get("reduce_scatter_tensor", 0) == (W > 1), f"{dict(cm.get_comm_counts())}")
    ck.done()


# ------------------------------------------------------------------------------------------------
# 2-D mesh: ragged on one mesh dim, anything on the other
# ------------------------------------------------------------------------------------------------
def _mesh2():
    return init_device_mesh(DEVICE, (2, 2) if W == 4 else (W, 1))


@pytest.mark.parametrize("src,dst", [("G0,S1", "R,R"), ("R,R", "G0,S1"), ("G0,S1", "S1,G0"), ("S0,R", "G1,S0"),
                                     ("G1,S0", "S0,S1"), ("G0,R", "G0b,R")])
def test_redistribute_2d(src, dst):
    mesh = _mesh2()
    k0, k1 = mesh.shape
    N, M = 2 * k0 + 3, 3 * k1 + 2

    def mk(spec):
        out = []
        for m, t in enumerate(spec.split(",")):
            k = mesh.shape[m]
            out.append({"R": Replicate(), "S0": Shard(0), "S1": Shard(1),
                        "G0": Shard(0, sizes=ragged_sizes(N, k, "block")),
                        "G0b": Shard(0, sizes=ragged_sizes(N, k, "last")),
                        "G1": Shard(1, sizes=ragged_sizes(M, k, "empty_first"))}[t])
        return out

    full = data((N, M), seed=3)
    X = distribute_tensor(to_device(full), mesh, mk(src))
    Y = X.redistribute(mesh, mk(dst))
    ck = Check()
    ck.close(Y.to_local(), expected_local(full, mk(dst), mesh.shape, mesh.get_coordinate()), f"{src}->{dst}")
    ck.close(Y.full_tensor(), full, f"{src}->{dst} full")
    ck.done()


# ------------------------------------------------------------------------------------------------
# local_map, halos, gradients
# ------------------------------------------------------------------------------------------------
def test_local_map_in_and_out_ragged():
    mesh = init_device_mesh(DEVICE, (W,))
    N = 3 * W + 1
    sizes = ragged_sizes(N, W, "block")
    pl = [Shard(0, sizes=sizes)]
    full = data((N, 4), seed=4)
    X = distribute_tensor(to_device(full), mesh, pl)
    Y = local_map(lambda a: 2 * a + 1, out_placements=pl, in_placements=(pl,))(X)
    ck = Check()
    ck(Y.placements == tuple(pl) and Y.shape == (N, 4), f"{Y.placements} {Y.shape}")
    ck.close(Y.full_tensor(), 2 * full + 1, "local_map")
    # a chunk-sharded input is redistributed to the ragged layout when asked to
    Z = distribute_tensor(to_device(full), mesh, [Shard(0)])
    Y2 = local_map(lambda a: a * 3, out_placements=pl, in_placements=(pl,), redistribute_inputs=True)(Z)
    ck.close(Y2.to_local(), piece(3 * full, 0, sizes, RANK), "redistributed input")
    ck.done()


@pytest.mark.parametrize("boundary", ["periodic", "none", 0.5])
def test_halo_on_block_split(boundary):
    mesh = init_device_mesh(DEVICE, (W,))
    N = 3 * W + 2
    sizes = ragged_sizes(N, W, "block")
    full = data((N, 3), seed=5)
    X = distribute_tensor(to_device(full), mesh, [Shard(0, sizes=sizes)])
    got = to_host(funcol.halo_exchange(X, 0, 0, 2, boundary))
    o, n = offsets(sizes)[RANK], sizes[RANK]
    if boundary == "none":
        exp = full[max(o - 2, 0):min(o + n + 2, N)]
    else:
        ext = np.pad(full, ((2, 2), (0, 0)), mode="wrap") if boundary == "periodic" else \
            np.pad(full, ((2, 2), (0, 0)), constant_values=boundary)
        exp = ext[o:o + n + 4]
    assert_all(np.allclose(got, exp, equal_nan=True), f"{got} vs {exp}")


def test_halo_ragged_narrow_shard_raises_everywhere():
    if W == 1:
        pytest.skip("needs 2+ ranks")
    mesh = init_device_mesh(DEVICE, (W,))
    sizes = [1] + [3] * (W - 1)
    X = distribute_tensor(to_device(np.ones((sum(sizes), 2))), mesh, [Shard(0, sizes=sizes)])
    with pytest.raises(ValueError, match="group rank 0 holds 1 row"):
        funcol.halo_exchange(X, 0, 0, 2)


def test_gradients_through_ragged_redistribute():
    mesh = init_device_mesh(DEVICE, (W,))
    N = 2 * W + 1
    sizes = ragged_sizes(N, W, "block")
    x = data((N, 3), seed=6)
    x[np.isnan(x)] = 0.25
    wts = data((N, 3), seed=7)
    wts[np.isnan(wts)] = -1.0
    X = distribute_tensor(to_device(x), mesh, [Shard(0, sizes=sizes)], requires_grad=True)
    Y = X.redistribute(mesh, [Shard(1)])  # ragged rows -> chunked columns (all_to_all)
    Wt = distribute_tensor(to_device(wts), mesh, [Shard(1)])
    L = local_map(lambda a, b: (a * a * b).sum(), out_placements=[Partial()],
                  in_placements=([Shard(1)], [Shard(1)]))(Y, Wt)
    L.backward()
    ck = Check()
    ck(X.grad.placements == (Shard(0, sizes=tuple(sizes)),), f"grad placements {X.grad.placements}")
    ck.close(X.grad.to_local(), piece(2 * x * wts, 0, sizes, RANK), "grad = 2 x w")
    ck.done()


# ------------------------------------------------------------------------------------------------
# ragged_from_local: sizes agreed from the local arrays
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_ragged_from_local_block_split(kind):
    mesh = init_device_mesh(DEVICE, (W,))
    N = 2 * W + 3
    sizes = ragged_sizes(N, W, kind)
    full = data((N, 2), seed=20)
    with CommDebugMode() as cm:
        X = mpilocal.ragged_from_local(to_device(piece(full, 0, sizes, RANK)), mesh, [Shard(0)])
    ck = Check()
    ck(X.placements == (Shard(0, sizes=tuple(sizes)),) and X.shape == (N, 2), f"{X.placements} {X.shape}")
    ck(cm.get_total_counts() == 0, f"data collectives {dict(cm.get_comm_counts())}")
    ck.close(X.full_tensor(), full, "full_tensor")
    ck.close(X.redistribute(mesh, [Shard(0)]).to_local(), expected_local(full, [Shard(0)], (W,), (RANK,)), "-> chunk")
    ck.done()


def test_ragged_from_local_2d():
    mesh = _mesh2()
    k0, k1 = mesh.shape
    N, M = 2 * k0 + 1, 3 * k1 + 1
    s0, s1 = ragged_sizes(N, k0, "block"), ragged_sizes(M, k1, "last")
    full = data((N, M), seed=21)
    c = mesh.get_coordinate()
    local = piece(piece(full, 0, s0, c[0]), 1, s1, c[1])
    X = mpilocal.ragged_from_local(to_device(local), mesh, [Shard(0), Shard(1)], run_check=True)
    ck = Check()
    ck(X.placements == (Shard(0, sizes=tuple(s0)), Shard(1, sizes=tuple(s1))), f"{X.placements}")
    ck.close(X.full_tensor(), full, "full_tensor")
    ck.done()
    if k1 > 1:  # a split along mesh dim 0 that differs between the columns of the mesh: every rank raises
        bad = np.ones((1 + (c[0] == 0 and c[1] == 0), 2))
        with pytest.raises(ValueError, match="one global array has one split per mesh dim"):
            mpilocal.ragged_from_local(to_device(bad), mesh, [Shard(0), Replicate()])


def test_checkpoint_ragged_save_load_any_layout(tmp_path):
    import mpilocal.checkpoint as ckpt

    mesh = init_device_mesh(DEVICE, (W,))
    N = 2 * W + 3
    full = data((N, 2), seed=22)
    path = WORLD.bcast(str(tmp_path) if RANK == 0 else None) + "/ragged"
    ckpt.save({"x": distribute_tensor(to_device(full), mesh, [Shard(0, sizes=ragged_sizes(N, W, "block"))])},
              checkpoint_id=path)
    ck = Check()
    for pl in ([Shard(0)], [Shard(0, sizes=ragged_sizes(N, W, "last"))], [Shard(1)], [Replicate()]):
        st = {"x": distribute_tensor(to_device(np.zeros_like(full)), mesh, pl)}
        ckpt.load(st, checkpoint_id=path)
        ck(st["x"].placements == tuple(pl), f"{st['x'].placements}")
        ck.close(st["x"].to_local(), expected_local(full, pl, (W,), (RANK,)), f"load into {pl}")
    ck.done()
