"""Creation functions and counter-based random numbers that do not depend on the layout.

``mpilocal.rand(4, 6, device_mesh=mesh, placements=[Shard(0)])``: element ``i`` (row-major global
index) is Philox4x32-10 of the counter ``(i mod 2^32, i div 2^32, call mod 2^32, call div 2^32)``
under the key ``(seed mod 2^32, seed div 2^32)``, where ``call`` counts the random calls since
:func:`manual_seed`. Each rank computes only its own elements, so ``full_tensor()`` is the same
for any mesh, any placements and any number of ranks, one process included. The arithmetic is
the same 32x32->64-bit integer arithmetic on NumPy and CuPy, so CPU and GPU streams match bit for
bit in the integers; ``rand`` in float32/float64 matches exactly, ``randn`` (log, sqrt, cos) to
the last ulps of each library's math functions.
"""

from __future__ import annotations

import math

import numpy as np

from .. import collectives
from ..dtensor import DTensor, _check_mesh, _default_mesh, norm_placements as _placements
from ..layout import local_shape_and_offset
from ..placement import Replicate

__all__ = ["philox4x32", "manual_seed", "initial_seed", "zeros", "ones", "full", "empty", "rand", "randn",
           "random_values"]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF

_STATE = {"seed": 0, "calls": 0}


