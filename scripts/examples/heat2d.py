"""2-D heat equation on a 2-D device mesh, with halos from ``mpilocal.stencil``.

    mpiexec -n 4 python scripts/examples/heat2d.py [--n 128 96] [--steps 200] [--png heat2d.png]

The field ``u`` (global ``n0 x n1``) is sharded over both dims of a ``p0 x p1`` mesh (``p0 * p1`` =
the number of ranks, as square as possible: 2 x 2 at 4 ranks, 3 x 1 at 3). One explicit step of
``u_t = laplace(u)`` with zero (Dirichlet) values beyond the edges is one line: the stencil receives
each shard padded with one row/column of its neighbours' values (corners included) and returns the
interior. Rank 0 prints the largest difference from the same steps done by NumPy in one process,
and writes a PNG of the final field (matplotlib when importable, else a small built-in PNG writer).
Exits with status 1 when the error exceeds 1e-12.
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
import time
import zlib

import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import Shard, distribute_tensor, init_device_mesh


def mesh_shape(n):
    p0 = int(math.isqrt(n))
    while n % p0:
        p0 -= 1
    return (n // p0, p0)


def initial(n0, n1):
    y, x = np.meshgrid(np.linspace(0, 1, n0), np.linspace(0, 1, n1), indexing="ij")
    return np.exp(-80 * ((x - 0.35) ** 2 + (y - 0.4) ** 2)) + 0.5 * np.exp(-200 * ((x - 0.7) ** 2 + (y - 0.65) ** 2))


def numpy_steps(u, nu, steps):
    for _ in range(steps):
        p = np.pad(u, 1)
        u = u + nu * (p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * u)
    return u


def write_png(path, field):
    """The field as an RGB PNG: matplotlib's imsave when importable, else a tiny zlib PNG writer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imsave(path, field, cmap="inferno", origin="lower")
        return "matplotlib"
    except ImportError:
        pass
    lo, hi = float(field.min()), float(field.max())
    t = (field - lo) / (hi - lo or 1.0)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)  # black-red-yellow-white
    img = (rgb[::-1] * 255).astype(np.uint8)  # origin at the bottom
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return "built-in PNG writer"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs=2, default=(128, 96), metavar=("N0", "N1"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nu", type=float, default=0.2, help="dt/dx^2 (stable up to 0.25)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--png", default="heat2d.png")
    a = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    mesh = init_device_mesh(a.device, mesh_shape(comm.Get_size()), mesh_dim_names=("y", "x"))
    u0 = initial(*a.n)
    nu = a.nu

    # one explicit step: the padded shard in, the interior out (halos exchanged along both mesh dims)
    step = mpilocal.stencil(lambda u: u[1:-1, 1:-1] + nu * (u[2:, 1:-1] + u[:-2, 1:-1] + u[1:-1, 2:] + u[1:-1, :-2]
                                                            - 4 * u[1:-1, 1:-1]), halo=1, boundary=0.0)
    xp = np
    if a.device == "cuda":
        import cupy as xp  # noqa: F811
    U = distribute_tensor(xp.asarray(u0), mesh, [Shard(0), Shard(1)])
    comm.Barrier()
    t0 = time.perf_counter()
    if a.steps:  # the first step also compiles the kernels and sets the communicators up: timed apart
        U = step(U)
        U.to_local().sum().item()  # (waits for the device)
    t1 = time.perf_counter()
    for _ in range(a.steps - 1):
        U = step(U)
    U.to_local().sum().item()
    t = time.perf_counter() - t1
    final = U.full_tensor()  # (not timed: its first call sets up the gather of the whole grid)
    final = final.get() if hasattr(final, "get") and not isinstance(final, np.ndarray) else final
    err = 0.0
    if comm.Get_rank() == 0:
        ref = numpy_steps(u0, nu, a.steps)
        err = float(np.max(np.abs(final - ref)))
        how = write_png(a.png, final)
        timing = (f"{1e6 * t / (a.steps - 1):.1f} us/step after the first ({1e3 * (t1 - t0):.1f} ms)" if a.steps > 1
                  else f"{1e3 * (t1 - t0):.1f} ms for the step")
        print(f"heat2d: {a.n[0]}x{a.n[1]} grid, {a.steps} steps on a {mesh.shape[0]}x{mesh.shape[1]} mesh "
              f"({comm.Get_size()} ranks, {a.device}): {timing}, "
              f"max |error| vs NumPy = {err:.3e}; field written to {a.png} ({how})")
    err = comm.bcast(err, root=0)
    return 0 if err <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
