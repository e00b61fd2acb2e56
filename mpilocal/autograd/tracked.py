"""``Tracked``: a local NumPy/CuPy array that records the operations applied to it.

``local_map`` hands the local function ``Tracked`` arrays for inputs that require grad. The
operations below are recorded and differentiated exactly; everything else raises
``NotImplementedError`` naming the operation (never a silently wrong or missing gradient). For
anything else, write a :class:`mpilocal.autograd.Function`.

Supported: the operators and methods in ``OPERATORS``, and the functions in ``SUPPORTED``, via
``x.__array_namespace__()`` or the NumPy functions of the same name on NumPy shards (both are
built from one table, ``_FUNCS``, below). The operations in ``NOT_DIFFERENTIABLE`` (comparisons,
``isnan``-style predicates, ``any``, ``all``, ``sign``) return plain arrays computed from the values. Array creation (``zeros``, ``ones_like``, ``arange``, dtypes, constants, ...)
passes through unchanged.
"""

from __future__ import annotations

import numpy as np

from .. import _arrays
from ..names import identity
from .engine import Leaf, Node, run_backward

__all__ = ["Tracked", "tensor", "SUPPORTED", "OPERATORS", "NOT_DIFFERENTIABLE"]

#: > 0 while local_map runs its function on Tracked inputs (error messages say where Tracked came from)
LOCAL_MAP_DEPTH = 0

#: what Tracked arrays support besides the functions in SUPPORTED (shown in errors and docs)
OPERATORS = ("operators + - * / @ ** (both sides; in place only on intermediate results), unary - +, indexing, "
             ".T, .mT, .sum/.mean (axis, keepdims), .reshape, .transpose, .astype")


def _xp(a):
    if isinstance(a, np.generic):
        return np
    return _arrays.namespace(a)


def _zeros_of(data):
    xp, shape, dtype = _xp(data), data.shape, data.dtype
    return lambda: xp.zeros(shape, dtype=dtype)


def _raw(x):
    return x.data if type(x) is Tracked else x


def _edge(x):
    if type(x) is Tracked and x._node is not None:
        return (x._node, x._idx)
    return None


def _record(name, data, inputs, backward):
    """A Tracked result of op ``name``; ``backward(g, need)`` returns one gradient per input."""
    edges = tuple(_edge(i) for i in inputs)
    out = Tracked(data)
    data = out.data
    if any(e is not None for e in edges):
        need = tuple(e is not None for e in edges)
        out._node = Node(name, edges, lambda gs: _arrays_only(backward(gs[0], need)), (_zeros_of(data),))
    return out


def _arrays_only(grads):
    """NumPy turns 0-d results into scalars: keep gradients arrays."""
    return [np.asarray(g) if isinstance(g, np.generic) else g for g in grads]


