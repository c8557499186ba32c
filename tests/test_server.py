"""kvrepl serve: a real server process (`kvrepl serve`, the embedded SmolLM2, greedy)
asked by a real HTTP client (httpx) on 127.0.0.1. Its answers, whole and streamed, are the REPL's
(a Conversation over the same model in this process) for the same messages; a conversation goes
on from the cache in memory, from chunks on disk after a restart, and from chunks the REPL
wrote; requests wait their turn (two at once, a full queue: 503); a client that goes away
mid-stream stops its answer and the next one is still right; 401, 400 and 413.

One server process for the module (restarted once, on the same store); the request parsing and
the stop strings are checked in process, without a model.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import close_conversation, open_conversation
from procs import PYTHON, ROOT, kvrepl_env

from kvrepl.app.openai_api import BadRequest, parse_request
from kvrepl.chat.prompt import Prompt
from kvrepl.chat.serving import StopText
from kvrepl.chat.snapshots import MIN_GAIN
from kvrepl.config import Settings
from kvrepl.events import TextDelta

KEY = "test-key-1234"
MAX_TOKENS = 48
SETTINGS = Settings(temperature=0.0, max_tokens=MAX_TOKENS)
FLAGS = ["--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--context", "1024",
         "--queue", "1", "--max-body-kb", "64", "--api-key", KEY]  # fmt: skip
LISTENING = re.compile(r" on (http://\S+)/v1 ")
STORY = "Write a long story about a dragon who learns to bake bread."


# -- the server process -----------------------------------------------------------------------
class Server:
    """`kvrepl serve` on a free port over the store in `home`; its stderr in
    `logs`."""

    def __init__(self, home: Path, logs: Path, *extra: str) -> None:
        self.home, self.logs, self.extra = home, logs, extra
        self.starts = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        self.starts += 1
        with (self.logs / f"stderr-{self.starts}").open("wb") as f:
            self.popen = subprocess.Popen(
                [str(PYTHON), "-m", "kvrepl", "serve", "--port", "0", *FLAGS, *self.extra],
                cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=kvrepl_env(self.home),
            )  # fmt: skip
        deadline = time.monotonic() + 300
        while not (m := LISTENING.search(self.log())):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start:\n{self.log()}")
            time.sleep(0.1)
        self.url = m.group(1)

    def log(self) -> str:
        """What the running (or last) process wrote to stderr."""
        return (self.logs / f"stderr-{self.starts}").read_text()

    def stop(self) -> int | None:
        """SIGTERM, then its exit status (None: it had to be killed)."""
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            return None

    def client(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    srv = Server(root / "store", root)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def complete(http: httpx.Client, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"model": "any", "messages": messages, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def content(body: dict[str, Any]) -> str:
    return body["choices"][0]["message"]["content"]


def events(r: httpx.Response) -> Iterator[dict[str, Any] | str]:
    """A stream's `data:` payloads, parsed; the last is the string "[DONE]"."""
    for line in r.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def streamed(http: httpx.Client, messages: list[dict[str, str]], **extra: Any) -> list[Any]:
    body = {"messages": messages, "stream": True, **extra}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(events(r))


def text_of(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if isinstance(c, dict) and c["choices"])  # fmt: skip


def repl_answers(real: Any, home: Path, *texts: str, **settings: Any) -> list[str]:
    """What the REPL answers to these messages sent one after another (a Conversation over the
    same model, in the store `home`; greedy, with the server's settings, unless `settings` say
    otherwise)."""
    chat = open_conversation(real, home, replace(SETTINGS, **settings))
    try:
        return ["".join(e.text for e in chat.send(t) if isinstance(e, TextDelta)) for t in texts]
    finally:
        close_conversation(chat)


def wait_for(http: httpx.Client, condition: Any, what: str) -> dict[str, Any]:
    """/kvrepl/status once `condition(status)` holds (a bounded wait, not a timing check)."""
    deadline = time.monotonic() + 120
    while not condition(status := http.get("/kvrepl/status").json()):
        assert time.monotonic() < deadline, f"never {what}: {status}"
        time.sleep(0.02)
    return status


