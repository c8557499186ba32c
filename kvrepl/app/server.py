"""`kvrepl serve`: an OpenAI-compatible HTTP server over one model, on 127.0.0.1 by default
(starlette's routes under uvicorn).

    POST /v1/chat/completions   an answer, whole or streamed (SSE: `data: {...}` chunks, then
                                `data: [DONE]`), with OpenAI's usage and kvrepl's figures
    GET  /v1/models             the one model
    GET  /kvrepl/status         what the model is doing (answering, waiting, answered)

Owns the HTTP side: the flags, the socket, the API key (Bearer; 401), the body limit (413), a
request checked into an `Ask` (400 with the reason: malformed JSON, a value out of bounds,
n > 1), a full queue (503), and the shapes of OpenAI's responses. The model's side (rendering,
reuse from memory or the pool, generation, saving) is serving.py's: requests reach it one at a
time in arrival order, and a client that goes away cancels its own. Nothing a client sends names
a file. Also runnable as `python -m kvrepl.app.server [flags]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kvrepl.app.args import API_KEY_ENV
from kvrepl.app.openai_api import BadRequest, parse_request
from kvrepl.chat.handle import ModelHandle
from kvrepl.chat.serving import Answered, Busy, Failed, Item, Job, Piece, Refused, Started, Worker
from kvrepl.config import Settings, store_path
from kvrepl.errors import UsageError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "server_busy"}  # fmt: skip
TOO_LARGE = "the request body is larger than this server takes (--max-body-kb)"


def run(args: argparse.Namespace, settings: Settings, home: Path) -> int:
    """`kvrepl serve` with parsed flags (add_server_flags'); returns when the server stops."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {args.port}")
    if args.queue < 1 or args.max_body_kb < 1:
        raise UsageError("--queue and --max-body-kb must be at least 1")
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    serve(settings, args.host, args.port, key, home=home, queue_size=args.queue,
          max_body=args.max_body_kb << 10)  # fmt: skip
    return 0


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, *, home: Path | None = None, queue_size: int = 8,
          max_body: int = 8 << 20, say: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """Listen on host:port, load the model, then answer until SIGINT or SIGTERM. The K/V pool is
    the store's (`home`), shared with the REPL's sessions. One line per thing worth saying goes
    to `say` (stderr by default)."""
    from kvrepl.store.kvstore import KVStore  # torch: once the server starts, not with the flags

    say = say or (lambda line: print(f"kvrepl serve: {line}", file=sys.stderr, flush=True))
    sock = _listen(host, port)  # a taken port is said before the model loads
    handle = ModelHandle(settings)
    handle.prepare(say)
    say(f"loading {settings.model or 'the embedded model'}…")
    rt = handle.get()
    for note in rt.loaded.notes:
        say(note)
    home = home or store_path()
    worker = Worker(rt, settings, KVStore(home / "kv"), queue_size).start()
    app = build_app(Door(worker, rt.loaded.source.label, rt.loaded.fingerprint, say), api_key,
                    max_body)  # fmt: skip
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    say(f"{rt.loaded.source.label} on http://{shown}:{bound_port}/v1 (store {home})")
    if not api_key and not _loopback(host):
        say(f"warning: no --api-key, and {host} may be reached from other machines")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                            lifespan="on")  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        worker.close()
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; UsageError in one line when that cannot be."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# -- the app --------------------------------------------------------------------------------
def build_app(door: Door, api_key: str | None, max_body: int) -> ASGIApp:
    """The door's routes behind the Gate (outside starlette's body limit, whose own 413 is plain
    text)."""
    routes = [Route("/v1/chat/completions", door.completions, methods=["POST"]),
              Route("/v1/models", door.models, methods=["GET"]),
              Route("/kvrepl/status", door.status, methods=["GET"])]  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # uvicorn ends the process on SIGINT/SIGTERM right after this: the job in hand stops
        # (saving what it computed) before that
        await asyncio.to_thread(door.worker.close)

    app = Starlette(routes=routes, max_body_size=max_body, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})  # fmt: skip
    return Gate(app, api_key, max_body)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"),
                      "param": None, "code": None}}  # fmt: skip
    return JSONResponse(body, status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 413:
        return error(413, TOO_LARGE)
    return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")


class Gate:
    """What every request passes before a route: the API key, when one is set (401), and a body
    declared larger than the limit (413, before it is read; one that grows too large as it
    comes is stopped by starlette's limit)."""

    def __init__(self, app: ASGIApp, key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            reply = None
            if self.key is not None and not self._key_ok(headers.get("authorization", "")):
                reply = error(401, "a valid API key is needed: Authorization: Bearer KEY",
                              {"WWW-Authenticate": "Bearer"})  # fmt: skip
            elif _declared_length(headers) > self.max_body:
                reply = error(413, TOO_LARGE)
            if reply is not None:
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _key_ok(self, given: str) -> bool:
        scheme, _, token = given.partition(" ")
        assert self.key is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)


def _declared_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:  # h11 refuses such a request before it gets here
        return 0


class Door:
    """The routes, over one Worker; one line per answer to `say`."""

    def __init__(self, worker: Worker, model_id: str, fingerprint: str,
                 say: Callable[[str], None]) -> None:  # fmt: skip
        self.worker, self.model_id, self.fingerprint = worker, model_id, fingerprint
        self.say = say
        self.created = int(time.time())

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "kvrepl"}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    async def status(self, request: Request) -> Response:
        return JSONResponse({"model": self.model_id, **self.worker.status()})

    async def completions(self, request: Request) -> Response:
        try:
            data = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:
            return error(400, f"the body is not valid JSON: {exc}")
        try:
            ask, stream, usage_chunk = parse_request(data)
        except BadRequest as exc:
            return error(400, str(exc))
        items: asyncio.Queue[Item] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def post(item: Item) -> None:  # from the model's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(items.put_nowait, item)

        try:
            job = self.worker.submit(ask, post)
        except Busy as exc:
            return error(503, f"busy: {exc}; try again later", {"Retry-After": "1"})
        reply = Reply(self.model_id, self.fingerprint)
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            if stream:
                first = await _next(items, gone, job)
                if not isinstance(first, Started):
                    return _failure(first)
                return StreamingResponse(self._events(job, items, reply, usage_chunk),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})  # fmt: skip
            return await self._whole(job, items, gone, reply)
        finally:
            gone.cancel()  # a stream's disconnect is starlette's to see from here

    async def _whole(self, job: Job, items: asyncio.Queue[Item], gone: asyncio.Future[None],
                     reply: Reply) -> Response:  # fmt: skip
        text, think = [], []
        while True:
            item = await _next(items, gone, job)
            if isinstance(item, Piece):
                (think if item.think else text).append(item.text)
            elif isinstance(item, Answered):
                self.say(_answer_line(item))
                return JSONResponse(reply.whole(item, "".join(text), "".join(think)))
            elif not isinstance(item, Started):
                return _failure(item)

    async def _events(self, job: Job, items: asyncio.Queue[Item], reply: Reply,
                      usage_chunk: bool) -> AsyncIterator[str]:  # fmt: skip
        """The SSE stream. Starlette cancels it when the client goes away: the job goes too."""
        try:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
            while True:
                item = await items.get()
                if isinstance(item, Piece):
                    key = "reasoning_content" if item.think else "content"
                    yield _sse(reply.chunk({key: item.text}))
                elif isinstance(item, Answered):
                    self.say(_answer_line(item))
                    for chunk in reply.last_chunks(item, usage_chunk):
                        yield _sse(chunk)
                    break
                elif isinstance(item, Failed | Refused):
                    yield _sse({"error": {"message": item.message, "type": "server_error"}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op once it is answered


async def _until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is read: what comes next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(items: asyncio.Queue[Item], gone: asyncio.Future[None], job: Job) -> Item | None:
    """The job's next item; None (and the job cancelled) when the client went away first."""
    get = asyncio.ensure_future(items.get())
    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    job.cancel()
    return None


def _failure(item: Item | None) -> Response:
    if isinstance(item, Refused):
        return error(item.status, item.message)
    if isinstance(item, Failed):
        return error(500, item.message)
    return Response(status_code=204)  # the client went away: nobody reads this


def _answer_line(done: Answered) -> str:
    s, f = done.stats, done.figures()
    return (f"answer {done.number}: {done.prompt_tokens:,} prompt tokens, {s.reused_tokens:,} "
            f"reused ({f['source']}), {s.prefilled_tokens:,} prefilled, {s.generated_tokens:,} "
            f"generated · ttft {s.ttft_s:.2f} s · {s.decode_tok_s:.1f} tok/s")  # fmt: skip


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Reply:
    """One request's answer in OpenAI's shapes: whole, or as stream chunks."""

    def __init__(self, model_id: str, fingerprint: str) -> None:
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": model_id, "system_fingerprint": fingerprint}  # fmt: skip

    def whole(self, done: Answered, text: str, think: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if think:
            message["reasoning_content"] = think
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason,
                  "logprobs": None}  # fmt: skip
        return {**self.head, "object": "chat.completion", "choices": [choice],
                "usage": _usage(done), "kvrepl": done.figures()}  # fmt: skip

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}

    def last_chunks(self, done: Answered, usage_chunk: bool) -> list[dict[str, Any]]:
        """The chunk with the finish reason, then (stream_options.include_usage) OpenAI's usage
        chunk; the figures ride on the last one."""
        figures = {"usage": _usage(done), "kvrepl": done.figures()}
        last = self.chunk({}, done.finish_reason)
        if not usage_chunk:
            return [{**last, **figures}]
        return [last, {**self.head, "object": "chat.completion.chunk", "choices": [], **figures}]


def _usage(done: Answered) -> dict[str, Any]:
    generated = done.stats.generated_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": generated,
            "total_tokens": done.prompt_tokens + generated,
            "prompt_tokens_details": {"cached_tokens": done.stats.reused_tokens}}  # fmt: skip


# -- a request, checked ---------------------------------------------------------------------
