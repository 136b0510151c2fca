"""Import and export GGUF files (llama.cpp's format) of the llama (dense and Mixtral-style MoE) and bloom
architectures, with their embedded tokenizer.

Weights: F32/F16/BF16 tensors (and Q8_0 ones, dequantized) are renamed to orionlm's (Hugging Face) names.
llama.cpp's converters store llama Q/K rows in the interleaved-pair RoPE layout (rotating features 2i and
2i+1); orionlm uses HF's rotate-half layout (rotating i and i + head_dim/2), so those rows are permuted back
on import and forth on export. bloom's fused QKV rows are (3, heads, head_dim) in GGUF and (heads, 3,
head_dim) in orionlm (and HF). save_gguf writes F32, F16 or Q8_0 matrices.

The embedded tokenizer is read and written by gguf_vocab.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, model_from_tensors, resolve_device
from ..config import BLOOM_LAYOUT, ConfigError, ModelConfig
from ..model import OrionLM
from ..tokenizer import Tokenizer
from .gguf_vocab import GGUFError, tokenizer_from_metadata, tokenizer_metadata

try:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
    from gguf.quants import dequantize
except ImportError:  # optional dependency: only needed to read GGUF files
    GGUFReader = None

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
    """Load an F32/F16/BF16/Q8_0 llama- or bloom-architecture GGUF file as an OrionLM model (Q8_0 dequantized)
    and its tokenizer."""
    path = Path(path)
    config, tensors, tokenizer = read_gguf_model(path)
    device, dtype = resolve_device(device, dtype)
    try:
        model = model_from_tensors(config, tensors, device, dtype, str(path))
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    return model, tokenizer


def read_gguf_model(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """A GGUF file's config, tensors under orionlm's names (Q8_0 dequantized) and tokenizer."""
    metadata, reader = read_gguf(path)
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; only {' and '.join(map(repr, ARCHITECTURES))} "
            "can be imported"
        )
    supported = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                 GGMLQuantizationType.Q8_0)  # fmt: skip
    for t in reader.tensors:
        if t.tensor_type not in supported:
            raise GGUFError(
                f"{path}: GGUF tensors of type {t.tensor_type.name} are not supported; use an F32, F16, BF16 or Q8_0 "
                f"file (tensor {t.name!r} is {t.tensor_type.name})"
            )
    gguf_tensors = {t.name: _to_torch(t) for t in reader.tensors}
    config = config_from_metadata(metadata, gguf_tensors, str(path))
    tensors = (bloom_hf_tensors if arch == "bloom" else llama_hf_tensors)(gguf_tensors, config, str(path))
    return config, tensors, tokenizer_from_metadata(metadata, str(path))


def read_gguf(path: Path) -> tuple[dict[str, Any], Any]:
    """The metadata as plain Python values, and the reader (whose tensors are memory-mapped)."""
    if GGUFReader is None:
        raise GGUFError("reading GGUF files needs the `gguf` package: pip install 'orionlm[gguf]'")
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


def _to_torch(t: Any) -> torch.Tensor:
    """A tensor copied out of the memory map; GGUF lists dims fastest-first, numpy's shape is the reverse."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == GGMLQuantizationType.Q8_0:  # dequantized: orionlm computes in float
        return torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape))
    if t.tensor_type == GGMLQuantizationType.BF16:
        # The reader hands BF16 over as raw bytes; reinterpret them (numpy has no bfloat16).
        raw = np.ascontiguousarray(t.data).view(np.int16).reshape(shape)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(t.data).reshape(shape))


