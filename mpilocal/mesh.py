"""DeviceMesh: an N-D array of MPI ranks with one communicator per mesh dimension.

Creating a mesh is collective over the ranks *in* the mesh (``MPI_Comm_create_group``), so ranks
outside a mesh over a subset of the world may call the constructor too (as PyTorch requires) at no
cost: for them ``get_coordinate()`` is ``None``.

Communicators are kept per (ranks, shape) in one record (:class:`_Comms`) shared by equal meshes,
whatever their names or device type, and by their sub-meshes; communicators made later (a sub-mesh's
communicator, the metadata communicator) join the record of their root mesh. Each root
``DeviceMesh`` object holds one handle on its record. :meth:`DeviceMesh.close` gives the handle
back; when no rank of the mesh holds a handle any more (agreed by one small all-reduce, so every
rank frees the same communicators in the same order, or none), the record's communicators are freed
with everything the transports keep for them (:func:`mpilocal.transport.release`). Nothing is ever
freed from a garbage-collector callback: a free is collective.

``with mesh:`` makes ``mesh`` the default mesh of ``distribute_tensor`` / ``DTensor.from_local``
when they get no ``device_mesh`` (PyTorch's mesh stack; per thread).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
from mpi4py import MPI

from . import deadline

__all__ = ["DeviceMesh", "init_device_mesh", "current_mesh", "release_unused"]

_DEVICE_TYPES = ("cpu", "cuda")

# Mirror of every live communicator, for _describe (names the mesh in deadline reports):
#   (ranks bytes, shape)            -> [dim comms] of a root mesh
#   (ranks bytes, shape, "all")     -> the communicator over all of a root mesh
#   (root bytes, root shape, dims, serial)            -> a sub-mesh's communicator over several dims
#   ("meta", ranks bytes, shape, root dims, serial)   -> a metadata communicator
_COMM_CACHE: dict = {}

# (ranks bytes, shape) -> _Comms of the meshes created over those ranks (this rank in the mesh)
_RECORDS: dict = {}
_SERIAL = [0]


def _world():
    return MPI.COMM_WORLD


class _Comms:
    """The communicators of one root mesh on this rank, shared by equal meshes and sub-meshes.

    ``base``: over all ranks of the mesh (None until needed for ``from_group`` meshes); ``dims``:
    one per mesh dim; ``extra``: made later, by key; ``borrowed``: communicators the user passed to
    :meth:`DeviceMesh.from_group` (mpilocal never frees those); ``handles``: root meshes on this
    rank that are not closed."""

    __slots__ = ("key", "base", "dims", "extra", "borrowed", "handles", "serial", "freed")

    def __init__(self, key, base, dims, borrowed=()):
        _SERIAL[0] += 1
        self.key, self.base, self.dims, self.extra = key, base, dims, {}
        self.borrowed = list(borrowed)
        self.handles, self.serial, self.freed = 0, _SERIAL[0], False

    def cache_keys(self):
        keys = [k for k in (self.key, self.key + ("all",) if self.key else None) if k in _COMM_CACHE]
        return keys + list(self.extra)


class _UnknownMeshDim(KeyError, ValueError):
    """An unknown or misordered mesh dim name: a ``KeyError`` as in PyTorch (and a ``ValueError``, as
    mpilocal raised before), whose text is the message itself rather than its repr."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


_STACK = threading.local()


def current_mesh():
    """The innermost mesh of an active ``with mesh:`` block in this thread, or None."""
    stack = getattr(_STACK, "meshes", None)
    return stack[-1] if stack else None


