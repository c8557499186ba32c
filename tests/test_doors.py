"""One door per room (ARCHITECTURE.md), read from the source as test_layers.py reads the imports:

- the prompt cache owns its ids: no module but engine/cache.py changes a cache's `ids` (an
  object may change its own, `self.ids`: the decoder's are its own);
- no module reaches into another's private parts (`obj._name`, where `_name` is not defined in
  the same module: a class may use its own privates on another instance of itself);
- the app reaches what is kept only through the conversation: never `chat.store`, `chat.kv`
  or `chat.pool`.

Each check is shown to catch what it forbids, on a snippet (the last tests).
"""

from __future__ import annotations

import ast
from pathlib import Path

KVREPL = Path(__file__).resolve().parent.parent / "kvrepl"
MUTATORS = {"append", "extend", "insert", "pop", "clear", "remove", "sort", "reverse"}
KEPT = {"store", "kv", "pool"}


def _sources(root: Path = KVREPL) -> dict[str, ast.AST]:
    return {str(p.relative_to(root.parent)): ast.parse(p.read_text()) for p in root.rglob("*.py")}


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _foreign_ids(node: ast.Attribute) -> bool:
    """`x.ids` where x is not the object itself."""
    return node.attr == "ids" and not _is_self(node.value)


def ids_writes(tree: ast.AST) -> list[int]:
    """Lines that change another object's `ids`: a mutating call, an assignment, a `del`."""
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATORS and isinstance(node.func.value, ast.Attribute)
                and _foreign_ids(node.func.value)):  # fmt: skip
            lines.append(node.lineno)
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign | ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            base = t.value if isinstance(t, ast.Subscript) else t
            if isinstance(base, ast.Attribute) and _foreign_ids(base):
                lines.append(node.lineno)
    return sorted(lines)


def _defined_privates(tree: ast.AST) -> set[str]:
    """Private names a module defines: methods, `self._x` attributes, class fields, imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def _modules_named(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return out


def private_reaches(tree: ast.AST) -> list[tuple[int, str]]:
    """`obj._name` on another object, where this module does not define `_name`."""
    own, modules = _defined_privates(tree), _modules_named(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or _is_self(node.value):
            continue
        if name in own or (isinstance(node.value, ast.Name) and node.value.id in modules):
            continue
        found.append((node.lineno, name))
    return found


def kept_reaches(tree: ast.AST) -> list[int]:
    """`chat.store` / `.chat.kv` / `chat.pool`: the app past the conversation's door."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in KEPT:
            owner = node.value
            named = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if named == "chat":
                lines.append(node.lineno)
    return lines


def test_only_the_cache_changes_its_ids() -> None:
    sources = {**_sources(), **_sources(KVREPL.parent / "bench")}  # the benchmarks too
    bad = {f: lines for f, tree in sources.items()
           if f != "kvrepl/engine/cache.py" and (lines := ids_writes(tree))}  # fmt: skip
    assert bad == {}


def test_no_module_reaches_into_another_ones_private_parts() -> None:
    bad = {f: found for f, tree in _sources().items() if (found := private_reaches(tree))}
    assert bad == {}


def test_the_app_reaches_what_is_kept_only_through_the_conversation() -> None:
    bad = {f: lines for f, tree in _sources().items()
           if f.startswith("kvrepl/app/") and (lines := kept_reaches(tree))}  # fmt: skip
    assert bad == {}


def test_the_checks_catch_what_they_forbid() -> None:
    writes = ast.parse(
        "self.pc.ids.append(1)\nengine.pc.ids.extend(x)\ndel pc.ids[3:]\npc.ids = []\n"
        "self.ids.append(1)\nn = len(pc.ids)\n"
    )
    assert ids_writes(writes) == [1, 2, 3, 4]
    reaches = ast.parse(
        "import os\nclass A:\n    def f(self, o):\n        self._own = 1\n"
        "        return o._own, o._k, self.layer._v, os._exit\n"
    )
    assert [name for _, name in private_reaches(reaches)] == ["_k", "_v"]
    kept = ast.parse("ctx.chat.store.get(1)\nchat.pool.size()\nchat.summaries()\nself.store\n")
    assert kept_reaches(kept) == [1, 2]
