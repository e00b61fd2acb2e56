"""The ``nccl`` transport: CuPy buffers through ``cupy.cuda.nccl``.

One NCCL communicator per :class:`~mpilocal.transport.Group` (that is, per mesh-dim communicator),
created on first use and kept in ``group.cache``: rank 0 of the group makes the unique id and
broadcasts it over the group's MPI communicator, then every rank calls ``ncclCommInitRank``. Every
operation is enqueued on the *current* CuPy stream, so it is ordered after the kernels that produced
its input and before those that consume its output, without a host synchronization.

Dtypes: data movement (all-gather, all-to-all, broadcast, scatter) goes as bytes, so every dtype
moves. Reductions use NCCL's types; those NCCL lacks are handled exactly: ``bool`` as ``uint8`` with
``max`` (sum/max = logical OR) or ``min`` (product/min = logical AND); complex sums as real pairs;
complex products by an all-gather and an ordered product on the GPU; ``int16``/``uint16`` widened to
32 bits (sums and products wrap exactly as in 16 bits once narrowed back).

Uneven all-gathers are grouped broadcasts and uneven reduce-scatters grouped reduces (NCCL's
collectives need equal counts); all-to-all is grouped send/recv with the own block copied locally.
"""

from __future__ import annotations

import numpy as np

from .. import deadline
from ..names import op_tables
from . import counts_key, displs, equal_counts, issuing, register_release_hook
from .gpu_common import reduce_blocks

__all__ = ["NcclTransport", "nccl_comm"]


_N = []  # [cupy.cuda.nccl], imported on first use (an import statement per call costs a microsecond)


def _nccl():
    if not _N:
        from cupy.cuda import nccl

        _N.append(nccl)
    return _N[0]


_DT: dict = {}


def _dtype_table():
    if not _DT:
        n = _nccl()
        for np_t, name in ((np.int8, "NCCL_INT8"), (np.uint8, "NCCL_UINT8"), (np.int32, "NCCL_INT32"),
                           (np.uint32, "NCCL_UINT32"), (np.int64, "NCCL_INT64"), (np.uint64, "NCCL_UINT64"),
                           (np.float16, "NCCL_FLOAT16"), (np.float32, "NCCL_FLOAT32"),
                           (np.float64, "NCCL_FLOAT64")):
            code = getattr(n, name, None)
            if code is not None:
                _DT[np.dtype(np_t)] = code
    return _DT


_OPS: list = []  # [(ops, bool ops)] of NCCL op codes, built on first use


def _op_codes():
    """(NCCL op per transport op, NCCL op per transport op on bool arrays seen as uint8 0/1, where
    OR is ``max`` and AND is ``min``)."""
    if not _OPS:
        n = _nccl()
        _OPS.append(op_tables(sum=n.NCCL_SUM, max=n.NCCL_MAX, min=n.NCCL_MIN, product=n.NCCL_PROD,
                              logical_or=n.NCCL_MAX, logical_and=n.NCCL_MIN))
    return _OPS[0]


def _members(group) -> tuple:
    """This group's world ranks in group-rank order and this rank's CUDA device: the same key on
    every member (``MPI_Group_translate_ranks`` against the world)."""
    key = group.cache.get("nccl_key")
    if key is None:
        import cupy as cp
        from mpi4py import MPI

        mine, world = group.comm.Get_group(), MPI.COMM_WORLD.Get_group()
        try:
            ranks = tuple(int(r) for r in mine.Translate_ranks(list(range(group.size)), world))
        finally:
            mine.Free()
            world.Free()
        key = group.cache["nccl_key"] = (ranks, cp.cuda.Device().id)
    return key


def nccl_comm(group):
    """The NCCL communicator of ``group``: one per set of members (world ranks in group order) and
    device, created the first time any group of those members needs one (collective over the
    group), then shared by every later group with the same members, for the life of the process."""
    c = group.cache.get("nccl")
    if c is not None:
        return c
    key = _members(group)
    c = _BY_MEMBERS.get(key)
    if c is None:
        import platform

        import cupy as cp

        n = _nccl()
        where = group.comm.allgather((platform.node(), cp.cuda.Device().id))
        if len(set(where)) != len(where):
            raise RuntimeError(
                f"nccl transport: ranks of this group share a GPU ({where}); NCCL needs one GPU per rank. "
                f"Build a device_type='cuda' mesh (it binds each rank to a GPU of its node) or call "
                f"mpilocal.gpu.bind_device() on every rank first"
            )
        uid = n.get_unique_id() if group.rank == 0 else None
        uid = group.comm.bcast(uid, root=0)
        c = n.NcclCommunicator(group.size, uid, group.rank)
        _BY_MEMBERS[key] = c
        _keep_forever(c)
    group.cache["nccl"] = c
    return c


