"""Tokenizer: a thin wrapper over Hugging Face `tokenizers`, with chat templates and BPE training."""

from __future__ import annotations

import functools
import gzip
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .errors import OrionError, read_json_object

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]
TURN_MARKER = "\ue000"  # a private-use character no template writes: where the assistant's text ends
LONG_TEXT = 1 << 16  # characters; longer texts are encoded without holding the GIL

# ChatML. System messages may appear anywhere: each message is rendered the same way.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TokenizerError(OrionError):
    pass


def _raise_exception(message: str) -> None:  # templates call raise_exception() to refuse a conversation
    raise TokenizerError(message)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    """A chat template compiled once (fine-tuning data renders thousands of conversations), in a sandbox:
    no file or attribute access."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encodes text to ids and back; knows its special tokens and its chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = EOS,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = CHATML_TEMPLATE,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        for token in (bos_token, eos_token, pad_token, unk_token):
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"special token {token!r} is not in the vocabulary")

    # ids of the special tokens (None when the tokenizer has no such token)
    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        pad = self._id(self.pad_token)
        return pad if pad is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def end_of_turn_id(self) -> int | None:
        """The special token the chat template closes an assistant turn with (<|im_end|> in ChatML, <|eot_id|> in
        Llama 3's), where chat generation must stop; None without a template or when a turn ends in plain text."""
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TURN_MARKER}]
        try:
            text = self.apply_chat_template(messages, add_generation_prompt=False)
        except TokenizerError:  # a template may refuse this conversation (raise_exception)
            return None
        _, found, after = text.partition(TURN_MARKER)
        if not found:
            return None
        special = {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}
        return next((i for i in self.encode(after, add_special_tokens=False) if i in special), None)

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Add tokens that are never split and that decode (skipping special tokens) leaves out; ones the
        vocabulary has already keep their ids."""
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. With add_special_tokens, the tokenizer's own post-processor runs
        (Llama's adds BOS) and, if it has none, BOS is prepended when add_bos_token is set."""
        if len(text) > LONG_TEXT:  # encode_batch releases the GIL: a server's event loop keeps answering meanwhile
            ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the chat template in a sandbox (no file or attribute access)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; add chat_template.jinja to the model directory")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise TokenizerError(f"message {i} needs 'role' and 'content', got {message!r}")

        try:
            return _compile_template(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    # Files
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path} is missing; orionlm needs a `tokenizers` tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path} could not be read: {e}") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            config = read_json_object(config_path, TokenizerError)
        template_path = directory / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        if isinstance(template, list):  # several named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            pad_token=_token_text(config.get("pad_token")),
            unk_token=_token_text(config.get("unk_token")),
            chat_template=template,
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    # Construction
    @classmethod
    def byte_level(cls) -> Tokenizer:
        """256 byte tokens and the special tokens, no merges: works for any text, needs no training."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        _byte_level_parts(backend)
        backend.add_special_tokens(SPECIAL_TOKENS)
        return cls(backend, eos_token=EOS, pad_token=PAD)

    @classmethod
    def train_bpe(cls, files: list[str | Path], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE on text files (gzip-compressed files are read too)."""
        return cls.train_bpe_from_texts(_read_lines(files), vocab_size)

    @classmethod
    def train_bpe_from_texts(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE on an iterable of texts (documents or lines)."""
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise TokenizerError(f"vocab_size must be at least {min_size} (256 bytes + special tokens)")
        backend = HFTokenizer(models.BPE())
        _byte_level_parts(backend)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=sys.stderr.isatty(),  # its bar prints only blank lines into a log file
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, eos_token=EOS, pad_token=PAD)


def _byte_level_parts(backend: HFTokenizer) -> None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()


def _read_lines(files: list[str | Path]) -> Iterable[str]:
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise TokenizerError(f"{path} does not exist")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            yield from f
