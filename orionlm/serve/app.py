"""The OpenAI-compatible HTTP API over the continuous-batching engine.

The engine runs on one thread of its own (`AsyncEngine`); request handlers submit to it through a queue and
read their tokens back from an asyncio.Queue, so a slow client never holds up the batch and one bad
request never reaches the engine. Text is produced per choice by `TextStream` (stop strings are cut and
never sent, not even in part); a stop token ends a choice without being part of its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import OrionError
from ..generation.engine import Engine, Event, TokenLogprob
from ..generation.engine import Request as EngineRequest
from ..generation.sampling import GenerationConfig
from ..generation.text import TextStream
from ..tokenizer import Tokenizer
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class APIError(Exception):
    """A client mistake: answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class AsyncEngine:
    """An Engine stepped on its own thread. `submit` takes a group of requests (the choices of one HTTP
    request) and returns one asyncio.Queue that receives their Events, or an exception if the engine fails."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self.sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.thread = threading.Thread(target=self._run, name="orionlm-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def submit(self, requests: list[EngineRequest]) -> asyncio.Queue:
        for request in requests:
            self.engine.check(request)  # raises GenerationError here, in the handler: a 400
        events: asyncio.Queue = asyncio.Queue()
        self.inbox.put(("submit", (requests, asyncio.get_running_loop(), events)))
        return events

    def cancel(self, requests: list[EngineRequest]) -> None:
        self.inbox.put(("cancel", requests))

    def _run(self) -> None:
        while True:
            try:
                item = self.inbox.get(block=not self.engine.has_work)
            except queue.Empty:
                item = ("idle", None)
            while item is not None:
                kind, payload = item
                if kind == "submit":
                    requests, loop, events = payload
                    for request in requests:
                        self.sinks[request.id] = (loop, events)
                        self.engine.submit(request)
                elif kind == "cancel":
                    for request in payload:
                        self.engine.cancel(request)
                        self.sinks.pop(request.id, None)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
            if item is None:
                return
            try:
                events = self.engine.step()
            except Exception as e:  # a bug, not a client mistake: fail the running requests, keep serving
                traceback.print_exc()
                self._fail_all(e)
                continue
            for event in events:
                sink = self.sinks.get(event.request.id)
                if sink is None:
                    continue
                loop, events_queue = sink
                loop.call_soon_threadsafe(events_queue.put_nowait, event)
                if event.finish_reason is not None:
                    del self.sinks[event.request.id]

    def _fail_all(self, error: Exception) -> None:
        for request in [*self.engine.waiting, *(p.request for p in self.engine.prefilling)]:
            request.cancelled = True
        for running in self.engine.running:
            running.request.cancelled = True
        self.engine.step()  # drops them all
        for loop, events_queue in self.sinks.values():
            loop.call_soon_threadsafe(events_queue.put_nowait, error)
        self.sinks.clear()


@dataclass
class Choice:
    """One generated sequence of a response, turned into text as its tokens arrive."""

    index: int
    request: EngineRequest
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def push(self, event: Event) -> str:
        """The text this event adds; sets finish_reason when the choice ends (a stop string included)."""
        self.tokens.append(event.token)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        stop_token = event.finish_reason == "stop"
        piece = "" if stop_token else self.text.push(event.token)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        if self.finish_reason is not None:
            piece += self.text.flush()
        return piece


class Server:
    """What the routes need: the model's name, tokenizer, engine and generation defaults."""

    def __init__(
        self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, defaults: dict[str, Any] | None = None
    ) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.config = engine.engine.model.config
        self.defaults = dict(defaults or {})
        self.eos_ids = set(GenerationConfig.from_dict(self.defaults).stop_token_ids)
        if tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.model_name!r}",
                           "model", "model_not_found")  # fmt: skip

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """Messages rendered with the chat template (which carries its own special tokens), as token ids."""
        try:
            text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages])
        except (ValueError, OrionError) as e:
            raise APIError(400, str(e), "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def generation_config(self, body: SamplingFields, max_tokens: int | None, prompt_len: int, chat: bool):
        """The request's sampling settings: its own values, else the model's generation_config.json, else
        OpenAI's defaults (max_tokens 16 for completions, the rest of the context for chat)."""
        base = {k: v for k, v in self.defaults.items() if k != "eos_token_id"}
        config = GenerationConfig.from_dict(base)
        if max_tokens is None:
            room = self.config.max_seq_len - prompt_len
            max_tokens = min(base.get("max_new_tokens", room if chat else 16), room)
            if max_tokens < 1:
                where = "messages" if chat else "prompt"
                message = f"the prompt fills the whole context ({prompt_len} tokens): no room to generate"
                raise APIError(400, message, where)
        values: dict[str, Any] = {"max_new_tokens": max_tokens}
        for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                    "repetition_penalty", "seed", "think"):  # fmt: skip
            value = getattr(body, key)
            if value is not None:
                values[key] = value
        if values.get("top_k") == -1:  # vLLM's "off"
            values["top_k"] = 0
        if body.temperature is not None and body.temperature > 0:
            values["do_sample"] = True
        values["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        values["stop_token_ids"] = list(body.stop_token_ids or [])
        values["logit_bias"] = dict(body.logit_bias or {})
        try:
            return config.replace(**values)
        except OrionError as e:
            raise APIError(400, str(e)) from None

    def engine_requests(
        self, body: SamplingFields, prompts: list[list[int]], max_tokens: int | None, chat: bool, **extra: Any
    ) -> list[EngineRequest]:
        """n requests per prompt; with a seed, choice j of a prompt samples with seed + j."""
        stop_ids = frozenset() if body.ignore_eos else frozenset(self.eos_ids)
        requests = []
        for prompt in prompts:
            config = self.generation_config(body, max_tokens, len(prompt), chat)
            for j in range(body.n):
                seeded = config if config.seed is None else config.replace(seed=config.seed + j)
                requests.append(EngineRequest(prompt, seeded, stop_ids, **extra))
        return requests

    async def run(self, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Event, str]]:
        """(choice, event, new text) as tokens arrive, until every choice has finished. A choice that a stop
        string ends is cancelled in the engine; whatever is left is cancelled if the consumer stops early
        (a client that disconnected)."""
        requests = [c.request for c in choices]
        try:
            events = self.engine.submit(requests)
        except OrionError as e:
            raise APIError(400, str(e)) from None
        by_id = {c.request.id: c for c in choices}
        remaining = len(choices)
        try:
            while remaining:
                event = await events.get()
                if isinstance(event, Exception):
                    raise event
                choice = by_id[event.request.id]
                if choice.finish_reason is not None:
                    continue  # a token picked before its cancellation reached the engine
                piece = choice.push(event)
                if choice.finish_reason is not None:
                    remaining -= 1
                    if event.finish_reason is None:
                        self.engine.cancel([choice.request])  # a stop string ended it
                yield choice, event, piece
        finally:
            unfinished = [c.request for c in choices if c.finish_reason is None]
            if unfinished:
                self.engine.cancel(unfinished)