# NCCL communicators are keyed by their members and never destroyed while the process runs. Creating
# and destroying one per mesh (meshes come and go: init_device_mesh releases dropped ones) hung NCCL
# 2.28 on 2xH200 after a few dozen cycles: both ranks waited forever for their proxy thread, in the
# connection setup of a fresh communicator or in ncclCommDestroy. A set of members that was used
# once is used again (the same sub-meshes are rebuilt), so the count stays small. Every member finds
# the same entry: an entry is made only by a creation every member took part in.
_BY_MEMBERS: dict = {}


def _keep_forever(c) -> None:
    """Never let CuPy's ``__dealloc__`` destroy ``c`` (at garbage collection or interpreter shutdown,
    a different moment on each rank, where ``ncclCommDestroy`` can wait on its peers): the process's
    exit frees it."""
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(c))


_CUR = []  # [cupy.cuda.get_current_stream]


def _stream():
    if not _CUR:
        import cupy as cp

        _CUR.append(cp.cuda.get_current_stream)
    return _CUR[0]().ptr


def _abort_group_comm(g):
    """Deadline abort hook (mpilocal.deadline): stop this group's NCCL work so the stream is released."""
    c = g.cache.get("nccl") if g is not None else None
    if c is not None:
        c.abort()


def _release_group(g):
    """Release hook (:func:`mpilocal.transport.release`): the group forgets its NCCL communicator;
    the communicator stays for the next group with the same members (see ``_BY_MEMBERS``)."""
    g.cache.pop("nccl", None)
    g.cache.pop("nccl_key", None)


register_release_hook("30-nccl", _release_group)


def _watched(at):
    """Hand the NCCL work a transport method just enqueued to the deadline watchdog
    (:func:`mpilocal.deadline.watch_cuda`): it polls ``check_async_error`` and, past
    ``MPILOCAL_TIMEOUT``, aborts the communicator and the job, naming the operation. ``at``: the
    position of the method's Group argument (not always last: alltoallv's uniform, bound)."""
    watch = deadline.watch_cuda

    def wrap(method):
        name = method.__name__

        def run(self, *args, **kwargs):
            group = args[at] if len(args) > at else kwargs["group"]
            out = method(self, *args, **kwargs)
            watch(name, group, None, group.cache.get("nccl"))
            return out

        run.__name__, run.__doc__ = name, method.__doc__
        return run

    return wrap


_PLANS: dict = {}  # (dtype, op) -> NcclTransport._plan


