"""What kvrepl imports before its prompt is drawn: none of the heavy modules (torch, transformers,
numpy, safetensors, the tokenizers, gguf-py's package, Markdown), and no model loading started,
since every one of them delays the prompt. Counted, not timed: a real process in a real
pseudo-terminal runs kvrepl's start-up until prompt-toolkit is about to draw the prompt, and
prints what `sys.modules` and the threads hold then. `kvrepl sessions` and `kvrepl path` load
no model either, so they import none of them at all."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import threading
from pathlib import Path

import pytest
from procs import PYTHON, kvrepl_env, run_kvrepl

HEAVY = ("torch", "transformers", "numpy", "safetensors", "tokenizers", "gguf", "yaml", "jinja2",
         "huggingface_hub", "markdown_it", "rich.markdown", "kvrepl.backends.cpu")  # fmt: skip

# kvrepl's start-up as `kvrepl` runs it; prompt-toolkit's prompt() reports instead of drawing.
UP_TO_THE_PROMPT = """
import json, sys, threading
from prompt_toolkit import PromptSession

def report(self, *args, **kwargs):
    with open(sys.argv[1], "w") as f:
        json.dump({"modules": sorted(sys.modules),
                   "threads": [t.name for t in threading.enumerate()]}, f)
    raise EOFError

PromptSession.prompt = report
from kvrepl.app.cli import main
sys.exit(main(sys.argv[2:]))
"""


def heavy_in(modules: list[str]) -> list[str]:
    return [m for m in modules if m in HEAVY or m.split(".")[0] in HEAVY]


def run_in_a_terminal(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Run the start-up with stdin and stdout on a pseudo-terminal (so kvrepl is interactive);
    what it reported at its prompt, and what the terminal showed."""
    leader, follower = pty.openpty()
    screen = bytearray()

    def drain() -> None:  # the terminal's output, read as it comes (a full pty would block)
        with contextlib.suppress(OSError):  # EIO: the other end is closed, all is read
            while chunk := os.read(leader, 1 << 16):
                screen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    report = tmp_path / "report.json"
    env = kvrepl_env(tmp_path / "home", TERM="xterm")
    try:
        done = subprocess.run([str(PYTHON), "-c", UP_TO_THE_PROMPT, str(report), *args],
                              stdin=follower, stdout=follower, stderr=subprocess.PIPE, env=env,
                              timeout=120)  # fmt: skip
    finally:
        os.close(follower)
    reader.join(10)
    os.close(leader)
    assert done.returncode == 0, done.stderr.decode()
    shown = screen.decode(errors="replace")
    assert "/help for commands" in shown  # it reached the prompt
    return json.loads(report.read_text()), shown


@pytest.mark.parametrize("args", [(), ("--session", "notes"), ("-c",)],
                         ids=["new", "named-session", "continue-a-saved-one"])  # fmt: skip
def test_nothing_heavy_is_imported_and_no_model_load_starts_before_the_prompt(tmp_path, args):
    if args == ("-c",):  # a session with an answer and its K/V snapshot on disk, to go on with
        done = run_kvrepl(["--session", "saved", "--max-tokens", "3", "hi"], home=tmp_path / "home")
        assert done.rc == 0 and list((tmp_path / "home" / "kv").rglob("*.safetensors")), done.err
    seen, shown = run_in_a_terminal(tmp_path, *args)
    assert ("saved" in shown) == (args == ("-c",))  # -c went on with the saved session
    assert "prompt_toolkit" in seen["modules"] and "kvrepl.store.db" in seen["modules"]
    assert heavy_in(seen["modules"]) == []
    assert "model-loader" not in seen["threads"]


@pytest.mark.parametrize("command", [["sessions"], ["path"], ["path", "--log"]])
def test_the_subcommands_without_a_model_import_nothing_heavy(tmp_path, command):
    code = ("import json, sys\nfrom kvrepl.app.cli import main\nrc = main(sys.argv[1:])\n"
            "print('MODULES ' + json.dumps(sorted(sys.modules)))\nsys.exit(rc)")  # fmt: skip
    env = kvrepl_env(tmp_path / "home")
    done = subprocess.run([str(PYTHON), "-c", code, *command], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout.split("MODULES ", 1)[1])
    assert heavy_in(modules) == []
