# The first steps of a GPU stencil one by one (synchronized): where the one-time costs land.
# `python first_steps.py default`; round 27 also ran `no-self` on a tree with a private flag
# neighbors._SELF_IN_GROUP (this rank's own copies outside the NCCL group), which the library does not keep.
import sys, time, numpy as np, cupy as cp
from mpi4py import MPI
import mpilocal
from mpilocal import Shard, distribute_tensor, init_device_mesh, neighbors
mode = sys.argv[1]
if mode == "no-self":
    if not hasattr(neighbors, "_SELF_IN_GROUP"):
        sys.exit("no-self needs the round-27 tree's neighbors._SELF_IN_GROUP")
    neighbors._SELF_IN_GROUP = False
C = MPI.COMM_WORLD
mesh = init_device_mesh("cuda", (C.size, 1))
step = mpilocal.stencil(lambda u: u[1:-1, 1:-1] + 0.2 * (u[2:, 1:-1] + u[:-2, 1:-1] + u[1:-1, 2:] + u[1:-1, :-2] - 4 * u[1:-1, 1:-1]), boundary=0.0)
U = distribute_tensor(cp.asarray(np.random.default_rng(0).random((128, 96))), mesh, [Shard(0), Shard(1)])
ts = []
for i in range(6):
    C.Barrier(); t0 = time.perf_counter()
    U = step(U); cp.cuda.get_current_stream().synchronize()
    ts.append(1e3 * (time.perf_counter() - t0))
if C.rank == 0:
    print(mode, "ms per step:", " ".join(f"{t:.2f}" for t in ts))
