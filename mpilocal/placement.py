"""Placements: how one mesh dimension lays a global array out over its ranks (pure, no MPI).

``Shard(dim)`` splits tensor dim ``dim`` by the ``torch.chunk`` rule (``Shard(dim, sizes=...)``: ragged,
explicit sizes per mesh coordinate), ``Replicate()`` gives every
rank the whole array, ``Partial(op)`` says every rank holds a partial value and the global value
is their reduction by ``op``. Names, equality and repr follow ``torch.distributed.tensor``.
"""

from __future__ import annotations

from .names import REDUCE_OPS

__all__ = ["Placement", "Shard", "Replicate", "Partial", "REDUCE_OPS"]


class Placement:
    """Base class of the placement types; instances are immutable and hashable."""

    __slots__ = ()

    def is_shard(self, dim: int | None = None) -> bool:
        return False

    def is_replicate(self) -> bool:
        return False

    def is_partial(self) -> bool:
        return False

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")


class Shard(Placement):
    """Shard tensor dimension ``dim`` over the mesh dimension.

    By default pieces follow the ``torch.chunk`` rule (``ceil(n / k)`` rows each, the trailing ranks
    shorter or empty), as DTensor's ``Shard``. ``sizes`` makes the shard *ragged*: one explicit size
    per coordinate of the mesh dim, in order (e.g. the MPI block split ``n // k + (r < n % k)``:
    ``Shard(0, sizes=mpilocal.layout.block_sizes(n, k))``); they must sum to the dim's size, and a
    ragged dim is sharded over this one mesh dim only. ``Shard(d)`` and ``Shard(d, sizes=...)`` are
    different placements (equality and hashing include ``sizes``), even where the sizes coincide.

    A negative ``dim`` is normalized against the array's ndim when the placement is used.
    """

    __slots__ = ("dim", "sizes")

    def __init__(self, dim: int, sizes=None):
        if isinstance(dim, bool):  # operator.index accepts bools: Shard(True) is not Shard(1)
            raise TypeError(f"Shard(dim): dim must be an int, got {dim!r} ({type(dim).__name__})")
        if not isinstance(dim, int):
            try:
                import operator

                dim = operator.index(dim)
            except TypeError:
                raise TypeError(f"Shard(dim): dim must be an int, got {dim!r} ({type(dim).__name__})") from None
        object.__setattr__(self, "dim", int(dim))
        if sizes is not None:
            try:
                sizes = tuple(sizes)
                if any(isinstance(s, bool) for s in sizes):
                    raise TypeError
                import operator

                sizes = tuple(int(operator.index(s)) for s in sizes)
            except TypeError:
                raise TypeError(f"Shard(dim={dim}, sizes={sizes!r}): sizes must be a sequence of ints, one per "
                                f"coordinate of the mesh dim") from None
            if not sizes or any(s < 0 for s in sizes):
                raise ValueError(f"Shard(dim={dim}, sizes={sizes!r}): sizes must be non-negative, one per coordinate "
                                 f"of the mesh dim")
        object.__setattr__(self, "sizes", sizes)

    def is_shard(self, dim: int | None = None) -> bool:
        return dim is None or dim == self.dim

    def is_ragged(self) -> bool:
        """Whether the pieces have explicit ``sizes`` (else the ``torch.chunk`` rule)."""
        return self.sizes is not None

    def __eq__(self, other):
        return type(other) is Shard and other.dim == self.dim and other.sizes == self.sizes

    def __hash__(self):
        return hash((Shard, self.dim, self.sizes))

    def __repr__(self):
        if self.sizes is None:
            return f"Shard(dim={self.dim})"
        return f"Shard(dim={self.dim}, sizes={self.sizes})"

    def __reduce__(self):
        return (Shard, (self.dim,) if self.sizes is None else (self.dim, self.sizes))


class Replicate(Placement):
    """Every rank of the mesh dimension holds the whole (current) array."""

    __slots__ = ()

    def is_replicate(self) -> bool:
        return True

    def __eq__(self, other):
        return type(other) is Replicate

    def __hash__(self):
        return hash(Replicate)

    def __repr__(self):
        return "Replicate()"

    def __reduce__(self):
        return (Replicate, ())


class Partial(Placement):
    """Every rank holds a partial value; the global value is their reduction by ``reduce_op``.

    ``reduce_op`` is one of ``"sum"``, ``"avg"``, ``"max"``, ``"min"``, ``"product"``.
    """

    __slots__ = ("reduce_op",)

    def __init__(self, reduce_op: str = "sum"):
        if not isinstance(reduce_op, str) or reduce_op not in REDUCE_OPS:
            raise ValueError(
                f"Partial(reduce_op={reduce_op!r}): unknown reduce op; use one of {', '.join(map(repr, REDUCE_OPS))}"
            )
        object.__setattr__(self, "reduce_op", reduce_op)

    def is_partial(self) -> bool:
        return True

    def __eq__(self, other):
        return type(other) is Partial and other.reduce_op == self.reduce_op

    def __hash__(self):
        return hash((Partial, self.reduce_op))

    def __repr__(self):
        return f"Partial({self.reduce_op})"

    def __reduce__(self):
        return (Partial, (self.reduce_op,))
