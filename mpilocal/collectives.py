"""The collectives mpilocal issues: the one caller of the transports.

Layer "collectives" (docs/architecture.md). Every array-data collective of the library
(:mod:`mpilocal.functional`, :mod:`mpilocal.redistribute`, :mod:`mpilocal.dtensor`, the neighbour
collectives, autograd's backward rules) goes through a function of this module, which hands flat
contiguous buffers to the transport that :func:`~mpilocal.transport.select.transport_for` picks and,
around every call, does the three things each collective needs (:func:`issue`):

* accounting: :class:`~mpilocal.debug.CommDebugMode` counts one logical collective;
* deadline: the collective is in flight for the watchdog (``MPILOCAL_TIMEOUT``);
* fingerprints: under ``MPILOCAL_DEBUG=1`` the ranks first agree that they issue the same call.

The metadata exchanges (shape agreement, sizes, checksums; :mod:`mpilocal.metadata` holds the rows
and requests) are accounted here as well: :func:`post_shape_agreement`, :func:`post_meta_allgather`,
:func:`meta_allgather` and :func:`exchange_splits`.

Arguments are trusted: sizes, dims and ops were checked (and agreed) by the caller. There is no
rooted gather or reduce here: the transports have none, so reductions are all-reduces (a rooted
result, e.g. the backward of ``broadcast``, keeps the root's copy) and gathers all-gathers.
"""

from __future__ import annotations

import math

import numpy as np

from . import _arrays, _pool, deadline, debug, metadata
from . import agreement  # noqa: F401  (registers the fingerprint check that deadline.begin runs)
from .metadata import META_WIDTH, MetaFuture
from .names import COLLECTIVES
from .transport import Group, group_for
from .transport.select import transport_for

__all__ = ["issue", "empty", "contiguous", "leading", "restore", "all_gather", "all_reduce", "reduce_scatter",
           "all_to_all_dims", "all_to_all_rows", "bcast", "scatter", "sendrecv", "prepared_sendrecv",
           "post_shape_agreement",
           "prepared", "prepared_all_gather", "prepared_all_reduce", "prepared_reduce_scatter", "all_gather_looped",
           "all_reduce_looped", "reduce_scatter_looped",
           "post_meta_allgather", "meta_allgather", "exchange_splits"]


def issue(name: str, send, g: Group, note=None, **detail):
    """Account one logical collective. Every array-data collective calls this exactly once, just
    before handing buffers to the transport: ``send`` is this rank's send buffer (or None),
    ``detail`` names what must agree across ranks (reduce op, root, dims, sizes); ``note``, the
    ``(reduce op, placements)`` the flight recorder keeps outside debug mode (docs/failures.md).

    Use as ``with issue(...): transport call`` — the context marks the collective in flight for
    the deadline watchdog (mpilocal.deadline), which also checks fingerprints under MPILOCAL_DEBUG=1."""
    if debug.ACTIVE:
        debug.record(name, 0 if send is None else send.nbytes)
    return deadline.begin(name, g, send, detail, note)  # in-flight slot / fingerprint / flight recorder


def _moved(placements):
    """The flight recorder's note of a collective that moves data without a reduction."""
    return None if placements is None else (None, placements)


# ------------------------------------------------------------------------------------------------
# internal collectives with known sizes (used by redistribute and the public functions)
# ------------------------------------------------------------------------------------------------
def empty(like, shape, dtype=None):
    """An output buffer of ``like``'s kind: NumPy ones from the recycling pool (warm pages for
    large results), CuPy ones from CuPy's own memory pool."""
    if type(like) is np.ndarray:
        return _pool.empty(shape, like.dtype if dtype is None else dtype)
    return _arrays.namespace(like).empty(shape, dtype=like.dtype if dtype is None else dtype)


def contiguous(x):
    """``x`` itself when C-contiguous, else a C-contiguous copy (in a pooled buffer for NumPy)."""
    if x.flags.c_contiguous:
        return x
    out = empty(x, x.shape)
    out[...] = x
    return out


def leading(x, dim):
    """``x`` with ``dim`` moved to axis 0, C-contiguous (a view when it already is)."""
    if dim != 0:
        x = _arrays.namespace(x).moveaxis(x, dim, 0)
    return contiguous(x)