def _unbroadcast(g, shape):
    """Sum ``g`` down to ``shape`` (the reverse of broadcasting)."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _shape(x):
    return x.shape if hasattr(x, "shape") else ()


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        return tuple(int(a) % ndim for a in axis)
    return (int(axis) % ndim,)


# ------------------------------------------------------------------------------------------------
# the differentiable operations (on raw arrays or Tracked, returning Tracked)
# ------------------------------------------------------------------------------------------------
def add(a, b):
    ra, rb = _raw(a), _raw(b)
    sa, sb = _shape(ra), _shape(rb)
    return _record("Add", ra + rb, (a, b), lambda g, n: (_unbroadcast(g, sa) if n[0] else None,
                                                         _unbroadcast(g, sb) if n[1] else None))


def subtract(a, b):
    ra, rb = _raw(a), _raw(b)
    sa, sb = _shape(ra), _shape(rb)
    return _record("Sub", ra - rb, (a, b), lambda g, n: (_unbroadcast(g, sa) if n[0] else None,
                                                         _unbroadcast(-g, sb) if n[1] else None))


def multiply(a, b):
    ra, rb = _raw(a), _raw(b)
    sa, sb = _shape(ra), _shape(rb)
    return _record("Mul", ra * rb, (a, b), lambda g, n: (_unbroadcast(g * rb, sa) if n[0] else None,
                                                         _unbroadcast(g * ra, sb) if n[1] else None))


def divide(a, b):
    ra, rb = _raw(a), _raw(b)
    sa, sb = _shape(ra), _shape(rb)
    return _record("Div", ra / rb, (a, b), lambda g, n: (_unbroadcast(g / rb, sa) if n[0] else None,
                                                         _unbroadcast(-g * ra / (rb * rb), sb) if n[1] else None))


def pow(a, b):  # noqa: A001 - the array API's name
    ra, rb = _raw(a), _raw(b)
    sa, sb = _shape(ra), _shape(rb)
    out = ra ** rb

    def bw(g, n):
        ga = gb = None
        if n[0]:
            ga = _unbroadcast(g * rb * ra ** (rb - 1), sa)
        if n[1]:
            xp = _xp(out)
            base = xp.asarray(ra)  # may be a Python scalar (2.0 ** x)
            gb = _unbroadcast(g * out * xp.log(xp.where(base > 0, base, 1)), sb)
        return ga, gb

    return _record("Pow", out, (a, b), bw)


def negative(a):
    return _record("Neg", -_raw(a), (a,), lambda g, n: (-g,))


def matmul(a, b):
    ra, rb = _raw(a), _raw(b)
    if getattr(ra, "ndim", 0) == 0 or getattr(rb, "ndim", 0) == 0:
        raise ValueError("matmul: both operands must have at least one dimension (use * for scalars)")
    out = ra @ rb

    def bw(g, n):
        xp = _xp(g)
        if ra.ndim == 1 and rb.ndim == 1:
            return (g * rb if n[0] else None), (g * ra if n[1] else None)
        a2, b2, g2 = ra, rb, g
        if ra.ndim == 1:
            a2, g2 = ra[None, :], g2[..., None, :]
        if rb.ndim == 1:
            b2, g2 = rb[:, None], g2[..., :, None]
        ga = gb = None
        if n[0]:
            ga = _unbroadcast(g2 @ xp.swapaxes(b2, -1, -2), a2.shape).reshape(ra.shape)
        if n[1]:
            gb = _unbroadcast(xp.swapaxes(a2, -1, -2) @ g2, b2.shape).reshape(rb.shape)
        return ga, gb

    return _record("MatMul", out, (a, b), bw)


def exp(a):
    out = _xp(_raw(a)).exp(_raw(a))
    return _record("Exp", out, (a,), lambda g, n: (g * out,))


def log(a):
    ra = _raw(a)
    return _record("Log", _xp(ra).log(ra), (a,), lambda g, n: (g / ra,))


def tanh(a):
    out = _xp(_raw(a)).tanh(_raw(a))
    return _record("Tanh", out, (a,), lambda g, n: (g * (1 - out * out),))


def _extremum(a, b, largest):
    """Elementwise maximum (``largest``) or minimum: the gradient goes to the operand that wins,
    ties split it evenly (as PyTorch does)."""
    ra, rb = _raw(a), _raw(b)
    xp = _xp(ra) if _arrays.is_array(ra) else _xp(rb)
    sa, sb = _shape(ra), _shape(rb)
    out = xp.maximum(ra, rb) if largest else xp.minimum(ra, rb)

    def bw(g, n):
        wa = ((ra > rb) if largest else (ra < rb)) + 0.5 * (ra == rb)
        return (_unbroadcast(g * wa, sa) if n[0] else None,
                _unbroadcast(g * (1 - wa), sb) if n[1] else None)

    return _record("Maximum" if largest else "Minimum", out, (a, b), bw)


def maximum(a, b):
    return _extremum(a, b, True)


def minimum(a, b):
    return _extremum(a, b, False)


def where(cond, a, b):
    cond = _raw(cond)
    ra, rb = _raw(a), _raw(b)
    xp = next((_xp(v) for v in (cond, ra, rb) if _arrays.is_array(v)), np)
    cond = xp.asarray(cond)
    sa, sb = _shape(ra), _shape(rb)
    out = xp.where(cond, ra, rb)
    return _record("Where", out, (a, b), lambda g, n: (
        _unbroadcast(xp.where(cond, g, 0), sa) if n[0] else None,
        _unbroadcast(xp.where(cond, 0, g), sb) if n[1] else None))


def sum(a, axis=None, dtype=None, keepdims=False):  # noqa: A001
    ra = _raw(a)
    xp = _xp(ra)
    out = xp.sum(ra, axis=axis, dtype=dtype, keepdims=keepdims)
    shape, ndim = ra.shape, ra.ndim

    def bw(g, n):
        if not keepdims and axis is not None:
            g = xp.expand_dims(g, _norm_axes(axis, ndim))
        elif not keepdims:
            g = g.reshape((1,) * ndim)
        return (xp.broadcast_to(g, shape).copy(),)

    return _record("Sum", out, (a,), bw)


def _restore_shape(shape, axes, ndim):
    it = iter(shape)
    return tuple(1 if d in axes else next(it) for d in range(ndim))


def _extreme(op, a, axis=None, keepdims=False, global_value=None, global_sum=None):
    """max/min. The gradient is split evenly among the elements equal to the result (ties share it,
    as PyTorch's amax/amin do). ``global_value(out)`` / ``global_sum(count)`` (the ops layer gives
    them when the forward reduced over a sharded dim: collectives, run in backward on every rank)
    turn this shard's result into the global one and this shard's tie count into the global count."""
    ra = _raw(a)
    xp = _xp(ra)
    ndim = ra.ndim
    axes = _norm_axes(axis, ndim)
    if any(ra.shape[d] == 0 for d in axes):  # an empty shard: the identity (only inside a sharded reduction)
        oshape = tuple(1 if d in axes else s for d, s in enumerate(ra.shape) if keepdims or d not in axes)
        out = xp.full(oshape, identity(op, ra.dtype), dtype=ra.dtype)
    else:
        out = getattr(xp, op)(ra, axis=axes, keepdims=keepdims)

    def bw(g, n):
        full = out if global_value is None else global_value(out)
        full = xp.asarray(full).reshape(_restore_shape(xp.asarray(full).shape, axes, ndim)) if not keepdims else full
        mask = ra == full
        cnt = mask.sum(axis=axes, keepdims=True).astype(g.dtype)
        if global_sum is not None:
            c = cnt if keepdims else cnt.reshape(tuple(s for d, s in enumerate(cnt.shape) if d not in axes))
            c = xp.asarray(global_sum(c))
            cnt = c if keepdims else c.reshape(_restore_shape(c.shape, axes, ndim))
        ge = g if keepdims else g.reshape(_restore_shape(g.shape, axes, ndim))
        return (xp.where(mask, ge / xp.where(cnt == 0, 1, cnt), 0).astype(g.dtype),)

    return _record("Max" if op == "max" else "Min", out, (a,), bw)


def max(a, axis=None, keepdims=False, **kw):  # noqa: A001 - the array API's name
    return _extreme("max", a, axis, keepdims, **kw)


def min(a, axis=None, keepdims=False, **kw):  # noqa: A001
    return _extreme("min", a, axis, keepdims, **kw)


def prod(a, axis=None, dtype=None, keepdims=False, global_product=None, global_sum=None):
    """The gradient of x_i is the product of the other elements: prod/x_i without zeros; with one
    zero, the product of the others at the zero and 0 elsewhere; with more zeros, 0 everywhere.
    ``global_product`` / ``global_sum`` (from the ops layer, for a reduction over a sharded dim)
    turn this shard's product of its nonzero elements and its zero count into the global ones."""
    ra = _raw(a)
    xp = _xp(ra)
    ndim = ra.ndim
    axes = _norm_axes(axis, ndim)
    out = xp.prod(ra, axis=axes, dtype=dtype, keepdims=keepdims)

    def bw(g, n):
        zero = ra == 0
        nz = xp.where(zero, 1, ra)
        pnz = xp.asarray(xp.prod(nz, axis=axes, keepdims=keepdims))
        zc = xp.asarray(zero.sum(axis=axes, keepdims=keepdims))
        if global_product is not None:
            pnz, zc = xp.asarray(global_product(pnz)), xp.asarray(global_sum(zc))
        if not keepdims:
            pnz = pnz.reshape(_restore_shape(pnz.shape, axes, ndim))
            zc = zc.reshape(_restore_shape(zc.shape, axes, ndim))
        ge = g if keepdims else g.reshape(_restore_shape(g.shape, axes, ndim))
        gi = xp.where(zero, pnz * (zc == 1), (pnz / nz) * (zc == 0))
        return ((ge * gi).astype(g.dtype),)

    return _record("Prod", out, (a,), bw)


