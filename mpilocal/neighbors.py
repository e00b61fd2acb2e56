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

import numbers
import zlib

import numpy as np

from . import _arrays, agreement, collectives, functional
from .dtensor import DTensor
from .functional import resolve_group
from .layout import local_shape_and_offset
from .local_map import local_map
from .metadata import meta_shape, meta_vector
from .transport import group_for

__all__ = ["halo_exchange", "halo_update", "permute", "send_recv", "shift", "stencil", "shard_rows"]

#: Autograd's rules, registered by :mod:`mpilocal.autograd.neighbors` when it is imported (as
#: ``engine.ADDERS``): ``"Tracked"`` (the type of tracked local arrays), ``"halo_1d"``, ``"permute"``.
AUTOGRAD: dict = {}


def _is_tracked(x) -> bool:
    return type(x) is AUTOGRAD.get("Tracked")


def _data(x):
    """The plain array of ``x`` (a tracked one's data)."""
    return x.data if _is_tracked(x) else x


# ------------------------------------------------------------------------------------------------
# the one point-to-point collective everything here issues
# ------------------------------------------------------------------------------------------------
class _Sent:
    """What accounting and fingerprints read of a neighbour collective's send side."""

    __slots__ = ("nbytes", "dtype", "shape")

    def __init__(self, nbytes, dtype, shape):
        self.nbytes, self.dtype, self.shape = nbytes, dtype, shape


def _flat_send(xp, a):
    if not a.flags.c_contiguous:
        a = xp.ascontiguousarray(a)
    return a.reshape(-1)


def _exchange(name, like, sends, recvs, g, accumulate=False, **detail):
    """One logical neighbour collective over Group ``g``. ``sends``: ``[(group rank, array)]``;
    ``recvs``: ``[(group rank, target view)]``, matched per pair of ranks in list order. Each target
    receives a copy of its message (``accumulate``: the message is added to it). Messages to this
    rank itself are local copies. Issued on every rank of ``g`` (when ``g`` has more than one
    rank), whether or not it has messages."""
    xp = _arrays.namespace(like)
    me = g.rank
    mine = [a for p, a in sends if p == me]
    j = 0
    fs, fr, back = [], [], []
    for p, t in recvs:
        if p == me:  # a message to this rank itself (periodic on one rank)
            if accumulate:
                t += mine[j]
            else:
                t[...] = mine[j]
            j += 1
        elif not accumulate and t.flags.c_contiguous:
            fr.append((p, t.reshape(-1)))  # straight into the target (a view)
        else:
            tmp = xp.empty(t.shape, dtype=t.dtype)
            fr.append((p, tmp.reshape(-1)))
            back.append((t, tmp))
    if g.size == 1:
        return
    nbytes = 0
    for p, a in sends:
        if p != me:
            f = _flat_send(xp, a)
            nbytes += f.nbytes
            fs.append((p, f))
    collectives.sendrecv(name, like, _Sent(nbytes, like.dtype, tuple(like.shape)), fs, fr, g, **detail)
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


def _check_rows(sizes, w, k, periodic, d, caller):
    """Every shard that sends a halo holds at least ``w`` rows (the same verdict on every rank)."""
    if w == 0 or sizes is None or (k == 1 and not periodic):
        return
    for i, n in enumerate(sizes):
        if n < w:
            raise ValueError(
                f"{caller}: the shard of group rank {i} holds {n} row(s) of tensor dim {d}, fewer than the halo "
                f"width {w} (shard sizes along the mesh dim: {list(sizes)}); a halo comes from the adjacent shard "
                f"alone. Use a smaller width, fewer ranks on this mesh dim, or redistribute to a layout whose "
                f"shards all hold at least {w} rows"
            )


def _sl(ndim, d, s):
    return (slice(None),) * d + (s,)


def _halo_plan(x_shape, d, g, w, bnd):
    """(padded shape, left width, right width, left peer, right peer) of this rank."""
    periodic = bnd == "periodic"
    left, right = _neighbours(g.rank, g.size, periodic)
    const = bnd != "none" and not periodic
    wl = w if (left is not None or const) else 0
    wr = w if (right is not None or const) else 0
    shape = list(x_shape)
    shape[d] += wl + wr
    return tuple(shape), wl, wr, left, right


