"""The K/V pool on disk (kvstore.py, kvbook.py, stfile.py): round trips, a turn's one chunk,
branches that share their chunks and split them, going back to a branch, the budget, `delete`,
the store from before the pool, and every way a chunk or a folder can be broken."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tree
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from kvrepl.errors import SnapshotError
from kvrepl.store import kvbook
from kvrepl.store.kvbook import Pool, Ref
from kvrepl.store.kvbudget import Eviction
from kvrepl.store.kvstore import KVStore
from kvrepl.store.stfile import BadChunk, chunk_bytes, ids_bytes, parse_chunk, read_chunk

FP = "0123456789abcdef"  # a model fingerprint (hex, as models.fingerprint's: its pool's name)
OTHER = "fedcba9876543210"
L, H, D = 4, 3, 16
SID = "s1"


def make(n: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """n random ids and random K/V for them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32000, (n,), generator=g).tolist()
    layers = [(torch.randn(1, H, n, D, generator=g).to(dtype),
               torch.randn(1, H, n, D, generator=g).to(dtype)) for _ in range(L)]  # fmt: skip
    return ids, layers


def prefix(layers, n: int):
    return [(k[:, :, :n], v[:, :, :n]) for k, v in layers]


def kv_of(ids: list[int], dtype: torch.dtype = torch.float32):
    """K/V where each position's values are a function of its whole prefix, as a model's are
    (small integers: exact in every dtype), so that two branches' K/V differ after they part."""
    h, vals = 0, []
    for t in ids:
        h = (h * 1000003 + t + 1) % 251
        vals.append(float(h))
    base = torch.tensor(vals).view(1, 1, -1, 1) + torch.arange(D, dtype=torch.float32)
    base = base.expand(1, H, len(ids), D)
    return [((base + i).to(dtype).contiguous(), (-base - i).to(dtype).contiguous())
            for i in range(L)]  # fmt: skip


def save(store: KVStore, ids: list[int], sid: str = SID):
    return store.save(sid, ids, kv_of(ids), FP)


def rand_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


def assert_same(result, ids, layers):
    assert result.ids == ids
    assert len(result.layers) == len(layers)
    for (k, v), (k2, v2) in zip(result.layers, layers, strict=True):
        assert k.dtype == k2.dtype and v.dtype == v2.dtype
        assert torch.equal(k, k2) and torch.equal(v, v2)


def pool(store: KVStore, fp: str = FP) -> list[Ref]:
    return sorted(Pool.refs(store.pool_dir(fp)), key=lambda r: (r.start, r.name))


def spans(store: KVStore, fp: str = FP) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in pool(store, fp)]


def distinct_prefixes(*seqs: list[int]) -> int:
    return len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})


def prefixes_on_disk(store: KVStore, fp: str = FP) -> tuple[int, int]:
    """(tokens the pool's chunks hold, distinct prefixes they end): equal when no token is held
    twice. Each chunk's history is rebuilt from the chunks its name hangs from."""
    d = store.pool_dir(fp)
    refs = pool(store, fp)
    own = {r.name: st_load((d / r.name).read_bytes())["ids"].tolist() for r in refs}
    by_tip = {r.tip: r for r in refs}

    def history(tip: str) -> list[int]:
        if tip == kvbook.EMPTY:
            return []
        r = by_tip[tip]
        return history(r.parent) + own[r.name]

    seen = set()
    for r in refs:
        h = hashlib.sha256(ids_bytes(history(r.parent)))
        for t in own[r.name]:
            h.update(ids_bytes([t]))
            seen.add(h.hexdigest())
    return sum(r.end - r.start for r in refs), len(seen)


def at(store: KVStore, start: int, sid: str = SID) -> Path:
    """The file of the session's last chain that starts at `start`."""
    (path,) = [p for p in store.session_paths(sid) if Ref.parse(p.name).start == start]
    return path


def one_note(result, *words):
    assert len(result.notes) == 1, result.notes
    note = result.notes[0]
    assert note.startswith("snapshot: ")
    for w in words:
        assert w in note, note
    return note


@pytest.fixture
def three(tmp_path):
    """A session of 200 tokens saved at 100, 150 and 200: chunks [0,100) [100,150) [150,200)."""
    store = KVStore(tmp_path / "kv")
    ids, layers = make(200)
    for n in (100, 150, 200):
        store.save(SID, ids[:n], prefix(layers, n), FP)
    assert spans(store) == [(0, 100), (100, 150), (150, 200)]
    assert [p.name for p in store.session_paths(SID)] == [r.name for r in pool(store)]
    return store, ids, layers


@pytest.fixture(params=["session", "ids"])
def reload(request):
    """A fresh store's load of the snapshot: the session's last chain (a resume), or the chunks
    found for the ids (a branch gone back to). Both validate alike."""

    def _reload(store: KVStore, ids: list[int], fp: str = FP):
        fresh = KVStore(store.root)
        return fresh.load_session(SID, fp) if request.param == "session" else fresh.load(fp, ids)

    return _reload


# -- round trips and the chunk file ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact_and_keeps_dtype(tmp_path, dtype):
    store = KVStore(tmp_path)
    ids, layers = make(37, dtype)
    report = store.save(SID, ids, layers, FP)
    assert (report.written_tokens, report.chunks, report.evicted.chunks) == (37, 1, 0)
    assert report.bytes_written == store.size_bytes(SID) > 37 * L * 2 * H * D * dtype.itemsize
    for result in (KVStore(tmp_path).load_session(SID, FP), KVStore(tmp_path).load(FP, ids)):
        assert result.notes == [] and result.start == 0
        assert_same(result, ids, layers)
    assert store.n_tokens_on_disk(SID) == store.n_tokens_on_disk(SID, FP) == 37
    assert store.pool_bytes() == store.size_bytes(SID)