def abs(a):  # noqa: A001
    ra = _raw(a)
    xp = _xp(ra)
    return _record("Abs", xp.abs(ra), (a,), lambda g, n: (g * xp.sign(ra),))  # 0 at 0, as PyTorch


def sqrt(a):
    ra = _raw(a)
    out = _xp(ra).sqrt(ra)
    return _record("Sqrt", out, (a,), lambda g, n: (g * 0.5 / out,))


def sin(a):
    ra = _raw(a)
    xp = _xp(ra)
    return _record("Sin", xp.sin(ra), (a,), lambda g, n: (g * xp.cos(ra),))


def cos(a):
    ra = _raw(a)
    xp = _xp(ra)
    return _record("Cos", xp.cos(ra), (a,), lambda g, n: (-g * xp.sin(ra),))


def positive(a):
    return _record("Pos", +_raw(a), (a,), lambda g, n: (g,))


def mean(a, axis=None, dtype=None, keepdims=False):
    ra = _raw(a)
    count = 1
    for ax in _norm_axes(axis, ra.ndim):
        count *= ra.shape[ax]
    s = sum(a, axis=axis, dtype=dtype, keepdims=keepdims)
    return multiply(s, 1.0 / count) if count else s


def reshape(a, *shape, **kw):
    if "newshape" in kw:
        shape = (kw.pop("newshape"),)
    if "shape" in kw:
        shape = (kw.pop("shape"),)
    if kw:
        raise NotImplementedError(f"reshape: arguments {sorted(kw)} are not supported for tracked arrays")
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    ra = _raw(a)
    return _record("Reshape", ra.reshape(shape), (a,), lambda g, n: (g.reshape(ra.shape),))