def restore(y, dim):
    if dim == 0:
        return y
    return contiguous(_arrays.namespace(y).moveaxis(y, 0, dim))


def _flat(a):
    """``a`` as a flat array (a view of C-contiguous ``a``; ``a`` itself when already 1-D)."""
    return a if a.ndim == 1 else a.reshape(-1)


_NO_DETAIL: dict = {}  # the detail outside debug mode: only fingerprints (MPILOCAL_DEBUG=1) read it


def _detail(detail, placements):
    if placements is not None:
        detail["placements"] = placements
    return detail


def all_gather(x, dim: int, g: Group, sizes, placements=None):
    """All-gather ``x`` along ``dim``; rank r contributes ``sizes[r]`` rows along ``dim``.
    ``placements`` (optional, e.g. ``(src, dst)`` of a redistribute) joins the debug fingerprint."""
    send = leading(x, dim)
    tail = send.shape[1:]
    inner = math.prod(tail)
    total = sum(sizes)
    recv = empty(x, (total * inner,))  # flat: the transport's buffer; shaped once below
    detail = _detail(dict(dim=dim, sizes=tuple(sizes)), placements) if deadline.DEBUG else _NO_DETAIL
    with issue(COLLECTIVES["all_gather"], send, g, _moved(placements), **detail):
        transport_for(x, "all_gather").allgatherv(_flat(send), recv, [s * inner for s in sizes], g)
    return restore(recv if not tail else recv.reshape((total,) + tail), dim)


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
    m = empty(b, b.shape)  # pooled: a fresh large temporary costs page faults on every call
    xp.right_shift(b, 8 * b.dtype.itemsize - 1, out=m)  # -1 for negative floats, 0 otherwise
    m &= np.iinfo(b.dtype).max
    b ^= m
    return b


def _float_keys(send, op):
    """Integer keys of the contiguous float buffer ``send`` for a NaN-propagating ``op`` (max/min).
    Cost: about six elementwise passes here and three in :func:`_from_keys`, no extra collective."""
    xp = _arrays.namespace(send)
    b = send.view(_KEY_INT[send.dtype.itemsize])
    k = empty(b, b.shape)
    xp.right_shift(b, 8 * b.dtype.itemsize - 1, out=k)  # as _keys_inplace, without a copy of the input
    k &= np.iinfo(b.dtype).max
    k ^= b
    nan = empty(send, send.shape, np.bool_)
    xp.isnan(send, out=nan)
    xp.putmask(k, nan, _nan_key(send.dtype, op))
    return k


def _from_keys(k, dtype, op):
    out = _keys_inplace(k).view(dtype)
    if op == "min":  # the NaN key maps back to a negative NaN: give NumPy's default NaN
        xp = _arrays.namespace(out)
        nan = empty(out, out.shape, np.bool_)
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
        return contiguous(x), "sum", _divide
    if kind == "f" and op in ("max", "min"):
        send = contiguous(x)
        if dt.itemsize in _KEY_INT:
            return _float_keys(send, op), op, lambda r, g: _from_keys(r, dt, op)
        return send, "gather:" + op, None  # long double: gather and reduce in rank order
    return contiguous(x), op, None


def _divide(r, g):
    r /= g.size
    return r


def _avg_narrow(r, g, dt):
    r /= g.size
    return r.astype(dt)


def _gather_reduce(send, op, g, kind):
    """Every rank's ``send`` (flat) reduced with ``op`` in rank order (NumPy's own ufunc)."""
    k, n = g.size, send.size
    buf = empty(send, (k * n,))
    transport_for(send, kind).allgatherv(send.reshape(-1), buf, [n] * k, g)
    f = {"max": _arrays.namespace(send).maximum, "min": _arrays.namespace(send).minimum}[op]
    return f.reduce(buf.reshape(k, n), axis=0)


def all_reduce(x, op: str, g: Group, placements=None):
    """All-reduce ``x`` with ``op`` (``avg`` divides the sum by the group size). The result has
    ``x``'s dtype in native byte order."""
    send, top, finish = _reduce_input(x, op)
    detail = _detail(dict(op=op), placements) if deadline.DEBUG else _NO_DETAIL
    with issue(COLLECTIVES["all_reduce"], send, g, (op, placements), **detail):
        if top.startswith("gather:"):
            return _gather_reduce(send, top[7:], g, "all_gather").reshape(x.shape)
        recv = empty(send, (send.size,))  # flat: the transport's buffer; shaped once below
        transport_for(x, "all_reduce").allreduce(_flat(send), recv, top, g)
    if finish is not None:
        recv = finish(recv, g)
    return recv if x.ndim == 1 else recv.reshape(x.shape)


