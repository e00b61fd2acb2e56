"""Differentiable neighbour collectives on :class:`Tracked` arrays (see :mod:`mpilocal.neighbors`).

``mpilocal.neighbors`` dispatches here when given a Tracked array (this module registers itself in
``neighbors.AUTOGRAD`` when imported), with the call's plan (worked out once per call site).
Backward rules (each is itself one neighbour collective, run on every rank in reverse creation
order):

* ``halo_exchange`` along one or more dims  <->  the halo gradients sent back to the ranks they came
  from and added to the rows they copied, the last dim first (constant halos get no gradient);
* ``permute`` / ``shift`` / ``send_recv`` with pairs ``(src, dst)``  <->  the same with ``(dst, src)``.
"""

from __future__ import annotations

from .. import neighbors
from .tracked import Tracked, _record

__all__ = ["halo", "permute"]


def halo(x, c):
    """``neighbors.halo`` with chain ``c`` (a ``neighbors._Chain``: halos along one or more dims),
    recorded."""
    out = neighbors.halo(x.data, c)
    return _record("HaloExchange", out, (x,), lambda gr, n: (neighbors.halo_adjoint(gr, c),))


def permute(x, p):
    """``neighbors.permute_raw`` with plan ``p`` (a ``neighbors._Perm``), recorded."""
    out = neighbors.permute_raw(x.data, p)
    return _record("Permute", out, (x,), lambda gr, n: (neighbors.permute_raw(gr, p.inverse()),))


# registration (nothing below autograd imports it)
neighbors.AUTOGRAD.update(Tracked=Tracked, halo=halo, permute=permute)