def permute_dims(a, axes=None):
    ra = _raw(a)
    if axes is None:
        axes = tuple(range(ra.ndim))[::-1]
    axes = tuple(int(x) % ra.ndim for x in axes) if ra.ndim else ()
    inv = tuple(int(i) for i in np.argsort(axes))
    return _record("Transpose", ra.transpose(axes), (a,), lambda g, n: (g.transpose(inv),))


def matrix_transpose(a):
    ra = _raw(a)
    axes = tuple(range(ra.ndim - 2)) + (ra.ndim - 1, ra.ndim - 2)
    return permute_dims(a, axes)


def astype(a, dtype, copy=True):
    ra = _raw(a)
    return _record("Cast", ra.astype(dtype), (a,), lambda g, n: (g.astype(ra.dtype),))


def concat(arrays, axis=0):
    arrays = list(arrays)
    raws = [_raw(x) for x in arrays]
    xp = _xp(raws[0])
    if axis is None:
        return concat([reshape(x, -1) for x in arrays], 0)
    out = xp.concatenate(raws, axis=axis)
    ax = int(axis) % out.ndim
    sizes = [r.shape[ax] for r in raws]

    def bw(g, n):
        res, off = [], 0
        for s, need in zip(sizes, n):
            idx = (slice(None),) * ax + (slice(off, off + s),)
            res.append(g[idx] if need else None)
            off += s
        return res

    return _record("Concat", out, arrays, bw)


def stack(arrays, axis=0):
    arrays = list(arrays)
    raws = [_raw(x) for x in arrays]
    xp = _xp(raws[0])
    out = xp.stack(raws, axis=axis)
    ax = int(axis) % out.ndim

    def bw(g, n):
        return [xp.take(g, i, axis=ax) if need else None for i, need in enumerate(n)]

    return _record("Stack", out, arrays, bw)