def test_chunk_file_is_plain_safetensors_named_by_its_place(tmp_path):
    store = KVStore(tmp_path)
    ids, layers = make(10)
    store.save(SID, ids, layers, FP)
    (path,) = store.session_paths(SID)
    assert path.parent == store.pool_dir(FP) == tmp_path / "chunks" / FP
    raw = ids_bytes(ids)
    assert path.name == (f"000000000-0000010-{hashlib.sha256().hexdigest()[:16]}-"
                         f"{hashlib.sha256(raw).hexdigest()[:16]}.safetensors")  # fmt: skip
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"ids"} | {f"layers.{i}.{kv}" for i in range(L)
                                           for kv in ("keys", "values")}  # fmt: skip
        assert f.get_tensor("ids").tolist() == ids
    assert meta["format"] == "kvrepl-kv" and meta["format_version"] == "2"
    assert (meta["fingerprint"], meta["dtype"], meta["start"], meta["n_tokens"],
            meta["n_layers"]) == (FP, "float32", "0", "10", str(L))  # fmt: skip
    assert meta["prefix_hash"] == hashlib.sha256(raw).hexdigest()
    crcs = meta["data_crc32"].split(",")
    assert len(crcs) == 1 + 2 * L and all(len(c) == 8 for c in crcs)
    listed = json.loads((tmp_path / "sessions" / f"{SID}.json").read_text())
    assert listed["chunks"] == [f"{FP}/{path.name}"]
    assert listed["last"] == {"pool": FP, "chain": [[0, 10, Ref.parse(path.name).tip]]}


def test_load_gives_views_of_the_bytes_it_read(tmp_path):
    """No copy on the way to the engine: every tensor of a chunk lies in one buffer."""
    store = KVStore(tmp_path)
    ids, layers = make(5)
    store.save(SID, ids, layers, FP)
    (chunk0,) = store.load(FP, ids).chunks
    places = sorted((t.data_ptr(), t.numel() * t.element_size()) for t in chunk0.values())
    assert all(a + n == b for (a, n), (b, _) in zip(places, places[1:], strict=False))
    assert torch.equal(store.load(FP, ids).layers[2][1], layers[2][1])


def test_a_format_1_chunk_is_still_read(three, reload):
    """Chunks written before the CRC32 check (one sha256 of the data) keep working."""
    store, ids, layers = three
    path = at(store, 100)
    buf = path.read_bytes()
    meta = json.loads(buf[8 : 8 + int.from_bytes(buf[:8], "little")])["__metadata__"]
    tensors = st_load(buf)
    dh = hashlib.sha256()
    for k in ["ids"] + [f"layers.{i}.{kv}" for i in range(L) for kv in ("keys", "values")]:
        dh.update(tensors[k].reshape(-1).view(torch.uint8).numpy())
    meta = {k: v for k, v in meta.items() if k != "data_crc32"}
    path.write_bytes(st_save(tensors, metadata=dict(meta, format_version="1",
                                                    data_hash=dh.hexdigest())))  # fmt: skip
    result = reload(store, ids)
    assert result.notes == []
    assert_same(result, ids, layers)
    data = bytearray(path.read_bytes())  # and its sha256 still catches a flipped byte
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    one_note(reload(store, ids), "kept 100 of 200 tokens", "chunk at 100", "checksum")


def test_mismatched_input_is_a_programming_error_and_writes_nothing(tmp_path):
    ids, layers = make(4)
    store = KVStore(tmp_path)
    with pytest.raises(ValueError):
        store.save(SID, ids + [1], layers, FP)
    with pytest.raises(ValueError):
        store.save(SID, ids, [(k, v.half()) for k, v in layers], FP)
    assert not tmp_path.exists() or tree(tmp_path) == {}


# -- a turn: one chunk -------------------------------------------------------------------------


def test_a_turn_appends_one_chunk_of_its_new_tokens(tmp_path):
    store = KVStore(tmp_path)
    ids = rand_ids(300, 1)
    assert save(store, ids[:100]).written_tokens == 100
    first = at(store, 0).stat()
    report = save(store, ids[:160])
    assert (report.written_tokens, report.chunks) == (60, 2)
    assert report.bytes_written < store.size_bytes(SID) / 2
    assert at(store, 0).stat().st_ino == first.st_ino  # the history is not rewritten
    assert save(store, ids[:160]).written_tokens == 0  # the same ids again: nothing
    report = save(KVStore(tmp_path), ids)  # a fresh store (another process) appends too
    assert (report.written_tokens, report.chunks) == (140, 3)
    assert spans(store) == [(0, 100), (100, 160), (160, 300)]
    result = KVStore(tmp_path).load_session(SID, FP)
    assert result.notes == []
    assert_same(result, ids, kv_of(ids))
    assert not [n for _, _, names in os.walk(tmp_path) for n in names if n.startswith(".tmp-")]


def test_a_shorter_conversation_keeps_the_longer_one_and_is_found_in_it(tmp_path):
    """/undo: the snapshot of the shorter conversation is the longer one's chunks up to it
    (split where it ends); the longer one stays whole for a /redo or a branch switch."""
    store = KVStore(tmp_path)
    ids = rand_ids(200, 2)
    save(store, ids[:100])
    save(store, ids)
    report = save(store, ids[:130])
    assert report.written_tokens == 100  # the chunk [100,200) rewritten as its two halves
    assert spans(store) == [(0, 100), (100, 130), (130, 200)]
    assert_same(KVStore(tmp_path).load_session(SID, FP), ids[:130], kv_of(ids[:130]))
    assert store.find(FP, ids)[-1].end == 200
    assert_same(KVStore(tmp_path).load(FP, ids), ids, kv_of(ids))
    assert prefixes_on_disk(store) == (200, 200)


# -- branches: shared chunks, splits, going back ----------------------------------------------


def test_two_branches_share_their_common_chunks(tmp_path):
    store = KVStore(tmp_path)
    a = rand_ids(150, 3)
    b = a[:100] + rand_ids(40, 4)
    save(store, a[:100])
    save(store, a)
    report = save(store, b)  # parts from a at a chunk boundary: nothing is split
    assert (report.written_tokens, report.chunks) == (40, 2)
    assert spans(store) == [(0, 100), (100, 140), (100, 150)]
    assert prefixes_on_disk(store) == (190, distinct_prefixes(a, b))


