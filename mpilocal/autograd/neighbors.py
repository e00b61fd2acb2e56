"""Differentiable neighbour collectives on :class:`Tracked` arrays (see :mod:`mpilocal.neighbors`).

``mpilocal.neighbors`` dispatches here when given a Tracked array (this module registers itself in
``neighbors.AUTOGRAD`` when imported), with the call's plan (worked out once per call site).
Backward rules (each is itself one neighbour collective, run on every rank in reverse creation
order):

* ``halo_exchange`` along one dim  <->  the halo gradients sent back to the ranks they came from
  and added to the rows they copied (constant halos beyond the edges get no gradient);
* ``permute`` / ``shift`` / ``send_recv`` with pairs ``(src, dst)``  <->  the same with ``(dst, src)``.
"""

from __future__ import annotations

from .. import neighbors
from .tracked import Tracked, _record

__all__ = ["halo_1d", "permute"]


def halo_1d(x, p):
    """``neighbors.halo_1d`` with plan ``p`` (a ``neighbors._Halo``), recorded."""
    out = neighbors.halo_1d(x.data, p)
    return _record("HaloExchange", out, (x,), lambda gr, n: (neighbors.halo_1d_adjoint(gr, p),))


def permute(x, p):
    """``neighbors.permute_raw`` with plan ``p`` (a ``neighbors._Perm``), recorded."""
    out = neighbors.permute_raw(x.data, p)
    return _record("Permute", out, (x,), lambda gr, n: (neighbors.permute_raw(gr, p.inverse()),))


# registration (nothing below autograd imports it)
neighbors.AUTOGRAD.update(Tracked=Tracked, halo_1d=halo_1d, permute=permute)
