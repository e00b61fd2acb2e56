"""The hot path of mpilocal beside raw mpi4py (and raw NCCL): per-call cost and busbw, in one run.

    mpiexec -n 2 python scripts/bench_hot_path.py                      # CPU: NumPy shards, host MPI
    mpirun -n 2 python scripts/bench_hot_path.py --device cuda         # GPU: + raw NCCL (cupy.cuda.nccl)
    ... --json run.json; python scripts/bench_hot_path.py --merge before.json after.json --labels before,after

Sections (float32; "size" as nccl-tests counts it: the gathered size for all_gather and S0->R, the
input size for all_reduce/reduce_scatter and P->R/P->S0, the per-rank buffer for all_to_all and S0->S1):

* ``latency``: 4 KiB (``--small``) per call: ``DTensor.redistribute`` S0->R, P->R, P->S0, S0->S1 on a
  1-D mesh and the public ``funcol`` all_reduce, all_gather_tensor, reduce_scatter_tensor,
  all_to_all_single, beside raw mpi4py ``Allgather``/``Allreduce``/``Reduce_scatter_block``/``Alltoall``
  on preallocated buffers of the same sizes (and raw NCCL with ``--device cuda``);
* ``pipelined``: the same at 1, 4 and 16 MiB (``--mid``), back-to-back calls, with busbw; on CPU also
  raw mpi4py into a new output per call (``raw_mpi_new``: what mpilocal returns) and S0->S1 done by
  hand with raw mpi4py (``raw_mpi_by_hand``: one NumPy pack copy + ``MPI_Alltoall``, the same work as
  the transition); the % column stays against raw ``raw_mpi`` on preallocated buffers;
* ``new-output``: 64 MiB (``--big``) S0->R and P->R with a new output per call and a sync per call
  (how a user loop looks), beside raw into a preallocated and into a new output;
* ``local_map``: dispatch cost of ``local_map`` (no grad, tiny matmul) over the raw call, Replicate
  and Shard(0) in/out.

Timing: the cases of a section are run in turn, one batch of calls each, for ``--rounds`` rounds (so
mpilocal and raw see the same machine load); a batch's time is the slowest rank's. Reported: the
minimum and the median per-call time over the rounds, and (CPU, latency and local_map) the fastest
single call seen on any round (the slowest rank's): on a loaded machine the closest to an unloaded
call. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

RAW_OF = {"S0->R": "all_gather", "P->R": "all_reduce", "P->S0": "reduce_scatter", "S0->S1": "all_to_all",
          "all_gather_tensor": "all_gather", "all_reduce": "all_reduce", "reduce_scatter_tensor": "reduce_scatter",
          "all_to_all_single": "all_to_all"}


def busbw_factor(op, n):
    return 2 * (n - 1) / n if RAW_OF.get(op, op) == "all_reduce" else (n - 1) / n


def human(b):
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << k and b % (1 << k) == 0:
            return f"{b >> k} {unit}"
    return f"{b} B"


class Bench:
    def __init__(self, comm, cp, rounds, target_s):
        self.comm, self.cp, self.rounds, self.target = comm, cp, rounds, target_s

    def sync(self):
        if self.cp is not None:
            self.cp.cuda.get_current_stream().synchronize()

    def batch(self, fn, k, best=None, i=0):
        """Mean seconds per call of ``k`` back-to-back calls; with ``best`` (an array), also the
        fastest single call (entry ``i``; host time: with --device cuda, launches only)."""
        perf = time.perf_counter
        self.comm.Barrier()
        t0 = perf()
        if best is None:
            for _ in range(k):
                fn()
        else:
            b, t = best[i], t0
            for _ in range(k):
                fn()
                u = perf()
                if u - t < b:
                    b = u - t
                t = u
            best[i] = b
        self.sync()
        return (perf() - t0) / k

    def measure(self, cases):
        """cases: [(key, fn)]; returns {key: (min, median) seconds per call, slowest rank}."""
        from mpi4py import MPI

        comm = self.comm
        ks = []
        for _, fn in cases:  # warm-up and calibration: calls per batch so a batch lasts ~target
            fn(), fn()
            self.sync()
            one = comm.allreduce(self.batch(fn, 3), op=MPI.MAX)
            ks.append(int(max(1, min(2000, self.target / max(one, 1e-7)))))
        ks = [comm.allreduce(k, op=MPI.MIN) for k in ks]
        times = np.zeros((self.rounds, len(cases)))
        best = np.full(len(cases), np.inf)
        for r in range(self.rounds):
            for i, (_, fn) in enumerate(cases):
                times[r, i] = self.batch(fn, ks[i], best if self.cp is None else None, i)
        slow = np.empty_like(times)
        comm.Allreduce(times, slow, op=MPI.MAX)
        bslow = np.empty_like(best)
        comm.Allreduce(best, bslow, op=MPI.MAX)
        return {key: (float(slow[:, i].min()), float(np.median(slow[:, i])), float(bslow[i]))
                for i, (key, _) in enumerate(cases)}


def build(xp, n, size, mesh, funcol, DTensor, Shard, Replicate, Partial):
    """mpilocal cases for one size: {op: fn}."""
    E = max(size // 4, n * n)
    per = E // n
    x_ag = xp.ones(per, xp.float32)  # gathered bytes = size
    x_ar = xp.ones(E, xp.float32)
    x_aa = xp.ones(E - E % n, xp.float32)  # per-rank buffer = size
    cols = 16 * n
    rows_local = max(1, E // cols)  # S0->S1: the local shard is `size` bytes
    gS = (rows_local * n, cols)
    dS1 = DTensor.from_local(xp.ones((rows_local, cols), xp.float32), mesh, [Shard(0)], shape=gS)
    rg = max(n, E // cols // n * n)  # S0->R, P->R, P->S0: the global array is `size` bytes
    gR = (rg, cols)
    dS = DTensor.from_local(xp.ones((rg // n, cols), xp.float32), mesh, [Shard(0)], shape=gR)
    dP = DTensor.from_local(xp.ones(gR, xp.float32), mesh, [Partial()], shape=gR)
    R, S0, S1 = [Replicate()], [Shard(0)], [Shard(1)]
    return {
        "S0->R": lambda: dS.redistribute(mesh, R),
        "P->R": lambda: dP.redistribute(mesh, R),
        "P->S0": lambda: dP.redistribute(mesh, S0),
        "S0->S1": lambda: dS1.redistribute(mesh, S1),
        "all_reduce": lambda: funcol.all_reduce(x_ar, "sum", mesh),
        "all_gather_tensor": lambda: funcol.all_gather_tensor(x_ag, 0, mesh),
        "reduce_scatter_tensor": lambda: funcol.reduce_scatter_tensor(x_ar, "sum", 0, mesh),
        "all_to_all_single": lambda: funcol.all_to_all_single(x_aa, None, None, mesh),
    }


def raw_mpi(comm, xp, n, size, new_output=False):
    from mpi4py import MPI

    E = max(size // 4, n * n)
    per = E // n
    a = xp.ones(E, xp.float32)
    b = xp.empty(E, xp.float32)
    out = (lambda: xp.empty(E, xp.float32)) if new_output else (lambda: b)
    return {
        "all_gather": lambda: comm.Allgather(a[:per], out()[:per * n]),
        "all_reduce": lambda: comm.Allreduce(a, out(), op=MPI.SUM),
        "reduce_scatter": lambda: comm.Reduce_scatter_block(a[:per * n], out()[:per], op=MPI.SUM),
        "all_to_all": lambda: comm.Alltoall(a[:per * n], out()[:per * n]),
    }


def raw_s0s1_by_hand(comm, xp, n, size):
    """S0->S1 of build()'s array with raw mpi4py, the way a user writes it: the pieces packed
    by one NumPy copy, MPI_Alltoall into a new output (the same work as the transition; raw
    MPI_Alltoall alone moves contiguous blocks and transposes nothing)."""
    E = max(size // 4, n * n)
    cols = 16 * n
    rows = max(1, E // cols)
    c = cols // n
    x = xp.ones((rows, cols), xp.float32)
    send = xp.empty((n, rows, c), xp.float32)

    def f():
        send[...] = x.reshape(rows, n, c).transpose(1, 0, 2)
        out = xp.empty((n * rows, c), xp.float32)
        comm.Alltoall(send, out)
        return out

    return f


def raw_nccl(nc, cp, n, size, new_output=False):
    from cupy.cuda import nccl

    E = max(size // 4, n * n)
    per = E // n
    a = cp.ones(E, cp.float32)
    b = cp.empty(E, cp.float32)
    out = (lambda: cp.empty(E, cp.float32)) if new_output else (lambda: b)
    F = nccl.NCCL_FLOAT32

    def s():
        return cp.cuda.get_current_stream().ptr

    def a2a():
        o = out()
        nccl.groupStart()
        for p in range(n):
            nc.send(a.data.ptr + p * per * 4, per, F, p, s())
            nc.recv(o.data.ptr + p * per * 4, per, F, p, s())
        nccl.groupEnd()

    return {
        "all_gather": lambda: nc.allGather(a.data.ptr, out().data.ptr, per, F, s()),
        "all_reduce": lambda: nc.allReduce(a.data.ptr, out().data.ptr, E, F, nccl.NCCL_SUM, s()),
        "reduce_scatter": lambda: nc.reduceScatter(a.data.ptr, out().data.ptr, per, F, nccl.NCCL_SUM, s()),
        "all_to_all": a2a,
    }


def run(args):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    cp = None
    xp = np
    if args.device == "cuda":
        from mpilocal import gpu

        cp = gpu.cupy_or_none()
        if cp is None:
            raise SystemExit("--device cuda needs CuPy and a GPU")
        gpu.bind_device()
        xp = cp
    import mpilocal.functional as funcol
    from mpilocal import DTensor, Partial, Replicate, Shard, init_device_mesh, local_map

    mesh = init_device_mesh(args.device, (n,))
    bench = Bench(comm, cp, args.rounds, args.target_time)
    nc = None
    if cp is not None and not args.no_nccl:
        from cupy.cuda import nccl

        uid = comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0)
        nc = nccl.NcclCommunicator(n, uid, rank)
    rows = []

    def report(section, size, res, ops):
        for op in ops:
            entry = dict(section=section, op=op, bytes=size)
            for path in ("mpilocal", "raw_mpi", "raw_nccl", "raw_mpi_new", "raw_mpi_by_hand"):
                key = (path, op if path in ("mpilocal", "raw_mpi_by_hand") else RAW_OF.get(op, op))
                if key in res:
                    tmin, tmed, tbest = res[key]
                    entry[path] = dict(min_us=tmin * 1e6, med_us=tmed * 1e6, best_us=tbest * 1e6,
                                       busbw=size / tmin * busbw_factor(op, n) / 1e9)
            rows.append(entry)
            if rank == 0 and args.verbose:
                print(section, op, human(size), {k: v for k, v in entry.items() if isinstance(v, dict)}, flush=True)

    def sized(section, size, ops):
        cases = build(xp, n, size, mesh, funcol, DTensor, Shard, Replicate, Partial)
        todo = [(("mpilocal", op), cases[op]) for op in ops]
        if not args.no_raw_mpi and (cp is None or args.raw_mpi_device):
            for op, fn in raw_mpi(comm, xp, n, size).items():
                todo.append((("raw_mpi", op), fn))
            if cp is None and section == "pipelined":  # CPU: the raw side with a new output per call too
                for op, fn in raw_mpi(comm, xp, n, size, new_output=True).items():
                    todo.append((("raw_mpi_new", op), fn))
                if "S0->S1" in ops:
                    todo.append((("raw_mpi_by_hand", "S0->S1"), raw_s0s1_by_hand(comm, xp, n, size)))
        if nc is not None:
            for op, fn in raw_nccl(nc, cp, n, size).items():
                todo.append((("raw_nccl", op), fn))
        report(section, size, bench.measure(todo), ops)

    all_ops = ["S0->R", "P->R", "P->S0", "S0->S1", "all_reduce", "all_gather_tensor", "reduce_scatter_tensor",
               "all_to_all_single"]
    sel = set(args.sections.split(","))
    if "latency" in sel:
        sized("latency", args.small, all_ops)
    if "pipelined" in sel:
        for size in args.mid:
            sized("pipelined", size, all_ops)
    if "new-output" in sel:
        size = args.big
        cases = build(xp, n, size, mesh, funcol, DTensor, Shard, Replicate, Partial)

        def synced(f):
            def g():
                f()
                bench.sync()
            return g

        todo = [(("mpilocal", op), synced(cases[op])) for op in ("S0->R", "P->R")]
        if not args.no_raw_mpi and (cp is None or args.raw_mpi_device):
            raw = raw_mpi(comm, xp, n, size)
            fresh = raw_mpi(comm, xp, n, size, new_output=True)
            todo += [(("raw_mpi", "all_gather"), raw["all_gather"]), (("raw_mpi", "all_reduce"), raw["all_reduce"]),
                     (("raw_mpi_new", "all_gather"), fresh["all_gather"]),
                     (("raw_mpi_new", "all_reduce"), fresh["all_reduce"])]
        if nc is not None:
            raw = raw_nccl(nc, cp, n, size)
            fresh = raw_nccl(nc, cp, n, size, new_output=True)
            todo += [(("raw_nccl", "all_gather"), synced(raw["all_gather"])),
                     (("raw_nccl", "all_reduce"), synced(raw["all_reduce"])),
                     (("raw_nccl_new", "all_gather"), synced(fresh["all_gather"])),
                     (("raw_nccl_new", "all_reduce"), synced(fresh["all_reduce"]))]
        res = bench.measure(todo)
        report("new-output", size, res, ["S0->R", "P->R"])
        for op, raw_op in (("S0->R", "all_gather"), ("P->R", "all_reduce")):
            for path in ("raw_mpi_new", "raw_nccl_new"):
                if (path, raw_op) in res:
                    tmin, tmed, _ = res[(path, raw_op)]
                    e = next(r for r in rows if r["section"] == "new-output" and r["op"] == op)
                    e[path] = dict(min_us=tmin * 1e6, med_us=tmed * 1e6, busbw=size / tmin * busbw_factor(op, n) / 1e9)
    if "local_map" in sel:
        x = xp.ones((8 * n, 4))
        w = xp.ones((4, 4))

        def f(a_, b_):
            return a_ @ b_

        todo = []
        for name, pin in (("Replicate", [Replicate()]), ("Shard(0)", [Shard(0)])):
            from mpilocal import distribute_tensor

            X = distribute_tensor(x, mesh, pin)
            W = distribute_tensor(w, mesh, [Replicate()])
            lm = local_map(f, out_placements=pin, in_placements=(pin, [Replicate()]), device_mesh=mesh)
            xl, wl = X.to_local(), W.to_local()
            todo += [(("mpilocal", f"local_map {name}"), (lambda lm=lm, X=X, W=W: lm(X, W))),
                     (("raw_f", f"local_map {name}"), (lambda xl=xl, wl=wl: f(xl, wl)))]
        res = bench.measure(todo)
        for name in ("Replicate", "Shard(0)"):
            op = f"local_map {name}"
            m, r = res[("mpilocal", op)], res[("raw_f", op)]
            rows.append(dict(section="local_map", op=op, bytes=0,
                             mpilocal=dict(min_us=m[0] * 1e6, med_us=m[1] * 1e6, best_us=m[2] * 1e6),
                             raw_f=dict(min_us=r[0] * 1e6, med_us=r[1] * 1e6, best_us=r[2] * 1e6)))
    return rows


def table(runs, labels):
    """Markdown: per section, one row per (op, size); for each run its mpilocal and raw min / median
    per call and mpilocal's overhead over that run's raw (µs, latency and local_map) or its share of
    that run's raw busbw (min times). Each run is compared with its own raw baseline (same load)."""
    lines = []
    first = runs[0]
    for section in dict.fromkeys(r["section"] for r in first):
        rows0 = [r for r in first if r["section"] == section]
        allrows = [r for run in runs for r in run if r["section"] == section]
        raws = [p for p in ("raw_nccl", "raw_mpi", "raw_f") if any(p in r for r in allrows)]
        extra = [p for p in ("raw_nccl_new", "raw_mpi_new", "raw_mpi_by_hand") if any(p in r for r in allrows)]
        base = raws[0] if raws else None
        lat = section in ("latency", "local_map")
        lines.append(f"\n### {section}\n")
        head = ["op", "size"]
        unit = "min / med (best call) µs" if lat else "min / med µs"
        for lab in labels:
            head += [f"{lab}: mpilocal {unit}", f"{lab}: {base} {unit}"] + \
                    [f"{lab}: {p} {unit}" for p in extra] + \
                    [f"{lab}: min − {base} (best − best) µs" if lat else f"{lab}: % of {base} busbw"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|---:|" + "---:|" * (len(head) - 2))
        for r0 in rows0:
            cells = [r0["op"], human(r0["bytes"]) if r0["bytes"] else "–"]
            for run in runs:
                m = next((r for r in run if (r["section"], r["op"], r["bytes"]) == (section, r0["op"], r0["bytes"])),
                         {})
                for p in ["mpilocal", base] + extra:
                    v = m.get(p)
                    best = f" ({v['best_us']:.1f})" if v and lat and "best_us" in v else ""
                    cells.append(f"{v['min_us']:.1f} / {v['med_us']:.1f}{best}" if v else "–")
                a, b = m.get("mpilocal"), m.get(base)
                if a is None or b is None:
                    cells.append("–")
                elif lat and "best_us" in a and "best_us" in b:
                    cells.append(f"{a['min_us'] - b['min_us']:+.1f} ({a['best_us'] - b['best_us']:+.1f})")
                elif lat:
                    cells.append(f"{a['min_us'] - b['min_us']:+.1f}")
                else:
                    cells.append(f"{100 * b['min_us'] / a['min_us']:.0f}%")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sections", default="latency,pipelined,new-output,local_map")
    p.add_argument("--small", type=int, default=4 << 10)
    p.add_argument("--mid", type=lambda s: [int(float(v)) for v in s.split(",")], default=[1 << 20, 4 << 20, 16 << 20])
    p.add_argument("--big", type=int, default=64 << 20)
    p.add_argument("--rounds", type=int, default=15, help="batches per case (min and median over them)")
    p.add_argument("--target-time", type=float, default=0.02, help="seconds per batch (sets calls per batch)")
    p.add_argument("--no-nccl", action="store_true")
    p.add_argument("--no-raw-mpi", action="store_true")
    p.add_argument("--raw-mpi-device", action="store_true", help="raw mpi4py on device buffers (CUDA-aware MPI)")
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--merge", nargs="*", default=None, help="JSON files of earlier runs: one table, no MPI")
    p.add_argument("--labels", default=None, help="comma list, one label per merged run")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.merge:
        ds = [json.load(open(f)) for f in args.merge]
        labels = args.labels.split(",") if args.labels else [os.path.basename(f) for f in args.merge]
        text = "".join(f"- {lab}: {d['meta']}\n" for lab, d in zip(labels, ds)) + table([d["rows"] for d in ds], labels)
        if args.out:
            open(args.out, "w").write(text)
        print(text)
        return 0
    from mpi4py import MPI

    rows = run(args)
    if MPI.COMM_WORLD.Get_rank() == 0:
        import mpilocal
        from mpilocal.transport import detect

        meta = dict(device=args.device, ranks=MPI.COMM_WORLD.Get_size(), argv=" ".join(sys.argv),
                    mpilocal=os.path.dirname(mpilocal.__file__),
                    mpi=detect.mpi_library_name(),
                    time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), load=os.getloadavg()[0])
        if args.json:
            json.dump(dict(meta=meta, rows=rows), open(args.json, "w"), indent=1)
        text = f"- {meta}\n" + table([rows], ["mpilocal"])
        if args.out:
            open(args.out, "w").write(text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
