"""Rank 1 fails while importing a module (after mpilocal); the others go on into a collective."""
import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol

if MPI.COMM_WORLD.Get_rank() == 1:
    import a_module_that_does_not_exist  # noqa: F401
mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
funcol.all_reduce(np.ones(4), "sum", mesh)
print("UNREACHABLE", flush=True)
