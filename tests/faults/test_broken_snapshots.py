"""Faults, as the user sees them: broken snapshot files. Each case corrupts the session's chunks
in <home>/kv/chunks/<fingerprint>/ for real (truncated, flipped, pickled, linked out of the store,
from another model or dtype), starts a new Conversation and sends the next turn: one line says
what was cut or dropped and why, the cache is true, the answer equals a recomputation that reuses
nothing, and the snapshot is whole again. Also: a sliding-window model's snapshot.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from fault_helpers import (
    assert_snapshot_clean,
    assert_whole_turns,
    chunk_files,
    fault_lines,
    forge_dtype,
    header,
    make_fault_model,
    make_loaded,
    one_turn_ok,
    resave,
)
from helpers import tree

from kvrepl.store.kvstore import KVStore

# =============================================================================================
# Snapshots: corrupt the session's chunks in <home>/kv/chunks/<fingerprint>/, start a new
# Conversation, send the next turn


def _flip(buf: bytes) -> bytes:
    b = bytearray(buf)
    b[-3] ^= 0x40  # in the last tensor's data
    return bytes(b)


class Evil:
    """Unpickling this creates a marker file: a pickle must never be loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def corrupt(kind: str, path: Path, tmp: Path) -> None:
    buf = path.read_bytes()
    hlen, _ = header(buf)
    if kind == "truncated":
        path.write_bytes(buf[: len(buf) // 2])
    elif kind == "header-cut":
        path.write_bytes(buf[: 8 + hlen // 2])
    elif kind.startswith("bytes-"):
        path.write_bytes(buf[: int(kind[6:])])
    elif kind == "header-too-long":
        path.write_bytes((len(buf) + 4096).to_bytes(8, "little") + buf[8:])
    elif kind == "trailing-garbage":
        path.write_bytes(buf + b"garbage!")
    elif kind == "flipped-byte":
        path.write_bytes(_flip(buf))
    elif kind == "format-version":
        meta = dict(header(buf)[1]["__metadata__"], format_version="99")
        resave(path, meta)
    elif kind == "no-metadata":
        resave(path, None)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(Evil(tmp / "UNPICKLED")))
    elif kind == "symlink-out":
        outside = tmp / "outside"
        outside.mkdir(exist_ok=True)
        target = outside / path.name
        shutil.copyfile(path, target)  # a valid chunk: following the link would load it
        path.unlink()
        path.symlink_to(target)
    else:
        raise AssertionError(kind)


REASONS = {
    "truncated": "is truncated",
    "header-cut": "truncated",
    "header-too-long": "truncated",
    "trailing-garbage": "trailing garbage",
    "flipped-byte": "corrupted (data checksum mismatch)",
    "format-version": "unknown format version",
    "no-metadata": "no kvrepl metadata",
    "pickle": "not a safetensors file",
    "symlink-out": "symbolic link",
    **{f"bytes-{n}": f"only {n} bytes long" for n in range(8)},
}
FIRST = (
    "truncated",
    "bytes-0",
    "bytes-7",
    "flipped-byte",
    "pickle",
    "symlink-out",
    "format-version",
)
CASES = [(k, "last") for k in REASONS] + [(k, "first") for k in FIRST]


@pytest.mark.parametrize("kind,which", CASES)
def test_a_broken_snapshot_chunk_is_cut_or_rebuilt_with_one_line(
    kind, which, snap_home, loaded, make, tmp_path
):
    src, sid = snap_home
    home = tmp_path / "store"
    shutil.copytree(src, home, symlinks=True)
    good = chunk_files(home, sid)
    paths = KVStore(home / "kv").session_paths(sid)
    victim_path = paths[0] if which == "first" else paths[-1]
    victim = victim_path.name
    corrupt(kind, victim_path, tmp_path)
    broken = os.readlink(victim_path) if kind == "symlink-out" else None
    before = {n: b for n, b in good.items() if n != victim}
    seen_at_save: list[dict[str, bytes]] = []

    class FirstSaveSeen(KVStore):
        def save(self, *a, **k):
            if not seen_at_save:  # what loading left on disk, before this session's first save
                seen_at_save.append({n: b for n, b in chunk_files(home, sid).items()
                                     if n != victim})  # fmt: skip
                assert os.path.lexists(victim_path)
            return super().save(*a, **k)

    h = make(loaded, home, kv=FirstSaveSeen)
    h.line("/load snap")
    out = h.out.getvalue()
    lines = fault_lines(out)
    assert len(lines) == 1, out
    assert REASONS[kind] in lines[0]
    if which == "first":
        assert lines[0].startswith("snapshot: dropped: it "), lines[0]
    else:
        assert re.match(r"snapshot: kept [\d,]+( of [\d,]+)? tokens: chunk at ", lines[0])
    assert seen_at_save == [before]  # the good chunks survive until the new save
    one_turn_ok(h, "and Germany?")
    assert_whole_turns(h, 4)
    assert_snapshot_clean(h)
    assert not (tmp_path / "UNPICKLED").exists()
    # The broken chunk left the pool (the save wrote its tokens again, under its own name) or
    # holds its good bytes again; a link was removed, never followed: its target is untouched.
    if os.path.lexists(victim_path):
        assert not victim_path.is_symlink() and victim_path.read_bytes() == good[victim]
    assert not [p for p in victim_path.parent.iterdir() if p.is_symlink()]
    if broken is not None:
        assert (tmp_path / "outside" / victim).read_bytes() == good[victim]


@pytest.mark.parametrize("other", ["another model", "same model in bfloat16"])
def test_a_snapshot_from_another_model_or_dtype_is_dropped(other, snap_home, model, tok, make,
                                                           tmp_path):  # fmt: skip
    src, sid = snap_home
    home = tmp_path / "store"
    shutil.copytree(src, home)
    if other == "another model":
        loaded2 = make_loaded(make_fault_model(tok, seed=1), tok, label="other")
    else:
        import copy

        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        loaded2 = make_loaded(bf16, tok, dtype="bfloat16")
    h = make(loaded2, home)
    h.line("/load snap")
    out = h.out.getvalue()
    assert fault_lines(out) == ["snapshot: dropped: it was made by another model"], out
    one_turn_ok(h, "and Germany?")
    assert_snapshot_clean(h)


def test_a_snapshot_in_another_dtype_under_the_same_fingerprint_is_dropped(
    snap_home, loaded, make, tmp_path
):
    src, sid = snap_home
    home = tmp_path / "store"
    shutil.copytree(src, home)
    for path in KVStore(home / "kv").session_paths(sid):
        forge_dtype(path, torch.bfloat16)
    h = make(loaded, home)
    out = h.line("/load snap")
    assert "internal error" not in out, out
    assert len(fault_lines(out)) == 1, out
    one_turn_ok(h, "and Germany?")
    assert_snapshot_clean(h)


@pytest.fixture(params=["pool", "chunks"])
def linked_folder(request, snap_home, loaded, tmp_path) -> tuple[Path, str, dict[str, bytes]]:
    """The folder holding the session's chunks moved out of the store, a symlink left in its
    place: the model's pool (`kv/chunks/<fingerprint>`, shared by every session of the model:
    what a session's own folder was before the pool), or the folder of all pools."""
    src, sid = snap_home
    home = tmp_path / "store"
    shutil.copytree(src, home)
    pool = KVStore(home / "kv").pool_dir(loaded.fingerprint)
    assert KVStore(home / "kv").session_paths(sid)[0].parent == pool
    folder = pool if request.param == "pool" else pool.parent
    outside = tmp_path / "outside"
    shutil.move(folder, outside)
    folder.symlink_to(outside)
    return home, sid, tree(outside)


def test_a_snapshot_folder_linked_out_of_the_store_is_never_followed(linked_folder, loaded,
                                                                     make, tmp_path):  # fmt: skip
    home, sid, outside_files = linked_folder
    h = make(loaded, home)
    out = h.line("/load snap")
    assert fault_lines(out)[0] == (
        "snapshot: dropped: its folder is a symbolic link; refused, not followed"
    )
    assert "restored" not in out
    one_turn_ok(h, "and Germany?")
    assert tree(tmp_path / "outside") == outside_files
    assert_whole_turns(h, 4)


def test_a_snapshot_folder_linked_out_of_the_store_is_rebuilt(linked_folder, loaded, make):
    home, sid, _ = linked_folder
    h = make(loaded, home)
    h.line("/load snap")
    out = h.line("and Germany?")
    assert "warning" not in out, out
    assert_snapshot_clean(h)


# =============================================================================================
# A model with sliding-window layers: kept full length, cut, saved and restored like any other


def test_a_sliding_window_model_cuts_at_the_edit_and_keeps_its_snapshot(tok, make):
    m = make_fault_model(tok, sliding_window=8)  # far shorter than the conversation
    h = make(make_loaded(m, tok, label="sliding8"))
    assert h.rt.engine.pc.croppable
    one_turn_ok(h, "hello there")
    one_turn_ok(h, "how are you")
    out = one_turn_ok(h, "/edit 2 what else", new_turns=0)
    notes = [ln for ln in out.splitlines() if ln.startswith("cache:")]
    assert len(notes) == 1 and "cut at token" in notes[0], out
    assert h.rt.engine.progress.reused > 0
    assert_snapshot_clean(h)
    sid = h.sid
    h.close()  # a restart: a new process over the same store
    restarted = make(make_loaded(m, tok, label="sliding8"), h.home)
    out = restarted.line("/load " + sid)
    assert re.search(r"snapshot: restored [\d,]+ cached tokens", out), out
    one_turn_ok(restarted, "and then?")  # equal to a no-reuse recomputation