def test_a_branch_that_leaves_a_chunk_in_its_middle_splits_it(tmp_path):
    store = KVStore(tmp_path)
    a = rand_ids(150, 5)
    b = a[:120] + rand_ids(30, 6)
    save(store, a)
    whole = pool(store)[0]
    report = save(store, b)
    assert report.written_tokens == 150 + 30  # a's chunk, as its two halves, and b's tokens
    assert report.chunks == 2
    assert spans(store) == [(0, 120), (120, 150), (120, 150)]
    assert not (store.pool_dir(FP) / whole.name).exists()
    assert prefixes_on_disk(store) == (180, distinct_prefixes(a, b))  # each token once
    for ids in (a, b):  # both whole, bit for bit, the split chunk's K/V too
        result = KVStore(tmp_path).load(FP, ids)
        assert result.notes == []
        assert_same(result, ids, kv_of(ids))


def test_a_split_killed_before_the_whole_went_is_tidied_by_the_next_save(tmp_path):
    """Killed between writing the halves and removing the whole, a split leaves the whole's
    tokens twice; the next save of the model removes the whole, which its halves stand for."""
    store = KVStore(tmp_path)
    a = rand_ids(150, 24)
    b = a[:120] + rand_ids(30, 25)
    save(store, a, "a")
    whole = store.pool_dir(FP) / pool(store)[0].name
    kept = whole.read_bytes()
    save(store, b, "b")
    whole.write_bytes(kept)  # back, as the kill left it
    assert prefixes_on_disk(store) == (150 + 120 + 30 + 30, distinct_prefixes(a, b))
    c = b + rand_ids(10, 26)
    save(KVStore(tmp_path), c, "b")
    assert not whole.exists()
    assert prefixes_on_disk(store) == (distinct_prefixes(a, c),) * 2
    assert store.n_tokens_on_disk("a") == 150
    for sid, ids in (("a", a), ("b", c)):
        result = KVStore(tmp_path).load_session(sid, FP)
        assert result.notes == []
        assert_same(result, ids, kv_of(ids))
        assert KVStore(tmp_path).find(FP, ids)[-1].end == len(ids)


def test_going_back_to_any_branch_finds_its_whole_chain(tmp_path):
    """A tree of branches, each off a random place of an earlier one (an /edit, a /retry, a
    branch switch): every branch is found whole afterwards, nothing left to compute, and the
    pool holds each distinct token once."""
    rng = random.Random(7)
    store = KVStore(tmp_path)
    branches = [rand_ids(rng.randrange(20, 120), 0)]
    save(store, branches[0])
    for i in range(1, 12):
        base = rng.choice(branches)
        ids = base[: rng.randrange(1, len(base) + 1)] + rand_ids(rng.randrange(1, 80), 100 + i)
        for n in sorted({rng.randrange(1, len(ids) + 1), len(ids)}):  # turns on the way
            save(store, ids[:n])
        branches.append(ids)
    assert prefixes_on_disk(store) == (distinct_prefixes(*branches),) * 2
    fresh = KVStore(tmp_path)
    for ids in branches:
        chain = fresh.find(FP, ids)
        assert chain[-1].end == len(ids)
        assert [r.start for r in chain] == [0] + [r.end for r in chain[:-1]]
        result = fresh.load(FP, ids, chain=chain)
        assert result.notes == []
        assert_same(result, ids, kv_of(ids))


def test_a_load_from_a_chunk_boundary_reads_only_the_rest(tmp_path):
    """The memory agrees up to a chunk boundary: only the chunks after it are read."""
    store = KVStore(tmp_path)
    ids = rand_ids(200, 8)
    for n in (80, 140, 200):
        save(store, ids[:n])
    result = KVStore(tmp_path).load(FP, ids, start=80)
    assert (result.start, result.ids, result.notes) == (80, ids[80:], [])
    assert len(result.chunks) == 2
    want = [(k[:, :, 80:], v[:, :, 80:]) for k, v in kv_of(ids)]
    assert all(torch.equal(a, b) for got, w in zip(result.layers, want, strict=True)
               for a, b in zip(got, w, strict=True))  # fmt: skip


def test_a_conversation_that_leaves_a_chunk_in_its_middle_loads_the_first_part(tmp_path):
    """ids that agree with a chunk over its first tokens only (a client's answer sent back as
    text, tokenized otherwise): `find` stops before it, `find_within` names it and how many
    agree, and `load` hands over exactly those, validated; a damaged chunk hands over none."""
    store = KVStore(tmp_path)
    ids = rand_ids(150, 10)
    save(store, ids[:60])
    save(store, ids)  # chunks [0, 60) and [60, 150)
    other = ids[:100] + rand_ids(20, 11)
    chain = store.find(FP, other)
    assert [(r.start, r.end) for r in chain] == [(0, 60)]
    part = store.find_within(FP, other, chain)
    assert part is not None and (part[0].start, part[0].end, part[1]) == (60, 150, 40)
    result = KVStore(tmp_path).load(FP, other, start=0, chain=chain, part=part)
    assert result.notes == []
    assert_same(result, ids[:100], prefix(kv_of(ids), 100))
    assert store.find_within(FP, rand_ids(30, 12), []) is None  # nothing in common
    assert store.find_within(FP, ids[:60], chain) is None  # nothing past the chain
    flip = store.pool_dir(FP) / part[0].name
    data = bytearray(flip.read_bytes())
    data[-3] ^= 0xFF
    flip.write_bytes(bytes(data))
    damaged = KVStore(tmp_path).load(FP, other, chain=chain, part=part)
    assert damaged.ids == ids[:60] and len(damaged.chunks) == 1


def test_find_never_goes_past_the_ids(tmp_path):
    store = KVStore(tmp_path)
    ids = rand_ids(100, 9)
    save(store, ids)
    assert store.find(FP, ids[:99]) == [] and store.find(FP, []) == []
    assert store.find(FP, ids + [1, 2])[-1].end == 100
    assert store.find(OTHER, ids) == []  # another model has its own pool


# -- the budget --------------------------------------------------------------------------------


def age(store: KVStore, refs: dict[str, Ref]) -> None:
    """Give the chunks distinct last-use times, oldest first, well in the past."""
    for i, r in enumerate(refs.values()):
        t = (1_000_000 + i) * 10**9
        os.utime(store.pool_dir(FP) / r.name, ns=(t, t))


