"""Rank 1 raises while the others wait in an all_reduce: the job must abort with rank 1's traceback."""
import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol
from shm_names import print_segments

mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
funcol.all_reduce(np.ones(4), "sum", mesh)  # one good collective first
print_segments()
if MPI.COMM_WORLD.Get_rank() == 1:
    raise ValueError("boom on purpose")
funcol.all_reduce(np.ones(4), "sum", mesh)
print("UNREACHABLE", flush=True)
