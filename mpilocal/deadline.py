"""Deadlines and prompt aborts: turning MPI failure modes into a clear, non-zero exit (layer 1).

The worst failure of an MPI program is a hang: one rank raises or leaves while the others wait
forever in a collective. This module gives mpilocal these defences (see README, "Failures,
deadlines and debug mode", and docs/architecture.md), all set up by ``import mpilocal``
(:func:`install`). It knows no mesh and no transport: a :class:`~mpilocal.transport.Group` is any
object with ``comm``, ``size`` and ``cache``, and the mesh names its communicators in reports
through :func:`register_describer`.

1. **A failing rank ends the job.** ``sys.excepthook`` (opt out with ``MPILOCAL_ABORT_ON_ERROR=0``):
   an uncaught exception on any rank of a job with more than one rank prints ``[rank R] Traceback
   ...`` to stderr, tells the other ranks, and calls ``MPI.COMM_WORLD.Abort(1)``.
   ``python -m mpilocal.run script.py`` also turns ``sys.exit(n != 0)`` (and exceptions raised
   before mpilocal is imported) into ``Abort(n)`` (through :func:`abort`).
2. **A rank that leaves tells the others** (the leave channel, below): a rank at program exit that
   does not meet the others within ``_EXIT_GRACE`` sends each a notice (how it left, how many
   collectives it issued per group); a rank blocked in a collective that the leaver never issued
   reports who left, where, and where it waits, and aborts the job.
3. **Ctrl-C** while the main thread is blocked inside MPI: Python's C-level handler writes to a
   wakeup socket the watchdog thread waits on, and the watchdog ends the job with a report.
4. **Deadlines on waits.** Every collective mpilocal issues (array data and metadata) is recorded
   in a per-process in-flight slot (operation, per-group sequence number, group, start time) before
   the blocking call and cleared after it (:func:`begin`, :func:`waiting`; other blocking MPI calls
   such as communicator creation: :func:`in_flight`). A daemon watchdog thread aborts the job when
   one has been in flight longer than ``MPILOCAL_TIMEOUT`` seconds (default 600; ``0``/``off``
   disables), after printing rank, operation, sequence number, the group's world ranks / mesh and
   this rank's Python stack. At exit, ``MPI_Finalize`` gets the same deadline
   (``MPILOCAL_EXIT_TIMEOUT``, default ``MPILOCAL_TIMEOUT``). Asynchronous transports (NCCL)
   register their in-flight work with :func:`watch_async` / :func:`watch_cuda` and abort hooks
   with :func:`register_abort_hook`.

5. **The flight recorder** (docs/failures.md): :func:`begin` keeps this rank's last
   ``MPILOCAL_FLIGHT_RECORDER`` collectives (64; ``0``: off) as raw tuples in a preallocated ring
   (group, per-group sequence number, send dtype / shape / bytes, time; the detail and call site
   under debug mode or ``MPILOCAL_FLIGHT_CALLSITE=1``). Every abort report adds the ring; after a
   failed cross-rank check :func:`flight_verdict` compares the ranks' rings and attaches where they
   first differ to the error; ``MPILOCAL_FLIGHT_DIR`` also writes ``rank<R>.json`` for ``python -m
   mpilocal flight DIR``. Formatting and comparison: :mod:`mpilocal.flight`.

The settings of debug mode (``MPILOCAL_DEBUG=1``, :func:`set_debug`) live here too; the checks
themselves (collective fingerprints, argument agreement) are :mod:`mpilocal.agreement`'s, which
registers its fingerprint check with :func:`register_fingerprint_check` so that :func:`begin`
runs it.

Every abort writes its report to file descriptor 2 before ``MPI_Abort`` and waits until the launcher
has read it (README.md, "No lost messages"), and removes the names of MPICH's node segments that the
job would leave in ``/dev/shm`` ("No memory left behind").
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import weakref

from mpi4py import MPI

from . import flight as _flight

__all__ = [
    "install", "abort", "timeout", "set_timeout", "debug_enabled", "set_debug", "begin", "waiting", "in_flight",
    "sequence", "count_control", "watch_async", "watch_cuda", "register_abort_hook", "register_before_report",
    "register_describer", "register_fingerprint_check", "describe_group", "forget_group", "format_exception",
    "exception_summary", "env_flag", "DEBUG", "settle_channel", "set_flight_recorder", "flight_settings", "flight_records",
    "flight_dump", "flight_text", "flight_verdict",
]

_monotonic = time.monotonic


def env_flag(name: str, default: bool) -> bool:
    """The on/off setting in environment variable ``name`` (``0``/``false``/``no``/``off``: off)."""
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return default
    return v not in ("0", "false", "no", "off")


def _env_seconds(name: str, default):
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return default
    if v in ("0", "off", "none", "inf", "never"):
        return None
    try:
        s = float(v)
    except ValueError:
        sys.stderr.write(f"mpilocal: ignoring {name}={v!r} (not a number of seconds); using {default}\n")
        return default
    return s if s > 0 else None


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
_TIMEOUT = _env_seconds("MPILOCAL_TIMEOUT", 600.0)        # None: no deadline
_EXIT_TIMEOUT = _env_seconds("MPILOCAL_EXIT_TIMEOUT", _TIMEOUT)
# debug mode (MPILOCAL_DEBUG=1): read it here (the transports do, on their hot path: one attribute
# lookup), change it with set_debug()
DEBUG = env_flag("MPILOCAL_DEBUG", False)
_WATCH = _TIMEOUT is not None                              # record in-flight slots at all?


def _env_count(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return default
    if v in ("off", "no", "false", "none"):
        return 0
    try:
        n = int(v)
    except ValueError:
        sys.stderr.write(f"mpilocal: ignoring {name}={v!r} (not a whole number); using {default}\n")
        return default
    return max(0, n)


# the flight recorder (docs/failures.md, "Flight recorder"): this rank's last _FR_SIZE collectives, as
# raw tuples in a preallocated ring written by begin(); formatted only when dumped (mpilocal.flight)
_FR_SIZE = _env_count("MPILOCAL_FLIGHT_RECORDER", 64)      # 0: off
_FR_DIR = os.environ.get("MPILOCAL_FLIGHT_DIR", "").strip() or None  # also write DIR/rank<R>.json
_FR_SITE = env_flag("MPILOCAL_FLIGHT_CALLSITE", False)     # the call site of every record (also in debug mode)
_FR_RING: list = [None] * _FR_SIZE
_fr_n = 0                                                  # collectives recorded so far (the next slot: _fr_n % size)
_FR_CALLS = _FR_SITE or DEBUG                              # record call sites (kept by set_debug, set_flight_recorder)


def timeout():
    """The deadline (seconds) for one collective, or None when disabled."""
    return _TIMEOUT


def set_timeout(seconds) -> None:
    """Set the collective deadline (None or 0: off). Local; call it on every rank."""
    global _TIMEOUT, _WATCH, _EXIT_TIMEOUT
    follow = _EXIT_TIMEOUT == _TIMEOUT
    _TIMEOUT = float(seconds) if seconds else None
    if follow:
        _EXIT_TIMEOUT = _TIMEOUT
    _WATCH = _TIMEOUT is not None


def debug_enabled() -> bool:
    """Whether debug mode (collective fingerprints, ``MPILOCAL_DEBUG=1``) is on."""
    return DEBUG


def set_debug(on: bool) -> None:
    """Turn collective fingerprinting on/off. **Must be the same on every rank**, switched between
    collectives (it changes which collectives run)."""
    global DEBUG, _FR_CALLS
    DEBUG = bool(on)
    _FR_CALLS = _FR_SITE or DEBUG


def _rank() -> int:
    try:
        return MPI.COMM_WORLD.Get_rank()
    except Exception:  # pragma: no cover - MPI finalized or not initialized
        return -1


def _size() -> int:
    try:
        return MPI.COMM_WORLD.Get_size()
    except Exception:  # pragma: no cover
        return 1



# ------------------------------------------------------------------------------------------------
# aborting
# ------------------------------------------------------------------------------------------------
_ABORTING = threading.Lock()
_BEFORE_REPORT: list = []
_INTERCEPT = None  # tests only: a list that receives the watchdog's reports instead of an abort
_LINGER = 0.4  # seconds an aborting rank waits after telling the others, so that they report too


def register_before_report(fn) -> None:
    """``fn()`` runs just before an abort prints its report (e.g. to suspend pytest's capture)."""
    _BEFORE_REPORT.append(fn)


def _prefix(text: str, rank=None) -> str:
    r = _rank() if rank is None else rank
    return "".join(f"[rank {r}] {line}\n" for line in text.rstrip("\n").split("\n"))


def _emit(text: str) -> None:
    """Write ``text`` to file descriptor 2 at once, after flushing Python's own buffers (a message
    left in a buffer is lost when the job is killed a moment later)."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    data = text.encode(errors="replace")
    try:
        while data:
            data = data[os.write(2, data):]
    except Exception:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except Exception:
            pass


_FORWARD_WAIT = 3.0  # seconds at most an ending rank waits for the launcher to read its report
_NODE_SHM = "/dev/shm/mpich_shm_"  # MPICH's node segment: MPI_Abort and signals leave it behind


def _await_forwarded(limit: float = _FORWARD_WAIT) -> None:
    """Wait (at most ``limit`` s) until the launcher has read what this rank wrote to stderr.

    Launchers read each rank's stderr from a pipe; a launcher busy with other jobs can kill the
    processes before it reads the report, and the report is then lost (seen once in 20 aborts under
    Open MPI 4.1 on a loaded 2-core machine). ``FIONREAD`` tells how many bytes are still in the pipe.
    Where stderr is not a pipe (a file, a terminal) the write itself was enough.
    """
    try:
        import fcntl
        import stat
        import termios
        if not stat.S_ISFIFO(os.fstat(2).st_mode):
            return
        left = bytearray(4)
        t_end = _monotonic() + limit
        while True:
            fcntl.ioctl(2, termios.FIONREAD, left)
            if int.from_bytes(left, sys.byteorder) == 0 or _monotonic() >= t_end:
                return
            time.sleep(0.01)
    except Exception:
        return


def _release_node_shm() -> None:
    """Remove the names of MPICH's shared-memory segments that this process maps.

    MPICH unlinks them at ``MPI_Finalize`` only: every job ended by ``MPI_Abort`` or a signal left one
    ``/dev/shm/mpich_shm_*`` file (2-4 MB at 2 ranks, more at more ranks), held in memory until reboot.
    Thousands of aborted test jobs filled a 24 GB machine's memory that way. The mappings stay valid
    until the processes end (only the names go), and the job is ending. README.md, "No memory left
    behind".
    """
    try:
        with open("/proc/self/maps") as f:
            names = {line.split(None, 5)[5].strip() for line in f if _NODE_SHM in line}
    except (OSError, IndexError):
        return
    for name in names:
        if name.startswith(_NODE_SHM) and not name.endswith(" (deleted)"):
            try:
                os.unlink(name)
            except OSError:
                pass


def _before_end() -> None:
    """The last steps of a rank that ends the job: its report read by the launcher, the node's MPI
    segment names released."""
    _await_forwarded()
    _release_node_shm()


def abort(code: int = 1, message: str = "", where: str = "") -> None:
    """Print ``message`` (prefixed with the rank) to stderr and end the whole MPI job with ``code``.

    Never returns. The message is written to file descriptor 2 first; then the other ranks are told
    (the leave channel: those blocked in a collective print where they wait), and after a short pause
    for the launcher to forward the output, ``MPI_Abort`` ends the job (``os._exit`` if MPI is gone).
    ``where``: one line for the other ranks' reports (default: the message's first line).
    """
    if not _ABORTING.acquire(blocking=False):  # another thread is already aborting
        while True:
            time.sleep(3600)
    for fn in list(_BEFORE_REPORT):  # e.g. pytest: suspend output capture so the report is seen
        try:
            fn()
        except Exception:
            pass
    code = int(code) if isinstance(code, int) and code else 1
    ring = _flight_once(_reason(where or (message.strip().split("\n")[0] if message else "")))
    if ring:
        message = (message.rstrip("\n") + "\n" if message else "") + ring
    _emit(_prefix(message) if message else "")
    try:
        if MPI.Is_initialized() and not MPI.Is_finalized():
            first = message.strip().split("\n")[0].removeprefix("mpilocal: ") if message else ""
            if _notify("abort", where or first[:300], code):
                _linger(_LINGER)
            _before_end()
            MPI.COMM_WORLD.Abort(code)
    except Exception:
        pass
    os._exit(code)


def _reason(text: str) -> str:
    """A report's first line, short, as the reason of a flight recorder dump."""
    return text.removeprefix("mpilocal: ").split("; ")[0][:300]


