"""The decoding loop: batched, left-padded prompts over one preallocated KV cache.

`Decoder` runs one batch: the prefill at the first `step()`, then one token per row per step.
Rows stop independently (stop token ids there, stop strings in `TextStream`); finished rows leave
the batch, so the remaining rows stop paying for them. `generate_ids`, `generate` and `stream`
are thin loops over it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..model import OrionLM
from ..nn.linear import use_decode_layout
from ..tokenizer import Tokenizer
from .sampling import GenerationConfig, GenerationError, Sampler, process_logits

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


class Decoder:
    """One batch of generation. Each `step()` feeds the model what it has not seen yet (the prompts,
    then the tokens picked last step), and picks one token for every running row.

    Feeding lazily means a row stopped from outside (`finish`, e.g. on a stop string) costs no forward
    pass for its last token. Construction validates and allocates; on CPU it also puts the model in
    the decode layout (`orionlm.nn.linear.use_decode_layout`: same values, faster matrix-vector products).
    """

    def __init__(
        self,
        model: OrionLM,
        prompts: list[list[int]],
        config: GenerationConfig,
        stop_token_ids: list[int] | tuple[int, ...] = (),
    ) -> None:
        _check_prompts(model, prompts, config.max_new_tokens)
        if model.device.type == "cpu":
            use_decode_layout(model)
        self.model = model
        self.config = config
        self.stop_ids = set(config.stop_token_ids) | set(stop_token_ids)
        self.rows = list(range(len(prompts)))  # original prompt index of each row still running
        self.num_generated = 0
        self.logits: torch.Tensor | None = None  # (B, V) float32: what the last step's tokens were drawn from
        device, vocab = model.device, model.config.vocab_size
        B, P = len(prompts), max(len(p) for p in prompts)
        with torch.inference_mode():
            self.cache = model.new_cache(B, P + config.max_new_tokens)
            input_ids = torch.zeros(B, P, dtype=torch.long)
            for i, prompt in enumerate(prompts):
                input_ids[i, P - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            self.next_input = input_ids.to(device)  # (B, T) fed at the next step
            # The mask covers the whole cache up front, so a step only slices it. Without padding the model
            # needs none, and single-token steps then skip mask building altogether.
            self.mask: torch.Tensor | None = None
            if any(len(p) < P for p in prompts):
                self.mask = torch.ones(B, P + config.max_new_tokens, dtype=torch.long, device=device)
                for i, prompt in enumerate(prompts):
                    self.mask[i, : P - len(prompt)] = 0
            self.seen = self.counts = None
            if config.repetition_penalty != 1.0:
                self.seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
                for i, prompt in enumerate(prompts):
                    self.seen[i, prompt] = True
            if config.presence_penalty or config.frequency_penalty:
                self.counts = torch.zeros(B, vocab, dtype=torch.int32, device=device)
            self.sampler = Sampler(config, B, device)

    @property
    def done(self) -> bool:
        return not self.rows

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        """The next token of every running row: [(prompt index, token id)]. A row whose token is a stop id,
        or that reached max_new_tokens, is finished and leaves the batch."""
        T = self.next_input.shape[1]
        mask = self.mask[:, : self.cache.length + T] if self.mask is not None else None
        out = self.model(self.next_input, attention_mask=mask, cache=self.cache, logits_to_keep=1)
        self.logits = out.logits[:, -1].float()
        tokens = self.sampler(process_logits(self.logits, self.config, self.seen, self.counts))  # (B,)
        picked = tokens.tolist()
        result = list(zip(self.rows, picked, strict=True))
        self.num_generated += 1
        if self.num_generated == self.config.max_new_tokens:
            self.rows = []
            return result
        self.next_input = tokens.unsqueeze(1)
        self._keep([i for i, token in enumerate(picked) if token not in self.stop_ids])
        if self.seen is not None:
            self.seen.scatter_(1, self.next_input, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, self.next_input, torch.ones_like(self.next_input, dtype=self.counts.dtype))
        return result

    @torch.inference_mode()
    def finish(self, rows: list[int]) -> None:
        """Stop the given prompt indices (e.g. a stop string appeared in their text)."""
        finished = set(rows)
        self._keep([i for i, row in enumerate(self.rows) if row not in finished])

    def _keep(self, keep: list[int]) -> None:
        """Shrink the batch to the given running rows (positions in the current batch)."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.model.device)
        self.cache.select(index)
        self.next_input = self.next_input[index]
        if self.mask is not None:
            self.mask = self.mask[index]
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.counts is not None:
            self.counts = self.counts[index]
        self.sampler.select(keep)


