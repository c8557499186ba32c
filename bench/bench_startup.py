"""Launch-to-prompt and launch-to-model-ready of the interactive REPL, in a real pseudo-terminal.

    .venv/bin/python bench/bench_startup.py [--runs 5] [--cold]

Starts `kvrepl` in a tmux pane, times the moment the prompt (`›`) is drawn, and the moment the
bottom toolbar shows the model's name (the background load has finished). Then Ctrl-D. The
embedded model's tokenizer is read once before timing (a first start's work); with `--cold`,
every start is a first start instead (an empty cache folder each, the compiled kernels linked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY_MARK = "(embedded)"  # the toolbar names the model once it is loaded
PROMPT_MARK = "›"


def one_run(home: str, timeout: float = 120.0, cache: str | None = None) -> tuple[float, float]:
    """One start in a tmux pane (a real terminal that answers cursor queries), polled every
    20 ms: (seconds to the prompt, seconds to the model named in the toolbar)."""
    name = f"kvrepl-bench-{os.getpid()}"
    cmd = f"KVREPL_HOME={home} {sys.executable} -m kvrepl"
    if cache is not None:
        cmd = f"KVREPL_CACHE={cache} {cmd}"
    t0 = time.perf_counter()
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd],
                   check=True)  # fmt: skip
    t_prompt = t_ready = None
    try:
        while time.perf_counter() - t0 < timeout and t_ready is None:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", name],
                                    capture_output=True, text=True).stdout  # fmt: skip
            now = time.perf_counter() - t0
            if t_prompt is None and PROMPT_MARK in screen:
                t_prompt = now
            if READY_MARK in screen:
                t_ready = now
            time.sleep(0.02)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    if t_prompt is None or t_ready is None:
        raise RuntimeError(f"kvrepl did not reach the prompt/model-ready in {timeout} s")
    return t_prompt, t_ready


def _cold_cache(home: str, i: int, cache: Path) -> str:
    """An empty cache folder but for the compiled kernels (compiling them is not a first start's
    work: they are compiled once per kvrepl version)."""
    cold = Path(home) / f"cold-cache-{i}"
    cold.mkdir()
    (cold / "kernels").symlink_to(cache / "kernels")
    return str(cold)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="every start a first start")
    args = ap.parse_args()
    from kvrepl.engine import firststart, models

    firststart.prepare(models.resolve(None), "auto", None, progress=False)
    prompts, readies = [], []
    with tempfile.TemporaryDirectory() as home:
        one_run(home)  # warm the page cache
        for i in range(args.runs):
            p, r = one_run(
                home, cache=_cold_cache(home, i, models.cache_dir()) if args.cold else None
            )
            prompts.append(p)
            readies.append(r)
    result = {
        "cold": args.cold,
        "launch_to_prompt_s": round(statistics.median(prompts), 3),
        "launch_to_model_ready_s": round(statistics.median(readies), 3),
        "runs": args.runs,
        "prompt_all": [round(x, 3) for x in prompts],
        "ready_all": [round(x, 3) for x in readies],
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "startup.json").write_text(json.dumps(result, indent=2))
    print("| launch → prompt | launch → model ready |\n|---|---|")
    print(f"| {result['launch_to_prompt_s']} s | {result['launch_to_model_ready_s']} s |")


if __name__ == "__main__":
    main()
