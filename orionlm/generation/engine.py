"""Continuous batching: requests join and leave the running batch between decode steps.

The engine behind the server, `orionlm generate` and `orionlm bench`. Each `Engine.step()`:

1. drops cancelled requests (a client that went away frees its row at once);
2. admits waiting requests while the running batch has a free row and the cached-token budget (prompt +
   max_new_tokens of every admitted request) has room: fairly between groups (a group is the choices of one
   HTTP request), each free row going to the waiting request whose group holds the fewest rows, the oldest
   first among equals; so a request of 250 prompts x n=16 takes the rows nobody else asks for, and a small
   request that arrives after it starts at the next free row instead of after all of it;
3. prefills one chunk (at most `prefill_chunk` tokens) of the oldest admitted prompt, on a cache of its
   own, so a long prompt delays the running requests by one chunk per step rather than by all of it;
   a finished prefill picks its first token and joins the batch (`RaggedCache.add`);
4. decodes one token for every running request in a single forward pass, each row at its own length.

An error in one request's own work (its prefill, its sampler, its token pick, a thought's pick) drops that
request alone: `step` raises RequestFailed naming it, and carrying the tokens the others got in that step.
An error in the batched forward pass itself cannot be pinned on one request and propagates as it is.

A thinking (Quiet-STaR) model writes a thought before each token of the requests that think (their
`config.think`), all rows at once on the same cache, which then rewinds (orionlm.generation.thinking).

Every request has its own sampling settings, seed and stop tokens, so its tokens do not depend on what
else runs beside it (greedy output equals `generate_ids` alone; tested).
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import OrionLM
from ..nn.cache import KVCache, RaggedCache
from ..nn.linear import use_decode_layout
from .sampling import GenerationConfig, GenerationError, Sampler, process_logits
from .thinking import think, thought_slots

_ids = itertools.count()


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before any sampling setting), with the
    `top` most likely tokens at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Request:
    """One sequence to generate. `stop_ids` ends it when picked (the token is part of the output), on top of
    config.stop_token_ids; `logprobs` asks for each generated token's log-probability and that many
    alternatives; `prompt_logprobs` the same for the prompt tokens (the first has none)."""

    prompt: list[int]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    id: int = field(default_factory=lambda: next(_ids))
    group: int | None = None  # requests sharing rows fairly as one (one HTTP request's choices); None: its own id
    # Filled in by the engine
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_new_tokens)
    prompt_logprob_values: list[TokenLogprob | None] | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        if self.group is None:
            self.group = self.id

    @property
    def length(self) -> int:
        """The most tokens the sequence can reach: prompt and output."""
        return len(self.prompt) + self.config.max_new_tokens


@dataclass
class Event:
    """A token picked for a request; `finish_reason` is set on its last token. A thinking request's
    `thought` holds the tokens it thought before this one."""

    request: Request
    token: int
    logprob: TokenLogprob | None
    finish_reason: str | None
    thought: list[int] | None = None


class _Running:
    """A request's sampling state while it runs."""

    def __init__(self, request: Request, vocab: int, device: torch.device, unseen: torch.Tensor | None) -> None:
        self.request = request
        self.unseen = unseen  # token ids never output (a thinking model's meta tokens)
        config = request.config
        self.stop_ids = request.stop_ids | set(config.stop_token_ids)
        self.sampler = Sampler(config, 1, device)
        self.seen = self.counts = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, request.prompt] = True
        if config.presence_penalty or config.frequency_penalty:
            self.counts = torch.zeros(1, vocab, dtype=torch.int32, device=device)
        self.bias = None
        if config.logit_bias:
            self.bias = torch.zeros(1, vocab, device=device)
            for token, value in config.logit_bias.items():
                self.bias[0, token] = value

    def pick(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None, str | None]:
        """The next token from float32 logits (1, V), its log-probability if asked, and why the request
        ends with it (None: it goes on)."""
        request, config = self.request, self.request.config
        if self.unseen is not None:
            logits = logits.index_fill(-1, self.unseen, float("-inf"))
        logprob = None
        if request.logprobs is not None:
            logprob = torch.log_softmax(logits[0], dim=-1)
        processed = logits if self.bias is None else logits + self.bias
        token = int(self.sampler(process_logits(processed, config, self.seen, self.counts))[0])
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
        request.output.append(token)
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        elif len(request.output) >= config.max_new_tokens:
            finish = "length"
        request.finish_reason = finish
        return token, None if logprob is None else _token_logprob(logprob, token, request.logprobs), finish

    def pick_thought(self, logits: torch.Tensor) -> torch.Tensor:
        """A thought token (1,) from float32 logits (1, V): the sampling settings without penalties or bias."""
        return self.sampler(process_logits(logits, self.request.config))


