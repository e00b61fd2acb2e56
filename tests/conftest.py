"""Shared test plumbing. Run under ``mpiexec -n N python -m pytest --with-mpi tests/``.

Assertions on rank-dependent values go through :func:`assert_all`, which agrees on the verdict
across ranks, so a failure is reported on every rank and no rank is left waiting in a collective.
"""

import re

import numpy as np
import pytest
from mpi4py import MPI


WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
W = WORLD.Get_size()  # the world size: the number of ranks this test run has

rank0_only = pytest.mark.skipif(RANK != 0, reason="needs no MPI and gives the same answer on every rank: world rank 0 checks")


def assert_all(ok, msg: str = "", comm=None) -> None:
    """Collective assertion: fails on every rank if it fails on any; names the failing ranks."""
    comm = MPI.COMM_WORLD if comm is None else comm
    flags = comm.allgather(bool(ok))
    if not all(flags):
        bad = [r for r, f in enumerate(flags) if not f]
        raise AssertionError(f"failed on ranks {bad}: {msg}")


def raises_all(exc, match, fn, *args, same_text=False, contains=(), comm=None, **kwargs):
    """Collective ``pytest.raises``: ``fn(*args, **kwargs)`` must raise ``exc`` on every rank, with a
    message that ``re.search(match, message, re.S)`` finds (``match=None``: any message) and that
    holds every string in ``contains``; with ``same_text``, the same message on every rank. The
    verdict is agreed over ``comm`` (the world), so a rank that does not raise fails the test on
    every rank, naming the ranks, instead of leaving the others waiting. Returns this rank's exception.
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    want = getattr(exc, "__name__", None) or " or ".join(e.__name__ for e in exc)
    err, problem = None, ""
    try:
        fn(*args, **kwargs)
        problem = f"no exception, expected {want}"
    except exc as e:
        err, msg = e, str(e)
        missing = [s for s in contains if s not in msg]
        if match is not None and not re.search(match, msg, re.S):
            problem = f"{type(e).__name__}({msg!r}) does not match {match!r}"
        elif missing:
            problem = f"{type(e).__name__}({msg!r}) does not contain {missing}"
    except Exception as e:  # noqa: BLE001 - the wrong kind of error is reported, not raised
        problem = f"raised {type(e).__name__}({e!s}), expected {want}"
    assert_all(not problem, f"rank {comm.Get_rank()}: {problem}", comm)
    if same_text:
        texts = comm.allgather(str(err))
        assert_all(len(set(texts)) == 1, f"the message differs between ranks: {texts}", comm)
    return err


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


# ------------------------------------------------------------------------------------------------
# failure handling (issue 5): a failing or hung rank ends the job, promptly and with its traceback.
# - Every collective mpilocal issues has a deadline (mpilocal.deadline); in tests it defaults to 90 s,
#   below the per-test pytest-timeout (120 s), unless MPILOCAL_TIMEOUT is set.
# - A test that fails on some rank prints that rank's failure to stderr at once (prefixed with the
#   rank), so it is visible even when the job is then aborted.
# - After every test the ranks meet once more under the deadline: a rank that left a collective
#   (raised mid-collective) while the others still wait in it makes the job abort with a report
#   naming the operation instead of hanging into the next test.
# ------------------------------------------------------------------------------------------------
import os as _os
import sys as _sys
import time as _time

import mpilocal.deadline as _deadline

if not _os.environ.get("MPILOCAL_TIMEOUT"):
    _deadline.set_timeout(90)


class debug_mode:
    """``with debug_mode():`` MPILOCAL_DEBUG=1 (collective fingerprints and checks) for the block;
    ``debug_mode(False)``: off. Switch it on every rank."""

    def __init__(self, on=True):
        self.on = on

    def __enter__(self):
        self.prev = _deadline.debug_enabled()
        _deadline.set_debug(self.on)

    def __exit__(self, *exc):
        _deadline.set_debug(self.prev)
        return False

_SYNC_COMM = []


def _end_of_test_sync(nodeid):
    if MPI.COMM_WORLD.Get_size() == 1 or _deadline.timeout() is None:
        return
    from mpilocal.transport import group_for

    if not _SYNC_COMM:
        _SYNC_COMM.append(group_for(MPI.COMM_WORLD.Dup()))
    g = _SYNC_COMM[0]
    with _deadline.begin(f"end-of-test sync after {nodeid}", g):
        # polled with sleeps, not a blocking Barrier: MPICH busy-waits in a Barrier, which would take
        # the cores from the jobs one rank launches while the others wait here (test_deadline.py)
        req = g.comm.Ibarrier()
        pause = 0.0
        while not req.Test():
            _time.sleep(pause)
            pause = min(2 * pause + 0.0002, 0.02)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    _end_of_test_sync(item.nodeid)


def pytest_configure(config):
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:  # an abort report must reach the terminal, not pytest's capture buffer
        _deadline.register_before_report(lambda: capman.suspend_global_capture(in_=False))


def pytest_runtest_logreport(report):
    if report.failed and MPI.COMM_WORLD.Get_size() > 1:
        text = f"{report.when} of {report.nodeid} FAILED on this rank:\n{report.longreprtext}"
        _sys.stderr.write(_deadline._prefix(text[-4000:]))
        _sys.stderr.flush()


# ------------------------------------------------------------------------------------------------
# device switch: MPILOCAL_TEST_DEVICE=cpu (default) runs the suite on NumPy shards; =cuda on CuPy
# shards, each rank bound to one GPU of its node. Without CuPy or a GPU, cuda runs skip every test
# with the reason. Tests build inputs with NumPy and hand them through ``to_device``; results come
# back through ``to_host``; meshes use ``DEVICE``.
# ------------------------------------------------------------------------------------------------
import os as _os

DEVICE = _os.environ.get("MPILOCAL_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"MPILOCAL_TEST_DEVICE={DEVICE!r}: use cpu or cuda")
GPU_SKIP_REASON = None
cupy = None
if DEVICE == "cuda":
    from mpilocal import gpu as _gpu

    cupy = _gpu.cupy_or_none()
    if cupy is None:
        GPU_SKIP_REASON = "MPILOCAL_TEST_DEVICE=cuda but CuPy or a working GPU is missing on this machine"
    else:
        _gpu.bind_device()  # collective over the world, once, before any test
xp = cupy if (DEVICE == "cuda" and cupy is not None) else np


def to_device(a):
    """A NumPy array as an array of the test device's kind (CuPy under MPILOCAL_TEST_DEVICE=cuda)."""
    if DEVICE == "cuda" and cupy is not None and isinstance(a, np.ndarray):
        if a.ndim == 0:  # cupy.asarray fills a 0-d array by value (memset when == 0: -0.0 would become +0.0)
            return cupy.asarray(a.reshape(1)).reshape(())
        return cupy.asarray(a)
    return a