def reduce_scatter(x, op: str, dim: int, g: Group, sizes, placements=None):
    """Reduce ``x`` and give rank r its ``sizes[r]`` rows along ``dim``."""
    send, top, finish = _reduce_input(leading(x, dim), op)
    inner = math.prod(send.shape[1:])
    counts = [s * inner for s in sizes]
    detail = _detail(dict(op=op, dim=dim, sizes=tuple(sizes)), placements) if deadline.DEBUG else _NO_DETAIL
    with issue(COLLECTIVES["reduce_scatter"], send, g, (op, placements), **detail):
        if top.startswith("gather:"):
            off = sum(counts[:g.rank])
            full = _gather_reduce(send, top[7:], g, "all_gather")
            recv = full[off:off + counts[g.rank]].reshape((sizes[g.rank],) + send.shape[1:]).copy()
            return restore(recv, dim)
        recv = empty(send, (counts[g.rank],))  # flat: the transport's buffer; shaped once below
        transport_for(x, "reduce_scatter").reduce_scatterv(_flat(send), recv, counts, top, g)
    if finish is not None:
        recv = finish(recv, g)
    return restore(recv if send.ndim == 1 else recv.reshape((sizes[g.rank],) + send.shape[1:]), dim)


# -- prepared collectives: the steps of a compiled redistribute (mpilocal.redistribute) ----------
# A loop of redistributes calls one step again and again on arrays of one shape, dtype and kind. Its
# first call runs the collective above; then, where the transport offers the call prepared (NCCL:
# mpilocal.transport.nccl, ``*_fn``) and the collective is that one call on the arrays themselves
# (dim 0, equal sizes, a reduction _reduce_input leaves as it is), later calls allocate the result in
# its shape and hand the transport the two arrays: no flat views, shape arithmetic or lookups per
# call. Anything else (another shape, a strided input, MPILOCAL_DEBUG=1, which fingerprints the
# transport's call) takes the collective above. docs/architecture.md, "A loop of the same redistribute".
def prepared(generic, prepare):
    """``f(y)``: ``generic(y)``, then (from the second call) ``fast(y)`` where ``prepare(y)`` (called
    once, after the first call, with its input) gave ``(fast, shape)`` and ``y`` has that shape and
    is C-contiguous outside debug mode. ``f.state[0]``: None before the first call, then that
    ``(fast, shape)``, or False where ``prepare`` gave none."""
    state = [None]

    def f(y):
        st = state[0]
        if st is not None and st is not False and y.shape == st[1] and not deadline.DEBUG and y.flags.c_contiguous:
            return st[0](y)
        out = generic(y)
        if st is None:
            state[0] = prepare(y) or False
        return out

    f.state = state
    return f


def _fast(name, g, out_shape, run, note):
    def fast(y):
        recv = type(y)(out_shape, y.dtype)
        with issue(name, y, g, note):
            run(y, recv)
        return recv

    return fast


def prepared_all_gather(dim: int, g: Group, sizes, placements=None):
    """:func:`all_gather` of one shape, prepared (see above)."""
    def prepare(x):
        fn = getattr(transport_for(x, "all_gather"), "allgather_fn", None)
        if fn is None or dim != 0 or not x.size or len(set(sizes)) != 1 or not x.flags.c_contiguous:
            return None
        return _fast(COLLECTIVES["all_gather"], g, (sum(sizes),) + x.shape[1:], fn(x.nbytes, g),
                     _moved(placements)), x.shape

    return prepared(lambda y: all_gather(y, dim, g, sizes, placements), prepare)


def _direct(x, op):
    """Whether the reduction of ``x`` by ``op`` is the transport's on ``x`` itself (no conversion,
    keys or division: the one rule of _reduce_input)."""
    send, top, finish = _reduce_input(x, op)
    return send is x and top == op and finish is None