def _is_basic_index(idx):
    items = idx if isinstance(idx, tuple) else (idx,)
    for i in items:
        if not (i is None or i is Ellipsis or isinstance(i, (slice, int, np.integer))):
            return False
    return True


def _unwrap_index(idx):
    if type(idx) is Tracked:
        return idx.data
    if isinstance(idx, tuple):
        return tuple(i.data if type(i) is Tracked else i for i in idx)
    return idx


def getitem(a, idx):
    ra = _raw(a)
    idx = _unwrap_index(idx)
    out = ra[idx]

    def bw(g, n):
        xp = _xp(g)
        z = xp.zeros(ra.shape, dtype=g.dtype)
        if _is_basic_index(idx) or (getattr(idx, "dtype", None) is not None and idx.dtype == bool):
            z[idx] = g  # basic (and boolean) indexing selects each element at most once
        elif xp is np:
            np.add.at(z, idx, g)  # advanced indexing may select an element twice: accumulate
        else:
            fix = lambda i: xp.asarray(i) if isinstance(i, list) else i  # noqa: E731
            ix = tuple(map(fix, idx)) if isinstance(idx, tuple) else fix(idx)
            at = getattr(xp.add, "at", None)
            if at is not None:
                at(z, ix, g)
            else:
                import cupyx

                cupyx.scatter_add(z, ix, g)
        return (z,)

    return _record("Index", out, (a,), bw)


