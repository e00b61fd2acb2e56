"""Collectives on local NumPy/CuPy arrays, and the one place where mpilocal issues collectives.

Public (``import mpilocal.functional as funcol``), with PyTorch's names and argument order:
``all_gather_tensor``, ``all_reduce``, ``reduce_scatter_tensor``, ``all_to_all_single``,
``broadcast``. ``group`` is a 1-D :class:`DeviceMesh`, a ``(DeviceMesh, mesh_dim)`` pair or an
mpi4py communicator. Every function here is **collective** over ``group``; results are new arrays of
the input's kind and the input is never modified.

Everything that talks to other ranks goes through :func:`_issue` (array data) or the metadata
helpers below, which is where :class:`~mpilocal.debug.CommDebugMode` counts.
"""

from __future__ import annotations

import atexit
import math
import zlib
from collections import deque

import numpy as np
from mpi4py import MPI

from . import _arrays, _pool, debug, failure
from .autograd.tracked import Tracked
from .layout import chunk_sizes
from .transport import Group, count_limit, equal_counts, group_for
from .transport.select import transport_for

__all__ = ["all_gather_tensor", "all_reduce", "reduce_scatter_tensor", "all_to_all_single", "broadcast"]

_OP_ALIASES = {
    "sum": "sum", "avg": "avg", "max": "max", "min": "min", "product": "product",
}


# ------------------------------------------------------------------------------------------------
# groups and checks
# ------------------------------------------------------------------------------------------------
def resolve_group(group, caller: str) -> Group:
    """A :class:`Group` from a 1-D DeviceMesh, a (DeviceMesh, mesh_dim) pair or an mpi4py Comm."""
    from .mesh import DeviceMesh

    if isinstance(group, MPI.Comm):
        if group == MPI.COMM_NULL:
            raise ValueError(f"{caller}: group is MPI.COMM_NULL; this rank is not part of that communicator")
        return group_for(group)
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"{caller}: group is a {group.ndim}-D DeviceMesh; pass a 1-D mesh, (mesh, mesh_dim) or mesh['name']"
            )
        return group_for(group.get_group(0))
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
        return group_for(group[0].get_group(group[1]))
    raise TypeError(
        f"{caller}: group must be a 1-D DeviceMesh, a (DeviceMesh, mesh_dim) pair or an mpi4py communicator, "
        f"got {type(group).__name__}"
    )


def normalize_op(op, caller: str) -> str:
    name = op.lower() if isinstance(op, str) else None
    canon = _OP_ALIASES.get(name) if name else None
    if canon is None:
        raise ValueError(f"{caller}: reduce op {op!r} is not supported; use one of 'sum', 'avg', 'max', 'min', 'product'")
    return canon


def check_op_dtype(op: str, dtype, caller: str) -> None:
    kind = np.dtype(dtype).kind
    if kind == "c" and op in ("max", "min"):
        raise TypeError(f"{caller}: reduce op {op!r} is undefined for complex dtype {dtype}; use 'sum', 'avg' or 'product'")
    if op == "avg" and kind in "biu":
        raise TypeError(
            f"{caller}: reduce op 'avg' of {dtype} arrays would not be exact; cast to a floating dtype first "
            f"(or reduce with 'sum' and divide yourself)"
        )
    if kind not in "biufc":
        raise TypeError(f"{caller}: cannot reduce arrays of dtype {dtype}")


def check_movable(dtype, caller: str) -> None:
    """Arrays whose elements are references to Python objects cannot be sent as bytes."""
    dt = np.dtype(dtype)
    if dt.hasobject or dt.kind == "T":
        raise TypeError(
            f"{caller}: arrays of dtype {dt} hold references to Python objects, which cannot be sent to other "
            f"processes; convert them to a fixed-size dtype first (numbers, or numpy.str_ such as 'U16')"
        )


def check_redistribute(dtype, src, dst, caller: str = "redistribute") -> None:
    """The checks funcol makes, for a redistribute from placements ``src`` to ``dst``: the reduce op
    of each Partial that is reduced must suit the dtype, and communicated data must be movable.
    Local (``dtype`` and placements are the same on every rank), so call it before any collective."""
    for s, d in zip(src, dst):
        if s == d:
            continue
        if s.is_partial():
            check_op_dtype(s.reduce_op, dtype, caller)
            check_movable(dtype, caller)
        elif s.is_shard():
            check_movable(dtype, caller)


def _norm_dim(dim, ndim, caller, what="dim"):
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{caller}: {what} must be an int, got {dim!r}")
    if ndim == 0:
        raise ValueError(
            f"{caller}: a 0-d array has no dimension {dim} to use as {what}; pass x.reshape(1) (PyTorch's "
            f"collectives along a dim need at least one dimension as well)"
        )
    if not -ndim <= dim < ndim:
        raise ValueError(f"{caller}: {what} {dim} is out of range for an array of ndim {ndim}")
    return int(dim) % ndim


def _issue(name: str, send, g: Group, **detail):
    """Account one logical collective. Every array-data collective calls this exactly once, just
    before handing buffers to the transport: ``send`` is this rank's send buffer (or None),
    ``detail`` names what must agree across ranks (reduce op, root, dims, sizes).

    Use as ``with _issue(...): transport call`` — the context marks the collective in flight for
    the deadline watchdog (mpilocal.failure), which also checks fingerprints under MPILOCAL_DEBUG=1."""
    if debug._ACTIVE:
        debug.record(name, 0 if send is None else send.nbytes)
    return failure.begin(name, g, send, detail)  # failure handling: in-flight slot / fingerprint


