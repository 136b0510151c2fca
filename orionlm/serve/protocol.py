"""The OpenAI request bodies the server accepts (pydantic), with vLLM's sampling extras.

Fields follow OpenAI's API reference; unknown fields are ignored as OpenAI does. Values are range-checked
here where OpenAI documents a range; the rest (temperature, top_p, penalties, ...) by GenerationConfig,
whose message then becomes the 400 error.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share. None means: the server's default (the model's
    generation_config.json), then OpenAI's."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # orionlm's: whether a thinking (Quiet-STaR) model thinks before each token (None: the server's default)
    think: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as text; a list of parts keeps its text parts (images and audio are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {part.get("type") for part in self.content}
        if kinds - {"text"}:
            raise ValueError(f"only text message parts are supported, got {sorted(map(str, kinds - {'text'}))}")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