class DeviceMesh:
    """An N-D mesh of MPI ranks (world ranks), with optional names for its dimensions.

    **Collective** over the ranks in ``mesh`` (ranks outside it return immediately). For
    ``device_type="cuda"`` each rank binds to one GPU of its node (node-local rank from
    ``MPI_Comm_split_type`` on ``COMM_WORLD``), so the first CUDA mesh is collective over the world.

    A mesh is a context manager: ``with mesh:`` makes it the default mesh of ``distribute_tensor`` and
    ``DTensor.from_local`` (it does not close it). :meth:`close` frees its communicators.
    """

    def __init__(self, device_type: str, mesh, *, mesh_dim_names=None, _parent=None, _dims=None):
        arr, names = _check_mesh_args(device_type, mesh, mesh_dim_names, "DeviceMesh")
        self._setup(device_type, arr, names, _parent, _dims)
        if _parent is None:
            if self._coordinate is not None:
                self._attach(_dim_comms(arr, self._coordinate))
            self._bind_gpu()

    def _setup(self, device_type, arr, names, parent, dims):
        self.device_type = device_type
        self.mesh = arr
        self.mesh.setflags(write=False)
        self.mesh_dim_names = names
        self._rank = _world().Get_rank()
        where = np.argwhere(arr == self._rank)
        self._coordinate = tuple(int(c) for c in where[0]) if len(where) else None
        self._key = (device_type, arr.shape, arr.tobytes(), names)
        self._hash = hash(self._key)
        self._parent = parent
        self._dims = dims  # mesh dims of the root mesh this sub-mesh spans, in order
        self._comm = None
        self._meta_comm = None
        self._closed = False
        if parent is None:
            self._root_mesh = None  # not `self`: a self-reference would keep meshes for the cyclic GC
            self._root_dims = tuple(range(arr.ndim))
            self._rec = None
            self._dim_comms = None
            self._subs = weakref.WeakSet()  # sub-meshes: their cached groups are dropped by close()
        else:
            root = self._root_mesh = parent._root
            self._root_dims = dims
            self._rec = root._rec
            self._dim_comms = [root._dim_comms[d] for d in dims] if self._coordinate is not None else None
            root._subs.add(self)

    def _attach(self, rec):
        self._rec = rec
        rec.handles += 1
        self._dim_comms = rec.dims
        # a mesh dropped without close() gives its handle back when it is collected (bookkeeping
        # only: no MPI call from a garbage-collector callback); release_unused() frees at a safe point
        self._handle = [True]
        weakref.finalize(self, _drop_handle, rec, self._handle)

    def _bind_gpu(self):
        if self.device_type == "cuda":
            # the node-local rank comes from a split of COMM_WORLD, so on first use every world
            # rank takes part (PyTorch likewise asks every rank to build every mesh)
            from .gpu import bind_device, node_local_rank

            with deadline.in_flight("binding GPUs (MPI_Comm_split_type of MPI.COMM_WORLD, on the first CUDA mesh)",
                                    members=_world()):  # deadline
                node_local_rank()
            if self._coordinate is not None:
                bind_device()

    # -- construction from communicators ---------------------------------------------------------
    @staticmethod
    def from_group(group, device_type: str, mesh=None, *, mesh_dim_names=None) -> "DeviceMesh":
        """A mesh over existing mpi4py communicators (PyTorch's ``DeviceMesh.from_group``). Local
        (no communication), except that the first ``"cuda"`` mesh binds GPUs (collective over the world).

        - ``group`` one intra-communicator: a 1-D mesh of its members in communicator-rank order;
          ``mesh`` may repeat those world ranks (else ``ValueError``).
        - ``group`` a list of communicators, one per mesh dim: ``mesh`` (an N-D array of world ranks)
          and ``mesh_dim_names`` are required, and communicator ``d`` must hold, in its rank order,
          the ranks of ``mesh`` along dim ``d`` through this rank.
        - A rank outside the mesh passes ``MPI.COMM_NULL`` (or a list of them) with ``mesh``: it gets a
          mesh with ``get_coordinate() is None``.

        The mesh uses the communicators as they are, and :meth:`close` never frees them (it frees
        only what mpilocal made for them: control and metadata communicators, NCCL communicators).
        """
        caller = "DeviceMesh.from_group"
        if isinstance(group, MPI.Comm):
            groups = [group]
            if mesh is None and group == MPI.COMM_NULL:
                raise ValueError(f"{caller}: group is MPI.COMM_NULL and no mesh is given; a rank outside the "
                                 f"communicator must pass mesh=<the world ranks of the mesh>")
            if mesh is None:
                mesh = _world_ranks(group, caller)
        elif isinstance(group, (list, tuple)):
            groups = list(group)
            if not groups:
                raise ValueError(f"{caller}: expects at least one communicator, got an empty list")
            bad = [g for g in groups if not isinstance(g, MPI.Comm)]
            if bad:
                raise TypeError(f"{caller}: group must be an mpi4py communicator or a list of them, got "
                                f"{type(bad[0]).__name__} in the list")
            if mesh is None:
                raise ValueError(f"{caller}: pass mesh=<N-D array of world ranks> with a list of {len(groups)} "
                                 f"communicators (as PyTorch)")
            if mesh_dim_names is None and len(groups) > 1:
                raise ValueError(f"{caller}: pass mesh_dim_names=... with a list of communicators (as PyTorch)")
        else:
            raise TypeError(f"{caller}: group must be an mpi4py communicator or a list of them, got "
                            f"{type(group).__name__}")
        arr, names = _check_mesh_args(device_type, mesh, mesh_dim_names, caller)
        if arr.ndim != len(groups):
            raise ValueError(f"{caller}: mesh {arr.tolist()} is {arr.ndim}-D but {len(groups)} communicator(s) "
                             f"were given; pass one communicator per mesh dim")
        self = DeviceMesh.__new__(DeviceMesh)
        self._setup(device_type, arr, names, None, None)
        null = [g == MPI.COMM_NULL for g in groups]
        if self._coordinate is None:
            if not all(null):
                raise ValueError(f"{caller}: world rank {self._rank} holds a communicator but is not in mesh "
                                 f"{arr.tolist()}; a rank outside the mesh passes MPI.COMM_NULL")
        else:
            for d, g in enumerate(groups):
                want = arr[tuple(slice(None) if e == d else c for e, c in enumerate(self._coordinate))].tolist()
                got = None if null[d] else _world_ranks(g, caller)
                if got != want:
                    raise ValueError(
                        f"{caller}: communicator {d} holds world ranks {got} (in its rank order) but mesh dim {d} "
                        f"through world rank {self._rank} is {want}; pass the communicator of each mesh dim, "
                        f"in mesh order"
                    )
            rec = _Comms(None, groups[0] if arr.ndim == 1 else None, groups, borrowed=groups)
            self._attach(rec)
            _COMM_CACHE[(arr.tobytes(), arr.shape, ("from_group", rec.serial))] = rec.dims
        self._bind_gpu()
        return self

    @property
    def _root(self) -> "DeviceMesh":
        """The mesh this one was sliced from (itself for a root mesh)."""
        return self if self._root_mesh is None else self._root_mesh

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
        d = self._member_dim(mesh_dim, "get_group")
        self._require_open("get_group")
        return self._dim_comms[d]

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
        self._require_open("get_all_groups")
        return list(self._dim_comms)

    def get_comm(self):
        """The communicator over all ranks of this mesh, in flat (row-major) order.

        **Collective** over the mesh on first use of a sub-mesh that spans several dims.
        """
        self._require_member("get_comm")
        self._require_open("get_comm")
        if self._comm is None:
            self._comm = self._make_comm()
        return self._comm

    def _make_comm(self):
        if self.ndim == 1:
            return self._dim_comms[0]
        rec = self._rec
        whole = self is self._root or self._root_dims == tuple(range(self._root.ndim))
        if whole and rec.base is not None:
            return rec.base
        root = self._root
        key = (root.mesh.tobytes(), root.mesh.shape, "all" if whole else self._root_dims, rec.serial)
        comm = rec.extra.get(key)
        if comm is None:
            ranks = self.mesh.ravel().tolist()
            group = _world().Get_group().Incl(ranks)
            deadline.settle_channel()
            with deadline.in_flight(f"creating the communicator of {self!r} (MPI_Comm_create_group)", members=ranks):  # deadline
                comm = _world().Create_group(group, tag=7)
            group.Free()
            rec.extra[key] = _COMM_CACHE[key] = comm
        return comm

    def _metadata_comm(self):
        """A separate communicator (a dup of the mesh's) for metadata agreement."""
        if self._meta_comm is None:
            self._require_member("_metadata_comm")
            self._require_open("_metadata_comm")
            rec = self._rec
            key = ("meta", self.mesh.tobytes(), self.mesh.shape, self._root_dims, rec.serial)
            comm = rec.extra.get(key)
            if comm is None:
                base = self.get_comm()
                deadline.settle_channel()
                with deadline.in_flight(f"creating the metadata communicator of {self!r} (MPI_Comm_dup)",
                               members=base):  # deadline
                    comm = base.Dup()
                rec.extra[key] = _COMM_CACHE[key] = comm
            self._meta_comm = comm
        return self._meta_comm

    # -- sub-meshes ----------------------------------------------------------------------------
    def __getitem__(self, names) -> "DeviceMesh":
        """The sub-mesh over the named dims (a name, or a tuple or list of names in the mesh's own
        order, as PyTorch requires); called by every rank. Unknown or misordered names raise
        ``KeyError`` as in PyTorch."""
        if isinstance(names, str):
            names = (names,)
        elif isinstance(names, (tuple, list)) and names and all(isinstance(n, str) for n in names):
            names = tuple(names)
        else:
            raise TypeError(
                f"DeviceMesh[...]: index by mesh dim name(s) (a str, or a tuple or list of str), got {names!r}"
            )
        if self.mesh_dim_names is None:
            raise ValueError(
                f"DeviceMesh[{names!r}]: this mesh has no mesh_dim_names; create it with "
                f"mesh_dim_names=... to slice it by name"
            )
        dims = []
        for n in names:
            if n not in self.mesh_dim_names:
                raise _UnknownMeshDim(
                    f"DeviceMesh[{n!r}]: unknown mesh dim name {n!r}; this mesh's dims are {self.mesh_dim_names}"
                )
            dims.append(self.mesh_dim_names.index(n))
        if len(set(dims)) != len(dims):
            raise _UnknownMeshDim(f"DeviceMesh[{names!r}]: a mesh dim name is repeated; name each dim once")
        if dims != sorted(dims):
            order = tuple(self.mesh_dim_names[d] for d in sorted(dims))
            raise _UnknownMeshDim(
                f"DeviceMesh[{names!r}]: mesh dim names must come in the mesh's own order {self.mesh_dim_names} "
                f"(PyTorch's rule: ascending mesh dims); use mesh[{order!r}] and order placements to match"
            )
        if tuple(dims) == tuple(range(self.ndim)):
            return self
        # the sub-mesh this rank belongs to: fix the other dims at this rank's coordinate
        coord = self._coordinate if self._coordinate is not None else (0,) * self.ndim
        index = tuple(slice(None) if d in dims else coord[d] for d in range(self.ndim))
        sub = self.mesh[index]
        root_dims = tuple(self._root_dims[d] for d in dims)
        m = DeviceMesh.__new__(DeviceMesh)
        DeviceMesh.__init__(m, self.device_type, sub, mesh_dim_names=names, _parent=self, _dims=root_dims)
        return m

    # -- default mesh (PyTorch's mesh stack) ------------------------------------------------------
    def __enter__(self) -> "DeviceMesh":
        stack = getattr(_STACK, "meshes", None)
        if stack is None:
            stack = _STACK.meshes = []
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _STACK.meshes.pop()
        return False

    # -- releasing communicators -----------------------------------------------------------------
    def close(self) -> None:
        """Release this mesh: it (and every sub-mesh sliced from it) cannot be used afterwards, and
        when no rank of the mesh holds an open mesh over the same ranks and shape any more, their
        communicators are freed, with what the transports keep for them (control and metadata
        communicators, persistent requests, NCCL communicators, shared-memory windows).

        **Collective** over the ranks of the mesh (one small all-reduce; ranks outside it return at
        once). Meshes over the same ranks in the same shape share communicators: each is a handle,
        and the communicators go with the last one closed. Calling ``close()`` again does nothing.
        A sub-mesh shares its root's communicators: close the root mesh instead.
        """
        if self._parent is not None:
            raise RuntimeError(
                f"DeviceMesh.close: {self!r} is a sub-mesh; it shares the communicators of its root mesh "
                f"{self._root!r}: close the root mesh instead"
            )
        if self._closed:
            return
        self._closed = True
        for m in [self, *self._subs]:
            for attr in ("_groups", "_meta_ring", "_programs", "_funcol_group"):  # caches on the mesh
                m.__dict__.pop(attr, None)
            m._comm = m._meta_comm = None
        rec = self._rec
        if rec is None or rec.freed:  # not in the mesh: nothing of it lives on this rank
            return
        if self._handle[0]:
            self._handle[0] = False
            rec.handles -= 1
        if rec.key is not None:  # shared by equal meshes: free only when no rank holds a handle
            comm = rec.base if rec.base is not None else rec.dims[0]
            h = np.array([rec.handles, -rec.handles], dtype=np.int64)
            out = np.empty_like(h)
            with deadline.in_flight(f"DeviceMesh.close of {self!r} (MPI_Allreduce of open handles)", members=comm):  # deadline
                comm.Allreduce(h, out, op=MPI.MIN)
            if out[0] != 0 or out[1] != 0:  # some rank still holds a handle (or they differ): keep all
                return
            if _RECORDS.get(rec.key) is rec:
                del _RECORDS[rec.key]
        _free(rec)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called on this mesh (or on the root mesh of this sub-mesh)."""
        return self._root._closed

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
        if type(mesh_dim) is int and 0 <= mesh_dim < self.mesh.ndim:  # the common case, checked first
            return mesh_dim
        if isinstance(mesh_dim, str):
            if self.mesh_dim_names is None or mesh_dim not in self.mesh_dim_names:
                raise _UnknownMeshDim(
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

    def _require_open(self, caller):
        if self._root._closed:
            what = "this mesh" if self._root is self else f"its root mesh {self._root!r}"
            raise RuntimeError(
                f"DeviceMesh.{caller}: {self!r} is closed ({what} was closed with close()); its communicators "
                f"may be freed. Create a new mesh (DeviceMesh(...) / init_device_mesh(...)) to communicate"
            )


def _drop_handle(rec: _Comms, handle: list) -> None:
    if handle[0]:
        handle[0] = False
        rec.handles -= 1


_AGREE_COMM: list = []


def release_unused() -> int:
    """Free the communicators of meshes that no rank uses any more: meshes dropped (garbage-collected)
    without :meth:`DeviceMesh.close`, on every rank of theirs. **Collective** over ``MPI.COMM_WORLD``;
    :func:`init_device_mesh` calls it. The ranks all-gather the meshes each has no handle on, and a
    mesh's communicators are freed, in one order, only when every rank of it reports it: the decision
    comes from the gathered lists, never from one rank's garbage collector. Returns how many meshes'
    communicators this rank freed."""
    world = _world()
    if not _AGREE_COMM:
        deadline.settle_channel()
        # the one communicator made outside the deadline: in most programs this is the first collective
        # over the world, so it absorbs the ranks' start-up skew (seconds on a loaded machine), which a
        # short MPILOCAL_TIMEOUT would report as a hang (the failure jobs, MPILOCAL_TIMEOUT=1, under
        # Open MPI 4.1 at 3 ranks); the all-gather below, and every later collective, is watched
        _AGREE_COMM.append(world.Dup())
    comm = _AGREE_COMM[0]
    mine = sorted(k for k, rec in _RECORDS.items() if rec.handles == 0)
    with deadline.in_flight("agreeing on unused meshes (release_unused: MPI_Allgather over MPI.COMM_WORLD)"):  # deadline
        lists = comm.allgather(mine)
    reported: dict = {}
    for r, keys in enumerate(lists):
        for k in keys:
            reported.setdefault(k, set()).add(r)
    freed = 0
    for k in sorted(reported):
        rec = _RECORDS.get(k)
        if rec is None or rec.handles != 0:
            continue
        members = set(np.frombuffer(k[0], dtype=np.int64).tolist())
        if members <= reported[k]:  # every rank of the mesh reports it unused
            del _RECORDS[k]
            _free(rec)
            freed += 1
    return freed


def _free(rec: _Comms) -> None:
    """Free a record's communicators on this rank, in one order on every rank: the ones made later
    (sorted by key), then the per-dim ones from the last dim, then the one over the whole mesh. The
    transports drop their state of each first; communicators the user passed in are not freed."""
    from . import transport

    rec.freed = True
    comms = [rec.extra[k] for k in sorted(rec.extra, key=repr)] + list(reversed(rec.dims))
    if rec.base is not None and all(rec.base is not c for c in rec.dims):
        comms.append(rec.base)
    for key in rec.cache_keys():
        _COMM_CACHE.pop(key, None)
    for key in [k for k, v in _COMM_CACHE.items() if v is rec.dims]:  # from_group mirror entry
        del _COMM_CACHE[key]
    rec.extra = {}
    for comm in comms:
        transport.release(comm)
        if all(comm is not b for b in rec.borrowed) and comm != MPI.COMM_NULL:
            comm.Free()


def _world_ranks(comm, caller) -> list:
    """The world ranks of ``comm``'s members, in its rank order."""
    if comm == MPI.COMM_NULL:
        return None
    if comm.Is_inter():
        raise TypeError(f"{caller}: {comm!r} is an inter-communicator; pass intra-communicators")
    group, world = comm.Get_group(), _world().Get_group()
    try:
        return [int(r) for r in group.Translate_ranks(list(range(comm.Get_size())), world)]
    finally:
        group.Free()
        world.Free()