# ------------------------------------------------------------------------------------------------
# the Tracked array
# ------------------------------------------------------------------------------------------------
class Tracked:
    """A local array (``.data``, NumPy or CuPy) whose operations are recorded for ``backward``.

    Create leaves with :func:`mpilocal.autograd.tensor` (``requires_grad=True``); ``local_map``
    creates them for DTensor inputs that require grad, and ``DTensor.to_local()`` returns one for
    such a DTensor. ``.grad`` (leaves only) is a plain array; ``.detach()`` gives the plain array.
    """

    __slots__ = ("data", "_node", "_idx", "grad", "__weakref__")
    __array_priority__ = 1000  # NumPy/CuPy binary operators defer to ours

    def __init__(self, data, requires_grad=False):
        if type(data) is Tracked:
            data = data.data
        if isinstance(data, np.generic):  # NumPy reductions give scalars; keep 0-d arrays
            data = np.asarray(data)
        if not _arrays.is_array(data):
            raise TypeError(f"Tracked: data must be a NumPy or CuPy array, got {type(data).__name__}")
        self.data = data
        self._node = None
        self._idx = 0
        self.grad = None
        if requires_grad:
            self.requires_grad_(True)

    # -- autograd API --------------------------------------------------------------------------
    @property
    def requires_grad(self) -> bool:
        return self._node is not None

    @property
    def is_leaf(self) -> bool:
        return self._node is None or type(self._node) is Leaf

    @property
    def grad_fn(self):
        return None if self.is_leaf else self._node

    def requires_grad_(self, requires_grad=True):
        if requires_grad:
            if self._node is None:
                self._node = Leaf(self, _add_arrays, _zeros_of(self.data))
        elif not self.is_leaf:
            raise RuntimeError("requires_grad_(False): only leaves can stop requiring grad; use .detach()")
        else:
            self._node = None
        return self

    def detach(self):
        """The plain array (shares memory; no gradient flows through it)."""
        return self.data

    def backward(self, gradient=None):
        """Accumulate gradients into the leaves this value depends on (``gradient=None``: ones).

        **Collective** when the graph holds collectives or DTensor operations: every rank must call it.
        """
        if self._node is None:
            raise RuntimeError("backward: this array does not require grad and has no grad_fn")
        if gradient is None:
            gradient = _xp(self.data).ones_like(self.data)
        else:
            gradient = _raw(gradient)
            if tuple(gradient.shape) != tuple(self.data.shape):
                raise ValueError(f"backward: gradient has shape {tuple(gradient.shape)} but the output has "
                                 f"shape {tuple(self.data.shape)}")
        run_backward(self._node, self._idx, gradient)

    # -- array attributes ----------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    T = property(lambda self: permute_dims(self))
    mT = property(lambda self: matrix_transpose(self))

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        return (self[i] for i in range(len(self.data)))

    def __repr__(self):
        fn = "" if self.is_leaf else f", grad_fn={self._node!r}"
        rg = ", requires_grad=True" if self._node is not None else ""
        return f"Tracked({self.data!r}{rg}{fn})"

    def item(self):
        return self.data.item()

    def __float__(self):
        return float(self.data)

    def __int__(self):
        return int(self.data)

    def __bool__(self):
        return bool(self.data)

    def __array__(self, *a, **k):
        raise TypeError(
            f"a Tracked array cannot be converted to a plain array implicitly (its gradient would be lost "
            f"silently). {_origin()} Use .detach() for the values (it shares memory and records nothing), or a "
            f"supported operation / mpilocal.autograd.Function"
        )

    def __array_namespace__(self, api_version=None):
        return namespace_for(_xp(self.data))

    # -- methods -------------------------------------------------------------------------------
    def sum(self, axis=None, dtype=None, keepdims=False):
        return sum(self, axis=axis, dtype=dtype, keepdims=keepdims)

    def mean(self, axis=None, dtype=None, keepdims=False):
        return mean(self, axis=axis, dtype=dtype, keepdims=keepdims)

    def reshape(self, *shape, **kw):
        return reshape(self, *shape, **kw)

    def transpose(self, *axes):
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
            axes = axes[0]
        return permute_dims(self, axes or None)

    def astype(self, dtype, copy=True):
        return astype(self, dtype)

    def __getitem__(self, idx):
        return getitem(self, idx)

    def __setitem__(self, idx, value):
        raise NotImplementedError(f"Tracked.__setitem__: {_inplace_advice()}")

    def _inplace(self, op, other):
        # a leaf, or the view of a DTensor's shard (to_local / a local_map input): writing a new array
        # into the name would leave the data unchanged while the code reads as an update. Raise.
        node = self._node
        if node is not None and (type(node) is Leaf or node.name == "ToLocal"):
            raise NotImplementedError(f"Tracked in-place {op}: {_inplace_advice()}")
        return _INPLACE[op](self, other)  # an intermediate result: out of place, the name is rebound

    __iadd__ = lambda self, o: self._inplace("+=", o)  # noqa: E731
    __isub__ = lambda self, o: self._inplace("-=", o)  # noqa: E731
    __imul__ = lambda self, o: self._inplace("*=", o)  # noqa: E731
    __itruediv__ = lambda self, o: self._inplace("/=", o)  # noqa: E731
    __ipow__ = lambda self, o: self._inplace("**=", o)  # noqa: E731
    __imatmul__ = lambda self, o: self._inplace("@=", o)  # noqa: E731

    __add__ = lambda self, o: add(self, o)  # noqa: E731
    __radd__ = lambda self, o: add(o, self)  # noqa: E731
    __sub__ = lambda self, o: subtract(self, o)  # noqa: E731
    __rsub__ = lambda self, o: subtract(o, self)  # noqa: E731
    __mul__ = lambda self, o: multiply(self, o)  # noqa: E731
    __rmul__ = lambda self, o: multiply(o, self)  # noqa: E731
    __truediv__ = lambda self, o: divide(self, o)  # noqa: E731
    __rtruediv__ = lambda self, o: divide(o, self)  # noqa: E731
    __matmul__ = lambda self, o: matmul(self, o)  # noqa: E731
    __rmatmul__ = lambda self, o: matmul(o, self)  # noqa: E731
    __pow__ = lambda self, o: pow(self, o)  # noqa: E731
    __rpow__ = lambda self, o: pow(o, self)  # noqa: E731
    __neg__ = lambda self: negative(self)  # noqa: E731
    __pos__ = lambda self: self  # noqa: E731

    # comparisons: plain boolean arrays (no gradient)
    __lt__ = lambda self, o: self.data < _raw(o)  # noqa: E731
    __le__ = lambda self, o: self.data <= _raw(o)  # noqa: E731
    __gt__ = lambda self, o: self.data > _raw(o)  # noqa: E731
    __ge__ = lambda self, o: self.data >= _raw(o)  # noqa: E731
    __eq__ = lambda self, o: self.data == _raw(o)  # noqa: E731
    __ne__ = lambda self, o: self.data != _raw(o)  # noqa: E731
    __hash__ = object.__hash__

    # -- NumPy protocols: np.exp(t), np.matmul(t, w), np.sum(t) on NumPy shards --------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        name = ufunc.__name__
        if method != "__call__" or kwargs.get("out") is not None or kwargs.get("where", True) is not True:
            raise NotImplementedError(f"numpy.{name}.{method} (or out=/where=) is not differentiable in mpilocal.autograd")
        kwargs.pop("out", None)
        kwargs.pop("where", None)
        if name in _COMPARE:
            return ufunc(*[_raw(i) for i in inputs], **kwargs)
        fn = _UFUNCS.get(name)
        if fn is None or kwargs:
            raise _unsupported(f"numpy.{name}" + (f" with {sorted(kwargs)}" if fn is not None else ""))
        return fn(*inputs)

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__
        if name in NOT_DIFFERENTIABLE:  # np.any/np.all: plain results from the values (no gradient)
            return func(*[_raw(a) for a in args], **kwargs)
        fn = _FUNCTIONS.get(name)
        if fn is None:
            raise _unsupported(f"numpy.{name}")
        return fn(*args, **kwargs)


