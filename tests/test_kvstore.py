"""KV snapshots on disk: round trips, incremental saves, and every way a snapshot can be broken."""

from __future__ import annotations

import contextlib
import errno
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
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from kvrepl import kvstore
from kvrepl.errors import SnapshotError
from kvrepl.kvstore import KVStore

FP = "model-a|tok-a|float32"
L, H, D = 4, 3, 64
SID = "s1"


def make(n: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32000, (n,), generator=g).tolist()
    layers = [
        (
            torch.randn(1, H, n, D, generator=g).to(dtype),
            torch.randn(1, H, n, D, generator=g).to(dtype),
        )
        for _ in range(L)
    ]
    return ids, layers


def extend(ids, layers, at: int, extra: int, seed: int = 1):
    """ids[:at] and their K/V, followed by `extra` fresh tokens."""
    ids2, layers2 = make(extra, layers[0][0].dtype, seed)
    return ids[:at] + ids2, [
        (torch.cat([k[:, :, :at], k2], 2), torch.cat([v[:, :, :at], v2], 2))
        for (k, v), (k2, v2) in zip(layers, layers2, strict=True)
    ]


def prefix(layers, n: int):
    return [(k[:, :, :n], v[:, :, :n]) for k, v in layers]


def assert_same(result, ids, layers):
    assert result.ids == ids
    assert len(result.layers) == len(layers)
    for (k, v), (k2, v2) in zip(result.layers, layers, strict=True):
        assert k.dtype == k2.dtype and v.dtype == v2.dtype
        assert torch.equal(k, k2) and torch.equal(v, v2)


def chunk(root: Path, start: int, sid: str = SID) -> Path:
    return root / sid / f"chunk-{start:09d}.safetensors"


def stat_sig(p: Path):
    st = p.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


@pytest.fixture
def three(tmp_path):
    """A snapshot of 200 tokens in chunks [0,100) [100,150) [150,200)."""
    store = KVStore(tmp_path / "kv")
    ids, layers = make(200)
    for n in (100, 150, 200):
        store.save(SID, ids[:n], prefix(layers, n), FP)
    assert sorted(os.listdir(tmp_path / "kv" / SID)) == [
        chunk(tmp_path / "kv", s).name for s in (0, 100, 150)
    ]
    return store, ids, layers


def reload(store: KVStore, fp: str = FP):
    return KVStore(store.root).load(SID, fp)


def one_note(result, *words):
    assert len(result.notes) == 1, result.notes
    note = result.notes[0]
    assert note.startswith("snapshot: ")
    for w in words:
        assert w in note, note
    return note


# -- round trips and incremental saves ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact_and_keeps_dtype(tmp_path, dtype):
    store = KVStore(tmp_path)
    ids, layers = make(37, dtype)
    report = store.save(SID, ids, layers, FP)
    assert (report.written_tokens, report.chunks) == (37, 1)
    assert report.bytes_written == store.size_bytes(SID) > 37 * L * 2 * H * D * dtype.itemsize
    result = KVStore(tmp_path).load(SID, FP)
    assert result.notes == []
    assert_same(result, ids, layers)
    assert store.n_tokens_on_disk(SID) == 37


def test_chunk_file_is_plain_safetensors_with_metadata(tmp_path):
    store = KVStore(tmp_path)
    ids, layers = make(10)
    store.save(SID, ids, layers, FP)
    with safe_open(str(chunk(tmp_path, 0)), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"ids"} | {
            f"layers.{i}.{kv}" for i in range(L) for kv in ("keys", "values")
        }
        assert f.get_tensor("ids").tolist() == ids
    assert meta["format"] == "kvrepl-kv" and meta["format_version"] == "2"
    assert (
        meta["fingerprint"],
        meta["dtype"],
        meta["start"],
        meta["n_tokens"],
        meta["n_layers"],
    ) == (FP, "float32", "0", "10", str(L))
    assert len(meta["prefix_hash"]) == 64
    crcs = meta["data_crc32"].split(",")
    assert len(crcs) == 1 + 2 * L and all(len(c) == 8 for c in crcs)


