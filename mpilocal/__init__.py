"""mpilocal: PyTorch-DTensor-style distributed arrays and ``local_map`` over MPI, without PyTorch.

Each MPI rank holds one shard (a NumPy array on CPU or a CuPy array on its GPU); placements on an
N-D device mesh say how the shards form the global array. See DESIGN.md and README.md.
"""

from ._launch import check as _check_launcher

_check_launcher()  # before mpi4py.MPI starts: a launcher/library mismatch gets a clear error, not an abort

from . import failure as _failure  # noqa: E402

_failure.install()  # first, so its exit handler runs last: abort on uncaught errors, deadlines (see failure.py)

from .debug import CommDebugMode  # noqa: E402
from .dtensor import DTensor, distribute_tensor, local_shape_and_offset
from .local_map import local_map
from . import autograd  # noqa: E402  (mpilocal.autograd: Tracked, Function; DTensor gradients)
from .mesh import DeviceMesh, init_device_mesh
from .placement import Partial, Placement, Replicate, Shard
from .neighbors import stencil  # noqa: E402  (local_map with halos)
from .ragged import ragged_from_local  # noqa: E402  (sizes agreed from the local arrays)

from . import ops  # noqa: E402  (last: registers the operators on DTensors; a layer above dtensor)
from .ops.random import empty, full, manual_seed, ones, rand, randn, zeros  # noqa: E402
from . import optim  # noqa: E402  (SGD, Adam over DTensors)

__version__ = "0.1.0"

__all__ = [
    "DeviceMesh",
    "init_device_mesh",
    "DTensor",
    "distribute_tensor",
    "local_shape_and_offset",
    "Shard",
    "Replicate",
    "Partial",
    "Placement",
    "local_map",
    "CommDebugMode",
    "stencil",
    "ragged_from_local",
    "zeros",
    "ones",
    "full",
    "empty",
    "rand",
    "randn",
    "manual_seed",
]
