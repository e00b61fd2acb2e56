"""Per-call time of a small halo on CPU: two raw Sendrecv, halo_update (in place), halo_exchange (a
new array), best of 3 x 3000 calls, the slowest rank's; then rank 0's cProfile of halo_update.

    mpiexec -n 2 python benchmarks/probes/halo_percall.py COLS      (COLS 8: 64-byte halos of width 1;
                                                                     1024: 16 KiB halos of width 2)
PB=<bytes> sets transport.host.PREPARED_P2P_BYTES after the first call. Used for the A/B figures in
the 2026-11-30c session note (run with PYTHONPATH pointing at each tree in turn)."""
import cProfile
import os
import pstats
import sys
import time

import numpy as np
from mpi4py import MPI

import mpilocal.functional as funcol
from mpilocal import DTensor, Shard, init_device_mesh
from mpilocal.transport import host

C = MPI.COMM_WORLD
W, R = C.size, C.rank
cols = int(sys.argv[1])
w, n = (2 if cols == 1024 else 1), 64
mesh = init_device_mesh("cpu", (W,))
X = DTensor.from_local(np.ones((n, cols)), mesh, [Shard(0)], shape=(n * W, cols))
P = funcol.halo_exchange(X, 0, 0, w, "periodic")
host.PREPARED_P2P_BYTES = int(os.environ.get("PB", host.PREPARED_P2P_BYTES))
x, left, right = X.to_local(), (R - 1) % W, (R + 1) % W


def t(fn, calls=3000):
    for _ in range(100):
        fn()
    C.Barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return C.allreduce((time.perf_counter() - t0) / calls * 1e6, op=MPI.MAX)


def raw():
    C.Sendrecv(x[:w], left, 11, P[w + n:], right, 11)
    C.Sendrecv(x[n - w:], right, 12, P[:w], left, 12)


res = {name: min(t(fn) for _ in range(3)) for name, fn in (
    ("raw", raw), ("inplace", lambda: funcol.halo_update(P, mesh, 0, w, "periodic")),
    ("new", lambda: funcol.halo_exchange(X, 0, 0, w, "periodic")))}
if R == 0:
    print(cols, {k: round(v, 1) for k, v in res.items()})
pr = cProfile.Profile()
pr.enable()
for _ in range(3000):
    funcol.halo_update(P, mesh, 0, w, "periodic")
pr.disable()
if R == 0:
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)
