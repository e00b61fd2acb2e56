"""Operators on DTensors: rule lookup (:mod:`.rules`), redistribution, the local op, the result.

Every operator here runs the same steps on every rank: the global shapes and placements (the same
everywhere) pick one strategy per mesh dim (:func:`rules.choose`), the inputs are redistributed to
it (``DTensor._redistribute``: counted by ``CommDebugMode``, differentiable), the NumPy/CuPy op runs
on the local shards, and the result is wrapped with the strategy's output placements and the
global shape. No data-dependent choice, so every rank issues the same collectives.

Gradients: an input that requires grad reaches the local op as a ``Tracked`` array (as inside
``local_map``), so the local op is recorded by :mod:`mpilocal.autograd` and the result's backward
runs through the same nodes as ``local_map`` outputs. Ops without a gradient
(``tracked.NOT_DIFFERENTIABLE``: comparisons, ``isnan``, ``any``, ``all``, ...) run on the values and
give a result that does not require grad; other ops that ``Tracked`` does not differentiate raise
``NotImplementedError`` naming them when an operand requires grad.
"""

from __future__ import annotations

import math
import operator as _op
import weakref

import numpy as np

from .. import _arrays, debug
from ..autograd import dtensor_ops, engine
from ..autograd.tracked import NOT_DIFFERENTIABLE, Tracked, namespace_for
from ..dtensor import DTensor, on_device as _on_device
from ..layout import local_shape_and_offset, shard_sizes, chunk_sizes
from ..names import identity
from ..placement import Partial, Replicate, Shard
from . import rules

__all__ = ["elementwise", "reduce", "matmul", "permute_dims", "reshape", "astype", "getitem", "concat", "stack",
           "where", "HISTORY", "unsupported"]

R = Replicate()

#: (op name, [(operand index, from placements, to placements), ...]) per operator call, when a
#: CommDebugMode-style recorder list is installed here (see :func:`record_plans`)
HISTORY: list = []
_RECORDING = [0]

_ALIASES = {"pow": "power", "bitwise_left_shift": "left_shift", "bitwise_right_shift": "right_shift",
            "permute_dims": "transpose", "concat": "concatenate", "bitwise_invert": "invert", "astype": None}


def unsupported(what: str) -> TypeError:
    return TypeError(
        f"{what} is not supported on DTensors (mpilocal.ops has no sharding rule for it, and never gathers "
        f"silently). Run it on the local shards with mpilocal.local_map(f, out_placements=..., in_placements=...)"
        f"(x) when it acts on each shard alone, or make the data whole first with "
        f"x.redistribute(placements=[Replicate()] * mesh.ndim) (collective) and then local_map / to_local()"
    )


def _fn(xp, name):
    f = getattr(xp, name, None)
    if f is None and _ALIASES.get(name):
        f = getattr(xp, _ALIASES[name], None)
    if f is None:
        raise unsupported(f"{getattr(xp, '__name__', xp)}.{name}")
    return f


def _mesh_of(operands, what):
    mesh = None
    for o in operands:
        if type(o) is DTensor:
            if mesh is None:
                mesh = o._mesh
            elif o._mesh is not mesh and o._mesh != mesh:
                raise ValueError(
                    f"{what}: the DTensors live on different meshes ({mesh} and {o._mesh}); operators need one "
                    f"mesh. Move one with x.redistribute(device_mesh=..., ...) or rebuild it with "
                    f"DTensor.from_local(x.to_local(), other_mesh, placements) where the ranks match"
                )
    return mesh


def _is_scalar(o):
    return isinstance(o, (bool, int, float, complex, np.generic)) or (_arrays.is_array(o) and o.ndim == 0)


