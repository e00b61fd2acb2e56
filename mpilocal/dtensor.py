"""DTensor: one rank's shard plus the mesh and placements that say how shards form the array.

Layer "api" (docs/architecture.md). Package API (for :mod:`mpilocal.local_map`,
:mod:`mpilocal.autograd` and :mod:`mpilocal.ops`; not exported): :func:`norm_placements`,
:func:`on_device`, :func:`wrap_local`, :func:`from_local_array`. Gradients: nothing here imports
autograd; :mod:`mpilocal.autograd.dtensor_ops` registers its rules in :data:`AUTOGRAD` when it is
imported (``import mpilocal`` imports it).
"""

from __future__ import annotations

import copy as _copy
import math
import weakref
import zlib
from functools import lru_cache

import numpy as np

from . import _arrays, agreement, collectives
from .layout import (global_shape_from_locals, local_shape_and_offset as _layout_shape_and_offset, local_slices,
                     mesh_coords, normalize_placements)
from .mesh import DeviceMesh, current_mesh, init_device_mesh
from .placement import Partial, Replicate, Shard
from .redistribute import check_target, mesh_groups, redistribute_local, to_partial
from .transport import group_for
from .metadata import META_WIDTH, meta_shape

__all__ = ["DTensor", "distribute_tensor", "local_shape_and_offset"]

_DEFAULT_MESH: dict = {}


def _default_mesh(device_type: str) -> DeviceMesh:
    m = current_mesh()  # the innermost `with mesh:` block (PyTorch's mesh stack)
    if m is not None:
        return m
    m = _DEFAULT_MESH.get(device_type)
    if m is None:
        from mpi4py import MPI

        m = _DEFAULT_MESH[device_type] = init_device_mesh(device_type, (MPI.COMM_WORLD.Get_size(),))
    return m


@lru_cache(maxsize=1024)
def _norm_cached(placements: tuple, mesh_ndim: int, ndim: int, caller: str) -> tuple:
    return normalize_placements(placements, mesh_ndim, ndim, caller=caller)


def norm_placements(placements, mesh, ndim, caller):
    """``placements`` (None: all Replicate) checked and normalized for an ``ndim``-D array on ``mesh``
    (a tuple of placements, negative Shard dims made non-negative; cached for hashable input)."""
    if placements is None:
        return (Replicate(),) * mesh.ndim
    if isinstance(placements, list):
        placements = tuple(placements)
    if isinstance(placements, tuple):
        try:
            return _norm_cached(placements, mesh.ndim, ndim, caller)
        except TypeError as exc:
            if "unhashable" not in str(exc):
                raise
    return normalize_placements(placements, mesh.ndim, ndim, caller=caller)


def on_device(x, mesh, caller):
    """``x`` as an array of the mesh's kind (NumPy for 'cpu', CuPy for 'cuda')."""
    if mesh.device_type == "cpu":
        if isinstance(x, np.ndarray):
            return x
        if _arrays.is_cupy(x):
            return x.get()
    else:
        if _arrays.is_cupy(x):
            return x
        if isinstance(x, np.ndarray):
            return _arrays.host_to_cupy(x)  # (bit for bit: cupy.asarray turns a 0-d -0.0 into +0.0)
    raise TypeError(f"{caller}: expected a NumPy or CuPy array, got {type(x).__name__}")


#: Autograd's rules for DTensors, registered by :mod:`mpilocal.autograd.dtensor_ops` when it is
#: imported (the registration pattern of ``engine.ADDERS``): ``"Tracked"`` (the type of tracked local
#: arrays: ``from_local`` of one records a node), ``"from_local"``, ``"make_leaf"``, ``"to_local"``,
#: ``"redistribute"``, ``"backward"``.
AUTOGRAD: dict = {}


def _ops(name):
    f = AUTOGRAD.get(name)
    if f is None:
        raise RuntimeError(f"DTensor gradients need mpilocal.autograd, which registers them when imported "
                           f"(import mpilocal imports it); {name} is not registered")
    return f


def _check_group(mesh, x):
    """The Group over which argument checks are agreed (agreement.agreed); None off the mesh."""
    if mesh is None:
        mesh = _default_mesh("cuda" if _arrays.is_cupy(x) else "cpu")
    if not isinstance(mesh, DeviceMesh) or mesh._coordinate is None:
        return None
    return group_for(mesh._metadata_comm())


def _check_mesh(mesh, caller):
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{caller}: device_mesh must be a DeviceMesh, got {type(mesh).__name__}")


def _check_dtype_arg(dtype, caller, what):
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{caller}: {what} must be a NumPy dtype (e.g. np.float32) or None, got {dtype!r}") from None


def _cast(local, dtype):
    """``local`` as ``dtype`` (a new array; ``local`` itself when it already has that dtype)."""
    return local if dtype is None or local.dtype == dtype else local.astype(dtype)


# ------------------------------------------------------------------------------------------------
# metadata rows: what the ranks of a mesh exchange to agree on local shards (from_local's shape
# inference, run_check, distribute_tensor's input check), all in one fixed-width int64 row:
#   [ndim, code, local shape (ndim entries), 0 ..., dtype name (the last 16 bytes)]
#   code = crc32 of the dtype | flags << 32 | 23-bit hash of the placements and given global shape << 40
# (The shape agreement of from_local without shape= and of local_map outputs uses the fixed-size
# vectors below, and these rows only to name an error it found.)
# ------------------------------------------------------------------------------------------------
_F_ERROR = 1     # the rank's local argument checks failed; the row carries its message
_F_GRAD = 2      # the local array requires grad
_F_SHAPE = 4     # shape= was given (its hash is in the code)
_F_NONE = 8      # distribute_tensor: the rank passed None
_F_NODTYPE = 16  # the dtype's name does not fit the row (structured dtypes)
_NAME_SLOTS = 2  # int64 slots at the end of a row for the dtype name


@lru_cache(maxsize=1024)
def _meta_row(shape: tuple, dtype, flags: int = 0, given=None, pl=None) -> np.ndarray:
    """The (read-only) metadata row of a local array of ``shape`` and ``dtype`` (with ``pl``: the
    placements, with ``given``: the shape= argument, hashed so that ranks passing others differ)."""
    width = META_WIDTH
    v = np.zeros(width, dtype=np.int64)
    n = len(shape)
    v[0] = n
    v[2:2 + n] = shape
    name = dtype.str.encode() if dtype.fields is None and dtype.subdtype is None else b""
    if name and len(name) <= 8 * _NAME_SLOTS and n + 2 <= width - _NAME_SLOTS:
        v[width - _NAME_SLOTS:].view(np.uint8)[:len(name)] = np.frombuffer(name, np.uint8)
    else:
        flags |= _F_NODTYPE
    code = zlib.crc32((dtype.str + str(dtype)).encode()) | (flags << 32)
    if given is not None or pl is not None:
        code |= (zlib.crc32(repr((given, pl)).encode()) & 0x7FFFFF) << 40
    if given is not None:
        code |= _F_SHAPE << 32
    v[1] = code
    v.flags.writeable = False
    return v


def _row_flags(rows) -> np.ndarray:
    return (rows[:, 1] >> 32) & 0xFF


def _row_dtype(row):
    """The dtype a row names, or None (structured dtypes do not fit)."""
    if (int(row[1]) >> 32) & _F_NODTYPE:
        return None
    raw = row[len(row) - _NAME_SLOTS:].copy().view(np.uint8).tobytes().rstrip(b"\0")
    return np.dtype(raw.decode())


