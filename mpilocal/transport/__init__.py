"""The transport seam: one protocol that every way of moving array data implements.

A transport moves *flat, contiguous* 1-D buffers of one dtype within a :class:`Group` (an MPI
communicator plus per-transport state such as a NCCL communicator). Counts are element counts in
group-rank order. Shapes, dims, reduce-op semantics (``avg``), accounting, deadlines and error
checking live above, in :mod:`mpilocal.collectives` (the one caller of the transports); choosing a
transport lives in :mod:`mpilocal.transport.select`, the helpers the GPU transports share in
:mod:`mpilocal.transport.gpu_common`.

Reduce ops handed to a transport are :data:`mpilocal.names.TRANSPORT_OPS` (``"sum"``, ``"max"``,
``"min"``, ``"product"``); ``avg`` is a sum followed by a division done by the caller, and ``bool``
arrays reduce logically (:data:`mpilocal.names.BOOL_OPS`). Floating max/min arrive as integer keys
(:mod:`mpilocal.collectives` maps floats to order-preserving integers so that NaN propagates), and
dtypes arrive in native byte order.

**One choice for every rank.** Every branch a transport takes (plain vs v-variant, chunked vs
whole, skip when empty) is decided from values that are the same on every rank of the group: the
``counts`` of ``allgatherv``/``reduce_scatterv``/``scatterv`` (every rank's count, in rank order),
buffer sizes that the callers agreed on, and for ``alltoallv`` (whose counts differ from rank to
rank) the caller's ``uniform`` and ``bound`` arguments, which it computes from group-wide sizes.
Under ``MPILOCAL_DEBUG=1`` each transport fingerprints the MPI/NCCL call it is about to make
(:func:`issuing`), so a divergence raises on every rank and names both calls.
"""

from __future__ import annotations

import os
import zlib
from typing import Protocol, Sequence, runtime_checkable

from mpi4py import MPI

__all__ = ["Group", "Transport", "group_for", "displs", "equal_counts", "register_release_hook", "release", "issuing",
           "register_call_check",
           "count_limit", "counts_key"]


class Group:
    """An MPI communicator as seen by the transports; ``cache`` holds per-transport state."""

    __slots__ = ("comm", "size", "rank", "cache", "__weakref__")

    def __init__(self, comm):
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.cache: dict = {}

    def __repr__(self):
        return f"Group(rank={self.rank}, size={self.size})"


_GROUPS: dict = {}