def _operand(o, mesh, what, no_grad=False):
    """DTensors pass (their values only under no_grad, or with ``no_grad`` for an op without a
    gradient); scalars stay scalars; plain arrays and lists become Replicate DTensors (no
    communication: every rank is taken to hold the same value, as for a replicated input)."""
    if type(o) is DTensor:
        return o.detach() if o._ag is not None and (no_grad or not engine.is_grad_enabled()) else o
    if _is_scalar(o):
        return o
    if _arrays.is_array(o) or isinstance(o, (list, tuple)):
        arr = o if _arrays.is_array(o) else np.asarray(o)
        if arr.ndim == 0:
            return arr
        arr = _on_device(arr, mesh, what)
        return DTensor(arr, mesh, (R,) * mesh.ndim, tuple(arr.shape))
    raise TypeError(f"{what}: an operand of type {type(o).__name__} is neither a DTensor, an array nor a scalar")


def _local(t, out_pl=None):
    """This rank's shard; Tracked when ``t`` requires grad. The local gradient that flows back is
    a partial sum on every mesh dim where ``t`` is replicated but the result is not (each rank's
    part of the result depends on all of ``t``), else it has ``t``'s placements."""
    if t._ag is not None and engine.is_grad_enabled():
        gpl = None
        if out_pl is not None and any(p.is_replicate() and not q.is_replicate()
                                      for p, q in zip(t._placements, out_pl)):
            gpl = tuple(Partial("sum") if p.is_replicate() and not q.is_replicate() else
                        (R if p.is_partial() else p) for p, q in zip(t._placements, out_pl))
        return dtensor_ops.to_local(t, gpl)
    return t._local


def _ns(args, mesh_xp):
    for a in args:
        if type(a) is Tracked:
            return namespace_for(mesh_xp)
    return mesh_xp


def _wrap(res, mesh, pl, shape):
    if type(res) is Tracked:
        out = DTensor(res.data, mesh, pl, tuple(shape))
        if res._node is not None:
            dtensor_ops._from_local_node(out, res, pl)
        return out
    if not _arrays.is_array(res):
        res = np.asarray(res)
    return DTensor(res, mesh, pl, tuple(shape))


def _xp_of(dts):
    for d in dts:
        if type(d) is DTensor:
            return _arrays.namespace(d._local)
    return np


def _avg_nbytes(t):
    """The bytes of an average shard, from the global shape (the same on every rank: the choice of
    a strategy must never depend on this rank's own shard size)."""
    n = math.prod(t.shape) * t.dtype.itemsize
    for p, k in zip(t._placements, t._mesh.shape):
        if type(p) is Shard:
            n /= k
    return n


_PLANS: dict = {}  # (op, mesh shape, operand shapes/placements/itemsizes, extra) -> plan; rules are pure


def _plan(mesh, ops, strategies_of, out_shape):
    """(target placements per operand (None for scalars), output placements, output shape)."""
    nbytes = [_avg_nbytes(o) if type(o) is DTensor else 0 for o in ops]
    chosen = []
    for i, n in enumerate(mesh.shape):
        actual = tuple(o._placements[i] if type(o) is DTensor else None for o in ops)
        chosen.append(rules.choose(strategies_of(i, actual), actual, n, nbytes))
    targets = tuple(tuple(c[0][k] for c in chosen) if type(o) is DTensor else None for k, o in enumerate(ops))
    return targets, tuple(c[1] for c in chosen), tuple(out_shape)


def _key(what, mesh, ops, extra=()):
    return (what, mesh.shape, extra) + tuple((o.shape, o._placements, o._local.dtype.itemsize) if type(o) is DTensor
                                       else None for o in ops)


def _cached_plan(key, mesh, ops, make):
    plan = _PLANS.get(key)
    if plan is None:
        plan = make()
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


# DTensors (without grad) whose shard a recorded op took as a constant and may keep for its
# backward (``z = x * a`` keeps ``a``'s values): an in-place update of one of them (under no_grad
# too) computes out of place and rebinds the shard (``mpilocal.ops._inplace``), so that backward never
# reads a value changed after the forward (PyTorch raises there, through version counters).
_SAVED: dict = {}  # id(DTensor) -> weakref to it (a WeakSet would compare DTensors with ==, elementwise)


