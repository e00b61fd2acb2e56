"""Mutation-testing driver behind scripts/mutation.sh (issue 16). Runs in .venv-mutation (cosmic-ray 8).

cosmic-ray generates the mutants (its operators, its ``mutate_code``); this driver filters them
(scripts/mutation.toml), applies each to a private copy of the working tree, runs the module's tests
under ``mpiexec -n R`` for each R in ``ranks`` (the first failing rank count kills it), caches every
verdict, and writes the report. Nothing in the checkout itself is ever mutated: other people run
tests there.

Cache: one JSON file per verdict in ``$MUTATION_CACHE`` (default .venv-mutation/cache), keyed by the
module path, the operator, the source of the enclosing definition before and after the mutation (the
innermost def, or the top-level statement) and the rank counts; the verdict records the digest of the
module's test files (plus tests/conftest.py). A re-run skips every mutant whose definition is
unchanged, even when other parts of the module changed, except that survivors are run again when the
tests changed (new tests may kill them; a killed verdict or a confirmed timeout is kept: tests are
added, not weakened, and ``--fresh`` re-judges everything). A survivor argued equivalent in
scripts/mutation.toml is not run again.

Sampling (``--sample K``): the core has ~3,450 mutants at 4-25 s each (every mutant runs whole test
files under mpiexec at 2 then 3 ranks), many hours on 2 cores; the issue asks for about an hour. So a
full run scores a seeded, stratified random sample: each module's mutants are put in a fixed random
order (sha256 of ``--seed`` and the mutant's cache key, which depends only on the mutated definition's
source: the same order every run for a ref, so verdicts cache) and the first K are its sample. The
modules are run round-robin, a few mutants of each per round, so a run stopped by ``--max-minutes``
leaves every module with a judged *prefix* of its random order, itself a random sample. The report
gives the score per module and overall as an estimate with its 95% Wilson interval (overall: the
modules' estimates weighted by their mutant counts, the stratified estimator, with a Wilson interval
on Kish's effective sample size). Per-mutant test selection by coverage was not built (a coverage map per ref
under mpiexec costs as much as the run it would save on this machine): the module's test files run
with ``-x``, so a killed mutant costs only the tests up to its first failure.

Timeouts: a mutant that exceeds the per-rank-count limit (max(min_timeout, 4 x the unmutated run))
counts as killed only if the unmutated tests then pass within the same limit at the same rank count,
run right after it (the same load). Otherwise the verdict is "inconclusive" (the machine was too
loaded to tell), not cached, and counted as pending.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import difflib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import toml as _toml

    class tomllib:  # noqa: N801
        @staticmethod
        def load(f):
            return _toml.loads(f.read().decode())

from cosmic_ray.ast import ast_nodes, get_ast
from cosmic_ray.mutating import mutate_code
from cosmic_ray.plugins import get_operator, operator_names

ROOT = Path(__file__).resolve().parent.parent


_REF = None  # --ref: read modules and tests from this commit, not the working tree


def read_bytes(relpath: str):
    if _REF:
        r = subprocess.run(["git", "show", f"{_REF}:{relpath}"], cwd=ROOT, capture_output=True)
        return r.stdout if r.returncode == 0 else None
    p = ROOT / relpath
    return p.read_bytes() if p.exists() else None


def log(*a):
    print("[mutation]", *a, flush=True)


# ------------------------------------------------------------------------------------------------
# mutants

def _defs(tree):
    """(start, end, path) of every def/class, start including decorators."""
    out = []

    def walk(node, path):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                p = path + (child.name,)
                out.append((start, child.end_lineno, p))
                walk(child, p)
            else:
                walk(child, path)

    walk(tree, ())
    return out


@functools.lru_cache(maxsize=4)
def _parsed(source: str):
    tree = ast.parse(source)
    return tree, _defs(tree), source.splitlines(keepends=True)


def _enclosing_segment(source: str, row: int) -> tuple[str, str]:
    """(qualified name, source lines) of the innermost def/class around ``row``, else the top-level
    statement holding it."""
    tree, defs, lines = _parsed(source)
    best = None
    for start, end, path in defs:
        if start <= row <= end and (best is None or start >= best[0]):
            best = (start, end, path)
    if best is None:
        for node in tree.body:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            if start <= row <= node.end_lineno:
                best = (start, node.end_lineno, ("<module>",))
                break
    if best is None:
        return "<module>", ""
    start, end, path = best
    return ".".join(path), "".join(lines[start - 1:end])


def _segment_by_name(source: str, qualname: str, fallback_row: int) -> str:
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for start, end, path in _defs(tree):
        if ".".join(path) == qualname:
            return "".join(lines[start - 1:end])
    return _enclosing_segment(source, fallback_row)[1]


def mutants(relpath: str, cfg: dict, mcfg: dict, tests_digest: str, cache: Path) -> list[dict]:
    """The filtered mutants of one module, each with its cache key and a one-line description
    (remembered per module source: generating them takes minutes on a loaded machine)."""
    source = read_bytes(relpath).decode()
    lkey = hashlib.sha256(json.dumps(["mutants-v2", relpath, source, cfg["defaults"]["operators"],
                                      mcfg.get("functions", []), cfg["defaults"]["ranks"]]).encode()).hexdigest()
    lpath = cache / "lists" / f"{lkey}.json"
    if lpath.exists():
        out = json.loads(lpath.read_text())
    else:
        out = _generate(relpath, source, cfg, mcfg)
        lpath.parent.mkdir(parents=True, exist_ok=True)
        lpath.write_text(json.dumps(out))
    for m in out:
        m["tests_digest"] = tests_digest
    return out


@functools.lru_cache(maxsize=2)
def _without_annotations(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        elif isinstance(node, ast.AnnAssign):
            node.annotation = ast.Constant(None)
    return ast.dump(tree)


def _generate(relpath: str, source: str, cfg: dict, mcfg: dict) -> list[dict]:
    src_lines = source.splitlines()
    keep = [re.compile(p) for p in cfg["defaults"]["operators"]]
    functions = set(mcfg.get("functions", []))
    out = []
    module_ast = get_ast(source)
    nodes = list(ast_nodes(module_ast))
    specs = []
    for name in operator_names():  # as cosmic-ray's init does, for the kept operators only
        if not any(k.fullmatch(name) for k in keep):
            continue
        op = get_operator(name)()
        positions = ((node, s, e) for node in nodes for s, e in op.mutation_positions(node))
        for occurrence, (node, s, e) in enumerate(positions):
            specs.append(argparse.Namespace(operator_name=name, occurrence=occurrence, start_pos=s))
    for m in specs:
        row = m.start_pos[0]
        line = src_lines[row - 1] if row - 1 < len(src_lines) else ""
        if "pragma: no mutate" in line or "pragma: no cover" in line:
            continue
        qual, before = _enclosing_segment(source, row)
        if functions and not (set(qual.split(".")) & functions):
            continue
        mutated = mutate_code(source, get_operator(m.operator_name)(), m.occurrence)
        if mutated is None:
            continue
        try:  # cosmic-ray also "mutates" the bare * of a signature into //: not Python, not a mutant
            compile(mutated, relpath, "exec")
        except SyntaxError:
            continue
        if "from __future__ import annotations" in source and \
                _without_annotations(mutated) == _without_annotations(source):
            continue  # only an annotation changed: never evaluated (from __future__ import annotations)
        after = _segment_by_name(mutated, qual, row)
        new_lines = [ln for ln in difflib.unified_diff(source.splitlines(), mutated.splitlines(), lineterm="", n=0)
                     if ln.startswith("+") and not ln.startswith("+++")]
        key = hashlib.sha256(json.dumps([relpath, m.operator_name, before, after,
                                         cfg["defaults"]["ranks"]]).encode()).hexdigest()
        out.append({
            "key": key, "module": relpath, "function": qual, "operator": m.operator_name,
            "occurrence": m.occurrence, "row": row, "line": line.strip(),
            "mutated_line": new_lines[0][1:].strip() if new_lines else "",
            "mutated_source": mutated,
        })
    return out


def tests_digest(files, extra_ranks=()) -> str:
    """The digest of a module's test files (and tests/conftest.py) and of its ``extra_ranks``: a
    survivor or timeout judged with other tests or other rank counts is judged again."""
    h = hashlib.sha256()
    if extra_ranks:
        h.update(f"extra_ranks={list(extra_ranks)}".encode() + b"\0")
    for f in sorted(set(files) | {"tests/conftest.py"}):
        b = read_bytes(f)
        h.update(f.encode() + b"\0" + (b if b is not None else b"<missing>") + b"\0")
    return h.hexdigest()[:16]


def equivalent_reason(mut: dict, cfg: dict):
    for e in cfg.get("equivalent", []):
        if (e.get("module") == mut["module"] and e.get("operator") == mut["operator"]
                and e.get("function", mut["function"]) in mut["function"].split(".") + [mut["function"]]
                and e.get("line", "") in mut["line"]
                and e.get("mutated", "") in mut["mutated_line"]):
            return e.get("why", "argued equivalent")
    return None


# ------------------------------------------------------------------------------------------------
# running

def make_copy(work: Path, ref: str | None = None) -> None:
    """A copy of the working tree (tracked and untracked, not ignored files) in ``work``, or of the
    commit ``ref`` (while others edit the working tree, a commit is a consistent state)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if ref:
        archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
        return
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in files:
        if not f or not (ROOT / f).is_file():
            continue
        dst = work / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst)