def _raise_row_error(rows, ranks, caller):
    """Every rank raises the error of the first rank whose row carries one (same type and text)."""
    failed = np.flatnonzero(_row_flags(rows) & _F_ERROR)
    if not failed.size:
        return
    r = int(failed[0])
    raw = rows[r, 2:].copy().view(np.uint8).tobytes().rstrip(b"\0").decode(errors="replace")
    tname, _, msg = raw.partition("\0")
    etype = {"TypeError": TypeError, "NotImplementedError": NotImplementedError}.get(tname, ValueError)
    raise etype(f"{caller}: mesh rank {int(ranks[r])} rejected its arguments ({failed.size} rank(s) failed the "
                f"checks, so every rank raises): {msg}")


def _sharded_dims(pl, mesh_shape):
    """{tensor dim: [mesh dims of size > 1 that shard it]}"""
    out = {}
    for m, p in enumerate(pl):
        if type(p) is Shard and mesh_shape[m] > 1:
            out.setdefault(p.dim, []).append(m)
    return out


@lru_cache(maxsize=1024)
def _expected_locals(shape: tuple, mesh_shape: tuple, pl: tuple) -> np.ndarray:
    """Every rank's local shape under the torch.chunk layout, ``(mesh size, ndim)`` int64 (read-only)."""
    coords = mesh_coords(mesh_shape)
    out = np.array([_layout_shape_and_offset(shape, mesh_shape, pl, c)[0] for c in coords],
                   dtype=np.int64).reshape(len(coords), len(shape))
    out.flags.writeable = False
    return out


_CHECKED: dict = {}  # rows already checked (their shape part, mesh shape, placements, ...) -> global shape


def _check_rows(rows, mesh, pl, given, caller, *, check_grad=True) -> tuple:
    """The global shape the gathered metadata ``rows`` imply (``given`` when not None), after checking
    that they describe one DTensor: no rank failed its argument checks, one ndim, one dtype, one
    requires_grad, one ``shape=``, and local shapes that follow the ``torch.chunk`` layout of that
    global shape. Every rank holds the same rows, so every rank raises the same error. Rows seen
    before (a loop of local_map calls) cost one dictionary lookup."""
    n = int(rows[0, 0])
    key = (rows[:, :2 + n].tobytes(), tuple(mesh.shape), tuple(pl), given, check_grad)
    shape = _CHECKED.get(key)
    if shape is None:
        shape = _check_rows_slow(rows, mesh, pl, given, caller, check_grad)
        if len(key[0]) <= 1 << 16:  # bounded: at most 256 entries of at most 64 KiB
            if len(_CHECKED) >= 256:
                _CHECKED.clear()
            _CHECKED[key] = shape
    return shape


def _check_rows_slow(rows, mesh, pl, given, caller, check_grad):
    ranks = mesh.mesh.ravel()
    head = rows[:, :2]
    if not (head == head[0]).all() or (int(rows[0, 1]) >> 32) & _F_ERROR:
        _raise_row_error(rows, ranks, caller)
        nd = rows[:, 0]
        if (nd != nd[0]).any():
            r = int(np.flatnonzero(nd != nd[0])[0])
            raise ValueError(
                f"{caller}: every rank must pass a local array of the same ndim: mesh rank {int(ranks[0])} passes "
                f"ndim {int(nd[0])}, mesh rank {int(ranks[r])} ndim {int(nd[r])}"
            )
        dt = rows[:, 1] & 0xFFFFFFFF
        if (dt != dt[0]).any():
            r = int(np.flatnonzero(dt != dt[0])[0])
            a, b = _row_dtype(rows[0]), _row_dtype(rows[r])
            raise ValueError(
                f"{caller}: every rank must pass a local array of the same dtype: mesh rank {int(ranks[0])} passes "
                f"{a if a is not None else 'a structured dtype'}, mesh rank {int(ranks[r])} passes "
                f"{b if b is not None else 'another structured dtype'}; convert with .astype(...) first"
            )
        fl = _row_flags(rows)
        grad = fl & _F_GRAD
        if check_grad and (grad != grad[0]).any():
            yes = [int(ranks[i]) for i in np.flatnonzero(grad)]
            no = [int(ranks[i]) for i in np.flatnonzero(grad == 0)]
            raise ValueError(
                f"{caller}: ranks disagree on requires_grad: mesh ranks {yes} pass a local array that requires grad "
                f"(a tracked array), mesh ranks {no} do not, so they would build different backward graphs; make "
                f"the local array require grad on every rank or on none"
            )
        if ((rows[:, 1] >> 40) != (rows[0, 1] >> 40)).any() or ((fl & _F_SHAPE) != (fl[0] & _F_SHAPE)).any():
            raise ValueError(
                f"{caller}: ranks pass different placements or shape= arguments (this rank: placements {list(pl)}, "
                f"shape={given}); every rank must pass the same placements and the same global shape (or none)"
            )
    n = int(rows[0, 0])
    locals_ = rows[:, 2:2 + n]
    shape = given
    if shape is None:
        # every rank computes it at the same coordinate, so the verdict below is the same everywhere
        shape = global_shape_from_locals([tuple(int(s) for s in r) for r in locals_], mesh.shape, pl,
                                         (0,) * mesh.ndim)
    expected = _expected_locals(tuple(shape), tuple(mesh.shape), tuple(pl))
    if not np.array_equal(locals_, expected):
        raise ValueError(_layout_message(caller, tuple(shape), locals_, expected, mesh, pl, given is not None))
    return tuple(shape)