def to_host(a):
    """Any array as a NumPy array (CuPy arrays are copied to the host)."""
    if isinstance(a, np.ndarray) or a is None:
        return a
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return a


def on_device(a) -> bool:
    """Whether ``a`` is an array of the test device's kind."""
    if DEVICE == "cuda":
        return cupy is not None and isinstance(a, cupy.ndarray)
    return isinstance(a, np.ndarray)


class DeviceFunctional:
    """``mpilocal.functional`` seen from the tests under MPILOCAL_TEST_DEVICE=cuda: NumPy array
    arguments go to the GPU, results must come back as CuPy arrays (else TypeError) and are returned
    as NumPy arrays, so the NumPy oracles of the tests apply unchanged."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        f = getattr(self._mod, name)
        if not callable(f) or name.startswith("_") or isinstance(f, type):
            return f

        def call(*args, **kwargs):
            args = [to_device(a) for a in args]
            kwargs = {k: to_device(v) for k, v in kwargs.items()}
            out = f(*args, **kwargs)
            if out is not None and not on_device(out):
                raise TypeError(f"{name} returned {type(out).__name__} for CuPy input, not a CuPy array")
            return to_host(out)

        return call


@pytest.fixture
def device_type():
    return DEVICE


@pytest.fixture(name="xp")
def _xp_fixture():
    return xp


def pytest_collection_modifyitems(config, items):
    if GPU_SKIP_REASON:
        skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
        for item in items:
            item.add_marker(skip)


class Check:
    """Collects this rank's failed checks in a test; :meth:`done` agrees on the verdict (one
    collective per test instead of one per assertion)."""

    def __init__(self):
        self.problems = []

    def __call__(self, ok, msg=""):
        if not ok:
            self.problems.append(f"rank {MPI.COMM_WORLD.Get_rank()}: {msg}")

    def close(self, actual, expected, what="", **kw):
        try:
            np.testing.assert_allclose(np.asarray(to_host(actual)), np.asarray(to_host(expected)), **kw)
        except AssertionError as exc:
            self.problems.append(f"rank {MPI.COMM_WORLD.Get_rank()}: {what}: {exc}")

    def done(self):
        assert_all(not self.problems, "\n".join(self.problems[:6]))


def make_mesh(kind):
    """A test mesh of the given kind on DEVICE, or None when it does not fit the world size:
    "1d", "1xN", "Nx1", and at 4 ranks "2x2", "2x2_array" (DeviceMesh of an array) and
    "2x2_permuted" (ranks in a permuted order)."""
    from mpilocal import DeviceMesh, init_device_mesh

    w = MPI.COMM_WORLD.Get_size()
    if kind == "1d":
        return init_device_mesh(DEVICE, (w,))
    if kind == "1xN":
        return init_device_mesh(DEVICE, (1, w), mesh_dim_names=("a", "b"))
    if kind == "Nx1":
        return init_device_mesh(DEVICE, (w, 1), mesh_dim_names=("a", "b"))
    if kind == "2x2":
        return init_device_mesh(DEVICE, (2, 2), mesh_dim_names=("a", "b")) if w == 4 else None
    if kind == "2x2_array":
        return DeviceMesh(DEVICE, np.arange(4).reshape(2, 2)) if w == 4 else None
    if kind == "2x2_permuted":
        return DeviceMesh(DEVICE, np.array([[3, 1], [2, 0]])) if w == 4 else None
    raise AssertionError(kind)


def mesh_or_skip(kind):
    mesh = make_mesh(kind)
    if mesh is None:
        pytest.skip(f"mesh {kind} does not fit {MPI.COMM_WORLD.Get_size()} ranks")
    return mesh


# ------------------------------------------------------------------------------------------------
# test output (issue 9): one quiet, correct report per job, however many ranks.
# - Rank 0 alone prints the progress, the one-line MPI header and the summary. The other ranks print
#   only what rank 0 cannot see: their failures (at once, to stderr, by pytest_runtest_logreport
#   above), collection errors and pytest internal errors, prefixed with the rank.
# - At the end every rank sends rank 0 its outcome per test; rank 0's summary counts each test once,
#   as its worst outcome on any rank: a test that failed on rank 2 only is reported failed, with rank
#   2's traceback, and the exit status is non-zero; a test that ran on rank 1 only (the other ranks
#   skip it) counts as passed. An "outcomes by rank" section names the ranks of failures.
# - Skip reasons on request: pytest's -rs (rank 0's reasons).
# - pytest-mpi's per-rank "MPI Information" section is replaced by the header line.
# - If the job is aborted (deadline, failing rank), each rank names the test it was running.
# ------------------------------------------------------------------------------------------------
_BAD_CATEGORIES = ("failed", "error")
_WORST_FIRST = ("error", "failed", "xpassed", "passed", "xfailed", "skipped")


def _worst(categories):
    return min(categories, key=lambda c: _WORST_FIRST.index(c) if c in _WORST_FIRST else len(_WORST_FIRST))


class _RankReport:
    def __init__(self, config):
        import sys

        self.config = config
        self.rank = MPI.COMM_WORLD.Get_rank()
        self.size = MPI.COMM_WORLD.Get_size()
        self.reporter = config.pluginmanager.getplugin("terminalreporter")
        self.outcomes = {}  # nodeid -> [(category, serialized report of a failure, or None)]
        self.current = None
        self.comm = MPI.COMM_WORLD.Dup() if self.size > 1 else None
        self.stderr = sys.stderr
        for plugin in config.pluginmanager.get_plugins():  # pytest-mpi's per-rank MPI Information
            if type(plugin).__name__ == "MPIPlugin" and hasattr(plugin, "_is_testing_mpi"):
                plugin._is_testing_mpi = False
        if self.reporter is not None and self.rank != 0:
            from _pytest.config import create_terminal_writer

            self.reporter._tw = create_terminal_writer(config, open(_os.devnull, "w"))
        _deadline.register_before_report(self._name_current_test)

    def _name_current_test(self):
        if self.current:
            self.stderr.write(_deadline._prefix(f"pytest was running {self.current}", self.rank))
            self.stderr.flush()

    def _to_stderr(self, text):
        self.stderr.write(_deadline._prefix(text, self.rank))
        self.stderr.flush()

    def header(self):
        if self.reporter is None or self.rank != 0:
            return
        lib = MPI.Get_library_version().strip().splitlines()[0].split(",")[0].replace("Version:", "")
        lib = " ".join(lib.split())  # "MPICH 5.0.2", "Open MPI v4.1.4"
        ver = ".".join(map(str, MPI.Get_version()))
        self.reporter.write_line(f"mpilocal tests: {self.size} rank(s), {lib} (MPI {ver}), {DEVICE}; "
                                 "rank 0 reports for all ranks")

    # -- recording ---------------------------------------------------------------------------------
    def _record(self, report, category):
        data = None
        if report.failed and self.rank != 0:
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.outcomes.setdefault(report.nodeid, []).append((category, data))

    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid

    def pytest_runtest_logreport(self, report):
        category = self.config.hook.pytest_report_teststatus(report=report, config=self.config)[0]
        if category or report.failed:
            self._record(report, category or ("failed" if report.when == "call" else "error"))

    def pytest_collectreport(self, report):
        if report.failed:
            self._record(report, "error")
            if self.rank != 0:
                self._to_stderr(f"collecting {report.nodeid or 'tests'} FAILED on this rank:\n"
                                f"{report.longreprtext[-4000:]}")

    def pytest_internalerror(self, excrepr, excinfo):
        if self.rank != 0:
            self._to_stderr("INTERNALERROR> " + str(excrepr).replace("\n", "\nINTERNALERROR> "))

    # -- merging at the end --------------------------------------------------------------------------
    def pytest_sessionfinish(self, session, exitstatus):
        self.current = None
        if self.comm is None:
            return
        from mpilocal.transport import group_for

        sent = {k: v for k, v in self.outcomes.items() if any(c in _BAD_CATEGORIES for c, _ in v)}
        worst = {k: _worst([c for c, _ in v]) for k, v in self.outcomes.items()}
        with _deadline.begin("end-of-session report gather", group_for(self.comm)):
            everything = self.comm.gather((sent, worst) if self.rank else None, root=0)
        if self.rank != 0 or self.reporter is None:
            return
        mine = worst  # rank 0's
        self.failed_on = {k: [0] for k, c in mine.items() if c in _BAD_CATEGORIES}  # nodeid -> ranks
        passed_elsewhere = {}  # nodeid -> ranks where it passed while rank 0 skipped it or did not run it
        self.differs = {}  # nodeid -> {outcome: ranks}, beyond failures and pass/skip mixes
        for r, (_, worst) in enumerate(everything[1:], start=1):
            for nodeid in set(worst) | set(mine):
                a, b = mine.get(nodeid, "not run"), worst.get(nodeid, "not run")
                if b in _BAD_CATEGORIES:
                    self.failed_on.setdefault(nodeid, []).append(r)
                elif b == "passed" and a in ("skipped", "not run"):
                    passed_elsewhere.setdefault(nodeid, []).append(r)
                if a != b and {a, b} != {"passed", "skipped"}:  # one-rank tests skip on the other ranks
                    self.differs.setdefault(nodeid, {a: [0]}).setdefault(b, []).append(r)
        # rank 0's summary: each test once, as its worst outcome on any rank
        stats = self.reporter.stats

        def take_out(nodeid):
            found = None
            for key in ("passed", "skipped", "xfailed", "xpassed"):
                if key in stats:
                    found = found or next((x for x in stats[key] if getattr(x, "nodeid", None) == nodeid), None)
                    stats[key] = [x for x in stats[key] if getattr(x, "nodeid", None) != nodeid]
            return found

        added = False
        for nodeid, ranks in self.failed_on.items():
            if ranks[0] == 0:
                continue
            take_out(nodeid)
            for category, data in everything[ranks[0]][0][nodeid]:  # the lowest failing rank's report
                if data is not None:
                    rep = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
                    rep.sections.append(("mpilocal", f"this report comes from rank {ranks[0]}; rank 0 did not "
                                                     f"fail {nodeid}"))
                    stats.setdefault(category, []).append(rep)
                    added = True
        for nodeid, ranks in passed_elsewhere.items():
            if nodeid not in self.failed_on:
                old = take_out(nodeid)
                where = f"passed on rank(s) {', '.join(map(str, ranks))}, {mine.get(nodeid, 'not run')} on rank 0"
                stats.setdefault("passed", []).append(pytest.TestReport(
                    nodeid, getattr(old, "location", (nodeid, None, nodeid)), {}, "passed", None, "call",
                    sections=[("mpilocal", where)]))
        if hasattr(self.reporter, "_set_main_color"):
            self.reporter._set_main_color()
        if added:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        failed_on, differs = getattr(self, "failed_on", None), getattr(self, "differs", None)
        if self.rank != 0 or not (failed_on or differs):
            return
        terminalreporter.section("outcomes by rank", sep="-", yellow=True)
        for nodeid, ranks in sorted(failed_on.items()):
            terminalreporter.write_line(f"failed: {nodeid}: rank(s) {', '.join(map(str, sorted(ranks)))}")
        for nodeid, d in sorted(differs.items()):
            if nodeid in failed_on:  # listed above
                continue
            how = "; ".join(f"{c} on rank(s) {', '.join(map(str, sorted(rs)))}" for c, rs in d.items())
            terminalreporter.write_line(f"differs: {nodeid}: {how}")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    plugin = _RankReport(session.config)
    session.config.pluginmanager.register(plugin, "mpilocal-rank-report")
    plugin.header()


@pytest.fixture
def intercepted():
    """The deadline's reports go to a list instead of aborting the job (tests of the watchdog on the
    suite's own ranks); the deadline and debug mode are restored after."""
    reports = []
    old_timeout, old_debug = _deadline.timeout(), _deadline.debug_enabled()
    _deadline._INTERCEPT = reports
    try:
        yield reports
    finally:
        _deadline._INTERCEPT = None
        _deadline.set_timeout(old_timeout)
        _deadline.set_debug(old_debug)
