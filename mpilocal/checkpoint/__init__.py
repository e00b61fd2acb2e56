"""Distributed checkpoints with ``torch.distributed.checkpoint``'s names: save on M ranks, load on N
with any mesh, placements and device kind, atomically; NumPy or CuPy shards.

``save(state_dict, checkpoint_id=PATH)``, ``async_save(...)`` and ``load(state_dict,
checkpoint_id=PATH)`` are collective (MPI). ``read_array(PATH, key)`` and ``python -m
mpilocal.checkpoint ls PATH`` read a checkpoint in one process; their module (``_format``) imports
no MPI. Format and commit protocol: ``docs/checkpoint.md``.
"""

from ._format import FORMAT, VERSION, CheckpointError, read_array, read_manifest

__all__ = ["save", "async_save", "load", "read_array", "read_manifest", "CheckpointError", "AsyncSaveFuture",
           "FORMAT", "VERSION"]


def __getattr__(name):  # the collective half (and mpi4py) is imported on first use only
    if name in ("save", "async_save", "load", "AsyncSaveFuture"):
        from . import _dist

        return getattr(_dist, name)
    raise AttributeError(f"module 'mpilocal.checkpoint' has no attribute {name!r}")
