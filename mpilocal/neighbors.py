"""Neighbour collectives: halo exchange, permute (JAX's ``ppermute``), send_recv and shift.

Part of the funcol API: this module adds them to :mod:`mpilocal.functional` when it loads
(``funcol.halo_exchange``, ``funcol.halo_update``, ``funcol.permute``, ``funcol.send_recv``,
``funcol.shift``); :func:`stencil` is ``mpilocal.stencil``. Layer "api", above ``dtensor`` and
``local_map`` (``halo_exchange`` takes DTensors, ``stencil`` is a ``local_map``), so functional
does not import it. Every function
here is **collective** over its group: all ranks of the group call it, even those that send or
receive nothing (the ends of a non-periodic line, ranks outside a permutation), so the deadline
watchdog, ``MPILOCAL_DEBUG=1`` fingerprints and :class:`~mpilocal.CommDebugMode` see one logical
collective per call on every rank, as for the other collectives. The messages themselves go
through the transport's point-to-point ``sendrecv`` (MPI ``Sendrecv``/``Isend``+``Irecv`` on the
host and for a CUDA-aware MPI, grouped NCCL send/recv on GPUs, host copies for ``staged``).
What a call works out from its arguments (checks, halo rows, peers, signature) is a plan cached
per Group and per everything it depends on (:func:`_cached`); the first call builds it through the
same code as every cache miss.

Halo rule (one tensor dim ``d`` sharded over one mesh dim of ``k`` ranks, width ``w``): the shard
of group rank ``r`` covers rows ``[o_r, o_r + n_r)`` of the global array ``A``; the result is

* ``boundary="periodic"``: ``np.pad(A, w, mode="wrap")[o_r : o_r + n_r + 2w]`` along ``d``;
* ``boundary=<number> c``: ``np.pad(A, w, mode="constant", constant_values=c)[o_r : o_r + n_r + 2w]``;
* ``boundary="none"``: ``A[max(o_r - w, 0) : min(o_r + n_r + w, N)]`` — no padding at the global
  edges, so the first and last shards are ``w`` rows shorter on their outer side.

A halo comes from the adjacent shard alone: every shard that sends must hold at least ``w`` rows,
else every rank raises the same ``ValueError`` (the sizes are global metadata). Several dims at
once (``tensor_dim=(0, 1)``) are exchanged one after the other, the second exchange including the
first's halos, so corners come from the diagonal neighbours. Everything here is differentiable on
:class:`~mpilocal.autograd.Tracked` arrays (``mpilocal.autograd.neighbors`` registers the rules in
:data:`AUTOGRAD` when imported): the adjoint of a
halo exchange sends the halo gradients back and adds them to the rows they came from; that of a
permutation is the inverse permutation.
"""

from __future__ import annotations

import math
import numbers
import sys
import zlib

import numpy as np

from . import _arrays, agreement, collectives, functional
from .dtensor import DTensor
from .functional import resolve_group
from .layout import local_shape_and_offset
from .local_map import local_map
from .metadata import check_same, meta_vector
from .transport import group_for

__all__ = ["halo_exchange", "halo_update", "permute", "send_recv", "shift", "stencil", "shard_rows"]

#: Autograd's rules, registered by :mod:`mpilocal.autograd.neighbors` when it is imported (as
#: ``engine.ADDERS``): ``"Tracked"`` (the type of tracked local arrays), ``"halo"``, ``"permute"``.
AUTOGRAD: dict = {}


def _is_tracked(x) -> bool:
    return type(x) is AUTOGRAD.get("Tracked")


def _data(x):
    """The plain array of ``x`` (a tracked one's data)."""
    return x.data if _is_tracked(x) else x


# ------------------------------------------------------------------------------------------------
# plans: what a call works out from its arguments, once per group and arguments
# ------------------------------------------------------------------------------------------------
_PLANS = "mpilocal.neighbors"
_MAX_PLANS = 512


def _plans(g) -> dict:
    """The plan cache of Group ``g`` (dropped with the group; emptied when it holds ``_MAX_PLANS``)."""
    c = g.cache.get(_PLANS)
    if c is None or len(c) >= _MAX_PLANS:
        c = g.cache[_PLANS] = {}
    return c


def _k(v):
    """A cache key for an argument value: ints and strs as they are; anything else with its type (so
    ``True`` is not ``1`` and ``0`` is not ``0.0``) and its repr (so every NaN is the same key)."""
    t = type(v)
    return v if t is int or t is str else (t, repr(v))


def _mesh_plans(mesh) -> dict:
    """The plan cache of a DeviceMesh: its compiled-program cache (``_programs``, shared with
    redistribute, under other keys), which ``close()`` drops, so a closed mesh finds no plan and its
    error is raised by the build."""
    c = mesh.__dict__.get("_programs")
    if c is None or len(c) >= _MAX_PLANS:
        c = mesh.__dict__["_programs"] = {}
    return c


def _prepared(cache, key, generic, make, *args):
    """The call of ``key`` in ``cache`` (a plan's ``fast``; callers look it up first), made:
    :func:`collectives.prepared` of ``generic(y, *args)`` (the first call, and whatever the prepared
    call does not take) and ``make(y, *args)`` (the prepared call for arrays like ``y``, or None)."""
    def prepare(y):
        fn = make(y, *args)
        return None if fn is None else (fn, y.shape)

    f = cache[key] = collectives.prepared(lambda y: generic(y, *args), prepare)
    return f


def _cached(cache, key, build):
    """``build()`` once per ``key`` in the plan cache ``cache`` (:func:`_plans`, :func:`_mesh_plans`;
    every call, for an unhashable ``key``). A plan is only ever made by ``build``, on the first call
    as on a cache miss; what ``build`` raises is not cached."""
    try:
        p = cache.get(key)
    except TypeError:  # an unhashable argument: no cache (build checks, and rejects, it)
        return build()
    if p is None:
        p = cache[key] = build()
    return p


# ------------------------------------------------------------------------------------------------
# the one point-to-point collective everything here issues
# ------------------------------------------------------------------------------------------------
class _Sent:
    """What accounting and fingerprints read of a neighbour collective's send side."""

    __slots__ = ("nbytes", "dtype", "shape")

    def __init__(self, nbytes, dtype, shape):
        self.nbytes, self.dtype, self.shape = nbytes, dtype, shape


def _exchange(name, like, sends, recvs, g, detail, accumulate=False, flat=False):
    """One logical neighbour collective over Group ``g``. ``sends``: ``[(group rank, array)]``;
    ``recvs``: ``[(group rank, target view)]``, matched per pair of ranks in list order. Each target
    receives a copy of its message (``accumulate``: the message is added to it). Messages to this
    rank itself are local copies. Issued on every rank of ``g`` (when ``g`` has more than one
    rank), whether or not it has messages. ``detail``: what fingerprints compare (dict).
    ``flat``: every buffer is a 1-D C-contiguous view already (what the transports take)."""
    me = g.rank
    fs, fr, back = [], [], []
    mine = None
    for p, t in recvs:
        if p == me:  # a message to this rank itself (periodic on one rank, a pair (r, r))
            if mine is None:
                mine = iter([a for q, a in sends if q == me])
            if accumulate:
                t += next(mine)
            else:
                t[...] = next(mine)
        elif flat and not accumulate:
            fr.append((p, t))
        elif not accumulate and t.flags.c_contiguous:
            fr.append((p, t.reshape(-1)))  # straight into the target (a view)
        else:
            tmp = _arrays.namespace(like).empty(t.shape, dtype=t.dtype)
            fr.append((p, tmp.reshape(-1)))
            back.append((t, tmp))
    if g.size == 1:
        return
    nbytes = 0
    for p, a in sends:
        if p != me:
            if not flat:
                if not a.flags.c_contiguous:
                    a = _arrays.namespace(a).ascontiguousarray(a)
                a = a.reshape(-1)
            nbytes += a.nbytes
            fs.append((p, a))
    collectives.sendrecv(name, like, _Sent(nbytes, like.dtype, like.shape), fs, fr, g, **detail)
    for t, tmp in back:
        if accumulate:
            t += tmp
        else:
            t[...] = tmp


