"""GPU discovery and binding: each rank uses one GPU of its node (node-local rank from
``MPI_Comm_split_type``, never ``world rank % ngpu``). CuPy is imported only when asked for."""

from __future__ import annotations

import os

from mpi4py import MPI

from . import deadline

__all__ = ["cupy_or_none", "node_local_rank", "bind_device", "binding", "device_index"]

_node_comm = None
_bound = None


def cupy_or_none():
    """The ``cupy`` module, or ``None`` when CuPy is not installed or no GPU works."""
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception:
        return None


def node_local_rank() -> tuple[int, int]:
    """(rank among the processes of this node, processes on this node). Collective on first call."""
    global _node_comm
    if _node_comm is None:
        deadline.settle_channel()
        _node_comm = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED, key=MPI.COMM_WORLD.Get_rank())
    return _node_comm.Get_rank(), _node_comm.Get_size()


def device_index(local: int, n: int) -> tuple[int, str]:
    """The GPU a rank with node-local rank ``local`` uses on a node with ``n`` GPUs, and why: the
    index in ``MPILOCAL_GPU`` when set, else ``local % n``. The one binding rule (:func:`binding`)."""
    visible = os.environ.get("MPILOCAL_GPU", "").strip()
    if visible:
        try:
            dev = int(visible)
        except ValueError:
            raise ValueError(f"MPILOCAL_GPU={visible!r}: give a GPU index (0..{n - 1}) of this node") from None
        if not 0 <= dev < n:
            raise ValueError(f"MPILOCAL_GPU={dev}: this node has GPUs 0..{n - 1}")
        return dev, "MPILOCAL_GPU"
    return local % n, f"node-local rank {local} % {n} GPUs"


def binding(ngpu: int) -> tuple[int, str]:
    """(GPU index, why) of this rank on a node with ``ngpu`` GPUs: :func:`device_index` of its
    node-local rank. What :func:`bind_device` makes current and ``python -m mpilocal info`` reports.
    Collective on first call (:func:`node_local_rank`)."""
    local, _ = node_local_rank()
    return device_index(local, ngpu)


def bind_device() -> int:
    """Make this rank's GPU (:func:`binding`) CuPy's current device."""
    global _bound
    if _bound is not None:
        return _bound
    cp = cupy_or_none()
    if cp is None:
        raise RuntimeError(
            "device_type='cuda' needs CuPy and a GPU: install mpilocal[cuda12] or mpilocal[cuda13] "
            "(cupy-cuda12x / cupy-cuda13x) on a machine with an NVIDIA GPU, or use device_type='cpu'"
        )
    dev, _ = binding(cp.cuda.runtime.getDeviceCount())
    cp.cuda.Device(dev).use()
    _bound = dev
    return dev
