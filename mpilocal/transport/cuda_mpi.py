"""The ``cuda_mpi`` transport: CuPy buffers handed straight to a CUDA-aware MPI.

Data movement (all-gather, all-to-all, broadcast, scatter) goes to MPI as device buffers after the
producing CuPy stream is synchronized (MPI does not know CUDA streams). Reductions never use the MPI
library's own reduction, which CUDA-aware Open MPI runs on the host (0.3 GB/s measured on 2×H100):
an all-reduce is a reduce-scatter by point-to-point exchange of blocks, a local elementwise reduction
on the GPU, and an all-gather of the reduced blocks (the bandwidth-optimal pattern NCCL's ring uses).

This module also holds the GPU helpers that the other device transports share: elementwise
reductions of stacked blocks on the GPU (:func:`reduce_blocks`) and the block-exchange reduction
(:class:`ExchangeReduce`) built on a transport's ``alltoallv``/``allgatherv``.

A CuPy buffer never reaches an MPI that is not CUDA-aware: :class:`CudaMpiTransport` refuses to be
built unless :func:`mpilocal.transport.detect.mpi_cuda_aware` says yes.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import deadline
from . import count_limit, counts_key, detect, displs, equal_counts, issuing

__all__ = ["CudaMpiTransport", "ExchangeReduce", "reduce_blocks", "chunk_counts", "displs", "pack_pieces"]


def chunk_counts(n: int, k: int) -> list:
    """Split ``n`` elements into ``k`` near-equal blocks (the first ``n % k`` one larger)."""
    q, r = divmod(n, k)
    return [q + (1 if i < r else 0) for i in range(k)]


def _ufunc(cp, op: str, dtype):
    if dtype == np.bool_:
        return cp.logical_or if op in ("sum", "max") else cp.logical_and
    return {"sum": cp.add, "product": cp.multiply, "max": cp.maximum, "min": cp.minimum}[op]


def reduce_blocks(blocks, op: str, out) -> None:
    """``out`` = elementwise ``op`` over ``blocks`` (a list of equal-length CuPy arrays), on the GPU,
    in block order (so every rank that reduces the same blocks gets bit-identical results)."""
    import cupy as cp

    if not blocks:
        return
    f = _ufunc(cp, op, out.dtype)
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
    import math

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


def _sync_current_stream():
    import cupy as cp

    cp.cuda.get_current_stream().synchronize()


class ExchangeReduce:
    """All-reduce and reduce-scatter on the GPU from a transport's data movement.

    Reduce-scatter: rank r receives block r of every other rank's ``send`` (one all-to-all) and
    reduces them with its own block on the GPU. All-reduce: a reduce-scatter into this rank's slice
    of ``recv`` followed by an in-place all-gather. Subclasses provide ``alltoallv`` and
    ``allgatherv``.
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
        counts = chunk_counts(n, group.size)
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


def _b(a):
    """A CuPy array as a flat uint8 view (zero-size arrays give an empty uint8 array)."""
    import cupy as cp

    return a.view(cp.uint8) if a.size else cp.empty(0, cp.uint8)


def _bytes(counts, it):
    return [c * it for c in counts]


def _over(total: int):
    """The MPI count limit when ``total`` (bytes, the same on every rank) passes it, else None."""
    limit = count_limit()
    return limit if limit is not None and total > limit else None


def _post(comm, reqs, buf, peer, recv: bool, tag: int):
    """Irecv/Isend of a uint8 buffer of any length: pieces of at most the MPI count limit (the
    receiver cuts the same, since both know the length; same-tag messages arrive in order)."""
    n = buf.size
    limit = count_limit() or n
    for o in range(0, n, limit):
        piece = [buf[o:o + limit], MPI.BYTE]
        reqs.append(comm.Irecv(piece, source=peer, tag=tag) if recv else comm.Isend(piece, dest=peer, tag=tag))


