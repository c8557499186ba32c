#!/usr/bin/env python
"""Benchmarks of kvrepl's sessions on disk, on the embedded SmolLM2-135M-Instruct (fp32, CPU).

1. resume  time to first token of a new ~40-token turn right after a restart, for a session of
           about 2k and 6k tokens: with its snapshot (KVStore.load + PromptCache.restore, then a
           prefill of the new turn only) vs without one (the whole conversation recomputed from
           the messages in SQLite). The snapshot arm runs twice: page cache warm (the files were
           just written) and cold (evicted with posix_fadvise(DONTNEED) first; the hypervisor may
           still cache the disk). Also the raw restore alone against the full re-prefill.
2. size    snapshot bytes per token.
3. save    time of the autosave after a turn (KVStore.save: one new chunk) at about 1k and 6k
           tokens of history, and of a full rewrite of the snapshot (the first save, and the
           compaction every MAX_CHUNKS turns), plus the SQLite commit of the turn.

Each "restart" is a new Chat with a new Engine (an empty cache) and a new KVStore over a copy of
the session's store, as `kvrepl --resume` builds them; the model is loaded once. The arms are
measured side by side in one process, interleaved (A B C, C B A, ...), and reported as medians;
the load other processes put on the machine during each arm is recorded with it. Only kvrepl's
API is used (Chat, Store, KVStore, Runtime); kvrepl itself is not modified.

One torch thread by default: on this shared 2-core machine two OpenMP threads stall at every
barrier while a neighbour runs (a 40-token prefill took 3 s instead of 0.5 s under load), and
both arms would be measured through that noise. `--threads 0` keeps torch's default.

    .venv/bin/python bench/bench_sessions.py            # full run: 2k and 6k, 3 reps (~6 min)
    .venv/bin/python bench/bench_sessions.py --quick    # 2k only, 2 reps (~1 min)

Writes bench/results/sessions-<mode>-<timestamp>.json and prints a markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpu_load import Others  # noqa: E402
from synthetic import WORDS  # noqa: E402

from kvrepl import kvstore, models  # noqa: E402
from kvrepl.chat import Chat, Runtime  # noqa: E402
from kvrepl.config import Settings  # noqa: E402
from kvrepl.events import Stats  # noqa: E402
from kvrepl.kvstore import KVStore, SaveReport  # noqa: E402
from kvrepl.store import STAT_NAMES, Store  # noqa: E402

SETTINGS = Settings(temperature=0.0, max_tokens=8)
NEW_TURN = (
    "Thanks. Now summarise the conversation above in three short bullet points, and tell me "
    "which of the topics we discussed was the most interesting, and why."
)
MORE_TURNS = [
    "Make the second bullet point shorter, please, and keep the others as they are.",
    "Which of these points would you explain first to a new colleague?",
    "Give one example for that point, in a single sentence.",
]

# -------------------------------------------------------------------------------------------
# synthetic conversations


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    s = " ".join(words)
    return s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!"])


def history(prompt: Any, target: int, seed: int) -> list[tuple[str, str]]:
    """Alternating user/assistant messages whose rendering is just over `target` tokens."""
    rng = random.Random(seed)
    msgs: list[tuple[str, str]] = []
    while True:
        role = "user" if len(msgs) % 2 == 0 else "assistant"
        n = rng.randint(1, 3) if role == "user" else rng.randint(4, 10)
        msgs.append((role, " ".join(_sentence(rng) for _ in range(n))))
        if role == "assistant":
            dicts = [{"role": r, "content": c} for r, c in msgs]
            if len(prompt.render(dicts, add_generation_prompt=False)) >= target:
                return msgs


# -------------------------------------------------------------------------------------------
# measuring helpers


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


class TimedKV(KVStore):
    """KVStore that keeps every SaveReport (bytes, seconds, chunks) and load time."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.saves: list[SaveReport] = []
        self.load_s: list[float] = []

    def save(self, *a: Any, **k: Any) -> SaveReport:
        report = super().save(*a, **k)
        self.saves.append(report)
        return report

    def load(self, *a: Any, **k: Any):  # noqa: ANN201
        t0 = time.perf_counter()
        try:
            return super().load(*a, **k)
        finally:
            self.load_s.append(time.perf_counter() - t0)


