"""The server's logic, between the routes (api.py) and the continuous-batching engine: validation, then a
whole response or a stream of Server-Sent Events, built from the models of protocol.py.

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

from fastapi import Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ..errors import OrionError
from ..generation.engine import Engine, Event, RequestFailed, TokenLogprob
from ..generation.engine import Request as EngineRequest
from ..generation.sampling import GenerationConfig
from ..generation.text import TextStream
from ..tokenizer import Tokenizer
from .metrics import ServerMetrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TopLogprob,
    Usage,
)

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class APIError(OrionError):
    """A client mistake: answered with `status` and OpenAI's error body (protocol.ErrorResponse)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class AsyncEngine:
    """An Engine stepped on its own thread. `submit` takes a group of requests (the choices of one HTTP
    request) and returns one asyncio.Queue that receives their Events, or an exception if the engine fails."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self.sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Step the engine on a thread of its own, until stop (a stopped engine starts again on a new thread)."""
        self.thread = threading.Thread(target=self._run, name="orionlm-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def check(self, requests: list[EngineRequest]) -> None:
        """Raise GenerationError for a request the engine could never run (reads only the model's config: safe
        from the handlers' thread)."""
        for request in requests:
            self.engine.check(request)

    def submit(self, requests: list[EngineRequest]) -> asyncio.Queue:
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
            except RequestFailed as e:  # a bug in some requests' own work: fail them alone, the rest go on
                for request, error in e.failures:
                    traceback.print_exception(error)
                    self._fail(request, error)
                events = e.events
            except Exception as e:  # a bug in the batch's forward pass: fail every request, keep serving
                traceback.print_exc()
                self._fail_all(e)
                continue
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            sink = self.sinks.get(event.request.id)
            if sink is None:
                continue
            loop, events_queue = sink
            loop.call_soon_threadsafe(events_queue.put_nowait, event)
            if event.finish_reason is not None:
                del self.sinks[event.request.id]

    def _fail(self, request: EngineRequest, error: Exception) -> None:
        """Fail one request (the engine has dropped it); its handler cancels the other choices of its group."""
        sink = self.sinks.pop(request.id, None)
        if sink is not None:
            loop, events_queue = sink
            loop.call_soon_threadsafe(events_queue.put_nowait, error)

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
    token_at: float | None = None  # when its handler received its last token (perf_counter seconds)

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
        self,
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        model_name: str,
        defaults: dict[str, Any] | None = None,
        max_choices: int = 64,
    ) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_choices = max_choices  # prompts x n of one request: one request cannot fill the engine for long
        self.config = engine.engine.model.config
        self.defaults = dict(defaults or {})
        self.eos_ids = set(GenerationConfig.from_dict(self.defaults).stop_token_ids)
        if tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        self.created = int(time.time())
        self.metrics = ServerMetrics(model_name, self.health)

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
        """n requests per prompt, validated (a 400 before any stream starts), in one group (the engine shares
        its rows fairly between groups); with a seed, choice j of a prompt samples with seed + j."""
        if len(prompts) * body.n > self.max_choices:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} asks for {len(prompts) * body.n} completions; "
                                f"this server takes at most {self.max_choices} per request: split it")  # fmt: skip
        stop_ids = frozenset() if body.ignore_eos else frozenset(self.eos_ids)
        requests: list[EngineRequest] = []
        group = None  # the first request's id, once it exists
        for prompt in prompts:
            config = self.generation_config(body, max_tokens, len(prompt), chat)
            for j in range(body.n):
                try:
                    seeded = config if config.seed is None else config.replace(seed=config.seed + j)
                except OrionError as e:
                    raise APIError(400, str(e), "seed") from None
                requests.append(EngineRequest(prompt, seeded, stop_ids, group=group, **extra))
                group = requests[0].group
        try:
            self.engine.check(requests)
        except OrionError as e:
            raise APIError(400, str(e)) from None
        return requests

    async def run(self, generation: Generation) -> AsyncIterator[tuple[Choice, Event, str]]:
        """(choice, event, new text) as tokens arrive, until every choice has finished; each token counted and
        timed in the metrics. A choice that a stop string ends is cancelled in the engine; whatever is left is
        cancelled if the consumer stops early (a client that disconnected)."""
        choices = generation.choices
        events = self.engine.submit([c.request for c in choices])
        started = time.perf_counter()
        self.metrics.prompt_tokens.inc(amount=sum(len(p) for p in generation.prompts))
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
                finished = choice.finish_reason is not None
                choice.token_at = self.metrics.token(started, choice.token_at, finished)
                if finished:
                    remaining -= 1
                    if event.finish_reason is None:
                        self.engine.cancel([choice.request])  # a stop string ended it
                yield choice, event, piece
        finally:
            unfinished = [c.request for c in choices if c.finish_reason is None]
            if unfinished:
                self.engine.cancel(unfinished)

    async def collect(self, generation: Generation, raw: Request) -> list[str]:
        """Every choice's whole text. Polls the connection while waiting: a client that hangs up before the
        answer is ready frees its rows at once, as a closed stream does."""
        texts = [""] * len(generation.choices)

        async def consume() -> None:
            async for choice, _, piece in self.run(generation):
                texts[choice.index] += piece

        task = asyncio.ensure_future(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await raw.is_disconnected():
                task.cancel()  # run's cleanup cancels the requests in the engine
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "the client closed the connection")
        task.result()
        return texts

    def health(self) -> Health:
        """Liveness, and the engine's load (read without locking: a snapshot)."""
        engine = self.engine.engine
        waiting = len(engine.waiting) + len(engine.prefilling)
        return Health(running=len(engine.running), waiting=waiting, cancelled=engine.cancelled)

    def models(self) -> ModelList:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.config.max_seq_len)
        return ModelList(data=[card])

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages")
        if body.messages is not None:
            tokens = self.chat_prompt(body.messages)
        else:
            tokens = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=self.config.max_seq_len)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        bad = [t for t in body.tokens if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary", "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        t = self.tokenizer
        return TokenizerInfo(vocab_size=t.vocab_size, bos_token=t.bos_token, eos_token=t.eos_token,
                             pad_token=t.pad_token, chat_template=t.chat_template,
                             model_max_length=self.config.max_seq_len)  # fmt: skip


@dataclass
class Generation:
    """One HTTP request's work: its prompts and choices (n per prompt), and its response's id, time and model."""

    prompts: list[list[int]]
    choices: list[Choice]
    head: dict[str, Any]  # id, created, model: what every chunk of a stream repeats

    @classmethod
    def start(cls, kind: str, server: Server, prompts: list[list[int]], requests: list[EngineRequest]) -> Generation:
        choices = [Choice(i, r, TextStream(server.tokenizer, r.config.stop)) for i, r in enumerate(requests)]
        head = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        return cls(prompts, choices, head)

    def usage(self) -> Usage:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(len(c.request.output) for c in self.choices)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)  # fmt: skip


