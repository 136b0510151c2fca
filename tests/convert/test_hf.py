"""The Hugging Face converter against transformers itself, on tiny random models of every architecture:
logits (plain and left-padded), greedy generation, export that transformers loads, both MoE expert
layouts, sharded files, and the errors for what cannot be converted."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from orionlm import checkpoint
from orionlm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_generation_config,
    read_safetensors,
    save_checkpoint,
)
from orionlm.cli.convert import convert_from_hf
from orionlm.config import preset
from orionlm.convert.hf import config_from_hf, load_hf, save_hf, write_hf
from orionlm.convert.hf_architectures import hf_architecture
from orionlm.convert.hf_config import ConvertError
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

VOCAB = 320  # holds the byte-level tokenizer's 260 tokens
TOL = 1e-4
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=128,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# Each architecture with the features that set it apart switched on.
HF_CONFIGS = {
    "llama": dict(SMALL, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "mistral": dict(SMALL, head_dim=8, sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "mixtral": dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(SMALL, tie_word_embeddings=True),
    "qwen3": dict(SMALL, head_dim=32, attention_bias=True),
    # layer 1 dense (mlp_only_layers), a sigmoid-gated shared expert, un-normalized top-k weights
    "qwen2_moe": dict(SMALL, **MOE, num_hidden_layers=3, shared_expert_intermediate_size=48, mlp_only_layers=[1]),
    # decoder_sparse_step 2: only layer 1 of 3 is MoE
    "qwen3_moe": dict(SMALL, **MOE, num_hidden_layers=3, head_dim=16, decoder_sparse_step=2, norm_topk_prob=True),
    "bloom": dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
}
ARCHS = list(HF_CONFIGS)
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random norms and biases too (init leaves them at 1 and 0, which would hide mistakes in them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() == 1:
                p.copy_((0.0 if name.endswith("bias") else 1.0) + 0.2 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)


def _hf_model(arch: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **HF_CONFIGS[arch]), dtype=torch.float32)
    _randomize(model.eval())
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """arch -> (transformers model, the directory its save_pretrained wrote, with a tokenizer)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model = _hf_model(arch)
            path = tmp_path_factory.mktemp(arch)
            model.save_pretrained(path)
            Tokenizer.byte_level().save(path)
            cache[arch] = model, path
        return cache[arch]

    return get


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _same_logits(ours: OrionLM, theirs: torch.nn.Module) -> float:
    ids = _ids()
    with torch.no_grad():
        diff = _max_diff(ours(ids).logits, theirs(ids).logits)
    assert diff <= TOL
    return diff


