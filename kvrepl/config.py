"""Settings, each declared once, as a field of `Settings`: its type, default and help, its flag,
whether `/set` may change it per session, and its bounds or choices. Everything else is read off
that declaration: the flags (args.py builds them from `OPTIONS`), the `KVREPL_<NAME>` variables,
the config file's keys, the `/set` keys (`SESSION_KEYS`) and the engine's `Sampling` defaults.
A value from any of them is parsed and checked by the same code, and a bad one is a UsageError
that names where it came from.

Defaults are overridden by the config file, then the environment, then flags; settings set per
session (`/set`) are stored with the session and laid over these when it is open
(`Settings.with_overrides`). Also here: the functions that decide where data lives (the store,
the config file), per user as platformdirs places them on each OS. Reads files; writes nothing.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

import platformdirs

from kvrepl.errors import UsageError

APP = "kvrepl"
CONFIG_NAME = "config.toml"


def setting(
    default: Any,
    help: str,
    *,
    flag: bool | str = True,
    session: bool = False,
    bounds: tuple[float, float] | None = None,
    choices: tuple[Any, ...] | None = None,
    metavar: str | None = None,
    flag_help: str | None = None,
    fixed: str | None = None,
) -> Any:
    """A `Settings` field with what every surface needs. `flag`: True for `--the-name`, another
    spelling, or False for none; a true/false setting's flag turns it on (off where it is on by
    default). `session`: `/set` may change it for one session; `fixed`: the line `/set` answers
    for a setting that only a restart changes."""
    spec = {"help": help, "flag": flag, "session": session, "bounds": bounds,
            "flag_help": flag_help, "fixed": fixed,
            "choices": choices, "metavar": metavar}  # fmt: skip
    return field(default=default, metadata={"setting": spec})


@dataclass(frozen=True)
class Settings:
    """Every setting, declared once: type, default and the rest in `setting(...)`."""

    model: str = setting("", "embedded default, a model folder, a .gguf file or a cached hub id")
    dtype: str = setting(
        "auto",
        "auto: a .gguf runs its own quantized weights on the CPU (gguf); float32: dequantized",
        choices=("auto", "gguf", "float32", "bfloat16", "float16"),
    )
    device: str = setting("auto", "cpu, cuda, cuda:1 … (default: cuda when available)")
    # Ollama's num_ctx, llama.cpp's -c: what the cache may hold. The model's maximum (often
    # 131,072 tokens) would reserve 16 GiB of K/V for an 8B model on a GPU.
    # A .gguf on CUDA: bf16 (default) dequantizes it at load; gguf keeps its Q8_0/Q4_0/Q4_1/Q4_K
    # matrices in their blocks (about half/a quarter of the memory; slower so far, README).
    gpu_weights: str = setting(
        "bf16", "a .gguf on the GPU: bf16 dequantizes its weights at load; gguf keeps its "
        "Q8_0/Q4_0/Q4_1/Q4_K matrices in their blocks (less memory; decode slower so far)",
        choices=("bf16", "gguf"),
    )  # fmt: skip
    context: int = setting(
        8192, "tokens the cache may hold (prompt and answers); 0: the model's maximum",
        bounds=(0, 10_000_000), metavar="TOKENS",
    )  # fmt: skip
    chat_template: str | None = setting(None, "a Jinja chat template file", metavar="FILE")
    # SmolLM2's model card samples at a low temperature with top-p; greedy is --temperature 0.
    # A 135M model loops without a repetition penalty; 1.1 over the last 64 ids, as llama.cpp.
    temperature: float = setting(0.2, "0 is greedy", session=True, bounds=(0.0, 5.0))
    top_p: float = setting(
        0.9, "sample from the likeliest tokens that reach this probability together",
        session=True, bounds=(0.0, 1.0),
    )  # fmt: skip
    top_k: int = setting(
        0, "sample from the k likeliest tokens; 0: no limit", session=True, bounds=(0, 1_000_000)
    )
    repetition_penalty: float = setting(
        1.1, "penalise the last 64 tokens' ids by this factor; 1: none",
        session=True, bounds=(0.5, 5.0),
    )  # fmt: skip
    max_tokens: int = setting(
        1024, "the most tokens in one answer", session=True, bounds=(1, 1_000_000)
    )
    seed: int | None = setting(None, "a fixed sampling seed; none: a new one", session=True)
    system: str = setting("", "system prompt", session=True)
    reuse: bool = setting(
        True, "reuse the cached prefix", flag="--no-reuse",
        flag_help="recompute the whole conversation every turn, reusing nothing: the baseline "
        "that reuse must equal token for token",
    )  # fmt: skip
    draft: bool = setting(
        True, "verify tokens guessed from the conversation several in a step (the same answer, "
        "sooner)", flag="--no-draft", session=True,
        flag_help="decode one token a step, verifying no drafted tokens (the same answer)",
    )  # fmt: skip
    show_think: bool = setting(
        False, "show the model's thinking; also switches its thinking mode on where the "
        "template has one, as /think on does", flag="--think",
    )  # fmt: skip
    # No flag: /think turns it on and off in the REPL; the config file and KVREPL_THINKING too.
    thinking: bool | None = setting(
        None, "enable_thinking, for templates that take it; none: the template's default",
        flag=False,
    )  # fmt: skip
    # The thinking budget Qwen3's documentation describes: past it, the closing tag is forced.
    think_budget: int | None = setting(
        None, "the most tokens an answer may think; then its thinking is closed (the "
        "template's tag forced) and the answer goes on; 0 or none: no limit",
        session=True, bounds=(0, 1_000_000), metavar="TOKENS",
    )  # fmt: skip
    drop_oldest: bool = setting(
        False, "when over the context, leave out the oldest turns (and say so)", session=True
    )
    plain: bool = setting(False, "no colours, no Markdown")
    # llama.cpp's -ctk/-ctv q8_0, mlx-lm's --kv-bits: about half the K/V, in memory and on disk.
    kv_bits: int = setting(
        16, "bits per K/V value: 16 (float16) or 8 (int8 and a float scale per position and kv "
        "head: about half the memory and snapshot bytes; kvrepl's CPU kernels only)",
        choices=(16, 8), metavar="BITS",
        fixed="kv_bits is chosen when kvrepl starts (--kv-bits, KVREPL_KV_BITS or the config "
        "file): a cache never mixes 8-bit and 16-bit K/V",
    )  # fmt: skip
    # The store's, not a session's: a `/set` in one session must not drop every other's K/V.
    kv_budget_mb: int = setting(
        4096, "MB of K/V the store keeps on disk, all sessions together (not per session); "
        "older branches go first, other sessions' newest snapshots last",
        session=False, bounds=(0, 100_000_000), metavar="MB",
    )  # fmt: skip

    def with_overrides(self, overrides: dict[str, Any]) -> Settings:
        """These settings with session-level values laid over them (unknown keys ignored)."""
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if k in known})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Option:
    """One setting as the flags, the environment, the config file and `/set` see it."""

    name: str
    type: type  # bool, int, float or str
    optional: bool  # None is a value: not set
    default: Any
    help: str
    flag: str | None
    session: bool
    bounds: tuple[float, float] | None
    choices: tuple[Any, ...] | None
    metavar: str | None
    flag_help: str | None  # a true/false setting's flag, where it says the opposite of `help`
    fixed: str | None  # why `/set` cannot change it (a restart does), where that needs saying

    @property
    def env(self) -> str:
        return f"KVREPL_{self.name.upper()}"


def flag_name(name: str) -> str:
    """The flag a setting gets unless it declares another: `top_p` is `--top-p`."""
    return "--" + name.replace("_", "-")


def _declared() -> dict[str, Option]:
    hints = get_type_hints(Settings)
    options: dict[str, Option] = {}
    for f in fields(Settings):
        hint = hints[f.name]  # `int` or `int | None`
        kind = next(t for t in get_args(hint) or (hint,) if t is not type(None))
        spec = dict(f.metadata["setting"])
        flag = spec.pop("flag")
        if flag is True:
            flag = flag_name(f.name)
        optional = type(None) in get_args(hint)
        options[f.name] = Option(f.name, kind, optional, f.default, flag=flag or None, **spec)
    return options


OPTIONS: dict[str, Option] = _declared()
# What `/set` may change for one session, by key.
SESSION_KEYS: dict[str, Option] = {k: o for k, o in OPTIONS.items() if o.session}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_UNSET = ("", "none", "random")  # random: what a seed that is not set means
_TAKES = {bool: "on or off", int: "a whole number", float: "a number", str: "text"}


def _parse_bool(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(raw)


_FROM_TEXT = {bool: _parse_bool, int: int, float: float, str: str}


def option_value(opt: Option, raw: Any) -> Any:
    """`raw` (text from a flag, a variable or `/set`, or a config file's value) as `opt`'s value,
    checked; ValueError with the reason (to follow the setting's name) otherwise."""
    value = _convert(opt, raw)
    if value is _NOT_A_VALUE:
        takes = _TAKES[opt.type] + (" or none" if opt.optional else "")
        raise ValueError(f"does not take {raw!r} ({takes})")
    if value is None:
        return value
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"must be one of {', '.join(map(str, opt.choices))}, not {value!r}")
    if opt.bounds is not None and not opt.bounds[0] <= value <= opt.bounds[1]:
        raise ValueError(f"must be between {opt.bounds[0]} and {opt.bounds[1]}, not {value}")
    return value


_NOT_A_VALUE = object()


def _convert(opt: Option, raw: Any) -> Any:
    """`raw` as a value of `opt`'s type (not checked further), or `_NOT_A_VALUE`."""
    if isinstance(raw, str):
        text = raw.strip()
        if opt.optional and text.lower() in _UNSET:
            return None
        try:
            return _FROM_TEXT[opt.type](text)
        except ValueError:
            return _NOT_A_VALUE
    if opt.type is float and type(raw) in (int, float):
        return float(raw)
    return raw if type(raw) is opt.type else _NOT_A_VALUE


def checked(key: str, raw: Any, where: str) -> Any:
    """The value of setting `key` from `raw`, checked; UsageError beginning with `where`."""
    try:
        return option_value(OPTIONS[key], raw)
    except ValueError as exc:
        raise UsageError(f"{where} {exc}") from None


def parse_setting(key: str, raw: str) -> Any:
    """A `/set key value` value, checked; UsageError with the reason otherwise."""
    refuse_unless_session(key)
    return checked(key, raw, key)


def refuse_unless_session(key: str) -> None:
    """UsageError, in one line, unless `/set` may change setting `key` for a session."""
    if key in OPTIONS and OPTIONS[key].fixed:
        raise UsageError(OPTIONS[key].fixed)
    if key not in SESSION_KEYS:
        raise UsageError(f"unknown setting {key!r}: one of {', '.join(SESSION_KEYS)}")


def setting_help(key: str) -> str:
    """One line on a setting: its help, default and bounds or choices."""
    opt = OPTIONS[key]
    default = ("on" if opt.default else "off") if opt.type is bool else repr(opt.default)
    notes = [f"default {default}"]
    if opt.bounds is not None:
        notes.append(f"{opt.bounds[0]} to {opt.bounds[1]}")
    if opt.choices is not None:
        notes.append(" or ".join(map(str, opt.choices)))
    return f"{opt.help} ({'; '.join(notes)})"


def store_path(flag: str | None = None) -> Path:
    """Where sessions live: --store, else KVREPL_HOME, else the user's data folder (e.g.
    ~/.local/share/kvrepl), the same whatever folder kvrepl starts in."""
    chosen = flag or os.environ.get("KVREPL_HOME") or platformdirs.user_data_dir(APP, False)
    return Path(chosen).expanduser().absolute()


def config_path() -> Path:
    """The config file: KVREPL_CONFIG, else config.toml in the user's config folder (e.g.
    ~/.config/kvrepl/config.toml). It need not exist."""
    env = os.environ.get("KVREPL_CONFIG")
    path = Path(env) if env else Path(platformdirs.user_config_dir(APP, False)) / CONFIG_NAME
    return path.expanduser().absolute()


def load_settings(flags: dict[str, Any] | None = None) -> Settings:
    """Defaults ← the config file (`config_path()`) ← KVREPL_* env ← flags (non-None)."""
    given = {
        key: checked(key, value, OPTIONS[key].flag or key)
        for key, value in (flags or {}).items()
        if value is not None
    }
    return Settings().with_overrides({**from_config_file(), **from_environment(), **given})


def from_config_file() -> dict[str, Any]:
    """The settings the config file gives (none when it does not exist)."""
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    for key in data:
        if key not in OPTIONS:
            raise UsageError(f"unknown setting {key!r} in {path}")
    return {key: checked(key, value, f"{key} in {path}") for key, value in data.items()}


def from_environment() -> dict[str, Any]:
    """The settings KVREPL_<NAME> variables give."""
    return {
        key: checked(key, os.environ[opt.env], opt.env)
        for key, opt in OPTIONS.items()
        if opt.env in os.environ
    }
