"""``python -m mpilocal info``: the MPI library, CUDA-awareness, NCCL, GPUs and chosen transports.

Run it under your launcher (``mpiexec -n 2 python -m mpilocal info``, ``srun ...``) to see what the
job will use; rank 0 prints, and ``--all`` prints every rank's GPU binding.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _info(all_ranks: bool) -> int:
    from mpi4py import MPI

    import mpilocal
    from mpilocal import gpu
    from mpilocal.transport import detect, select

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local, per_node = gpu.node_local_rank()
    cp = gpu.cupy_or_none()
    ngpu = cp.cuda.runtime.getDeviceCount() if cp is not None else 0
    binding = f"rank {rank}: host {platform.node()}, node-local rank {local}/{per_node}, " + (
        f"GPU {local % ngpu} of {ngpu}" if ngpu else "no GPU")
    bindings = comm.gather(binding, root=0)
    if rank != 0:
        return 0
    aware, why = detect.mpi_cuda_aware()
    ncclv, nwhy = detect.nccl_version()
    lines = [
        f"mpilocal {mpilocal.__version__} (python {platform.python_version()}, numpy "
        f"{__import__('numpy').__version__}, mpi4py {__import__('mpi4py').__version__})",
        f"MPI library: {MPI.Get_library_version().splitlines()[0].strip()}",
        f"  loaded from: {detect.mpi_library_path()}",
        f"  world size: {size}; processes on this node: {per_node}",
        f"CUDA-aware MPI: {'yes' if aware else 'no'} ({why})",
        f"CuPy: {cp.__version__ if cp is not None else 'not available'}; GPUs on this node: {ngpu}",
        f"NCCL: {ncclv if ncclv is not None else 'not available'} ({nwhy})",
        f"MPILOCAL_TRANSPORT: {os.environ.get('MPILOCAL_TRANSPORT', '(unset: automatic)')}",
        "Transports per operation:",
    ]
    ops = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "broadcast", "scatter")
    kinds = ["numpy"] + (["cupy"] if cp is not None else [])
    for kind in kinds:
        for op in ops:
            try:
                name, reason = select.explain(kind, op)
            except Exception as exc:  # report, don't crash the info command
                name, reason = "unavailable", f"{type(exc).__name__}: {exc}"
            lines.append(f"  {kind:5s} {op:15s} -> {name:9s} {reason}")
    if all_ranks:
        lines.append("Ranks:")
        lines += [f"  {b}" for b in bindings]
    print("\n".join(lines), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpilocal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("info", help="print MPI, CUDA-awareness, NCCL, GPUs and transport choices")
    p.add_argument("--all", action="store_true", help="also list every rank's host and GPU binding")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return _info(args.all)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
