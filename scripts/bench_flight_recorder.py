"""Per-call cost of the flight recorder on the hot path (issue 11; docs/failures.md, "Flight recorder").

Times ``with deadline.begin(...)`` (what every collective pays in mpilocal.collectives.issue) in a
loop, without the collective, in one process: the recorder off (``MPILOCAL_FLIGHT_RECORDER=0``), on
(the default ring of 64), and on with the call site of every record (``MPILOCAL_FLIGHT_CALLSITE=1``)
at the call depth of a public ``funcol`` call (5 mpilocal frames). With ``--before FILE``, also the
``begin`` of an older deadline.py (its source in FILE) for a before/after comparison. Prints the best
of several repeats (microseconds per call) and the load average; never a pass/fail.

    python scripts/bench_flight_recorder.py [--before old_begin.py] [--calls 200000] [--repeats 9] [--cpu]
"""
import argparse
import os
import time

import numpy as np

import mpilocal  # noqa: F401  (installs the deadline machinery)
from mpi4py import MPI
from mpilocal import deadline
from mpilocal.transport import group_for


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="a file holding the source of an older deadline.begin")
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--cpu", action="store_true", help="time with this thread's CPU clock (time.thread_time) "
                    "instead of the wall clock: steadier on a machine shared with other jobs")
    a = ap.parse_args()
    g = group_for(MPI.COMM_WORLD)
    x = np.ones(8)
    detail: dict = {}
    n = a.calls

    # the frames of a public call: user -> 5 mpilocal functions -> begin (defined with an mpilocal file name)
    src = ("def l1(b, g, x, d): return l2(b, g, x, d)\n"
           "def l2(b, g, x, d): return l3(b, g, x, d)\n"
           "def l3(b, g, x, d): return l4(b, g, x, d)\n"
           "def l4(b, g, x, d): return l5(b, g, x, d)\n"
           "def l5(b, g, x, d):\n"
           "    with b('all_reduce', g, x, d):\n"
           "        pass\n")
    ns: dict = {}
    exec(compile(src, os.path.join(os.path.dirname(deadline.__file__), "_bench_frames.py"), "exec"), ns)
    l1 = ns["l1"]

    clock = time.thread_time if a.cpu else time.perf_counter

    def loop(begin):
        t = clock()
        for _ in range(n):
            l1(begin, g, x, detail)
        return (clock() - t) / n * 1e6

    def nothing(name, g, send=None, detail=None):
        return deadline._CLEAR

    cases = {"call frames alone (no begin)": (nothing, 0, False)}
    if a.before:
        old: dict = {}
        exec(compile(open(a.before).read(), deadline.__file__, "exec"), deadline.__dict__, old)
        cases["begin before the flight recorder"] = (old["begin"], 0, False)
    cases["begin, recorder off (MPILOCAL_FLIGHT_RECORDER=0)"] = (deadline.begin, 0, False)
    cases["begin, recorder on (64)"] = (deadline.begin, 64, False)
    cases["begin, recorder on + MPILOCAL_FLIGHT_CALLSITE=1"] = (deadline.begin, 64, True)
    best = {k: float("inf") for k in cases}
    for _ in range(a.repeats):  # interleaved, so that load changes hit every case alike
        for k, (fn, size, site) in cases.items():
            deadline.set_flight_recorder(size, call_site=site)
            best[k] = min(best[k], loop(fn))
    deadline.set_flight_recorder(64, call_site=False)
    base = best["call frames alone (no begin)"]
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; {n} calls x {a.repeats} repeats, best; "
          f"{'thread CPU time' if a.cpu else 'wall time'}")
    for k, v in best.items():
        print(f"  {k:55s} {v:6.3f} us/call" + ("" if k.startswith("call frames") else f"  (begin: {v - base:.3f})"))


if __name__ == "__main__":
    main()