# -- answers ----------------------------------------------------------------------------------
@pytest.mark.model
def test_an_answer_is_the_repls_and_a_conversation_goes_on_from_memory(
    http: httpx.Client, real: Any, tmp_path: Path
) -> None:
    q1, q2 = "What is the capital of France?", "And what is the capital of Italy?"
    a1, a2 = repl_answers(real, tmp_path, q1, q2)
    first = complete(http, [user(q1)])
    assert content(first) == a1 and a1
    assert first["choices"][0]["finish_reason"] == "stop"
    assert first["object"] == "chat.completion"
    second = complete(http, [user(q1), assistant(a1), user(q2)])
    assert content(second) == a2 and a2 != a1
    usage, figures = second["usage"], second["kvrepl"]
    # the first answer's ids are in the cache, its end token aside: all of them are reused
    seen = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == seen
    assert figures["reused_tokens"] == seen and figures["source"] == "memory"
    assert figures["reused_from_memory"] == seen and figures["reused_from_disk"] == 0
    assert figures["prefilled_tokens"] == usage["prompt_tokens"] - seen
    assert usage["completion_tokens"] == figures["generated_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.model
def test_a_streamed_answer_is_the_repls(http: httpx.Client, real: Any, tmp_path: Path) -> None:
    question = "Name three colours of the rainbow."
    (expected,) = repl_answers(real, tmp_path, question)
    chunks = streamed(http, [user(question)])
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert len(chunks) > 4  # piece by piece, not one block
    assert text_of(chunks) == expected and expected
    last = chunks[-2]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] == last["kvrepl"]["generated_tokens"] > 0
    # stream_options.include_usage: OpenAI's usage chunk (no choices) comes last
    again = streamed(http, [user(question)], stream_options={"include_usage": True})
    assert text_of(again) == expected
    assert again[-2]["choices"] == [] and again[-3]["choices"][0]["finish_reason"]
    prompt = again[-2]["usage"]["prompt_tokens"]
    assert again[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt - 1


@pytest.mark.model
def test_a_stop_string_ends_the_answer_before_it(http: httpx.Client) -> None:
    question = "What is the capital of France?"
    whole = content(complete(http, [user(question)]))
    assert " Paris" in whole
    cut = complete(http, [user(question)], stop=["nothing like this", " Paris"])
    assert content(cut) == whole[: whole.index(" Paris")]
    assert cut["choices"][0]["finish_reason"] == "stop"
    chunks = streamed(http, [user(question)], stop=" Paris")
    assert text_of(chunks) == whole[: whole.index(" Paris")]


@pytest.mark.model
def test_sampling_values_are_the_repls_settings(
    http: httpx.Client, real: Any, tmp_path: Path
) -> None:
    question = "Describe a forest in two sentences."
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "max_tokens": 24}
    (expected,) = repl_answers(real, tmp_path, question, **sampled)
    body = complete(http, [user(question)], **sampled)
    assert content(body) == expected
    assert body["usage"]["completion_tokens"] <= 24
    (greedy,) = repl_answers(real, tmp_path / "greedy", question, max_tokens=24)
    assert expected != greedy  # the sampling values were not ignored
    cut = complete(http, [user(question)], max_completion_tokens=3)
    assert cut["usage"]["completion_tokens"] == 3 and cut["choices"][0]["finish_reason"] == "length"


@pytest.mark.model
def test_a_prefix_the_repl_computed_is_read_from_disk(
    server: Server, http: httpx.Client, real: Any
) -> None:
    q1, q2 = "Tell me one fact about the Moon.", "Tell me another one."
    # the REPL's conversation, in the server's store: its chunks go to the same pool
    a1, a2 = repl_answers(real, server.home, q1, q2)
    body = complete(http, [user(q1), assistant(a1), user(q2)])
    assert content(body) == a2
    figures = body["kvrepl"]
    assert figures["source"] in ("disk", "memory+disk"), figures  # a system prompt in memory
    # the server never computed the first answer: its K/V came from the REPL's chunks
    prompt = len(Prompt(real.tokenizer).render([user(q1)]))
    assert figures["reused_tokens"] > prompt
    assert figures["reused_from_disk"] >= MIN_GAIN


# -- the queue ----------------------------------------------------------------------------------
@pytest.mark.model
def test_two_clients_at_once_are_answered_in_turn(
    server: Server, http: httpx.Client, real: Any, tmp_path: Path
) -> None:
    other = "What is two plus two?"
    (story,) = repl_answers(real, tmp_path / "a", STORY, max_tokens=120)
    (sum_,) = repl_answers(real, tmp_path / "b", other)
    with server.client() as second, ThreadPoolExecutor(1) as pool:
        body = {"messages": [user(STORY)], "stream": True, "max_tokens": 120}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = events(r)
            first = [next(chunks), next(chunks)]  # it is being answered
            later = pool.submit(complete, second, [user(other)])
            wait_for(http, lambda s: s["waiting"] == 1, "queued")
            first += list(chunks)
        answer = later.result()
    assert text_of(first) == story
    assert first[-2]["choices"][0]["finish_reason"] == "length"  # long: the other one waited
    assert content(answer) == sum_
    assert first[-2]["kvrepl"]["answer"] < answer["kvrepl"]["answer"]