def format_exception(exc_type, exc, tb) -> str:
    return "".join(traceback.format_exception(exc_type, exc, tb))


def _location(tb) -> str:
    """``file:line`` of the innermost frame of traceback ``tb`` outside this module."""
    where = ""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename != __file__:
            where = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def exception_summary(exc_type, exc, tb) -> str:
    """One line for the other ranks: ``uncaught ValueError: msg at script.py:12``."""
    text = f"{exc_type.__name__}: {exc}".split("\n")[0][:200]
    loc = _location(tb)
    return f"uncaught {text}" + (f" at {loc}" if loc else "")


_PREV_HOOK = None
_INSTALLED = False


def _excepthook(exc_type, exc, tb):
    global _FR_DUMPED
    if _size() > 1 and not issubclass(exc_type, SystemExit):
        if getattr(exc, "flight_report", None):  # its note already holds the ranks' compared rings
            _FR_DUMPED = True
        text = format_exception(exc_type, exc, tb)
        code = 130 if issubclass(exc_type, KeyboardInterrupt) else 1
        abort(code, text + f"mpilocal: uncaught {exc_type.__name__} on rank {_rank()}; aborting the MPI job "
                         f"(set MPILOCAL_ABORT_ON_ERROR=0 to let it exit alone)",
              exception_summary(exc_type, exc, tb))
    (_PREV_HOOK or sys.__excepthook__)(exc_type, exc, tb)