def test_the_budget_evicts_the_least_recently_used_branch_tips_first(tmp_path):
    store = KVStore(tmp_path)
    root = rand_ids(100, 10)
    tails = {k: root + rand_ids(50, 11 + i) for i, k in enumerate("abc")}
    for ids in tails.values():
        save(store, ids)
    tips = {k: store.find(FP, ids)[-1] for k, ids in tails.items()}
    age(store, {"root": store.find(FP, root)[-1], **tips})  # the root is the oldest: not a tip
    store.budget = store.pool_bytes()
    d = root + rand_ids(40, 20)  # fewer bytes than one tip
    assert save(store, d).evicted.chunks == 1
    assert {r.name for r in pool(store)} == {
        store.find(FP, root)[-1].name,
        tips["b"].name,
        tips["c"].name,
        store.find(FP, d)[-1].name,
    }
    assert store.pool_bytes() <= store.budget
    assert store.find(FP, tails["a"])[-1].end == 100  # branch a lost its tip, kept its root
    # Going back to b makes it the most recently used: c goes next.
    assert KVStore(tmp_path).load(FP, tails["b"]).ids == tails["b"]
    store.budget = store.pool_bytes()
    assert save(store, root + rand_ids(40, 21)).evicted.chunks == 1
    assert store.find(FP, tails["c"])[-1].end == 100
    assert store.find(FP, tails["b"])[-1].end == 150


def test_the_budget_never_evicts_the_chain_just_saved(tmp_path):
    store = KVStore(tmp_path, budget=1)
    ids = rand_ids(100, 12)
    save(store, ids[:60])
    report = save(store, ids)
    assert report.evicted.chunks == 0 and store.pool_bytes() > store.budget
    other = rand_ids(80, 13)
    report = save(store, other)  # the other branch's chunks go, this one's never
    assert report.evicted.chunks == 2 and {r.name for r in pool(store)} == {
        r.name for r in store.find(FP, other)}  # fmt: skip
    assert_same(KVStore(tmp_path).load_session(SID, FP), other, kv_of(other))


def test_the_budget_spans_every_model_and_evicts_across_them(tmp_path):
    store = KVStore(tmp_path)
    ids = rand_ids(100, 14)
    store.save("a", ids, kv_of(ids), OTHER)
    os.utime(store.pool_dir(OTHER) / pool(store, OTHER)[0].name, ns=(10**9, 10**9))
    store.budget = store.pool_bytes()
    report = save(store, ids)
    assert (report.evicted.chunks, report.evicted.cut) == (1, ("a",))  # a's newest: named
    assert pool(store, OTHER) == [] and len(pool(store)) == 1


def test_another_sessions_newest_snapshot_goes_last_and_is_named(tmp_path):
    """Session a's older branch goes before its newest snapshot, even when that is the least
    recently used; once a's newest must go too, the report names a, and a says on resume what
    it kept."""
    store = KVStore(tmp_path)
    root = rand_ids(100, 30)
    old, new = root + rand_ids(60, 31), root + rand_ids(50, 32)
    save(store, old, "a")
    save(store, new, "a")  # a's newest: root + new's tail; old's tail is an older branch
    age(store, {"newest": store.find(FP, new)[-1], "older": store.find(FP, old)[-1]})
    b = rand_ids(40, 33)
    store.budget = store.pool_bytes()  # b's chunk must make room: one tip goes
    report = save(store, b, "b")
    assert report.evicted == Eviction(1, 60, report.evicted.bytes, ())  # the older branch
    assert store.find(FP, new)[-1].end == 150 and store.find(FP, old)[-1].end == 100
    assert report.evicted.line(store.budget) == (
        "snapshot: the K/V pool is over its budget (kv_budget_mb 0): dropped 60 cached tokens of "
        "older branches"
    )
    store.budget = store.pool_bytes() - 1  # now a's newest snapshot loses its tip
    report = save(store, b + rand_ids(10, 34), "b")
    assert (report.evicted.chunks, report.evicted.tokens, report.evicted.cut) == (1, 50, ("a",))
    assert report.evicted.line(40 << 20) == (
        "snapshot: the K/V pool is over its budget (kv_budget_mb 40): dropped 50 cached tokens of "
        "older branches and of the newest snapshot of session a"
    )
    resumed = KVStore(tmp_path).load_session("a", FP)
    assert resumed.ids == root and resumed.notes == [
        "snapshot: kept 100 tokens: for the rest, another session's save needed the room (the "
        "store's K/V budget)"
    ]
    assert save(store, b + rand_ids(10, 34), "b").evicted == Eviction()  # nothing new: no line
    store.budget = 1 << 30
    save(store, new, "a")  # a saves again: its list no longer says it was cut
    assert store.budget_cut("a") is None and KVStore(tmp_path).load_session("a", FP).notes == []


# -- sessions: delete, figures -----------------------------------------------------------------


def test_delete_keeps_the_chunks_another_session_lists(tmp_path):
    store = KVStore(tmp_path)
    a = rand_ids(150, 15)
    b = a[:120] + rand_ids(30, 16)
    save(store, a[:100], "a")
    save(store, a, "a")
    save(store, b, "b")  # splits a's chunk [100,150) at 120: b lists the first half
    assert store.n_tokens_on_disk("a") == 150 and store.n_tokens_on_disk("b") == 150
    b_files = {p.name for p in store.session_paths("b")}
    store.delete("a")
    assert {r.name for r in pool(store)} == b_files  # a's own half of the split went too
    assert not (tmp_path / "sessions" / "a.json").exists()
    assert store.n_tokens_on_disk("a") == store.size_bytes("a") == 0
    assert store.load_session("a", FP).ids == [] and store.load_session("a", FP).notes == []
    assert_same(KVStore(tmp_path).load_session("b", FP), b, kv_of(b))
    store.delete("b")
    assert pool(store) == [] and os.listdir(tmp_path / "sessions") == []
    store.delete("b")  # deleting nothing is fine