def halo_1d(x, d, g, w, bnd, name="halo_exchange"):
    """The padded local array (plain arrays; checks already done). **Collective** over ``g``."""
    shape, wl, wr, left, right = _halo_plan(x.shape, d, g, w, bnd)
    n = x.shape[d]
    out = collectives.empty(x, shape)  # NumPy: pooled warm pages (large halos: no page faults)
    out[_sl(x.ndim, d, slice(wl, wl + n))] = x
    if w:
        _fill_halos(out, x, d, g, w, bnd, n, wl, left, right, name)
    return out


def _fill_halos(out, src, d, g, w, bnd, n, wl, left, right, name):
    """Fill the halo rows of ``out`` (interior at ``wl`` along ``d``, ``n`` rows) from the
    neighbours' edge rows of ``src`` (the interior itself, or ``x``); constants at the edges."""
    nd = out.ndim
    o = 0 if src is not out else wl  # where src's interior starts
    sends, recvs = [], []
    if left is not None:
        sends.append((left, src[_sl(nd, d, slice(o, o + w))]))
    if right is not None:
        sends.append((right, src[_sl(nd, d, slice(o + n - w, o + n))]))
        recvs.append((right, out[_sl(nd, d, slice(wl + n, wl + n + w))]))
    if left is not None:
        recvs.append((left, out[_sl(nd, d, slice(0, w))]))
    if bnd not in ("periodic", "none"):
        if left is None:
            out[_sl(nd, d, slice(0, w))] = bnd
        if right is None:
            out[_sl(nd, d, slice(wl + n, wl + n + w))] = bnd
    _exchange(name, src, sends, recvs, g, dim=d, width=w, boundary=str(bnd))


def _halo_args(data, tensor_dim, width, boundary, caller):
    """The local checks of a halo call on a local array: (tensor dim, width, boundary)."""
    _arrays.require_array(data, caller)
    if data.ndim == 0:
        raise ValueError(f"{caller}: a 0-d array has no dim to exchange halos along")
    return functional.norm_dim(tensor_dim, data.ndim, caller, "tensor_dim"), _width(width, caller), \
        _boundary(boundary, caller)


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
    d = w = bnd = None
    n = wl = wr = left = right = None
    try:  # rank-local checks; the verdict (and shapes/parameters) are agreed so every rank raises
        d, w, bnd = _halo_args(padded, tensor_dim, width, boundary, caller)
        _, wl, wr, left, right = _halo_plan(padded.shape, d, g, w, bnd)
        n = padded.shape[d] - wl - wr
        if n < 0:
            raise ValueError(f"{caller}: dim {d} of size {padded.shape[d]} cannot hold {wl} + {wr} halo rows")
        err = None
    except (TypeError, ValueError) as e:
        err = e

    def run(a, rows):
        if rows is not None:  # every rank's interior size, from its padded size and position
            sizes = []
            for r in range(g.size):
                lr, rr = _neighbours(r, g.size, bnd == "periodic")
                const = bnd not in ("periodic", "none")
                sizes.append(int(rows[r][2 + d]) - (w if (lr is not None or const) else 0)
                             - (w if (rr is not None or const) else 0))
            _check_rows(sizes, w, g.size, bnd == "periodic", d, caller)
        if w:  # in a replay `a` is a scratch copy, not `padded`
            _fill_halos(a, a, d, g, w, bnd, n, wl, left, right, "halo_exchange")
        return a

    return _checked_halo(padded, padded, g, caller, err, d, w, bnd, n, run)


def halo_1d_adjoint(gy, d, g, w, bnd, name="halo_exchange"):
    """The adjoint of :func:`halo_1d`: the interior of ``gy`` plus the halo gradients sent back to
    (and added into) the rows they came from; constant halos get no gradient. **Collective.**"""
    xp = _arrays.namespace(gy)
    n_pad = gy.shape[d]
    periodic = bnd == "periodic"
    left, right = _neighbours(g.rank, g.size, periodic)
    const = bnd != "none" and not periodic
    wl = w if (left is not None or const) else 0
    wr = w if (right is not None or const) else 0
    n = n_pad - wl - wr
    gx = xp.ascontiguousarray(gy[_sl(gy.ndim, d, slice(wl, wl + n))]).copy()
    if w == 0:
        return gx
    sends, recvs = [], []  # the forward's messages reversed, in the forward's order per pair
    if right is not None:
        sends.append((right, gy[_sl(gy.ndim, d, slice(wl + n, wl + n + w))]))
    if left is not None:
        sends.append((left, gy[_sl(gy.ndim, d, slice(0, w))]))
    if left is not None:
        recvs.append((left, gx[_sl(gy.ndim, d, slice(0, w))]))
    if right is not None:
        recvs.append((right, gx[_sl(gy.ndim, d, slice(n - w, n))]))
    _exchange(name, gy, sends, recvs, g, accumulate=True, dim=d, width=w, boundary=str(bnd), adjoint=True)
    return gx


