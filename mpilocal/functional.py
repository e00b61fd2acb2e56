"""Collectives on local NumPy/CuPy arrays: PyTorch's functional collectives (``funcol``).

Public (``import mpilocal.functional as funcol``), with PyTorch's names and argument order:
``all_gather_tensor``, ``all_reduce``, ``reduce_scatter_tensor``, ``all_to_all_single``,
``broadcast``. ``group`` is a 1-D :class:`DeviceMesh`, a ``(DeviceMesh, mesh_dim)`` pair or an
mpi4py communicator. Every function here is **collective** over ``group``; results are new arrays of
the input's kind and the input is never modified.

Layer "api" (docs/architecture.md): this module checks the arguments and agrees them over the
group (so a bad call raises the same error on every rank); the collectives themselves are issued
by :mod:`mpilocal.collectives` (accounting, deadline, fingerprints). The neighbour collectives
(``halo_exchange``, ``halo_update``, ``permute``, ``send_recv``, ``shift``) are defined in
:mod:`mpilocal.neighbors`, which sits above DTensor, and are added to this module when it loads
(``import mpilocal`` loads it). Differentiable versions (on autograd's ``Tracked`` arrays inside
``local_map``) are registered in :data:`AUTOGRAD` by :mod:`mpilocal.autograd`.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from mpi4py import MPI

from . import _arrays, agreement, collectives, debug
from .collectives import contiguous, empty, leading, restore
from .layout import chunk_sizes
from .metadata import META_WIDTH, check_params, check_same, meta_with, row_flags
from .mesh import DeviceMesh
from .names import REDUCE_OPS
from .transport import Group, count_limit, equal_counts, group_for

__all__ = ["all_gather_tensor", "all_reduce", "reduce_scatter_tensor", "all_to_all_single", "broadcast"]


# ------------------------------------------------------------------------------------------------
# groups and checks
# ------------------------------------------------------------------------------------------------
def resolve_group(group, caller: str) -> Group:
    """A :class:`Group` from a 1-D DeviceMesh, a (DeviceMesh, mesh_dim) pair or an mpi4py Comm."""
    if isinstance(group, DeviceMesh):  # the common cases first
        g = group.__dict__.get("_funcol_group")  # dropped by close(), so a closed mesh raises below
        if g is not None:
            return g
        if group.ndim != 1:
            raise ValueError(
                f"{caller}: group is a {group.ndim}-D DeviceMesh; pass a 1-D mesh, (mesh, mesh_dim) or mesh['name']"
            )
        g = group.__dict__["_funcol_group"] = group_for(group.get_group(0))
        return g
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
        return group_for(group[0].get_group(group[1]))
    if isinstance(group, MPI.Comm):
        if group == MPI.COMM_NULL:
            raise ValueError(f"{caller}: group is MPI.COMM_NULL; this rank is not part of that communicator")
        return group_for(group)
    raise TypeError(
        f"{caller}: group must be a 1-D DeviceMesh, a (DeviceMesh, mesh_dim) pair or an mpi4py communicator, "
        f"got {type(group).__name__}"
    )


def normalize_op(op, caller: str) -> str:
    name = op.lower() if isinstance(op, str) else None
    if name not in REDUCE_OPS:
        raise ValueError(f"{caller}: reduce op {op!r} is not supported; use one of {', '.join(map(repr, REDUCE_OPS))}")
    return name


_OP_DTYPE_OK: set = set()  # (op, dtype) pairs that passed check_op_dtype
_OP_FOR: dict = {}  # (reduce op string as given, dtype) -> the normalized op, once it passed both checks


def reduce_op_for(reduceOp, dtype, caller: str) -> str:
    """:func:`normalize_op` and :func:`check_op_dtype` of a public reduction, remembered for the
    (string, dtype) pairs that passed (a loop of calls pays one dictionary lookup)."""
    key = (reduceOp, dtype) if type(reduceOp) is str else None
    if key is not None:
        op = _OP_FOR.get(key)
        if op is not None:
            return op
    op = normalize_op(reduceOp, caller)
    check_op_dtype(op, dtype, caller)
    if key is not None:
        if len(_OP_FOR) >= 1024:
            _OP_FOR.clear()
        _OP_FOR[key] = op
    return op


def check_op_dtype(op: str, dtype, caller: str) -> None:
    key = (op, dtype)
    try:
        if key in _OP_DTYPE_OK:
            return
    except TypeError:  # an unhashable dtype spec: checked, not remembered
        key = None
    kind = np.dtype(dtype).kind
    if kind == "c" and op in ("max", "min"):
        raise TypeError(f"{caller}: reduce op {op!r} is undefined for complex dtype {dtype}; use 'sum', 'avg' or 'product'")
    if op == "avg" and kind in "biu":
        raise TypeError(
            f"{caller}: reduce op 'avg' of {dtype} arrays would not be exact; cast to a floating dtype first "
            f"(or reduce with 'sum' and divide yourself)"
        )
    if kind not in "biufc":
        raise TypeError(f"{caller}: cannot reduce arrays of dtype {dtype}")
    if key is not None:
        _OP_DTYPE_OK.add(key)


def check_movable(dtype, caller: str) -> None:
    """Arrays whose elements are references to Python objects cannot be sent as bytes."""
    dt = np.dtype(dtype)
    if dt.hasobject or dt.kind == "T":
        raise TypeError(
            f"{caller}: arrays of dtype {dt} hold references to Python objects, which cannot be sent to other "
            f"processes; convert them to a fixed-size dtype first (numbers, or numpy.str_ such as 'U16')"
        )


def check_redistribute(dtype, src, dst, caller: str = "redistribute") -> None:
    """The checks funcol makes, for a redistribute from placements ``src`` to ``dst``: the reduce op
    of each Partial that is reduced must suit the dtype, and communicated data must be movable.
    Local (``dtype`` and placements are the same on every rank), so call it before any collective."""
    for s, d in zip(src, dst):
        if s == d:
            continue
        if s.is_partial():
            check_op_dtype(s.reduce_op, dtype, caller)
            check_movable(dtype, caller)
        elif s.is_shard():
            check_movable(dtype, caller)


def norm_dim(dim, ndim, caller, what="dim"):
    """``dim`` as a non-negative axis of an ``ndim``-D array (``TypeError``/``ValueError`` naming
    ``what`` otherwise). Package API (neighbors, autograd)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{caller}: {what} must be an int, got {dim!r}")
    if ndim == 0:
        raise ValueError(
            f"{caller}: a 0-d array has no dimension {dim} to use as {what}; pass x.reshape(1) (PyTorch's "
            f"collectives along a dim need at least one dimension as well)"
        )
    if not -ndim <= dim < ndim:
        raise ValueError(f"{caller}: {what} {dim} is out of range for an array of ndim {ndim}")
    return int(dim) % ndim