@pytest.mark.parametrize("arch", ARCHS)
def test_load_hf_matches_transformers(arch, reference):
    hf, path = reference(arch)
    model, tokenizer = load_hf(path, device="cpu")
    assert model.config.hf_model_type == arch
    assert tokenizer is not None and tokenizer.encode("hei") == Tokenizer.byte_level().encode("hei")
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert theirs.abs().max() > 1.0  # the random model is not degenerate
    assert _max_diff(ours, theirs) <= TOL

    # Left padding: transformers' forward does not derive positions from the mask, so pass them.
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    positions = {} if arch == "bloom" else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, **positions).logits
    real = mask.bool()
    assert _max_diff(ours[real], theirs[real]) <= TOL
    # the padding changed the logits of the padded row, so the comparison above saw the mask at work
    with torch.no_grad():
        assert _max_diff(model(ids).logits[0, 4:], ours[0, 4:]) > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_save_hf_loads_in_transformers_and_back(arch, reference, tmp_path):
    hf, path = reference(arch)
    model, tokenizer = load_hf(path, device="cpu")
    out = save_hf(model, tokenizer, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == arch
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    if arch in MOE_ARCHS:  # experts are written one tensor per expert, the layout every reader knows
        assert any(".experts.3." in name for name in names) and not any("gate_up_proj" in name for name in names)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _same_logits(model, exported)
    assert AutoTokenizer.from_pretrained(out).encode("Hei") == tokenizer.encode("Hei")

    again, _ = load_hf(out, device="cpu")
    assert dataclasses.replace(again.config, name="", extra={}) == dataclasses.replace(model.config, name="", extra={})
    theirs = again.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_both_expert_layouts_load(arch, reference, tmp_path):
    hf, path = reference(arch)
    # transformers 5 writes experts one by one (as transformers 4 did) ...
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert any(".experts.0." in name for name in f.keys())
    # ... and holds them stacked in memory, the layout other tools save.
    stacked = {name: t.contiguous() for name, t in hf.state_dict().items()}
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in stacked)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    save_file(stacked, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_hf(tmp_path, device="cpu")
    _same_logits(model, hf)


@pytest.mark.parametrize("arch", ["qwen2_moe", "bloom"])
def test_sharded_directories(arch, reference, tmp_path):
    hf, _ = reference(arch)
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="40KB")
    assert len(list((tmp_path / "theirs").glob("*.safetensors"))) > 2
    model, _ = load_hf(tmp_path / "theirs", device="cpu")
    _same_logits(model, hf)
    save_hf(model, None, tmp_path / "ours", max_shard_bytes=40_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    _same_logits(model, AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval())


@pytest.mark.parametrize(
    "name, changes, arch",
    [
        ("tiny-dense", {}, "llama"),
        ("tiny-dense", {"sliding_window": 6}, "mistral"),
        ("tiny-dense", {"qkv_bias": True}, "qwen2"),
        ("tiny-dense", {"qk_norm": True, "head_dim": 24}, "qwen3"),
        ("tiny-moe", {}, "mixtral"),
        ("tiny-qwen-moe", {"moe_layers": [0]}, "qwen2_moe"),
        ("tiny-moe", {"qk_norm": True, "norm_topk_prob": False}, "qwen3_moe"),
        ("tiny-alibi", {"tie_embeddings": False}, "bloom"),
    ],
)
def test_native_models_export_to_the_inferred_architecture(name, changes, arch, tmp_path):
    model = OrionLM(preset(name, hf_model_type=None, **changes)).eval()
    _randomize(model)
    assert hf_architecture(model.config) == arch
    tokenizer = Tokenizer.byte_level()
    save_hf(model, tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == arch
    _same_logits(model, AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval())
    again, _ = load_hf(tmp_path, device="cpu")
    # generation_config.json's stop ids: the EOS and ChatML's <|im_end|>
    token_ids = {"eos_token_id": [tokenizer.eos_id, tokenizer.end_of_turn_id], "pad_token_id": tokenizer.pad_id}
    expected = dataclasses.replace(
        model.config, name=tmp_path.name, hf_model_type=arch, extra={"hf_token_ids": token_ids}
    )
    if arch == "mixtral":  # no dense layers, so Mixtral has no place for the dense MLP size
        expected.intermediate_size = expected.expert_intermediate_size
    assert again.config == expected
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_a_routing_bias_goes_to_hugging_face_and_back(tmp_path):
    """The aux-loss-free routing bias is written as DeepSeek-V3 names it (on Mixtral's gate) and read back: the
    same model, routing as before."""
    model = OrionLM(preset("tiny-moe", router_bias_update_rate=1e-3)).eval()
    _randomize(model)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]) * (i + 1))
    save_hf(model, Tokenizer.byte_level(), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert (data["router_score_bias"], data["router_bias_update_rate"]) == (True, 1e-3)
    stored = load_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(stored["model.layers.1.block_sparse_moe.gate.e_score_correction_bias"],
                               torch.tensor([0.6, -0.4, 0.2, 0.0]))  # fmt: skip
    again, _ = load_hf(tmp_path, device="cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
        unbiased = OrionLM(preset("tiny-moe")).eval()
        unbiased.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(unbiased(ids).logits, model(ids).logits)  # the bias changes the routing


# Errors


def _config(arch: str, **changes) -> dict:
    return AutoConfig.for_model(arch, **HF_CONFIGS[arch]).to_dict() | changes


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "data, words",
    [
        ({"model_type": "gpt2"}, ["model_type 'gpt2'", "llama", "bloom"]),
        (_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["rope_scaling", "llama3"]),
        (_config("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0}), ["rope_parameters", "yarn"]),
        (_config("llama", partial_rotary_factor=0.5), ["partial_rotary_factor"]),
        (_config("llama", quantization_config={"quant_method": "awq"}), ["quant_method 'awq'", "reads GPTQ"]),
        (_config("llama", hidden_act="gelu"), ["hidden_act", "'gelu'"]),
        (_config("bloom", apply_residual_connection_post_layernorm=True), ["apply_residual_connection_post_layernorm"]),
        (
            _config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None),
            ["some layers"],
        ),
        ({"model_type": "llama", "num_attention_heads": 4}, ["'vocab_size' is missing"]),
    ],
)
def test_unsupported_configs_are_named(data, words):
    with pytest.raises(ConvertError) as error:
        config_from_hf(data, "x/config.json")
    message = _one_line(error)
    assert message.startswith("x/config.json: ")
    for word in words:
        assert word in message


def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


@pytest.mark.parametrize(
    "arch, dropped",
    [
        ("llama", "model.layers.1.mlp.down_proj.bias"),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2.weight"),
    ],
)
def test_missing_tensor_is_named(arch, dropped, reference, tmp_path):
    path = _copy(reference(arch)[1], tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[dropped]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_hf(path, device="cpu")
    assert f"tensor '{dropped}' is missing" in _one_line(error)


def test_shape_mismatch_is_named(reference, tmp_path):
    path = _copy(reference("bloom")[1], tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"n_head": 8, "hidden_size": 72}))
    with pytest.raises(CheckpointError) as error:
        load_hf(path, device="cpu")
    assert "'transformer.word_embeddings.weight' has shape (320, 64)" in _one_line(error)


def test_corrupt_safetensors_names_the_file(reference, tmp_path):
    path = _copy(reference("qwen2")[1], tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_hf(path, device="cpu")
    assert str(path / "model.safetensors") in _one_line(error)


def test_save_hf_refuses_what_the_architecture_cannot_express(reference, tmp_path):
    model, tokenizer = load_hf(reference("qwen2")[1], device="cpu")
    with pytest.raises(ConvertError) as error:
        save_hf(model, tokenizer, tmp_path / "out", architecture="mistral")
    assert "mistral cannot express qkv_bias=True" in _one_line(error)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConvertError, match="shared_expert_intermediate_size=128"):
        save_hf(OrionLM(preset("tiny-qwen-moe")), None, tmp_path / "out", architecture="mixtral")
    with pytest.raises(ConvertError, match=r"experts in every layer; this config has moe_layers=\[0\]"):
        save_hf(OrionLM(preset("tiny-moe", moe_layers=[0])), None, tmp_path / "out")
    with pytest.raises(ConvertError, match="architecture 'gpt2' is not supported"):
        save_hf(OrionLM(preset("tiny-moe")), None, tmp_path / "out", architecture="gpt2")
    with pytest.raises(ConvertError, match="a Quiet-STaR model's meta embeddings and mixing head have no Hugging"):
        save_hf(OrionLM(preset("tiny-dense", thought_start_id=1, thought_end_id=2)), None, tmp_path / "out")


# Generation


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_transformers(arch, reference):
    from orionlm.generation import generate_ids

    hf, path = reference(arch)
    model, _ = load_hf(path, device="cpu")
    prompts = [[5, 17, 42, 99, 3, 250], [7, 8, 200]]
    ours = generate_ids(model, prompts, max_new_tokens=10, do_sample=False)
    hf.generation_config.eos_token_id = None  # never stop early: compare all 10 tokens
    for prompt, got in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10)
        assert got == out[0, len(prompt) :].tolist()
        assert len(got) == 10