def test_figures_count_every_branch_of_a_session_once(three):
    store, ids, layers = three
    branch = ids[:120] + rand_ids(10, 17)
    store.save(SID, branch, kv_of(branch), FP)
    assert store.n_tokens_on_disk(SID) == store.n_tokens_on_disk(SID, FP) == 210
    assert store.n_tokens_on_disk(SID, OTHER) == store.size_bytes(SID, OTHER) == 0
    assert store.size_bytes(SID) == store.pool_bytes() == sum(
        (store.pool_dir(FP) / r.name).stat().st_size for r in pool(store))  # fmt: skip
    assert [Ref.parse(p.name).end for p in store.session_paths(SID)] == [100, 120, 130]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 65, "a b", ".", "..", "é", "a\x00b"])
def test_a_bad_session_id_is_refused_before_anything_is_written(tmp_path, bad):
    store = KVStore(tmp_path / "kv")
    ids, layers = make(3)
    for call in (
        lambda: store.save(bad, ids, layers, FP),
        lambda: store.load_session(bad, FP),
        lambda: store.session_paths(bad),
        lambda: store.delete(bad),
        lambda: store.size_bytes(bad),
        lambda: store.n_tokens_on_disk(bad),
    ):
        with pytest.raises(SnapshotError, match="refused session id"):
            call()
    assert not (tmp_path / "kv").exists() and not (tmp_path / "x").exists()


# -- the store from before the pool ------------------------------------------------------------


def legacy_session(root: Path, sid: str, ids: list[int], cuts: list[int]) -> Path:
    """A session's folder as kvrepl wrote it before the pool: chunk-<start>.safetensors."""
    d = root / sid
    d.mkdir(parents=True)
    for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True):
        _, data = chunk_bytes(ids, kv_of(ids), a, b, FP)
        (d / f"chunk-{a:09d}.safetensors").write_bytes(data)
    return d


def test_a_session_from_before_the_pool_is_imported_once_and_loads(tmp_path):
    ids = rand_ids(200, 18)
    d = legacy_session(tmp_path, "old", ids, [100, 150])
    store = KVStore(tmp_path)
    assert store.n_tokens_on_disk("old") == 200  # /sessions counts it before any turn
    assert not d.exists()
    assert spans(store) == [(0, 100), (100, 150), (150, 200)]
    result = KVStore(tmp_path).load_session("old", FP)
    assert result.notes == []
    assert_same(result, ids, kv_of(ids))
    assert save(KVStore(tmp_path), ids + [5], "old").written_tokens == 1  # and goes on


def test_a_legacy_session_is_imported_up_to_its_first_bad_chunk(tmp_path):
    ids = rand_ids(200, 19)
    d = legacy_session(tmp_path, "old", ids, [100, 150])
    bad = d / "chunk-000000100.safetensors"
    bad.write_bytes(bad.read_bytes()[:-5])
    result = KVStore(tmp_path).load_session("old", FP)
    assert result.notes == [] and result.ids == ids[:100]
    assert spans(KVStore(tmp_path)) == [(0, 100)] and not d.exists()


def test_a_legacy_folder_that_is_a_link_is_not_imported_and_delete_removes_the_link(tmp_path):
    ids = rand_ids(50, 20)
    outside = legacy_session(tmp_path / "elsewhere", "old", ids, [])
    root = tmp_path / "kv"
    root.mkdir()
    (root / "old").symlink_to(outside)
    before = tree(outside)
    store = KVStore(root)
    assert store.load_session("old", FP).ids == [] and store.find(FP, ids) == []
    store.delete("old")
    assert not os.path.lexists(root / "old") and tree(outside) == before


# -- broken chunks: cut at the first, one note, nothing deleted --------------------------------


def rewrite_meta(path: Path, **changes: str | None) -> None:
    """Rewrite a chunk with changed metadata (None removes a key), keeping its tensors."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    path.write_bytes(st_save(tensors, metadata=meta))


def header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize(
    "where", ["in-length", "after-length", "in-header", "end-of-header", "in-data", "last-byte"]
)
def test_a_truncated_chunk(three, reload, where):
    store, ids, layers = three
    path = at(store, 100)
    data = path.read_bytes()
    hl = header_len(path)
    cut = {"in-length": 5, "after-length": 8, "in-header": hl // 2, "end-of-header": hl,
           "in-data": hl + 1000, "last-byte": len(data) - 1}[where]  # fmt: skip
    path.write_bytes(data[:cut])
    result = reload(store, ids)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "kept 100 of 200 tokens", "chunk at 100",
             "bytes long" if cut < 8 else "truncated")  # fmt: skip
    assert path.stat().st_size == cut and len(pool(store)) == 3  # load never deletes


@pytest.mark.parametrize("size", range(8))
def test_a_tiny_first_chunk(three, reload, size):
    store, ids, _ = three
    at(store, 0).write_bytes(b"\x01" * size)
    result = reload(store, ids)
    assert result.ids == [] and result.layers == []
    assert one_note(result) == f"snapshot: dropped: it is only {size} bytes long"


def test_a_header_length_larger_than_the_file(three, reload):
    store, ids, layers = three
    path = at(store, 150)
    data = path.read_bytes()
    path.write_bytes((len(data) + 1).to_bytes(8, "little") + data[8:])
    result = reload(store, ids)
    assert_same(result, ids[:150], prefix(layers, 150))
    one_note(result, "kept 150 of 200", "chunk at 150 is truncated")


def test_trailing_garbage(three, reload):
    store, ids, layers = three
    with at(store, 100).open("ab") as f:
        f.write(b"garbage")
    result = reload(store, ids)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "trailing garbage")


@pytest.mark.parametrize("offset", [0, 1, -1])
def test_a_flipped_byte_in_the_tensor_data(three, reload, offset):
    store, ids, layers = three
    path = at(store, 100)
    data = bytearray(path.read_bytes())
    data[{0: header_len(path), 1: header_len(path) + 500, -1: len(data) - 1}[offset]] ^= 0x40
    path.write_bytes(bytes(data))
    result = reload(store, ids)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "corrupted (data checksum mismatch)")


def test_a_chunk_made_by_another_model(three, reload):
    """Each model has its own pool: another model finds nothing; a chunk in this model's pool
    whose metadata names another model is cut off."""
    store, ids, layers = three
    other = reload(store, ids, OTHER)
    assert (other.ids, other.notes) == ([], [])
    rewrite_meta(at(store, 150), fingerprint=OTHER)
    result = reload(store, ids)
    assert_same(result, ids[:150], prefix(layers, 150))
    one_note(result, "kept 150 of 200", "chunk at 150 was made by another model")


def forge_dtype(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a chunk with its K/V in another dtype, metadata and CRCs made to match."""
    from kvrepl.store.stfile import crc32s

    buf = path.read_bytes()
    meta = json.loads(buf[8 : header_len(path)])["__metadata__"]
    tensors = {k: v if k == "ids" else v.to(dtype) for k, v in st_load(buf).items()}
    names = ["ids"] + [f"layers.{i}.{kv}" for i in range(L) for kv in ("keys", "values")]
    crcs = crc32s([tensors[k].reshape(-1).view(torch.uint8).numpy() for k in names])
    meta = dict(meta, dtype=str(dtype).removeprefix("torch."),
                data_crc32=",".join(f"{c:08x}" for c in crcs))  # fmt: skip
    path.write_bytes(st_save(tensors, metadata=meta))


