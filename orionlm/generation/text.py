"""Generation from Python: `generate_ids`, `generate` and `stream`, thin loops over the continuous-batching
`Engine` (orionlm.generation.engine), and the text side: incremental detokenization and stop strings.

Rows stop independently (stop token ids in the engine, stop strings in `TextStream`); a finished row leaves
the batch, so the others stop paying for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..model import OrionLM
from ..tokenizer import Tokenizer
from .engine import Engine, Request
from .sampling import GenerationConfig, GenerationError

REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


def resolve_config(
    model: OrionLM | None = None,
    defaults: GenerationConfig | dict[str, Any] | None = None,
    config: GenerationConfig | None = None,
    **sampling: Any,
) -> GenerationConfig:
    """Settings by precedence: keyword arguments > `config` > `defaults` > the model's
    generation_config.json (`model.generation_defaults`) > GenerationConfig's own defaults."""
    if config is None:
        if isinstance(defaults, GenerationConfig):
            config = defaults
        else:
            data = dict(getattr(model, "generation_defaults", None) or {})
            data.update(defaults or {})
            config = GenerationConfig.from_dict(data)
    return config.replace(**sampling) if sampling else config


def generate_ids(
    model: OrionLM,
    prompts: list[list[int]],
    max_new_tokens: int | None = None,
    config: GenerationConfig | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """New token ids for each prompt (token id lists, any lengths), generated as one continuous batch.

    Settings come from `config` (default: GenerationConfig()) updated with the keyword arguments; the
    model's generation defaults are not read here. Each row stops at its first stop token, which is
    included in its output (as transformers' generate does), or after max_new_tokens.
    """
    if max_new_tokens is not None:
        sampling["max_new_tokens"] = max_new_tokens
    config = (config or GenerationConfig()).replace(**sampling)
    engine, requests = _start(model, prompts, config)
    while engine.has_work:
        engine.step()
    return [request.output for request in requests]


def _start(
    model: OrionLM, prompts: list[list[int]], config: GenerationConfig, stop_ids: list[int] = ()
) -> tuple[Engine, list[Request]]:
    """An engine running every prompt at once; raises GenerationError for a bad prompt before anything runs."""
    if not prompts:
        raise GenerationError("no prompts were given")
    engine = Engine(model, max_batch=len(prompts))
    requests = [Request(prompt, config, frozenset(stop_ids)) for prompt in prompts]
    for i, request in enumerate(requests):
        engine.submit(request, f"prompt {i}")
    return engine, requests


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that never split a UTF-8 character.

    Decoding one token at a time breaks multi-byte characters (byte tokens) and drops the leading
    space that SentencePiece-style decoders strip at the start of a sequence. So each new piece is the
    difference between two decodes that share a few tokens of context (`prefix`..`read`), and a piece
    is held back while its text ends in U+FFFD, the mark of an incomplete byte sequence.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context tokens
        self.read = 0  # tokens before this are already emitted as text

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character stays a U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]