def _add_arrays(a, b):
    return a + b


def tensor(data, requires_grad=False):
    """A :class:`Tracked` leaf around a NumPy/CuPy array (like ``torch.tensor(..., requires_grad=)``)."""
    return Tracked(data, requires_grad=requires_grad)


def _origin() -> str:
    """Where the Tracked array an error is about came from (inside local_map or not)."""
    if LOCAL_MAP_DEPTH > 0:
        return "It is Tracked because a local_map input requires grad."
    return ("It is Tracked because it comes from a DTensor that requires grad (to_local() and full_tensor() of "
            "such a DTensor return Tracked arrays, which record operations for backward) or from "
            "mpilocal.autograd.tensor(..., requires_grad=True).")


def _inplace_advice() -> str:
    if LOCAL_MAP_DEPTH > 0:
        return (f"in-place writes into a Tracked array are not recorded for gradients. {_origin()} Build the new "
                f"value out of place (where/concat/stack, y = x + 1) or write a mpilocal.autograd.Function; where "
                f"no gradient is needed, write into x.detach() (it shares memory)")
    return (
        f"in-place writes into a Tracked array are not recorded for gradients. {_origin()} To change the values "
        f"without a gradient (an optimizer step such as W.to_local()[...] -= lr * g), write into the plain "
        f"array: W.detach().to_local()[...] -= lr * g, or x.detach()[...] = ... (.detach() shares memory, so "
        f"the DTensor changes)"
    )


def _unsupported(what):
    return NotImplementedError(
        f"{what} is not differentiable in mpilocal.autograd and received a Tracked array. {_origin()} "
        f"Supported: {OPERATORS}, and {', '.join(SUPPORTED)}. For plain values use .detach() (it shares "
        f"memory and records nothing; e.g. numpy.allclose(x.detach(), y), or DTensor.detach().full_tensor()); "
        f"for a gradient through {what}, write a mpilocal.autograd.Function with forward/backward"
    )


#: the one table of supported differentiable functions (array-API name -> rule); the namespace of
#: Tracked arrays, NumPy's protocols and SUPPORTED are built from it
_FUNCS = {"matmul": matmul, "exp": exp, "log": log, "tanh": tanh, "maximum": maximum, "where": where, "sum": sum,
          "mean": mean, "concat": concat, "concatenate": concat, "stack": stack, "add": add, "subtract": subtract,
          "multiply": multiply, "divide": divide, "negative": negative, "pow": pow, "reshape": reshape,
          "permute_dims": permute_dims, "transpose": permute_dims, "matrix_transpose": matrix_transpose,
          "astype": astype, "max": max, "min": min, "prod": prod, "abs": abs, "sqrt": sqrt, "sin": sin, "cos": cos,
          "minimum": minimum, "positive": positive}
