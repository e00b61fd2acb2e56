"""GPU machine only: the NCCL watchdog. Rank 1 skips a NCCL all-reduce that rank 0 enqueued through
the nccl transport; rank 0 then waits on its stream. The transport hands every enqueued collective
to mpilocal.deadline.watch_cuda, so after MPILOCAL_TIMEOUT the watchdog aborts the NCCL communicator
and the job, naming the operation.

    MPILOCAL_TIMEOUT=5 MPILOCAL_TRANSPORT=nccl MPILOCAL_CHECK_ARGS=0 mpirun -n 2 python tests/failure_cases/nccl_skip.py

(MPILOCAL_CHECK_ARGS=0 so that the skipped call is the NCCL one, not the host-side argument check.)
Expected: rank 0 prints "all_reduce ... did not complete within 5 s", the job ends with a non-zero
status within seconds.
"""
import time

import cupy as cp
from mpi4py import MPI

import mpilocal.functional as funcol
from mpilocal import init_device_mesh

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
mesh = init_device_mesh("cuda", (comm.Get_size(),))
x = cp.ones(1 << 20, dtype=cp.float32)
y = funcol.all_reduce(x, "sum", mesh)
cp.cuda.get_current_stream().synchronize()
assert float(y[0].get()) == comm.Get_size()
print(f"rank {rank}: first NCCL all_reduce ok", flush=True)
t0 = time.monotonic()
if rank != 1:
    y = funcol.all_reduce(x, "sum", mesh)
    cp.cuda.get_current_stream().synchronize()  # never completes: rank 1 did not join
    print(f"stream wait released after {time.monotonic() - t0:.1f} s by the watchdog's NCCL abort", flush=True)
else:
    time.sleep(120)
