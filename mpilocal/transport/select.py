"""Which transport moves which array, and why.

NumPy arrays always use the host transport. CuPy arrays use, in order of preference per operation,
``nccl``, ``cuda_mpi`` or ``staged`` (see the GPU transports); ``MPILOCAL_TRANSPORT`` forces one.
:func:`explain` gives the choice and its reason for ``python -m mpilocal info``.
"""

from __future__ import annotations

import os

from .. import _arrays
from .host import HostTransport

__all__ = ["transport_for", "explain", "forced", "reset", "VALID"]

VALID = ("host", "nccl", "cuda_mpi", "staged")
_HOST = HostTransport()
_cache: dict = {}


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
        t = _cache[key] = _gpu_choice(op)[0]
    return t


def reset() -> None:
    """Forget cached choices (e.g. after changing ``MPILOCAL_TRANSPORT`` in a running program)."""
    _cache.clear()


def _gpu_choice(op: str):
    from . import gpu_select  # GPU transports are imported only when CuPy arrays are seen

    return gpu_select.choose(op)


def explain(kind: str, op: str) -> tuple[str, str]:
    """(transport name, reason) for arrays of ``kind`` ("numpy" or "cupy") and collective ``op``."""
    if kind == "numpy":
        return "host", "NumPy arrays move through MPI's buffer interface"
    t, why = _gpu_choice(op)
    return t.name, why
