"""init_device_mesh right after import. mpilocal's first communicator completes the leave channel's
MPI_Comm_idup (posted at import) first (deadline.settle_channel): Open MPI 4.1 hung a blocking
MPI_Comm_dup issued while that idup was pending (about half of the runs at 3 ranks)."""
import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol
from mpilocal import deadline

MPI.COMM_WORLD.Barrier()
mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
settled = deadline._chan is None or deadline._chan[1] is None
total = funcol.all_reduce(np.ones(2), "sum", mesh)
print(f"MESH OK {MPI.COMM_WORLD.Get_rank()} {settled} {total.tolist()}", flush=True)