# ------------------------------------------------------------------------------------------------
# public functional collectives
# ------------------------------------------------------------------------------------------------
#: The differentiable collectives, registered by :mod:`mpilocal.autograd` when it is imported (as
#: ``engine.ADDERS``): ``{array type: {public function name: function}}``. A public function given
#: an array of a registered type (autograd's ``Tracked``, inside ``local_map`` with inputs that
#: require grad) runs the registered function instead; its backward is itself a collective.
AUTOGRAD: dict = {}


def agree_args(g, caller, err, x, params=None, *, skip_dim=None, what="argument_check"):
    """Agree over Group ``g`` on the verdict of this rank's argument checks (``err``: the exception
    they raised, or None) and on ``x``'s shape, dtype and kind and the call's ``params`` (name ->
    value; give them when ``err`` is None): every rank raises the same error when a rank failed or
    the ranks differ (shapes may differ along ``skip_dim``), else gets every rank's metadata row
    (None for one rank, or with the agreement off). **Collective.** Package API (neighbors)."""
    params = params or {}
    rows = agreement.agree(g, caller, err, None if err else meta_with(x, caller, **params), what)
    check_params(rows, caller, **params)
    check_same(rows, caller, skip_dim=skip_dim)
    return rows


def checked(g, caller, err, x, params, desc, run, *, skip_dim=None, what="argument_check", full=None):
    """Run a public collective under the argument check: ``run(x, rows)`` issues the data
    collective(s), with ``rows`` every rank's agreed metadata row, or None when every rank passes
    the same arguments (then this rank's own values hold everywhere). ``desc``: what decides the
    data collective (function, kind, dtype, shape, parameters; None where the local checks failed,
    or where this rank's arguments can only be judged from every rank's metadata: then every rank
    takes the full agreement, and ``run`` gets the rows).

    Default: the speculative signature check of :mod:`mpilocal.agreement` (one fixed-size
    non-blocking reduction per call, completed after the data collective of a call that repeats
    the agreed pattern, before the result is returned); the full blocking agreement
    (:func:`agree_args`) when a rank failed its checks or the ranks differ, and on every call under
    ``MPILOCAL_DEBUG=1``. ``full()``: that full agreement, when not :func:`agree_args`.
    **Collective.** Package API (neighbors)."""
    if g.size == 1:  # nobody to agree with (agree's rule for one rank: its own verdict, no rows)
        if err is not None:
            raise err
        return run(x, None)
    if full is None:
        def full():
            return agree_args(g, caller, err, x, params, skip_dim=skip_dim, what=what)
    if not agreement.signature_checks():
        return run(x, full())
    h = None if err is not None or desc is None else agreement.signature(desc)
    done, chk = agreement.speculate(g, caller, h, run, x)  # the steady state: one posted reduction
    if done:
        return chk
    if chk is None:  # not the predicted call (or a check left pending by a call that raised)
        chk = agreement.post_signature(g, caller, h)
        if chk.fast:
            out = run(x, None)
            if chk.outcome() == agreement.OK:
                return out
    if not chk.fast:  # (a fast rank whose check failed ran its data collective: only the full agreement is left)
        if chk.outcome() == agreement.AGREED:
            shape, dtype, xp = x.shape, x.dtype, _arrays.namespace(x)
            chk.remember(lambda: run(xp.zeros(shape, dtype), None))  # what slow ranks replay later
            return run(x, None)
        if chk.must_replay():  # fast ranks are in the predicted data collective: complete it
            chk.replay()
    return run(x, full())


