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
