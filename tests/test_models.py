"""Tests for kvrepl.engine.models: resolving a model spec (with errors that say what was tried),
dtype choice, the fingerprint, and reuse of the converted GGUF folder."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch
from makers import CHATML
from procs import PYTHON, kvrepl_env

from kvrepl.engine import devices, fingerprint, firststart, models
from kvrepl.errors import ModelError


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local hub cache of our own, offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# ---------------------------------------------------------------------------------------------
# resolve


@pytest.mark.parametrize("spec", [None, "", "default", "SmolLM2", " smollm2-135m-instruct "])
def test_resolve_the_default_spec_to_the_embedded_gguf(spec):
    source = models.resolve(spec)
    assert source.kind == "gguf"
    assert source.path == models.embedded_gguf()
    assert source.path.is_file() and source.path.name == models.EMBEDDED_FILE
    assert "embedded" in source.label


def test_resolve_a_missing_gguf_file_says_what_was_tried(tmp_path, hub_cache):
    missing = tmp_path / "nowhere" / "model.Q4.gguf"
    with pytest.raises(ModelError) as err:
        models.resolve(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and ".gguf file" in msg and "not found" in msg


def test_resolve_a_gguf_file_and_a_model_folder(tmp_path, hub_cache):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.resolve(str(gguf)) == models.ModelSource("gguf", gguf.resolve(), "m.gguf")
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert models.resolve(str(folder)) == models.ModelSource("folder", folder.resolve(), "my-model")


def test_resolve_a_folder_without_config_json_says_so(tmp_path, hub_cache):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError) as err:
        models.resolve(str(folder))
    msg = str(err.value)
    assert str(folder) in msg and "no config.json" in msg


def test_resolve_a_hub_id_that_is_not_downloaded_says_what_was_tried(
    hub_cache, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)  # so "org/name" is no local path either
    spec = "kvrepl-tests/no-such-model"
    with pytest.raises(ModelError) as err:
        models.resolve(spec)
    msg = str(err.value)
    assert repr(spec) in msg
    assert "a local path" in msg and "not found" in msg
    assert f"the hub id {spec}" in msg and "not downloaded" in msg


def test_resolve_a_hub_id_in_the_local_hub_cache(hub_cache, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--kvrepl-tests--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    source = models.resolve("kvrepl-tests/cached")
    assert (source.kind, source.label) == ("folder", "kvrepl-tests/cached")
    assert source.path.resolve() == snapshot.resolve()


def test_resolve_a_nonexistent_local_path(tmp_path, hub_cache):
    spec = str(tmp_path / "a" / "b" / "c")
    with pytest.raises(ModelError, match="a local path .* \\(not found\\)"):
        models.resolve(spec)


# ---------------------------------------------------------------------------------------------
# device, dtype


def test_pick_dtype():
    assert devices.pick_dtype("auto", "cpu") == torch.float32
    assert devices.pick_dtype("auto", "cuda:0") == torch.bfloat16
    assert devices.pick_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        devices.pick_dtype("fp8", "cpu")
    assert devices.pick_device("cpu") == "cpu"
    assert devices.pick_device("cuda:1") == "cuda:1"


def test_pick_device_auto_takes_cuda_only_where_there_is_one(monkeypatch):
    for available, want in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert devices.pick_device("auto") == want
        assert devices.pick_device(None) == want


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KVREPL_CACHE", str(tmp_path / "kv"))
    assert models.cache_dir() == tmp_path / "kv"
    monkeypatch.delenv("KVREPL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "kvrepl"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"1")
    first = firststart.converted_folder(gguf)
    assert first.parent == tmp_path / "xdg" / "kvrepl" / "models"
    assert first.name.startswith("x-")
    gguf.write_bytes(b"12")  # another size: another folder
    assert firststart.converted_folder(gguf) != first


def test_a_first_start_reads_the_gguf_metadata_once_and_each_reader_gets_its_own_copy(
        monkeypatch):  # fmt: skip
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    reads = []

    def read(path, return_tensors=False, **kwargs):
        reads.append((path, return_tensors, kwargs))
        return {"config": {"vocab_size": 7}, "tokenizer": {"tokens": ["a", "b"]}}

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", read)
    with firststart.metadata_read_once():
        first = gguf_utils.load_gguf_checkpoint("m.gguf", return_tensors=False)
        first["config"].pop("vocab_size")  # (transformers' callers change what they get)
        first["tokenizer"]["tokens"].append("c")
        again = gguf_utils.load_gguf_checkpoint("m.gguf")
        gguf_utils.load_gguf_checkpoint("m.gguf", return_tensors=True)  # weights: not kept
        gguf_utils.load_gguf_checkpoint("other.gguf")
    assert again == {"config": {"vocab_size": 7}, "tokenizer": {"tokens": ["a", "b"]}}
    assert reads == [("m.gguf", False, {}), ("m.gguf", True, {}), ("other.gguf", False, {})]
    assert gguf_utils.load_gguf_checkpoint is read  # put back


@pytest.mark.model
def test_a_first_start_parses_the_real_gguf_once(monkeypatch, tmp_path):
    """The embedded model's first start: gguf-py parses the file once for the config and the
    tokenizer both (twice without `metadata_read_once`), and afterwards transformers' reader is
    its own again wherever it is held."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    read = gguf_utils.load_gguf_checkpoint
    parses = []

    class Counted(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    monkeypatch.setenv("KVREPL_CACHE", str(tmp_path))
    folder = firststart.prepare_meta(models.embedded_gguf())
    assert len(parses) == 1, parses
    assert (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file()
    import sys

    held = [m for m in list(sys.modules.values())
            if "load_gguf_checkpoint" in getattr(m, "__dict__", {})]  # fmt: skip
    assert held and all(m.__dict__["load_gguf_checkpoint"] is read for m in held)


# ---------------------------------------------------------------------------------------------
# fingerprint (the real model's config and tokenizer)


@pytest.mark.model
def test_fingerprint_is_stable_and_changes_with_dtype_and_chat_template(real32, monkeypatch):
    real = real32
    cfg, tok, label = real.model.config, real.tokenizer, real.source.label
    weights = fingerprint.weights_digest(real.model)

    def fp(identity: str = label, dtype: str = real.dtype, w: str = weights) -> str:
        return fingerprint.fingerprint(identity, cfg, dtype, tok, w)

    base = fp()
    # Stable: the same model loaded again, from its files, by another process, gets it.
    code = ("from kvrepl.engine import models; "
            "print(models.load(dtype='float32', progress=False).fingerprint)")  # fmt: skip
    again = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, check=True,
                           env=kvrepl_env(PYTHONHASHSEED="12345"))  # fmt: skip
    assert again.stdout.strip().splitlines()[-1] == real.fingerprint == base
    assert fp(w="") != base  # the weights count too
    assert fp(dtype="bfloat16") != base
    assert fp("another model") != base
    with monkeypatch.context() as mp:
        mp.setattr(tok, "chat_template", CHATML)
        assert fp() != base
    # what does not change the K/V does not change the fingerprint
    monkeypatch.setattr(cfg, "_name_or_path", "/somewhere/else")
    assert fp() == base



@pytest.mark.model
def test_a_vocabulary_that_grew_changes_the_fingerprint_though_it_is_made_once(real32):
    """The vocabulary's part is made once per tokenizer (a load fingerprints twice), yet a
    token added since is counted, and another tokenizer object is never taken for this one."""
    import copy

    cfg, tok = real32.model.config, copy.deepcopy(real32.tokenizer)
    base = fingerprint.fingerprint("m", cfg, "float32", tok)
    assert fingerprint.fingerprint("m", cfg, "float32", tok) == base
    tok.add_tokens(["<a-token-no-one-has>"])
    grown = fingerprint.fingerprint("m", cfg, "float32", tok)
    assert grown != base
    assert fingerprint.fingerprint("m", cfg, "float32", real32.tokenizer) == base


@pytest.mark.model
def test_load_reuses_the_converted_folder_and_fingerprints_dtype_and_template(real32, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    real = real32
    assert real.source.kind == "gguf"
    folder = firststart.converted_folder(real.source.path)
    assert (folder / "config.json").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in [folder, *folder.iterdir()]}

    gguf_calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            if "gguf_file" in kwargs:
                gguf_calls.append(args)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    again = lambda *a, **k: pytest.fail("load() converted the GGUF again")  # noqa: E731
    monkeypatch.setattr(firststart.tempfile, "mkdtemp", again)

    half = models.load(dtype="bfloat16", progress=False)
    assert gguf_calls == []
    assert half.dtype == "bfloat16"
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.fingerprint != real.fingerprint
    assert half.context_length == real.context_length

    templated = models.load(dtype="float32", chat_template=CHATML, progress=False)
    assert gguf_calls == []
    assert templated.tokenizer.chat_template == CHATML
    assert templated.dtype == real.dtype
    assert templated.fingerprint != real.fingerprint
    assert real.tokenizer.chat_template != CHATML  # the shared fixture is untouched

    after = {p.name: p.stat().st_mtime_ns for p in [folder, *folder.iterdir()]}
    assert after == before
    assert {f.name for f in dataclasses.fields(models.LoadedModel)} >= {
        "model",
        "tokenizer",
        "fingerprint",
        "context_length",
        "dtype",
        "device",
        "source",
    }
