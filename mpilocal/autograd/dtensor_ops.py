"""DTensor-level autograd: leaves, redistribute, to_local/from_local, local_map wrapping, backward.

Gradients of DTensors are plain DTensors (no grad of their own). Rules (PyTorch's):

* ``redistribute`` src -> dst: the gradient is redistributed back to ``src``, with a ``Partial``
  source placement giving a ``Replicate`` gradient;
* ``to_local(grad_placements=None)``: the local gradient is wrapped with ``grad_placements`` or
  the forward placements (and the forward global shape); a ``Partial`` forward placement gives a
  ``Replicate`` gradient (the gradient of a sum reaches every term unchanged);
* ``from_local`` (and the outputs of ``local_map``): the gradient is redistributed to the forward
  placements (``Partial`` -> ``Replicate``) and its local shard flows back;
* ``full_tensor()`` is ``redistribute(Replicate).to_local()``, so it composes the two.
"""

from __future__ import annotations

from .. import _arrays, dtensor as _dtensor
from ..local_map import AUTOGRAD as _LOCAL_MAP_AUTOGRAD
from ..dtensor import DTensor, from_local_array, norm_placements, on_device, wrap_local
from ..placement import Replicate
from . import engine
from .engine import Leaf, Node, run_backward
from . import tracked as _tracked
from .tracked import Tracked, _edge

__all__ = ["GradMeta", "make_leaf", "redistribute", "to_local", "from_local", "wrap_output", "backward",
           "add_grads", "local_inputs", "run_local"]


class GradMeta:
    """What a DTensor that requires grad carries: the node that made it (a Leaf for leaves),
    which of its outputs it is, and (leaves) the accumulated ``grad``."""

    __slots__ = ("node", "idx", "grad")

    def __init__(self, node=None, idx=0):
        self.node, self.idx, self.grad = node, idx, None

    @property
    def is_leaf(self) -> bool:
        return type(self.node) is Leaf


def grad_placements_of(pl):
    """Partial -> Replicate (the placement a gradient takes for a Partial forward placement)."""
    if not any(p.is_partial() for p in pl):
        return pl
    return tuple(Replicate() if p.is_partial() else p for p in pl)


def _zeros_dtensor(t, pl=None):
    local, mesh = t._local, t._mesh
    xp = _arrays.namespace(local)
    shape_of = (lambda: t.shape)
    pl = t._placements if pl is None else pl
    return lambda: DTensor(xp.zeros(local.shape, dtype=local.dtype), mesh, pl, shape_of())


def _attach(t, node, idx=0):
    t._ag = GradMeta(node, idx)
    return t


def _edge_of(t):
    ag = t._ag
    return None if ag is None else (ag.node, ag.idx)


def make_leaf(t):
    meta = GradMeta()
    meta.node = Leaf(meta, add_grads, _zeros_dtensor(t, grad_placements_of(t._placements)))
    return meta


def add_grads(a, b):
    """a + b for two gradient DTensors of one global array (placements reconciled first)."""
    if a._placements != b._placements:
        target = []
        for pa, pb in zip(a._placements, b._placements):
            if pa == pb:
                target.append(pa)
            elif pa.is_partial() and not pb.is_partial():
                target.append(pb)
            elif pb.is_partial() and not pa.is_partial():
                target.append(pa)
            elif pa.is_partial():
                target.append(Replicate())
            else:
                target.append(pa)
        target = tuple(target)
        a = a._redistribute(target)
        b = b._redistribute(target)
    return DTensor(a._local + b._local, a._mesh, a._placements, a.shape)


engine.ADDERS[DTensor] = add_grads


def _plain(t):
    return DTensor(t._local, t._mesh, t._placements, t._shape, t._future, t._stride)


def _as_dtype(g, dtype):
    if g._local.dtype == dtype:
        return g
    return DTensor(g._local.astype(dtype), g._mesh, g._placements, g._shape, g._future, g._stride)


def redistribute(t, pl, forward_dtype=None, backward_dtype=None):
    """``t._redistribute(pl)`` recorded, also for the same placements (then the result is a new
    DTensor on ``t``'s local array): backward redistributes the gradient to ``t``'s placements, a
    ``Partial`` gradient of a ``Replicate`` input by an all-reduce, as PyTorch's Redistribute does.
    The gradient travels in ``backward_dtype`` (default: ``t``'s dtype) and reaches ``t`` in ``t``'s
    dtype (PyTorch's engine casts it so)."""
    out = _plain(t)._redistribute(pl, forward_dtype)  # a new object: _plain(t) is one
    src = grad_placements_of(t._placements)
    orig = t._local.dtype
    wire = orig if backward_dtype is None else backward_dtype

    def bw(gs):
        return (_as_dtype(_as_dtype(gs[0], wire)._redistribute(src), orig),)

    node = Node("Redistribute", (_edge_of(t),), bw, (_zeros_dtensor(out, grad_placements_of(pl)),))
    return _attach(out, node)


