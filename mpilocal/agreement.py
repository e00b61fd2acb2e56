"""Agreement among the ranks of a group: control communicators, collective fingerprints and argument
agreement (layer 3; see docs/architecture.md).

- **Control communicators.** :func:`control_comm` is a private duplicate of a Group's communicator
  for mpilocal's own checks, so they never match a user's or a transport's messages. Its operations
  run under the deadline (:func:`mpilocal.deadline.in_flight`) and are counted for the leave notices
  (:func:`mpilocal.deadline.count_control`); the release hook registered here frees it with the
  Group (:func:`mpilocal.transport.release`).
- **Collective-mismatch detection** (``MPILOCAL_DEBUG=1``): before each collective the ranks of the
  group all-gather a fixed-size fingerprint (operation, sequence number, dtype, the shape parts that
  must agree, reduce op, root, dims/sizes) over the control communicator; on mismatch every rank
  raises :class:`CollectiveMismatchError` with a diff. :func:`mpilocal.deadline.begin` runs the check
  (registered here with :func:`mpilocal.deadline.register_fingerprint_check`), and the transports
  fingerprint the MPI/NCCL call they make (:func:`mpilocal.transport.issuing`, which calls
  :func:`check_call`, registered here).
- **Rank-divergent input becomes one error on all ranks**: :func:`agree` gathers each rank's verdict
  on its arguments (plus shape/dtype metadata) and raises the same error everywhere; :class:`agreed`
  wraps a block of local checks in it. ``MPILOCAL_CHECK_ARGS=0`` skips it.
"""

from __future__ import annotations

import atexit
import functools
import zlib

import numpy as np
from mpi4py import MPI

from . import deadline, debug, transport
from .metadata import META_WIDTH

__all__ = [
    "CollectiveMismatchError", "control_comm", "fingerprint", "check_fingerprint", "check_call", "agree", "agreed",
]

# MPILOCAL_CHECK_ARGS=0 skips the cross-rank agreement of the public funcol functions' arguments
# (one small all-gather per call): latency-critical code trades "the same error on every rank" for
# "a rank whose arguments fail raises alone; the others are ended by the deadline".
_CHECK_ARGS = deadline.env_flag("MPILOCAL_CHECK_ARGS", True)
_CTL = "mpilocal.ctl"


def control_comm(g):
    """A duplicate of ``g.comm`` for mpilocal's own checks (cached; collective on first use)."""
    c = g.cache.get(_CTL)
    if c is None:
        deadline.count_control(g)
        deadline.settle_channel()
        with deadline.in_flight("creating the control communicator", g):
            c = g.cache[_CTL] = g.comm.Dup()
    return c


def _ctl_allgather(g, buf, what):
    ctl = control_comm(g)
    deadline.count_control(g)
    recv = np.empty((g.size,) + buf.shape, dtype=buf.dtype)
    with deadline.in_flight(what, g):
        ctl.Allgather(buf, recv)
    return recv


def _release(g) -> None:
    """Release hook of :func:`mpilocal.transport.release`: the watchdog lets go of ``g`` first, then
    ``g``'s control communicator is freed."""
    deadline.forget_group(g)
    ctl = g.cache.pop(_CTL, None)
    if ctl is not None:
        ctl.Free()


def _world_rank(g, r):
    try:
        return g.comm.Get_group().Translate_ranks([r], MPI.COMM_WORLD.Get_group())[0]
    except Exception:
        return r



# ------------------------------------------------------------------------------------------------
# MPILOCAL_DEBUG=1: collective fingerprints
# ------------------------------------------------------------------------------------------------
class CollectiveMismatchError(RuntimeError):
    """Ranks of one group were about to run different collectives (raised on every rank)."""


_FP_TEXT = 248
_FP_BYTES = 8 + _FP_TEXT
# which part of the send shape must agree across ranks
_SHAPE_AGREES = {"all_reduce": "all", "broadcast": "all", "reduce_scatter_tensor": "all",
                 "all_gather_into_tensor": "tail", "all_to_all_single": "none", "scatter": "root"}


def fingerprint(name, seq, send, detail) -> tuple[str, str]:
    """(key that must agree, text to show) of one collective."""
    parts = []
    shown = []
    rule = _SHAPE_AGREES.get(name, "none")
    if send is not None and rule != "root":  # "root": only the root has a send buffer (scatter)
        dt = str(send.dtype)
        shape = tuple(send.shape)
        if rule == "all":
            parts.append(f"shape={shape}")
        elif rule == "tail":
            parts.append(f"shape[1:]={shape[1:]}")
        parts.append(dt)
        shown += [f"shape={shape}", dt]
    det = ", ".join(f"{k}={v}" for k, v in sorted((detail or {}).items()))
    if det:
        parts.append(det)
        shown.append(det)
    key = f"{name}#{seq}(" + ", ".join(parts) + ")"
    text = f"{name}#{seq}(" + ", ".join(shown) + ")"
    return key, text


