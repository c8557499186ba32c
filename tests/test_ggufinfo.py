"""The GGUF check run before the prompt (backends/ggufinfo.py), on the embedded model's real file
and on copies of it cut short: a whole file passes, a file cut anywhere (in the vocabulary, in
the tensor table, in the tensor data) is one GGUFError, and the tensors it lists are gguf-py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrepl.backends import ggufinfo
from kvrepl.engine import models

pytestmark = pytest.mark.model


def cut_copy(source: Path, target: Path, size: int) -> Path:
    """The first `size` bytes of `source` (the header's bytes copied, the rest left sparse)."""
    with source.open("rb") as f:
        head = f.read(min(size, 1 << 25))
    with target.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return target


def test_the_whole_file_passes_and_lists_gguf_pys_tensors():
    from gguf import GGUFReader

    path = models.embedded_gguf()
    ggufinfo.check(path)
    head = ggufinfo.read(memoryview(path.read_bytes()))
    reader = GGUFReader(path)
    assert head.arch == "llama"
    assert {t.name: (t.tensor_type.name, [int(d) for d in t.shape], int(t.data_offset))
            for t in reader.tensors} == head.tensors  # fmt: skip
    assert head.end == path.stat().st_size


@pytest.mark.parametrize("where", ["vocabulary", "tensor table", "tensor data", "last byte"])
def test_a_file_cut_short_is_one_line(tmp_path, where):
    path = models.embedded_gguf()
    size = path.stat().st_size
    table = min(off for _, _, off in ggufinfo.read(memoryview(path.read_bytes())).tensors.values())
    cut = {"vocabulary": 1 << 20, "tensor table": table - 2000, "tensor data": size // 2,
           "last byte": size - 1}[where]  # fmt: skip
    with pytest.raises(ggufinfo.GGUFError) as caught:
        ggufinfo.check(cut_copy(path, tmp_path / "cut.gguf", cut))
    said = str(caught.value)
    assert "\n" not in said and "truncated" in said
    assert "unpack" not in said and "buffer" not in said  # kvrepl's words, not struct's


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("just some notes, not a model\n" * 10)
    with pytest.raises(ggufinfo.GGUFError, match="not a GGUF file"):
        ggufinfo.check(fake)
