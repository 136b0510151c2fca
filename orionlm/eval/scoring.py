"""Scoring text with a model: log-likelihoods of continuations and sliding-window perplexity.

`loglikelihood` follows lm-evaluation-harness's HF model exactly, so accuracies compare: the context and
the continuation are encoded together (no special tokens) and the continuation's tokens are what follows
the context's own encoding; trailing spaces of the context move to the continuation; an empty context
starts from the prefix token (BOS, else EOS). Requests are sorted by length and scored in right-padded
batches: the model is causal, so padding after a sequence never changes its scores, and one forward pass
scores many continuations (requests with the same model input, such as the one-token answer letters of one
question, share a row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..errors import OrionError
from ..model import OrionLM
from ..tokenizer import Tokenizer


@dataclass
class Scored:
    logprob: float  # sum over the continuation's tokens
    greedy: bool  # every continuation token is the argmax at its position
    tokens: int  # continuation tokens


def prefix_token(tokenizer: Tokenizer) -> int:
    """What an empty context is: BOS, else EOS (lm-evaluation-harness's choice)."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise OrionError("scoring text from its start needs a tokenizer with a BOS or an EOS token")
    return token


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix_token(tokenizer)], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def loglikelihood(
    model: OrionLM,
    tokenizer: Tokenizer,
    requests: list[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = True,
) -> list[Scored]:
    """Score each (context, continuation); a context longer than the model's window keeps its end, and a
    continuation longer than the window has only its last window of tokens scored (`tokens` says so)."""
    window = model.config.max_seq_len
    encoded = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise OrionError(f"the continuation {continuation!r} encodes to no tokens")
        ids = (context_ids + continuation_ids)[-(window + 1) :]
        encoded.append((ids, min(len(continuation_ids), len(ids) - 1)))
    # Requests whose model inputs are the same (one-token continuations of one context: MMLU's " A".." D")
    # share a forward pass.
    sharing: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, _) in enumerate(encoded):
        sharing.setdefault(tuple(ids[:-1]), []).append(i)
    inputs_list = sorted(sharing, key=len, reverse=True)
    results: list[Scored | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), disable=not progress, unit="req", desc="scoring", leave=False)
    for start in range(0, len(inputs_list), batch_size):
        batch = inputs_list[start : start + batch_size]
        inputs = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        for row, ids in enumerate(batch):
            inputs[row, : len(ids)] = torch.tensor(ids)
        logprobs = torch.log_softmax(model(inputs.to(model.device)).logits.float(), dim=-1).cpu()
        for row, key in enumerate(batch):
            for i in sharing[key]:
                ids, count = encoded[i]
                targets = torch.tensor(ids[-count:])
                picked = logprobs[row, len(ids) - 1 - count : len(ids) - 1]  # (count, V)
                logprob = float(picked.gather(1, targets[:, None]).sum())
                results[i] = Scored(logprob, bool((picked.argmax(-1) == targets).all()), count)
            bar.update(len(sharing[key]))
    bar.close()
    return results  # type: ignore[return-value]


@dataclass
class Perplexity:
    nll: float  # total negative log-likelihood, nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    words: int  # whitespace-separated words of the text

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words)


@torch.inference_mode()
def perplexity(
    model: OrionLM,
    tokenizer: Tokenizer,
    texts: list[str],
    context: int | None = None,
    stride: int | None = None,
    progress: bool = True,
) -> Perplexity:
    """Sliding-window perplexity over each text (documents scored apart). Windows of `context` tokens
    (default: the model's) advance by `stride` (default: the whole window, as lm-evaluation-harness's
    rolling log-likelihood); each scores only the tokens the previous window did not, with everything
    before them in the window as context, and the last window reaches back to a full context. The first
    token of a text is predicted from the prefix token (BOS, else EOS). Token-, byte- and word-level figures
    share one total, so models with different tokenizers compare by bits per byte."""
    context = context or model.config.max_seq_len
    stride = stride or context
    if not 1 <= stride <= context <= model.config.max_seq_len:
        raise OrionError(
            f"need 1 <= stride ({stride}) <= context ({context}) <= the model's {model.config.max_seq_len}"
        )
    prefix = prefix_token(tokenizer)
    nll, tokens = 0.0, 0
    bar = tqdm(total=len(texts), disable=not progress, unit="doc", desc="perplexity", leave=False)
    for text in texts:
        ids = [prefix] + tokenizer.encode(text, add_special_tokens=False)
        done = 1  # positions of ids already scored (the prefix is not a prediction)
        begin = 0
        while done < len(ids):
            end = min(begin + context + 1, len(ids))  # a window of `context` inputs predicts up to ids[end - 1]
            window = torch.tensor([ids[max(0, end - context - 1) : end]], device=model.device)
            logprobs = torch.log_softmax(model(window[:, :-1]).logits[0].float(), dim=-1)
            new = end - done  # the targets ids[done:end]
            targets = window[0, -new:]
            nll -= float(logprobs[-new:].gather(1, targets[:, None]).sum())
            tokens += new
            done = end
            begin += stride
        bar.update(1)
    bar.close()
    return Perplexity(nll, tokens, sum(len(t.encode()) for t in texts), sum(len(t.split()) for t in texts))
