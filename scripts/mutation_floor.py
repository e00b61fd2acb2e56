"""The mutation floor (issue 16): a fixed list of mutants that the suite must kill, run by .ci/run.

Each mutant in scripts/mutation_floor.toml is a source patch: in the definition called ``name`` (a
function, method or class, nested or not, or a module-level assignment; searched in ``file`` and, if
it moved, in every module of mpilocal/), the text ``find`` (which must occur exactly once there) is
replaced by ``replace``. No line numbers: a refactor that keeps the function keeps the mutant. A
mutant whose function or text is gone fails the floor with a message saying which entry to update.

Each mutant is applied to a private copy of the checkout (the checkout itself is never changed) and
its ``tests`` (pytest node ids or files, with an optional ``-k`` expression in ``k``) run under
``mpiexec -n 2`` (``--ranks``). The floor fails when a listed mutant survives (the tests pass), when
a mutant no longer applies, or when the tests fail on the unmutated copy.

    python scripts/mutation_floor.py [--ranks 2] [--only ID,ID] [--python .venv/bin/python] [--mpiexec ...]
                                     [--file OTHER.toml]  (candidates: prove that new tests kill them)
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: a tiny reader for this file's subset of TOML is not worth it
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path) -> list[dict]:
    if tomllib is not None:
        return tomllib.loads(path.read_text())["mutant"]
    import toml  # pragma: no cover

    return toml.loads(path.read_text())["mutant"]


def _named_nodes(tree, name):
    """Every def/class named ``name`` (any depth; ``A.b`` for method b of class A), and every
    module-level assignment to ``name``."""
    parts = name.split(".")
    out = []

    def walk(node, path):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                p = path + [child.name]
                if p[-len(parts):] == parts:
                    out.append(child)
                walk(child, p)
            elif node is tree and isinstance(child, (ast.Assign, ast.AnnAssign)) and len(parts) == 1:
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    out.append(child)
            else:
                walk(child, path)

    walk(tree, [])
    return out


def apply(root: Path, m: dict) -> tuple[Path, str, str]:
    """(file, original text, mutated text) for mutant ``m`` in the tree at ``root``; ValueError if it
    does not apply exactly once."""
    hint = root / m["file"] if m.get("file") else None
    candidates = ([hint] if hint and hint.exists() else []) + sorted(
        p for p in (root / "mpilocal").rglob("*.py") if p != hint)
    for path in candidates:
        src = path.read_text()
        tree = ast.parse(src)
        nodes = _named_nodes(tree, m["name"])
        if not nodes:
            continue
        lines = src.splitlines(keepends=True)
        offs = [0]
        for ln in lines:
            offs.append(offs[-1] + len(ln))
        hits = []
        for node in nodes:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            a, b = offs[start - 1], offs[node.end_lineno]
            seg = src[a:b]
            i = seg.find(m["find"])
            while i >= 0:
                hits.append(a + i)
                i = seg.find(m["find"], i + 1)
        if len(hits) != 1:
            raise ValueError(f"'{m['find']}' occurs {len(hits)} times in {m['name']} ({path.relative_to(root)}); "
                             f"it must occur once: update mutant '{m['id']}' in scripts/mutation_floor.toml")
        k = hits[0]
        mutated = src[:k] + m["replace"] + src[k + len(m["find"]):]
        compile(mutated, str(path), "exec")
        return path, src, mutated
    raise ValueError(f"no definition '{m['name']}' in mpilocal/: update mutant '{m['id']}' in "
                     f"scripts/mutation_floor.toml (the function moved or was renamed)")


def run(work: Path, tests, k, ranks, py, mpiexec, timeout) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
    cmd = [*mpiexec, "-n", str(ranks), py, "-m", "pytest", "--with-mpi", "-p", "no:cacheprovider", "-q", "-x",
           "--no-header", "--timeout=60", "--timeout-method=thread", *tests] + (["-k", k] if k else [])
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        out, _ = proc.communicate()
        rc = 124
    return rc, time.monotonic() - t0, out.decode(errors="replace")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--python", default=str(ROOT / ".venv/bin/python"))
    ap.add_argument("--mpiexec", default=None, help="launcher (default: the venv's mpiexec)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    ap.add_argument("--tests", default=None, help="override every mutant's tests (to check what else kills it)")
    ap.add_argument("--file", default=str(ROOT / "scripts/mutation_floor.toml"),
                    help="the mutant list (another file of the same form: to show that new tests kill candidates)")
    args = ap.parse_args(argv)
    mpiexec = (args.mpiexec or str(Path(args.python).parent / "mpiexec")).split()
    mutants = load(Path(args.file))
    if args.only:
        keep = set(args.only.split(","))
        mutants = [m for m in mutants if m["id"] in keep]

    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mpilocal-floor-"))
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for f in files:
            if f and (ROOT / f).is_file() and (f.startswith("mpilocal/") or f.startswith("tests/")):
                (work / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, work / f)
        for f in ("setup.cfg", "pyproject.toml"):
            if (ROOT / f).exists():
                shutil.copy2(ROOT / f, work / f)

        def tests_of(m):
            t = args.tests.split() if args.tests else m["tests"]
            return t, (None if args.tests else m.get("k"))

        failures = []
        # the tests pass on the unmutated copy (else a "kill" would mean nothing)
        all_tests = sorted({t for m in mutants for t in tests_of(m)[0]})
        ks = [m.get("k") for m in mutants]
        k_all = None if args.tests or any(k is None for k in ks) else " or ".join(f"({k})" for k in ks)
        rc, secs, out = run(work, all_tests, k_all, args.ranks, args.python, mpiexec, 4 * args.timeout)
        print(f"[floor] unmutated: {'pass' if rc == 0 else f'FAIL (exit {rc})'} in {secs:.0f} s", flush=True)
        if rc != 0:
            print(out[-3000:])
            failures.append("the floor's tests fail without any mutant")
        for m in mutants:
            try:
                path, original, mutated = apply(work, m)
            except (ValueError, SyntaxError) as e:
                print(f"[floor] {m['id']:28s} DOES NOT APPLY: {e}", flush=True)
                failures.append(m["id"])
                continue
            tests, k = tests_of(m)
            try:
                path.write_text(mutated)
                rc, secs, out = run(work, tests, k, args.ranks, args.python, mpiexec, args.timeout)
            finally:
                path.write_text(original)
            if rc == 0:
                verdict = "SURVIVED"
                failures.append(m["id"])
            elif rc == 124:
                verdict = "killed (timeout)"
            elif rc in (4, 5):  # pytest: usage error / no tests collected: the entry is broken
                verdict = f"BROKEN ENTRY (pytest exit {rc})"
                failures.append(m["id"])
                print(out[-1500:])
            else:
                verdict = "killed"
            print(f"[floor] {m['id']:28s} {verdict:17s} {secs:5.1f} s  {path.relative_to(work)}:{m['name']}: "
                  f"{m['find']!r} -> {m['replace']!r}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(mutants)
    bad = sum(f in {m["id"] for m in mutants} for f in failures)
    print(f"[floor] {n - bad} of {n} mutants killed at {args.ranks} ranks in "
          f"{time.monotonic() - t_all:.0f} s" + (f"; FAILED: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
