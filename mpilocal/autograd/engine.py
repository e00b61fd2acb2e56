"""The reverse-mode engine: graph nodes and a deterministic backward pass.

A differentiable value (a :class:`~mpilocal.autograd.Tracked` local array or a ``DTensor`` that
requires grad) points at ``(node, index)``: the node that made it and which of its outputs it is.
Leaves point at a :class:`Leaf` node that accumulates into the leaf's ``grad``.

Every node gets a sequence number at creation. The backward pass runs every node reachable from
the root exactly once, in decreasing sequence number, i.e. the reverse of creation order. Since
all ranks run the same program (SPMD), nodes that communicate (collectives, redistributes) were
created in the same relative order on every rank, so their backward collectives are issued in the
same order everywhere, with no extra agreement. A reached node whose output gradients are all
missing still runs (with zeros), so a collective backward is never skipped on one rank only.
"""

from __future__ import annotations

import itertools

__all__ = ["Node", "Leaf", "run_backward", "ADDERS", "no_grad", "is_grad_enabled"]

_SEQ = itertools.count()


class Node:
    """One recorded operation: ``backward(grads) -> grads of inputs``.

    ``edges[i]`` is ``(node, index)`` of input ``i`` or ``None`` (input needs no gradient);
    ``zeros[k]()`` builds a zero gradient for output ``k`` (used when none arrived).
    """

    __slots__ = ("seq", "name", "edges", "backward", "zeros")

    def __init__(self, name, edges, backward, zeros):
        self.seq = next(_SEQ)
        self.name = name
        self.edges = edges
        self.backward = backward
        self.zeros = zeros

    def __repr__(self):
        return f"<{self.name}Backward #{self.seq}>"


class Leaf(Node):
    """Accumulates the incoming gradient into ``owner.grad`` (``add`` sums two gradients)."""

    __slots__ = ("owner", "add")

    def __init__(self, owner, add, zeros):
        super().__init__("AccumulateGrad", (), None, (zeros,))
        self.owner = owner
        self.add = add


def run_backward(node, index, grad):
    """Propagate ``grad`` (of output ``index`` of ``node``) to every reachable leaf."""
    seen = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen[id(n)] = n
        for e in n.edges:
            if e is not None and id(e[0]) not in seen:
                stack.append(e[0])
    order = sorted(seen.values(), key=lambda n: -n.seq)
    pending = {id(node): [None] * len(node.zeros)}
    pending[id(node)][index] = grad
    for n in order:
        gs = pending.pop(id(n), None)
        if gs is None:
            gs = [None] * len(n.zeros)
        for k, g in enumerate(gs):
            if g is None:
                gs[k] = n.zeros[k]()
        if type(n) is Leaf:
            old = n.owner.grad
            n.owner.grad = gs[0] if old is None else n.add(old, gs[0])
            continue
        in_grads = n.backward(gs)
        for e, g in zip(n.edges, in_grads):
            if e is None or g is None:
                continue
            slot = pending.get(id(e[0]))
            if slot is None:
                slot = pending[id(e[0])] = [None] * len(e[0].zeros)
            old = slot[e[1]]
            slot[e[1]] = g if old is None else _add(old, g)
    return None


#: how to sum two gradients of a type other than a plain array (DTensor registers its rule)
ADDERS: dict = {}


def _add(a, b):
    add = ADDERS.get(type(a))
    if add is not None:
        return add(a, b)
    return a + b


_GRAD_ENABLED = [True]


def is_grad_enabled() -> bool:
    """False inside :class:`no_grad` (operators on DTensors then record nothing)."""
    return _GRAD_ENABLED[0]


class no_grad:
    """``with mpilocal.autograd.no_grad():`` operators on DTensors (mpilocal.ops) record no graph,
    and in-place updates of leaves that require grad (``w -= lr * w.grad``) are allowed, as in
    ``torch.no_grad()``. Also usable as a decorator."""

    def __enter__(self):
        self._prev = _GRAD_ENABLED[0]
        _GRAD_ENABLED[0] = False
        return self

    def __exit__(self, *exc):
        _GRAD_ENABLED[0] = self._prev
        return False

    def __call__(self, func):
        import functools

        @functools.wraps(func)
        def inner(*a, **k):
            with no_grad():
                return func(*a, **k)

        return inner
