"""Run by test_failure.py under pytest (not collected by the suite: no test_ prefix): rank 1 fails
its test in the middle of a collective; the job must end non-zero within the bound."""
import numpy as np
import pytest
from mpi4py import MPI

import mpilocal
import mpilocal.functional as funcol


@pytest.mark.mpi
def test_rank_one_fails_mid_collective():
    mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
    funcol.all_reduce(np.ones(4), "sum", mesh)
    if MPI.COMM_WORLD.Get_rank() == 1:
        raise RuntimeError("rank one fails on purpose")
    funcol.all_reduce(np.ones(4), "sum", mesh)


@pytest.mark.mpi
def test_next():
    mesh = mpilocal.init_device_mesh("cpu", (MPI.COMM_WORLD.Get_size(),))
    funcol.all_gather_tensor(np.ones(4), 0, mesh)
