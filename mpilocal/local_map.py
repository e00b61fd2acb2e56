"""local_map: run a function written for local arrays on DTensors (PyTorch's semantics).

Every check (placement counts, None/non-None entries, meshes, mismatches without
``redistribute_inputs``) runs before any collective and depends only on what every rank holds (the
call's arguments, the meshes), so a bad call raises the same error on every rank and communicates
nothing. On aligned inputs the only communication is the non-blocking agreement of the outputs'
global shapes (metadata, posted now and completed when a shape is first needed).

Under ``MPILOCAL_DEBUG=1`` every value that local_map labels ``Replicate`` (its outputs, and the
gradients it gives its inputs) is checked to be equal across its replicas (see
:func:`_check_replicas`).
"""

from __future__ import annotations

import functools
import weakref
import zlib

import numpy as np

from . import _arrays, collectives, deadline
from .dtensor import DTensor, norm_placements, on_device, wrap_local
from .mesh import DeviceMesh
from .placement import Placement, Shard
from .redistribute import check_target

__all__ = ["local_map"]

#: Autograd's rules, registered by :mod:`mpilocal.autograd.dtensor_ops` when it is imported (as
#: ``engine.ADDERS``; nothing here imports autograd): ``"Tracked"`` (the type of tracked local
#: arrays), ``"local_inputs"`` (the local arrays func receives), ``"run"`` (calls func on them while
#: recording), ``"node_of"`` (the node of a tracked array, or None), ``"wrap_output"`` (a tracked
#: output as a DTensor that backpropagates into it), ``"from_local"`` (the same off the mesh).
AUTOGRAD: dict = {}


def _DEAD():  # a weak reference that never matches
    return None


# -- pytree-lite: lists, tuples (incl. namedtuples) and dicts, as PyTorch's pytree ---------------------
def _flatten(obj, out):
    t = type(obj)
    if t is list or t is tuple:
        return (t, [_flatten(o, out) for o in obj])
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return (t, [_flatten(o, out) for o in obj])
    if t is dict:
        return (dict, list(obj.keys()), [_flatten(v, out) for v in obj.values()])
    out.append(obj)
    return None


def _unflatten(spec, it):
    if spec is None:
        return next(it)
    t = spec[0]
    if t is dict:
        return {k: _unflatten(s, it) for k, s in zip(spec[1], spec[2])}
    items = [_unflatten(s, it) for s in spec[1]]
    if t is list:
        return items
    if t is tuple:
        return tuple(items)
    return t(*items)  # namedtuple


def _flat(args):
    """Leaves of ``args`` and a spec to rebuild them (fast path for flat argument lists)."""
    for a in args:
        t = type(a)
        if t is list or t is tuple or t is dict or isinstance(a, tuple):
            leaves = []
            return leaves, _flatten(args, leaves)
    return list(args), None


def _describe_flattening(args) -> str:
    """Which flattened inputs each positional argument became (for the count-mismatch error)."""
    parts, start = [], 0
    for j, a in enumerate(args):
        leaves = []
        _flatten(a, leaves)
        n = len(leaves)
        if _flatten(a, []) is None:
            parts.append(f"argument {j} ({type(a).__name__}) -> input {start}")
        else:
            span = f"inputs {start}..{start + n - 1}" if n else "no inputs"
            parts.append(f"argument {j} (a {type(a).__name__} of {n} leaves) -> {span}")
        start += n
    return "; ".join(parts)


def _spec(p, what):
    """One entry of in_/out_placements as a tuple (None stays None), with a clear error otherwise."""
    if p is None:
        return None
    if isinstance(p, Placement):
        raise TypeError(
            f"local_map: each entry of {what} is a sequence of placements (one per mesh dim), got the single "
            f"placement {p!r}; write [{p!r}]"
        )
    try:
        return tuple(p)
    except TypeError:
        raise TypeError(f"local_map: entries of {what} must be sequences of placements or None, got {p!r}") from None


def _same_ranks(a: DeviceMesh, b: DeviceMesh) -> bool:
    """Whether mesh ``a`` is ``b`` or a reshape of it: the same device type and world ranks in the
    same row-major order (PyTorch's multi-mesh local_map test: a 1-D mesh over a 2-D mesh's ranks)."""
    return a is b or a == b or (a.device_type == b.device_type and a.mesh.size == b.mesh.size
                                and np.array_equal(a.mesh.ravel(), b.mesh.ravel()))