def test_a_chunk_in_another_dtype_than_the_chunks_before_it(three, reload):
    store, ids, layers = three
    forge_dtype(at(store, 100), torch.bfloat16)
    result = reload(store, ids)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "has another dtype or shape than the chunks before it")


def test_unknown_format_version_and_missing_metadata(three, reload):
    store, ids, layers = three
    rewrite_meta(at(store, 100), format_version="3")
    one_note(reload(store, ids), "kept 100 of 200", "chunk at 100", "unknown format version")
    path = at(store, 0)
    save_file(st_load(path.read_bytes()), str(path))  # valid safetensors, no metadata
    result = reload(store, ids)
    assert result.ids == []
    one_note(result, "dropped", "not a kvrepl snapshot")


@pytest.mark.parametrize("change, words", [({"prefix_hash": None}, "incomplete metadata"),
                                           ({"n_tokens": "49"}, "does not match its file name"),
                                           ({"start": "0"}, "does not match its file name"),
                                           ({"dtype": "bfloat16"}, "dtypes")])  # fmt: skip
def test_metadata_that_disagrees_with_the_tensors_or_the_name(three, reload, change, words):
    store, ids, layers = three
    rewrite_meta(at(store, 100), **change)
    result = reload(store, ids)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", words)


def test_a_chunk_whose_content_is_not_what_its_name_says(three, reload):
    """Another branch's chunk of the same span copied over this one's name (behind kvrepl's
    back): its name places it in the tree, so its content must be the one the name hashes."""
    store, ids, layers = three
    other = ids[:100] + rand_ids(50, 22)
    store.save("other", other, kv_of(other), FP)
    mine, theirs = at(store, 100), at(store, 100, "other")
    assert mine.name != theirs.name
    shutil.copyfile(theirs, mine)
    result = reload(store, ids)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "kept 100 of 200", "chunk at 100 does not match its file name")


def test_a_name_that_does_not_match_the_metadata_is_refused_by_the_parser(three):
    store, _, _ = three
    path = at(store, 100)
    buf, size, st = read_chunk(path, header_only=False)
    r = Ref.parse(path.name)
    assert parse_chunk(buf, size, st, path.name)[0].start == 100
    for name in (f"000000101-0000050-{r.parent}-{r.tip}.safetensors",
                 f"000000100-0000049-{r.parent}-{r.tip}.safetensors",
                 "chunk-000000000.safetensors"):  # fmt: skip
        with pytest.raises(BadChunk, match="does not match its file name"):
            parse_chunk(buf, size, st, name)
    rewrite_meta(path, n_tokens="49")  # named as its metadata says: its tensors disagree
    buf, size, st = read_chunk(path, header_only=False)
    with pytest.raises(BadChunk, match="token count"):
        parse_chunk(buf, size, st, f"000000100-0000049-{r.parent}-{r.tip}.safetensors")
    assert Ref.parse(f"000000100-0000000-{r.parent}-{r.tip}.safetensors") is None
    for junk in ("notes.txt", "100-50-x-y.safetensors", path.name + ".bak"):
        (path.parent / junk).write_bytes(b"x")
    assert len(pool(store)) == 3  # junk beside the chunks is no chunk


def test_a_header_with_duplicate_keys_is_refused(three, reload):
    """Two readers must never disagree on which bytes a tensor is: duplicates are refused."""
    store, ids, layers = three
    path = at(store, 100)
    data = path.read_bytes()
    hl = header_len(path)
    fake = b'{"ids":{"dtype":"I64","shape":[0],"data_offsets":[0,0]},' + data[9:hl]
    path.write_bytes(len(fake).to_bytes(8, "little") + fake + data[hl:])
    result = reload(store, ids)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "not a safetensors file")


class _Bomb:
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("start", [0, 100])
def test_a_pickle_in_place_of_a_chunk_is_never_unpickled(three, reload, tmp_path, start):
    store, ids, _ = three
    bomb = _Bomb()
    bomb.marker = str(tmp_path / "unpickled")
    path = at(store, start)
    path.write_bytes(pickle.dumps({"layers": bomb}))
    result = reload(store, ids)
    assert result.ids == ids[:start]
    one_note(result, "not a safetensors file")
    assert not (tmp_path / "unpickled").exists()
    pickle.loads(path.read_bytes())  # the bomb is live: proves the check
    assert (tmp_path / "unpickled").exists()


def test_a_missing_chunk_of_the_sessions_chain(three):
    """The session's list names its last chain: a lost file cuts it there, with a note. By ids,
    the chunks after the gap are simply not found (the pool is searched, not a list)."""
    store, ids, layers = three
    at(store, 100).unlink()
    result = KVStore(store.root).load_session(SID, FP)
    assert_same(result, ids[:100], prefix(layers, 100))
    assert one_note(result) == "snapshot: kept 100 tokens: the chunk at 100 is missing"
    by_ids = KVStore(store.root).load(FP, ids)
    assert (by_ids.ids, by_ids.notes) == (ids[:100], [])
    at(store, 0).unlink()
    assert one_note(KVStore(store.root).load_session(SID, FP)) == (
        "snapshot: dropped: its first chunk is missing")  # fmt: skip


