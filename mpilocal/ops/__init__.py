"""Operators on DTensors with sharding propagation (a layer above :mod:`mpilocal.dtensor`).

Importing this package registers the operators with DTensor (``dtensor._OPERATORS`` for the
Python operators and NumPy's protocols, ``dtensor._METHODS`` for methods such as ``sum`` and
``T``); ``mpilocal`` imports it last. The rules are in :mod:`.rules`, the execution in
:mod:`.dispatch`; see docs/operators.md.
"""

from __future__ import annotations

import numpy as np

from .. import dtensor as _dt
from ..autograd import engine as _engine
from ..dtensor import DTensor
from . import dispatch, rules
from .dispatch import (astype, concat, elementwise, getitem, matmul, permute_dims, record_plans, reduce, reshape,
                       stack, unsupported, where)

__all__ = ["rules", "dispatch", "elementwise", "reduce", "matmul", "permute_dims", "reshape", "astype", "getitem",
           "concat", "stack", "where", "record_plans", "namespace"]

# ------------------------------------------------------------------------------------------------
# Python operators
# ------------------------------------------------------------------------------------------------
_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "truediv": "divide", "floordiv": "floor_divide",
           "mod": "remainder", "pow": "pow", "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor",
           "lshift": "bitwise_left_shift", "rshift": "bitwise_right_shift"}
_COMPARE = {"__eq__": "equal", "__ne__": "not_equal", "__lt__": "less", "__le__": "less_equal",
            "__gt__": "greater", "__ge__": "greater_equal"}
_UNARY = {"__neg__": "negative", "__pos__": "positive", "__abs__": "abs", "__invert__": "bitwise_invert"}


def _operand_ok(other):
    return type(other) is DTensor or dispatch._is_scalar(other) or isinstance(other, (list, tuple)) or \
        dispatch._arrays.is_array(other)


def _binary(fname, reflected):
    def op(self, other):
        if not _operand_ok(other):
            return NotImplemented
        return elementwise(fname, other, self) if reflected else elementwise(fname, self, other)

    return op


def _compare(fname):
    def op(self, other):
        if other is None or isinstance(other, (str, bytes)) or not _operand_ok(other):
            return NotImplemented  # == / != fall back to identity, as for any object
        return elementwise(fname, self, other)

    return op


def _inplace(fname, sym):
    """``x op= y``. PyTorch's rules: on a leaf that requires grad it raises (outside no_grad); on a
    DTensor in a graph, or when ``y`` requires grad, the op is recorded: ``x`` then stands for the
    new value (computed out of place, so the values saved for an earlier op's backward stay intact)
    and backward runs through it. ``x`` whose shard a recorded op keeps as a constant for its
    backward (``z = x_grad * a; a += 1``) is also rebound to a new array, so backward reads the value
    of the forward (PyTorch raises there instead, through version counters). Otherwise the result is
    written into ``x``'s shard. Either way the result must keep ``x``'s placements, shape and
    (same_kind-castable) dtype. See docs/operators.md, "In place"."""

    def op(self, other):
        if not _operand_ok(other):
            return NotImplemented
        grad = _engine.is_grad_enabled()
        if grad and self._ag is not None and self._ag.is_leaf:
            raise RuntimeError(
                f"DTensor {sym}= ...: a leaf Variable that requires grad is being used in an in-place operation "
                f"(PyTorch's rule: the update would not be recorded for the gradient of the leaf). For an "
                f"update without gradient (an optimizer step such as w -= lr * w.grad) do it under "
                f"`with mpilocal.no_grad():`, or on the values: d = w.detach(); d {sym}= ... (detach shares the shard); "
                f"to keep it in the graph, write y = x {sym} ... (out of place)")
        out = matmul(self, other) if fname == "matmul" else elementwise(fname, self, other)
        if out._placements != self._placements or tuple(out.shape) != tuple(self.shape):
            raise RuntimeError(
                f"DTensor {sym}= ...: the result has placements {out._placements} and shape {tuple(out.shape)}, "
                f"but the target has {self._placements} and {tuple(self.shape)}; in place needs the same. Write "
                f"x = x {sym} y, or redistribute first: x = (x {sym} y).redistribute(placements=...)")
        if not np.can_cast(out.dtype, self.dtype, "same_kind"):
            raise TypeError(f"DTensor {sym}= ...: cannot cast the result ({out.dtype}) to the target's dtype "
                            f"{self.dtype} (NumPy's same_kind rule)")
        if (grad and out._ag is not None) or dispatch.saved_for_backward(self):
            # recorded (a non-leaf, or an operand that requires grad), or a shard an earlier recorded op
            # keeps for its backward: a new array, so no saved value changes under the graph
            if out.dtype != self.dtype:
                out = astype(out, self.dtype)
            self._local, self._ag = out._local, out._ag
            return self
        self._local[...] = out._local
        return self

    return op


