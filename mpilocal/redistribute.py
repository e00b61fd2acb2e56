"""Execute redistribute plans (from :func:`mpilocal.layout.redistribute_plan`) on local shards.

Layer "api" (docs/architecture.md): the plan is pure layout arithmetic, each communicating step one
collective of :mod:`mpilocal.collectives`. :func:`check_target` is the one place of the rule that
no redistribute goes *to* a Partial placement (``DTensor.redistribute`` and ``local_map``'s
``redistribute_inputs`` both ask it).
"""

from __future__ import annotations

from . import _arrays, collectives, functional
from .layout import redistribute_plan
from .transport import group_for

__all__ = ["redistribute_local", "mesh_groups", "to_partial", "check_target"]


def check_target(src, dst, what: str) -> None:
    """PyTorch's rule: a ``Partial`` target is only reachable from the same ``Partial``
    (Replicate -> Partial is reserved for internal use). ``ValueError`` naming ``what`` (the caller
    and the value moved) otherwise. Local: placements are the same on every rank."""
    for i, (c, t) in enumerate(zip(src, dst)):
        if t.is_partial() and c != t:
            raise ValueError(
                f"{what}: cannot redistribute {c!r} to {t!r} on mesh dim {i}: redistributing to Partial is for "
                f"internal use only; target Replicate() or Shard(dim) instead"
            )


def mesh_groups(mesh):
    """The transport :class:`Group` of each mesh dim (the mesh's communicators; a closed mesh raises)."""
    return [group_for(c) for c in mesh.get_all_groups()]


def redistribute_local(local, mesh, global_shape, src, dst):
    """The local shard of layout ``dst`` from the local shard ``local`` of layout ``src``.

    **Collective** over the mesh; one logical collective per communicating step.
    """
    functional.check_redistribute(local.dtype, src, dst)  # funcol's checks, before any collective
    coord = mesh._coordinate
    plan = redistribute_plan(tuple(global_shape), mesh.shape, coord, tuple(src), tuple(dst))
    if not plan:  # every changing mesh dim has size 1: the same data, in a new array (never an alias)
        return local.copy()
    groups = mesh_groups(mesh)
    x = local
    for step in plan:
        g = groups[step.mesh_dim]
        op = step.op
        if op == "all_gather":
            x = collectives.all_gather(x, step.tensor_dim, g, step.sizes, placements=(src, dst))
        elif op == "all_reduce":
            x = collectives.all_reduce(x, step.reduce_op, g, placements=(src, dst))
        elif op == "reduce_scatter":
            x = collectives.reduce_scatter(x, step.reduce_op, step.tensor_dim, g, step.sizes, placements=(src, dst))
        elif op == "all_to_all":
            x = collectives.all_to_all_dims(x, step.tensor_dim, step.dst_dim, g, step.sizes, step.dst_sizes,
                                            placements=(src, dst))
        elif op == "chunk":
            i = coord[step.mesh_dim]
            off = sum(step.sizes[:i])
            idx = (slice(None),) * step.tensor_dim + (slice(off, off + step.sizes[i]),)
            # a copy, never a view: of the input it would alias it (writing into the result would change
            # the input's replica on this rank alone), of an intermediate it would pin all of it
            x = _arrays.namespace(x).array(x[idx], order="C", copy=True)
        elif op == "to_partial":
            x = to_partial(x, step.reduce_op, coord[step.mesh_dim])
        else:  # pragma: no cover - the planner emits only the ops above
            raise RuntimeError(f"redistribute: unknown plan step {step}")
    return x


def to_partial(x, op, index):
    """Replicate -> Partial(op) without communication, at group index ``index``: the reduction over
    the group gives ``x`` (``x`` itself at index 0 and the identity of ``op`` elsewhere; ``x``
    everywhere for avg/max/min). Always a new array."""
    xp = _arrays.namespace(x)
    if op in ("avg", "max", "min"):
        return x.copy()
    if index == 0:
        return x.copy()
    return xp.zeros_like(x) if op == "sum" else xp.ones_like(x)
