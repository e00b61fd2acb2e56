"""Custom differentiable operations: ``mpilocal.autograd.Function`` (as ``torch.autograd.Function``)."""

from __future__ import annotations

from .. import _arrays
from .engine import Node
from .tracked import Tracked, _edge, _raw, _zeros_of

__all__ = ["Function", "FunctionCtx"]


class FunctionCtx:
    """The ``ctx`` of a :class:`Function`: ``save_for_backward(*arrays)`` / ``saved_tensors``,
    ``needs_input_grad`` (one bool per input), and any attributes you set in ``forward``."""

    def save_for_backward(self, *arrays):
        self.saved_tensors = tuple(_raw(a) for a in arrays)

    saved_tensors: tuple = ()


class Function:
    """Subclass with ``forward(ctx, *args)`` and ``backward(ctx, *grad_outputs)`` (static methods)
    and call ``MyFn.apply(*args)``.

    ``forward`` receives plain NumPy/CuPy arrays (tracked inputs unwrapped) and returns an array or
    a tuple (non-array entries get no gradient). ``backward`` receives one gradient per output
    (zeros where none arrived) and returns one per input (``None`` for inputs without gradient).
    Collectives inside ``forward``/``backward`` are allowed; ``backward`` runs on every rank in the
    same order as the other backward steps, so a collective there must be issued on every rank.
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError("mpilocal.autograd.Function subclasses must define forward(ctx, *args)")

    @staticmethod
    def backward(ctx, *grad_outputs):  # pragma: no cover - abstract
        raise NotImplementedError("mpilocal.autograd.Function subclasses must define backward(ctx, *grads)")

    @classmethod
    def apply(cls, *args, **kwargs):
        ctx = FunctionCtx()
        edges = tuple(_edge(a) for a in args)
        ctx.needs_input_grad = tuple(e is not None for e in edges)
        out = cls.forward(ctx, *[_raw(a) for a in args], **kwargs)
        if not any(ctx.needs_input_grad):
            return out
        single = not isinstance(out, tuple)
        outs = (out,) if single else tuple(out)
        if any(type(o) is Tracked for o in outs):
            raise TypeError(f"{cls.__name__}.forward must return plain arrays, not Tracked ones")
        zeros = tuple(_zeros_of(o) if _arrays.is_array(o) else (lambda: None) for o in outs)
        shapes = [tuple(getattr(a, "shape", ())) if e is not None else None for a, e in zip(args, edges)]

        def bw(gs):
            res = cls.backward(ctx, *gs)
            if not isinstance(res, tuple):
                res = (res,)
            if len(res) != len(args):
                raise ValueError(
                    f"{cls.__name__}.backward returned {len(res)} gradient(s) but forward took {len(args)} "
                    f"input(s); return one per input (None where there is none)"
                )
            res = tuple(_raw(r) for r in res)
            for i, (r, s) in enumerate(zip(res, shapes)):
                if s is not None and r is not None and tuple(r.shape) != s:
                    raise ValueError(
                        f"{cls.__name__}.backward returned a gradient of shape {tuple(r.shape)} for input {i} "
                        f"of shape {s}"
                    )
            return res

        node = Node(cls.__name__, edges, bw, zeros)
        wrapped = []
        for k, o in enumerate(outs):
            if _arrays.is_array(o):
                t = Tracked(o)
                t._node, t._idx = node, k
                wrapped.append(t)
            else:
                wrapped.append(o)
        return wrapped[0] if single else tuple(wrapped)
