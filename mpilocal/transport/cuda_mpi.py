"""The ``cuda_mpi`` transport: CuPy buffers handed straight to a CUDA-aware MPI.

Data movement (all-gather, all-to-all, broadcast, scatter) goes to MPI as device buffers after the
producing CuPy stream is synchronized (MPI does not know CUDA streams). Reductions never use the MPI
library's own reduction, which CUDA-aware Open MPI runs on the host (0.3 GB/s measured on 2×H100):
an all-reduce is a reduce-scatter by point-to-point exchange of blocks, a local elementwise reduction
on the GPU, and an all-gather of the reduced blocks (the bandwidth-optimal pattern NCCL's ring uses).

The reduction (:class:`~mpilocal.transport.gpu_common.ExchangeReduce`) and the GPU helpers are
shared with the other device transports in :mod:`mpilocal.transport.gpu_common`; the MPI byte
helpers for large counts and point-to-point (``alltoallw_allgatherv``/``alltoallw_scatterv``,
``p2p``) with :mod:`mpilocal.transport.host`.

A CuPy buffer never reaches an MPI that is not CUDA-aware: :class:`CudaMpiTransport` refuses to be
built unless :func:`mpilocal.transport.detect.mpi_cuda_aware` says yes.
"""

from __future__ import annotations

from mpi4py import MPI

from .. import deadline
from . import count_limit, counts_key, detect, displs, equal_counts, issuing
from .gpu_common import ExchangeReduce, sync_current_stream
from .host import alltoallw_allgatherv, alltoallw_scatterv, p2p

__all__ = ["CudaMpiTransport"]


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
            sync_current_stream()
            alltoallw_allgatherv(group, send, recv, _bytes(counts, it), limit)
            return
        if equal_counts(counts):  # the plain collective: MPI's own (fastest) algorithm
            if deadline.DEBUG:
                issuing(group, "MPI_Allgather", datatype="BYTE", count=counts[0] * it)
            sync_current_stream()
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
        sync_current_stream()
        group.comm.Allgatherv(MPI.IN_PLACE, [_b(recv), (b, displs(b)), MPI.BYTE])

    def alltoallv(self, send, send_counts, recv, recv_counts, group, uniform=False, bound=None):
        it = send.dtype.itemsize
        if deadline.DEBUG:  # point-to-point: no collective to match, but the ranks must all be here
            issuing(group, "MPI_Isend/Irecv (alltoallv)", datatype="BYTE")
        sync_current_stream()
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
        sync_current_stream()
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
        sync_current_stream()
        p2p(group.comm, [(p, _b(b)) for p, b in sends], [(p, _b(b)) for p, b in recvs])

    def bcast(self, buf, root, group):
        if not buf.size:
            return
        if deadline.DEBUG:
            issuing(group, "MPI_Bcast", datatype="BYTE", count=buf.nbytes, root=root)
        sync_current_stream()
        b, n = _b(buf), buf.nbytes
        limit = count_limit() or n
        for o in range(0, n, limit):  # pieces past the MPI count limit (n is the same on every rank)
            group.comm.Bcast([b[o:o + limit], MPI.BYTE], root=root)

    def scatterv(self, send, counts, recv, root, group):
        sync_current_stream()
        it = recv.dtype.itemsize
        b = _bytes(counts, it)
        limit = _over(sum(b))
        if limit is not None:
            alltoallw_scatterv(group, send, recv, b, root, limit)
            return
        if deadline.DEBUG:
            issuing(group, "MPI_Scatterv", datatype="BYTE", counts=counts_key(b), root=root)
        sendspec = [_b(send), (b, displs(b)), MPI.BYTE] if group.rank == root else None
        group.comm.Scatterv(sendspec, [_b(recv), MPI.BYTE], root=root)
