"""CommDebugMode: counts the collectives mpilocal issues, one per logical collective.

Data collectives (array data) and metadata agreements (shape inference, ``run_check``) are kept
apart, so ``local_map`` on aligned inputs shows 0 collectives even when its outputs' global shapes
are agreed. The counting itself happens where collectives are issued (:mod:`mpilocal.collectives`
for array data, :mod:`mpilocal.agreement` and :mod:`mpilocal.collectives` for metadata,
:mod:`mpilocal.ops` for operator plans), each call guarded by ``if debug.ACTIVE:`` so that the
normal path pays one attribute lookup; this module only keeps the books. Collectives are booked
under PyTorch's names (:data:`mpilocal.names.COLLECTIVES` maps the short names to them).
"""

from __future__ import annotations

from collections import defaultdict

from .names import COLLECTIVES

__all__ = ["CommDebugMode", "COLLECTIVE_NAMES", "ACTIVE", "counted_as", "record", "record_metadata",
           "record_operator"]

COLLECTIVE_NAMES = tuple(COLLECTIVES.values()) + (
    "all_reduce_coalesced",
    "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor_coalesced",
    "halo_exchange",  # mpilocal.neighbors: point-to-point collectives (one per call and tensor dim)
    "permute",
    "send_recv",
)

#: The modes active now, innermost last (empty: nothing is counted).
ACTIVE: list = []


_BOOK_AS: dict = {}  # collective name -> the name it is booked under (set by counted_as)


class counted_as:
    """``with counted_as("all_reduce", "all_reduce_coalesced"):`` books the collectives named
    ``inner`` that run inside the block under ``outer`` (a public call built on an internal one)."""

    __slots__ = ("inner", "outer", "prev")

    def __init__(self, inner: str, outer: str):
        self.inner, self.outer = inner, outer

    def __enter__(self):
        self.prev = _BOOK_AS.get(self.inner)
        _BOOK_AS[self.inner] = self.outer
        return self

    def __exit__(self, *exc):
        if self.prev is None:
            _BOOK_AS.pop(self.inner, None)
        else:
            _BOOK_AS[self.inner] = self.prev
        return False


def record(name: str, nbytes: int) -> None:
    if _BOOK_AS:
        name = _BOOK_AS.get(name, name)
    for mode in ACTIVE:
        mode._counts[name] += 1
        mode._bytes[name] += nbytes


def record_operator(op: str, moves: tuple, out) -> None:
    """An operator's chosen redistributions (mpilocal.ops calls this while a mode is active)."""
    for mode in ACTIVE:
        mode._plans.append((op, moves, out))


def record_metadata(name: str, nbytes: int) -> None:
    for mode in ACTIVE:
        mode._meta[name] += 1
        mode._meta_bytes[name] += nbytes


class CommDebugMode:
    """Context manager counting collectives issued while it is active (this rank's view; local).

    ``get_comm_counts()`` → ``{name: count}`` for array-data collectives (names in
    :data:`COLLECTIVE_NAMES`; a ``defaultdict(int)``, as in PyTorch, so a collective that never
    ran reads 0), ``get_total_counts()`` their sum, ``get_comm_bytes()`` →
    ``{name: bytes}`` of array data this rank contributed (its send buffer), and
    ``get_metadata_counts()`` / ``get_metadata_bytes()`` for metadata agreements
    (``"shape_agreement"``, ``"run_check"``, ``"input_check"``); every getter returns a fresh
    ``defaultdict(int)``. Contexts may nest; each counts what happened inside it.
    """

    def __init__(self):
        self._counts = defaultdict(int)
        self._bytes = defaultdict(int)
        self._meta = defaultdict(int)
        self._meta_bytes = defaultdict(int)
        self._plans = []

    def __enter__(self):
        self._counts.clear()
        self._bytes.clear()
        self._meta.clear()
        self._meta_bytes.clear()
        self._plans.clear()
        ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        ACTIVE.remove(self)
        return False

    def get_total_counts(self) -> int:
        return sum(self._counts.values())

    def get_comm_counts(self) -> dict:
        return defaultdict(int, self._counts)

    def get_comm_bytes(self) -> dict:
        return defaultdict(int, self._bytes)

    def get_total_bytes(self) -> int:
        return sum(self._bytes.values())

    def get_metadata_counts(self) -> dict:
        return defaultdict(int, self._meta)

    def get_metadata_bytes(self) -> dict:
        return defaultdict(int, self._meta_bytes)

    def get_operator_plans(self) -> list:
        """Per operator on DTensors (mpilocal.ops) run inside: ``(op, moves, output placements)``,
        ``moves`` a tuple of ``(operand index, from placements, to placements)`` (empty: none)."""
        return list(self._plans)

    def __repr__(self):
        return f"CommDebugMode(comm={dict(self._counts)}, metadata={dict(self._meta)})"
