"""The package's floors (docs/architecture.md): imports only run down, and no module imports itself
back through others.

``mpilocal/LAYERS.json`` gives every module a layer number (higher = above; a trailing ``.*``
covers a subpackage, its ``__init__`` included; ``__init__`` is the package's own ``__init__.py``).
A module may import modules of its own layer or lower ones. The checker below reads the source (it
imports nothing), and every import counts: one inside a function or under ``TYPE_CHECKING`` too,
since a deferred import that dodges a circle at import time is still a circle for the reader.
The same check, outside the repository: ``python ../shared/tools/layers.py mpilocal --layers
mpilocal/LAYERS.json``. The checker is tested on a small made-up package first.

Needs no MPI: under ``mpiexec`` world rank 0 checks, the other ranks skip.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import rank0_only

PACKAGE = Path(__file__).resolve().parent.parent / "mpilocal"
TABLE = PACKAGE / "LAYERS.json"

pytestmark = rank0_only


# ------------------------------------------------------------------------------------------------
# the checker


def package_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name (relative to the package; ``""`` for its ``__init__``) -> (file, is a package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        found[".".join(parts)] = (path, is_pkg)
    return found


def _owning_module(dotted: str, known) -> str | None:
    """The module a dotted name lives in: itself when it is a module, else its longest module prefix."""
    while True:
        if dotted in known:
            return dotted
        if not dotted:
            return None
        dotted = dotted.rpartition(".")[0]


def module_imports(name: str, path: Path, is_pkg: bool, known, package: str) -> dict[str, int]:
    """Modules of the package that ``name`` imports -> the line of the first such import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = name.split(".") if name else []
    package_of_module = here if is_pkg else here[:-1]  # what ``from . import`` means in this file
    out: dict[str, int] = {}

    def add(dotted, line):
        mod = _owning_module(dotted, known)
        if mod is not None and mod != name and mod not in out:
            out[mod] = line

    def strip(absolute):  # "mpilocal.x.y" -> "x.y"; None outside the package
        if absolute == package:
            return ""
        if absolute.startswith(package + "."):
            return absolute[len(package) + 1:]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                rel = strip(alias.name)
                if rel is not None:
                    add(rel, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > len(package_of_module):
                    raise ValueError(f"{path}:{node.lineno}: relative import above the package")
                anchor = package_of_module[: len(package_of_module) - up]
                base = ".".join(anchor + (node.module.split(".") if node.module else []))
            else:
                base = strip(node.module or "")
                if base is None:
                    continue
            for alias in node.names:  # ``from . import x`` may name a submodule x
                sub = f"{base}.{alias.name}" if base else alias.name
                add(sub if sub in known else base, node.lineno)
    return out


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Groups of two or more modules that reach each other (each group is one or more circles)."""
    reach = {}
    for start in graph:  # plain reachability: the graph has a few dozen nodes
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        reach[start] = seen
    groups, placed = [], set()
    for m in sorted(graph):
        if m in placed:
            continue
        group = sorted({m} | {o for o in reach[m] if m in reach.get(o, ())})
        placed.update(group)
        if len(group) > 1:
            groups.append(group)
    return groups


def layer_of(module: str, table: dict[str, int]) -> int | None:
    key = module or "__init__"
    if key in table:
        return table[key]
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        wildcard = ".".join(parts[:n]) + ".*"
        if wildcard in table:
            return table[wildcard]
    return None


def _show(m):
    return m or "__init__"


def check(root: Path, table: dict[str, int]) -> dict[str, list[str]]:
    """The findings on the package at ``root``: circles, upward imports, modules the table lacks,
    and table entries that name no module."""
    known = package_modules(root)
    graph = {m: module_imports(m, f, is_pkg, known, root.name) for m, (f, is_pkg) in known.items()}
    found = {"circles": [], "upward": [], "missing": [], "stale": []}
    for group in strongly_connected(graph):
        ties = [f"{_show(a)} -> {_show(b)} ({known[a][0].relative_to(root)}:{graph[a][b]})"
                for a in group for b in group if b in graph[a]]
        found["circles"].append(f"circle {', '.join(map(_show, group))}: " + "; ".join(ties))
    for m in known:
        if layer_of(m, table) is None:
            found["missing"].append(f"{_show(m)} ({known[m][0].relative_to(root)}) has no layer in LAYERS.json")
    for m, edges in sorted(graph.items()):
        lm = layer_of(m, table)
        for t, line in sorted(edges.items()):
            lt = layer_of(t, table)
            if lm is not None and lt is not None and lt > lm:
                found["upward"].append(f"{_show(m)} (layer {lm}) imports {_show(t)} (layer {lt}) at "
                                       f"{known[m][0].relative_to(root)}:{line}")
    for key in table:
        if key.endswith(".*"):
            prefix = key[:-2]
            if not any(m == prefix or m.startswith(prefix + ".") for m in known):
                found["stale"].append(f"LAYERS.json names {key}, which matches no module")
        elif (key if key != "__init__" else "") not in known:
            found["stale"].append(f"LAYERS.json names {key}, which is no module")
    return found


# ------------------------------------------------------------------------------------------------
# the checker on a made-up package, with every kind of finding


def _write(root: Path, files: dict[str, str]):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_circles_upward_imports_and_gaps(tmp_path):
    root = tmp_path / "pkg"
    _write(root, {
        "__init__.py": "from .top import run\n",
        "low.py": "import os\n\ndef f():\n    from .mid import g  # deferred: still counts\n",
        "mid.py": "from pkg.low import f\n",  # absolute; closes the circle low <-> mid
        "top.py": "from . import low, mid\nfrom .sub import leaf\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "from ..low import f\nimport pkg.sub\n",
        "sub/other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import top\n",
        "free.py": "import json\nfrom .low import *\n",
    })
    table = {"low": 0, "mid": 0, "sub.*": 1, "top": 2, "__init__": 3, "gone": 1, "old.*": 2}
    found = check(root, table)
    assert len(found["circles"]) == 1 and found["circles"][0].startswith("circle low, mid:"), found
    assert "low -> mid (low.py:4)" in found["circles"][0] and "mid -> low (mid.py:1)" in found["circles"][0]
    assert found["upward"] == ["sub.other (layer 1) imports top (layer 2) at sub/other.py:3"], found
    assert found["missing"] == ["free (free.py) has no layer in LAYERS.json"], found
    assert found["stale"] == ["LAYERS.json names gone, which is no module",
                              "LAYERS.json names old.*, which matches no module"], found
    # the edges behind the findings, one by one
    known = package_modules(root)
    assert module_imports("top", known["top"][0], False, known, "pkg") == {"low": 1, "mid": 1, "sub.leaf": 2}
    assert module_imports("sub.leaf", known["sub.leaf"][0], False, known, "pkg") == {"low": 1, "sub": 2}
    assert module_imports("", known[""][0], True, known, "pkg") == {"top": 1}
    assert module_imports("free", known["free"][0], False, known, "pkg") == {"low": 2}


def test_checker_passes_a_clean_package(tmp_path):
    root = tmp_path / "pkg"
    _write(root, {"__init__.py": "from . import b\n", "a.py": "", "b.py": "from .a import *\n"})
    assert check(root, {"a": 0, "b": 1, "__init__": 2}) == {"circles": [], "upward": [], "missing": [], "stale": []}


# ------------------------------------------------------------------------------------------------
# the package


@pytest.fixture(scope="module")
def findings():
    return check(PACKAGE, json.loads(TABLE.read_text()))


def test_every_module_has_a_layer(findings):
    assert not findings["missing"], "add each to mpilocal/LAYERS.json (layers: docs/architecture.md):\n" + \
        "\n".join(findings["missing"])


def test_layer_table_names_only_modules(findings):
    assert not findings["stale"], "remove or rename in mpilocal/LAYERS.json:\n" + "\n".join(findings["stale"])


def test_no_import_circles(findings):
    assert not findings["circles"], ("import circles (break each by moving the shared rule down, or by "
                                     "registration from above):\n" + "\n".join(findings["circles"]))


def test_no_upward_imports(findings):
    assert not findings["upward"], ("imports from a lower layer to a higher one (move the shared rule down, "
                                    "or let the higher module register itself):\n" + "\n".join(findings["upward"]))


def test_the_pure_floor_loads_without_mpi():
    """Layer 0 of LAYERS.json is pure: each of its modules imports in a fresh interpreter where mpi4py
    cannot be imported, and importing it starts nothing (the bootstrap stays off until an MPI module)."""
    import subprocess
    import sys

    pure = sorted(m for m, layer in json.loads(TABLE.read_text()).items() if layer == 0)
    code = ("import sys\nsys.modules['mpi4py'] = None\nimport importlib, mpilocal\n"
            f"for m in {pure!r}: importlib.import_module('mpilocal.' + m)\n"
            "print(mpilocal._STATE, sorted(k for k in sys.modules if k.startswith('mpi4py') and sys.modules[k]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(PACKAGE.parent))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["0", "[]"], p.stdout