# ------------------------------------------------------------------------------------------------
# halo exchange along one tensor dim
# ------------------------------------------------------------------------------------------------
def _boundary(b, caller):
    """``"periodic"``, ``"none"`` or a number (the constant at the global edges)."""
    if isinstance(b, str):
        if b in ("periodic", "none"):
            return b
        raise ValueError(f"{caller}: boundary {b!r} is not 'periodic', 'none' or a number (the value beyond the edges)")
    if isinstance(b, (numbers.Number, np.generic)) and not isinstance(b, (np.str_, np.bytes_)):
        return b
    raise TypeError(f"{caller}: boundary must be 'periodic', 'none' or a number, got {b!r} ({type(b).__name__})")


def _width(w, caller):
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
        raise ValueError(f"{caller}: width must be a non-negative int, got {w!r}")
    return int(w)


def _neighbours(r, k, periodic):
    left = (r - 1) % k if periodic or r > 0 else None
    right = (r + 1) % k if periodic or r < k - 1 else None
    return left, right


def _side_widths(r, k, w, bnd):
    """(left, right, halo rows on the left, on the right) of group rank ``r`` of ``k``: a side has
    ``w`` halo rows when it has a neighbour or a constant boundary, none at a ``"none"`` edge."""
    periodic = bnd == "periodic"
    left, right = _neighbours(r, k, periodic)
    const = bnd != "none" and not periodic
    return left, right, (w if (left is not None or const) else 0), (w if (right is not None or const) else 0)


def _check_rows(sizes, w, k, periodic, d, caller, ranks=None):
    """Every shard that sends a halo holds at least ``w`` rows: ``sizes`` of group ranks ``ranks``
    (default: all, in order; the same verdict on every rank), or of this rank alone."""
    if w == 0 or sizes is None or (k == 1 and not periodic):
        return
    for i, n in zip(range(len(sizes)) if ranks is None else ranks, sizes):
        if n < w:
            raise ValueError(
                f"{caller}: the shard of group rank {i} holds {n} row(s) of tensor dim {d}, fewer than the halo "
                f"width {w} (shard sizes along the mesh dim: {list(sizes)}); a halo comes from the adjacent shard "
                f"alone. Use a smaller width, fewer ranks on this mesh dim, or redistribute to a layout whose "
                f"shards all hold at least {w} rows"
            )


def _sl(ndim, d, s):
    return (slice(None),) * d + (s,)


class _Halo:
    """One halo exchange of this rank worked out (:func:`_halo_plan`): along dim ``d`` over Group
    ``g``, width ``w``, boundary ``bnd``, for an interior of ``shape`` (``n`` rows along ``d``);
    ``padded``: the padded shape (``wl`` / ``wr`` halo rows); index tuples: ``inner`` (the interior
    in the padded array), ``send_x`` / ``send_p`` (``[(peer, rows)]`` of the interior alone / of
    the padded array), ``recv`` (``[(peer, halo rows)]``), ``const`` (halo rows set to ``bnd``),
    ``adj_send`` / ``adj_recv`` (the adjoint's, into the padded gradient / the interior one);
    ``detail`` / ``adj_detail``: what fingerprints compare. ``row``: elements per row along ``d``;
    where every dim before ``d`` has size 1 (``flat``), rows are runs of the flattened array and
    ``send_x_f`` / ``send_p_f`` / ``recv_f`` are the same messages as ``[(peer, start, stop)]``
    element ranges of it; ``outer``: the product of the dims
    before ``d`` (the rows of dim ``d`` are ``outer`` blocks, one run each where it is 1). ``fast``:
    the prepared in-place fill per (name, kind, dtype) (:func:`_fill_in_place`)."""

    __slots__ = ("g", "d", "w", "bnd", "shape", "n", "padded", "wl", "wr", "inner", "send_x", "send_p", "recv",
                 "const", "adj_send", "adj_recv", "detail", "adj_detail", "row", "flat", "send_x_f", "send_p_f",
                 "recv_f", "fast", "outer")


def _halo_plan(shape, d, g, w, bnd):
    """The :class:`_Halo` of a padded array of ``shape`` along ``d``: its interior is what the halo
    rows leave (ValueError when they do not fit). Plain arithmetic on arguments every rank checked:
    the one place that places halo rows."""
    left, right, wl, wr = _side_widths(g.rank, g.size, w, bnd)
    shape = list(shape)
    n = shape[d] - wl - wr
    if n < 0:
        raise ValueError(f"halo_update: dim {d} of size {shape[d]} cannot hold {wl} + {wr} halo rows")
    shape[d] = n
    p = _Halo()
    n = shape[d]
    p.g, p.d, p.w, p.bnd, p.shape, p.n, p.wl, p.wr = g, d, w, bnd, tuple(shape), n, wl, wr
    shape[d] += wl + wr
    p.padded = tuple(shape)
    nd = len(shape)

    def at(a, b):
        return _sl(nd, d, slice(a, b))

    p.inner = at(wl, wl + n)
    sx, sp, rv, cs, asd, arv = [], [], [], [], [], []
    if w:
        if left is not None:
            sx.append((left, at(0, w)))
            sp.append((left, at(wl, wl + w)))
        if right is not None:
            sx.append((right, at(n - w, n)))
            sp.append((right, at(wl + n - w, wl + n)))
            rv.append((right, at(wl + n, wl + n + w)))
            asd.append((right, at(wl + n, wl + n + w)))
        if left is not None:
            rv.append((left, at(0, w)))
            asd.append((left, at(0, w)))
            arv.append((left, at(0, w)))
        if right is not None:
            arv.append((right, at(n - w, n)))
        if bnd not in ("periodic", "none"):
            if left is None:
                cs.append(at(0, w))
            if right is None:
                cs.append(at(wl + n, wl + n + w))
    p.send_x, p.send_p, p.recv, p.const, p.adj_send, p.adj_recv = sx, sp, rv, cs, asd, arv
    p.row, p.outer = math.prod(shape[d + 1:]), math.prod(shape[:d])
    p.flat = p.outer == 1
    p.send_x_f = p.send_p_f = p.recv_f = None
    p.fast = {}
    if p.flat:  # the same rows as runs of the flattened array

        def runs(msgs):
            return [(q, idx[d].start * p.row, idx[d].stop * p.row) for q, idx in msgs]

        p.send_x_f, p.send_p_f, p.recv_f = runs(sx), runs(sp), runs(rv)
    p.detail = dict(dim=d, width=w, boundary=str(bnd))
    p.adj_detail = dict(p.detail, adjoint=True)
    return p


class _Chain:
    """Halos along one or more dims of one local array (:func:`_chain`): ``plans`` (one
    :class:`_Halo` per dim, each of the final padded array), ``padded`` (its shape), ``inner`` (the
    interior's index tuple in it), ``box``: the interior as ``(first element, pitch, width,
    height)`` of the padded array in elements (``height`` runs of ``width`` elements, ``pitch``
    apart: one 2-D copy from a C-contiguous interior), or None where it is not such a box;
    ``fast``: the prepared exchange into a new padded array per (name, kind, dtype) (:func:`halo`)."""

    __slots__ = ("plans", "padded", "inner", "box", "fast")


def _chain(shape, dims):
    """The :class:`_Chain` of halos along ``dims`` (``[(d, group, w, bnd)]``, distinct dims) of a
    local array of ``shape``: the dims are padded one after the other, each including the previous
    halos (so corners come from the diagonal neighbours: the nested ``np.pad``)."""
    padded = list(shape)
    for d, g, w, b in dims:
        padded[d] += sum(_side_widths(g.rank, g.size, w, b)[2:])
    c = _Chain()
    c.plans = [_halo_plan(tuple(padded), d, g, w, b) for d, g, w, b in dims]
    c.padded = tuple(padded)
    inner = [slice(None)] * len(padded)
    for p in c.plans:
        inner[p.d] = slice(p.wl, p.wl + p.n)
    c.inner = tuple(inner)
    c.box = _box(tuple(shape), c.padded, c.inner)
    c.fast = {}
    return c


