"""The host transport: NumPy buffers through MPI's buffer (upper-case) methods, never pickle.

Data movement is done in bytes (``MPI.BYTE``), so any dtype moves; reductions use the MPI datatype
of the NumPy dtype. Dtypes MPI cannot reduce (``float16``) are widened to ``float32`` for the
reduction; ``bool`` reduces logically (:data:`mpilocal.names.BOOL_OPS`: sums/maxima OR, minima/products AND).

Exact on every MPI:

- **Narrow integer sums wrap.** Open MPI (4.1 and 5) sums int8/uint8/int16/uint16 with saturating
  AVX instructions (uint8 200 + 200 gives 255; Open MPI issue #8045, "won't fix"). Under Open MPI,
  sums and products of those dtypes are widened to 32 bits and narrowed back (two's-complement
  wrap-around, as NumPy). The choice depends only on the MPI library, the same on every rank.
- **Any size on MPI-3.1** (no large-count calls, counts are C ``int``): a call whose counts or
  displacements pass :func:`~mpilocal.transport.count_limit` goes in pieces (reductions, broadcast)
  or as one ``MPI_Alltoallw`` whose per-peer datatypes carry 64-bit byte offsets (data movement).
  The choice depends only on counts every rank knows.

Every choice between calls (plain vs v-variant, whole vs pieces) comes from group-wide values; see
:mod:`mpilocal.transport`. Under ``MPILOCAL_DEBUG=1`` every call is fingerprinted first.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import deadline
from ..names import op_tables
from . import count_limit, counts_key, displs, equal_counts, issuing

__all__ = ["HostTransport", "narrow_sums_saturate", "p2p", "alltoallw_allgatherv", "alltoallw_scatterv"]

_OPS, _BOOL_OPS = op_tables(sum=MPI.SUM, max=MPI.MAX, min=MPI.MIN, product=MPI.PROD,
                            logical_or=MPI.LOR, logical_and=MPI.LAND)
_NARROW = {np.dtype(np.int8): np.int32, np.dtype(np.uint8): np.uint32,
           np.dtype(np.int16): np.int32, np.dtype(np.uint16): np.uint32}


def narrow_sums_saturate() -> bool:
    """Whether this MPI's sums of 8/16-bit integers may saturate (Open MPI's AVX op component).
    From the library's name only, so the answer is the same on every rank of a job."""
    return "open mpi" in MPI.Get_library_version().lower()


_SATURATES = narrow_sums_saturate()


def _bytes(counts, itemsize):
    return [c * itemsize for c in counts]


_TYPES: dict = {}


def _mpi_type(dtype):
    t = _TYPES.get(dtype, False)
    if t is False:
        t = _TYPES[dtype] = _lookup_type(dtype)
    return t


def _lookup_type(dtype):
    dtype = np.dtype(dtype)
    if dtype == np.float16 or not dtype.isnative:  # not every MPI reduces half precision: widen instead
        return None
    t = MPI._typedict.get(dtype.char)  # predefined types: MPI defines reductions on them
    return None if t is None or t == MPI.DATATYPE_NULL else t


def _mpi_op(op: str, dtype):
    if dtype == np.bool_:
        return _BOOL_OPS[op]
    return _OPS[op]


def _as_bytes(a):
    return a.view(np.uint8) if a.size else np.empty(0, np.uint8)


def _name(t) -> str:
    try:
        return t.Get_name() or "derived"
    except Exception:  # pragma: no cover
        return "datatype"


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


# ------------------------------------------------------------------------------------------------
# large messages on an MPI without large-count calls
# ------------------------------------------------------------------------------------------------
def _span(off: int, n: int, limit: int):
    """A committed datatype: bytes ``[off, off + n)`` of a buffer as one element (64-bit offset,
    any length), or None for ``n == 0``. The caller frees it."""
    if not n:
        return None
    q, r = divmod(n, limit)
    blocks, disp, types, made = [], [], [], []
    if q:
        chunk = MPI.BYTE.Create_contiguous(limit)
        made.append(chunk)
        blocks.append(q)
        disp.append(off)
        types.append(chunk)
    if r:
        blocks.append(r)
        disp.append(off + q * limit)
        types.append(MPI.BYTE)
    t = MPI.Datatype.Create_struct(blocks, disp, types)
    t.Commit()
    for c in made:
        c.Free()
    return t


