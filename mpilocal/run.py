"""``python -m mpilocal.run script.py [args]`` (or ``-m module [args]``, ``-c code [args]``).

Runs a program the way ``python`` would (``runpy``; ``sys.argv`` and ``sys.path[0]`` as usual). Plain
``mpiexec -n N python script.py`` that imports mpilocal is handled as well (``import mpilocal``
installs the exception hook, the leave notices and the exit deadline, see ``mpilocal/deadline.py``);
this runner adds two things:

- an uncaught exception raised *before* ``import mpilocal`` (e.g. while importing it or mpi4py's
  MPI) also prints ``[rank R] Traceback ...`` and aborts the job;
- ``sys.exit(n)`` / ``raise SystemExit(n)`` with ``n`` not 0 (or a message) on any rank ends the job
  at once with status ``n`` (``MPI_Abort(n)``), after telling the other ranks, which print where
  they wait. ``sys.exit(0)`` / ``None`` exits normally.

Usage: ``mpiexec -n 4 python -m mpilocal.run train.py --epochs 3``.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m mpilocal.run (script.py | -m module | -c code) [args...]"


def _abort_exception(exc_type, exc, tb, deadline):
    deadline.abort(1, deadline.format_exception(exc_type, exc, tb)
                   + f"mpilocal.run: uncaught {exc_type.__name__}; aborting the MPI job",
                   deadline.exception_summary(exc_type, exc, tb))


def _exit_location(tb) -> str:
    """``file:line`` where SystemExit was raised (the innermost frame outside mpilocal)."""
    import traceback

    here = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(tb) if os.path.dirname(os.path.abspath(f.filename)) != here]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


def _world_size() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    try:
        from . import deadline
    except BaseException:  # mpilocal/mpi4py itself failed to import: no MPI to abort through
        import traceback

        traceback.print_exc()
        os._exit(1)
    deadline.install()
    try:
        if argv[0] == "-m":
            if len(argv) < 2:
                print(USAGE, file=sys.stderr)
                return 2
            sys.argv = argv[1:]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            if len(argv) < 2:
                print(USAGE, file=sys.stderr)
                return 2
            sys.argv = ["-c"] + argv[2:]
            sys.path.insert(0, "")
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            path = argv[0]
            sys.argv = argv
            sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
        if code is None or code == 0:
            return 0
        if not isinstance(code, int):
            sys.stderr.write(f"{code}\n")
            code = 1
        if _world_size() > 1:
            where = f"sys.exit({e.code!r}) at {_exit_location(e.__traceback__)}"
            deadline.abort(code, f"mpilocal.run: the program called {where}; aborting the MPI job", where)
        return code
    except BaseException:
        exc_type, exc, tb = sys.exc_info()
        if _world_size() > 1:
            _abort_exception(exc_type, exc, tb.tb_next or tb, deadline)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
