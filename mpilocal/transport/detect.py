"""What this process's MPI and GPUs can do: CUDA-awareness of the loaded MPI, NCCL, GPUs.

CUDA-awareness comes from the MPI library mpi4py actually loaded: Open MPI's
``MPIX_Query_cuda_support()`` or MPICH's ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &ok)``.
``MPILOCAL_CUDA_AWARE=1|0`` overrides it for MPIs that do not report it (e.g. Cray MPICH with
``MPICH_GPU_SUPPORT_ENABLED=1``).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

__all__ = ["mpi_library_path", "mpi_library_name", "mpi_cuda_aware", "nccl_version"]


@lru_cache(maxsize=None)
def mpi_library_name() -> str:
    """The first line of ``MPI_Get_library_version`` as printable text (Open MPI 4.1 ends it with a
    NUL byte, which made the tables written with it binary files)."""
    from mpi4py import MPI

    lines = MPI.Get_library_version().replace("\x00", "").strip().splitlines()
    return lines[0].strip() if lines else "unknown MPI"


@lru_cache(maxsize=None)
def mpi_library_path() -> str | None:
    """Path of the libmpi this process loaded (from /proc/self/maps), or None."""
    from mpi4py import MPI  # noqa: F401  (make sure it is loaded)

    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                base = os.path.basename(path)
                if base.startswith(("libmpi.so", "libmpich.so", "libmpi_cray.so", "libmpi_ibm.so")):
                    return path
    except OSError:
        pass
    return None


@lru_cache(maxsize=None)
def mpi_cuda_aware() -> tuple[bool, str]:
    """(whether CuPy buffers may go to MPI, why)."""
    env = os.environ.get("MPILOCAL_CUDA_AWARE")
    if env is not None and env.strip() != "":
        on = env.strip().lower() in ("1", "true", "yes", "on")
        return on, f"MPILOCAL_CUDA_AWARE={env} (override)"
    path = mpi_library_path()
    if path is None:
        return False, "could not find the loaded MPI library; set MPILOCAL_CUDA_AWARE=1 if it is CUDA-aware"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return False, f"could not open {path}: {exc}"
    fn = getattr(lib, "MPIX_Query_cuda_support", None)
    if fn is not None:
        fn.restype = ctypes.c_int
        ok = bool(fn())
        return ok, f"MPIX_Query_cuda_support() = {int(ok)} in {os.path.basename(path)}"
    fn = getattr(lib, "MPIX_GPU_query_support", None)
    if fn is not None:
        val = ctypes.c_int(0)
        fn.restype = ctypes.c_int
        if fn(ctypes.c_int(1), ctypes.byref(val)) == 0:  # MPIX_GPU_SUPPORT_CUDA == 1
            return bool(val.value), f"MPIX_GPU_query_support(CUDA) = {val.value} in {os.path.basename(path)}"
    return False, f"{os.path.basename(path)} reports no CUDA support query; set MPILOCAL_CUDA_AWARE=1 if it is CUDA-aware"


@lru_cache(maxsize=None)
def nccl_version() -> tuple[int | None, str]:
    """(NCCL version as an int like 22805, or None; why)."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # ImportError or a CUDA load failure
        return None, f"cupy.cuda.nccl unavailable ({type(exc).__name__}: {exc})"
    try:
        return int(nccl.get_version()), "cupy.cuda.nccl"
    except Exception as exc:
        return None, f"cupy.cuda.nccl present but not working ({exc})"
