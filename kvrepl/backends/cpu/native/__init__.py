"""kvrepl's CPU kernels (kernels.c; kv8.c, the 8-bit K/V cache's; pool.c, their threads; repack.c,
the weights' layout made at load; kernels.h, what they share), compiled once for this machine and
called through ctypes. The K/V cache they read and write is float16 or, with kv_bits 8, rows of
head_dim int8 values followed by their float32 scale (`kv8_row`).

Owns: building the shared library (`cc -O3 -march=native`, into the cache directory, keyed by the
sources, the compiler and the CPU, written atomically; -march=native picks the instructions: the
AVX-512 loops where the CPU has them, else AVX2, else the portable fallback, all bit-identical),
loading it after torch (it takes torch's thread count from the OpenMP runtime torch loaded), and
thin typed wrappers that take torch tensors. Never imported on a machine that does not run the
CPU fast path; raises `NativeError` with a one-line reason when there is no compiler or the build
fails, and the caller falls back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCES = [Path(__file__).with_name(n)
           for n in ("kernels.c", "qmatmul.c", "kv8.c", "pool.c", "repack.c")]
HEADERS = [Path(__file__).with_name("kernels.h")]  # part of the build's key, not compiled alone
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-pthread",
         "-fPIC"]  # fmt: skip
FMT = {"u4": 1, "i8": 2, "f16": 3, "f32": 4, "i6": 5, "n4": 6, "i5": 7, "u5": 8}
# repack.c's G_*: GGUF types whose values it reads (Q4_0's and Q4_1's nibbles and Q8_0's bytes
# are the file's own: quant.py takes them as they are)
GGUF_VALUES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
_LANE_KINDS = ("i8", "u4", "i6", "i5")  # repack.c's TO_*
_LANE_BYTES = {"i8": 512, "u4": 256, "i6": 384, "i5": 320}  # a group of 16 rows, a block of 32
ACT = {"silu": 1, "gelu_pytorch_tanh": 2, "gelu_tanh": 2}


def flags_for(isa: str) -> list[str]:
    """FLAGS that build a lesser variant on this machine: "avx2" (no AVX-512, whatever the CPU
    has) or "scalar" (a baseline x86-64); the tests compare them with the default, bit for bit."""
    if isa == "avx2":
        return [*FLAGS, "-mno-avx512f"]
    if isa == "scalar":
        return [f for f in FLAGS if f != "-march=native"] + ["-march=x86-64"]
    raise ValueError(f"no variant {isa!r}")


i64 = ctypes.c_int64
ptr = ctypes.c_void_p


class NativeError(Exception):
    """The kernels cannot be built or loaded here; the message says why, in one line."""


class Weight(ctypes.Structure):
    _fields_ = [
        ("fmt", ctypes.c_int32),
        ("block", ctypes.c_int32),
        ("n", i64),
        ("k", i64),
        ("q", ptr),
        ("sc", ptr),
        ("has_min", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("sc16", ctypes.c_int32),
        ("dd", ptr),
        ("sc8", ctypes.c_int32),
    ]


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
    except OSError:
        flags = model = ""
    return f"{platform.machine()}|{model}|{flags}"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeError("no C compiler (cc) found to build the kernels")
    return cc


def library_path(cache: Path, flags: list[str] = FLAGS) -> tuple[Path, str]:
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeError(f"the C compiler {cc} does not run: {exc}") from exc
    key = hashlib.sha256()
    for part in (*[src.read_bytes() for src in SOURCES + HEADERS], version.stdout.encode(),
                 " ".join(flags).encode(), _cpu_identity().encode()):  # fmt: skip
        key.update(part)
    return cache / "kernels" / f"kvrepl-kernels-{key.hexdigest()[:16]}.so", cc


def build(cache: Path, flags: list[str] = FLAGS) -> Path:
    """The compiled library for this machine, built on first use (a second or two). `flags`
    other than the default build another variant (the tests build the scalar one)."""
    path, cc = library_path(cache, flags)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cc, *flags, "-shared", *map(str, SOURCES), "-o", tmp, "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise NativeError(f"building the kernels failed: {first[:200]}")
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeError(f"building the kernels failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


f32p = ctypes.POINTER(ctypes.c_float)


class Layer(ctypes.Structure):
    """Mirrors `Layer` in kernels.c: one decoder layer's weights and cache, by pointer."""

    _fields_ = [
        *[(n, ptr) for n in ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm",
                             "q_norm", "k_norm", "bias")],
        ("qkv", Weight * 3),
        ("qkv_col", i64 * 3),
        ("n_qkv", ctypes.c_int32),
        ("n_gu", ctypes.c_int32),
        ("gate_up", Weight * 2),
        ("gu_col", i64 * 2),
        ("o", Weight),
        ("down", Weight),
        ("kc", ptr),
        ("vc", ptr),
        ("cap", i64),
        ("window", i64),
        ("cos_t", ptr),
        ("sin_t", ptr),
    ]  # fmt: skip


