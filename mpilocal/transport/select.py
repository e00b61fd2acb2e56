"""Which transport moves which array, and why: the one place that chooses a transport.

NumPy arrays always use the host transport. CuPy arrays use, per collective, the first of this
ladder that works here (measured on 2×H100: ``benchmarks/results/2026-11-26-h100x2-gpu-collectives.md``):

1. ``nccl`` whenever ``cupy.cuda.nccl`` works: it wins every reduction (311 GB/s all-reduce against
   0.3 GB/s for CUDA-aware Open MPI's host-side reduction), moves data at the same speed as a
   CUDA-aware MPI (all-gather 266 vs 285 GB/s at 512 MiB, within 7%) with far lower small-message
   latency, and is ordered on the CuPy stream without a host synchronization.
2. ``cuda_mpi`` when the loaded MPI is CUDA-aware but NCCL is missing: data moves as device buffers
   (all-gather 285 GB/s); reductions are block exchanges plus a GPU reduction, never MPI's.
3. ``staged`` otherwise: pinned host buffers, pieces overlapped with the device copies, host MPI.

``MPILOCAL_TRANSPORT=nccl|cuda_mpi|staged`` forces one (``host`` means ``staged`` for CuPy arrays:
the host transport cannot take device buffers). A forced transport that cannot work here raises
``RuntimeError`` saying why; ``cuda_mpi`` is never used with an MPI that is not CUDA-aware. The GPU
transports are imported only once CuPy arrays are seen. :func:`explain` gives the choice and its
reason for ``python -m mpilocal info``. Collectives are named by the short names of
:data:`mpilocal.names.COLLECTIVES`.
"""

from __future__ import annotations

import os

from .. import _arrays
from ..names import REDUCING
from . import detect
from .host import HostTransport

__all__ = ["transport_for", "explain", "forced", "reset", "gpu_transport", "choose_gpu", "VALID"]

VALID = ("host", "nccl", "cuda_mpi", "staged")
_HOST = HostTransport()
_cache: dict = {}
_INSTANCES: dict = {}  # GPU transport name -> its single instance


def forced() -> str | None:
    """The transport named by ``MPILOCAL_TRANSPORT``, or None. Raises ValueError for unknown names."""
    name = os.environ.get("MPILOCAL_TRANSPORT", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in VALID:
        raise ValueError(f"MPILOCAL_TRANSPORT={name!r} is not a transport; use one of {', '.join(VALID)} or auto")
    return name


forced()  # an unknown MPILOCAL_TRANSPORT fails at import, on every rank, even for NumPy-only programs


def transport_for(x, op: str):
    """The transport for array ``x`` and collective ``op`` (cached per array kind and op)."""
    if type(x).__module__ == "numpy" or not _arrays.is_cupy(x):
        return _HOST
    key = ("cupy", op)
    t = _cache.get(key)
    if t is None:
        t = _cache[key] = choose_gpu(op)[0]
    return t


def reset() -> None:
    """Forget cached choices (e.g. after changing ``MPILOCAL_TRANSPORT`` in a running program)."""
    _cache.clear()


def explain(kind: str, op: str) -> tuple[str, str]:
    """(transport name, reason) for arrays of ``kind`` ("numpy" or "cupy") and collective ``op``."""
    if kind == "numpy":
        return "host", "NumPy arrays move through MPI's buffer interface"
    t, why = choose_gpu(op)
    return t.name, why


def gpu_transport(name: str):
    """The (single) GPU transport instance called ``name``; raises RuntimeError when it cannot work."""
    t = _INSTANCES.get(name)
    if t is None:
        if name == "nccl":
            ver, why = detect.nccl_version()
            if ver is None:
                raise RuntimeError(f"nccl transport: NCCL is not usable here ({why}); use MPILOCAL_TRANSPORT=cuda_mpi or staged")
            from .nccl import NcclTransport

            t = NcclTransport()
        elif name == "cuda_mpi":
            from .cuda_mpi import CudaMpiTransport

            t = CudaMpiTransport()  # raises unless the MPI is CUDA-aware
        elif name == "staged":
            from .staged import StagedTransport

            t = StagedTransport()
        else:
            raise ValueError(f"no GPU transport called {name!r}; use nccl, cuda_mpi or staged")
        _INSTANCES[name] = t
    return t


def _nccl_label():
    ver, why = detect.nccl_version()
    if ver is None:
        return None, why
    major, rest = divmod(int(ver), 10000)
    minor, patch = divmod(rest, 100)
    return f"NCCL {major}.{minor}.{patch}", why


def choose_gpu(op: str):
    """(transport, reason) for CuPy arrays and collective ``op`` (the ladder above)."""
    f = forced()
    if f is not None:
        name = "staged" if f == "host" else f
        why = f"MPILOCAL_TRANSPORT={f} (forced)"
        if f == "host":
            why += "; CuPy arrays take the staged path, the host transport cannot take device buffers"
        return gpu_transport(name), why
    label, nwhy = _nccl_label()
    aware, awhy = detect.mpi_cuda_aware()
    reduction = op in REDUCING
    if label is not None:
        if reduction:
            why = f"{label}: reduces on the GPU at full NVLink speed (311 GB/s measured vs 0.3 GB/s for MPI's host-side reduction)"
        else:
            why = (f"{label}: moves data at CUDA-aware-MPI speed (within 7% at 512 MiB) with lower latency, "
                   f"stream-ordered without host sync")
        return gpu_transport("nccl"), why
    if aware:
        why = f"no NCCL ({nwhy}); MPI is CUDA-aware ({awhy})"
        why += ": block exchange + GPU reduction, never MPI's host reduction" if reduction else ": device buffers straight to MPI"
        return gpu_transport("cuda_mpi"), why
    return gpu_transport("staged"), f"no NCCL ({nwhy}) and MPI not CUDA-aware ({awhy}): pinned host staging, pipelined"
