"""``python -m mpilocal.checkpoint ls PATH``: keys, shapes, dtypes, saved placements and sizes of a
checkpoint (one process, no MPI calls). ``cat PATH KEY`` prints one array or value."""

import argparse
import sys

from ._format import CheckpointError, describe, read_array


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpilocal.checkpoint", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ls", help="list the keys, shapes, dtypes, saved placements and sizes")
    p.add_argument("path")
    p = sub.add_parser("cat", help="print one array or value (the whole global array)")
    p.add_argument("path")
    p.add_argument("key")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "ls":
            print(describe(a.path))
        else:
            print(read_array(a.path, a.key))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