def mark_saved(t) -> None:
    """Note that a recorded op keeps ``t``'s shard for its backward (see above)."""
    k = id(t)
    if k not in _SAVED:
        _SAVED[k] = weakref.ref(t, lambda _r, k=k: _SAVED.pop(k, None))


def saved_for_backward(t) -> bool:
    r = _SAVED.get(id(t))
    return r is not None and r() is t


def _run(what, mesh, ops, strategies_of, compute, out_shape, plan=None):
    """Choose a strategy per mesh dim, redistribute, run ``compute(xp, *locals)``, wrap."""
    targets, out_pl, out_shape = plan if plan is not None else _plan(mesh, ops, strategies_of, out_shape)
    xp = _xp_of(ops)
    moved, args = [], []
    off = mesh._coordinate is None
    recording = engine.is_grad_enabled() and any(type(o) is DTensor and o._ag is not None for o in ops)
    for k, o in enumerate(ops):
        if type(o) is DTensor:
            tgt = targets[k]
            if tgt != o._placements and not off:
                moved.append((k, o._placements, tgt))
                o = o._redistribute(tgt)
            if off:  # off the mesh: a dummy of the right ndim and dtype gives the result's dtype
                args.append(xp.ones((1,) * o.ndim, dtype=o._local.dtype))
            elif o._ag is None:
                if recording:  # the op may keep this shard for its backward: in-place updates must not write it
                    mark_saved(o)
                args.append(o._local)
            else:
                args.append(_local(o, out_pl))
        else:
            args.append(o)
    if _RECORDING[0] or debug.ACTIVE:
        _note(what, tuple(moved), out_pl)
    res = compute(_ns(args, xp), *args)
    if off:
        res = xp.empty((0,) * len(out_shape), dtype=(res.data if type(res) is Tracked else xp.asarray(res)).dtype)
    return _wrap(res, mesh, out_pl, out_shape)


def _note(what, moves, out_pl):
    if _RECORDING[0]:
        HISTORY.append((what, moves, out_pl))
    if debug.ACTIVE:
        debug.record_operator(what, moves, out_pl)


class record_plans:
    """``with record_plans() as plans:`` lists, per operator call, ``(op, moves, output placements)``
    where ``moves`` holds ``(operand index, from placements, to placements)`` for each redistribution
    the operator chose (empty: no communication)."""

    def __enter__(self):
        self.plans = []
        self._start = len(HISTORY)
        _RECORDING[0] += 1
        return self.plans

    def __exit__(self, *exc):
        _RECORDING[0] -= 1
        self.plans.extend(HISTORY[self._start:])
        if not _RECORDING[0]:
            HISTORY.clear()


# ------------------------------------------------------------------------------------------------
# elementwise
# ------------------------------------------------------------------------------------------------
def elementwise(name, *operands, **kwargs):
    what = f"{name}(...) on DTensors"
    mesh = _mesh_of(operands, what)
    nd = name in NOT_DIFFERENTIABLE  # comparisons, isnan, ...: a result without gradient, graph untouched
    ops = [_operand(o, mesh, what, nd) for o in operands]

    def make():
        shapes = [tuple(o.shape) if type(o) is DTensor else None for o in ops]
        try:
            out_shape = np.broadcast_shapes(*[s if s is not None else () for s in shapes])
        except ValueError:
            raise ValueError(f"{name}: operands of global shapes {[s for s in shapes if s is not None]} do not "
                             f"broadcast together (NumPy's rules)") from None
        if all(s is None for s in shapes):
            raise TypeError(f"{name}: no DTensor operand")
        return _plan(mesh, ops, lambda i, actual: rules.elementwise(name, shapes, out_shape, actual), out_shape)

    plan = _cached_plan(_key(name, mesh, ops), mesh, ops, make)

    def compute(xp, *args):
        return _fn(xp, name)(*args, **kwargs)

    return _run(name, mesh, ops, None, compute, None, plan)


def where(cond, a, b):
    return elementwise("where", cond, a, b)


