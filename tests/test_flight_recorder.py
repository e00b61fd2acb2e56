"""The flight recorder (issue 11; docs/failures.md, "Flight recorder"): each rank's last N collectives,
printed and compared where the ranks first differ on a deadline, a failed check or an abort.

In-process, on the suite's own ranks (1-4): the ring holds the calls made here, with their fields
(compared with the arrays passed), wraps around, is off at size 0, keeps no array alive, records call
sites on request; after a failed check (a collective mismatch under debug mode, an agreed argument
error) every rank's error carries the ranks' compared rings with the first difference marked.
Jobs (world rank 0 runs them; ``mpiexec`` subprocesses as in tests/test_failure.py): a rank that
skips a collective under a short deadline (every rank prints its ring; the rank files and ``python -m
mpilocal flight DIR`` name the rank that never issued it), and an uncaught mismatch (every rank prints
the first difference).
"""

import gc
import inspect
import json
import re
import subprocess
import sys
import weakref

import numpy as np
import pytest

import mpilocal.functional as funcol
from conftest import DEVICE, RANK, W, assert_all, raises_all, rank0_only, to_device
from mpilocal import DTensor, Partial, Replicate, Shard, agreement, deadline, flight, init_device_mesh
from mpilocal.agreement import CollectiveMismatchError
from test_failure import ROOT, _clean_env, run_job

LAST = W - 1
# the tests that start processes (a plain `python -c` singleton, mpiexec jobs) run where the suite runs on
# CPU: the GPU host's Open MPI cannot start a nested job or a singleton's orted (no rsh agent; the GPU runs
# ignore tests/test_failure.py for the same reason). The recorder itself is the same on every device.
spawns = pytest.mark.skipif(DEVICE == "cuda", reason="starts nested MPI processes: run on CPU (see tests/test_failure.py)")


@pytest.fixture(scope="module")
def mesh():
    return init_device_mesh("cpu", (W,))


@pytest.fixture
def ring():
    """A fresh ring of 64 (no call sites) for the test; the settings of the run again after it."""
    size, directory, site = deadline.flight_settings()
    deadline.set_flight_recorder(64, directory="", call_site=False)
    yield
    deadline.set_flight_recorder(size, directory=directory or "", call_site=site)


def _dim_key():
    """The name the recorder gives the 1-D mesh's communicator: its world ranks (and mesh)."""
    return f"world ranks {list(range(W))}"


# ------------------------------------------------------------------------------------------------
# the ring
# ------------------------------------------------------------------------------------------------
def test_ring_holds_the_calls_with_their_fields(ring):
    """The last records are the collectives just made: operation, dtype, shape, bytes, one per-group
    sequence number after another, the group's world ranks, times in order. On the test device
    (MPILOCAL_TEST_DEVICE=cuda: CuPy arrays, the GPU transports)."""
    mesh = init_device_mesh(DEVICE, (W,))
    calls = [  # (what we call, the c10d name of its collective, the array sent)
        (lambda a: funcol.all_reduce(a, "sum", mesh), "all_reduce", np.arange(12.0).reshape(3, 4)),
        (lambda a: funcol.all_gather_tensor(a, 0, mesh), "all_gather_into_tensor", np.ones((2, 5), np.int32)),
        (lambda a: funcol.reduce_scatter_tensor(a, "sum", 0, mesh), "reduce_scatter_tensor",
         np.ones((2 * W, 3), np.float32)),
        (lambda a: funcol.all_reduce(a, "sum", mesh), "all_reduce", np.array([1, -2, 3], np.int32)),
    ]
    n0 = deadline.flight_dump("test")["issued_total"]
    for fn, _, a in calls:
        fn(to_device(a))
    dump = deadline.flight_dump("test")
    recs = dump["records"]
    got = recs[-len(calls):]
    problems = []
    if dump["issued_total"] < n0 + len(calls):
        problems.append(f"issued_total {dump['issued_total']} after {n0} + {len(calls)} calls")
    for (_, name, a), r in zip(calls, got):
        want = (name, str(a.dtype), list(a.shape), a.nbytes)
        have = (r["op"], r["dtype"], r["shape"], r["nbytes"])
        if want != have:
            problems.append(f"record {have} for the call {want}")
        if _dim_key() not in r["group"]:
            problems.append(f"group {r['group']!r} does not name world ranks {list(range(W))}")
        if name in ("all_reduce", "reduce_scatter_tensor") and "op=sum" not in r.get("detail", ""):
            problems.append(f"record {r} does not name its reduce op")
    seqs = [r["seq"] for r in got]
    if seqs != list(range(seqs[0], seqs[0] + len(calls))):
        problems.append(f"sequence numbers {seqs} are not consecutive")
    key = got[-1]["group"]
    info = dump["groups"].get(key, {})
    if info.get("issued") != seqs[-1] or info.get("members") != list(range(W)):
        problems.append(f"group info {info}, expected {seqs[-1]} issued by world ranks {list(range(W))}")
    times = [r["time"] for r in got]
    sites = ["site" in r for r in got]  # call sites only on request, or in debug mode
    if times != sorted(times) or any(r["age_s"] < 0 for r in got) or sites != [deadline.DEBUG] * len(got):
        problems.append(f"times {times}, ages {[r['age_s'] for r in got]}, sites {[r.get('site') for r in got]}")
    assert_all(not problems, "; ".join(problems))
    if W > 1:  # a redistribute's collective carries its placements (src, dst)
        d = DTensor.from_local(to_device(np.ones((2, 3))), mesh, [Shard(0)], shape=(2 * W, 3))
        d.redistribute(mesh, [Replicate()])
        r = deadline.flight_dump("test")["records"][-1]
        assert_all(r["op"] == "all_gather_into_tensor" and "placements=((Shard(dim=0),), (Replicate(),))"
                   in r.get("detail", ""), f"{r}")


