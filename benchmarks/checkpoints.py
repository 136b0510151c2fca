"""Random Mistral-shaped Hugging Face checkpoints of any size, for the memory benchmarks (memory_scale.py,
seed_scale.py): config.json, sharded bf16 safetensors and a small byte-level BPE tokenizer (with merges, which
llama.cpp and so `convert to-gguf` need), written one tensor at a time, so a 7B checkpoint is written in the
memory of its largest tensor.

    python benchmarks/checkpoints.py 7b /tmp/mistral-7b --seed 1
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from orionlm.checkpoint import LazyTensors, TensorSpec, atomic_directory, write_safetensors
from orionlm.tokenizer import Tokenizer

# name -> (hidden, layers, FFN, heads, KV heads); vocab 32000 and head_dim hidden / heads throughout
SHAPES = {
    "0.28b": (1024, 16, 3584, 16, 4),
    "0.84b": (2048, 13, 7168, 16, 4),
    "7b": (4096, 32, 14336, 32, 8),  # Mistral-7B-v0.1
}
VOCAB = 32000


@functools.cache
def tokenizer() -> Tokenizer:
    """300 tokens trained on this file: the same every time the file is the same."""
    return Tokenizer.train_bpe_from_texts([Path(__file__).read_text()], 300)


def mistral_config(shape: str) -> dict:
    hidden, layers, ffn, heads, kv_heads = SHAPES[shape]
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": VOCAB,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": None, "eos_token_id": tokenizer().eos_id,
    }  # fmt: skip


def mistral_specs(config: dict, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """Every tensor's name, shape and dtype, in Hugging Face Mistral's names."""
    C, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]  # noqa: E741
    kv = config["num_key_value_heads"] * config["head_dim"]
    specs = {"model.embed_tokens.weight": (V, C)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs |= {
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (C, C), p + "self_attn.k_proj.weight": (kv, C),
            p + "self_attn.v_proj.weight": (kv, C), p + "self_attn.o_proj.weight": (C, C),
            p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C), p + "mlp.down_proj.weight": (C, I),
        }  # fmt: skip
    specs |= {"model.norm.weight": (C,), "lm_head.weight": (V, C)}
    return {name: TensorSpec(shape, dtype) for name, shape in specs.items()}


def write_random_mistral(
    directory: Path, shape: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 2 * 1024**3
) -> Path:
    """A random Mistral-shaped checkpoint (weights N(0, 0.02), norms 1), written tensor by tensor."""
    config = mistral_config(shape)
    specs = mistral_specs(config, dtype)
    names = list(specs)

    def read(name: str) -> torch.Tensor:
        spec = specs[name]
        if len(spec.shape) == 1:
            return torch.ones(spec.shape, dtype=dtype)
        generator = torch.Generator().manual_seed(seed * 100_003 + names.index(name))
        return (torch.randn(spec.shape, generator=generator) * 0.02).to(dtype)

    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(LazyTensors(specs, read), tmp, shard_bytes)
        tokenizer().save(tmp)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=SHAPES)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="the largest shard, in GiB")
    args = parser.parse_args()
    write_random_mistral(args.out, args.shape, args.seed, shard_bytes=int(args.shard_gb * 1024**3))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