def _alltoallw(comm, send, s_spans, recv, r_spans, limit):
    """``MPI_Alltoallw`` where peer p gets bytes ``s_spans[p] = (off, n)`` of ``send`` and bytes
    ``r_spans[p]`` of ``recv`` come from peer p; every count is 0 or 1, offsets live in the types."""
    made = []

    def spec(buf, spans):
        counts, types = [], []
        for off, n in spans:
            t = _span(off, n, limit)
            if t is None:
                counts.append(0)
                types.append(MPI.BYTE)
            else:
                made.append(t)
                counts.append(1)
                types.append(t)
        return [buf, (counts, [0] * len(spans)), types]

    try:
        comm.Alltoallw(spec(_as_bytes(send), s_spans), spec(_as_bytes(recv), r_spans))
    finally:
        for t in made:
            t.Free()


def alltoallw_allgatherv(group, send, recv, b, limit):
    """All-gather of ``b[p]`` bytes from each rank p (``b``: every rank's byte count) as one
    ``MPI_Alltoallw`` whose datatypes carry 64-bit offsets (any size on an MPI without large-count
    calls). ``send``/``recv``: host buffers, or device buffers for a CUDA-aware MPI (``cuda_mpi``)."""
    if deadline.DEBUG:
        issuing(group, "MPI_Alltoallw", purpose="allgatherv", counts=counts_key(b))
    _alltoallw(group.comm, send, [(0, b[group.rank])] * group.size, recv, list(zip(displs(b), b)), limit)


def alltoallw_scatterv(group, send, recv, b, root, limit):
    """Scatter of ``b[p]`` bytes of ``root``'s ``send`` to each rank p as one ``MPI_Alltoallw`` (as
    :func:`alltoallw_allgatherv`)."""
    if deadline.DEBUG:
        issuing(group, "MPI_Alltoallw", purpose="scatterv", counts=counts_key(b), root=root)
    me, k = group.rank, group.size
    s_spans = list(zip(displs(b), b)) if me == root else [(0, 0)] * k
    r_spans = [(0, b[me]) if p == root else (0, 0) for p in range(k)]
    _alltoallw(group.comm, send if me == root else recv, s_spans, recv, r_spans, limit)


def _pieces(n: int, limit: int):
    """(offset, length) pieces of at most ``limit`` covering ``n`` (the same on every rank for the
    same ``n``)."""
    return [(o, min(limit, n - o)) for o in range(0, n, limit)] or [(0, 0)]