async def _collect(server: Server, choices: list[Choice], raw: Request) -> list[str]:
    """Every choice's whole text. Polls the connection while waiting: a client that hangs up before the
    answer is ready frees its rows at once, as a closed stream does."""
    texts = [""] * len(choices)

    async def consume() -> None:
        async for choice, _, piece in server.run(choices):
            texts[choice.index] += piece

    task = asyncio.ensure_future(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await raw.is_disconnected():
            task.cancel()  # server.run's cleanup cancels the requests in the engine
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "the client closed the connection")
    task.result()
    return texts


def _completion_prompts(server: Server, prompt: Any) -> list[list[int]]:
    """A prompt as text, texts, token ids or lists of token ids -> token id lists."""
    if isinstance(prompt, str):
        return [server.tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [server.tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [list(p) for p in prompt]


def _completion_logprobs(server: Server, items: list[tuple[int, TokenLogprob | None]]) -> dict:
    """OpenAI's legacy completions logprobs of (token, its logprob or None) items: tokens, token_logprobs,
    top_logprobs, text_offset."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for token, value in items:
        text = server.token_text(token)
        tokens.append(text)
        token_logprobs.append(None if value is None else value.logprob)
        top.append(None if value is None else {server.token_text(t): lp for t, lp in value.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(server: Server, values: list[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = server.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [entry(v.token, v.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in v.top]}
                        for v in values]}  # fmt: skip


def _usage(requests: list[EngineRequest], prompts: list[list[int]]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(r.output) for r in requests)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _sse_end(body: SamplingFields, head: dict, requests: list[EngineRequest], prompts: list[list[int]]) -> list[str]:
    """A stream's last events: the usage chunk when asked for (stream_options.include_usage), then [DONE]."""
    usage = [_sse(head | {"choices": [], "usage": _usage(requests, prompts)})]
    return (usage if body.stream_options and body.stream_options.include_usage else []) + [_sse("[DONE]")]


def create_app(server: Server, api_key: str | None = None, ready_message: str | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread and prints `ready_message`."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        if ready_message:
            print(ready_message, flush=True)
        yield
        server.engine.stop()

    async def authenticate(request: Request) -> None:
        # a dependency rather than an HTTP middleware: Starlette's middleware wrapper hides disconnects
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")  # fmt: skip

    app = FastAPI(title="orionlm", docs_url=None, redoc_url=None, lifespan=lifespan,
                  dependencies=[Depends(authenticate)])  # fmt: skip

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        return error_response(400, f"{where}: {message}" if where else message, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.get("/health")
    async def health() -> dict:
        """Liveness, and the engine's load (read without locking: a snapshot)."""
        engine = server.engine.engine
        waiting = len(engine.waiting) + len(engine.prefilling)
        return {"status": "ok", "running": len(engine.running), "waiting": waiting, "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "orionlm",
                "max_model_len": server.config.max_seq_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        server.check_model(body.model)
        prompts = _completion_prompts(server, body.prompt)
        echo_logprobs = body.echo and body.logprobs is not None
        requests = server.engine_requests(
            body, prompts, body.max_tokens, chat=False, logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if echo_logprobs else None,
        )  # fmt: skip
        choices = [Choice(i, r, TextStream(server.tokenizer, r.config.stop)) for i, r in enumerate(requests)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}

        def echoed(choice: Choice) -> tuple[str, list[tuple[int, TokenLogprob | None]]]:
            """The prompt's text and (token, logprob) items, when echo is on."""
            if not body.echo:
                return "", []
            prompt = choice.request.prompt
            values = choice.request.prompt_logprob_values or [None] * len(prompt)
            return server.tokenizer.decode(prompt), list(zip(prompt, values, strict=True))

        if body.stream:

            async def sse() -> AsyncIterator[str]:
                started: set[int] = set()
                async for choice, event, piece in server.run(choices):
                    items = [(event.token, event.logprob)]
                    if choice.index not in started:
                        started.add(choice.index)
                        prefix, prompt_items = echoed(choice)
                        piece, items = prefix + piece, prompt_items + items
                    if piece or choice.finish_reason:
                        lp = _completion_logprobs(server, items) if body.logprobs is not None else None
                        chunk = {"index": choice.index, "text": piece, "logprobs": lp,
                                 "finish_reason": choice.finish_reason}  # fmt: skip
                        yield _sse(head | {"choices": [chunk]})
                for line in _sse_end(body, head, requests, prompts):
                    yield line

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts = await _collect(server, choices, raw)
        out = []
        for c in choices:
            prefix, prompt_items = echoed(c)
            items = prompt_items + [(v.token, v) for v in c.logprobs]
            lp = _completion_logprobs(server, items) if body.logprobs is not None else None
            out.append({"index": c.index, "text": prefix + texts[c.index], "logprobs": lp,
                        "finish_reason": c.finish_reason})  # fmt: skip
        return head | {"choices": out, "usage": _usage(requests, prompts)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        server.check_model(body.model)
        prompts = [server.chat_prompt(body.messages)]
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = body.top_logprobs or 0
        requests = server.engine_requests(body, prompts, max_tokens, chat=True, logprobs=top if body.logprobs else None)
        choices = [Choice(i, r, TextStream(server.tokenizer, r.config.stop)) for i, r in enumerate(requests)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": server.model_name}

        if body.stream:

            async def sse() -> AsyncIterator[str]:
                chunk_head = head | {"object": "chat.completion.chunk"}
                for i in range(len(choices)):
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}  # fmt: skip
                    yield _sse(chunk_head | {"choices": [role]})
                async for choice, event, piece in server.run(choices):
                    if piece or choice.finish_reason:
                        lp = _chat_logprobs(server, [event.logprob]) if event.logprob is not None else None
                        delta = {"content": piece} if piece else {}
                        chunk = {"index": choice.index, "delta": delta, "logprobs": lp,
                                 "finish_reason": choice.finish_reason}  # fmt: skip
                        yield _sse(chunk_head | {"choices": [chunk]})
                for line in _sse_end(body, chunk_head, requests, prompts):
                    yield line

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts = await _collect(server, choices, raw)
        out = [
            {"index": c.index, "message": {"role": "assistant", "content": texts[c.index]},
             "logprobs": _chat_logprobs(server, c.logprobs) if body.logprobs else None,
             "finish_reason": c.finish_reason}
            for c in choices
        ]  # fmt: skip
        return head | {"object": "chat.completion", "choices": out, "usage": _usage(requests, prompts)}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages")
        if body.messages is not None:
            tokens = server.chat_prompt(body.messages)
        else:
            tokens = server.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.config.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        bad = [t for t in body.tokens if not 0 <= t < server.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary", "tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        t = server.tokenizer
        return {"tokenizer_class": "orionlm.Tokenizer", "vocab_size": t.vocab_size, "bos_token": t.bos_token,
                "eos_token": t.eos_token, "pad_token": t.pad_token, "chat_template": t.chat_template,
                "model_max_length": server.config.max_seq_len}  # fmt: skip

    return app