def prepared_all_reduce(op: str, g: Group, placements=None):
    """:func:`all_reduce` of one shape, prepared (see above)."""
    def prepare(x):
        fn = getattr(transport_for(x, "all_reduce"), "allreduce_fn", None)
        run = fn(x.size, x.dtype, op, g) if fn is not None and x.size and _direct(x, op) else None
        return None if run is None else (_fast(COLLECTIVES["all_reduce"], g, x.shape, run, (op, placements)), x.shape)

    return prepared(lambda y: all_reduce(y, op, g, placements), prepare)


def prepared_reduce_scatter(op: str, dim: int, g: Group, sizes, placements=None):
    """:func:`reduce_scatter` of one shape, prepared (see above)."""
    def prepare(x):
        fn = getattr(transport_for(x, "reduce_scatter"), "reduce_scatter_fn", None)
        if fn is None or dim != 0 or not x.size or len(set(sizes)) != 1 or not _direct(x, op):
            return None
        inner = math.prod(x.shape[1:])
        run = fn(sizes[0] * inner, x.dtype, op, g)
        return None if run is None else (_fast(COLLECTIVES["reduce_scatter"], g, (sizes[g.rank],) + x.shape[1:], run,
                                                (op, placements)), x.shape)

    return prepared(lambda y: reduce_scatter(y, op, dim, g, sizes, placements), prepare)


_LOOPED = "mpilocal.looped"  # Group.cache: key -> prepared collective of the public calls on that group


def _looped(g: Group, key, make):
    d = g.cache.get(_LOOPED)
    if d is None:
        d = g.cache[_LOOPED] = {}
    f = d.get(key)
    if f is None:
        if len(d) >= 64:
            d.clear()
        f = d[key] = make()
    return f


def all_gather_looped(x, dim: int, g: Group, sizes):
    """:func:`all_gather` for the public collectives: device arrays take the prepared collective of
    their (shape, dtype, dim, sizes) on ``g`` (see :func:`prepared`), NumPy ones the generic one."""
    if type(x) is np.ndarray:
        return all_gather(x, dim, g, sizes)
    sizes = tuple(sizes)
    return _looped(g, ("all_gather", x.shape, x.dtype, dim, sizes), lambda: prepared_all_gather(dim, g, sizes))(x)


def all_reduce_looped(x, op: str, g: Group):
    """:func:`all_reduce` for the public collectives (as :func:`all_gather_looped`)."""
    if type(x) is np.ndarray:
        return all_reduce(x, op, g)
    return _looped(g, ("all_reduce", x.shape, x.dtype, op), lambda: prepared_all_reduce(op, g))(x)


def reduce_scatter_looped(x, op: str, dim: int, g: Group, sizes):
    """:func:`reduce_scatter` for the public collectives (as :func:`all_gather_looped`)."""
    if type(x) is np.ndarray:
        return reduce_scatter(x, op, dim, g, sizes)
    sizes = tuple(sizes)
    return _looped(g, ("reduce_scatter", x.shape, x.dtype, op, dim, sizes),
                   lambda: prepared_reduce_scatter(op, dim, g, sizes))(x)