def config_from_metadata(metadata: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> ModelConfig:
    """ModelConfig from the `llama.*` or `bloom.*` keys; vocab size and untied head come from the tensors."""
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
    embedding, head = tensors["token_embd.weight"], tensors.get("output.weight")
    common = dict(
        name=str(metadata.get("general.name") or ""),
        vocab_size=embedding.shape[0],
        hidden_size=key("embedding_length"),
        num_layers=key("block_count"),
        num_heads=key("attention.head_count"),
        max_seq_len=key("context_length"),
        # llama.cpp's llama files leave out a tied head; its bloom converter writes a copy of the embedding.
        tie_embeddings=head is None or (arch == "bloom" and torch.equal(head, embedding)),
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


def _llama_fields(key: Callable[..., Any], tensors: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
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


def llama_hf_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """GGUF tensors renamed to orionlm's names, Q/K un-permuted and MoE gate/up stacked as [gate; up]."""
    out: dict[str, torch.Tensor] = {}
    gate_exps: dict[str, torch.Tensor] = {}
    up_exps: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit():
            prefix = f"model.layers.{parts[1]}."
            kind, suffix = parts[2], parts[3]
            if kind == "ffn_gate_exps":
                gate_exps[prefix] = tensor
                continue
            if kind == "ffn_up_exps":
                up_exps[prefix] = tensor
                continue
            if kind not in _BLOCK_NAMES:
                raise GGUFError(f"{source}: unexpected tensor {name!r} for a llama model")
            if kind == "attn_q":
                tensor = _unpermute(tensor, config.num_heads)
            elif kind == "attn_k":
                tensor = _unpermute(tensor, config.num_kv_heads)
            if kind == "ffn_down_exps":
                out[prefix + _BLOCK_NAMES[kind]] = tensor  # (E, C, I): already orionlm's layout
            else:
                out[f"{prefix}{_BLOCK_NAMES[kind]}.{suffix}"] = tensor
        elif len(parts) == 2 and parts[0] in _TOP_NAMES:
            out[f"{_TOP_NAMES[parts[0]]}.{parts[1]}"] = tensor
        else:
            raise GGUFError(f"{source}: unexpected tensor {name!r} for a llama model")
    if set(gate_exps) != set(up_exps):
        raise GGUFError(f"{source}: every ffn_gate_exps needs an ffn_up_exps in the same block")
    for prefix, gate in gate_exps.items():
        out[prefix + "mlp.experts.gate_up_proj"] = torch.cat([gate, up_exps[prefix]], dim=1)  # (E, 2I, C)
    return out


def bloom_hf_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """GGUF bloom tensors renamed to orionlm's names, the fused QKV rows regrouped per head."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _BLOOM_BLOCK_NAMES:
            if parts[2] == "attn_qkv":
                tensor = _swap_qkv_groups(tensor, 3, config.num_heads)
            out[f"model.layers.{parts[1]}.{_BLOOM_BLOCK_NAMES[parts[2]]}.{parts[3]}"] = tensor
        elif len(parts) == 2 and parts[0] in _BLOOM_TOP_NAMES:
            out[f"{_BLOOM_TOP_NAMES[parts[0]]}.{parts[1]}"] = tensor
        else:
            raise GGUFError(f"{source}: unexpected tensor {name!r} for a bloom model")
    return out


def _swap_qkv_groups(tensor: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """Fused QKV rows grouped (outer, inner, head_dim) regrouped as (inner, outer, head_dim): BLOOM groups
    them by head (heads, 3, head_dim), llama.cpp by kind (3, heads, head_dim)."""
    return tensor.reshape(outer, inner, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


# --- export -------------------------------------------------------------------------------------------------

GGUF_DTYPES = ("f32", "f16", "q8_0")


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (interleaved pairs) from HF's rotate-half order: the inverse of _unpermute."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_gguf_tensors(model: OrionLM) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's llama names, Q/K rows permuted, MoE gate/up stacks split."""
    config = model.config
    inverse = {v: k for k, v in _BLOCK_NAMES.items()}
    top = {f"{v}.weight": f"{k}.weight" for k, v in _TOP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()
        if name in top:
            if not (name == "lm_head.weight" and config.tie_embeddings):
                out[top[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)  # model.layers.N.rest
        module, _, suffix = rest.rpartition(".")
        if rest == "mlp.experts.gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)  # (E, 2I, C) -> (E, I, C) twice
            out[f"blk.{index}.ffn_gate_exps.weight"], out[f"blk.{index}.ffn_up_exps.weight"] = gate, up
            continue
        if rest == "mlp.experts.down_proj":
            out[f"blk.{index}.ffn_down_exps.weight"] = tensor
            continue
        if module == "self_attn.q_proj":
            tensor = _permute(tensor, config.num_heads)
        elif module == "self_attn.k_proj":
            tensor = _permute(tensor, config.num_kv_heads)
        out[f"blk.{index}.{inverse[module]}.{suffix}"] = tensor
    return out


def bloom_gguf_tensors(model: OrionLM) -> dict[str, torch.Tensor]:
    """An ALiBi (BLOOM) model's tensors under llama.cpp's bloom names, the fused QKV rows grouped by kind."""
    config = model.config
    block = {v: k for k, v in _BLOOM_BLOCK_NAMES.items()}
    top = {v: k for k, v in _BLOOM_TOP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()  # lm_head is written even when tied, as llama.cpp's converter does
        module, _, suffix = name.rpartition(".")
        if module in top:
            out[f"{top[module]}.{suffix}"] = tensor
        else:
            _, _, index, rest = module.split(".", 3)  # model.layers.N.rest
            if rest == "self_attn.qkv_proj":
                tensor = _swap_qkv_groups(tensor, config.num_heads, 3)
            out[f"blk.{index}.{block[rest]}.{suffix}"] = tensor
    return out


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
    if config.thinks:
        problems.append("a Quiet-STaR thinking head (meta embeddings and mixing head)")
    if problems:
        raise GGUFError(f"GGUF export cannot express {'; '.join(problems)}")


def save_gguf(model: OrionLM, tokenizer: Tokenizer | None, path: str | Path, dtype: str = "f16") -> Path:
    """Write a GGUF file for llama.cpp with the tokenizer embedded, atomically: the llama architecture for dense
    and Mixtral-style MoE models (stacked experts, the router as ffn_gate_inp), bloom for ALiBi (BLOOM) ones.
    dtype f32, f16 or q8_0 applies to the matrices; norms and routers stay float32, as llama.cpp's converter
    keeps them."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    config = model.config
    _check_exportable(config)
    if tokenizer is None:
        raise GGUFError("the model has no tokenizer; a GGUF file embeds one, so export a model directory that has it")
    if dtype not in GGUF_DTYPES:
        raise GGUFError(f"GGUF dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    bloom = config.family == "alibi"
    writer = GGUFWriter(tmp, "bloom" if bloom else "llama")
    writer.add_name(config.name or "orionlm")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.expert_intermediate_size if config.num_experts else config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_vocab_size(config.vocab_size)
    if bloom:
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
    for name, tensor in (bloom_gguf_tensors(model) if bloom else llama_gguf_tensors(model)).items():
        data = tensor.numpy()
        keep_f32 = data.ndim == 1 or "ffn_gate_inp" in name or dtype == "f32"
        if keep_f32:
            writer.add_tensor(name, data)
        elif dtype == "f16" or data.shape[-1] % 32:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