def _halo_any(x, d, g, w, bnd):
    if _is_tracked(x):
        return AUTOGRAD["halo_1d"](x, d, g, w, bnd)
    return halo_1d(x, d, g, w, bnd)


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
    multi = isinstance(tensor_dim, (list, tuple))
    tdims = list(tensor_dim) if multi else [tensor_dim]
    if type(x) is DTensor:
        mdims = _as_list(mesh_dim, len(tdims), "mesh_dim", caller) if multi else [mesh_dim]
    else:
        if multi:
            if not isinstance(mesh_dim, list) or len(mesh_dim) != len(tdims):
                raise TypeError(f"{caller}: for a local array and several tensor dims, mesh_dim must be a list of "
                                f"groups, one per tensor dim (e.g. [(mesh, 0), (mesh, 1)]), got {mesh_dim!r}")
            mdims = mesh_dim
        else:
            mdims = [mesh_dim]
    widths = _as_list(width, len(tdims), "width", caller)
    bnds = _as_list(boundary, len(tdims), "boundary", caller) if multi else [boundary]
    if type(x) is DTensor:
        return _halo_dtensor(x, mdims, tdims, widths, bnds, caller)
    out = x
    for m, d, w, b in zip(mdims, tdims, widths, bnds):
        out = _halo_local(out, m, d, w, b, caller)
    return out


