"""Operators on DTensors: dispatch overhead and bytes moved, next to the local op and local_map.

    mpiexec -n 2 python scripts/bench_ops.py [--repeat 20000] [--device cuda] [--torch] [--n 8192]

Prints (rank 0):

1. Dispatch overhead: microseconds per call (best batch, slowest rank) of ``A + B``, ``A * 2``,
   ``np.exp(A)`` and ``A.sum(axis=1)`` on small ``Shard(0)`` DTensors (64 x 64 float32 global; no
   communication), next to the same op on the local shards; the difference is the dispatch cost.
2. Bytes moved by the chain ``(x @ w1).relu() @ w2`` on a tensor-parallel layout (x replicated, w1
   column-sharded, w2 row-sharded, result reduced to Replicate) through operators, next to the
   hand-written ``local_map`` version (CommDebugMode bytes, this rank), and their times.
3. ``--torch``: the same chain on PyTorch DTensor when ``torch.distributed.tensor`` is importable
   (process group from the MPI rank/size: gloo on cpu, nccl on cuda; MASTER_ADDR/PORT default
   localhost:29533), with its CommDebugMode counts and time.
4. ``--matmul``: ``S(0) @ R`` at ``--n`` (default 8192) square float32, the achieved rate per rank
   next to one local matmul of the whole problem on one device (``S(0) @ R`` needs no
   communication, so p ranks should reach p times one device's rate).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import CommDebugMode, Partial, Replicate, Shard, distribute_tensor, init_device_mesh, local_map


def sync(xp):
    if xp is not np:
        xp.cuda.runtime.deviceSynchronize()


def per_call(fn, repeat, xp=np, batches=50):
    n = max(1, repeat // batches)
    best = float("inf")
    for _ in range(batches):
        MPI.COMM_WORLD.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(xp)
        best = min(best, (time.perf_counter() - t0) / n)
    return MPI.COMM_WORLD.allreduce(best, op=MPI.MAX) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--matmul", action="store_true")
    ap.add_argument("--n", type=int, default=8192)
    a = ap.parse_args()
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    mesh = init_device_mesh(a.device, (size,))
    if a.device == "cuda":
        import cupy as xp
    else:
        xp = np
    S0, S1, R = Shard(0), Shard(1), Replicate()
    rng = np.random.default_rng(0)

    # 1. dispatch overhead
    A = distribute_tensor(xp.asarray(rng.standard_normal((64, 64)).astype(np.float32)), mesh, [S0])
    B = distribute_tensor(xp.asarray(rng.standard_normal((64, 64)).astype(np.float32)), mesh, [S0])
    la, lb = A.to_local(), B.to_local()
    rows = []
    for name, op, local in [("A + B", lambda: A + B, lambda: la + lb), ("A * 2", lambda: A * 2, lambda: la * 2),
                            ("exp(A)", lambda: np.exp(A) if xp is np else A.exp(), lambda: xp.exp(la)),
                            ("A.sum(axis=1)", lambda: A.sum(axis=1), lambda: la.sum(axis=1)),
                            ("A.sum()", lambda: A.sum(), lambda: la.sum())]:
        t_op, t_loc = per_call(op, a.repeat, xp), per_call(local, a.repeat, xp)
        rows.append((name, t_loc, t_op, t_op - t_loc))
    if rank == 0:
        print(f"## dispatch overhead ({size} ranks, {a.device}, 64x64 float32 Shard(0), no communication)\n")
        print("| op | local op (us) | DTensor op (us) | overhead (us) |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} |")

    # 2. the chain's bytes
    b, d, h = 256, 512, 2048
    x = distribute_tensor(xp.asarray(rng.standard_normal((b, d)).astype(np.float32)), mesh, [R])
    w1 = distribute_tensor(xp.asarray(rng.standard_normal((d, h)).astype(np.float32) / 20), mesh, [S1])
    w2 = distribute_tensor(xp.asarray(rng.standard_normal((h, d)).astype(np.float32) / 40), mesh, [S0])

    def with_ops():
        return ((x @ w1).relu() @ w2).redistribute(mesh, [R])

    mlp = local_map(lambda x_, a_, b_: xp.maximum(x_ @ a_, 0) @ b_, out_placements=[Partial()],
                    in_placements=([R], [S1], [S0]))

    def with_local_map():
        return mlp(x, w1, w2).redistribute(mesh, [R])

    res = {}
    for name, f in (("operators", with_ops), ("local_map", with_local_map)):
        with CommDebugMode() as cm:
            out = f()
        res[name] = (cm.get_total_bytes(), dict(cm.get_comm_counts()), per_call(f, 200, xp, batches=10))
        res[name + "_val"] = out.to_local()
    same = bool(xp.allclose(res["operators_val"], res["local_map_val"], rtol=1e-4, atol=1e-4))
    if a.torch:
        res["torch"] = torch_chain(rng, b, d, h, a.device, rank, size)
    if rank == 0:
        print(f"\n## (x @ w1).relu() @ w2 -> Replicate, x {b}x{d} R, w1 {d}x{h} S(1), w2 {h}x{d} S(0), float32\n")
        print("| version | bytes (this rank) | collectives | ms per chain |\n|---|---:|---|---:|")
        for name in ("operators", "local_map", "torch"):
            if name in res and res[name] is not None:
                nb, counts, us = res[name]
                print(f"| {name} | {nb} | {counts} | {us / 1e3:.3f} |")
            elif name == "torch" and a.torch:
                print("| torch | (torch.distributed.tensor not importable) | | |")
        print(f"\nsame result: {same}")

    if a.matmul:
        n = a.n
        M = distribute_tensor(xp.asarray(rng.standard_normal((n, n)).astype(np.float32)), mesh, [S0])
        N = distribute_tensor(xp.asarray(rng.standard_normal((n, n)).astype(np.float32)), mesh, [R])
        t = per_call(lambda: M @ N, 10, xp, batches=5) / 1e6
        ml, nl = M.to_local(), N.to_local()
        full = xp.asarray(rng.standard_normal((n, n)).astype(np.float32))
        t1 = per_call(lambda: full @ nl, 5, xp, batches=5) / 1e6
        if rank == 0:
            print(f"\n## S(0) @ R at {n}x{n} float32\n")
            print(f"{size} ranks: {2 * n ** 3 / t / 1e12:.2f} TFLOP/s in all; one device, whole problem: "
                  f"{2 * n ** 3 / t1 / 1e12:.2f} TFLOP/s; ratio {t1 / t / size:.3f} of {size}x one device")


def torch_chain(rng, b, d, h, device, rank, size):
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.tensor import Replicate as TR, Shard as TS, distribute_tensor as tdist
        from torch.distributed.tensor.debug import CommDebugMode as TCM
        from torch.distributed.device_mesh import init_device_mesh as tmesh
    except Exception:  # noqa: BLE001
        return None
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=size)
    m = tmesh(device, (size,))
    x = tdist(torch.tensor(rng.standard_normal((b, d)).astype(np.float32)), m, [TR()])
    w1 = tdist(torch.tensor(rng.standard_normal((d, h)).astype(np.float32) / 20), m, [TS(1)])
    w2 = tdist(torch.tensor(rng.standard_normal((h, d)).astype(np.float32) / 40), m, [TS(0)])

    def f():
        return (x @ w1).relu().__matmul__(w2).redistribute(m, [TR()])

    with TCM() as cm:
        f()
    counts = {str(k): v for k, v in cm.get_comm_counts().items()}
    t = per_call(lambda: f() if device != "cuda" else (f(), torch.cuda.synchronize()), 200, np, batches=10)
    nb = None  # PyTorch's CommDebugMode counts calls, not bytes
    return (nb, counts, t)


if __name__ == "__main__":
    main()