def _box(shape, padded, inner):
    """The interior ``inner`` (of ``shape``) of a C-contiguous array of ``padded`` as one 2-D box
    (:class:`_Chain`), or None. It is one where at most two dims are padded and every dim before
    the first of two has size 1: then the rows of the merged dims before the last padded dim are
    evenly spaced in the padded array."""
    dims = [k for k in range(len(shape)) if padded[k] != shape[k]]
    if len(dims) > 2 or (len(dims) == 2 and math.prod(shape[:dims[0]]) != 1):
        return None
    last = dims[-1] if dims else 0
    tail = math.prod(shape[last + 1:])
    stride, first = 1, 0
    for k in range(len(shape) - 1, -1, -1):
        first += inner[k].indices(padded[k])[0] * stride
        stride *= padded[k]
    return first, padded[last] * tail, shape[last] * tail, math.prod(shape[:last])


def halo(x, c, name="halo_exchange"):
    """The padded local array of chain ``c`` (a :class:`_Chain` for ``x``'s shape; plain arrays,
    checks already done). **Collective** over each dim's group. One dim: the halos move from ``x``
    itself while the interior is copied (alongside, for large CuPy arrays); from the second call of
    a kind and dtype, through the prepared exchange where there is one (:func:`_new_halo_fn`).
    Several: the interior is copied once, then each dim's halos are filled in place from whole rows
    of the padded array, including the halos of the dims before it (and not yet valid cells of the
    dims after it, which those dims then overwrite)."""
    if len(c.plans) == 1:
        key = (name, type(x), x.dtype)
        return (c.fast.get(key) or _prepared(c.fast, key, _halo_one, _new_halo_fn, c, name))(x)
    out = collectives.empty(x, c.padded)
    _copy_into(out, x, c, overlap=False)()
    for p in c.plans:
        if p.w:
            _fill_in_place(out, p, name)
        else:
            for idx in p.const:
                out[idx] = p.bnd
    return out


def _halo_one(x, c, name):
    """:func:`halo` of a one-dim chain, generic: the halos move from ``x`` itself while the
    interior is copied (alongside, for large CuPy arrays)."""
    p = c.plans[0]
    out = collectives.empty(x, c.padded)  # NumPy: pooled warm pages (large halos: no page faults)
    join = _copy_into(out, x, c, overlap=p.w > 0 and p.g.size > 1)
    try:
        if p.w:
            _fill_halos(out, x, p, p.send_x, p.send_x_f, name)
    finally:
        join()
    return out


# ------------------------------------------------------------------------------------------------
# prepared exchanges: a plan's messages as byte ranges of the arrays, one transport call per call
# ------------------------------------------------------------------------------------------------
def _rows(sl, extent, p, it):
    """Rows ``sl`` (a slice of dim ``p.d``) of a C-contiguous array with ``extent`` rows along it
    (the other dims as plan ``p``'s arrays), as the 2-D byte region ``(offset, pitch, width,
    height)``: ``p.outer`` blocks of the rows' bytes, a whole row block apart."""
    rb = p.row * it
    return sl.start * rb, extent * rb, (sl.stop - sl.start) * rb, p.outer


def _messages(like, p, sends, src_slot, src_extent):
    """Plan ``p``'s messages for arrays like ``like`` as ``[(peer, slot, region)]`` (:func:`_rows`):
    the rows ``sends`` of slot ``src_slot`` (``src_extent`` rows along ``p.d``), and the receives
    into the padded array, slot 0."""
    it = like.itemsize
    return ([(q, src_slot, _rows(i[p.d], src_extent, p, it)) for q, i in sends],
            [(q, 0, _rows(i[p.d], p.padded[p.d], p, it)) for q, i in p.recv])


def _one_run(r) -> bool:
    """Whether 2-D region ``r`` is one run of bytes."""
    return r[3] == 1 or r[1] == r[2]


def _prepared_fill(like, p, sends, src_slot, src_extent, name, inner=None):
    """Plan ``p``'s halo messages for arrays like ``like`` (CuPy, C-contiguous) prepared as byte
    regions: ``f(out, [src])`` fills the halo rows of ``out`` (slot 0) from the rows ``sends``
    (``[(peer, index tuple)]``) of slot ``src_slot`` (``out`` itself, or the interior ``x`` at slot
    1, with ``src_extent`` rows along ``p.d``), the constant rows from a buffer of the boundary
    value (made here once, with the assignment of the generic path, so the same value), and
    ``inner`` (``(src slot, region, dst slot, region)``: the interior) into ``out``.

    Messages to other ranks go through the transport's prepared send/recv
    (:func:`collectives.prepared_sendrecv`; rows that are not one run of bytes through a staging
    buffer, packed and unpacked by 2-D copies), this rank's own as NCCL's copies inside the same
    group where they are runs, else as 2-D copies (``cudaMemcpy2DAsync``) on the current stream.
    None where there is no prepared path (NumPy; other ranks without a prepared send/recv)."""
    if type(like) is np.ndarray or not _arrays.is_cupy(like) or not p.w:
        return None
    g, it, xp = p.g, like.itemsize, _arrays.namespace(like)
    me, E = g.rank, p.padded[p.d]
    snd, rcv = _messages(like, p, sends, src_slot, src_extent)
    own = [(s, r) for q, s, r in snd if q == me]  # a periodic group of one rank: its own rows
    copies = [(s, r, 0, d) for (s, r), (_, _, d) in zip(own, [m for m in rcv if m[0] == me])]
    if inner is not None:
        copies.append(inner)
    fixed = []  # arrays made here, after the caller's slots
    if p.const:
        cb = xp.empty(p.w * p.row * p.outer, dtype=like.dtype)
        cb[...] = p.bnd
        xp.cuda.get_current_stream().synchronize()  # once: later calls may run on other streams
        fixed.append(cb)
        w = p.w * p.row * it
        copies += [(src_slot + 1, (0, w, w, p.outer), 0, _rows(i[p.d], E, p, it)) for i in p.const]
    stage = src_slot + 1 + len(fixed)  # the slot of the staging buffer
    ns, nr, packs, unpacks, local, at = [], [], [], [], [], 0
    for msgs, into, staged in ((snd, ns, packs), (rcv, nr, unpacks)):  # the other ranks' messages
        for q, s, r in msgs:
            if q == me or not r[2] * r[3]:
                continue
            if _one_run(r):
                into.append((q, s, r[0], r[2] * r[3]))
            else:  # through the staging buffer, at byte `at`
                staged.append((s, r, at))
                into.append((q, stage, at, r[2] * r[3]))
                at += r[2] * r[3]
    for s, r, ds, d in copies:
        if not r[2] * r[3]:
            continue
        if g.size > 1 and _one_run(r) and _one_run(d):  # inside the group (measured faster: docs/neighbors.md)
            ns.append((me, s, r[0], r[2] * r[3]))
            nr.append((me, ds, d[0], r[2] * r[3]))
        else:
            local.append((s, r, ds, d))
    run = None
    if ns or nr:
        nbytes = sum(b for q, _, _, b in ns if q != me)
        run = collectives.prepared_sendrecv(name, like, _Sent(nbytes, like.dtype, like.shape), ns, nr, g, **p.detail)
        if run is None:
            return None
    return _regions_fn(run, tuple(fixed), at, packs, local, unpacks)