def _register():
    ops = _dt._OPERATORS
    for base, fname in _BINARY.items():
        ops[f"__{base}__"] = _binary(fname, False)
        ops[f"__r{base}__"] = _binary(fname, True)
        ops[f"__i{base}__"] = _inplace(fname, _dt._BINARY[base])
    ops["__matmul__"] = lambda a, b: matmul(a, b) if _operand_ok(b) else NotImplemented
    ops["__rmatmul__"] = lambda a, b: matmul(b, a) if _operand_ok(b) else NotImplemented
    ops["__imatmul__"] = _inplace("matmul", "@")
    ops["__divmod__"] = lambda a, b: (elementwise("floor_divide", a, b), elementwise("remainder", a, b))
    ops["__rdivmod__"] = lambda a, b: (elementwise("floor_divide", b, a), elementwise("remainder", b, a))
    for name, fname in _COMPARE.items():
        ops[name] = _compare(fname)
    for name, fname in _UNARY.items():
        ops[name] = (lambda f: lambda a: elementwise(f, a))(fname)
    ops["__getitem__"] = getitem
    ops["__array_ufunc__"] = _array_ufunc
    ops["__array_function__"] = _array_function
    ops["__array_namespace__"] = lambda self, api_version=None: namespace
    meths = _dt._METHODS
    for red in ("sum", "mean", "max", "min", "prod", "any", "all"):
        def m(self, axis=None, keepdims=False, dtype=None, _r=red, **kw):
            if "dim" in kw:  # PyTorch's spelling
                axis = kw.pop("dim")
            if "keepdim" in kw:
                keepdims = kw.pop("keepdim")
            if kw:
                raise TypeError(f"DTensor.{_r}: unexpected arguments {sorted(kw)}")
            return reduce(_r, self, axis, keepdims, dtype)
        meths[red] = m
    meths["T"] = property(lambda self: permute_dims(self))
    meths["mT"] = property(lambda self: permute_dims(self, tuple(range(self.ndim - 2)) + (self.ndim - 1,
                                                                                           self.ndim - 2)))
    meths["transpose"] = lambda self, *axes: permute_dims(
        self, _transpose_axes(self, axes))
    meths["permute"] = lambda self, *axes: permute_dims(self, axes[0] if len(axes) == 1 and isinstance(
        axes[0], (tuple, list)) else axes)
    meths["reshape"] = reshape
    meths["view"] = reshape
    meths["astype"] = astype
    meths["relu"] = lambda self: elementwise("maximum", self, 0)
    for u in ("exp", "log", "tanh", "sqrt", "sin", "cos", "abs"):
        meths[u] = (lambda f: lambda self: elementwise(f, self))(u)
    meths["matmul"] = matmul