class Model(ctypes.Structure):
    """Mirrors `Model` in kernels.c: sizes, weights, layers and buffers of one forward."""

    _fields_ = [
        *[(n, i64) for n in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "ffn",
                             "rope_dim")],
        ("act", ctypes.c_int32),
        ("kv8", ctypes.c_int32),  # the caches hold 8-bit rows (kv_bits 8)
        *[(n, ctypes.c_float) for n in ("eps", "attn_scale", "attn_softcap", "embed_scale")],
        ("embed", ctypes.POINTER(Weight)),
        ("lm_head", ctypes.POINTER(Weight)),
        ("final_norm", ptr),
        ("layers", ctypes.POINTER(Layer)),
        *[(n, ptr) for n in ("x", "h", "qkv", "att", "gu", "act_buf", "logits", "scratch")],
        ("scratch_floats", i64),
    ]  # fmt: skip


# q, M, ldq, H, kvh, D, kc, vc, cap, pos0, window, scale, softcap, out, ldo, scratch, floats
_ATTENTION_ARGS = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, ctypes.c_float,
                   ctypes.c_float, ptr, i64, ptr, i64]  # fmt: skip
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "kv_forward": (None, [ctypes.POINTER(Model), ptr, i64, i64, i64, i64, i64]),
    "kv_matmul": (None, [ptr, i64, i64, ctypes.POINTER(Weight), ptr, i64, ptr, ctypes.c_int]),
    "kv_rows": (None, [ctypes.POINTER(Weight), ptr, i64, ptr, i64, ctypes.c_float]),
    "kv_rmsnorm": (None, [ptr, i64, i64, i64, i64, ptr, ctypes.c_float, ptr, i64, ctypes.c_int]),
    "kv_rope": (None, [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64]),
    "kv_store": (None, [ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64]),
    "kv_store8": (None, [ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64]),
    "kv_act_mul": (None, [ptr, i64, i64, i64, ctypes.c_int, ptr, i64]),
    "kv_attention_scratch": (i64, [i64, i64, i64, i64]),
    "kv_attention": (None, _ATTENTION_ARGS),
    "kv_attention8": (None, _ATTENTION_ARGS),
    "kv_version": (ctypes.c_int, []),
    "kv_gguf_values": (None, [ptr, i64, ctypes.c_int, ptr]),
    "kv_lanes": (ctypes.c_int, [ptr, i64, i64, ctypes.c_int, ctypes.c_int, ptr, ctypes.c_int, ptr]),
    "kv_isa": (ctypes.c_char_p, []),
    "kv_threads": (ctypes.c_int, []),
    "kv_set_threads": (None, [ctypes.c_int, ctypes.c_int]),
    "kv_worker_items": (i64, []),
    "kv_parked_openmp": (ctypes.c_int, []),
}