def run_tests(work: Path, tests, ranks, limit, per_test) -> tuple[str, int | None, float, str]:
    """('killed'|'survived'|'timeout', rank count that decided, seconds, output tail)."""
    py = os.environ.get("MUTATION_PYTHON", str(ROOT / ".venv/bin/python"))
    mpiexec = os.environ.get("MUTATION_MPIEXEC", str(ROOT / ".venv/bin/mpiexec"))
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    for n in ranks:
        cmd = [*mpiexec.split(), "-n", str(n), py, "-m", "pytest", "--with-mpi", "-p", "no:cacheprovider", "-q", "-x",
               "--no-header", "-p", "no:randomly", f"--timeout={per_test}", "--timeout-method=thread", *tests]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.communicate()
            return "timeout", n, time.monotonic() - t0, ""
        if proc.returncode != 0:
            return "killed", n, time.monotonic() - t0, out.decode(errors="replace")[-1500:]
    return "survived", None, time.monotonic() - t0, ""


_LEGACY = None


def _legacy_index(cache: Path) -> dict:
    """Verdicts of the first cache format (keyed with the tests' digest), by what they describe."""
    global _LEGACY
    if _LEGACY is None:
        _LEGACY = {}
        for p in cache.glob("*/*.json"):
            try:
                v = json.loads(p.read_text())
            except ValueError:
                continue
            if "outcome" in v and "tests_digest" not in v:
                _LEGACY[(v["module"], v["function"], v["operator"], v["occurrence"], v["line"], v["mutated_line"])] = v
    return _LEGACY