def _check_prompts(model: OrionLM, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise GenerationError("no prompts were given")
    vocab, max_len = model.config.vocab_size, model.config.max_seq_len
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty; it needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary (0..{vocab - 1})")
        if len(prompt) + max_new_tokens > max_len:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(prompt) + max_new_tokens} > the model's max_seq_len ({max_len}): shorten the prompt "
                "or lower max_new_tokens"
            )


def generate_ids(
    model: OrionLM,
    prompts: list[list[int]],
    max_new_tokens: int | None = None,
    config: GenerationConfig | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """New token ids for each prompt (token id lists, any lengths; batched with left padding).

    Settings come from `config` (default: GenerationConfig()) updated with the keyword arguments; the
    model's generation defaults are not read here. Each row stops at its first stop token, which is
    included in its output (as transformers' generate does), or after max_new_tokens.
    """
    if max_new_tokens is not None:
        sampling["max_new_tokens"] = max_new_tokens
    config = (config or GenerationConfig()).replace(**sampling)
    decoder = Decoder(model, prompts, config)
    outputs: list[list[int]] = [[] for _ in prompts]
    while not decoder.done:
        for row, token in decoder.step():
            outputs[row].append(token)
    return outputs


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
) -> tuple[Decoder, list[TextStream]]:
    """Encode the prompts and set up their generation; errors surface here, before any text."""
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return Decoder(model, ids, config, stop_ids), [TextStream(tokenizer, config.stop) for _ in prompts]


def _text_pieces(decoder: Decoder, streams: list[TextStream]) -> Iterator[tuple[int, str]]:
    """(prompt index, text piece) as the tokens of each row are generated."""
    while not decoder.done:
        stopped = []
        for row, token in decoder.step():
            if token in decoder.stop_ids:
                continue
            piece = streams[row].push(token)
            if piece:
                yield row, piece
            if streams[row].stopped:
                stopped.append(row)
        decoder.finish(stopped)
    for row, text_stream in enumerate(streams):
        piece = text_stream.flush()
        if piece:
            yield row, piece


def stream(
    model: OrionLM,
    tokenizer: Tokenizer,
    prompt: str,
    defaults: GenerationConfig | dict[str, Any] | None = None,
    **sampling: Any,
) -> Iterator[str]:
    """Text pieces of the continuation of `prompt` as they are generated. Generation ends at a stop
    token (the config's or the tokenizer's EOS), at a stop string (not emitted) or at max_new_tokens.
    Bad settings or prompts raise GenerationError here, not at the first piece."""
    decoder, streams = _start_text(model, tokenizer, [prompt], resolve_config(model, defaults, **sampling))
    return (piece for _, piece in _text_pieces(decoder, streams))


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
    wanted = torch.device(device) if device is not None else model.device
    if wanted.type != model.device.type or wanted.index not in (None, model.device.index):
        raise GenerationError(f"the model is on {model.device}, not {device}; move it with model.to({str(device)!r})")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    decoder, streams = _start_text(model, tokenizer, prompts, resolve_config(model, defaults, **sampling))
    texts = [""] * len(prompts)
    for row, piece in _text_pieces(decoder, streams):
        texts[row] += piece
    return texts[0] if isinstance(prompt, str) else texts
