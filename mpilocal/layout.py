"""Pure layout arithmetic: shard sizes and offsets, global shapes, redistribute plans.

Nothing here touches MPI or arrays: every function works on shapes (tuples of ints), placement
tuples, the mesh shape and a mesh coordinate, so all of it is unit-tested without ``mpiexec``.

Rules (those of ``torch.distributed.tensor``):

* ``Shard(d)`` over a mesh dimension of size ``k`` splits tensor dim ``d`` like ``torch.chunk``:
  every piece has ``ceil(n / k)`` elements except the trailing ones, which may be shorter or empty.
* One tensor dim sharded over several mesh dims nests in mesh-dim order: mesh dim 0 splits the
  global dim, mesh dim 1 splits each of those pieces, and so on.
* ``Shard(d, sizes=(s_0, ..., s_{k-1}))`` (ragged) gives the rank at coordinate ``i`` of the mesh
  dim ``s_i`` rows at offset ``s_0 + ... + s_{i-1}``; the sizes sum to the size of dim ``d`` and a
  ragged dim is sharded over that one mesh dim only (checked by :func:`normalize_placements` and
  :func:`shard_sizes`, with the same verdict on every rank). :func:`block_sizes` is the MPI block
  split (``n // k + (i < n % k)``: the slack on the first ranks); :func:`shards` lists the offset
  and shape of every shard of any layout.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Sequence

from .placement import Partial, Placement, Replicate, Shard

__all__ = [
    "normalize_placements",
    "chunk_sizes",
    "chunk_size_and_offset",
    "block_sizes",
    "block_size_and_offset",
    "shard_sizes",
    "shards",
    "local_shape_and_offset",
    "local_slices",
    "global_shape_from_locals",
    "check_local_shapes",
    "mesh_coords",
    "Step",
    "redistribute_plan",
]


def normalize_placements(placements, mesh_ndim: int, tensor_ndim: int, *, caller: str = "mpilocal") -> tuple:
    """Validate ``placements`` for a mesh of ``mesh_ndim`` dims and an array of ``tensor_ndim`` dims.

    ``None`` means ``Replicate()`` on every mesh dim. Negative shard dims are normalized. Raises
    ``TypeError`` for entries that are not placements and ``ValueError`` for a wrong count or a
    shard dim out of range.
    """
    if placements is None:
        return (Replicate(),) * mesh_ndim
    if isinstance(placements, Placement):
        raise TypeError(
            f"{caller}: placements must be a sequence of Placement (one per mesh dim), got the single "
            f"placement {placements!r}; pass [{placements!r}]"
        )
    try:
        placements = tuple(placements)
    except TypeError:
        raise TypeError(
            f"{caller}: placements must be a sequence of Placement, got {type(placements).__name__}"
        ) from None
    if len(placements) != mesh_ndim:
        raise ValueError(
            f"{caller}: got {len(placements)} placements {list(placements)} for a {mesh_ndim}-D device mesh; "
            f"give exactly one placement per mesh dimension"
        )
    out = []
    for p in placements:
        if not isinstance(p, Placement):
            raise TypeError(
                f"{caller}: placement {p!r} ({type(p).__name__}) is not a Shard, Replicate or Partial"
            )
        if type(p) is Shard:
            d = p.dim
            if not -tensor_ndim <= d < tensor_ndim:
                raise ValueError(
                    f"{caller}: {p!r} is out of range for an array of ndim {tensor_ndim}; "
                    f"shard dims must lie in [{-tensor_ndim}, {tensor_ndim - 1}]"
                )
            if d < 0:
                p = Shard(d + tensor_ndim, p.sizes)
        out.append(p)
    _check_ragged(out, caller)
    return tuple(out)


def _check_ragged(placements, caller):
    """A ragged shard's dim is sharded over its mesh dim only (nested ragged pieces would need
    sizes per outer coordinate)."""
    for m, p in enumerate(placements):
        if type(p) is Shard and p.sizes is not None:
            others = [j for j, q in enumerate(placements) if j != m and q.is_shard(p.dim)]
            if others:
                raise ValueError(
                    f"{caller}: {p!r} on mesh dim {m} is ragged, but tensor dim {p.dim} is also sharded over mesh "
                    f"dim(s) {others}; a ragged dim is sharded over one mesh dim only. Shard it once (or use "
                    f"Shard({p.dim}) without sizes when nesting)"
                )


def chunk_size_and_offset(n: int, k: int, i: int) -> tuple[int, int]:
    """Size and offset of piece ``i`` of ``n`` elements split ``k`` ways by the ``torch.chunk`` rule."""
    full = -(-n // k) if k else 0
    start = min(full * i, n)
    return max(min(full, n - start), 0), start


@lru_cache(maxsize=4096)
def chunk_sizes(n: int, k: int) -> tuple:
    """Sizes of the ``k`` pieces of ``n`` elements by the ``torch.chunk`` rule (trailing may be 0)."""
    return tuple(chunk_size_and_offset(n, k, i)[0] for i in range(k))


def block_size_and_offset(n: int, k: int, i: int) -> tuple[int, int]:
    """Size and offset of piece ``i`` of ``n`` elements split ``k`` ways by the MPI block rule
    (:func:`block_sizes`); the transports cut buffers into pieces by it."""
    q, r = divmod(n, k)
    return q + (i < r), i * q + min(i, r)


def block_sizes(n: int, k: int) -> tuple:
    """The MPI block split of ``n`` rows over ``k`` ranks: ``n // k + (i < n % k)`` (PETSc's and most
    hand-written MPI codes'; the slack on the first ranks, unlike ``torch.chunk``)."""
    if k <= 0 or n < 0:
        raise ValueError(f"block_sizes: need n >= 0 and k >= 1, got n={n}, k={k}")
    return tuple(block_size_and_offset(n, k, i)[0] for i in range(k))


