"""Differentiable neighbour collectives on :class:`Tracked` arrays (see :mod:`mpilocal.neighbors`).

``mpilocal.neighbors`` dispatches here when given a Tracked array (this module registers itself in
``neighbors.AUTOGRAD`` when imported). Backward rules (each is itself
one neighbour collective, run on every rank in reverse creation order):

* ``halo_exchange`` along one dim  <->  the halo gradients sent back to the ranks they came from
  and added to the rows they copied (constant halos beyond the edges get no gradient);
* ``permute`` / ``shift`` / ``send_recv`` with pairs ``(src, dst)``  <->  the same with ``(dst, src)``.
"""

from __future__ import annotations

from .. import neighbors
from .tracked import Tracked, _record

__all__ = ["halo_1d", "permute"]


def halo_1d(x, d, g, w, bnd):
    out = neighbors.halo_1d(x.data, d, g, w, bnd)
    return _record("HaloExchange", out, (x,), lambda gr, n: (neighbors.halo_1d_adjoint(gr, d, g, w, bnd),))


def permute(x, pairs, g, name="permute"):
    out = neighbors.permute_raw(x.data, pairs, g, name)
    inverse = [(b, a) for a, b in pairs]
    return _record("Permute", out, (x,), lambda gr, n: (neighbors.permute_raw(gr, inverse, g, name),))


# registration (nothing below autograd imports it)
neighbors.AUTOGRAD.update(Tracked=Tracked, halo_1d=halo_1d, permute=permute)