def displs(counts) -> list:
    """Offsets of blocks of ``counts`` elements laid end to end."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


def equal_counts(counts) -> bool:
    """Whether every count is the same (then the plain, better-tuned collective applies). Only for
    ``counts`` that every rank holds alike (a per-rank row of an all-to-all is not)."""
    first = counts[0]
    for c in counts:
        if c != first:
            return False
    return True


def _limit():
    env = os.environ.get("MPILOCAL_MPI_COUNT_LIMIT", "").strip()
    if env:  # testing knob: force the chunked paths with small messages on any MPI
        return max(16, int(float(env)))
    return None if MPI.Get_version() >= (4, 0) else 2**31 - 1  # MPI-4: mpi4py uses the large-count calls


_COUNT_LIMIT = _limit()


def count_limit():
    """The largest count (or displacement) one MPI call takes here: ``2**31 - 1`` for an MPI without
    large-count calls (MPI-3.1: Open MPI 4.1 and 5), None for MPI-4 (MPICH 4+).
    ``MPILOCAL_MPI_COUNT_LIMIT`` lowers it (tests use it to cover the chunked paths)."""
    return _COUNT_LIMIT


def counts_key(counts) -> str:
    """A short text that identifies a count vector (for fingerprints)."""
    if len(counts) <= 4:
        return ",".join(str(int(c)) for c in counts)
    return f"{len(counts)}x/crc{zlib.crc32(repr([int(c) for c in counts]).encode()):08x}"


def issuing(group: Group, call: str, **detail) -> None:
    """Under ``MPILOCAL_DEBUG=1``: agree over ``group`` on the MPI/NCCL call about to be made
    (``call``, e.g. ``"MPI_Alltoall"``, and the group-wide part of its arguments: datatype, counts
    every rank knows, root, op). Ranks about to make different calls raise
    :class:`~mpilocal.agreement.CollectiveMismatchError` on every rank (the check registered with
    :func:`register_call_check`). Callers guard it with ``if deadline.DEBUG`` so the normal path
    pays one attribute lookup."""
    check = _CALL_CHECK[0]
    if check is not None:
        check(group, call, detail)


_CALL_CHECK = [None]


def register_call_check(fn) -> None:
    """``fn(group, call, detail)`` checks, under ``MPILOCAL_DEBUG=1``, that every rank is about to make
    the same call (:func:`mpilocal.agreement.check_call`, registered when that module loads: the
    check is a layer above the transports)."""
    _CALL_CHECK[0] = fn


def group_for(comm) -> Group:
    """The (cached) :class:`Group` of an mpi4py communicator."""
    key = comm.handle
    g = _GROUPS.get(key)
    if g is None or g.comm is not comm and g.comm != comm:
        g = _GROUPS[key] = Group(comm)
    return g


_RELEASE_HOOKS: dict = {}


def register_release_hook(name: str, fn) -> None:
    """``fn(group)`` drops what a module keeps for a :class:`Group` (its ``cache`` entries: NCCL
    communicators, control communicators, persistent requests, windows) before the group's
    communicator is freed. Hooks run in the order of their ``name``, the same on every rank."""
    _RELEASE_HOOKS[name] = fn


def release(comm) -> None:
    """Forget ``comm``'s :class:`Group` and run the release hooks on it; the caller then frees
    ``comm``. **Collective** over ``comm`` (hooks may free communicators or windows): every rank
    releases the same communicators in the same order (:meth:`mpilocal.DeviceMesh.close`)."""
    g = _GROUPS.get(comm.handle)
    if g is None or not (g.comm is comm or g.comm == comm):
        return
    del _GROUPS[comm.handle]
    for name in sorted(_RELEASE_HOOKS):
        _RELEASE_HOOKS[name](g)
    g.cache.clear()


@runtime_checkable
class Transport(Protocol):
    """Collectives on flat contiguous buffers. Every method is **collective** over ``group``."""

    name: str

    def allgatherv(self, send, recv, counts: Sequence[int], group: Group) -> None:
        """``recv`` = concatenation of every rank's ``send`` (rank r sends ``counts[r]`` elements)."""

    def allreduce(self, send, recv, op: str, group: Group) -> None:
        """``recv`` = elementwise ``op`` over every rank's ``send`` (``send`` may be ``recv``)."""

    def reduce_scatterv(self, send, recv, counts: Sequence[int], op: str, group: Group) -> None:
        """Reduce every rank's ``send`` and give rank r the ``counts[r]`` elements at its offset."""

    def alltoallv(self, send, send_counts: Sequence[int], recv, recv_counts: Sequence[int], group: Group,
                  uniform: bool = False, bound: int | None = None) -> None:
        """Rank r sends its ``send_counts[p]``-element block p to rank p, in rank order.

        ``send_counts``/``recv_counts`` are this rank's row/column of the count matrix and differ
        between ranks, so no transport decides anything from them: ``uniform`` (every entry of the
        whole matrix is equal) and ``bound`` (an upper bound, the same on every rank, of any rank's
        send or receive total in elements; None: unknown, assumed small) come from the caller."""

    def bcast(self, buf, root: int, group: Group) -> None:
        """Give every rank ``root``'s ``buf``."""

    def scatterv(self, send, counts: Sequence[int], recv, root: int, group: Group) -> None:
        """Rank r receives block r (``counts[r]`` elements) of ``root``'s ``send``."""

    def sendrecv(self, sends, recvs, group: Group) -> None:
        """Point-to-point messages, all posted together and complete on return (NCCL: enqueued on
        the current stream). ``sends``/``recvs``: lists of ``(peer group rank, flat contiguous
        buffer)``, never this rank itself; the k-th message from rank a to rank b matches the k-th
        receive from a posted by b. Used by :mod:`mpilocal.neighbors` (halo exchange, permute)."""
