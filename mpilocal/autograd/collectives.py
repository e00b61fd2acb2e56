"""Differentiable functional collectives on :class:`Tracked` arrays.

``mpilocal.functional``'s public collectives dispatch here when given a Tracked array (this
module registers itself in ``functional.AUTOGRAD`` when imported). The forward is the public
function on the plain array (its checks and agreement); backward collectives are issued through
:mod:`mpilocal.collectives` (accounting, deadline, fingerprints). Backward
rules (each is itself one collective, run on every rank in reverse creation order):

* ``all_reduce`` sum/avg  <->  ``all_reduce`` sum/avg of the gradient (max/min/product: not
  differentiable, ``NotImplementedError``);
* ``all_gather_tensor``   <->  ``reduce_scatter`` (sum) of the gradient back to each rank's piece;
* ``reduce_scatter_tensor`` sum/avg <-> ``all_gather`` of the gradient (divided by the group size for avg);
* ``all_to_all_single``   <->  ``all_to_all_single`` of the gradient with the splits swapped;
* ``broadcast``           <->  the gradients summed onto the source group rank (zeros elsewhere).
"""

from __future__ import annotations

from .. import _arrays, collectives, functional
from ..layout import chunk_sizes
from ..metadata import meta_vector
from .tracked import Tracked, _record

__all__ = ["all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast"]


def _diff_op(op, caller):
    if op not in ("sum", "avg"):
        raise NotImplementedError(
            f"{caller}: reduce op {op!r} is not differentiable in mpilocal.autograd; use 'sum' or 'avg' "
            f"(or .detach() the input, or write a mpilocal.autograd.Function)"
        )


def all_reduce(x, reduceOp, group):
    caller = "all_reduce"
    op = functional.normalize_op(reduceOp, caller)
    _diff_op(op, caller)
    g = functional.resolve_group(group, caller)
    out = functional.all_reduce(x.data, reduceOp, group)
    return _record("AllReduce", out, (x,), lambda gr, n: (collectives.all_reduce(gr, op, g),))


def all_gather_tensor(x, gather_dim, group):
    caller = "all_gather_tensor"
    data = x.data
    g = functional.resolve_group(group, caller)
    dim = functional.norm_dim(gather_dim, data.ndim, caller, "gather_dim")
    out = functional.all_gather_tensor(data, gather_dim, group)  # validates (the same error on every rank)
    # every rank's size along dim, for the backward reduce_scatter (one small metadata all-gather)
    rows = collectives.meta_allgather(g.comm, meta_vector(data.shape, None), "gather_sizes")
    sizes = [int(r[2 + dim]) for r in rows]
    return _record("AllGather", out, (x,), lambda gr, n: (collectives.reduce_scatter(gr, "sum", dim, g, sizes),))


def reduce_scatter_tensor(x, reduceOp, scatter_dim, group):
    caller = "reduce_scatter_tensor"
    op = functional.normalize_op(reduceOp, caller)
    _diff_op(op, caller)
    data = x.data
    g = functional.resolve_group(group, caller)
    dim = functional.norm_dim(scatter_dim, data.ndim, caller, "scatter_dim")
    sizes = chunk_sizes(data.shape[dim], g.size)
    out = functional.reduce_scatter_tensor(data, reduceOp, scatter_dim, group)

    def bw(gr, n):
        full = collectives.all_gather(gr, dim, g, sizes)
        return (full / g.size if op == "avg" else full,)

    return _record("ReduceScatter", out, (x,), bw)


def all_to_all_single(x, output_split_sizes, input_split_sizes, group):
    caller = "all_to_all_single"
    data = x.data
    out = functional.all_to_all_single(data, output_split_sizes, input_split_sizes, group)  # validates
    g = functional.resolve_group(group, caller)
    n0, k = data.shape[0], g.size
    ins = [n0 // k] * k if input_split_sizes is None else [int(s) for s in input_split_sizes]
    if output_split_sizes is not None:
        outs = [int(s) for s in output_split_sizes]
    elif ins == [n0 // k] * k and n0 % k == 0:
        outs = ins
    else:  # the forward agreed them; the backward needs them here: every rank's input split for this
        # rank, one small metadata all-to-all (accounted: deadline, fingerprint, count)
        outs = [int(r) for r in collectives.exchange_splits(g, ins)]
    return _record("AllToAll", out, (x,), lambda gr, n: (functional.all_to_all_single(gr, ins, outs, group),))


def broadcast(x, src, group):
    caller = "broadcast"
    g = functional.resolve_group(group, caller)
    out = functional.broadcast(x.data, src, group)
    root = int(src)  # a group rank (PyTorch funcol's convention)

    def bw(gr, n):  # the transports have no rooted reduce: an all-reduce, kept on the root
        total = collectives.all_reduce(gr, "sum", g)
        return (total if g.rank == root else _arrays.namespace(total).zeros_like(total),)

    return _record("Broadcast", out, (x,), bw)


# registration (nothing below autograd imports it): funcol's public functions dispatch Tracked here
functional.AUTOGRAD[Tracked] = {"all_reduce": all_reduce, "all_gather_tensor": all_gather_tensor,
                                "reduce_scatter_tensor": reduce_scatter_tensor,
                                "all_to_all_single": all_to_all_single, "broadcast": broadcast}
