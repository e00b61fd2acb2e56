#!/usr/bin/env python3
"""Remove MPICH shared-memory segments that no running process maps: ``/dev/shm/mpich_shm_*`` files
left by jobs that ended without ``MPI_Finalize`` (``MPI_Abort``, a signal, ``kill -9``).

MPICH removes a job's segment name at ``MPI_Finalize`` only, and the file's memory stays taken until
reboot. mpilocal's own abort paths now remove the name first (``mpilocal/deadline.py``,
``_release_node_shm``; docs/failures.md), but jobs killed with SIGKILL, raw ``MPI_Abort`` calls and older
runs still leave them: on the dev machine 9,424 of them held 22 GB of its 24 GB, and CI's 64-rank step
was killed for memory. ``.ci/run`` runs this first.

    python scripts/clean_shm.py [--dry-run] [--min-age SECONDS]

A file is removed only when no process maps or holds it open (``/proc/*/maps``, ``/proc/*/fd``) and it
is older than ``--min-age`` (default 60 s: a job starting now creates its file before its ranks map it).
Prints what it removed.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

PATTERN = "/dev/shm/mpich_shm_*"


def in_use() -> set:
    """Paths under /dev/shm that some process maps or holds open (those this user may read)."""
    used = set()
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/maps") as f:
                used.update(line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line)
        except (OSError, IndexError):
            pass
        try:
            for fd in os.listdir(f"{d}/fd"):
                try:
                    t = os.readlink(f"{d}/fd/{fd}")
                except OSError:
                    continue
                if t.startswith("/dev/shm/"):
                    used.add(t)
        except OSError:
            pass
    return used


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    ap.add_argument("--min-age", type=float, default=60.0, help="seconds since the file last changed")
    a = ap.parse_args(argv)
    candidates = sorted(glob.glob(PATTERN))
    if not candidates:
        print("clean_shm: no MPICH segments in /dev/shm")
        return 0
    used, now = in_use(), time.time()
    removed = kept = size = 0
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if path in used or now - st.st_mtime < a.min_age:
            kept += 1
            continue
        if not a.dry_run:
            try:
                os.unlink(path)
            except OSError as e:
                print(f"clean_shm: cannot remove {path}: {e}", file=sys.stderr)
                kept += 1
                continue
        removed += 1
        size += st.st_size
    verb = "would remove" if a.dry_run else "removed"
    print(f"clean_shm: {verb} {removed} unused MPICH segment(s), {size / 2**20:.0f} MiB; kept {kept} in use or new")
    return 0


if __name__ == "__main__":
    sys.exit(main())