def check_fingerprint(name, seq, g, send=None, detail=None) -> None:
    """All-gather this collective's fingerprint over ``g``'s control communicator; raise
    :class:`CollectiveMismatchError` on every rank if they differ. **Collective.**"""
    if g.size == 1:
        return
    key, text = fingerprint(name, seq, send, detail)
    buf = np.zeros(_FP_BYTES, dtype=np.uint8)
    buf[:8] = np.frombuffer(np.uint64(zlib.crc32(key.encode()) | (len(key) << 32)).tobytes(), np.uint8)
    raw = text.encode()[:_FP_TEXT]
    buf[8:8 + len(raw)] = np.frombuffer(raw, np.uint8)
    rows = _ctl_allgather(g, buf, f"fingerprint of {name}")
    hashes = [bytes(r[:8]) for r in rows]
    if all(h == hashes[0] for h in hashes):
        return
    texts = [bytes(r[8:]).rstrip(b"\0").decode(errors="replace") for r in rows]
    odd = next(i for i, h in enumerate(hashes) if h != hashes[0])
    w0, wo = _world_rank(g, 0), _world_rank(g, odd)
    all_lines = "\n".join(f"  rank {_world_rank(g, i)}: {t}" for i, t in enumerate(texts))
    raise deadline.flight_verdict(g, control_comm(g), CollectiveMismatchError(  # + the ranks' flight recorders
        f"collective mismatch on {deadline.describe_group(g)}: rank {w0} runs {texts[0]} but rank {wo} runs {texts[odd]}; "
        f"every rank of a group must issue the same collectives in the same order (MPILOCAL_DEBUG=1).\n{all_lines}"
    ))


def check_call(g, call, detail=None) -> None:
    """MPILOCAL_DEBUG=1: fingerprint the MPI/NCCL call a transport is about to make (``call`` and the
    group-wide part of its arguments) under the current collective's sequence number; raises
    :class:`CollectiveMismatchError` on every rank when ranks are about to make different calls."""
    if g.size > 1 and deadline.debug_enabled():
        check_fingerprint(call, deadline.sequence(g), g, None, detail)


# ------------------------------------------------------------------------------------------------
# agreeing on argument checks
# ------------------------------------------------------------------------------------------------
_MSG_BYTES = 240
_EXC_TYPES = {"TypeError": TypeError, "ValueError": ValueError, "NotImplementedError": NotImplementedError,
              "RuntimeError": RuntimeError, "IndexError": IndexError}