def _check_mesh_args(device_type, mesh, mesh_dim_names, caller):
    if device_type not in _DEVICE_TYPES:
        raise ValueError(f"{caller}: device_type {device_type!r} is not supported; use 'cpu' or 'cuda'")
    arr = np.asarray(mesh)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{caller}: mesh must be an integer array of world ranks, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{caller}: mesh must have at least one dimension, got a scalar")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    world = _world().Get_size()
    flat = arr.ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= world):
        raise ValueError(
            f"{caller}: mesh holds ranks {flat.tolist()} but MPI.COMM_WORLD has ranks 0..{world - 1}; "
            f"every entry must be a world rank"
        )
    if len(set(flat.tolist())) != flat.size:
        raise ValueError(f"{caller}: mesh lists a rank twice: {flat.tolist()}; each rank may appear once")
    names = _check_names(mesh_dim_names, arr.ndim, caller)
    return arr, names


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


def _dim_comms(arr: np.ndarray, coordinate) -> _Comms:
    """The record of a mesh over ``arr`` (this rank at ``coordinate``): one communicator per mesh dim
    (the ranks that share this rank's coordinate on the other dims), made on first use."""
    key = (arr.tobytes(), arr.shape)
    rec = _RECORDS.get(key)
    if rec is not None:
        return rec
    ranks = arr.ravel().tolist()
    world = _world()
    deadline.settle_channel()
    with deadline.in_flight(f"creating the communicators of a mesh over world ranks {ranks} (MPI_Comm_create_group, "
                   f"MPI_Comm_split)", members=ranks):  # deadline
        if arr.size == world.Get_size() and ranks == list(range(world.Get_size())):
            base = world.Dup()
        else:
            group = world.Get_group().Incl(ranks)
            base = world.Create_group(group, tag=5)
            group.Free()
        comms = []
        for d in range(arr.ndim if arr.ndim > 1 else 0):  # 1-D: the dim's communicator is the base
            color = 0
            for e in range(arr.ndim):
                if e != d:
                    color = color * arr.shape[e] + coordinate[e]
            comms.append(base.Split(color, coordinate[d]))
        if arr.ndim == 1:
            comms.append(base)
    rec = _RECORDS[key] = _Comms(key, base, comms)
    _COMM_CACHE[key] = comms
    _COMM_CACHE[key + ("all",)] = base
    return rec


