"""Metadata vectors and their non-blocking all-gathers: the ring of persistent requests, futures.

Layer "agree" (docs/architecture.md). What the ranks exchange to agree on shapes, dtypes and call
parameters is one fixed-width int64 row per rank (:data:`META_WIDTH` entries); this module owns its
format (:func:`meta_vector`, :func:`meta_shape`, the parameter bits of :func:`meta_with`), the checks
on gathered rows (:func:`check_params`, :func:`check_same`) and the requests that move rows:

* :class:`MetaRing`: K persistent all-gathers (MPI-4 ``MPI_Allgather_init``) per communicator,
  kept in the communicator's :class:`~mpilocal.transport.Group` cache and freed by a transport
  release hook (:meth:`mpilocal.DeviceMesh.close`) or at exit;
* :class:`MetaFuture`: a posted all-gather, completed by :meth:`MetaFuture.result`;
* the shape agreement's fixed-size SUM (:func:`post_sum`): :class:`PairRing` (2 ranks, persistent
  point-to-point) or :class:`SumRing` (persistent all-reduce); message counts in docs/scaling.md.

Nothing here counts, fingerprints or puts a call under the deadline when it is *posted*: the
accounted entry points are :func:`mpilocal.collectives.post_shape_agreement`,
:func:`~mpilocal.collectives.post_meta_allgather` and :func:`~mpilocal.collectives.meta_allgather`.
Completing a request (:meth:`MetaFuture.result`) is a wait under the deadline.
"""

from __future__ import annotations

import atexit
import zlib
from collections import deque

import numpy as np

from . import _arrays, deadline
from .transport import group_for, register_release_hook

__all__ = ["META_WIDTH", "meta_vector", "meta_shape", "meta_with", "check_params", "check_same", "MetaFuture",
           "MetaRing", "ring_of", "post_iallgather", "row_flags", "PairRing", "PairFuture", "SumRing", "post_sum",
           "ensure_diag", "diag_allgather"]

META_WIDTH = 66  # [ndim, dtype code | kind bit | call bits, shape padded to 64 dims (NumPy's maximum)]
# entry 1: bits 0-31 the dtype's crc32, bit 32 set for CuPy arrays, bits 33-62 the call's parameters
# (a hash, or flags): so a 64-D shape keeps all its slots
CUPY_BIT = 1 << 32
P_SHIFT = 33
P_MASK = (1 << 30) - 1
TYPE_MASK = (1 << P_SHIFT) - 1


def meta_vector(shape, dtype, cupy: bool = False) -> np.ndarray:
    v = np.zeros(META_WIDTH, dtype=np.int64)
    v[0] = len(shape)
    v[1] = (zlib.crc32(np.dtype(dtype).str.encode()) if dtype is not None else 0) | (CUPY_BIT if cupy else 0)
    v[2:2 + len(shape)] = shape
    return v


def meta_shape(row) -> tuple:
    return tuple(int(s) for s in row[2:2 + int(row[0])])


def meta_with(x, caller, flags=None, **params):
    """meta_vector of ``x`` (with its kind, NumPy or CuPy) with the call's parameters (reduce op, dim,
    src) hashed into the parameter bits of entry 1 (or ``flags`` put there as they are), so that
    :func:`check_params` finds ranks that pass different ones."""
    vec = meta_vector(x.shape, x.dtype, _arrays.is_cupy(x))
    p = flags if flags is not None else zlib.crc32(repr(tuple(params.values())).encode())
    vec[1] |= (p & P_MASK) << P_SHIFT
    return vec


def row_flags(rows):
    """The parameter bits of every gathered row (the ``flags`` of :func:`meta_with`)."""
    return (rows[:, 1] >> P_SHIFT) & P_MASK


def check_params(rows, caller, **params):
    if rows is not None and len(set((rows[:, 1] >> P_SHIFT).tolist())) > 1:
        raise ValueError(f"{caller}: ranks pass different {', '.join(params)} (this rank: "
                         f"{', '.join(f'{k}={v!r}' for k, v in params.items())}); every rank must pass the same")


