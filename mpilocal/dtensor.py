"""DTensor: one rank's shard plus the mesh and placements that say how shards form the array."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from . import _arrays, failure, functional
from .layout import (check_local_shapes, global_shape_from_locals, local_shape_and_offset, local_slices,
                     mesh_coords, normalize_placements)
from .mesh import DeviceMesh, current_mesh, init_device_mesh
from .placement import Partial, Replicate, Shard
from .redistribute import mesh_groups, redistribute_local
from .transport import group_for
from .autograd.engine import Leaf
from .autograd.tracked import Tracked

__all__ = ["DTensor", "distribute_tensor"]

_DEFAULT_MESH: dict = {}


def _default_mesh(device_type: str) -> DeviceMesh:
    m = current_mesh()  # the innermost `with mesh:` block (PyTorch's mesh stack)
    if m is not None:
        return m
    m = _DEFAULT_MESH.get(device_type)
    if m is None:
        from mpi4py import MPI

        m = _DEFAULT_MESH[device_type] = init_device_mesh(device_type, (MPI.COMM_WORLD.Get_size(),))
    return m


@lru_cache(maxsize=1024)
def _norm_cached(placements: tuple, mesh_ndim: int, ndim: int, caller: str) -> tuple:
    return normalize_placements(placements, mesh_ndim, ndim, caller=caller)


def _placements(placements, mesh, ndim, caller):
    if placements is None:
        return (Replicate(),) * mesh.ndim
    if isinstance(placements, list):
        placements = tuple(placements)
    if isinstance(placements, tuple):
        try:
            return _norm_cached(placements, mesh.ndim, ndim, caller)
        except TypeError as exc:
            if "unhashable" not in str(exc):
                raise
    return normalize_placements(placements, mesh.ndim, ndim, caller=caller)


def _on_device(x, mesh, caller):
    """``x`` as an array of the mesh's kind (NumPy for 'cpu', CuPy for 'cuda')."""
    if mesh.device_type == "cpu":
        if isinstance(x, np.ndarray):
            return x
        if _arrays.is_cupy(x):
            return x.get()
    else:
        if _arrays.is_cupy(x):
            return x
        if isinstance(x, np.ndarray):
            import cupy

            return cupy.asarray(x)
    raise TypeError(f"{caller}: expected a NumPy or CuPy array, got {type(x).__name__}")


def _ops():
    """mpilocal.autograd.dtensor_ops (imported on first use: only gradient code paths need it)."""
    from .autograd import dtensor_ops

    return dtensor_ops


def _check_group(mesh, x):
    """The Group over which argument checks are agreed (failure.agreed); None off the mesh."""
    if mesh is None:
        mesh = _default_mesh("cuda" if _arrays.is_cupy(x) else "cpu")
    if not isinstance(mesh, DeviceMesh) or mesh._coordinate is None:
        return None
    return group_for(mesh._metadata_comm())


def _check_mesh(mesh, caller):
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{caller}: device_mesh must be a DeviceMesh, got {type(mesh).__name__}")


