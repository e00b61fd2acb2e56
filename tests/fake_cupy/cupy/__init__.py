"""A NumPy-backed stand-in for CuPy, for exercising mpilocal's GPU transports' logic on a machine
without a GPU (development only; never used on the GPU machine). Arrays live in host memory,
"device pointers" are host addresses, streams are synchronous, and cupy.cuda.nccl is emulated over
mpi4py. Put tests/fake_cupy on PYTHONPATH to use it."""
import sys as _sys

import numpy as _np

from . import cuda  # noqa: F401

__version__ = "0.0-fake"
_FAKE = True


class _Data:
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


class ndarray(_np.ndarray):
    @property
    def data(self):
        return _Data(self.ctypes.data if self.size else 0)

    def set(self, a):
        self[...] = a

    def __getitem__(self, key):
        r = super().__getitem__(key)  # CuPy indexing gives 0-d arrays, never NumPy scalars
        return r if isinstance(r, _np.ndarray) else _np.asarray(r).view(ndarray)

    def fill(self, value):
        # CuPy's fill memsets the array when value == 0 (so -0.0 fills +0.0)
        if isinstance(value, _np.ndarray):
            value = value.astype(self.dtype, copy=False).item()
        if value == 0 and self.flags.c_contiguous:
            _np.ndarray.fill(self.view(_np.ndarray).reshape(-1).view(_np.uint8), 0)
        else:
            _np.ndarray.fill(self, value)

    def get(self):
        return _np.array(self).view(_np.ndarray)

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        return super().__array_wrap__(obj, context, return_scalar)


def _wrap(x):
    if isinstance(x, _np.ndarray) and not isinstance(x, ndarray):
        return x.view(ndarray)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _unwrap(x):
    return x.view(_np.ndarray) if isinstance(x, ndarray) else x


def get_default_memory_pool():
    return cuda._Pool()


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """Like cupy.array: native byte order only (CuPy converts other byte orders), and a 0-d result
    is made with fill() (CuPy's _array_default), which turns -0.0 into +0.0."""
    if isinstance(obj, ndarray):
        a = _np.array(_unwrap(obj), dtype=dtype, copy=copy, order=order, ndmin=ndmin)
        return a.view(ndarray)
    a = _np.array(obj, dtype=dtype, order=order, ndmin=ndmin)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.ndim == 0:
        out = _np.empty((), a.dtype).view(ndarray)
        out.fill(a)
        return out
    return _np.array(a, copy=True).view(ndarray)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or _np.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype, copy=False, order=order or "K")


def asnumpy(x):
    return _np.array(_unwrap(x))


def __getattr__(name):
    f = getattr(_np, name)
    if callable(f) and not isinstance(f, type):
        def g(*a, **k):
            if "out" in k:
                return f(*a, **k)
            return _wrap(f(*a, **k))
        g.__name__ = name
        globals()[name] = g
        return g
    return f