def install() -> None:
    """Install the abort-on-uncaught-exception hook, the leave channel, the SIGINT watch and the
    exit deadline (idempotent).

    Called by ``import mpilocal``; ``MPILOCAL_ABORT_ON_ERROR=0`` leaves ``sys.excepthook`` alone.
    """
    global _PREV_HOOK, _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    if env_flag("MPILOCAL_ABORT_ON_ERROR", True):
        if sys.excepthook is not _excepthook:
            _PREV_HOOK = sys.excepthook
            sys.excepthook = _excepthook
    if _size() > 1:
        _open_channel()
        _watch_signals()
        _wrap_sys_exit()
        _ensure_watchdog()
    # atexit is LIFO: registered at the very start of `import mpilocal`, this runs after every
    # other mpilocal exit handler (e.g. draining pending metadata requests)
    atexit.register(_at_exit)


# ------------------------------------------------------------------------------------------------
# the leave channel: a rank that ends tells the others
# ------------------------------------------------------------------------------------------------
# A rank that leaves the program (normal end, sys.exit, an uncaught exception) while others still
# wait for it in a collective would leave them waiting until the deadline. So every rank holds a
# private duplicate of COMM_WORLD (MPI_Comm_idup at import: no rank waits for it), used for nothing
# but small point-to-point notices. A leaving rank sends each other rank a notice: what happened,
# where, and how many collectives it issued on each of its groups. A rank whose main thread has been
# blocked in an mpilocal collective for one watchdog tick receives the notices; when the leaver is
# in the group it waits on and issued fewer collectives there than this rank has, the leaver never
# joins, so this rank reports who left, where, and where it waits, and aborts the job. Ranks that
# merely finish at different times are never ended: a rank at exit first meets the others in a
# non-blocking barrier on the channel and sends notices only when that has not completed within
# _EXIT_GRACE, and a notice ends only a rank that issued a collective the leaver never joins.
# Notices of kind "abort" (a rank is aborting the job) make every blocked rank report where it waits.
_LEAVE_TAG = 77
_EXIT_GRACE = 0.2
_SYNC_GRACE = 0.5      # a synchronizing call still blocked this long after a member's notice: it never joins
_TICK = 0.1            # watchdog period while MPI_COMM_WORLD has more than one rank
_chan = None           # [communicator, MPI_Comm_idup request or None once complete]
_CHAN_LOCK = threading.Lock()
_MT = False            # MPI_THREAD_MULTIPLE: the watchdog thread may call MPI
_LEFT: dict = {}       # world rank -> notice received from it
_SENT: list = []       # (request, buffer) of the notices this rank sent
_notified = False
_CTLN = "mpilocal.ctln"  # per group: control-communicator operations issued (count_control)
_KEY = "mpilocal.key"
_MEMBERS = "mpilocal.members"
_USED = weakref.WeakSet()  # groups this rank issued operations on


def _open_channel() -> None:
    global _chan, _MT
    if not env_flag("MPILOCAL_LEAVE_NOTICES", True):
        return
    try:
        if not MPI.Is_initialized() or MPI.Is_finalized():
            return
        _MT = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        comm, req = MPI.COMM_WORLD.Idup()
    except Exception:
        return
    _chan = [comm, req]


def _channel():
    """The leave channel's communicator, or None (not opened, MPI_Comm_idup not complete yet, or
    this thread may not call MPI)."""
    ch = _chan
    if ch is None or not (_MT or threading.current_thread() is threading.main_thread()):
        return None
    if ch[1] is not None:
        if not _CHAN_LOCK.acquire(blocking=False):  # (settle_channel may be waiting with it: not yet)
            return None
        try:
            if ch[1] is not None:
                try:
                    if not ch[1].Test():
                        return None
                except Exception:
                    return None
                ch[1] = None
        finally:
            _CHAN_LOCK.release()
    return ch[0]


def settle_channel() -> None:
    """Complete the leave channel's ``MPI_Comm_idup`` of ``MPI_COMM_WORLD`` (posted at import) before
    mpilocal makes another communicator: Open MPI 4.1 can hang a blocking communicator creation
    issued while that idup is pending (with mpi4py alone, an idup then a barrier, a dup and an
    all-gather hung 2 of 6 runs at 3 ranks; ``init_device_mesh`` hung the same way). Every
    communicator mpilocal creates calls this first. Blocking, under the deadline; every rank posted
    the idup at import, so it completes once every rank is in MPI. Main thread only."""
    ch = _chan
    if ch is None or ch[1] is None or threading.current_thread() is not threading.main_thread():
        return
    with _CHAN_LOCK:
        req = ch[1]
        if req is not None:
            with in_flight("completing the leave channel (the MPI_Comm_idup of MPI_COMM_WORLD made at import)",
                           members=MPI.COMM_WORLD):
                req.Wait()
            ch[1] = None


def _world_ranks(g) -> list:
    m = g.cache.get(_MEMBERS)
    if m is None:
        try:
            m = list(g.comm.Get_group().Translate_ranks(list(range(g.size)), MPI.COMM_WORLD.Get_group()))
        except Exception:
            m = []
        g.cache[_MEMBERS] = m
    return m


def _group_key(g) -> str:
    """A name of ``g``'s communicator that is the same on every rank of it (world, mesh dim, ...)."""
    k = g.cache.get(_KEY)
    if k is None:
        try:
            world = MPI.Comm.Compare(g.comm, MPI.COMM_WORLD) == MPI.IDENT
        except Exception:
            world = False
        k = g.cache[_KEY] = "MPI.COMM_WORLD" if world else describe_group(g)
    return k


def _notify(kind: str, where: str, code: int = 1) -> bool:
    """Send every other rank this rank's notice (once); False when the channel is not usable."""
    global _notified
    comm = _channel()
    if comm is None:
        return False
    if _notified:
        return True
    _notified = True
    ops: dict = {}
    for g in list(_USED):
        k = _group_key(g)
        n = (g.cache.get(_SEQ, 0), g.cache.get(_CTLN, 0))
        p = ops.get(k)
        ops[k] = [max(n[0], p[0]), max(n[1], p[1])] if p else list(n)  # equal names: the larger counts
    data = json.dumps({"kind": kind, "where": where, "code": int(code), "ops": ops}).encode()
    me = _rank()
    try:
        with _CHAN_LOCK:
            for r in range(_size()):
                if r != me:
                    _SENT.append((comm.Isend([data, MPI.BYTE], r, _LEAVE_TAG), data))
    except Exception:
        return False
    return True


def _linger(seconds: float) -> None:
    """Wait ``seconds`` while the notices just sent make progress."""
    t_end = _monotonic() + seconds
    while _monotonic() < t_end:
        try:
            MPI.Request.Testall([r for r, _ in _SENT])
        except Exception:
            pass
        time.sleep(0.02)


def _receive_notices() -> None:
    comm = _channel()
    if comm is None:
        return
    st = MPI.Status()
    with _CHAN_LOCK:
        while comm.Iprobe(MPI.ANY_SOURCE, _LEAVE_TAG, st):
            buf = bytearray(st.Get_count(MPI.BYTE))
            src = st.Get_source()
            comm.Recv([buf, MPI.BYTE], src, _LEAVE_TAG)
            try:
                note = json.loads(buf.decode())
            except ValueError:
                continue
            note["t"] = _monotonic()
            _LEFT[src] = note


