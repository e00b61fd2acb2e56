"""The ``staged`` transport: CuPy buffers moved through pinned host memory and any MPI.

For GPUs without NCCL and an MPI that is not CUDA-aware. Each collective is cut into pieces
(every rank's block is cut into the same number of pieces; piece j of every block makes step j); the
device-to-host copies of all pieces are enqueued at once on the current stream, each followed by an
event; step j waits for its event, runs the host MPI collective on the pinned mirror of the pieces,
and enqueues the host-to-device copies of its result on a second stream. So the GPU's copy engines
work on pieces j+1 (down) and j-1 (up) while MPI moves piece j. Pinned buffers are allocated once
and grow as needed.

Groups whose ranks share one node (the usual case for staging) skip MPI's data path: each rank copies
its data into its segment of a node-shared host window (``MPI_Win_allocate_shared``, registered with
CUDA so the copies run at pinned speed), the ranks meet at a barrier, and each copies what it needs
from the others' segments straight to its GPU. Groups across nodes use the pipelined MPI path above.
``MPILOCAL_STAGED_SHM=0`` turns the window off.

Reductions run on the GPU (all-to-all of blocks + elementwise reduction + all-gather, as in
:class:`~mpilocal.transport.gpu_common.ExchangeReduce`): MPI only moves bytes, the host never adds numbers.
"""

from __future__ import annotations

import os

import numpy as np
from mpi4py import MPI

from .. import deadline
from ..layout import block_size_and_offset
from . import counts_key, displs, issuing, register_release_hook
from .gpu_common import ExchangeReduce
from .host import p2p

__all__ = ["StagedTransport"]

_MIN_PIECE = int(os.environ.get("MPILOCAL_STAGED_PIECE", 4 << 20))  # bytes per piece per block, at least
_MAX_STEPS = int(os.environ.get("MPILOCAL_STAGED_STEPS", 8))


