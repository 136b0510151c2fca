"""The OpenAI request and response bodies (pydantic): requests with vLLM's sampling extras, responses as the
server sends them.

Fields follow OpenAI's API reference; unknown request fields are ignored as OpenAI does. Request values must
have their field's type (strictly: no "1" for 1, no false for 0, as OpenAI refuses them) and are range-checked
here where OpenAI documents a range; the rest (temperature, top_p, penalties, ...) by GenerationConfig, whose
message then becomes the 400 error. Responses send null where OpenAI does; the few fields that OpenAI leaves
out instead (a stream delta's role and content, the usage of every stream chunk but the last) are left out when
None (`Omitting`).

Every request is refused (400) before it reaches the engine when anything in it could fail there: a seed out
of a 64-bit generator's range, text with a lone surrogate (JSON's "\\ud800", which no tokenizer or UTF-8
response can carry), a message part that is not an object with a string `type`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

# vLLM's seed range (torch's int64); the n choices of a request sample with seed + i, which torch's generators
# still take (they accept up to 2**64 - 1)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string that is not valid Unicode (a lone surrogate), anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_lone_surrogate, value))
    return False


class Strict(BaseModel):
    """A part of a request: each value of its field's JSON type (an integer may stand for a number)."""

    model_config = ConfigDict(strict=True)


class RequestBody(Strict):
    """A request's JSON body: refused whole when any of its strings (known field or not) is not valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if _lone_surrogate(data):
            raise ValueError("the request holds a lone surrogate (e.g. \\ud800): text must be valid Unicode")
        return data


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """What completions and chat completions share. None means: the server's default (the model's
    generation_config.json), then OpenAI's."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
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


class ContentPart(Strict, extra="allow"):
    """A part of a message's content: text, or another kind (image_url, input_audio, ...) that is refused."""

    type: str
    text: str = ""


class ChatMessage(Strict):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The content as text; a list of parts keeps its text parts (images and audio are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise ValueError(f"only text message parts are supported, got {sorted(kinds)}")
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class Omitting(BaseModel):
    """A response part whose `omitted_when_none` fields are left out of the JSON when None."""

    omitted_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self.omitted_when_none:
            if getattr(self, name) is None:
                del data[name]
        return data


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: str = "ok"
    running: int
    waiting: int  # queued or prefilling
    cancelled: int  # since the server started


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "orionlm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format: per token its text, logprob, top alternatives and character offset
    (None for a prompt's first token, which has no logprob)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamResponse(Omitting):
    """A stream's chunk: one choice's new text; the last chunk (when asked for) has no choices and the usage."""

    omitted_when_none = ("usage",)
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's text as UTF-8


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(Omitting):
    """What a stream chunk adds to the message: the role first, then content."""

    omitted_when_none = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionStreamResponse(Omitting):
    omitted_when_none = ("usage",)
    id: str
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str = "orionlm.Tokenizer"
    vocab_size: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