def _guarded(errors: dict[int, Exception], row: int, pick: Callable[[torch.Tensor], Any], logits: torch.Tensor,
             fallback: Any) -> Any:  # fmt: skip
    """pick(logits), or `fallback` with the error kept in errors[row]: one row's failure stays its own."""
    try:
        return pick(logits)
    except Exception as e:
        errors[row] = e
        return fallback


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    best = torch.topk(logprobs, top) if top else None
    alternatives = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


class RequestFailed(GenerationError):
    """Errors in some requests' own work (a prefill chunk, a sampler, a token pick), raised from Engine.step
    after those requests were dropped. `failures` pairs each with its error (the first error is also the
    __cause__); `events` are the tokens the other requests got in the same step, to deliver as step's result."""

    def __init__(self, failures: list[tuple[Request, Exception]], events: list[Event]) -> None:
        super().__init__(f"requests {[request.id for request, _ in failures]} failed")
        self.failures, self.events = failures, events


@dataclass
class _Prefill:
    request: Request
    cache: KVCache
    done: int = 0  # prompt tokens fed so far
    last_logits: torch.Tensor | None = None  # (V,) float32 at the last fed position


class Engine:
    """Continuous batching over one model. Not thread-safe: one thread submits, steps and cancels (the
    server runs it on its own thread and talks to it through a queue)."""

    def __init__(
        self,
        model: OrionLM,
        max_batch: int = 16,
        max_cached_tokens: int | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise GenerationError(f"max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) must be >= 1")
        self.model = model.eval()
        self.meta_ids = None
        if model.config.thinks:
            self.meta_ids = torch.tensor(
                [model.config.thought_start_id, model.config.thought_end_id], device=model.device
            )
        if model.device.type == "cpu":
            use_decode_layout(model)
        self.max_batch = max_batch
        self.max_cached_tokens = max_cached_tokens or max_batch * model.config.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[_Prefill] = deque()
        self.running: list[_Running] = []  # row i of self.cache
        self.cache = RaggedCache()
        self.cancelled = 0  # requests dropped unfinished so far

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def submit(self, request: Request, name: str = "the prompt") -> None:
        """Queue a request; raises GenerationError (before anything runs) for one that can never run."""
        self.check(request, name)
        self.waiting.append(request)

    def check(self, request: Request, name: str = "the prompt") -> None:
        """Raise GenerationError if the request can never run (bad tokens, too long for the context or the
        cache); `name` is how the message calls the prompt. Reads only the model's config: safe from any
        thread."""
        config, vocab = self.model.config, self.model.config.vocab_size
        if not request.prompt:
            raise GenerationError(f"{name} is empty; it needs at least one token (e.g. BOS)")
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"{name} has token ids {bad[:5]} outside the vocabulary (0..{vocab - 1})")
        if request.length > config.max_seq_len:
            raise GenerationError(
                f"{name} has {len(request.prompt)} tokens; with max_new_tokens={request.config.max_new_tokens} "
                f"that is {request.length} > the model's max_seq_len ({config.max_seq_len}): shorten "
                "the prompt or lower max_new_tokens to fit the context"
            )
        if self.reserved(request) > self.max_cached_tokens:
            raise GenerationError(
                f"the request needs {self.reserved(request)} cached tokens; the engine holds {self.max_cached_tokens}"
            )
        bias = [t for t in request.config.logit_bias if not 0 <= t < vocab]
        if bias:
            raise GenerationError(f"logit_bias names token ids {bias[:5]} outside the vocabulary (0..{vocab - 1})")

    def reserved(self, request: Request) -> int:
        """Cache positions the request may hold: prompt, output and, when it thinks, a thought."""
        return request.length + thought_slots(self.model, request.config)

    def cancel(self, request: Request) -> None:
        """Stop a request; its row is freed at the next step."""
        request.cancelled = True

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One round of admission, a prefill chunk and a decode step; returns the tokens picked, or raises
        RequestFailed (holding them) if some requests' own work failed."""
        self._drop_cancelled()
        self._admit()
        failures: list[tuple[Request, Exception]] = []
        events = self._prefill_chunk(failures)
        if self.running:
            events += self._decode(failures)
        if failures:
            raise RequestFailed(failures, events) from failures[0][1]
        return events

    def _drop_cancelled(self) -> None:
        before = len(self.waiting) + len(self.prefilling) + len(self.running)
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        self.prefilling = deque(p for p in self.prefilling if not p.request.cancelled)
        for row in reversed(range(len(self.running))):
            if self.running[row].request.cancelled:
                self._remove(row)
        self.cancelled += before - len(self.waiting) - len(self.prefilling) - len(self.running)

    def _admit(self) -> None:
        admitted = [r.request for r in self.running] + [p.request for p in self.prefilling]
        reserved = sum(self.reserved(r) for r in admitted)
        rows = Counter(r.group for r in admitted)
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch:
            # the fewest rows first, then the oldest (min keeps the first of equals); a request that does not fit
            # the cache budget waits for room rather than let later ones pass it for ever
            request = min(self.waiting, key=lambda r: rows[r.group])
            if reserved + self.reserved(request) > self.max_cached_tokens:
                break
            self.waiting.remove(request)
            rows[request.group] += 1
            reserved += self.reserved(request)
            cache = self.model.new_cache(1, len(request.prompt) + thought_slots(self.model, request.config))
            self.prefilling.append(_Prefill(request, cache))
            if request.prompt_logprobs is not None:
                request.prompt_logprob_values = [None]

    def _prefill_chunk(self, failures: list[tuple[Request, Exception]]) -> list[Event]:
        """A chunk of the oldest prefill: one request's own work, so an error in it drops that request alone
        (added to `failures`; the running requests lose nothing)."""
        if not self.prefilling:
            return []
        job = self.prefilling[0]
        try:
            return self._prefill(job)
        except Exception as e:
            if self.prefilling and self.prefilling[0] is job:
                self.prefilling.popleft()
            failures.append((job.request, e))
            return []

    def _prefill(self, job: _Prefill) -> list[Event]:
        request = job.request
        chunk = request.prompt[job.done : job.done + self.prefill_chunk]
        ids = torch.tensor([chunk], device=self.model.device)
        want_all = request.prompt_logprobs is not None
        thinks = thought_slots(self.model, request.config) > 0
        out = self.model(ids, cache=job.cache, logits_to_keep=0 if want_all else 1, output_hidden=thinks)
        logits = out.logits[0].float()
        if want_all:
            logprobs = torch.log_softmax(torch.cat([job.last_logits[None], logits]) if job.done else logits, -1)
            targets = request.prompt[job.done + (0 if job.done else 1) : job.done + len(chunk)]
            request.prompt_logprob_values += [
                _token_logprob(lp, t, request.prompt_logprobs) for lp, t in zip(logprobs, targets, strict=False)
            ]
        job.done += len(chunk)
        job.last_logits = logits[-1]
        if job.done < len(request.prompt):
            return []
        self.prefilling.popleft()
        running = _Running(request, self.model.config.vocab_size, self.model.device, self.meta_ids)
        logits, thought = job.last_logits[None], None
        if thinks:
            logits, thoughts = think(self.model, job.cache, out.hidden[0, -1:], running.pick_thought)
            thought = thoughts[0].tolist()
        token, logprob, finish = running.pick(logits)
        if finish is None:
            self.cache.add(job.cache)
            self.running.append(running)
        return [Event(request, token, logprob, finish, thought)]

    def _decode(self, failures: list[tuple[Request, Exception]]) -> list[Event]:
        """A token for every running request: one forward pass for all (an error there fails them all), then each
        row's own pick (an error there drops that row alone, added to `failures`)."""
        tokens = torch.tensor([[r.request.output[-1]] for r in self.running], device=self.model.device)
        self.cache.reserve_step()
        thinking = [thought_slots(self.model, r.request.config) > 0 for r in self.running]
        out = self.model(tokens, cache=self.cache, output_hidden=any(thinking))
        logits = out.logits[:, -1].float()  # (rows, V)
        errors: dict[int, Exception] = {}  # row -> the error of its own pick
        thoughts = None
        if any(thinking):
            # Every row thinks (one batch on one cache); rows whose requests do not think (or whose pick failed)
            # keep their base logits, and think greedily so that their samplers' draws stay their own text's.
            def pick(rows_logits: torch.Tensor) -> torch.Tensor:
                picked = []
                for row, (running, row_logits) in enumerate(zip(self.running, rows_logits.split(1), strict=True)):
                    token = row_logits.argmax(-1)
                    if thinking[row] and row not in errors:
                        token = _guarded(errors, row, running.pick_thought, row_logits, token)
                    picked.append(token)
                return torch.cat(picked)

            mixed, thoughts = think(self.model, self.cache, out.hidden[:, -1], pick)
            use = torch.tensor(thinking, device=logits.device).view(-1, 1)
            logits = torch.where(use, mixed, logits)
        events, finished = [], []
        for row, running in enumerate(self.running):
            picked = None if row in errors else _guarded(errors, row, running.pick, logits[row : row + 1], None)
            if picked is None:
                failures.append((running.request, errors[row]))
                finished.append(row)
                continue
            token, logprob, finish = picked
            thought = thoughts[row].tolist() if thinking[row] else None
            events.append(Event(running.request, token, logprob, finish, thought))
            if finish is not None:
                finished.append(row)
        for row in reversed(finished):
            self._remove(row)
        return events

    def _remove(self, row: int) -> None:
        """Free a row: the last running request moves into it, in the cache and here alike."""
        self.cache.remove(row)
        last = self.running.pop()
        if row < len(self.running):
            self.running[row] = last
