"""Each room stays small enough to read at once (the sizes issue 18 keeps): no module of kvrepl
over 400 lines and no function over 60; one that grows past them is split by what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

KVREPL = Path(__file__).resolve().parent.parent / "kvrepl"
MODULE_LINES, FUNCTION_LINES = 400, 60


def long_modules(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): n for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MODULE_LINES}  # fmt: skip


def long_functions(root: Path) -> dict[str, int]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > FUNCTION_LINES:
                    out[f"{p.relative_to(root)}:{node.lineno} {node.name}"] = n
    return out


def test_no_module_over_400_lines() -> None:
    assert not (long := long_modules(KVREPL)), f"modules over {MODULE_LINES} lines: {long}"


def test_no_function_over_60_lines() -> None:
    assert not (long := long_functions(KVREPL)), f"functions over {FUNCTION_LINES} lines: {long}"


def test_the_checks_see_a_long_module_and_a_nested_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(FUNCTION_LINES - 1))
    (tmp_path / "a.py").write_text(f"class A:\n    def f(self):\n{body}\n")  # 60 lines: fine
    assert long_functions(tmp_path) == {} and long_modules(tmp_path) == {}
    (tmp_path / "b.py").write_text(f"class B:\n    def g(self):\n{body}\n        y = 1\n"
                                   + "\n" * MODULE_LINES)  # fmt: skip
    assert long_functions(tmp_path) == {"b.py:2 g": FUNCTION_LINES + 1}
    assert list(long_modules(tmp_path)) == ["b.py"]
