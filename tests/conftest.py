"""Shared test plumbing. Run under ``mpiexec -n N python -m pytest --with-mpi tests/``.

Assertions on rank-dependent values go through :func:`assert_all`, which agrees on the verdict
across ranks, so a failure is reported on every rank and no rank is left waiting in a collective.
"""

import numpy as np
import pytest
from mpi4py import MPI


def world_size() -> int:
    return MPI.COMM_WORLD.Get_size()


def assert_all(ok, msg: str = "", comm=None) -> None:
    """Collective assertion: fails on every rank if it fails on any; names the failing ranks."""
    comm = MPI.COMM_WORLD if comm is None else comm
    flags = comm.allgather(bool(ok))
    if not all(flags):
        bad = [r for r, f in enumerate(flags) if not f]
        raise AssertionError(f"failed on ranks {bad}: {msg}")


def assert_close_all(actual, expected, comm=None, **kw) -> None:
    """Collective ``np.testing.assert_allclose`` (CuPy arrays are moved to the host first)."""
    try:
        a = actual.get() if hasattr(actual, "get") and not isinstance(actual, np.ndarray) else actual
        e = expected.get() if hasattr(expected, "get") and not isinstance(expected, np.ndarray) else expected
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), **kw)
        err = ""
    except AssertionError as exc:
        err = str(exc)
    assert_all(not err, err, comm)


@pytest.fixture
def world():
    return MPI.COMM_WORLD
