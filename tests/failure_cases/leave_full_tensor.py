"""The natural mistake of issue 9: only rank 0 calls the collective ``full_tensor()`` (to print it);
the other ranks reach the end of the program. Rank 0 must be ended within about a second, with a
report naming who left and where rank 0 waits (not at the deadline)."""
import time

import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import Shard

rank = MPI.COMM_WORLD.Get_rank()
mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
A = mpilocal.distribute_tensor(np.arange(12.0).reshape(6, 2), mesh, [Shard(0)])
if rank == 0:
    print(A.full_tensor())
    print("UNREACHABLE", flush=True)
else:
    print(f"MISTAKE_AT {time.time():.3f}", flush=True)  # this rank leaves now
