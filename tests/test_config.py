"""Tests for the settings' one declaration (kvrepl.config): every setting is a `Settings` field, a
flag (unless it declares none), a KVREPL_* variable, a config file key and, when per session, a
`/set` key; every one of them parses and checks values the same way; the engine's `Sampling`
defaults are the settings'."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from kvrepl.app import cli
from kvrepl.app.args import chat_parser, flag_settings, parse
from kvrepl.config import (
    OPTIONS,
    SESSION_KEYS,
    Option,
    Settings,
    load_settings,
    parse_setting,
    setting_help,
)
from kvrepl.engine.engine import Sampling
from kvrepl.errors import UsageError


def sample(opt: Option) -> tuple[str, object]:
    """A value for `opt` other than its default: as text, and as the setting holds it."""
    if opt.type is bool:
        return ("off", False) if opt.default else ("on", True)
    if opt.choices:
        return str(opt.choices[-1]), opt.choices[-1]
    if opt.type is int:
        return "7", 7
    if opt.type is float:
        return "0.75", 0.75
    return "some text", "some text"


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"  # conftest points KVREPL_CONFIG here
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# one declaration, every surface


def test_every_setting_is_a_field_with_a_declared_option():
    assert list(OPTIONS) == [f.name for f in dataclasses.fields(Settings)]
    defaults = Settings()
    for name, opt in OPTIONS.items():
        assert getattr(defaults, name) == opt.default and opt.help
        assert opt.env == f"KVREPL_{name.upper()}"
    assert list(SESSION_KEYS) == [name for name, opt in OPTIONS.items() if opt.session]
    assert {"temperature", "seed", "system", "drop_oldest"} <= set(SESSION_KEYS)
    assert "model" not in SESSION_KEYS


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_setting_is_a_flag_a_variable_a_config_key_and_a_set_key(name, monkeypatch, tmp_path):
    opt = OPTIONS[name]
    text, value = sample(opt)
    if opt.flag is None:
        assert name == "thinking"  # /think sets it in the REPL
    else:
        argv = [opt.flag] if opt.type is bool else [opt.flag, text]
        assert flag_settings(parse(argv))[name] == value
        assert load_settings(flag_settings(parse(argv))).as_dict()[name] == value
    monkeypatch.setenv(opt.env, text)
    assert getattr(load_settings(), name) == value
    monkeypatch.delenv(opt.env)
    config_file(tmp_path, f"{name} = {text!r}\n")
    assert getattr(load_settings(), name) == value
    if opt.session:
        assert parse_setting(name, text) == value
    else:  # a restart changes it: /set says so, or that it knows no such setting
        with pytest.raises(UsageError, match=re.escape(opt.fixed or "unknown setting")):
            parse_setting(name, text)


def test_flags_keep_their_spellings_and_are_none_when_not_given():
    given = flag_settings(parse([]))
    assert set(given) == set(OPTIONS) - {"thinking"} and set(given.values()) == {None}
    args = parse(["--no-reuse", "--think", "--drop-oldest", "--plain", "--top-p", "0.5",
                  "--repetition-penalty", "1.3", "--chat-template", "t.jinja",
                  "--seed", "none"])  # fmt: skip
    got = {k: v for k, v in flag_settings(args).items() if v is not None}
    assert got == {"reuse": False, "show_think": True, "drop_oldest": True, "plain": True,
                   "top_p": 0.5, "repetition_penalty": 1.3, "chat_template": "t.jinja"}  # fmt: skip


def test_help_shows_every_flag_with_its_help():
    text = " ".join(chat_parser().format_help().split())
    for opt in OPTIONS.values():
        if opt.flag is not None:
            said = " ".join((opt.flag_help or opt.help).split())
            assert opt.flag in text and said in text, opt.name
    assert "0 is greedy (default 0.2)" in text
    assert "{auto,gguf,float32,bfloat16,float16}" in text


def test_setting_help_says_the_default_and_the_bounds():
    assert setting_help("temperature") == "0 is greedy (default 0.2; 0.0 to 5.0)"
    assert "auto or gguf" in setting_help("dtype")


# ---------------------------------------------------------------------------------------------
# values: parsed and checked alike wherever they come from


def test_a_bad_true_false_variable_is_one_clear_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("KVREPL_REUSE", "nope")
    with pytest.raises(UsageError) as err:
        load_settings()
    assert str(err.value) == "KVREPL_REUSE does not take 'nope' (on or off)"
    assert cli.main(["path"]) == 2
    assert capsys.readouterr() == ("", "kvrepl: KVREPL_REUSE does not take 'nope' (on or off)\n")
    for good, want in (("off", False), ("0", False), ("Yes", True), ("TRUE", True)):
        monkeypatch.setenv("KVREPL_REUSE", good)
        assert load_settings().reuse is want


BAD = [  # (setting, out of bounds or not a choice, as text and as the config file writes it)
    ("temperature", "9", "9.0"),
    ("temperature", "nan", "nan"),
    ("top_p", "1.5", "1.5"),
    ("max_tokens", "0", "0"),
    ("repetition_penalty", "0.1", "0.1"),
    ("kv_budget_mb", "-1", "-1"),
    ("dtype", "int4", "'int4'"),
]


@pytest.mark.parametrize(("name", "text", "toml"), BAD)
def test_bounds_apply_to_flags_variables_the_config_file_and_set(
    name, text, toml, monkeypatch, tmp_path, capsys
):
    opt = OPTIONS[name]
    reason = "must be one of" if opt.choices else "must be between"
    with pytest.raises(SystemExit) as exit_:
        parse([opt.flag, text])
    assert exit_.value.code == 2
    assert f"argument {opt.flag}: {reason}" in capsys.readouterr().err
    with pytest.raises(UsageError, match=f"^{opt.flag} {reason}"):
        load_settings({name: float(text) if opt.type is float else text})
    monkeypatch.setenv(opt.env, text)
    with pytest.raises(UsageError, match=f"^{opt.env} {reason}"):
        load_settings()
    monkeypatch.delenv(opt.env)
    path = config_file(tmp_path, f"{name} = {toml}\n")
    with pytest.raises(UsageError, match=f"^{name} in {path} {reason}"):
        load_settings()
    if opt.session:
        with pytest.raises(UsageError, match=f"^{name} {reason}"):
            parse_setting(name, text)


def test_the_config_file_takes_its_own_types_and_text_as_set_does(tmp_path):
    config_file(tmp_path, 'temperature = 1\nreuse = false\nseed = "none"\ntop_k = "5"\n')
    s = load_settings()
    assert (s.temperature, s.reuse, s.seed, s.top_k) == (1.0, False, None, 5)
    assert isinstance(s.temperature, float)
    for line, says in (("top_k = 1.5", "top_k in"), ("reuse = 1", "reuse in"),
                       ('reuse = "nope"', "does not take 'nope'"), ("colour = 1", "unknown"),
                       ("temperature = [", "not valid TOML")):  # fmt: skip
        config_file(tmp_path, line + "\n")
        with pytest.raises(UsageError, match=says):
            load_settings()


def test_set_takes_none_for_a_seed_and_refuses_what_a_setting_does_not_take():
    assert parse_setting("seed", "none") is None and parse_setting("seed", "random") is None
    assert parse_setting("seed", " 5 ") == 5
    assert parse_setting("system", "none") == "none"  # text is text
    with pytest.raises(UsageError, match="^temperature does not take 'hot' \\(a number\\)$"):
        parse_setting("temperature", "hot")
    with pytest.raises(UsageError, match="^top_k does not take '1.5' \\(a whole number\\)$"):
        parse_setting("top_k", "1.5")
    with pytest.raises(UsageError, match="^unknown setting 'model': one of temperature"):
        parse_setting("model", "x")


# ---------------------------------------------------------------------------------------------
# the engine's sampling


def test_sampling_defaults_are_the_settings():
    s, d = Sampling(), Settings()
    for f in dataclasses.fields(Sampling):
        if f.name != "repeat_last_n":  # the engine's own
            assert getattr(s, f.name) == getattr(d, f.name), f.name
    assert s.repetition_penalty == 1.1
    custom = Settings(temperature=0.0, top_k=3, repetition_penalty=2.0, seed=4, max_tokens=9)
    assert Sampling.from_settings(custom) == Sampling(0.0, 0.9, 3, 2.0, 4, 9)