# ------------------------------------------------------------------------------------------------
# internal collectives with known sizes (used by redistribute and the public functions)
# ------------------------------------------------------------------------------------------------
def _empty(like, shape, dtype=None):
    """An output buffer of ``like``'s kind: NumPy ones from the recycling pool (warm pages for
    large results), CuPy ones from CuPy's own memory pool."""
    if type(like) is np.ndarray:
        return _pool.empty(shape, like.dtype if dtype is None else dtype)
    return _arrays.namespace(like).empty(shape, dtype=like.dtype if dtype is None else dtype)


def _contiguous(x):
    """``x`` itself when C-contiguous, else a C-contiguous copy (in a pooled buffer for NumPy)."""
    if x.flags.c_contiguous:
        return x
    out = _empty(x, x.shape)
    out[...] = x
    return out


def _leading(x, dim):
    """``x`` with ``dim`` moved to axis 0, C-contiguous (a view when it already is)."""
    if dim != 0:
        x = _arrays.namespace(x).moveaxis(x, dim, 0)
    return _contiguous(x)


def _restore(y, dim):
    if dim == 0:
        return y
    return _contiguous(_arrays.namespace(y).moveaxis(y, 0, dim))


def _detail(detail, placements):
    if placements is not None:
        detail["placements"] = placements
    return detail


def gather(x, dim: int, g: Group, sizes, placements=None) -> "array":
    """All-gather ``x`` along ``dim``; rank r contributes ``sizes[r]`` rows along ``dim``.
    ``placements`` (optional, e.g. ``(src, dst)`` of a redistribute) joins the debug fingerprint."""
    send = _leading(x, dim)
    inner = math.prod(send.shape[1:])
    recv = _empty(x, (sum(sizes),) + send.shape[1:])
    with _issue("all_gather_into_tensor", send, g, **_detail(dict(dim=dim, sizes=tuple(sizes)), placements)):
        transport_for(x, "all_gather").allgatherv(send.reshape(-1), recv.reshape(-1), [s * inner for s in sizes], g)
    return _restore(recv, dim)


# -- reductions: what the transports get -----------------------------------------------------------
# Transports reduce native-order buffers with sum/max/min/product. On the way in:
# - non-native byte order ('>f8' on x86) is converted: the result has the native dtype, as NumPy's;
# - float max/min become integer max/min of order-preserving keys (below), so NaN propagates as in
#   np.maximum/np.minimum on every transport (MPI's and NCCL's float MAX/MIN drop NaN or depend
#   on the operand order), in the same single collective;
# - float16 avg is summed and divided in float32 (60000 + 60000 averages to 60000, as np.mean).
_KEY_INT = {2: np.int16, 4: np.int32, 8: np.int64}
_NAN_KEY: dict = {}


def _nan_key(dtype, op):
    """The key of NaN: above +inf's for max, below -inf's for min."""
    k = _NAN_KEY.get((dtype, op))
    if k is None:
        kt = _KEY_INT[dtype.itemsize]
        nan = np.array([np.nan if op == "max" else -np.nan], dtype).view(kt)
        k = _NAN_KEY[(dtype, op)] = int(_keys_inplace(nan.copy())[0])
    return k


def _keys_inplace(b):
    """Float bits (viewed as signed ints) -> order-preserving signed ints, and back (an involution):
    non-negative floats keep their bits, negative ones get their magnitude bits flipped, so
    -inf < ... < -0.0 < +0.0 < ... < +inf as integers."""
    xp = _arrays.namespace(b)
    m = _empty(b, b.shape)  # pooled: a fresh large temporary costs page faults on every call
    xp.right_shift(b, 8 * b.dtype.itemsize - 1, out=m)  # -1 for negative floats, 0 otherwise
    m &= np.iinfo(b.dtype).max
    b ^= m
    return b


def _float_keys(send, op):
    """Integer keys of the contiguous float buffer ``send`` for a NaN-propagating ``op`` (max/min).
    Cost: about six elementwise passes here and three in :func:`_from_keys`, no extra collective."""
    xp = _arrays.namespace(send)
    b = send.view(_KEY_INT[send.dtype.itemsize])
    k = _empty(b, b.shape)
    xp.right_shift(b, 8 * b.dtype.itemsize - 1, out=k)  # as _keys_inplace, without a copy of the input
    k &= np.iinfo(b.dtype).max
    k ^= b
    nan = _empty(send, send.shape, np.bool_)
    xp.isnan(send, out=nan)
    xp.putmask(k, nan, _nan_key(send.dtype, op))
    return k


def _from_keys(k, dtype, op):
    out = _keys_inplace(k).view(dtype)
    if op == "min":  # the NaN key maps back to a negative NaN: give NumPy's default NaN
        xp = _arrays.namespace(out)
        nan = _empty(out, out.shape, np.bool_)
        xp.isnan(out, out=nan)
        xp.putmask(out, nan, np.nan)
    return out


def _reduce_input(x, op):
    """(contiguous native-order send buffer, transport op, finish(recv, g) -> result)."""
    dt = x.dtype
    if not dt.isnative:
        dt = dt.newbyteorder("=")
        x = x.astype(dt)
    kind = dt.kind
    if op == "avg":
        if dt == np.float16:  # sum and divide in float32
            send = x.astype(np.float32)
            return send, "sum", lambda r, g: _avg_narrow(r, g, dt)
        return _contiguous(x), "sum", _divide
    if kind == "f" and op in ("max", "min"):
        send = _contiguous(x)
        if dt.itemsize in _KEY_INT:
            return _float_keys(send, op), op, lambda r, g: _from_keys(r, dt, op)
        return send, "gather:" + op, None  # long double: gather and reduce in rank order
    return _contiguous(x), op, None