def test_load_gives_views_of_the_bytes_it_read(tmp_path):
    """No copy on the way to the engine: every tensor of a chunk lies in one buffer."""
    store = KVStore(tmp_path)
    ids, layers = make(5)
    store.save(SID, ids, layers, FP)
    result = store.load(SID, FP)
    (chunk0,) = result.chunks
    spans = sorted((t.data_ptr(), t.numel() * t.element_size()) for t in chunk0.values())
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
    assert torch.equal(result.layers[2][1], layers[2][1])


def test_a_format_1_chunk_is_still_read(tmp_path):
    """Snapshots written before the CRC32 check (one sha256 of the data) keep working."""
    import hashlib

    from safetensors.torch import load, save

    store = KVStore(tmp_path)
    ids, layers = make(6)
    store.save(SID, ids, layers, FP)
    path = chunk(tmp_path, 0)
    buf = path.read_bytes()
    meta = json.loads(buf[8 : 8 + int.from_bytes(buf[:8], "little")])["__metadata__"]
    tensors = load(buf)
    dh = hashlib.sha256()
    for k in ["ids"] + [f"layers.{i}.{kv}" for i in range(L) for kv in ("keys", "values")]:
        dh.update(tensors[k].reshape(-1).view(torch.uint8).numpy())
    meta = {k: v for k, v in meta.items() if k != "data_crc32"}
    path.write_bytes(
        save(tensors, metadata=dict(meta, format_version="1", data_hash=dh.hexdigest()))
    )
    result = KVStore(tmp_path).load(SID, FP)
    assert result.notes == [] and result.ids == ids
    assert torch.equal(result.layers[1][0], layers[1][0])


def test_incremental_save_writes_only_new_tokens(tmp_path):
    store = KVStore(tmp_path)
    ids, layers = make(150)
    store.save(SID, ids[:100], prefix(layers, 100), FP)
    first = stat_sig(chunk(tmp_path, 0))
    report = store.save(SID, ids, layers, FP)
    assert (report.written_tokens, report.chunks) == (50, 2)
    assert report.bytes_written < store.size_bytes(SID) / 2
    assert stat_sig(chunk(tmp_path, 0)) == first
    # the same ids again write nothing; a fresh store (no memory) reads headers and appends
    assert store.save(SID, ids, layers, FP).written_tokens == 0
    ids2, layers2 = extend(ids, layers, 150, 20)
    report = KVStore(tmp_path).save(SID, ids2, layers2, FP)
    assert (report.written_tokens, report.chunks) == (20, 3)
    assert stat_sig(chunk(tmp_path, 0)) == first
    assert_same(KVStore(tmp_path).load(SID, FP), ids2, layers2)


def test_divergence_in_the_middle_rewrites_from_there(three, tmp_path):
    store, ids, layers = three
    first = stat_sig(chunk(store.root, 0))
    ids2, layers2 = extend(ids, layers, 120, 90)  # differs from token 120 on, 210 tokens
    report = store.save(SID, ids2, layers2, FP)
    assert report.written_tokens == 210 - 100
    assert stat_sig(chunk(store.root, 0)) == first
    assert not chunk(store.root, 150).exists()
    result = reload(store)
    assert result.notes == []
    assert_same(result, ids2, layers2)


@pytest.mark.parametrize("n, written", [(170, 20), (150, 0), (120, 20), (100, 0), (30, 30), (0, 0)])
def test_shorter_ids_cut_the_snapshot(three, n, written):
    store, ids, layers = three
    report = store.save(SID, ids[:n], prefix(layers, n), FP)
    assert report.written_tokens == written
    result = reload(store)
    assert result.notes == []
    assert result.ids == ids[:n]
    if n:
        assert_same(result, ids[:n], prefix(layers, n))
    assert store.n_tokens_on_disk(SID) == n


def test_other_fingerprint_or_dtype_on_save_rewrites_everything(three):
    store, ids, layers = three
    half = [(k.half(), v.half()) for k, v in layers]
    assert store.save(SID, ids, half, "model-b").written_tokens == 200
    assert_same(reload(store, "model-b"), ids, half)
    assert os.listdir(store.root / SID) == [chunk(store.root, 0).name]