# ------------------------------------------------------------------------------------------------
# reductions
# ------------------------------------------------------------------------------------------------
def _axes(axis, ndim, what):
    if axis is None:
        return tuple(range(ndim))
    ax = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in ax:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < max(ndim, 1):
            raise ValueError(f"{what}: axis {axis!r} is out of range for an array of ndim {ndim}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: repeated axis in {axis!r}")
    return tuple(sorted(out))


def _identity(op, dtype):
    """What an empty shard gives for reduction ``op``: ``False``/``True`` for any/all (bool results),
    else the identity of its Partial op (:func:`mpilocal.names.identity`) on ``dtype``."""
    if op in ("any", "all"):
        return op == "all"
    return identity(rules.REDUCE_PARTIAL[op], dtype)


def reduce(op, x, axis=None, keepdims=False, dtype=None):
    what = f"DTensor.{op}"
    if type(x) is not DTensor:
        raise TypeError(f"{what}: expected a DTensor, got {type(x).__name__}")
    if x._ag is not None and (op in NOT_DIFFERENTIABLE or not engine.is_grad_enabled()):
        x = x.detach()  # any/all: a bool result without gradient, the graph untouched (PyTorch's rule)
    shape = x.shape
    nd = len(shape)
    mesh = x._mesh
    key = _key(what, mesh, [x], (axis if not isinstance(axis, list) else tuple(axis), bool(keepdims)))
    cached = _PLANS.get(key)
    if cached is None:
        axes = _axes(axis, nd, what)
        if op in ("max", "min") and any(shape[a] == 0 for a in axes):
            raise ValueError(f"{what}: zero-size reduction (global shape {shape}, axis={axis!r}) has no identity, as "
                             f"in NumPy")
        out_shape = tuple(1 if d in axes else s for d, s in enumerate(shape) if keepdims or d not in axes)
        cached = _cached_plan(key, mesh, [x], lambda: (_plan(
            mesh, [x], lambda i, actual: rules.reduction(op, nd, axes, keepdims, actual[0]), out_shape), axes,
            math.prod(shape[a] for a in axes)))
    plan, axes, count = cached

    def compute(xp, a):
        kw = {} if dtype is None else {"dtype": dtype}
        if op == "sum":
            return xp.sum(a, axis=axes, keepdims=keepdims, **kw)
        if op == "mean":  # exact for uneven shards: local sums over the global count (Partial(sum))
            s = xp.sum(a, axis=axes, keepdims=keepdims, **kw)
            if type(s) is not Tracked and not _arrays.is_array(s):
                s = np.asarray(s)
            if type(s) is not Tracked and s.dtype.kind in "biu":
                s = s.astype(np.float64)
            return s / count if count else s * np.nan
        raw = a.data if type(a) is Tracked else a
        if type(a) is Tracked and op in ("max", "min", "prod"):
            return _tracked_reduction(op, mesh, plan, a, axes, keepdims, dtype)
        if any(raw.shape[d] == 0 for d in axes):  # an empty local shard: the op's identity
            if type(a) is Tracked:
                raise NotImplementedError(f"{what} of an empty shard is not differentiable")
            oshape = tuple(1 if d in axes else s for d, s in enumerate(raw.shape) if keepdims or d not in axes)
            rdt = raw.dtype if op not in ("any", "all") else np.bool_
            if op == "prod" and raw.dtype.kind in "biu":
                rdt = np.result_type(raw.dtype, np.int_) if raw.dtype.kind != "u" else np.result_type(raw.dtype,
                                                                                                      np.uint)
            return xp.full(oshape, _identity(op, raw.dtype), dtype=rdt)
        name = {"max": "max", "min": "min", "prod": "prod", "any": "any", "all": "all"}[op]
        return getattr(xp, name)(a, axis=axes, keepdims=keepdims, **kw)

    return _run(what, mesh, [x], None, compute, None, plan)