def _divide(r, g):
    r /= g.size
    return r


def _avg_narrow(r, g, dt):
    r /= g.size
    return r.astype(dt)


def _gather_reduce(send, op, g, kind):
    """Every rank's ``send`` (flat) reduced with ``op`` in rank order (NumPy's own ufunc)."""
    k, n = g.size, send.size
    buf = _empty(send, (k * n,))
    transport_for(send, kind).allgatherv(send.reshape(-1), buf, [n] * k, g)
    f = {"max": _arrays.namespace(send).maximum, "min": _arrays.namespace(send).minimum}[op]
    return f.reduce(buf.reshape(k, n), axis=0)


def reduce(x, op: str, g: Group, placements=None):
    """All-reduce ``x`` with ``op`` (``avg`` divides the sum by the group size). The result has
    ``x``'s dtype in native byte order."""
    send, top, finish = _reduce_input(x, op)
    with _issue("all_reduce", send, g, **_detail(dict(op=op), placements)):
        if top.startswith("gather:"):
            return _gather_reduce(send, top[7:], g, "all_gather").reshape(x.shape)
        recv = _empty(send, send.shape)
        transport_for(x, "all_reduce").allreduce(send.reshape(-1), recv.reshape(-1), top, g)
    if finish is not None:
        recv = finish(recv, g)
    return recv.reshape(x.shape)


def reduce_scatter(x, op: str, dim: int, g: Group, sizes, placements=None):
    """Reduce ``x`` and give rank r its ``sizes[r]`` rows along ``dim``."""
    send, top, finish = _reduce_input(_leading(x, dim), op)
    inner = math.prod(send.shape[1:])
    counts = [s * inner for s in sizes]
    with _issue("reduce_scatter_tensor", send, g, **_detail(dict(op=op, dim=dim, sizes=tuple(sizes)), placements)):
        if top.startswith("gather:"):
            off = sum(counts[:g.rank])
            full = _gather_reduce(send, top[7:], g, "all_gather")
            recv = full[off:off + counts[g.rank]].reshape((sizes[g.rank],) + send.shape[1:]).copy()
            return _restore(recv, dim)
        recv = _empty(send, (sizes[g.rank],) + send.shape[1:])
        transport_for(x, "reduce_scatter").reduce_scatterv(send.reshape(-1), recv.reshape(-1), counts, top, g)
    if finish is not None:
        recv = finish(recv, g)
    return _restore(recv, dim)


def all_to_all_dims(x, src_dim: int, dst_dim: int, g: Group, src_sizes, dst_sizes, placements=None):
    """Shard(src_dim) -> Shard(dst_dim) within ``g``: send piece p of ``dst_dim`` (``dst_sizes[p]``)
    to rank p, receive rank p's ``src_sizes[p]`` rows of ``src_dim`` and concatenate them.

    ``src_sizes``/``dst_sizes`` are every rank's sizes (the same on every rank), so rank r sends
    ``src_sizes[r] * dst_sizes[p] * other`` elements to rank p: the count matrix is uniform iff
    its smallest and largest entries agree, which every rank computes alike."""
    xp = _arrays.namespace(x)
    xa = xp.moveaxis(x, src_dim, 0) if src_dim else x
    b = dst_dim + 1 if dst_dim < src_dim else dst_dim
    send = _empty(x, (x.size,))
    per_row = x.size // x.shape[dst_dim] if x.shape[dst_dim] else 0
    pos, off, send_counts = 0, 0, []
    if _arrays.is_cupy(xa) and xa.flags.c_contiguous:  # GPU: each piece is one strided 2-D memcpy
        from .transport.cuda_mpi import pack_pieces

        send_counts = pack_pieces(xa, b, dst_sizes, send)
    for s in dst_sizes if not send_counts else ():
        n = s * per_row
        if n:
            idx = (slice(None),) * b + (slice(off, off + s),)
            send[pos:pos + n].reshape(xa[idx].shape)[...] = xa[idx]
        send_counts.append(n)
        pos += n
        off += s
    mine = dst_sizes[g.rank]
    rest = list(xa.shape[1:])
    rest[b - 1] = mine
    inner = math.prod(rest)
    recv = _empty(x, (sum(src_sizes),) + tuple(rest))
    other = math.prod(n for i, n in enumerate(x.shape) if i != src_dim and i != dst_dim)
    uniform = other * min(src_sizes) * min(dst_sizes) == other * max(src_sizes) * max(dst_sizes)
    bound = other * max(max(src_sizes) * sum(dst_sizes), sum(src_sizes) * max(dst_sizes))
    detail = _detail(dict(src_dim=src_dim, dst_dim=dst_dim, src_sizes=tuple(src_sizes), dst_sizes=tuple(dst_sizes)),
                     placements)
    with _issue("all_to_all_single", send, g, **detail):
        transport_for(x, "all_to_all").alltoallv(send, send_counts, recv.reshape(-1), [s * inner for s in src_sizes], g,
                                                 uniform, bound)
    return _restore(recv, dim=src_dim)


