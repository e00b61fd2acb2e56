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
    raise CollectiveMismatchError(
        f"collective mismatch on {deadline.describe_group(g)}: rank {w0} runs {texts[0]} but rank {wo} runs {texts[odd]}; "
        f"every rank of a group must issue the same collectives in the same order (MPILOCAL_DEBUG=1).\n{all_lines}"
    )


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
            raise err
        r = int(failed[0])
        raw = rows[r, META_WIDTH + 1:].copy().view(np.uint8).tobytes().rstrip(b"\0").decode(errors="replace")
        tname, _, msg = raw.partition("\0")
        etype = _EXC_TYPES.get(tname, ValueError)
        raise etype(f"{caller}: rank {_world_rank(g, r)} rejected its arguments ({len(failed)} rank(s) failed "
                    f"the checks, so every rank raises): {msg}")
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