def _describe(comm):
    """What ``comm`` is to the meshes (a mesh dim, all of a mesh, a metadata communicator), for the
    deadline reports (:func:`mpilocal.deadline.describe_group`); None for a communicator of no mesh."""
    for key, val in list(_COMM_CACHE.items()):
        if isinstance(val, list):
            for d, c in enumerate(val):
                if c is comm or c == comm:
                    arr = np.frombuffer(key[0], dtype=np.int64).reshape(key[1])
                    return f"mesh dim {d} of mesh {arr.tolist()}"
        elif val is comm or val == comm:
            if key[0] == "meta":
                arr = np.frombuffer(key[1], dtype=np.int64).reshape(key[2])
                return f"metadata communicator of mesh {arr.tolist()}"
            arr = np.frombuffer(key[0], dtype=np.int64).reshape(key[1])
            return f"all of mesh {arr.tolist()}"
    return None


deadline.register_describer(_describe)


def init_device_mesh(device_type: str, mesh_shape, *, mesh_dim_names=None) -> DeviceMesh:
    """A mesh of ``mesh_shape`` over all of ``MPI.COMM_WORLD`` in rank order. **Collective** (world);
    it first frees the communicators of meshes every rank dropped (:func:`release_unused`)."""
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
    release_unused()  # a safe point: collective over the world (as this call is)
    return DeviceMesh(device_type, np.arange(world).reshape(mesh_shape), mesh_dim_names=mesh_dim_names)
