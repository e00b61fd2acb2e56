"""Split (issue 10) into :mod:`mpilocal.deadline` (layer 1) and :mod:`mpilocal.agreement` (layer 3).

Only the names below, for the importers not yet moved to the new modules; this file goes once they are.
"""

from __future__ import annotations

from . import deadline
from .agreement import CollectiveMismatchError, agree, agreed, check_call, control_comm  # noqa: F401
from .deadline import (  # noqa: F401
    abort, begin, debug_enabled, describe_group, exception_summary, format_exception, in_flight, install,
    register_abort_hook, register_before_report, set_debug, set_timeout, timeout, waiting, watch_async, watch_cuda,
)


def __getattr__(name):  # the watchdog's state (failure._DEBUG, failure._prefix, ...) lives in mpilocal.deadline
    return getattr(deadline, name)
