"""The floors of kvrepl/ (ARCHITECTURE.md): imports run downward only, and never in a cycle.

    app/ -> chat/ -> engine/, store/ -> backends/ -> core (kvrepl/*.py)

A module imports its own folder or a lower floor; engine/ and store/ are one floor and never
import each other; a backend (backends/cpu/, gpu/, hf/) never imports another one, only
backends/'s own modules. Every import is read from the source (ast), also those inside functions
and under TYPE_CHECKING: an import deferred to a function is still an import, and a cycle hidden
in a function is still a cycle. kvrepl/__main__.py, the program's door, may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

KVREPL = Path(__file__).resolve().parent.parent / "kvrepl"
RANK = {"core": 0, "backends": 1, "engine": 2, "store": 2, "chat": 3, "app": 4, "entry": 5}

# Imports known to run the wrong way, each with the fix it needs. Any other fails, and so does
# an entry here that no longer holds (remove it once fixed).
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
KNOWN_CYCLES: dict[frozenset[str], str] = {}

Graph = dict[str, dict[str, tuple[str, int]]]  # importer -> imported -> (file, line)


def modules(root: Path) -> dict[str, Path]:
    """Every module under `root` (the kvrepl folder) by dotted name; a package by its name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def place(module: str, root: Path) -> str:
    """The module's place: "core", "entry" (__main__), a floor ("app") or a backend
    ("backends/gpu")."""
    parts = module.split(".")[1:]
    if not parts or (len(parts) == 1 and not (root / parts[0]).is_dir()):
        return "entry" if parts == ["__main__"] else "core"
    if parts[0] == "backends" and len(parts) > 1 and (root / "backends" / parts[1]).is_dir():
        return f"backends/{parts[1]}"
    return parts[0]


def _imported(module: str, path: Path, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*up, *([node.module] if node.module else [])])
    return [f"{base}.{a.name}" for a in node.names]


def import_graph(root: Path) -> Graph:
    """Which module imports which, anywhere in its source, with the first place it does."""
    mods = modules(root)
    graph: Graph = {m: {} for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(module, path, node):
                parts = name.split(".")
                found = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                              if ".".join(parts[:i]) in mods), None)  # fmt: skip
                if found is not None and found != module and found not in graph[module]:
                    where = path.relative_to(root.parent).as_posix()
                    graph[module][found] = (where, node.lineno)
    return graph


def _where(file: str, line: int) -> str:
    return f"{file}:{line}"


def _rule(src: str, dst: str) -> str | None:
    """Why an import from place `src` into place `dst` runs the wrong way; None when it may."""
    if src == dst or src == "entry":
        return None
    fs, fd = src.split("/")[0], dst.split("/")[0]
    if fs not in RANK or fd not in RANK:
        return None  # test_every_folder_is_a_floor says so
    if fs == fd:
        return f"{src}/ imports {dst}/: a backend never imports another" if "/" in src and \
            "/" in dst else None  # fmt: skip
    if RANK[fd] < RANK[fs]:
        return None
    if RANK[fd] == RANK[fs]:
        return f"{fs}/ and {fd}/ are one floor: neither imports the other"
    name = {"core": "the core (kvrepl/*.py)"}
    return f"{name.get(src, src + '/')} imports {name.get(dst, dst + '/')}, a higher floor"


def upward_imports(graph: Graph, root: Path = KVREPL) -> list[tuple[tuple[str, str], str]]:
    out = []
    for src, targets in sorted(graph.items()):
        for dst, (path, line) in sorted(targets.items()):
            why = _rule(place(src, root), place(dst, root))
            if why:
                fix = KNOWN_UPWARD.get((src, dst))
                note = f" [known; fix: {fix}]" if fix else ""
                out.append(((src, dst), f"{_where(path, line)} imports {dst}: {why}{note}"))
    return out


def _components(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _cycle(graph: Graph, comp: list[str]) -> list[str]:
    """One shortest cycle through the component's first module."""
    first, inside = comp[0], set(comp)
    paths = {first: [first]}
    queue = [first]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node]):
            if nxt == first:
                return [*paths[node], first]
            if nxt in inside and nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return comp