class Kernels:
    """The loaded library. Methods take contiguous float32 (or float16 cache) tensors."""

    def __init__(self, path: Path) -> None:
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NativeError(f"the kernels do not load: {exc}") from exc
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = res, args
        self.isa = self.lib.kv_isa().decode()
        self.version = int(self.lib.kv_version())
        # Raw functions: the fast model calls these in its hot loop.
        self.matmul = self.lib.kv_matmul
        self.rows = self.lib.kv_rows
        self.rmsnorm = self.lib.kv_rmsnorm
        self.rope = self.lib.kv_rope
        self.store = self.lib.kv_store
        self.store8 = self.lib.kv_store8  # the 8-bit cache's: rows of head_dim int8 + a scale
        self.act_mul = self.lib.kv_act_mul
        self.attention = self.lib.kv_attention
        self.attention8 = self.lib.kv_attention8
        self.attention_scratch = self.lib.kv_attention_scratch
        self.forward = self.lib.kv_forward

    def threads(self) -> int:
        """Threads the next kernel may use: torch's count, less the cores other processes keep
        busy (when adapting)."""
        return int(self.lib.kv_threads())

    def set_threads(self, adapt: bool = True, fixed: int = 0) -> None:
        """adapt: use fewer threads while other processes keep cores busy (the default); fixed:
        exactly that many threads whatever torch says (0: torch's count)."""
        self.lib.kv_set_threads(int(adapt), fixed)

    def worker_items(self) -> int:
        """Work items the pool's threads (not the caller's) have run since the library loaded."""
        return int(self.lib.kv_worker_items())

    def parked_openmp(self) -> int:
        """Threads of the OpenMP team parked to stop torch's threads spinning (2 once a job has
        run while torch has several threads, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT was set;
        else 0)."""
        return int(self.lib.kv_parked_openmp())

    def lanes(self, src: torch.Tensor, n: int, k: int, to: str, off: int = 0,
              lut: torch.Tensor | None = None, nibbles: bool = False) -> torch.Tensor | None:
        """n rows of k values (`src`: bytes [n, k], or with `nibbles` a u4 weight's nibble pairs
        [n, k / 2]) in qmatmul.c's lanes layout `to` ("i8", "u4", "i6", "i5"; lanes.py keeps the
        reference), each byte plus `off` or through the 256-byte table `lut`, as bytes [rows padded
        to 16, the rest]; None where the table has no entry for some byte."""
        src = src.contiguous()
        size = (n + 15) // 16 * (k // 32) * _LANE_BYTES[to]
        out = torch.empty(size, dtype=torch.uint8)
        lp = lut.contiguous() if lut is not None else None
        bad = self.lib.kv_lanes(src.data_ptr(), n, k, int(nibbles), off,
                                lp.data_ptr() if lp is not None else None,
                                _LANE_KINDS.index(to), out.data_ptr())  # fmt: skip
        return None if bad else out.view((n + 15) // 16 * 16, -1)

    def gguf_values(self, blocks: Any, qtype: str, n: int, k: int) -> torch.Tensor:
        """The integer values of a tensor's GGUF blocks (numpy uint8 [blocks, bytes]), as
        quant.py's packers compute them: int8 [n, k], or for Q4_K u4's nibble pairs uint8
        [n, k / 2]."""
        blocks = np.ascontiguousarray(blocks)
        out = torch.empty(n, k // 2 if qtype == "Q4_K" else k,
                          dtype=torch.uint8 if qtype == "Q4_K" else torch.int8)  # fmt: skip
        self.lib.kv_gguf_values(blocks.ctypes.data, blocks.shape[0], GGUF_VALUES.index(qtype),
                                out.data_ptr())  # fmt: skip
        return out

    @property
    def label(self) -> str:
        return f"kvrepl-kernels v{self.version} ({self.isa})"


_loaded: dict[Path, Kernels] = {}


def kernels(cache: Path, flags: list[str] = FLAGS) -> Kernels:
    """Build if needed and load the kernels (once per process)."""
    path = build(cache, flags)
    if path not in _loaded:
        _loaded[path] = Kernels(path)
    return _loaded[path]


def kv8_row(head_dim: int) -> int:
    """Bytes of one position's row of one kv head in the 8-bit cache: the int8 values, then the
    float32 scale they are multiplied by (kernels.c, KV8_ROW)."""
    return head_dim + 4


def weight(fmt: str, q: torch.Tensor, sc: torch.Tensor | None, n: int, k: int, block: int = 32,
           group: int = 1, dd: torch.Tensor | None = None, mins: int | None = None):  # fmt: skip
    """A Weight descriptor over tensors the caller keeps alive. A u4 or i8 weight must be in the
    kernels' layout, groups of 16 rows (quant.Packed.interleaved); with `dd`, its scales and
    mins are int8 multiples of dd's floats. The layout keeps the mins only where one is not 0
    (sc [rows, parts, 2], else [rows, parts, 1]); `mins` (quant.Packed.mins), where given, must
    say the same, and 2 says that a u4 weight's mins are -8 times its scales."""
    if k % 32:
        raise ValueError(f"k={k} is not a multiple of 32")
    if fmt in ("u4", "i8", "i6", "n4", "i5", "u5") and group != 16:
        raise ValueError("a quantized weight goes to the kernels in groups of 16 rows")
    sc8 = bool(sc is not None and sc.dtype == torch.int8)
    if sc8 != (dd is not None) or (sc8 and k % 256):
        raise ValueError("int8 scales go with their superblocks' floats (dd)")
    # per group of 16 rows and part of a block: 16 scales, then 16 mins if kept (lanes.py)
    has_min = int(sc is not None and sc.shape[-1] == 2)
    if mins == 2 and not has_min:  # made from the scales, not kept
        if fmt != "u4" or sc8:
            raise ValueError("mins made from the scales (-8 times each) are for u4 weights only")
        has_min = 2
    if sc is not None and (sc.dim() != 3 or (mins is not None and int(mins) != has_min)):
        raise ValueError("scales in the kernels' layout: [rows, parts, 2 (scale, min) or 1]")
    if fmt == "u4" and sc is not None and not has_min and mins is None:  # Q4_0's made mins?
        raise ValueError("a u4 weight with no mins kept: say `mins` (Packed.mins: 0, or 2)")
    if fmt == "n4" and (has_min or block != 32):
        raise ValueError("IQ4's levels (n4) go with a scale a block of 32 and no mins")
    scp = sc.data_ptr() if sc is not None else None
    sc16 = bool(sc is not None and sc.dtype == torch.float16)
    ddp = dd.data_ptr() if dd is not None else None
    return Weight(FMT[fmt], block, n, k, q.data_ptr(), scp, has_min, group, sc16, ddp, sc8)
