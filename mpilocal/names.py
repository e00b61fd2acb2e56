"""Names that several layers share, and the rules that come with them (pure: no MPI).

**Reduce ops.** A ``Partial`` placement and the functional collectives accept :data:`REDUCE_OPS`.
A transport receives only :data:`TRANSPORT_OPS`: ``avg`` is a sum that the caller divides. Arrays of
``bool`` reduce logically (:data:`BOOL_OPS`): ``sum`` and ``max`` are OR, ``product`` and ``min`` are
AND, as NumPy's ``sum(...) > 0``, ``max``, ``prod`` and ``min`` of bools. Each transport builds its
library's tables with :func:`op_tables`, so the names and the bool rule are written here only.
:func:`identity` is each op's identity element (what an empty shard contributes).

**Collectives.** The same collectives go by two vocabularies: the short names of redistribute plans
(:class:`mpilocal.layout.Step`), of transport selection and of ``python -m mpilocal info``
(``"all_gather"``), and PyTorch's names, under which :class:`~mpilocal.debug.CommDebugMode` counts
(``"all_gather_into_tensor"``). :data:`COLLECTIVES` maps the first to the second.
"""

from __future__ import annotations

import numpy as np

__all__ = ["REDUCE_OPS", "TRANSPORT_OPS", "BOOL_OPS", "op_tables", "identity", "COLLECTIVES", "REDUCING"]

#: The reduce ops a ``Partial`` placement (and the functional collectives) accept.
REDUCE_OPS = ("sum", "avg", "max", "min", "product")

#: The reduce ops a transport receives (``avg`` is a sum the caller divides).
TRANSPORT_OPS = ("sum", "max", "min", "product")

#: The logical reduction that stands for each transport op on ``bool`` arrays.
BOOL_OPS = {"sum": "or", "max": "or", "min": "and", "product": "and"}


def op_tables(*, sum, max, min, product, logical_or, logical_and) -> tuple[dict, dict]:
    """(ops, bool ops): a library's reductions keyed by :data:`TRANSPORT_OPS`, and those that
    ``bool`` arrays use instead (:data:`BOOL_OPS`), from the library's objects for each."""
    ops = {"sum": sum, "max": max, "min": min, "product": product}
    logical = {"or": logical_or, "and": logical_and}
    return ops, {op: logical[BOOL_OPS[op]] for op in TRANSPORT_OPS}


def identity(op: str, dtype):
    """The identity element of transport op ``op`` on ``dtype``: 0 for ``sum``, 1 for ``product``;
    for ``max``/``min`` the lowest/highest value of the dtype (``False``/``True`` for bool, the
    integer limits, ``-inf``/``inf`` for floats)."""
    if op == "sum":
        return 0
    if op == "product":
        return 1
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return op == "min"
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return info.min if op == "max" else info.max
    return -np.inf if op == "max" else np.inf


#: Short collective name (plan steps, transport selection) -> PyTorch's name (CommDebugMode keys).
COLLECTIVES = {
    "all_gather": "all_gather_into_tensor",
    "all_reduce": "all_reduce",
    "reduce_scatter": "reduce_scatter_tensor",
    "all_to_all": "all_to_all_single",
    "broadcast": "broadcast",
    "scatter": "scatter",
}

#: The collectives (short names) that reduce.
REDUCING = ("all_reduce", "reduce_scatter")