def cache_get(cache: Path, key: str, mut: dict | None = None):
    """The cached verdict for ``key``, or None; with ``mut``, None also for a survivor judged by other
    tests than ``mut``'s (a kill or a confirmed timeout stands: tests are added, not weakened)."""
    p = cache / key[:2] / f"{key}.json"
    v = None
    if p.exists():
        try:
            v = json.loads(p.read_text())
        except ValueError:
            v = None
    if v is None and mut is not None:
        v = _legacy_index(cache).get((mut["module"], mut["function"], mut["operator"], mut["occurrence"],
                                      mut["line"], mut["mutated_line"]))
    if v is not None and mut is not None and v["outcome"] == "survived" and v.get("tests_digest") != mut["tests_digest"]:
        return None
    return v


def cache_put(cache: Path, key: str, value: dict) -> None:
    p = cache / key[:2] / f"{key}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(p)


def module_ranks(cfg, mcfg) -> list[int]:
    """The rank counts a module's mutants run at: ``defaults.ranks``, then the module's ``extra_ranks``
    (a mutant only a larger world can tell apart; fail-fast, so killed mutants rarely reach them)."""
    return list(cfg["defaults"]["ranks"]) + [r for r in mcfg.get("extra_ranks", []) if r not in cfg["defaults"]["ranks"]]