class DTensor:
    """A distributed array: this rank's shard (``to_local()``), the ``device_mesh`` and the
    ``placements`` (one per mesh dim). Build one with :func:`distribute_tensor` or
    :meth:`DTensor.from_local`; ``shape`` is the global shape."""

    __slots__ = ("_local", "_mesh", "_placements", "_shape", "_future", "_stride", "_ag", "__weakref__")

    def __init__(self, local, mesh, placements, shape=None, future=None, stride=None):
        # internal: use DTensor.from_local / distribute_tensor
        self._local = local
        self._mesh = mesh
        self._placements = placements
        self._shape = shape
        self._future = future
        self._stride = stride
        self._ag = None  # autograd: None, or a GradMeta (see mpilocal.autograd.dtensor_ops)

    # -- construction --------------------------------------------------------------------------
    @staticmethod
    def from_local(local_tensor, device_mesh=None, placements=None, *, run_check=False, shape=None, stride=None):
        """Wrap this rank's shard. **Collective** over the mesh.

        Without ``shape`` the global shape of sharded dims is agreed from every rank's local size
        (a non-blocking metadata all-gather, completed when the shape is first needed), so uneven
        shards are right. ``run_check=True`` verifies dtype, ndim and local shapes across the mesh
        (raising the same ``ValueError`` on every rank) and broadcasts replicated data from group
        rank 0 of each Replicate mesh dim, as PyTorch does.
        """
        caller = "DTensor.from_local"
        if type(local_tensor) is Tracked:  # differentiable: backward redistributes the grad to `placements`
            return _ops().from_local(local_tensor, device_mesh, placements, run_check=run_check, shape=shape,
                                     stride=stride)
        # run_check: the verdict of the local checks is agreed, so every rank raises (failure.agreed)
        with failure.agreed(_check_group(device_mesh, local_tensor) if run_check else None, caller):
            _arrays.require_array(local_tensor, caller, "local_tensor")
            _check_mesh(device_mesh, caller)
            mesh = device_mesh if device_mesh is not None else _default_mesh(
                "cuda" if _arrays.is_cupy(local_tensor) else "cpu")
            local = _on_device(local_tensor, mesh, caller)
            pl = _placements(placements, mesh, local.ndim, caller)
            if shape is not None:
                shape = _check_shape(shape, local.ndim, caller)
            if stride is not None:
                stride = _check_shape(stride, local.ndim, caller, "stride")
        if mesh._coordinate is None:
            return DTensor(local, mesh, pl, shape if shape is not None else tuple(local.shape), None, stride)
        if run_check:
            local, shape = _run_check(local, mesh, pl, shape)
            return DTensor(local, mesh, pl, shape, None, stride)
        return _wrap(local, mesh, pl, shape, stride)

    # -- properties ----------------------------------------------------------------------------
    @property
    def device_mesh(self) -> DeviceMesh:
        return self._mesh

    @property
    def placements(self) -> tuple:
        return self._placements

    @property
    def shape(self) -> tuple:
        s = self._shape
        if s is None:
            s = self._resolve_shape()
        return s

    def _resolve_shape(self):
        rows = self._future.result()
        locals_ = [functional.meta_shape(r) for r in rows]
        self._shape = global_shape_from_locals(locals_, self._mesh.shape, self._placements, self._mesh._coordinate)
        self._future = None
        return self._shape

    @property
    def dtype(self):
        return self._local.dtype

    @property
    def ndim(self) -> int:
        return self._local.ndim

    def size(self, dim=None):
        """The global shape, or its size along ``dim`` (as ``torch.Tensor.size``)."""
        s = self.shape
        return s if dim is None else s[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def stride(self, dim=None):
        """Global strides in elements (row-major unless ``stride=`` was given to ``from_local``)."""
        st = self._stride
        if st is None:
            acc, out = 1, []
            for n in reversed(self.shape):
                out.append(acc)
                acc *= max(n, 1)
            st = tuple(reversed(out))
        return st if dim is None else st[dim]

    @property
    def device_type(self) -> str:
        return self._mesh.device_type

    # -- autograd ------------------------------------------------------------------------------
    @property
    def requires_grad(self) -> bool:
        """Whether gradients flow to this DTensor (a leaf made so, or the result of one)."""
        return self._ag is not None

    def requires_grad_(self, requires_grad: bool = True):
        """Make this (leaf) DTensor record gradients into ``.grad``; returns ``self``."""
        if requires_grad:
            if self._ag is None:
                self._ag = _ops().make_leaf(self)
        elif self._ag is not None:
            if not self.is_leaf:
                raise RuntimeError("DTensor.requires_grad_(False): only leaves can stop requiring grad; "
                                   "use .detach() for a DTensor without gradient history")
            self._ag = None
        return self

    @property
    def is_leaf(self) -> bool:
        ag = self._ag
        return ag is None or type(ag.node) is Leaf

    @property
    def grad_fn(self):
        """The node that made this DTensor (None for leaves and DTensors without gradient)."""
        return None if self.is_leaf else self._ag.node

    @property
    def grad(self):
        """The accumulated gradient (a DTensor) of a leaf that requires grad, else None. Gradients
        add up over ``backward`` calls until you set ``grad = None``."""
        ag = self._ag
        return None if ag is None else ag.grad

    @grad.setter
    def grad(self, value):
        if value is not None and type(value) is not DTensor:
            raise TypeError(f"DTensor.grad must be a DTensor or None, got {type(value).__name__}")
        if self._ag is None:
            if value is None:
                return
            raise RuntimeError("DTensor.grad: call requires_grad_() before assigning a gradient")
        self._ag.grad = value

    def detach(self):
        """The same shard, mesh and placements without gradient history (shares the local array)."""
        return DTensor(self._local, self._mesh, self._placements, self._shape, self._future, self._stride)

    def backward(self, gradient=None):
        """Accumulate the gradient of this DTensor into the ``.grad`` of the leaves it came from.
        **Collective** over the meshes the graph touches: every rank must call it.

        ``gradient``: a DTensor of this shape on this mesh; ``None`` means ones with this DTensor's
        placements (``Partial`` taken as ``Replicate``).
        """
        _ops().backward(self, gradient)

    # -- conversions ---------------------------------------------------------------------------
    def to_local(self, *, grad_placements=None):
        """This rank's shard (no communication). For a DTensor that requires grad it is a
        :class:`~mpilocal.autograd.Tracked` array whose gradient flows back as a DTensor with
        ``grad_placements`` (default: this DTensor's placements)."""
        if self._ag is None:
            return self._local
        return _ops().to_local(self, grad_placements)

    def redistribute(self, device_mesh=None, placements=None, *, async_op=False):
        """A DTensor with ``placements`` on the same mesh. **Collective** over the mesh.

        One logical collective per mesh dim that changes (see DESIGN.md's layout rules). A Partial
        target is only reachable from the same Partial (PyTorch reserves Replicate -> Partial for
        internal use). ``async_op`` is accepted for PyTorch compatibility; the result is complete.
        """
        caller = "DTensor.redistribute"
        _check_mesh(device_mesh, caller)
        if device_mesh is not None and device_mesh != self._mesh:
            raise NotImplementedError(
                f"{caller}: moving a DTensor to another mesh ({device_mesh} from {self._mesh}) is not supported; "
                f"use full_tensor() and distribute_tensor() on the new mesh"
            )
        pl = _placements(placements, self._mesh, self.ndim, caller)
        for i, (c, t) in enumerate(zip(self._placements, pl)):
            if t.is_partial() and c != t:
                raise ValueError(
                    f"{caller}: cannot redistribute {c!r} to {t!r} on mesh dim {i}: redistributing to Partial is "
                    f"for internal use only; target Replicate() or Shard(dim) instead"
                )
        return self._redistribute(pl)

    def _redistribute(self, pl):
        if pl == self._placements:
            return self
        if self._ag is not None:
            return _ops().redistribute(self, pl)
        if self._mesh._coordinate is None:
            return DTensor(self._local, self._mesh, pl, self._shape, self._future, self._stride)
        shape = self.shape
        local = redistribute_local(self._local, self._mesh, shape, self._placements, pl)
        return DTensor(local, self._mesh, pl, shape, None, None)

    def full_tensor(self):
        """The whole global array on every rank (redistribute to Replicate). **Collective.**"""
        return self._redistribute((Replicate(),) * self._mesh.ndim).to_local()

    def __repr__(self):
        local = tuple(self._local.shape)
        shape = self.shape  # completes a pending shape agreement (every rank posted it: a local wait)
        return (f"DTensor(shape={shape}, local_shape={local}, dtype={self.dtype}, "
                f"placements={self._placements}, device_mesh={self._mesh})")

    def __array__(self, *a, **k):
        raise TypeError(
            "DTensor cannot be converted to a NumPy array implicitly (that would hide a collective); "
            "use .to_local() for this rank's shard or .full_tensor() for the whole array"
        )


def _check_shape(shape, ndim, caller, what="shape"):
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{caller}: {what} must be a sequence of ints, got {shape!r}") from None
    if len(shape) != ndim or any(s < 0 for s in shape):
        raise ValueError(f"{caller}: {what} {shape} must have {ndim} non-negative entries (the local array's ndim)")
    return shape


def _wrap(local, mesh, pl, shape=None, stride=None):
    """A DTensor around ``local``; without ``shape``, sharded dims are agreed non-blockingly."""
    if shape is None:
        mesh_shape = mesh.mesh.shape
        for i, p in enumerate(pl):
            if type(p) is Shard and mesh_shape[i] > 1:  # a mesh dim of size 1 shards nothing
                fut = functional.post_shape_agreement(mesh, local.shape)
                return DTensor(local, mesh, pl, None, fut, stride)
        shape = tuple(local.shape)
    return DTensor(local, mesh, pl, shape, None, stride)


def _run_check(local, mesh, pl, shape):
    """Collective consistency check of from_local's inputs; returns (local, global shape)."""
    caller = "DTensor.from_local(run_check=True)"
    rows = functional.meta_allgather(mesh._metadata_comm(), functional.meta_vector(local.shape, local.dtype), "run_check")
    ref = rows[0]
    for r, row in enumerate(rows):
        if row[0] != ref[0] or row[1] != ref[1]:
            raise ValueError(
                f"{caller}: mesh rank {mesh.mesh.ravel()[r]} has a local array of ndim {row[0]} and another dtype "
                f"or ndim than mesh rank {mesh.mesh.ravel()[0]} (ndim {ref[0]}); every rank must pass the same dtype and ndim"
            )
    locals_ = [functional.meta_shape(r) for r in rows]
    if shape is None:
        # every rank computes it at the same coordinate, so the verdict below is the same everywhere
        shape = global_shape_from_locals(locals_, mesh.shape, pl, (0,) * mesh.ndim)
    bad = check_local_shapes(shape, locals_, mesh.shape, pl)
    if bad:
        flat, expected, got = bad[0]
        raise ValueError(
            f"{caller}: mesh rank {int(mesh.mesh.ravel()[flat])} holds a local shape {got} but global shape "
            f"{shape} with placements {pl} gives it {expected} ({len(bad)} rank(s) disagree); shards must follow "
            f"the torch.chunk rule — pass shape= or fix the local arrays"
        )
    groups = mesh_groups(mesh)
    for i, p in enumerate(pl):
        if type(p) is Replicate and mesh.shape[i] > 1:
            local = functional.bcast(local, 0, groups[i])
    return local, shape


def distribute_tensor(tensor, device_mesh=None, placements=None, *, src_data_rank=0, requires_grad=False):
    """Distribute a global array over ``device_mesh`` by ``placements``. **Collective** over the mesh.

    The data of group rank ``src_data_rank`` (on every mesh dim) is scattered — one ``scatter`` —
    or, when every placement is Replicate, broadcast; ``None`` slices each rank's own copy with no
    communication. Every rank passes an array of the same shape and dtype (checked). ``Partial``
    placements are rejected. ``requires_grad=True`` makes the result a leaf that records gradients.
    """
    out = _distribute_tensor(tensor, device_mesh, placements, src_data_rank)
    return out.requires_grad_() if requires_grad else out


def _distribute_tensor(tensor, device_mesh, placements, src_data_rank):
    caller = "distribute_tensor"
    # with communication ahead, the verdict of the local checks is agreed so every rank raises
    with failure.agreed(_check_group(device_mesh, tensor) if src_data_rank is not None else None, caller):
        _arrays.require_array(tensor, caller, "tensor")
        _check_mesh(device_mesh, caller)
        mesh = device_mesh if device_mesh is not None else _default_mesh("cuda" if _arrays.is_cupy(tensor) else "cpu")
        x = _on_device(tensor, mesh, caller)
        pl = _placements(placements, mesh, x.ndim, caller)
        for p in pl:
            if p.is_partial():
                raise ValueError(
                    f"{caller}: placements {list(pl)} contain {p!r}; a global array cannot be distributed as Partial. "
                    f"Distribute it as Replicate()/Shard(d), or build a Partial DTensor with DTensor.from_local"
                )
        if src_data_rank is not None:
            if isinstance(src_data_rank, bool) or not isinstance(src_data_rank, (int, np.integer)):
                raise TypeError(f"{caller}: src_data_rank must be an int or None, got {src_data_rank!r}")
            if not 0 <= src_data_rank < min(mesh.shape):
                raise ValueError(
                    f"{caller}: src_data_rank={src_data_rank} is not a group rank on every mesh dim of a mesh of "
                    f"shape {mesh.shape}; use 0..{min(mesh.shape) - 1} or None"
                )
    shape = tuple(x.shape)
    coord = mesh._coordinate
    if coord is None:
        xp = _arrays.namespace(x)
        return DTensor(xp.empty((0,) * x.ndim, dtype=x.dtype), mesh, pl, shape)
    if src_data_rank is None or mesh.mesh.size == 1:  # each rank slices its own copy: no communication
        xp = _arrays.namespace(x)
        return DTensor(xp.array(x[local_slices(shape, mesh.shape, pl, coord)], order="C", copy=True), mesh, pl, shape)
    comm = mesh._metadata_comm()
    rows = functional.meta_allgather(comm, functional.meta_vector(shape, x.dtype), "input_check")
    root_coord = (int(src_data_rank),) * mesh.ndim
    root = int(np.ravel_multi_index(root_coord, mesh.shape))
    for r, row in enumerate(rows):
        if not np.array_equal(row, rows[root]):
            raise ValueError(
                f"{caller}: mesh rank {int(mesh.mesh.ravel()[r])} passes shape {functional.meta_shape(row)} but the "
                f"source (mesh rank {int(mesh.mesh.ravel()[root])}) passes {functional.meta_shape(rows[root])} "
                f"(or another dtype); every rank must pass the same global shape and dtype"
            )
    g = group_for(mesh.get_comm())
    if all(p.is_replicate() for p in pl):
        local = functional.bcast(x, root, g)
    else:
        coords = mesh_coords(mesh.shape)
        counts = [math.prod(local_shape_and_offset(shape, mesh.shape, pl, c)[0]) for c in coords]
        pieces = [x[local_slices(shape, mesh.shape, pl, c)] for c in coords] if g.rank == root else None
        local_shape, _ = local_shape_and_offset(shape, mesh.shape, pl, coord)
        local = functional.scatter(pieces, x, local_shape, counts, root, g)
    return DTensor(local, mesh, pl, shape)