def philox4x32(c0, c1, c2, c3, k0, k1, xp=np, rounds=10):
    """Philox4x32-``rounds`` (Salmon et al., SC'11) on arrays of uint64 holding 32-bit words."""
    c0, c1, c2, c3 = (xp.asarray(c, dtype=xp.uint64) & _MASK for c in (c0, c1, c2, c3))
    k0, k1 = int(k0) & _MASK, int(k1) & _MASK
    for _ in range(rounds):
        p0 = c0 * xp.uint64(_M0)
        p1 = c2 * xp.uint64(_M1)
        hi0, lo0 = p0 >> xp.uint64(32), p0 & xp.uint64(_MASK)
        hi1, lo1 = p1 >> xp.uint64(32), p1 & xp.uint64(_MASK)
        c0, c1, c2, c3 = hi1 ^ c1 ^ xp.uint64(k0), lo1, hi0 ^ c3 ^ xp.uint64(k1), lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def manual_seed(seed: int) -> None:
    """Seed the DTensor random functions. **Collective** over the world (a small metadata
    all-gather): every rank must pass the same seed, else every rank raises ``ValueError``.
    Restarts the sequence of random calls."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 64:
        raise TypeError(f"mpilocal.manual_seed: seed must be an int in [0, 2**64), got {seed!r}")
    mesh = _default_mesh("cpu")
    vec = np.array([int(seed) & _MASK, int(seed) >> 32], dtype=np.int64)
    rows = collectives.meta_allgather(mesh._metadata_comm(), vec, "manual_seed")
    seeds = sorted({(int(r[0]) | (int(r[1]) << 32)) for r in np.asarray(rows).reshape(len(rows), -1)})
    if len(seeds) != 1:
        raise ValueError(f"mpilocal.manual_seed: ranks passed different seeds {seeds}; pass the same seed on every "
                         f"rank (random DTensors are the same global array whatever the layout)")
    _STATE["seed"], _STATE["calls"] = int(seed), 0


def initial_seed() -> int:
    return _STATE["seed"]


def _xp_of_mesh(mesh):
    if mesh.device_type == "cuda":
        import cupy

        return cupy
    return np


def _global_index(shape, offset, lshape, xp):
    """Row-major global linear indices (int64... as uint64) of the local block."""
    idx = xp.zeros(lshape, dtype=xp.uint64)
    stride = 1
    for d in reversed(range(len(shape))):
        r = (xp.arange(lshape[d], dtype=xp.uint64) + xp.uint64(offset[d])) * xp.uint64(stride)
        idx = idx + r.reshape((-1,) + (1,) * (len(shape) - 1 - d))
        stride *= shape[d]
    return idx


def random_values(kind, index, seed, call, dtype, xp=np):
    """The values of random call number ``call`` at global indices ``index`` (any shape)."""
    i = xp.asarray(index, dtype=xp.uint64)
    x0, x1, x2, x3 = philox4x32(i & xp.uint64(_MASK), i >> xp.uint64(32), call & _MASK, call >> 32, seed & _MASK,
                                seed >> 32, xp)
    dt = np.dtype(dtype)
    if kind == "rand":
        if dt == np.float32:
            return ((x0 >> xp.uint64(8)).astype(xp.float32) * xp.float32(2.0 ** -24)).astype(dt)
        return ((x0 >> xp.uint64(5)) * xp.uint64(1 << 26) + (x1 >> xp.uint64(6))).astype(xp.float64) * 2.0 ** -53
    # randn: Box-Muller on two 53-bit uniforms, u1 in (0, 1]
    u1 = 1.0 - ((x0 >> xp.uint64(5)) * xp.uint64(1 << 26) + (x1 >> xp.uint64(6))).astype(xp.float64) * 2.0 ** -53
    u2 = ((x2 >> xp.uint64(5)) * xp.uint64(1 << 26) + (x3 >> xp.uint64(6))).astype(xp.float64) * 2.0 ** -53
    return (xp.sqrt(-2.0 * xp.log(u1)) * xp.cos(2.0 * math.pi * u2)).astype(dt)


def _size(size, caller):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    try:
        size = tuple(int(s) for s in size)
    except TypeError:
        raise TypeError(f"{caller}: size must be ints or one sequence of ints, got {size!r}") from None
    if any(s < 0 for s in size):
        raise ValueError(f"{caller}: negative size {size}")
    return size


def _make(caller, size, dtype, device_mesh, placements, requires_grad, fill):
    size = _size(size, caller)
    mesh = _default_mesh("cpu") if device_mesh is None else device_mesh
    _check_mesh(mesh, caller)
    if placements is None:
        placements = (Replicate(),) * mesh.ndim
    pl = _placements(placements, mesh, len(size), caller)
    dt = np.dtype(np.float32 if dtype is None else dtype)
    xp = _xp_of_mesh(mesh)
    coord = mesh._coordinate
    if coord is None:
        local = xp.empty((0,) * len(size), dtype=dt)
    else:
        lshape, off = local_shape_and_offset(size, mesh.shape, pl, coord)
        local = fill(xp, size, tuple(lshape), tuple(off), dt)
        # Partial: the value on coordinate 0 of each Partial mesh dim, the sum's identity elsewhere
        if any(p.is_partial() and coord[i] != 0 for i, p in enumerate(pl)):
            local = xp.zeros(lshape, dtype=dt)
    out = DTensor.from_local(local, mesh, pl, shape=size)
    if requires_grad:
        out.requires_grad_()
    return out


def zeros(*size, dtype=None, device_mesh=None, placements=None, requires_grad=False):
    """A DTensor of zeros of global shape ``size`` (PyTorch's ``torch.distributed.tensor.zeros``;
    default dtype float32, default placements Replicate, default mesh the world). No communication."""
    return _make("mpilocal.zeros", size, dtype, device_mesh, placements, requires_grad,
                 lambda xp, s, ls, off, dt: xp.zeros(ls, dtype=dt))


def ones(*size, dtype=None, device_mesh=None, placements=None, requires_grad=False):
    return _make("mpilocal.ones", size, dtype, device_mesh, placements, requires_grad,
                 lambda xp, s, ls, off, dt: xp.ones(ls, dtype=dt))


def empty(*size, dtype=None, device_mesh=None, placements=None, requires_grad=False):
    return _make("mpilocal.empty", size, dtype, device_mesh, placements, requires_grad,
                 lambda xp, s, ls, off, dt: xp.empty(ls, dtype=dt))


def full(size, fill_value, *, dtype=None, device_mesh=None, placements=None, requires_grad=False):
    if dtype is None:
        dtype = np.result_type(fill_value) if not isinstance(fill_value, float) else np.float32
    return _make("mpilocal.full", (size,) if not isinstance(size, (tuple, list)) else (tuple(size),), dtype,
                 device_mesh, placements, requires_grad, lambda xp, s, ls, off, dt: xp.full(ls, fill_value, dtype=dt))


def _random(kind, size, dtype, device_mesh, placements, requires_grad):
    call = _STATE["calls"]
    _STATE["calls"] += 1
    seed = _STATE["seed"]
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt.kind != "f" or dt.itemsize not in (4, 8):
        raise TypeError(f"mpilocal.{kind}: dtype must be float32 or float64, got {dt}")

    def fill(xp, s, ls, off, d):
        return random_values(kind, _global_index(s, off, ls, xp), seed, call, d, xp)

    return _make(f"mpilocal.{kind}", size, dt, device_mesh, placements, requires_grad, fill)


def rand(*size, dtype=None, device_mesh=None, placements=None, requires_grad=False):
    """Uniform [0, 1) values; element ``i`` depends only on the seed, the call's position in the
    sequence of random calls and ``i`` (see the module docstring). No communication."""
    return _random("rand", size, dtype, device_mesh, placements, requires_grad)


def randn(*size, dtype=None, device_mesh=None, placements=None, requires_grad=False):
    """Standard normal values (Box-Muller on the same counter-based stream as :func:`rand`)."""
    return _random("randn", size, dtype, device_mesh, placements, requires_grad)
