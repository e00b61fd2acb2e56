"""Run by tests/test_runner_output.py under pytest at 2-3 ranks (not collected by the suite: no test_
prefix): tests whose outcomes differ between ranks, for the one-summary-per-job report of conftest."""
import pytest
from mpi4py import MPI

RANK = MPI.COMM_WORLD.Get_rank()
LAST = MPI.COMM_WORLD.Get_size() - 1


def test_passes_everywhere():
    pass


def test_fails_on_the_last_rank_only():
    assert RANK != LAST, f"rank {RANK} fails on purpose"


def test_skipped_everywhere():
    pytest.skip("skipped on purpose")


@pytest.mark.skipif(RANK != 0, reason="runs on rank 0 only")
def test_rank_zero_only():
    pass


@pytest.mark.skipif(RANK != 1, reason="runs on rank 1 only")
def test_rank_one_only():
    pass