class TimedStore(Store):
    """Store that times the commit of each finished turn (answer + stats in one transaction)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commit_s: list[float] = []

    def finish_answer(self, *a: Any, **k: Any):  # noqa: ANN201
        t0 = time.perf_counter()
        try:
            return super().finish_answer(*a, **k)
        finally:
            self.commit_s.append(time.perf_counter() - t0)


def open_chat(loaded: models.LoadedModel, home: Path) -> Chat:
    """What `kvrepl --resume` builds after a restart: a new engine (empty cache), new stores."""
    rt = Runtime.build(loaded, SETTINGS)
    return Chat(SETTINGS, TimedStore(home / "kvrepl.db"), TimedKV(home / "kv"), lambda: rt, home)


def close(chat: Chat) -> None:
    chat.close()
    chat.store.close()


def evict(folder: Path) -> None:
    """Drop the files' pages from this machine's page cache (they are clean: fsynced)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def copy_store(pristine: Path, home: Path, with_snapshot: bool) -> None:
    """A copy of the store: the database copied, the snapshot hard-linked (chunks are never
    written in place: a save writes a temp file and renames it), or left out."""
    home.mkdir(parents=True)
    for p in pristine.glob("kvrepl.db*"):
        shutil.copy2(p, home / p.name)
    if with_snapshot:
        shutil.copytree(pristine / "kv", home / "kv", copy_function=os.link)


def build(loaded: models.LoadedModel, root: Path, target: int, seed: int) -> dict[str, Any]:
    """A session of about `target` tokens, its messages in SQLite and its snapshot on disk
    (written by Chat.warm, as `/load` does)."""
    pristine = root / f"pristine-{target}"
    store = Store(pristine / "kvrepl.db")
    rt = Runtime.build(loaded, SETTINGS)
    session = store.create_session("bench", model=loaded.source.label)
    for role, text in history(rt.prompt, target, seed):
        if role == "assistant":
            store.finish_answer(session.id, text, stats=dict.fromkeys(STAT_NAMES, 0))
        else:
            store.add_message(session.id, role, text)
    store.close()
    chat = open_chat(loaded, pristine)
    chat.open("bench")
    t0 = time.perf_counter()
    reused, prefilled, notes = chat.warm()
    warm_s = time.perf_counter() - t0
    assert reused == 0 and all(n.startswith("snapshot: none on disk") for n in notes), notes
    kv: TimedKV = chat.kv  # type: ignore[assignment]
    full = kv.saves[-1]
    n = kv.n_tokens_on_disk(session.id)
    size = kv.size_bytes(session.id)
    close(chat)
    return {
        "pristine": pristine, "sid": session.id, "tokens": n, "prefilled": prefilled,
        "warm_s": warm_s, "snapshot_bytes": size, "bytes_per_token": size / n,
        "full_save": {"tokens": full.written_tokens, "bytes": full.bytes_written,
                      "s": full.seconds},
    }  # fmt: skip


def resume_arm(loaded: models.LoadedModel, base: dict[str, Any], home: Path, arm: str,
               more_turns: int = 0) -> dict[str, Any]:  # fmt: skip
    """One restart and one new turn. arm: snapshot-warm, snapshot-cold or recompute."""
    copy_store(base["pristine"], home, with_snapshot=arm != "recompute")
    if arm == "snapshot-cold":
        evict(home / "kv")
    others = Others()
    chat = open_chat(loaded, home)
    chat.open("bench")
    t0 = time.perf_counter()
    notes = chat.restore_snapshot()  # what send() does first; timed on its own here
    t_restored = time.perf_counter()
    events = list(chat.send(NEW_TURN))
    engine = chat.rt.engine
    t_first = engine.progress.t_first
    assert t_first is not None
    stats = next(e for e in events if isinstance(e, Stats))
    kv: TimedKV = chat.kv  # type: ignore[assignment]
    store: TimedStore = chat.store  # type: ignore[assignment]
    out = {
        "arm": arm,
        "ttft_s": t_first - t0,  # restore + user message stored + render + prefill + 1st token
        "restore_s": t_restored - t0,
        "load_s": kv.load_s[0] if kv.load_s else 0.0,
        "engine_ttft_s": stats.ttft_s,  # prefill of what is not cached + first token
        "stats": stats.as_dict(),
        "notes": notes,
        "answer_ids": list(engine.progress.generated),
        "others_cores": round(others.cores(), 2),
        "turn_save": [_save(r) for r in kv.saves],
        "turn_commit_s": list(store.commit_s),
    }
    for text in MORE_TURNS[:more_turns]:  # the autosave of later turns at this history size
        list(chat.send(text))
    out["more_saves"] = [_save(r) for r in kv.saves[1:]]
    out["more_commits_s"] = list(store.commit_s[1:])
    close(chat)
    return out


