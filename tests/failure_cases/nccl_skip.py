"""GPU machine only: NCCL watchdog. Rank 1 skips a NCCL all-reduce that rank 0 enqueued; rank 0
waits on its stream. The watchdog (mpilocal.failure.watch_cuda, as the nccl transport registers its
work) must abort the NCCL communicator and the job after MPILOCAL_TIMEOUT, naming the operation.

    MPILOCAL_TIMEOUT=5 mpirun -n 2 python tests/failure_cases/nccl_skip.py

Seen on 2 of 4 H100 (Open MPI 4.1.6, NCCL 2.28): after 5 s rank 0 prints "all_reduce#2 on group of
world ranks [0, 1] did not complete within 5 s", its stream wait is released by ncclCommAbort, and
MPI_Abort ends the job with status 1 (10 s in all, start-up included).
"""
import time

import cupy as cp
import numpy as np
from cupy.cuda import nccl
from mpi4py import MPI

import mpilocal  # noqa: F401  (installs the hooks)
from mpilocal import failure
from mpilocal.transport import group_for

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
cp.cuda.Device(rank % cp.cuda.runtime.getDeviceCount()).use()
g = group_for(comm.Dup())
uid = nccl.get_unique_id() if rank == 0 else None
uid = comm.bcast(uid, root=0)
nc = nccl.NcclCommunicator(comm.Get_size(), uid, rank)
x = cp.ones(1 << 20, dtype=cp.float32)
stream = cp.cuda.Stream(non_blocking=True)


def allreduce():
    with failure.begin("all_reduce", g, x):
        nc.allReduce(x.data.ptr, x.data.ptr, x.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
    failure.watch_cuda("all_reduce", g, stream, nc)


allreduce()
stream.synchronize()
assert float(x[0].get()) == comm.Get_size()
print(f"rank {rank}: first NCCL all_reduce ok", flush=True)
t0 = time.monotonic()
if rank != 1:
    allreduce()
    stream.synchronize()  # never completes: rank 1 did not join
    # reached only because the watchdog aborted the NCCL communicator (the job is being aborted)
    print(f"stream wait released after {time.monotonic() - t0:.1f} s by the watchdog's NCCL abort", flush=True)
else:
    time.sleep(120)