def _regions_fn(run, fixed, stage_bytes, packs, local, unpacks):
    """``f(*arrays)``: the 2-D copies ``packs`` (into the staging buffer) and ``local``, the
    prepared send/recv ``run`` (or None) on ``arrays + fixed (+ the staging buffer)``, then the
    copies ``unpacks`` (out of the staging buffer); all on the current CuPy stream."""
    cp = sys.modules["cupy"]  # loaded: the arrays are CuPy arrays
    rt, cur = cp.cuda.runtime, cp.cuda.get_current_stream
    copy, kind = rt.memcpy2DAsync, rt.memcpyDeviceToDevice
    u8 = np.dtype(np.uint8)
    if not (packs or local or unpacks):
        if not fixed:
            return run
        return lambda *arrays: run(*arrays, *fixed)

    def f(*arrays):
        arrays = arrays + fixed
        if stage_bytes:
            arrays += (cp.empty(stage_bytes, dtype=u8),)
        ptr = [a.data.ptr for a in arrays]
        st = cur().ptr
        for s, (o, pitch, w, h), at in packs:
            copy(ptr[-1] + at, w, ptr[s] + o, pitch, w, h, kind, st)
        for s, (o, pitch, w, h), d, (do, dpitch, _, _) in local:
            copy(ptr[d] + do, dpitch, ptr[s] + o, pitch, w, h, kind, st)
        if run is not None:
            run(*arrays)
        for d, (o, pitch, w, h), at in unpacks:
            copy(ptr[d] + o, pitch, ptr[-1] + at, w, w, h, kind, st)

    return f


def _fill_in_place(a, p, name):
    """``_fill_halos(a, a, p, p.send_p, p.send_p_f, name)``: the halo rows of the padded ``a`` from
    the neighbours' rows of theirs; from the second call of a kind and dtype, through the prepared
    exchange where there is one (:func:`_prepared_fill`)."""
    key = (name, type(a), a.dtype)
    (p.fast.get(key) or _prepared(p.fast, key, _in_place_generic, _in_place_fn, p, name))(a)


def _in_place_generic(a, p, name):
    _fill_halos(a, a, p, p.send_p, p.send_p_f, name)


def _in_place_fn(a, p, name):
    """The prepared in-place fill of plan ``p`` for arrays like ``a``, or None."""
    if type(a) is np.ndarray:
        run = _host_prepared(a, p, p.send_p, 0, p.padded[p.d], name)
        return None if run is None else _with_consts(p, run)
    return _prepared_fill(a, p, p.send_p, 0, p.padded[p.d], name)


def _host_prepared(like, p, sends, src_slot, src_extent, name):
    """NumPy: plan ``p``'s messages to the other ranks (``sends``: ``[(peer, index tuple)]`` of
    slot ``src_slot``, with ``src_extent`` rows along ``p.d``; the receives into slot 0) through
    the host transport's prepared send/recv, where every message is one run of bytes; else None.
    Zero-byte messages stay: the host transport numbers a pair's messages (its tags) in order."""
    g = p.g
    if g.size == 1 or not p.w:
        return None
    ns, nr = _messages(like, p, sends, src_slot, src_extent)
    if not all(_one_run(r) for _, _, r in ns + nr):
        return None
    nbytes = sum(r[2] * r[3] for _, _, r in ns)
    return collectives.prepared_sendrecv(name, like, _Sent(nbytes, like.dtype, like.shape),
                                         [(q, s, r[0], r[2] * r[3]) for q, s, r in ns],
                                         [(q, s, r[0], r[2] * r[3]) for q, s, r in nr], g, **p.detail)


def _with_consts(p, run):
    """``run`` after setting plan ``p``'s constant rows of its first argument (NumPy)."""
    const, bnd = p.const, p.bnd
    if not const:
        return run

    def f(a, *rest):
        for idx in const:
            a[idx] = bnd
        run(a, *rest)

    return f


def _new_halo_fn(x, c, name):
    """The prepared :func:`halo` of one-dim chain ``c`` for arrays like ``x``: a new padded array,
    filled by :func:`_prepared_fill` (the interior too, where it is a box of it), or None."""
    p = c.plans[0]
    if type(x) is np.ndarray:
        run = _host_prepared(x, p, p.send_x, 1, p.n, name)
        if run is None:
            return None
        run, shape, inner = _with_consts(p, run), c.padded, c.inner

        def f(x):
            out = collectives.empty(x, shape)
            out[inner] = x
            run(out, x)
            return out

        return f
    if c.box is None:
        return None
    it = x.itemsize
    o, pitch, w, h = c.box
    inner = (1, (0, w * it, w * it, h), 0, (o * it, pitch * it, w * it, h))
    run = _prepared_fill(x, p, p.send_x, 1, p.n, name, inner)
    if run is None:
        return None
    new, shape, dt = type(x), c.padded, x.dtype

    def f(x):
        out = new(shape, dt)
        run(out, x)
        return out

    return f


#: CuPy interiors from this size on are copied on a side stream, overlapping the halo exchange
OVERLAP_BYTES = 1 << 20
_SIDE: dict = {}  # CUDA device id -> the side stream


def _joined():
    return None


def _copy_into(out, x, c, overlap):
    """``out[c.inner] = x`` for a new padded ``out`` (chain ``c``); returns what completes it (call
    it before ``out`` is used). CuPy: one device-to-device ``cudaMemcpy2DAsync`` where the interior
    is a box of ``out`` (``c.box``, ``x`` C-contiguous), else the copy kernel; with ``overlap``
    (an exchange on the current stream follows, into other rows of ``out``), an ``x`` of at least
    :data:`OVERLAP_BYTES` is copied on a side stream: after the current stream's work so far,
    concurrent with what is enqueued next, and the current stream waits for it at the join, so a
    new padded array costs about the larger of the copy and the exchange, not their sum."""
    if type(x) is np.ndarray or not _arrays.is_cupy(x):
        out[c.inner] = x
        return _joined
    cp = sys.modules["cupy"]  # loaded: x is a CuPy array
    cur = stream = cp.cuda.get_current_stream()
    if overlap and x.nbytes >= OVERLAP_BYTES:
        dev = cp.cuda.Device().id
        stream = _SIDE.get(dev)
        if stream is None:
            stream = _SIDE[dev] = cp.cuda.Stream(non_blocking=True)
        stream.wait_event(cur.record())
    if c.box is not None and x.flags.c_contiguous:
        if x.nbytes:
            rt, it = cp.cuda.runtime, x.itemsize
            o, pitch, w, h = c.box
            rt.memcpy2DAsync(out.data.ptr + o * it, pitch * it, x.data.ptr, w * it, w * it, h,
                             rt.memcpyDeviceToDevice, stream.ptr)
    elif stream is cur:
        out[c.inner] = x
    else:
        with stream:
            out[c.inner] = x
    if stream is cur:
        return _joined
    done = stream.record()
    return lambda: cur.wait_event(done)


def _fill_halos(out, src, p, sends, sends_f, name):
    """Fill the halo rows of the padded ``out`` from the neighbours' edge rows of ``src`` (the
    interior alone with ``p.send_x`` / ``p.send_x_f``, or ``out`` itself with ``p.send_p`` /
    ``p.send_p_f``); constants at the edges. Where the rows are runs of the flattened arrays
    (``p.flat``, C-contiguous arrays) the messages are slices of one flat view of each."""
    for idx in p.const:
        out[idx] = p.bnd
    if sends_f is not None and out.flags.c_contiguous and (src is out or src.flags.c_contiguous):
        fo = out.reshape(-1)
        fs = fo if src is out else src.reshape(-1)
        _exchange(name, src, [(q, fs[a:b]) for q, a, b in sends_f], [(q, fo[a:b]) for q, a, b in p.recv_f], p.g,
                  p.detail, flat=True)
    else:
        _exchange(name, src, [(q, src[i]) for q, i in sends], [(q, out[i]) for q, i in p.recv], p.g, p.detail)


