"""The flight recorder's reports: one rank's ring as text and JSON, and where the ranks' rings first
differ (layer 1; see docs/failures.md, "Flight recorder").

:func:`mpilocal.deadline.begin` keeps each rank's last ``MPILOCAL_FLIGHT_RECORDER`` collectives (64
by default) as raw tuples in a preallocated ring; nothing is formatted on the hot path. This module
turns a ring into a *dump* (a JSON-ready dict: rank, reason, the groups with their members and
counts, the records oldest first), prints it, writes it to ``MPILOCAL_FLIGHT_DIR/rank<R>.json``, and
compares the dumps of several ranks: for each group (communicator), the first per-group sequence
number at which the ranks issued different collectives (operation or dtype), or at which some
member issued nothing (``never issued``: that rank is behind, or skipped a collective). The
comparison runs online after a failed cross-rank check (every rank is reachable then:
:func:`mpilocal.deadline.flight_verdict`) and offline over the rank files (``python -m mpilocal
flight DIR``, :func:`main`), where a deadline left the ranks unable to talk.

Imports nothing of mpilocal (the deadline layer imports it); like PyTorch's flight recorder
(``TORCH_NCCL_TRACE_BUFFER_SIZE`` and the ``fr_trace`` analyzer), for every transport.
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["FORMAT", "record_dict", "format_dump", "first_difference", "differences", "describe_difference",
           "verdict_report", "write", "load_dir", "analyze", "main"]

FORMAT = "mpilocal-flight/1"


def _dtype_name(dt):
    if dt is None:
        return None
    return str(dt)


def _site_text(site):
    if site is None:
        return None
    code, line = site
    return f"{os.path.basename(code.co_filename)}:{line} in {code.co_name}"


def record_dict(raw, now_mono: float, now_wall: float) -> dict:
    """One raw ring entry of :func:`mpilocal.deadline.begin` ``(op, group key, seq, monotonic time,
    nbytes, dtype, shape, detail, call site)`` as a JSON-ready dict (times made wall-clock)."""
    op, key, seq, t, nbytes, dtype, shape, detail, site = raw
    d = {"group": key if key is not None else "?", "op": op, "seq": seq, "nbytes": nbytes,
         "dtype": _dtype_name(dtype), "shape": list(shape) if shape is not None else None,
         "time": now_wall - (now_mono - t), "age_s": now_mono - t}
    if isinstance(detail, tuple):  # the note outside debug mode: (reduce op or None, placements or None)
        detail = {k: v for k, v in zip(("op", "placements"), detail) if v is not None}
    if detail:
        d["detail"] = ", ".join(f"{k}={v}" for k, v in sorted(detail.items()))
    if site is not None:
        d["site"] = _site_text(site)
    return d


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
def _size_text(n):
    if n is None:
        return "-"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _what(rec) -> str:
    """``all_reduce#3 float64 (4, 8) 256 B`` (+ detail, + call site)."""
    parts = [f"{rec['op']}#{rec['seq']}"]
    if rec.get("dtype") is not None:
        parts.append(rec["dtype"])
    if rec.get("shape") is not None:
        parts.append(str(tuple(rec["shape"])))
    parts.append(_size_text(rec.get("nbytes")))
    if rec.get("detail"):
        parts.append(f"[{rec['detail']}]")
    if rec.get("site"):
        parts.append(f"at {rec['site']}")
    return " ".join(parts)


