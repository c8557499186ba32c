#!/usr/bin/env python
"""Decode speed where users run it: on a machine that is not idle.

Greedy decode tokens/s of the embedded SmolLM2-135M-Instruct (128 new tokens after a ~100-token
prompt, the rate over the whole decode: a stall counts) in three cases:

    idle        the engine alone;
    busy        another process keeps one core busy (a spinning Python loop, cpu_load.Spinner);
    two         two processes of the same engine decode at the same time (each one's rate).

for kvrepl (its default: the GGUF's own weights on its kernels, torch's thread count) and for
llama.cpp (llama-cpp-python on the same GGUF file, as many threads), when `llama_cpp` imports;
llama.cpp's children load neither kvrepl nor torch (they would share its OpenMP runtime, which
kvrepl's kernels set to spin less: that halved llama.cpp's rate, 105-110 tok/s alone here, 57 so).
Each engine runs in child processes that load once and decode on a signal, so that both of the
"two" case start together; idle and busy run in the first child. Prints the CPU (lscpu) and each
case's rate beside its share of the idle rate, medians of --reps; writes every run to
bench/results/busy-<time>.json.

    .venv/bin/python bench/bench_busy.py             # ~2 min with llama.cpp
    .venv/bin/python bench/bench_busy.py --passive   # children with OMP_WAIT_POLICY=PASSIVE

Run it on a quiet machine: it waits (briefly) for quiet before each case, but other processes
still change every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

if os.environ.get("KVREPL_BUSY_CHILD") != "llama.cpp":  # its children load no kvrepl
    import kvrepl  # noqa: F401  (first, as `python -m kvrepl` does: it may set the environment)

CASES = ("idle", "busy", "two")


# -- the children: one engine each, decoding on "go" --------------------------------------------


def child(engine: str, tokens: int, ids_file: str, threads: int, gguf: str) -> None:
    """One engine decoding `tokens` tokens after the prompt in ids_file, on each "go"."""
    ids = json.loads(Path(ids_file).read_text())
    if engine == "kvrepl":
        import bench_cpu as bc
        import bench_engine as be
        import torch

        from kvrepl.engine import models

        lm = models.load(progress=False)
        eng = bc.kvrepl_engine(lm)
        eng.prefill(ids)
        label = lm.model.k.label

        def decode() -> dict[str, Any]:
            r = be.engine_decode(eng, ids, tokens)
            return {"tok_s": r["mean"], "med": r["med"], "threads": lm.model.k.threads()}

        threads = torch.get_num_threads()
    else:  # without kvrepl's kernels or torch in the process (cpp_worker.py says why)
        from cpp_worker import Alone

        cpp = Alone(gguf, threads)
        label = f"llama-cpp-python, {threads} threads"

        def decode() -> dict[str, Any]:  # the parent makes the rates (bench_engine.rates)
            return {"stamps": cpp.decode(ids, tokens)["stamps"]}

    decode()  # warm: caches, threads, the first-call costs
    print(json.dumps({"ready": label, "threads": threads}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        print(json.dumps(decode()), flush=True)


class Child:
    def __init__(self, engine: str, args: argparse.Namespace) -> None:
        env = dict(os.environ, KVREPL_BUSY_CHILD=engine)
        if args.passive:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        cmd = [sys.executable, __file__, "--child", engine, "--tokens", str(args.tokens),
               "--ids", args.ids_file, "--threads", str(args.threads),
               "--gguf", args.gguf]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)  # fmt: skip
        from cpu_load import count_as_own

        count_as_own(self.proc.pid)  # the others' load is everyone else's
        self.ready = self.read()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a child stopped (exit {self.proc.wait()})")
        r = json.loads(line)
        if "stamps" in r:  # llama.cpp's child: its tokens' times
            import bench_engine as be

            rates = be.rates(r.pop("stamps"))
            r.update(tok_s=rates["mean"], med=rates["med"])
        return r

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait()


def prompt_ids(context: int, path: Path) -> None:
    """The prompt's ids, made here and written to `path` (the children read them)."""
    import bench_engine as be

    from kvrepl.chat.prompt import Prompt
    from kvrepl.engine import models

    ids = be.decode_prompt(Prompt(models.load(progress=False).tokenizer), context)
    path.write_text(json.dumps(ids))


