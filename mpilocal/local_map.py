"""local_map: run a function written for local arrays on DTensors (PyTorch's semantics).

Every check (placement counts, None/non-None entries, mismatches without ``redistribute_inputs``)
runs before any collective, so a bad call raises the same error on every rank and communicates
nothing. On aligned inputs the only communication is the non-blocking agreement of the outputs'
global shapes (metadata, posted now and completed when a shape is first needed).
"""

from __future__ import annotations

import functools

import numpy as np

from . import _arrays
from .autograd.tracked import Tracked
from .placement import Placement
from .dtensor import DTensor, _on_device, _placements, _wrap

__all__ = ["local_map"]


# -- pytree-lite: lists, tuples (incl. namedtuples) and dicts ----------------------------------------
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


def local_map(func=None, out_placements=None, in_placements=None, in_grad_placements=None, device_mesh=None,
              *, redistribute_inputs=False):
    """Lift ``func`` on local arrays to a function on DTensors. Usable as ``@local_map(...)``.

    The returned function is **collective** over the mesh when it redistributes inputs or wraps
    outputs. ``in_placements``: one entry per flattened positional argument (``None`` for
    non-arrays); ``out_placements``: a list of placements for a single output, or a tuple with one
    entry per flattened output (``None`` for non-array outputs). ``in_grad_placements``: one entry
    per flattened input naming the placements of its gradient (``None``: its ``in_placements``).

    Gradients: when a DTensor input requires grad, ``func`` receives
    :class:`~mpilocal.autograd.Tracked` local arrays for such inputs (they record the supported
    operations, see :mod:`mpilocal.autograd.tracked`), and the outputs carry the graph back to the
    inputs; ``backward`` then gives each input a gradient with its ``in_grad_placements``
    (redistributed back to the input's own placements if the input was redistributed). With no
    input requiring grad, nothing is tracked.
    """
    if func is None:
        return functools.partial(local_map, out_placements=out_placements, in_placements=in_placements,
                                 in_grad_placements=in_grad_placements, device_mesh=device_mesh,
                                 redistribute_inputs=redistribute_inputs)
    if not callable(func):
        raise TypeError(f"local_map: func must be callable, got {type(func).__name__}")
    if in_placements is not None and not isinstance(in_placements, (tuple, list)):
        raise TypeError(f"local_map: in_placements must be a tuple with one entry per input, got {in_placements!r}")
    out_specs = out_placements if isinstance(out_placements, tuple) else (out_placements,)
    # placements as tuples once, so the per-call check is a tuple comparison (normalization of
    # negative shard dims is cached per (entry, ndim) below)
    in_specs = None if in_placements is None else tuple(_spec(p, "in_placements") for p in in_placements)
    out_specs = tuple(_spec(p, "out_placements") for p in out_specs)
    norm_cache: dict = {}

    def norm(key, spec, mesh, ndim):
        got = norm_cache.get((key, mesh.ndim, ndim))
        if got is None:
            got = norm_cache[(key, mesh.ndim, ndim)] = _placements(spec, mesh, ndim, "local_map")
        return got

    @functools.wraps(func)
    def wrapped(*args, **kwargs):
        flat, spec = _flat(args)
        n = len(flat)
        if in_specs is not None and len(in_specs) != n:
            raise ValueError(
                f"local_map: in_placements has {len(in_specs)} entries but {func.__name__} got {n} flattened "
                f"positional inputs; give one entry per input (None for non-arrays)"
            )
        mesh = device_mesh
        seen = False
        track = False
        todo = None
        # 1) validate every input, before any communication
        for i in range(n):
            arg = flat[i]
            if type(arg) is DTensor:
                if mesh is None:
                    mesh = arg._mesh
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
                    if arg._placements != want:
                        want = norm(i, want, arg._mesh, arg._local.ndim)
                    if arg._placements != want:
                        if not redistribute_inputs:
                            raise ValueError(
                                f"local_map: input {i} has placements {arg._placements} but in_placements asks "
                                f"for {want}; set redistribute_inputs=True to local_map to redistribute it, "
                                f"or pass it with the expected placements"
                            )
                        for j, (c, t) in enumerate(zip(arg._placements, want)):
                            if t.is_partial() and c != t:
                                raise ValueError(
                                    f"local_map: input {i} would need {c!r} -> {t!r} on mesh dim {j}; "
                                    f"redistributing to Partial is for internal use only"
                                )
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
                flat[i] = flat[i]._redistribute(want)
        if track:  # an input requires grad: differentiate through func (mpilocal.autograd)
            from .autograd import dtensor_ops

            local_flat = dtensor_ops.local_inputs(flat, in_grad_placements, n)
        else:
            local_flat = [a._local if type(a) is DTensor else a for a in flat]
        local_args = local_flat if spec is None else _unflatten(spec, iter(local_flat))
        out = func(*local_args, **kwargs)
        if not seen:
            return out
        # 3) wrap outputs
        if type(out) is np.ndarray and len(out_specs) == 1 and out_specs[0] is not None \
                and mesh.device_type == "cpu":  # fast path: one NumPy output
            return _wrap(out, mesh, norm(-1, out_specs[0], mesh, out.ndim))
        out_leaves = []
        out_spec = _flatten(out, out_leaves)
        if len(out_leaves) != len(out_specs):
            raise ValueError(
                f"local_map requires one PlacementType be provided for each output value: received "
                f"{len(out_specs)} out_placements but {func.__name__} returned {len(out_leaves)} values"
            )
        wrapped_out = []
        for o, s in zip(out_leaves, out_specs):
            if type(o) is DTensor:
                raise TypeError(
                    f"local_map: {func.__name__} returned a DTensor; the local function must return local arrays"
                )
            if isinstance(o, np.generic):  # NumPy reductions return scalars; PyTorch's are 0-d tensors
                o = np.asarray(o)
            if _arrays.is_array(o):
                if s is None:
                    raise ValueError(
                        f"local_map: array output expects placements but out_placements gives None for it"
                    )
                o = _on_device(o, mesh, "local_map")
                wrapped_out.append(_wrap(o, mesh, norm(-1 - len(wrapped_out), s, mesh, o.ndim)))
            elif type(o) is Tracked:
                if s is None:
                    raise ValueError(
                        f"local_map: array output expects placements but out_placements gives None for it"
                    )
                from .autograd import dtensor_ops

                wrapped_out.append(dtensor_ops.wrap_output(o, mesh, s))
            else:
                if s is not None:
                    raise ValueError(
                        f"local_map: non-array output of type {type(o).__name__} expects None placements but "
                        f"received {s!r}; use None for it in out_placements"
                    )
                wrapped_out.append(o)
        return _unflatten(out_spec, iter(wrapped_out))

    return wrapped