def format_dump(dump: dict, marks=(), note: str = "") -> str:
    """This rank's ring as lines of text, oldest first. ``marks``: ``(group, seq)`` pairs to mark
    with ``>>`` (the first difference); the collective this rank waits in is marked ``(waiting)``."""
    recs = dump.get("records", [])
    size = dump.get("ring_size", 0)
    total = dump.get("issued_total", len(recs))
    if not size:
        return "mpilocal flight recorder: off (MPILOCAL_FLIGHT_RECORDER=0)"
    if not total:
        return (f"mpilocal flight recorder: this rank issued no collective yet (MPILOCAL_FLIGHT_RECORDER={size})"
                + (f"; {note}" if note else ""))
    head = (f"mpilocal flight recorder: the last {len(recs)} of the {total} collective(s) this rank issued, "
            f"oldest first (MPILOCAL_FLIGHT_RECORDER={size})" + (f"; {note}" if note else "") + ":")
    lines = [head]
    keys = []
    for r in recs:
        if r["group"] not in keys:
            keys.append(r["group"])
    names = {k: f"g{i}" for i, k in enumerate(keys)}
    groups = dump.get("groups", {})
    for k in keys:
        info = groups.get(k, {})
        lines.append(f"  {names[k]} = {k}" + (f": {info['issued']} issued" if "issued" in info else ""))
    w = dump.get("waiting") or {}
    marks = set((m[0], m[1]) for m in marks)
    for r in recs:
        mark = ">>" if (r["group"], r["seq"]) in marks else "  "
        age = f"{r['age_s']:.3f} s ago" if r.get("age_s") is not None else ""
        tail = "  (waiting in it)" if w.get("group") == r["group"] and w.get("seq") == r["seq"] and \
            w.get("op") == r["op"] else ""
        lines.append(f"{mark} {names[r['group']]:>3} {_what(r)}  {age}{tail}")
    have = set((r["group"], r["seq"]) for r in recs)
    for k, s in sorted(m for m in marks if m not in have):  # this rank never issued the marked collective
        issued = groups.get(k, {}).get("issued")
        if issued is not None and issued < s:
            lines.append(f">> {names.get(k, k):>3} #{s}: never issued by this rank (it issued {issued} on this group)")
    if w and not any(w.get("group") == r["group"] and w.get("seq") == r["seq"] and w.get("op") == r["op"]
                     for r in recs):
        lines.append(f"  waiting in: {w.get('op')} on {w.get('group')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# comparing ranks
# ------------------------------------------------------------------------------------------------
def _per_group(dump):
    """group key -> (records by seq, issued count, lowest seq still known)."""
    out = {}
    wrapped = dump.get("issued_total", 0) > dump.get("ring_size", 0)
    for r in dump.get("records", []):
        out.setdefault(r["group"], {})[r["seq"]] = r
    res = {}
    keys = set(out) | set(dump.get("groups", {}))
    for k in keys:
        by_seq = out.get(k, {})
        issued = dump.get("groups", {}).get(k, {}).get("issued")
        if issued is None:
            issued = max(by_seq) if by_seq else 0
        if wrapped:
            low = min(by_seq) if by_seq else issued + 1
        else:
            low = 1
        res[k] = (by_seq, issued, low)
    return res


def _members(key, dumps):
    for d in dumps:
        m = d.get("groups", {}).get(key, {}).get("members")
        if m:
            return list(m)
    if key == "MPI.COMM_WORLD":
        return list(range(dumps[0].get("world", len(dumps)))) if dumps else []
    return None


def _same(a, b) -> bool:
    if a["op"] != b["op"]:
        return False
    if a.get("dtype") is not None and b.get("dtype") is not None and a["dtype"] != b["dtype"]:
        return False
    return True


def first_difference(key, dumps):
    """The first point where the ranks' collectives on group ``key`` differ, or None.

    ``dumps``: the dumps of the ranks to compare (any subset of the group; ranks that are not
    members are left out). Returns ``{"group", "seq", "records": {rank: record or None}, "never":
    [ranks that never issued #seq], "issued": {rank: count}, "differ": bool}``: at ``seq``, either
    some member issued a different operation or dtype (``differ``), or a member had issued fewer
    collectives (``never``). Records that fell out of a rank's ring are not compared."""
    members = _members(key, dumps)
    views = {}
    for d in dumps:
        r = d.get("rank")
        if members is not None and r not in members:
            continue
        pg = _per_group(d).get(key)
        if pg is None:  # a member that never issued anything on this group
            pg = ({}, 0, 1)
        views[r] = pg
    if len(views) < 2:
        return None
    start = min(v[2] for v in views.values())
    end = max(v[1] for v in views.values())
    for s in range(max(1, start), end + 1):
        recs, never = {}, []
        for r, (by_seq, issued, low) in sorted(views.items()):
            if issued < s:
                never.append(r)
                recs[r] = None
            elif s >= low and s in by_seq:
                recs[r] = by_seq[s]
        present = [x for x in recs.values() if x is not None]
        differ = any(not _same(present[0], x) for x in present[1:])
        if (never and present) or differ:
            return {"group": key, "seq": s, "records": recs, "never": never, "differ": differ,
                    "issued": {r: v[1] for r, v in sorted(views.items())}}
    return None


def differences(dumps) -> list:
    """:func:`first_difference` of every group any of ``dumps`` issued on (ordered by group)."""
    keys = []
    for d in dumps:
        for k in list(d.get("groups", {})) + [r["group"] for r in d.get("records", [])]:
            if k not in keys:
                keys.append(k)
    out = []
    for k in keys:
        diff = first_difference(k, dumps)
        if diff is not None:
            out.append(diff)
    return out


def _ranks_text(rs) -> str:
    rs = list(rs)
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(str(r) for r in rs)


def describe_difference(diff) -> str:
    """One paragraph: where the ranks first differ on a group, and what each issued there."""
    s = diff["seq"]
    lines = [f"first difference on {diff['group']} at collective #{s}:"]
    groups = {}
    for r, rec in diff["records"].items():
        what = "never issued it (issued only " + f"{diff['issued'][r]})" if rec is None else _what(rec)
        groups.setdefault(what, []).append(r)
    for what, rs in groups.items():
        lines.append(f"  {_ranks_text(rs)}: {what}")
    if diff["never"]:
        lines.append(f"  -> {_ranks_text(diff['never'])} never issued collective #{s} on this group (skipped a "
                     f"collective, left, or is busy elsewhere)")
    elif diff["differ"]:
        lines.append("  -> the ranks issued different collectives here: every rank of a group must issue the same "
                     "collectives in the same order")
    return "\n".join(lines)


def verdict_report(dumps, me: int, group: str) -> str:
    """The report a rank prints after a failed cross-rank check on ``group``: the first difference
    of every group (the checked group's first), then this rank's ring with those points marked."""
    diffs = differences(dumps)
    diffs.sort(key=lambda d: d["group"] != group)
    mine = next((d for d in dumps if d.get("rank") == me), None)
    ranks = sorted(d.get("rank") for d in dumps)
    if diffs:
        head = [describe_difference(d) for d in diffs]
    else:
        head = [f"the last collectives of {_ranks_text(ranks)} on every group they share match"]
    body = format_dump(mine, [(d["group"], d["seq"]) for d in diffs],
                       note="'>>' marks the first difference" if diffs else "") if mine else ""
    return ("mpilocal flight recorder, gathered from " + _ranks_text(ranks) + " after the failed check:\n"
            + "\n".join(head) + ("\n" + body if body else ""))


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def write(directory: str, dump: dict) -> str:
    """Write ``dump`` to ``directory/rank<R>.json`` (atomically: a temporary file renamed); the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank{dump.get('rank', 0)}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dump, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def load_dir(directory: str) -> list:
    """The dumps in ``directory`` (``rank<R>.json``), by rank."""
    dumps = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("rank") and name.endswith(".json"):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                d = json.load(f)
            if d.get("format") == FORMAT:
                dumps.append(d)
    dumps.sort(key=lambda d: d.get("rank", 0))
    return dumps


def analyze(dumps) -> str:
    """The offline report over every rank's dump: per group, its members, how many collectives each
    rank issued on it, and the first point where they differ."""
    if not dumps:
        return "mpilocal flight: no rank files (rank<R>.json) found"
    world = max(d.get("world", 0) for d in dumps)
    have = [d["rank"] for d in dumps]
    out = [f"mpilocal flight: {len(dumps)} rank file(s) ({_ranks_text(have)} of a world of {world})"]
    missing = [r for r in range(world) if r not in have]
    if missing:
        out.append(f"  no file from {_ranks_text(missing)} (killed before it could write, or not dumped)")
    for d in dumps:
        w = d.get("waiting")
        where = f"waiting in {w['op']}" + (f"#{w['seq']}" if w.get("seq") else "") + f" on {w['group']}" if w else \
            "not waiting in a collective"
        out.append(f"  rank {d['rank']}: {d.get('reason', '?')}; {where}")
    diffs = {x["group"]: x for x in differences(dumps)}
    keys = []
    for d in dumps:
        for k in list(d.get("groups", {})) + [r["group"] for r in d.get("records", [])]:
            if k not in keys:
                keys.append(k)
    for k in keys:
        members = _members(k, dumps)
        out.append(f"group {k}" + (f" (world ranks {members})" if members and k == "MPI.COMM_WORLD" else "") + ":")
        counts = []
        for d in dumps:
            if members is not None and d["rank"] not in members:
                continue
            pg = _per_group(d).get(k)
            counts.append(f"rank {d['rank']}: {pg[1] if pg else 0}")
        out.append("  issued: " + ", ".join(counts))
        if k in diffs:
            out.append("  " + describe_difference(diffs[k]).replace("\n", "\n  "))
        else:
            out.append("  no difference in the collectives the rank files hold")
    return "\n".join(out)


def main(directory: str, show_rings: bool = False) -> int:
    """``python -m mpilocal flight DIR``: print :func:`analyze` of the rank files in ``DIR`` (and,
    with ``show_rings``, every rank's ring with the first differences marked). Exit status: 0 no
    difference, 1 differences found, 2 no rank files."""
    if not os.path.isdir(directory):
        print(f"mpilocal flight: {directory} is not a directory", file=sys.stderr)
        return 2
    dumps = load_dir(directory)
    print(analyze(dumps))
    if not dumps:
        return 2
    diffs = differences(dumps)
    if show_rings:
        marks = [(x["group"], x["seq"]) for x in diffs]
        for d in dumps:
            print(f"\nrank {d['rank']}:\n" + format_dump(d, marks))
    return 1 if diffs else 0