def _members(m) -> list:
    """World ranks of ``m`` (a list of them, or an mpi4py communicator)."""
    if isinstance(m, MPI.Comm):
        try:
            return list(m.Get_group().Translate_ranks(list(range(m.Get_size())), MPI.COMM_WORLD.Get_group()))
        except Exception:
            return []
    return list(m)


def _left_rank_for(s):
    """(world rank, notice, its counts) of a rank that ended while this rank waits in slot ``s``
    for it; None when no notice explains the wait."""
    g = s[2]
    members = _members(s[5]) if len(s) > 5 and s[5] is not None else None
    for r, note in sorted(_LEFT.items()):
        if note.get("kind") == "abort":
            return r, note, None
        if members is not None:  # a synchronizing call (no counts): the leaver would have completed it
            if r in members and _monotonic() - max(note["t"], s[3]) > _SYNC_GRACE:
                return r, note, [-1, -1]
            continue
        if g is None or r not in _world_ranks(g):
            continue
        theirs = note.get("ops", {}).get(_group_key(g), [0, 0])
        if g.cache.get(_SEQ, 0) > theirs[0] or g.cache.get(_CTLN, 0) > theirs[1]:
            return r, note, theirs
    return None


def _fire_left(s, r, note, theirs):
    name, seq, g = s[0], s[1], s[2]
    what = (f"{name}#{seq}" if seq else name) + (f" on {describe_group(g)}" if g is not None else "")
    if theirs is None:
        head = (f"mpilocal: rank {r} is ending the job ({note.get('where', '?')}); this rank was waiting in "
                f"{what}.")
        code = note.get("code", 1)
    else:
        issued = f" after issuing {theirs[0]} collective(s) on this group" if theirs[0] >= 0 else ""
        also = sorted(x for x in _LEFT if x != r)
        head = (f"mpilocal: rank {r} left the program ({note.get('where', '?')}){issued}, but this rank waits in "
                f"{what}, which rank {r} never joins" + (f" (rank(s) {also} left too)" if also else "")
                + ". Aborting the MPI job.")
        code = 1
    msg = head + ("\nthis rank is waiting at:\n" + _main_stack())
    if _INTERCEPT is not None:  # tests: record the report instead of ending the job
        _INTERCEPT.append(msg)
        return
    abort(code, msg, f"rank {r} left; rank {_rank()} was waiting in {what}")


_SYS_EXIT = None
_EXIT_CALL = None  # (status, "file:line", time) of the last sys.exit call


def _wrap_sys_exit() -> None:
    """Let ``sys.exit`` remember where it was called, for the notice a leaving rank sends."""
    global _SYS_EXIT
    if _SYS_EXIT is not None:
        return
    _SYS_EXIT = original = sys.exit

    def exit(status=None):
        global _EXIT_CALL
        try:
            f = sys._getframe(1)
            _EXIT_CALL = (status, f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}", _monotonic())
        except Exception:
            pass
        original(status)

    exit.__doc__ = original.__doc__
    exit.__wrapped__ = original
    sys.exit = exit


def _leaving_where() -> str:
    """Why this rank is at program exit, for its notice."""
    exc = getattr(sys, "last_value", None)
    if exc is not None:
        return "after " + exception_summary(type(exc), exc, exc.__traceback__)
    call = _EXIT_CALL
    if call is not None and _monotonic() - call[2] < 30:
        return f"sys.exit({call[0]!r}) at {call[1]}"
    return "reached the end of the program"


# ------------------------------------------------------------------------------------------------
# Ctrl-C: the main thread is stuck inside MPI, so the watchdog thread sees the signal
# ------------------------------------------------------------------------------------------------
_WAKE = None  # (read end, write end) of the socket pair given to signal.set_wakeup_fd


def _watch_signals() -> None:
    """Have Python's C-level signal handler write each signal number to a socket the watchdog
    waits on (``signal.set_wakeup_fd``), unless another wakeup fd is in use (e.g. asyncio's)."""
    global _WAKE
    if threading.current_thread() is not threading.main_thread() or not env_flag("MPILOCAL_SIGINT", True):
        return
    try:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        old = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    except Exception:
        return
    if old != -1:
        signal.set_wakeup_fd(old)
        r.close()
        w.close()
        return
    _WAKE = (r, w)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # a launcher ending the job: say where
        signal.signal(signal.SIGTERM, _on_sigterm_main)
    os.register_at_fork(after_in_child=_forget_signals)  # a forked child has no watchdog: not ours


def _forget_signals() -> None:
    global _WAKE
    if _WAKE is not None:
        try:
            signal.set_wakeup_fd(-1)
            if signal.getsignal(signal.SIGTERM) is _on_sigterm_main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except Exception:
            pass
        _WAKE = None


_TERMINATING = threading.Lock()
_SIGTERM_AT = None  # when the watchdog saw SIGTERM while the main thread ran Python code


def _terminated(text: str) -> None:
    """Print where this rank was, then die of SIGTERM as without mpilocal (never returns)."""
    if not _TERMINATING.acquire(blocking=False):
        while True:
            time.sleep(3600)
    for fn in list(_BEFORE_REPORT):
        try:
            fn()
        except Exception:
            pass
    _emit(_prefix(text))
    _before_end()
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: SIGTERM now would reach our handler again
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    os._exit(128 + signal.SIGTERM)


def _on_sigterm_main(signum, frame) -> None:
    """SIGTERM (a launcher ending the job, Open MPI's answer to Ctrl-C, a batch time limit) while
    the main thread runs Python code."""
    loc = f" at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else ""
    _terminated(f"mpilocal: terminated (SIGTERM){loc}")


def _on_sigterm(s) -> None:
    """SIGTERM seen by the watchdog: when the main thread waits in a collective (its Python handler
    cannot run), or has not handled it within a second, report where it is and die."""
    global _SIGTERM_AT
    if s is not None:
        name, seq, g = s[0], s[1], s[2]
        what = (f"{name}#{seq}" if seq else name) + (f" on {describe_group(g)}" if g is not None else "")
        _terminated(f"mpilocal: terminated (SIGTERM) while waiting in {what}\nthis rank is waiting at:\n"
                    + _main_stack())
    if _SIGTERM_AT is None:
        _SIGTERM_AT = _monotonic()


def _wait_tick(seconds: float) -> bytes:
    """Sleep ``seconds`` or until a signal arrives; the signal numbers received."""
    wake = _WAKE
    if wake is None:
        time.sleep(seconds)
        return b""
    try:
        ready, _, _ = select.select([wake[0]], [], [], seconds)
        return wake[0].recv(256) if ready else b""
    except (BlockingIOError, InterruptedError):
        return b""
    except Exception:
        time.sleep(seconds)
        return b""


