"""Flight recorder, failed verdict: under MPILOCAL_DEBUG=1 the ranks run two common collectives, then
rank 0 runs an all_gather (S->R) where the others run an all_reduce (P->R). The fingerprint check
fails on every rank; the error (uncaught) carries the ranks' compared rings, so every rank prints
where they first differ (collective #3 of the mesh dim) with its own ring, that point marked."""
import numpy as np
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol
from mpilocal import DTensor, Partial, Replicate, Shard

rank = MPI.COMM_WORLD.Get_rank()
mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
a = DTensor.from_local(np.ones((4, 8), np.float32), mesh, [Shard(0)], shape=(4 * mesh.size(), 8))
b = DTensor.from_local(np.ones((4, 8), np.float32), mesh, [Partial()])
funcol.all_reduce(np.ones(3), "sum", mesh)
funcol.all_reduce(np.ones(3), "max", mesh)
if rank == 0:
    a.redistribute(mesh, [Replicate()])
else:
    b.redistribute(mesh, [Replicate()])
print(f"NO ERROR on rank {rank}", flush=True)