def _tensors_and_config(path):
    return read_safetensors(path), json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_conversion_equals_loading_and_saving(arch, reference, tmp_path):
    _, path = reference(arch)
    dtype = torch.bfloat16 if arch == "mistral" else torch.float32  # one cast on the way
    model, tokenizer = load_hf(path, device="cpu", dtype=dtype)
    save_checkpoint(model, tmp_path / "loaded", tokenizer, read_generation_config(path) or None)
    convert_from_hf(str(path), tmp_path / "streamed", dtype=str(dtype).removeprefix("torch."))
    loaded, loaded_config = _tensors_and_config(tmp_path / "loaded")
    streamed, streamed_config = _tensors_and_config(tmp_path / "streamed")
    assert streamed_config == loaded_config
    assert list(streamed) == list(loaded)
    for name, tensor in loaded.items():
        assert tensor.dtype == streamed[name].dtype == dtype and torch.equal(tensor, streamed[name]), name
    for file in ("generation_config.json", "tokenizer.json"):
        assert (tmp_path / "streamed" / file).read_text() == (tmp_path / "loaded" / file).read_text()


def test_streaming_conversion_of_stacked_experts(reference, tmp_path):
    hf, _ = reference("mixtral")
    shutil.copy(reference("mixtral")[1] / "config.json", tmp_path / "config.json")
    save_file({n: t.contiguous() for n, t in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    convert_from_hf(str(tmp_path), tmp_path / "out", dtype="float32")
    model, _ = load_checkpoint(tmp_path / "out", device="cpu")
    _same_logits(model, hf)


def test_streaming_conversion_writes_shards_with_an_index(reference, tmp_path):
    hf, path = reference("qwen2_moe")
    out = tmp_path / "out"
    convert_from_hf(str(path), out, dtype="float32", shard_gb=40_000 / 1024**3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_safetensors(out)
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"]) == set(sizes)
    shards = sorted(set(index["weight_map"].values()))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert len(shards) == sum(1 for _ in _greedy_shards(list(sizes.values()), 40_000)) > 2
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert sum(sizes[n] for n in f.keys()) <= 40_000 or len(list(f.keys())) == 1
    model, _ = load_checkpoint(out, device="cpu")
    _same_logits(model, hf)


def _greedy_shards(sizes: list[int], limit: int):
    """The shards write_safetensors cuts: a new one when the next tensor would pass the limit."""
    total = None
    for size in sizes:
        if total is not None and total + size <= limit:
            total += size
            continue
        if total is not None:
            yield total
        total = size
    yield total


def test_failed_streaming_conversion_leaves_nothing(reference, tmp_path, monkeypatch):
    _, path = reference("qwen2_moe")
    opened = []
    real = checkpoint.safe_open

    def failing(*args, **kwargs):
        opened.append(args)
        if len(opened) == 6:  # after the header and a few tensors
            raise OSError("read error")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", failing)
    with pytest.raises(CheckpointError, match="read error"):
        convert_from_hf(str(path), tmp_path / "out", dtype="float32", shard_gb=40_000 / 1024**3)
    assert len(opened) == 6
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shard_bytes", [40_000, 10**7], ids=["shards", "one-file"])
def test_export_reads_each_expert_stack_once(shard_bytes, tmp_path):
    """Per-expert tensors are slices of their stack: writing them reads each stack once, in shards of about one
    expert each and in one file, where the names sorted interleave a layer's two stacks."""
    model = OrionLM(preset("tiny-moe")).eval()
    _randomize(model)
    state = checkpoint.state_dict_for_saving(model)
    reads = []
    counted = checkpoint.LazyTensors.of(state)
    counted = checkpoint.LazyTensors(counted.specs, lambda name: reads.append(name) or state[name])
    write_hf(model.config, counted, None, tmp_path / "hf", max_shard_bytes=shard_bytes)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == (shard_bytes == 40_000)
    assert sorted(reads) == sorted(state)
    _same_logits(model, AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval())


# ---------------------------------------------------------------------------------------------
# generation_config.json: the stop ids and sampling defaults travel with the weights

CHAT = [{"role": "user", "content": "Say hi"}]
SAMPLING = dict(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.1, max_new_tokens=64)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """An orionlm directory (ChatML byte-level tokenizer) whose greedy reply ends with <|im_end|> after a few
    tokens: the head row of <|im_end|> is 1.5x the row of the token greedy decoding would pick fourth, so
    <|im_end|> outscores it there. Returns (directory, prompt ids, the reply's tokens)."""
    tokenizer = Tokenizer.byte_level()
    model = OrionLM(preset("tiny-dense", vocab_size=VOCAB, initializer_range=0.1)).eval()
    model.reset_parameters(seed=0)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(CHAT))
    from orionlm.generation import generate_ids

    unstopped = generate_ids(model, [prompt], 8, do_sample=False, repetition_penalty=1.1)[0]
    fourth = unstopped[3]
    assert fourth not in unstopped[:3]
    end = tokenizer.end_of_turn_id
    with torch.no_grad():
        model.lm_head.weight[end] = 1.5 * model.lm_head.weight[fourth]
    path = tmp_path_factory.mktemp("chat") / "model"
    save_checkpoint(model, path, tokenizer, SAMPLING)
    return path, prompt, unstopped


def _orionlm_greedy(path, prompt: list[int]) -> list[int]:
    """orionlm's greedy reply with the directory's own settings (its stop ids and repetition penalty)."""
    from orionlm.generation import generate_ids
    from orionlm.generation.text import resolve_config
    from orionlm.loading import load_model

    model, _, _ = load_model(path, device="cpu")
    return generate_ids(model, [prompt], config=resolve_config(model, do_sample=False))[0]


def test_transformers_chat_generation_stops_where_orionlm_stops(chat_model, tmp_path):
    from orionlm.cli.convert import convert_to_hf

    path, prompt, unstopped = chat_model
    ours = _orionlm_greedy(path, prompt)
    im_end = Tokenizer.byte_level().token_to_id("<|im_end|>")
    assert ours == [*unstopped[:3], im_end]  # the construction works: a short reply closed by <|im_end|>

    convert_to_hf(str(path), tmp_path / "hf")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == SAMPLING | {"eos_token_id": [256, im_end], "pad_token_id": 259}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.generation_config.temperature == 0.6 and hf.generation_config.top_k == 20
    chat = AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(CHAT, add_generation_prompt=True)
    assert chat["input_ids"] == prompt
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.tensor([chat["attention_mask"]]), do_sample=False)
    assert out[0, len(prompt) :].tolist() == ours


def test_from_hf_gains_the_end_of_turn_stop_and_keeps_the_sampling_defaults(chat_model, tmp_path):
    """A Hugging Face directory that lists only its EOS (as many chat models do) imports with <|im_end|> added."""
    from orionlm.cli.convert import convert_from_hf, convert_to_hf

    path, prompt, _ = chat_model
    convert_to_hf(str(path), tmp_path / "hf")
    hf_generation = tmp_path / "hf" / "generation_config.json"
    hf_generation.write_text(json.dumps(SAMPLING | {"eos_token_id": 256}))
    convert_from_hf(str(tmp_path / "hf"), tmp_path / "back")
    assert read_generation_config(tmp_path / "back") == SAMPLING | {"eos_token_id": [256, 258], "pad_token_id": 259}
    assert _orionlm_greedy(tmp_path / "back", prompt) == _orionlm_greedy(path, prompt)
