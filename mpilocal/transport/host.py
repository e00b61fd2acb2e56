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

import atexit
import math
from collections import OrderedDict

import numpy as np
from mpi4py import MPI

from .. import _pool, deadline
from ..names import op_tables
from . import count_limit, counts_key, detect, displs, equal_counts, issuing, register_release_hook

__all__ = ["HostTransport", "narrow_sums_saturate", "p2p", "alltoallw_allgatherv", "alltoallw_scatterv",
           "dims_unit", "dims_pieces", "dims_mode", "dims_bound"]

_OPS, _BOOL_OPS = op_tables(sum=MPI.SUM, max=MPI.MAX, min=MPI.MIN, product=MPI.PROD,
                            logical_or=MPI.LOR, logical_and=MPI.LAND)
_NARROW = {np.dtype(np.int8): np.int32, np.dtype(np.uint8): np.uint32,
           np.dtype(np.int16): np.int32, np.dtype(np.uint16): np.uint32}


def narrow_sums_saturate() -> bool:
    """Whether this MPI's sums of 8/16-bit integers may saturate (Open MPI's AVX op component).
    From the library's name only, so the answer is the same on every rank of a job."""
    return "open mpi" in detect.mpi_library_name().lower()


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


#: the most bytes (sent plus received) a prepared send/recv of the host transport stages
#: (:meth:`HostTransport.sendrecv_fn`); larger messages go straight from the arrays (:func:`p2p`).
#: Measured (2 ranks, 2 messages each way): staged is faster up to 2 KiB messages (8 KiB in all)
#: under MPICH 5 and Open MPI 4.1, slower from 4 KiB (Open MPI) / 8 KiB (MPICH) messages
PREPARED_P2P_BYTES = 1 << 13
_P2P_KEY = "host prepared p2p"  # Group.cache: the persistent requests of its prepared send/recvs
_ALL_P2P: list = []  # every such list, freed at exit (before mpi4py's MPI_Finalize)


def _keep_requests(group, reqs) -> None:
    """Keep ``reqs`` (persistent) with ``group``: freed when it is released, or at exit."""
    kept = group.cache.get(_P2P_KEY)
    if kept is None:
        kept = group.cache[_P2P_KEY] = []
        _ALL_P2P.append(kept)
    kept.extend(reqs)


def _free_requests(kept) -> None:
    for r in kept:
        if r != MPI.REQUEST_NULL:
            r.Free()
    kept.clear()


def _release_p2p(group) -> None:
    kept = group.cache.pop(_P2P_KEY, None)
    if kept is not None:
        _free_requests(kept)
        _ALL_P2P.remove(kept)


@atexit.register
def _free_all_p2p():  # registered after mpi4py's import, so it runs before MPI_Finalize
    for kept in _ALL_P2P:
        if not MPI.Is_finalized():
            _free_requests(kept)
    _ALL_P2P.clear()


register_release_hook("06-host-p2p", _release_p2p)  # before the group's communicator is freed


def p2p(comm, sends, recvs):
    """Byte buffers (``[(peer, uint8 buffer)]``, host or, for a CUDA-aware MPI, device) to and from
    peers: one ``MPI_Sendrecv`` for a single pair, else ``Irecv``/``Isend`` + ``Waitall``. The k-th
    message between two ranks carries tag ``7400 + k``, so messages match in list order."""
    if len(sends) == 1 and len(recvs) == 1:
        (dst, sb), (src, rb) = sends[0], recvs[0]
        comm.Sendrecv([sb, MPI.BYTE], dst, _P2P_TAG, [rb, MPI.BYTE], src, _P2P_TAG)
        return
    reqs = [comm.Irecv([b, MPI.BYTE], source=p, tag=t) for (p, b), t in zip(recvs, _tags(recvs))]
    reqs += [comm.Isend([b, MPI.BYTE], dest=p, tag=t) for (p, b), t in zip(sends, _tags(sends))]
    MPI.Request.Waitall(reqs)


def _tags(msgs) -> list:
    """The tag of each message (``[(peer, ...)]``) of :func:`p2p`: the k-th to or from one peer
    carries ``_P2P_TAG + k``, so two ranks' messages match in list order (the single-pair
    ``Sendrecv`` uses ``_P2P_TAG`` too)."""
    nth, tags = {}, []
    for m in msgs:
        k = nth[m[0]] = nth.get(m[0], -1) + 1
        tags.append(_P2P_TAG + k)
    return tags


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