def _block_split(n, k):
    return [n // k + (r < n % k) for r in range(k)]


def _layout_message(caller, shape, locals_, expected, mesh, pl, given):
    """Why the local shapes do not form a DTensor of ``shape`` with ``pl``, and what to do instead."""
    ranks = mesh.mesh.ravel()
    bad = np.flatnonzero((locals_ != expected).any(axis=1))
    flat = int(bad[0])
    got, exp = tuple(int(s) for s in locals_[flat]), tuple(int(s) for s in expected[flat])
    d = next(i for i in range(len(got)) if got[i] != exp[i])
    sharding = _sharded_dims(pl, mesh.shape)
    where = f"mesh rank {int(ranks[flat])}"
    more = f" ({len(bad)} of {len(ranks)} ranks disagree)" if len(bad) > 1 else ""
    what = "rows" if d == 0 else f"entries along dim {d}"
    if d not in sharding:
        src = "the shape= given" if given else f"mesh rank {int(ranks[0])}"
        return (f"{caller}: {where} holds a local array of shape {got}, but dim {d} is not sharded by placements "
                f"{list(pl)}, so every rank must hold the global size {shape[d]} there (as {src} says){more}; "
                f"pass local arrays of one size along unsharded dims")
    mdims = sharding[d]
    ragged = [pl[m] for m in mdims if pl[m].sizes is not None]
    rule = f"{ragged[0]!r}" if ragged else "the torch.chunk rule"
    text = (f"{caller}: {where} holds {got[d]} {what}, {rule} gives it {exp[d]}: dim {d} of global "
            f"shape {shape} is sharded by placements {list(pl)}")
    if len(mdims) == 1:
        m = mdims[0]
        coord = np.unravel_index(flat, mesh.shape)
        line = [int(np.ravel_multi_index(tuple(i if j == m else c for j, c in enumerate(coord)), mesh.shape))
                for i in range(mesh.shape[m])]
        have = [int(locals_[i][d]) for i in line]
        want = [int(expected[i][d]) for i in line]
        text += f", so the {mesh.shape[m]} ranks along mesh dim {m} must hold {want} {what}, not {have}"
        if not ragged and have == _block_split(sum(have), len(have)) and sum(have) == sum(want):
            text += (" (that is the MPI block split N//p + (r < N%p), which puts the slack on the first ranks; "
                     "DTensor's layout, torch.chunk, puts it on the last ones)")
    text += (f"{more}. Fix: keep your split and say so with a ragged shard, Shard({d}, sizes=...) (the sizes per "
             f"mesh coordinate; mpilocal.ragged_from_local(local, mesh, placements) agrees them from the local "
             f"arrays); or give every rank the rows the placements assign it (mpilocal.local_shape_and_offset("
             f"global_shape, mesh, placements) gives each rank's shape and offset), passing shape= consistent with "
             f"those sizes if you like; or wrap the shards as another layout (e.g. Replicate()) and redistribute")
    return text


class _Pending:
    """A posted metadata agreement of a DTensor built from local shards: completed (and checked, see
    :func:`_check_sum`) when the global shape is first needed. ``key``: (local shape, dtype, flags)."""

    __slots__ = ("fut", "caller", "key")

    def __init__(self, fut, caller, key):
        self.fut, self.caller, self.key = fut, caller, key


# ------------------------------------------------------------------------------------------------
# the shape agreement in fixed-size metadata (issue 11). Each rank contributes one uint64 vector of
# 4 + _MSG + 2 * mesh.ndim entries, SUM-reduced over the mesh (wrapping mod 2**64), whatever the number
# of ranks; mesh rank i weighs its fields with a fixed odd 64-bit weight w_i:
#   [0] 1 if this rank's argument checks failed, [1] (i + 1) if failed, [2] its error type code,
#   [3] w_i * hash(ndim, dtype, flags, placements, the sizes of the unsharded dims),
#   [4:4+_MSG] the failing rank's "Type\0message" bytes,
#   then per tensor dim d sharded by mesh dims of size > 1 (in order): [l_d, w_i * l_d] (l_d: local size).
# Every rank completes the same sum, so every rank reaches the same verdict: a failure names the
# failing rank (exact when one rank failed); one hash for all ranks iff sum(w_i h_i) == h * sum(w_i)
# (with odd random weights a difference escapes with probability ~2**-64); the global size along d is
# sum(l_d) / (ranks holding each row), and the local sizes follow the layout iff sum(w_i l_d,i) equals
# the same sum over the sizes the layout gives each rank. Where a check fails, the ranks all-gather
# their full rows once (metadata.diag_allgather) so the error names ranks and sizes (_check_rows).
# ------------------------------------------------------------------------------------------------
_MSG = 30
_TYPE_CODES = {"TypeError": 1, "NotImplementedError": 2}
_CODE_TYPES = {1: TypeError, 2: NotImplementedError}
_WEIGHTS: dict = {}


def _weights(n: int) -> np.ndarray:
    w = _WEIGHTS.get(n)
    if w is None:
        w = np.random.Generator(np.random.PCG64(0x6D70696C6F63616C)).integers(0, 2**63, n, dtype=np.uint64)
        w = _WEIGHTS[n] = (w << np.uint64(1)) | np.uint64(1)
        w.flags.writeable = False
    return w


@lru_cache(maxsize=1024)
def _flat(mesh_shape: tuple, coord: tuple) -> int:
    return int(np.ravel_multi_index(coord, mesh_shape))


def _sum_width(mesh) -> int:
    return 4 + _MSG + 2 * mesh.ndim


def _sharded_tensor_dims(pl, mesh_shape) -> list:
    """Tensor dims sharded by a mesh dim of size > 1, in order of first appearance."""
    return list(dict.fromkeys(p.dim for m, p in enumerate(pl) if type(p) is Shard and mesh_shape[m] > 1))


@lru_cache(maxsize=1024)
def _sum_row(shape: tuple, dtype, flags: int, pl: tuple, mesh_shape: tuple, index: int, width: int) -> np.ndarray:
    """This rank's (read-only) vector of the shape agreement (mesh rank ``index``)."""
    v = np.zeros(width, dtype=np.uint64)
    w = _weights(math.prod(mesh_shape))[index]
    sharded = _sharded_tensor_dims(pl, mesh_shape)
    head = (len(shape), dtype.str, str(dtype), flags, repr(pl),
            tuple(-1 if d in sharded else n for d, n in enumerate(shape)))
    h = np.uint64(zlib.crc32(repr(head).encode()) | (zlib.adler32(repr(head).encode()) << 32))
    with np.errstate(over="ignore"):
        v[3] = w * h
        for j, d in enumerate(sharded):
            v[4 + _MSG + 2 * j] = shape[d]
            v[5 + _MSG + 2 * j] = w * np.uint64(shape[d])
    v.flags.writeable = False
    return v


def _sum_error_row(err: BaseException, index: int, width: int) -> np.ndarray:
    v = np.zeros(width, dtype=np.uint64)
    v[0], v[1], v[2] = 1, index + 1, _TYPE_CODES.get(type(err).__name__, 0)
    raw = f"{type(err).__name__}\0{err}".encode()[:8 * _MSG]
    v[4:4 + _MSG].view(np.uint8)[:len(raw)] = np.frombuffer(raw, np.uint8)
    return v


_SUM_CHECKED: dict = {}  # (sum, this rank's key, mesh, placements) -> global shape


def _check_sum(total, p, mesh, pl) -> tuple:
    """The global shape the reduced vector ``total`` implies, after its checks (see above); on a
    failed check, the full rows are all-gathered and :func:`_check_rows` names the error."""
    key = (total.tobytes(), p.key, tuple(mesh.mesh.shape), pl)
    shape = _SUM_CHECKED.get(key)
    if shape is not None:
        return shape
    caller = p.caller
    local_shape, dtype, flags = p.key
    nfail = int(total[0])
    if nfail:
        ranks = mesh.mesh.ravel()
        etype = ValueError
        if nfail == 1:
            r = int(total[1]) - 1
            etype = _CODE_TYPES.get(int(total[2]), ValueError)
            raw = total[4:4 + _MSG].copy().view(np.uint8).tobytes().rstrip(b"\0").decode(errors="replace")
            msg = raw.partition("\0")[2]
            where = f"mesh rank {int(ranks[r])}" if 0 <= r < len(ranks) else "a rank"
        else:
            where, msg = f"{nfail} ranks", "each failing rank raises its own error"
        raise etype(f"{caller}: {where} rejected its arguments ({nfail} rank(s) failed the checks, so every rank "
                    f"raises): {msg}")
    mesh_shape = tuple(mesh.mesh.shape)
    n = math.prod(mesh_shape)
    w = _weights(n)
    index = _flat(mesh_shape, mesh._coordinate)
    mine = _sum_row(local_shape, dtype, flags, pl, mesh_shape, index, total.size)
    ok = True
    with np.errstate(over="ignore"):
        h = mine[3] * _inverse(w[index])  # this rank's hash
        ok = total[3] == h * w.sum(dtype=np.uint64)
        shape = list(local_shape)
        for j, d in enumerate(_sharded_tensor_dims(pl, mesh_shape)):
            reps = n // math.prod(mesh_shape[m] for m, q in enumerate(pl) if type(q) is Shard and q.dim == d)
            s = int(total[4 + _MSG + 2 * j])
            if s % reps:
                ok = False
                break
            shape[d] = s // reps
        if ok:
            expected = _expected_locals(tuple(shape), mesh_shape, pl)
            for j, d in enumerate(_sharded_tensor_dims(pl, mesh_shape)):
                if (expected[:, d].astype(np.uint64) * w).sum(dtype=np.uint64) != total[5 + _MSG + 2 * j]:
                    ok = False
    if not ok:  # every rank completing this agreement gets here: name the error from the full rows
        from .transport import group_for

        row = _meta_row(local_shape, dtype, flags, None, pl)
        rows = collectives.meta_diagnostics(group_for(mesh._metadata_comm()), row)
        return _check_rows(rows, mesh, pl, None, caller)
    shape = tuple(shape)
    if len(_SUM_CHECKED) >= 256:
        _SUM_CHECKED.clear()
    _SUM_CHECKED[key] = shape
    return shape


def _inverse(w):
    """The inverse of the odd ``w`` modulo 2**64 (Newton's iteration)."""
    w = int(w)
    x = w
    for _ in range(6):
        x = (x * (2 - w * x)) % (1 << 64)
    return np.uint64(x)


def _would_agree(placements, mesh) -> bool:
    """Whether ranks whose ``from_local`` arguments are valid post a shape agreement (best guess from
    this rank's possibly invalid ``placements``)."""
    try:
        pls = list(placements)
    except TypeError:
        return False
    if len(pls) == mesh.ndim:
        return any(type(p) is Shard and mesh.shape[i] > 1 for i, p in enumerate(pls))
    return any(type(p) is Shard for p in pls)


# ------------------------------------------------------------------------------------------------
# operators: not supported yet (no sharding propagation); each raises a TypeError that says what to do
# ------------------------------------------------------------------------------------------------
_COMPARISONS = {"__eq__": "==", "__ne__": "!=", "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">="}
_BINARY = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "pow": "**",
           "matmul": "@", "and": "&", "or": "|", "xor": "^", "lshift": "<<", "rshift": ">>", "divmod": "divmod"}
_UNARY = {"__neg__": "-", "__pos__": "+", "__abs__": "abs", "__invert__": "~"}


def _operand(o) -> str:
    return "DTensor" if type(o) is DTensor else type(o).__name__


def _operator_error(expr: str, compare: bool) -> TypeError:
    hint = ("to compare two DTensors use np.array_equal(A.full_tensor(), B.full_tensor()) (collective), or compare "
            "the shards A.to_local() and B.to_local() when their placements match" if compare else
            "e.g. local_map(lambda a, b: a + b, out_placements=..., in_placements=...)(A, B), or compute on "
            "A.to_local() (this rank's shard; shares memory) and wrap the result with DTensor.from_local")
    return TypeError(
        f"{expr}: operators on DTensors are not supported yet (mpilocal has no sharding propagation, so it cannot "
        f"know the placements of the result). Compute with mpilocal.local_map on the local shards, or on "
        f".to_local() / .full_tensor() arrays; {hint}"
    )


#: operator registry (filled by mpilocal.ops when it is imported; a layer above DTensor): dunder name
#: (``"__add__"``, ``"__getitem__"``, ``"__array_ufunc__"``, ...) -> function; empty: the TypeErrors below
_OPERATORS: dict = {}
#: method/property registry consulted by ``DTensor.__getattr__`` (``"sum"``, ``"T"``, ...): a descriptor
_METHODS: dict = {}


def _make_comparison(name, sym):
    def op(self, other):
        f = _OPERATORS.get(name)
        if f is not None:
            return f(self, other)
        if other is None or isinstance(other, (str, bytes)) or not (
                type(other) is DTensor or isinstance(other, (int, float, complex, np.generic, list, tuple))
                or _arrays.is_array(other) or hasattr(other, "__array__")):
            return NotImplemented  # == / != fall back to identity, as for any object
        raise _operator_error(f"DTensor {sym} {_operand(other)}", True)

    op.__name__ = name
    return op


def _make_binary(name, sym, how):
    def op(self, other):
        f = _OPERATORS.get(name)
        if f is not None:
            return f(self, other)
        if how == "r":
            expr = f"{_operand(other)} {sym} DTensor" if sym != "divmod" else f"divmod({_operand(other)}, DTensor)"
        elif how == "i":
            expr = f"DTensor {sym}= {_operand(other)}"
        else:
            expr = f"DTensor {sym} {_operand(other)}" if sym != "divmod" else f"divmod(DTensor, {_operand(other)})"
        raise _operator_error(expr, False)

    op.__name__ = name
    return op


def _make_unary(name, sym):
    def op(self):
        f = _OPERATORS.get(name)
        if f is not None:
            return f(self)
        raise _operator_error(f"{sym}(DTensor)" if sym == "abs" else f"{sym}DTensor", False)

    op.__name__ = name
    return op


_TARGETS_MAX = 256


def _remember_target(t, placements, pl):
    """Cache the checked target ``pl`` of ``t.redistribute(placements=placements)`` on the mesh (the
    checks are local and depend only on the source placements, ``placements`` and the ndim)."""
    try:
        key = (t._placements, tuple(placements) if type(placements) is list else placements, t._local.ndim)
        hash(key)
    except TypeError:  # unhashable placements: checked on every call
        return
    cache = t._mesh.__dict__.setdefault("_targets", {})
    if len(cache) >= _TARGETS_MAX:
        cache.clear()
    cache[key] = pl


class DTensor:
    """A distributed array: this rank's shard (``to_local()``), the ``device_mesh`` and the
    ``placements`` (one per mesh dim). Build one with :func:`distribute_tensor` or
    :meth:`DTensor.from_local`; ``shape`` is the global shape.

    Operators (``==``, ``+``, ``@``, ...) raise ``TypeError`` until sharding propagation exists:
    compute with :func:`mpilocal.local_map` or on ``to_local()`` / ``full_tensor()``. A DTensor
    hashes by identity; ``copy.deepcopy`` copies the shard and shares the mesh; ``pickle`` raises.
    """

    __slots__ = ("_local", "_mesh", "_placements", "_shape", "_future", "_stride", "_ag", "__weakref__")

    def __init__(self, local, mesh, placements, shape=None, future=None, stride=None):
        # internal: use DTensor.from_local / distribute_tensor
        self._local = local
        self._mesh = mesh
        self._placements = placements
        self._shape = shape
        self._future = future  # None, or a _Pending shape agreement (then shape is None)
        self._stride = stride
        self._ag = None  # autograd: None, or a GradMeta (see mpilocal.autograd.dtensor_ops)

    # -- construction --------------------------------------------------------------------------
    @staticmethod
    def from_local(local_tensor, device_mesh=None, placements=None, *, run_check=False, shape=None, stride=None):
        """Wrap this rank's shard. **Collective** over the mesh when it agrees on shapes (below).

        The local array is not copied: the DTensor's ``to_local()`` is ``local_tensor`` itself (as in
        PyTorch), so writing into either changes both.

        Shards of a ``Shard(d)`` placement must follow the ``torch.chunk`` rule (``ceil(n / k)`` per
        rank, the last ranks shorter or empty; :func:`mpilocal.local_shape_and_offset` gives each
        rank's shape and offset). Without ``shape`` the global shape of sharded dims is agreed from
        every rank's local size (a non-blocking fixed-size sum over the mesh, docs/scaling.md,
        completed when the shape is first needed, e.g. by ``.shape`` or ``redistribute``); that
        agreement also checks the dtype,
        the ndim, the unsharded dims and the chunk rule, and raises the same ``ValueError`` on every
        rank when they do not hold (e.g. for the MPI block split ``N//p + (r < N%p)``). With ``shape``
        nothing is communicated and this rank's shard is checked against the chunk rule locally.

        ``run_check=True`` verifies all of that at once across the mesh (also ``requires_grad`` and
        that ranks pass the same ``shape``), raising the same error on every rank, and broadcasts
        replicated data from group rank 0 of each Replicate mesh dim, as PyTorch does.

        On a rank outside the mesh the result holds an empty local array; its global shape is
        ``shape``, or (without ``shape``) the local shape with every sharded dim multiplied by its
        mesh dim's size, as PyTorch computes it there.
        """
        if type(local_tensor) is AUTOGRAD.get("Tracked"):  # differentiable: the grad goes back to `placements`
            return _ops("from_local")(local_tensor, device_mesh, placements, run_check=run_check, shape=shape,
                                     stride=stride)
        return from_local_array(local_tensor, device_mesh, placements, run_check, shape, stride, False)

    # -- properties ----------------------------------------------------------------------------
    @property
    def device_mesh(self) -> DeviceMesh:
        return self._mesh

    @property
    def placements(self) -> tuple:
        return self._placements

    @property
    def shape(self) -> tuple:
        s = self._shape
        if s is None:
            s = self._resolve_shape()
        return s

    def _resolve_shape(self):
        p = self._future
        total = p.fut.result()
        # raises the same error on every rank when the shards do not form a DTensor; the pending
        # agreement stays in place, so every later use raises it again
        shape = _check_sum(total, p, self._mesh, self._placements)
        self._shape = shape
        self._future = None
        return shape

    @property
    def dtype(self):
        return self._local.dtype

    @property
    def ndim(self) -> int:
        return self._local.ndim

    def size(self, dim=None):
        """The global shape, or its size along ``dim`` (as ``torch.Tensor.size``)."""
        s = self.shape
        return s if dim is None else s[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def stride(self, dim=None):
        """Global strides in elements (row-major unless ``stride=`` was given to ``from_local``)."""
        st = self._stride
        if st is None:
            acc, out = 1, []
            for n in reversed(self.shape):
                out.append(acc)
                acc *= max(n, 1)
            st = tuple(reversed(out))
        return st if dim is None else st[dim]

    @property
    def device_type(self) -> str:
        return self._mesh.device_type

    def local_offset(self) -> tuple:
        """The global index of this rank's first element: ``to_local()`` is the global array's
        ``[o0:o0 + n0, o1:o1 + n1, ...]`` for offsets ``o`` and local shape ``n`` (zeros off the
        mesh). See :func:`mpilocal.local_shape_and_offset`."""
        coord = self._mesh._coordinate
        if coord is None:
            return (0,) * self.ndim
        return _layout_shape_and_offset(tuple(self.shape), self._mesh.shape, self._placements, coord)[1]

    # -- autograd ------------------------------------------------------------------------------
    @property
    def requires_grad(self) -> bool:
        """Whether gradients flow to this DTensor (a leaf made so, or the result of one)."""
        return self._ag is not None

    def requires_grad_(self, requires_grad: bool = True):
        """Make this (leaf) DTensor record gradients into ``.grad``; returns ``self``."""
        if requires_grad:
            if self._ag is None:
                self._ag = _ops("make_leaf")(self)
        elif self._ag is not None:
            if not self.is_leaf:
                raise RuntimeError("DTensor.requires_grad_(False): only leaves can stop requiring grad; "
                                   "use .detach() for a DTensor without gradient history")
            self._ag = None
        return self

    @property
    def is_leaf(self) -> bool:
        ag = self._ag
        return ag is None or ag.is_leaf

    @property
    def grad_fn(self):
        """The node that made this DTensor (None for leaves and DTensors without gradient)."""
        return None if self.is_leaf else self._ag.node

    @property
    def grad(self):
        """The accumulated gradient (a DTensor) of a leaf that requires grad, else None. Gradients
        add up over ``backward`` calls until you set ``grad = None``."""
        ag = self._ag
        return None if ag is None else ag.grad

    @grad.setter
    def grad(self, value):
        if value is not None and type(value) is not DTensor:
            raise TypeError(f"DTensor.grad must be a DTensor or None, got {type(value).__name__}")
        if self._ag is None:
            if value is None:
                return
            raise RuntimeError("DTensor.grad: call requires_grad_() before assigning a gradient")
        self._ag.grad = value

    def detach(self):
        """The same shard, mesh and placements without gradient history. The local array is shared
        (not copied), so ``w.detach().to_local()[...] -= lr * g`` updates ``w`` in place, as
        ``torch.Tensor.detach`` does."""
        return DTensor(self._local, self._mesh, self._placements, self._shape, self._future, self._stride)

    def backward(self, gradient=None):
        """Accumulate the gradient of this DTensor into the ``.grad`` of the leaves it came from.
        **Collective** over the meshes the graph touches: every rank must call it.

        ``gradient``: a DTensor of this shape on this mesh; ``None`` means ones with this DTensor's
        placements (``Partial`` taken as ``Replicate``).
        """
        _ops("backward")(self, gradient)

    # -- conversions ---------------------------------------------------------------------------
    def to_local(self, *, grad_placements=None):
        """This rank's shard (no communication, no copy: writing into it changes the DTensor, as in
        PyTorch). For a DTensor that requires grad it is a :class:`~mpilocal.autograd.Tracked`
        array whose gradient flows back as a DTensor with ``grad_placements`` (default: this
        DTensor's placements); use ``.detach().to_local()`` for the plain array."""
        if self._ag is None:
            return self._local
        return _ops("to_local")(self, grad_placements)

    def redistribute(self, device_mesh=None, placements=None, *, async_op=False, forward_dtype=None,
                     backward_dtype=None):
        """A DTensor with ``placements`` on the same mesh. **Collective** over the mesh.

        One logical collective per mesh dim that changes (the plan of
        :func:`mpilocal.layout.redistribute_plan`; docs/architecture.md). A Partial target is only
        reachable from the same Partial (PyTorch reserves Replicate -> Partial for internal use;
        :func:`mpilocal.redistribute.check_target`). ``async_op`` is accepted for PyTorch compatibility;
        the result is complete.

        The result never shares memory with this DTensor's local array (R -> S slices are copied,
        as in PyTorch), except for the same placements: then this DTensor itself is returned (with
        gradients: a new DTensor on the same local array whose backward all-reduces a ``Partial``
        gradient to ``Replicate``, as PyTorch's).

        ``forward_dtype``: cast the local array to this dtype before redistributing (the result has
        it). ``backward_dtype``: the dtype the gradient is redistributed in (default: this
        DTensor's dtype); the gradient reaching this DTensor has this DTensor's dtype, as in PyTorch.
        """
        mesh = self._mesh
        if forward_dtype is None and backward_dtype is None and (device_mesh is None or device_mesh is mesh):
            # the common call: the checked target comes from the mesh's cache of (source, target) pairs
            try:
                pl = mesh.__dict__["_targets"][(self._placements, placements if type(placements) is not list
                                                 else tuple(placements), self._local.ndim)]
            except (KeyError, TypeError):  # not seen yet (or no cache, or unhashable): checked below
                pass
            else:
                return self._redistribute(pl)
        caller = "DTensor.redistribute"
        _check_mesh(device_mesh, caller)
        if device_mesh is not None and device_mesh != self._mesh:
            raise NotImplementedError(
                f"{caller}: moving a DTensor to another mesh ({device_mesh} from {self._mesh}) is not supported; "
                f"use full_tensor() and distribute_tensor() on the new mesh"
            )
        pl = norm_placements(placements, self._mesh, self.ndim, caller)
        check_target(self._placements, pl, caller)
        fdt = _check_dtype_arg(forward_dtype, caller, "forward_dtype")
        bdt = _check_dtype_arg(backward_dtype, caller, "backward_dtype")
        _remember_target(self, placements, pl)
        return self._redistribute(pl, fdt, bdt)

    def _redistribute(self, pl, forward_dtype=None, backward_dtype=None):
        if self._ag is not None:
            return _ops("redistribute")(self, pl, forward_dtype, backward_dtype)
        src = self
        if forward_dtype is not None and forward_dtype != self._local.dtype:
            src = DTensor(self._local.astype(forward_dtype), self._mesh, self._placements, self._shape,
                          self._future, self._stride)
        if pl == src._placements:
            return src
        if self._mesh._coordinate is None:  # off the mesh: the global shape and an empty local array
            xp = _arrays.namespace(src._local)
            return DTensor(xp.empty((0,) * src.ndim, dtype=src.dtype), self._mesh, pl, src.shape, None, None)
        shape = src.shape  # completes (and checks) a pending shape agreement
        local = redistribute_local(src._local, self._mesh, shape, src._placements, pl)
        return DTensor(local, self._mesh, pl, shape, None, None)

    def full_tensor(self, *, grad_placements=None):
        """The whole global array on every rank (redistribute to Replicate). **Collective.**

        For an all-Replicate DTensor that is the local array itself (as in PyTorch; no copy).
        ``grad_placements``: the placements of the gradient that flows back into this DTensor
        through the result (see ``to_local``; default: Replicate)."""
        r = self._redistribute((Replicate(),) * self._mesh.ndim)
        if r._ag is not None:
            return _ops("to_local")(r, grad_placements)
        if grad_placements is not None:  # checked (after the collective, so a bad value cannot strand a rank)
            norm_placements(grad_placements, self._mesh, self.ndim, "DTensor.full_tensor(grad_placements=...)")
        return r._local

    def __bool__(self):
        # NumPy raises for arrays of more than one element; a DTensor's elements live on several
        # ranks, so `if A == B:` would need a collective: it raises instead of being always true
        raise ValueError(
            "The truth value of a DTensor is ambiguous (its elements live on several ranks): use "
            "bool((A == B).all().full_tensor()) or compare A.full_tensor() with NumPy"
        )

    def __repr__(self):
        local = tuple(self._local.shape)
        try:
            shape = self.shape  # completes a pending shape agreement (every rank posted it: a local wait)
        except (ValueError, TypeError, NotImplementedError) as exc:  # the agreement found an error
            shape = f"<invalid: {exc}>"
        return (f"DTensor(shape={shape}, local_shape={local}, dtype={self.dtype}, "
                f"placements={self._placements}, device_mesh={self._mesh})")

    def __array__(self, *a, **k):
        raise TypeError(
            "DTensor cannot be converted to a NumPy array implicitly (that would hide a collective); "
            "use .to_local() for this rank's shard or .full_tensor() for the whole array"
        )

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        f = _OPERATORS.get("__array_ufunc__")
        if f is None:  # no operators registered: the same TypeError as the operators below
            cmp = ufunc.__name__ in ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")
            raise _operator_error(f"numpy.{ufunc.__name__}({', '.join(_operand(i) for i in inputs)})", cmp)
        return f(ufunc, method, *inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        f = _OPERATORS.get("__array_function__")
        if f is None:
            raise _operator_error(f"numpy.{func.__name__}(DTensor)", False)
        return f(func, types, args, kwargs)

    def __array_namespace__(self, api_version=None):
        f = _OPERATORS.get("__array_namespace__")
        if f is None:
            raise TypeError("DTensor.__array_namespace__: no operators registered (import mpilocal.ops)")
        return f(self, api_version)

    def __getitem__(self, idx):
        f = _OPERATORS.get("__getitem__")
        if f is None:
            raise _operator_error("DTensor[...]", False)
        return f(self, idx)

    def __getattr__(self, name):  # only for names not found otherwise: registered methods (mpilocal.ops)
        d = _METHODS.get(name)
        if d is None:
            raise AttributeError(f"'DTensor' object has no attribute {name!r}")
        return d.__get__(self, DTensor)
    __hash__ = object.__hash__  # identity, as for torch.Tensor (== is not an equality test)

    # -- copying -------------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        """A DTensor with a copy of this rank's shard on the same mesh (the mesh is shared, not
        copied); leaves keep ``requires_grad`` and a copy of ``.grad``, as in PyTorch. No communication."""
        if not self.is_leaf:
            raise RuntimeError(
                "copy.deepcopy(DTensor): only DTensors created explicitly by the user (graph leaves) support the "
                "deepcopy protocol, as in PyTorch; deep-copy dt.detach() instead"
            )
        out = DTensor(self._local.copy(), self._mesh, self._placements, self._shape, self._future, self._stride)
        memo[id(self)] = out
        if self._ag is not None:
            out.requires_grad_()
            if self._ag.grad is not None:
                out._ag.grad = _copy.deepcopy(self._ag.grad, memo)
        return out

    def __copy__(self):
        if self._ag is not None:
            raise RuntimeError("copy.copy(DTensor) of a DTensor that requires grad: use copy.deepcopy (leaves) or "
                               ".detach() (a DTensor sharing the local array without gradient history)")
        return self.detach()

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a DTensor cannot be pickled: it is one rank's shard plus a DeviceMesh of live MPI communicators, which "
            "do not exist in another process. Pickle its parts instead: dt.to_local() (this rank's shard; "
            "dt.local_offset() says where it lies), dt.placements, dt.shape and dt.device_mesh.mesh (the rank "
            "layout), and rebuild with DTensor.from_local(local, mesh, placements, shape=shape); or pickle "
            "dt.full_tensor() (collective) and use distribute_tensor"
        )


for _name, _sym in _COMPARISONS.items():
    setattr(DTensor, _name, _make_comparison(_name, _sym))
for _base, _sym in _BINARY.items():
    setattr(DTensor, f"__{_base}__", _make_binary(f"__{_base}__", _sym, ""))
    setattr(DTensor, f"__r{_base}__", _make_binary(f"__r{_base}__", _sym, "r"))
    if _base != "divmod":
        setattr(DTensor, f"__i{_base}__", _make_binary(f"__i{_base}__", _sym, "i"))
for _name, _sym in _UNARY.items():
    setattr(DTensor, _name, _make_unary(_name, _sym))
del _name, _sym, _base


def local_shape_and_offset(global_shape, device_mesh, placements, coordinate=None) -> tuple[tuple, tuple]:
    """The local shape and global offset of the shard that the rank at ``coordinate`` (default:
    this rank's) holds of an array of ``global_shape`` laid out by ``placements`` on
    ``device_mesh`` (the ``torch.chunk`` rule, nested in mesh-dim order). The shard is
    ``global[o0:o0 + n0, o1:o1 + n1, ...]``. No communication. Off the mesh (no coordinate):
    zeros for both, as the empty local array there. PyTorch's counterpart is
    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``.
    """
    caller = "local_shape_and_offset"
    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"{caller}: device_mesh must be a DeviceMesh, got {type(device_mesh).__name__}")
    shape = _check_shape(global_shape, None, caller)
    pl = norm_placements(placements, device_mesh, len(shape), caller)
    if coordinate is None:
        coordinate = device_mesh._coordinate
        if coordinate is None:
            return (0,) * len(shape), (0,) * len(shape)
    try:
        coordinate = tuple(int(c) for c in coordinate)
    except TypeError:
        raise TypeError(f"{caller}: coordinate must be a sequence of ints, got {coordinate!r}") from None
    if len(coordinate) != device_mesh.ndim or any(not 0 <= c < k for c, k in zip(coordinate, device_mesh.shape)):
        raise ValueError(f"{caller}: coordinate {coordinate} is not a coordinate of a mesh of shape "
                         f"{tuple(device_mesh.shape)}")
    return _layout_shape_and_offset(shape, tuple(device_mesh.shape), pl, coordinate)


def _check_shape(shape, ndim, caller, what="shape"):
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{caller}: {what} must be a sequence of ints, got {shape!r}") from None
    if ndim is None:
        ndim = len(shape)
    if len(shape) != ndim or any(s < 0 for s in shape):
        raise ValueError(f"{caller}: {what} {shape} must have {ndim} non-negative entries (the local array's ndim)")
    return shape


def _off_mesh_shape(local_shape, mesh, pl):
    """PyTorch's global shape on a rank outside the mesh: sharded dims times their mesh dims' sizes
    (a ragged shard's dim: the sum of its sizes)."""
    shape = list(local_shape)
    for m, p in enumerate(pl):
        if type(p) is Shard:
            shape[p.dim] = sum(p.sizes) if p.sizes is not None else shape[p.dim] * mesh.shape[m]
    return tuple(shape)


def _from_local_args(local_tensor, device_mesh, placements, shape, stride, caller):
    _arrays.require_array(local_tensor, caller, "local_tensor")
    _check_mesh(device_mesh, caller)
    mesh = device_mesh if device_mesh is not None else _default_mesh("cuda" if _arrays.is_cupy(local_tensor) else "cpu")
    local = on_device(local_tensor, mesh, caller)
    pl = norm_placements(placements, mesh, local.ndim, caller)
    if shape is not None:
        shape = _check_shape(shape, local.ndim, caller)
    if stride is not None:
        stride = _check_shape(stride, local.ndim, caller, "stride")
    return local, mesh, pl, shape, stride


def from_local_array(local_tensor, device_mesh, placements, run_check, shape, stride, requires_grad):
    """DTensor.from_local of a plain array (``requires_grad``: the caller's array requires grad)."""
    caller = "DTensor.from_local"
    if run_check:
        # the verdict of the local checks is agreed, so every rank raises (agreement.agreed)
        with agreement.agreed(_check_group(device_mesh, local_tensor), caller):
            local, mesh, pl, shape, stride = _from_local_args(local_tensor, device_mesh, placements, shape, stride,
                                                              caller)
    else:
        try:
            local, mesh, pl, shape, stride = _from_local_args(local_tensor, device_mesh, placements, shape, stride,
                                                              caller)
        except (TypeError, ValueError) as err:
            _post_error(local_tensor, device_mesh, placements, shape, err)
            raise
    if mesh._coordinate is None:  # off the mesh: no shard, nothing to agree on
        xp = _arrays.namespace(local)
        gshape = shape if shape is not None else _off_mesh_shape(local.shape, mesh, pl)
        return DTensor(xp.empty((0,) * local.ndim, dtype=local.dtype), mesh, pl, gshape, None, stride)
    if run_check:
        local, shape = _run_check(local, mesh, pl, shape, requires_grad)
        return DTensor(local, mesh, pl, shape, None, stride)
    if shape is not None:  # nothing is communicated: check this rank's shard against the chunk rule
        exp, _ = _layout_shape_and_offset(shape, mesh.shape, pl, mesh._coordinate)
        if tuple(local.shape) != exp:
            d = next(i for i in range(len(exp)) if exp[i] != local.shape[i])
            raise ValueError(
                f"{caller}: this rank (mesh rank {int(mesh.mesh[mesh._coordinate])}) holds a local array of shape "
                f"{tuple(local.shape)}, but global shape {shape} with placements {list(pl)} gives it {exp} (dim "
                f"{d}; the torch.chunk rule, or a ragged Shard's sizes); pass shape= consistent with the shard "
                f"sizes (mpilocal.local_shape_and_offset gives each rank's), omit shape= to infer it, or use "
                f"Shard(d, sizes=...) for another split. Checked on this rank only: run_check=True makes every "
                f"rank raise"
            )
    return wrap_local(local, mesh, pl, shape, stride, caller, requires_grad)


def _post_error(local_tensor, device_mesh, placements, shape, err):
    """On the non-blocking path, a rank whose arguments fail still posts the shape agreement the
    others post, carrying its error, so that they raise it too when they complete theirs."""
    if shape is not None:
        return
    mesh = device_mesh
    if mesh is None:
        mesh = _default_mesh("cuda" if _arrays.is_cupy(local_tensor) else "cpu")
    if not isinstance(mesh, DeviceMesh) or mesh._coordinate is None or not _would_agree(placements, mesh):
        return
    try:
        index = _flat(tuple(mesh.mesh.shape), mesh._coordinate)
        collectives.post_shape_agreement(mesh, _sum_error_row(err, index, _sum_width(mesh)))
    except Exception:  # noqa: BLE001 - the argument error is what this rank reports
        pass


_WRAP: dict = {}  # (id(mesh), id(placements), local shape, dtype, requires_grad) -> (weakref(mesh), pl, key, vec)


def wrap_local(local, mesh, pl, shape=None, stride=None, caller="local_map", requires_grad=False):
    """A DTensor around ``local``; without ``shape``, sharded dims are agreed non-blockingly (and
    checked, see :func:`_check_sum`, when the shape is first needed). The agreement's vector of a
    repeated call (a local_map loop) is looked up by the identity of the mesh (a weak reference: a
    dropped mesh still frees its communicators) and of the placements (held by the entry)."""
    if mesh._coordinate is None:  # off the mesh: an empty local array (PyTorch's global shape)
        xp = _arrays.namespace(local)
        gshape = shape if shape is not None else _off_mesh_shape(local.shape, mesh, pl)
        return DTensor(xp.empty((0,) * local.ndim, dtype=local.dtype), mesh, pl, gshape, None, stride)
    if shape is None:
        mesh_shape = mesh.mesh.shape
        for i, p in enumerate(pl):
            if type(p) is Shard and mesh_shape[i] > 1:  # a mesh dim of size 1 shards nothing
                ck = (id(mesh), id(pl), local.shape, local.dtype, requires_grad)
                hit = _WRAP.get(ck)
                if hit is None or hit[0]() is not mesh or hit[1] is not pl:
                    key = (tuple(local.shape), local.dtype, _F_GRAD if requires_grad else 0)
                    vec = _sum_row(*key, pl, mesh_shape, _flat(mesh_shape, mesh._coordinate), _sum_width(mesh))
                    if len(_WRAP) >= 256:
                        _WRAP.clear()
                    hit = _WRAP[ck] = (weakref.ref(mesh), pl, key, vec)
                fut = collectives.post_shape_agreement(mesh, hit[3])
                return DTensor(local, mesh, pl, None, _Pending(fut, caller, hit[2]), stride)
        shape = tuple(local.shape)
    return DTensor(local, mesh, pl, shape, None, stride)


def _run_check(local, mesh, pl, shape, requires_grad):
    """Collective consistency check of from_local's inputs; returns (local, global shape)."""
    caller = "DTensor.from_local(run_check=True)"
    vec = _meta_row(tuple(local.shape), local.dtype, _F_GRAD if requires_grad else 0, shape, pl)
    rows = collectives.meta_allgather(mesh._metadata_comm(), vec, "run_check")
    shape = _check_rows(rows, mesh, pl, shape, caller)
    groups = mesh_groups(mesh)
    for i, p in enumerate(pl):
        if type(p) is Replicate and mesh.shape[i] > 1:
            local = collectives.bcast(local, 0, groups[i])
    return local, shape


def distribute_tensor(tensor, device_mesh=None, placements=None, *, src_data_rank=0, requires_grad=False):
    """Distribute a global array over ``device_mesh`` by ``placements``. **Collective** over the mesh.

    The data of group rank ``src_data_rank`` (on every mesh dim) is scattered — one ``scatter`` —
    or, when no placement is a Shard, broadcast; ``None`` slices each rank's own copy with no
    communication. Every rank passes an array of the same shape and dtype (checked), or — with
    ``src_data_rank`` set — ``None`` on ranks other than the source: shape and dtype then come from
    the source (so one rank can read a file and distribute it). The result never shares memory with
    ``tensor``.

    ``Partial(op)`` placements give the value on coordinate 0 of that mesh dim and the identity of
    ``op`` elsewhere (zeros for ``sum``, ones for ``product``; the value everywhere for ``avg``,
    ``max``, ``min``), so reducing gives the array back. A DTensor ``tensor`` is returned as is when
    its mesh and placements match (else ``ValueError``: use ``redistribute``). ``requires_grad=True``
    makes the result a leaf that records gradients.
    """
    if type(tensor) is DTensor:
        out = _distribute_dtensor(tensor, device_mesh, placements)
    else:
        out = _distribute_tensor(tensor, device_mesh, placements, src_data_rank)
    return out.requires_grad_() if requires_grad else out


def _distribute_dtensor(t, device_mesh, placements):
    caller = "distribute_tensor"
    _check_mesh(device_mesh, caller)
    mesh = t._mesh if device_mesh is None else device_mesh
    if mesh != t._mesh:
        raise ValueError(f"{caller}: the DTensor lives on {t._mesh}, not on {mesh}; a DTensor cannot be distributed "
                         f"to another mesh (use full_tensor() and distribute_tensor on the new mesh)")
    pl = norm_placements(placements, mesh, t.ndim, caller)
    if pl != t._placements:
        raise ValueError(f"{caller}: the DTensor has placements {list(t._placements)}, not {list(pl)}; use "
                         f"dt.redistribute(device_mesh, {list(pl)}) to change them")
    return t


def _distribute_tensor(tensor, device_mesh, placements, src_data_rank):
    caller = "distribute_tensor"
    mesh = pl = x = None
    # with communication ahead, the verdict of the local checks is agreed so every rank raises
    with agreement.agreed(_check_group(device_mesh, tensor) if src_data_rank is not None else None, caller):
        _check_mesh(device_mesh, caller)
        if tensor is None:
            if src_data_rank is None:
                raise TypeError(f"{caller}: tensor is None; only with src_data_rank set (the default, 0) may ranks "
                                f"other than the source pass None")
            mesh = device_mesh if device_mesh is not None else _default_mesh("cpu")
        else:
            _arrays.require_array(tensor, caller, "tensor")
            mesh = device_mesh if device_mesh is not None else _default_mesh(
                "cuda" if _arrays.is_cupy(tensor) else "cpu")
            x = on_device(tensor, mesh, caller)
            pl = norm_placements(placements, mesh, x.ndim, caller)
        if src_data_rank is not None:
            if isinstance(src_data_rank, bool) or not isinstance(src_data_rank, (int, np.integer)):
                raise TypeError(f"{caller}: src_data_rank must be an int or None, got {src_data_rank!r}")
            if not 0 <= src_data_rank < min(mesh.shape):
                raise ValueError(
                    f"{caller}: src_data_rank={src_data_rank} is not a group rank on every mesh dim of a mesh of "
                    f"shape {mesh.shape}; use 0..{min(mesh.shape) - 1} or None"
                )
            if tensor is None and mesh._coordinate == (int(src_data_rank),) * mesh.ndim:
                raise TypeError(f"{caller}: tensor is None on the source rank (src_data_rank={src_data_rank}); the "
                                f"source must pass the global array (other ranks may pass None)")
        if tensor is None and mesh._coordinate is None:
            raise TypeError(f"{caller}: tensor is None on a rank outside the mesh, which takes no part in the "
                            f"exchange and cannot learn the shape; pass the array (or any array of its shape and "
                            f"dtype) there")
    coord = mesh._coordinate
    if coord is None:
        xp = _arrays.namespace(x)
        return DTensor(xp.empty((0,) * x.ndim, dtype=x.dtype), mesh, pl, tuple(x.shape))
    if src_data_rank is None or mesh.mesh.size == 1:  # each rank slices its own copy: no communication
        xp = _arrays.namespace(x)
        shape = tuple(x.shape)
        local = xp.array(x[local_slices(shape, mesh.shape, pl, coord)], order="C", copy=True)
        return DTensor(_partial_values(local, mesh, pl, coord), mesh, pl, shape)
    comm = mesh._metadata_comm()
    vec = _meta_row((), np.dtype(np.uint8), _F_NONE) if x is None else _meta_row(tuple(x.shape), x.dtype)
    rows = collectives.meta_allgather(comm, vec, "input_check")
    root_coord = (int(src_data_rank),) * mesh.ndim
    root = int(np.ravel_multi_index(root_coord, mesh.shape))
    ranks = mesh.mesh.ravel()
    given = np.flatnonzero((_row_flags(rows) & _F_NONE) == 0)
    for r in given:
        if not np.array_equal(rows[r], rows[root]):
            raise ValueError(
                f"{caller}: mesh rank {int(ranks[r])} passes shape {meta_shape(rows[r])} but the "
                f"source (mesh rank {int(ranks[root])}) passes {meta_shape(rows[root])} "
                f"(or another dtype); every rank must pass the same global shape and dtype (or None)"
            )
    shape = meta_shape(rows[root])
    if len(given) < len(ranks):  # some ranks passed None: shape and dtype from the source's row
        dtype = _row_dtype(rows[root])
        if dtype is None:
            raise NotImplementedError(
                f"{caller}: ranks {[int(ranks[r]) for r in range(len(ranks)) if r not in set(given)]} pass None, but "
                f"the source's dtype (structured) cannot be sent in the metadata exchange; pass an array of the "
                f"global shape and dtype (any values) on every rank"
            )
        if x is None:
            pl = norm_placements(placements, mesh, len(shape), caller)
            xp = np if mesh.device_type == "cpu" else _cupy()
            x = xp.empty(shape if all(p.is_replicate() or p.is_partial() for p in pl) else (0,) * len(shape), dtype)
    g = group_for(mesh.get_comm())
    if not any(type(p) is Shard for p in pl):
        local = collectives.bcast(x, root, g)
    else:
        coords = mesh_coords(mesh.shape)
        counts = [math.prod(_layout_shape_and_offset(shape, mesh.shape, pl, c)[0]) for c in coords]
        pieces = [x[local_slices(shape, mesh.shape, pl, c)] for c in coords] if g.rank == root else None
        local_shape, _ = _layout_shape_and_offset(shape, mesh.shape, pl, coord)
        local = collectives.scatter(pieces, x, local_shape, counts, root, g)
    return DTensor(_partial_values(local, mesh, pl, coord), mesh, pl, shape)


def _cupy():
    import cupy

    return cupy


def _partial_values(local, mesh, pl, coord):
    """The local values of Partial placements from the replicated ``local`` (see distribute_tensor).
    Mesh dims are partitioned last to first, the reverse of the order in which redistribute reduces
    them (first to last), so that mixed reduce ops give the array back."""
    for m in range(len(pl) - 1, -1, -1):
        p = pl[m]
        if type(p) is Partial and mesh.shape[m] > 1:
            local = to_partial(local, p.reduce_op, coord[m])
    return local
