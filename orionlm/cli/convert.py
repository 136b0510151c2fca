"""`orionlm convert`: model directories to and from Hugging Face, GGUF and Auron layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..checkpoint import dtype_from_name, refuse_existing
from ..errors import OrionError

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def convert_from_hf(src: str, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Convert a Hugging Face model directory (or Hub id) into an orionlm model directory.

    Architectures: llama, mistral, mixtral, qwen2, qwen3, qwen2_moe, qwen3_moe, bloom.

    Args:
        src: a Hugging Face model directory or Hub id
        dst: the orionlm directory to write
        dtype: the weights' dtype; auto keeps the source's
        force: replace dst if it exists
    """
    from ..checkpoint import read_generation_config
    from ..convert.hf import convert_hf
    from ..loading import resolve_model_path

    refuse_existing(dst, force)
    path = resolve_model_path(src)
    convert_hf(path, dst, dtype_from_name(dtype, path), read_generation_config(path) or None)
    print(f"wrote {dst}")


def convert_to_hf(src: Path, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Export an orionlm model directory as a Hugging Face directory that transformers loads.

    Args:
        src: an orionlm model directory
        dst: the Hugging Face directory to write
        dtype: the weights' dtype; auto keeps the source's
        force: replace dst if it exists
    """
    from ..convert.hf import save_hf

    _export_model(src, dst, save_hf, dtype=dtype, force=force)


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
    from ..convert.gguf import save_gguf

    if dst.is_dir():  # --force replaces a file, never a directory and what is in it
        raise OrionError(f"{dst} is a directory; give the path of the .gguf file to write")
    save = lambda model, tokenizer, out: save_gguf(model, tokenizer, out, dtype)
    _export_model(src, dst, save, dtype="float32", force=force)


def convert_from_gguf(src: Path, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Import a llama- or bloom-architecture GGUF file (F32, F16, BF16 or Q8_0, dequantized), with its embedded
    tokenizer.

    Args:
        src: the .gguf file
        dst: the orionlm directory to write
        dtype: the weights' dtype; auto is float32
        force: replace dst if it exists
    """
    from ..checkpoint import save_checkpoint
    from ..convert.gguf import load_gguf

    refuse_existing(dst, force)
    model, tokenizer = load_gguf(src, device="cpu", dtype=dtype_from_name(dtype, src))
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
    from ..config import AURON_GENERATION
    from ..convert.auron import load_auron

    _import_model(src, dst, load_auron, dtype=dtype, force=force, generation=AURON_GENERATION)


def convert_to_auron(src: Path, dst: Path, /, *, dtype: DtypeName = "auto", force: bool = False) -> None:
    """Export an orionlm chimera model directory in Auron's checkpoint layout.

    Args:
        src: an orionlm model directory of the chimera family
        dst: the Auron directory to write
        dtype: the weights' dtype; auto keeps the source's
        force: replace dst if it exists
    """
    from ..checkpoint import read_generation_config
    from ..convert.auron import save_auron

    save = lambda model, tokenizer, out: save_auron(model, out, tokenizer, read_generation_config(src))
    _export_model(src, dst, save, dtype=dtype, force=force)


def _import_model(
    src: str, dst: Path, loader, *, dtype: DtypeName, force: bool, generation: dict | None = None
) -> None:
    """Load a foreign model directory (or Hub id) with `loader` and write it as an orionlm directory, keeping
    its generation_config.json (else `generation`)."""
    from ..checkpoint import read_generation_config, save_checkpoint
    from ..loading import resolve_model_path

    refuse_existing(dst, force)
    path = resolve_model_path(src)
    model, tokenizer = loader(path, device="cpu", dtype=dtype_from_name(dtype, path))
    save_checkpoint(model, dst, tokenizer, read_generation_config(path) or generation)
    print(f"wrote {dst}")


def _export_model(src: Path, dst: Path, saver, *, dtype: DtypeName, force: bool) -> None:
    """Load an orionlm model directory and write it in a foreign layout with `saver(model, tokenizer, dst)`."""
    from ..checkpoint import load_checkpoint

    refuse_existing(dst, force)
    model, tokenizer = load_checkpoint(src, device="cpu", dtype=dtype_from_name(dtype, src))
    saver(model, tokenizer, dst)
    print(f"wrote {dst}")