def test_ring_wraps_around_and_keeps_the_last_n(mesh, ring):
    deadline.set_flight_recorder(5)
    for i in range(12):
        funcol.all_reduce(np.ones(i + 1), "sum", mesh)
    dump = deadline.flight_dump("test")
    shapes = [r["shape"] for r in dump["records"]]
    seqs = [r["seq"] for r in dump["records"]]
    ok = (dump["ring_size"] == 5 and dump["issued_total"] == 12 and shapes == [[i + 1] for i in range(7, 12)]
          and len(seqs) == 5 and seqs == list(range(seqs[0], seqs[0] + 5)))
    assert_all(ok, f"ring {dump['ring_size']}, issued {dump['issued_total']}, shapes {shapes}, seqs {seqs}")
    text = flight.format_dump(dump)
    assert_all("the last 5 of the 12 collective(s)" in text and text.count("all_reduce#") == 5, text)


def test_ring_off_at_size_zero(mesh, ring):
    deadline.set_flight_recorder(0)
    funcol.all_reduce(np.ones(3), "sum", mesh)
    funcol.all_gather_tensor(np.ones(3), 0, mesh)
    dump = deadline.flight_dump("test")
    text = deadline.flight_text("test")
    assert_all(dump["records"] == [] and dump["issued_total"] == 0 and text == "",
               f"records {dump['records']}, total {dump['issued_total']}, text {text!r}")


@spawns
@rank0_only
def test_ring_size_from_the_environment():
    code = ("import numpy as np, mpilocal, mpilocal.functional as f; from mpilocal import deadline as d; "
            "m = mpilocal.init_device_mesh('cpu', (1,)); [f.all_reduce(np.ones(2), 'sum', m) for _ in range(5)]; "
            "print(d.flight_dump('x')['ring_size'], len(d.flight_records()), repr(d.flight_text('x')[:8]))")
    for env, want in (("0", "0 0 ''"), ("off", "0 0 ''"), ("3", "3 3 'mpilocal'"),
                      ("", "64 5 'mpilocal'")):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                           env=_clean_env(MPILOCAL_FLIGHT_RECORDER=env))
        assert p.stdout.strip() == want, (env, p.stdout, p.stderr[-2000:])


def test_ring_keeps_no_array_alive(mesh, ring):
    x = np.ones((64, 8))
    ref = weakref.ref(x)
    funcol.all_gather_tensor(x, 0, mesh)
    last = deadline.flight_records()[-1]
    del x
    gc.collect()
    assert_all(ref() is None and last["shape"] == [64, 8], f"alive: {ref() is not None}, record {last}")


def test_call_site_on_request(mesh, ring):
    deadline.set_flight_recorder(8, call_site=True)
    line = inspect.currentframe().f_lineno + 1
    funcol.all_reduce(np.ones(2), "sum", mesh)
    rec = deadline.flight_records()[-1]
    want = f"test_flight_recorder.py:{line} in test_call_site_on_request"
    assert_all(rec.get("site") == want, f"site {rec.get('site')!r}, expected {want!r}")