def halo_adjoint(gy, c, name="halo_exchange"):
    """The adjoint of :func:`halo` (chain ``c``): the interior of ``gy`` plus the halo gradients
    sent back to (and added into) the rows they came from; constant halos get no gradient.
    Several dims: in reverse order, each dim's halo gradients (whole rows, as in the forward) go
    back into the padded gradient's rows they came from, then count no more (zeroed: the forward
    overwrote what earlier dims had put there). **Collective.**"""
    if len(c.plans) == 1:
        p = c.plans[0]
        gx = gy[c.inner].copy()  # C order (NumPy and CuPy), one copy
        if p.w:  # the forward's messages reversed, in the forward's order per pair
            _exchange(name, gy, [(q, gy[i]) for q, i in p.adj_send], [(q, gx[i]) for q, i in p.adj_recv], p.g,
                      p.adj_detail, accumulate=True)
        return gx
    G = gy.copy()
    for p in reversed(c.plans):
        if p.w:
            _exchange(name, G, [(q, G[i]) for q, i in p.adj_send], [(q, G[i]) for q, i in p.send_p], p.g,
                      p.adj_detail, accumulate=True)
            for _, i in p.adj_send:
                G[i] = 0
        for i in p.const:
            G[i] = 0
    return G[c.inner].copy()


def _halo_any(x, c):
    if _is_tracked(x):
        return AUTOGRAD["halo"](x, c)
    return halo(x, c)


class _Call:
    """A local-array call's checked arguments (cached per group and arguments): ``plan`` (a
    :class:`_Halo` or :class:`_Perm`), ``params`` (what the full agreement compares), ``desc`` (the
    signature's text: None where only every rank's metadata can judge this rank's arguments, e.g.
    a shard narrower than the halo), ``d`` (the tensor dim whose size may differ between ranks)."""

    __slots__ = ("plan", "params", "desc", "d", "chain")

    def __init__(self, plan, params, desc, d=None, chain=None):
        self.plan, self.params, self.desc, self.d, self.chain = plan, params, desc, d, chain


def _halo_call(data, g, tensor_dim, width, boundary, caller, padded):
    """The local checks of a halo call on a local array (``padded``: halo_update's padded array)
    and its plan, cached per (group, caller, kind, dtype, shape, tensor_dim, width, boundary): the
    checks' verdict depends on nothing else. Raises what the checks raise."""
    _arrays.require_array(data, caller)

    def build():
        if data.ndim == 0:
            raise ValueError(f"{caller}: a 0-d array has no dim to exchange halos along")
        d = functional.norm_dim(tensor_dim, data.ndim, caller, "tensor_dim")
        w, bnd = _width(width, caller), _boundary(boundary, caller)
        if padded:
            chain = None
            p = _halo_plan(data.shape, d, g, w, bnd)
        else:
            chain = _chain(data.shape, [(d, g, w, bnd)])
            p = chain.plans[0]
        desc = None
        if not (p.n < w and (g.size > 1 or bnd == "periodic")):  # the signature leaves out this rank's size
            shape = data.shape[:d] + (-1,) + data.shape[d + 1:]
            desc = repr((caller, type(data), str(data.dtype), shape, d, w, repr(bnd)))
        return _Call(p, dict(tensor_dim=d, width=w, boundary=bnd), desc, d, chain)

    return _cached(_plans(g), (caller, type(data), data.dtype, data.shape, _k(tensor_dim), _k(width), _k(boundary)),
                   build)


def _checked_halo(x, data, g, caller, err, call, sizes_from, run_plan):
    """Run a halo call on a local array under the argument check of the public collectives
    (:func:`functional.checked`: the speculative signature by default). The signature holds
    everything but this rank's own size along the halo dim (shard sizes may differ); a shard
    narrower than the halo makes this rank take the full agreement, whose rows give every shard's
    size (``sizes_from(rows)``), so every rank raises the same error (:func:`_check_rows`). Without
    rows (the agreed fast path, or ``MPILOCAL_CHECK_ARGS=0``) this rank checks its own shard."""

    def run(a, rows):
        p = call.plan
        if rows is not None:
            _check_rows(sizes_from(rows), p.w, p.g.size, p.bnd == "periodic", p.d, caller)
        elif p.n < p.w:  # no rows: only ever with MPILOCAL_CHECK_ARGS=0 (or one rank)
            _check_rows([p.n], p.w, p.g.size, p.bnd == "periodic", p.d, caller, [p.g.rank])
        return run_plan(a, p)

    if err is not None:
        return functional.checked(g, caller, err, data, None, None, run)
    return functional.checked(g, caller, None, data, call.params, call.desc, run, skip_dim=call.d)


def halo_update(padded, group, tensor_dim, width, boundary="periodic"):
    """Refresh, in place, the halo rows of a padded local array (as :func:`halo_exchange` returns
    it: ``width`` halo rows on each side of ``tensor_dim``, none on the outer side of the edge
    shards with ``"none"``) from the neighbours' current edge rows; returns ``padded``.
    **Collective** over ``group`` (a 1-D mesh, ``(mesh, dim)`` or a communicator).

    Only the halo rows move (no new array, no interior copy): the hand-written MPI pattern of one
    persistent padded array per rank, for time-stepping loops. Not differentiable (it writes into
    its argument). Counted as one ``"halo_exchange"``.

    Example:
        >>> P = funcol.halo_exchange(U, 0, 0, 1, 0.0)          # once: the padded local array
        >>> for _ in range(steps):
        ...     P[1:-1] = step(P)                                # update the interior
        ...     funcol.halo_update(P, (mesh, 0), 0, 1, 0.0)     # refresh the halos in place
    """
    caller = "halo_update"
    if _is_tracked(padded):
        raise NotImplementedError(f"{caller}: writes into its argument, so it is not differentiable; use "
                                  f"halo_exchange (a new padded array) on arrays that require grad")
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict (and shapes/parameters) are agreed so every rank raises
        call, err = _halo_call(padded, g, tensor_dim, width, boundary, caller, True), None
    except (TypeError, ValueError) as e:
        call, err = None, e

    def sizes_from(rows):  # every rank's interior size, from its padded size and position
        p = call.plan
        k = p.g.size
        return [int(rows[r][2 + p.d]) - sum(_side_widths(r, k, p.w, p.bnd)[2:]) for r in range(k)]

    def run_plan(a, p):  # in a replay `a` is a scratch copy, not `padded`
        if p.w:
            _fill_in_place(a, p, "halo_exchange")
        return a

    return _checked_halo(padded, padded, g, caller, err, call, sizes_from, run_plan)


def shard_rows(global_shape, mesh, placements, mesh_dim: int, tensor_dim: int) -> tuple:
    """Sizes along ``tensor_dim`` of the shards of the group along ``mesh_dim`` that holds this
    rank (in group-rank order): pure layout arithmetic, the same on every rank of the group."""
    coord = list(mesh._coordinate)
    out = []
    for c in range(mesh.mesh.shape[mesh_dim]):
        coord[mesh_dim] = c
        out.append(local_shape_and_offset(global_shape, mesh.mesh.shape, placements, tuple(coord))[0][tensor_dim])
    return tuple(out)


def _as_list(v, n, what, caller):
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{caller}: {what} has {len(v)} entries for {n} tensor dims; give one per tensor dim")
        return list(v)
    return [v] * n


def _halo_lists(x, mesh_dim, tensor_dim, width, boundary, caller):
    """The per-tensor-dim lists (mesh dims or groups, tensor dims, widths, boundaries) of a call."""
    multi = isinstance(tensor_dim, (list, tuple))
    tdims = list(tensor_dim) if multi else [tensor_dim]
    if type(x) is DTensor:
        mdims = _as_list(mesh_dim, len(tdims), "mesh_dim", caller) if multi else [mesh_dim]
    elif multi:
        if not isinstance(mesh_dim, list) or len(mesh_dim) != len(tdims):
            raise TypeError(f"{caller}: for a local array and several tensor dims, mesh_dim must be a list of "
                            f"groups, one per tensor dim (e.g. [(mesh, 0), (mesh, 1)]), got {mesh_dim!r}")
        mdims = mesh_dim
    else:
        mdims = [mesh_dim]
    widths = _as_list(width, len(tdims), "width", caller)
    bnds = _as_list(boundary, len(tdims), "boundary", caller) if multi else [boundary]
    return mdims, tdims, widths, bnds