def bcast(x, root: int, g: Group, placements=None):
    """A copy of group rank ``root``'s ``x`` on every rank (``x`` gives shape and dtype elsewhere)."""
    buf = _empty(x, x.shape)
    buf[...] = x
    with _issue("broadcast", buf, g, **_detail(dict(root=root), placements)):
        transport_for(x, "broadcast").bcast(buf.reshape(-1), root, g)
    return buf


def scatter(pieces, like, shape, counts, root: int, g: Group):
    """Scatter: rank r receives ``pieces[r]`` (arrays given on ``root`` only; ``counts[r]`` elements,
    known everywhere) as an array of ``shape``."""
    recv = _empty(like, shape)
    send = None
    if g.rank == root:
        send = _empty(like, (sum(counts),))
        pos = 0
        for p in pieces:
            send[pos:pos + p.size].reshape(p.shape)[...] = p
            pos += p.size
    with _issue("scatter", send, g, root=root, dtype=str(like.dtype), counts=tuple(counts)):
        transport_for(like, "scatter").scatterv(send, counts, recv.reshape(-1), root, g)
    return recv


# ------------------------------------------------------------------------------------------------
# metadata agreement (shapes, dtypes): small int64 vectors over a separate communicator
# ------------------------------------------------------------------------------------------------
META_WIDTH = 66  # [ndim, dtype code | kind bit | call bits, shape padded to 64 dims (NumPy's maximum)]
# entry 1: bits 0-31 the dtype's crc32, bit 32 set for CuPy arrays, bits 33-62 the call's parameters
# (a hash, or flags): so a 64-D shape keeps all its slots
_CUPY_BIT = 1 << 32
_P_SHIFT = 33
_P_MASK = (1 << 30) - 1
_TYPE_MASK = (1 << _P_SHIFT) - 1


def meta_vector(shape, dtype, cupy: bool = False) -> np.ndarray:
    v = np.zeros(META_WIDTH, dtype=np.int64)
    v[0] = len(shape)
    v[1] = (zlib.crc32(np.dtype(dtype).str.encode()) if dtype is not None else 0) | (_CUPY_BIT if cupy else 0)
    v[2:2 + len(shape)] = shape
    return v


def meta_shape(row) -> tuple:
    return tuple(int(s) for s in row[2:2 + int(row[0])])


class MetaFuture:
    """A pending all-gather of metadata vectors; :meth:`result` completes it (a local wait: every
    rank of the communicator posted the same request)."""

    __slots__ = ("req", "recv", "done", "g", "ring", "slot")

    def __init__(self, req, recv, g=None, ring=None, slot=-1):
        self.req, self.recv, self.done, self.g, self.ring, self.slot = req, recv, False, g, ring, slot

    def result(self) -> np.ndarray:
        if not self.done:
            with failure.waiting("metadata all-gather (completing a posted request)", self.g):  # deadline
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


class _MetaRing:
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


def post_shape_agreement(mesh, shape, vec=None) -> MetaFuture:
    """Start the agreement of a local ``shape`` over ``mesh`` (collective; the local_map hot path:
    the mesh's persistent-collective ring, without building a metadata vector). ``vec``: the full
    metadata vector to agree on instead (dtype, flags; see mpilocal.dtensor)."""
    ring = mesh.__dict__.get("_meta_ring")
    if ring is None:
        comm = mesh._metadata_comm()
        ring = group_for(comm).cache.get("meta_ring")
        if ring is None or _NO_RING:
            return post_meta_allgather(comm, meta_vector(shape, None) if vec is None else vec, "shape_agreement")
        mesh._meta_ring = ring
    if debug._ACTIVE:
        debug.record_metadata("shape_agreement", META_WIDTH * 8)
    with failure.begin("metadata:shape_agreement", ring.g, None):  # failure handling: deadline / fingerprint
        return ring.post(vec, shape)


def post_meta_allgather(comm, vec: np.ndarray, what: str) -> MetaFuture:
    """Start a non-blocking all-gather of ``vec`` over ``comm`` (collective); complete it later."""
    global _NO_RING
    if debug._ACTIVE:
        debug.record_metadata(what, vec.nbytes)
    g = group_for(comm)
    if vec.size == META_WIDTH and not _NO_RING:
        ring = g.cache.get("meta_ring")
        if ring is None:
            try:
                ring = g.cache["meta_ring"] = _MetaRing(comm, g)
            except (NotImplementedError, AttributeError):
                # MPI < 4 (mpi4py built without persistent collectives): a property of the build, the
                # same on every rank, so every rank takes the Iallgather path below (an MPI error in
                # Allgather_init is not caught: ranks must never mix the two kinds of call)
                _NO_RING = True
        if ring is not None:
            with failure.begin("metadata:" + what, g, vec):  # failure handling: deadline / fingerprint
                return ring.post(vec)
    # Retire earlier requests so they never pile up: MPI progresses every active request on each
    # call, so many outstanding ones make every MPI call slower. Beyond _MAX_PENDING, wait for the
    # oldest: every rank posted it calls ago, so the wait is short and cannot deadlock.
    while _PENDING and (_PENDING[0].test() or len(_PENDING) >= _MAX_PENDING):
        _PENDING.popleft().result()
    recv = np.empty((comm.Get_size(), vec.size), dtype=vec.dtype)
    with failure.begin("metadata:" + what, g, vec):  # failure handling: deadline / fingerprint
        fut = MetaFuture(comm.Iallgather(vec, recv), recv, g)
    _PENDING.append(fut)
    return fut


