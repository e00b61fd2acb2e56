"""The host transport: NumPy buffers through MPI's buffer (upper-case) methods, never pickle.

Data movement is done in bytes (``MPI.BYTE``), so any dtype moves; reductions use the MPI datatype
of the NumPy dtype. Dtypes MPI cannot reduce (``float16``) are widened to ``float32`` for the
reduction; ``bool`` sums/maxima are logical OR, minima/products logical AND.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import displs, equal_counts

__all__ = ["HostTransport", "p2p"]

_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "product": MPI.PROD}
_BOOL_OPS = {"sum": MPI.LOR, "max": MPI.LOR, "min": MPI.LAND, "product": MPI.LAND}


def _bytes(counts, itemsize):
    return [c * itemsize for c in counts]


_TYPES: dict = {}


def _mpi_type(dtype):
    t = _TYPES.get(dtype, False)
    if t is False:
        t = _TYPES[dtype] = _lookup_type(dtype)
    return t


def _lookup_type(dtype):
    if dtype == np.float16:  # not every MPI reduces half precision: widen instead
        return None
    t = MPI._typedict.get(np.dtype(dtype).char)  # predefined types: MPI defines reductions on them
    return None if t is None or t == MPI.DATATYPE_NULL else t


def _mpi_op(op: str, dtype):
    if dtype == np.bool_:
        return _BOOL_OPS[op]
    return _OPS[op]


def _as_bytes(a):
    return a.view(np.uint8) if a.size else np.empty(0, np.uint8)


_P2P_TAG = 7400


def p2p(comm, sends, recvs):
    """Byte buffers (``[(peer, uint8 buffer)]``, host or, for a CUDA-aware MPI, device) to and from
    peers: one ``MPI_Sendrecv`` for a single pair, else ``Irecv``/``Isend`` + ``Waitall``. The k-th
    message between two ranks carries tag ``7400 + k``, so messages match in list order."""
    if len(sends) == 1 and len(recvs) == 1:
        (dst, sb), (src, rb) = sends[0], recvs[0]
        comm.Sendrecv([sb, MPI.BYTE], dst, _P2P_TAG, [rb, MPI.BYTE], src, _P2P_TAG)
        return
    reqs, nth = [], {}
    for p, b in recvs:
        k = nth[p] = nth.get(p, -1) + 1
        reqs.append(comm.Irecv([b, MPI.BYTE], source=p, tag=_P2P_TAG + k))
    nth = {}
    for p, b in sends:
        k = nth[p] = nth.get(p, -1) + 1
        reqs.append(comm.Isend([b, MPI.BYTE], dest=p, tag=_P2P_TAG + k))
    MPI.Request.Waitall(reqs)


class HostTransport:
    """NumPy arrays over MPI (any MPI, CUDA-aware or not)."""

    name = "host"

    # Equal counts use the plain collective: MPI libraries tune MPI_Allgather & co. far better than
    # their v-variants (MPICH 5: Allgatherv of 1 MiB takes twice as long as Allgather).

    def allgatherv(self, send, recv, counts, group):
        if equal_counts(counts):
            group.comm.Allgather([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE])
            return
        b = _bytes(counts, send.dtype.itemsize)
        group.comm.Allgatherv([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), (b, displs(b)), MPI.BYTE])

    def allreduce(self, send, recv, op, group):
        send, recv, back = self._reducible(send, recv)
        t = _mpi_type(recv.dtype)
        group.comm.Allreduce(MPI.IN_PLACE if send is recv else [send, t], [recv, t], _mpi_op(op, recv.dtype))
        if back is not None:
            back[...] = recv

    def reduce_scatterv(self, send, recv, counts, op, group):
        send, recv, back = self._reducible(send, recv)
        t = _mpi_type(send.dtype)
        if equal_counts(counts):
            group.comm.Reduce_scatter_block([send, t], [recv, t], _mpi_op(op, send.dtype))
        else:
            group.comm.Reduce_scatter([send, t], [recv, t], list(counts), _mpi_op(op, send.dtype))
        if back is not None:
            back[...] = recv

    def alltoallv(self, send, send_counts, recv, recv_counts, group):
        if equal_counts(send_counts) and equal_counts(recv_counts):
            group.comm.Alltoall([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE])
            return
        it = send.dtype.itemsize
        sb, rb = _bytes(send_counts, it), _bytes(recv_counts, it)
        group.comm.Alltoallv([_as_bytes(send), (sb, displs(sb)), MPI.BYTE],
                             [_as_bytes(recv), (rb, displs(rb)), MPI.BYTE])

    def bcast(self, buf, root, group):
        group.comm.Bcast([_as_bytes(buf), MPI.BYTE], root=root)

    def scatterv(self, send, counts, recv, root, group):
        if equal_counts(counts):
            sendspec = [_as_bytes(send), MPI.BYTE] if group.rank == root else None
            group.comm.Scatter(sendspec, [_as_bytes(recv), MPI.BYTE], root=root)
            return
        b = _bytes(counts, recv.dtype.itemsize)
        sendspec = [_as_bytes(send), (b, displs(b)), MPI.BYTE] if group.rank == root else None
        group.comm.Scatterv(sendspec, [_as_bytes(recv), MPI.BYTE], root=root)

    def sendrecv(self, sends, recvs, group):
        p2p(group.comm, [(p, _as_bytes(b)) for p, b in sends], [(p, _as_bytes(b)) for p, b in recvs])

    @staticmethod
    def _reducible(send, recv):
        """Widen dtypes MPI cannot reduce; returns (send, recv, original recv to copy back or None)."""
        if _mpi_type(send.dtype) is not None:
            return send, recv, None
        if send.dtype == np.float16:
            wide = np.float32
        else:
            raise TypeError(f"mpilocal: MPI cannot reduce dtype {send.dtype}; cast to a standard type first")
        same = send is recv
        w_recv = recv.astype(wide)
        w_send = w_recv if same else send.astype(wide)
        return w_send, w_recv, recv