# -- the cases --------------------------------------------------------------------------------


def run_case(case: str, kids: list[Child]) -> dict[str, Any]:
    import bench_engine as be
    from cpu_load import Others, Spinner

    be.wait_quiet()
    others = Others()  # in "busy", the spinner's core counts
    if case == "two":
        for k in kids:
            k.go()
        runs = [k.read() for k in kids]
        r = {"tok_s": statistics.mean(r["tok_s"] for r in runs), "each": runs}
    elif case == "busy":
        with Spinner(1):
            kids[0].go()
            r = kids[0].read()
    else:
        kids[0].go()
        r = kids[0].read()
    r["others_cores"] = round(others.cores(), 3)
    return r


def bench_engine(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    import bench_engine as be

    be.log(f"{engine}: starting two processes")
    kids: list[Child] = []
    try:
        for _ in range(2):  # each closed below, whichever start fails
            kids.append(Child(engine, args))
        out: dict[str, Any] = {"label": kids[0].ready["ready"], "runs": {c: [] for c in CASES}}
        for rep in range(args.reps):
            order = CASES[rep % 3 :] + CASES[: rep % 3]
            for case in order:
                r = run_case(case, kids)
                out["runs"][case].append(r)
                be.log(f"  {engine} {case}: {r['tok_s']:.1f} tok/s")
    finally:
        for k in kids:
            k.close()
    for case in CASES:
        out[case] = statistics.median(r["tok_s"] for r in out["runs"][case])
    return out


def report(res: dict[str, Any]) -> str:
    lines = [f"CPU: {res['cpu']}"]
    lines += [f"{e}: {r['label']}" for e, r in res["engines"].items()]
    lines += [
        "",
        f"Decode tok/s ({res['tokens']} tokens after {res['context']} of prompt, the rate over the "
        f"whole decode), median of {res['reps']}; in brackets, the share of idle:",
        "",
        "| engine | idle | one core busy | two at once (each) |",
        "|---|---:|---:|---:|",
    ]
    for e, r in res["engines"].items():
        cells = [f"{r['idle']:.1f}"]
        cells += [f"{r[c]:.1f} ({r[c] / r['idle']:.0%})" for c in ("busy", "two")]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{res['command']}` ({res['took_s']:.0f} s)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--passive", action="store_true", help="children with OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", choices=["kvrepl", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.tokens, args.ids, args.threads, args.gguf)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvrepl-busy-") as tmp:
        args.ids_file = str(Path(tmp) / "ids.json")
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    import importlib.util

    import bench_cpu as bc
    import bench_engine as be
    import torch

    from kvrepl.engine import models

    prompt_ids(args.context, Path(args.ids_file))
    args.threads, args.gguf = torch.get_num_threads(), str(models.embedded_gguf())
    t0 = time.perf_counter()
    engines = ["kvrepl"]
    if not args.no_llama_cpp:
        if importlib.util.find_spec("llama_cpp") is None:
            be.log("llama-cpp-python is not installed (make bench-setup): llama.cpp left out")
        else:
            engines.append("llama.cpp")
    res: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": bc.cpu_name(),
        "tokens": args.tokens,
        "context": args.context,
        "reps": args.reps,
        "passive": args.passive,
        "command": "python bench/bench_busy.py" + (" --passive" if args.passive else ""),
        "engines": {e: bench_engine(e, args) for e in engines},
    }
    res["took_s"] = time.perf_counter() - t0
    print(report(res))
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"busy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    be.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
