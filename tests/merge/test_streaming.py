"""Merges that stream: sharded output equal to a single file, LoRA adapter sources folded tensor by tensor as
merge_lora folds the whole model, DARE's drops independent of the order tensors are read in, the layer-by-layer
runner against the full model's forward pass, and the output dtype."""

import dataclasses

import pytest
import torch
import yaml

from orionlm.checkpoint import LazyTensors, save_checkpoint
from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.peft import write_adapter
from orionlm.loading import load_model, open_model
from orionlm.merge.moe import ExpertSource, MoEMergeConfig, _hidden_states, moe_merge, prompt_ids
from orionlm.merge.sources import open_source
from orionlm.merge.weights import MergeConfig, MergeInput, merge_models
from orionlm.model import OrionLM, count_parameters, run_layers
from orionlm.nn.lora import LoRAConfig, apply_lora, merge_lora

from .conftest import dense, tokenizer


def _dare(sources, seed=0):
    models = [MergeInput(str(sources["base"]))] + [
        MergeInput(str(sources[n]), {"weight": 0.5, "density": 0.4}) for n in ("code", "numbers")
    ]
    return merge_models(MergeConfig("dare_ties", models, base_model=str(sources["base"])), seed=seed)


def test_sharded_output_equals_one_file_and_dare_does_not_depend_on_the_order(sources, tmp_path):
    merged = _dare(sources)
    merged.save(tmp_path / "one", progress=False)
    merged.save(tmp_path / "sharded", max_shard_bytes=40_000, progress=False)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    one, sharded = LazyTensors.from_directory(tmp_path / "one"), LazyTensors.from_directory(tmp_path / "sharded")
    assert set(one) == set(sharded) == set(merged.tensors)
    for name in one:
        assert torch.equal(one[name], sharded[name]), name
    backwards = {name: merged.tensors[name] for name in reversed(list(merged.tensors))}
    for name, tensor in backwards.items():
        assert torch.equal(tensor, one[name]), name
    other = _dare(sources, seed=1).tensors
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other[name], one[name])
    base = open_model(sources["base"]).tensors[name]
    kept = float(((one[name] - base) != 0).float().mean())
    assert 0.45 < kept < 0.8  # two task vectors at density 0.4: about 1 - 0.6^2 of the entries move


def _adapter(source_dir, directory, lora: LoRAConfig) -> OrionLM:
    """An adapter with random factors on the model in source_dir, written to `directory`; returns the model
    with the adapter folded in by merge_lora (the reference)."""
    model, _, _ = load_model(source_dir, device="cpu")
    apply_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.1)
    directory.mkdir()
    write_adapter(model, directory, base_model=str(source_dir))
    merge_lora(model)
    return model