def check_same(rows, caller, skip_dim=None):
    """Raise the same ValueError on every rank when the gathered metadata rows disagree."""
    if rows is None or len(rows) == 1:
        return
    rows = rows.copy()
    rows[:, 1] &= TYPE_MASK  # the parameter bits are checked by check_params
    diff = rows != rows[0]
    if skip_dim is not None:
        diff[:, 2 + skip_dim] = False
    if not diff.any():
        return
    ref = rows[0]
    kinds = ["CuPy" if row[1] & CUPY_BIT else "NumPy" for row in rows]
    if len(set(kinds)) > 1:
        r = next(i for i, k in enumerate(kinds) if k != kinds[0])
        raise TypeError(
            f"{caller}: group rank 0 passes a {kinds[0]} array but rank {r} a {kinds[r]} array; every rank must "
            f"pass arrays of one kind (all NumPy or all CuPy), since each kind moves through a different transport"
        )
    for r, row in enumerate(rows):
        if row[0] != ref[0] or row[1] != ref[1]:
            raise ValueError(
                f"{caller}: ranks disagree on ndim/dtype: group rank 0 has shape {meta_shape(ref)} and rank {r} "
                f"has shape {meta_shape(row)} (or a different dtype); every rank must pass arrays of one dtype and ndim"
            )
        a, b = list(meta_shape(ref)), list(meta_shape(row))
        if skip_dim is not None:
            a[skip_dim] = b[skip_dim] = 0
        if a != b:
            rule = "shapes may differ only along the gather dim" if skip_dim is not None else \
                "every rank must pass the same shape"
            raise ValueError(
                f"{caller}: group rank 0 has shape {meta_shape(ref)} but rank {r} has {meta_shape(row)}; {rule}"
            )


# ------------------------------------------------------------------------------------------------
# posted all-gathers: futures, the persistent ring, Iallgather
# ------------------------------------------------------------------------------------------------
class MetaFuture:
    """A pending all-gather of metadata vectors; :meth:`result` completes it (a local wait: every
    rank of the communicator posted the same request)."""

    __slots__ = ("req", "recv", "done", "g", "ring", "slot")

    def __init__(self, req, recv, g=None, ring=None, slot=-1):
        self.req, self.recv, self.done, self.g, self.ring, self.slot = req, recv, False, g, ring, slot

    def result(self) -> np.ndarray:
        if not self.done:
            with deadline.waiting("metadata all-gather (completing a posted request)", self.g):  # deadline
                self.req.Wait()
            self._finish()
        return self.recv

    def test(self) -> bool:
        if not self.done and self.req.Test():
            self._finish()
        return self.done

    def _finish(self):
        ring = self.ring
        if ring is not None:  # the slot's buffers are reused by later posts: keep a copy
            self.recv = ring.recv[self.slot].copy()
            ring.owner[self.slot] = None
        self.done = True


class MetaRing:
    """K persistent all-gathers (MPI-4 ``MPI_Allgather_init``) of fixed-width metadata vectors on one
    communicator, reused round-robin: starting one costs far less than building a new
    ``MPI_Iallgather`` schedule, which keeps the shape agreement of ``local_map`` outputs cheap.
    Before a slot is reused its previous request is completed (posted K calls ago on every rank)."""

    K = 8

    def __init__(self, comm, g):
        n = comm.Get_size()
        self.g = g
        self.send = np.zeros((self.K, META_WIDTH), dtype=np.int64)
        self.recv = np.zeros((self.K, n, META_WIDTH), dtype=np.int64)
        self.reqs = [comm.Allgather_init(self.send[j], self.recv[j]) for j in range(self.K)]
        self.owner = [None] * self.K
        self.next = 0
        _RINGS.append(self)

    def post(self, vec=None, shape=None) -> MetaFuture:
        """Start slot ``j``'s all-gather of ``vec`` (or of a shape-only metadata vector of ``shape``)."""
        j = self.next
        self.next = (j + 1) % self.K
        prev = self.owner[j]
        if prev is not None:
            prev.result()
        row = self.send[j]
        if vec is not None:
            row[:] = vec
        else:  # meta_vector(shape, None) written in place
            n = len(shape)
            row[0] = n
            row[2:2 + n] = shape
        req = self.reqs[j]
        req.Start()
        fut = self.owner[j] = MetaFuture(req, None, self.g, self, j)
        return fut