# ------------------------------------------------------------------------------------------------
# S(a) -> S(b): strided pieces described by MPI derived datatypes (no Python pack copies)
# ------------------------------------------------------------------------------------------------
# Data moves as unsigned-free fixed-size integers (a plain copy: bit-exact for any dtype and byte
# order): MPICH's datatype engine (yaksa) packs 8-byte integer elements at memcpy speed but
# single bytes about 40x slower, so the unit is the widest of 8/4/2/1 bytes that divides every
# contiguous run of every piece on every rank (group-wide: :func:`dims_unit`).
_UNIT_TYPES = ((8, MPI.INT64_T), (4, MPI.INT32_T), (2, MPI.INT16_T), (1, MPI.BYTE))


def dims_unit(shape, itemsize, a, b, src_sizes, dst_sizes) -> int:
    """The widest unit (8, 4, 2 or 1 bytes) dividing every contiguous run of the S(a) -> S(b)
    pieces of every rank of the group: from ``shape`` (this rank's, C order; only its dims other
    than ``a`` matter, and those are the same on every rank of the group), ``itemsize`` and the
    group-wide ``src_sizes``/``dst_sizes``, so every rank gets the same unit and the type
    signatures of sender and receiver match."""
    others_after_b = math.prod(n for i, n in enumerate(shape) if i > b and i != a)
    others_after_a = math.prod(n for i, n in enumerate(shape) if i > a and i != b)
    gs, gd = math.gcd(*src_sizes), math.gcd(*dst_sizes)
    send_runs = others_after_b * gd * (gs if a > b else 1)  # rank r's run to p: dst[p] * inner(r)
    recv_runs = others_after_a * gs * (gd if b > a else 1)
    g = itemsize * math.gcd(send_runs, recv_runs)
    for u, _ in _UNIT_TYPES:
        if g % u == 0:
            return u
    return 1  # pragma: no cover - 1 divides everything


def dims_pieces(shape, itemsize, a, b, src_sizes, dst_sizes, me):
    """The byte geometry of S(a) -> S(b) on this rank: ``(send, recv, out_shape)`` where
    ``send[p]``/``recv[p]`` are ``(offset, outer, run, stride)``: ``outer`` runs of ``run`` bytes,
    ``stride`` bytes apart, from ``offset``, of the C-contiguous input (shape ``shape``) and output
    (shape ``out_shape``: ``shape`` with ``a`` the sum of ``src_sizes``, ``b`` this rank's piece)."""
    t = list(shape)
    t[a] = sum(src_sizes)
    t[b] = dst_sizes[me]
    return _runs(shape, b, dst_sizes, itemsize), _runs(t, a, src_sizes, itemsize), tuple(t)


def _runs(shape, d, sizes, e):
    """``(offset, outer, run, stride)`` in bytes of each piece (``sizes[p]`` wide along dim ``d``) of
    a C-contiguous array of ``shape`` with ``e``-byte elements."""
    inner = math.prod(shape[d + 1:])
    outer = math.prod(shape[:d])
    stride = shape[d] * inner * e
    pieces, off = [], 0
    for s in sizes:
        pieces.append((off * inner * e, outer, s * inner * e, stride))
        off += s
    return pieces


def _contig(n: int, base, limit, made):
    """A datatype of ``n`` consecutive ``base`` elements (any ``n``: pieces of at most ``limit``)."""
    if limit is None or n <= limit:
        t = base.Create_contiguous(n)
        made.append(t)
        return t
    q, r = divmod(n, limit)
    chunk = base.Create_contiguous(limit)
    made.append(chunk)
    blocks, disp, types = [q], [0], [chunk]
    if r:
        blocks.append(r)
        disp.append(q * limit * base.Get_size())
        types.append(base)
    t = MPI.Datatype.Create_struct(blocks, disp, types)
    made.append(t)
    return t


