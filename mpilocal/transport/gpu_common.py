"""GPU helpers that the device transports share (``cuda_mpi``, ``staged``, ``nccl``; and the
all-to-all packing of :mod:`mpilocal.collectives`). CuPy is imported inside each function.

- :func:`reduce_blocks`: elementwise reduction of equal-length blocks on the GPU, in block order.
- :class:`ExchangeReduce`: all-reduce and reduce-scatter built on a transport's own data movement
  (block exchange + GPU reduction + all-gather; the bandwidth-optimal pattern of NCCL's ring).
- :func:`pack_pieces`: pieces of an array along an axis packed one after the other by 2-D copies.
- :func:`sync_current_stream`: wait for the current CuPy stream (before MPI reads device memory).

Reduce ops are :data:`mpilocal.names.TRANSPORT_OPS`; ``bool`` reduces by :data:`mpilocal.names.BOOL_OPS`.
"""

from __future__ import annotations

import math

import numpy as np

from ..layout import block_sizes
from ..names import op_tables
from . import displs, equal_counts

__all__ = ["reduce_blocks", "ExchangeReduce", "pack_pieces", "sync_current_stream"]

_UFUNCS: list = []  # [(ops, bool ops)] of CuPy ufuncs, built on first use


def _ufunc(op: str, dtype):
    if not _UFUNCS:
        import cupy as cp

        _UFUNCS.append(op_tables(sum=cp.add, max=cp.maximum, min=cp.minimum, product=cp.multiply,
                                 logical_or=cp.logical_or, logical_and=cp.logical_and))
    ops, bool_ops = _UFUNCS[0]
    return bool_ops[op] if dtype == np.bool_ else ops[op]


def reduce_blocks(blocks, op: str, out) -> None:
    """``out`` = elementwise ``op`` over ``blocks`` (a list of equal-length CuPy arrays), on the GPU,
    in block order (so every rank that reduces the same blocks gets bit-identical results)."""
    if not blocks:
        return
    f = _ufunc(op, out.dtype)
    if len(blocks) == 1:
        if blocks[0] is not out:
            out[...] = blocks[0]
        return
    f(blocks[0], blocks[1], out=out)
    for b in blocks[2:]:
        f(out, b, out=out)


def pack_pieces(xa, axis: int, sizes, send) -> list:
    """Copy the pieces of C-contiguous CuPy ``xa`` along ``axis`` (``sizes[p]`` wide) one after the
    other into flat ``send``, each as one 2-D ``cudaMemcpy2DAsync`` on the current stream (full copy
    bandwidth, unlike a strided elementwise kernel). Returns the element count of each piece."""
    import cupy as cp

    rt = cp.cuda.runtime
    it = xa.dtype.itemsize
    height = math.prod(xa.shape[:axis])
    post = math.prod(xa.shape[axis + 1:])
    spitch = xa.shape[axis] * post * it
    stream = cp.cuda.get_current_stream().ptr
    counts, pos, off = [], 0, 0
    for s in sizes:
        n = s * post * height
        if n:
            w = s * post * it
            rt.memcpy2DAsync(send.data.ptr + pos * it, w, xa.data.ptr + off * post * it, spitch, w, height,
                             rt.memcpyDeviceToDevice, stream)
        counts.append(n)
        pos += n
        off += s
    return counts


def sync_current_stream() -> None:
    """Wait until the current CuPy stream's work is done (MPI does not know CUDA streams)."""
    import cupy as cp

    cp.cuda.get_current_stream().synchronize()


class ExchangeReduce:
    """All-reduce and reduce-scatter on the GPU from a transport's data movement.

    Reduce-scatter: rank r receives block r of every other rank's ``send`` (one all-to-all) and
    reduces them with its own block on the GPU. All-reduce: a reduce-scatter into this rank's slice
    of ``recv`` (blocks by the MPI block rule, :func:`mpilocal.layout.block_sizes`) followed by an
    in-place all-gather. Subclasses provide ``alltoallv`` and ``allgatherv``.
    """

    def _exchange(self, send, counts, group):
        """Blocks ``counts[me]`` long from every rank (own block read in place): a list in rank order.
        ``send`` holds ``counts[p]`` elements for rank p at offset ``sum(counts[:p])``."""
        import cupy as cp

        me, k = group.rank, group.size
        offs = displs(counts)
        mine = counts[me]
        tmp = cp.empty(mine * k, dtype=send.dtype)
        # own block copied too (staged: cheap next to MPI); `counts` is group-wide, so is `uniform`
        self.alltoallv(send, counts, tmp, [mine] * k, group, equal_counts(counts), max(sum(counts), mine * k))
        return [send[offs[me]:offs[me] + mine] if p == me else tmp[p * mine:(p + 1) * mine] for p in range(k)]

    def reduce_scatterv(self, send, recv, counts, op, group):
        if group.size == 1:
            recv[...] = send[:counts[0]]
            return
        reduce_blocks(self._exchange(send, counts, group), op, recv)

    def allreduce(self, send, recv, op, group):
        n = recv.size
        if group.size == 1 or n == 0:
            if send is not recv:
                recv[...] = send
            return
        counts = list(block_sizes(n, group.size))
        off = displs(counts)[group.rank]
        mine = recv[off:off + counts[group.rank]]
        blocks = self._exchange(send, counts, group)
        if send is recv:  # the own block is read in place: reduce into a temporary first
            import cupy as cp

            tmp = cp.empty_like(mine)
            reduce_blocks(blocks, op, tmp)
            mine[...] = tmp
        else:
            reduce_blocks(blocks, op, mine)
        self.allgatherv_inplace(recv, counts, group)

    def allgatherv_inplace(self, recv, counts, group):
        """All-gather where this rank's block already sits at its offset in ``recv``."""
        off = displs(counts)[group.rank]
        mine = recv[off:off + counts[group.rank]].copy()
        self.allgatherv(mine, recv, counts, group)
