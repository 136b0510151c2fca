"""The `orionlm` command line: one verb = one typed function; its docstring is its --help."""

from __future__ import annotations

import json as jsonlib
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from .cli import build_parser, run
from .errors import OrionError
from .serve import serve

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def _dtype(name: str, source: Path) -> torch.dtype:
    from .checkpoint import DTYPES, stored_dtype

    if name != "auto":
        return DTYPES[name]
    return torch.float32 if source.is_file() else stored_dtype(source)


def info(model: str | None = None, /, *, preset: str | None = None, json: bool = False) -> None:
    """Print a model's architecture and parameter counts (total; active per token for MoE; virtual, with
    looped blocks counted once per loop, for Chimera).

    Examples:
      orionlm info --preset mixtral-8x7b
      orionlm info runs/my-model --json

    Args:
        model: a model directory (orionlm or Hugging Face) or a .gguf file
        preset: a preset name instead of a model (see `orionlm info --preset list`)
        json: print JSON with total_params, active_params, virtual_params and the config
    """
    from .config import PRESETS
    from .config import preset as get_preset
    from .model import count_parameters, virtual_parameters

    if (model is None) == (preset is None):
        raise OrionError("give either a model path or --preset NAME")
    if preset == "list":
        print("\n".join(PRESETS))
        return
    sizes: dict[str, int] = {}
    if preset is not None:
        config = get_preset(preset)
    else:
        config = _read_config(Path(model))
        sizes = _weight_bytes(Path(model))
    total, active = count_parameters(config)
    virtual = virtual_parameters(config)
    if json:
        counts = {"total_params": total, "active_params": active, "virtual_params": virtual}
        print(jsonlib.dumps(counts | sizes | {"config": config.to_dict()}, indent=2))
        return
    rows = [
        ("name", config.name or "-"),
        ("family", config.family),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("heads (q / kv), head dim", f"{config.num_heads} / {config.num_kv_heads}, {config.head_dim}"),
        ("position", _position(config)),
        ("context", config.max_seq_len),
        ("vocab", f"{config.vocab_size} ({'tied' if config.tie_embeddings else 'untied'} embeddings)"),
    ]
    if config.num_experts:
        moe_layers = "all" if config.moe_layers is None else ",".join(map(str, config.moe_layers))
        rows += [
            ("experts", f"{config.num_experts}, top-{config.experts_per_token}, FFN {config.expert_intermediate_size}"),
            ("MoE layers", moe_layers),
        ]
        if config.shared_expert_intermediate_size:
            rows.append(("shared expert FFN", config.shared_expert_intermediate_size))
    if config.architecture == "chimera":
        bottom = config.num_layers - config.shared_layers
        rows += [
            ("blocks", f"{bottom} bottom + {config.shared_layers} shared x {config.loops} loops "
                       f"= {config.virtual_layers} virtual layers"),
            ("mixers", f"Gated DeltaNet, attention every {config.attn_interval} blocks; GDN {config.gdn_num_heads} "
                       f"heads x {config.gdn_head_dim} (values x {config.gdn_expand_v:g})"),
        ]  # fmt: skip
    if not config.num_experts or config.moe_layers is not None:
        rows.append(("dense FFN", f"{config.intermediate_size} ({config.activation})"))
    rows += [("total parameters", _human(total)), ("active per token", _human(active))]
    if virtual != total:
        rows.append(("virtual parameters", _human(virtual)))
    quant = config.quantization_config
    if quant:
        groups = "per row" if quant["group_size"] == -1 else f"groups of {quant['group_size']}"
        order = ", act order" if quant.get("desc_act") else ""
        rows.append(("quantization", f"GPTQ {quant['bits']}-bit, {groups}{order}, {'sym' if quant['sym'] else 'asym'}"))
    if sizes:
        rows.append(("weights on disk", f"{sizes['disk_bytes'] / 2**20:,.1f} MiB"))
        rows.append(("in memory (fp32 on CPU)", f"{sizes['memory_bytes'] / 2**20:,.1f} MiB"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _position(config) -> str:
    if config.position != "rope":
        return config.position
    partial = f", {config.partial_rotary_factor:g} of head dim" if config.partial_rotary_factor < 1 else ""
    return f"rope (theta {config.rope_theta:g}{partial})"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.1f}{unit})"
    return f"{n:,}"