def _strided(piece, unit, base, extent, limit, made):
    """A committed datatype of one piece ``(offset, outer, run, stride)`` (bytes; offsets and
    strides are 64-bit in the type, every count at most ``limit``), resized to ``extent`` bytes
    (the whole buffer: ``MPI_Pack``/``Unpack`` of one instance), or None when the piece is empty."""
    off, outer, run, stride = piece
    if not run or not outer:
        return None
    blk = _contig(run // unit, base, limit, made)
    if outer == 1:
        parts, disp = [blk], [off]
    elif limit is None or outer <= limit:
        hv = blk.Create_hvector(outer, 1, stride)
        made.append(hv)
        parts, disp = [hv], [off]
    else:
        parts, disp = [], []
        for o in range(0, outer, limit):
            hv = blk.Create_hvector(min(limit, outer - o), 1, stride)
            made.append(hv)
            parts.append(hv)
            disp.append(off + o * stride)
    st = MPI.Datatype.Create_struct([1] * len(parts), disp, parts)
    made.append(st)
    t = st.Create_resized(0, extent)
    made.append(t)
    t.Commit()
    return t


def _union(types, extent, made):
    """One committed datatype of several pieces (in order) of one buffer, or None if all are empty."""
    types = [t for t in types if t is not None]
    if not types:
        return None
    st = MPI.Datatype.Create_struct([1] * len(types), [0] * len(types), types)
    made.append(st)
    t = st.Create_resized(0, extent)
    made.append(t)
    t.Commit()
    return t


class _DimsPlan:
    """The datatypes of one S(a) -> S(b) shape on one rank; freed when evicted from the cache."""

    __slots__ = ("mode", "send_types", "recv_types", "counts_s", "counts_r", "pack", "unpack", "pack_counts",
                 "unpack_counts", "send_displs", "recv_displs", "own", "made")

    def free(self):
        for t in self.made:
            if t != MPI.DATATYPE_NULL:
                t.Free()
        self.made = []


_PLANS: OrderedDict = OrderedDict()
_PLANS_MAX = 64  # cached plans (their MPI datatypes): the least recently used beyond this are freed


def dims_mode(bound: int) -> str:
    """How :meth:`HostTransport.alltoall_dims` moves the pieces here, from the MPI library, the count
    limit and ``bound`` (the largest number of bytes any rank of the group sends or receives: every
    rank computes the same, :func:`dims_bound`):

    * ``"types"``: one ``MPI_Alltoallw`` whose per-peer datatypes describe the pieces in place
      (no copy outside MPI). Open MPI's datatype engine packs as it sends; the best on Open MPI
      up to a few MiB per rank, and the only mode past the count limit of an MPI-3.1 library.
    * ``"pack"``: the pieces for the other ranks packed by ``MPI_Pack`` of the same datatypes (one
      call) and moved contiguous by ``MPI_Alltoallv``; this rank's own piece copied once, straight
      into the result. Always on MPICH (it sends non-contiguous data to another process through
      its 8 KiB shared-memory cells, 2-3x slower than packing first: a contiguous message goes in one
      CMA copy); on Open MPI from :data:`PACK_FROM` bytes per rank up to the count limit.

    Measured at 2 ranks, S0->S1 of float32 rows of 32 (64-byte runs):
    benchmarks/results/2026-11-30b-cpu2core-bandwidth.md."""
    if _FORCE_MODE[0] is not None:
        return _FORCE_MODE[0]
    limit = count_limit()
    if _MPICH and limit is None:
        return "pack"
    if not _MPICH and bound >= PACK_FROM and (limit is None or bound <= limit):
        return "pack"
    return "types"


PACK_FROM = 8 << 20


def dims_bound(shape, itemsize, a, b, src_sizes, dst_sizes) -> int:
    """The most bytes any rank sends or receives in S(a) -> S(b) (group-wide values only: the
    shape's dims other than ``a`` and ``b``, and every rank's sizes)."""
    other = math.prod(n for i, n in enumerate(shape) if i != a and i != b)
    return itemsize * other * max(max(src_sizes) * sum(dst_sizes), sum(src_sizes) * max(dst_sizes))


_FORCE_MODE = [None]  # tests: cover both modes on any MPI
_MPICH = "mpich" in detect.mpi_library_name().lower()  # the library's name: the same on every rank


def _dims_plan(shape, itemsize, a, b, src_sizes, dst_sizes, me, nbytes_in, nbytes_out):
    limit = count_limit()
    key = (shape, itemsize, a, b, src_sizes, dst_sizes, me, limit, _FORCE_MODE[0])  # fixes the mode too
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    mode = dims_mode(dims_bound(shape, itemsize, a, b, src_sizes, dst_sizes))
    unit = dims_unit(shape, itemsize, a, b, src_sizes, dst_sizes)
    base = dict(_UNIT_TYPES)[unit]
    send, recv, _ = dims_pieces(shape, itemsize, a, b, src_sizes, dst_sizes, me)
    plan = _DimsPlan()
    plan.mode = mode
    plan.made = made = []
    try:
        st = [_strided(pc, unit, base, nbytes_in, limit, made) for pc in send]
        rt = [_strided(pc, unit, base, nbytes_out, limit, made) for pc in recv]
        if mode == "types":
            plan.counts_s = [0 if t is None else 1 for t in st]
            plan.counts_r = [0 if t is None else 1 for t in rt]
            plan.send_types = [MPI.BYTE if t is None else t for t in st]
            plan.recv_types = [MPI.BYTE if t is None else t for t in rt]
        else:
            k = len(send)
            plan.send_displs = [pc[0] for pc in send]
            # our own piece, one copy by MPI's datatype engine when one side is a single run:
            # packed from the input straight to its offset in the result, or unpacked from the
            # input's run straight into the result; else copied by NumPy (_copy_piece)
            s_me, r_me = send[me], recv[me]
            if not (s_me[1] and s_me[2]):
                plan.own = None
            elif r_me[1] == 1:
                plan.own = ("pack", st[me], r_me[0])
            elif s_me[1] == 1:
                plan.own = ("unpack", rt[me], s_me[0])
            else:
                plan.own = ("numpy",)
            plan.recv_displs = [pc[0] for pc in recv]
            plan.pack_counts = [0 if p == me else pc[1] * pc[2] for p, pc in enumerate(send)]
            plan.unpack_counts = [0 if p == me else pc[1] * pc[2] for p, pc in enumerate(recv)]
            # the send side is packed unless each piece is one run (Shard(0) -> ...), the receive
            # side unpacked unless each piece is one run (... -> from Shard(0))
            plan.pack = None if all(pc[1] <= 1 for pc in send) else \
                _union([st[p] for p in range(k) if p != me], nbytes_in, made)
            plan.unpack = None if all(pc[1] <= 1 for pc in recv) else \
                _union([rt[p] for p in range(k) if p != me], nbytes_out, made)
    except BaseException:
        plan.free()
        raise
    _PLANS[key] = plan
    while len(_PLANS) > _PLANS_MAX:
        _PLANS.popitem(last=False)[1].free()
    return plan


def _copy_piece(x, y, a, b, src_sizes, dst_sizes, me):
    """This rank's own piece: ``y[... src rows of me along a ...] = x[... dst piece of me along b ...]``,
    copied as unsigned integers of the dtype's width (bit-exact for any dtype)."""
    so, do = sum(src_sizes[:me]), sum(dst_sizes[:me])
    e = x.dtype.itemsize
    v = math.gcd(e, 8)
    w = e // v  # the last axis grows by w when viewed as v-byte integers
    xs = [slice(None)] * x.ndim
    ys = [slice(None)] * y.ndim
    xs[b] = slice(do, do + dst_sizes[me])
    ys[a] = slice(so, so + src_sizes[me])
    last = x.ndim - 1
    for sl, d in ((xs, b), (ys, a)):
        if d == last and w > 1:
            sl[d] = slice(sl[d].start * w, sl[d].stop * w)
    ut = np.dtype(f"u{v}")
    xv = x.view(ut) if x.ndim else x
    yv = y.view(ut) if y.ndim else y
    yv[tuple(ys)] = xv[tuple(xs)]


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

    def alltoall_dims(self, send, recv, src_dim, dst_dim, src_sizes, dst_sizes, group):
        """Shard(src_dim) -> Shard(dst_dim) between the C-contiguous arrays ``send`` (this rank's
        shard) and ``recv`` (its result, :func:`dims_pieces`' ``out_shape``) without a Python pack
        copy: the pieces are MPI derived datatypes (cached per shape, at most ``_PLANS_MAX``), moved
        as :func:`dims_mode` says. Every choice (mode, unit, call) comes from group-wide values:
        the MPI library, the count limit, the shape's dims other than ``src_dim``, the sizes."""
        me = group.rank
        plan = _dims_plan(send.shape, send.dtype.itemsize, src_dim, dst_dim, tuple(src_sizes), tuple(dst_sizes),
                          me, send.nbytes, recv.nbytes)
        sb, rb = _as_bytes(send), _as_bytes(recv)
        comm = group.comm
        if plan.mode == "types":
            if deadline.DEBUG:
                issuing(group, "MPI_Alltoallw", purpose="alltoall_dims")
            k = group.size
            comm.Alltoallw([sb, (plan.counts_s, [0] * k), plan.send_types],
                           [rb, (plan.counts_r, [0] * k), plan.recv_types])
            return
        # "pack": pieces for the other ranks packed in rank order (or sent in place when each is
        # one run), moved by MPI_Alltoallv, unpacked (or received in place); our own piece copied
        if plan.pack is not None:
            packed = _pool.empty((sum(plan.pack_counts),), np.uint8)
            if send.nbytes:
                plan.pack.Pack(sb, packed, 0, MPI.COMM_SELF)
            s_spec = [packed, (plan.pack_counts, displs(plan.pack_counts)), MPI.BYTE]
        else:
            s_spec = [sb, (plan.pack_counts, plan.send_displs), MPI.BYTE]
        if plan.unpack is not None:
            staged = _pool.empty((sum(plan.unpack_counts),), np.uint8)
            r_spec = [staged, (plan.unpack_counts, displs(plan.unpack_counts)), MPI.BYTE]
        else:
            staged = None
            r_spec = [rb, (plan.unpack_counts, plan.recv_displs), MPI.BYTE]
        if deadline.DEBUG:
            issuing(group, "MPI_Alltoallv", datatype="BYTE", purpose="alltoall_dims")
        comm.Alltoallv(s_spec, r_spec)
        own = plan.own
        if own is None:
            pass
        elif own[0] == "pack":
            own[1].Pack(sb, rb, own[2], MPI.COMM_SELF)
        elif own[0] == "unpack":
            own[1].Unpack(sb, own[2], rb, MPI.COMM_SELF)
        else:
            _copy_piece(send, recv, src_dim, dst_dim, src_sizes, dst_sizes, me)
        if staged is not None and recv.nbytes:
            plan.unpack.Unpack(staged, 0, rb, MPI.COMM_SELF)

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

    def sendrecv_fn(self, sends, recvs, group):
        """``run(*arrays)``: :meth:`sendrecv` of fixed small messages, prepared (the neighbour
        collectives' plans): ``sends`` / ``recvs`` are ``[(group rank, slot, byte offset, nbytes)]``
        in ``arrays[slot]`` (C-contiguous, other ranks only). Up to :data:`PREPARED_P2P_BYTES` in
        all, the messages go through persistent requests on staging buffers made here
        (``MPI_Send_init`` / ``MPI_Recv_init``, tags as :func:`p2p` numbers them, so they match its
        messages): per call the sent bytes are copied in, ``Startall`` / ``Waitall``, the received
        bytes copied out. Larger ones go straight from the arrays (:func:`p2p`)."""
        ns, nr = sum(m[3] for m in sends), sum(m[3] for m in recvs)
        comm, u8 = group.comm, np.uint8
        if ns + nr > PREPARED_P2P_BYTES:
            def direct(*arrays):
                b = [a.reshape(-1).view(u8) for a in arrays]
                p2p(comm, [(p, b[s][o:o + n]) for p, s, o, n in sends], [(p, b[s][o:o + n]) for p, s, o, n in recvs])

            return direct
        sbuf, rbuf = np.empty(ns, np.uint8), np.empty(nr, np.uint8)
        reqs, cin, cout = [], [], []
        for msgs, buf, init, io in ((recvs, rbuf, comm.Recv_init, cout), (sends, sbuf, comm.Send_init, cin)):
            at = 0
            for (p, slot, off, n), tag in zip(msgs, _tags(msgs)):
                reqs.append(init([buf[at:at + n], MPI.BYTE], p, tag))
                io.append((slot, off, off + n, buf[at:at + n]))
                at += n
        _keep_requests(group, reqs)
        start, wait = MPI.Prequest.Startall, MPI.Request.Waitall

        def run(*arrays):
            b = [a.reshape(-1).view(u8) for a in arrays]
            for s, lo, hi, v in cin:
                v[...] = b[s][lo:hi]
            start(reqs)
            wait(reqs)
            for s, lo, hi, v in cout:
                b[s][lo:hi] = v

        return run

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