def _input_name(func, spec, i) -> str:
    """``input i`` plus the parameter's name when the inputs were not flattened."""
    if spec is None:
        try:
            import inspect

            params = [p for p in inspect.signature(func).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if i < len(params):
                return f"input {i} ({params[i].name!r})"
        except (TypeError, ValueError):
            pass
    return f"input {i}"


# -- MPILOCAL_DEBUG=1: values labelled Replicate must be equal on their replicas ------------------------
def _checksum(a) -> int:
    """A checksum of ``a``'s values (shape and dtype included) that is equal for equal arrays:
    NaNs of any payload hash alike, and -0.0 like 0.0."""
    if _arrays.is_cupy(a):
        a = a.get()
    a = np.asarray(a)
    if a.dtype.kind in "fc":
        a = np.where(np.isnan(a), np.array(np.nan, dtype=a.dtype), a + a.dtype.type(0))
    elif a.dtype.kind in "OV":  # object pointers and struct padding say nothing about the values
        a = np.zeros(0, dtype=np.uint8)
    head = f"{a.shape}{a.dtype.str}".encode()
    return zlib.crc32(np.ascontiguousarray(a).tobytes(), zlib.crc32(head))


def _replica_dims(mesh, pl):
    return [d for d, p in enumerate(pl) if p.is_replicate() and mesh.shape[d] > 1]


def _check_replicas(mesh, items) -> None:
    """``items``: (label, local array, placements, fix). All-gather one checksum per item over the
    mesh (one small metadata all-gather) and raise the same RuntimeError on every rank if an item
    differs between the ranks of a mesh dim where it is labelled Replicate. **Collective** over the
    mesh; call it on every rank with the same items (they come from the static placements)."""
    vec = np.array([_checksum(a) for _, a, _, _ in items], dtype=np.int64)
    rows = collectives.meta_allgather(mesh._metadata_comm(), vec, "replicate_check")
    sums = rows.reshape(mesh.shape + (len(items),))
    ranks = mesh.mesh
    names = mesh.mesh_dim_names
    for k, (label, _, pl, fix) in enumerate(items):
        for d in _replica_dims(mesh, pl):
            lines = np.moveaxis(sums[..., k], d, -1).reshape(-1, mesh.shape[d])
            wranks = np.moveaxis(ranks, d, -1).reshape(-1, mesh.shape[d])
            bad = []
            for line, wr in zip(lines, wranks):
                if (line == line[0]).all():
                    continue
                groups = {}
                for c, r in zip(line.tolist(), wr.tolist()):
                    groups.setdefault(c, []).append(r)
                bad.append(" vs ".join(str(g) for g in groups.values()))
            if bad:
                split = "; ".join(bad)
                dim = f"mesh dim {d}" + (f" ({names[d]!r})" if names else "")
                raise RuntimeError(
                    f"local_map: {label} is labelled Replicate() on {dim} but its replicas differ: world ranks "
                    f"{split} hold different values (MPILOCAL_DEBUG=1 compares a checksum of every value labelled "
                    f"Replicate). A Replicate value must be the same on every rank of that mesh dim. {fix}"
                )


_OUT_FIX = ("If each rank holds a partial result (e.g. a sum over a dim sharded on that mesh dim), declare it "
            "Partial() in out_placements (then .redistribute() to Replicate() sums it); if it is a per-rank "
            "value, declare it Shard(...)")
_GRAD_FIX = ("Its gradient is labelled by in_grad_placements (default: the input's own placements, as in "
             "PyTorch), but the local function's gradient differs between those ranks: it is a partial sum (e.g. "
             "a weight replicated over 'dp' used with data sharded over 'dp'). Pass in_grad_placements with "
             "Partial() on that mesh dim for this input, so that the gradient is summed over it")


def _check_grads_of(node, mesh, label):
    """Wrap a ToLocal node's backward so the gradient it labels is checked (MPILOCAL_DEBUG=1)."""
    inner = node.backward

    def backward(gs):
        res = inner(gs)
        g = res[0]
        if type(g) is DTensor and _replica_dims(mesh, g._placements):
            _check_replicas(mesh, [(f"the gradient of {label}", g._local, g._placements, _GRAD_FIX)])
        return res

    node.backward = backward


def _note_reshaped(exc, reshaped, mesh):
    """Add a note to an error raised by func when an input lived on a reshape of the mesh: its shard
    follows its own mesh, which a function written for one mesh may not expect."""
    if hasattr(exc, "add_note"):  # Python 3.11+
        i, m = reshaped
        exc.add_note(f"local_map: input {i} lives on {m}, a reshape of {mesh}; each input's shard follows its "
                     f"own mesh and placements, so the local shapes may not be the ones the function expects")


def _off_mesh_output(o, mesh, spec):
    """An output on a rank outside the mesh: wrapped as from_local does there, with no communication."""
    if type(o) is AUTOGRAD.get("Tracked"):
        return AUTOGRAD["from_local"](o, mesh, spec)
    return DTensor.from_local(on_device(o, mesh, "local_map"), mesh, spec)


def local_map(func=None, out_placements=None, in_placements=None, in_grad_placements=None, device_mesh=None,
              *, redistribute_inputs=False):
    """Lift ``func`` on local arrays to a function on DTensors. Usable as ``@local_map(...)``.

    The returned function is **collective** over the mesh when it redistributes inputs or wraps
    outputs.

    Inputs: positional arguments are flattened as PyTorch's ``local_map`` does (its pytree): a list,
    tuple, namedtuple or dict argument contributes one input per leaf, and ``func`` receives the
    same containers rebuilt with local arrays. ``in_placements``: one entry per flattened input
    (``None`` for non-arrays), e.g. ``f([A, B], x)`` needs three entries. ``out_placements``: a list
    of placements for a single output, or a tuple with one entry per flattened output (``None`` for
    non-array outputs). A 0-d output cannot be ``Shard``: declare it ``Replicate()`` or ``Partial()``.

    Mesh: ``device_mesh``, or the first DTensor input's mesh. Every DTensor input must be on that
    mesh or on a reshape of it (the same ranks in the same order, e.g. a 1-D mesh over the ranks of
    a 2-D one, as in PyTorch's multi-mesh test); else ``ValueError`` on every rank. On ranks outside
    the mesh nothing is communicated: ``func`` runs on their (empty) local arrays and the outputs are
    wrapped as ``DTensor.from_local`` wraps there.

    Aliasing: an input passed with its own placements reaches ``func`` as its local array itself
    (as ``to_local()``: writing into it changes the input). An input that ``redistribute_inputs``
    moves reaches ``func`` as a new array, never a view of the input (as PyTorch, which clones), so
    a ``func`` that works in place cannot make a ``Replicate`` input's replicas differ.

    Gradients: when a DTensor input requires grad, ``func`` receives
    :class:`~mpilocal.autograd.Tracked` local arrays for such inputs (they record the supported
    operations, see :mod:`mpilocal.autograd.tracked`), and the outputs carry the graph back to the
    inputs; ``backward`` then gives each input a gradient with its ``in_grad_placements``
    (redistributed back to the input's own placements if the input was redistributed). With no
    input requiring grad, nothing is tracked. ``in_grad_placements``: one entry per flattened
    input; ``None`` (the default, as in PyTorch) labels each gradient with the input's forward
    placements. **Beware** on a mesh dim over which the input is ``Replicate`` but the gradient is
    a partial sum (a weight replicated over ``dp`` used with data sharded over ``dp``): the default
    labels that partial gradient ``Replicate``, its copies drift apart, and nothing fails. Give
    ``Partial()`` for that mesh dim in ``in_grad_placements``. ``MPILOCAL_DEBUG=1`` catches it: every
    value local_map labels ``Replicate`` (outputs and these gradients) is compared across its
    replicas by checksum, and a difference raises ``RuntimeError`` on every rank naming the value
    and the ranks that differ.
    """
    if func is None:
        return functools.partial(local_map, out_placements=out_placements, in_placements=in_placements,
                                 in_grad_placements=in_grad_placements, device_mesh=device_mesh,
                                 redistribute_inputs=redistribute_inputs)
    if not callable(func):
        raise TypeError(f"local_map: func must be callable, got {type(func).__name__}")
    if device_mesh is not None and not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"local_map: device_mesh must be a DeviceMesh or None, got {type(device_mesh).__name__}")
    if in_placements is not None and not isinstance(in_placements, (tuple, list)):
        raise TypeError(f"local_map: in_placements must be a tuple with one entry per input, got {in_placements!r}")
    out_specs = out_placements if isinstance(out_placements, tuple) else (out_placements,)
    # placements as tuples once, so the per-call check is a tuple comparison (normalization of
    # negative shard dims is cached per (entry, ndim) below)
    in_specs = None if in_placements is None else tuple(_spec(p, "in_placements") for p in in_placements)
    out_specs = tuple(_spec(p, "out_placements") for p in out_specs)
    norm_cache: dict = {}
    # identity hits for a loop of calls (meshes by weak reference: a dropped mesh still frees its communicators)
    matched: dict = {}  # (input, ndim) -> (placements, weakref(mesh)) that matched in_placements
    last_out: list = [(_DEAD, -1, None)]  # the fast path's last (weakref(mesh), ndim, normalized out placements)

    def norm(key, spec, mesh, ndim):
        got = norm_cache.get((key, mesh.ndim, ndim))
        if got is None:
            got = norm_cache[(key, mesh.ndim, ndim)] = norm_placements(spec, mesh, ndim, "local_map")
        return got

    def norm_out(k, spec, mesh, ndim):
        if ndim == 0 and any(type(p) is Shard for p in spec):
            raise ValueError(
                f"local_map: output {k} of {func.__name__} is 0-d (a scalar) but out_placements declares it "
                f"{list(spec)}; a 0-d array has no dim to shard. Declare it [Replicate()] (the same value on every "
                f"rank) or [Partial()] (a per-rank part of a sum), one entry per mesh dim"
            )
        return norm(-1 - k, spec, mesh, ndim)

    @functools.wraps(func)
    def wrapped(*args, **kwargs):
        flat, spec = _flat(args)
        n = len(flat)
        if in_specs is not None and len(in_specs) != n:
            how = "" if spec is None else (
                f" (positional arguments are flattened as in PyTorch's local_map: a list, tuple or dict argument "
                f"gives one input per element; here {_describe_flattening(args)})")
            raise ValueError(
                f"local_map: in_placements has {len(in_specs)} entries but {func.__name__} got {n} flattened "
                f"positional inputs{how}; give one entry per flattened input (None for non-arrays)"
            )
        mesh = device_mesh
        seen = False
        track = False
        todo = None
        reshaped = None  # (index, mesh) of an input on a reshape of the mesh (for error notes)
        # 1) validate every input, before any communication
        for i in range(n):
            arg = flat[i]
            if type(arg) is DTensor:
                am = arg._mesh
                if mesh is None:
                    mesh = am
                elif am is not mesh and am != mesh:
                    if not _same_ranks(am, mesh):
                        src = "device_mesh" if device_mesh is not None else "the mesh of the first DTensor input"
                        raise ValueError(
                            f"local_map: {_input_name(func, spec, i)} is on {am} but {func.__name__} runs on "
                            f"{mesh} ({src}); every DTensor input must be on that mesh, or on a reshape of it (the "
                            f"same ranks in the same order). Move it there first (full_tensor() + "
                            f"distribute_tensor(..., mesh, ...)), or pass device_mesh= to local_map"
                        )
                    reshaped = (i, am)
                seen = True
                if arg._ag is not None:
                    track = True
                if in_specs is not None:
                    want = in_specs[i]
                    if want is None:
                        raise ValueError(
                            f"local_map: DTensor input {i} expects placements but received None in in_placements; "
                            f"give its placements, e.g. [Shard(0)]"
                        )
                    have = arg._placements
                    ndim = arg._local.ndim
                    seen_ok = matched.get((i, ndim))
                    if seen_ok is not None and seen_ok[0] is have and seen_ok[1]() is am:
                        continue  # these very placements on this mesh matched input i before
                    if have != want:
                        want = norm(i, want, am, ndim)
                    if have == want:
                        matched[(i, ndim)] = (have, weakref.ref(am))
                    else:
                        if not redistribute_inputs:
                            raise ValueError(
                                f"local_map: input {i} has placements {arg._placements} but in_placements asks "
                                f"for {want}; set redistribute_inputs=True to local_map to redistribute it, "
                                f"or pass it with the expected placements"
                            )
                        check_target(arg._placements, want, f"local_map: input {i}")
                        if todo is None:
                            todo = []
                        todo.append((i, want))
            elif in_specs is not None and in_specs[i] is not None and not _arrays.is_array(arg):
                raise ValueError(
                    f"local_map: non-array input {i} ({type(arg).__name__}) expects None placements but received "
                    f"{in_placements[i]!r}; use None for it in in_placements"
                )
        # 2) redistribute (collective), then run on local arrays
        if todo is not None:
            for i, want in todo:
                old = flat[i]
                new = old._redistribute(want)
                loc = new._local
                may_share = getattr(_arrays.namespace(loc), "may_share_memory", None) \
                    if new is not old and _arrays.is_array(loc) else None
                if may_share is not None and may_share(loc, old._local):
                    # never hand func a view of the input (a Replicate -> Shard slice): writing into it
                    # would change the input on this rank alone (PyTorch clones here too)
                    copy = DTensor(loc.copy(), new._mesh, new._placements, new._shape, new._future, new._stride)
                    copy._ag = new._ag  # the same place in the graph (the redistribute's output)
                    new = copy
                flat[i] = new
        on_mesh = seen and mesh._coordinate is not None
        if track:  # an input requires grad: differentiate through func (mpilocal.autograd)
            ag = AUTOGRAD
            local_flat = ag["local_inputs"](flat, in_grad_placements, n)
            if on_mesh and deadline.debug_enabled():
                for i, (a, la) in enumerate(zip(flat, local_flat)):
                    node = ag["node_of"](la)
                    if node is not None and type(a) is DTensor:
                        _check_grads_of(node, mesh, _input_name(func, spec, i))
            local_args = local_flat if spec is None else _unflatten(spec, iter(local_flat))
            try:
                out = ag["run"](func, local_args, kwargs)
            except Exception as e:
                if reshaped is not None:
                    _note_reshaped(e, reshaped, mesh)
                raise
        else:
            local_flat = [a._local if type(a) is DTensor else a for a in flat]
            local_args = local_flat if spec is None else _unflatten(spec, iter(local_flat))
            if reshaped is None:
                out = func(*local_args, **kwargs)
            else:
                try:
                    out = func(*local_args, **kwargs)
                except Exception as e:
                    _note_reshaped(e, reshaped, mesh)
                    raise
        if not seen:
            return out
        debug = on_mesh and deadline.DEBUG
        # 3) wrap outputs
        if len(out_specs) == 1 and out_specs[0] is not None and on_mesh and not debug and (
                type(out) is np.ndarray if mesh.device_type == "cpu" else _arrays.is_cupy(out)):
            # fast path: one array output of the mesh's kind (NumPy on 'cpu', CuPy on 'cuda')
            lo = last_out[0]
            if lo[0]() is not mesh or lo[1] != out.ndim:
                lo = last_out[0] = (weakref.ref(mesh), out.ndim, norm_out(0, out_specs[0], mesh, out.ndim))
            return wrap_local(out, mesh, lo[2])
        out_leaves = []
        out_spec = _flatten(out, out_leaves)
        if len(out_leaves) != len(out_specs):
            raise ValueError(
                f"local_map requires one PlacementType be provided for each output value: received "
                f"{len(out_specs)} out_placements but {func.__name__} returned {len(out_leaves)} values"
            )
        wrapped_out = []
        checks = [] if debug else None
        for k, (o, s) in enumerate(zip(out_leaves, out_specs)):
            if type(o) is DTensor:
                raise TypeError(
                    f"local_map: {func.__name__} returned a DTensor; the local function must return local arrays"
                )
            if isinstance(o, np.generic):  # NumPy reductions return scalars; PyTorch's are 0-d tensors
                o = np.asarray(o)
            is_tracked = type(o) is AUTOGRAD.get("Tracked")
            if is_tracked or _arrays.is_array(o):
                if s is None:
                    raise ValueError(
                        f"local_map: array output {k} expects placements but out_placements gives None for it"
                    )
                data = o.data if is_tracked else o
                pl = norm_out(k, s, mesh, data.ndim)
                if not on_mesh:
                    wrapped_out.append(_off_mesh_output(o, mesh, pl))
                    continue
                if is_tracked:
                    d = AUTOGRAD["wrap_output"](o, mesh, pl)
                else:
                    d = wrap_local(on_device(o, mesh, "local_map"), mesh, pl)
                wrapped_out.append(d)
                if debug and _replica_dims(mesh, pl):
                    checks.append((f"output {k} of {func.__name__}", d._local, pl, _OUT_FIX))
            else:
                if s is not None:
                    raise ValueError(
                        f"local_map: non-array output {k} of type {type(o).__name__} expects None placements but "
                        f"received {s!r}; use None for it in out_placements"
                    )
                wrapped_out.append(o)
        if checks:
            _check_replicas(mesh, checks)
        return _unflatten(out_spec, iter(wrapped_out))

    return wrapped
