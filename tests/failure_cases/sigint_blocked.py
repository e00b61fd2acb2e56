"""Ctrl-C while rank 0 is blocked in a collective that rank 1 has not joined yet (it is busy in
Python code). The test sends SIGINT to every process of the job (as a terminal's Ctrl-C does) or to
one rank; the job must end within about a second, each rank saying where it was."""
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol
from shm_names import print_segments

rank = MPI.COMM_WORLD.Get_rank()
mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
funcol.all_reduce(np.ones(4), "sum", mesh)
print_segments()
print(f"PID {rank} {os.getpid()}", flush=True)
if rank == 1:
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 60)  # "still computing"
funcol.all_gather_tensor(np.ones((2, 3)), 0, mesh)
print("UNREACHABLE", flush=True)
