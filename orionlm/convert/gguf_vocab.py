"""The tokenizer a GGUF file embeds (`tokenizer.ggml.*`), read into and written from HF `tokenizers`.

`tokenizer.ggml.model` "llama" (SentencePiece BPE with byte fallback) is rebuilt as an HF `tokenizers` BPE
whose merges are ranked by the merged piece's score, which is the order SentencePiece BPE applies them in;
"gpt2" (byte-level BPE with explicit merges) is rebuilt as GPT-2's byte-level BPE. Export writes both kinds
back: a SentencePiece-style BPE gets scores that rank its merges the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..errors import OrionError
from ..tokenizer import Tokenizer

# llama.cpp's token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
NO_TOKEN = 0xFFFFFFFF  # llama.cpp writes -1 as uint32 for "no such special token"
SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space


class GGUFError(OrionError):
    """A GGUF file orionlm cannot import; the message says why and what to use instead."""


def tokenizer_from_metadata(metadata: dict[str, Any], source: str) -> Tokenizer:
    """The tokenizer embedded in the GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise GGUFError(f"{source} has no embedded tokenizer (tokenizer.ggml.model / tokens are missing)")
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: {len(types)} token types for {len(tokens)} tokens")

    def token_id(key: str) -> int | None:
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return i if i is not None and 0 <= i < len(tokens) and i != NO_TOKEN else None

    def token(key: str) -> str | None:
        i = token_id(key)
        return None if i is None else tokens[i]

    if kind == "llama":
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise GGUFError(f"{source}: a SentencePiece ('llama') vocabulary needs one score per token")
        add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
        backend = _sentencepiece_bpe(tokens, scores, types, token("unknown"), add_space_prefix)
        add_bos_default = True
    elif kind == "gpt2":
        merges = metadata.get("tokenizer.ggml.merges")
        if merges is None and any(len(t) > 1 for t, k in zip(tokens, types, strict=True) if k == NORMAL):
            raise GGUFError(f"{source}: a byte-level BPE ('gpt2') vocabulary needs tokenizer.ggml.merges")
        merges = merges or []  # a vocabulary of single bytes has none, and GGUF writers leave out empty arrays
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in ("default", "gpt-2"):
            raise GGUFError(f"{source}: pre-tokenizer {pre!r} is not supported; only GPT-2's ('default') is")
        backend = _byte_level_bpe(tokens, merges)
        add_bos_default = False
    else:
        raise GGUFError(f"{source}: tokenizer model {kind!r} is not supported; only 'llama' and 'gpt2' are")

    typed = list(zip(tokens, types, strict=True))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k in (CONTROL, UNKNOWN)]
    )
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in typed if k == USER_DEFINED])
    bos, eos = token_id("bos"), token_id("eos")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:

        def template(sequence: str, type_id: int) -> list[str]:
            start = [f"{tokens[bos]}:{type_id}"] if add_bos else []
            end = [f"{tokens[eos]}:{type_id}"] if add_eos else []
            return [*start, f"${sequence}:{type_id}", *end]

        specials = {tokens[i]: i for i, add in ((bos, add_bos), (eos, add_eos)) if add}
        backend.post_processor = processors.TemplateProcessing(
            single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=list(specials.items())
        )
    return Tokenizer(
        backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
        unk_token=token("unknown"),
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
    )


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float], types: list[int], unk: str | None, add_space_prefix: bool
) -> HFTokenizer:
    """SentencePiece BPE as an HF BPE: at each step SentencePiece merges the adjacent pair whose
    concatenation is the vocabulary piece with the highest score, so a merge's rank is its result's
    score order. Characters missing from the vocabulary fall back to the <0xXX> byte tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pieces = {t for t, k in zip(tokens, types, strict=True) if k in (NORMAL, USER_DEFINED)}
    merges: list[tuple[float, int, int, tuple[str, str]]] = []
    for i, (piece, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                merges.append((-scores[i], i, vocab[left], (left, right)))
    merges.sort(key=lambda m: m[:3])
    backend = HFTokenizer(
        models.BPE(
            vocab=vocab, merges=[m[3] for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=BYTE in types
        )
    )
    steps = [normalizers.Prepend(SPIECE_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_SPACE)])
    decode = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))  # the space the normalizer prepended
    backend.decoder = decoders.Sequence(decode)
    return backend


def _byte_level_bpe(tokens: list[str], merges: list[str]) -> HFTokenizer:
    """GPT-2's byte-level BPE: merges are stored as "left right" strings in rank order."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def tokenizer_metadata(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's "gpt2" vocabulary (byte-level BPE, GPT-2's pre-tokenizer regex) or its
    "llama" one (SentencePiece-style BPE), padded with unused tokens to the model's vocabulary size, with its
    special tokens and chat template."""
    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    space_prefix = _sentencepiece_space_prefix(data)  # None: not SentencePiece-style
    byte_level = not (model.get("byte_fallback") or data.get("normalizer"))
    if model.get("type") != "BPE" or (space_prefix is None and not byte_level):
        raise GGUFError("GGUF export writes BPE tokenizers only: byte-level ones (GPT-2-style, orionlm's) and "
                        "SentencePiece-style ones (▁ for spaces, byte fallback)")  # fmt: skip
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or sorted(vocab.values()) != list(range(len(vocab))):
        raise GGUFError(f"the tokenizer's {len(vocab)} ids do not fit the model's vocabulary of {vocab_size}")
    tokens = sorted(vocab, key=vocab.__getitem__) + [f"[PAD{i}]" for i in range(len(vocab), vocab_size)]
    added = {t["content"]: t.get("special", False) for t in data.get("added_tokens", [])}
    types = []
    for i, token in enumerate(tokens):
        if i >= len(vocab):
            types.append(UNUSED)
        elif token in added:
            types.append((UNKNOWN if token == tokenizer.unk_token else CONTROL) if added[token] else USER_DEFINED)
        elif model.get("byte_fallback") and _BYTE_TOKEN.fullmatch(token):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if space_prefix is None and not merges:  # GGUF writers leave the empty list out, and llama.cpp requires it
        raise GGUFError("the tokenizer is a byte-level BPE without merges (orionlm's untrained byte tokenizer), "
                        "which llama.cpp refuses to load ('cannot find tokenizer merges'); to run the model in "
                        "llama.cpp, train it with a BPE tokenizer (orionlm tokenizer train, or the recipe's "
                        "tokenizer.train_vocab_size), or export it with convert to-hf")  # fmt: skip
    if space_prefix is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges(merges)
    else:
        # llama.cpp merges the adjacent pair whose result scores highest; a result's first merge rank
        # makes that order HF's merge order. Tokens no merge makes are never formed by merging.
        first_rank: dict[str, int] = {}
        for rank, merge in enumerate(merges):
            first_rank.setdefault(merge.replace(" ", "", 1), rank)
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(first_rank.get(t, len(merges))) for t in tokens])
        writer.add_add_space_prefix(space_prefix)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for token, add in (
        (tokenizer.bos_id, writer.add_bos_token_id), (tokenizer.eos_id, writer.add_eos_token_id),
        (tokenizer.pad_id, writer.add_pad_token_id), (vocab.get(tokenizer.unk_token), writer.add_unk_token_id),
    ):  # fmt: skip
        if token is not None:
            add(token)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _sentencepiece_space_prefix(data: dict[str, Any]) -> bool | None:
    """For a tokenizer.json that writes spaces as ▁ the SentencePiece way, whether it prepends one to the
    text (llama.cpp's add_space_prefix); None for any other tokenizer. Two forms exist: normalizers
    [Prepend ▁,] Replace " " -> ▁ (orionlm's GGUF import, older HF Llama files), or a Metaspace
    pre-tokenizer that does not split (newer HF files)."""
    normalizer = data.get("normalizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    if [s.get("type") for s in steps] in (["Prepend", "Replace"], ["Replace"]):
        replace = steps[-1]
        if replace.get("pattern") == {"String": " "} and replace.get("content") == SPIECE_SPACE:
            if len(steps) == 1 or steps[0].get("prepend") == SPIECE_SPACE:
                return len(steps) == 2
    pre = data.get("pre_tokenizer") or {}
    if not normalizer and pre.get("type") == "Metaspace" and pre.get("replacement") == SPIECE_SPACE:
        if not pre.get("split", True):
            return pre.get("prepend_scheme", "always") != "never"
    return None