_RINGS: list = []
_NO_RING = False
_PENDING: deque = deque()
_MAX_PENDING = 8
_RING_KEY = "meta_ring"


def ring_of(g, create: bool = False):
    """The :class:`MetaRing` of Group ``g`` (None without one; ``create``: make it, **collective**).
    None as well where the MPI build has no persistent collectives (MPI < 4): a property of the build,
    the same on every rank, so every rank then takes the ``Iallgather`` path."""
    global _NO_RING
    ring = g.cache.get(_RING_KEY)
    if ring is None and create and not _NO_RING:
        try:
            ring = g.cache[_RING_KEY] = MetaRing(g.comm, g)
        except (NotImplementedError, AttributeError):
            # an MPI error in Allgather_init is not caught: ranks must never mix the two kinds of call
            _NO_RING = True
    return None if _NO_RING else ring


def post_iallgather(comm, vec: np.ndarray) -> MetaFuture:
    """Start an ``MPI_Iallgather`` of ``vec`` over ``comm`` (any width). Earlier requests are retired
    so they never pile up: MPI progresses every active request on each call, so many outstanding ones
    make every MPI call slower. Beyond a few, the oldest is waited for: every rank posted it calls
    ago, so the wait is short and cannot deadlock."""
    while _PENDING and (_PENDING[0].test() or len(_PENDING) >= _MAX_PENDING):
        _PENDING.popleft().result()
    recv = np.empty((comm.Get_size(), vec.size), dtype=vec.dtype)
    fut = MetaFuture(comm.Iallgather(vec, recv), recv, group_for(comm))
    _PENDING.append(fut)
    return fut


# ------------------------------------------------------------------------------------------------
# releasing a group (DeviceMesh.close) and exit: metadata requests on its communicator end first
# ------------------------------------------------------------------------------------------------
def _release_group(g) -> None:
    """Release hook (:func:`mpilocal.transport.release`): complete the pending metadata all-gathers
    posted on ``g`` (every rank posted them, so the waits are short) and free its persistent ring."""
    for fut in [f for f in _PENDING if f.g is g]:
        fut.result()
        _PENDING.remove(fut)
    ring = g.cache.pop(_RING_KEY, None)
    if ring is not None:
        _free_ring(ring)


register_release_hook("10-metadata", _release_group)


@atexit.register
def _drain_pending():  # runs before mpi4py's MPI_Finalize (registered later, so earlier in LIFO)
    while _PENDING:
        _PENDING.popleft().result()
    for ring in _RINGS:
        for fut in ring.owner:
            if fut is not None:
                fut.result()
        for req in ring.reqs:
            req.Free()
    _RINGS.clear()


