"""Wrapping an existing ragged decomposition: shard sizes agreed from the local arrays.

``DTensor.from_local(local, mesh, [Shard(0, sizes=...)])`` needs the sizes; codes that arrive with
data already split (the MPI block split ``N//p + (r < N%p)``, or any other) can let mpilocal find
them: :func:`ragged_from_local` gathers every rank's local shape once and turns each ``Shard(d)``
into ``Shard(d, sizes=...)`` with the sizes the ranks hold.
"""

from __future__ import annotations

from . import _arrays, agreement, collectives
from .dtensor import DTensor
from .layout import mesh_coords, normalize_placements
from .metadata import meta_shape, meta_vector
from .placement import Shard
from .transport import group_for

__all__ = ["ragged_from_local"]


def ragged_from_local(local, device_mesh, placements, *, run_check=False):
    """A DTensor whose ``Shard(d)`` placements become ``Shard(d, sizes=...)`` with the sizes the
    ranks hold along ``d`` (one metadata all-gather over the mesh). **Collective** over the mesh.

    The sizes along a sharded dim must be the same at every coordinate of the other mesh dims, and
    a ragged dim is sharded over one mesh dim only; otherwise every rank raises the same
    ``ValueError``. Placements that already carry sizes, ``Replicate`` and ``Partial`` stay as
    given. ``run_check`` as :meth:`DTensor.from_local`.

    Example:
        >>> n = N // p + (r < N % p)                        # the MPI block split, rank r of p
        >>> X = mpilocal.ragged_from_local(np.ones((n, 8)), mesh, [Shard(0)])
        >>> X.placements                                     # (Shard(dim=0, sizes=(3, 3, 2, 2)),) for N=10, p=4
    """
    caller = "ragged_from_local"
    mesh = device_mesh
    if mesh._coordinate is None:  # off the mesh: nothing to agree
        return DTensor.from_local(local, mesh, placements, run_check=run_check)
    g = group_for(mesh._metadata_comm())
    try:  # rank-local checks; the verdict is agreed so that every rank raises
        _arrays.require_array(local, caller, "local")
        pl = normalize_placements(placements, mesh.ndim, local.ndim, caller=caller)
        err = None
    except (TypeError, ValueError) as e:
        err = e
    meta = None if err else meta_vector(local.shape, local.dtype)
    rows = agreement.agree(g, caller, err, meta, "ragged_sizes")
    if rows is None and g.size > 1:  # argument agreement is off: the shapes are still needed
        rows = collectives.meta_allgather(g.comm, meta, "ragged_sizes")
    shapes = [meta_shape(r) for r in rows] if rows is not None else [tuple(local.shape)]
    if any(len(s) != local.ndim for s in shapes):
        raise ValueError(f"{caller}: ranks pass arrays of different ndim ({sorted({len(s) for s in shapes})}); "
                         f"every rank passes its shard of one global array")
    mesh_shape = tuple(mesh.shape)
    coords = mesh_coords(mesh_shape)
    flat = {c: i for i, c in enumerate(coords)}
    shape = list(local.shape)
    out = list(pl)
    for m, p in enumerate(pl):
        if type(p) is not Shard or p.sizes is not None:
            continue
        d = p.dim
        if sum(1 for q in pl if q.is_shard(d)) > 1:
            raise ValueError(f"{caller}: tensor dim {d} is sharded over several mesh dims; ragged sizes need it "
                             f"sharded over one mesh dim (use DTensor.from_local with Shard({d}) for nested shards)")
        seen = None
        for c in coords:  # the sizes along mesh dim m at every coordinate of the other mesh dims
            if c[m] != 0:
                continue
            sizes = tuple(shapes[flat[c[:m] + (i,) + c[m + 1:]]][d] for i in range(mesh_shape[m]))
            if seen is None:
                seen = sizes
            elif sizes != seen:
                raise ValueError(f"{caller}: along mesh dim {m}, tensor dim {d} splits as {seen} at one coordinate "
                                 f"of the other mesh dims and as {sizes} at another; one global array has one "
                                 f"split per mesh dim")
        out[m] = Shard(d, sizes=seen)
        shape[d] = sum(seen)
    for m, p in enumerate(out):  # dims sharded with given sizes: their global size is the sum
        if type(p) is Shard and p.sizes is not None and pl[m].sizes is not None:
            shape[p.dim] = sum(p.sizes)
    return DTensor.from_local(local, mesh, out, shape=tuple(shape), run_check=run_check)
