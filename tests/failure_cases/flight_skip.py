"""Flight recorder, deadline case: the ranks run a few collectives on a mesh, then the last rank skips
one all_gather and is busy elsewhere. The others hit the deadline (FLIGHT_SKIP_TIMEOUT seconds, default 4,
set just before it); every rank prints its ring, and
with MPILOCAL_FLIGHT_DIR set writes it, so `python -m mpilocal flight DIR` marks the skipping rank."""
import os
import time

import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol

rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
MPI.COMM_WORLD.Barrier()  # raw, no deadline: ranks that start slowly on a loaded machine are not the case
mesh = mpilocal.init_device_mesh("cpu", (size,))
x = np.arange(6.0).reshape(2, 3)
for step in range(3):
    funcol.all_reduce(x, "sum", mesh)
    if step == 2:
        # the short deadline only for the collective under test (FLIGHT_SKIP_TIMEOUT): on a loaded machine
        # the start and the warm-up calls may take longer than that, under MPILOCAL_TIMEOUT
        mpilocal.deadline.set_timeout(float(os.environ.get("FLIGHT_SKIP_TIMEOUT", "4")))
        if rank == size - 1:
            time.sleep(120)  # "busy elsewhere": never issues the all_gather below
    funcol.all_gather_tensor(x.astype(np.float32), 0, mesh)
print("UNREACHABLE", flush=True)