# ------------------------------------------------------------------------------------------------
# shape agreement in fixed-size metadata (issue 11): one SUM per agreement
# ------------------------------------------------------------------------------------------------
# The shape agreement of DTensors built from local shards (local_map outputs, from_local without
# shape=) sums one fixed-width uint64 vector per rank (wrapping mod 2**64), whatever the number of
# ranks; mpilocal.dtensor owns its fields and checks. Only when its checks find an error do the
# ranks all-gather their full metadata rows (over a communicator of their own) to name it.
#
# How the vectors move (docs/scaling.md), chosen from the group's size and the MPI build, the same
# on every rank:
# * 2 ranks: PairRing, one exchange over persistent point-to-point requests (MPI_Send_init /
#   MPI_Recv_init, started together): one message of the vector each way, started by the post and
#   completed by MetaFuture.result. A started send or receive is progressed by MPI inside any MPI
#   call, so a rank waiting in result() never needs the other to call into mpilocal; a library's
#   non-blocking all-reduce may not move that way (Open MPI 4.1's libnbc advances MPI_Iallreduce
#   only while polled: the GPU host's local_map slowdown, issue 10), and it runs more rounds.
# * 3 ranks or more: the MPI library's all-reduce, non-blocking (persistent MPI_Allreduce_init in
#   SumRing where the build has MPI-4, else MPI_Iallreduce): its O(log P) rounds need sums in between,
#   which point-to-point requests started by the post cannot do without this rank calling in again,
#   and running them inside the post blocks every local_map call on its partners (measured slower
#   here, oversubscribed; benchmarks/results/2026-11-30-cpu2core-local_map-dispatch.md).
class PairRing:
    """K slots of the 2-rank SUM: persistent send of the slot's vector to the other rank and receive
    of its vector (tag: the slot), on a communicator of the metadata's own (nothing else sends on
    it), reused round-robin. Before a slot is reused its previous exchange is completed (posted K
    calls ago on both ranks)."""

    K = 8

    def __init__(self, comm, g, width):
        self.g = g
        self.width = width
        other = 1 - comm.Get_rank()
        self.send = np.zeros((self.K, width), dtype=np.uint64)
        self.recv = np.zeros((self.K, width), dtype=np.uint64)
        self.sends, self.recvs = list(self.send), list(self.recv)  # per slot views
        self.slots = [[comm.Send_init(self.sends[j], other, j), comm.Recv_init(self.recvs[j], other, j)]
                      for j in range(self.K)]
        self.reqs = [r for pair in self.slots for r in pair]
        self.owner = [None] * self.K
        self.next = 0
        _RINGS.append(self)

    def post(self, vec) -> "PairFuture":
        j = self.next
        self.next = j + 1 if j + 1 < self.K else 0
        prev = self.owner[j]
        if prev is not None:
            prev.result()
        self.sends[j][:] = vec
        _startall(self.slots[j])
        fut = self.owner[j] = PairFuture(self, j)
        return fut


class PairFuture:
    """A posted exchange of a :class:`PairRing` slot; :meth:`result` completes it (the sum, a copy)."""

    __slots__ = ("ring", "slot", "recv", "done", "g")

    def __init__(self, ring, slot):
        self.ring, self.slot, self.recv, self.done, self.g = ring, slot, None, False, ring.g

    def result(self) -> np.ndarray:
        if not self.done:
            ring, j = self.ring, self.slot
            reqs = ring.slots[j]
            if not _testall(reqs):  # (done already, the usual case: no wait to put under the deadline)
                with deadline.waiting("metadata shape agreement (completing a posted exchange)", self.g):  # deadline
                    _waitall(reqs)
            self.recv = ring.sends[j] + ring.recvs[j]
            ring.owner[j] = None
            self.done = True
        return self.recv

    def test(self) -> bool:
        if not self.done and _testall(self.ring.slots[self.slot]):
            self.result()
        return self.done


class SumRing(MetaRing):
    """K persistent ``MPI_Allreduce_init`` (SUM of uint64 vectors of ``width``) on one
    communicator, reused round-robin as :class:`MetaRing`."""

    def __init__(self, comm, g, width):
        self.g = g
        self.width = width
        self.send = np.zeros((self.K, width), dtype=np.uint64)
        self.recv = np.zeros((self.K, width), dtype=np.uint64)
        from mpi4py import MPI

        self.reqs = [comm.Allreduce_init(self.send[j], self.recv[j], MPI.SUM) for j in range(self.K)]
        self.owner = [None] * self.K
        self.next = 0
        _RINGS.append(self)


_SUM_RING_KEY = "meta_sum_ring"
_NO_SUM_RING = False
_DIAG_KEY = "mpilocal.meta_diag"
_startall = _waitall = _testall = None