class CudaMpiTransport(ExchangeReduce):
    """CuPy buffers through a CUDA-aware MPI; reductions on the GPU (see the module docstring)."""

    name = "cuda_mpi"

    def __init__(self):
        aware, why = detect.mpi_cuda_aware()
        if not aware:
            raise RuntimeError(
                f"cuda_mpi transport: the loaded MPI is not CUDA-aware ({why}); handing it a CuPy buffer would "
                f"crash. Use MPILOCAL_TRANSPORT=nccl or staged, load a CUDA-aware MPI, or set MPILOCAL_CUDA_AWARE=1 "
                f"if this MPI is CUDA-aware but does not report it"
            )

    def allgatherv(self, send, recv, counts, group):
        if not sum(counts):
            return
        it = recv.dtype.itemsize
        limit = _over(sum(counts) * it)
        if limit is not None:  # MPI-3.1 counts: one MPI_Alltoallw whose datatypes carry 64-bit offsets
            from .host import _alltoallw

            b = _bytes(counts, it)
            if deadline.DEBUG:
                issuing(group, "MPI_Alltoallw", purpose="allgatherv", counts=counts_key(b))
            _sync_current_stream()
            _alltoallw(group.comm, send, [(0, b[group.rank])] * group.size, recv, list(zip(displs(b), b)), limit)
            return
        if all(c == counts[0] for c in counts):  # the plain collective: MPI's own (fastest) algorithm
            if deadline.DEBUG:
                issuing(group, "MPI_Allgather", datatype="BYTE", count=counts[0] * it)
            _sync_current_stream()
            group.comm.Allgather([_b(send), MPI.BYTE], [_b(recv), MPI.BYTE])
            return
        off = displs(counts)[group.rank]
        recv[off:off + counts[group.rank]] = send  # own block on the GPU, then an in-place Allgatherv
        self.allgatherv_inplace(recv, counts, group)

    def allgatherv_inplace(self, recv, counts, group):
        if not sum(counts):
            return
        if _over(sum(counts) * recv.dtype.itemsize) is not None:
            off = displs(counts)[group.rank]
            self.allgatherv(recv[off:off + counts[group.rank]].copy(), recv, counts, group)
            return
        b = _bytes(counts, recv.dtype.itemsize)
        if deadline.DEBUG:
            issuing(group, "MPI_Allgatherv", datatype="BYTE", counts=counts_key(b))
        _sync_current_stream()
        group.comm.Allgatherv(MPI.IN_PLACE, [_b(recv), (b, displs(b)), MPI.BYTE])

    def alltoallv(self, send, send_counts, recv, recv_counts, group, uniform=False, bound=None):
        it = send.dtype.itemsize
        if deadline.DEBUG:  # point-to-point: no collective to match, but the ranks must all be here
            issuing(group, "MPI_Isend/Irecv (alltoallv)", datatype="BYTE")
        _sync_current_stream()
        comm, me = group.comm, group.rank
        sd, rd = displs(send_counts), displs(recv_counts)
        sb, rb = _b(send), _b(recv)
        reqs = []
        # point-to-point, so no MPI-side copy of the own block and no zero-size messages
        for p in range(group.size):
            if p != me and recv_counts[p]:
                _post(comm, reqs, rb[rd[p] * it:(rd[p] + recv_counts[p]) * it], p, True, 7301)
        for p in range(group.size):
            if p != me and send_counts[p]:
                _post(comm, reqs, sb[sd[p] * it:(sd[p] + send_counts[p]) * it], p, False, 7301)
        if send_counts[me]:
            recv[rd[me]:rd[me] + recv_counts[me]] = send[sd[me]:sd[me] + send_counts[me]]
        MPI.Request.Waitall(reqs)

    def _exchange(self, send, counts, group):
        import cupy as cp

        it = send.dtype.itemsize
        me, k = group.rank, group.size
        offs = displs(counts)
        mine = counts[me]
        tmp = cp.empty(mine * (k - 1), dtype=send.dtype)
        _sync_current_stream()
        comm, sb, tb = group.comm, _b(send), _b(tmp)
        reqs, blocks, j = [], [], 0
        for p in range(k):
            if p == me:
                blocks.append(send[offs[me]:offs[me] + mine])
                continue
            if mine:
                _post(comm, reqs, tb[j * mine * it:(j + 1) * mine * it], p, True, 7302)
            blocks.append(tmp[j * mine:(j + 1) * mine])
            j += 1
        for p in range(k):
            if p != me and counts[p]:
                _post(comm, reqs, sb[offs[p] * it:(offs[p] + counts[p]) * it], p, False, 7302)
        MPI.Request.Waitall(reqs)
        return blocks

    def sendrecv(self, sends, recvs, group):
        from .host import p2p

        _sync_current_stream()
        p2p(group.comm, [(p, _b(b)) for p, b in sends], [(p, _b(b)) for p, b in recvs])

    def bcast(self, buf, root, group):
        if not buf.size:
            return
        if deadline.DEBUG:
            issuing(group, "MPI_Bcast", datatype="BYTE", count=buf.nbytes, root=root)
        _sync_current_stream()
        b, n = _b(buf), buf.nbytes
        limit = count_limit() or n
        for o in range(0, n, limit):  # pieces past the MPI count limit (n is the same on every rank)
            group.comm.Bcast([b[o:o + limit], MPI.BYTE], root=root)

    def scatterv(self, send, counts, recv, root, group):
        _sync_current_stream()
        it = recv.dtype.itemsize
        b = _bytes(counts, it)
        limit = _over(sum(b))
        if limit is not None:
            from .host import _alltoallw

            if deadline.DEBUG:
                issuing(group, "MPI_Alltoallw", purpose="scatterv", counts=counts_key(b), root=root)
            me, k = group.rank, group.size
            s_spans = list(zip(displs(b), b)) if me == root else [(0, 0)] * k
            r_spans = [(0, b[me]) if p == root else (0, 0) for p in range(k)]
            _alltoallw(group.comm, send if me == root else recv, s_spans, recv, r_spans, limit)
            return
        if deadline.DEBUG:
            issuing(group, "MPI_Scatterv", datatype="BYTE", counts=counts_key(b), root=root)
        sendspec = [_b(send), (b, displs(b)), MPI.BYTE] if group.rank == root else None
        group.comm.Scatterv(sendspec, [_b(recv), MPI.BYTE], root=root)
