"""The test runner's report (issue 9): one quiet summary per job, counting each test once as its worst
outcome on any rank; a failure on a non-zero rank is visible; skip reasons with -rs; scripts/dev.sh
parses that summary and runs only the files named after ``--``.

These tests start their own ``mpiexec -n 2``/``-n 3`` jobs of ``tests/runner_cases/outcomes.py``, so they
run once, in the 1-rank pass (a singleton: an Open MPI ``mpiexec`` cannot be nested in another).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mpi4py import MPI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASE = HERE / "runner_cases" / "outcomes.py"

pytestmark = pytest.mark.skipif(
    MPI.COMM_WORLD.Get_size() != 1, reason="launches its own mpiexec jobs; runs in the 1-rank pass only"
)

SUMMARY = re.compile(r"^=*\s*\d+ (passed|failed|skipped|deselected|error)\b.* in [0-9.]+s", re.M)


def _env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "HYDI_", "OMPI_COMM_WORLD", "MPILOCAL_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _mpiexec():
    exe = Path(sys.executable).with_name("mpiexec")
    return str(exe) if exe.exists() else (shutil.which("mpiexec") or "mpiexec")


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                       env=_env(), cwd=str(ROOT), timeout=240)
    return p.returncode, p.stdout.decode(errors="replace")


def dev_sh_test(*args):
    """``scripts/dev.sh test ARGS`` in this environment (no venv, no installs), launcher: this MPI's."""
    return run(["env", "MPILOCAL_NO_VENV=1", f"MPILOCAL_PYTHON={sys.executable}", f"MPILOCAL_MPIEXEC={_mpiexec()}",
                "bash", str(ROOT / "scripts" / "dev.sh"), "test", *args])


def test_one_summary_counting_each_test_once_and_the_other_ranks_failure_shown():
    rc, out = dev_sh_test("3", "--", str(CASE.relative_to(ROOT)), "-rs")
    assert rc != 0, out
    summaries = [m.group(0) for m in SUMMARY.finditer(out)]
    # rank 0 alone: 1 failed (on the last rank only), 3 passed (one on rank 0 only, one on rank 1 only),
    # 1 skipped
    assert len(summaries) == 1 and re.search(r"\b1 failed, 3 passed, 1 skipped in\b", summaries[0]), out
    assert "AssertionError: rank 2 fails on purpose" in out, out                # the other rank's traceback
    assert re.search(r"failed: \S*test_fails_on_the_last_rank_only: rank\(s\) 2\n", out), out
    assert "skipped on purpose" in out, out                                     # -rs: skip reasons
    assert "MPI Information" not in out, out                                    # no per-rank banner
    assert len(re.findall(r"\[\s*\d+%\]", out)) == 1, out                       # one progress line
    # dev.sh reads that one line (it added up different ranks' counts before)
    assert re.search(r"^3 rank\(s\): FAILED \(exit \d+\) +1 failed, 3 passed, 1 skipped +\[", out, re.M), out


def test_dev_sh_runs_only_the_named_file_and_a_passing_job_is_quiet():
    rc, out = dev_sh_test("2", "--", str(CASE.relative_to(ROOT)), "-k", "not fails")
    assert rc == 0, out
    assert re.search(r"^2 rank\(s\): ok +3 passed, 1 skipped, 1 deselected +\[", out, re.M), out
    assert "total over 1 rank count(s): 3 passed, 0 failed, 1 skipped" in out, out
    job = out[out.index("[dev.sh] ==="):out.index("================ mpilocal test summary")].strip()
    assert len(job.splitlines()) <= 4, out                        # dev.sh's command, header, progress, summary