def _on_sigint(s) -> None:
    """SIGINT while the main thread waits in an mpilocal collective: Python would raise
    KeyboardInterrupt only after the collective returns, so end the job from here."""
    if s is None and not _ASYNC and not any(w.busy() for w in list(_STREAM_WATCHES.values())):
        return  # the main thread runs Python code: KeyboardInterrupt is raised there as usual
    if s is not None:
        name, seq, g = s[0], s[1], s[2]
        what = (f"{name}#{seq}" if seq else name) + (f" on {describe_group(g)}" if g is not None else "")
    else:
        what = "asynchronous GPU work"
    stack = _main_stack()
    abort(130, f"mpilocal: interrupted (SIGINT) while waiting in {what}; aborting the MPI job"
               + ("\nthis rank is waiting at:\n" + stack if stack else ""),
          f"interrupted (SIGINT) on rank {_rank()} while waiting in {what}")


# ------------------------------------------------------------------------------------------------
# exit
# ------------------------------------------------------------------------------------------------
def _at_exit():
    # MPI_Finalize waits for the other ranks, which may be stuck in a collective this rank will never
    # join (it returned or called sys.exit early). So first meet them in a non-blocking barrier on
    # the leave channel; if that does not complete within _EXIT_GRACE, tell them this rank is leaving
    # (a rank that waits for it then aborts the job with a report), and keep polling under the exit
    # deadline; past it, leave without MPI_Finalize (os._exit: the launcher then ends the job —
    # MPI_Abort is not safe once finalization may have begun).
    global _slot
    _slot = None
    try:
        import mpi4py

        if not MPI.Is_initialized() or MPI.Is_finalized() or getattr(mpi4py.rc, "finalize", None) is False:
            return
        if _size() == 1:
            return
    except Exception:
        return
    t0 = _monotonic()
    limit = _EXIT_TIMEOUT
    where = _leaving_where()
    comm = _channel()
    while comm is None and _chan is not None and _chan[1] is not None:  # MPI_Comm_idup still running
        if limit is not None and _monotonic() - t0 > limit:
            break
        time.sleep(0.01)
        comm = _channel()
    try:
        req = (comm if comm is not None else MPI.COMM_WORLD).Ibarrier()
    except Exception:
        return
    pause = 0.0005
    while not req.Test():
        now = _monotonic() - t0
        if not _notified and now > _EXIT_GRACE:
            _notify("exit", where)
        if limit is not None and now > limit:
            for fn in list(_BEFORE_REPORT):
                try:
                    fn()
                except Exception:
                    pass
            try:
                _emit(_prefix(
                    f"mpilocal: rank {_rank()} is exiting ({where}), but other ranks did not reach program exit "
                    f"within {limit:g} s (MPILOCAL_EXIT_TIMEOUT); they are probably waiting in a collective this "
                    f"rank left. Ending the job."))
                _before_end()
            finally:
                os._exit(1)
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    try:
        MPI.Request.Testall([r for r, _ in _SENT])
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------
# in-flight slot and watchdog
# ------------------------------------------------------------------------------------------------
# (operation, sequence number, Group or None, start time, deadline or None for _TIMEOUT)
_slot = None
_started = False
_SEQ = "mpilocal.seq"
_FINGERPRINT = None  # MPILOCAL_DEBUG=1: fn(name, seq, g, send, detail), registered by mpilocal.agreement


class _Clear:
    """Context manager returned by :func:`begin`: clears the in-flight slot on exit."""

    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        global _slot
        _slot = None
        return False


_CLEAR = _Clear()


def begin(name: str, g, send=None, detail=None, note=None) -> _Clear:
    """Record collective ``name`` on Group ``g`` as in flight; use as ``with begin(...): transport``.

    Hot path: a sequence-number increment, a clock read, the in-flight tuple and the flight
    recorder's tuple stored in its ring (about 0.2 µs; docs/failures.md). Under ``MPILOCAL_DEBUG=1``
    the ranks first agree on the collective's fingerprint (the check registered with
    :func:`register_fingerprint_check`; raises :class:`mpilocal.agreement.CollectiveMismatchError`).
    ``note``: what the flight recorder keeps outside debug mode (``detail`` is empty there): a tuple
    ``(reduce op or None, placements or None)``, built by the caller without formatting.
    """
    global _slot, _fr_n
    c = g.cache
    seq = c.get(_SEQ, 0) + 1
    c[_SEQ] = seq
    if seq == 1:
        _first_use(g)
    now = _monotonic()
    if _FR_SIZE:  # the flight recorder: one tuple stored in the preallocated ring (no array, no frame)
        n = _fr_n
        if send is None:
            _FR_RING[n % _FR_SIZE] = (name, c.get(_KEY), seq, now, None, None, None, detail or note,
                                      _call_site() if _FR_CALLS else None)
        else:
            _FR_RING[n % _FR_SIZE] = (name, c.get(_KEY), seq, now, send.nbytes, send.dtype, send.shape,
                                      detail or note, _call_site() if _FR_CALLS else None)
        _fr_n = n + 1
    if DEBUG and _FINGERPRINT is not None:
        _FINGERPRINT(name, seq, g, send, detail)
        now = _monotonic()
    if _WATCH:
        _slot = (name, seq, g, now, None)
        if not _started:
            _ensure_watchdog()
    return _CLEAR


def _first_use(g) -> None:
    """The first collective on Group ``g``: remember it for the leave notices, and name it (world
    ranks and mesh, the same on every member) for the flight recorder's records."""
    _USED.add(g)  # for the notice this rank sends when it leaves
    key = _group_key(g)
    if key not in _FR_GROUPS:
        _FR_GROUPS[key] = _world_ranks(g)


_FR_GROUPS: dict = {}  # group key -> its world ranks (every group this rank issued a collective on)
_PKG = os.path.dirname(os.path.abspath(__file__)) + os.sep
_getframe = sys._getframe


def _call_site():
    """(code object, line) of the innermost frame outside the mpilocal package: the user's call
    (MPILOCAL_FLIGHT_CALLSITE=1 or debug mode; a frame walk, about a microsecond). No frame is kept."""
    try:
        f = _getframe(2)
        while f is not None and f.f_code.co_filename.startswith(_PKG):
            f = f.f_back
    except ValueError:  # pragma: no cover - shallower than 2 frames
        return None
    return None if f is None else (f.f_code, f.f_lineno)


def set_flight_recorder(size: int, directory=None, call_site=None) -> None:
    """Set the flight recorder's ring size (``0``: off; ``MPILOCAL_FLIGHT_RECORDER``), optionally its
    dump directory (``MPILOCAL_FLIGHT_DIR``; ``""``: none) and whether every record has its call site
    (``MPILOCAL_FLIGHT_CALLSITE``). Empties the ring. Local to this rank."""
    global _FR_SIZE, _FR_RING, _fr_n, _FR_DIR, _FR_SITE, _FR_CALLS
    size = max(0, int(size))
    _FR_RING = [None] * size
    _fr_n = 0
    _FR_SIZE = size
    if directory is not None:
        _FR_DIR = directory or None
    if call_site is not None:
        _FR_SITE = bool(call_site)
    _FR_CALLS = _FR_SITE or DEBUG


def flight_settings() -> tuple:
    """``(size, directory or None, call sites on)``: the flight recorder's settings (for
    :func:`set_flight_recorder`)."""
    return _FR_SIZE, _FR_DIR, _FR_SITE


