"""A valid program whose ranks finish at different times: nothing may be aborted.

Rank 0 broadcasts (with MPILOCAL_CHECK_ARGS=0 its MPI_Bcast returns before the others joined) and
leaves at once; the others join that broadcast a second later, then (at 3+ ranks) run collectives
on a mesh without rank 0. Rank 0's leave notice must end nobody: every collective on a group with
rank 0 was issued by rank 0 too, and the later ones do not involve it."""
import time

import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
mesh = mpilocal.init_device_mesh("cpu", (size,))
sub = mpilocal.DeviceMesh("cpu", np.arange(1, size)) if size > 2 else None  # ranks 1.. only
funcol.all_reduce(np.ones(4), "sum", mesh)
x = np.arange(4.0) if rank == 0 else np.zeros(4)
if rank != 0:
    time.sleep(1.0)  # still busy when rank 0 has left
y = funcol.broadcast(x, 0, mesh)
assert np.array_equal(y, np.arange(4.0)), y
if sub is not None and rank != 0:
    time.sleep(0.5)
    z = funcol.all_reduce(np.ones(3), "sum", sub)
    assert np.array_equal(z, np.full(3, size - 1.0)), z
print(f"DONE {rank}", flush=True)