def _halo_local(x, group, tensor_dim, width, boundary, caller):
    """One tensor dim of a local array: local checks, agreed over the group, then the exchange."""
    g = resolve_group(group, caller)
    data = _data(x)
    d = w = bnd = None
    try:  # rank-local checks; the verdict (and shapes/dtypes/parameters) are agreed so every rank raises
        d, w, bnd = _halo_args(data, tensor_dim, width, boundary, caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e

    def run(a, rows):
        sizes = [int(r[2 + d]) for r in rows] if rows is not None else (None if g.size > 1 else [a.shape[d]])
        _check_rows(sizes, w, g.size, bnd == "periodic", d, caller)
        return _halo_any(x if a is data else a, d, g, w, bnd)  # `a` is not `data` in a replay

    return _checked_halo(x, data, g, caller, err, d, w, bnd, None if err else data.shape[d], run)


def _checked_halo(x, data, g, caller, err, d, w, bnd, n, run):
    """Run a halo call under the argument check of the public collectives (:func:`functional.checked`:
    the speculative signature by default). The signature holds everything but this rank's own size
    along ``d`` (shard sizes may differ); a shard narrower than the halo (``n`` rows) makes this rank
    take the full agreement, whose rows give every shard's size, so every rank raises the same error
    (:func:`_check_rows`)."""
    desc = None
    if err is None and not (n < w and (g.size > 1 or bnd == "periodic")):
        shape = data.shape[:d] + (-1,) + data.shape[d + 1:]
        desc = (caller, type(data), data.dtype, shape, d, w, repr(bnd))
    return functional.checked(g, caller, err, data, None if err else dict(tensor_dim=d, width=w, boundary=bnd),
                              desc, run, skip_dim=d)


def _halo_dtensor(x, mdims, tdims, widths, bnds, caller):
    """DTensor input: every check is on global metadata (the same verdict on every rank). The plan
    (groups, dims, widths) is cached per (mesh, placements, global shape, arguments) in the cache of
    the mesh's first dim's Group (dropped with its communicator when the mesh is closed)."""
    mesh = x._mesh
    local = x.to_local()  # Tracked when x requires grad: the halo is differentiable
    if mesh._coordinate is None:
        return local
    try:
        key = (hash(mesh), mesh.ndim, x._placements, x.shape, tuple(mdims), tuple(tdims),
               tuple(widths), tuple((type(b), repr(b)) for b in bnds))
        cache = group_for(mesh.get_group(0)).cache.setdefault("halo_plans", {})
        plan = cache.get(key)
    except TypeError:  # unhashable arguments: checked (and rejected) below
        key, plan = None, None
    if plan is None:
        plan = _halo_dtensor_plan(x, mesh, mdims, tdims, widths, bnds, caller)
        if key is not None and len(cache) < 256:
            cache[key] = plan
    for d, g, w, b in plan:
        local = _halo_any(local, d, g, w, b)
    return local


def _halo_dtensor_plan(x, mesh, mdims, tdims, widths, bnds, caller):
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
        plan.append((m, d, w, b))
    shape = x.shape
    for m, d, w, b in plan:
        _check_rows(shard_rows(shape, mesh, x._placements, m, d), w, mesh.mesh.shape[m], b == "periodic", d, caller)
    return [(d, group_for(mesh.get_group(m)), w, b) for m, d, w, b in plan]


# ------------------------------------------------------------------------------------------------
# permute / send_recv / shift
# ------------------------------------------------------------------------------------------------
def permute_raw(x, pairs, g, name="permute"):
    """``x`` moved along ``pairs`` ``[(src, dst)]`` (checked); zeros where nothing arrives. **Collective.**"""
    me = g.rank
    sends = [(dst, x) for src, dst in pairs if src == me]
    srcs = [src for src, dst in pairs if dst == me]
    out = collectives.empty(x, x.shape)
    if not srcs:
        out[...] = 0
    recvs = [(s, out) for s in srcs]
    _exchange(name, x, sends, recvs, g, pairs=zlib.crc32(repr(sorted(pairs)).encode()) if name != "send_recv" else 0)
    return out


def _check_perm(perm, k, caller):
    try:
        pairs = [(int(a), int(b)) for a, b in perm]
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


def _checked_permute(x, g, caller, check, **params):
    """Run ``check()`` (local argument checks: the pairs), agree the verdict, shapes, dtypes and
    ``params`` under the argument check of the public collectives (:func:`functional.checked`), and
    permute ``x`` along the pairs."""
    data = _data(x)
    try:
        _arrays.require_array(data, caller)
        pairs = check()
        err = None
    except (TypeError, ValueError) as e:
        pairs, err = None, e
    desc = None if err else (caller, type(data), data.dtype, data.shape) + tuple(sorted(params.items()))

    def run(a, rows):
        return _permute_any(x if a is data else a, pairs, g, "permute")  # `a` is not `data` in a replay

    return functional.checked(g, caller, err, data, params, desc, run)


def _permute_any(x, pairs, g, name):
    if _is_tracked(x):
        return AUTOGRAD["permute"](x, pairs, g, name)
    return permute_raw(x, pairs, g, name)


def permute(x, perm, group, tag: str = ""):
    """JAX's ``ppermute``: for each ``(src, dst)`` in ``perm`` (group ranks), rank ``dst`` gets
    rank ``src``'s ``x``; ranks that receive nothing get zeros. **Collective**; every rank passes
    the same ``perm`` and an array of the same shape and dtype. Each rank appears at most once as a
    source and at most once as a destination. Differentiable (the adjoint is the inverse
    permutation). Counts one ``"permute"``."""
    caller = "permute"
    g = resolve_group(group, caller)
    return _checked_permute(x, g, caller, lambda: _check_perm(perm, g.size, caller), perm=repr(perm))


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

    return _checked_permute(x, g, caller, check, offset=repr(offset), periodic=bool(periodic))


def send_recv(x, dst, src, group, tag: str = ""):
    """Each rank sends ``x`` to group rank ``dst`` and receives from group rank ``src`` (``None``:
    no send / no receive, MPI_PROC_NULL), returning what arrived (zeros when ``src`` is None).
    **Collective**: every rank of the group calls it, with arrays of one shape and dtype; the
    pairs are agreed, so a ``dst`` whose rank does not name this one as ``src`` raises on every rank
    (unless ``MPILOCAL_CHECK_ARGS=0``). Counts one ``"send_recv"``. Differentiable."""
    caller = "send_recv"
    g = resolve_group(group, caller)
    data = _data(x)
    k = g.size

    def peer(v, what):
        if v is None:
            return -1
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < k:
            raise ValueError(f"{caller}: {what} {v!r} is not a group rank (0..{k - 1}) or None")
        return int(v)

    try:
        _arrays.require_array(data, caller)
        d_, s_ = peer(dst, "dst"), peer(src, "src")
        err = None
    except (TypeError, ValueError) as e:
        d_ = s_ = -1
        err = e
    meta = None
    if err is None:
        meta = meta_vector(data.shape, data.dtype)
        meta[-3], meta[-2] = d_, s_  # past any real ndim
    rows = agreement.agree(g, caller, err, meta)
    if rows is not None:
        _same_shapes(rows, caller)
        dsts, srcs = rows[:, -3].tolist(), rows[:, -2].tolist()
        for r in range(k):
            if dsts[r] >= 0 and srcs[dsts[r]] != r:
                raise ValueError(f"{caller}: group rank {r} sends to rank {dsts[r]}, which receives from "
                                 f"{srcs[dsts[r]] if srcs[dsts[r]] >= 0 else 'nobody'}; every send needs the "
                                 f"matching src on its destination (dsts {dsts}, srcs {srcs}, -1 = None)")
            if srcs[r] >= 0 and dsts[srcs[r]] != r:
                raise ValueError(f"{caller}: group rank {r} receives from rank {srcs[r]}, which sends to "
                                 f"{dsts[srcs[r]] if dsts[srcs[r]] >= 0 else 'nobody'}; every src needs the "
                                 f"matching dst on its source (dsts {dsts}, srcs {srcs}, -1 = None)")
    pairs = ([(g.rank, d_)] if d_ >= 0 else []) + ([(s_, g.rank)] if s_ >= 0 else [])
    return _permute_any(x, pairs, g, "send_recv")


def _same_shapes(rows, caller):
    ref = rows[0]
    for r, row in enumerate(rows):
        if row[0] != ref[0] or row[1] != ref[1] or \
                meta_shape(row) != meta_shape(ref):
            raise ValueError(f"{caller}: group rank 0 passes shape {meta_shape(ref)} but rank {r} passes "
                             f"{meta_shape(row)} (or another dtype); every rank must pass one shape and dtype")


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
        key = tuple((id(a._mesh), a._placements, a.shape) if type(a) is DTensor else None for a in args)
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
        plans.append(_stencil_plan(a, halo, boundary, caller))
    i0 = next(i for i, a in enumerate(args) if a is first)
    local_shape = tuple(first._local.shape)

    def local(*xs):
        padded = []
        for x, p in zip(xs, plans):
            for _, d, w, b, g in p or ():
                x = _halo_any(x, d, g, w, b)
            padded.append(x)
        res = func(*padded)
        if isinstance(res, (tuple, list)):
            raise TypeError(f"stencil: {name} must return one array (the new field); for several outputs use "
                            f"local_map with halo_exchange inside")
        return _interior(res, local_shape, plans[i0], caller)

    in_pl = tuple(a._placements if type(a) is DTensor else None for a in args)
    return plans, local_map(local, out_placements=list(first._placements), in_placements=in_pl), mesh


def _stencil_plan(a, halo, boundary, caller):
    """[(kind, tensor dim, width, boundary, group)] for one DTensor argument of a stencil."""
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
            plan.append(("x", d, w, b, group_for(mesh.get_group(m))))
        else:
            _check_rows([shape[d]], w, 1, b == "periodic", d, caller)
            plan.append(("local", d, w, b, _self_group()))
    return plan


def _self_group():
    from mpi4py import MPI

    return group_for(MPI.COMM_SELF)


def _interior(o, local_shape, plan, caller):
    """The local-shape interior of a stencil output (padded outputs are cropped by ``plan``)."""
    data = _data(o)
    shape = tuple(data.shape)
    if shape == local_shape:
        return o
    idx = [slice(None)] * len(local_shape)
    padded = list(local_shape)
    for kind, d, w, b, g in plan or ():
        _, wl, wr, _, _ = _halo_plan(local_shape, d, g, w, b)
        padded[d] += wl + wr
        idx[d] = slice(wl, wl + local_shape[d])
    if shape != tuple(padded):
        raise ValueError(f"{caller}: the stencil function returned shape {shape}; return the local shape "
                         f"{local_shape} (the interior) or the padded input shape {tuple(padded)}")
    return o[tuple(idx)]


# the neighbour collectives are funcol functions too (see the module docstring)
for _name in ("halo_exchange", "halo_update", "permute", "send_recv", "shift"):
    setattr(functional, _name, globals()[_name])
del _name