def flight_records() -> list:
    """This rank's flight recorder records, oldest first, as dicts (:func:`mpilocal.flight.record_dict`:
    group, op, seq, nbytes, dtype, shape, time, age_s, and detail / site where recorded)."""
    return flight_dump("records")["records"]


def flight_dump(reason: str) -> dict:
    """This rank's flight recorder as a JSON-ready dict (docs/failures.md, "Flight recorder")."""
    size, n, ring = _FR_SIZE, _fr_n, list(_FR_RING)
    now_m, now_w = _monotonic(), time.time()
    k = min(n, size)
    raw = [ring[i % size] for i in range(n - k, n)] if size else []
    groups, used = {}, []
    for _ in range(3):  # the watchdog thread dumps while the main thread may add a group
        try:
            used = list(_USED)
            break
        except RuntimeError:
            pass
    for g in used:
        try:
            key = g.cache.get(_KEY)
            if key is not None:
                groups[key] = {"members": _FR_GROUPS.get(key) or _world_ranks(g), "issued": g.cache.get(_SEQ, 0)}
        except Exception:
            pass
    s = _slot
    waiting = None
    if s is not None:
        g = s[2]
        key = g.cache.get(_KEY) if g is not None else None
        waiting = {"op": s[0], "seq": s[1], "group": key or (describe_group(g) if g is not None else None),
                   "for_s": now_m - s[3]}
    records = [_flight.record_dict(r, now_m, now_w) for r in raw if r is not None]
    for r in records:  # groups released since: members from their first use, count from the ring
        if r["group"] not in groups and r["group"] in _FR_GROUPS:
            groups[r["group"]] = {"members": _FR_GROUPS[r["group"]]}
    return {"format": _flight.FORMAT, "rank": _rank(), "world": _size(), "pid": os.getpid(),
            "host": socket.gethostname(), "reason": reason, "time": now_w, "ring_size": size,
            "issued_total": n, "waiting": waiting, "groups": groups, "records": records}


def _flight_write(dump) -> str:
    """Write ``dump`` to MPILOCAL_FLIGHT_DIR (when set); a line saying where, or why not."""
    if _FR_DIR is None:
        return ""
    try:
        path = _flight.write(_FR_DIR, dump)
        return f"flight recorder written to {path} (compare the ranks: python -m mpilocal flight {_FR_DIR})"
    except Exception as e:
        return f"flight recorder: could not write to {_FR_DIR}: {type(e).__name__}: {e}"


_FR_DUMPED = False  # this rank's ring was printed (or written) for the abort in progress


def _flight_once(reason: str) -> str:
    """:func:`flight_text`, once per process (an abort's report)."""
    global _FR_DUMPED
    if _FR_DUMPED:
        return ""
    _FR_DUMPED = True
    return flight_text(reason)


def flight_text(reason: str) -> str:
    """This rank's ring as text for a report (and written to MPILOCAL_FLIGHT_DIR); "" when off."""
    if not _FR_SIZE:
        return ""
    try:
        dump = flight_dump(reason)
        where = _flight_write(dump)
        hint = "" if _FR_DIR else "set MPILOCAL_FLIGHT_DIR=dir to compare the ranks with python -m mpilocal flight dir"
        return _flight.format_dump(dump, note=hint) + ("\n" + where if where else "")
    except Exception as e:  # pragma: no cover - a report must never fail
        return f"mpilocal flight recorder: could not dump ({type(e).__name__}: {e})"


def flight_verdict(g, comm, exc):
    """After a failed cross-rank check on Group ``g`` (a collective mismatch, an agreed argument
    error), with every rank of ``g`` at this call: all-gather the rings over ``comm`` (``g``'s
    control communicator), and attach to ``exc`` the report of where the ranks' collectives first
    differ, with this rank's ring (a note, printed with the traceback; also ``exc.flight_report``).
    Writes this rank's file to MPILOCAL_FLIGHT_DIR. **Collective** over ``g``, even with the
    recorder off (the ranks' settings may differ). Returns ``exc``."""
    dump = flight_dump(f"{type(exc).__name__} after a failed check on {_group_key(g)}") if _FR_SIZE else None
    count_control(g)
    try:
        with in_flight("flight recorder (all-gather of the rings after a failed check)", g):
            dumps = comm.allgather(dump)
    except Exception:  # pragma: no cover - the error itself is what matters
        return exc
    dumps = [d for d in dumps if d is not None]
    if dump is None or not dumps:
        return exc
    try:
        text = _flight.verdict_report(dumps, _rank(), _group_key(g))
        where = _flight_write(dump)
        if where:
            text += "\n" + where
    except Exception as e:  # pragma: no cover
        text = f"mpilocal flight recorder: could not compare the rings ({type(e).__name__}: {e})"
    try:
        exc.flight_report = text
        if hasattr(exc, "add_note"):
            exc.add_note(text)
        else:  # Python 3.10: notes are not printed; the report stays on exc.flight_report
            exc.__notes__ = list(getattr(exc, "__notes__", [])) + [text]
    except Exception:
        pass
    return exc


def waiting(name: str, g) -> _Clear:
    """Record a wait that is not a new collective (completing a posted request)."""
    global _slot
    if _WATCH:
        _slot = (name, g.cache.get(_SEQ, 0), g, _monotonic(), None)
        if not _started:
            _ensure_watchdog()
    return _CLEAR


class _Restore:
    __slots__ = ("prev",)

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        global _slot
        _slot = self.prev
        return False


def in_flight(name: str, g=None, members=None) -> _Restore:
    """``with in_flight("creating ...", g, members=...):`` puts a blocking MPI call other than a
    collective on array data (communicator creation, a control-communicator all-gather, ...) under
    the deadline; restores the previous slot after (the one place that saves and restores it).
    ``members``: the world ranks taking part (a list, or an mpi4py communicator), so that a rank
    which left the program is noticed; the call must complete on no rank before all members entered
    it (communicator creation, an all-reduce)."""
    global _slot
    r = _Restore()
    r.prev = _slot
    if _WATCH:
        _slot = (name, 0 if g is None else g.cache.get(_SEQ, 0), g, _monotonic(), None, members)
        _ensure_watchdog()
    return r


_ASYNC: list = []          # [what, seq, group, t0, done, check_error, abort]
_ASYNC_LOCK = threading.Lock()
_ABORT_HOOKS: list = []


def register_abort_hook(fn) -> None:
    """``fn(group_or_None)`` runs (in the watchdog thread) just before a deadline abort, e.g. to
    ``abort()`` the NCCL communicator of that group so the GPU work stops. Exceptions are ignored."""
    if fn not in _ABORT_HOOKS:
        _ABORT_HOOKS.append(fn)


def watch_async(name: str, g, done, check_error=None, abort_fn=None) -> None:
    """Watch asynchronous work (e.g. a NCCL collective enqueued on a stream) until ``done()`` is
    true. The watchdog polls ``done()`` and ``check_error()`` (returns/raises an error for an
    asynchronous failure, e.g. ``NcclCommunicator.check_async_error``); on error, or when the work
    is older than ``MPILOCAL_TIMEOUT``, it calls ``abort_fn()`` (e.g. ``NcclCommunicator.abort``)
    and the abort hooks, reports rank / operation / sequence number / group, and aborts the job."""
    if _TIMEOUT is None and check_error is None:
        return
    seq = g.cache.get(_SEQ, 0) if g is not None else 0
    with _ASYNC_LOCK:
        _ASYNC.append([name, seq, g, _monotonic(), done, check_error, abort_fn])
    _ensure_watchdog()