def halo_exchange(x, mesh_dim, tensor_dim, width, boundary="periodic"):
    """This rank's shard padded with its neighbours' boundary rows along ``tensor_dim``. **Collective.**

    Args:
        x: a DTensor sharded with ``Shard(tensor_dim)`` on ``mesh_dim`` (result: this rank's local
            array, padded), or a local NumPy/CuPy array (also a Tracked one inside ``local_map``),
            then ``mesh_dim`` names the group as for the other funcol functions: a 1-D DeviceMesh,
            a ``(mesh, mesh_dim)`` pair or a communicator, whose ranks hold consecutive shards.
        mesh_dim, tensor_dim, width, boundary: one each, or sequences (one entry per tensor dim;
            ``width`` and ``boundary`` may stay single) for halos on several dims with corners;
            for a local array, ``mesh_dim`` is then a list of groups.
        boundary: ``"periodic"`` (wrap around), ``"none"`` (no halo beyond the global edges) or a
            number (the value beyond the global edges), exactly as ``np.pad`` (module docstring).

    Returns:
        A new array of ``x``'s kind: the local shard with ``width`` rows on each side of
        ``tensor_dim`` (none on the outer side of the edge shards with ``"none"``).

    Raises:
        ValueError on every rank: a shard narrower than ``width``, ``mesh_dim`` not sharding
        ``tensor_dim``, ranks passing different arguments or shapes (local arrays: agreed first,
        unless ``MPILOCAL_CHECK_ARGS=0``). NotImplementedError: ``tensor_dim`` sharded over
        several mesh dims at once.

    Counts one ``"halo_exchange"`` per tensor dim in :class:`~mpilocal.CommDebugMode` (none over a
    group of one rank, where the halo is a local copy).

    Example:
        >>> U = distribute_tensor(u, mesh, [Shard(0), Shard(1)])
        >>> p = funcol.halo_exchange(U, (0, 1), (0, 1), 1, boundary=0.0)   # (n0 + 2, n1 + 2) local
    """
    caller = "halo_exchange"
    if type(x) is DTensor:
        return _halo_dtensor(x, mesh_dim, tensor_dim, width, boundary, caller)
    out = x
    for m, d, w, b in zip(*_halo_lists(x, mesh_dim, tensor_dim, width, boundary, caller)):
        out = _halo_local(out, m, d, w, b, caller)
    return out


def _halo_local(x, group, tensor_dim, width, boundary, caller):
    """One tensor dim of a local array: local checks, agreed over the group, then the exchange."""
    g = resolve_group(group, caller)
    data = _data(x)
    try:  # rank-local checks; the verdict (and shapes/dtypes/parameters) are agreed so every rank raises
        call, err = _halo_call(data, g, tensor_dim, width, boundary, caller, False), None
    except (TypeError, ValueError) as e:
        call, err = None, e

    def sizes_from(rows):
        return [int(r[2 + call.d]) for r in rows]

    def run_plan(a, p):  # `a` is not `data` in a replay
        return _halo_any(x if a is data else a, call.chain)

    return _checked_halo(x, data, g, caller, err, call, sizes_from, run_plan)


def _halo_dtensor(x, mesh_dim, tensor_dim, width, boundary, caller):
    """DTensor input: every check is on global metadata (the same verdict on every rank). The plans
    (one :class:`_Halo` per tensor dim) are cached on the mesh (:func:`_mesh_plans`, dropped when
    it is closed) per (placements, global and local shape, arguments)."""
    mesh = x._mesh
    local = x.to_local()  # Tracked when x requires grad: the halo is differentiable
    if mesh._coordinate is None:
        _halo_lists(x, mesh_dim, tensor_dim, width, boundary, caller)
        return local
    key = (caller, x._placements, x.shape, x._local.shape, _k(mesh_dim), _k(tensor_dim), _k(width), _k(boundary))
    plans = _cached(_mesh_plans(mesh), key,
                    lambda: _halo_dtensor_plan(x, mesh, mesh_dim, tensor_dim, width, boundary, caller))
    return _halo_any(local, plans)


def _halo_dtensor_plan(x, mesh, mesh_dim, tensor_dim, width, boundary, caller):
    mdims, tdims, widths, bnds = _halo_lists(x, mesh_dim, tensor_dim, width, boundary, caller)
    ndim = x.ndim
    plan = []
    for m, td, w, b in zip(mdims, tdims, widths, bnds):
        m = mesh._dim_index(m, caller)
        d = functional.norm_dim(td, ndim, caller, "tensor_dim")
        w = _width(w, caller)
        b = _boundary(b, caller)
        pl = x._placements
        if not pl[m].is_shard(d):
            raise ValueError(
                f"{caller}: mesh dim {m} has placement {pl[m]!r}, not Shard({d}); pass the mesh dim that shards "
                f"tensor dim {d} (placements {list(pl)})"
            )
        others = [j for j, p in enumerate(pl) if j != m and p.is_shard(d)]
        if others:
            raise NotImplementedError(
                f"{caller}: tensor dim {d} is sharded over mesh dims {sorted(others + [m])} at once; halos need it "
                f"sharded over one mesh dim. Redistribute to shard it over mesh dim {m} only"
            )
        if any(p.is_partial() for p in pl):
            raise ValueError(f"{caller}: x has a Partial placement ({list(pl)}); halos of partial values are not "
                             f"defined. Redistribute the Partial mesh dims to Replicate() first")
        if any(d == e for _, e, _, _ in plan):
            raise ValueError(f"{caller}: tensor dim {d} is given twice in tensor_dim={tensor_dim!r}; give each "
                             f"tensor dim once (with its width and boundary)")
        plan.append((m, d, w, b))
    shape = x.shape
    for m, d, w, b in plan:
        _check_rows(shard_rows(shape, mesh, x._placements, m, d), w, mesh.mesh.shape[m], b == "periodic", d, caller)
    return _chain(tuple(x._local.shape), [(d, group_for(mesh.get_group(m)), w, b) for m, d, w, b in plan])


# ------------------------------------------------------------------------------------------------
# permute / send_recv / shift
# ------------------------------------------------------------------------------------------------
class _Perm:
    """A permutation worked out for this rank (:func:`_perm_plan`): ``pairs`` ``[(src, dst)]``
    (checked), ``dsts`` (where this rank sends), ``srcs`` (where it receives from), ``name`` (what
    is counted), ``detail`` (what fingerprints compare), over Group ``g``; ``fast``: the prepared
    permutation per (kind, dtype, shape) (:func:`permute_raw`)."""

    __slots__ = ("g", "pairs", "dsts", "srcs", "name", "detail", "_inverse", "fast")

    def inverse(self):
        """The plan of the inverse permutation (the adjoint's), made once."""
        if self._inverse is None:
            self._inverse = _perm_plan([(b, a) for a, b in self.pairs], self.g, self.name)
        return self._inverse


def _perm_plan(pairs, g, name):
    p = _Perm()
    me = g.rank
    p.g, p.pairs, p.name, p._inverse = g, pairs, name, None
    p.dsts = [dst for src, dst in pairs if src == me]
    p.srcs = [src for src, dst in pairs if dst == me]
    p.detail = dict(pairs=zlib.crc32(repr(sorted(pairs)).encode()) if name != "send_recv" else 0)
    p.fast = {}
    return p


def permute_raw(x, p):
    """``x`` moved along the pairs of plan ``p`` (a :class:`_Perm`); zeros where nothing arrives.
    **Collective** over ``p.g``. From the second call of a kind, dtype and shape, through the
    prepared exchange where there is one (:func:`_permute_fn`)."""
    key = (type(x), x.dtype, x.shape)
    return (p.fast.get(key) or _prepared(p.fast, key, _permute_generic, _permute_fn, p))(x)


def _permute_generic(x, p):
    out = collectives.empty(x, x.shape)
    if not p.srcs:
        out[...] = 0
    _exchange(p.name, x, [(d, x) for d in p.dsts], [(s, out) for s in p.srcs], p.g, p.detail)
    return out


