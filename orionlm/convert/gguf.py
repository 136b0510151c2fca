"""Import and export GGUF files (llama.cpp's format) of the llama (dense and Mixtral-style MoE) and bloom
architectures, with their embedded tokenizer.

Weights: F32/F16/BF16 tensors, and the block-quantized types READ_AS lists (dequantized to float32 with the `gguf`
package's dequantizers, one tensor at a time), are renamed to orionlm's (Hugging Face) names.
llama.cpp's converters store llama Q/K rows in the interleaved-pair RoPE layout (rotating features 2i and
2i+1); orionlm uses HF's rotate-half layout (rotating i and i + head_dim/2), so those rows are permuted back
on import and forth on export. bloom's fused QKV rows are (3, heads, head_dim) in GGUF and (heads, 3,
head_dim) in orionlm (and HF). save_gguf writes F32, F16 or Q8_0 matrices itself, and llama.cpp's quantized
types (Q4_K_M, ...) through llama.cpp's own quantizer (gguf_quant.py) from an F16 file it writes first.

The embedded tokenizer is read and written by gguf_vocab.py.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import (
    CheckpointError,
    LazyTensors,
    TensorSpec,
    atomic_file,
    model_from_tensors,
    resolve_device,
    state_dict_for_saving,
)
from ..config import BLOOM_LAYOUT, ConfigError, ModelConfig
from ..errors import require
from ..model import OrionLM
from ..tokenizer import Tokenizer
from .gguf_quant import LLAMA_CPP_TYPES, llama_cpp_quantize, require_llama_cpp
from .gguf_vocab import GGUFError, tokenizer_from_metadata, tokenizer_metadata

require("gguf", "gguf", "reading or writing GGUF files")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

_FLOAT_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
                GGMLQuantizationType.BF16: torch.bfloat16}  # fmt: skip
# The block-quantized types read (dequantized: orionlm computes in float): llama.cpp's legacy and k-quants, and
# IQ4_NL, which Q2_K and Q3_K files of older llama.cpp versions hold where a row is not whole 256-value blocks.
_QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
# the dtype each supported GGUF type is read as
READ_AS = _FLOAT_TYPES | {GGMLQuantizationType[name]: torch.float32 for name in _QUANTIZED_TYPES}

ARCHITECTURES = ("llama", "bloom")

# GGUF tensor name (after "blk.N.") -> orionlm name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Mixtral-style MoE (llama architecture with llama.expert_count), experts stacked on the first axis
    "ffn_gate_inp": "mlp.gate",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# The same for llama.cpp's bloom architecture
_BLOOM_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOOM_TOP_NAMES = {"token_embd_norm": "model.embed_norm"} | _TOP_NAMES


def load_gguf(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[OrionLM, Tokenizer]:
    """Load a llama- or bloom-architecture GGUF file of the types READ_AS lists as an OrionLM model (quantized
    tensors dequantized) and its tokenizer."""
    path = Path(path)
    config, tensors, tokenizer = read_gguf_model(path)
    device, dtype = resolve_device(device, dtype)
    try:
        model = model_from_tensors(config, tensors, device, dtype, str(path))
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    return model, tokenizer


def read_gguf_model(path: Path) -> tuple[ModelConfig, LazyTensors, Tokenizer]:
    """A GGUF file's config (from its metadata and tensor shapes), its tensors under orionlm's names, each read
    from the file on demand (quantized ones dequantized to float32, float ones in their stored dtypes), and its
    tokenizer."""
    metadata, reader = read_gguf(path)
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; only {' and '.join(map(repr, ARCHITECTURES))} "
            "can be imported"
        )
    stored = _gguf_tensors(reader, path)
    del reader  # its memory map: pages read through it would stay resident while it is open
    config = config_from_metadata(metadata, stored, str(path))
    tensors = (bloom_hf_tensors if arch == "bloom" else llama_hf_tensors)(stored, config, str(path))
    return config, tensors, tokenizer_from_metadata(metadata, str(path))


def read_gguf(path: Path) -> tuple[dict[str, Any], Any]:
    """The metadata as plain Python values, and the reader (whose tensors are memory-mapped)."""
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    try:
        reader = GGUFReader(path)
        metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        # A truncated file surfaces as a numpy reshape or index error deep in the reader.
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    if reader.byte_order != "I":
        raise GGUFError(f"{path} is a GGUF file of the other byte order; convert it to this machine's byte order")
    return metadata, reader


def _field_value(field: Any) -> Any:
    """A metadata value: a scalar, a string, or a list of scalars/strings (nested arrays: None)."""
    types = field.types
    if not types:
        return None

    def scalar(part: np.ndarray, kind: Any) -> Any:
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if kind == GGUFValueType.FLOAT32:
            return float(str(part[0]))  # the shortest decimal of the float32: 1e-05, not 9.99999974e-06
        return part[0].item()

    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 2 or types[-1] == GGUFValueType.ARRAY:
            return None
        return [scalar(field.parts[i], types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], types[0])


def _gguf_tensors(reader: Any, path: Path) -> LazyTensors:
    """The file's tensors under GGUF's names, each read from the file when asked for (not through the reader's
    memory map, whose pages would stay in memory), in the dtype READ_AS gives its type."""
    specs, located = {}, {}
    for t in reader.tensors:
        if t.tensor_type not in READ_AS:
            raise GGUFError(
                f"{path}: GGUF tensors of type {t.tensor_type.name} are not supported (tensor {t.name!r}); orionlm "
                f"reads {', '.join(kind.name for kind in READ_AS)}"
            )
        # GGUF lists dims fastest-first; torch's shape is the reverse
        specs[t.name] = TensorSpec(tuple(int(d) for d in reversed(t.shape.tolist())), READ_AS[t.tensor_type])
        located[t.name] = (t.data_offset, t.n_bytes, t.tensor_type)
    return LazyTensors(specs, lambda name: _read_tensor(path, name, specs[name].shape, *located[name]))


def _read_tensor(path: Path, name: str, shape: tuple[int, ...], offset: int, n_bytes: int, kind: Any) -> torch.Tensor:
    raw = torch.empty(n_bytes, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(raw.numpy()) != n_bytes:
            raise GGUFError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
    if kind in _FLOAT_TYPES:
        return raw.view(READ_AS[kind]).reshape(shape)  # BF16 too: numpy has no bfloat16, torch reads its bytes
    return torch.from_numpy(dequantize(raw.numpy(), kind).reshape(shape))


def config_from_metadata(metadata: dict[str, Any], tensors: LazyTensors, source: str) -> ModelConfig:
    """ModelConfig from the `llama.*` or `bloom.*` keys; vocab size and untied head come from the tensors' specs
    (a bloom file's head is read and compared with the embedding: llama.cpp writes a tied one as a copy)."""
    arch = metadata["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{source}: metadata key {arch}.{name} is missing")
        if isinstance(value, list):
            raise GGUFError(f"{source}: per-layer {arch}.{name} is not supported (one value for all layers)")
        return value

    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{source}: tensor 'token_embd.weight' is missing")
    untied = "output.weight" in tensors and not (
        arch == "bloom" and torch.equal(tensors["output.weight"], tensors["token_embd.weight"])
    )
    common = dict(
        name=str(metadata.get("general.name") or ""),
        vocab_size=tensors.specs["token_embd.weight"].shape[0],
        hidden_size=key("embedding_length"),
        num_layers=key("block_count"),
        num_heads=key("attention.head_count"),
        max_seq_len=key("context_length"),
        # llama.cpp's llama files leave out a tied head; its bloom converter writes a copy of the embedding.
        tie_embeddings=not untied,
        extra={"source": "gguf", "gguf_architecture": arch},
    )
    try:
        if arch == "bloom":
            fields = BLOOM_LAYOUT | dict(intermediate_size=key("feed_forward_length"),
                                         norm_eps=key("attention.layer_norm_epsilon"))  # fmt: skip
        else:
            fields = _llama_fields(key, tensors, source)
        return ModelConfig(**(fields | common))
    except ConfigError as e:
        raise GGUFError(f"{source}: {e}") from None


def _llama_fields(key: Callable[..., Any], tensors: LazyTensors, source: str) -> dict[str, Any]:
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{source}: attention.value_length differs from key_length; orionlm needs them equal")
    rope_dim = key("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        # llama.cpp's Q/K permutation spans the whole head, so a partial rotary layout cannot be undone.
        raise GGUFError(f"{source}: rope.dimension_count ({rope_dim}) != head dim ({head_dim}) is not supported")
    scaling = key("rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise GGUFError(f"{source}: RoPE scaling ({scaling}) is not supported; use a model without rope scaling")
    experts = key("expert_count", 0)
    ffn = key("feed_forward_length")
    moe: dict[str, Any] = {}
    if experts:
        moe = dict(
            num_experts=experts,
            experts_per_token=key("expert_used_count"),
            expert_intermediate_size=ffn,
            norm_topk_prob=True,  # llama.cpp's llama MoE renormalizes the top-k softmax weights, as Mixtral does
        )
    return dict(
        num_kv_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        intermediate_size=ffn,
        norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=key("rope.freq_base", 10000.0),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        hf_model_type="mixtral" if experts else "llama",
        **moe,
    )


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: within each head, GGUF row 2j+k holds HF row k*head_dim/2 + j."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_hf_tensors(stored: LazyTensors, config: ModelConfig, source: str) -> LazyTensors:
    """GGUF tensors under orionlm's names, read on demand: Q/K rows un-permuted, MoE gate/up stacked as [gate; up]."""
    names: dict[str, str] = {}  # orionlm name -> GGUF name
    experts: dict[str, dict[str, str]] = {}  # layer prefix -> {"ffn_gate_exps" / "ffn_up_exps": GGUF name}
    for name in stored:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit():
            prefix = f"model.layers.{parts[1]}."
            kind, suffix = parts[2], parts[3]
            if kind in ("ffn_gate_exps", "ffn_up_exps"):
                experts.setdefault(prefix, {})[kind] = name
            elif kind not in _BLOCK_NAMES:
                raise GGUFError(f"{source}: unexpected tensor {name!r} for a llama model")
            elif kind == "ffn_down_exps":
                names[prefix + _BLOCK_NAMES[kind]] = name  # (E, C, I): already orionlm's layout
            else:
                names[f"{prefix}{_BLOCK_NAMES[kind]}.{suffix}"] = name
        elif len(parts) == 2 and parts[0] in _TOP_NAMES:
            names[f"{_TOP_NAMES[parts[0]]}.{parts[1]}"] = name
        else:
            raise GGUFError(f"{source}: unexpected tensor {name!r} for a llama model")
    if any(len(pair) != 2 for pair in experts.values()):
        raise GGUFError(f"{source}: every ffn_gate_exps needs an ffn_up_exps in the same block")
    permuted = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    specs = {ours: stored.specs[name] for ours, name in names.items()}
    for prefix, pair in experts.items():
        gate, up = stored.specs[pair["ffn_gate_exps"]], stored.specs[pair["ffn_up_exps"]]
        specs[prefix + "mlp.experts.gate_up_proj"] = TensorSpec(
            (gate.shape[0], gate.shape[1] + up.shape[1], gate.shape[2]), torch.promote_types(gate.dtype, up.dtype)
        )

    def read(ours: str) -> torch.Tensor:
        if ours not in names:
            pair = experts[ours.removesuffix("mlp.experts.gate_up_proj")]
            return torch.cat([stored[pair["ffn_gate_exps"]], stored[pair["ffn_up_exps"]]], dim=1)  # (E, 2I, C)
        name = names[ours]
        heads = permuted.get(name.split(".")[2]) if name.startswith("blk.") else None
        return stored[name] if heads is None else _unpermute(stored[name], heads)

    return LazyTensors(specs, read)


def bloom_hf_tensors(stored: LazyTensors, config: ModelConfig, source: str) -> LazyTensors:
    """GGUF bloom tensors under orionlm's names, read on demand, the fused QKV rows regrouped per head; a tied
    head (llama.cpp writes it as a copy of the embedding) left out, as orionlm stores it."""
    names: dict[str, str] = {}
    for name in stored:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _BLOOM_BLOCK_NAMES:
            names[f"model.layers.{parts[1]}.{_BLOOM_BLOCK_NAMES[parts[2]]}.{parts[3]}"] = name
        elif len(parts) == 2 and parts[0] in _BLOOM_TOP_NAMES:
            if not (parts[0] == "output" and config.tie_embeddings):
                names[f"{_BLOOM_TOP_NAMES[parts[0]]}.{parts[1]}"] = name
        else:
            raise GGUFError(f"{source}: unexpected tensor {name!r} for a bloom model")

    def read(ours: str) -> torch.Tensor:
        tensor = stored[names[ours]]
        return _swap_qkv_groups(tensor, 3, config.num_heads) if ".attn_qkv." in names[ours] else tensor

    return LazyTensors({ours: stored.specs[name] for ours, name in names.items()}, read)


def _swap_qkv_groups(tensor: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """Fused QKV rows grouped (outer, inner, head_dim) regrouped as (inner, outer, head_dim): BLOOM groups
    them by head (heads, 3, head_dim), llama.cpp by kind (3, heads, head_dim)."""
    return tensor.reshape(outer, inner, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


# --- export -------------------------------------------------------------------------------------------------

_OWN_DTYPES = ("f32", "f16", "q8_0")  # written here; the others by llama.cpp's quantizer
GGUF_DTYPES = _OWN_DTYPES + tuple(t for t in LLAMA_CPP_TYPES if t not in _OWN_DTYPES)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (interleaved pairs) from HF's rotate-half order: the inverse of _unpermute."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_gguf_tensors(config: ModelConfig, tensors: LazyTensors) -> LazyTensors:
    """A model's tensors under llama.cpp's llama names, read on demand as float32: Q/K rows permuted, MoE gate/up
    stacks split (each stack read once for both halves)."""
    inverse = {v: k for k, v in _BLOCK_NAMES.items()}
    top = {f"{v}.weight": f"{k}.weight" for k, v in _TOP_NAMES.items()}
    permuted = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
    stacks = lru_cache(maxsize=1)(tensors.__getitem__)  # the gate half, then the up half, of one stack
    specs, reads = {}, {}
    for name, spec in tensors.specs.items():
        if name in top:
            specs[top[name]], reads[top[name]] = spec.shape, partial(_read_permuted, tensors, name, None)
            continue
        _, _, index, rest = name.split(".", 3)  # model.layers.N.rest
        module, _, suffix = rest.rpartition(".")
        if rest == "mlp.experts.gate_up_proj":  # (E, 2I, C) -> (E, I, C) twice
            experts, rows, columns = spec.shape
            for half, kind in enumerate(("ffn_gate_exps", "ffn_up_exps")):
                specs[f"blk.{index}.{kind}.weight"] = (experts, rows // 2, columns)
                reads[f"blk.{index}.{kind}.weight"] = partial(_read_half, stacks, name, half)
        else:
            gguf_name = f"blk.{index}.ffn_down_exps.weight" if rest == "mlp.experts.down_proj" else (
                f"blk.{index}.{inverse[module]}.{suffix}")  # fmt: skip
            specs[gguf_name] = spec.shape
            reads[gguf_name] = partial(_read_permuted, tensors, name, permuted.get(module))
    return _float32(specs, reads)


def _read_permuted(tensors: LazyTensors, name: str, heads: int | None) -> torch.Tensor:
    return tensors[name] if heads is None else _permute(tensors[name], heads)


def _read_half(stacks: Callable[[str], torch.Tensor], name: str, half: int) -> torch.Tensor:
    return stacks(name).chunk(2, dim=1)[half]


def bloom_gguf_tensors(config: ModelConfig, tensors: LazyTensors) -> LazyTensors:
    """An ALiBi (BLOOM) model's tensors under llama.cpp's bloom names, read on demand as float32, the fused QKV
    rows grouped by kind; the head written even when tied, as llama.cpp's converter does."""
    block = {v: k for k, v in _BLOOM_BLOCK_NAMES.items()}
    top = {v: k for k, v in _BLOOM_TOP_NAMES.items()}
    names = list(tensors.specs) + (["lm_head.weight"] if config.tie_embeddings else [])
    specs, reads = {}, {}
    for name in names:
        stored = "model.embed_tokens.weight" if name == "lm_head.weight" and config.tie_embeddings else name
        module, _, suffix = name.rpartition(".")
        if module in top:
            gguf_name, swap = f"{top[module]}.{suffix}", False
        else:
            _, _, index, rest = module.split(".", 3)  # model.layers.N.rest
            gguf_name, swap = f"blk.{index}.{block[rest]}.{suffix}", rest == "self_attn.qkv_proj"
        specs[gguf_name] = tensors.specs[stored].shape
        reads[gguf_name] = partial(_read_swapped, tensors, stored, config.num_heads if swap else None)
    return _float32(specs, reads)


def _read_swapped(tensors: LazyTensors, name: str, heads: int | None) -> torch.Tensor:
    return tensors[name] if heads is None else _swap_qkv_groups(tensors[name], heads, 3)


def _float32(shapes: dict[str, tuple[int, ...]], reads: dict[str, Callable[[], torch.Tensor]]) -> LazyTensors:
    specs = {name: TensorSpec(shape, torch.float32) for name, shape in shapes.items()}
    return LazyTensors(specs, lambda name: reads[name]().float())


def _check_exportable(config: ModelConfig) -> None:
    problems = []
    if config.family == "alibi":
        bloom = (config.fused_qkv, config.embedding_norm, config.norm == "layernorm", config.activation == "gelu_tanh",
                 config.qkv_bias and config.o_bias and config.mlp_bias, not config.qk_norm)  # fmt: skip
        if not all(bloom):
            problems.append("an ALiBi model that is not in BLOOM's layout (llama.cpp's bloom architecture)")
    elif config.family not in ("dense", "moe"):
        problems.append(f"the {config.family} family (llama.cpp takes dense, Mixtral-style MoE and BLOOM models)")
    else:
        if config.activation != "swiglu" or config.norm != "rmsnorm" or config.mlp_bias or config.o_bias:
            problems.append("a non-Llama block (llama.cpp's llama needs RMSNorm, a bias-free SwiGLU MLP and o_proj)")
        if config.qk_norm:
            problems.append("qk_norm")
        if config.partial_rotary_factor != 1.0:
            problems.append("partial rotary embeddings")
    if config.sliding_window is not None:
        problems.append("a sliding attention window")
    if config.shared_expert_intermediate_size or config.moe_layers is not None:
        problems.append("shared experts or dense layers between MoE layers (Mixtral has experts in every layer)")
    if config.quantization_config is not None:
        problems.append("GPTQ codes (export the full-precision model)")
    if config.router_score_bias:
        problems.append("a routing bias (e_score_correction_bias: llama.cpp's llama architecture routes without one)")
    if config.thinks:
        problems.append("a Quiet-STaR thinking head (meta embeddings and mixing head)")
    if problems:
        raise GGUFError(f"GGUF export cannot express {'; '.join(problems)}")


def save_gguf(model: OrionLM, tokenizer: Tokenizer | None, path: str | Path, dtype: str = "f16") -> Path:
    """write_gguf of a model in memory."""
    return write_gguf(model.config, state_dict_for_saving(model), tokenizer, path, dtype)


def write_gguf(
    config: ModelConfig, tensors: Mapping[str, torch.Tensor], tokenizer: Tokenizer | None, path: str | Path,
    dtype: str = "f16",
) -> Path:  # fmt: skip
    """Write a GGUF file for llama.cpp with the tokenizer embedded: the llama architecture for dense and
    Mixtral-style MoE models (stacked experts, the router as ffn_gate_inp), bloom for ALiBi (BLOOM) ones.
    dtype f32, f16 or q8_0 applies to the matrices; norms and routers stay float32, as llama.cpp's converter
    keeps them. The other GGUF_DTYPES are llama.cpp's quantized file types: an F16 file is written beside the
    output first and llama.cpp's quantizer (llama-cpp-python) writes the output from it. `tensors` are the
    model's (as checkpoint.model_tensors gives them), read and written one at a time; the file is written under a
    temporary name and renamed when complete."""
    _check_exportable(config)
    if tokenizer is None:
        raise GGUFError("the model has no tokenizer; a GGUF file embeds one, so export a model directory that has it")
    if dtype not in GGUF_DTYPES:
        raise GGUFError(f"GGUF dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    bloom = config.family == "alibi"
    tensors = (bloom_gguf_tensors if bloom else llama_gguf_tensors)(config, LazyTensors.of(tensors))
    if dtype in _OWN_DTYPES:
        with atomic_file(path) as tmp:
            _write_file(tmp, config, tensors, tokenizer, dtype)
        return Path(path)
    require_llama_cpp()  # before the F16 file is written
    with atomic_file(path) as tmp:
        f16 = tmp.with_name(tmp.name + ".f16")
        try:
            _write_file(f16, config, tensors, tokenizer, "f16")
            llama_cpp_quantize(f16, tmp, dtype)
        finally:
            f16.unlink(missing_ok=True)
    return Path(path)


def _write_file(path: Path, config: ModelConfig, tensors: LazyTensors, tokenizer: Tokenizer, dtype: str) -> None:
    """The GGUF file of `tensors` (under llama.cpp's names) with matrices in dtype f32, f16 or q8_0."""
    types = {name: _gguf_type(name, spec.shape, dtype) for name, spec in tensors.specs.items()}
    writer = GGUFWriter(path, "bloom" if config.family == "alibi" else "llama")
    try:
        _add_metadata(writer, config, tokenizer, dtype)
        for name, spec in tensors.specs.items():
            block, size = GGML_QUANT_SIZES[types[name]]
            nbytes = math.prod(spec.shape) // block * size
            writer.add_tensor_info(name, spec.shape, np.dtype(np.float32), nbytes, raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, kind in tqdm(types.items(), desc=f"writing {dtype} GGUF", unit="tensor", file=sys.stderr,
                               disable=None):  # fmt: skip
            writer.write_tensor_data(_encode(tensors[name].numpy(), kind))
    finally:
        writer.close()


def _gguf_type(name: str, shape: tuple[int, ...], dtype: str) -> Any:
    """The GGML type a tensor is written as: vectors and routers F32, matrices as asked (F16 where a row is not
    whole Q8_0 blocks of 32)."""
    if len(shape) == 1 or "ffn_gate_inp" in name or dtype == "f32":
        return GGMLQuantizationType.F32
    if dtype == "f16" or shape[-1] % 32:
        return GGMLQuantizationType.F16
    return GGMLQuantizationType.Q8_0


def _encode(data: np.ndarray, kind: Any) -> np.ndarray:
    if kind == GGMLQuantizationType.F32:
        return data
    if kind == GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return quantize(data, kind)


def _add_metadata(writer: Any, config: ModelConfig, tokenizer: Tokenizer, dtype: str) -> None:
    """The hyperparameters llama.cpp reads, the file type and the tokenizer."""
    writer.add_name(config.name or "orionlm")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.expert_intermediate_size if config.num_experts else config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_vocab_size(config.vocab_size)
    if config.family == "alibi":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.num_experts:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.experts_per_token)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_type[dtype])
    tokenizer_metadata(writer, tokenizer, config.vocab_size)