class _StreamWatch:
    """The deadline's view of the NCCL work one communicator enqueued on one CUDA stream, at a
    fixed cost per call: two reusable events, no per-call allocation, closure or lock.

    A stream runs its work in order, so an event recorded after a call is done exactly when that
    call and every earlier one on the stream are. ``probe`` is recorded at a call when it is free
    (never recorded, or its last record is done: this thread queries it, at most once a millisecond)
    and then left alone until it is done, so a probe that is still pending ``MPILOCAL_TIMEOUT`` after its call means
    that call (or an earlier one) has been pending that long. ``latest`` is re-recorded at every
    other call, so that work issued while the probe is busy is watched too (a call that hangs after
    the probe's call completed, with no call after it). ``p`` / ``l`` hold ``(start time, name,
    seq, group)`` of the call each event was last recorded at, or None; the issuing thread alone
    writes them, clearing one before it re-records its event; the watchdog reads each before and
    after querying the event and trusts the query only when the tuple is the same object. No
    false alarm: an event pending past the deadline is a call pending past it. No missed hang: a
    call that never completes leaves the event recorded at or after it pending.

    ``probe`` / ``latest``: objects with ``record(stream)`` and a ``done`` property
    (``cupy.cuda.Event``; tests pass fakes); ``device``: a context manager that makes the
    events' device current in the watchdog thread (or None); ``check``: the communicator's
    ``check_async_error`` (or None); ``abort_fn``: its ``abort`` (or None)."""

    __slots__ = ("probe", "latest", "device", "check", "abort_fn", "p", "l")

    def __init__(self, probe, latest, device=None, check=None, abort_fn=None):
        self.probe, self.latest, self.device, self.check, self.abort_fn = probe, latest, device, check, abort_fn
        self.p = self.l = None

    def issued(self, name, seq, g, stream, now) -> None:
        """Called by the issuing thread right after enqueuing collective ``name`` on ``stream``. The
        probe is queried only when its record is at least ``_PROBE_EVERY`` old (a tight loop pays
        one event record per call, and a query once a millisecond)."""
        p = self.p
        if p is not None:
            if now - p[0] < _PROBE_EVERY or not self.probe.done:  # probe recent or busy: `latest` notes this call
                self.l = None
                self.latest.record(stream)
                self.l = (now, name, seq, g)
                return
            self.p = None
        self.l = None  # the probe recorded now covers everything `latest` covered
        self.probe.record(stream)
        self.p = (now, name, seq, g)

    def _done(self, ev) -> bool:
        """``ev.done`` queried from the watchdog thread (with the events' device current)."""
        if self.device is None:
            return bool(ev.done)
        with self.device:
            return bool(ev.done)

    def poll(self, now, limit):
        """Watchdog: ``None`` when all is well, else ``((name, seq, group), error text or None)``
        for a call pending longer than ``limit`` seconds, or an asynchronous error (polled, as
        ``check_async_error`` should be, only while work is in flight)."""
        busy, stale = False, None
        for which, ev in (("p", self.probe), ("l", self.latest)):
            a = getattr(self, which)
            if a is None:
                continue
            try:
                done = self._done(ev)
            except Exception:  # no verdict (e.g. CUDA shutting down)
                continue
            if done or getattr(self, which) is not a:  # done, or re-recorded meanwhile: no verdict
                continue
            busy = True
            if stale is None and limit is not None and now - a[0] > limit:
                stale = a
        if not busy:
            return None
        err = None
        if self.check is not None:
            try:
                r = self.check()
                if r:
                    err = str(r)
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
        if err is not None:
            a = stale or self.p or self.l
            return ((a[1], a[2], a[3]) if a is not None else ("asynchronous GPU work", 0, None)), err
        return ((stale[1], stale[2], stale[3]), None) if stale is not None else None

    def busy(self) -> bool:
        """Watchdog: whether an event is still pending (queried)."""
        for which, ev in (("p", self.probe), ("l", self.latest)):
            if getattr(self, which) is not None:
                try:
                    if not self._done(ev):
                        return True
                except Exception:
                    pass
        return False


_PROBE_EVERY = 1e-3         # seconds between queries of a stream watch's probe by the issuing thread
_STREAM_WATCHES: dict = {}  # (stream pointer, id(communicator)) -> _StreamWatch
_cp = None                  # the cupy module, imported on the first watch_cuda


def watch_cuda(name: str, g, stream=None, comm=None) -> None:
    """Watch GPU work just enqueued on ``stream`` (default: the current CuPy stream) for collective
    ``name`` on Group ``g``, with ``comm.check_async_error`` / ``comm.abort`` when ``comm`` (e.g. a
    ``cupy.cuda.nccl`` ``NcclCommunicator``) is given. Call it right after enqueuing a NCCL
    collective. The watchdog aborts the job (after ``comm.abort()`` and the abort hooks) when the
    work has been pending longer than ``MPILOCAL_TIMEOUT``, or ``check_async_error`` raises,
    reporting rank / operation / sequence number / group. Per call: one event query and one event
    record on the stream (:class:`_StreamWatch`)."""
    if _TIMEOUT is None and comm is None:
        return
    global _cp
    cp = _cp
    if cp is None:
        import cupy as cp

        _cp = cp
    if stream is None:
        stream = cp.cuda.get_current_stream()
    key = (stream.ptr, id(comm))
    w = _STREAM_WATCHES.get(key)
    if w is None:
        w = _new_stream_watch(key, cp, comm)
    w.issued(name, g.cache.get(_SEQ, 0) if g is not None else 0, g, stream, _monotonic())


def _new_stream_watch(key, cp, comm) -> _StreamWatch:
    dev = cp.cuda.Device()

    def event():
        return cp.cuda.Event(block=False, disable_timing=True, interprocess=False)

    check = getattr(comm, "check_async_error", None)
    if check is not None:
        raw = check

        def check():
            with dev:  # the watchdog thread has its own current device
                raw()  # raises NcclError on an asynchronous failure
            return None

    w = _StreamWatch(event(), event(), dev, check, getattr(comm, "abort", None))
    with _ASYNC_LOCK:
        _STREAM_WATCHES[key] = w
    _ensure_watchdog()
    return w


def _ensure_watchdog():
    global _started
    if _started:
        return
    _started = True
    t = threading.Thread(target=_watchdog, name="mpilocal-watchdog", daemon=True)
    t.start()


def _poll_interval():
    t = _TIMEOUT or 60.0
    p = min(1.0, max(0.02, t / 20))
    return min(p, _TICK) if _chan is not None or _WAKE is not None else p


