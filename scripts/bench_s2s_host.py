"""S0->S1 on the host, its two modes beside raw mpi4py, in one run (issue 11).

    mpiexec -n 2 python scripts/bench_s2s_host.py --sizes 1e6,4e6,16e6 [--cols 32] [--old /path/old_collectives.py]

Per size: the local shard is (rows, cols) float32 of about ``size`` bytes (cols = 16 x ranks by
default: 64-byte runs at 2 ranks, as bench_hot_path's S0->S1). Cases, interleaved round by round:

* ``raw``: ``MPI_Alltoall`` of ``size`` bytes between preallocated contiguous buffers (issue 11's baseline);
* ``by_hand``: the same transform with raw mpi4py as a user writes it (one NumPy pack copy, then
  ``MPI_Alltoall`` into a new output);
* ``auto``: ``collectives.all_to_all_dims`` as chosen (``host.dims_mode``), and the forced modes
  ``types`` (one ``MPI_Alltoallw``) and ``pack`` (``MPI_Pack`` + ``MPI_Alltoallv`` + own piece);
* ``old`` (with ``--old``): the all_to_all_dims of another collectives.py (e.g. ``git show
  bef4938:mpilocal/collectives.py``), loaded as a module of this mpilocal.

Reported per case: the 10th percentile and the median of single-call times (slowest rank), which
keep their order on a loaded machine better than batch means, and raw's p10 as a % of the case's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from mpilocal import collectives
from mpilocal.transport import detect, group_for, host


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")],
                   default=[1 << 20, 4 << 20, 16 << 20])
    p.add_argument("--cols", type=int, default=None)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--calls", type=int, default=30, help="calls per case per round")
    p.add_argument("--old", default=None, help="a collectives.py whose all_to_all_dims is timed as 'old'")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    n, me = comm.Get_size(), comm.Get_rank()
    g = group_for(comm)
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("mpilocal._bench_old_collectives", args.old)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old
        spec.loader.exec_module(old)
    perf = time.perf_counter
    for size in args.sizes:
        cols = args.cols or 16 * n
        rows = max(1, size // 4 // cols)
        c = cols // n
        x = np.ones((rows, cols), np.float32)
        src, dst = [rows] * n, [c] * n
        a = np.ones(rows * cols, np.float32)
        b = np.empty(rows * cols, np.float32)
        send = np.empty((n, rows, c), np.float32)

        def by_hand():
            send[...] = x.reshape(rows, n, c).transpose(1, 0, 2)
            out = np.empty((n * rows, c), np.float32)
            comm.Alltoall(send, out)

        def mode(m):
            def f():
                host._FORCE_MODE[0] = m
                try:
                    collectives.all_to_all_dims(x, 0, 1, g, src, dst)
                finally:
                    host._FORCE_MODE[0] = None
            return f

        cases = {"raw": lambda: comm.Alltoall(a, b), "by_hand": by_hand, "auto": mode(None), "types": mode("types"),
                 "pack": mode("pack")}
        if old is not None:
            cases["old"] = lambda: old.all_to_all_dims(x, 0, 1, g, src, dst)
        ref = np.concatenate([x[:, me * c:(me + 1) * c]] * n)
        for name, f in cases.items():  # warm up, and check the transitions against NumPy
            f()
        for m in (None, "types", "pack"):
            host._FORCE_MODE[0] = m
            ok = np.array_equal(collectives.all_to_all_dims(x, 0, 1, g, src, dst), ref)
            host._FORCE_MODE[0] = None
            if not comm.allreduce(ok, op=MPI.LAND):
                raise SystemExit(f"mode {m}: wrong result")
        res = {k: [] for k in cases}
        for _ in range(args.rounds):
            for name, f in cases.items():
                comm.Barrier()
                t = perf()
                for _ in range(args.calls):
                    f()
                    u = perf()
                    res[name].append(u - t)
                    t = u
        p10 = {k: comm.allreduce(float(np.percentile(v, 10)), op=MPI.MAX) for k, v in res.items()}
        med = {k: comm.allreduce(float(np.median(v)), op=MPI.MAX) for k, v in res.items()}
        if me == 0:
            lib = detect.mpi_library_name()[:24]
            mode_auto = host.dims_mode(host.dims_bound(x.shape, 4, 0, 1, src, dst))
            line = (f"{lib} n={n} {size >> 10} KiB run={c * 4} B auto={mode_auto} load={os.getloadavg()[0]:.1f} | "
                    "p10 (median) us, raw p10 as % of it:")
            for k in cases:
                line += f" {k} {p10[k] * 1e6:.1f} ({med[k] * 1e6:.1f}) {100 * p10['raw'] / p10[k]:.0f}%;"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