SUPPORTED = tuple(_FUNCS)
_INPLACE = {"+=": add, "-=": subtract, "*=": multiply, "/=": divide, "**=": pow, "@=": matmul}
#: the one table of operations with no gradient (PyTorch: their results do not require grad): on
#: Tracked arrays they return plain arrays; mpilocal.ops runs them on the values of DTensors that
#: require grad (the graph is not touched); the namespace of Tracked arrays passes them through
NOT_DIFFERENTIABLE = frozenset({
    "less", "less_equal", "greater", "greater_equal", "equal", "not_equal", "isnan", "isfinite", "isinf", "sign",
    "signbit", "logical_not", "logical_and", "logical_or", "logical_xor", "any", "all"})
_COMPARE = NOT_DIFFERENTIABLE
# NumPy's protocols, derived from the table: each entry under its own name and NumPy's name for it
# (np.abs is the ufunc "absolute", np.concat the function "concatenate", ...), ufuncs apart
_UFUNCS, _FUNCTIONS = {}, {}
for _name, _fn in _FUNCS.items():
    _np = getattr(np, _name, None)
    if _np is not None:
        _table = _UFUNCS if isinstance(_np, np.ufunc) else _FUNCTIONS
        _table[_name] = _table[getattr(_np, "__name__", _name)] = _fn
del _name, _fn, _np, _table
_UFUNCS.update({"absolute": abs, "true_divide": divide, "power": pow})  # NumPy's other spellings
_FUNCTIONS.update({"amax": max, "amin": min})
_FUNCTIONS.update({"shape": lambda a: a.shape, "ndim": lambda a: a.ndim,
                   "size": lambda a, axis=None: a.size if axis is None else a.shape[axis]})


# ------------------------------------------------------------------------------------------------
# the array namespace of tracked arrays
# ------------------------------------------------------------------------------------------------
_PASS = {"float16", "float32", "float64", "complex64", "complex128", "int8", "int16", "int32", "int64",
         "uint8", "uint16", "uint32", "uint64", "bool", "bool_", "pi", "e", "inf", "nan", "newaxis",
         "zeros", "ones", "empty", "full", "arange", "eye", "linspace", "finfo", "iinfo", "isdtype",
         "result_type", "can_cast", "dtype", "ndarray", "__name__"}
_LIKE = {"zeros_like", "ones_like", "empty_like", "full_like"}


class TrackedNamespace:
    """``x.__array_namespace__()`` for a Tracked ``x``: the supported differentiable functions; array
    creation, dtypes, constants and comparisons pass through to NumPy/CuPy; anything else raises
    ``NotImplementedError`` naming it."""

    def __init__(self, xp):
        self._xp = xp


    def asarray(self, x, *a, **k):
        return x if type(x) is Tracked else self._xp.asarray(x, *a, **k)

    def __getattr__(self, name):
        xp = self.__dict__["_xp"]
        if name in _PASS:
            return getattr(xp, name)
        if name in NOT_DIFFERENTIABLE:  # plain results from the values (no gradient)
            f = getattr(xp, name)
            return lambda *a, **k: f(*[_raw(x) for x in a], **k)
        if name in _LIKE:
            f = getattr(xp, name)
            return lambda x, *a, **k: f(_raw(x), *a, **k)
        raise _unsupported(f"{xp.__name__}.{name}")

    def __repr__(self):
        return f"<mpilocal.autograd namespace over {self._xp.__name__}>"


for _name, _fn in _FUNCS.items():
    setattr(TrackedNamespace, _name, staticmethod(_fn))
del _name, _fn

_NAMESPACES: dict = {}


def namespace_for(xp):
    ns = _NAMESPACES.get(xp)
    if ns is None:
        ns = _NAMESPACES[xp] = TrackedNamespace(xp)
    return ns