def _watchdog():
    while True:
        sigs = _wait_tick(_poll_interval())
        try:
            s = _slot
            if sigs and signal.SIGINT in sigs:
                _on_sigint(s)
            if (sigs and signal.SIGTERM in sigs) or _SIGTERM_AT is not None:
                if _SIGTERM_AT is not None and _monotonic() - _SIGTERM_AT > 1.0:
                    _terminated("mpilocal: terminated (SIGTERM); the main thread did not handle it within a second, "
                                "it is at:\n" + _main_stack())
                _on_sigterm(s)
            if s is not None:
                held = _monotonic() - s[3]
                limit = s[4] if s[4] is not None else _TIMEOUT
                if limit is not None and held > limit and _slot is s:
                    _fire(s[0], s[1], s[2], limit, None, None)
                elif held >= _TICK and _chan is not None:  # blocked for a tick: did someone leave?
                    _receive_notices()
                    left = _left_rank_for(s) if _LEFT else None
                    if left is not None and _slot is s:
                        _fire_left(s, *left)
            elif _FR_DIR is not None and _chan is not None and not _FR_DUMPED:
                _flight_on_abort_notice()
            if _ASYNC or _STREAM_WATCHES:
                _poll_async()
        except Exception:  # pragma: no cover - the watchdog must never die
            pass


def _flight_on_abort_notice() -> None:
    """With MPILOCAL_FLIGHT_DIR set, the watchdog also reads the leave channel while the main thread
    runs Python code: when another rank aborts the job, this rank (which may be the one that skipped
    a collective: it waits in none) prints its ring and writes its file before MPI_Abort ends it."""
    _receive_notices()
    for r, note in sorted(_LEFT.items()):
        if note.get("kind") == "abort" and _slot is None:
            for fn in list(_BEFORE_REPORT):
                try:
                    fn()
                except Exception:
                    pass
            ring = _flight_once(f"rank {r} ended the job: {_reason(note.get('where', '?'))}")
            _emit(_prefix(f"mpilocal: rank {r} is ending the job ({note.get('where', '?')}); this rank is not waiting "
                          f"in a collective\n" + ring))
            return


_POLL_LOCK = threading.Lock()  # held while the watchdog polls: forget_group waits for a poll to end


def forget_group(g) -> None:
    """Stop watching Group ``g``'s asynchronous work before its communicator is freed (after any
    poll in progress, so no freed NCCL communicator is polled). Called by the release hook that
    :mod:`mpilocal.agreement` registers with :func:`mpilocal.transport.release`."""
    with _POLL_LOCK, _ASYNC_LOCK:
        _ASYNC[:] = [it for it in _ASYNC if it[2] is not g]
        for k, w in list(_STREAM_WATCHES.items()):
            if any(a is not None and a[3] is g for a in (w.p, w.l)):
                del _STREAM_WATCHES[k]


def _poll_async():
    with _POLL_LOCK:
        _poll_async_locked()


def _poll_async_locked():
    now = _monotonic()
    with _ASYNC_LOCK:
        items = list(_ASYNC)
    for it in items:
        name, seq, g, t0, done, check_error, abort_fn = it
        try:
            finished = bool(done())
        except Exception:
            finished = False
        err = None
        if check_error is not None:
            try:
                r = check_error()
                if r:
                    err = str(r)
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
        if err is None and finished:
            with _ASYNC_LOCK:
                if it in _ASYNC:
                    _ASYNC.remove(it)
            continue
        if err is not None or (_TIMEOUT is not None and now - t0 > _TIMEOUT):
            _fire(name, seq, g, _TIMEOUT, err, abort_fn)
    with _ASYNC_LOCK:
        watches = list(_STREAM_WATCHES.values())
    for w in watches:
        r = w.poll(now, _TIMEOUT)
        if r is not None:
            (name, seq, g), err = r
            _fire(name, seq, g, _TIMEOUT, err, w.abort_fn)


_DESCRIBERS: list = []


def register_describer(fn) -> None:
    """``fn(comm)`` names an mpi4py communicator in deadline and mismatch reports (e.g. ``"mesh dim 0
    of mesh [0, 1]"``), or returns None when it does not know it. The mesh registers one, so that this
    module needs no knowledge of meshes. Exceptions are ignored."""
    if fn not in _DESCRIBERS:
        _DESCRIBERS.append(fn)


def describe_group(g) -> str:
    """World ranks of a Group and, when a describer knows its communicator (a mesh dim, ...), what it is."""
    if g is None:
        return "MPI.COMM_WORLD"
    try:
        ranks = g.comm.Get_group().Translate_ranks(list(range(g.size)), MPI.COMM_WORLD.Get_group())
        text = f"group of world ranks {list(ranks)}"
    except Exception:
        text = f"group of size {g.size}"
    for fn in list(_DESCRIBERS):
        try:
            what = fn(g.comm)
        except Exception:
            what = None
        if what:
            return f"{text} ({what})"
    return text


def _main_stack() -> str:
    try:
        frame = sys._current_frames().get(threading.main_thread().ident)
        if frame is None:
            return ""
        return "".join(traceback.format_stack(frame))
    except Exception:
        return ""


def _fire(name, seq, g, limit, err, abort_fn):
    what = (f"{name}#{seq}" if seq else name) + (f" on {describe_group(g)}" if g is not None else "")
    if err is not None:
        head = f"mpilocal: {what} failed asynchronously: {err}"
    else:
        if DEBUG:  # fingerprints passed so far: no rank that got here called a different collective
            why = ("another rank probably raised, exited early, or is still busy elsewhere (debug mode is on: the "
                   "collectives issued so far matched)")
        else:
            why = ("another rank probably raised, exited early, or called a different collective "
                   "(MPILOCAL_DEBUG=1 checks that)")
        head = f"mpilocal: {what} did not complete within {limit:g} s (MPILOCAL_TIMEOUT); {why}. Aborting the MPI job."
    stack = _main_stack()
    msg = head + ("\nthis rank is waiting at:\n" + stack if stack else "")
    if _INTERCEPT is not None:  # tests: record the report instead of ending the job
        _INTERCEPT.append(msg)
        return
    for fn in ([abort_fn] if abort_fn else []) + list(_ABORT_HOOKS):
        try:
            fn() if fn is abort_fn else fn(g)
        except Exception:
            pass
    abort(1, msg)


# ------------------------------------------------------------------------------------------------
# for the layers above: sequence numbers, control-operation counts, the fingerprint check
# ------------------------------------------------------------------------------------------------
def sequence(g) -> int:
    """How many collectives this rank has begun on Group ``g`` (the number of the current one)."""
    return g.cache.get(_SEQ, 0)


def count_control(g) -> None:
    """Count one operation on ``g``'s control communicator (agreements, fingerprints), for the leave
    notices: a rank that left after fewer of them never joins the one this rank waits in."""
    n = g.cache.get(_CTLN, 0) + 1
    g.cache[_CTLN] = n
    if n == 1:
        _USED.add(g)


def register_fingerprint_check(fn) -> None:
    """Under ``MPILOCAL_DEBUG=1`` :func:`begin` calls ``fn(name, seq, g, send, detail)`` before each
    collective (:func:`mpilocal.agreement.check_fingerprint`, registered when that module loads)."""
    global _FINGERPRINT
    _FINGERPRINT = fn