def _tracked_reduction(op, mesh, plan, a, axes, keepdims, dtype):
    """max/min/prod of a Tracked shard. Where the result is Partial (the reduction ran over a
    sharded dim), the backward needs the global result, not this shard's: the hooks below reduce
    this shard's value (and tie / zero counts) over the Partial mesh dims (collectives in backward,
    issued by every rank of the mesh, whose graphs are the same), keeping the other placements."""
    from ..autograd import tracked as T
    _, out_pl, out_shape = plan
    kw = {}
    if any(p.is_partial() for p in out_pl):
        tgt = tuple(R if p.is_partial() else p for p in out_pl)

        def over(pl_of):
            def f(v):
                xp = _arrays.namespace(v) if _arrays.is_array(v) else np
                v = xp.asarray(v)
                pl = tuple(pl_of if p.is_partial() else p for p in out_pl)
                return DTensor(v, mesh, pl, out_shape)._redistribute(tgt)._local
            return f

        if op == "prod":
            kw = {"global_product": over(Partial("product")), "global_sum": over(Partial("sum"))}
        else:
            kw = {"global_value": over(Partial(op)), "global_sum": over(Partial("sum"))}
    if op == "prod":
        return T.prod(a, axis=axes, dtype=dtype, keepdims=keepdims, **kw)
    return T._extreme(op, a, axes, keepdims, **kw)


# ------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------
def matmul(a, b):
    what = "matmul (@) on DTensors"
    mesh = _mesh_of((a, b), what)
    a, b = _operand(a, mesh, what), _operand(b, mesh, what)
    if _is_scalar(a) or _is_scalar(b):
        raise ValueError("matmul: an operand is a scalar (0-d); use * for scaling")
    key = _key("matmul", mesh, [a, b])
    plan = _PLANS.get(key)
    if plan is None:
        plan = _cached_plan(key, mesh, [a, b], lambda: _matmul_plan(mesh, a, b))

    def compute(xp, x, y):
        return xp.matmul(x, y)

    return _run("matmul", mesh, [a, b], None, compute, None, plan)


def _matmul_plan(mesh, a, b):
    sa, sb = tuple(a.shape), tuple(b.shape)
    m, ka, kb, n, ob = rules.matmul_dims(len(sa), len(sb))
    if sa[ka] != sb[kb]:
        raise ValueError(f"matmul: global shapes {sa} and {sb} do not match in the contracted dim ({sa[ka]} vs "
                         f"{sb[kb]})")
    try:
        batch = np.broadcast_shapes(sa[:-2] if len(sa) >= 2 else (), sb[:-2] if len(sb) >= 2 else ())
    except ValueError:
        raise ValueError(f"matmul: batch dims of {sa} and {sb} do not broadcast") from None
    out_shape = tuple(batch) + ((sa[m],) if m is not None else ()) + ((sb[n],) if n is not None else ())
    return _plan(mesh, [a, b], lambda i, actual: rules.matmul(sa, sb, actual), out_shape)


