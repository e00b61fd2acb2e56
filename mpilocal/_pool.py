"""Recycled host memory for the NumPy arrays collectives return.

A collective returns a new array every call; for large arrays the fresh pages cost more than the
transfer (on a VM, ``MPI_Allreduce`` of 1 MiB into a new array took 3x as long as into a reused
one: page faults). This pool hands out arrays whose memory comes back to it when the last array or
view using it dies (the ``__del__`` of the owner object that NumPy keeps as ``.base``), so a
loop of collectives reuses warm pages, as a caching allocator does. Arrays below
:data:`MIN_BYTES` come from ``np.empty`` (NumPy's own small-block cache is better there).

``MPILOCAL_POOL_BYTES`` caps the idle memory kept (default 1 GiB; 0 turns the pool off).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["empty", "MIN_BYTES"]

MIN_BYTES = 256 << 10
_PAGE = 4096
_CAP = int(float(os.environ.get("MPILOCAL_POOL_BYTES", 1 << 30)))
_free: dict = {}  # rounded nbytes -> [(uint8 store, its __array_interface__)]
_idle = [0]


class _Block:
    """Owner of one store while arrays use it (NumPy keeps it as the arrays' base). It exports
    the store's bytes; the array of the requested dtype is built over them with ``np.ndarray``, which
    keeps any dtype exactly (structured dtypes with padding or out-of-order fields included, which
    an ``__array_interface__`` descr would rewrite). Its ``__del__`` gives the store back (cheaper
    than a ``weakref.finalize`` per array: about 1 µs per pooled array instead of 4)."""

    __slots__ = ("store", "size", "__array_interface__")

    def __init__(self, store, size, iface):
        self.store = store
        self.size = size
        self.__array_interface__ = iface

    def __del__(self):
        try:
            _give_back(self.store, self.size, self.__array_interface__)
        except Exception:  # pragma: no cover - interpreter shutdown: module globals already gone
            pass


def _give_back(store, size, iface):
    if _idle[0] + size <= _CAP:
        _free.setdefault(size, []).append((store, iface))
        _idle[0] += size


def empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous NumPy array, from the pool when it is large."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if nbytes < MIN_BYTES or _CAP <= 0 or dtype.hasobject:
        return np.empty(shape, dtype)
    size = -(-nbytes // _PAGE) * _PAGE
    stores = _free.get(size)
    if stores:
        store, iface = stores.pop()
        _idle[0] -= size
    else:
        store = np.empty(size, np.uint8)
        iface = {"data": (store.ctypes.data, False), "shape": (size,), "typestr": "|u1", "version": 3}
    return np.ndarray(shape, dtype, buffer=np.asarray(_Block(store, size, iface)))