def completion_prompts(server: Server, prompt: Any) -> list[list[int]]:
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


def echoed(
    server: Server, body: CompletionRequest, choice: Choice
) -> tuple[str, list[tuple[int, TokenLogprob | None]]]:
    """The prompt's text and (token, logprob) items when echo is on; nothing otherwise."""
    if not body.echo:
        return "", []
    prompt = choice.request.prompt
    values = choice.request.prompt_logprob_values or [None] * len(prompt)
    return server.tokenizer.decode(prompt), list(zip(prompt, values, strict=True))


def completion_logprobs(server: Server, items: list[tuple[int, TokenLogprob | None]]) -> CompletionLogprobs:
    """OpenAI's legacy completions logprobs of (token, its logprob or None) items."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for token, value in items:
        text = server.token_text(token)
        tokens.append(text)
        token_logprobs.append(None if value is None else value.logprob)
        top.append(None if value is None else {server.token_text(t): lp for t, lp in value.top})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)


def _top_logprob(server: Server, token: int, logprob: float) -> TopLogprob:
    text = server.token_text(token)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))


def chat_logprobs(server: Server, values: list[TokenLogprob]) -> ChatLogprobs:
    content = []
    for v in values:
        top = [_top_logprob(server, t, lp) for t, lp in v.top]
        content.append(ChatTokenLogprob(**_top_logprob(server, v.token, v.logprob).model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


def sse(payload: BaseModel | str) -> str:
    """A Server-Sent Event: a chunk's JSON, or the closing [DONE]."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload.model_dump())}\n\n"


def stream_end(body: SamplingFields, usage_chunk: BaseModel) -> list[str]:
    """A stream's last events: the usage chunk when asked for (stream_options.include_usage), then [DONE]."""
    usage = [sse(usage_chunk)] if body.stream_options and body.stream_options.include_usage else []
    return [*usage, sse("[DONE]")]