def _permute_fn(x, p):
    """The prepared :func:`permute_raw` of plan ``p`` for arrays like ``x`` (C-contiguous): a new
    array, then one prepared transport call on the two arrays (a pair of this rank with itself: a
    copy inside the NCCL group, a NumPy copy on the host); or None (one rank, a transport without a
    prepared send/recv)."""
    g = p.g
    host = type(x) is np.ndarray
    if g.size == 1 or not (host or _arrays.is_cupy(x)):
        return None
    nb, me = x.nbytes, g.rank
    own = host and me in p.dsts  # (then also in p.srcs)
    dsts, srcs = ([d for d in p.dsts if d != me], [s for s in p.srcs if s != me]) if own else (p.dsts, p.srcs)
    run = collectives.prepared_sendrecv(p.name, x, _Sent(nb * sum(d != me for d in dsts), x.dtype, x.shape),
                                        [(d, 1, 0, nb) for d in dsts], [(s, 0, 0, nb) for s in srcs], g,
                                        **p.detail)
    if run is None:
        return None
    shape, dt, zero = x.shape, x.dtype, not p.srcs
    like = np.empty(0, dt) if host else None  # (not the first call's array: it is not kept)
    new = (lambda: collectives.empty(like, shape)) if host else (lambda k=type(x): k(shape, dt))

    def f(x):
        out = new()
        if zero:
            out[...] = 0
        elif own:
            out[...] = x
        run(out, x)
        return out

    return f


def _perm_key(perm):
    """``perm`` as a tuple of tuples (what the checked pairs depend on: a cache key), or None."""
    try:
        return tuple(map(tuple, perm))
    except TypeError:
        return None


def _check_perm(items, perm, k, caller):
    """The pairs of ``perm`` (``items``: :func:`_perm_key` of it), checked against a group of ``k``."""
    try:
        if items is None:
            raise TypeError
        pairs = [(int(a), int(b)) for a, b in items]
    except (TypeError, ValueError):
        raise TypeError(f"{caller}: perm must be a sequence of (source, destination) pairs of ints, got {perm!r}") from None
    bad = [p for p in pairs if not (0 <= p[0] < k and 0 <= p[1] < k)]
    if bad:
        raise ValueError(f"{caller}: perm pairs {bad} name ranks outside the group (0..{k - 1})")
    for i, what in ((0, "source"), (1, "destination")):
        seen = [p[i] for p in pairs]
        dup = sorted({s for s in seen if seen.count(s) > 1})
        if dup:
            raise ValueError(f"{caller}: perm names {what} rank(s) {dup} more than once; each rank may send at most "
                             f"once and receive at most once (JAX's ppermute rule)")
    return pairs


def _checked_permute(x, g, caller, key, check):
    """Permute ``x`` along the pairs ``check()`` returns (the local argument checks, raising on bad
    pairs), with their verdict, shapes, dtypes and the pairs agreed under the argument check of the
    public collectives (:func:`functional.checked`). The checked call is cached per (group, caller,
    kind, dtype, shape, ``key``): ``key`` holds everything ``check`` reads."""
    data = _data(x)
    try:
        _arrays.require_array(data, caller)

        def build():
            pairs = check()
            params = dict(perm=repr(pairs))
            desc = repr((caller, type(data), str(data.dtype), data.shape, params["perm"]))
            return _Call(_perm_plan(pairs, g, "permute"), params, desc)

        call, err = _cached(_plans(g), (caller, type(data), data.dtype, data.shape, key), build), None
    except (TypeError, ValueError) as e:
        call, err = None, e

    def run(a, rows):
        return _permute_any(x if a is data else a, call.plan)  # `a` is not `data` in a replay

    if err is not None:
        return functional.checked(g, caller, err, data, None, None, run)
    return functional.checked(g, caller, None, data, call.params, call.desc, run)


def _permute_any(x, p):
    if _is_tracked(x):
        return AUTOGRAD["permute"](x, p)
    return permute_raw(x, p)


def permute(x, perm, group, tag: str = ""):
    """JAX's ``ppermute``: for each ``(src, dst)`` in ``perm`` (group ranks), rank ``dst`` gets
    rank ``src``'s ``x``; ranks that receive nothing get zeros. **Collective**; every rank passes
    the same ``perm`` and an array of the same shape and dtype. Each rank appears at most once as a
    source and at most once as a destination. Differentiable (the adjoint is the inverse
    permutation). Counts one ``"permute"``."""
    caller = "permute"
    g = resolve_group(group, caller)
    items = _perm_key(perm)
    return _checked_permute(x, g, caller, items, lambda: _check_perm(items, perm, g.size, caller))


def shift(x, offset: int, group, *, periodic: bool = True, tag: str = ""):
    """Group rank ``r`` sends ``x`` to rank ``r + offset`` and gets rank ``r - offset``'s: the
    per-rank arrays rolled along the rank axis, as ``np.roll(stack, offset, axis=0)``
    (``periodic=False``: no wrap, ranks with no source get zeros). **Collective**; a permute, counted
    as ``"permute"``."""
    caller = "shift"
    g = resolve_group(group, caller)

    def check():
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
            raise TypeError(f"{caller}: offset must be an int, got {offset!r}")
        k = g.size
        if periodic:
            return [(i, (i + int(offset)) % k) for i in range(k)]
        return [(i, i + int(offset)) for i in range(k) if 0 <= i + int(offset) < k]

    return _checked_permute(x, g, caller, (_k(offset), bool(periodic)), check)


# send_recv: each rank names its own peers, so no signature of the call's arguments is the same on
# every rank. What is: the pattern of every rank's (dst, src), once the ranks agreed it. A pattern
# agreed by the full agreement (every rank's (dst, src) gathered and the pairs matched) is kept per
# Group; a later call whose (dst, src) is this rank's entry of the latest agreed pattern that has it
# signs that pattern. Equal signatures on every rank then mean every rank's entry is that pattern's,
# so the call's pairs match; anything else (a new pattern, an entry of another pattern) takes the
# full agreement, which raises on every rank when the pairs do not match.
_SR_PATTERNS = "send_recv patterns"


def _sr_peer(v, what, k, caller):
    if v is None:
        return -1
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < k:
        raise ValueError(f"{caller}: {what} {v!r} is not a group rank (0..{k - 1}) or None")
    return int(v)


def _sr_agree(g, caller, err, data, d_, s_):
    """The full agreement of a send_recv: every rank's verdict, shape, dtype and (dst, src)
    gathered; raises on every rank when they differ or a send has no matching receive. Records the
    agreed pattern (the same on every rank). Returns the rows (None: one rank, or no agreement)."""
    meta = None
    if err is None:
        meta = meta_vector(data.shape, data.dtype, _arrays.is_cupy(data))  # the kind too: it picks the transport
        meta[-3], meta[-2] = d_, s_  # past any real ndim
    rows = agreement.agree(g, caller, err, meta)
    if rows is None:
        return None
    _same_shapes(rows, caller)
    dsts, srcs = rows[:, -3].tolist(), rows[:, -2].tolist()
    for r in range(g.size):
        if dsts[r] >= 0 and srcs[dsts[r]] != r:
            raise ValueError(f"{caller}: group rank {r} sends to rank {dsts[r]}, which receives from "
                             f"{srcs[dsts[r]] if srcs[dsts[r]] >= 0 else 'nobody'}; every send needs the "
                             f"matching src on its destination (dsts {dsts}, srcs {srcs}, -1 = None)")
        if srcs[r] >= 0 and dsts[srcs[r]] != r:
            raise ValueError(f"{caller}: group rank {r} receives from rank {srcs[r]}, which sends to "
                             f"{dsts[srcs[r]] if dsts[srcs[r]] >= 0 else 'nobody'}; every src needs the "
                             f"matching dst on its source (dsts {dsts}, srcs {srcs}, -1 = None)")
    known = g.cache.get(_SR_PATTERNS)
    if known is None or len(known) >= _MAX_PLANS:
        known = g.cache[_SR_PATTERNS] = {}
    known[(dsts[g.rank], srcs[g.rank])] = agreement.signature(("send_recv pattern", tuple(dsts), tuple(srcs)))
    return rows