# -- a damaged chunk is replaced by the next save ----------------------------------------------


def test_a_save_after_a_cut_load_writes_again_from_the_cut(three):
    store, ids, layers = three
    path = at(store, 100)
    path.write_bytes(path.read_bytes()[:-3])
    assert store.load(FP, ids).ids == ids[:100]  # remembers the chunk it refused
    assert store.save(SID, ids, layers, FP).written_tokens == 100
    result = KVStore(store.root).load_session(SID, FP)
    assert result.notes == []
    assert_same(result, ids, layers)
    assert prefixes_on_disk(store) == (200, 200)  # the broken chunk and its child are gone


@pytest.mark.parametrize("damage", ["truncated", "symlink", "another dtype", "another model"])
def test_a_fresh_store_writes_again_from_a_chunk_no_load_would_take(three, tmp_path, damage):
    """Without a load first (another process, or a chunk damaged after it), a save reads the
    headers of the chain it reuses: it keeps no chunk a load would cut at."""
    store, ids, layers = three
    path = at(store, 100)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-3])
    elif damage == "symlink":
        shutil.move(path, tmp_path / "outside")
        path.symlink_to(tmp_path / "outside")
    elif damage == "another dtype":
        forge_dtype(path, torch.bfloat16)
    else:
        rewrite_meta(path, fingerprint=OTHER)
    outside = (tmp_path / "outside").read_bytes() if damage == "symlink" else None
    assert KVStore(store.root).save(SID, ids, layers, FP).written_tokens == 100
    result = KVStore(store.root).load_session(SID, FP)
    assert result.notes == []
    assert_same(result, ids, layers)
    assert not path.is_symlink() and prefixes_on_disk(store) == (200, 200)
    if outside is not None:
        assert (tmp_path / "outside").read_bytes() == outside


# -- links: never followed ---------------------------------------------------------------------


def test_a_chunk_linked_out_of_the_store_is_refused_then_replaced(three, reload, tmp_path):
    store, ids, layers = three
    path = at(store, 100)
    outside = tmp_path / "outside.safetensors"
    shutil.move(path, outside)
    path.symlink_to(outside)  # a valid chunk: following the link would load it
    result = reload(store, ids)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "is a symbolic link; refused, not followed")
    before = outside.read_bytes()
    store.load(FP, ids)
    store.save(SID, ids, layers, FP)
    assert not [p for p in store.pool_dir(FP).iterdir() if p.is_symlink()]
    assert outside.read_bytes() == before
    assert_same(KVStore(store.root).load_session(SID, FP), ids, layers)


@pytest.mark.parametrize("which", ["pool", "chunks"])
def test_a_pool_folder_linked_out_of_the_store_is_never_followed(three, tmp_path, which):
    """The model's pool (or the folder of all pools) moved out, a link left: nothing is read,
    counted or deleted through it; the next save makes a real folder in its place."""
    store, ids, layers = three
    folder = store.pool_dir(FP) if which == "pool" else store.pool_dir(FP).parent
    outside = tmp_path / "outside"
    shutil.move(folder, outside)
    folder.symlink_to(outside)
    before = tree(outside)
    opened: list[str] = []
    real_open = os.open

    def spy(path, *a, **k):
        opened.append(os.path.realpath(path))
        return real_open(path, *a, **k)

    fresh = KVStore(store.root)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "open", spy)
        for result in (fresh.load_session(SID, FP), fresh.load(FP, ids)):
            assert result.ids == []
            assert one_note(result) == (
                "snapshot: dropped: its folder is a symbolic link; refused, not followed"
            )
        assert fresh.find(FP, ids) == [] and fresh.session_paths(SID) == []
        assert fresh.n_tokens_on_disk(SID) == fresh.size_bytes(SID) == fresh.pool_bytes() == 0
        fresh.delete(SID)
    assert not [p for p in opened if p.startswith(str(outside))]
    assert tree(outside) == before
    fresh.save(SID, ids, layers, FP)
    assert not folder.is_symlink() and folder.is_dir() and tree(outside) == before
    assert_same(KVStore(store.root).load_session(SID, FP), ids, layers)


def test_a_sessions_folder_linked_out_of_the_store_is_never_followed(three, tmp_path):
    store, ids, layers = three
    folder = store.root / "sessions"
    outside = tmp_path / "outside"
    shutil.move(folder, outside)
    folder.symlink_to(outside)
    before = tree(outside)
    fresh = KVStore(store.root)
    assert fresh.load_session(SID, FP).ids == [] and fresh.n_tokens_on_disk(SID) == 0
    fresh.delete(SID)  # removes no list through the link, and no chunk it names
    assert tree(outside) == before and len(pool(store)) == 3
    fresh.save(SID, ids, layers, FP)  # a real folder replaces the link
    assert not folder.is_symlink() and tree(outside) == before
    assert_same(KVStore(store.root).load_session(SID, FP), ids, layers)


def test_a_sessions_list_linked_out_of_the_store_is_not_read(three, tmp_path):
    store, ids, layers = three
    path = store.manifest(SID)
    outside = tmp_path / "list.json"
    shutil.move(path, outside)
    path.symlink_to(outside)
    before = outside.read_bytes()
    assert KVStore(store.root).load_session(SID, FP).ids == []
    store.save(SID, ids, layers, FP)
    assert not path.is_symlink() and outside.read_bytes() == before
    assert KVStore(store.root).load_session(SID, FP).ids == ids


# -- failures while saving ---------------------------------------------------------------------


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


SPLIT_CALLS = {"replace": 2, "fsync": 4, "open": 2}  # of the two halves' atomic writes


