"""Hugging Face GPTQ checkpoints, read and written: orionlm's own quantized models exported with to-hf and read
back bit for bit; directories written by hand for every architecture from-hf reads (codes packed here with Python
integers, the v1 zero-point convention, act-order, 2/3/4/8 bits, asymmetric, one group per row) whose weights
decode to what was packed and whose logits match transformers on those weights; AutoGPTQ's quantize_config.json;
the refusals; generate and a LoRA step on a loaded directory."""

import json
import shutil
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from orionlm.checkpoint import CheckpointError, read_safetensors
from orionlm.cli import main
from orionlm.cli.convert import convert_from_hf, convert_to_hf
from orionlm.config import preset
from orionlm.convert.hf import config_from_hf, load_hf
from orionlm.convert.hf_config import ConvertError
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.nn.lora import LoRAConfig, apply_lora
from orionlm.quant.gptq import QuantConfig
from orionlm.quant.linear import QuantExperts, QuantLinear
from orionlm.quant.lora import LoRAQuantExperts, LoRAQuantLinear
from orionlm.quant.model import quantize_model, save_quantized
from orionlm.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
VOCAB = 320
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))

# ---------------------------------------------------------------------------------------------
# orionlm's quantized models -> to-hf -> back

OWN = {  # preset -> (method, QuantConfig, a per-expert Hugging Face tensor name or None)
    "tiny-dense": ("gptq", QuantConfig(bits=4, group_size=32, desc_act=True), None),
    "tiny-moe": ("rtn", QuantConfig(bits=3, group_size=32, sym=False), "mlp.experts.3.up_proj.qweight"),
    "tiny-qwen-moe": ("gptq", QuantConfig(bits=4, group_size=-1, desc_act=True), "mlp.experts.3.up_proj.g_idx"),
    "tiny-alibi": ("rtn", QuantConfig(bits=8, group_size=32), None),
}


def _own_quantized(name: str, tmp_path) -> tuple[OrionLM, object]:
    model = OrionLM(preset(name, vocab_size=TOK.vocab_size, initializer_range=0.1)).eval()
    model.reset_parameters(seed=0)
    method, config, _ = OWN[name]
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, samples if method == "gptq" else None, config, method=method, progress=False)
    save_quantized(model, tmp_path / "q", TOK)
    return model, tmp_path / "q"


