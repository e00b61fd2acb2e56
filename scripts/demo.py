"""mpilocal demo: a sharded two-layer matrix product on a 2-D device mesh with ``local_map``.

Run it with any number of ranks (the mesh is the most square factorization of the world size:
2 x 2 at 4 ranks, 2 x 1 at 2, 1 x 1 at 1, 3 x 2 at 6)::

    mpiexec -n 4 python scripts/demo.py

What it does, on a mesh with dims ("dp", "tp"):

1. ``distribute_tensor``: X (10 x 7) is sharded by rows over "dp", W (7 x 5) by columns over "tp",
   V (5 x 3) by rows over "tp". Sizes are uneven on purpose: shards follow ``torch.chunk``
   (chunk = ceil(n / k), trailing shards shorter or empty).
2. ``local_map(np.matmul)``: Y = X @ W needs no communication: each rank multiplies its row block
   of X by its column block of W, giving Y sharded [Shard(0), Shard(1)].
3. ``local_map(np.matmul)``: Z = Y @ V contracts the dimension sharded over "tp", so each rank
   holds a partial sum: Z is [Shard(0), Partial()].
4. ``redistribute``: Y [Shard(0), Shard(1)] -> [Shard(0), Replicate()] (all_gather along "tp");
   Z [Shard(0), Partial()] -> [Replicate(), Replicate()] (all_reduce along "tp", all_gather along "dp").
5. ``full_tensor`` and a check against NumPy on the full arrays on rank 0; a mismatch ends the job
   with exit status 1 on every rank.
6. Gradients: a few steps of data-parallel training of a small two-layer MLP with ``local_map``
   on a 1-D mesh over every rank. The batch is sharded by rows, the weights are replicated and
   require grad; ``in_grad_placements`` gives the weights' gradients as ``Partial()`` (each rank's
   contribution from its rows), and the optimizer step all-reduces them (``redistribute`` to
   ``Replicate()``), as DDP does. The first gradients are checked against NumPy on the full batch,
   and the loss must fall.

Every step runs under ``CommDebugMode``; rank 0 prints the collectives it issued (counts and the
bytes this rank sent) and, counted apart, the metadata agreements: small all-gathers of shapes and
verdicts, not array data (``argument_check``: every rank's arguments passed the checks, so a bad one
raises on every rank; ``input_check``: every rank passes the source's global shape and dtype;
``shape_agreement``: a global shape inferred from the local shapes). Each kind is explained in the
output the first time it appears.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

import mpilocal
from mpilocal import (
    CommDebugMode,
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
    init_device_mesh,
    local_map,
)
from mpilocal.transport import detect

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()


def say(*args) -> None:
    if RANK == 0:
        print(*args, flush=True)


def mesh_shape_for(n: int) -> tuple[int, int]:
    """The most square (a, b) with a * b == n and a >= b."""
    b = int(n**0.5)
    while n % b:
        b -= 1
    return n // b, b


def describe(name: str, t: DTensor) -> str:
    return (f"{name}: global {tuple(t.shape)}, placements {t.placements}, "
            f"rank 0's shard {tuple(t.to_local().shape)}")


# CommDebugMode counts metadata agreements apart from the collectives that move array data: each is one
# small all-gather of shapes, dtypes or verdicts (a few hundred bytes). What the demo's kinds mean:
METADATA_KINDS = {
    "argument_check": "every rank's arguments passed the checks; a bad one raises on all ranks",
    "input_check": "every rank passes the source's global shape and dtype",
    "shape_agreement": "the global shape, inferred from the local shapes",
    "run_check": "from_local(run_check=True): dtypes and shapes agree across the mesh",
}
_explained: set = set()


def report(step: str, mode: CommDebugMode) -> None:
    counts = mode.get_comm_counts()
    nbytes = mode.get_comm_bytes()
    meta = {k: v for k, v in mode.get_metadata_counts().items() if v}
    if counts:
        comm = ", ".join(f"{k} x{v} ({nbytes.get(k, 0)} B)" for k, v in sorted(counts.items()) if v)
    else:
        comm = "none"
    say(f"   comm [{step}]: {mode.get_total_counts()} collective(s): {comm}")
    if meta:
        say(f"   metadata [{step}]: " + ", ".join(f"{k} x{v}" for k, v in sorted(meta.items())))
        for k in sorted(meta):  # the first time a kind shows up, say what it is
            if k not in _explained:
                _explained.add(k)
                say(f"      ({k}: {METADATA_KINDS.get(k, 'a metadata agreement, not array data')})")


def check(name: str, actual, expected) -> None:
    """Compare on rank 0; every rank learns the verdict and exits 1 together on a mismatch."""
    err = None
    if RANK == 0:
        try:
            np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
        except AssertionError as exc:
            err = str(exc)
    err = COMM.bcast(err, root=0)
    if err is not None:
        say(f"MISMATCH in {name}:\n{err}")
        sys.exit(1)
    say(f"   check {name}: matches NumPy on the full arrays")


def main() -> int:
    world = COMM.Get_size()
    shape = mesh_shape_for(world)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
    say(f"mpilocal {getattr(mpilocal, '__version__', '?')}: {world} rank(s), "
        f"mesh {mesh.shape} with dims {mesh.mesh_dim_names}")
    lib = detect.mpi_library_name().split(",")[0].replace("Version:", "")
    say("   " + " ".join(lib.split()))  # "MPICH 5.0.2", "Open MPI v4.1.4"

    # The same global arrays on every rank (same seed); distribute_tensor sends rank 0's copy.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 7))
    w = rng.standard_normal((7, 5))
    v = rng.standard_normal((5, 3))

    say("\n1. distribute X by rows over dp, W by columns over tp, V by rows over tp")
    with CommDebugMode() as mode:
        X = distribute_tensor(x, mesh, [Shard(0), Replicate()])
        W = distribute_tensor(w, mesh, [Replicate(), Shard(1)])
        V = distribute_tensor(v, mesh, [Replicate(), Shard(0)])
    for name, t in (("X", X), ("W", W), ("V", V)):
        say("   " + describe(name, t))
    dp, tp = shape
    say(f"   torch.chunk rule: 10 rows over dp={dp} -> {chunks(10, dp)}, "
        f"5 columns over tp={tp} -> {chunks(5, tp)}")
    report("distribute", mode)

    say("\n2. Y = X @ W with local_map: no communication, Y comes out [Shard(0), Shard(1)]")
    matmul_rows_cols = local_map(
        np.matmul,
        out_placements=[Shard(0), Shard(1)],
        in_placements=([Shard(0), Replicate()], [Replicate(), Shard(1)]),
    )
    with CommDebugMode() as mode:
        Y = matmul_rows_cols(X, W)
    say("   " + describe("Y", Y))
    report("local_map X @ W", mode)

    say("\n3. Z = Y @ V contracts the tp-sharded dim: each rank has a partial sum, [Shard(0), Partial()]")

    @local_map(
        out_placements=[Shard(0), Partial()],
        in_placements=([Shard(0), Shard(1)], [Replicate(), Shard(0)]),
    )
    def matmul_contract(y, v_):
        return y @ v_

    with CommDebugMode() as mode:
        Z = matmul_contract(Y, V)
    say("   " + describe("Z", Z))
    report("local_map Y @ V", mode)

    say("\n4. redistribute: Y -> [Shard(0), Replicate()], Z -> [Replicate(), Replicate()]")
    with CommDebugMode() as mode:
        Y_rows = Y.redistribute(mesh, [Shard(0), Replicate()])
    say("   " + describe("Y", Y_rows))
    report("Y Shard(1)->Replicate on tp", mode)
    with CommDebugMode() as mode:
        Z_full = Z.redistribute(mesh, [Replicate(), Replicate()])
    say("   " + describe("Z", Z_full))
    report("Z Shard(0)->Replicate on dp, Partial->Replicate on tp", mode)

    say("\n5. full_tensor and check against NumPy")
    with CommDebugMode() as mode:
        y_full = Y.full_tensor()
        y_rows_full = Y_rows.full_tensor()
    report("full_tensor of Y [S(0),S(1)] and [S(0),R]", mode)
    z_local = Z_full.to_local()  # replicated: every rank's shard is the whole array
    check("Y = X @ W", y_full, x @ w)
    check("Y [Shard(0), Replicate()]", y_rows_full, x @ w)
    check("Z = X @ W @ V", z_local, x @ w @ v)

    # Every rank's replicated Z must be the full result, not just rank 0's.
    ok = COMM.allreduce(int(np.allclose(z_local, x @ w @ v, rtol=1e-12, atol=1e-12)), op=MPI.MIN)
    if not ok:
        say("MISMATCH: a rank's replicated Z differs from NumPy")
        return 1
    if not train_data_parallel(world):
        return 1
    say("\ndemo OK")
    return 0


def train_data_parallel(world: int, steps: int = 8, lr: float = 0.1) -> bool:
    """Step 6: data-parallel training with local_map and mpilocal.autograd; True if all went well."""
    say(f"\n6. data-parallel training of a 2-layer MLP with local_map over a 1-D mesh of {world} rank(s)")
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    rng = np.random.default_rng(1)
    n, d, h = 64, 4, 16
    x = rng.standard_normal((n, d))
    t = np.sin(x @ rng.standard_normal((d, 1)))  # a smooth target
    w1 = rng.standard_normal((d, h)) * 0.5
    w2 = rng.standard_normal((h, 1)) * 0.5
    X = distribute_tensor(x, mesh, [Shard(0)])
    T = distribute_tensor(t, mesh, [Shard(0)])
    W1 = distribute_tensor(w1, mesh, [Replicate()], requires_grad=True)
    W2 = distribute_tensor(w2, mesh, [Replicate()], requires_grad=True)

    @local_map(out_placements=[Partial()],
               in_placements=([Shard(0)], [Shard(0)], [Replicate()], [Replicate()]),
               in_grad_placements=(None, None, [Partial()], [Partial()]))
    def mse(x_, t_, w1_, w2_):
        # w1_ and w2_ arrive as mpilocal.autograd.Tracked arrays: the operations are recorded
        xp = w1_.__array_namespace__()
        y = xp.tanh(x_ @ w1_) @ w2_
        return ((y - t_) ** 2).sum() / n  # this rank's share of the mean over the global batch

    losses = []
    for step in range(steps):
        with CommDebugMode() as mode:
            loss = mse(X, T, W1, W2)
            loss.backward()  # gradients of W1, W2: Partial() (no communication yet)
            g1 = W1.grad.redistribute(mesh, [Replicate()]).to_local()  # all_reduce, as DDP
            g2 = W2.grad.redistribute(mesh, [Replicate()]).to_local()
        if step == 0:
            hid = np.tanh(x @ w1)
            gy = 2 * (hid @ w2 - t) / n
            check("dL/dW2 (step 0)", g2, hid.T @ gy)
            check("dL/dW1 (step 0)", g1, x.T @ ((gy @ w2.T) * (1 - hid ** 2)))
            report("forward + backward + gradient all_reduce", mode)
        # SGD step on the replicated weights (every rank applies the same update)
        W1 = DTensor.from_local(W1.detach().to_local() - lr * g1, mesh, [Replicate()]).requires_grad_()
        W2 = DTensor.from_local(W2.detach().to_local() - lr * g2, mesh, [Replicate()]).requires_grad_()
        losses.append(float(loss.detach().full_tensor()))
        say(f"   step {step}: loss {losses[-1]:.6f}")
    fell = COMM.allreduce(int(losses[-1] < 0.8 * losses[0]), op=MPI.MIN)
    if not fell:
        say(f"MISMATCH: the loss did not fall: {losses}")
        return False
    say(f"   loss fell from {losses[0]:.6f} to {losses[-1]:.6f}")
    return True


def chunks(n: int, k: int) -> list[int]:
    """Shard sizes of n elements over k ranks by the torch.chunk rule (for the printout)."""
    c = -(-n // k)
    return [max(0, min(c, n - i * c)) for i in range(k)]


if __name__ == "__main__":
    # An uncaught exception on one rank would leave the others waiting in a collective; `import
    # mpilocal` installs a sys.excepthook that aborts the whole job instead (MPILOCAL_ABORT_ON_ERROR).
    sys.exit(main())