@pytest.mark.parametrize("target", ["replace", "fsync", "open"])
@pytest.mark.parametrize("nth", [1, 2, 3, 4])  # the first call of the save, or a later one
def test_a_full_disk_leaves_the_old_snapshot_and_no_token_twice(three, monkeypatch, target, nth):
    """The branch leaves a chunk in its middle: the save writes two halves, then its chunk.
    A write of the split that fails leaves the store as it was (no half holds a token the
    whole still holds); one after it leaves the split done, which loses nothing either."""
    store, ids, layers = three
    before = tree(store.root)
    real = getattr(os, target)
    calls = [0]

    def fail_nth(*a, **k):
        if target == "open" and not a[1] & os.O_CREAT:
            return real(*a, **k)
        calls[0] += 1
        return _full() if calls[0] >= nth else real(*a, **k)

    monkeypatch.setattr(os, target, fail_nth)
    tail_ids, tail = make(100, seed=23)
    ids2 = ids[:120] + tail_ids
    layers2 = [(torch.cat([k[:, :, :120], k2], 2), torch.cat([v[:, :, :120], v2], 2))
               for (k, v), (k2, v2) in zip(layers, tail, strict=True)]  # fmt: skip
    with pytest.raises(SnapshotError) as err:
        store.save(SID, ids2, layers2, FP)
    monkeypatch.undo()
    assert str(err.value) == "snapshot not saved: No space left on device; messages are safe"
    if nth <= SPLIT_CALLS[target]:
        assert tree(store.root) == before
    assert not [n for _, _, ns in os.walk(store.root) for n in ns if n.startswith(".tmp-")]
    total, distinct = prefixes_on_disk(store)
    assert total == distinct
    assert_same(KVStore(store.root).load_session(SID, FP), ids, layers)
    # It works again afterwards, writing what the failed save did not: the split (the whole's
    # 50 tokens as two halves), the new chunk (100), or only the session's list (the 4th write)
    left = 150 if nth <= SPLIT_CALLS[target] else {3: 100, 4: 0}[nth]
    assert store.save(SID, ids2, layers2, FP).written_tokens == left
    assert_same(KVStore(store.root).load_session(SID, FP), ids2, layers2)
    assert prefixes_on_disk(store) == (300, distinct_prefixes(ids, ids2))


def test_a_temp_file_a_killed_writer_left_goes_and_a_live_ones_stays(three):
    store, ids, layers = three
    d = store.pool_dir(FP)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {pid: f".tmp-{pool(store)[0].name}-{pid}-{'0' * 32}"
             for pid in (dead.pid, os.getpid())}  # fmt: skip
    for name in names.values():
        (d / name).write_bytes(b"half")
    (store.root / "sessions" / f".tmp-{SID}.json-{dead.pid}-{'1' * 32}").write_bytes(b"{")
    store.save(SID, ids + [1], [(torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2))
                                for k, v in layers], FP)  # fmt: skip
    temps = [n for _, _, ns in os.walk(store.root) for n in ns if n.startswith(".tmp-")]
    assert temps == [names[os.getpid()]]


CHILD = r'''
import random, sys
import torch

def kv(ids, n_layers=4, heads=3, dim=16):
    """K/V that are a pure function of (prefix, position): exact in float32."""
    h, vals = 0, []
    for t in ids:
        h = (h * 1000003 + t + 1) % 65521
        vals.append(h)
    base = torch.tensor(vals, dtype=torch.float32) * 64 + torch.arange(len(ids)) % 64
    base = base.view(1, 1, -1, 1).expand(1, heads, len(ids), dim)
    return [((base * (i + 1)).contiguous(), (-base * (i + 1)).contiguous())
            for i in range(n_layers)]

def sequences(seed, steps=300):
    """Turns, undos and edits: a conversation that grows, goes back and branches."""
    rng = random.Random(seed)
    ids = [rng.randrange(1000) for _ in range(300)]
    out = []
    for _ in range(steps):
        if rng.random() < 0.3:
            ids = ids[:rng.randrange(len(ids) + 1)]
        ids = ids + [rng.randrange(1000) for _ in range(rng.randrange(1, 400))]
        if len(ids) > 3000:
            ids = ids[:400]
        out.append(ids)
    return out

if __name__ == "__main__":  # a zygote: imports once, forks one saver per round
    import os
    from pathlib import Path
    from kvrepl.store import kvstore
    torch.set_num_threads(1)
    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            store = kvstore.KVStore(Path(sys.argv[1]))
            for ids in sequences(int(line)):
                store.save("killme", ids, kv(ids), "fp")
            os._exit(0)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
'''


def check_killed(root: Path, kv, saved: list[list[int]]) -> int:
    """What a kill left: the session's snapshot is one it saved, or a prefix of one, exact."""
    result = KVStore(root).load_session("killme", "fp")
    assert result.notes == []
    assert any(s[: len(result.ids)] == result.ids for s in saved)
    if result.ids:
        assert all(torch.equal(a, b) for pair in zip(result.layers, kv(result.ids), strict=True)
                   for a, b in zip(*pair, strict=True))  # fmt: skip
    return len(result.ids)


def test_kill_9_during_saves_always_leaves_a_valid_snapshot(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    helpers: dict = {}
    exec(CHILD, helpers)  # noqa: S102 - our own helper code, shared with the child
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(1234)
    saved: list[list[int]] = [[]]
    lengths = []
    zygote = subprocess.Popen([sys.executable, str(script), str(tmp_path / "kv")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                              text=True)  # fmt: skip
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for round_ in range(6):  # one saver at a time, each killed at a random moment
            saved += helpers["sequences"](round_)
            zygote.stdin.write(f"{round_}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.05, 0.6))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            assert zygote.stdout.readline().strip() == "reaped"
            lengths.append(check_killed(tmp_path / "kv", helpers["kv"], saved))
        zygote.stdin.close()
        assert zygote.wait(timeout=10) == 0
    finally:
        zygote.kill()
    store = KVStore(tmp_path / "kv")
    for ids in saved[-3:]:  # after all those kills, plain saves give exact snapshots
        store.save("killme", ids, helpers["kv"](ids), "fp")
        result = KVStore(tmp_path / "kv").load_session("killme", "fp")
        assert result.ids == ids and result.notes == []
    assert not [n for _, _, ns in os.walk(tmp_path / "kv") for n in ns if n.startswith(".tmp-")]
    assert max(lengths) > 0, "the child never got a save through"