@pytest.mark.parametrize("name", OWN)
def test_own_gptq_models_export_to_hugging_face_and_back_bit_for_bit(name, tmp_path):
    model, source = _own_quantized(name, tmp_path)
    convert_to_hf(str(source), tmp_path / "hf")
    settings = model.config.quantization_config
    written = settings | {"lm_head": False, "pack_dtype": "int32"}  # GPTQModel's keys too
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"] == written
    assert json.loads((tmp_path / "hf" / "quantize_config.json").read_text()) == written
    tensors = read_safetensors(tmp_path / "hf")
    assert not any("block_sparse_moe" in n for n in tensors)  # Mixtral's GPTQ tensors as GPTQModel names them
    prefix = "transformer.h.1." if name == "tiny-alibi" else "model.layers.1."
    expert = OWN[name][2]
    assert expert is None or tensors[prefix + expert].dtype == torch.int32
    quantized = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".qweight")}
    assert quantized and not {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight")} & quantized

    loaded, _, _ = load_model(tmp_path / "hf", device="cpu")
    assert loaded.config.quantization_config == settings
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    convert_from_hf(str(tmp_path / "hf"), tmp_path / "back")
    ours, back = read_safetensors(source), read_safetensors(tmp_path / "back")
    assert ours.keys() == back.keys() and all(torch.equal(ours[n], back[n]) for n in ours)
    assert all(ours[n].dtype == back[n].dtype for n in ours)
    assert json.loads((tmp_path / "back" / "quantize_config.json").read_text()) == settings


def test_a_dtype_asked_for_leaves_the_codes_as_they_are(tmp_path):
    _, source = _own_quantized("tiny-dense", tmp_path)
    convert_to_hf(str(source), tmp_path / "hf", dtype="float16")
    tensors = read_safetensors(tmp_path / "hf")
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    layer = "model.layers.0.self_attn.q_proj."
    assert [tensors[layer + t].dtype for t in ("qweight", "qzeros", "scales", "g_idx")] == [
        torch.int32, torch.int32, torch.float16, torch.int32
    ]  # fmt: skip
    ours = read_safetensors(source)
    assert torch.equal(tensors[layer + "qweight"], ours[layer + "qweight"])


# ---------------------------------------------------------------------------------------------
# Directories packed by hand, every architecture

SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128)  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
HF_CONFIGS = {
    "llama": dict(SMALL, attention_bias=True, tie_word_embeddings=True),
    "mistral": dict(SMALL, head_dim=8),  # k/v_proj's 16 outputs do not pack at 3 bits: they stay in float
    "mixtral": dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(SMALL),
    "qwen3": dict(SMALL, head_dim=32),
    "qwen2_moe": dict(SMALL, **MOE, shared_expert_intermediate_size=64, mlp_only_layers=[1]),
    "qwen3_moe": dict(SMALL, **MOE, head_dim=16, norm_topk_prob=True),
    "bloom": dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
}
# (bits, group_size, desc_act, sym, checkpoint_format); qwen2's groups of 48 leave a ragged last group
SETTINGS = {
    "llama": (4, 32, True, True, "gptq"),
    "mistral": (3, -1, False, False, "gptq"),
    "mixtral": (2, 16, True, False, "gptq_v2"),
    "qwen2": (8, 48, False, True, "gptq"),
    "qwen3": (4, -1, True, False, "gptq_v2"),
    "qwen2_moe": (3, 32, True, True, "gptq"),
    "qwen3_moe": (4, 16, False, False, "gptq"),
    "bloom": (4, 32, True, True, "gptq_v2"),
}
KEPT = ("embed", "lm_head", "norm", "mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(L, M) codes -> (L * bits / 32, M) int32: each column one little-endian bit stream cut into 32-bit words
    (AutoGPTQ's layout; 3-bit values cross words), built with Python integers."""
    L = values.shape[0]
    columns = []
    for column in values.t().tolist():
        stream = sum(v << (bits * i) for i, v in enumerate(column))
        columns.append([(stream >> (32 * w)) & 0xFFFFFFFF for w in range(L * bits // 32)])
    words = torch.tensor(columns, dtype=torch.int64).t()
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def codes(name: str, N: int, K: int, settings: tuple) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A GPTQ layer's tensors as a checkpoint stores them, and the float weight (N, K) they stand for. The seed of
    the act-order permutation is the layer's input: an expert's gate and up projections share it."""
    bits, group_size, desc_act, sym, checkpoint_format = settings
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    groups = 1 if group_size == -1 else -(-K // group_size)
    q = torch.randint(0, 2**bits, (N, K), generator=gen)
    scale = (torch.rand(N, groups, generator=gen) * 0.05 + 0.01).half().float()
    low = 1 if checkpoint_format == "gptq" else 0  # v1 stores zero - 1, so it cannot hold 0
    zero = torch.full((N, groups), 2 ** (bits - 1)) if sym else torch.randint(low, 2**bits, (N, groups), generator=gen)
    g_idx = torch.zeros(K, dtype=torch.long) if group_size == -1 else torch.arange(K) // group_size
    if desc_act:
        same_input = name.removesuffix(".w3") + ".w1" if name.endswith(".w3") else name.replace("up_proj", "gate_proj")
        g_idx = g_idx[torch.randperm(K, generator=torch.Generator().manual_seed(zlib.crc32(same_input.encode())))]
    stored_zero = zero - 1 if checkpoint_format == "gptq" else zero
    tensors = {"qweight": pack(q.t(), bits), "qzeros": pack(stored_zero, bits).t().contiguous(),
               "scales": scale.t().half().contiguous(), "g_idx": g_idx.to(torch.int32)}  # fmt: skip
    return tensors, scale[:, g_idx] * (q - zero[:, g_idx])


def write_gptq_directory(arch: str, path, settings: tuple | None = None):
    """(a Hugging Face GPTQ directory written by hand, the same model in float holding the weights its codes decode
    to): every linear that packs at the settings' bits (routers, embeddings and head excepted) as codes."""
    settings = settings or SETTINGS[arch]
    bits = settings[0]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **HF_CONFIGS[arch]), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.2 if p.dim() == 1 else p.shape[-1] ** -0.5))
            p.add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(path / "float")
    TOK.save(path / "float")
    tensors = load_file(str(path / "float" / "model.safetensors"))
    gptq = {}
    for name, tensor in tensors.items():
        layer = name.removesuffix(".weight")
        N, K = tensor.shape if tensor.dim() == 2 else (0, 0)
        if tensor.dim() != 2 or any(k in name for k in KEPT) or N * bits % 32 or K * bits % 32:
            gptq.setdefault(name, tensor)
            continue
        packed, weight = codes(layer, N, K, settings)
        tensors[name] = weight
        gptq |= {f"{layer}.{key}": value for key, value in packed.items()}
        if f"{layer}.bias" in tensors:  # GPTQ layers keep their bias in float16
            tensors[f"{layer}.bias"] = gptq[f"{layer}.bias"] = tensors[f"{layer}.bias"].half().float()
    save_file(tensors, str(path / "float" / "model.safetensors"))
    shutil.copytree(path / "float", path / "gptq")
    (path / "gptq" / "model.safetensors").unlink()
    save_file(gptq, str(path / "gptq" / "model.safetensors"))
    bits, group_size, desc_act, sym, checkpoint_format = settings
    config = json.loads((path / "gptq" / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="gptq", bits=bits, group_size=group_size, desc_act=desc_act,
                                         sym=sym, checkpoint_format=checkpoint_format)  # fmt: skip
    (path / "gptq" / "config.json").write_text(json.dumps(config))
    return path / "gptq", path / "float"


def _float_layer(model: OrionLM, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


@pytest.mark.parametrize("arch", list(HF_CONFIGS))
def test_hand_packed_checkpoints_decode_to_their_codes_and_match_transformers(arch, tmp_path):
    gptq, reference = write_gptq_directory(arch, tmp_path)
    model, _ = load_hf(gptq, device="cpu")
    float_model, _ = load_hf(reference, device="cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    experts = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    assert layers and (experts or arch not in ("mixtral", "qwen2_moe", "qwen3_moe"))
    with torch.no_grad():
        for name, layer in layers.items():
            if ".experts." not in name:
                assert torch.equal(layer.dequantize(), _float_layer(float_model, name)), name
        for name, module in experts.items():
            stacks = float_model.get_submodule(name)
            for weight, stack in zip(module.weights(), (stacks.gate_up_proj, stacks.down_proj), strict=True):
                assert torch.equal(weight, stack), name
        if arch == "mistral":
            assert not isinstance(model.model.layers[0].self_attn.k_proj, QuantLinear)
        transformers_model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
        ours, theirs = model(IDS).logits, transformers_model(IDS).logits
        assert theirs.abs().max() > 1.0
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours, float_model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_mixtral_in_gptqmodel_names_and_in_the_hubs(tmp_path):
    """GPTQModel writes Mixtral as mlp.gate and mlp.experts.E.gate_proj/up_proj/down_proj; AutoGPTQ-era files (and
    the hand-packed directory above) as block_sparse_moe.gate and block_sparse_moe.experts.E.w1/w3/w2."""
    hub, _ = write_gptq_directory("mixtral", tmp_path)
    tensors = load_file(str(hub / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.0.w2.qweight" in tensors
    names = {".block_sparse_moe.gate.": ".mlp.gate.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj.",
             ".block_sparse_moe.experts.": ".mlp.experts."}  # fmt: skip
    renamed = {}
    for name, tensor in tensors.items():
        for old, new in names.items():
            name = name.replace(old, new)
        renamed[name] = tensor
    assert "model.layers.0.mlp.experts.0.down_proj.qweight" in renamed and "model.layers.0.mlp.gate.weight" in renamed
    gptqmodel = shutil.copytree(hub, tmp_path / "gptqmodel")
    save_file(renamed, str(gptqmodel / "model.safetensors"))
    with torch.no_grad():
        want = load_hf(hub, device="cpu")[0](IDS).logits
        torch.testing.assert_close(load_hf(gptqmodel, device="cpu")[0](IDS).logits, want, atol=0, rtol=0)


def test_autogptq_quantize_config_json_beside_config_json(tmp_path):
    gptq, _ = write_gptq_directory("llama", tmp_path)
    want, _ = load_hf(gptq, device="cpu")
    config = json.loads((gptq / "config.json").read_text())
    settings = config.pop("quantization_config")
    (gptq / "config.json").write_text(json.dumps(config))
    # AutoGPTQ's file: no quant_method, no checkpoint_format (v1 was all there was)
    autogptq = {k: settings[k] for k in ("bits", "group_size", "desc_act", "sym")} | {"damp_percent": 0.01}
    (gptq / "quantize_config.json").write_text(json.dumps(autogptq))
    model, _ = load_hf(gptq, device="cpu")
    assert model.config.quantization_config["checkpoint_format"] == "gptq"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want(IDS).logits, atol=0, rtol=0)


def test_gptqmodel_quantization_config_is_read():
    """GPTQModel 7.6's quantization_config (as it saved a tiny Llama here; meta trimmed): damp_percent,
    static_groups and true_sequential live in its meta."""
    saved = {"bits": 4, "checkpoint_format": "gptq_v2", "desc_act": True, "format": "gptq_v2", "group_size": 32,
             "lm_head": False, "meta": {"act_group_aware": False, "damp_percent": 0.05, "static_groups": True,
             "true_sequential": False, "quantizer": ["gptqmodel:7.6.0"]}, "method": "gptq", "pack_dtype": "int32",
             "quant_method": "gptq", "sym": False}  # fmt: skip
    data = AutoConfig.for_model("llama", **SMALL).to_dict() | {"quantization_config": saved}
    settings = config_from_hf(data).quantization_config
    assert {k: settings[k] for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format")} == dict(
        bits=4, group_size=32, desc_act=True, sym=False, checkpoint_format="gptq_v2"
    )
    assert (settings["damp_percent"], settings["static_groups"], settings["true_sequential"]) == (0.05, True, False)


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming what is read


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}


@pytest.mark.parametrize(
    "quantization, words",
    [
        ({"quant_method": "awq", "bits": 4}, ["quant_method 'awq' is not supported"]),
        ({"load_in_4bit": True}, ["quant_method 'bitsandbytes'"]),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, ["quant_method 'bitsandbytes'"]),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, ["quant_method 'fp8'"]),
        ({"quant_method": "compressed-tensors"}, ["quant_method 'compressed-tensors'"]),
        ({"quant_method": "exl2", "bits": 4.65}, ["quant_method 'exl2'"]),
        (GPTQ | {"bits": 5}, ["bits must be one of (2, 3, 4, 8); got 5"]),
        (GPTQ | {"checkpoint_format": "marlin"}, ["checkpoint_format", "'marlin'"]),
        (GPTQ | {"format": "bitblas"}, ["'bitblas'"]),
        (GPTQ | {"checkpoint_format": "ipex"}, ["'ipex'"]),
        ({"bits": 4, "group_size": 128, "is_marlin_format": True}, ["'marlin'"]),
        (GPTQ | {"pack_dtype": "int16"}, ["pack_dtype 'int16'", "int32 words"]),
        (GPTQ | {"dynamic": {"-:.*down_proj": {}}}, ["'dynamic'"]),
        ({"quant_method": "gptq", "bits": 4}, ["integer 'group_size'"]),
        (GPTQ | {"group_size": 0}, ["group_size must be -1"]),
        ("gptq", ["must be an object"]),
    ],
)
def test_unsupported_quantization_is_one_line_naming_what_is_read(quantization, words):
    data = AutoConfig.for_model("llama", **SMALL).to_dict() | {"quantization_config": quantization}
    with pytest.raises(ConvertError) as error:
        config_from_hf(data, "x/config.json")
    message = _one_line(error)
    assert message.startswith("x/config.json: quantization_config: ")
    for word in [*words, "orionlm reads GPTQ"] if "integer" not in words[0] else words:
        assert word in message


def test_tensors_that_do_not_fit_the_settings_are_named(tmp_path):
    gptq, _ = write_gptq_directory("llama", tmp_path)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"]["group_size"] = 16
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_hf(gptq, device="cpu")
    assert "tensor 'model.layers.0.self_attn.q_proj.qzeros' has shape (2, 8), config.json implies (4, 8) with " \
           "GPTQ bits 4 and group_size 16" in _one_line(error)  # fmt: skip


def test_gptq_config_without_codes_and_experts_with_two_act_orders_are_refused(tmp_path):
    _, reference = write_gptq_directory("mixtral", tmp_path / "a")
    config = json.loads((reference / "config.json").read_text())
    (reference / "config.json").write_text(json.dumps(config | {"quantization_config": GPTQ}))
    with pytest.raises(CheckpointError, match="quantization_config, but no layer is stored as GPTQ codes"):
        load_hf(reference, device="cpu")
    gptq, _ = write_gptq_directory("mixtral", tmp_path / "b")
    tensors = load_file(str(gptq / "model.safetensors"))
    up = "model.layers.1.block_sparse_moe.experts.2.w3.g_idx"
    tensors[up] = tensors[up].flip(0)
    save_file(tensors, str(gptq / "model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_hf(gptq, device="cpu")
    assert f"{up} differs from model.layers.1.block_sparse_moe.experts.2.w1.g_idx" in _one_line(error)


# ---------------------------------------------------------------------------------------------
# A loaded GPTQ directory generates and trains adapters


def test_generate_on_a_gptq_directory_and_a_lora_step(tmp_path, capsys):
    _, source = _own_quantized("tiny-qwen-moe", tmp_path)
    convert_to_hf(str(source), tmp_path / "hf")
    capsys.readouterr()
    outputs = []
    for path in (source, tmp_path / "hf"):
        main(["generate", "Once upon", "--model", str(path), "--max-tokens", "8", "--temp", "0"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()

    loaded, _, _ = load_model(tmp_path / "hf", device="cpu")
    apply_lora(loaded, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"]))  # fmt: skip
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, LoRAQuantLinear)
    assert isinstance(loaded.model.layers[0].mlp.experts, LoRAQuantExperts)
    trainable = [p for p in loaded.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loaded.train()
    losses = []
    for _ in range(3):
        loss = loaded(IDS[:, :-1], targets=IDS[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
