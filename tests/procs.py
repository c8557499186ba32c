"""kvrepl as a real process, for the tests where that is the point (file descriptors, exit
statuses, a kill, a second process on one store): its command line, its environment, starting
it, and what it left (the exit status, stdout, stderr, the figures of its stats lines).

    done = run_kvrepl(["--session", "demo"], home=home, stdin="hello there\\n")
    assert done.rc == 0 and done.stats() == [(0, 31, 16)]

`Jobs` runs several side by side in the background (each spends seconds importing torch), so
that the tests in process can go on meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# The interpreter running the tests and its environment's console script (a git worktree has no
# .venv of its own); kvrepl_env puts this checkout first on the path, so children run its code.
PYTHON = Path(sys.executable)
KVREPL_SCRIPT = PYTHON.with_name("kvrepl")
# tests/faulty_kvrepl.py: kvrepl's CLI with one fault injected (FAULT:N, its docstring says which)
FAULTY_KVREPL = TESTS / "faulty_kvrepl.py"
STATS = re.compile(r"reused ([\d,]+) · prefilled ([\d,]+) · generated ([\d,]+)")


def kvrepl_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """This environment for a child: no KVREPL_* setting but the model cache (KVREPL_CACHE, where
    the converted embedded model lives), no colour or encoding forced (plain output must come
    from kvrepl itself), one CPU thread, unbuffered, this checkout's code first on the path;
    KVREPL_HOME when `home` is given; then `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KVREPL_") or k == "KVREPL_CACHE"}  # fmt: skip
    for k in ("NO_COLOR", "FORCE_COLOR", "PYTHONIOENCODING"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT))  # fmt: skip
    if home is not None:
        env["KVREPL_HOME"] = str(home)
    env.update(extra)
    return env


def kvrepl_command(args: list[str], *, fault: str | None = None, script: bool = False) -> list[str]:
    """`python -m kvrepl ARGS`; the console script with `script`; with `fault` ("FAULT:N"),
    tests/faulty_kvrepl.py."""
    if fault is not None:
        return [str(PYTHON), str(FAULTY_KVREPL), fault, *args]
    return [str(KVREPL_SCRIPT), *args] if script else [str(PYTHON), "-m", "kvrepl", *args]


def stats_of(text: str) -> list[tuple[int, int, int]]:
    """(reused, prefilled, generated) of each stats line in `text`."""
    return [(int(a.replace(",", "")), int(b.replace(",", "")), int(c.replace(",", "")))
            for a, b, c in STATS.findall(text)]  # fmt: skip


@dataclass
class Done:
    """What a finished kvrepl left."""

    rc: int
    out: str
    err: str

    def stats(self) -> list[tuple[int, int, int]]:
        """The figures of each stats line, read from stderr: piped, that is where they go."""
        return stats_of(self.err)


class Kvrepl:
    """A started kvrepl: stdout and stderr are pipes, or files in `out_dir` (`stdout`, `stderr`:
    a process left in the background never blocks on a full pipe)."""

    def __init__(self, args: list[str], *, home: Path | None = None,
                 stdin: bytes | str | Path | None = b"", out_dir: Path | None = None,
                 cwd: Path | None = None, env: dict[str, str] | None = None,
                 fault: str | None = None, script: bool = False) -> None:  # fmt: skip
        """`stdin`: text piped in, then the pipe closed (as `echo ... | kvrepl`); a file read
        from; None: /dev/null. `cwd`: by default the folder above `home`, else the checkout."""
        self.out_dir = out_dir
        files: list[IO[bytes]] = []
        if isinstance(stdin, Path):
            files.append(stdin.open("rb"))
            source: Any = files[-1]
        else:
            source = subprocess.DEVNULL if stdin is None else subprocess.PIPE
        out: Any = subprocess.PIPE
        err: Any = subprocess.PIPE
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            out, err = open(out_dir / "stdout", "wb"), open(out_dir / "stderr", "wb")
            files += [out, err]
        try:
            self.popen = subprocess.Popen(
                kvrepl_command(args, fault=fault, script=script), stdin=source, stdout=out,
                stderr=err, cwd=cwd or (home.parent if home is not None else ROOT),
                env=kvrepl_env(home, **(env or {})),
            )  # fmt: skip
        finally:
            for f in files:
                f.close()
        if isinstance(stdin, bytes | str):
            pipe, self.popen.stdin = self.popen.stdin, None  # written here, not by communicate
            assert pipe is not None
            try:
                pipe.write(stdin.encode() if isinstance(stdin, str) else stdin)
            except BrokenPipeError:  # it ended before reading everything
                pass
            finally:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()

    def finish(self, timeout: float = 300) -> Done:
        """Wait for it to end (killed, should it take longer than `timeout`)."""
        try:
            if self.out_dir is None:
                out, err = self.popen.communicate(timeout=timeout)
            else:
                self.popen.wait(timeout=timeout)
                out, err = ((self.out_dir / n).read_bytes() for n in ("stdout", "stderr"))
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return Done(self.popen.returncode, out.decode(), err.decode())

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def run_kvrepl(args: list[str], *, timeout: float = 300, **how: Any) -> Done:
    """Start kvrepl (`Kvrepl`'s arguments), wait for it to end."""
    return Kvrepl(args, **how).finish(timeout)


class Jobs:
    """Real kvrepl processes started together in the background (the console script, or
    tests/faulty_kvrepl.py with a fault), in the checkout; a test waits for its own by name.
    Their stdout and stderr are files in <root>/<name>/."""

    def __init__(self, root: Path, defer: bool = False) -> None:
        self.root = root
        self.procs: dict[str, Kvrepl] = {}
        # defer: a job starts when a test first waits for one (then all of them together)
        self.pending: list[tuple[str, list[str], bytes | None, str | None, dict[str, str]]] = []
        self.defer = defer
        self.cleanups: dict[str, Callable[[], Any]] = {}  # run when the job's result is taken
        self.data: dict[str, Any] = {}  # what a job's test needs to know from its set-up

    def start(self, name: str, args: list[str], stdin: bytes | None = b"", *,
              fault: str | None = None, **env: str) -> Path:  # fmt: skip
        """Start kvrepl ARGS with `stdin` piped in (None: /dev/null); returns the job's folder."""
        folder = self.root / name
        if self.defer:
            self.pending.append((name, args, stdin, fault, env))
            return folder
        self.procs[name] = Kvrepl(args, stdin=stdin, out_dir=folder, cwd=ROOT, env=env,
                                  fault=fault, script=fault is None)  # fmt: skip
        return folder

    def wait(self, name: str, timeout: float = 300) -> Done:
        self.defer = False
        while self.pending:  # one at a time off the list: a start that fails leaves the rest
            job, args, stdin, fault, env = self.pending.pop(0)
            self.start(job, args, stdin, fault=fault, **env)
        try:
            return self.procs[name].finish(timeout)
        finally:
            cleanup = self.cleanups.pop(name, None)
            if cleanup is not None:
                cleanup()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for cleanup in self.cleanups.values():
            cleanup()
