"""GPU-only behaviour: transport selection, NCCL communicator reuse, dtypes NCCL lacks, avg, stream
ordering, GPU binding, and the rule that CuPy buffers never reach an MPI that is not CUDA-aware.

Needs CuPy and a GPU (skips with the reason otherwise). Every available transport is exercised
directly (``nccl`` where NCCL works, ``cuda_mpi`` where the MPI is CUDA-aware, ``staged`` always).
"""

import numpy as np
import pytest
from conftest import RANK, W, assert_all, assert_close_all
from mpi4py import MPI

from mpilocal import gpu

cp = gpu.cupy_or_none()
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(cp is None, reason="needs CuPy and a working GPU (none on this machine)"),
]



def _available():
    from mpilocal.transport import detect

    names = []
    if detect.nccl_version()[0] is not None:
        names.append("nccl")
    if detect.mpi_cuda_aware()[0]:
        names.append("cuda_mpi")
    names.append("staged")
    return names


TRANSPORTS = _available() if cp is not None else ["staged"]


@pytest.fixture(autouse=True)
def _bound():
    gpu.bind_device()


def _world_group():
    from mpilocal.transport import group_for

    return group_for(MPI.COMM_WORLD)


def test_binding_uses_node_local_rank():
    local, per_node = gpu.node_local_rank()
    dev = cp.cuda.Device().id
    n = cp.cuda.runtime.getDeviceCount()
    assert_all(dev == local % n, f"rank {RANK}: device {dev}, node-local rank {local}, {n} GPUs")


def test_default_choice_follows_ladder(monkeypatch):
    from mpilocal.transport import detect, select

    monkeypatch.delenv("MPILOCAL_TRANSPORT", raising=False)
    have_nccl = detect.nccl_version()[0] is not None
    aware = detect.mpi_cuda_aware()[0]
    for op in ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "broadcast", "scatter"):
        t, why = select.choose_gpu(op)
        want = "nccl" if have_nccl else ("cuda_mpi" if aware else "staged")
        assert_all(t.name == want and why, f"{op}: {t.name} ({why}), expected {want}")
    x = cp.ones(3, cp.float32)
    select.reset()
    assert_all(select.transport_for(x, "all_reduce").name == ("nccl" if have_nccl else t.name))
    assert_all(select.transport_for(np.ones(3), "all_reduce").name == "host")


@pytest.mark.parametrize("name", TRANSPORTS)
def test_forced_transport(monkeypatch, name):
    import mpilocal.functional as funcol
    from mpilocal.transport import select

    monkeypatch.setenv("MPILOCAL_TRANSPORT", name)
    select.reset()
    try:
        x = cp.full(5, RANK + 1, cp.float32)
        assert_all(select.transport_for(x, "all_reduce").name == name)
        y = funcol.all_reduce(x, "sum", MPI.COMM_WORLD)
        assert_all(isinstance(y, cp.ndarray))
        assert_close_all(y, np.full(5, W * (W + 1) / 2, np.float32))
    finally:
        monkeypatch.delenv("MPILOCAL_TRANSPORT")
        select.reset()


def test_cupy_never_reaches_unaware_mpi(monkeypatch):
    from mpilocal.transport import detect, select
    from mpilocal.transport.cuda_mpi import CudaMpiTransport

    monkeypatch.setenv("MPILOCAL_CUDA_AWARE", "0")
    detect.mpi_cuda_aware.cache_clear()
    saved = select._INSTANCES.pop("cuda_mpi", None)
    try:
        with pytest.raises(RuntimeError, match="not CUDA-aware"):
            CudaMpiTransport()
        monkeypatch.setenv("MPILOCAL_TRANSPORT", "cuda_mpi")
        with pytest.raises(RuntimeError, match="not CUDA-aware"):
            select.choose_gpu("all_gather")
    finally:
        monkeypatch.delenv("MPILOCAL_CUDA_AWARE")
        detect.mpi_cuda_aware.cache_clear()
        if saved is not None:
            select._INSTANCES["cuda_mpi"] = saved


@pytest.mark.skipif("nccl" not in TRANSPORTS, reason="NCCL not usable here")
def test_nccl_communicator_created_once_per_group():
    from mpilocal import init_device_mesh
    from mpilocal.redistribute import mesh_groups
    from mpilocal.transport import select

    t = select.gpu_transport("nccl")
    mesh = init_device_mesh("cuda", (W,))
    g = mesh_groups(mesh)[0]
    x = cp.ones(4, cp.float32)
    out = cp.empty_like(x)
    t.allreduce(x, out, "sum", g)
    c1 = g.cache.get("nccl")
    t.allreduce(x, out, "sum", g)
    t.allgatherv(x, cp.empty(4 * W, cp.float32), [4] * W, g)
    assert_all(c1 is not None and g.cache.get("nccl") is c1, "NCCL communicator was re-created")
    g2 = mesh_groups(init_device_mesh("cuda", (W,)))[0]  # an equal mesh shares its communicators
    assert_all(g2 is g, "equal meshes should share the group (and its NCCL communicator)")
    assert_close_all(out, np.full(4, W, np.float32))


def _oracle(arrays, op):
    out = arrays[0].copy()
    for a in arrays[1:]:
        if out.dtype == np.bool_:
            out = (out | a) if op in ("sum", "max") else (out & a)
        else:
            out = {"sum": np.add, "product": np.multiply, "max": np.maximum, "min": np.minimum}[op](out, a).astype(out.dtype)
    return out


