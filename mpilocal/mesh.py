"""DeviceMesh: an N-D array of MPI ranks with one communicator per mesh dimension.

Creating a mesh is collective over the ranks *in* the mesh (``MPI_Comm_create_group``), so ranks
outside a mesh over a subset of the world may call the constructor too (as PyTorch requires) at no
cost: for them ``get_coordinate()`` is ``None``. Communicators are cached per (ranks, shape), so
equal meshes share them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from mpi4py import MPI

__all__ = ["DeviceMesh", "init_device_mesh"]

_DEVICE_TYPES = ("cpu", "cuda")

# (tuple(world ranks in flat order), shape) -> (mesh comm, [dim comms], {dims: submesh comm})
_COMM_CACHE: dict = {}


def _world():
    return MPI.COMM_WORLD


class DeviceMesh:
    """An N-D mesh of MPI ranks (world ranks), with optional names for its dimensions.

    **Collective** over the ranks in ``mesh`` (ranks outside it return immediately). For
    ``device_type="cuda"`` each rank binds to one GPU of its node (node-local rank from
    ``MPI_Comm_split_type`` on ``COMM_WORLD``), so the first CUDA mesh is collective over the world.
    """

    def __init__(self, device_type: str, mesh, *, mesh_dim_names=None, _parent=None, _dims=None):
        if device_type not in _DEVICE_TYPES:
            raise ValueError(f"DeviceMesh: device_type {device_type!r} is not supported; use 'cpu' or 'cuda'")
        arr = np.asarray(mesh)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"DeviceMesh: mesh must be an integer array of world ranks, got dtype {arr.dtype}")
        if arr.ndim == 0:
            raise ValueError("DeviceMesh: mesh must have at least one dimension, got a scalar")
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        world = _world().Get_size()
        flat = arr.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= world):
            raise ValueError(
                f"DeviceMesh: mesh holds ranks {flat.tolist()} but MPI.COMM_WORLD has ranks 0..{world - 1}; "
                f"every entry must be a world rank"
            )
        if len(set(flat.tolist())) != flat.size:
            raise ValueError(f"DeviceMesh: mesh lists a rank twice: {flat.tolist()}; each rank may appear once")
        names = _check_names(mesh_dim_names, arr.ndim, "DeviceMesh")
        self.device_type = device_type
        self.mesh = arr
        self.mesh.setflags(write=False)
        self.mesh_dim_names = names
        self._rank = _world().Get_rank()
        where = np.argwhere(arr == self._rank)
        self._coordinate = tuple(int(c) for c in where[0]) if len(where) else None
        self._key = (device_type, arr.shape, arr.tobytes(), names)
        self._hash = hash(self._key)
        self._parent = _parent
        self._dims = _dims  # mesh dims of the root mesh this sub-mesh spans, in order
        if _parent is None:
            self._root = self
            self._root_dims = tuple(range(arr.ndim))
            self._dim_comms = _dim_comms(arr, self._coordinate)
            if device_type == "cuda":
                # the node-local rank comes from a split of COMM_WORLD, so on first use every world
                # rank takes part (PyTorch likewise asks every rank to build every mesh)
                from .gpu import bind_device, node_local_rank

                node_local_rank()
                if self._coordinate is not None:
                    bind_device()
        else:
            self._root = _parent._root
            self._root_dims = _dims
            self._dim_comms = [self._root._dim_comms[d] for d in _dims] if self._coordinate is not None else None
        self._comm = None
        self._meta_comm = None

    # -- shape ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.mesh.shape

    @property
    def ndim(self) -> int:
        return self.mesh.ndim

    def size(self, mesh_dim=None) -> int:
        """Number of ranks in the mesh, or along ``mesh_dim`` (an index or a name)."""
        if mesh_dim is None:
            return int(self.mesh.size)
        return int(self.mesh.shape[self._dim_index(mesh_dim, "size")])

    def get_rank(self) -> int:
        """This process's world rank."""
        return self._rank

    def get_coordinate(self):
        """This rank's coordinate in the mesh as a list, or ``None`` when it is not in the mesh."""
        return None if self._coordinate is None else list(self._coordinate)

    def get_local_rank(self, mesh_dim=None) -> int:
        """This rank's index along ``mesh_dim`` (may be omitted for a 1-D mesh)."""
        return self._coordinate[self._member_dim(mesh_dim, "get_local_rank")]

    def get_group(self, mesh_dim=None):
        """The mpi4py communicator along ``mesh_dim`` (may be omitted for a 1-D mesh)."""
        return self._dim_comms[self._member_dim(mesh_dim, "get_group")]

    def _member_dim(self, mesh_dim, caller) -> int:
        """The index of ``mesh_dim`` (None: the only dim of a 1-D mesh), for a rank in the mesh."""
        if mesh_dim is None:
            if self.ndim != 1:
                raise ValueError(
                    f"DeviceMesh.{caller}: mesh is {self.ndim}-D; pass mesh_dim (an index or one of "
                    f"{self.mesh_dim_names})"
                )
            mesh_dim = 0
        d = self._dim_index(mesh_dim, caller)
        self._require_member(caller)
        return d

    def get_all_groups(self) -> list:
        self._require_member("get_all_groups")
        return list(self._dim_comms)

    def get_comm(self):
        """The communicator over all ranks of this mesh, in flat (row-major) order.

        **Collective** over the mesh on first use of a sub-mesh that spans several dims.
        """
        self._require_member("get_comm")
        if self._comm is None:
            self._comm = self._make_comm()
        return self._comm

    def _make_comm(self):
        if self.ndim == 1:
            return self._dim_comms[0]
        root = self._root
        if self is root or (self._dims == tuple(range(root.ndim))):
            key = (root.mesh.tobytes(), root.mesh.shape, "all")
        else:
            key = (root.mesh.tobytes(), root.mesh.shape, self._dims)
        comm = _COMM_CACHE.get(key)
        if comm is None:
            ranks = self.mesh.ravel().tolist()
            group = _world().Get_group().Incl(ranks)
            from .failure import in_flight

            with in_flight(f"creating the communicator of {self!r} (MPI_Comm_create_group)"):  # deadline
                comm = _world().Create_group(group, tag=7)
            group.Free()
            _COMM_CACHE[key] = comm
        return comm

    def _metadata_comm(self):
        """A separate communicator (a dup of the mesh's) for metadata agreement."""
        if self._meta_comm is None:
            key = ("meta", self.mesh.tobytes(), self.mesh.shape)
            comm = _COMM_CACHE.get(key)
            if comm is None:
                from .failure import in_flight

                with in_flight(f"creating the metadata communicator of {self!r} (MPI_Comm_dup)"):  # deadline
                    comm = _COMM_CACHE[key] = self.get_comm().Dup()
            self._meta_comm = comm
        return self._meta_comm

    # -- sub-meshes ----------------------------------------------------------------------------
    def __getitem__(self, names) -> "DeviceMesh":
        if isinstance(names, str):
            names = (names,)
        elif not isinstance(names, tuple):
            raise TypeError(f"DeviceMesh[...]: index by mesh dim name(s) (str or tuple of str), got {names!r}")
        if self.mesh_dim_names is None:
            raise ValueError(
                f"DeviceMesh[{names!r}]: this mesh has no mesh_dim_names; create it with "
                f"mesh_dim_names=... to slice it by name"
            )
        dims = []
        for n in names:
            if n not in self.mesh_dim_names:
                raise ValueError(
                    f"DeviceMesh[{n!r}]: unknown mesh dim name {n!r}; this mesh's dims are {self.mesh_dim_names}"
                )
            dims.append(self.mesh_dim_names.index(n))
        if len(set(dims)) != len(dims):
            raise ValueError(f"DeviceMesh[{names!r}]: a mesh dim name is repeated")
        if tuple(dims) == tuple(range(self.ndim)):
            return self
        # the sub-mesh this rank belongs to: fix the other dims at this rank's coordinate
        coord = self._coordinate if self._coordinate is not None else (0,) * self.ndim
        index = tuple(slice(None) if d in dims else coord[d] for d in range(self.ndim))
        kept = [d for d in range(self.ndim) if d in dims]
        sub = self.mesh[index]
        order = [kept.index(d) for d in dims]
        sub = np.transpose(sub, order)
        root_dims = tuple(self._root_dims[d] for d in dims)
        m = DeviceMesh.__new__(DeviceMesh)
        DeviceMesh.__init__(m, self.device_type, sub, mesh_dim_names=tuple(names), _parent=self, _dims=root_dims)
        return m

    # -- identity ------------------------------------------------------------------------------
    def __eq__(self, other):
        return isinstance(other, DeviceMesh) and other._key == self._key

    def __hash__(self):
        return self._hash

    def __repr__(self):
        names = f", mesh_dim_names={self.mesh_dim_names}" if self.mesh_dim_names else ""
        return f"DeviceMesh('{self.device_type}', {self.mesh.tolist()}{names})"

    # -- helpers -------------------------------------------------------------------------------
    def _dim_index(self, mesh_dim, caller) -> int:
        if isinstance(mesh_dim, str):
            if self.mesh_dim_names is None or mesh_dim not in self.mesh_dim_names:
                raise ValueError(
                    f"DeviceMesh.{caller}: unknown mesh dim name {mesh_dim!r}; this mesh's dims are "
                    f"{self.mesh_dim_names}"
                )
            return self.mesh_dim_names.index(mesh_dim)
        if isinstance(mesh_dim, (int, np.integer)) and not isinstance(mesh_dim, bool):
            d = int(mesh_dim)
            if -self.ndim <= d < self.ndim:
                return d % self.ndim
            raise ValueError(f"DeviceMesh.{caller}: mesh_dim {d} is out of range for a {self.ndim}-D mesh")
        raise TypeError(f"DeviceMesh.{caller}: mesh_dim must be an int or a name, got {mesh_dim!r}")

    def _require_member(self, caller):
        if self._coordinate is None:
            raise RuntimeError(
                f"DeviceMesh.{caller}: world rank {self._rank} is not in this mesh {self.mesh.tolist()}; "
                f"only ranks in the mesh may use it"
            )