def test_compaction_merges_many_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(kvstore, "MAX_CHUNKS", 3)
    store = KVStore(tmp_path)
    ids, layers = make(50)
    chunks = [store.save(SID, ids[:n], prefix(layers, n), FP).chunks for n in range(10, 51, 10)]
    assert chunks == [1, 2, 3, 1, 2]
    assert_same(reload(store), ids, layers)


def test_delete_size_and_token_count(three):
    store, ids, layers = three
    assert store.size_bytes(SID) == sum(p.stat().st_size for p in (store.root / SID).iterdir())
    assert store.n_tokens_on_disk(SID) == KVStore(store.root).n_tokens_on_disk(SID) == 200
    store.delete(SID)
    assert not (store.root / SID).exists()
    assert store.size_bytes(SID) == store.n_tokens_on_disk(SID) == 0
    assert store.load(SID, FP).ids == [] and store.load(SID, FP).notes == []
    store.delete(SID)  # deleting nothing is fine


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 65, "a b", ".", "..", "é"])
def test_session_id_is_validated(tmp_path, bad):
    store = KVStore(tmp_path / "kv")
    ids, layers = make(3)
    for call in (
        lambda: store.save(bad, ids, layers, FP),
        lambda: store.load(bad, FP),
        lambda: store.delete(bad),
        lambda: store.size_bytes(bad),
    ):
        with pytest.raises(SnapshotError):
            call()
    assert not (tmp_path / "x").exists()


def test_mismatched_input_is_a_programming_error(tmp_path):
    ids, layers = make(4)
    with pytest.raises(ValueError):
        KVStore(tmp_path).save(SID, ids + [1], layers, FP)


# -- invalid snapshots: each keeps the agreeing prefix with one note ---------------------------


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
def test_truncated_chunk(three, where):
    store, ids, layers = three
    path = chunk(store.root, 100)
    data = path.read_bytes()
    hl = header_len(path)
    cut = {
        "in-length": 5,
        "after-length": 8,
        "in-header": hl // 2,
        "end-of-header": hl,
        "in-data": hl + 1000,
        "last-byte": len(data) - 1,
    }[where]
    path.write_bytes(data[:cut])
    result = reload(store)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(
        result, "kept 100 of 200 tokens", "chunk at 100", "bytes long" if cut < 8 else "truncated"
    )
    assert path.stat().st_size == cut  # load never deletes


@pytest.mark.parametrize("size", range(8))
def test_tiny_file(three, size):
    store, _, _ = three
    chunk(store.root, 0).write_bytes(b"\x01" * size)
    result = reload(store)
    assert result.ids == [] and result.layers == []
    one_note(result, "dropped", f"only {size} bytes long")


def test_header_length_larger_than_file(three):
    store, ids, layers = three
    path = chunk(store.root, 150)
    data = path.read_bytes()
    path.write_bytes((len(data) + 1).to_bytes(8, "little") + data[8:])
    result = reload(store)
    assert_same(result, ids[:150], prefix(layers, 150))
    one_note(result, "kept 150 of 200", "chunk at 150 is truncated")


def test_trailing_garbage(three):
    store, ids, layers = three
    with chunk(store.root, 100).open("ab") as f:
        f.write(b"garbage")
    result = reload(store)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "trailing garbage")


@pytest.mark.parametrize("offset", [0, 1, -1])
def test_flipped_byte_in_tensor_data(three, offset):
    store, ids, layers = three
    path = chunk(store.root, 100)
    data = bytearray(path.read_bytes())
    pos = {0: header_len(path), 1: header_len(path) + 5000, -1: len(data) - 1}[offset]
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))
    result = reload(store)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "checksum")


def test_other_fingerprint(three):
    store, ids, layers = three
    result = reload(store, "model-b|tok-b|float32")
    assert result.ids == [] and result.layers == []
    assert one_note(result) == "snapshot: dropped: it was made by another model"
    # a later chunk from another model is cut off too
    rewrite_meta(chunk(store.root, 150), fingerprint="model-b")
    result = reload(store)
    assert_same(result, ids[:150], prefix(layers, 150))
    one_note(result, "kept 150 of 200", "chunk at 150 was made by another model")


