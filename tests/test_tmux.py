"""End to end in a real terminal: kvrepl in a detached tmux session with the embedded model.

Type a question, see the rendered answer and a stats line; /save demo; quit; start again;
/load demo and see the reuse reported; /edit 1 and see the cut point and the recomputed count;
then check that the database holds both branches."""

from __future__ import annotations

import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
TIMEOUT_S = 120.0
POLL_S = 0.5
STATS = re.compile(r"reused ([\d,]+) · prefilled ([\d,]+) · generated (\d+) · ttft [\d.]+ s")

pytestmark = [
    pytest.mark.tmux,
    pytest.mark.model,
    pytest.mark.skipif(
        TMUX is None,
        reason="tmux is not installed: this end-to-end test drives kvrepl inside tmux",
    ),
]


def number(text: str) -> int:
    return int(text.replace(",", ""))


class Terminal:
    """A tmux server of its own (its own socket), one window of a fixed size."""

    def __init__(self, cwd: Path, width: int = 120, height: int = 40) -> None:
        self.socket = f"kvrepl-test-{uuid.uuid4().hex[:8]}"
        self.cwd, self.width, self.height = cwd, width, height
        self.target = ""
        self.socket_path: str | None = None

    def tmux(self, *args: str) -> str:
        cmd = [TMUX or "tmux", "-L", self.socket, *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout

    def start(self, name: str, command: str) -> None:
        """Run `command` in a new session; the shell then prints its exit code and waits, so the
        pane (and the code) can still be read after kvrepl ends."""
        script = f'{command}; echo "[exit $?]"; sleep 600'
        self.tmux("new-session", "-d", "-s", name, "-x", str(self.width), "-y", str(self.height),
                  "-c", str(self.cwd), script)  # fmt: skip
        self.target = name
        self.socket_path = self.tmux("display-message", "-p", "#{socket_path}").strip()

    def type(self, text: str) -> None:
        self.type_keys(text)
        self.tmux("send-keys", "-t", self.target, "Enter")

    def type_keys(self, text: str) -> None:
        """Type `text`, without Enter."""
        self.tmux("send-keys", "-t", self.target, "-l", text)

    def paste(self, text: str) -> None:
        """Paste `text` as a terminal does: bracketed, when the program asked for it."""
        source = self.cwd / "pasted.txt"
        source.write_text(text, encoding="utf-8")
        self.tmux("load-buffer", str(source))
        self.tmux("paste-buffer", "-p", "-d", "-t", self.target)

    def pane(self) -> list[str]:
        """The rows the pane shows now (no scrollback), as the user sees them."""
        return self.tmux("capture-pane", "-p", "-t", self.target).split("\n")[: self.height]

    def screen(self) -> str:
        """The pane's text, scrollback included, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.target)

    def wait_for(self, found: Callable[[str], object], what: str) -> object:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            screen = self.screen()
            result = found(screen)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")
            time.sleep(POLL_S)

    def wait_for_prompt(self, count: int) -> None:
        """Until the screen shows the `›` prompt at least `count` times."""
        self.wait_for(lambda s: len(re.findall(r"^› ?", s, re.M)) >= count, f"prompt #{count}")

    def kill(self) -> None:
        subprocess.run([TMUX or "tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30)  # fmt: skip
        if self.socket_path:
            Path(self.socket_path).unlink(missing_ok=True)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path)
    try:
        yield term
    finally:
        term.kill()


def test_chat_save_quit_load_edit_in_a_real_terminal(terminal: Terminal, tmp_path: Path):
    home = tmp_path / "store"
    command = shlex.join(["env", f"KVREPL_HOME={home}", "TERM=xterm-256color", sys.executable,
                          "-m", "kvrepl", "--temperature", "0", "--max-tokens", "30"])  # fmt: skip

    # First run: a question, its rendered answer and one stats line; /save demo; /quit.
    terminal.start("first", command)
    terminal.wait_for_prompt(1)
    question = "What is the capital of France?"
    terminal.type(question)
    stats = terminal.wait_for(lambda s: STATS.search(s), "the stats line of the first answer")
    screen = terminal.screen()
    assert number(stats.group(1)) == 0 and number(stats.group(2)) > 0
    answer_lines = [line for line in screen.splitlines() if "Paris" in line]
    assert len(answer_lines) == 1, screen  # rendered once: no duplicated lines from Live
    assert question not in answer_lines[0]
    assert "\x1b" not in screen
    terminal.wait_for_prompt(2)
    terminal.type("/save demo")
    terminal.wait_for(lambda s: "saved as 'demo'" in s, "/save demo")
    terminal.type("/quit")
    terminal.wait_for(lambda s: "[exit 0]" in s, "kvrepl to quit with exit code 0")

    # Second run: /load demo reuses the snapshot; /edit 1 cuts the cache and recomputes the rest.
    terminal.start("second", command)
    terminal.wait_for_prompt(1)
    terminal.type("/load demo")
    loaded = terminal.wait_for(
        lambda s: re.search(r"loaded demo: 1 turn\(s\); reused ([\d,]+) tokens, recomputed "
                            r"([\d,]+)", s), "/load demo")  # fmt: skip
    assert number(loaded.group(1)) > 0
    assert number(loaded.group(2)) < number(loaded.group(1))
    terminal.wait_for_prompt(2)
    terminal.type("/edit 1 What is the capital of Italy?")
    cut = terminal.wait_for(
        lambda s: re.search(r"cache: cut at token ([\d,]+) \(turn 1, user\); recomputing "
                            r"([\d,]+) tokens", s), "the cut notice of /edit")  # fmt: skip
    keep, recomputed = number(cut.group(1)), number(cut.group(2))
    assert 0 < keep < number(loaded.group(1))
    assert recomputed > 0
    edit_stats = terminal.wait_for(lambda s: STATS.search(s), "the stats line of the edit")
    assert number(edit_stats.group(1)) == keep
    assert number(edit_stats.group(2)) == recomputed
    terminal.wait_for_prompt(3)
    terminal.type("/quit")
    terminal.wait_for(lambda s: "[exit 0]" in s, "kvrepl to quit with exit code 0")

    # The database holds both branches: two user turns with the same parent in session 'demo'.
    db = sqlite3.connect(home / "kvrepl.db")
    try:
        (session_id,) = db.execute("SELECT id FROM sessions WHERE name = 'demo'").fetchone()
        rows = db.execute(
            "SELECT parent_id, content FROM messages WHERE session_id = ? AND role = 'user' "
            "ORDER BY id", [session_id]).fetchall()  # fmt: skip
        answers = db.execute(
            "SELECT count(*) FROM messages WHERE session_id = ? AND role = 'assistant'",
            [session_id]).fetchone()[0]  # fmt: skip
    finally:
        db.close()
    assert [content for _, content in rows] == [question, "What is the capital of Italy?"]
    assert rows[0][0] == rows[1][0]  # siblings: the edit is a new branch, the old one is kept
    assert answers == 2


def pasted_text(size: int) -> str:
    """`size` characters of numbered words, one line, ending in THE-END (its last columns)."""
    words = " ".join(f"w{i:05d}" for i in range(size // 7 + 1))
    return words[: size - 8].rstrip() + " THE-END"


@pytest.mark.parametrize("size", [6_000, 20_000])
@pytest.mark.parametrize("newline", ["", "\n"], ids=["no-newline", "newline"])
def test_a_paste_taller_than_the_screen_shows_the_prompt_and_the_text(
    terminal: Terminal, tmp_path: Path, size: int, newline: str
):
    """A paste of 6,000 or 20,000 characters (50 and 167 rows of a 120 x 40 terminal), with a
    newline at its end or not: the prompt, the paste's start and end, the toolbar, and a key
    typed next where the cursor is. Before the fold, a paste ending in a newline left the screen
    blank but the toolbar, and the key typed next appeared at the top left."""
    home = tmp_path / "store"
    command = shlex.join(["env", f"KVREPL_HOME={home}", "TERM=xterm-256color", sys.executable,
                          "-m", "kvrepl", "--temperature", "0", "--max-tokens", "1"])  # fmt: skip
    terminal.start("paste", command)
    terminal.wait_for_prompt(1)
    text = pasted_text(size) + newline
    terminal.paste(text)
    terminal.type_keys("x")
    tail = "THE-END\nx" if newline else "THE-ENDx"

    def shown(_: str) -> list[str] | None:
        rows = terminal.pane()
        flat = "\n".join(r.rstrip() for r in rows)
        return rows if tail in flat and re.search(r"… [\d,]+ characters …", flat) else None

    rows = terminal.wait_for(shown, "the folded paste and the key typed after it")
    text_rows = [r for r in rows if r.strip()]
    assert text_rows[0].startswith("kvrepl: /help") and text_rows[1].startswith("› w00000 w00001")
    assert re.search(r"(loading the model…|SmolLM2)", text_rows[-1])  # the toolbar, at the bottom
    assert rows[0].strip() != "x"  # not typed into an empty screen's corner
    hidden = int(re.search(r"… ([\d,]+) characters …", "\n".join(rows)).group(1).replace(",", ""))
    assert 0 < hidden < size
    if size == 6_000 and newline:  # the whole text is there: Enter sends it
        terminal.tmux("send-keys", "-t", terminal.target, "Enter")
        terminal.wait_for(lambda s: STATS.search(s), "the answer's stats line")
        db = sqlite3.connect(home / "kvrepl.db")
        try:
            (content,) = db.execute("SELECT content FROM messages WHERE role = 'user'").fetchone()
        finally:
            db.close()
        assert content == text + "x"


def test_a_first_start_shows_the_prompt_before_the_tokenizer_is_read(
    terminal: Terminal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A first start with the embedded GGUF (a cold cache: its tokenizer has never been read)
    shows the prompt at once and reads the tokenizer in the background; a question typed at
    once waits for it with the status line, and its answer is the one a warm start gives."""
    from procs import run_kvrepl

    from kvrepl.engine import firststart, models

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kernels").symlink_to(models.cache_dir() / "kernels")  # compiled once, elsewhere
    home = tmp_path / "store"
    flags = ["--temperature", "0", "--max-tokens", "30"]
    command = shlex.join(["env", f"KVREPL_HOME={home}", f"KVREPL_CACHE={cache}", "TERM=xterm",
                          sys.executable, "-m", "kvrepl", *flags])  # fmt: skip
    question = "What is the capital of France?"
    monkeypatch.setenv("KVREPL_CACHE", str(cache))
    tokenizer = firststart.meta_folder(models.embedded_gguf()) / "tokenizer.json"
    terminal.start("first", command)
    terminal.wait_for_prompt(1)
    assert not tokenizer.exists()  # the prompt came first
    screen = terminal.screen()
    assert "first start with this model: reading its tokenizer once" in screen
    assert "Traceback" not in screen
    terminal.type(question)
    terminal.wait_for(lambda s: STATS.search(s), "the stats line of the first answer")
    assert tokenizer.exists()
    terminal.type("/quit")
    terminal.wait_for(lambda s: "[exit 0]" in s, "kvrepl to quit with exit code 0")
    db = sqlite3.connect(home / "kvrepl.db")
    try:
        (answer,) = db.execute("SELECT content FROM messages WHERE role = 'assistant'").fetchone()
    finally:
        db.close()
    warm = run_kvrepl([*flags, question], home=tmp_path / "warm", env={"KVREPL_CACHE": str(cache)})
    assert warm.rc == 0, warm.err
    assert "first start" not in warm.err
    assert warm.out.strip() == answer.strip() and "Paris" in answer