class TextStream:
    """The text of one generated sequence, piece by piece, cut at the first stop string.

    Text that could be the start of a stop string is held back until it is known not to be one, so
    a stop string is never emitted, not even in part.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.pending = ""  # decoded text not yet emitted
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.detokenizer.push(token)
        return self._emit()

    def flush(self) -> str:
        if not self.stopped:
            self.pending += self.detokenizer.flush()
        piece = self._emit()
        if not self.stopped:
            piece, self.pending = piece + self.pending, ""
        return piece

    def _emit(self) -> str:
        if not self.stop:
            piece, self.pending = self.pending, ""
            return piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            piece, self.pending = self.pending[: min(hits)], ""
            return piece
        hold = max((_overlap(self.pending, s) for s in self.stop), default=0)
        piece, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return piece


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _start_text(
    model: OrionLM, tokenizer: Tokenizer, prompts: list[str], config: GenerationConfig
) -> tuple[Engine, list[Request], list[TextStream]]:
    """Encode the prompts and set up their generation; errors surface here, before any text."""
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    engine, requests = _start(model, ids, config, stop_ids)
    return engine, requests, [TextStream(tokenizer, config.stop) for _ in prompts]


def _text_pieces(
    engine: Engine, requests: list[Request], streams: list[TextStream], tokenizer: Tokenizer
) -> Iterator[tuple[int, str, str]]:
    """(prompt index, thought, text piece) as the tokens of each row are generated; the thought is the text
    a thinking model thought before the piece's token ("" when it did not think)."""
    row_of = {request.id: row for row, request in enumerate(requests)}
    while engine.has_work:
        for event in engine.step():
            if event.finish_reason == "stop":  # a stop token: it ends the text, it is not part of it
                continue
            row = row_of[event.request.id]
            piece = streams[row].push(event.token)
            thought = tokenizer.decode(event.thought) if event.thought else ""
            if piece or thought:
                yield row, thought, piece
            if streams[row].stopped:
                engine.cancel(event.request)  # before the next step: no forward pass for this row's last token
    for row, text_stream in enumerate(streams):
        piece = text_stream.flush()
        if piece:
            yield row, "", piece


def stream_thoughts(
    model: OrionLM,
    tokenizer: Tokenizer,
    prompts: list[str],
    defaults: GenerationConfig | dict[str, Any] | None = None,
    **sampling: Any,
) -> Iterator[tuple[int, str, str]]:
    """Like `stream` for a batch of prompts, with the thoughts: (prompt index, thought, text piece), where
    the thought is what a thinking model thought before the piece's token ("" for a model that does not
    think, or with think=False)."""
    started = _start_text(model, tokenizer, prompts, resolve_config(model, defaults, **sampling))
    return _text_pieces(*started, tokenizer)


def stream(
    model: OrionLM,
    tokenizer: Tokenizer,
    device: torch.device | str | None,
    prompt: str | list[str],
    defaults: GenerationConfig | dict[str, Any] | None = None,
    **sampling: Any,
) -> Iterator[str] | Iterator[tuple[int, str]]:
    """Text pieces of the continuation of `prompt` as they are generated (a list of prompts is generated as one
    batch and gives (prompt index, piece) pairs). The arguments are generate's.

    Generation ends at a stop token (the config's or the tokenizer's EOS), at a stop string (not emitted) or at
    max_new_tokens. Bad settings, prompts or devices raise GenerationError here, not at the first piece.
    """
    _check_device(model, device)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    started = _start_text(model, tokenizer, prompts, resolve_config(model, defaults, **sampling))
    pieces = ((row, piece) for row, _, piece in _text_pieces(*started, tokenizer) if piece)
    return (piece for _, piece in pieces) if isinstance(prompt, str) else pieces


def generate(
    model: OrionLM,
    tokenizer: Tokenizer,
    device: torch.device | str | None,
    prompt: str | list[str],
    defaults: GenerationConfig | dict[str, Any] | None = None,
    **sampling: Any,
) -> str | list[str]:
    """The continuation of `prompt` (a list of prompts is generated as one batch and gives a list).

    Settings: keyword arguments > `defaults` > the model's generation_config.json > GenerationConfig().
    Stop tokens and stop strings are not part of the returned text. `device` must be the model's
    (None: wherever the model is).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [""] * len(prompts)
    for row, piece in stream(model, tokenizer, device, prompts, defaults, **sampling):
        texts[row] += piece
    return texts[0] if isinstance(prompt, str) else texts


def _check_device(model: OrionLM, device: torch.device | str | None) -> None:
    wanted = torch.device(device) if device is not None else model.device
    if wanted.type != model.device.type or wanted.index not in (None, model.device.index):
        raise GenerationError(f"the model is on {model.device}, not {device}; move it with model.to({str(device)!r})")
