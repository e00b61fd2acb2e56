"""Collective and redistribute benchmark in the spirit of nccl-tests, side by side with raw baselines.

    mpirun -n 2 python scripts/bench_collectives.py --device cuda [--transports nccl,staged] [--torch]
    mpirun -n 2 python scripts/bench_collectives.py --device cpu          # NumPy shards, host MPI
    python scripts/bench_collectives.py --merge a.json b.json --out table.md --png plot.png

Measured per operation and size (float32; "size" is nccl-tests' byte count: the gathered size for
all_gather, the input size for reduce_scatter, the per-rank buffer for all_to_all):

* ``mpilocal[T]``: ``mpilocal.functional`` (all_gather_tensor, all_reduce, reduce_scatter_tensor,
  all_to_all_single) with transport T forced, and the matching ``DTensor.redistribute`` transitions
  S(0)->R, P->R, P->S(0), S(0)->S(1) on a 1-D mesh;
* ``raw_nccl``: ``cupy.cuda.nccl`` called directly on preallocated buffers (one communicator);
* ``raw_mpi``: mpi4py's Allgather/Allreduce/Reduce_scatter_block/Alltoall on the same buffers -- device
  buffers when the MPI is CUDA-aware, else the naive host staging (``cupy.asnumpy`` + MPI + copy back)
  when ``--naive-staging`` is given; NumPy arrays with ``--device cpu``;
* ``torch``: PyTorch DTensor's redistribute (NCCL backend) on the same shapes, with ``--torch``.

Time: back-to-back iterations after warm-up, the slowest rank's mean; busbw as nccl-tests defines
it (all_reduce: S/t*2(n-1)/n; all_gather, reduce_scatter, all_to_all: S/t*(n-1)/n). Rank 0 writes
a JSON file (``--json``) and a markdown table (``--out``); ``--merge`` joins runs into one table and
a PNG plot (busbw against size per operation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

OPS = ["all_gather", "all_reduce", "reduce_scatter", "all_to_all"]
REDIS = {"S0->R": "all_gather", "P->R": "all_reduce", "P->S0": "reduce_scatter", "S0->S1": "all_to_all"}


def busbw_factor(op, n):
    if op == "all_reduce":
        return 2 * (n - 1) / n
    return (n - 1) / n


def sizes_list(lo, hi):
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 4 if s < (256 << 20) else 2
    return out


def human(b):
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << k:
            return f"{b / (1 << k):g} {unit}"
    return f"{b} B"


# ------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, comm, cp, target_s, max_iters):
        self.comm, self.cp, self.target, self.max_iters = comm, cp, target_s, max_iters

    def sync(self):
        if self.cp is not None:
            self.cp.cuda.get_current_stream().synchronize()
            self.cp.cuda.Device().synchronize()

    def __call__(self, fn, sync=None):
        sync = sync or self.sync
        comm = self.comm
        fn()
        fn()
        sync()
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        sync()
        one = comm.allreduce(time.perf_counter() - t0, op=_MAX())
        iters = int(max(3, min(self.max_iters, self.target / max(one, 1e-7))))
        iters = comm.allreduce(iters, op=_MIN())
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        dt = (time.perf_counter() - t0) / iters
        return comm.allreduce(dt, op=_MAX())


def _MAX():
    from mpi4py import MPI

    return MPI.MAX


def _MIN():
    from mpi4py import MPI

    return MPI.MIN


# ------------------------------------------------------------------------------------------------
def run(args):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    dev = args.device
    if dev == "cuda":
        from mpilocal import gpu

        cp = gpu.cupy_or_none()
        if cp is None:
            raise SystemExit("--device cuda needs CuPy and a GPU")
        gpu.bind_device()
        xp = cp
    else:
        cp, xp = None, np
    import mpilocal.functional as funcol
    from mpilocal import DTensor, Partial, Replicate, Shard, init_device_mesh
    from mpilocal.transport import detect, select

    timer = Timer(comm, cp, args.target_time, args.max_iters)
    mesh = init_device_mesh(dev, (n,))
    sizes = sizes_list(args.min_bytes, args.max_bytes)
    rows = []  # dicts: path, op, kind (collective|redistribute), bytes, time_us, busbw

    def add(path, op, kind, size, t):
        path += args.tag
        f = busbw_factor(REDIS.get(op, op), n)
        rows.append(dict(path=path, op=op, kind=kind, bytes=size, time_us=t * 1e6, busbw=size / t * f / 1e9))
        if rank == 0 and args.verbose:
            print(f"{path:18s} {kind:12s} {op:15s} {human(size):>9s} {t * 1e6:11.1f} us {size / t * f / 1e9:8.2f} GB/s",
                  flush=True)

    aware = detect.mpi_cuda_aware()[0]
    transports = ["host"] if dev == "cpu" else [t for t in args.transports.split(",") if t]

    def elems(size):
        return max(size // 4, 256 * n)

    # ---------------- mpilocal collectives and redistribute, per transport ----------------
    for tname in transports:
        os.environ["MPILOCAL_TRANSPORT"] = tname
        select.reset()
        label = f"mpilocal[{tname}]"
        for size in sizes:
            if tname == "staged" and size > args.staged_max:
                continue
            E = elems(size)
            per = E // n
            x_ag = xp.ones(per, xp.float32)  # all_gather: size = gathered bytes
            x_ar = xp.ones(E, xp.float32)
            x_aa = xp.ones((n * (per // n),), xp.float32)  # all_to_all: per-rank buffer of ~size / n
            x_aa_full = xp.ones(E - E % n, xp.float32)
            g = mesh
            add(label, "all_gather", "collective", per * n * 4, timer(lambda: funcol.all_gather_tensor(x_ag, 0, g)))
            add(label, "all_reduce", "collective", E * 4, timer(lambda: funcol.all_reduce(x_ar, "sum", g)))
            add(label, "reduce_scatter", "collective", E * 4,
                timer(lambda: funcol.reduce_scatter_tensor(x_ar, "sum", 0, g)))
            add(label, "all_to_all", "collective", x_aa_full.nbytes,
                timer(lambda: funcol.all_to_all_single(x_aa_full, None, None, g)))
            del x_aa
            # redistribute on a (rows, 256) global array
            cols = 256
            R = max(E // cols // n * n, n)
            Gshape = (R, cols)
            loc_s0 = xp.ones((R // n, cols), xp.float32)
            loc_full = xp.ones(Gshape, xp.float32)
            dS = DTensor.from_local(loc_s0, mesh, [Shard(0)], shape=Gshape)
            dP = DTensor.from_local(loc_full, mesh, [Partial()], shape=Gshape)
            gb = R * cols * 4
            add(label, "S0->R", "redistribute", gb, timer(lambda: dS.redistribute(mesh, [Replicate()])))
            add(label, "P->R", "redistribute", gb, timer(lambda: dP.redistribute(mesh, [Replicate()])))
            add(label, "P->S0", "redistribute", gb, timer(lambda: dP.redistribute(mesh, [Shard(0)])))
            add(label, "S0->S1", "redistribute", gb // n, timer(lambda: dS.redistribute(mesh, [Shard(1)])))
            del x_ag, x_ar, x_aa_full, loc_s0, loc_full, dS, dP
            if cp is not None:
                cp.get_default_memory_pool().free_all_blocks()
    os.environ.pop("MPILOCAL_TRANSPORT", None)
    select.reset()

    # ---------------- raw NCCL ----------------
    if dev == "cuda" and not args.no_raw_nccl:
        from cupy.cuda import nccl

        uid = comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0)
        nc = nccl.NcclCommunicator(n, uid, rank)
        for size in sizes:
            E = elems(size)
            per = E // n
            a = cp.ones(E, cp.float32)
            b = cp.empty(E, cp.float32)
            s = lambda: cp.cuda.get_current_stream().ptr  # noqa: E731
            add("raw_nccl", "all_gather", "collective", per * n * 4,
                timer(lambda: nc.allGather(a.data.ptr, b.data.ptr, per, nccl.NCCL_FLOAT32, s())))
            add("raw_nccl", "all_reduce", "collective", E * 4,
                timer(lambda: nc.allReduce(a.data.ptr, b.data.ptr, E, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, s())))
            add("raw_nccl", "reduce_scatter", "collective", per * n * 4,
                timer(lambda: nc.reduceScatter(a.data.ptr, b.data.ptr, per, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, s())))
            m = per

            def a2a():
                nccl.groupStart()
                for p in range(n):
                    nc.send(a.data.ptr + p * m * 4, m, nccl.NCCL_FLOAT32, p, s())
                    nc.recv(b.data.ptr + p * m * 4, m, nccl.NCCL_FLOAT32, p, s())
                nccl.groupEnd()

            add("raw_nccl", "all_to_all", "collective", m * n * 4, timer(a2a))
            del a, b
            cp.get_default_memory_pool().free_all_blocks()

    # ---------------- raw mpi4py ----------------
    raw_mode = None
    if dev == "cpu":
        raw_mode = "host"
    elif aware:
        raw_mode = "device"
    elif args.naive_staging:
        raw_mode = "naive"
    if raw_mode is not None and not args.no_raw_mpi:
        label = {"host": "raw_mpi", "device": "raw_mpi(cuda-aware)", "naive": "raw_mpi(naive staging)"}[raw_mode]
        for size in sizes:
            if raw_mode == "naive" and size > args.naive_max:
                continue
            E = elems(size)
            per = E // n
            a = xp.ones(E, xp.float32)
            b = xp.empty(E, xp.float32)

            def wrap(f):
                if raw_mode != "naive":
                    def g():
                        if raw_mode == "device":
                            cp.cuda.get_current_stream().synchronize()
                        f(a, b)
                    return g

                def g2():
                    ha, hb = cp.asnumpy(a), np.empty(E, np.float32)
                    f(ha, hb)
                    b.set(hb)
                return g2

            add(label, "all_gather", "collective", per * n * 4, timer(wrap(lambda s, r: comm.Allgather(s[:per], r[:per * n]))))
            add(label, "all_reduce", "collective", E * 4, timer(wrap(lambda s, r: comm.Allreduce(s, r, op=MPI.SUM))))
            add(label, "reduce_scatter", "collective", per * n * 4,
                timer(wrap(lambda s, r: comm.Reduce_scatter_block(s[:per * n], r[:per], op=MPI.SUM))))
            add(label, "all_to_all", "collective", per * n * 4, timer(wrap(lambda s, r: comm.Alltoall(s[:per * n], r[:per * n]))))
            del a, b
            if cp is not None:
                cp.get_default_memory_pool().free_all_blocks()

    # ---------------- PyTorch DTensor ----------------
    if args.torch:
        try:
            rows.extend(dict(r, path=r["path"] + args.tag) for r in torch_rows(args, comm, sizes, elems, timer, dev))
        except Exception as exc:  # report, keep the other numbers
            if rank == 0:
                print(f"torch DTensor section failed: {type(exc).__name__}: {exc}", flush=True)
    return rows


def torch_rows(args, comm, sizes, elems, timer, dev):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    n, rank = comm.Get_size(), comm.Get_rank()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + (os.getpid() % 1) + 17))
    os.environ["MASTER_PORT"] = comm.bcast(os.environ["MASTER_PORT"], root=0)
    backend = "nccl" if dev == "cuda" else "gloo"
    if dev == "cuda":
        from mpilocal import gpu

        torch.cuda.set_device(gpu.bind_device())
    dist.init_process_group(backend, rank=rank, world_size=n)
    mesh = init_device_mesh(dev, (n,))
    out = []

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for size in sizes:
        E = elems(size)
        cols = 256
        R = max(E // cols // n * n, n)
        gb = R * cols * 4
        loc_s0 = torch.ones((R // n, cols), dtype=torch.float32, device=dev)
        loc_full = torch.ones((R, cols), dtype=torch.float32, device=dev)
        dS = DTensor.from_local(loc_s0, mesh, [Shard(0)], run_check=False)
        dP = DTensor.from_local(loc_full, mesh, [Partial()], run_check=False)

        def go(d, pl):
            return lambda: d.redistribute(mesh, pl).to_local()

        for op, d, pl, b in (("S0->R", dS, [Replicate()], gb), ("P->R", dP, [Replicate()], gb),
                             ("P->S0", dP, [Shard(0)], gb), ("S0->S1", dS, [Shard(1)], gb // n)):
            t = timer(go(d, pl), sync=sync)
            f = busbw_factor(REDIS[op], n)
            out.append(dict(path="torch_dtensor", op=op, kind="redistribute", bytes=b, time_us=t * 1e6,
                            busbw=b / t * f / 1e9))
            if rank == 0 and args.verbose:
                print(f"{'torch_dtensor':18s} {'redistribute':12s} {op:15s} {human(b):>9s} {t * 1e6:11.1f} us "
                      f"{b / t * f / 1e9:8.2f} GB/s", flush=True)
        del loc_s0, loc_full, dS, dP
        if dev == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------------------------
def table(rows, meta):
    """Markdown: one block per (kind, op); a column per path with time (us) and busbw (GB/s)."""
    paths = []
    for r in rows:
        if r["path"] not in paths:
            paths.append(r["path"])
    lines = []
    keys = []
    for r in rows:
        k = (r["kind"], r["op"])
        if k not in keys:
            keys.append(k)
    for kind, op in keys:
        sub = [r for r in rows if (r["kind"], r["op"]) == (kind, op)]
        ps = [p for p in paths if any(r["path"] == p for r in sub)]
        # redistribute rows are also compared against the raw collective they run
        base_op = REDIS.get(op)
        lines.append(f"\n### {kind}: {op}" + (f" (raw baseline: {base_op})" if base_op else "") + "\n")
        raw = [r for r in rows if r["kind"] == "collective" and r["op"] == (base_op or op)
               and r["path"].startswith("raw")]
        rps = []
        for r in raw:
            if r["path"] not in rps:
                rps.append(r["path"])
        cols = ps + ([f"{p} [{base_op}]" for p in rps] if base_op else [])
        lines.append("| size | " + " | ".join(f"{c} us | {c} GB/s" for c in cols) + " |")
        lines.append("|---:|" + "---:|---:|" * len(cols))
        for size in sorted({r["bytes"] for r in sub}):
            cells = []
            for p in ps:
                m = [r for r in sub if r["path"] == p and r["bytes"] == size]
                cells.append(f"{m[0]['time_us']:.1f} | {m[0]['busbw']:.2f}" if m else "– | –")
            if base_op:
                for p in rps:
                    m = [r for r in raw if r["path"] == p and abs(r["bytes"] - size) <= size * 0.02 + 4096]
                    m = [r for r in raw if r["path"] == p and r["bytes"] == min((q["bytes"] for q in raw if q["path"] == p),
                                                                                  key=lambda b: abs(b - size))] if not m else m
                    cells.append(f"{m[0]['time_us']:.1f} | {m[0]['busbw']:.2f}" if m else "– | –")
            lines.append(f"| {human(size)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    for r in rows:
        k = (r["kind"], r["op"])
        if k not in keys:
            keys.append(k)
    ncol = 4
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (kind, op) in zip(axes.flat, keys):
        sub = [r for r in rows if (r["kind"], r["op"]) == (kind, op)]
        if kind == "redistribute":
            sub = sub + [dict(r, path=r["path"] + f" [{REDIS[op]}]") for r in rows
                         if r["kind"] == "collective" and r["op"] == REDIS[op] and r["path"].startswith("raw_nccl")]
        for p in dict.fromkeys(r["path"] for r in sub):
            pts = sorted((r["bytes"], r["busbw"]) for r in sub if r["path"] == p)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{kind}: {op}")
        ax.set_xlabel("bytes")
        ax.set_ylabel("busbw GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--transports", default="nccl,staged", help="GPU transports to measure (comma list)")
    p.add_argument("--min-bytes", type=int, default=4 << 10)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--staged-max", type=int, default=1 << 30)
    p.add_argument("--naive-staging", action="store_true", help="raw mpi4py through cupy.asnumpy when MPI is not CUDA-aware")
    p.add_argument("--naive-max", type=int, default=64 << 20)
    p.add_argument("--no-raw-nccl", action="store_true")
    p.add_argument("--no-raw-mpi", action="store_true")
    p.add_argument("--torch", action="store_true", help="also PyTorch DTensor's redistribute")
    p.add_argument("--target-time", type=float, default=0.15, help="seconds per measurement (sets iterations)")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None, help="markdown table")
    p.add_argument("--png", default=None)
    p.add_argument("--title", default="")
    p.add_argument("--tag", default="", help="suffix for every path label of this run (e.g. the MPI used)")
    p.add_argument("--merge", nargs="*", default=None, help="JSON files to join into one table/plot (no MPI)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    if args.merge:
        rows, metas = [], []
        for f in args.merge:
            d = json.load(open(f))
            rows += d["rows"]
            metas.append(d["meta"])
        text = f"# {args.title or 'collectives'}\n\n" + "\n".join(f"- run: {m}" for m in metas) + "\n" + table(rows, metas)
        if args.out:
            open(args.out, "w").write(text)
        print(text)
        if args.png:
            plot(rows, args.png)
        return 0

    if args.device is None:
        try:
            from mpilocal import gpu

            args.device = "cuda" if gpu.cupy_or_none() is not None else "cpu"
        except Exception:
            args.device = "cpu"
    if args.max_bytes is None:
        args.max_bytes = (1 << 30) if args.device == "cuda" else (64 << 20)
    from mpi4py import MPI

    rows = run(args)
    if MPI.COMM_WORLD.Get_rank() == 0:
        from mpilocal.transport import detect

        meta = dict(device=args.device, ranks=MPI.COMM_WORLD.Get_size(), argv=" ".join(sys.argv),
                    mpi=detect.mpi_library_name(), cuda_aware=detect.mpi_cuda_aware()[0],
                    nccl=detect.nccl_version()[0], time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        if args.json:
            json.dump(dict(meta=meta, rows=rows), open(args.json, "w"), indent=1)
        text = f"# {args.title or 'collectives'}\n\n- {meta}\n" + table(rows, [meta])
        if args.out:
            open(args.out, "w").write(text)
        print(text, flush=True)
        if args.png:
            plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