def test_unknown_format_version(three):
    store, ids, layers = three
    rewrite_meta(chunk(store.root, 100), format_version="3")
    result = reload(store)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "unknown format version")


def test_metadata_missing(three):
    store, _, _ = three
    path = chunk(store.root, 0)
    save_file(st_load(path.read_bytes()), str(path))  # valid safetensors, no metadata
    result = reload(store)
    assert result.ids == []
    one_note(result, "dropped", "not a kvrepl snapshot")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"prefix_hash": None}, "incomplete metadata"),
        ({"n_tokens": "49"}, "token count"),
        ({"start": "0"}, "file name"),
        ({"dtype": "bfloat16"}, "dtypes"),
    ],
)
def test_metadata_that_disagrees(three, change, words):
    store, ids, layers = three
    rewrite_meta(chunk(store.root, 100), **change)
    result = reload(store)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", words)


def test_header_with_duplicate_keys_is_refused(three):
    """Two readers must never disagree on which bytes a tensor is: duplicates are refused."""
    store, ids, layers = three
    path = chunk(store.root, 100)
    data = path.read_bytes()
    hl = header_len(path)
    fake = b'{"ids":{"dtype":"I64","shape":[0],"data_offsets":[0,0]},' + data[9:hl]
    path.write_bytes(len(fake).to_bytes(8, "little") + fake + data[hl:])
    result = reload(store)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "not a safetensors file")


class _Bomb:
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("start", [0, 100])
def test_pickle_renamed_to_chunk_is_never_unpickled(three, tmp_path, start):
    store, ids, layers = three
    bomb = _Bomb()
    bomb.marker = str(tmp_path / "unpickled")
    chunk(store.root, start).write_bytes(pickle.dumps({"layers": bomb}))
    result = reload(store)
    assert result.ids == ids[:start]
    one_note(result, "not a safetensors file")
    assert not (tmp_path / "unpickled").exists()
    pickle.loads(chunk(store.root, start).read_bytes())  # the bomb is live: proves the check
    assert (tmp_path / "unpickled").exists()


def test_chunk_symlink_out_of_the_store_is_refused(three, tmp_path):
    store, ids, layers = three
    outside = tmp_path / "outside.safetensors"
    shutil.move(chunk(store.root, 100), outside)
    chunk(store.root, 100).symlink_to(outside)
    result = reload(store)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "chunk at 100", "symbolic link")


def test_session_folder_symlink_is_refused_then_replaced_by_a_real_folder(three, tmp_path):
    store, ids, layers = three
    shutil.move(store.root / SID, tmp_path / "elsewhere")
    (store.root / SID).symlink_to(tmp_path / "elsewhere")
    outside = sorted(p.name for p in (tmp_path / "elsewhere").iterdir())
    result = reload(store)
    assert result.ids == []
    one_note(result, "dropped", "symbolic link")
    assert store.size_bytes(SID) == 0
    store.save(SID, ids, layers, FP)  # never follows the link: replaces it with a real folder
    assert not (store.root / SID).is_symlink() and (store.root / SID).is_dir()
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == outside
    assert reload(store).ids == ids


def test_gap_in_chunks(three):
    store, ids, layers = three
    chunk(store.root, 100).unlink()
    result = reload(store)
    assert_same(result, ids[:100], prefix(layers, 100))
    one_note(result, "kept 100 of 200", "chunk at 100 is missing")
    chunk(store.root, 0).unlink()
    one_note(reload(store), "dropped", "first chunk is missing")


def test_stale_later_chunk_after_a_rewrite(three, tmp_path):
    store, ids, layers = three
    stale = tmp_path / "stale"
    shutil.copy(chunk(store.root, 150), stale)
    ids2, layers2 = extend(ids, layers, 120, 30)  # 150 tokens, differs from 120 on
    store.save(SID, ids2, layers2, FP)
    shutil.copy(stale, chunk(store.root, 150))  # as if killed before the delete
    result = reload(store)
    assert_same(result, ids2, layers2)
    one_note(result, "kept 150 of 200", "chunk at 150 does not follow")