def _inputs(dtype, n, seed=0):
    out = []
    for r in range(W):
        rng = np.random.default_rng(seed * 31 + r)
        if np.dtype(dtype) == np.bool_:
            out.append(rng.integers(0, 2, n).astype(bool))
        elif np.dtype(dtype).kind == "c":
            out.append((rng.choice([1.0, -1.0, 0.5, 2.0], n) + 1j * rng.choice([0.0, 1.0, -0.5], n)).astype(dtype))
        else:
            out.append(rng.choice([1, 2, 3, -1] if np.dtype(dtype).kind != "u" else [1, 2, 3], n).astype(dtype))
    return out


@pytest.mark.parametrize("name", TRANSPORTS)
@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, np.complex128, np.int16, np.uint16, np.float16, np.int8])
def test_reductions_of_dtypes_nccl_lacks(name, dtype):
    from mpilocal.transport import select

    t, g = select.gpu_transport(name), _world_group()
    ops = ["sum", "product"] + ([] if np.dtype(dtype).kind == "c" else ["max", "min"])
    n = 37
    for op in ops:
        xs = _inputs(dtype, n, seed=len(op))
        x = cp.asarray(xs[RANK])
        out = cp.empty_like(x)
        t.allreduce(x, out, op, g)
        assert_close_all(out, _oracle(xs, op), rtol=1e-3 if dtype == np.float16 else 1e-6)
        counts = [n // W + (1 if r < n % W else 0) for r in range(W)]
        off = sum(counts[:RANK])
        rs = cp.empty(counts[RANK], dtype)
        t.reduce_scatterv(x, rs, counts, op, g)
        assert_close_all(rs, _oracle(xs, op)[off:off + counts[RANK]], rtol=1e-3 if dtype == np.float16 else 1e-6)
        # data movement of the same dtype
        ag = cp.empty(n * W, dtype)
        t.allgatherv(x, ag, [n] * W, g)
        assert_close_all(ag, np.concatenate(xs))


@pytest.mark.parametrize("name", TRANSPORTS)
def test_avg_is_sum_divided(monkeypatch, name):
    import mpilocal.functional as funcol
    from mpilocal.transport import select

    monkeypatch.setenv("MPILOCAL_TRANSPORT", name)
    select.reset()
    try:
        for dtype in (np.float16, np.float32, np.float64, np.complex64):
            xs = [np.arange(10, dtype=np.float64).astype(dtype) * (r + 1) for r in range(W)]
            y = funcol.all_reduce(cp.asarray(xs[RANK]), "avg", MPI.COMM_WORLD)
            assert_all(y.dtype == dtype, f"avg changed dtype to {y.dtype}")
            assert_close_all(y, (sum(x.astype(np.complex128) for x in xs) / W).astype(dtype), rtol=1e-3)
    finally:
        monkeypatch.delenv("MPILOCAL_TRANSPORT")
        select.reset()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_stream_ordering(monkeypatch, name):
    """Input produced on a non-default stream, collective issued inside ``with stream``: the result
    is right without any explicit synchronization by the caller."""
    import mpilocal.functional as funcol
    from mpilocal.transport import select

    monkeypatch.setenv("MPILOCAL_TRANSPORT", name)
    select.reset()
    try:
        s = cp.cuda.Stream(non_blocking=True)
        n = 1 << 22
        with s:
            a = cp.zeros(n, cp.float32)
            for _ in range(20):  # keep the stream busy so an unordered collective would read zeros
                a += 1.0
            a *= RANK + 1
            y = funcol.all_reduce(a, "sum", MPI.COMM_WORLD)
            z = funcol.all_gather_tensor(a[:1000], 0, MPI.COMM_WORLD)
            s.synchronize()
        assert_close_all(y[:1000], np.full(1000, 20.0 * W * (W + 1) / 2, np.float32))
        assert_close_all(z, np.concatenate([np.full(1000, 20.0 * (r + 1), np.float32) for r in range(W)]))
    finally:
        monkeypatch.delenv("MPILOCAL_TRANSPORT")
        select.reset()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_redistribute_on_2d_mesh(monkeypatch, name):
    """All transitions of a 2-D mesh (or 1-D when the world is not 4) through one transport."""
    from mpilocal import Partial, Replicate, Shard, distribute_tensor, init_device_mesh
    from mpilocal.transport import select

    monkeypatch.setenv("MPILOCAL_TRANSPORT", name)
    select.reset()
    try:
        shape = (2, 2) if W == 4 else (W,)
        mesh = init_device_mesh("cuda", shape)
        G = np.arange(7 * 6 * 5, dtype=np.float64).reshape(7, 6, 5)
        places = [Shard(0), Shard(1), Replicate()]
        import itertools

        for src in itertools.product(places, repeat=len(shape)):
            for dst in itertools.product(places, repeat=len(shape)):
                dt = distribute_tensor(G, mesh, list(src))
                out = dt.redistribute(mesh, list(dst))
                assert_all(isinstance(out.to_local(), cp.ndarray))
                assert_close_all(out.full_tensor(), G)
        # Partial -> Replicate / Shard
        dt = distribute_tensor(G, mesh, [Replicate()] * len(shape))
        from mpilocal import DTensor

        p = DTensor.from_local(dt.to_local() / mesh.size(), mesh, [Partial()] * len(shape))
        assert_close_all(p.redistribute(mesh, [Replicate()] * len(shape)).to_local(), G)
        assert_close_all(p.redistribute(mesh, [Shard(0)] + [Replicate()] * (len(shape) - 1)).full_tensor(), G)
    finally:
        monkeypatch.delenv("MPILOCAL_TRANSPORT")
        select.reset()
