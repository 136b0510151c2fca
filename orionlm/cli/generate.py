"""`orionlm generate`, `orionlm chat` and `orionlm bench`: text from a model, and the engine's speed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch

from ..checkpoint import set_threads
from ..errors import OrionError
from .common import DType, load, load_with_tokenizer


def generate_text(
    prompts: list[str],
    /,
    *,
    model: str,
    temp: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    rep_pen: float | None = None,
    presence_pen: float | None = None,
    frequency_pen: float | None = None,
    max_tokens: int | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
    chat: bool = False,
    show_thoughts: bool = False,
    no_think: bool = False,
    device: str | None = None,
    dtype: DType | None = None,
    threads: int | None = None,
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
        temp: sampling temperature; 0 is greedy
        top_k: keep only the k most likely tokens (0 = off)
        top_p: nucleus sampling: keep the smallest set with this much probability
        min_p: drop tokens below min_p times the top token's probability
        rep_pen: repetition penalty over prompt and output (1.0 = off)
        presence_pen: subtract this from tokens already generated (OpenAI semantics)
        frequency_pen: subtract this times the count of each generated token
        max_tokens: the most tokens to generate
        stop: stop when one of these strings is produced
        seed: random seed, for reproducible sampling
        chat: wrap PROMPT in the model's chat template as a user message
        show_thoughts: print a thinking model's thoughts too
        no_think: a thinking model generates without thoughts (its base model's predictions)
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
        threads: CPU threads for torch (default: one per core; on a busy machine fewer can be much faster)
    """
    from ..generation import stream_thoughts

    lm, tokenizer = load_with_tokenizer(model, "generation", device, threads, dtype)
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    sampling = _sampling(
        temp=temp,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        rep_pen=rep_pen,
        presence_pen=presence_pen,
        frequency_pen=frequency_pen,
        max_tokens=max_tokens,
        stop=stop,
        seed=seed,
        no_think=no_think,
    )
    if show_thoughts and not lm.config.thinks:
        raise OrionError(
            f"{model} is not a thinking model (it has no <|startthought|> token): it has no thoughts to show"
        )
    _print_generation(stream_thoughts(lm, tokenizer, prompts, **sampling), len(prompts), show_thoughts)


def _print_generation(pieces: Iterator[tuple[int, str, str]], count: int, show_thoughts: bool) -> None:
    """One prompt's text as it comes; several prompts' texts when all are done. With show_thoughts each
    thought goes before its token, dimmed on a terminal."""
    dim, plain = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    texts = [""] * count
    for row, thought, piece in pieces:
        text = f"{dim}<|startthought|>{thought}<|endthought|>{plain}{piece}" if show_thoughts and thought else piece
        if count == 1:
            sys.stdout.write(text)
            sys.stdout.flush()
        texts[row] += text
    if count == 1:
        sys.stdout.write("\n")
        return
    for i, text in enumerate(texts):
        print(f"--- {i}\n{text}")


# the sampling options' names on the command line -> GenerationConfig's fields
SAMPLING_OPTIONS = {
    "temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "rep_pen": "repetition_penalty",
    "presence_pen": "presence_penalty", "frequency_pen": "frequency_penalty", "max_tokens": "max_new_tokens",
    "stop": "stop", "seed": "seed",
}  # fmt: skip


def _sampling(no_think: bool = False, **options: Any) -> dict:
    """Sampling options given on the command line (by option name) -> generation keyword arguments."""
    values = {SAMPLING_OPTIONS[name]: value for name, value in options.items() if value is not None}
    if no_think:
        values["think"] = False
    return values


def chat(
    *,
    model: str,
    system: str | None = None,
    temp: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    no_think: bool = False,
    device: str | None = None,
    dtype: DType | None = None,
    threads: int | None = None,
) -> None:
    """Chat with a model in the terminal, using its chat template.

    Type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits.

    Args:
        model: a model directory, .gguf file or Hub id
        system: a system message to start the conversation with
        temp: sampling temperature; 0 is greedy
        top_p: nucleus sampling threshold
        max_tokens: the most tokens per reply
        seed: random seed, for reproducible sampling
        no_think: a thinking (Quiet-STaR) model replies without thoughts
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
        threads: CPU threads for torch (default: one per core; on a busy machine fewer can be much faster)
    """
    from ..generation import stream

    lm, tokenizer = load_with_tokenizer(model, "chat", device, threads, dtype)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    sampling = _sampling(temp=temp, top_p=top_p, max_tokens=max_tokens, seed=seed, no_think=no_think)
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
        for piece in stream(lm, tokenizer, prompt, **sampling):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def bench_serving(
    model: str,
    /,
    *,
    concurrency: str = "1,4,16",
    input_lengths: str = "128,1024",
    output_tokens: int = 128,
    requests_per_client: int = 2,
    device: str | None = None,
    dtype: DType | None = None,
    threads: int | None = None,
) -> None:
    """Measure serving speed: aggregate and per-client tokens/s, time to first token and inter-token
    latency, by concurrency and input length, on the continuous-batching engine the server runs.

    Example:
      orionlm bench runs/quickstart/model --concurrency 1,4,16 --input-lengths 128,1024 --output-tokens 128

    Args:
        model: a model directory, a .gguf file or a Hub id
        concurrency: comma-separated numbers of clients sending requests at once
        input_lengths: comma-separated prompt lengths in tokens (random token ids)
        output_tokens: tokens generated per request (stop tokens ignored)
        requests_per_client: requests each client sends, one after another
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
        threads: CPU threads for torch (default: one per core; on a busy machine fewer can be much faster)
    """
    set_threads(threads)
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
    lm, _, device_used = load(model, device, dtype)
    longest = max(lengths) + output_tokens
    if longest > lm.config.max_seq_len:
        raise OrionError(
            f"input length + output tokens ({longest}) exceed the model's context ({lm.config.max_seq_len})"
        )
    print(f"# orionlm bench: {model} on {device_used}, {torch.get_num_threads()} threads; "
          f"{output_tokens} output tokens per request, {requests_per_client} requests per client, greedy")  # fmt: skip
    rows = bench(lm, levels, lengths, output_tokens=output_tokens, requests_per_client=requests_per_client)
    print(format_table(rows))
