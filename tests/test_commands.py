"""Every slash command through `Repl.handle`, in line mode, over the tiny model: what each prints,
what it changes in the store and the cache, and that errors are one line that names the usage
without calling the model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import fault_harness, make_fault_model, make_loaded
from helpers import Harness, children, lines_of, make_harness, stats_lines, tiny_loaded

from kvrepl.app.commands import build_registry
from kvrepl.app.listing import format_size
from kvrepl.app.registry import Command
from kvrepl.app.repl import line_loop
from kvrepl.chat.conversation import Conversation
from kvrepl.chat.handle import ModelHandle
from kvrepl.config import SESSION_KEYS, Settings
from kvrepl.errors import KvreplError
from kvrepl.store.db import STAT_NAMES, Store
from kvrepl.store.kvstore import KVStore

# A repetition penalty makes the random tiny model write visible text instead of newlines.
SETTINGS = Settings(temperature=0.0, max_tokens=6, repetition_penalty=3.0)


@pytest.fixture
def h(tmp_path: Path, tiny) -> Iterator[Harness]:
    harness = make_harness(tmp_path / "store", tiny_loaded(tiny), settings=SETTINGS)
    yield harness
    harness.close()


def reopen(h: Harness, tiny) -> Harness:
    """A restart: the first Conversation closed, a new one (new engine, empty cache) on the same
    store."""
    h.close()
    return make_harness(h.home, tiny_loaded(tiny), settings=SETTINGS)


def user_texts(h: Harness) -> list[str]:
    return [m.content for m in h.chat.sessions.user_turns()]


# ---------------------------------------------------------------------------------------------
# /help, unknown commands, usage errors, empty lines


def test_help_lists_every_registered_command(h: Harness):
    out = h.run("/help")
    for cmd in h.repl.registry.commands.values():
        assert cmd.signature in out, cmd.name
        assert cmd.help in out
    assert "Ctrl-D" in out
    assert h.calls == []


def test_help_is_generated_from_the_registry(h: Harness):
    def _frob(ctx, arg):
        ctx.renderer.info(f"frobbed {arg}")

    h.repl.registry.add(Command("zzfrob", _frob, "THING", "frobnicate a thing", aliases=("zf",)))

    out = h.run("/help")
    assert "/zzfrob THING\tfrobnicate a thing (also /zf)" in out
    assert h.run("/zf x") == "frobbed x\n"
    assert h.run("/help zzfrob").startswith("/zzfrob THING")
    assert lines_of(h.run("/?")) == lines_of(out)


def test_help_for_one_command_and_for_an_unknown_one(h: Harness):
    assert lines_of(h.run("/help load")) == ["/load name\tswitch to a session, reusing its KV "
                                             "snapshot"]  # fmt: skip
    assert lines_of(h.run("/help /edit"))[0].startswith("/edit N [text]")
    out = lines_of(h.run("/help nope"))
    assert len(out) == 1 and out[0].startswith("error:") and "usage: /help" in out[0]


@pytest.mark.parametrize("line", ["/nope", "/lod demo", "/HELP", "/ edit 1 x"])
def test_unknown_command_is_one_error_line_with_a_hint_and_no_model_call(h: Harness, line):
    out = lines_of(h.run(line))
    assert len(out) == 1, out
    assert out[0].startswith("error: unknown command /")
    assert "/help" in out[0]
    assert h.calls == []
    assert h.chat.session is None  # nothing was stored either


@pytest.mark.parametrize(
    "line, usage",
    [
        ("/load", "/load name"),
        ("/edit", "/edit N [text]"),
        ("/edit x new text", "/edit N [text]"),
        ("/edit 1 new text", "/edit N [text]"),  # no turn 1 yet
        ("/branch", "/branch ID"),
        ("/branch abc", "/branch ID"),
        ("/think maybe", "/think [on|off]"),
        ("/set colour", "/set [key value]"),
        ("/set temperature hot", "/set [key value]"),
        ("/set temperature 9", "/set [key value]"),
        ("/set top_k 1.5", "/set [key value]"),
        ("/set max_tokens 0", "/set [key value]"),
        ("/set colour blue", "/set [key value]"),
        ("/export xml", "/export [md|json] [file]"),
        ("/export", "/export [md|json] [file]"),  # nothing to export yet
        ("/undo", "/undo"),
        ("/retry", "/retry"),
        ("/help nope", "/help [command]"),
    ],
)
def test_missing_or_bad_argument_is_one_line_with_the_usage(h: Harness, line, usage):
    out = lines_of(h.run(line))
    assert len(out) == 1, out
    assert out[0].startswith("error: ")
    assert f"(usage: {usage})" in out[0]
    assert h.calls == []


def test_usage_errors_after_a_turn_also_name_the_usage(h: Harness):
    h.run("hello there")
    for line, usage in [("/edit 5 text", "/edit N [text]"), ("/edit 0 text", "/edit N [text]"),
                        ("/edit 1", "/edit N [text]"), ("/load nope", "/load name"),
                        ("/branch 99999", "/branch ID")]:  # fmt: skip
        before = len(h.calls)
        out = lines_of(h.run(line))
        assert len(out) == 1 and out[0].startswith("error: "), (line, out)
        assert f"(usage: {usage})" in out[0], line
        assert len(h.calls) == before


def test_read_attaches_a_file_to_the_next_message_and_a_bad_path_is_one_line(h, tmp_path):
    """tests/test_read.py holds the rest: every refusal, the context, Tab, -f, a resume."""
    (tmp_path / "notes.txt").write_text("The capital of France is Paris.")
    out = h.run(f"/read {tmp_path}/nope.txt", f"/read {tmp_path}")
    assert out.splitlines() == [
        f"error: cannot read {tmp_path}/nope.txt: there is no such file",
        f"error: cannot read {tmp_path}: it is a folder; name a file in it",
    ]
    assert h.run(f"/read {tmp_path}/notes.txt").startswith(f"attached {tmp_path}/notes.txt (")
    assert h.calls == [] and h.chat.session is None
    h.run("summarise this", "thanks")
    assert user_texts(h) == [f"{tmp_path}/notes.txt:\n```\nThe capital of France is Paris.\n"
                             "```\n\nsummarise this", "thanks"]  # fmt: skip


def test_edit_without_text_in_line_mode_asks_for_the_text(h: Harness):
    h.run("hello there")
    out = h.run("/edit 1")
    assert "give the new text" in out
    assert len(h.store.branches(h.chat.session.id)) == 1


@pytest.mark.parametrize("line", ["", " ", "   \t ", "\t", "\n"])
def test_empty_or_blank_input_calls_nothing(h: Harness, line):
    assert h.repl.handle(line) is True
    assert h.calls == []
    assert h.text() == ""
    assert h.chat.session is None


@pytest.mark.parametrize("word", ["q", "/q", "/quit", "/exit", "  /quit  "])
def test_quit_words_end_the_loop(h: Harness, word):
    assert h.repl.handle(word) is False
    assert h.calls == []


def test_line_loop_stops_at_quit_and_exits_zero(h: Harness):
    assert line_loop(h.repl, ["hello there\n", "/quit\n", "never sent\n"]) == 0
    assert user_texts(h) == ["hello there"]
    assert line_loop(h.repl, ["/exit"]) == 0
    assert line_loop(h.repl, ["q\r\n", "never"]) == 0
    assert user_texts(h) == ["hello there"]


# ---------------------------------------------------------------------------------------------
# a message, /history


def test_a_message_prints_the_answer_and_one_stats_line(h: Harness):
    out = h.run("hello there")
    assert len(stats_lines(out)) == 1
    assert "reused 0 · prefilled " in out and "· generated 6 ·" in out
    answer = h.chat.history()[-1]
    assert answer.role == "assistant" and answer.content and answer.content in out
    h.rt.engine.pc.check()


def test_history_numbers_the_user_turns(h: Harness):
    assert h.run("/history") == "no turns yet\n"
    h.run("hello there", "how are you?")
    out = lines_of(h.run("/history"))
    assert len(out) == 4
    assert out[0] == "[1. you] hello there"
    assert out[1].startswith("[assistant] ")
    assert out[2] == "[2. you] how are you?"
    assert out[3].startswith("[assistant] ")


def test_history_shows_multi_line_turns_on_one_line(h: Harness):
    h.run("line one\nline two")
    assert lines_of(h.run("/history"))[0] == "[1. you] line one line two"


# ---------------------------------------------------------------------------------------------
# sessions: /new, /save, /load, /sessions


def test_new_starts_an_empty_session(h: Harness):
    h.run("hello there")
    first = h.chat.session.id
    assert h.run("/new") == "new session\n"
    assert h.chat.session is None and h.chat.history() == []
    h.run("another start")
    assert h.chat.session.id != first
    assert user_texts(h) == ["another start"]
    assert h.run("/new scratch") == "new session 'scratch'\n"
    assert h.chat.session.name == "scratch"
    assert h.store.get_session("scratch") is not None


def test_new_with_a_taken_name_keeps_the_current_session(h: Harness):
    h.run("/new demo", "/new other", "hello there")
    out = lines_of(h.run("/new demo"))
    assert len(out) == 1 and out[0].startswith("error:") and "demo" in out[0]
    assert h.chat.session is not None and h.chat.session.name == "other"
    assert user_texts(h) == ["hello there"]


def test_save_names_the_session_and_reports_it(h: Harness):
    assert h.run("/save") == "nothing to save yet\n"
    h.run("hello there")
    assert h.run("/save") == f"saved as {h.chat.session.id}\n"
    assert h.run("/save demo") == "saved as 'demo'\n"
    assert h.store.get_session("demo").id == h.chat.session.id
    assert h.run("/save") == "saved as demo\n"
    assert h.run("/save demo 2") == "saved as 'demo 2'\n"  # a rename; spaces are allowed
    assert h.store.get_session("demo") is None


@pytest.mark.parametrize("name", ["bad/name", "-dash", ".."])
def test_save_refuses_a_bad_name_in_one_line(h: Harness, name):
    h.run("hello there")
    out = lines_of(h.run(f"/save {name}"))
    assert len(out) == 1 and out[0].startswith("error: ")
    assert h.chat.session.name is None


def test_save_refuses_a_name_another_session_has(h: Harness):
    h.run("/new demo", "/new", "hello there")
    out = lines_of(h.run("/save demo"))
    assert len(out) == 1 and out[0].startswith("error: ") and "already exists" in out[0]


def test_sessions_lists_them(h: Harness):
    assert h.run("/sessions") == ""
    h.run("hello there", "/save demo", "/new", "second one")
    *lines, pool = lines_of(h.run("/sessions"))
    rows = [line.split("\t") for line in lines]
    assert [r[0] for r in rows] == [h.chat.session.id, "demo"]  # most recent first
    assert pool.startswith("all sessions: ")  # two sessions with chunks: the pool's real size
    demo = rows[1]
    assert demo[1] == "hello there" and demo[2] == "1"
    assert int(demo[3]) > 0 and demo[4] == demo[3]  # the conversation's tokens, all cached


def test_load_after_a_restart_reuses_the_snapshot(h: Harness, tiny):
    h.run("hello there", "how are you?", "/save demo")
    n_messages = len(h.chat.history())
    h2 = reopen(h, tiny)
    try:
        out = lines_of(h2.run("/load demo"))
        assert out[-1].startswith("loaded demo: 2 turn(s); reused ")
        reused = int(out[-1].split("reused ")[1].split(" tokens")[0].replace(",", ""))
        recomputed = int(out[-1].split("recomputed ")[1].replace(",", ""))
        assert reused > 20 and recomputed < reused
        assert any(line.startswith("snapshot: restored ") for line in out)
        assert len(h2.chat.history()) == n_messages
        h2.rt.engine.pc.check()
        # the next turn reuses what /load brought into the cache
        calls = len(h2.calls)
        out = h2.run("and then?")
        assert h2.last_stats.reused_tokens >= reused
        assert "cache: cut" not in out
        assert h2.calls[calls] < 20  # the first forward fed only the new turn
    finally:
        h2.close()


def test_load_unknown_session_suggests_a_close_name(h: Harness):
    h.run("hello there", "/save demo")
    out = lines_of(h.run("/load dem"))
    assert len(out) == 1 and "no session 'dem'" in out[0] and "did you mean 'demo'" in out[0]
    assert h.chat.session.name == "demo"


def test_load_refuses_a_session_open_elsewhere(h: Harness, tiny, tmp_path):
    h.run("/new demo", "hello there", "/new other")
    other = make_harness(h.home, tiny_loaded(tiny), settings=SETTINGS)
    try:
        other.run("/load demo")
        out = lines_of(h.run("/load demo"))
        assert len(out) == 1 and "open in another kvrepl" in out[0]
    finally:
        other.close()


def test_a_refused_load_keeps_the_lock_on_the_current_session(h: Harness, tiny):
    h.run("/new demo", "hello there", "/new mine", "my turn")
    holder = make_harness(h.home, tiny_loaded(tiny), settings=SETTINGS)
    intruder = make_harness(h.home, tiny_loaded(tiny), settings=SETTINGS)
    try:
        holder.run("/load demo")
        assert "open in another kvrepl" in h.run("/load demo")
        assert h.chat.session.name == "mine"
        # "mine" is still open here: another kvrepl must not get it
        out = intruder.run("/load mine")
        assert "open in another kvrepl" in out
    finally:
        intruder.close()
        holder.close()


# ---------------------------------------------------------------------------------------------
# /think, /set


def test_think_toggles_and_switches(h: Harness):
    assert h.repl.renderer.show_think is False
    assert h.run("/think") == "thinking shown\n"
    assert h.repl.renderer.show_think is True
    assert h.run("/think") == "thinking hidden\n"
    h.run("hello there")  # the model is loaded now: the template is known
    out = h.run("/think on")
    assert out.startswith("thinking shown") and "no thinking switch" in out
    assert h.repl.renderer.show_think is True and h.chat.settings.thinking is True
    out = h.run("/think off")
    assert out.startswith("thinking hidden")
    assert h.repl.renderer.show_think is False and h.chat.settings.thinking is False
    assert h.calls and all(n > 0 for n in h.calls)


def test_set_shows_every_session_key(h: Harness):
    rows = dict(line.split("\t") for line in lines_of(h.run("/set")))
    assert list(rows) == list(SESSION_KEYS)
    assert rows["temperature"] == "0.0" and rows["max_tokens"] == "6"


def test_set_changes_temperature_and_refuses_bad_values(h: Harness):
    assert h.run("/set temperature 0.7") == "temperature = 0.7 for this session\n"
    assert h.chat.settings.temperature == 0.7 and h.chat.sampling().temperature == 0.7
    for bad in ("hot", "-1", "9", "nan"):
        assert h.run(f"/set temperature {bad}").startswith("error: ")
        assert h.chat.settings.temperature == 0.7
    assert h.run("/set system 'be brief'") == "system = 'be brief' for this session\n"
    assert h.chat.prompt_messages()[0] == {"role": "system", "content": "be brief"}
    assert h.run("/set seed 5") == "seed = 5 for this session\n"
    assert h.run("/set drop_oldest on") == "drop_oldest = on for this session\n"
    assert h.chat.settings.drop_oldest is True
    assert h.run("/set temperature") == (
        "temperature = 0.7: 0 is greedy (default 0.2; 0.0 to 5.0)\n")  # fmt: skip
    assert h.chat.settings.temperature == 0.7


def test_set_is_remembered_with_the_session(h: Harness, tiny):
    h.run("/new demo", "/set temperature 0.7", "/set max_tokens 3", "/set system 'be brief'")
    h.run("hello there")
    assert h.last_stats.generated_tokens <= 3
    h.close()
    # a new Conversation over a new Store on the same folder: the settings come back with it
    store = Store(h.home / "kvrepl.db")
    chat = Conversation(SETTINGS, store, KVStore(h.home / "kv"), ModelHandle.none(SETTINGS), h.home)
    try:
        assert chat.settings.temperature == 0.0  # no session open: the base settings
        chat.sessions.open("demo")
        assert chat.settings.temperature == 0.7
        assert chat.settings.max_tokens == 3
        assert chat.settings.system == "be brief"
        assert chat.settings.repetition_penalty == 3.0  # not set: still the base value
    finally:
        chat.close()
        store.close()


# ---------------------------------------------------------------------------------------------
# /edit, /retry, /undo, /branches, /branch


def test_edit_makes_a_new_branch_and_keeps_the_old_turn(h: Harness):
    h.run("hello there", "how are you?")
    old = h.chat.sessions.user_turns()
    out = h.run("/edit 1 hello again")
    assert "cache: cut at token " in out and "(turn 1, user)" in out
    assert "recomputing " in out
    assert len(stats_lines(out)) == 1
    assert user_texts(h) == ["hello again"]  # the edit replaced turn 1 and what followed it
    new = h.chat.sessions.user_turns()[0]
    assert new.parent_id == old[0].parent_id and new.id != old[0].id
    branches = h.store.branches(h.chat.session.id)
    assert len(branches) == 2
    assert sum(b.active for b in branches) == 1
    # the old turns are still in the database
    assert h.store.message(old[0].id).content == "hello there"
    assert h.store.message(old[1].id).content == "how are you?"
    h.rt.engine.pc.check()


def test_edit_recomputes_only_from_the_cut(h: Harness):
    h.run("hello there", "how are you?")
    cached = len(h.rt.engine.pc.ids)
    out = h.run("/edit 2 how is it going?")
    cut = int(out.split("cut at token ")[1].split(" ")[0].replace(",", ""))
    recomputed = int(out.split("recomputing ")[1].split(" ")[0].replace(",", ""))
    assert 0 < cut < cached
    assert "(turn 2, user)" in out
    assert h.last_stats.reused_tokens == cut
    assert h.last_stats.prefilled_tokens == recomputed
    assert user_texts(h) == ["hello there", "how is it going?"]


def test_retry_makes_a_sibling_answer(h: Harness):
    h.run("hello there")
    first = h.chat.history()[-1]
    out = h.run("/retry")
    assert len(stats_lines(out)) == 1
    second = h.chat.history()[-1]
    assert second.role == "assistant" and second.id != first.id
    assert second.parent_id == first.parent_id
    assert children(h.store, first.parent_id) == [first.id, second.id]
    assert user_texts(h) == ["hello there"]
    assert h.last_stats.prefilled_tokens == 1  # the prompt is all in the cache


def test_retry_moves_nothing_when_the_model_cannot_answer(tiny, tmp_path: Path):
    tok = tiny[1]
    h = fault_harness(tmp_path / "store", make_loaded(make_fault_model(tok), tok))
    try:
        h.line("hello there")
        before = [m.id for m in h.chat.history()]

        def no_model():
            raise KvreplError("the model failed to load: gone")

        h.chat.model = ModelHandle(h.chat.settings, load=no_model)
        out = h.line("/retry")
        assert out.startswith("error: the model failed to load"), out
        assert [m.id for m in h.chat.history()] == before
    finally:
        h.close()


def test_undo_drops_the_last_exchange_but_keeps_it_in_the_db(h: Harness):
    h.run("hello there", "how are you?")
    dropped = h.chat.history()[-2:]
    assert h.run("/undo") == "dropped the last exchange; 1 turn(s) left\n"
    assert user_texts(h) == ["hello there"]
    assert [h.store.message(m.id).content for m in dropped] == [m.content for m in dropped]
    assert any(b.leaf.id == dropped[-1].id for b in h.store.branches(h.chat.session.id))
    assert h.run("/undo") == "dropped the last exchange; 0 turn(s) left\n"
    assert lines_of(h.run("/undo"))[0].startswith("error: nothing to undo")
    h.run("fresh start")
    assert user_texts(h) == ["fresh start"]


def test_branch_without_a_session_creates_none(tiny, tmp_path: Path):
    tok = tiny[1]
    h = fault_harness(tmp_path / "store", make_loaded(make_fault_model(tok), tok))
    try:
        out = h.line("/branch 3")
        assert out.startswith("error: no branches yet"), out
        assert h.chat.session is None
        assert h.chat.store.list_sessions() == []
    finally:
        h.close()


def test_branches_and_branch_switch(h: Harness):
    assert h.run("/branches") == "no branches yet\n"
    h.run("hello there", "/edit 1 hello again")
    rows = [line.split("\t") for line in lines_of(h.run("/branches"))[:-1]]
    assert len(rows) == 2
    active = [r for r in rows if r[0] == "*"]
    old = [r for r in rows if r[0] == ""]
    assert len(active) == 1 and len(old) == 1
    assert old[0][4] == "you: hello there"  # where the old branch leaves the active one
    assert h.run("/branch " + old[0][1]) == "on branch " + old[0][1] + ": 1 turn(s)\n"
    assert user_texts(h) == ["hello there"]
    rows = [line.split("\t") for line in lines_of(h.run("/branches"))[:-1]]
    assert [r[1] for r in rows if r[0] == "*"] == old[0][1:2]
    # the conversation goes on from the old branch, reusing the cache up to where they differ
    out = h.run("and then?")
    assert user_texts(h) == ["hello there", "and then?"]
    assert h.last_stats.reused_tokens > 0
    assert "cache: cut at token" in out
    h.rt.engine.pc.check()


def test_branch_to_a_message_of_another_session_is_refused(h: Harness):
    h.run("/new a", "hello there")
    foreign = h.chat.history()[-1].id
    h.run("/new b", "another one")
    out = lines_of(h.run(f"/branch {foreign}"))
    assert len(out) == 1 and out[0].startswith("error: ")
    assert user_texts(h) == ["another one"]


# ---------------------------------------------------------------------------------------------
# /stats, /export


def test_stats_shows_cache_and_turn_figures(h: Harness):
    h.run("hello there", "how are you?")
    rows = dict(line.split("\t") for line in lines_of(h.run("/stats")))
    assert rows["session"] == h.chat.session.id
    cached = len(h.rt.engine.pc.ids)
    assert rows["in memory"] == f"{cached:,} tokens in the model's cache now"
    assert rows["tokens"] == rows["cached"] == f"{cached:,}"
    assert rows["context"] == "512 tokens"
    assert rows["turns"] == "2" and rows["answers"].startswith("2 computed")
    assert int(rows["generated"]) == 12
    assert int(rows["reused"].replace(",", "")) > 0


def test_every_surface_names_and_counts_the_figures_the_same(h: Harness):
    """/sessions, /stats and both exports: turns (of the active branch, not every answer
    computed), the conversation's tokens, its cached tokens and its bytes on disk, the same."""
    h.run("/new demo", "hello there", "how are you?", "/edit 2 and what about you?")
    tokens = sum(h.last_stats.as_dict()[k] for k in ("reused_tokens", "prefilled_tokens",
                                                      "generated_tokens"))  # fmt: skip
    assert tokens == len(h.rt.engine.pc.ids)
    h.run("/new other", "hello there", "/load demo")  # shares demo's first chunk
    stats = dict(line.split("\t") for line in lines_of(h.run("/stats")))
    assert stats["answers"].startswith("3 computed")  # both branches of turn 2
    listing = {r[0]: r for r in (line.split("\t") for line in lines_of(h.run("/sessions")))}
    doc = json.loads(h.run("/export json"))["session"]
    md = h.run("/export md")
    on_disk = h.kv.size_bytes(h.chat.session.id)
    assert (stats["turns"], stats["tokens"], stats["cached"]) == ("2", f"{tokens:,}", f"{tokens:,}")
    assert stats["on disk"] == format_size(on_disk)
    assert listing["demo"][2:6] == ["2", str(tokens), str(tokens), format_size(on_disk)]
    assert (doc["turns"], doc["tokens"], doc["cached_tokens"], doc["bytes_on_disk"]) == (
        2, tokens, tokens, on_disk)  # fmt: skip
    assert (f"turns: 2 · tokens: {tokens:,} · cached: {tokens:,} · on disk: "
            f"{format_size(on_disk)}") in md  # fmt: skip
    # the sessions share a chunk: each counts it, the pool once
    other = h.kv.size_bytes(h.store.get_session("other").id)
    assert h.kv.pool_bytes() < on_disk + other
    assert stats["all sessions"].startswith(format_size(h.kv.pool_bytes()) + " of K/V on disk")


