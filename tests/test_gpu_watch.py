"""The deadline's watch of asynchronous GPU work (mpilocal.deadline._StreamWatch, used by
watch_cuda for every NCCL collective), with fake CUDA events on a fake in-order stream: its
bookkeeping is pure Python, so it is tested here on CPU. On the GPU machine the same code is
exercised by tests/failure_cases/nccl_skip.py (a NCCL collective that never completes)."""

import pytest

from mpilocal import deadline


class Stream:
    """An in-order stream: calls are numbered 1, 2, ... as enqueued; ``finished`` of them are done."""

    def __init__(self):
        self.enqueued = 0
        self.finished = 0

    def enqueue(self):
        self.enqueued += 1
        return self.enqueued


class Event:
    """A reusable event: done once every call enqueued before its latest record is done."""

    def __init__(self):
        self.at = None
        self.records = 0
        self.queries = 0
        self.on_query = None  # called at a query (simulates the issuing thread racing the watchdog)

    def record(self, stream):
        self.at = (stream, stream.enqueued)
        self.records += 1

    @property
    def done(self):
        self.queries += 1
        if self.on_query is not None:
            f, self.on_query = self.on_query, None
            f()
        stream, pos = self.at
        return stream.finished >= pos


def make(check=None):
    return deadline._StreamWatch(Event(), Event(), None, check, None)


def call(w, s, name, t, g=None):
    seq = s.enqueue()
    w.issued(name, seq, g, s, t)
    return seq


LIMIT = 10.0


def test_pending_and_done_transitions_keep_the_oldest_start():
    s, w = Stream(), make()
    assert w.poll(0.0, LIMIT) is None  # nothing issued
    call(w, s, "allreduce", 0.0)
    assert w.p[:3] == (0.0, "allreduce", 1) and w.l is None
    s.finished = 1  # done
    call(w, s, "allgatherv", 1.0)  # the probe was done: re-recorded here
    assert w.p[:3] == (1.0, "allgatherv", 2) and w.probe.records == 2
    call(w, s, "allreduce", 2.0)  # the probe's call still runs: this one goes on `latest`
    call(w, s, "allreduce", 3.0)
    assert w.p[:3] == (1.0, "allgatherv", 2), "the oldest pending call's start must be kept"
    assert w.l[:3] == (3.0, "allreduce", 4) and w.latest.records == 2 and w.probe.records == 2
    assert w.poll(1.0 + LIMIT - 0.01, LIMIT) is None
    assert w.poll(1.0 + LIMIT + 0.01, LIMIT) == (("allgatherv", 2, None), None)
    s.finished = 2  # the probe's call completed, calls 3 and 4 have not: `latest` (call 4, at 3.0) decides
    assert w.poll(1.0 + LIMIT + 0.01, LIMIT) is None
    assert w.poll(3.0 + LIMIT + 0.01, LIMIT) == (("allreduce", 4, None), None)
    s.finished = 4
    assert w.poll(100.0, LIMIT) is None
    call(w, s, "bcast", 200.0)  # all done: the probe again, and `latest` is dropped
    assert w.p[:3] == (200.0, "bcast", 5) and w.l is None
    assert w.poll(200.0 + LIMIT + 1, LIMIT) == (("bcast", 5, None), None)


def test_no_deadline_no_report():
    s, w = Stream(), make()
    call(w, s, "allreduce", 0.0)
    assert w.poll(1e9, None) is None


def test_a_stream_that_stays_busy_is_not_a_hang():
    """Calls that each complete within 5 s, issued every second, so the stream is never idle at a
    call: no call is ever pending past the 10 s deadline, so nothing fires (a single start time kept
    while anything is pending would fire here after 10 s)."""
    s, w = Stream(), make()
    issued = []
    for t in range(200):
        s.finished = sum(1 for ti in issued if ti <= t - 5)
        issued.append(t)
        call(w, s, "allreduce", float(t))
        assert w.poll(t + 0.5, LIMIT) is None, t
    assert w.latest.records > 100  # the probe stayed busy most of the time
    t_last = 199.0
    s.finished = sum(1 for ti in issued if ti <= t_last - 5)  # then the stream hangs
    r = w.poll(t_last + LIMIT + 1, LIMIT)
    assert r is not None and r[1] is None