def sample_order(muts: list[dict], seed: int) -> list[dict]:
    """The module's mutants in their fixed random order (the first K are the sample of --sample K)."""
    return sorted(muts, key=lambda m: hashlib.sha256(f"sample-v1:{seed}:{m['key']}".encode()).hexdigest())


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return max(0.0, c - h), min(1.0, c + h)


def select_modules(cfg, names, all_):
    mods = cfg["modules"]
    if names:
        chosen = []
        for n in names:
            hits = [m for m in mods if m == n or Path(m).stem == n or m.startswith(n.rstrip("/") + "/")
                    or Path(m).parent.name == n.rstrip("/")]
            if not hits:
                sys.exit(f"[mutation] no module {n!r} in scripts/mutation.toml (have: {', '.join(mods)})")
            chosen += [h for h in hits if h not in chosen]
        return chosen
    return [m for m in mods if all_ or mods[m].get("group") == "stable"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", default="", help="comma-separated modules (path, stem or package); default: group stable")
    ap.add_argument("--all", action="store_true", help="every module of scripts/mutation.toml")
    ap.add_argument("--shard", default="0/1", help="I/N: only mutants whose key falls in shard I of N")
    ap.add_argument("--max-minutes", type=float, default=25.0, help="start no mutant after this many minutes")
    ap.add_argument("--fresh", action="store_true", help="ignore cached verdicts")
    ap.add_argument("--list", action="store_true", help="list the mutants and cached verdicts, run nothing")
    ap.add_argument("--report", default=None, help="write the report here (default benchmarks/results/DATE-mutation.md)")
    ap.add_argument("--no-run", action="store_true", help="only write the report from the cache")
    ap.add_argument("--ref", default=None, help="mutate this commit (e.g. HEAD) instead of the working tree")
    ap.add_argument("--sample", type=int, default=0,
                    help="score a seeded random sample of K mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=16, help="seed of --sample's order")
    ap.add_argument("--round", type=int, default=4, help="mutants per module per round-robin round")
    ap.add_argument("--rejudge", action="store_true",
                    help="only re-run the survivors judged by older tests (new kill tests)")
    args = ap.parse_args(argv)
    global _REF
    _REF = args.ref

    cfg = tomllib.load(open(ROOT / "scripts/mutation.toml", "rb"))
    cache = Path(os.environ.get("MUTATION_CACHE", ROOT / ".venv-mutation/cache"))
    work = Path(os.environ.get("MUTATION_WORK", ROOT / ".venv-mutation/work"))
    shard_i, shard_n = (int(v) for v in args.shard.split("/"))
    ranks = cfg["defaults"]["ranks"]
    per_test = cfg["defaults"]["per_test_timeout"]
    modules = select_modules(cfg, [m for m in args.modules.split(",") if m], args.all)
    t_start = time.monotonic()  # --max-minutes counts from here (mutant generation included)

    plan = {}
    for mod in modules:
        mcfg = cfg["modules"][mod]
        digest = tests_digest(mcfg["tests"], mcfg.get("extra_ranks", []))
        allm = [m for m in mutants(mod, cfg, mcfg, digest, cache) if int(m["key"][:8], 16) % shard_n == shard_i]
        muts = sample_order(allm, args.seed)
        if args.sample:
            muts = muts[:args.sample]
        plan[mod] = (mcfg, digest, muts, len(allm))
        cached = sum(cache_get(cache, m["key"], m) is not None for m in muts) if not args.fresh else 0
        log(f"{mod}: {len(allm)} mutants (shard {args.shard}), {len(muts)} in the sample, {cached} cached, "
            f"tests {' '.join(mcfg['tests'])}")
        if args.list:
            for m in muts:
                v = cache_get(cache, m["key"], m)
                print(f"  {m['row']:4d} {m['function']:28s} {m['operator']:45s} {v['outcome'] if v else '-':9s} "
                      f"{m['line'][:60]!r} -> {m['mutated_line'][:60]!r}")
    if args.list:
        return 0

    out_of_time = False
    if not args.no_run:
        out_of_time = run_plan(plan, cfg, cache, work, args, t_start)
        if out_of_time:
            log(f"--max-minutes {args.max_minutes} reached: stopping (re-run to continue; verdicts are cached)")

    report = Path(args.report) if args.report else ROOT / "benchmarks/results" / \
        f"{datetime.date.today().isoformat()}-mutation.md"
    write_report(report, plan, cfg, cache, args)
    log(f"report: {report}")
    return 0


def run_plan(plan, cfg, cache, work, args, t_start) -> bool:
    """Run the plan's unjudged mutants, round-robin over the modules (``args.round`` per module per
    round, each module in its sample order). True when --max-minutes stopped it."""
    ranks = cfg["defaults"]["ranks"]
    per_test = cfg["defaults"]["per_test_timeout"]
    def wanted(m):
        if args.fresh:
            return True
        if cache_get(cache, m["key"], m) is not None:
            return False
        old = cache_get(cache, m["key"])
        if old is not None and old["outcome"] == "survived" and equivalent_reason(m, cfg):
            return False  # argued equivalent: stays equivalent with other tests (as the report counts it)
        if args.rejudge:  # only verdicts that exist, reached with other tests, not argued equivalent
            old = cache_get(cache, m["key"])
            return old is not None and old["outcome"] == "survived" and not equivalent_reason(m, cfg)
        return True

    todo = {mod: [m for m in muts if wanted(m)] for mod, (mcfg, digest, muts, _) in plan.items()}
    if not any(todo.values()):
        return False
    log(f"copying {'the working tree' if not args.ref else args.ref} to {work}")
    make_copy(work, args.ref)
    limits, skip, done = {}, set(), {mod: 0 for mod in todo}

    def limit_for(mod):
        if mod in limits or mod in skip:
            return limits.get(mod)
        mcfg, digest = plan[mod][0], plan[mod][1]
        mranks = module_ranks(cfg, mcfg)
        original = (work / mod).read_text()
        bkey = hashlib.sha256(json.dumps(["baseline", mod, original, digest, mranks]).encode()).hexdigest()
        base = None if args.fresh else cache_get(cache, bkey)
        if base is None:
            outcome, n, secs, tail = run_tests(work, mcfg["tests"], mranks, 900, per_test)
            if outcome != "survived":
                log(f"{mod}: the UNMUTATED tests fail ({outcome} at {n} ranks); skipping the module\n{tail}")
                skip.add(mod)
                return None
            base = {"seconds": secs}
            cache_put(cache, bkey, base)
        limits[mod] = max(cfg["defaults"]["min_timeout"], 4 * base["seconds"] / len(mranks))
        log(f"{mod}: unmutated run {base['seconds']:.1f} s; limit {limits[mod]:.0f} s per rank count; "
            f"{len(todo[mod])} to run")
        return limits[mod]

    while any(done[mod] < len(todo[mod]) for mod in todo if mod not in skip):
        for mod in todo:
            if mod in skip or done[mod] >= len(todo[mod]):
                continue
            limit = limit_for(mod)
            if limit is None:
                continue
            mcfg, digest = plan[mod][0], plan[mod][1]
            target = work / mod
            original = target.read_text()
            try:
                for m in todo[mod][done[mod]:done[mod] + args.round]:
                    if time.monotonic() - t_start > args.max_minutes * 60:
                        return True
                    done[mod] += 1
                    target.write_text(m["mutated_source"])
                    outcome, n, secs, tail = run_tests(work, mcfg["tests"], module_ranks(cfg, mcfg), limit, per_test)
                    target.write_text(original)
                    if outcome == "timeout":
                        # a timeout is a kill only if the unmutated tests pass within the same budget, now
                        b_out, _, b_secs, _ = run_tests(work, mcfg["tests"], [n], limit, per_test)
                        if b_out != "survived":
                            log(f"{mod} [{done[mod]}/{len(todo[mod])}] INCONCLUSIVE: timeout at {n} ranks, and the "
                                f"unmutated tests {b_out} in {b_secs:.0f} s under the same limit (load); not cached")
                            continue
                    verdict = {k: m[k] for k in ("module", "function", "operator", "occurrence", "row", "line",
                                                  "mutated_line")}
                    verdict.update(outcome=outcome, ranks=n, seconds=round(secs, 1), tests_digest=digest,
                                   when=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                    if args.ref:
                        verdict["ref"] = args.ref
                    cache_put(cache, m["key"], verdict)
                    log(f"{mod} [{done[mod]}/{len(todo[mod])}] {outcome:8s} {secs:5.1f}s {m['function']}:{m['row']} "
                        f"{m['operator'].split('/')[-1]}: {m['mutated_line'][:70]}")
            finally:
                target.write_text(original)
    return False


# ------------------------------------------------------------------------------------------------
# report

def write_report(path: Path, plan, cfg, cache, args):
    rows, survivors, equivalents = [], [], []
    keys = ("mutants", "sampled", "killed", "timeout", "survived", "equivalent", "pending")
    tot = dict.fromkeys(keys, 0)
    strata = []  # (weight: the module's mutant count, killed + timeouts, judged) per module
    for mod, (mcfg, digest, muts, n_all) in plan.items():
        c = dict.fromkeys(keys, 0)
        c["mutants"], c["sampled"] = n_all, len(muts)
        by_ranks = {}
        for m in muts:
            v = cache_get(cache, m["key"], m)
            if v is None:  # a survivor of older tests that is argued equivalent stays equivalent
                old = cache_get(cache, m["key"])
                if old is not None and old["outcome"] == "survived" and equivalent_reason(m, cfg):
                    v = old
            if v is None:
                c["pending"] += 1
                continue
            o = v["outcome"]
            if o == "survived":
                why = equivalent_reason(m, cfg)
                if why:
                    c["equivalent"] += 1
                    equivalents.append((m, why))
                else:
                    c["survived"] += 1
                    survivors.append(m)
            else:
                c[o] += 1
                if o == "killed":
                    by_ranks[v.get("ranks")] = by_ranks.get(v.get("ranks"), 0) + 1
        judged = c["killed"] + c["timeout"] + c["survived"]
        dead = c["killed"] + c["timeout"]
        if not judged:
            score = "-"
        elif c["sampled"] == c["mutants"] and not c["pending"]:
            score = f"{100 * dead / judged:.1f}% (all)"
        else:
            lo, hi = wilson(dead, judged)
            score = f"{100 * dead / judged:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
        if judged:
            strata.append((n_all, dead, judged))
        rows.append((mod, c, score, by_ranks, mcfg["tests"]))
        for k in tot:
            tot[k] += c[k]
    judged = tot["killed"] + tot["timeout"] + tot["survived"]
    all_ranks = sorted({r for mcfg, _, _, _ in plan.values() for r in module_ranks(cfg, mcfg)})
    total_score = "-"
    if strata:
        wsum = sum(w for w, _, _ in strata)
        est = sum(w / wsum * d / n for w, d, n in strata)
        n_eff = 1 / sum((w / wsum) ** 2 / n for w, _, n in strata)  # Kish: the weights' effective sample
        lo, hi = wilson(est * n_eff, n_eff)
        total_score = f"{100 * est:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
    pooled = f"{100 * (tot['killed'] + tot['timeout']) / judged:.1f}%" if judged else "-"
    sampled_note = (f"`--sample {args.sample}` (seed {args.seed}): each module's score is an **estimate** from a "
                    "seeded random sample of its mutants, given with its 95% Wilson interval in brackets; "
                    "`(all)` marks a module whose every mutant was judged (an exact score). "
                    if args.sample else "Every mutant of each module (no sampling). ")
    lines = [
        f"# Mutation score ({datetime.date.today().isoformat()})",
        "",
        "Issue 16. Produced by `scripts/mutation.sh` (cosmic-ray 8 mutants, filtered by "
        "`scripts/mutation.toml`; each mutant runs the module's tests under MPICH's `mpiexec -n R`, "
        f"R in {cfg['defaults']['ranks']}" + "".join(
            f"; `{m}` also at {module_ranks(cfg, mc)[len(cfg['defaults']['ranks']):]}"
            for m, (mc, _, _, _) in plan.items() if mc.get("extra_ranks")) +
        ", fail-fast; a mutant is killed when a rank count fails).",
        f"Ref `{args.ref or 'working tree'}`, shard {args.shard}. " + sampled_note +
        "Score = (killed + timeouts) / (killed + timeouts + survived) among the judged sample; mutants argued "
        "equivalent (listed below, with the argument) are left out; pending = in the sample, not judged yet "
        "(budget, or a timeout that the unmutated tests also hit: inconclusive). A timeout counts only when "
        "the unmutated tests pass within the same limit at the same rank count right after it.",
        "",
        "| module | mutants | sampled | killed | timeouts | survived | equivalent | pending | score [95% CI] | "
        f"killed at {' / '.join(map(str, all_ranks))} ranks | tests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for mod, c, score, by_ranks, tests in rows:
        lines.append(f"| `{mod}` | {c['mutants']} | {c['sampled']} | {c['killed']} | {c['timeout']} | "
                     f"{c['survived']} | {c['equivalent']} | {c['pending']} | {score} | "
                     f"{' / '.join(str(by_ranks.get(r, 0)) for r in all_ranks)} | "
                     f"{', '.join(Path(t).name for t in tests)} |")
    lines.append(f"| **all** | {tot['mutants']} | {tot['sampled']} | {tot['killed']} | {tot['timeout']} | "
                 f"{tot['survived']} | {tot['equivalent']} | {tot['pending']} | {total_score} | | |")
    lines += ["", f"Overall: the stratified estimate (each module's score weighted by its mutant count; "
              f"Wilson interval on Kish's effective sample size 1 / sum(W_h^2 / n_h)) is {total_score}; the "
              f"pooled score of the "
              f"{judged} judged mutants, unweighted, is {pooled}."]
    lines += ["", "## Survivors", ""]
    if not survivors:
        lines.append("None.")
    for m in survivors:
        lines.append(f"- `{m['module']}:{m['row']}` in `{m['function']}` ({m['operator'].split('/')[-1]}): "
                     f"`{m['line']}` -> `{m['mutated_line']}`")
    lines += ["", "## Argued equivalent", ""]
    if not equivalents:
        lines.append("None.")
    for m, why in equivalents:
        lines.append(f"- `{m['module']}:{m['row']}` in `{m['function']}` ({m['operator'].split('/')[-1]}): "
                     f"`{m['line']}` -> `{m['mutated_line']}`. {why}")
    # hand-written notes below the marker survive a re-run
    marker = "<!-- notes: kept by scripts/mutation_run.py -->"
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(marker):] if marker in old else marker + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n" + notes)


if __name__ == "__main__":
    sys.exit(main())