class HostTransport:
    """NumPy arrays over MPI (any MPI, CUDA-aware or not)."""

    name = "host"

    # Equal counts use the plain collective: MPI libraries tune MPI_Allgather & co. far better than
    # their v-variants (MPICH 5: Allgatherv of 1 MiB takes twice as long as Allgather).

    def allgatherv(self, send, recv, counts, group):
        it = send.dtype.itemsize
        b = _bytes(counts, it)
        limit = count_limit()
        if limit is not None and sum(b) > limit:  # group-wide: every rank holds `counts`
            alltoallw_allgatherv(group, send, recv, b, limit)
            return
        if equal_counts(counts):
            if deadline.DEBUG:
                issuing(group, "MPI_Allgather", datatype="BYTE", count=b[0])
            group.comm.Allgather([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE])
            return
        if deadline.DEBUG:
            issuing(group, "MPI_Allgatherv", datatype="BYTE", counts=counts_key(b))
        group.comm.Allgatherv([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), (b, displs(b)), MPI.BYTE])

    def allreduce(self, send, recv, op, group):
        send, recv, back = self._reducible(send, recv, op)
        t = _mpi_type(recv.dtype)
        o = _mpi_op(op, recv.dtype)
        n = recv.size
        limit = count_limit()
        same = send is recv
        if deadline.DEBUG:
            issuing(group, "MPI_Allreduce", datatype=_name(t), op=op, count=n)
        if limit is None or n <= limit:
            group.comm.Allreduce(MPI.IN_PLACE if same else [send, t], [recv, t], o)
        else:  # pieces of at most `limit` elements (the same cut on every rank: n agrees)
            for off, ln in _pieces(n, limit):
                r = recv[off:off + ln]
                group.comm.Allreduce(MPI.IN_PLACE if same else [send[off:off + ln], t], [r, t], o)
        if back is not None:
            back[...] = recv

    def reduce_scatterv(self, send, recv, counts, op, group):
        send, recv, back = self._reducible(send, recv, op)
        t = _mpi_type(send.dtype)
        o = _mpi_op(op, send.dtype)
        limit = count_limit()
        if limit is not None and sum(counts) > limit:
            # one MPI_Reduce per block (rooted at its owner), each in pieces of at most `limit`
            if deadline.DEBUG:
                issuing(group, "MPI_Reduce (per block)", datatype=_name(t), op=op, counts=counts_key(counts))
            d = displs(counts)
            for p, c in enumerate(counts):
                for off, ln in _pieces(c, limit):
                    if not ln:
                        continue
                    src = send[d[p] + off:d[p] + off + ln]
                    dst = [recv[off:off + ln], t] if p == group.rank else None
                    group.comm.Reduce([src, t], dst, o, root=p)
        elif equal_counts(counts):
            if deadline.DEBUG:
                issuing(group, "MPI_Reduce_scatter_block", datatype=_name(t), op=op, count=counts[0])
            group.comm.Reduce_scatter_block([send, t], [recv, t], o)
        else:
            if deadline.DEBUG:
                issuing(group, "MPI_Reduce_scatter", datatype=_name(t), op=op, counts=counts_key(counts))
            group.comm.Reduce_scatter([send, t], [recv, t], list(counts), o)
        if back is not None:
            back[...] = recv

    def alltoallv(self, send, send_counts, recv, recv_counts, group, uniform=False, bound=None):
        # send_counts/recv_counts are this rank's row/column: they differ between ranks, so the
        # choice of call comes from the caller's group-wide `uniform` and `bound` only
        it = send.dtype.itemsize
        limit = count_limit()
        if limit is not None and bound is not None and bound * it > limit:
            if deadline.DEBUG:
                issuing(group, "MPI_Alltoallw", purpose="alltoallv")
            sb, rb = _bytes(send_counts, it), _bytes(recv_counts, it)
            _alltoallw(group.comm, send, list(zip(displs(sb), sb)), recv, list(zip(displs(rb), rb)), limit)
            return
        if uniform:
            if deadline.DEBUG:
                issuing(group, "MPI_Alltoall", datatype="BYTE", count=send_counts[0] * it)
            group.comm.Alltoall([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE])
            return
        if deadline.DEBUG:
            issuing(group, "MPI_Alltoallv", datatype="BYTE")
        sb, rb = _bytes(send_counts, it), _bytes(recv_counts, it)
        group.comm.Alltoallv([_as_bytes(send), (sb, displs(sb)), MPI.BYTE],
                             [_as_bytes(recv), (rb, displs(rb)), MPI.BYTE])

    def bcast(self, buf, root, group):
        n = buf.nbytes
        limit = count_limit()
        if deadline.DEBUG:
            issuing(group, "MPI_Bcast", datatype="BYTE", count=n, root=root)
        if limit is None or n <= limit:
            group.comm.Bcast([_as_bytes(buf), MPI.BYTE], root=root)
            return
        b = _as_bytes(buf)
        for off, ln in _pieces(n, limit):
            group.comm.Bcast([b[off:off + ln], MPI.BYTE], root=root)

    def scatterv(self, send, counts, recv, root, group):
        b = _bytes(counts, recv.dtype.itemsize)
        limit = count_limit()
        me = group.rank
        if limit is not None and sum(b) > limit:
            alltoallw_scatterv(group, send, recv, b, root, limit)
            return
        if equal_counts(counts):
            if deadline.DEBUG:
                issuing(group, "MPI_Scatter", datatype="BYTE", count=b[0], root=root)
            sendspec = [_as_bytes(send), MPI.BYTE] if me == root else None
            group.comm.Scatter(sendspec, [_as_bytes(recv), MPI.BYTE], root=root)
            return
        if deadline.DEBUG:
            issuing(group, "MPI_Scatterv", datatype="BYTE", counts=counts_key(b), root=root)
        sendspec = [_as_bytes(send), (b, displs(b)), MPI.BYTE] if me == root else None
        group.comm.Scatterv(sendspec, [_as_bytes(recv), MPI.BYTE], root=root)

    def sendrecv(self, sends, recvs, group):
        p2p(group.comm, [(p, _as_bytes(b)) for p, b in sends], [(p, _as_bytes(b)) for p, b in recvs])

    @staticmethod
    def _reducible(send, recv, op="sum"):
        """Widen dtypes MPI cannot reduce exactly; returns (send, recv, original recv to copy back or
        None). float16: float32. 8/16-bit integer sums and products under Open MPI: 32 bits (its
        AVX sums saturate; 32-bit sums and products wrap, and narrowing back wraps as NumPy does)."""
        dt = send.dtype
        wide = None
        if _SATURATES and op in ("sum", "product"):
            wide = _NARROW.get(dt)
        if wide is None:
            if _mpi_type(dt) is not None:
                return send, recv, None
            if dt == np.float16:
                wide = np.float32
            else:
                raise TypeError(f"mpilocal: MPI cannot reduce dtype {dt}; cast to a standard type first")
        same = send is recv
        w_recv = recv.astype(wide)
        w_send = w_recv if same else send.astype(wide)
        return w_send, w_recv, recv