def all_to_all_dims(x, src_dim: int, dst_dim: int, g: Group, src_sizes, dst_sizes, placements=None):
    """Shard(src_dim) -> Shard(dst_dim) within ``g``: send piece p of ``dst_dim`` (``dst_sizes[p]``)
    to rank p, receive rank p's ``src_sizes[p]`` rows of ``src_dim`` and concatenate them.

    ``src_sizes``/``dst_sizes`` are every rank's sizes (the same on every rank), so rank r sends
    ``src_sizes[r] * dst_sizes[p] * other`` elements to rank p: the count matrix is uniform iff
    its smallest and largest entries agree, which every rank computes alike.

    NumPy arrays go through the host transport's ``alltoall_dims``: the pieces are MPI derived
    datatypes over ``x`` and the result (no pack copy in Python, no moveaxis copies)."""
    t = transport_for(x, "all_to_all")
    by_types = getattr(t, "alltoall_dims", None)
    if by_types is not None:
        send = contiguous(x)
        shape = list(x.shape)
        shape[src_dim] = sum(src_sizes)
        shape[dst_dim] = dst_sizes[g.rank]
        recv = empty(x, tuple(shape))
        detail = _detail(dict(src_dim=src_dim, dst_dim=dst_dim, src_sizes=tuple(src_sizes),
                              dst_sizes=tuple(dst_sizes)), placements) if deadline.DEBUG else _NO_DETAIL
        with issue(COLLECTIVES["all_to_all"], send, g, _moved(placements), **detail):
            by_types(send, recv, src_dim, dst_dim, src_sizes, dst_sizes, g)
        return recv
    xp = _arrays.namespace(x)
    xa = xp.moveaxis(x, src_dim, 0) if src_dim else x
    b = dst_dim + 1 if dst_dim < src_dim else dst_dim
    send = empty(x, (x.size,))
    per_row = x.size // x.shape[dst_dim] if x.shape[dst_dim] else 0
    pos, off, send_counts = 0, 0, []
    if _arrays.is_cupy(xa) and xa.flags.c_contiguous:  # GPU: each piece is one strided 2-D memcpy
        from .transport.gpu_common import pack_pieces

        send_counts = pack_pieces(xa, b, dst_sizes, send)
    rest = dst_sizes[len(send_counts):] if send_counts else dst_sizes
    for s in rest:
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
    recv = empty(x, (sum(src_sizes),) + tuple(rest))
    other = math.prod(n for i, n in enumerate(x.shape) if i != src_dim and i != dst_dim)
    uniform = other * min(src_sizes) * min(dst_sizes) == other * max(src_sizes) * max(dst_sizes)
    bound = other * max(max(src_sizes) * sum(dst_sizes), sum(src_sizes) * max(dst_sizes))
    detail = _detail(dict(src_dim=src_dim, dst_dim=dst_dim, src_sizes=tuple(src_sizes), dst_sizes=tuple(dst_sizes)),
                     placements)
    with issue(COLLECTIVES["all_to_all"], send, g, _moved(placements), **detail):
        transport_for(x, "all_to_all").alltoallv(send, send_counts, recv.reshape(-1), [s * inner for s in src_sizes], g,
                                                 uniform, bound)
    return restore(recv, dim=src_dim)


def bcast(x, root: int, g: Group, placements=None):
    """A copy of group rank ``root``'s ``x`` on every rank (``x`` gives shape and dtype elsewhere)."""
    buf = empty(x, x.shape)
    buf[...] = x
    with issue(COLLECTIVES["broadcast"], buf, g, **_detail(dict(root=root), placements)):
        transport_for(x, "broadcast").bcast(buf.reshape(-1), root, g)
    return buf


def scatter(pieces, like, shape, counts, root: int, g: Group):
    """Scatter: rank r receives ``pieces[r]`` (arrays given on ``root`` only; ``counts[r]`` elements,
    known everywhere) as an array of ``shape``."""
    recv = empty(like, shape)
    send = None
    if g.rank == root:
        send = empty(like, (sum(counts),))
        pos = 0
        for p in pieces:
            send[pos:pos + p.size].reshape(p.shape)[...] = p
            pos += p.size
    with issue(COLLECTIVES["scatter"], send, g, root=root, dtype=str(like.dtype), counts=tuple(counts)):
        transport_for(like, "scatter").scatterv(send, counts, recv.reshape(-1), root, g)
    return recv


def all_to_all_rows(x, send_rows, recv_rows, g: Group, uniform: bool, bound, **detail):
    """all_to_all_single's data movement: block p of ``x`` (``send_rows[p]`` rows along dim 0) to
    rank p, rank p's ``recv_rows[p]`` rows concatenated. ``uniform``/``bound``: the group-wide
    choice of MPI call (every rank passes the same; see :meth:`Transport.alltoallv`)."""
    send = contiguous(x)
    inner = math.prod(x.shape[1:])
    recv = empty(x, (sum(recv_rows),) + x.shape[1:])
    with issue(COLLECTIVES["all_to_all"], send, g, **detail):
        transport_for(x, "all_to_all").alltoallv(
            send.reshape(-1), [s * inner for s in send_rows], recv.reshape(-1), [s * inner for s in recv_rows], g,
            uniform, bound,
        )
    return recv


