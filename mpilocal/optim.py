"""Optimizers over DTensor parameters: SGD (momentum, weight decay, Nesterov) and Adam (PyTorch's
update rules, ``torch.optim.SGD`` / ``torch.optim.Adam`` with their default flags).

The state (momentum buffers, Adam's moments) are DTensors with the parameters' placements. A
gradient whose placements differ from its parameter's (e.g. ``Partial`` for a weight replicated
over the data-parallel dim) is redistributed to the parameter's placements first: that is the
step's only communication. The update then runs on the local shards.
"""

from __future__ import annotations

import math

from . import _arrays
from .dtensor import DTensor

__all__ = ["SGD", "Adam", "Optimizer"]


class Optimizer:
    def __init__(self, params, defaults):
        self.params = list(params)
        for p in self.params:
            if type(p) is not DTensor:
                raise TypeError(f"{type(self).__name__}: parameters must be DTensors, got {type(p).__name__}")
            if not p.requires_grad:
                raise ValueError(f"{type(self).__name__}: a parameter does not require grad; call requires_grad_()")
        self.defaults = defaults
        self.state = {id(p): {} for p in self.params}

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad._local[...] = 0

    def _grad_local(self, p):
        g = p.grad
        if g is None:
            return None
        if g._placements != p._placements:
            g = g.redistribute(p._mesh, p._placements)
        return g._local

    def _buffer(self, p):
        xp = _arrays.namespace(p._local)
        return DTensor(xp.zeros_like(p._local), p._mesh, p._placements, p.shape)


class SGD(Optimizer):
    """``torch.optim.SGD``: ``b = momentum*b + (1-dampening)*g`` (``b = g`` at the first step), the
    step ``g + momentum*b`` with Nesterov, else ``b``; weight decay adds ``weight_decay*p`` to ``g``."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def step(self):
        for p in self.params:
            g = self._grad_local(p)
            if g is None:
                continue
            w = p._local
            if self.weight_decay:
                g = g + self.weight_decay * w
            if self.momentum:
                st = self.state[id(p)]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = buf = self._buffer(p)
                    buf._local[...] = g
                else:
                    buf = st["momentum_buffer"]
                    buf._local *= self.momentum
                    buf._local += (1 - self.dampening) * g
                g = g + self.momentum * buf._local if self.nesterov else buf._local
            w -= self.lr * g


class Adam(Optimizer):
    """``torch.optim.Adam`` (``amsgrad=False``): ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g``,
    ``p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)``; weight decay adds ``weight_decay*p`` to ``g``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay

    def step(self):
        b1, b2 = self.betas
        for p in self.params:
            g = self._grad_local(p)
            if g is None:
                continue
            w = p._local
            xp = _arrays.namespace(w)
            if self.weight_decay:
                g = g + self.weight_decay * w
            st = self.state[id(p)]
            if not st:
                st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, self._buffer(p), self._buffer(p)
            st["step"] += 1
            t = st["step"]
            m, v = st["exp_avg"]._local, st["exp_avg_sq"]._local
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            denom = xp.sqrt(v) / math.sqrt(1 - b2 ** t) + self.eps
            w -= (self.lr / (1 - b1 ** t)) * m / denom