def test_export_json_has_each_turns_stats(h: Harness, tmp_path):
    h.run("/new demo", "hello there", "how are you?")
    doc = json.loads(h.run("/export json"))
    assert doc["session"]["name"] == "demo"
    roles = [m["role"] for m in doc["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    for m in doc["messages"]:
        if m["role"] == "assistant":
            assert set(m["stats"]) == set(STAT_NAMES) == {
                "reused_tokens", "prefilled_tokens", "generated_tokens", "ttft_s", "decode_tok_s"
            }  # fmt: skip
            assert m["stats"]["generated_tokens"] == 6
        else:
            assert "stats" not in m
    assert doc["messages"][3]["stats"]["reused_tokens"] > 0
    target = tmp_path / "out.json"
    assert h.run(f"/export json {target}") == f"wrote {target}\n"
    assert json.loads(target.read_text())["messages"] == doc["messages"]


def test_export_md(h: Harness, tmp_path):
    h.run("/new demo", "hello there")
    out = h.run("/export md")
    assert out.startswith("# demo\n")
    assert "## 1. user" in out and "hello there" in out and "### assistant" in out
    assert "*reused 0 · prefilled " in out
    assert h.run("/export") == out  # md is the default
    target = tmp_path / "out.md"
    h.run(f"/export md {target}")
    assert target.read_text().rstrip("\n") == out.rstrip("\n")
    named = tmp_path / "named.json"  # a file named .json alone: its format
    assert h.run(f"/export {named}") == f"wrote {named}\n"
    assert json.loads(named.read_text())["session"]["name"] == "demo"


def test_export_md_holds_a_system_prompt_set_mid_session(h: Harness):
    h.run("/new demo", "hello there", "/set system 'Answer in French.'", "how are you?")
    out = h.run("/export md")
    assert "## system\n\nAnswer in French.\n" in out
    assert out.index("## system") < out.index("## 1. user")
    assert json.loads(h.run("/export json"))["session"]["system"] == "Answer in French."


@pytest.mark.parametrize("where,said", [
    ("{tmp}/no/such/folder/out.md", "cannot write {tmp}/no/such/folder/out.md: there is no folder "
                                    "{tmp}/no/such/folder"),
    ("{tmp}", "cannot write {tmp}: it is a folder; name a file in it"),
    ("{tmp}/a-file/out.md", "cannot write {tmp}/a-file/out.md: part of that path is a file, not a "
                            "folder"),
])  # fmt: skip
def test_export_to_a_bad_path_is_one_line_in_the_users_words(h: Harness, tmp_path, where, said):
    (tmp_path / "a-file").write_text("x")
    h.run("/new demo", "hello there")
    target = where.format(tmp=tmp_path)
    out = h.run(f"/export md {target}")
    assert out == f"error: {said.format(tmp=tmp_path)}\n"
    assert "internal error" not in out and not (h.home / "kvrepl.log").exists()
    assert h.run("/history").startswith("[1. you] hello there")  # and the REPL goes on


def test_every_command_is_covered_here():
    """A new command needs a test in this file: the list below must follow the registry."""
    tested = {"help", "quit", "new", "save", "load", "sessions", "think", "read", "edit",
              "retry", "undo", "history", "branches", "branch", "set", "stats",
              "export"}  # fmt: skip
    assert set(build_registry().commands) == tested
