"""Rank 1 skips a redistribute (an internal all_gather): the deadline report names the operation."""
import time

import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import Replicate, Shard

mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
x = mpilocal.distribute_tensor(np.arange(12.0).reshape(6, 2), mesh, [Shard(0)])
if MPI.COMM_WORLD.Get_rank() != 1:
    x.redistribute(mesh, [Replicate()])
else:
    time.sleep(120)
print("UNREACHABLE", flush=True)