class NcclTransport:
    """Collectives of CuPy buffers through NCCL on the current CuPy stream."""

    name = "nccl"

    def __init__(self):
        _nccl().get_version()  # raises when NCCL does not load
        deadline.register_abort_hook(_abort_group_comm)

    # -- data movement (bytes) -----------------------------------------------------------------
    @_watched(3)
    def allgatherv(self, send, recv, counts, group):
        it = recv.dtype.itemsize
        total = sum(counts)
        if not total:
            return
        n = _nccl()
        comm, s = nccl_comm(group), _stream()
        if equal_counts(counts):
            if deadline.DEBUG:
                issuing(group, "ncclAllGather", datatype="ncclUint8", count=counts[0] * it)
            comm.allGather(send.data.ptr, recv.data.ptr, counts[0] * it, n.NCCL_UINT8, s)
            return
        if deadline.DEBUG:
            issuing(group, "ncclGroup(ncclBroadcast)", datatype="ncclUint8", counts=counts_key(counts))
        offs = displs(counts)
        base = recv.data.ptr
        n.groupStart()
        try:
            for p, c in enumerate(counts):
                if c:
                    src = send.data.ptr if p == group.rank else base + offs[p] * it
                    comm.broadcast(src, base + offs[p] * it, c * it, n.NCCL_UINT8, p, s)
        finally:
            n.groupEnd()

    @_watched(4)
    def alltoallv(self, send, send_counts, recv, recv_counts, group, uniform=False, bound=None):
        # grouped send/recv: zero-size pieces are skipped on both sides alike (send_counts[p] on rank r
        # is recv_counts[r] on rank p), and point-to-point calls need no group-wide choice
        it = send.dtype.itemsize
        if deadline.DEBUG:
            issuing(group, "ncclGroup(ncclSend/ncclRecv)", datatype="ncclUint8")
        n = _nccl()
        comm, s = nccl_comm(group), _stream()
        sd, rd = displs(send_counts), displs(recv_counts)
        sp, rp = send.data.ptr, recv.data.ptr
        n.groupStart()
        try:  # the own block too: NCCL copies it inside the grouped kernel, overlapped with the peers'
            for p in range(group.size):
                if send_counts[p]:
                    comm.send(sp + sd[p] * it, send_counts[p] * it, n.NCCL_UINT8, p, s)
                if recv_counts[p]:
                    comm.recv(rp + rd[p] * it, recv_counts[p] * it, n.NCCL_UINT8, p, s)
        finally:
            n.groupEnd()

    @_watched(2)
    def sendrecv(self, sends, recvs, group):
        n = _nccl()
        comm, s = nccl_comm(group), _stream()
        n.groupStart()
        try:  # grouped: NCCL matches the sends and receives between two ranks in posting order
            for p, b in sends:
                if b.nbytes:
                    comm.send(b.data.ptr, b.nbytes, n.NCCL_UINT8, p, s)
            for p, b in recvs:
                if b.nbytes:
                    comm.recv(b.data.ptr, b.nbytes, n.NCCL_UINT8, p, s)
        finally:
            n.groupEnd()

    @_watched(2)
    def bcast(self, buf, root, group):
        if not buf.size:
            return
        n = _nccl()
        p = buf.data.ptr
        if deadline.DEBUG:
            issuing(group, "ncclBroadcast", datatype="ncclUint8", count=buf.nbytes, root=root)
        nccl_comm(group).broadcast(p, p, buf.nbytes, n.NCCL_UINT8, root, _stream())

    @_watched(4)
    def scatterv(self, send, counts, recv, root, group):
        it = recv.dtype.itemsize
        n = _nccl()
        comm, s = nccl_comm(group), _stream()
        me = group.rank
        offs = displs(counts)
        if me == root and counts[me]:
            recv[...] = send[offs[me]:offs[me] + counts[me]].reshape(recv.shape)
        n.groupStart()
        try:
            if me == root:
                for p, c in enumerate(counts):
                    if p != me and c:
                        comm.send(send.data.ptr + offs[p] * it, c * it, n.NCCL_UINT8, p, s)
            elif counts[me]:
                comm.recv(recv.data.ptr, counts[me] * it, n.NCCL_UINT8, root, s)
        finally:
            n.groupEnd()

    # -- prepared calls (the steps of a compiled redistribute; mpilocal.collectives.prepared) ----
    # The communicator, codes and counts are looked up once; each call reads only the two arrays'
    # pointers (C-contiguous arrays of any shape: no flat views). Callers keep the generic methods for
    # MPILOCAL_DEBUG=1 (they fingerprint the NCCL call) and make the communicator first (a generic call).
    def allgather_fn(self, nbytes, group):
        """``run(send, recv)``: :meth:`allgatherv` with ``nbytes`` bytes from every rank."""
        comm, code, watch = nccl_comm(group), _nccl().NCCL_UINT8, deadline.watch_cuda

        def run(send, recv):
            comm.allGather(send.data.ptr, recv.data.ptr, nbytes, code, _stream())
            watch("allgatherv", group, None, comm)

        return run

    def allreduce_fn(self, count, dtype, op, group):
        """``run(send, recv)``: :meth:`allreduce` of ``count`` elements, or None where that needs more
        than one NCCL call on the buffers themselves (widening, gathering)."""
        return self._reduction_fn("allreduce", "allReduce", count, dtype, op, group)

    def reduce_scatter_fn(self, count, dtype, op, group):
        """``run(send, recv)``: :meth:`reduce_scatterv` of ``count`` elements to every rank, or None
        (as :meth:`allreduce_fn`)."""
        return self._reduction_fn("reduce_scatterv", "reduceScatter", count, dtype, op, group)

    def _reduction_fn(self, name, call, count, dtype, op, group):
        view, code, opc, factor, wide = self._plan(dtype, op)
        if view == "gather" or wide is not None:
            return None
        comm, watch, n = nccl_comm(group), deadline.watch_cuda, count * factor
        f = getattr(comm, call)

        def run(send, recv):  # (a view's pointer is the array's: no view needed)
            f(send.data.ptr, recv.data.ptr, n, code, opc, _stream())
            watch(name, group, None, comm)

        return run

    def sendrecv_fn(self, sends, recvs, group):
        """``run(*arrays)``: :meth:`sendrecv` of fixed messages, prepared (the neighbour collectives'
        plans, :mod:`mpilocal.neighbors`). ``sends`` / ``recvs``: ``[(group rank, slot, byte offset,
        nbytes)]`` in ``arrays[slot]`` (C-contiguous), posted in list order as :meth:`sendrecv` posts
        them (NCCL pairs two ranks' messages in posting order). A message to this rank itself is a
        copy NCCL makes inside the same grouped kernel."""
        n = _nccl()
        comm, code, watch = nccl_comm(group), n.NCCL_UINT8, deadline.watch_cuda
        start, end, send, recv = n.groupStart, n.groupEnd, comm.send, comm.recv
        ss = [(p, s, o, b) for p, s, o, b in sends if b]
        rr = [(p, s, o, b) for p, s, o, b in recvs if b]

        def run(*arrays):
            ptr = [a.data.ptr for a in arrays]
            st = _stream()
            start()
            try:
                for p, s, o, b in ss:
                    send(ptr[s] + o, b, code, p, st)
                for p, s, o, b in rr:
                    recv(ptr[s] + o, b, code, p, st)
            finally:
                end()
            watch("sendrecv", group, None, comm)

        return run

    # -- reductions ----------------------------------------------------------------------------
    def _plan(self, dtype, op):
        """(view dtype or None, NCCL dtype code, NCCL op code, element factor, widen dtype or None),
        cached per (dtype, op)."""
        key = (dtype, op)
        p = _PLANS.get(key)
        if p is None:
            p = _PLANS[key] = self._make_plan(dtype, op)
        return p

    def _make_plan(self, dtype, op):
        dt = np.dtype(dtype)
        table = _dtype_table()
        ops, bool_ops = _op_codes()
        if dt in table:
            return None, table[dt], ops[op], 1, None
        if dt == np.bool_:
            return np.uint8, table[np.dtype(np.uint8)], bool_ops[op], 1, None
        if dt.kind == "c" and op == "sum":
            real = np.dtype(np.float32 if dt == np.complex64 else np.float64)
            return real, table[real], ops["sum"], 2, None
        if dt in (np.dtype(np.int16), np.dtype(np.uint16)):
            wide = np.dtype(np.int32 if dt == np.int16 else np.uint32)
            return None, table[wide], ops[op], 1, wide
        return "gather", None, None, None, None

    @_watched(3)
    def allreduce(self, send, recv, op, group):
        if not recv.size:
            return
        view, code, opc, factor, wide = self._plan(recv.dtype, op)
        if view == "gather":
            return self._gather_reduce(send, recv, op, group)
        if wide is not None:
            ws = send.astype(wide)
            self.allreduce(ws, ws, op, group)
            recv[...] = ws.astype(recv.dtype)
            return
        s_, r_ = (send, recv) if view is None else (send.view(view), recv.view(view))
        if deadline.DEBUG:
            issuing(group, "ncclAllReduce", datatype=code, op=opc, count=recv.size * factor)
        nccl_comm(group).allReduce(s_.data.ptr, r_.data.ptr, recv.size * factor, code, opc, _stream())

    @_watched(4)
    def reduce_scatterv(self, send, recv, counts, op, group):
        if not sum(counts):
            return
        view, code, opc, factor, wide = self._plan(send.dtype, op)
        if view == "gather":
            full = send.copy()
            self._gather_reduce(send, full, op, group)
            off = displs(counts)[group.rank]
            recv[...] = full[off:off + counts[group.rank]]
            return
        if wide is not None:
            import cupy as cp

            wr = cp.empty(recv.size, dtype=wide)
            self.reduce_scatterv(send.astype(wide), wr, counts, op, group)
            recv[...] = wr.astype(recv.dtype)
            return
        s_, r_ = (send, recv) if view is None else (send.view(view), recv.view(view))
        comm, s = nccl_comm(group), _stream()
        it = s_.dtype.itemsize
        if deadline.DEBUG:
            issuing(group, "ncclReduceScatter" if equal_counts(counts) else "ncclGroup(ncclReduce)", datatype=code,
                    op=opc, counts=counts_key(counts))
        if equal_counts(counts):
            comm.reduceScatter(s_.data.ptr, r_.data.ptr, counts[0] * factor, code, opc, s)
            return
        n = _nccl()
        offs = displs(counts)
        n.groupStart()
        try:
            for p, c in enumerate(counts):
                if c:
                    dst = r_.data.ptr if p == group.rank else s_.data.ptr + offs[p] * factor * it  # ignored off-root
                    comm.reduce(s_.data.ptr + offs[p] * factor * it, dst, c * factor, code, opc, p, s)
        finally:
            n.groupEnd()

    def _gather_reduce(self, send, recv, op, group):
        """Reductions NCCL cannot do (complex products): gather every rank's data, reduce on the GPU
        in rank order (identical on every rank)."""
        import cupy as cp

        k, m = group.size, recv.size
        buf = cp.empty(k * m, dtype=recv.dtype)
        self.allgatherv(cp.ascontiguousarray(send), buf, [m] * k, group)
        reduce_blocks([buf[i * m:(i + 1) * m] for i in range(k)], op, recv)
