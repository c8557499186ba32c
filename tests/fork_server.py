"""A small fork server for the kill -9 tests (tests/sessions/test_kill_9.py):

    python tests/fork_server.py JOB.json

It imports kvrepl, torch and transformers once, then forks one child per job; each child runs
kvrepl's own CLI (`cli.main`, line mode, stdin from a file) on its own store. (Forking after the
imports saves ~4 s of imports per child on a 2-core machine.) It prints the results as JSON.

A "points" job makes each child SIGKILL itself the nth time it reaches one point, so that the
kill lands exactly where a kill -9 from outside might: an OS call of the snapshot writer (its
modules' `os` and `open`), the snapshot store's `save`, the answer's transaction (the store's
`finish_answer`, at the statement that writes its turns row), a decode step (the model, through
a probe given by `models.load`). A "lives" job kills its children from the server at random
moments after their first answer, or the moment a temporary snapshot file shows up.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import random
import re
import signal
import sys
import time
import types
from typing import Any

from probes import ModelProbe
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (imported once)

import kvrepl.engine.engine  # noqa: F401  (imported once, before the forks)
from kvrepl.app import cli
from kvrepl.engine import models
from kvrepl.store import db as store
from kvrepl.store import kvbook, kvstore

# The statement that writes an answer's turns row (sqlite-utils spells the table in brackets).
TURNS_INSERT = re.compile(r"\s*INSERT\s+(OR\s+\w+\s+)?INTO\s+[\[\"`]?turns\b", re.I)


def patch(point: str, nth: int) -> None:
    seen = [0]

    def reached() -> None:
        seen[0] += 1
        if seen[0] == nth:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    class Os(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

    fake: Any = Os("os")
    kvstore.os = kvbook.os = fake
    if point == "mid-write":  # half of the temp file written

        class Half:
            def __init__(self, f: Any) -> None:
                self.f = f

            def write(self, data: Any) -> int:
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                os.fsync(self.f.fileno())
                reached()
                return self.f.write(data[len(data) // 2 :])

            def __getattr__(self, name: str) -> Any:
                return getattr(self.f, name)

            def __enter__(self) -> Half:
                return self

            def __exit__(self, *a: Any) -> Any:
                return self.f.__exit__(*a)

        kvbook.open = lambda *a, **k: Half(builtins.open(*a, **k))
    elif point in ("before-rename", "split-before-rename"):  # temp file whole, not renamed

        def replace(a: str, b: str) -> None:
            reached()
            return os.replace(a, b)

        fake.replace = replace
    elif point == "split-before-cleanup":  # both halves of a split written, the whole not gone

        def unlink(p: str) -> None:
            reached()
            return os.unlink(p)

        fake.unlink = unlink
    elif point == "after-commit":  # the answer is committed, its snapshot not yet saved
        save = kvstore.KVStore.save

        def save_(self: Any, *a: Any, **k: Any) -> Any:
            reached()
            return save(self, *a, **k)

        kvstore.KVStore.save = save_
    elif point == "in-transaction":  # the answer inserted, its turns row not yet, no commit
        finish_answer = store.Store.finish_answer

        def finish_answer_(self: Any, *a: Any, **k: Any) -> Any:
            # The moment lies inside the one transaction of finish_answer: SQLite's trace
            # callback names each statement as it starts, the turns row's after the message's.
            def trace(sql: str) -> None:
                if TURNS_INSERT.match(sql):
                    reached()

            self.db.conn.set_trace_callback(trace)
            try:
                return finish_answer(self, *a, **k)
            finally:
                self.db.conn.set_trace_callback(None)

        store.Store.finish_answer = finish_answer_
    elif point == "mid-decode":  # the nth forward of one token
        load = models.load

        def load_(*a: Any, **k: Any) -> Any:
            loaded = load(*a, **k)
            probe = ModelProbe(loaded.model)
            probe.before = lambda n: reached() if n == 1 else None
            return dataclasses.replace(loaded, model=probe)

        models.load = load_
    else:
        raise SystemExit(f"unknown point {point}")


def fork(job: dict[str, Any], out_path: str, point: str | None = None, nth: int = 0) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        os.environ["KVREPL_HOME"] = job["home"]
        out = open(out_path, "w", buffering=1, encoding="utf-8")
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        sys.stdin = open(job["stdin"], encoding="utf-8")
        if point:
            patch(point, nth)
        rc = cli.main(job["argv"])
        out.flush()
        os._exit(rc)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        os._exit(99)


def status(st: int) -> int:
    return -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:  # the child has not opened it yet
        return ""


def lives(job: dict[str, Any]) -> list[dict[str, Any]]:
    rng = random.Random(job["seed"])
    kv = os.path.join(job["home"], "kv")
    results = []
    for i, mode in enumerate(job["modes"]):
        out = os.path.join(job["outdir"], f"life{i}.out")
        pid = fork(job, out)
        moment, deadline = "random", time.monotonic() + 120
        while "\nreused " not in "\n" + read(out) and time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.01)
        if mode == "tmp":
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if any(n.startswith(".tmp-") for _, _, names in os.walk(kv) for n in names):
                    moment = "mid-save (a temp file was present)"
                    break
                time.sleep(0.0003)
        if moment == "random":
            time.sleep(rng.uniform(0.0, 0.5))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, st = os.waitpid(pid, 0)
        results.append({"moment": moment, "rc": status(st), "out": read(out)})
    return results


def main(job_path: str) -> None:
    job = json.loads(read(job_path))
    models.load(job["model"], device="cpu", progress=False)  # the model's modules, imported once
    if job["kind"] == "points":
        results: Any = {}
        for point, nth in job["points"].items():
            home = os.path.join(job["root"], point, "store")
            out = os.path.join(job["root"], point, "out.txt")
            t0 = time.monotonic()
            _, st = os.waitpid(fork({**job, "home": home}, out, point, nth), 0)
            results[point] = {"rc": status(st), "out": read(out), "s": time.monotonic() - t0}
    else:
        results = lives(job)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
