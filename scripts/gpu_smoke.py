"""Smoke test of the GPU transports on flat buffers against NumPy oracles (every dtype/op/size).

    mpirun -n 2 python scripts/gpu_smoke.py [nccl] [cuda_mpi] [staged]
"""
import os, sys
import numpy as np
from mpi4py import MPI
import cupy as cp
from mpilocal import gpu
gpu.bind_device()
from mpilocal.transport import group_for
from mpilocal.transport import select
comm = MPI.COMM_WORLD
g = group_for(comm)
k, me = g.size, g.rank
names = sys.argv[1:] or ["nccl", "cuda_mpi", "staged"]
rng = np.random.default_rng(0)
bad = 0
for name in names:
    t = select.gpu_transport(name)
    for dt in [np.float32, np.float64, np.int32, np.int16, np.uint8, np.bool_, np.complex64, np.float16, np.int64]:
        for n in [0, 1, 7, 1000, 3 << 20]:
            allx = [rng.integers(0, 3, n).astype(dt) for _ in range(k)]
            x = cp.asarray(allx[me])
            for op in ["sum", "max", "min", "product"]:
                if np.dtype(dt).kind == "c" and op in ("max", "min"): continue
                if n > 10000 and op != "sum": continue
                ref = allx[0].copy()
                for a in allx[1:]:
                    if dt == np.bool_:
                        ref = (ref | a) if op in ("sum", "max") else (ref & a)
                    else:
                        ref = {"sum": np.add, "max": np.maximum, "min": np.minimum, "product": np.multiply}[op](ref, a).astype(dt)
                r = cp.empty_like(x)
                t.allreduce(x, r, op, g)
                if not np.array_equal(cp.asnumpy(r), ref):
                    bad += 1; print(name, "allreduce", dt, n, op, "BAD", flush=True)
                # reduce_scatter uneven
                counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
                off = sum(counts[:me])
                r2 = cp.empty(counts[me], dt)
                t.reduce_scatterv(x, r2, counts, op, g)
                if not np.array_equal(cp.asnumpy(r2), ref[off:off + counts[me]]):
                    bad += 1; print(name, "reduce_scatter", dt, n, op, "BAD", flush=True)
            # allgather uneven + even
            for counts in ([n] * k, [max(n - i, 0) for i in range(k)]):
                mine = x[:counts[me]]
                r = cp.empty(sum(counts), dt)
                t.allgatherv(cp.ascontiguousarray(mine), r, counts, g)
                ref = np.concatenate([allx[p][:counts[p]] for p in range(k)])
                if not np.array_equal(cp.asnumpy(r), ref):
                    bad += 1; print(name, "allgather", dt, n, counts, "BAD", flush=True)
            # alltoallv: rank p sends (p+q)%3 * m elements to q
            m = max(n // 8, 1)
            sc = [((me + q) % 3) * m for q in range(k)]
            rc = [((p + me) % 3) * m for p in range(k)]
            full = [np.concatenate([np.full(((p + q) % 3) * m, p * 10 + q) for q in range(k)]).astype(dt) for p in range(k)]
            r = cp.empty(sum(rc), dt)
            t.alltoallv(cp.asarray(full[me]), sc, r, rc, g)
            ref = np.concatenate([np.full(((p + me) % 3) * m, p * 10 + me) for p in range(k)]).astype(dt)
            if not np.array_equal(cp.asnumpy(r), ref):
                bad += 1; print(name, "alltoall", dt, n, "BAD", flush=True)
            b = cp.asarray(allx[me].copy())
            t.bcast(b, k - 1, g)
            if not np.array_equal(cp.asnumpy(b), allx[k - 1]):
                bad += 1; print(name, "bcast", dt, n, "BAD", flush=True)
            counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
            r = cp.empty(counts[me], dt)
            t.scatterv(cp.asarray(allx[0]) if me == 0 else None, counts, r, 0, g)
            if not np.array_equal(cp.asnumpy(r), allx[0][sum(counts[:me]):sum(counts[:me + 1])]):
                bad += 1; print(name, "scatter", dt, n, "BAD", flush=True)
    print(f"rank {me}: {name} done", flush=True)
bad = comm.allreduce(bad)
if me == 0: print("SMOKE", "OK" if bad == 0 else f"FAILED {bad}", flush=True)
sys.exit(1 if bad else 0)
