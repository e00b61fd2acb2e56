"""Under MPILOCAL_DEBUG=1, rank 0 runs an all_gather (S->R) while the other ranks run an all_reduce
(P->R) on the same mesh dim: every rank must raise CollectiveMismatchError with the diff."""
import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import DTensor, Partial, Replicate, Shard
from mpilocal.agreement import CollectiveMismatchError

rank = MPI.COMM_WORLD.Get_rank()
mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
a = DTensor.from_local(np.ones((4, 8), np.float32), mesh, [Shard(0)], shape=(4 * mesh.size(), 8))
b = DTensor.from_local(np.ones((4, 8), np.float32), mesh, [Partial()])
try:
    if rank == 0:
        a.redistribute(mesh, [Replicate()])
    else:
        b.redistribute(mesh, [Replicate()])
    print(f"NO ERROR on rank {rank}", flush=True)
except CollectiveMismatchError as e:
    print(f"MISMATCH on rank {rank}: {e}", flush=True)