def test_save_after_a_cut_load_rewrites_from_the_cut(three):
    store, ids, layers = three
    path = chunk(store.root, 100)
    path.write_bytes(path.read_bytes()[:-3])
    assert reload(store).ids == ids[:100]
    for s in (store, KVStore(store.root)):  # with and without the memory of that load
        s.load(SID, FP)
        assert s.save(SID, ids, layers, FP).written_tokens == 100
        path.write_bytes(path.read_bytes()[:-3])
    path.unlink()
    KVStore(store.root).save(SID, ids, layers, FP)
    assert_same(reload(store), ids, layers)


# -- failures while saving ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["replace", "fsync", "open"])
def test_disk_full_leaves_old_snapshot(three, monkeypatch, target):
    store, ids, layers = three
    before = {p.name: p.read_bytes() for p in (store.root / SID).iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, target, full)
    ids2, layers2 = extend(ids, layers, 120, 100)
    with pytest.raises(SnapshotError) as err:
        store.save(SID, ids2, layers2, FP)
    monkeypatch.undo()
    assert str(err.value) == "snapshot not saved: No space left on device; messages are safe"
    assert {p.name: p.read_bytes() for p in (store.root / SID).iterdir()} == before
    assert_same(reload(store), ids, layers)
    assert store.save(SID, ids2, layers2, FP).written_tokens == 120  # works again afterwards
    assert_same(reload(store), ids2, layers2)


CHILD = r'''
import random, sys
import torch

def kv(ids, n_layers=4, heads=3, dim=64):
    """K/V that are a pure function of (id, position): exact in float32."""
    base = torch.tensor(ids, dtype=torch.float32) * 4096 + torch.arange(len(ids))
    base = base.view(1, 1, -1, 1).expand(1, heads, len(ids), dim)
    return [((base * (i + 1)).contiguous(), (-base * (i + 1)).contiguous())
            for i in range(n_layers)]

def sequences(seed, steps=400):
    rng = random.Random(seed)
    ids = [rng.randrange(1000) for _ in range(300)]
    out = []
    for _ in range(steps):
        r = rng.random()
        if r < 0.25:
            ids = ids[:rng.randrange(len(ids) + 1)]
        if r < 0.85:
            ids = ids + [rng.randrange(1000) for _ in range(rng.randrange(50, 600))]
        else:
            ids = ids[:rng.randrange(len(ids) + 1)]
        if len(ids) > 3500:
            ids = ids[:400]
        out.append(ids)
    return out

if __name__ == "__main__":  # a zygote: imports once, forks one saver per round
    import os
    from pathlib import Path
    from kvrepl import kvstore
    torch.set_num_threads(1)
    kvstore.MAX_CHUNKS = 8
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


def test_kill_9_during_saves_always_leaves_a_valid_prefix(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    helpers: dict = {}
    exec(CHILD, helpers)  # noqa: S102 - our own helper code, shared with the child
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(1234)
    saved: list[list[int]] = [[]]
    lengths = []
    zygote = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "kv")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
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
            result = KVStore(tmp_path / "kv").load("killme", "fp")
            assert any(s[: len(result.ids)] == result.ids for s in saved)
            if result.ids:
                expected = helpers["kv"](result.ids)
                assert all(
                    torch.equal(a, b)
                    for pair in zip(result.layers, expected, strict=True)
                    for a, b in zip(*pair, strict=True)
                )
            lengths.append(len(result.ids))
        zygote.stdin.close()
        assert zygote.wait(timeout=10) == 0
    finally:
        zygote.kill()
    ids = saved[-1]  # after all those kills, a plain save still gives an exact snapshot
    KVStore(tmp_path / "kv").save("killme", ids, helpers["kv"](ids), "fp")
    result = KVStore(tmp_path / "kv").load("killme", "fp")
    assert result.ids == ids and result.notes == []
    assert max(lengths) > 0, "the child never got a save through"
