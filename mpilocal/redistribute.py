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


_PROGRAMS_MAX = 256  # compiled transitions kept per mesh (a dict cleared when full: bounded memory)


def redistribute_local(local, mesh, global_shape, src, dst):
    """The local shard of layout ``dst`` from the local shard ``local`` of layout ``src``.

    **Collective** over the mesh; one logical collective per communicating step. The transition is
    compiled once per (global shape, placements, array type, dtype) and mesh (:func:`_compile`: the
    checks, the plan and the groups), then each call runs its steps (docs/architecture.md, "A loop of
    the same redistribute").
    """
    progs = mesh.__dict__.get("_programs")
    if progs is None:
        progs = mesh.__dict__["_programs"] = {}
    # keyed by the placement tuples' identity (the DTensor's and the checked target's, the same objects
    # in a loop: no Python-level hashing of placements per call), which the entry holds and checks
    key = (global_shape, id(src), id(dst), type(local), local.dtype)
    hit = progs.get(key)
    if hit is None or hit[0] is not src or hit[1] is not dst or mesh._root._closed:
        # (a closed mesh: mesh_groups raises its error)
        hit = (src, dst, _compile(local.dtype, mesh, tuple(global_shape), tuple(src), tuple(dst)))
        if len(progs) >= _PROGRAMS_MAX:
            progs.clear()
        progs[key] = hit
    return hit[2](local)


def _copy(x):
    return x.copy()


def _compile(dtype, mesh, global_shape, src, dst):
    """``run(local) -> local``: the steps of the plan from ``src`` to ``dst``, each a closure over
    its group, sizes and reduce op. Raises (before any collective) what funcol's checks raise."""
    functional.check_redistribute(dtype, src, dst)  # funcol's checks, before any collective
    coord = mesh._coordinate
    plan = redistribute_plan(global_shape, mesh.shape, coord, src, dst)
    if not plan:  # every changing mesh dim has size 1: the same data, in a new array (never an alias)
        return _copy
    groups = mesh_groups(mesh)
    steps = [_step(step, groups[step.mesh_dim], coord, (src, dst)) for step in plan]
    if len(steps) == 1:
        return steps[0]

    def run(x):
        for f in steps:
            x = f(x)
        return x

    return run


def _step(step, g, coord, pl):
    """One plan step as ``f(x) -> x``."""
    op = step.op
    if op == "all_gather":
        return collectives.prepared_all_gather(step.tensor_dim, g, step.sizes, placements=pl)
    if op == "all_reduce":
        return collectives.prepared_all_reduce(step.reduce_op, g, placements=pl)
    if op == "reduce_scatter":
        return collectives.prepared_reduce_scatter(step.reduce_op, step.tensor_dim, g, step.sizes, placements=pl)
    if op == "all_to_all":
        a, b, sa, sb = step.tensor_dim, step.dst_dim, step.sizes, step.dst_sizes
        return lambda x: collectives.all_to_all_dims(x, a, b, g, sa, sb, placements=pl)
    if op == "chunk":
        i = coord[step.mesh_dim]
        off = sum(step.sizes[:i])
        idx = (slice(None),) * step.tensor_dim + (slice(off, off + step.sizes[i]),)
        # a copy, never a view: of the input it would alias it (writing into the result would change
        # the input's replica on this rank alone), of an intermediate it would pin all of it
        return lambda x: _arrays.namespace(x).array(x[idx], order="C", copy=True)
    if op == "to_partial":
        rop, index = step.reduce_op, coord[step.mesh_dim]
        return lambda x: to_partial(x, rop, index)
    raise RuntimeError(f"redistribute: unknown plan step {step}")  # pragma: no cover - the planner emits only these


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
