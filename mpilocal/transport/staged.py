"""The ``staged`` transport: CuPy buffers moved through pinned host memory and any MPI.

For GPUs without NCCL and an MPI that is not CUDA-aware. Each collective is cut into pieces
(every rank's block is cut into the same number of pieces; piece j of every block makes step j); the
device-to-host copies of all pieces are enqueued at once on the current stream, each followed by an
event; step j waits for its event, runs the host MPI collective on the pinned mirror of the pieces,
and enqueues the host-to-device copies of its result on a second stream. So the GPU's copy engines
work on pieces j+1 (down) and j-1 (up) while MPI moves piece j. Pinned buffers are allocated once
and grow as needed.

Reductions run on the GPU (all-to-all of blocks + elementwise reduction + all-gather, as in
:mod:`cuda_mpi`): MPI only moves bytes, the host never adds numbers.
"""

from __future__ import annotations

import os

import numpy as np
from mpi4py import MPI

from .cuda_mpi import ExchangeReduce, displs

__all__ = ["StagedTransport"]

_MIN_PIECE = int(os.environ.get("MPILOCAL_STAGED_PIECE", 4 << 20))  # bytes per piece per block, at least
_MAX_STEPS = int(os.environ.get("MPILOCAL_STAGED_STEPS", 8))


def _pieces(nbytes_max: int) -> int:
    return max(1, min(_MAX_STEPS, nbytes_max // _MIN_PIECE))


def _split(n: int, k: int, j: int):
    """(offset, length) of piece j of n bytes cut into k pieces."""
    q, r = divmod(n, k)
    off = j * q + min(j, r)
    return off, q + (1 if j < r else 0)


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


class StagedTransport(ExchangeReduce):
    """CuPy buffers through pinned host buffers and the host MPI, chunked and overlapped."""

    name = "staged"

    def __init__(self):
        import cupy as cp

        self._cp = cp
        self._hs = _Pinned()
        self._hr = _Pinned()
        self._up = {}

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
        k = _pieces(max(b))
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

    def alltoallv(self, send, send_counts, recv, recv_counts, group):
        it = send.dtype.itemsize
        sb = [c * it for c in send_counts]
        rb = [c * it for c in recv_counts]
        sd, rd = displs(sb), displs(rb)
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
        k = _pieces(n)
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
        group.comm.Scatterv(sendspec, [hr, MPI.BYTE], root=root)
        if b[me]:
            recv[...] = self._cp.asarray(hr).view(recv.dtype).reshape(recv.shape)

    def allgatherv_inplace(self, recv, counts, group):
        off = displs(counts)[group.rank]
        mine = recv[off:off + counts[group.rank]].copy()
        self.allgatherv(mine, recv, counts, group)
