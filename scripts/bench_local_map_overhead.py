"""Per-call overhead of ``local_map`` on inputs that need no redistribution, next to the raw call.

    mpiexec -n 2 python scripts/bench_local_map_overhead.py [--repeat 20000]

Prints a table (rank 0): microseconds per call (best batch) of the plain local function and of its local_map
wrapper, for Replicate in/out (no communication at all) and Shard(0) in/out (one non-blocking
metadata agreement of the output shape). Run it with PYTHONPATH pointing at two checkouts to
compare versions side by side (the autograd work must leave the no-grad path unchanged).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import Replicate, Shard, distribute_tensor, init_device_mesh, local_map


def per_call(fn, args, repeat, batches=50):
    """Microseconds per call: the best batch of ``repeat // batches`` calls (robust to a busy
    machine), the slowest rank's."""
    n = max(1, repeat // batches)
    best = float("inf")
    for _ in range(batches):
        MPI.COMM_WORLD.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / n)
    return MPI.COMM_WORLD.allreduce(best, op=MPI.MAX) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20000)
    a = ap.parse_args()
    comm = MPI.COMM_WORLD
    mesh = init_device_mesh("cpu", (comm.Get_size(),))
    x = np.ones((8, 4))
    w = np.ones((4, 4))

    def f(a_, b_):
        return a_ @ b_

    rows = []
    for name, pin, pout in (("Replicate in/out", [Replicate()], [Replicate()]),
                            ("Shard(0) in/out", [Shard(0)], [Shard(0)])):
        X = distribute_tensor(x, mesh, pin)
        W = distribute_tensor(w, mesh, [Replicate()])
        lm = local_map(f, out_placements=pout, in_placements=(pin, [Replicate()]), device_mesh=mesh)
        raw = per_call(f, (X.to_local(), W.to_local()), a.repeat)
        wrapped = per_call(lm, (X, W), a.repeat)
        rows.append((name, raw, wrapped, wrapped - raw))
    if comm.Get_rank() == 0:
        print(f"mpilocal from {mpilocal.__file__}, {comm.Get_size()} rank(s), best batch of {a.repeat} calls in 50")
        print(f"{'case':<18} {'raw f (us)':>11} {'local_map (us)':>15} {'overhead (us)':>14}")
        for name, raw, wrapped, over in rows:
            print(f"{name:<18} {raw:>11.2f} {wrapped:>15.2f} {over:>14.2f}")


if __name__ == "__main__":
    main()