def cycle_problems(graph: Graph, root: Path = KVREPL) -> list[tuple[frozenset[str], str]]:
    out = []
    for comp in _components(graph):
        cycle = _cycle(graph, comp)
        steps = " -> ".join(
            f"{b} ({_where(*graph[a][b])})" for a, b in zip(cycle, cycle[1:], strict=False)
        )
        places = sorted({place(m, root) for m in comp})
        kind = f"across {', '.join(places)}" if len(places) > 1 else f"within {places[0]}"
        fix = KNOWN_CYCLES.get(frozenset(comp))
        note = f" [known; fix: {fix}]" if fix else ""
        out.append((frozenset(comp), f"import cycle {kind}: {cycle[0]} -> {steps}{note}"))
    return out


def test_every_folder_is_a_floor() -> None:
    places = {place(m, KVREPL) for m in modules(KVREPL)}
    unknown = sorted(p for p in places if p.split("/")[0] not in RANK)
    assert not unknown, f"folders that are no floor (add them to RANK): {unknown}"


def test_imports_run_down_the_floors() -> None:
    bad = [msg for key, msg in upward_imports(import_graph(KVREPL)) if key not in KNOWN_UPWARD]
    assert not bad, "imports that run up the floors:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    bad = [msg for key, msg in cycle_problems(import_graph(KVREPL)) if key not in KNOWN_CYCLES]
    assert not bad, "import cycles:\n" + "\n".join(bad)


def test_known_exceptions_still_hold() -> None:
    graph = import_graph(KVREPL)
    found = {key for key, _ in [*upward_imports(graph), *cycle_problems(graph)]}
    stale = [k for k in [*KNOWN_UPWARD, *KNOWN_CYCLES] if k not in found]
    assert not stale, f"fixed: remove them from KNOWN_UPWARD / KNOWN_CYCLES: {stale}"


def test_the_check_sees_deferred_imports(tmp_path: Path) -> None:
    """A made-up tree: an upward import inside a function, one under TYPE_CHECKING (together a
    cycle), a backend importing another and a sideways import are each reported, where they are."""
    root = tmp_path / "kvrepl"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "engine/__init__.py": "",
        "engine/core.py": "def f():\n    from kvrepl.app.cli import main\n",
        "engine/plan.py": "from . import core\nfrom ..store import rows\n",
        "store/__init__.py": "",
        "store/rows.py": "from kvrepl import errors\n",
        "app/__init__.py": "",
        "app/cli.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from kvrepl.engine.core import f\n",
        "backends/__init__.py": "",
        "backends/layers.py": "",
        "backends/gpu/__init__.py": "",
        "backends/gpu/model.py": "import kvrepl.backends.layers\nimport kvrepl.backends.cpu.k\n",
        "backends/cpu/__init__.py": "",
        "backends/cpu/k.py": "from kvrepl.backends import layers\n",
    }  # fmt: skip
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    up = dict(upward_imports(graph, root))
    assert set(up) == {("kvrepl.engine.core", "kvrepl.app.cli"),
                       ("kvrepl.engine.plan", "kvrepl.store.rows"),
                       ("kvrepl.backends.gpu.model", "kvrepl.backends.cpu.k")}  # fmt: skip
    assert up[("kvrepl.engine.core", "kvrepl.app.cli")].startswith("kvrepl/engine/core.py:2 ")
    assert "a backend never imports another" in up[("kvrepl.backends.gpu.model",
                                                    "kvrepl.backends.cpu.k")]  # fmt: skip
    assert "one floor" in up[("kvrepl.engine.plan", "kvrepl.store.rows")]
    cycles = dict(cycle_problems(graph, root))
    assert list(cycles) == [frozenset({"kvrepl.engine.core", "kvrepl.app.cli"})]
    assert "kvrepl/app/cli.py:3" in cycles[frozenset({"kvrepl.engine.core", "kvrepl.app.cli"})]
