"""A small, exact reverse mode for mpilocal (no PyTorch): gradients through ``local_map``,
``redistribute``, ``from_local``/``to_local``, ``full_tensor`` and the functional collectives.

* ``DTensor.requires_grad_()``, ``.grad``, ``.backward(gradient=None)``, ``.detach()``,
  ``distribute_tensor(..., requires_grad=True)``.
* Inside ``local_map``, inputs that require grad reach the local function as :class:`Tracked`
  arrays, which record a core set of operations (see :mod:`mpilocal.autograd.tracked`) and raise
  ``NotImplementedError`` naming any other; :class:`Function` adds custom rules.
* Backward is collective where the graph communicates: every rank calls ``backward`` and the
  nodes run in reverse creation order, the same on every rank.
"""

from .engine import Leaf, Node, is_grad_enabled, no_grad
from .function import Function, FunctionCtx
from .tracked import OPERATORS, SUPPORTED, Tracked, TrackedNamespace, tensor

# registrations with the layers below (which never import autograd): DTensor and local_map
# (dtensor_ops), funcol's collectives (collectives) and neighbour collectives (neighbors)
from . import collectives, dtensor_ops, neighbors  # noqa: E402,F401

__all__ = ["Tracked", "tensor", "Function", "FunctionCtx", "SUPPORTED", "OPERATORS", "Node", "Leaf", "TrackedNamespace",
           "no_grad", "is_grad_enabled"]
