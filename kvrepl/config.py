"""Settings: defaults, overridden by the config file, then the environment, then flags; and the
functions that decide where data lives (the store, the config file), per user as platformdirs
places them on each OS. Reads files; writes nothing.

Sampling fields can also be set per session (`/set`); those are stored with the session and laid
over these settings when it is open (`Settings.with_overrides`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

from kvrepl.errors import UsageError

APP = "kvrepl"
CONFIG_NAME = "config.toml"


@dataclass(frozen=True)
class Settings:
    model: str = ""
    dtype: str = "auto"
    device: str = "auto"
    chat_template: str | None = None  # a file holding a Jinja chat template
    # SmolLM2's model card samples at a low temperature with top-p; greedy is --temperature 0.
    # A 135M model loops without a repetition penalty; 1.1 over the last 64 ids, as llama.cpp.
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.1
    max_tokens: int = 1024
    seed: int | None = None
    system: str = ""
    reuse: bool = True
    show_think: bool = False
    thinking: bool | None = (
        None  # enable_thinking for templates that take it; None: template's default
    )
    drop_oldest: bool = False  # opt-in: drop the oldest turns (and say so) when over the context
    plain: bool = False
    kv_budget_mb: int = 4096  # K/V kept on disk for all sessions; least recently used goes first

    def with_overrides(self, overrides: dict[str, Any]) -> Settings:
        """These settings with session-level values laid over them (unknown keys ignored)."""
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if k in known})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# What `/set` may change for one session, with the parser for each value.
SESSION_KEYS: dict[str, Any] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_tokens": int,
    "repetition_penalty": float,
    "seed": lambda s: None if s.lower() in ("none", "random", "") else int(s),
    "system": str,
    "drop_oldest": lambda s: _parse_bool(s),
    "kv_budget_mb": int,
}


def _parse_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def parse_setting(key: str, raw: str) -> Any:
    """A `/set key value` value, checked; UsageError with the reason otherwise."""
    if key not in SESSION_KEYS:
        raise UsageError(f"unknown setting {key!r}: one of {', '.join(SESSION_KEYS)}")
    try:
        value = SESSION_KEYS[key](raw.strip())
    except ValueError:
        raise UsageError(f"{key} does not take {raw!r}") from None
    check_sampling(key, value)
    return value


def check_sampling(key: str, value: Any) -> None:
    bounds = {
        "temperature": (0.0, 5.0),
        "top_p": (0.0, 1.0),
        "top_k": (0, 1_000_000),
        "max_tokens": (1, 1_000_000),
        "repetition_penalty": (0.5, 5.0),
        "kv_budget_mb": (0, 100_000_000),
    }
    if key in bounds and value is not None:
        lo, hi = bounds[key]
        if not lo <= value <= hi:
            raise UsageError(f"{key} must be between {lo} and {hi}, not {value}")


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
    settings = Settings()
    cfg_path = config_path()
    if cfg_path.is_file():
        try:
            data = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"config file {cfg_path} is not valid TOML: {exc}") from None
        settings = _merge(settings, data, str(cfg_path))
    env = {
        f.name: os.environ[f"KVREPL_{f.name.upper()}"]
        for f in fields(Settings)
        if f"KVREPL_{f.name.upper()}" in os.environ
    }
    settings = _merge(settings, env, "environment")
    for key, value in (flags or {}).items():
        if value is not None:
            check_sampling(key, value)
    return settings.with_overrides({k: v for k, v in (flags or {}).items() if v is not None})


def _merge(settings: Settings, data: dict[str, Any], origin: str) -> Settings:
    types = {f.name: f.type for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types:
            raise UsageError(f"unknown setting {key!r} in {origin}")
        out[key] = _coerce(key, value, str(types[key]), origin)
        check_sampling(key, out[key])
    return settings.with_overrides(out)


def _coerce(key: str, value: Any, type_name: str, origin: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if type_name.startswith("bool"):
            if value.lower() in ("", "none") and "None" in type_name:
                return None
            return value.lower() in ("1", "true", "yes", "on")
        if type_name.startswith("float"):
            return float(value)
        if type_name.startswith("int"):
            return None if value.lower() in ("", "none") else int(value)
    except ValueError:
        raise UsageError(f"{key} in {origin} takes a number, not {value!r}") from None
    return value