@pytest.mark.model
def test_a_full_queue_answers_503(
    server: Server, http: httpx.Client, real: Any, tmp_path: Path
) -> None:
    other = "What colour is the sky?"
    (expected,) = repl_answers(real, tmp_path, other)
    with server.client() as second, ThreadPoolExecutor(1) as pool:
        body = {"messages": [user(STORY)], "stream": True, "max_tokens": 1000}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = events(r)
            next(chunks), next(chunks)
            waiting = pool.submit(complete, second, [user(other)])
            wait_for(http, lambda s: s["waiting"] == 1, "queued")
            refused = http.post("/v1/chat/completions", json={"messages": [user("hi")]})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "busy" in refused.json()["error"]["message"]
        # the story's client went away: the one waiting is answered next
        assert content(waiting.result()) == expected


@pytest.mark.model
def test_a_client_gone_mid_stream_stops_its_answer(
    http: httpx.Client, real: Any, tmp_path: Path
) -> None:
    (expected,) = repl_answers(real, tmp_path, STORY)
    before = http.get("/kvrepl/status").json()["cancelled"]
    body = {"messages": [user(STORY)], "stream": True, "max_tokens": 1000}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = events(r)
        got = [next(chunks) for _ in range(4)]
    assert text_of(got)
    status = wait_for(http, lambda s: not s["answering"], "idle")
    assert status["cancelled"] == before + 1  # it stopped, not finished
    # the cache holds the story's prompt and what was computed of its answer, consistently:
    # the same messages reuse the prompt and are answered as a fresh greedy run answers them
    again = complete(http, [user(STORY)])
    assert content(again) == expected
    prompt = again["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt - 1


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.model
def test_without_the_api_key_401(server: Server) -> None:
    for key in (None, "wrong-key"):
        with server.client(key) as client:
            r = client.post("/v1/chat/completions", json={"messages": [user("hi")]})
            assert r.status_code == 401
            assert r.headers["www-authenticate"] == "Bearer"
            assert "API key" in r.json()["error"]["message"]
            assert client.get("/v1/models").status_code == 401


@pytest.mark.model
def test_models_lists_the_one_model(http: httpx.Client) -> None:
    r = http.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == "SmolLM2-135M-Instruct (embedded)" and card["object"] == "model"


@pytest.mark.model
def test_bad_requests_400_with_the_reason(http: httpx.Client) -> None:
    def refused(body: bytes | dict[str, Any]) -> str:
        if isinstance(body, dict):
            r = http.post("/v1/chat/completions", json=body)
        else:
            r = http.post("/v1/chat/completions", content=body)
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    assert "not valid JSON" in refused(b'{"messages": [')
    assert "n must be 1" in refused({"messages": [user("hi")], "n": 2})
    assert "temperature" in refused({"messages": [user("hi")], "temperature": 9})
    assert "messages" in refused({"messages": []})
    long = refused({"messages": [user("hello " * 1100)]})
    assert "context is 1,024" in long
    for stream in (False, True):  # a stream is refused before it starts
        body = {"messages": [user("hello " * 1100)], "stream": stream}
        assert "context" in refused(body)
    # the server goes on answering
    assert content(complete(http, [user("What is the capital of France?")]))


@pytest.mark.model
def test_a_body_over_the_limit_413(http: httpx.Client) -> None:
    big = {"messages": [user("x" * 70_000)]}
    r = http.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "larger" in r.json()["error"]["message"]
    # a body sent in chunks, without a declared length, is stopped as it comes
    data = json.dumps(big).encode()
    parts = (data[i : i + 8192] for i in range(0, len(data), 8192))
    r = http.post("/v1/chat/completions", content=parts)
    assert r.status_code == 413 and "larger" in r.json()["error"]["message"]


# -- after a restart ------------------------------------------------------------------------------
@pytest.mark.model
def test_after_a_restart_the_prefix_is_read_from_disk(
    server: Server, real: Any, tmp_path: Path
) -> None:
    q1, q2 = "What is the largest planet?", "How many moons does it have?"
    a1, a2 = repl_answers(real, tmp_path, q1, q2)
    with server.client() as http:
        first = complete(http, [user(q1)])
    assert content(first) == a1
    assert re.search(r"answer \d+: [\d,]+ prompt tokens, [\d,]+ reused \(\w+", server.log())
    # SIGTERM: it stops by itself (kvrepl then exits as ended by the signal: 143)
    assert server.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    assert "Traceback" not in server.log()
    server.start()
    with server.client() as http:
        assert http.get("/kvrepl/status").json()["cached_tokens"] == 0
        second = complete(http, [user(q1), assistant(a1), user(q2)])
    assert content(second) == a2
    figures = second["kvrepl"]
    assert figures["source"] == "disk", figures
    assert figures["reused_from_disk"] == second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert figures["reused_tokens"] >= first["usage"]["prompt_tokens"]


@pytest.mark.model
def test_with_8_bit_kv_a_conversation_is_the_no_reuse_servers_from_memory_and_disk(
    tmp_path: Path,
) -> None:
    """`serve --kv-bits 8`: the second and third requests reuse the first's prefix (from memory,
    then from disk after a restart) and answer what an 8-bit server that reuses nothing
    answers."""
    q1, q2, q3 = "Name three rivers in Europe.", "Which one is the longest?", "Say it in French."
    kv8 = Server(tmp_path / "kv8", tmp_path, "--kv-bits", "8")
    kv8.start()
    try:
        with kv8.client() as http:
            a1 = content(complete(http, [user(q1)]))
            two = complete(http, [user(q1), assistant(a1), user(q2)])
        assert kv8.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
        kv8.start()  # the third request finds the prefix in the pool on disk
        with kv8.client() as http:
            three = complete(http, [user(q1), assistant(a1), user(q2), assistant(content(two)),
                                    user(q3)])  # fmt: skip
    finally:
        kv8.stop()
    assert two["kvrepl"]["source"] == "memory", two["kvrepl"]
    assert three["kvrepl"]["source"] == "disk", three["kvrepl"]
    cached = three["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > two["usage"]["prompt_tokens"] // 2  # into the answer sent back as text
    logs = tmp_path / "plain"
    logs.mkdir()
    plain = Server(tmp_path / "plain-store", logs, "--kv-bits", "8", "--no-reuse")
    plain.start()
    try:
        with plain.client() as http:
            assert content(complete(http, [user(q1)])) == a1
            b2 = content(complete(http, [user(q1), assistant(a1), user(q2)]))
        plain.stop()  # restarted too: a server renders the answers it remembers by their ids
        plain.start()
        with plain.client() as http:
            b3 = content(complete(http, [user(q1), assistant(a1), user(q2), assistant(b2),
                                         user(q3)]))  # fmt: skip
    finally:
        plain.stop()
    assert (content(two), content(three)) == (b2, b3)
    assert b3 and b2 != b3  # answers, not an echo of one another


# -- in process, no model -----------------------------------------------------------------------
def test_a_request_is_checked_into_an_ask() -> None:
    ask, stream, usage = parse_request({
        "model": "whatever", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
        "temperature": 0, "top_p": 0.5, "seed": 7, "max_tokens": 10, "max_completion_tokens": 20,
        "stop": "\n\n", "frequency_penalty": 0,
    })  # fmt: skip
    assert stream and usage
    assert ask.messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "a\nb"}]  # fmt: skip
    assert (ask.temperature, ask.top_p, ask.seed, ask.max_tokens) == (0.0, 0.5, 7, 20)
    assert ask.stop == ("\n\n",)
    plain, stream, usage = parse_request({"messages": [user("hi")], "n": 1, "stop": None})
    assert not stream and not usage and plain.temperature is None and plain.stop == ()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "JSON object"),
        ({"messages": "hi"}, "non-empty list"),
        ({"messages": [user("hi")], "n": 3}, "n must be 1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role must be"),
        ({"messages": [{"role": "user"}]}, "content must be text"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "must be text"),
        ({"messages": [user("hi")], "temperature": -1}, "temperature must be between"),
        ({"messages": [user("hi")], "top_p": "high"}, "top_p does not take"),
        ({"messages": [user("hi")], "max_tokens": 0}, "max_tokens must be between"),
        ({"messages": [user("hi")], "max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"messages": [user("hi")], "seed": True}, "seed does not take"),
        ({"messages": [user("hi")], "stop": [1]}, "stop must be"),
        ({"messages": [user("hi")], "stop": ["x"] * 17}, "at most 16"),
        ({"messages": [user("hi")], "stream": "yes"}, "stream must be"),
    ],
)
def test_a_bad_request_says_why(body: Any, says: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(says)):
        parse_request(body)


def test_stop_strings_cut_the_text_across_pieces() -> None:
    stops = StopText(["END", "\n\n"])
    assert stops.feed("Hello E") == ("Hello ", False)  # "E" may begin END: held
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dless") == ("", True)
    assert stops.text == "Hello "
    stops = StopText(["END"])
    assert stops.feed("an E") == ("an ", False)
    assert stops.feed("ND and more") == ("", True)
    assert stops.text == "an "
    stops = StopText(["cat", "e c"])  # the earliest stop wins, whichever is listed first
    assert stops.feed("the cat") == ("th", True)
    stops = StopText(["END"])
    assert stops.feed("the E") == ("the ", False)
    assert stops.feed("nd") == ("End", False)  # not a stop after all: let through
    assert stops.flush() == "" and stops.text == "the End"
    held = StopText(["END"])
    assert held.feed("so E") == ("so ", False)
    assert held.flush() == "E" and held.text == "so E"
    assert StopText([]).feed("anything") == ("anything", False)