def shard_sizes(p, n: int, k: int) -> tuple:
    """The ``k`` piece sizes of ``n`` rows under placement ``p`` (a ``Shard``): its ``sizes`` when
    ragged (checked against ``n`` and ``k``: ``ValueError`` naming the placement), else the
    ``torch.chunk`` rule."""
    sizes = p.sizes
    if sizes is None:
        return chunk_sizes(n, k)
    if len(sizes) != k or sum(sizes) != n:
        raise ValueError(
            f"{p!r} does not fit: it gives {len(sizes)} sizes summing to {sum(sizes)}, but the mesh dim has {k} "
            f"ranks and tensor dim {p.dim} has {n} rows; give one size per rank of the mesh dim, summing to {n}"
        )
    return sizes


def _piece(p, n, k, i):
    """(size, offset) of piece ``i`` under Shard ``p`` (ragged or chunk)."""
    if p.sizes is None:
        return chunk_size_and_offset(n, k, i)
    sizes = shard_sizes(p, n, k)
    return sizes[i], sum(sizes[:i])


def local_shape_and_offset(global_shape, mesh_shape, placements, coordinate) -> tuple[tuple, tuple]:
    """Local shape and global offset of the shard at mesh ``coordinate`` (nested in mesh-dim order)."""
    shape = list(global_shape)
    offset = [0] * len(shape)
    for m, p in enumerate(placements):
        if type(p) is Shard:
            d = p.dim
            size, off = _piece(p, shape[d], mesh_shape[m], coordinate[m])
            shape[d] = size
            offset[d] += off
    return tuple(shape), tuple(offset)


def local_slices(global_shape, mesh_shape, placements, coordinate) -> tuple:
    """The slices of the global array that the shard at ``coordinate`` holds."""
    shape, offset = local_shape_and_offset(global_shape, mesh_shape, placements, coordinate)
    return tuple(slice(o, o + s) for s, o in zip(shape, offset))


def shards(global_shape, mesh_shape, placements) -> tuple:
    """Every shard of a layout: ``((coordinate, local shape, global offset), ...)`` for every mesh
    coordinate in row-major (flat rank) order; the shard at ``coordinate`` is
    ``global[o0:o0 + n0, ...]``. ``placements`` must be normalized (:func:`normalize_placements`).
    Pure arithmetic, the same on every rank."""
    return tuple((c,) + local_shape_and_offset(global_shape, mesh_shape, placements, c) for c in mesh_coords(mesh_shape))


def mesh_coords(mesh_shape):
    """All coordinates of a mesh in row-major (flat rank) order."""
    coords = [()]
    for k in mesh_shape:
        coords = [c + (i,) for c in coords for i in range(k)]
    return coords


def global_shape_from_locals(local_shapes: Sequence, mesh_shape, placements, coordinate) -> tuple:
    """Global shape implied by every rank's local shape (``local_shapes[flat mesh index]``).

    Along a tensor dim sharded over mesh dims ``M``, the global size is the sum of the local sizes
    over the ranks that share this rank's coordinate on every mesh dim outside ``M`` (nested
    ``torch.chunk`` pieces partition the dim). Other dims keep this rank's local size.
    """
    ndim_mesh = len(mesh_shape)
    strides = [1] * ndim_mesh
    for m in range(ndim_mesh - 2, -1, -1):
        strides[m] = strides[m + 1] * mesh_shape[m + 1]
    me = sum(c * s for c, s in zip(coordinate, strides))
    result = list(local_shapes[me])
    sharding = {}
    for m, p in enumerate(placements):
        if type(p) is Shard:
            sharding.setdefault(p.dim, []).append(m)
    for d, mdims in sharding.items():
        total = 0
        for sub in mesh_coords([mesh_shape[m] for m in mdims]):
            c = list(coordinate)
            for m, i in zip(mdims, sub):
                c[m] = i
            total += local_shapes[sum(ci * s for ci, s in zip(c, strides))][d]
        result[d] = total
    return tuple(result)


