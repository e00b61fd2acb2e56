"""``python -m mpilocal info``: the MPI library, CUDA-awareness, NCCL, GPUs and chosen transports.
``python -m mpilocal flight DIR``: where the ranks' flight recorder files first differ
(:func:`mpilocal.flight.main`; docs/failures.md, "Flight recorder").

Run it under your launcher (``mpiexec -n 2 python -m mpilocal info``, ``srun ...``) to see what the
job will use; rank 0 prints, and ``--all`` prints every rank's GPU binding (the one ``"cuda"`` meshes
make: :func:`mpilocal.gpu.binding`, which honours ``MPILOCAL_GPU``).

A launcher that does not match mpi4py's MPI library is named instead of failing obscurely: the
system Open MPI's ``mpirun`` starting a Python with the pip MPICH wheel raises a clear error at
``import mpilocal`` (:mod:`mpilocal._launch`, before MPI starts; MPICH would abort in ``MPI_Init``
with a raw PMIx error), and processes that each see a world of 1 although the launcher started
several say so here.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _info(all_ranks: bool) -> int:
    from mpi4py import MPI

    import mpilocal
    from mpilocal import _launch, gpu
    from mpilocal.names import COLLECTIVES
    from mpilocal.transport import detect, select

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local, per_node = gpu.node_local_rank()
    cp = gpu.cupy_or_none()
    ngpu = cp.cuda.runtime.getDeviceCount() if cp is not None else 0
    if ngpu:  # the binding a "cuda" mesh makes (MPILOCAL_GPU, else node-local rank)
        try:
            dev, why = gpu.binding(ngpu)
            where = f"GPU {dev} of {ngpu} ({why})"
        except ValueError as exc:
            where = f"no valid GPU: {exc}"
    else:
        where = "no GPU"
    binding = f"rank {rank}: host {platform.node()}, node-local rank {local}/{per_node}, {where}"
    bindings = comm.gather(binding, root=0)
    started = _launch.launcher_size()
    if started is not None and started != size and started > 1:
        # MPICH's mpiexec starting an Open MPI build (or any launcher/library pair that do not speak the
        # same process-management protocol): every process is a world of its own, and each prints
        print(f"mpilocal info: {_launch.launcher() or 'the launcher'} started {started} processes but this one "
              f"sees a world of {size}: mpi4py's MPI library ({detect.mpi_library_name()}) "
              f"does not match the launcher. Use the mpiexec of the MPI that mpi4py was built for "
              f"(see README, 'On a cluster').", file=sys.stderr, flush=True)
    if rank != 0:
        return 0
    aware, why = detect.mpi_cuda_aware()
    ncclv, nwhy = detect.nccl_version()
    lines = [
        f"mpilocal {mpilocal.__version__} (python {platform.python_version()}, numpy "
        f"{__import__('numpy').__version__}, mpi4py {__import__('mpi4py').__version__})",
        f"MPI library: {detect.mpi_library_name()}",
        f"  loaded from: {detect.mpi_library_path()}",
        f"  world size: {size}; processes on this node: {per_node}; launched by: "
        f"{_launch.launcher() or 'nothing recognised (a singleton, or a launcher that sets none of OMPI_*/PMI_*/SLURM_*)'}",
        f"CUDA-aware MPI: {'yes' if aware else 'no'} ({why})",
        f"CuPy: {cp.__version__ if cp is not None else 'not available'}; GPUs on this node: {ngpu}",
        f"NCCL: {ncclv if ncclv is not None else 'not available'} ({nwhy})",
        f"MPILOCAL_TRANSPORT: {os.environ.get('MPILOCAL_TRANSPORT', '(unset: automatic)')}",
        "Transports per operation:",
    ]
    ops = tuple(COLLECTIVES)
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
    p = sub.add_parser("flight", help="compare the ranks' flight recorder files (MPILOCAL_FLIGHT_DIR): where their "
                                      "collectives first differ, per group (docs/failures.md)")
    p.add_argument("dir", help="the directory of rank<R>.json files")
    p.add_argument("--rings", action="store_true", help="also print every rank's ring, first differences marked")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return _info(args.all)
    if args.cmd == "flight":
        from mpilocal import flight

        return flight.main(args.dir, args.rings)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
