"""`orionlm generate`, `orionlm chat` and `orionlm bench`: text from a model, and the engine's speed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, TypedDict

from ..errors import OrionError, with_revision
from .common import DType, load, load_with_tokenizer, logs_to_stderr, print_json
from .parser import Unpack


class GenerationOptions(TypedDict, total=False):
    """The options `generate` and `chat` share (parser.py makes each key an option).

    Args:
        temp: sampling temperature; 0 is greedy
        top_k: keep only the k most likely tokens (0 = off)
        top_p: nucleus sampling: keep the smallest set with this much probability
        min_p: drop tokens below min_p times the top token's probability
        rep_pen: repetition penalty over prompt and output (1.0 = off)
        presence_pen: subtract this from tokens already generated (OpenAI semantics)
        frequency_pen: subtract this times the count of each generated token
        max_tokens: the most tokens to generate (chat: per reply)
        stop: stop when one of these strings is produced
        seed: random seed, for reproducible sampling
        show_thoughts: print a thinking model's thoughts too
        no_think: a thinking model generates without thoughts (its base model's predictions)
    """

    temp: float
    top_k: int
    top_p: float
    min_p: float
    rep_pen: float
    presence_pen: float
    frequency_pen: float
    max_tokens: int
    stop: list[str]
    seed: int
    show_thoughts: bool
    no_think: bool


# the sampling options' names on the command line -> GenerationConfig's fields
SAMPLING_OPTIONS = {
    "temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "rep_pen": "repetition_penalty",
    "presence_pen": "presence_penalty", "frequency_pen": "frequency_penalty", "max_tokens": "max_new_tokens",
    "stop": "stop", "seed": "seed",
}  # fmt: skip


def generate_text(
    prompts: list[str],
    /,
    *,
    model: str,
    revision: str | None = None,
    chat: bool = False,
    json: bool = False,
    device: str | None = None,
    dtype: DType | None = None,
    **options: Unpack[GenerationOptions],
) -> None:
    """Generate a continuation of PROMPT and stream it to stdout; several prompts run as one continuous
    batch and print when all are done, each under a "--- i" line.

    A thinking (Quiet-STaR) model thinks before every token; --show-thoughts prints each thought (dimmed
    on a terminal) between <|startthought|> and <|endthought|>, --no-think turns thinking off.

    Unset sampling options take the model's generation_config.json defaults.

    Example:
      orionlm generate "The history of" --model runs/quickstart/model --temp 0.7 --top-k 20 --max-tokens 200

    Args:
        prompts: the text(s) to continue
        model: a model directory, .gguf file or Hub id
        revision: a branch, tag or commit of the Hub id MODEL (the same as MODEL@REV)
        chat: wrap PROMPT in the model's chat template as a user message
        json: print one JSON document when done: {"model", "choices": [{"index", "prompt", "text"}]}, with
            "thoughts" ({"before": offset in text, "thought"}) under --show-thoughts
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
    """
    from ..generation import stream_thoughts

    model = with_revision(model, revision)
    lm, tokenizer = _load(model, "generation", device, dtype, options)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts] if chat else prompts
    pieces = stream_thoughts(lm, tokenizer, texts, **_settings(options))
    show = bool(options.get("show_thoughts"))
    if json:
        print_json({"model": model, "choices": _choices(pieces, prompts, show)})
    else:
        _print_generation(pieces, len(prompts), show)


def _load(model: str, purpose: str, device: str | None, dtype: DType | None, options: GenerationOptions):
    """The model and tokenizer, once --show-thoughts is known to have thoughts to show."""
    lm, tokenizer = load_with_tokenizer(model, purpose, device, dtype)
    if options.get("show_thoughts") and not lm.config.thinks:
        raise OrionError(
            f"{model} is not a thinking model (it has no <|startthought|> token): it has no thoughts to show"
        )
    return lm, tokenizer


def _settings(options: GenerationOptions) -> dict[str, Any]:
    """The options given on the command line -> generation keyword arguments."""
    values = {SAMPLING_OPTIONS[name]: value for name, value in options.items()
              if name in SAMPLING_OPTIONS and value is not None}  # fmt: skip
    if options.get("no_think"):
        values["think"] = False
    return values


def _shown(thought: str, piece: str, show_thoughts: bool) -> str:
    """A piece of text as printed: with show_thoughts, the thought before its token, dimmed on a terminal."""
    if not (show_thoughts and thought):
        return piece
    dim, plain = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    return f"{dim}<|startthought|>{thought}<|endthought|>{plain}{piece}"


def _print_generation(pieces: Iterator[tuple[int, str, str]], count: int, show_thoughts: bool) -> None:
    """One prompt's text as it comes; several prompts' texts when all are done."""
    texts = [""] * count
    for row, thought, piece in pieces:
        text = _shown(thought, piece, show_thoughts)
        if count == 1:
            sys.stdout.write(text)
            sys.stdout.flush()
        texts[row] += text
    if count == 1:
        sys.stdout.write("\n")
        return
    for i, text in enumerate(texts):
        print(f"--- {i}\n{text}")


def _choices(pieces: Iterator[tuple[int, str, str]], prompts: list[str], show_thoughts: bool) -> list[dict]:
    """--json's choices: each prompt's text, and with show_thoughts its thoughts and where in the text each came."""
    choices: list[dict[str, Any]] = [{"index": i, "prompt": p, "text": ""} for i, p in enumerate(prompts)]
    for row, thought, piece in pieces:
        if show_thoughts and thought:
            choices[row].setdefault("thoughts", []).append({"before": len(choices[row]["text"]), "thought": thought})
        choices[row]["text"] += piece
    return choices


def chat(
    *,
    model: str,
    revision: str | None = None,
    system: str | None = None,
    device: str | None = None,
    dtype: DType | None = None,
    **options: Unpack[GenerationOptions],
) -> None:
    """Chat with a model in the terminal, using its chat template.

    Type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits. The sampling options are
    generate's; unset ones take the model's generation_config.json defaults.

    Args:
        model: a model directory, .gguf file or Hub id
        revision: a branch, tag or commit of the Hub id MODEL (the same as MODEL@REV)
        system: a system message to start the conversation with
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
    """
    from ..generation import stream_thoughts

    lm, tokenizer = _load(with_revision(model, revision), "chat", device, dtype, options)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    settings, show = _settings(options), bool(options.get("show_thoughts"))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = []
        for _, thought, piece in stream_thoughts(lm, tokenizer, [prompt], **settings):
            reply.append(piece)
            sys.stdout.write(_shown(thought, piece, show))
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def bench_serving(
    model: str,
    /,
    *,
    revision: str | None = None,
    concurrency: str = "1,4,16",
    input_lengths: str = "128,1024",
    output_tokens: int = 128,
    requests_per_client: int = 2,
    json: bool = False,
    device: str | None = None,
    dtype: DType | None = None,
) -> None:
    """Measure serving speed: aggregate and per-client tokens/s, time to first token and inter-token
    latency, by concurrency and input length, on the continuous-batching engine the server runs.

    Example:
      orionlm bench runs/quickstart/model --concurrency 1,4,16 --input-lengths 128,1024 --output-tokens 128

    Args:
        model: a model directory, a .gguf file or a Hub id
        revision: a branch, tag or commit of the Hub id MODEL (the same as MODEL@REV)
        concurrency: comma-separated numbers of clients sending requests at once
        input_lengths: comma-separated prompt lengths in tokens (random token ids)
        output_tokens: tokens generated per request (stop tokens ignored)
        requests_per_client: requests each client sends, one after another
        json: print the results as one JSON document: the settings and a row per (input length, concurrency)
            with tokens/s and the latencies in seconds (the header line goes to stderr)
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
    """
    import torch

    from ..bench import bench, format_table

    def numbers(text: str, name: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise OrionError(f"--{name} takes comma-separated whole numbers, got {text!r}") from None
        if not values or min(values) < 1:
            raise OrionError(f"--{name} values must be >= 1, got {text!r}")
        return values

    levels, lengths = numbers(concurrency, "concurrency"), numbers(input_lengths, "input-lengths")
    model = with_revision(model, revision)
    lm, _, device_used = load(model, device, dtype)
    longest = max(lengths) + output_tokens
    if longest > lm.config.max_seq_len:
        raise OrionError(
            f"input length + output tokens ({longest}) exceed the model's context ({lm.config.max_seq_len})"
        )
    settings = {"model": model, "device": str(device_used), "threads": torch.get_num_threads(),
                "output_tokens": output_tokens, "requests_per_client": requests_per_client}  # fmt: skip
    with logs_to_stderr(json):
        print(f"# orionlm bench: {model} on {device_used}, {settings['threads']} threads; {output_tokens} output "
              f"tokens per request, {requests_per_client} requests per client, greedy")  # fmt: skip
    rows = bench(lm, levels, lengths, output_tokens=output_tokens, requests_per_client=requests_per_client)
    if json:
        print_json(settings | {"rows": [row.as_json() for row in rows]})
    else:
        print(format_table(rows))
