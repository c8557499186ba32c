"""Under CI=true a skip fails the run (tests/conftest.py's hooks): a test that skips, and a module
that skips itself whole; a GPU test's skip passes. Run in a pytest of its own on files made here,
with this folder's conftest as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

FILES = {
    "test_skips_inside.py": "import pytest\n\ndef test_a():\n    pytest.skip('no tmux')\n",
    "test_skips_whole.py": "import pytest\npytest.importorskip('no_such_module_here')\n\n"
                           "def test_b():\n    pass\n",  # fmt: skip
    "test_gpu_skip.py": "import pytest\n\n@pytest.mark.gpu\ndef test_c():\n"
                        "    pytest.skip('no GPU')\n",  # fmt: skip
}


def run(folder: Path, name: str, ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(HERE)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p",
                           "no:cacheprovider", "--rootdir", str(folder), str(folder / name)],
                          capture_output=True, text=True, env=env, cwd=folder)  # fmt: skip


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_skip_fails_in_ci_but_a_gpu_tests(tmp_path: Path, name: str) -> None:
    for file, text in FILES.items():
        (tmp_path / file).write_text(text)
    ci, local = run(tmp_path, name, "true"), run(tmp_path, name, "")
    assert "1 skipped" in local.stdout, local.stdout + local.stderr  # outside CI: a skip
    if name == "test_gpu_skip.py":
        assert ci.returncode == 0 and "1 skipped" in ci.stdout, ci.stdout + ci.stderr
    else:
        assert ci.returncode != 0, ci.stdout + ci.stderr
        assert "skipped in CI, where only a GPU test may skip" in ci.stdout, ci.stdout