def agree(g, caller: str, err, meta=None, what: str = "argument_check"):
    """Collective over Group ``g``: every rank contributes its verdict on its arguments (``err``: the
    exception its local checks raised, or None) and optionally a metadata vector ``meta`` (int64,
    :data:`mpilocal.metadata.META_WIDTH` entries, as :func:`mpilocal.metadata.meta_vector`). If any
    rank failed, **every** rank raises: its own exception, or one of the same type naming the failing
    rank and its message. Returns the gathered metadata rows (``(g.size, META_WIDTH)`` int64)
    otherwise (None for one rank)."""
    on_debug = deadline.debug_enabled()
    if g.size == 1 or not (_CHECK_ARGS or on_debug):
        if err is not None:
            raise err
        return None
    if on_debug:  # which public function each rank is in
        check_fingerprint(f"{caller} ({what})", deadline.sequence(g) + 1, g)
    buf = np.zeros(META_WIDTH + 1 + _MSG_BYTES // 8, dtype=np.int64)
    if meta is not None:
        buf[:META_WIDTH] = meta
    if err is not None:
        buf[META_WIDTH] = 1
        raw = f"{type(err).__name__}\0{err}".encode()[:_MSG_BYTES]
        buf[META_WIDTH + 1:].view(np.uint8)[:len(raw)] = np.frombuffer(raw, np.uint8)
    if debug.ACTIVE:
        debug.record_metadata(what, buf.nbytes)
    rows = _ctl_allgather(g, buf, f"{caller} ({what})")
    failed = np.flatnonzero(rows[:, META_WIDTH])
    if failed.size:
        if err is not None:
            raise deadline.flight_verdict(g, control_comm(g), err)  # + the ranks' flight recorders
        r = int(failed[0])
        raw = rows[r, META_WIDTH + 1:].copy().view(np.uint8).tobytes().rstrip(b"\0").decode(errors="replace")
        tname, _, msg = raw.partition("\0")
        etype = _EXC_TYPES.get(tname, ValueError)
        raise deadline.flight_verdict(g, control_comm(g), etype(
            f"{caller}: rank {_world_rank(g, r)} rejected its arguments ({len(failed)} rank(s) failed "
            f"the checks, so every rank raises): {msg}"))
    return rows[:, :META_WIDTH]


class agreed:
    """``with agreed(g, caller): <local argument checks>`` — the checks' verdict is agreed over
    Group ``g`` (:func:`agree`) when the block ends, so a check that fails on some ranks only raises
    on every rank. ``g=None``: no agreement (a plain block). **Collective** over ``g``."""

    __slots__ = ("g", "caller")

    def __init__(self, g, caller: str):
        self.g, self.caller = g, caller

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.g is None or (exc_type is not None and not issubclass(exc_type, Exception)):
            return False
        agree(self.g, self.caller, exc)  # raises exc itself, or the failing rank's error
        return False


deadline.register_fingerprint_check(check_fingerprint)  # begin() checks fingerprints under MPILOCAL_DEBUG=1
transport.register_call_check(check_call)  # transport.issuing(): the MPI/NCCL call a transport makes
transport.register_release_hook("05-agreement", _release)  # first: the watchdog lets go; control comm


# ------------------------------------------------------------------------------------------------
# the default path of the public collectives: a speculative signature check (issue 11)
# ------------------------------------------------------------------------------------------------
# Each public funcol call hashes what decides its data collective (function, array kind, dtype,
# shape, parameters) into a 63-bit signature. Every rank posts the same fixed-size reduction of
#   [h, -h] (fast slot), [h, -h] (slow slot), -slow, -error      (MIN; 48 bytes, whatever the world)
# over the group's control communicator. A rank whose signature is the one *predicted* from the
# history of agreed signatures (identical on every rank: it only grows from agreed values) is
# "fast": it issues its data collective at once and completes the reduction after it, before the
# result is returned. Any other rank ("slow": a new signature, or failed local checks) first
# completes the reduction; where fast ranks exist it replays the predicted call on dummy data, so
# that theirs completes (fast ranks all run the same call: the predicted one), and then every rank
# runs the full blocking agreement (:func:`agree`), which raises the same error everywhere or, for
# rank-varying sizes, gives the rows. Every rank sees the same reduced vector, so all take the same
# branch: never a data collective chosen from one rank's data, a divergent argument raises on every
# rank. Where every rank is slow with one signature and no error, the call is agreed with that one
# small reduction and its signature joins the history.
_SIG_KEY = "mpilocal.sig"
_BIG = np.iinfo(np.int64).max
_HIST = 64
_SIG_CACHE: dict = {}

#: outcomes of :meth:`SigCheck.outcome`
OK, AGREED, DIAGNOSE = "ok", "agreed", "diagnose"
#: how often each outcome occurred on this rank (``"fast"``: OK; tests read it, nothing else does)
SIG_STATS = {"fast": 0, AGREED: 0, DIAGNOSE: 0}


def signature(desc) -> int:
    """A 63-bit hash of ``desc`` (a tuple of ints, strings, dtypes, shapes; the same on every rank
    for the same call), cached."""
    h = _SIG_CACHE.get(desc)
    if h is None:
        import hashlib

        h = int.from_bytes(hashlib.blake2b(repr(desc).encode(), digest_size=8).digest(), "little") >> 1
        if len(_SIG_CACHE) >= 4096:
            _SIG_CACHE.clear()
        _SIG_CACHE[desc] = h
    return h


_PAIR_TAG = 7711  # the signature exchange of a 2-rank group on its control communicator (no other
                  # point-to-point message uses this tag there)


class _PairMin:
    """The signature MIN of a 2-rank group as a persistent request: ``Start`` sends this rank's vector
    and receives the other's (``MPI_Send_init`` / ``MPI_Recv_init``, started together; MPI moves
    them inside any MPI call, where Open MPI 4.1's libnbc advances an ``MPI_Iallreduce`` only while
    polled); ``Wait`` completes both and takes the elementwise minimum: the same vector as the
    all-reduce, on both ranks. Messages of one pair match in order (MPI's non-overtaking rule)."""

    __slots__ = ("reqs", "send", "other", "recv", "Start")

    def __init__(self, ctl, send, recv):
        peer = 1 - ctl.Get_rank()
        self.send, self.recv, self.other = send, recv, np.zeros_like(recv)
        self.reqs = [ctl.Send_init(send, peer, _PAIR_TAG), ctl.Recv_init(self.other, peer, _PAIR_TAG)]
        self.Start = functools.partial(MPI.Prequest.Startall, self.reqs)  # (no Python frame per call)

    def Wait(self):
        MPI.Request.Waitall(self.reqs)
        np.minimum(self.send, self.other, out=self.recv)

    def Free(self):
        for r in self.reqs:
            r.Free()


class _SigState:
    """Per Group: the reduction's buffers and request, and the agreed history."""

    __slots__ = ("send", "recv", "req", "persistent", "hist", "replays", "pending", "pred")

    def __init__(self, g):
        ctl = control_comm(g)
        self.send = np.zeros(6, np.int64)
        self.recv = np.zeros(6, np.int64)
        self.req = None
        self.persistent = False
        if g.size == 2:  # one exchange each way and a local MIN (see _PairMin); chosen from the size
            self.req = _PairMin(ctl, self.send, self.recv)
            self.persistent = True
        else:
            self._collective(ctl)
        self.hist: list = []  # agreed signatures, oldest first
        self.replays: dict = {}  # signature -> callable replaying its data collective on dummy data
        self.pending = None
        self.pred = None

    def _collective(self, ctl):
        try:  # MPI-4 persistent collective: starting it costs less than building an Iallreduce
            self.req = ctl.Allreduce_init(self.send, self.recv, MPI.MIN)
            self.persistent = True
        except (NotImplementedError, AttributeError):
            pass
        except MPI.Exception as e:  # an MPI-3.1 build that has the name but not the call
            if e.Get_error_class() != MPI.ERR_UNSUPPORTED_OPERATION:
                raise

    def predicted(self):
        return self.pred

    def _predict(self):
        """The next call, from the agreed history alone (so the same on every rank): what followed
        the last time the two latest calls occurred in a row (a cycle of calls, a run of one call),
        else what followed the latest call the last time, else the latest call again."""
        hist = self.hist
        n = len(hist)
        if n == 0:
            return None
        last = hist[-1]
        if n >= 2:
            prev = hist[-2]
            for i in range(n - 2, 0, -1):
                if hist[i] == last and hist[i - 1] == prev:
                    return hist[i + 1]
        for i in range(n - 2, -1, -1):
            if hist[i] == last:
                return hist[i + 1]
        return last

    def remember(self, h, replay):
        hist = self.hist
        if replay is None and h == self.pred and len(hist) >= 2 and hist[-1] == h and hist[-2] == h:
            # a run of one call goes on: the prediction stays h (what _predict would find)
            hist.append(h)
            if len(hist) > _HIST:
                del hist[0]
            return
        hist.append(h)
        if replay is not None:
            self.replays[h] = replay
        if len(hist) > _HIST:
            del hist[:len(hist) - _HIST]
            if len(self.replays) > 2 * _HIST:
                keep = set(hist)
                self.replays = {k: v for k, v in self.replays.items() if k in keep}
        self.pred = self._predict()

    def free(self):
        if self.pending is not None:
            self.pending.Wait()
            self.pending = None
        if self.persistent and self.req is not None:
            self.req.Free()
        self.req = None


def _sig_state(g) -> _SigState:
    st = g.cache.get(_SIG_KEY)
    if st is None:
        deadline.count_control(g)
        with deadline.in_flight("creating the argument-signature request", g):
            st = g.cache[_SIG_KEY] = _SigState(g)
        _SIG_STATES.append(st)
    return st


_WAIT_NAMES: dict = {}  # caller -> the name of its signature wait (for deadline reports)


def _wait_name(caller: str) -> str:
    what = _WAIT_NAMES.get(caller)
    if what is None:
        what = _WAIT_NAMES[caller] = f"{caller} (argument signature)"
    return what


class SigCheck:
    """A posted signature reduction (:func:`post_signature`); ``fast``: this rank may issue its data
    collective before completing it."""

    __slots__ = ("g", "st", "h", "fast", "caller", "done")

    def __init__(self, g, st, h, fast, caller):
        self.g, self.st, self.h, self.fast, self.caller, self.done = g, st, h, fast, caller, False

    def wait(self):
        if not self.done:
            st = self.st
            with deadline.waiting(_wait_name(self.caller), self.g):
                st.pending.Wait()
            st.pending = None
            self.done = True
        return self.st.recv

    def outcome(self) -> str:
        """OK (every rank fast: the result stands), AGREED (every rank slow with one signature and no
        error: run the call) or DIAGNOSE (anything else: slow ranks replay the predicted call where
        fast ranks exist, then every rank runs the full agreement). The same on every rank."""
        r = self.wait()
        if r[4] == 0:  # every rank was fast: the call joins the history (the same on every rank)
            SIG_STATS["fast"] += 1
            self.st.remember(self.h, None)
            return OK
        if r[0] == _BIG and r[5] == 0 and r[2] == -r[3]:
            SIG_STATS[AGREED] += 1
            return AGREED
        SIG_STATS[DIAGNOSE] += 1
        return DIAGNOSE

    def must_replay(self) -> bool:
        """DIAGNOSE with fast ranks present, on a slow rank: replay the predicted call first."""
        return not self.fast and self.st.recv[0] != _BIG

    def replay(self):
        st = self.st
        f = st.replays.get(st.predicted())
        if f is None:  # pragma: no cover - a fast rank exists only for a remembered signature
            raise RuntimeError(f"{self.caller}: internal error: no replay for the predicted collective")
        f()

    def remember(self, replay):
        self.st.remember(self.h, replay)


def post_signature(g, caller: str, h) -> SigCheck:
    """Post this rank's signature ``h`` (None: its local checks failed) over Group ``g``'s control
    communicator (collective, non-blocking, fixed size). See the section comment above."""
    st = _sig_state(g)
    if st.pending is not None:  # left by a call that raised in its data collective
        st.pending.Wait()
        st.pending = None
    fast = h is not None and h == st.pred
    v = st.send
    if fast:
        _fast_vector(v, h)
    elif h is None:
        v[0], v[1], v[2], v[3], v[4], v[5] = _BIG, _BIG, _BIG, _BIG, -1, -1
    else:
        v[0], v[1], v[2], v[3], v[4], v[5] = _BIG, _BIG, h, -h, -1, 0
    _start(g, st)
    return SigCheck(g, st, h, fast, caller)


def _fast_vector(v, h) -> None:
    """A fast rank's vector: its signature in the fast slot, nothing slow, no error."""
    v[0], v[1], v[2], v[3], v[4], v[5] = h, -h, _BIG, _BIG, 0, 0


def _start(g, st) -> None:
    """Start the reduction of ``st.send`` (the one place that posts it)."""
    if debug.ACTIVE:
        debug.record_metadata("signature", 48)
    deadline.count_control(g)
    if st.persistent:
        st.req.Start()
        st.pending = st.req
    else:
        st.pending = control_comm(g).Iallreduce(st.send, st.recv, MPI.MIN)


def speculate(g, caller: str, h, run, x):
    """The steady state of the signature check in one call: when ``h`` is the predicted signature,
    post it, run ``run(x, None)`` (the data collective) and complete the reduction; if every rank
    was fast, return ``(True, result)``. Otherwise ``(False, check)``: ``check`` is the posted
    :class:`SigCheck` (None when nothing was posted: ``h`` is not the prediction), for the general
    protocol of :func:`mpilocal.functional.checked`."""
    st = g.cache.get(_SIG_KEY)
    if st is None or h is None or h != st.pred or st.pending is not None:
        return False, None
    _fast_vector(st.send, h)
    _start(g, st)
    out = run(x, None)
    with deadline.waiting(_WAIT_NAMES.get(caller) or _wait_name(caller), g):
        st.pending.Wait()
    st.pending = None
    if st.recv[4] == 0:  # every rank was fast: the result stands
        SIG_STATS["fast"] += 1
        st.remember(h, None)
        return True, out
    chk = SigCheck(g, st, h, True, caller)
    chk.done = True
    chk.outcome()  # DIAGNOSE (counted): another rank was slow
    return False, chk


def signature_checks() -> bool:
    """Whether the public collectives use the signature check (the default): off under
    ``MPILOCAL_CHECK_ARGS=0`` (no check) and under ``MPILOCAL_DEBUG=1`` (the full agreement on
    every call)."""
    return _CHECK_ARGS and not deadline.DEBUG


_SIG_STATES: list = []


def _release_sig(g) -> None:
    st = g.cache.pop(_SIG_KEY, None)
    if st is not None:
        st.free()
        if st in _SIG_STATES:
            _SIG_STATES.remove(st)


@atexit.register
def _free_sig_states():  # before mpi4py's MPI_Finalize (registered later, so earlier in LIFO)
    for st in _SIG_STATES:
        st.free()
    _SIG_STATES.clear()


transport.register_release_hook("04-signature", _release_sig)  # before the control communicator goes
