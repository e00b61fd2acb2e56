"""Rank 1 skips a collective (catches nothing, just does not call it): deadline abort naming it."""
import time

import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol

mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
funcol.all_reduce(np.ones(4), "sum", mesh)
if MPI.COMM_WORLD.Get_rank() != 1:
    funcol.all_gather_tensor(np.ones((2, 3)), 0, mesh)
else:
    time.sleep(120)  # "busy elsewhere": never joins
print("UNREACHABLE", flush=True)