def post_sum(g, vec: np.ndarray):
    """Start the SUM of ``vec`` (uint64) over Group ``g`` (collective, non-blocking; see above):
    a :class:`PairRing` for 2 ranks, else the persistent :class:`SumRing` where the MPI has one
    (MPI-4), else an ``MPI_Iallreduce`` (retired as :func:`post_iallgather`'s). The ring is made at
    the first post (a point every rank passes), with the metadata communicator (:func:`ensure_diag`)."""
    ring = g.cache.get(_SUM_RING_KEY)
    if ring is None or ring.width != vec.size:
        ring = _new_sum_ring(g, vec.size)
    return ring.post(vec)


class _Iallreduce:
    """The SUM as one ``MPI_Iallreduce`` per post (MPI < 4, 3 ranks or more); requests retired as
    :func:`post_iallgather`'s."""

    owner = reqs = ()

    def __init__(self, g, width):
        from mpi4py import MPI

        self.g, self.width, self.op = g, width, MPI.SUM

    def post(self, vec) -> MetaFuture:
        while _PENDING and (_PENDING[0].test() or len(_PENDING) >= _MAX_PENDING):
            _PENDING.popleft().result()
        recv = np.empty_like(vec)
        fut = MetaFuture(self.g.comm.Iallreduce(vec, recv, self.op), recv, self.g)
        _PENDING.append(fut)
        return fut


def _new_sum_ring(g, width):
    """The sum ring of ``g`` for vectors of ``width`` (replacing one of another width: the same on
    every rank): :class:`PairRing`, :class:`SumRing` or :class:`_Iallreduce`."""
    global _startall, _waitall, _testall, _NO_SUM_RING
    from mpi4py import MPI

    _startall, _waitall, _testall = MPI.Prequest.Startall, MPI.Request.Waitall, MPI.Request.Testall
    old = g.cache.pop(_SUM_RING_KEY, None)
    if old is not None:
        _free_ring(old)
    ensure_diag(g)
    if g.size == 2:
        ring = g.cache[_SUM_RING_KEY] = PairRing(g.cache[_DIAG_KEY], g, width)
        return ring
    if not _NO_SUM_RING:
        try:
            ring = g.cache[_SUM_RING_KEY] = SumRing(g.comm, g, width)
            return ring
        except (NotImplementedError, AttributeError):
            # MPI < 4 (no persistent collectives): a property of the build, the same on every rank (an
            # MPI error in Allreduce_init is not caught: ranks must never mix the two kinds of call)
            _NO_SUM_RING = True
    ring = g.cache[_SUM_RING_KEY] = _Iallreduce(g, width)
    return ring


def ensure_diag(g) -> None:
    """Create (once; **collective**, so at a point every rank passes: a post) the metadata
    communicator of the shape agreement: its point-to-point sums and :func:`diag_allgather` run on it."""
    if _DIAG_KEY not in g.cache:
        with deadline.in_flight("creating the metadata diagnostics communicator", g):
            deadline.settle_channel()
            g.cache[_DIAG_KEY] = g.comm.Dup()


def diag_allgather(g, row: np.ndarray) -> np.ndarray:
    """Blocking all-gather of full metadata rows, only after a fixed-size agreement found an error
    (every rank that completes that agreement finds it, and runs this)."""
    comm = g.cache[_DIAG_KEY]
    recv = np.empty((g.size, row.size), dtype=row.dtype)
    with deadline.waiting("metadata diagnostics (all-gather of the rows after a failed shape agreement)", g):
        comm.Allgather(row, recv)
    return recv


def _free_ring(ring) -> None:
    for fut in ring.owner:
        if fut is not None:
            fut.result()
    for req in ring.reqs:
        req.Free()
    if ring in _RINGS:
        _RINGS.remove(ring)


def _release_sum(g) -> None:
    ring = g.cache.pop(_SUM_RING_KEY, None)
    if ring is not None:
        _free_ring(ring)
    diag = g.cache.pop(_DIAG_KEY, None)
    if diag is not None:
        diag.Free()


register_release_hook("11-metadata-sum", _release_sum)