# ------------------------------------------------------------------------------------------------
# failed checks: every rank reachable, the rings compared online
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(W < 2, reason="a mismatch needs two ranks")
def test_mismatch_carries_the_first_difference_on_every_rank(mesh, ring):
    a = DTensor.from_local(np.ones((4, 8), np.float32), mesh, [Shard(0)], shape=(4 * W, 8))
    b = DTensor.from_local(np.ones((4, 8), np.float32), mesh, [Partial()])
    funcol.all_reduce(np.ones(3), "sum", mesh)
    seq = [r for r in deadline.flight_records() if _dim_key() in r["group"]][-1]["seq"] + 1
    was = deadline.debug_enabled()
    deadline.set_debug(True)
    try:
        err = raises_all(CollectiveMismatchError, "collective mismatch",
                         lambda: (a if RANK == 0 else b).redistribute(mesh, [Replicate()]))
    finally:
        deadline.set_debug(was)
    rep = getattr(err, "flight_report", "")
    mine = "all_gather_into_tensor" if RANK == 0 else "all_reduce"
    others = ", ".join(str(r) for r in range(1, W))
    want = [rf"first difference on group of world ranks {re.escape(str(list(range(W))))}.* at collective #{seq}:",
            rf"\n  rank 0: all_gather_into_tensor#{seq} float32 \(4, 8\) 128 B",
            rf"\n  ranks? {others}: all_reduce#{seq} float32 \(4, 8\) 128 B",
            rf"\n>> +g\d+ {mine}#{seq} float32 \(4, 8\)",  # this rank's ring, the difference marked
            rf"at test_flight_recorder\.py:\d+"]  # debug mode records call sites
    missing = [p for p in want if not re.search(p, rep)]
    notes = getattr(err, "__notes__", [rep]) if sys.version_info >= (3, 11) else [rep]
    assert_all(not missing and rep in notes, f"missing {missing} in the report:\n{rep}")


@pytest.mark.skipif(W < 2 or not (agreement._CHECK_ARGS or deadline.DEBUG), reason="the argument agreement is off "
                    "(MPILOCAL_CHECK_ARGS=0) or there is one rank")
def test_agreed_argument_error_carries_the_rings(mesh, ring):
    funcol.all_reduce(np.ones(3), "sum", mesh)
    op = "not-an-op" if RANK == LAST else "sum"
    err = raises_all(ValueError, None, funcol.all_reduce, np.ones(3), op, mesh)
    rep = getattr(err, "flight_report", "")
    ok = (f"gathered from ranks {', '.join(str(r) for r in range(W))} after the failed check" in rep
          and "on every group they share match" in rep and re.search(r"\n +g\d+ all_reduce#\d+ float64 \(3,\)", rep))
    assert_all(ok, f"report:\n{rep}")


# ------------------------------------------------------------------------------------------------
# comparing dumps (the analyzer's rules, on made-up dumps: no MPI)
# ------------------------------------------------------------------------------------------------
def _dump(rank, ops, issued=None, size=64, key="G", members=(0, 1, 2)):
    recs = [{"group": key, "op": op, "seq": s, "dtype": dt, "shape": [2], "nbytes": 16, "age_s": 0.0}
            for s, op, dt in ops]
    total = len(ops) if issued is None else issued
    return {"format": flight.FORMAT, "rank": rank, "world": len(members), "ring_size": size, "issued_total": total,
            "reason": "test", "waiting": None, "groups": {key: {"members": list(members), "issued": total}},
            "records": recs}


@rank0_only
def test_compare_marks_the_first_difference_and_the_missing_rank():
    same = [(1, "all_reduce", "float64"), (2, "all_gather_into_tensor", "float64")]
    d0 = _dump(0, same + [(3, "all_reduce", "float64")])
    d1 = _dump(1, same + [(3, "all_reduce", "float32")])  # other dtype at #3
    d2 = _dump(2, same)  # never issued #3
    diff = flight.first_difference("G", [d0, d1, d2])
    assert diff["seq"] == 3 and diff["never"] == [2] and diff["differ"] and diff["records"][2] is None
    assert flight.first_difference("G", [d0, _dump(1, same + [(3, "all_reduce", "float64")])]) is None
    # a rank whose ring dropped the early records is compared where it still knows them
    late = _dump(1, [(3, "all_reduce", "float64"), (4, "all_reduce", "float64")], issued=4, size=2)
    diff = flight.first_difference("G", [_dump(0, same + [(3, "all_reduce", "float64")]), late])
    assert diff["seq"] == 4 and diff["never"] == [0]
    # a rank that is not a member of the group is left out
    outside = _dump(1, same, key="H", members=(1,))
    inside = [_dump(0, same, members=(0, 2)), _dump(2, same, members=(0, 2))]
    assert flight.first_difference("G", [inside[0], outside, inside[1]]) is None
    text = flight.analyze([d0, d1, d2])
    assert "first difference on G at collective #3" in text and "rank 2: never issued it (issued only 2)" in text