def _check_names(names, ndim, caller):
    if names is None:
        return None
    if isinstance(names, str):
        raise TypeError(f"{caller}: mesh_dim_names must be a tuple of str, got the str {names!r}; use ({names!r},)")
    names = tuple(names)
    if len(names) != ndim:
        raise ValueError(
            f"{caller}: mesh_dim_names {names} has {len(names)} names for a {ndim}-D mesh; give one name per dim"
        )
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"{caller}: mesh_dim_names must be str, got {n!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{caller}: mesh_dim_names {names} has duplicates; each dim needs its own name")
    return names


def _dim_comms(arr: np.ndarray, coordinate):
    """One communicator per mesh dim: the ranks that share this rank's coordinate on the other dims."""
    if coordinate is None:
        return None
    key = (arr.tobytes(), arr.shape)
    cached = _COMM_CACHE.get(key)
    if cached is not None:
        return cached
    ranks = arr.ravel().tolist()
    world = _world()
    if arr.size == world.Get_size() and ranks == list(range(world.Get_size())):
        base = world.Dup()
    else:
        group = world.Get_group().Incl(ranks)
        base = world.Create_group(group, tag=5)
        group.Free()
    comms = []
    for d in range(arr.ndim):
        color = 0
        for e in range(arr.ndim):
            if e != d:
                color = color * arr.shape[e] + coordinate[e]
        comms.append(base.Split(color, coordinate[d]))
    _COMM_CACHE[key] = comms
    _COMM_CACHE[(arr.tobytes(), arr.shape, "all")] = base
    return comms