def meta_allgather(comm, vec: np.ndarray, what: str) -> np.ndarray:
    """Blocking all-gather of metadata vectors (collective over ``comm``)."""
    recv = np.empty((comm.Get_size(), vec.size), dtype=vec.dtype)
    if debug._ACTIVE:
        debug.record_metadata(what, vec.nbytes)
    with failure.begin("metadata:" + what, group_for(comm), vec):  # failure handling: deadline / fingerprint
        comm.Allgather(vec, recv)
    return recv


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
# public functional collectives
# ------------------------------------------------------------------------------------------------
def _autograd():
    from .autograd import collectives

    return collectives


def all_gather_tensor(x, gather_dim: int, group, tag: str = ""):
    """Concatenate every rank's ``x`` along ``gather_dim`` in group-rank order. **Collective.**

    Sizes along ``gather_dim`` may differ between ranks (they are agreed as metadata); all other
    dims and the dtype must match, else ``ValueError`` on every rank.
    """
    caller = "all_gather_tensor"
    if type(x) is Tracked:  # differentiable (inside local_map with inputs that require grad)
        return _autograd().all_gather_tensor(x, gather_dim, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict is agreed below so that every rank raises (failure.agree)
        _arrays.require_array(x, caller)
        dim = _norm_dim(gather_dim, x.ndim, caller, "gather_dim")
        check_movable(x.dtype, caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e
    rows = failure.agree(g, caller, err, None if err else _meta_with(x, caller, gather_dim=dim), "gather_sizes")
    if rows is None and g.size > 1:  # argument agreement is off (MPILOCAL_CHECK_ARGS=0): sizes still needed
        rows = meta_allgather(g.comm, _meta_with(x, caller, gather_dim=dim), "gather_sizes")
    _check_params(rows, caller, gather_dim=dim)
    _check_same(rows, caller, skip_dim=dim)
    sizes = [int(r[2 + dim]) for r in rows] if rows is not None else [x.shape[dim]]
    return gather(x, dim, g, sizes)


def _meta_with(x, caller, flags=None, **params):
    """meta_vector of ``x`` (with its kind, NumPy or CuPy) with the call's parameters (reduce op, dim,
    src) hashed into the parameter bits of entry 1 (or ``flags`` put there as they are), so that
    :func:`_check_params` finds ranks that pass different ones."""
    vec = meta_vector(x.shape, x.dtype, _arrays.is_cupy(x))
    p = flags if flags is not None else zlib.crc32(repr(tuple(params.values())).encode())
    vec[1] |= (p & _P_MASK) << _P_SHIFT
    return vec


def _check_params(rows, caller, **params):
    if rows is not None and len(set((rows[:, 1] >> _P_SHIFT).tolist())) > 1:
        raise ValueError(f"{caller}: ranks pass different {', '.join(params)} (this rank: "
                         f"{', '.join(f'{k}={v!r}' for k, v in params.items())}); every rank must pass the same")


def _check_same(rows, caller, skip_dim=None):
    """Raise the same ValueError on every rank when the gathered metadata rows disagree."""
    if rows is None or len(rows) == 1:
        return
    rows = rows.copy()
    rows[:, 1] &= _TYPE_MASK  # the parameter bits are checked by _check_params
    diff = rows != rows[0]
    if skip_dim is not None:
        diff[:, 2 + skip_dim] = False
    if not diff.any():
        return
    ref = rows[0]
    kinds = ["CuPy" if row[1] & _CUPY_BIT else "NumPy" for row in rows]
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


def all_reduce(x, reduceOp: str, group, tag: str = ""):
    """Elementwise reduction of every rank's ``x`` (``"sum"``, ``"avg"``, ``"max"``, ``"min"``,
    ``"product"``). **Collective**; all ranks pass the same shape and dtype."""
    caller = "all_reduce"
    if type(x) is Tracked:  # differentiable (inside local_map with inputs that require grad)
        return _autograd().all_reduce(x, reduceOp, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict (and shapes/dtypes) are agreed so every rank raises
        _arrays.require_array(x, caller)
        op = normalize_op(reduceOp, caller)
        check_op_dtype(op, x.dtype, caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e
    rows = failure.agree(g, caller, err, None if err else _meta_with(x, caller, reduceOp=op))
    _check_params(rows, caller, reduceOp=op)
    _check_same(rows, caller)
    return reduce(x, op, g)


def reduce_scatter_tensor(x, reduceOp: str, scatter_dim: int, group, tag: str = ""):
    """Reduce every rank's ``x`` and keep this rank's piece along ``scatter_dim`` (``torch.chunk``
    pieces, so the dim need not divide evenly). **Collective.**"""
    caller = "reduce_scatter_tensor"
    if type(x) is Tracked:  # differentiable (inside local_map with inputs that require grad)
        return _autograd().reduce_scatter_tensor(x, reduceOp, scatter_dim, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict (and shapes/dtypes) are agreed so every rank raises
        _arrays.require_array(x, caller)
        op = normalize_op(reduceOp, caller)
        check_op_dtype(op, x.dtype, caller)
        dim = _norm_dim(scatter_dim, x.ndim, caller, "scatter_dim")
        err = None
    except (TypeError, ValueError) as e:
        err = e
    rows = failure.agree(g, caller, err, None if err else _meta_with(x, caller, reduceOp=op, scatter_dim=dim))
    _check_params(rows, caller, reduceOp=op, scatter_dim=dim)
    _check_same(rows, caller)
    return reduce_scatter(x, op, dim, g, chunk_sizes(x.shape[dim], g.size))


def all_to_all_single(x, output_split_sizes, input_split_sizes, group, tag: str = ""):
    """Split ``x`` along dim 0 by ``input_split_sizes`` (block p to rank p) and concatenate what
    arrives by ``output_split_sizes``. ``None`` for both: equal splits. ``output_split_sizes=None``
    with explicit input sizes: the output sizes are agreed as metadata. **Collective.**"""
    caller = "all_to_all_single"
    if type(x) is Tracked:  # differentiable (inside local_map with inputs that require grad)
        return _autograd().all_to_all_single(x, output_split_sizes, input_split_sizes, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict (and dtypes/trailing dims) are agreed so every rank raises
        splits = _a2a_splits(x, output_split_sizes, input_split_sizes, g, caller)
        check_movable(x.dtype, caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e
    # flags that choose the MPI call, agreed with the checks: bit 0 "my splits are not all equal",
    # bit 1 "a total of mine passes the MPI count limit", bit 2 "my receive sizes are agreed later"
    flags = 0 if err else _a2a_flags(x, splits, g)
    rows = failure.agree(g, caller, err, None if err else _meta_with(x, caller, flags=flags))
    _check_same(rows, caller, skip_dim=0)
    input_split_sizes, output_split_sizes = splits
    # The split agreement runs when any rank lacks its output sizes (agreed flag bit 2), so ranks that
    # pass them join it too; the sizes that arrive are the truth. Without the argument agreement
    # (MPILOCAL_CHECK_ARGS=0) each rank decides alone: all ranks must then pass sizes alike.
    need = output_split_sizes is None if rows is None else bool(((rows[:, 1] >> _P_SHIFT) & 4).any())
    if need:
        counts = np.asarray(input_split_sizes, dtype=np.int64)
        recv = np.empty_like(counts)
        if debug._ACTIVE:
            debug.record_metadata("split_agreement", counts.nbytes)
        with failure.begin("metadata:split_agreement", g, counts):  # failure handling
            g.comm.Alltoall(counts, recv)
        output_split_sizes = _check_splits(recv.tolist(), g.size, caller, "output_split_sizes")
    send = _contiguous(x)
    inner = math.prod(x.shape[1:])
    recv = _empty(x, (sum(output_split_sizes),) + x.shape[1:])
    # Split sizes differ from rank to rank by design, so the choice of MPI call comes from every
    # rank's flags: plain all-to-all only when every rank's splits are equal (with equal totals, as
    # the shapes show), large-message path when any rank needs it. Without the agreement
    # (MPILOCAL_CHECK_ARGS=0) the v-variant is used and large totals are not detected.
    if rows is None:
        uniform, bound = g.size == 1, None
    else:
        fl = (rows[:, 1] >> _P_SHIFT) & _P_MASK
        uniform = not (fl & 1).any() and len(set(rows[:, 2].tolist())) == 1
        # no rank receives more than all ranks send: a group-wide bound where receive sizes are agreed later
        bound = 1 << 62 if (fl & 2).any() else int(rows[:, 2].sum()) * inner if (fl & 4).any() else 0
    # the fingerprint holds dtype and trailing dims
    with _issue("all_to_all_single", send, g, trailing=x.shape[1:]):
        transport_for(x, "all_to_all").alltoallv(
            send.reshape(-1), [s * inner for s in input_split_sizes], recv.reshape(-1),
            [s * inner for s in output_split_sizes], g, uniform, bound,
        )
    return recv


def _a2a_flags(x, splits, g):
    ins, outs = splits
    inner = math.prod(x.shape[1:])
    flags = 0 if outs is not None and equal_counts(ins) and equal_counts(outs) and ins[0] == outs[0] else 1
    limit = count_limit()
    if limit is not None and max(sum(ins), sum(outs or ins)) * inner * x.dtype.itemsize > limit:
        flags |= 2
    if outs is None:
        flags |= 4
    return flags


def _a2a_splits(x, output_split_sizes, input_split_sizes, g, caller):
    """all_to_all_single's local argument checks: (input splits, output splits or None to agree)."""
    _arrays.require_array(x, caller)
    if x.ndim == 0:
        raise ValueError(f"{caller}: x must have at least one dimension")
    n0 = x.shape[0]
    if input_split_sizes is None:
        if n0 % g.size:
            raise ValueError(
                f"{caller}: dim 0 of size {n0} does not split evenly over {g.size} ranks; pass input_split_sizes"
            )
        input_split_sizes = [n0 // g.size] * g.size
    input_split_sizes = _check_splits(input_split_sizes, g.size, caller, "input_split_sizes")
    if sum(input_split_sizes) != n0:
        raise ValueError(f"{caller}: input_split_sizes {input_split_sizes} sum to {sum(input_split_sizes)}, not dim 0 = {n0}")
    if output_split_sizes is None:
        if input_split_sizes == [n0 // g.size] * g.size and n0 % g.size == 0:
            return input_split_sizes, input_split_sizes
        return input_split_sizes, None
    return input_split_sizes, _check_splits(output_split_sizes, g.size, caller, "output_split_sizes")


def _check_splits(sizes, k, caller, what):
    try:
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError):
        raise TypeError(f"{caller}: {what} must be a sequence of ints, got {sizes!r}") from None
    if len(sizes) != k or any(s < 0 for s in sizes):
        raise ValueError(f"{caller}: {what} {sizes} must hold {k} non-negative sizes, one per rank of the group")
    return sizes


def broadcast(x, src: int, group, tag: str = ""):
    """Every rank gets group rank ``src``'s ``x`` (as PyTorch's funcol, ``src`` is a rank within
    ``group``). **Collective**; other ranks pass an array of the same shape and dtype."""
    caller = "broadcast"
    if type(x) is Tracked:  # differentiable (inside local_map with inputs that require grad)
        return _autograd().broadcast(x, src, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict (and shapes/dtypes) are agreed so every rank raises
        _arrays.require_array(x, caller)
        if isinstance(src, bool) or not isinstance(src, (int, np.integer)) or not 0 <= src < g.size:
            raise ValueError(f"{caller}: src {src!r} is not a rank of the group (0..{g.size - 1}); pass a group rank")
        check_movable(x.dtype, caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e
    rows = failure.agree(g, caller, err, None if err else _meta_with(x, caller, src=int(src)))
    _check_params(rows, caller, src=int(src))
    _check_same(rows, caller)
    return bcast(x, int(src), g)


# neighbour collectives (halo exchange, permute, send_recv, shift) live in mpilocal.neighbors
from .neighbors import halo_exchange, halo_update, permute, send_recv, shift  # noqa: E402,F401


# ------------------------------------------------------------------------------------------------
# releasing a group (DeviceMesh.close): metadata requests on its communicator end first
# ------------------------------------------------------------------------------------------------
def _release_group(g) -> None:
    """Release hook (:func:`mpilocal.transport.release`): complete the pending metadata all-gathers
    posted on ``g`` (every rank posted them, so the waits are short) and free its persistent ring."""
    for fut in [f for f in _PENDING if f.g is g]:
        fut.result()
        _PENDING.remove(fut)
    ring = g.cache.pop("meta_ring", None)
    if ring is not None:
        for fut in ring.owner:
            if fut is not None:
                fut.result()
        for req in ring.reqs:
            req.Free()
        if ring in _RINGS:
            _RINGS.remove(ring)


from .transport import register_release_hook as _register_release_hook  # noqa: E402

_register_release_hook("10-functional", _release_group)


# ------------------------------------------------------------------------------------------------
# coalesced collectives: a list of arrays in one collective (PyTorch's *_coalesced)
# ------------------------------------------------------------------------------------------------
# Rule: the arrays are packed into one buffer and moved by ONE collective, booked once by
# CommDebugMode under the coalesced name. Gathers move bytes, so any mix of dtypes is one
# collective. Reductions need one dtype per buffer: arrays of one dtype are one collective, and a
# list mixing k dtypes is k collectives (one per dtype, in order of first appearance, each booked).
# Not differentiable: under local_map's autograd they raise NotImplementedError.
__all__ += ["all_reduce_coalesced", "all_gather_into_tensor_coalesced", "reduce_scatter_tensor_coalesced"]


def _coalesced_list(inputs, caller) -> list:
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"{caller}: inputs must be a list of NumPy or CuPy arrays, got {type(inputs).__name__}; "
                        f"for one array use {caller[:-len('_coalesced')]}")
    xs = list(inputs)
    if any(type(x) is Tracked for x in xs):
        raise NotImplementedError(
            f"{caller} is not differentiable; inside local_map with inputs that require grad, call "
            f"{caller[:-len('_coalesced')]} once per array (each of those is differentiable)"
        )
    for i, x in enumerate(xs):
        _arrays.require_array(x, caller, f"inputs[{i}]")
    kinds = {_arrays.kind_name(x) for x in xs}
    if len(kinds) > 1:
        raise TypeError(f"{caller}: inputs mix NumPy and CuPy arrays; pass arrays of one kind")
    return xs


def _coalesced_agree(g, caller, err, xs, params):
    """Agree on the local checks' verdict and on the list (count, shapes, dtypes, kinds, parameters):
    every rank raises the same error when they differ. Collective over ``g``."""
    meta = None
    if err is None:
        sig = repr([(tuple(x.shape), x.dtype.str, _arrays.kind_name(x)) for x in xs])
        meta = np.zeros(META_WIDTH, dtype=np.int64)
        meta[0] = len(xs)
        meta[1] = zlib.crc32(sig.encode())
        meta[2] = zlib.crc32(repr(params).encode())
    rows = failure.agree(g, caller, err, meta)
    if rows is None:
        return
    bad = [r for r in range(len(rows)) if not np.array_equal(rows[r, :3], rows[0, :3])]
    if bad:
        r = bad[0]
        what = ("parameters " + ", ".join(f"{k}={v!r}" for k, v in params.items())) if \
            np.array_equal(rows[r, :2], rows[0, :2]) else "list of arrays"
        raise ValueError(
            f"{caller}: group rank {r} passes a different {what} than group rank 0 ({int(rows[r, 0])} vs "
            f"{int(rows[0, 0])} arrays, or other shapes, dtypes or kinds); every rank must pass the same number "
            f"of arrays, with the same shapes and dtypes in the same order, and the same parameters"
        )


def _by_dtype(xs) -> list:
    """[(dtype, [indices])] in order of first appearance."""
    groups: dict = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.dtype, []).append(i)
    return list(groups.items())


def all_reduce_coalesced(inputs, reduceOp: str, group, tag: str = "") -> list:
    """:func:`all_reduce` of each array of ``inputs`` (a list), packed into one buffer: one collective
    for arrays of one dtype (one per dtype for a mix). **Collective**; every rank passes arrays of the
    same shapes and dtypes in the same order. Returns a list of new arrays."""
    caller = "all_reduce_coalesced"
    g = resolve_group(group, caller)
    xs, op = [], None
    try:
        xs = _coalesced_list(inputs, caller)
        op = normalize_op(reduceOp, caller)
        for x in xs:
            check_op_dtype(op, x.dtype, caller)
        err = None
    except (TypeError, ValueError, NotImplementedError) as e:
        err = e
    _coalesced_agree(g, caller, err, xs, {"reduceOp": op})
    out = [None] * len(xs)
    with debug.counted_as("all_reduce", caller):
        for dt, idx in _by_dtype(xs):
            n = sum(xs[i].size for i in idx)
            flat = _empty(xs[idx[0]], (n,))
            pos = 0
            for i in idx:
                flat[pos:pos + xs[i].size] = xs[i].reshape(-1)
                pos += xs[i].size
            red = reduce(flat, op, g)
            pos = 0
            for i in idx:
                out[i] = red[pos:pos + xs[i].size].reshape(xs[i].shape)
                pos += xs[i].size
    return out


def all_gather_into_tensor_coalesced(inputs, group, tag: str = "") -> list:
    """:func:`all_gather_tensor` along dim 0 of each array of ``inputs`` (a list), as bytes in one
    buffer: always one collective, whatever the dtypes. **Collective**; every rank passes arrays of
    the same shapes and dtypes in the same order (as PyTorch). Returns a list of new arrays, each
    ``group size`` times longer along dim 0."""
    caller = "all_gather_into_tensor_coalesced"
    g = resolve_group(group, caller)
    xs = []
    try:
        xs = _coalesced_list(inputs, caller)
        for i, x in enumerate(xs):
            _norm_dim(0, x.ndim, f"{caller}: inputs[{i}]", "gather dim")
            check_movable(x.dtype, caller)
        err = None
    except (TypeError, ValueError, NotImplementedError) as e:
        err = e
    _coalesced_agree(g, caller, err, xs, {})
    if not xs:
        return []
    nbytes = [x.nbytes for x in xs]
    total = sum(nbytes)
    send = _empty(xs[0], (total,), np.uint8)
    pos = 0
    for x, nb in zip(xs, nbytes):
        if nb:
            send[pos:pos + nb] = _contiguous(x).reshape(-1).view(np.uint8)
        pos += nb
    with debug.counted_as("all_gather_into_tensor", caller):
        recv = gather(send, 0, g, [total] * g.size).reshape(g.size, total)
    xp = _arrays.namespace(send)
    out, pos = [], 0
    for x, nb in zip(xs, nbytes):
        block = xp.ascontiguousarray(recv[:, pos:pos + nb])
        out.append(block.view(x.dtype).reshape((g.size * x.shape[0],) + tuple(x.shape[1:])))
        pos += nb
    return out


def reduce_scatter_tensor_coalesced(inputs, reduceOp: str, scatter_dim, group, tag: str = "") -> list:
    """:func:`reduce_scatter_tensor` of each array of ``inputs`` (a list) along its ``scatter_dim``
    (a list, one dim per array, as PyTorch; an int applies to all), packed into one buffer so that
    rank r's block holds its piece of every array: one collective for arrays of one dtype (one per
    dtype for a mix). Pieces follow ``torch.chunk``, so dims need not divide evenly. **Collective**;
    every rank passes the same shapes, dtypes and dims. Returns a list of new arrays."""
    caller = "reduce_scatter_tensor_coalesced"
    g = resolve_group(group, caller)
    xs, op, dims = [], None, []
    try:
        xs = _coalesced_list(inputs, caller)
        op = normalize_op(reduceOp, caller)
        if isinstance(scatter_dim, (int, np.integer)) and not isinstance(scatter_dim, bool):
            scatter_dim = [scatter_dim] * len(xs)
        if not isinstance(scatter_dim, (list, tuple)) or len(scatter_dim) != len(xs):
            raise ValueError(f"{caller}: scatter_dim must be a list of one dim per array ({len(xs)}), got "
                             f"{scatter_dim!r}")
        for i, (x, d) in enumerate(zip(xs, scatter_dim)):
            check_op_dtype(op, x.dtype, caller)
            dims.append(_norm_dim(d, x.ndim, f"{caller}: inputs[{i}]", "scatter_dim"))
        err = None
    except (TypeError, ValueError, NotImplementedError) as e:
        err = e
    _coalesced_agree(g, caller, err, xs, {"reduceOp": op, "scatter_dim": dims})
    out = [None] * len(xs)
    k, me = g.size, g.rank
    with debug.counted_as("reduce_scatter_tensor", caller):
        for dt, idx in _by_dtype(xs):
            lead = {i: _leading(xs[i], dims[i]) for i in idx}
            sizes = {i: chunk_sizes(lead[i].shape[0], k) for i in idx}
            inner = {i: math.prod(lead[i].shape[1:]) for i in idx}
            counts = [sum(sizes[i][r] * inner[i] for i in idx) for r in range(k)]
            send = _empty(xs[idx[0]], (sum(counts),))
            pos = 0
            for r in range(k):
                for i in idx:
                    off, n = sum(sizes[i][:r]), sizes[i][r]
                    if n:
                        send[pos:pos + n * inner[i]] = lead[i][off:off + n].reshape(-1)
                    pos += n * inner[i]
            red = reduce_scatter(send, op, 0, g, counts)
            pos = 0
            for i in idx:
                n = sizes[i][me] * inner[i]
                piece = red[pos:pos + n].reshape((sizes[i][me],) + tuple(lead[i].shape[1:]))
                out[i] = _restore(piece, dims[i])
                pos += n
    return out