def _weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of a model directory's safetensors files on disk, and of its tensors once loaded for CPU (float
    tensors as float32, quantized ones as stored); read from the file headers, not the weights."""
    from safetensors import safe_open

    from .checkpoint import QUANT_BUFFERS
    from .loading import resolve_model_path

    path = resolve_model_path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return {}
    memory = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                numel = math.prod(tensor.get_shape())
                stored = {"F16": 2, "BF16": 2, "I64": 8, "U8": 1, "I8": 1}.get(tensor.get_dtype(), 4)
                memory += numel * (stored if key.rsplit(".", 1)[-1] in QUANT_BUFFERS else 4)
    return {"disk_bytes": sum(f.stat().st_size for f in files), "memory_bytes": memory}


def _read_config(path: Path):
    """The ModelConfig of a model directory or GGUF file, without reading the weights where possible."""
    from .config import ModelConfig
    from .convert.auron import from_auron_config, is_auron_config
    from .loading import resolve_model_path

    path = resolve_model_path(path)
    if path.is_file():
        from .loading import load_model

        return load_model(path, device="cpu")[0].config
    config_path = path / "config.json"
    if not config_path.is_file():
        raise OrionError(f"{config_path} is missing; is {path} a model directory?")
    data = jsonlib.loads(config_path.read_text())
    if is_auron_config(data):
        return ModelConfig.from_dict(from_auron_config(data))
    if data.get("model_type", "orionlm") == "orionlm":
        return ModelConfig.from_dict(data)
    from .convert.hf import config_from_hf

    return config_from_hf(data)


def init(
    out_dir: Path,
    /,
    *overrides: str,
    preset: str,
    seed: int = 0,
    tokenizer: Path | None = None,
    force: bool = False,
) -> None:
    """Write a randomly initialised model directory for a preset, with optional config changes, e.g.
      orionlm init runs/moe --preset tiny-moe --hidden_size=512 --num_experts=8 --max_seq_len=2048

    Without --tokenizer the model gets a byte-level tokenizer (256 bytes + special tokens).
    When the tokenizer has more tokens than the preset's vocab_size, the vocabulary grows to fit
    (rounded up to a multiple of 64).

    Args:
        out_dir: the directory to create
        preset: a preset name (`orionlm info --preset list` lists them)
        seed: the random seed of the initial weights
        tokenizer: a directory holding tokenizer.json (e.g. from `orionlm tokenizer train`)
        force: replace out_dir if it exists
        overrides: --field=value changes to the preset's config
    """
    from .checkpoint import save_checkpoint
    from .config import preset as get_preset
    from .model import OrionLM
    from .tokenizer import Tokenizer
    from .train.recipe import apply_override, expand_overrides

    changes: dict[str, Any] = {}
    for override in expand_overrides(overrides):
        apply_override(changes, override)

    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise OrionError(f"{out_dir} exists and is not empty; pass --force to replace it")
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else Tokenizer.byte_level()
    config = get_preset(preset, **changes)
    if tok.vocab_size > config.vocab_size:
        config = config.replace(vocab_size=-(-tok.vocab_size // 64) * 64)
        print(f"vocab_size raised to {config.vocab_size} to fit the tokenizer ({tok.vocab_size} tokens)")
    torch.manual_seed(seed)
    model = OrionLM(config)
    model.reset_parameters(seed)
    save_checkpoint(model, out_dir, tok)
    print(f"wrote {out_dir} ({preset}, {sum(p.numel() for p in model.parameters()):,} parameters)")


def generate(
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
    """
    from .generation import stream_thoughts
    from .loading import load_model

    lm, tokenizer, _ = load_model(model, device=device)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer.json; generation needs one")
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    sampling = _sampling(
        temp, top_k, top_p, min_p, rep_pen, presence_pen, frequency_pen, max_tokens, stop, seed, no_think
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


def _sampling(
    temp, top_k, top_p, min_p, rep_pen, presence_pen, frequency_pen, max_tokens, stop, seed, no_think
) -> dict:
    """CLI option names -> generation keyword arguments, leaving out what was not given."""
    values = dict(
        temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep_pen,
        presence_penalty=presence_pen, frequency_penalty=frequency_pen, max_new_tokens=max_tokens,
        stop=stop, seed=seed, think=False if no_think else None,
    )  # fmt: skip
    return {k: v for k, v in values.items() if v is not None}


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
    """
    from .generation import stream
    from .loading import load_model

    lm, tokenizer, _ = load_model(model, device=device)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer.json; chat needs one")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    sampling = _sampling(temp, None, top_p, None, None, None, None, max_tokens, None, seed, no_think)
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


def convert_from_hf(src: str, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Convert a Hugging Face model directory (or Hub id) into an orionlm model directory.

    Architectures: llama, mistral, mixtral, qwen2, qwen3, qwen2_moe, qwen3_moe, bloom.

    Args:
        src: a Hugging Face model directory or Hub id
        dst: the orionlm directory to write
        dtype: the weights' dtype; auto keeps the source's
        force: replace dst if it exists
    """
    from .convert.hf import load_hf

    _import_model(src, dst, dtype, force, load_hf)


def convert_to_hf(src: Path, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Export an orionlm model directory as a Hugging Face directory that transformers loads.

    Args:
        src: an orionlm model directory
        dst: the Hugging Face directory to write
        dtype: the weights' dtype; auto keeps the source's
        force: replace dst if it exists
    """
    from .convert.hf import save_hf

    _export_model(src, dst, dtype, force, save_hf)


def convert_to_gguf(
    src: Path, dst: Path, /, *, dtype: Literal["f32", "f16", "q8_0"] = "f16", force: bool = False
) -> None:
    """Export an orionlm model directory as a GGUF file for llama.cpp: the llama architecture for dense and
    Mixtral-style MoE models (experts stacked, the router as ffn_gate_inp, Q/K rows in llama.cpp's RoPE
    order), bloom for ALiBi (BLOOM) models; the tokenizer and chat template are embedded.

    Example:
      orionlm convert to-gguf runs/m runs/m.gguf --dtype q8_0 && llama-cli -m runs/m.gguf -p "Once upon"

    Args:
        src: an orionlm model directory (with its tokenizer)
        dst: the .gguf file to write
        dtype: the matrices' type: f32, f16 or q8_0 (norms and routers stay f32)
        force: replace dst if it exists
    """
    from .convert.gguf import save_gguf

    _export_model(src, dst, "float32", force, lambda model, tokenizer, out: save_gguf(model, tokenizer, out, dtype))


def convert_from_gguf(src: Path, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Import a llama- or bloom-architecture GGUF file (F32, F16, BF16 or Q8_0, dequantized), with its embedded
    tokenizer.

    Args:
        src: the .gguf file
        dst: the orionlm directory to write
        dtype: the weights' dtype; auto is float32
        force: replace dst if it exists
    """
    from .checkpoint import save_checkpoint
    from .convert.gguf import load_gguf

    _refuse_existing(dst, force)
    model, tokenizer = load_gguf(src, device="cpu", dtype=_dtype(dtype, src))
    save_checkpoint(model, dst, tokenizer)
    print(f"wrote {dst}")


def convert_from_auron(src: str, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Convert an Auron checkpoint directory (or Hub id) into an orionlm model directory, with Auron's
    sampling defaults in generation_config.json unless the source has its own.

    Args:
        src: an Auron checkpoint directory (config.json with n_bottom, dim, ...) or Hub id
        dst: the orionlm directory to write
        dtype: the weights' dtype; auto keeps the source's
        force: replace dst if it exists
    """
    from .config import AURON_GENERATION
    from .convert.auron import load_auron

    _import_model(src, dst, dtype, force, load_auron, AURON_GENERATION)


def convert_to_auron(src: Path, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Export an orionlm chimera model directory in Auron's checkpoint layout.

    Args:
        src: an orionlm model directory of the chimera family
        dst: the Auron directory to write
        dtype: the weights' dtype; auto keeps the source's
        force: replace dst if it exists
    """
    from .convert.auron import save_auron

    _export_model(src, dst, dtype, force, lambda model, tokenizer, out: save_auron(model, out, tokenizer))


def _import_model(src: str, dst: Path, dtype: DtypeName, force: bool, loader, generation: dict | None = None) -> None:
    """Load a foreign model directory (or Hub id) with `loader` and write it as an orionlm directory, keeping
    its generation_config.json (else `generation`)."""
    from .checkpoint import read_generation_config, save_checkpoint
    from .loading import resolve_model_path

    _refuse_existing(dst, force)
    path = resolve_model_path(src)
    model, tokenizer = loader(path, device="cpu", dtype=_dtype(dtype, path))
    save_checkpoint(model, dst, tokenizer, read_generation_config(path) or generation)
    print(f"wrote {dst}")


def _write_json(path: Path, data: Any) -> None:
    """Write a results file atomically (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(jsonlib.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def _export_model(src: Path, dst: Path, dtype: DtypeName, force: bool, saver) -> None:
    """Load an orionlm model directory and write it in a foreign layout with `saver(model, tokenizer, dst)`."""
    from .checkpoint import load_checkpoint

    _refuse_existing(dst, force)
    model, tokenizer = load_checkpoint(src, device="cpu", dtype=_dtype(dtype, src))
    saver(model, tokenizer, dst)
    print(f"wrote {dst}")


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OrionError(f"{path} exists; pass --force to replace it")


def tokenizer_train(files: list[Path], /, *, vocab_size: int, out: Path) -> None:
    """Train a byte-level BPE tokenizer on text files (.gz files are read too).

    Args:
        files: the training text files
        vocab_size: the vocabulary size, special tokens included
        out: the directory to write tokenizer.json, tokenizer_config.json and chat_template.jinja to
    """
    from .tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(files, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"wrote {out} ({tok.vocab_size} tokens)")


def train(recipe: Path, /, *overrides: str) -> None:
    """Train a model from a recipe: data mixture, tokenizer, model, optimizer, schedule, run options.

    `mode: pretrain` (the default) trains from scratch on text; `mode: sft` fine-tunes all of a trained
    model (model.path) and `mode: lora` trains adapters on it, on chat data (see configs/sft-lora.yaml).
    Every recipe key can be overridden after the recipe path, e.g.
      orionlm train configs/tinyshakespeare-moe.yaml --run.max_steps=200 --optim.lr=1e-3
      orionlm train configs/sft-lora.yaml --model.path=runs/my-model --lora.r=32
    `--resume` continues the run in run.out_dir from its latest checkpoint; `--resume DIR` from DIR.
    Under torchrun the same command trains with DDP (or FSDP2 with --run.fsdp=true):
      torchrun --nproc-per-node 2 -m orionlm train RECIPE.yaml

    Args:
        recipe: the recipe YAML file (see configs/)
        overrides: --section.key=value changes to the recipe, and --resume [DIR]
    """
    from .train.recipe import load_recipe
    from .train.trainer import train as run_training

    run_training(load_recipe(recipe, overrides))


def plot(run_dir: Path, /, *, compare: list[Path] | None = None, out: Path | None = None) -> None:
    """Write charts of a training run: loss.png, lr.png, expert_load.png (MoE runs).

    With --compare, one loss chart over several runs (e.g. MoE against dense) goes to --out.

    Args:
        run_dir: a run directory (it holds metrics.jsonl)
        compare: other run directories to draw beside it
        out: the comparison chart's path (default: RUN_DIR/compare.png)
    """
    from .train.plot import plot_comparison, plot_run

    if compare:
        runs = {p.name: p for p in [run_dir, *compare]}
        print(f"wrote {plot_comparison(runs, out or run_dir / 'compare.png')}")
        return
    for path in plot_run(run_dir):
        print(f"wrote {path}")


def quickstart(
    *overrides: str, out: Path = Path("runs/quickstart"), steps: int = 400, print_recipe: bool = False
) -> None:
    """Train a tiny MoE on the Python standard library's sources in a few CPU minutes, then show it works.

    Trains a BPE tokenizer and a ~3M-parameter MoE (8 experts, top-2) on the top-level modules of the
    standard library, then prints the parameter counts, the loss table against the unigram entropy of
    the data, and a continuation of "def fibonacci(n):"; writes loss.png and expert_load.png.

    Args:
        out: the run directory (replaced if it exists)
        steps: optimizer steps (16 sequences of 256 tokens each)
        print_recipe: print the recipe as YAML (to copy into a file for `orionlm train`) and stop
        overrides: --section.key=value changes to the recipe
    """
    import yaml

    from .quickstart import quickstart_recipe, run_quickstart

    if print_recipe:
        print(yaml.safe_dump(quickstart_recipe(out, steps), sort_keys=False), end="")
        return
    if out.exists():
        shutil.rmtree(out)
    run_quickstart(out, steps, list(overrides))


def bench(
    model: str,
    /,
    *,
    concurrency: str = "1,4,16",
    input_lengths: str = "128,1024",
    output_tokens: int = 128,
    requests_per_client: int = 2,
    device: str | None = None,
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
    """
    from .bench import bench as run_bench
    from .bench import format_table
    from .loading import load_model

    def numbers(text: str, name: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise OrionError(f"--{name} takes comma-separated whole numbers, got {text!r}") from None
        if not values or min(values) < 1:
            raise OrionError(f"--{name} values must be >= 1, got {text!r}")
        return values

    levels, lengths = numbers(concurrency, "concurrency"), numbers(input_lengths, "input-lengths")
    lm, _, device_used = load_model(model, device=device)
    longest = max(lengths) + output_tokens
    if longest > lm.config.max_seq_len:
        raise OrionError(
            f"input length + output tokens ({longest}) exceed the model's context ({lm.config.max_seq_len})"
        )
    print(f"# orionlm bench: {model} on {device_used}, {torch.get_num_threads()} threads; "
          f"{output_tokens} output tokens per request, {requests_per_client} requests per client, greedy")  # fmt: skip
    print(format_table(run_bench(lm, levels, lengths, output_tokens, requests_per_client)))


def eval_model(
    target: list[str],
    /,
    *,
    tasks: str = "hellaswag,arc_easy,arc_challenge,piqa,mmlu,lambada,wikitext",
    data_dir: Path | None = None,
    task_file: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    batch_size: int = 16,
    context: int | None = None,
    stride: int | None = None,
    max_new_tokens: int = 256,
    no_think: bool = False,
    out: Path | None = None,
    chart: Path | None = None,
    device: str | None = None,
) -> None:
    """Evaluate a model: multiple-choice accuracy (hellaswag, arc_easy, arc_challenge, piqa, mmlu), LAMBADA,
    WikiText perplexity and GSM8K exact match (gsm8k: generation, not in the default list), scored as
    lm-evaluation-harness does. Prints a table; --out writes JSON. `orionlm eval compare A.json B.json`
    prints saved results side by side (--chart: and as grouped bars).

    Example:
      orionlm eval runs/m --tasks hellaswag,arc_easy,wikitext --data-dir ../shared/data/eval --limit 200
      orionlm eval compare runs/a.json runs/b.json --chart runs/compare.png

    Args:
        target: a model directory, a .gguf file or a Hub id; or `compare` and --out JSON files
        tasks: comma-separated task names
        data_dir: a folder with the task files named as in ../shared/data/eval (hellaswag_val.jsonl, ...)
        task_file: TASK=PATH for a task's own file (repeatable; mmlu_dev=PATH for MMLU's shots)
        limit: evaluate only the first N items (documents for wikitext) of each task
        num_fewshot: examples before each question, drawn with --seed (MMLU: from mmlu_dev.jsonl)
        seed: the seed of the few-shot draws
        batch_size: sequences per forward pass
        context: wikitext: the sliding window in tokens (default: the model's context)
        stride: wikitext: how far the window moves (default: the whole window)
        max_new_tokens: gsm8k: the longest worked answer generated
        no_think: gsm8k: a thinking (Quiet-STaR) model answers without thoughts
        out: write the full results (config, versions, metrics, timing) to this JSON file
        chart: compare: also draw the accuracies as grouped bars in this PNG
        device: cpu, cuda or cuda:N (default: cuda when available)
    """
    from .eval.report import compare_chart, compare_table, format_table, read_report
    from .eval.run import evaluate
    from .loading import load_model

    if target[0] == "compare":
        if len(target) < 2:
            raise OrionError("compare needs at least one results file: orionlm eval compare A.json B.json")
        reports = {Path(p).stem: read_report(Path(p)) for p in target[1:]}
        print(compare_table(reports))
        if chart is not None:
            compare_chart(reports, chart)
            print(f"wrote {chart}")
        return
    if len(target) != 1:
        raise OrionError(f"give one model to evaluate (or `compare` and result files), got {' '.join(target)}")
    model = target[0]

    files = {}
    for item in task_file or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise OrionError(f"--task-file takes TASK=PATH, got {item!r}")
        files[name] = Path(path)
    lm, tokenizer, _ = load_model(model, device=device)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer.json; evaluation needs one")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    progress = sys.stderr.isatty()  # progress bars on a terminal; in a log they are noise
    report = evaluate(
        lm,
        tokenizer,
        names,
        data_dir,
        files,
        limit,
        num_fewshot,
        seed,
        batch_size,
        context,
        stride,
        progress,
        max_new_tokens,
        not no_think,
    )
    report["config"]["model_path"] = str(model)
    print(format_table(report))
    if out is not None:
        _write_json(out, report)


def leakage(
    model: str,
    items: Path,
    /,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    out: Path | None = None,
    device: str | None = None,
) -> None:
    """Detect benchmark leakage by shuffling options (arXiv 2409.01790): for each 4-option item, score all
    24 orderings of its options; flag the items whose published ordering scores highest (max_original,
    chance 1/24) and, among those, the ones whose score is an isolation-forest outlier (iforest@T).

    Example:
      orionlm leakage runs/m ../shared/data/eval/mmlu_test_subset.jsonl --limit 200 --out leak.json

    Args:
        model: a model directory, a .gguf file or a Hub id
        items: a multiple-choice JSONL file ({"id", "question" or "context", "choices", "answer"} per line)
        limit: test only the first N 4-option items
        batch_size: sequences per forward pass
        out: write the report (rates and the flagged item ids) to this JSON file
        device: cpu, cuda or cuda:N (default: cuda when available)
    """
    from .eval.leakage import detect, format_report
    from .loading import load_model

    lm, tokenizer, _ = load_model(model, device=device)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer.json; scoring needs one")
    report = detect(lm, tokenizer, items, limit, batch_size, progress=sys.stderr.isatty())
    print(format_report(report))
    if out is not None:
        _write_json(out, report)


def lm_eval(*args: str) -> None:
    """Run lm-evaluation-harness's command line with orionlm registered as a model, e.g.
      orionlm lm-eval --model orionlm --model_args pretrained=runs/m --tasks hellaswag --limit 100
    Needs `pip install 'orionlm[harness]'`; its own options: `orionlm lm-eval -- --help`.

    Args:
        args: lm_eval's arguments, passed on unchanged
    """
    try:
        from lm_eval.__main__ import cli_evaluate

        from .eval import harness  # noqa: F401  registers "orionlm"
    except ImportError as e:
        raise OrionError(f"lm-eval is not installed ({e.name} is missing): pip install 'orionlm[harness]'") from None
    sys.argv = ["lm_eval", *[a for a in args if a != "--"]]
    cli_evaluate()


def merge_lora(
    recipe: Path | None = None,
    /,
    *,
    adapter: Path | None = None,
    base: str | None = None,
    out: Path | None = None,
    force: bool = False,
) -> None:
    """Fold a LoRA adapter (PEFT files, written by orionlm or by peft) into its base model and write the
    result as an orionlm model directory.

    The base model comes from the recipe the adapter was trained with (its model.path; every LoRA
    checkpoint holds its resolved recipe.yaml), or from --base.

    Examples:
      orionlm merge-lora configs/sft-lora.yaml --lora_model_dir=runs/sft-lora/checkpoints/checkpoint-400
      orionlm merge-lora --base runs/m --adapter runs/sft/adapter --out runs/m-merged

    Args:
        recipe: the training recipe (mode: lora) whose model.path is the base model
        adapter: the adapter directory (adapter_config.json, adapter_model.safetensors)
        base: the base model (a model directory, a .gguf file or a Hub id) instead of the recipe's
        out: the merged model directory to write (default: RECIPE's run.out_dir/merged)
        force: replace out if it exists
    """
    from .checkpoint import save_checkpoint
    from .loading import load_model
    from .nn.lora import load_adapter
    from .nn.lora import merge_lora as merge

    if adapter is None:
        raise OrionError("give the adapter directory: --lora_model_dir=DIR (or --adapter DIR)")
    if (recipe is None) == (base is None):
        raise OrionError("give either the recipe the adapter was trained with or --base MODEL")
    if recipe is not None:
        from .train.recipe import load_recipe

        loaded = load_recipe(recipe)
        if loaded.model.path is None:
            raise OrionError(f"{recipe} has no model.path: it did not train an adapter on a base model")
        base, out = loaded.model.path, out or Path(loaded.run.out_dir) / "merged"
    if out is None:
        raise OrionError("give the output directory: --out DIR (or --output_dir DIR)")
    _refuse_existing(out, force)
    model, tokenizer, _ = load_model(base, device="cpu")
    config = load_adapter(model, adapter)
    merge(model)
    save_checkpoint(model, out, tokenizer, getattr(model, "generation_defaults", None) or None)
    targets = ", ".join(config.target_modules + config.target_parameters)
    print(f"wrote {out} ({base} + {adapter}: rank {config.r} on {targets})")


merge_lora.aliases = {"adapter": ["--lora-model-dir", "--lora_model_dir"], "out": ["--output-dir", "--output_dir"]}


def quantize(
    model: str,
    out: Path,
    /,
    *,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    asym: bool = False,
    damp: float = 0.01,
    dataset: str | None = None,
    seq_len: int = 2048,
    nsamples: int = 128,
    method: Literal["gptq", "rtn"] = "gptq",
    seed: int = 0,
    device: str | None = None,
    force: bool = False,
) -> None:
    """Quantize a model's linear layers to GPTQ checkpoints (AutoGPTQ's format): block by block with
    calibration text (GPTQ), or round-to-nearest (RTN, no data). Prints each layer's output error and writes
    OUT as a model directory with quantize_config.json; orionlm loads it for generate, serve and eval.

    MoE experts are quantized one by one on the tokens routed to each. Kept in full precision: the
    embedding, norms, MoE routers and the LM head. Chimera models are not supported yet.

    Examples:
      orionlm quantize runs/m runs/m-gptq4 --bits 4 --group-size 128 --dataset data/c4_sample.jsonl.gz
      orionlm quantize runs/m runs/m-rtn3 --bits 3 --method rtn

    Args:
        model: the model to quantize (a model directory, a .gguf file or a Hub id)
        out: the quantized model directory to write
        bits: bits per weight: 2, 3, 4 or 8
        group_size: input columns sharing a scale and zero point; -1 for one per output row
        act_order: quantize columns by decreasing activation size (desc_act)
        static_groups: find the groups' parameters before GPTQ's updates (fast act-order inference)
        asym: a zero point per group (default: symmetric)
        damp: dampening added to the Hessian's diagonal, as a fraction of its mean (damp_percent)
        dataset: calibration text: a file, directory or hf:NAME (needed by gptq)
        seq_len: tokens per calibration sample
        nsamples: calibration samples
        method: gptq (with calibration) or rtn (round to nearest)
        seed: where the calibration samples are taken
        device: cpu, cuda or cuda:N (default: cuda when available)
        force: replace out if it exists
    """
    from tqdm import tqdm

    from .loading import load_model
    from .quant.gptq import QuantConfig
    from .quant.model import LayerReport, calibration_samples, quantize_model, save_quantized

    _refuse_existing(out, force)
    config = QuantConfig(bits=bits, group_size=group_size, sym=not asym, desc_act=act_order,
                         static_groups=static_groups, damp_percent=damp)  # fmt: skip
    if method == "gptq" and dataset is None:
        raise OrionError("gptq needs calibration text: --dataset FILE (or --method rtn)")
    loaded, tokenizer, _ = load_model(model, device=device, dtype=torch.float32)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer; calibration text cannot be tokenized")
    samples = calibration_samples(tokenizer, dataset, nsamples, seq_len, seed) if method == "gptq" else None

    def log(report: LayerReport) -> None:
        error = f", output error {report.error:.4g}" if report.error is not None else ""
        tqdm.write(f"{report.name}: {report.method}{error}")

    reports = quantize_model(loaded, samples, config, method, log=log)
    save_quantized(loaded, out, tokenizer)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {len(reports)} linear layers at {bits} bits, {size / 2**20:.1f} MiB of weights")


def merge(config: Path, out: Path, /, *, seed: int = 0, force: bool = False) -> None:
    """Merge models of one architecture into one, from a mergekit merge config: linear (weighted average),
    slerp, task_arithmetic, ties, dare_linear or dare_ties.

      merge_method: ties                 # or linear, slerp, task_arithmetic, dare_linear, dare_ties
      base_model: runs/base              # the task vectors' origin (slerp: the t = 0 end; linear: none)
      models:
        - model: runs/code
          parameters: {weight: 0.6, density: 0.5}
        - model: runs/chat
          parameters: {weight: 0.4, density: 0.5}
      parameters: {normalize: true}      # slerp: {t: 0.5}; dare_*: rescale; all but linear/slerp: lambda
      dtype: bfloat16                    # default: the base (else first) model's

    A parameter is a number; a list of numbers, interpolated over the layers (a gradient); or a list of
    {filter: TEXT, value: ...} entries, the first whose TEXT is in the tensor's name applying, e.g.
      t: [{filter: self_attn, value: [0, 0.5, 1]}, {filter: mlp, value: 0.7}, {value: 0.5}]

    Example:
      orionlm merge configs/merge-ties.yaml runs/merged

    Args:
        config: the merge YAML file
        out: the merged model directory to write
        seed: seeds DARE's random drops
        force: replace out if it exists
    """
    from .checkpoint import save_checkpoint
    from .merge.weights import load_merge_config, merge_models

    merge_config = load_merge_config(config)
    _refuse_existing(out, force)
    model, tokenizer = merge_models(merge_config, seed=seed)
    save_checkpoint(model, out, tokenizer, write_extra=lambda tmp: shutil.copyfile(config, tmp / "merge.yaml"))
    print(f"wrote {out}: {merge_config.merge_method} merge of {len(merge_config.sources())} models")


def moe_merge(config: Path, out: Path, /, *, seed: int = 0, force: bool = False) -> None:
    """Assemble a Mixtral-style MoE ("frankenMoE") from dense models of one architecture, with routers set
    from prompts instead of trained: everything but the MLPs comes from base_model, expert e's MLPs from its
    source_model. CONFIG is mergekit-moe's YAML format:

      base_model: runs/english            # a model directory, a .gguf file or a Hub id
      gate_mode: hidden                   # hidden, cheap_embed or random
      dtype: bfloat16                     # default: the base model's
      experts_per_token: 2
      experts:
        - source_model: runs/python
          positive_prompts: ["def main():", "import numpy as np"]
          negative_prompts: ["Once upon a time"]     # optional
          noise_scale: 0.01                          # optional: Gaussian noise on its MLP weights
          residual_scale: 0.5                        # optional: scales its down_proj
        - source_model: runs/portuguese
          positive_prompts: ["Era uma vez"]
      shared_experts:                     # optional: one, for a Qwen2-MoE with a gated shared expert
        - source_model: runs/english
          positive_prompts: ["The"]

    hidden: expert e's router row at layer i is the base model's hidden state entering layer i at the last
    token of each positive prompt, averaged, minus the same for the negative prompts, L2-normalised.
    cheap_embed: the normalised sum of the prompts' token embeddings, the same for every layer.

    Example:
      orionlm moe-merge configs/moe-merge.yaml runs/franken-moe

    Args:
        config: the moe-merge YAML file
        out: the MoE model directory to write (loads with orionlm; convert to-hf exports it for transformers)
        seed: seeds random gates and noise_scale
        force: replace out if it exists
    """
    from .checkpoint import save_checkpoint
    from .merge.moe import load_moe_merge_config
    from .merge.moe import moe_merge as merge

    merge_config = load_moe_merge_config(config)
    _refuse_existing(out, force)
    model, tokenizer = merge(merge_config, seed=seed)
    save_checkpoint(model, out, tokenizer, write_extra=lambda tmp: shutil.copyfile(config, tmp / "moe_merge.yaml"))
    c = model.config
    shared = " + 1 shared expert" if c.shared_expert_intermediate_size else ""
    print(
        f"wrote {out}: {c.num_experts} experts{shared}, top-{c.experts_per_token}, {merge_config.gate_mode} gates, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters ({c.hf_model_type} layout)"
    )


COMMANDS = {
    "info": info,
    "init": init,
    "generate": generate,
    "chat": chat,
    "quickstart": quickstart,
    "train": train,
    "plot": plot,
    "serve": serve,  # orionlm.serve.serve
    "bench": bench,
    "eval": eval_model,
    "leakage": leakage,
    "lm-eval": lm_eval,
    "merge-lora": merge_lora,
    "merge": merge,
    "moe-merge": moe_merge,
    "quantize": quantize,
    "convert": {
        "from-hf": convert_from_hf,
        "to-hf": convert_to_hf,
        "from-gguf": convert_from_gguf,
        "to-gguf": convert_to_gguf,
        "from-auron": convert_from_auron,
        "to-auron": convert_to_auron,
    },
    "tokenizer": {"train": tokenizer_train},
}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(
        "orionlm", "orionlm: define, train, convert, generate with MoE and hybrid language models.", COMMANDS
    )
    try:
        run(parser, argv)
    except OrionError as e:
        sys.stderr.write(f"orionlm: error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