def sendrecv(name, like, sent, sends, recvs, g: Group, **detail):
    """One logical point-to-point collective ``name`` over ``g``: ``sends``/``recvs`` as
    :meth:`Transport.sendrecv` (flat contiguous buffers); ``sent``: what accounting and fingerprints
    read of the send side (``nbytes``, ``dtype``, ``shape``)."""
    with issue(name, sent, g, **detail):
        transport_for(like, "sendrecv").sendrecv(sends, recvs, g)


def prepared_sendrecv(name, like, sent, sends, recvs, g: Group, **detail):
    """:func:`sendrecv` of fixed messages, prepared: ``f(*arrays)`` issues them on the arrays'
    pointers (``sends`` / ``recvs``: ``[(group rank, slot, byte offset, nbytes)]`` in
    ``arrays[slot]``, messages to this rank itself included), or None where ``like``'s transport
    has no prepared send/recv (then :func:`sendrecv`). Made after a generic call of the same
    messages (the transport's communicator exists); callers keep :func:`sendrecv` under
    ``MPILOCAL_DEBUG=1``, which fingerprints the transport's call."""
    fn = getattr(transport_for(like, "sendrecv"), "sendrecv_fn", None)
    if fn is None:
        return None
    run = fn(sends, recvs, g)

    def fast(*arrays):
        with issue(name, sent, g, **detail):
            run(*arrays)

    return fast


# ------------------------------------------------------------------------------------------------
# metadata exchanges (rows and requests: mpilocal.metadata), accounted like the collectives
# ------------------------------------------------------------------------------------------------
def post_shape_agreement(mesh, vec) -> MetaFuture:
    """Start the shape agreement of a DTensor over ``mesh`` (collective, non-blocking): the SUM
    reduction of this rank's fixed-width uint64 vector ``vec`` (its fields: mpilocal.dtensor), the
    same size whatever the number of ranks (:func:`mpilocal.metadata.post_sum`; docs/scaling.md)."""
    g = group_for(mesh._metadata_comm())
    if debug.ACTIVE:
        debug.record_metadata("shape_agreement", vec.nbytes)
    with deadline.begin("metadata:shape_agreement", g, None):  # deadline / fingerprint
        return metadata.post_sum(g, vec)


def meta_diagnostics(g: Group, row: np.ndarray) -> np.ndarray:
    """Every rank's full metadata row, all-gathered (blocking) over ``g``'s diagnostics
    communicator: only after a fixed-size shape agreement found an error, to name it."""
    if debug.ACTIVE:
        debug.record_metadata("shape_diagnostics", row.nbytes)
    return metadata.diag_allgather(g, row)


def post_meta_allgather(comm, vec: np.ndarray, what: str) -> MetaFuture:
    """Start a non-blocking all-gather of ``vec`` over ``comm`` (collective); complete it later."""
    if debug.ACTIVE:
        debug.record_metadata(what, vec.nbytes)
    g = group_for(comm)
    if vec.size == META_WIDTH:
        ring = metadata.ring_of(g, create=True)
        if ring is not None:
            with deadline.begin("metadata:" + what, g, vec):  # deadline / fingerprint
                return ring.post(vec)
    with deadline.begin("metadata:" + what, g, vec):  # deadline / fingerprint
        return metadata.post_iallgather(comm, vec)


def meta_allgather(comm, vec: np.ndarray, what: str) -> np.ndarray:
    """Blocking all-gather of metadata vectors (collective over ``comm``)."""
    recv = np.empty((comm.Get_size(), vec.size), dtype=vec.dtype)
    if debug.ACTIVE:
        debug.record_metadata(what, vec.nbytes)
    with deadline.begin("metadata:" + what, group_for(comm), vec):  # deadline / fingerprint
        comm.Allgather(vec, recv)
    return recv


def exchange_splits(g: Group, counts) -> list:
    """Every rank's ``counts[me]``: the split sizes of all_to_all_single, exchanged as metadata (one
    small ``MPI_Alltoall`` over ``g``). **Collective.**"""
    counts = np.asarray(counts, dtype=np.int64)
    recv = np.empty_like(counts)
    if debug.ACTIVE:
        debug.record_metadata("split_agreement", counts.nbytes)
    with deadline.begin("metadata:split_agreement", g, counts):  # deadline / fingerprint
        g.comm.Alltoall(counts, recv)
    return recv.tolist()