@pytest.mark.parametrize(
    "family, lora",
    [
        ("tiny-dense", LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
        (
            "tiny-moe",
            LoRAConfig(
                r=2, target_modules=["o_proj", "gate"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
            ),
        ),  # fmt: skip
        ("tiny-moe", LoRAConfig(r=2, target_parameters=["experts.down_proj"])),
    ],
)
def test_an_adapter_source_is_folded_tensor_by_tensor_as_merge_lora_folds_it(tmp_path, family, lora):
    torch.manual_seed(3)
    base = save_checkpoint(OrionLM(preset(family)), tmp_path / "base", tokenizer())
    reference = _adapter(base, tmp_path / "adapter", lora)
    folded = open_source(str(tmp_path / "adapter")).tensors
    state = reference.state_dict()
    assert set(folded) == set(state) - ({"lm_head.weight"} if reference.config.tie_embeddings else set())
    untouched = open_model(base).tensors
    changed = 0
    for name, tensor in folded.items():
        assert torch.equal(tensor.float(), state[name]), name
        changed += not torch.equal(tensor.float(), untouched[name].float())
    assert changed == len(lora.target_parameters) * 2 + 2 * len(lora.target_modules)  # two layers each


def test_a_merge_of_an_adapter_equals_merging_the_folded_model(sources, tmp_path):
    """An adapter source (its directory, or the LoRA run whose newest checkpoint it is) merges as its base with
    the adapter folded in by merge_lora."""
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    checkpoint.parent.mkdir(parents=True)
    reference = _adapter(sources["code"], checkpoint, LoRAConfig(r=4, target_modules=["q_proj", "up_proj"]))
    (checkpoint / "trainer_state.json").write_text('{"step": 1}')
    folded = save_checkpoint(reference, tmp_path / "folded", tokenizer())

    def merge(first) -> LazyTensors:
        models = [MergeInput(str(first), {"weight": 0.7}), MergeInput(str(sources["numbers"]), {"weight": 0.3})]
        return merge_models(MergeConfig("linear", models)).tensors

    expected = merge(folded)
    for source in (checkpoint, tmp_path / "run"):
        merged = merge(source)
        assert set(merged) == set(expected)
        for name, tensor in merged.items():
            assert torch.equal(tensor, expected[name]), name
    up = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(merge(sources["code"])[up], expected[up])


def _layer_inputs(model: OrionLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states entering each decoder layer in the model's own forward pass."""
    states: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: states.append(args[0])) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return states


@pytest.mark.parametrize("family", ["tiny-dense", "tiny-moe", "tiny-alibi"])
def test_run_layers_gives_the_forward_pass_hidden_states(tmp_path, family):
    """Layer by layer from the tensors on disk, every state entering every layer is the full model's."""
    torch.manual_seed(0)
    model = OrionLM(dataclasses.replace(preset(family), tie_embeddings=family == "tiny-dense")).eval()
    save_checkpoint(model, tmp_path / "m")
    inputs = [torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (2, 3))]
    expected = [_layer_inputs(model, ids) for ids in inputs]
    layers = run_layers(model.config, LazyTensors.from_directory(tmp_path / "m"), inputs)
    seen = 0
    for i, block, states in layers:
        assert not block.input_layernorm.weight.is_meta
        for j, x in enumerate(states):
            # float32 rounding apart: on AVX-512 CPUs the loaded block and the model's own round differently
            torch.testing.assert_close(x, expected[j][i], atol=1e-6, rtol=1e-5, msg=f"layer {i}, input {j}")
        seen += 1
    assert seen == model.config.num_layers and block.input_layernorm.weight.is_meta  # freed once passed


def test_hidden_gate_states_equal_the_full_models(sources):
    model, tok, _ = load_model(sources["base"], device="cpu")
    prompts = ["The cat sat on the mat", "def f(x):", "1"]
    states = _hidden_states(open_source(str(sources["base"])), tok, prompts, progress=False)
    for prompt, rows in zip(prompts, states, strict=True):
        entering = _layer_inputs(model, torch.tensor([prompt_ids(tok, prompt)]))
        assert torch.equal(rows, torch.stack([x[0, -1] for x in entering])), prompt


def test_output_dtype_follows_the_config_else_the_sources(tmp_path, capsys):
    paths = {n: save_checkpoint(dense(seed).to(torch.bfloat16), tmp_path / n, tokenizer())
             for seed, n in enumerate(("a", "b"))}  # fmt: skip
    a, b = (open_model(paths[n]).tensors for n in "ab")
    linear = MergeConfig("linear", [MergeInput(str(paths[n]), {"weight": 1.0}) for n in "ab"])
    merged = merge_models(linear).tensors
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged[name].dtype == merged.specs[name].dtype == torch.bfloat16
    assert torch.equal(merged[name], ((a[name].float() + b[name].float()) / 2).bfloat16())
    assert merge_models(dataclasses.replace(linear, dtype="float16")).tensors[name].dtype == torch.float16
    experts = [ExpertSource(str(paths["a"]), ["x"]), ExpertSource(str(paths["b"]), ["y"])]
    moe = moe_merge(MoEMergeConfig(str(paths["a"]), experts, gate_mode="cheap_embed"), progress=False)
    assert {spec.dtype for spec in moe.tensors.specs.values()} == {torch.bfloat16}
    stack = moe.tensors["model.layers.1.mlp.experts.down_proj"]
    assert stack.dtype == torch.bfloat16 and torch.equal(stack[1], b["model.layers.1.mlp.down_proj.weight"])
    model = moe.load()
    assert count_parameters(moe.config)[0] == sum(p.numel() for p in model.parameters())
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump({"base_model": str(paths["a"]), "gate_mode": "random",
        "dtype": "float32", "experts": [{"source_model": str(paths[n])} for n in "ab"]}))  # fmt: skip
    main(["moe-merge", str(tmp_path / "moe.yaml"), str(tmp_path / "out")])
    assert f"{count_parameters(moe.config)[0] / 1e6:.1f}M parameters" in capsys.readouterr().out
    assert open_model(tmp_path / "out").tensors[name.replace("mlp.up_proj.weight", "input_layernorm.weight")].dtype \
        == torch.float32  # fmt: skip