def to_local(t, grad_placements=None):
    """A Tracked view of ``t``'s shard; backward wraps the local gradient as a DTensor."""
    mesh = t._mesh
    if grad_placements is None:  # the forward placements, Partial as Replicate (a Partial's exact gradient)
        gpl = grad_placements_of(t._placements)
    else:
        gpl = norm_placements(grad_placements, mesh, t.ndim, "to_local(grad_placements=...)")
    local = t._local

    def bw(gs):
        return (DTensor(gs[0], mesh, gpl, t.shape),)

    out = Tracked(local)
    xp = _arrays.namespace(local)
    out._node = Node("ToLocal", (_edge_of(t),), bw, (lambda: xp.zeros(local.shape, dtype=local.dtype),))
    return out


def _from_local_node(out, tracked, pl):
    target = grad_placements_of(pl)

    def bw(gs):
        return (gs[0]._redistribute(target)._local,)

    return _attach(out, Node("FromLocal", (_edge(tracked),), bw, (_zeros_dtensor(out, target),)))


def from_local(local, device_mesh=None, placements=None, *, run_check=False, shape=None, stride=None):
    out = from_local_array(local.data, device_mesh, placements, run_check, shape, stride, local._node is not None)
    if local._node is None:
        return out
    return _from_local_node(out, local, out._placements)


def wrap_output(o, mesh, spec):
    """A local_map output: a Tracked array wrapped as a DTensor that backpropagates into it."""
    data = on_device(o.data, mesh, "local_map")
    out = wrap_local(data, mesh, norm_placements(spec, mesh, data.ndim, "local_map"))
    if o._node is None:
        return out
    return _from_local_node(out, o, out._placements)


def local_inputs(flat, in_grad_placements, n):
    """The local arrays local_map passes on: Tracked for DTensors that require grad."""
    if in_grad_placements is not None and (not isinstance(in_grad_placements, (tuple, list))
                                           or len(in_grad_placements) != n):
        raise ValueError(
            f"local_map: in_grad_placements must have one entry per flattened input ({n}), got "
            f"{in_grad_placements!r}"
        )
    res = []
    for i, a in enumerate(flat):
        if type(a) is DTensor:
            if a._ag is not None:
                gp = None if in_grad_placements is None else in_grad_placements[i]
                res.append(to_local(a, gp))
            else:
                res.append(a._local)
        else:
            res.append(a)
    return res


def run_local(func, args, kwargs):
    """``func(*args, **kwargs)`` as local_map's local function on tracked inputs (error messages of
    Tracked say that they come from local_map)."""
    _tracked.LOCAL_MAP_DEPTH += 1
    try:
        return func(*args, **kwargs)
    finally:
        _tracked.LOCAL_MAP_DEPTH -= 1


def backward(t, gradient=None):
    """``t.backward(gradient)``. **Collective** wherever the graph communicates."""
    if t._ag is None:
        raise RuntimeError("DTensor.backward: this DTensor does not require grad and has no grad_fn; "
                           "call requires_grad_() on the inputs (or distribute_tensor(..., requires_grad=True))")
    if gradient is None:
        xp = _arrays.namespace(t._local)
        gradient = DTensor(xp.ones_like(t._local), t._mesh, grad_placements_of(t._placements), t.shape)
    else:
        if type(gradient) is not DTensor:
            raise TypeError(f"DTensor.backward: gradient must be a DTensor (or None), got {type(gradient).__name__}")
        if gradient._mesh != t._mesh or tuple(gradient.shape) != tuple(t.shape):
            raise ValueError(
                f"DTensor.backward: gradient (shape {tuple(gradient.shape)} on {gradient._mesh}) must match the "
                f"output (shape {tuple(t.shape)} on {t._mesh})"
            )
        gradient = _plain(gradient)
    run_backward(t._ag.node, t._ag.idx, gradient)


# registration (nothing below autograd imports it): DTensor's gradient paths call these
_dtensor.AUTOGRAD.update(Tracked=Tracked, from_local=from_local, make_leaf=make_leaf, to_local=to_local,
                         redistribute=redistribute, backward=backward)
_LOCAL_MAP_AUTOGRAD.update(Tracked=Tracked, local_inputs=local_inputs, run=run_local,
                           node_of=lambda a: a._node if type(a) is Tracked else None,
                           wrap_output=wrap_output, from_local=from_local)