# ------------------------------------------------------------------------------------------------
# shape ops
# ------------------------------------------------------------------------------------------------
def permute_dims(x, axes=None):
    nd = x.ndim
    if axes is None:
        axes = tuple(reversed(range(nd)))
    axes = tuple(int(a) % nd if nd else a for a in axes)
    if sorted(axes) != list(range(nd)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of {nd} dims")
    pl = tuple(Shard(axes.index(p.dim), p.sizes) if type(p) is Shard else p for p in x._placements)
    out_shape = tuple(x.shape[a] for a in axes)
    args = _local(x)
    xp = _arrays.namespace(x._local)
    if x._mesh._coordinate is None:
        return DTensor(xp.empty((0,) * nd, dtype=x.dtype), x._mesh, pl, out_shape)
    res = _fn(_ns([args], xp), "permute_dims")(args, axes)
    return _wrap(res, x._mesh, pl, out_shape)


def astype(x, dtype, copy=True):
    """Casts each shard; a Partial("sum") stays Partial for a cast between inexact dtypes (a linear
    map up to rounding), else it is reduced first."""
    dt = np.dtype(dtype)
    lin = x.dtype.kind in "fc" and dt.kind in "fc"
    pl = x._placements
    if any(p.is_partial() for p in pl) and not lin:
        x = x._redistribute(tuple(R if p.is_partial() else p for p in pl))
    a = _local(x)
    if type(a) is Tracked:
        res = namespace_for(_arrays.namespace(x._local)).astype(a, dt)
    else:
        res = a.astype(dt, copy=copy)
    return _wrap(res, x._mesh, x._placements, x.shape)


def _resolve_shape(shape, size, what):
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ValueError(f"{what}: only one -1 allowed in {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or size % known:
            raise ValueError(f"{what}: cannot reshape {size} elements into {shape}")
        shape = tuple(size // known if s == -1 else s for s in shape)
    if math.prod(shape) != size:
        raise ValueError(f"{what}: cannot reshape {size} elements into {shape}")
    return shape


def _kept_dim(old, new, d):
    """The dim of ``new`` that dim ``d`` of ``old`` stays whole as (same size, same product of the
    dims before and after it), or None."""
    pre = math.prod(old[:d])
    post = math.prod(old[d + 1:])
    for e in range(len(new)):
        if new[e] == old[d] and math.prod(new[:e]) == pre and math.prod(new[e + 1:]) == post:
            return e
    return None


def reshape(x, *shape):
    """Rule: a sharded dim that stays whole in the new shape (same size, and the same product of the
    dims before it) keeps its sharding and nothing moves; a mesh dim sharding any other dim is
    all-gathered (Replicate) first. Partial and Replicate mesh dims are kept."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    old = tuple(x.shape)
    new = _resolve_shape(shape, math.prod(old), "DTensor.reshape")
    pl = list(x._placements)
    target = []
    for p in pl:
        if type(p) is Shard and _kept_dim(old, new, p.dim) is None:
            target.append(R)
        else:
            target.append(p)
    if tuple(target) != x._placements:
        if _RECORDING[0] or debug.ACTIVE:
            _note("reshape", ((0, x._placements, tuple(target)),), tuple(target))
        x = x._redistribute(tuple(target))
    out_pl = tuple(Shard(_kept_dim(old, new, p.dim), p.sizes) if type(p) is Shard else p for p in target)
    xp = _arrays.namespace(x._local)
    if x._mesh._coordinate is None:
        return DTensor(xp.empty((0,) * len(new), dtype=x.dtype), x._mesh, out_pl, new)
    lshape, _ = local_shape_and_offset(new, x._mesh.shape, out_pl, x._mesh._coordinate)
    a = _local(x)
    if type(a) is Tracked:
        res = namespace_for(xp).reshape(a, lshape)
    else:
        res = a.reshape(lshape)
    return _wrap(res, x._mesh, out_pl, new)


def concat(arrays, axis=0, _stack=False):
    what = "stack" if _stack else "concatenate"
    arrays = list(arrays)
    mesh = _mesh_of(arrays, what)
    if mesh is None:
        raise TypeError(f"{what}: no DTensor among the inputs")
    ops = [_operand(o, mesh, what) for o in arrays]
    if any(_is_scalar(o) for o in ops):
        raise ValueError(f"{what}: zero-dimensional arrays cannot be concatenated")
    nd = ops[0].ndim
    ax = int(axis) % (nd + (1 if _stack else 0)) if nd or _stack else 0
    shapes = [tuple(o.shape) for o in ops]
    if _stack:
        if len(set(shapes)) != 1:
            raise ValueError(f"stack: all input arrays must have the same shape, got {shapes}")
        out_shape = shapes[0][:ax] + (len(ops),) + shapes[0][ax:]
    else:
        if any(len(s) != nd for s in shapes) or any(s[:ax] + s[ax + 1:] != shapes[0][:ax] + shapes[0][ax + 1:]
                                                    for s in shapes):
            raise ValueError(f"concatenate: shapes {shapes} differ outside axis {ax}")
        out_shape = shapes[0][:ax] + (sum(s[ax] for s in shapes),) + shapes[0][ax + 1:]
    # per mesh dim: the common placement when all agree and it does not shard the concatenated axis,
    # a common Partial("sum") stays (concatenation is linear), else Replicate
    tgt = []
    for i in range(mesh.ndim):
        ps = {o._placements[i] for o in ops}
        p = ps.pop() if len(ps) == 1 else R
        if type(p) is Shard and (p.dim == ax and not _stack or p.sizes is not None):
            p = R
        if p.is_partial() and p.reduce_op != "sum":
            p = R
        tgt.append(p)
    tgt = tuple(tgt)
    moved, args = [], []
    for k, o in enumerate(ops):
        if o._placements != tgt:
            moved.append((k, o._placements, tgt))
            o = o._redistribute(tgt)
        args.append(_local(o))
    out_pl = tuple(Shard(p.dim + 1) if _stack and type(p) is Shard and p.dim >= ax else p for p in tgt)
    if _RECORDING[0] or debug.ACTIVE:
        _note(what, tuple(moved), out_pl)
    xp = _xp_of(ops)
    if mesh._coordinate is None:
        return DTensor(xp.empty((0,) * len(out_shape), dtype=np.result_type(*[o.dtype for o in ops])), mesh,
                       out_pl, out_shape)
    ns = _ns(args, xp)
    res = _fn(ns, "stack")(args, axis=ax) if _stack else _fn(ns, "concat")(args, axis=ax)
    return _wrap(res, mesh, out_pl, out_shape)


def stack(arrays, axis=0):
    return concat(arrays, axis, _stack=True)


# ------------------------------------------------------------------------------------------------
# indexing
# ------------------------------------------------------------------------------------------------
def _norm_index(idx, shape):
    if not isinstance(idx, tuple):
        idx = (idx,)
    for i in idx:
        if isinstance(i, (bool, np.bool_)) or (_arrays.is_array(i) or isinstance(i, (list, DTensor))):
            raise IndexError(
                "DTensor indexing: only basic indexing (ints, slices, None, ...) is supported; boolean masks and "
                "integer arrays would need data from other ranks. Use local_map on the shards, or "
                "x.full_tensor()[mask] (collective: the whole array on every rank)")
        if not (i is None or i is Ellipsis or isinstance(i, (slice, int, np.integer))):
            raise IndexError(f"DTensor indexing: unsupported index {i!r}")
    if sum(1 for i in idx if i is Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if n_real > len(shape):
        raise IndexError(f"too many indices for a DTensor of ndim {len(shape)}")
    if Ellipsis in [i for i in idx if i is Ellipsis]:
        k = [j for j, i in enumerate(idx) if i is Ellipsis][0]
        idx = idx[:k] + (slice(None),) * (len(shape) - n_real) + idx[k + 1:]
    else:
        idx = idx + (slice(None),) * (len(shape) - n_real)
    return idx


def getitem(x, idx):
    """Basic indexing. A slice (step > 0) of a dim sharded over one mesh dim keeps it sharded: each
    rank takes its part, a ragged ``Shard(d, sizes=...)`` unless the pieces follow the chunk rule.
    An int on a sharded dim takes that one-row piece and all-gathers it over the mesh dim (rows
    only); negative steps and dims sharded over several mesh dims are all-gathered first."""
    shape = tuple(x.shape)
    idx = _norm_index(idx, shape)
    mesh = x._mesh
    mshape = mesh.shape
    # the dim each index entry acts on
    entries, d = [], 0
    for i in idx:
        if i is None:
            entries.append((None, None))
        else:
            entries.append((d, i))
            d += 1
    for d, i in entries:
        if d is not None and isinstance(i, (int, np.integer)) and not -shape[d] <= i < shape[d]:
            raise IndexError(f"index {i} is out of bounds for axis {d} with size {shape[d]}")
    # mesh dims to gather first: a dim sharded over several mesh dims, or a negative-step slice
    pl = list(x._placements)
    target = list(pl)
    for d, i in entries:
        if d is None or (isinstance(i, slice) and i == slice(None)):
            continue
        mdims = [m for m, p in enumerate(pl) if type(p) is Shard and p.dim == d]
        neg = isinstance(i, slice) and (i.step or 1) < 0
        if len(mdims) > 1 or (mdims and neg):
            for m in mdims:
                target[m] = R
    if tuple(target) != x._placements:
        if _RECORDING[0] or debug.ACTIVE:
            _note("getitem", ((0, x._placements, tuple(target)),), tuple(target))
        x = x._redistribute(tuple(target))
    pl = list(target)
    coord = mesh._coordinate
    # every entry gives one dim of the intermediate result (None and ints: size 1; ints squeezed last)
    primary = {}
    for m, p in enumerate(pl):
        if type(p) is Shard and p.dim not in primary:
            primary[p.dim] = m
    local_idx, kshape, new_pl, gather = [], [], list(pl), []
    entry_of = {d: j for j, (d, i) in enumerate(entries) if d is not None}
    for j, (d, i) in enumerate(entries):
        if d is None:
            local_idx.append(None)
            kshape.append(1)
            continue
        is_int = isinstance(i, (int, np.integer))
        sl = slice(int(i) % shape[d], int(i) % shape[d] + 1) if is_int else i
        start, stop, step = sl.indices(shape[d])
        kshape.append(len(range(start, stop, step)))
        m = primary.get(d)
        if m is None or sl == slice(None):
            local_idx.append(sl)
            continue
        p = pl[m]
        sizes = shard_sizes(p, shape[d], mshape[m])
        counts, lsl, o = [], slice(0, 0), 0
        for r, sz in enumerate(sizes):
            lo, hi = max(o, start), min(o + sz, stop)
            cnt, ls = 0, slice(0, 0)
            if lo < hi:
                first = start + -(-(lo - start) // step) * step
                cnt = len(range(first, hi, step))
                if cnt:
                    ls = slice(first - o, first - o + (cnt - 1) * step + 1, step)
            counts.append(cnt)
            if coord is not None and r == coord[m]:
                lsl = ls
            o += sz
        local_idx.append(lsl)
        total = sum(counts)
        new_pl[m] = Shard(j, None if tuple(counts) == chunk_sizes(total, mshape[m]) else tuple(counts))
        if is_int:
            gather.append(m)
    for m, p in enumerate(pl):
        if type(p) is Shard and new_pl[m] is p:
            new_pl[m] = Shard(entry_of[p.dim], p.sizes)
    int_local = local_idx
    xp = _arrays.namespace(x._local)
    a = _local(x)
    if mesh._coordinate is None:
        res = xp.empty((0,) * len(kshape), dtype=x.dtype)
    else:
        res = a[tuple(int_local)]
    out = _wrap(res, mesh, tuple(new_pl), tuple(kshape))
    if gather:
        tgt = list(out._placements)
        for m in gather:
            tgt[m] = R
        if _RECORDING[0] or debug.ACTIVE:
            _note("getitem", ((0, out._placements, tuple(tgt)),), tuple(tgt))
        out = out._redistribute(tuple(tgt))
    ints = [j for j, (d, i) in enumerate(entries) if d is not None and isinstance(i, (int, np.integer))]
    if ints:
        final_shape = tuple(s for j, s in enumerate(kshape) if j not in ints)
        # no int dim is sharded any more (gathered above), so the squeeze is local
        fpl = []
        for p in out._placements:
            if type(p) is Shard:
                fpl.append(Shard(p.dim - sum(1 for j in ints if j < p.dim), p.sizes))
            else:
                fpl.append(p)
        b = _local(out)
        sq = tuple(0 if j in ints else slice(None) for j in range(len(kshape)))
        res = xp.empty((0,) * len(final_shape), dtype=x.dtype) if mesh._coordinate is None else b[sq]
        out = _wrap(res, mesh, tuple(fpl), final_shape)
    return out