# ------------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------------
@spawns
@rank0_only
def test_deadline_dumps_every_ring_and_the_analyzer_names_the_skipping_rank(tmp_path):
    d = tmp_path / "flight"
    # the job starts under a 60 s deadline (a loaded machine may start 3 ranks slowly) and sets 4 s just before
    # the collective the last rank skips (FLIGHT_SKIP_TIMEOUT), far below that rank's sleep
    rc, out, _, _ = run_job(3, ["flight_skip.py"], {"MPILOCAL_FLIGHT_DIR": d, "MPILOCAL_FLIGHT_RECORDER": 4,
                                                    "MPILOCAL_TIMEOUT": 60, "FLIGHT_SKIP_TIMEOUT": 4})
    assert rc not in (0, None), f"exit status {rc}:\n{out[-4000:]}"
    assert "all_gather_into_tensor#6" in out and "did not complete within 4 s" in out and "UNREACHABLE" not in out, \
        out[-4000:]
    for r in range(3):  # every rank prints its ring: the ring size from the environment, 4
        assert re.search(rf"\[rank {r}\] mpilocal flight recorder: the last 4 of the \d+ collective\(s\)", out), out
    assert re.search(r"\[rank [01]\] +g0 all_gather_into_tensor#6 float32 \(2, 3\) 24 B .*\(waiting in it\)", out), out
    files = sorted(p.name for p in d.iterdir())
    assert files == ["rank0.json", "rank1.json", "rank2.json"], (files, out[-4000:])
    dumps = [json.loads((d / f).read_text()) for f in files]
    assert [x["issued_total"] for x in dumps] == [6, 6, 5] and all(len(x["records"]) == 4 for x in dumps), dumps
    p = subprocess.run([sys.executable, "-m", "mpilocal", "flight", str(d), "--rings"], capture_output=True, text=True,
                       env=_clean_env(), cwd=str(ROOT), timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    want = [r"at collective #6:\n +ranks 0, 1: all_gather_into_tensor#6 float32 \(2, 3\) 24 B",
            r"\n +rank 2: never issued it \(issued only 5\)", r"rank 2 never issued collective #6 on this group",
            r"issued: rank 0: 6, rank 1: 6, rank 2: 5", r">> +g0 #6: never issued by this rank \(it issued 5"]
    missing = [w for w in want if not re.search(w, p.stdout)]
    assert not missing, f"missing {missing}:\n{p.stdout}"
    # the analyzer runs after the job, e.g. on a login node: it starts no MPI
    code = ("import runpy, sys; sys.argv = ['mpilocal', 'flight', sys.argv[1]]\ntry:\n"
            "    runpy.run_module('mpilocal', run_name='__main__', alter_sys=True)\nexcept SystemExit as e:\n"
            "    print('status', e.code, 'MPI', 'mpi4py.MPI' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, env=_clean_env(),
                       cwd=str(ROOT), timeout=60)
    assert p.stdout.strip().endswith("status 1 MPI False"), p.stdout[-2000:] + p.stderr[-2000:]


@spawns
@rank0_only
def test_uncaught_mismatch_prints_the_first_difference_on_every_rank():
    rc, out, _, _ = run_job(3, ["flight_mismatch.py"], {"MPILOCAL_DEBUG": 1, "MPILOCAL_TIMEOUT": 30})
    assert rc not in (0, None) and "NO ERROR" not in out, f"exit status {rc}:\n{out[-4000:]}"
    for r in range(3):
        mine = "all_gather_into_tensor" if r == 0 else "all_reduce"
        for pat in (rf"\[rank {r}\] first difference on group of world ranks \[0, 1, 2\].* at collective #3:",
                    rf"\[rank {r}\]   rank 0: all_gather_into_tensor#3 float32 \(4, 8\) 128 B "
                    r".*at flight_mismatch\.py:\d+",
                    rf"\[rank {r}\]   ranks 1, 2: all_reduce#3 float32 \(4, 8\) 128 B",
                    rf"\[rank {r}\] >> +g0 {mine}#3 float32 \(4, 8\)"):
            assert re.search(pat, out), f"{pat!r} not in:\n{out[-6000:]}"
