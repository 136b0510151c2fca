"""`orionlm convert`: model directories to and from Hugging Face, GGUF and Auron layouts.

Every verb streams: it opens the source without reading its weights (loading.open_model), then reads, renames,
converts and writes one tensor at a time, so memory holds about one tensor (one MoE expert stack), never the
model. Each verb takes any model `--model` takes elsewhere; the verb names the layout written."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import OrionError

if TYPE_CHECKING:
    from ..checkpoint import LazyTensors
    from ..loading import ModelSource

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def convert_from_hf(
    src: str,
    dst: Path,
    /,
    *,
    dtype: DtypeName = "auto",
    shard_gb: float = 5.0,
    force: bool = False,
    revision: str | None = None,
) -> None:
    """Convert a Hugging Face model directory (or Hub id) into an orionlm model directory.

    Architectures: llama, mistral, mixtral, qwen2, qwen3, qwen2_moe, qwen3_moe, bloom. The source's tokenizer and
    generation_config.json come along, with every stop id in its eos_token_id (the chat template's end-of-turn
    token too). A GPTQ checkpoint (quantization_config with quant_method gptq, or quantize_config.json; format
    gptq or gptq_v2, 2/3/4/8 bits) keeps its packed codes and becomes an orionlm GPTQ model.

    Args:
        src: a Hugging Face model directory or Hub id (or any other model: an orionlm or Auron directory, a .gguf
            file, a training run)
        dst: the orionlm directory to write
        dtype: the weights' dtype; auto keeps the source's
        shard_gb: the largest safetensors file, in GiB; a larger model is written as shards with an index
        force: replace dst if it exists
        revision: a branch, tag or commit of the Hub id SRC (the same as SRC@REV)
    """
    _import_model(src, dst, dtype=dtype, shard_gb=shard_gb, force=force, revision=revision)


def convert_from_gguf(
    src: str, dst: Path, /, *, dtype: DtypeName = "auto", shard_gb: float = 5.0, force: bool = False
) -> None:
    """Import a llama- or bloom-architecture GGUF file, with its embedded tokenizer. Reads F32, F16 and BF16
    tensors, and dequantizes llama.cpp's quantized types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the k-quants Q2_K ... Q6_K
    (so Q4_K_M, Q5_K_M, ... files) and IQ4_NL; other types (IQ2_XS, TQ1_0, ...) are refused. Needs `pip install
    'orionlm[gguf]'`.

    Args:
        src: the .gguf file
        dst: the orionlm directory to write
        dtype: the weights' dtype; auto is float32 (the dtype quantized tensors are dequantized to)
        shard_gb: the largest safetensors file, in GiB; a larger model is written as shards with an index
        force: replace dst if it exists
    """
    _import_model(src, dst, dtype=dtype, shard_gb=shard_gb, force=force)


def convert_from_auron(
    src: str,
    dst: Path,
    /,
    *,
    dtype: DtypeName = "auto",
    shard_gb: float = 5.0,
    force: bool = False,
    revision: str | None = None,
) -> None:
    """Convert an Auron checkpoint directory (or Hub id) into an orionlm model directory, with Auron's
    sampling defaults in generation_config.json unless the source has its own.

    Args:
        src: an Auron checkpoint directory (config.json with n_bottom, dim, ...) or Hub id
        dst: the orionlm directory to write
        dtype: the weights' dtype; auto keeps the source's
        shard_gb: the largest safetensors file, in GiB; a larger model is written as shards with an index
        force: replace dst if it exists
        revision: a branch, tag or commit of the Hub id SRC (the same as SRC@REV)
    """
    from ..config import AURON_GENERATION

    _import_model(src, dst, dtype=dtype, shard_gb=shard_gb, force=force, revision=revision,
                  generation=AURON_GENERATION)  # fmt: skip


def convert_to_hf(
    src: str,
    dst: Path,
    /,
    *,
    dtype: DtypeName = "auto",
    shard_gb: float = 5.0,
    force: bool = False,
    revision: str | None = None,
) -> None:
    """Export a model as a Hugging Face directory that transformers loads (experts one tensor per expert).
    generation_config.json carries the source's sampling defaults (orionlm's when it has none) and every stop id:
    the model's EOS ids and the chat template's end-of-turn token (<|im_end|>), where transformers' generate then
    stops as orionlm does. A GPTQ model keeps its codes, with quantization_config in config.json and
    quantize_config.json, as GPTQModel and transformers read them.

    Args:
        src: the model: an orionlm, Hugging Face or Auron directory, a .gguf file, a training run (its newest
            checkpoint) or a Hub id
        dst: the Hugging Face directory to write
        dtype: the weights' dtype; auto keeps the source's (float32 for a .gguf file); GPTQ codes keep theirs
        shard_gb: the largest safetensors file, in GiB; a larger model is written as shards with an index
        force: replace dst if it exists
        revision: a branch, tag or commit of the Hub id SRC (the same as SRC@REV)
    """
    from ..convert.hf import write_hf

    max_shard_bytes = _shard_bytes(shard_gb)
    source, tensors = _open_source(src, dst, dtype, force, revision)
    write_hf(source.config, tensors, source.tokenizer, dst, max_shard_bytes=max_shard_bytes,
             generation=source.generation or None)  # fmt: skip
    print(f"wrote {dst}")
    if source.config.router_score_bias:
        print(f"note: {dst} keeps the routing bias (e_score_correction_bias) that orionlm reads back; transformers "
              "has no such bias for this architecture and routes without it", file=sys.stderr)  # fmt: skip


GGUFType = Literal["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m"]


def convert_to_gguf(
    src: str, dst: Path, /, *, dtype: GGUFType = "f16", force: bool = False, revision: str | None = None
) -> None:
    """Export a model as a GGUF file for llama.cpp: the llama architecture for dense and Mixtral-style MoE models
    (experts stacked, the router as ffn_gate_inp, Q/K rows in llama.cpp's RoPE order), bloom for ALiBi (BLOOM)
    models; the tokenizer and chat template are embedded. The file appears only when complete. Needs `pip install
    'orionlm[gguf]'`, and a tokenizer with BPE merges: llama.cpp cannot load a byte-level one without them (what
    `orionlm init` gives without --tokenizer), so such a model is refused. f32, f16 and q8_0 are written here; the
    other types by llama.cpp's own quantizer from an F16 file written first beside dst (it needs `pip install
    'orionlm[llamacpp]'`, which brings llama-cpp-python). A k-quant wants matrix rows in whole blocks of 256
    (hidden and intermediate sizes multiples of 256); llama.cpp gives other rows a fallback type.

    Example:
      orionlm convert to-gguf runs/m runs/m.gguf --dtype q4_k_m && llama-cli -m runs/m.gguf -p "Once upon"

    Args:
        src: the model (with its tokenizer): an orionlm, Hugging Face or Auron directory, a .gguf file, a
            training run (its newest checkpoint) or a Hub id
        dst: the .gguf file to write
        dtype: the matrices' type: f32, f16 or q8_0 (norms and routers stay f32), or one of llama.cpp's
            quantized file types q4_k_m, q5_k_m, q6_k, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_m
        force: replace dst if it exists
        revision: a branch, tag or commit of the Hub id SRC (the same as SRC@REV)
    """
    from ..convert.gguf import write_gguf

    if dst.is_dir():  # --force replaces a file, never a directory and what is in it
        raise OrionError(f"{dst} is a directory; give the path of the .gguf file to write")
    source, tensors = _open_source(src, dst, None, force, revision)
    write_gguf(source.config, tensors, source.tokenizer, dst, dtype)
    print(f"wrote {dst}")


def convert_to_auron(
    src: str,
    dst: Path,
    /,
    *,
    dtype: DtypeName = "auto",
    shard_gb: float = 5.0,
    force: bool = False,
    revision: str | None = None,
) -> None:
    """Export a chimera-family model in Auron's checkpoint layout, with the source's sampling defaults (else
    Auron's).

    Args:
        src: a chimera model: an orionlm or Auron directory, a training run (its newest checkpoint) or a Hub id
        dst: the Auron directory to write
        dtype: the weights' dtype; auto keeps the source's
        shard_gb: the largest safetensors file, in GiB; a larger model is written as shards with an index
        force: replace dst if it exists
        revision: a branch, tag or commit of the Hub id SRC (the same as SRC@REV)
    """
    from ..convert.auron import write_auron

    max_shard_bytes = _shard_bytes(shard_gb)
    source, tensors = _open_source(src, dst, dtype, force, revision)
    write_auron(source.config, tensors, dst, source.tokenizer, source.generation, max_shard_bytes)
    print(f"wrote {dst}")


def _import_model(
    src: str,
    dst: Path,
    *,
    dtype: DtypeName,
    shard_gb: float,
    force: bool,
    revision: str | None = None,
    generation: dict[str, Any] | None = None,
) -> None:
    """Write any model as an orionlm directory with its tokenizer and generation_config.json (else
    `generation`, else orionlm's defaults)."""
    from ..checkpoint import write_model_directory

    max_shard_bytes = _shard_bytes(shard_gb)
    source, tensors = _open_source(src, dst, dtype, force, revision)
    write_model_directory(source.config, tensors, dst, source.tokenizer, source.generation or generation,
                          max_shard_bytes)  # fmt: skip
    print(f"wrote {dst}")


def _open_source(
    src: str, dst: Path, dtype: DtypeName | None, force: bool, revision: str | None = None
) -> tuple[ModelSource, LazyTensors]:
    """The source opened without reading weights, and its tensors checked against its config, in the order
    the model holds them, converted to `dtype` as each is read (None: as stored)."""
    from ..checkpoint import dtype_from_name, model_tensors, refuse_existing
    from ..errors import with_revision
    from ..loading import open_model

    refuse_existing(dst, force)
    source = open_model(with_revision(src, revision))
    tensors = model_tensors(source.config, source.tensors, str(source.path))
    return source, tensors if dtype is None else tensors.cast(dtype_from_name(dtype, source.path))


def _shard_bytes(shard_gb: float) -> int:
    if shard_gb <= 0:
        raise OrionError(f"--shard-gb must be positive, got {shard_gb}")
    return round(shard_gb * 1024**3)