async def create_completion(
    server: Server, body: CompletionRequest, raw: Request
) -> CompletionResponse | AsyncIterator[str]:
    """/v1/completions: validated first (a mistake is a 400, never a broken stream), then the stream's events
    or the whole response."""
    server.check_model(body.model)
    prompts = await run_in_threadpool(completion_prompts, server, body.prompt)  # off the event loop: may be long
    echo_logprobs = body.echo and body.logprobs is not None
    requests = server.engine_requests(
        body, prompts, body.max_tokens, chat=False, logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if echo_logprobs else None,
    )  # fmt: skip
    generation = Generation.start("cmpl", server, prompts, requests)
    if body.stream:
        return completion_stream(server, body, generation)
    texts = await server.collect(generation, raw)
    choices = []
    for c in generation.choices:
        prefix, prompt_items = echoed(server, body, c)
        items = prompt_items + [(v.token, v) for v in c.logprobs]
        lp = completion_logprobs(server, items) if body.logprobs is not None else None
        choices.append(CompletionChoice(index=c.index, text=prefix + texts[c.index], logprobs=lp,
                                        finish_reason=c.finish_reason))  # fmt: skip
    return CompletionResponse(**generation.head, choices=choices, usage=generation.usage())


async def completion_stream(server: Server, body: CompletionRequest, generation: Generation) -> AsyncIterator[str]:
    """A chunk per choice whenever it has new text (the echoed prompt comes with its first) or finishes."""
    started: set[int] = set()
    async for choice, event, piece in server.run(generation):
        items = [(event.token, event.logprob)]
        if choice.index not in started:
            started.add(choice.index)
            prefix, prompt_items = echoed(server, body, choice)
            piece, items = prefix + piece, prompt_items + items
        if piece or choice.finish_reason:
            lp = completion_logprobs(server, items) if body.logprobs is not None else None
            chunk = CompletionChoice(index=choice.index, text=piece, logprobs=lp, finish_reason=choice.finish_reason)
            yield sse(CompletionStreamResponse(**generation.head, choices=[chunk]))
    usage = CompletionStreamResponse(**generation.head, choices=[], usage=generation.usage())
    for line in stream_end(body, usage):
        yield line


async def create_chat_completion(
    server: Server, body: ChatCompletionRequest, raw: Request
) -> ChatCompletionResponse | AsyncIterator[str]:
    """/v1/chat/completions: validated first, then the stream's events or the whole response."""
    server.check_model(body.model)
    prompts = [await run_in_threadpool(server.chat_prompt, body.messages)]
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = body.top_logprobs or 0
    requests = server.engine_requests(body, prompts, max_tokens, chat=True, logprobs=top if body.logprobs else None)
    generation = Generation.start("chatcmpl", server, prompts, requests)
    if body.stream:
        return chat_stream(server, body, generation)
    texts = await server.collect(generation, raw)
    choices = [
        ChatChoice(index=c.index, message=AssistantMessage(content=texts[c.index]),
                   logprobs=chat_logprobs(server, c.logprobs) if body.logprobs else None,
                   finish_reason=c.finish_reason)
        for c in generation.choices
    ]  # fmt: skip
    return ChatCompletionResponse(**generation.head, choices=choices, usage=generation.usage())


async def chat_stream(server: Server, body: ChatCompletionRequest, generation: Generation) -> AsyncIterator[str]:
    """Each choice's role first, then a chunk per choice whenever it has new text or finishes."""
    for i in range(len(generation.choices)):
        role = ChatStreamChoice(index=i, delta=Delta(role="assistant", content=""), logprobs=None, finish_reason=None)
        yield sse(ChatCompletionStreamResponse(**generation.head, choices=[role]))
    async for choice, event, piece in server.run(generation):
        if piece or choice.finish_reason:
            lp = chat_logprobs(server, [event.logprob]) if event.logprob is not None else None
            delta = Delta(content=piece) if piece else Delta()
            chunk = ChatStreamChoice(index=choice.index, delta=delta, logprobs=lp, finish_reason=choice.finish_reason)
            yield sse(ChatCompletionStreamResponse(**generation.head, choices=[chunk]))
    usage = ChatCompletionStreamResponse(**generation.head, choices=[], usage=generation.usage())
    for line in stream_end(body, usage):
        yield line