def _differentiable(x, name):
    rules = AUTOGRAD.get(type(x))
    return None if rules is None else rules[name]


def all_gather_tensor(x, gather_dim: int, group, tag: str = ""):
    """Concatenate every rank's ``x`` along ``gather_dim`` in group-rank order. **Collective.**

    Sizes along ``gather_dim`` may differ between ranks (they are agreed as metadata); all other
    dims and the dtype must match, else ``ValueError`` on every rank.
    """
    caller = "all_gather_tensor"
    f = _differentiable(x, "all_gather_tensor")
    if f is not None:  # differentiable (inside local_map with inputs that require grad)
        return f(x, gather_dim, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict is agreed below so that every rank raises (agreement.agree)
        _arrays.require_array(x, caller)
        dim = norm_dim(gather_dim, x.ndim, caller, "gather_dim")
        check_movable(x.dtype, caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e
    if err is not None:
        dim = None

    def run(x, rows):
        if rows is None and g.size > 1 and not agreement.signature_checks():
            # argument agreement is off (MPILOCAL_CHECK_ARGS=0): sizes still needed
            rows = collectives.meta_allgather(g.comm, meta_with(x, caller, gather_dim=dim), "gather_sizes")
        sizes = [int(r[2 + dim]) for r in rows] if rows is not None else [x.shape[dim]] * g.size
        return collectives.all_gather_looped(x, dim, g, sizes)

    return checked(g, caller, err, x, None if err else dict(gather_dim=dim),
                   None if err else (caller, type(x), x.dtype, x.shape, dim), run,
                   skip_dim=None if err else dim, what="gather_sizes")



def all_reduce(x, reduceOp: str, group, tag: str = ""):
    """Elementwise reduction of every rank's ``x`` (``"sum"``, ``"avg"``, ``"max"``, ``"min"``,
    ``"product"``). **Collective**; all ranks pass the same shape and dtype."""
    caller = "all_reduce"
    f = _differentiable(x, "all_reduce")
    if f is not None:  # differentiable (inside local_map with inputs that require grad)
        return f(x, reduceOp, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict (and shapes/dtypes) are agreed so every rank raises
        _arrays.require_array(x, caller)
        op = reduce_op_for(reduceOp, x.dtype, caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e
    if err is not None:
        op = None
    return checked(g, caller, err, x, None if err else dict(reduceOp=op),
                   None if err else (caller, type(x), x.dtype, x.shape, op),
                   lambda x, rows: collectives.all_reduce_looped(x, op, g))


def reduce_scatter_tensor(x, reduceOp: str, scatter_dim: int, group, tag: str = ""):
    """Reduce every rank's ``x`` and keep this rank's piece along ``scatter_dim`` (``torch.chunk``
    pieces, so the dim need not divide evenly). **Collective.**"""
    caller = "reduce_scatter_tensor"
    f = _differentiable(x, "reduce_scatter_tensor")
    if f is not None:  # differentiable (inside local_map with inputs that require grad)
        return f(x, reduceOp, scatter_dim, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict (and shapes/dtypes) are agreed so every rank raises
        _arrays.require_array(x, caller)
        op = reduce_op_for(reduceOp, x.dtype, caller)
        dim = norm_dim(scatter_dim, x.ndim, caller, "scatter_dim")
        err = None
    except (TypeError, ValueError) as e:
        err = e
    if err is not None:
        op = dim = None
    return checked(g, caller, err, x, None if err else dict(reduceOp=op, scatter_dim=dim),
                   None if err else (caller, type(x), x.dtype, x.shape, op, dim),
                   lambda x, rows: collectives.reduce_scatter_looped(x, op, dim, g, chunk_sizes(x.shape[dim], g.size)))


def all_to_all_single(x, output_split_sizes, input_split_sizes, group, tag: str = ""):
    """Split ``x`` along dim 0 by ``input_split_sizes`` (block p to rank p) and concatenate what
    arrives by ``output_split_sizes``. ``None`` for both: equal splits. ``output_split_sizes=None``
    with explicit input sizes: the output sizes are agreed as metadata. **Collective.**"""
    caller = "all_to_all_single"
    f = _differentiable(x, "all_to_all_single")
    if f is not None:  # differentiable (inside local_map with inputs that require grad)
        return f(x, output_split_sizes, input_split_sizes, group)
    g = resolve_group(group, caller)
    # equal splits (both None): the checks' outcome depends only on the group and the array's shape,
    # dtype and kind, so a loop of calls looks it up (_A2A_EQUAL)
    key = (g, x.shape, x.dtype, type(x)) if output_split_sizes is None is input_split_sizes \
        and _arrays.is_array(x) else None
    hit = None if key is None else _A2A_EQUAL.get(key)
    if hit is not None:
        splits, flags = hit
        err = None
    else:
        try:  # rank-local checks; the verdict (and dtypes/trailing dims) are agreed so every rank raises
            splits = _a2a_splits(x, output_split_sizes, input_split_sizes, g, caller)
            check_movable(x.dtype, caller)
            err = None
        except (TypeError, ValueError) as e:
            err = e
        # flags that choose the MPI call, agreed with the checks: bit 0 "my splits are not all equal",
        # bit 1 "a total of mine passes the MPI count limit", bit 2 "my receive sizes are agreed later"
        flags = 0 if err else _a2a_flags(x, splits, g)
        if key is not None and err is None:
            if len(_A2A_EQUAL) >= 256:
                _A2A_EQUAL.clear()
            _A2A_EQUAL[key] = ((tuple(splits[0]), tuple(splits[1])), flags)  # (immutable: shared by later calls)
    if err is None:
        ins, outs = splits
    inner = math.prod(x.shape[1:]) if err is None else 0

    def run(x, rows):
        # The split agreement runs when any rank lacks its output sizes (agreed flag bit 2), so ranks that
        # pass them join it too; the sizes that arrive are the truth. Without the argument agreement
        # (MPILOCAL_CHECK_ARGS=0) each rank decides alone: all ranks must then pass sizes alike.
        # Split sizes differ from rank to rank by design, so the choice of MPI call comes from every
        # rank's flags: plain all-to-all only when every rank's splits are equal (with equal totals, as
        # the shapes show), large-message path when any rank needs it. Without the agreement
        # (MPILOCAL_CHECK_ARGS=0) the v-variant is used and large totals are not detected. rows None
        # with the signature check: every rank passed these same arguments, so its own flags hold.
        outs_ = outs
        if rows is None and not agreement.signature_checks():
            need, uniform, bound = outs is None, g.size == 1, None
        elif rows is None:
            need = bool(flags & 4)
            uniform = not flags & 1
            bound = 1 << 62 if flags & 2 else x.shape[0] * g.size * inner if flags & 4 else 0
        else:
            fl = row_flags(rows)
            need = bool((fl & 4).any())
            uniform = not (fl & 1).any() and len(set(rows[:, 2].tolist())) == 1
            # no rank receives more than all ranks send: a group-wide bound where receive sizes are agreed later
            bound = 1 << 62 if (fl & 2).any() else int(rows[:, 2].sum()) * inner if (fl & 4).any() else 0
        if need:
            recv = collectives.exchange_splits(g, ins)
            outs_ = _check_splits(recv, g.size, caller, "output_split_sizes")
        # the fingerprint holds dtype and trailing dims
        return collectives.all_to_all_rows(x, ins, outs_, g, uniform, bound, trailing=x.shape[1:])

    def full():
        rows = agreement.agree(g, caller, err, None if err else meta_with(x, caller, flags=flags))
        check_same(rows, caller, skip_dim=0)
        return rows

    return checked(g, caller, err, x, None, None if err else (
        caller, type(x), x.dtype, x.shape, tuple(ins), None if outs is None else tuple(outs), flags), run, full=full)


_A2A_EQUAL: dict = {}  # (group, shape, dtype, kind) -> (splits, flags) of all_to_all_single's equal splits


def _a2a_flags(x, splits, g):
    ins, outs = splits
    inner = math.prod(x.shape[1:])
    flags = 0 if outs is not None and equal_counts(ins) and equal_counts(outs) and ins[0] == outs[0] else 1
    limit = count_limit()
    if limit is not None and max(sum(ins), sum(outs or ins)) * inner * x.dtype.itemsize > limit:
        flags |= 2
    if outs is None:
        flags |= 4
    return flags


def _a2a_splits(x, output_split_sizes, input_split_sizes, g, caller):
    """all_to_all_single's local argument checks: (input splits, output splits or None to agree)."""
    _arrays.require_array(x, caller)
    if x.ndim == 0:
        raise ValueError(f"{caller}: x must have at least one dimension")
    n0 = x.shape[0]
    if input_split_sizes is None:
        if n0 % g.size:
            raise ValueError(
                f"{caller}: dim 0 of size {n0} does not split evenly over {g.size} ranks; pass input_split_sizes"
            )
        input_split_sizes = [n0 // g.size] * g.size
    input_split_sizes = _check_splits(input_split_sizes, g.size, caller, "input_split_sizes")
    if sum(input_split_sizes) != n0:
        raise ValueError(f"{caller}: input_split_sizes {input_split_sizes} sum to {sum(input_split_sizes)}, not dim 0 = {n0}")
    if output_split_sizes is None:
        if input_split_sizes == [n0 // g.size] * g.size and n0 % g.size == 0:
            return input_split_sizes, input_split_sizes
        return input_split_sizes, None
    return input_split_sizes, _check_splits(output_split_sizes, g.size, caller, "output_split_sizes")


def _check_splits(sizes, k, caller, what):
    try:
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError):
        raise TypeError(f"{caller}: {what} must be a sequence of ints, got {sizes!r}") from None
    if len(sizes) != k or any(s < 0 for s in sizes):
        raise ValueError(f"{caller}: {what} {sizes} must hold {k} non-negative sizes, one per rank of the group")
    return sizes


def broadcast(x, src: int, group, tag: str = ""):
    """Every rank gets group rank ``src``'s ``x`` (as PyTorch's funcol, ``src`` is a rank within
    ``group``). **Collective**; other ranks pass an array of the same shape and dtype."""
    caller = "broadcast"
    f = _differentiable(x, "broadcast")
    if f is not None:  # differentiable (inside local_map with inputs that require grad)
        return f(x, src, group)
    g = resolve_group(group, caller)
    try:  # rank-local checks; the verdict (and shapes/dtypes) are agreed so every rank raises
        _arrays.require_array(x, caller)
        if isinstance(src, bool) or not isinstance(src, (int, np.integer)) or not 0 <= src < g.size:
            raise ValueError(f"{caller}: src {src!r} is not a rank of the group (0..{g.size - 1}); pass a group rank")
        check_movable(x.dtype, caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e
    root = None if err else int(src)
    return checked(g, caller, err, x, None if err else dict(src=root),
                   None if err else (caller, type(x), x.dtype, x.shape, root),
                   lambda x, rows: collectives.bcast(x, root, g))


# ------------------------------------------------------------------------------------------------
# coalesced collectives: a list of arrays in one collective (PyTorch's *_coalesced)
# ------------------------------------------------------------------------------------------------
# Rule: the arrays are packed into one buffer and moved by ONE collective, booked once by
# CommDebugMode under the coalesced name. Gathers move bytes, so any mix of dtypes is one
# collective. Reductions need one dtype per buffer: arrays of one dtype are one collective, and a
# list mixing k dtypes is k collectives (one per dtype, in order of first appearance, each booked).
# Not differentiable: under local_map's autograd they raise NotImplementedError.
__all__ += ["all_reduce_coalesced", "all_gather_into_tensor_coalesced", "reduce_scatter_tensor_coalesced"]


def _coalesced_list(inputs, caller) -> list:
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"{caller}: inputs must be a list of NumPy or CuPy arrays, got {type(inputs).__name__}; "
                        f"for one array use {caller[:-len('_coalesced')]}")
    xs = list(inputs)
    if any(type(x) in AUTOGRAD for x in xs):
        raise NotImplementedError(
            f"{caller} is not differentiable; inside local_map with inputs that require grad, call "
            f"{caller[:-len('_coalesced')]} once per array (each of those is differentiable)"
        )
    for i, x in enumerate(xs):
        _arrays.require_array(x, caller, f"inputs[{i}]")
    kinds = {_arrays.kind_name(x) for x in xs}
    if len(kinds) > 1:
        raise TypeError(f"{caller}: inputs mix NumPy and CuPy arrays; pass arrays of one kind")
    return xs


def _coalesced_agree(g, caller, err, xs, params):
    """Agree on the local checks' verdict and on the list (count, shapes, dtypes, kinds, parameters):
    every rank raises the same error when they differ. Collective over ``g``."""
    meta = None
    if err is None:
        sig = repr([(tuple(x.shape), x.dtype.str, _arrays.kind_name(x)) for x in xs])
        meta = np.zeros(META_WIDTH, dtype=np.int64)
        meta[0] = len(xs)
        meta[1] = zlib.crc32(sig.encode())
        meta[2] = zlib.crc32(repr(params).encode())
    rows = agreement.agree(g, caller, err, meta)
    if rows is None:
        return
    bad = [r for r in range(len(rows)) if not np.array_equal(rows[r, :3], rows[0, :3])]
    if bad:
        r = bad[0]
        what = ("parameters " + ", ".join(f"{k}={v!r}" for k, v in params.items())) if \
            np.array_equal(rows[r, :2], rows[0, :2]) else "list of arrays"
        raise ValueError(
            f"{caller}: group rank {r} passes a different {what} than group rank 0 ({int(rows[r, 0])} vs "
            f"{int(rows[0, 0])} arrays, or other shapes, dtypes or kinds); every rank must pass the same number "
            f"of arrays, with the same shapes and dtypes in the same order, and the same parameters"
        )


def _by_dtype(xs) -> list:
    """[(dtype, [indices])] in order of first appearance."""
    groups: dict = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.dtype, []).append(i)
    return list(groups.items())


def all_reduce_coalesced(inputs, reduceOp: str, group, tag: str = "") -> list:
    """:func:`all_reduce` of each array of ``inputs`` (a list), packed into one buffer: one collective
    for arrays of one dtype (one per dtype for a mix). **Collective**; every rank passes arrays of the
    same shapes and dtypes in the same order. Returns a list of new arrays."""
    caller = "all_reduce_coalesced"
    g = resolve_group(group, caller)
    xs, op = [], None
    try:
        xs = _coalesced_list(inputs, caller)
        op = normalize_op(reduceOp, caller)
        for x in xs:
            check_op_dtype(op, x.dtype, caller)
        err = None
    except (TypeError, ValueError, NotImplementedError) as e:
        err = e
    _coalesced_agree(g, caller, err, xs, {"reduceOp": op})
    out = [None] * len(xs)
    with debug.counted_as("all_reduce", caller):
        for dt, idx in _by_dtype(xs):
            n = sum(xs[i].size for i in idx)
            flat = empty(xs[idx[0]], (n,))
            pos = 0
            for i in idx:
                flat[pos:pos + xs[i].size] = xs[i].reshape(-1)
                pos += xs[i].size
            red = collectives.all_reduce(flat, op, g)
            pos = 0
            for i in idx:
                out[i] = red[pos:pos + xs[i].size].reshape(xs[i].shape)
                pos += xs[i].size
    return out


def all_gather_into_tensor_coalesced(inputs, group, tag: str = "") -> list:
    """:func:`all_gather_tensor` along dim 0 of each array of ``inputs`` (a list), as bytes in one
    buffer: always one collective, whatever the dtypes. **Collective**; every rank passes arrays of
    the same shapes and dtypes in the same order (as PyTorch). Returns a list of new arrays, each
    ``group size`` times longer along dim 0."""
    caller = "all_gather_into_tensor_coalesced"
    g = resolve_group(group, caller)
    xs = []
    try:
        xs = _coalesced_list(inputs, caller)
        for i, x in enumerate(xs):
            norm_dim(0, x.ndim, f"{caller}: inputs[{i}]", "gather dim")
            check_movable(x.dtype, caller)
        err = None
    except (TypeError, ValueError, NotImplementedError) as e:
        err = e
    _coalesced_agree(g, caller, err, xs, {})
    if not xs:
        return []
    nbytes = [x.nbytes for x in xs]
    total = sum(nbytes)
    send = empty(xs[0], (total,), np.uint8)
    pos = 0
    for x, nb in zip(xs, nbytes):
        if nb:
            send[pos:pos + nb] = contiguous(x).reshape(-1).view(np.uint8)
        pos += nb
    with debug.counted_as("all_gather_into_tensor", caller):
        recv = collectives.all_gather(send, 0, g, [total] * g.size).reshape(g.size, total)
    xp = _arrays.namespace(send)
    out, pos = [], 0
    for x, nb in zip(xs, nbytes):
        block = xp.ascontiguousarray(recv[:, pos:pos + nb])
        out.append(block.view(x.dtype).reshape((g.size * x.shape[0],) + tuple(x.shape[1:])))
        pos += nb
    return out


def reduce_scatter_tensor_coalesced(inputs, reduceOp: str, scatter_dim, group, tag: str = "") -> list:
    """:func:`reduce_scatter_tensor` of each array of ``inputs`` (a list) along its ``scatter_dim``
    (a list, one dim per array, as PyTorch; an int applies to all), packed into one buffer so that
    rank r's block holds its piece of every array: one collective for arrays of one dtype (one per
    dtype for a mix). Pieces follow ``torch.chunk``, so dims need not divide evenly. **Collective**;
    every rank passes the same shapes, dtypes and dims. Returns a list of new arrays."""
    caller = "reduce_scatter_tensor_coalesced"
    g = resolve_group(group, caller)
    xs, op, dims = [], None, []
    try:
        xs = _coalesced_list(inputs, caller)
        op = normalize_op(reduceOp, caller)
        if isinstance(scatter_dim, (int, np.integer)) and not isinstance(scatter_dim, bool):
            scatter_dim = [scatter_dim] * len(xs)
        if not isinstance(scatter_dim, (list, tuple)) or len(scatter_dim) != len(xs):
            raise ValueError(f"{caller}: scatter_dim must be a list of one dim per array ({len(xs)}), got "
                             f"{scatter_dim!r}")
        for i, (x, d) in enumerate(zip(xs, scatter_dim)):
            check_op_dtype(op, x.dtype, caller)
            dims.append(norm_dim(d, x.ndim, f"{caller}: inputs[{i}]", "scatter_dim"))
        err = None
    except (TypeError, ValueError, NotImplementedError) as e:
        err = e
    _coalesced_agree(g, caller, err, xs, {"reduceOp": op, "scatter_dim": dims})
    out = [None] * len(xs)
    k, me = g.size, g.rank
    with debug.counted_as("reduce_scatter_tensor", caller):
        for dt, idx in _by_dtype(xs):
            lead = {i: leading(xs[i], dims[i]) for i in idx}
            sizes = {i: chunk_sizes(lead[i].shape[0], k) for i in idx}
            inner = {i: math.prod(lead[i].shape[1:]) for i in idx}
            counts = [sum(sizes[i][r] * inner[i] for i in idx) for r in range(k)]
            send = empty(xs[idx[0]], (sum(counts),))
            pos = 0
            for r in range(k):
                for i in idx:
                    off, n = sum(sizes[i][:r]), sizes[i][r]
                    if n:
                        send[pos:pos + n * inner[i]] = lead[i][off:off + n].reshape(-1)
                    pos += n * inner[i]
            red = collectives.reduce_scatter(send, op, 0, g, counts)
            pos = 0
            for i in idx:
                n = sizes[i][me] * inner[i]
                piece = red[pos:pos + n].reshape((sizes[i][me],) + tuple(lead[i].shape[1:]))
                out[i] = restore(piece, dims[i])
                pos += n
    return out