def _save(r: SaveReport) -> dict[str, Any]:
    return {"tokens": r.written_tokens, "bytes": r.bytes_written, "s": r.seconds,
            "chunks": r.chunks}  # fmt: skip


# -------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2k only, 2 reps")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per arm (default 3)")
    ap.add_argument("--sizes", type=int, nargs="*", help="history sizes (default 2000 6000)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1; 0: torch's default)")  # fmt: skip
    args = ap.parse_args()
    sizes = args.sizes or ([2000] if args.quick else [2000, 6000])
    reps = args.reps or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    meta = {
        "mode": "quick" if args.quick else "full",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python bench/bench_sessions.py " + " ".join(sys.argv[1:]),
        "cpu": _cpu(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "max_chunks": kvstore.MAX_CHUNKS,
    }
    loaded = models.load(progress=False)
    meta.update(model=loaded.source.label, dtype=loaded.dtype, device=loaded.device)
    log(f"model loaded; {meta['threads']} threads; load {meta['loadavg_start']}")

    results: dict[str, Any] = {"meta": meta, "resume": [], "save": []}
    with tempfile.TemporaryDirectory(prefix="kvrepl-bench-") as tmp:
        root = Path(tmp)
        bases: dict[int, dict[str, Any]] = {}
        for size in sizes:
            base = bases[size] = build(loaded, root, size, seed=size)
            log(f"{size}: {base['tokens']} tokens, warm {base['warm_s']:.1f} s, "
                f"{base['bytes_per_token']:.0f} B/token")  # fmt: skip
            arms = ["snapshot-warm", "snapshot-cold", "recompute"]
            runs: list[dict[str, Any]] = []
            for rep in range(reps):
                order = arms if rep % 2 == 0 else arms[::-1]
                for arm in order:
                    r = resume_arm(loaded, base, root / f"{size}-{rep}-{arm}", arm)
                    r["rep"] = rep
                    runs.append(r)
                    log(f"  rep {rep} {arm:14s} ttft {r['ttft_s']:7.3f} s  restore "
                        f"{r['restore_s']:.3f} s  reused {r['stats']['reused_tokens']} "
                        f"prefilled {r['stats']['prefilled_tokens']}  others "
                        f"{r['others_cores']}")  # fmt: skip
            results["resume"].append(_summarise_resume(base, runs))
        # Autosave per turn at ~1k and ~6k tokens of history (the 6k session above is reused).
        for size in (1000, 6000) if not args.quick else (1000,):
            base = bases.get(size) or build(loaded, root, size, seed=size + 1)
            r = resume_arm(loaded, base, root / f"save-{size}", "snapshot-warm",
                           more_turns=len(MORE_TURNS))  # fmt: skip
            saves = r["turn_save"] + r["more_saves"]
            commits = r["turn_commit_s"] + r["more_commits_s"]
            results["save"].append({
                "history_tokens": base["tokens"],
                "per_turn": saves,
                "per_turn_s_median": med([s["s"] for s in saves]),
                "per_turn_tokens_median": med([s["tokens"] for s in saves]),
                "per_turn_bytes_median": med([s["bytes"] for s in saves]),
                "commit_s_median": med(commits),
                "full_rewrite": base["full_save"],
            })  # fmt: skip
            log(f"save at {base['tokens']}: {results['save'][-1]['per_turn_s_median']:.4f} s "
                f"per turn; full rewrite {base['full_save']['s']:.2f} s")  # fmt: skip
            shutil.rmtree(base["pristine"])
    meta["loadavg_end"] = list(os.getloadavg())
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sessions-{meta['mode']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report(results))
    print(f"\nJSON: {path.relative_to(ROOT)}")
    return 0


def _cpu() -> str:
    name = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"{name}, {os.cpu_count()} cores"


def _summarise_resume(base: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {arm: [r for r in runs if r["arm"] == arm] for arm in {r["arm"] for r in runs}}
    answers = {tuple(r["answer_ids"]) for r in runs}
    summary = {
        "history_tokens": base["tokens"],
        "snapshot_bytes": base["snapshot_bytes"],
        "bytes_per_token": base["bytes_per_token"],
        "warm_s": base["warm_s"],
        "same_answer_in_every_run": len(answers) == 1,
        "runs": [{k: v for k, v in r.items() if k != "answer_ids"} for r in runs],
    }
    for arm, rs in by.items():
        summary[arm] = {
            "ttft_s": med([r["ttft_s"] for r in rs]),
            "restore_s": med([r["restore_s"] for r in rs]),
            "load_s": med([r["load_s"] for r in rs]),
            "engine_ttft_s": med([r["engine_ttft_s"] for r in rs]),
            "reused": rs[0]["stats"]["reused_tokens"],
            "prefilled": rs[0]["stats"]["prefilled_tokens"],
            "others_cores": med([r["others_cores"] for r in rs]),
            "n": len(rs),
        }
    rec, warm = summary["recompute"], summary["snapshot-warm"]
    summary["speedup_ttft_warm"] = rec["ttft_s"] / warm["ttft_s"]
    summary["speedup_ttft_cold"] = rec["ttft_s"] / summary["snapshot-cold"]["ttft_s"]
    # raw: restore alone against the re-prefill of the whole conversation (engine ttft of the
    # recompute arm: prefill of history + new turn, then one token)
    summary["raw_restore_vs_reprefill"] = rec["engine_ttft_s"] / warm["restore_s"]
    summary["raw_restore_vs_reprefill_cold"] = (
        rec["engine_ttft_s"] / summary["snapshot-cold"]["restore_s"]
    )
    return summary


def report(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        f"## Sessions on disk ({m['mode']}, {m['when']})",
        "",
        f"{m['model']}, {m['dtype']} on {m['device']}; {m['cpu']}; torch {m['torch']} "
        f"({m['threads']} threads), transformers {m['transformers']}; load average "
        f"{m['loadavg_start'][0]:.1f} → {m['loadavg_end'][0]:.1f}; {m['elapsed_s']:.0f} s. "
        f"Medians of {results['resume'][0]['recompute']['n']} runs per arm, interleaved.",
        "",
        "### Time to first token of a new turn after a restart",
        "",
        "| history | with snapshot (warm cache) | with snapshot (cold cache) | recompute from "
        "messages | speed-up warm / cold | reused · prefilled with snapshot | without | same "
        "answer |",
        "|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in results["resume"]:
        w, c, x = r["snapshot-warm"], r["snapshot-cold"], r["recompute"]
        lines.append(
            f"| {r['history_tokens']:,} | {w['ttft_s']:.2f} s | {c['ttft_s']:.2f} s | "
            f"{x['ttft_s']:.2f} s | {r['speedup_ttft_warm']:.0f}× / {r['speedup_ttft_cold']:.0f}× "
            f"| {w['reused']:,} · {w['prefilled']:,} | {x['reused']:,} · {x['prefilled']:,} | "
            f"{'yes' if r['same_answer_in_every_run'] else 'NO'} |"
        )
    lines += [
        "",
        "With the snapshot, the time to first token splits into the restore (read, validate, "
        "fill the cache) and the prefill of the new turn plus one decode step:",
        "",
        "| history | restore warm | of which KVStore.load | restore cold | prefill new turn + "
        "1st token | full re-prefill + 1st token | raw restore vs re-prefill (warm / cold) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["resume"]:
        w, c, x = r["snapshot-warm"], r["snapshot-cold"], r["recompute"]
        lines.append(
            f"| {r['history_tokens']:,} | {w['restore_s']:.3f} s | {w['load_s']:.3f} s | "
            f"{c['restore_s']:.3f} s | {w['engine_ttft_s']:.2f} s | {x['engine_ttft_s']:.2f} s | "
            f"{r['raw_restore_vs_reprefill']:.0f}× / {r['raw_restore_vs_reprefill_cold']:.0f}× |"
        )
    lines += [
        "",
        "### Snapshot size",
        "",
        "| history | snapshot | bytes per token |",
        "|---:|---:|---:|",
    ]
    for r in results["resume"]:
        lines.append(
            f"| {r['history_tokens']:,} | {r['snapshot_bytes'] / 2**20:.1f} MiB | "
            f"{r['bytes_per_token']:,.0f} |"
        )
    lines += [
        "",
        "### Autosave after a turn",
        "",
        "| history | per turn: tokens written | bytes | KVStore.save | SQLite commit | full "
        "rewrite (first save, compaction) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["save"]:
        f = s["full_rewrite"]
        lines.append(
            f"| {s['history_tokens']:,} | {s['per_turn_tokens_median']:.0f} | "
            f"{s['per_turn_bytes_median'] / 2**20:.1f} MiB | "
            f"{s['per_turn_s_median'] * 1000:.0f} ms | {s['commit_s_median'] * 1000:.1f} ms | "
            f"{f['s']:.2f} s ({f['tokens']:,} tokens, {f['bytes'] / 2**20:.0f} MiB) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