def _pieces(nbytes_max: int) -> int:
    return max(1, min(_MAX_STEPS, nbytes_max // _MIN_PIECE))


def _split(n: int, k: int, j: int):
    """(offset, length) of piece j of n bytes cut into k pieces (the MPI block rule of
    :func:`mpilocal.layout.block_size_and_offset`)."""
    size, off = block_size_and_offset(n, k, j)
    return off, size


class _Pinned:
    """A grow-only pinned host buffer seen as a NumPy uint8 array."""

    def __init__(self):
        self.mem = None
        self.arr = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if nbytes > self.arr.size:
            import cupy as cp

            size = max(nbytes, 2 * self.arr.size)
            self.mem = cp.cuda.alloc_pinned_memory(size)
            self.arr = np.ndarray((size,), np.uint8, buffer=self.mem)
        return self.arr


_SHM = os.environ.get("MPILOCAL_STAGED_SHM", "1").strip().lower() not in ("0", "off", "false", "no")


class _NodeWindow:
    """A node-shared host window over a group's communicator: ``k`` equal segments, registered
    (pinned) with CUDA, grown collectively when a call needs more."""

    def __init__(self, comm, cp):
        self.comm, self.cp = comm, cp
        self.win = None
        self.seg = 0
        self.ptrs = []  # segment base address per group rank
        self.registered = []

    def ensure(self, nbytes: int) -> None:
        """Collective; ``nbytes`` (the segment size needed) must be the same on every rank."""
        if nbytes <= self.seg:
            return
        self.free()
        seg = max(nbytes, 2 * self.seg, 1 << 20)
        seg = (seg + 4095) // 4096 * 4096
        win = MPI.Win.Allocate_shared(seg, 1, comm=self.comm)
        ptrs = []
        for r in range(self.comm.Get_size()):
            buf, _ = win.Shared_query(r)
            ptrs.append(np.frombuffer(buf, np.uint8).ctypes.data)
        self.win, self.seg, self.ptrs = win, seg, ptrs
        rt = self.cp.cuda.runtime
        for r, ptr in enumerate(ptrs):  # register every segment in this process's CUDA context
            rt.hostRegister(ptr, seg, 0)
            self.registered.append(ptr)

    def free(self):
        rt = self.cp.cuda.runtime
        for ptr in self.registered:
            try:
                rt.hostUnregister(ptr)
            except Exception:
                pass
        self.registered = []
        if self.win is not None:
            self.win.Free()
        self.win, self.seg, self.ptrs = None, 0, []


def _release_group(g):
    """Release hook (:func:`mpilocal.transport.release`): free the group's node window (collective)."""
    w = g.cache.pop("staged_win", None)
    if w:
        w.free()


register_release_hook("40-staged", _release_group)


class StagedTransport(ExchangeReduce):
    """CuPy buffers through pinned host buffers and the host MPI, chunked and overlapped."""

    name = "staged"

    def __init__(self):
        import cupy as cp

        self._cp = cp
        self._hs = _Pinned()
        self._hr = _Pinned()
        self._up = {}

    def _window(self, group):
        """The node window of ``group`` or None (group spans nodes, disabled, or setup failed).
        Collective on first use for a group."""
        w = group.cache.get("staged_win", False)
        if w is False:
            w = None
            if _SHM:
                deadline.settle_channel()
                node = group.comm.Split_type(MPI.COMM_TYPE_SHARED, key=group.rank)
                if node.Get_size() == group.size:
                    w = _NodeWindow(group.comm, self._cp)
                node.Free()
            group.cache["staged_win"] = w
        return w

    def _ensure(self, w, group, nbytes):
        """Grow ``w`` to ``nbytes`` per segment (``nbytes`` equal on every rank; collective when it
        grows). If that fails on any rank, every rank drops to the MPI path for this group."""
        if nbytes <= w.seg:
            return True
        try:
            w.ensure(nbytes)
            ok = 1
        except Exception:
            ok = 0
        if group.comm.allreduce(ok, op=MPI.MIN):
            return True
        w.free()
        group.cache["staged_win"] = None
        return False

    def _copy(self, dst, src, n, kind, stream):
        if n:
            self._cp.cuda.runtime.memcpyAsync(dst, src, n, kind, stream)

    def _up_stream(self):
        dev = self._cp.cuda.Device().id
        s = self._up.get(dev)
        if s is None:
            s = self._up[dev] = self._cp.cuda.Stream(non_blocking=True)
        return s

    # -- the pipeline ----------------------------------------------------------------------------
    def _run(self, src, src_ranges, dst, dst_ranges, nsteps, mpi_step, hs_bytes, hr_bytes):
        """Copy piece ranges down, run ``mpi_step(j, hs, hr)`` per step, copy results up.

        ``src_ranges[j]`` / ``dst_ranges[j]``: lists of (byte offset, length) of step j in ``src`` /
        ``dst`` (device) and the same offsets in the pinned mirrors ``hs`` / ``hr``.
        """
        cp = self._cp
        rt = cp.cuda.runtime
        cur = cp.cuda.get_current_stream()
        up = self._up_stream()
        hs = self._hs.get(max(hs_bytes, 1))
        hr = self._hr.get(max(hr_bytes, 1))
        sp = src.data.ptr if src is not None and src.size else 0
        dp = dst.data.ptr if dst.size else 0
        start = cur.record()
        events = []
        for j in range(nsteps):
            for off, ln in src_ranges[j]:
                if ln:
                    rt.memcpyAsync(hs.ctypes.data + off, sp + off, ln, rt.memcpyDeviceToHost, cur.ptr)
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(cur)
            events.append(ev)
        # the up stream must not overwrite dst before the current stream's earlier work on it is done
        up.wait_event(start)
        for j in range(nsteps):
            events[j].synchronize()
            mpi_step(j, hs, hr)
            for off, ln in dst_ranges[j]:
                if ln:
                    rt.memcpyAsync(dp + off, hr.ctypes.data + off, ln, rt.memcpyHostToDevice, up.ptr)
        cur.wait_event(up.record())
        # pinned buffers are reused by the next call: its host-side MPI must not overwrite them while
        # these copies run; the next call's first event (on `cur`, after this wait) orders that.

    # -- data movement ---------------------------------------------------------------------------
    def allgatherv(self, send, recv, counts, group):
        it = recv.dtype.itemsize
        b = [c * it for c in counts]
        if not sum(b):
            return
        d = displs(b)
        me = group.rank
        w = self._window(group)
        if w is not None and self._ensure(w, group, max(b)):
            if deadline.DEBUG:
                issuing(group, "staged allgatherv (node window + MPI_Barrier)", counts=counts_key(b))
            rt, cur = self._cp.cuda.runtime, self._cp.cuda.get_current_stream()
            self._copy(w.ptrs[me], send.data.ptr, b[me], rt.memcpyDeviceToHost, cur.ptr)
            cur.synchronize()
            group.comm.Barrier()  # every segment written
            for p in range(group.size):
                if p == me:
                    self._copy(recv.data.ptr + d[p], send.data.ptr, b[p], rt.memcpyDeviceToDevice, cur.ptr)
                else:
                    self._copy(recv.data.ptr + d[p], w.ptrs[p], b[p], rt.memcpyHostToDevice, cur.ptr)
            cur.synchronize()
            group.comm.Barrier()  # every segment read: the next call may overwrite
            return
        k = _pieces(max(b))
        if deadline.DEBUG:
            issuing(group, "staged allgatherv (MPI_Allgatherv pieces)", steps=k, counts=counts_key(b))
        pieces = [[_split(bp, k, j) for j in range(k)] for bp in b]
        src_ranges = [[pieces[me][j]] for j in range(k)]
        dst_ranges = [[(d[p] + pieces[p][j][0], pieces[p][j][1]) for p in range(group.size)] for j in range(k)]
        comm = group.comm

        def step(j, hs, hr):
            cnt = [pieces[p][j][1] for p in range(group.size)]
            dis = [d[p] + pieces[p][j][0] for p in range(group.size)]
            o, ln = pieces[me][j]
            comm.Allgatherv([hs[o:o + ln], MPI.BYTE], [hr, (cnt, dis), MPI.BYTE])

        self._run(send, src_ranges, recv, dst_ranges, k, step, b[me], sum(b))

    def alltoallv(self, send, send_counts, recv, recv_counts, group, uniform=False, bound=None):
        it = send.dtype.itemsize
        sb = [c * it for c in send_counts]
        rb = [c * it for c in recv_counts]
        sd, rd = displs(sb), displs(rb)
        w = self._window(group)
        if deadline.DEBUG:
            issuing(group, "staged alltoallv (" + ("node window" if w is not None else "MPI_Alltoallv pieces") + ")")
        if w is not None:
            me, k = group.rank, group.size
            info = np.array([sum(sb)] + sd, np.int64)
            allinfo = np.empty((k, k + 1), np.int64)
            group.comm.Allgather(info, allinfo)  # every rank's send size and block offsets
            if not allinfo[:, 0].any():
                return
            if self._ensure(w, group, int(allinfo[:, 0].max())):
                rt, cur = self._cp.cuda.runtime, self._cp.cuda.get_current_stream()
                sp = send.data.ptr if send.size else 0
                rp = recv.data.ptr if recv.size else 0
                self._copy(w.ptrs[me], sp, sum(sb), rt.memcpyDeviceToHost, cur.ptr)
                cur.synchronize()
                group.comm.Barrier()
                for p in range(k):
                    if p == me:
                        self._copy(rp + rd[p], sp + sd[me], rb[p], rt.memcpyDeviceToDevice, cur.ptr)
                    else:
                        self._copy(rp + rd[p], w.ptrs[p] + int(allinfo[p, 1 + me]), rb[p], rt.memcpyHostToDevice, cur.ptr)
                cur.synchronize()
                group.comm.Barrier()
                return
        # every rank must cut into the same number of steps: agree on the largest block
        big = np.array([max(sb + rb + [0])], np.int64)
        group.comm.Allreduce(MPI.IN_PLACE, big, op=MPI.MAX)
        k = _pieces(int(big[0]))
        sp = [[_split(x, k, j) for j in range(k)] for x in sb]
        rp = [[_split(x, k, j) for j in range(k)] for x in rb]
        P = group.size
        src_ranges = [[(sd[p] + sp[p][j][0], sp[p][j][1]) for p in range(P)] for j in range(k)]
        dst_ranges = [[(rd[p] + rp[p][j][0], rp[p][j][1]) for p in range(P)] for j in range(k)]
        comm = group.comm

        def step(j, hs, hr):
            scnt = [sp[p][j][1] for p in range(P)]
            sdis = [sd[p] + sp[p][j][0] for p in range(P)]
            rcnt = [rp[p][j][1] for p in range(P)]
            rdis = [rd[p] + rp[p][j][0] for p in range(P)]
            comm.Alltoallv([hs, (scnt, sdis), MPI.BYTE], [hr, (rcnt, rdis), MPI.BYTE])

        self._run(send, src_ranges, recv, dst_ranges, k, step, max(sum(sb), 1), max(sum(rb), 1))

    def bcast(self, buf, root, group):
        n = buf.nbytes
        if not n:
            return
        w = self._window(group)
        if w is not None and self._ensure(w, group, n):
            if deadline.DEBUG:
                issuing(group, "staged bcast (node window + MPI_Barrier)", count=n, root=root)
            rt, cur = self._cp.cuda.runtime, self._cp.cuda.get_current_stream()
            if group.rank == root:
                self._copy(w.ptrs[root], buf.data.ptr, n, rt.memcpyDeviceToHost, cur.ptr)
                cur.synchronize()
            group.comm.Barrier()
            if group.rank != root:
                self._copy(buf.data.ptr, w.ptrs[root], n, rt.memcpyHostToDevice, cur.ptr)
                cur.synchronize()
            group.comm.Barrier()
            return
        k = _pieces(n)
        if deadline.DEBUG:
            issuing(group, "staged bcast (MPI_Bcast pieces)", count=n, root=root, steps=k)
        pcs = [_split(n, k, j) for j in range(k)]
        me = group.rank
        comm = group.comm

        def step(j, hs, hr):
            o, ln = pcs[j]
            comm.Bcast([(hs if me == root else hr)[o:o + ln], MPI.BYTE], root=root)

        src_ranges = [[pcs[j]] if me == root else [] for j in range(k)]
        dst_ranges = [[pcs[j]] if me != root else [] for j in range(k)]
        self._run(buf if me == root else None, src_ranges, buf, dst_ranges, k, step, n if me == root else 0, n)

    def scatterv(self, send, counts, recv, root, group):
        it = recv.dtype.itemsize
        b = [c * it for c in counts]
        me = group.rank
        hs = self._cp.asnumpy(send).view(np.uint8) if me == root and send is not None and send.size else None
        hr = np.empty(b[me], np.uint8)
        d = displs(b)
        sendspec = [hs if hs is not None else np.empty(0, np.uint8), (b, d), MPI.BYTE] if me == root else None
        if deadline.DEBUG:
            issuing(group, "MPI_Scatterv", datatype="BYTE", counts=counts_key(b), root=root)
        group.comm.Scatterv(sendspec, [hr, MPI.BYTE], root=root)
        if b[me]:
            recv[...] = self._cp.asarray(hr).view(recv.dtype).reshape(recv.shape)

    def sendrecv(self, sends, recvs, group):
        cp = self._cp
        hs = [(p, cp.asnumpy(b).view(np.uint8)) for p, b in sends]  # asnumpy syncs the stream
        hr = [(p, np.empty(b.nbytes, np.uint8)) for p, b in recvs]
        p2p(group.comm, hs, hr)
        for (_, b), (_, h) in zip(recvs, hr):
            if b.nbytes:
                b[...] = cp.asarray(h).view(b.dtype)