def init_device_mesh(device_type: str, mesh_shape, *, mesh_dim_names=None) -> DeviceMesh:
    """A mesh of ``mesh_shape`` over all of ``MPI.COMM_WORLD`` in rank order. **Collective** (world)."""
    if isinstance(mesh_shape, (int, np.integer)):
        mesh_shape = (int(mesh_shape),)
    try:
        mesh_shape = tuple(int(s) for s in mesh_shape)
    except TypeError:
        raise TypeError(f"init_device_mesh: mesh_shape must be a tuple of ints, got {mesh_shape!r}") from None
    if any(s < 1 for s in mesh_shape) or not mesh_shape:
        raise ValueError(f"init_device_mesh: mesh_shape {mesh_shape} must be non-empty with positive sizes")
    world = _world().Get_size()
    if int(np.prod(mesh_shape)) != world:
        raise ValueError(
            f"init_device_mesh: mesh_shape {mesh_shape} holds {int(np.prod(mesh_shape))} ranks but MPI.COMM_WORLD "
            f"has {world}; choose a shape whose product is {world} (launch with mpiexec -n {int(np.prod(mesh_shape))})"
        )
    _check_names(mesh_dim_names, len(mesh_shape), "init_device_mesh")
    return DeviceMesh(device_type, np.arange(world).reshape(mesh_shape), mesh_dim_names=mesh_dim_names)