def _transpose_axes(x, axes):
    """``x.transpose()`` reverses; ``x.transpose(a, b)`` on an array of ndim > 2 swaps two dims
    (PyTorch's meaning) unless a full permutation is given (NumPy's)."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    if not axes:
        return None
    if len(axes) == 2 and x.ndim != 2:
        perm = list(range(x.ndim))
        a, b = (int(v) % x.ndim for v in axes)
        perm[a], perm[b] = perm[b], perm[a]
        return tuple(perm)
    return tuple(axes)


# ------------------------------------------------------------------------------------------------
# NumPy protocols
# ------------------------------------------------------------------------------------------------
_UFUNC_NAMES = {"true_divide": "divide", "power": "pow", "absolute": "abs", "left_shift": "bitwise_left_shift",
                "right_shift": "bitwise_right_shift", "invert": "bitwise_invert"}


def _array_ufunc(ufunc, method, *inputs, **kwargs):
    name = ufunc.__name__
    if method != "__call__" or kwargs.get("out") is not None or kwargs.get("where", True) is not True:
        raise unsupported(f"numpy.{name}.{method}" + (" with out=/where=" if method == "__call__" else ""))
    kwargs.pop("out", None)
    kwargs.pop("where", None)
    if kwargs:
        raise unsupported(f"numpy.{name} with {sorted(kwargs)}")
    if name == "matmul":
        return matmul(*inputs)
    if name == "divmod":
        return (elementwise("floor_divide", *inputs), elementwise("remainder", *inputs))
    return elementwise(_UFUNC_NAMES.get(name, name), *inputs)


def _red_fn(op):
    def f(a, axis=None, dtype=None, out=None, keepdims=False, **kw):
        if out is not None or kw:
            raise unsupported(f"numpy.{op} with out=/{sorted(kw)}")
        return reduce(op, a, axis, keepdims, dtype)

    return f


_FUNCTIONS = {
    "sum": _red_fn("sum"), "mean": _red_fn("mean"), "max": _red_fn("max"), "amax": _red_fn("max"),
    "min": _red_fn("min"), "amin": _red_fn("min"), "prod": _red_fn("prod"), "any": _red_fn("any"),
    "all": _red_fn("all"), "where": lambda c, a, b: where(c, a, b), "matmul": lambda a, b: matmul(a, b),
    "dot": lambda a, b: matmul(a, b), "concatenate": lambda arrs, axis=0: concat(arrs, axis),
    "concat": lambda arrs, axis=0: concat(arrs, axis), "stack": lambda arrs, axis=0: stack(arrs, axis),
    "transpose": lambda a, axes=None: permute_dims(a, axes), "permute_dims": lambda a, axes=None: permute_dims(a, axes),
    "reshape": lambda a, shape=None, **kw: reshape(a, kw.get("newshape", shape)),
    "shape": lambda a: tuple(a.shape), "ndim": lambda a: a.ndim,
}


def _array_function(func, types, args, kwargs):
    name = func.__name__
    f = _FUNCTIONS.get(name)
    if f is None:
        raise unsupported(f"numpy.{name}")
    if name == "dot" and any(getattr(a, "ndim", 2) > 2 for a in args[:2]):
        raise unsupported("numpy.dot of arrays of ndim > 2 (use matmul)")
    return f(*args, **kwargs)


class _Namespace:
    """``x.__array_namespace__()`` of a DTensor: array-API functions that return DTensors, for NumPy
    and CuPy shards alike."""

    __name__ = "mpilocal.ops.namespace"

    def __getattr__(self, name):
        if name in _FUNCTIONS:
            return _FUNCTIONS[name]
        if name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool", "pi",
                    "e", "inf", "nan", "newaxis", "complex64", "complex128", "uint16", "uint32", "uint64"):
            return getattr(np, name)
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kw: elementwise(name, *args, **kw)

    @staticmethod
    def astype(x, dtype, copy=True):
        return astype(x, dtype, copy)

    @staticmethod
    def matrix_transpose(x):
        return permute_dims(x, tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2))

    def __repr__(self):
        return "<mpilocal.ops array namespace over DTensors>"


namespace = _Namespace()

_register()
