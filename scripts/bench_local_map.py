"""local_map benchmark: dispatch overhead per call, and (GPU) a row-sharded matmul against one GPU.

    mpirun -n 2 python scripts/bench_local_map.py --device cpu [--torch]
    mpirun -n 2 python scripts/bench_local_map.py --device cuda [--torch] [--matmul 16384]

Dispatch overhead: a tiny matmul (8x8 @ 8x8 shards) through ``local_map`` with aligned inputs (no
redistribution), against the raw function on the same local arrays; in/out placements Replicate
(no communication at all) and Shard(0) in / Shard(0) out (the output's global shape is agreed by a
non-blocking metadata all-gather). With ``--torch``: PyTorch DTensor's
``torch.distributed.tensor.experimental.local_map`` on the same workload (gloo on CPU, NCCL on GPU).
Numbers are the best batch's mean per call, the slowest rank's.

Row-sharded matmul (GPU): C = A @ B with A (M x K) Shard(0) over the ranks, B (K x N) replicated,
C Shard(0): ``local_map(matmul)`` per rank against the full matmul on one GPU; ideal = n× speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def per_call(fn, sync, comm, repeat, batches=20):
    from mpi4py import MPI

    n = max(1, repeat // batches)
    best = float("inf")
    for _ in range(3):
        fn()
    sync()
    for _ in range(batches):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / n)
    return comm.allreduce(best, op=MPI.MAX)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--repeat", type=int, default=4000)
    p.add_argument("--torch", action="store_true")
    p.add_argument("--matmul", type=int, default=16384, help="M = K = N of the sharded matmul (GPU)")
    p.add_argument("--matmul-dtype", default="float32")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    if args.device is None:
        from mpilocal import gpu

        args.device = "cuda" if gpu.cupy_or_none() is not None else "cpu"
    dev = args.device
    if dev == "cuda":
        from mpilocal import gpu

        cp = gpu.cupy_or_none()
        gpu.bind_device()
        xp = cp

        def sync():
            cp.cuda.get_current_stream().synchronize()
    else:
        cp, xp = None, np

        def sync():
            pass

    from mpilocal import DTensor, Replicate, Shard, init_device_mesh, local_map

    mesh = init_device_mesh(dev, (n,))
    lines = [f"# local_map benchmark ({dev}, {n} ranks)", "",
             f"- command: `mpirun -n {n} python {' '.join(sys.argv)}`",
             f"- time: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
             + (f"; load average: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""), "",
             "## dispatch overhead per call (tiny matmul 8x8 @ 8x8 per rank, aligned inputs)", "",
             "| case | raw function us | local_map us | overhead us | torch DTensor local_map us | torch overhead us |",
             "|---|---:|---:|---:|---:|---:|"]

    a = xp.asarray(np.random.default_rng(rank).standard_normal((8, 8)).astype(np.float32))
    b = xp.asarray(np.random.default_rng(99).standard_normal((8, 8)).astype(np.float32))

    def mm(x, y):
        return x @ y

    cases = {}
    R = [Replicate()]
    S0 = [Shard(0)]
    dR_a = DTensor.from_local(a, mesh, R, shape=(8, 8))
    dR_b = DTensor.from_local(b, mesh, R, shape=(8, 8))
    dS_a = DTensor.from_local(a, mesh, S0, shape=(8 * n, 8))
    lm_R = local_map(mm, out_placements=R, in_placements=(R, R))
    lm_S = local_map(mm, out_placements=S0, in_placements=(S0, R))
    raw = per_call(lambda: mm(a, b), sync, comm, args.repeat)
    cases["Replicate in/out"] = (raw, per_call(lambda: lm_R(dR_a, dR_b), sync, comm, args.repeat))
    cases["Shard(0) in/out"] = (raw, per_call(lambda: lm_S(dS_a, dR_b), sync, comm, args.repeat))

    torch_cases = {}
    if args.torch:
        try:
            torch_cases = torch_dispatch(args, comm, dev)
        except Exception as exc:
            if rank == 0:
                print(f"torch section failed: {type(exc).__name__}: {exc}", flush=True)
    for k, (r, l) in cases.items():
        tr = torch_cases.get(k)
        tcol = f"{tr[1] * 1e6:.1f} | {(tr[1] - tr[0]) * 1e6:.1f}" if tr else "– | –"
        lines.append(f"| {k} | {r * 1e6:.2f} | {l * 1e6:.2f} | {(l - r) * 1e6:.2f} | {tcol} |")

    if dev == "cuda":
        M = args.matmul
        dt = np.dtype(args.matmul_dtype)
        rows = M // n
        rng = cp.random.default_rng(rank)
        A_loc = rng.standard_normal((rows, M), dtype=np.float32).astype(dt)
        B = cp.random.default_rng(7).standard_normal((M, M), dtype=np.float32).astype(dt)
        A_full = cp.concatenate([A_loc] * n)
        dA = DTensor.from_local(A_loc, mesh, S0, shape=(rows * n, M))
        dB = DTensor.from_local(B, mesh, R, shape=(M, M))
        lm = local_map(mm, out_placements=S0, in_placements=(S0, R))
        rep = 10
        t_one = per_call(lambda: A_full @ B, sync, comm, rep, batches=rep)
        t_lm = per_call(lambda: lm(dA, dB), sync, comm, rep, batches=rep)
        t_raw = per_call(lambda: A_loc @ B, sync, comm, rep, batches=rep)
        flops = 2.0 * M * M * M
        eff = t_one / (n * t_lm)
        lines += ["", f"## row-sharded matmul ({M}x{M} @ {M}x{M}, {dt.name}), A Shard(0) over {n} GPUs, B replicated", "",
                  "| path | ms per call | TFLOP/s (whole product) | speed-up vs one GPU | % of ideal |", "|---|---:|---:|---:|---:|",
                  f"| one GPU, full matmul | {t_one * 1e3:.2f} | {flops / t_one / 1e12:.1f} | 1.00 | – |",
                  f"| raw local matmul per rank (no local_map) | {t_raw * 1e3:.2f} | {flops / t_raw / 1e12:.1f} | "
                  f"{t_one / t_raw:.2f} | {100 * t_one / (n * t_raw):.1f} |",
                  f"| local_map(matmul) | {t_lm * 1e3:.2f} | {flops / t_lm / 1e12:.1f} | {t_one / t_lm:.2f} | {100 * eff:.1f} |"]
    text = "\n".join(lines) + "\n"
    if rank == 0:
        print(text, flush=True)
        if args.out:
            open(args.out, "w").write(text)
    return 0


def torch_dispatch(args, comm, dev):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.experimental import local_map

    n, rank = comm.Get_size(), comm.Get_rank()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    if dev == "cuda":
        from mpilocal import gpu

        torch.cuda.set_device(gpu.bind_device())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev == "cuda" else "gloo", rank=rank, world_size=n)
    mesh = init_device_mesh(dev, (n,))
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(8, 8, generator=g).to(dev)
    b = torch.randn(8, 8, generator=torch.Generator().manual_seed(99)).to(dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def mm(x, y):
        return torch.mm(x, y)

    R, S0 = [Replicate()], [Shard(0)]
    dR_a = DTensor.from_local(a, mesh, R, run_check=False)
    dR_b = DTensor.from_local(b, mesh, R, run_check=False)
    dS_a = DTensor.from_local(a, mesh, S0, run_check=False)
    lm_R = local_map(mm, out_placements=R, in_placements=(R, R), device_mesh=mesh)
    lm_S = local_map(mm, out_placements=S0, in_placements=(S0, R), device_mesh=mesh)
    with torch.no_grad():
        raw = per_call(lambda: mm(a, b), sync, comm, args.repeat)
        out = {"Replicate in/out": (raw, per_call(lambda: lm_R(dR_a, dR_b), sync, comm, args.repeat)),
               "Shard(0) in/out": (raw, per_call(lambda: lm_S(dS_a, dR_b), sync, comm, args.repeat))}
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    sys.exit(main())