def send_recv(x, dst, src, group, tag: str = ""):
    """Each rank sends ``x`` to group rank ``dst`` and receives from group rank ``src`` (``None``:
    no send / no receive, MPI_PROC_NULL), returning what arrived (zeros when ``src`` is None).
    **Collective**: every rank of the group calls it, with arrays of one shape and dtype; the
    pairs are agreed, so a ``dst`` whose rank does not name this one as ``src`` raises on every rank
    (unless ``MPILOCAL_CHECK_ARGS=0``). A pattern of pairs the ranks agreed before is checked by
    the speculative signature of the other collectives (no blocking agreement). Counts one
    ``"send_recv"``. Differentiable."""
    caller = "send_recv"
    g = resolve_group(group, caller)
    data = _data(x)

    def build():  # (dst, src) as group ranks (-1: None), the plan, the signature's text
        d_, s_ = _sr_peer(dst, "dst", g.size, caller), _sr_peer(src, "src", g.size, caller)
        me = g.rank
        plan = _perm_plan(([(me, d_)] if d_ >= 0 else []) + ([(s_, me)] if s_ >= 0 else []), g, "send_recv")
        return d_, s_, plan, repr((caller, type(data), str(data.dtype), data.shape))

    try:
        _arrays.require_array(data, caller)
        d_, s_, plan, text = _cached(_plans(g), (caller, type(data), data.dtype, data.shape, _k(dst), _k(src)), build)
        err = None
    except (TypeError, ValueError) as e:
        d_ = s_ = -1
        plan, err = None, e
    desc = None
    if err is None:
        pattern = g.cache.get(_SR_PATTERNS, _NONE).get((d_, s_))
        if pattern is not None:  # this rank's entry of an agreed pattern: sign that pattern
            desc = (text, pattern)

    def run(a, rows):
        return _permute_any(x if a is data else a, plan)  # `a` is not `data` in a replay

    return functional.checked(g, caller, err, data, None, desc, run,
                              full=lambda: _sr_agree(g, caller, err, data, d_, s_))


_NONE: dict = {}


def _same_shapes(rows, caller):
    """Every rank passes one kind (NumPy or CuPy), dtype and shape: :func:`metadata.check_same` on
    the rows without the peers' columns (which differ by design)."""
    rows = rows.copy()
    rows[:, -3:-1] = 0
    check_same(rows, caller)


# ------------------------------------------------------------------------------------------------
# stencil: local_map with halos
# ------------------------------------------------------------------------------------------------
def stencil(func=None, *, halo=1, boundary="periodic"):
    """``local_map`` for stencils: ``func`` receives every DTensor argument's local shard padded
    with ``halo`` rows on each side of each tensor dim (exchanged with the neighbours along the
    sharded dims, and padded locally, by the same ``boundary`` rule, along dims that are not
    sharded), and returns arrays of the padded shape or of the local shape; the wrapper keeps the
    interior and wraps it with the first DTensor argument's placements. **Collective.**

    ``halo``: an int (every tensor dim), or one int per tensor dim; ``boundary`` as
    :func:`halo_exchange` (one value, or one per tensor dim). Differentiable like ``local_map``.

    Example (one explicit step of the 2-D heat equation, zero Dirichlet boundary)::

        step = mpilocal.stencil(lambda u: u[1:-1, 1:-1] + nu * (u[2:, 1:-1] + u[:-2, 1:-1] + u[1:-1, 2:]
                                                               + u[1:-1, :-2] - 4 * u[1:-1, 1:-1]), boundary=0.0)
        U = step(U)
    """
    import functools

    if func is None:
        return functools.partial(stencil, halo=halo, boundary=boundary)
    if not callable(func):
        raise TypeError(f"stencil: func must be callable, got {type(func).__name__}")

    cache: dict = {}  # per layout of the arguments: (halo plans, the local_map-wrapped function)

    @functools.wraps(func)
    def wrapped(*args):
        key = tuple((id(a._mesh), a._placements, a.shape, a._local.shape) if type(a) is DTensor else None
                    for a in args)
        hit = cache.get(key)
        if hit is None or any(type(a) is DTensor and a._mesh is not hit[2] for a in args):
            hit = cache[key] = _stencil_build(func, args, halo, boundary)
        return hit[1](*args)

    return wrapped


def _stencil_build(func, args, halo, boundary):
    """(halo plans, local_map-wrapped function, mesh) of a stencil for one layout of ``args``."""
    caller = "stencil"
    name = getattr(func, "__name__", "func")
    first = next((a for a in args if type(a) is DTensor), None)
    if first is None:
        raise TypeError(f"stencil: {name} got no DTensor argument")
    mesh = first._mesh
    plans = []
    for a in args:
        if type(a) is not DTensor:
            plans.append(None)
            continue
        if a._mesh != mesh:
            raise ValueError("stencil: every DTensor argument must live on the same device mesh")
        dims = _stencil_plan(a, halo, boundary, caller)
        plans.append(_chain(tuple(a._local.shape), dims) if dims else None)
    i0 = next(i for i, a in enumerate(args) if a is first)
    local_shape = tuple(first._local.shape)

    def local(*xs):
        padded = [x if c is None else _halo_any(x, c) for x, c in zip(xs, plans)]
        res = func(*padded)
        if isinstance(res, (tuple, list)):
            raise TypeError(f"stencil: {name} must return one array (the new field); for several outputs use "
                            f"local_map with halo_exchange inside")
        return _interior(res, local_shape, plans[i0], caller)

    in_pl = tuple(a._placements if type(a) is DTensor else None for a in args)
    return plans, local_map(local, out_placements=list(first._placements), in_placements=in_pl), mesh


def _stencil_plan(a, halo, boundary, caller):
    """[(tensor dim, group, width, boundary)] for one DTensor argument of a stencil: halos from the
    neighbours along sharded dims, and from this rank itself (its own group) along the others."""
    ndim = a.ndim
    widths = [_width(w, caller) for w in _as_list(halo, ndim, "halo", caller)]
    bnds = [_boundary(b, caller) for b in _as_list(boundary, ndim, "boundary", caller)]
    pl = a._placements
    mesh = a._mesh
    shape = a.shape
    plan = []
    for d in range(ndim):
        w, b = widths[d], bnds[d]
        if w == 0:
            continue
        ms = [m for m, p in enumerate(pl) if p.is_shard(d)]
        if any(p.is_partial() for p in pl):
            raise ValueError(f"{caller}: argument has a Partial placement ({list(pl)}); redistribute it first")
        if len(ms) > 1:
            raise NotImplementedError(f"{caller}: tensor dim {d} is sharded over mesh dims {ms} at once; halos need "
                                      f"it sharded over one mesh dim")
        if ms:
            m = ms[0]
            _check_rows(shard_rows(shape, mesh, pl, m, d), w, mesh.mesh.shape[m], b == "periodic", d, caller)
            plan.append((d, group_for(mesh.get_group(m)), w, b))
        else:
            _check_rows([shape[d]], w, 1, b == "periodic", d, caller)
            plan.append((d, _self_group(), w, b))
    return plan


def _self_group():
    from mpi4py import MPI

    return group_for(MPI.COMM_SELF)


def _interior(o, local_shape, c, caller):
    """The local-shape interior of a stencil output (padded outputs are cropped by ``c``, the
    :class:`_Chain` of the first DTensor argument, or None)."""
    data = _data(o)
    shape = tuple(data.shape)
    if shape == local_shape:
        return o
    padded = local_shape if c is None else c.padded
    idx = (slice(None),) * len(local_shape) if c is None else c.inner
    if shape != tuple(padded):
        raise ValueError(f"{caller}: the stencil function returned shape {shape}; return the local shape "
                         f"{local_shape} (the interior) or the padded input shape {tuple(padded)}")
    return o[idx]


# the neighbour collectives are funcol functions too (see the module docstring)
for _name in ("halo_exchange", "halo_update", "permute", "send_recv", "shift"):
    setattr(functional, _name, globals()[_name])
del _name