def test_a_hang_after_the_probe_completed_is_caught():
    s, w = Stream(), make()
    call(w, s, "allreduce", 0.0)  # probe
    call(w, s, "allreduce", 1.0)  # latest
    s.finished = 1  # the probe's call completes; call 2 never does, and nothing is issued after it
    assert w.poll(5.0, LIMIT) is None
    assert w.poll(1.0 + LIMIT + 0.1, LIMIT) == (("allreduce", 2, None), None)


def test_rerecorded_during_the_query_gives_no_verdict():
    """The issuing thread re-records an event while the watchdog queries it: the old start time must
    not be charged to the new record (the watchdog reads the slot before and after the query)."""
    s, w = Stream(), make()
    call(w, s, "allreduce", 0.0)
    s.finished = 1

    def reissue():  # at t=50 the probe, found done, is re-recorded for a new (pending) call
        call(w, s, "allgatherv", 50.0)

    w.probe.on_query = reissue  # armed for the watchdog's query: the race happens inside it
    assert w.poll(0.0 + LIMIT + 1, LIMIT) is None, "the old start time was charged to a newer record"
    assert w.p[:3] == (50.0, "allgatherv", 2)
    assert w.poll(50.0 + LIMIT - 1, LIMIT) is None
    assert w.poll(50.0 + LIMIT + 1, LIMIT) == (("allgatherv", 2, None), None)


def test_asynchronous_error_is_reported():
    s = Stream()
    bad = []

    def check():
        if bad:
            raise RuntimeError("NCCL_ERROR_REMOTE_ERROR")

    w = make(check)
    call(w, s, "allreduce", 0.0)
    assert w.poll(1.0, LIMIT) is None
    bad.append(1)
    (what, err) = w.poll(1.0, LIMIT)
    assert what == ("allreduce", 1, None) and "NCCL_ERROR_REMOTE_ERROR" in err
    s.finished = 1  # nothing in flight: the communicator is not polled (as check_async_error wants)
    assert w.poll(2.0, LIMIT) is None


def test_an_event_that_cannot_be_queried_gives_no_verdict():
    """E.g. CUDA shutting down at exit: no report, and no error polling."""
    s = Stream()
    w = make(lambda: 1 / 0)
    call(w, s, "allreduce", 0.0)

    class Broken(Event):
        @property
        def done(self):
            raise RuntimeError("cudaErrorCudartUnloading")

    w.probe = Broken()
    assert w.poll(1e6, LIMIT) is None


def test_deadline_poll_reports_rank_op_seq(intercepted):
    """Through the deadline's own poll (what the watchdog thread runs): the report names the
    operation and its sequence number; a watch whose work completed reports nothing."""
    s, w = Stream(), make()
    deadline.set_timeout(0.05)
    key = ("fake stream", 1)
    deadline._STREAM_WATCHES[key] = w
    try:
        s.enqueue()
        w.issued("allreduce", 7, None, s, deadline._monotonic())
        deadline._poll_async()
        assert not intercepted
        import time

        time.sleep(0.1)
        deadline._poll_async()
        assert intercepted and "allreduce#7" in intercepted[0] and "did not complete within 0.05 s" in intercepted[0]
        del intercepted[:]
        s.finished = s.enqueued
        deadline._poll_async()
        assert not intercepted
    finally:
        deadline._STREAM_WATCHES.pop(key, None)


def test_per_call_cost_is_one_record_and_at_most_one_query():
    s, w = Stream(), make()
    for i in range(3):  # calls a second apart: the probe is queried at each (after the first)
        call(w, s, "allreduce", float(i))
    assert w.probe.queries == 2 and w.probe.records + w.latest.records == 3
    s, w = Stream(), make()
    for i in range(200):  # a tight loop (10 us apart, each call done at once): one query per millisecond
        call(w, s, "allreduce", i * 1e-5)
        s.finished = s.enqueued
    assert w.probe.records + w.latest.records == 200
    assert w.probe.queries == 1 and w.probe.records == 2, (w.probe.queries, w.probe.records)
    assert w.poll(1.0, LIMIT) is None
    call(w, s, "allreduce", 1.0)  # then a call that never completes: caught (on `latest` or the probe)
    assert w.poll(1.0 + LIMIT - 0.1, LIMIT) is None
    assert w.poll(1.0 + LIMIT + 0.1, LIMIT) == (("allreduce", 201, None), None)
