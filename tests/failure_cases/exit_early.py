"""Rank 1 calls sys.exit(CODE) (argv[1], default 3) while the others wait in a collective."""
import sys
import time

import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol

code = int(sys.argv[1]) if len(sys.argv) > 1 else 3
mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
funcol.all_reduce(np.ones(4), "sum", mesh)
if MPI.COMM_WORLD.Get_rank() == 1:
    print(f"MISTAKE_AT {time.time():.3f}", flush=True)  # this rank leaves now
    sys.exit(code)
x = mpilocal.distribute_tensor(np.arange(12.0).reshape(6, 2), mesh, [mpilocal.Shard(0)])
x.full_tensor()
print("UNREACHABLE", flush=True)