def check_local_shapes(global_shape, local_shapes: Sequence, mesh_shape, placements) -> list:
    """Ranks whose local shape differs from the layout of ``global_shape``: ``[(flat, expected, got)]``."""
    bad = []
    for flat, coord in enumerate(mesh_coords(mesh_shape)):
        expected, _ = local_shape_and_offset(global_shape, mesh_shape, placements, coord)
        got = tuple(local_shapes[flat])
        if got != expected:
            bad.append((flat, expected, got))
    return bad


class Step(NamedTuple):
    """One logical step of a redistribute plan, on mesh dim ``mesh_dim``.

    ``op`` is one of ``all_gather`` (Shard(tensor_dim) -> Replicate; ``sizes`` are the pieces along
    ``tensor_dim`` in group-rank order), ``all_reduce`` (Partial -> Replicate), ``reduce_scatter``
    (Partial -> Shard(tensor_dim), output pieces ``sizes``), ``all_to_all`` (Shard(tensor_dim) ->
    Shard(dst_dim); ``sizes`` pieces along ``tensor_dim`` are received, ``dst_sizes`` pieces along
    ``dst_dim`` are sent), ``chunk`` (Replicate -> Shard(tensor_dim), local, no communication) and
    ``to_partial`` (Replicate -> Partial(reduce_op), local).
    """

    op: str
    mesh_dim: int
    tensor_dim: int = -1
    sizes: tuple = ()
    reduce_op: str = ""
    dst_dim: int = -1
    dst_sizes: tuple = ()


def _parent_shape(global_shape, mesh_shape, cur, coordinate, mesh_dim):
    """Local shape at ``coordinate`` if mesh dim ``mesh_dim`` did not shard (its group's whole)."""
    tmp = list(cur)
    tmp[mesh_dim] = Replicate()
    return local_shape_and_offset(global_shape, mesh_shape, tmp, coordinate)[0]


@lru_cache(maxsize=4096)
def redistribute_plan(global_shape: tuple, mesh_shape: tuple, coordinate: tuple, src: tuple, dst: tuple) -> tuple:
    """The steps that turn layout ``src`` into ``dst`` (normalized placement tuples); one collective each.

    Phase A walks mesh dims from last to first and removes every shard that must change (and every
    shard nested inside a changing one), with an all_to_all where Shard(a) -> Shard(b) is valid in
    place, else an all_gather. Phase B walks mesh dims first to last and builds the targets:
    Partial -> Replicate/Shard by all_reduce/reduce_scatter, Replicate -> Shard by a local chunk.
    """
    n = len(mesh_shape)
    cur = list(src)
    steps = []
    unshard = set()
    for i in range(n):
        c = cur[i]
        if type(c) is not Shard:
            continue
        if c != dst[i]:
            unshard.add(i)
            continue
        d = c.dim
        for k in range(i):
            if src[k] != dst[k] and (src[k].is_shard(d) or dst[k].is_shard(d)):
                unshard.add(i)
                break
    for i in sorted(unshard, reverse=True):
        a = cur[i].dim
        t = dst[i]
        parent = _parent_shape(global_shape, mesh_shape, cur, coordinate, i)
        k = mesh_shape[i]
        if type(t) is Shard and t.dim != a and _all_to_all_valid(cur, dst, i, a, t.dim):
            b = t.dim
            steps.append(Step("all_to_all", i, a, shard_sizes(cur[i], parent[a], k), "", b, shard_sizes(t, parent[b], k)))
            cur[i] = t
        else:
            steps.append(Step("all_gather", i, a, shard_sizes(cur[i], parent[a], k)))
            cur[i] = Replicate()
    for i in range(n):
        c, t = cur[i], dst[i]
        if c == t:
            continue
        k = mesh_shape[i]
        if type(c) is Partial:
            if type(t) is Shard:
                parent = _parent_shape(global_shape, mesh_shape, cur, coordinate, i)
                steps.append(Step("reduce_scatter", i, t.dim, shard_sizes(t, parent[t.dim], k), c.reduce_op))
                cur[i] = t
                continue
            steps.append(Step("all_reduce", i, reduce_op=c.reduce_op))
            cur[i] = c = Replicate()
            if t == c:
                continue
        # c is Replicate here
        if type(t) is Shard:
            parent = _parent_shape(global_shape, mesh_shape, cur, coordinate, i)
            steps.append(Step("chunk", i, t.dim, shard_sizes(t, parent[t.dim], k)))
        else:
            steps.append(Step("to_partial", i, reduce_op=t.reduce_op))
        cur[i] = t
    # on a mesh dim of size 1 every step is the identity: communicate nothing there
    return tuple(s for s in steps if mesh_shape[s.mesh_dim] > 1)


def _all_to_all_valid(cur, dst, i, a, b) -> bool:
    """Whether Shard(a) -> Shard(b) on mesh dim ``i`` can be one all_to_all in the current state."""
    for j in range(i + 1, len(cur)):
        if cur[j].is_shard(a) or cur[j].is_shard(b):
            return False
    for k in range(i):
        if (cur[k].is_shard(b) or dst[k].is_shard(b)) and cur[k] != dst[k]:
            return False
    return True
