"""A data- and tensor-parallel two-layer MLP trained with operators on DTensors (no local_map).

    mpiexec -n 4 python scripts/examples/mlp_ops.py [--steps 60] [--lr 0.05] [--adam] [--device cuda]

The mesh is ``(dp, tp)``: 2 x 2 at 4 ranks, 1 x 2 at 2, n x 1 otherwise. The batch is sharded over
``dp``; ``W1`` is column-sharded and ``W2`` row-sharded over ``tp`` (Megatron style), so
``(X @ W1).relu()`` needs no communication and ``@ W2`` gives a ``Partial`` output over ``tp``
that the loss reduces once. Parameters come from ``mpilocal.randn`` (the same global values at
any rank count) and the optimizer is ``mpilocal.optim``. Rank 0 prints the loss, the collectives of
one training step by ``CommDebugMode``, the redistributions the operators chose, and exits with
status 1 unless the loss fell to below half its first value.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import CommDebugMode, Replicate, Shard, init_device_mesh
from mpilocal.ops import record_plans


def mesh_shape(n):
    if n % 2 == 0:
        return (n // 2, 2)
    return (n, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--adam", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args()
    rank = MPI.COMM_WORLD.Get_rank()
    mesh = init_device_mesh(args.device, mesh_shape(MPI.COMM_WORLD.Get_size()), mesh_dim_names=("dp", "tp"))
    R, S0, S1 = Replicate(), Shard(0), Shard(1)
    n_in, n_out = 8, 4

    mpilocal.manual_seed(0)
    X = mpilocal.randn(args.batch, n_in, dtype=np.float64, device_mesh=mesh, placements=[S0, R])
    T_true = mpilocal.randn(n_in, n_out, dtype=np.float64, device_mesh=mesh, placements=[R, R])
    Y = np.tanh(X @ T_true)  # targets: a smooth function of the inputs
    W1 = mpilocal.randn(n_in, args.hidden, dtype=np.float64, device_mesh=mesh, placements=[R, S1])
    W2 = mpilocal.randn(args.hidden, n_out, dtype=np.float64, device_mesh=mesh, placements=[R, S0])
    with mpilocal.autograd.no_grad():
        W1 *= 1 / np.sqrt(n_in)
        W2 *= 1 / np.sqrt(args.hidden)
    W1.requires_grad_()
    W2.requires_grad_()
    opt = mpilocal.optim.Adam([W1, W2], lr=args.lr) if args.adam else mpilocal.optim.SGD([W1, W2], lr=args.lr,
                                                                                          momentum=0.9)
    losses = []
    for step in range(args.steps):
        opt.zero_grad()
        if step == 1:
            cm, rp = CommDebugMode(), record_plans()
            cm.__enter__()
            plans = rp.__enter__()
        y = (X @ W1).relu() @ W2          # (S0, P): dp-sharded rows, tp partial sums
        loss = ((y - Y) ** 2).mean()      # the tp partial is all-reduced once here
        loss.backward()
        opt.step()
        if step == 1:
            rp.__exit__(None, None, None)
            cm.__exit__(None, None, None)
            counts, nbytes = cm.get_comm_counts(), cm.get_total_bytes()
        losses.append(float(loss.detach().full_tensor()))
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.6f}")
    if rank == 0:
        print(f"mesh {mesh_shape(MPI.COMM_WORLD.Get_size())} (dp, tp); one training step: collectives {dict(counts)}, "
              f"{nbytes} bytes (this rank)")
        for op, moves, out in plans:
            print(f"  {op:10s} -> {out}" + ("".join(f"; operand {k}: {a} -> {b}" for k, a, b in moves)))
    ok = losses[-1] < 0.5 * losses[0]
    if rank == 0:
        print("loss fell" if ok else "loss did NOT fall enough", f"({losses[0]:.4f} -> {losses[-1]:.4f})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
