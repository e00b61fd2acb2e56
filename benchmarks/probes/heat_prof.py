# cProfile of the 2-D heat step variants of bench_halo (N=128, mesh (W,1)), rank 0, by own time
import cProfile, io, pstats, sys, time
import numpy as np, cupy as cp
from mpi4py import MPI
import mpilocal, mpilocal.functional as funcol
from mpilocal import Shard, distribute_tensor, init_device_mesh
COMM = MPI.COMM_WORLD; RANK, W = COMM.rank, COMM.size
N = int(sys.argv[1]) if len(sys.argv) > 1 else 128
mesh = init_device_mesh("cuda", (W, 1)); nu = 0.2
u0 = np.random.default_rng(0).random((N, N))
step = mpilocal.stencil(lambda u: u[1:-1, 1:-1] + nu * (u[2:, 1:-1] + u[:-2, 1:-1] + u[1:-1, 2:] + u[1:-1, :-2] - 4 * u[1:-1, 1:-1]), boundary=0.0)
U0 = distribute_tensor(cp.asarray(u0), mesh, [Shard(0), Shard(1)]); state = {"U": U0}
def ml(): state["U"] = step(state["U"])
pads = [funcol.halo_exchange(U0, (0, 1), (0, 1), 1, 0.0)]; pads.append(cp.zeros_like(pads[0]))
def upd():
    a, b = pads
    b[1:-1, 1:-1] = a[1:-1, 1:-1] + nu * (a[2:, 1:-1] + a[:-2, 1:-1] + a[1:-1, 2:] + a[1:-1, :-2] - 4 * a[1:-1, 1:-1])
    funcol.halo_update(b, (mesh, 0), 0, 1, 0.0); funcol.halo_update(b, (mesh, 1), 1, 1, 0.0); pads.reverse()
a = cp.zeros_like(pads[0]); b = cp.zeros_like(a)
def kern():
    global a, b
    b[1:-1, 1:-1] = a[1:-1, 1:-1] + nu * (a[2:, 1:-1] + a[:-2, 1:-1] + a[1:-1, 2:] + a[1:-1, :-2] - 4 * a[1:-1, 1:-1]); a, b = b, a
sync = cp.cuda.get_current_stream().synchronize
from mpilocal.transport import detect
cart = COMM.Create_cart((W, 1), periods=[False, False]); (up, down), (lf, rt) = cart.Shift(0, 1), cart.Shift(1, 1)
ha = cp.zeros_like(pads[0]); hb = cp.zeros_like(ha); sc, rc = cp.empty(ha.shape[0]), cp.empty(ha.shape[0])
def hand():
    global ha, hb
    sync()
    cart.Sendrecv(ha[1], up, 1, ha[-1], down, 1); cart.Sendrecv(ha[-2], down, 2, ha[0], up, 2)
    sc[...] = ha[:, 1]; cart.Sendrecv(sc, lf, 3, rc, rt, 3)
    sc[...] = ha[:, -2]; cart.Sendrecv(sc, rt, 4, rc, lf, 4)
    hb[1:-1, 1:-1] = ha[1:-1, 1:-1] + nu * (ha[2:, 1:-1] + ha[:-2, 1:-1] + ha[1:-1, 2:] + ha[1:-1, :-2] - 4 * ha[1:-1, 1:-1]); ha, hb = hb, ha
V = [("kernel only", kern), ("stencil", ml), ("halo_update", upd)] + ([("hand (CUDA-aware)", hand)] if detect.mpi_cuda_aware()[0] else [])
for name, fn in V:
    for _ in range(50): fn()
    sync(); COMM.Barrier(); t0 = time.perf_counter()
    for _ in range(500): fn()
    sync(); dt = COMM.allreduce((time.perf_counter() - t0) / 500, op=MPI.MAX)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(500): fn()
    sync(); pr.disable()
    if RANK == 0:
        s = io.StringIO(); st = pstats.Stats(pr, stream=s).strip_dirs(); st.sort_stats("tottime").print_stats(22)
        print(f"### {name}: {dt * 1e6:.1f} us/step unprofiled, {st.total_calls / 500:.0f} calls/step")
        print("\n".join(l for l in s.getvalue().splitlines()[4:] if l.strip()))
