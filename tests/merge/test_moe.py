"""frankenMoE (orionlm moe-merge) against independent computations: router rows from transformers' hidden
states and embeddings of the same tiny models, the assembled tensors against the source models' own, the
output loaded by transformers (Mixtral and Qwen2-MoE), and mergekit-moe itself tensor for tensor."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orionlm.checkpoint import save_checkpoint
from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.hf import load_hf, save_hf
from orionlm.errors import OrionError
from orionlm.loading import load_model
from orionlm.merge.moe import ExpertSource, MoEMergeConfig, MoEMergeError, load_moe_merge_config, moe_merge
from orionlm.model import OrionLM
from orionlm.train.recipe import RECIPES_DIR

from .conftest import built, cli_error, dense, tokenizer

PROMPTS = {
    "base": (["The cat sat on the mat", "Once upon a time"], ["def f(x):"]),
    "code": (["def main():\n    return 0", "import os"], []),
    "numbers": (["1 + 2 = 3", "x = 42 * 7"], ["hello"]),
}


def _config(sources, **changes) -> MoEMergeConfig:
    experts = [ExpertSource(str(sources[n]), list(p), list(n_) or None) for n, (p, n_) in PROMPTS.items()]
    return MoEMergeConfig(**{"base_model": str(sources["base"]), "experts": experts, **changes})


def _hf_hidden_rows(hf_model, prompts: list[str]) -> torch.Tensor:
    """(L, C): transformers' hidden_states[:-1] at the last token of each prompt (after BOS), averaged."""
    tok = tokenizer()
    states = []
    for prompt in prompts:
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            out = hf_model(ids, output_hidden_states=True)
        states.append(torch.stack([h[0, -1] for h in out.hidden_states[:-1]]))
    return torch.stack(states).mean(0)


def test_hidden_gates_equal_transformers_hidden_states(sources):
    model, _ = built(moe_merge(_config(sources), progress=False))
    hf_base = AutoModelForCausalLM.from_pretrained(sources["base"].with_name("base-hf"), dtype=torch.float32)
    for e, (positive, negative) in enumerate(PROMPTS.values()):
        row = _hf_hidden_rows(hf_base, positive)
        if negative:
            row = row - _hf_hidden_rows(hf_base, negative)
        row = F.normalize(row, dim=-1)
        for i, layer in enumerate(model.model.layers):
            torch.testing.assert_close(layer.mlp.gate.weight[e], row[i], atol=1e-5, rtol=1e-5)


def test_cheap_embed_gates_equal_normalised_embedding_sums(sources):
    model, _ = built(moe_merge(_config(sources, gate_mode="cheap_embed"), progress=False))
    embed = load_file(sources["base"].with_name("base-hf") / "model.safetensors")["model.embed_tokens.weight"]
    tok = tokenizer()

    def summed(prompts):
        ids = [i for p in prompts for i in [tok.bos_id] + tok.encode(p, add_special_tokens=False)]
        return F.normalize(embed[ids].sum(0), dim=0)

    for e, (positive, negative) in enumerate(PROMPTS.values()):
        row = summed(positive) - summed(negative) if negative else summed(positive)
        for layer in model.model.layers:
            torch.testing.assert_close(layer.mlp.gate.weight[e], F.normalize(row, dim=0), atol=1e-6, rtol=1e-6)


def test_tensors_come_from_their_models_and_transformers_runs_the_mixtral(sources, tmp_path):
    model, tokenizer = built(moe_merge(_config(sources), progress=False))
    save_hf(model, tokenizer, tmp_path / "hf")
    merged = load_file(tmp_path / "hf" / "model.safetensors")
    hf = {name: load_file(sources[name].with_name(f"{name}-hf") / "model.safetensors") for name in PROMPTS}
    for key, tensor in hf["base"].items():
        if ".mlp." not in key:
            assert torch.equal(merged[key], tensor), key
    for e, name in enumerate(PROMPTS):
        for i in range(model.config.num_layers):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                expert = merged[f"model.layers.{i}.block_sparse_moe.experts.{e}.{ours}.weight"]
                assert torch.equal(expert, hf[name][f"model.layers.{i}.mlp.{theirs}.weight"])
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(reference).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([tokenizer.encode("def main(): the cat sat", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_qwen2_moe_with_a_gated_shared_expert(sources, tmp_path):
    shared = ExpertSource(str(sources["numbers"]), ["shared text", "more shared text"])
    model, tokenizer = built(moe_merge(_config(sources, shared_experts=[shared]), progress=False))
    assert model.config.hf_model_type == "qwen2_moe" and model.config.shared_expert_gate
    source, _, _ = load_model(sources["numbers"], device="cpu")
    hf_base = AutoModelForCausalLM.from_pretrained(sources["base"].with_name("base-hf"), dtype=torch.float32)
    row = F.normalize(_hf_hidden_rows(hf_base, shared.positive_prompts), dim=-1)
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(
                getattr(layer.mlp.shared_expert, proj).weight, getattr(source.model.layers[i].mlp, proj).weight
            )
        torch.testing.assert_close(layer.mlp.shared_expert_gate.weight[0], row[i], atol=1e-5, rtol=1e-5)
    save_hf(model, tokenizer, tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(reference).__name__ == "Qwen2MoeForCausalLM"
    ids = torch.tensor([tokenizer.encode("import os; 1 + 2", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_random_gates_noise_and_residual_scale(sources):
    config = _config(sources, gate_mode="random")
    config.experts[1].residual_scale = 0.5
    config.experts[2].noise_scale = 0.01
    a, _ = built(moe_merge(config, seed=1, progress=False))
    b, _ = built(moe_merge(config, seed=1, progress=False))
    c, _ = built(moe_merge(config, seed=2, progress=False))
    gate = a.model.layers[0].mlp.gate.weight.detach()
    assert torch.equal(gate, b.model.layers[0].mlp.gate.weight)
    assert not torch.equal(gate, c.model.layers[0].mlp.gate.weight)
    assert 0.8 < float(gate.std()) < 1.2  # standard normal rows
    code, _, _ = load_model(sources["code"], device="cpu")
    numbers, _, _ = load_model(sources["numbers"], device="cpu")
    experts, mlp = a.model.layers[1].mlp.experts, code.model.layers[1].mlp
    assert torch.equal(experts.down_proj[1], 0.5 * mlp.down_proj.weight)
    assert torch.equal(experts.gate_up_proj[1], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    noise = (experts.down_proj[2] - numbers.model.layers[1].mlp.down_proj.weight).detach()
    assert 0.009 < float(noise.std()) < 0.011


def test_the_merged_model_runs_the_expert_of_a_routed_token(sources):
    """With one expert per token, a token routed to expert e gets exactly expert e's MLP output."""
    model, _ = built(moe_merge(_config(sources, experts_per_token=1), progress=False))
    x = torch.randn(5, model.config.hidden_size)
    moe = model.model.layers[0].mlp
    _, _, ids = moe.route(x)
    for name_index, name in enumerate(PROMPTS):
        source, _, _ = load_model(sources[name], device="cpu")
        rows = ids[:, 0] == name_index
        if rows.any():
            y, _, _ = moe(x[rows].unsqueeze(0))
            torch.testing.assert_close(y[0], source.model.layers[0].mlp(x[rows]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(experts_per_token=4), "at least experts_per_token (4)"),
        (dict(gate_mode="hiden"), "gate_mode 'hiden' is not one of hidden, cheap_embed, random"),
        (dict(architecture="mixtral", shared_experts=[ExpertSource("x", ["p"])]), "a Mixtral MoE has no shared"),
        (dict(shared_experts=[ExpertSource("x", ["p"]), ExpertSource("y", ["q"])]), "exactly one shared expert"),
        (dict(dtype="int8"), "dtype 'int8' is not one of"),
    ],
)
def test_config_errors(sources, change, message):
    with pytest.raises(MoEMergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(sources, **change)


def test_prompt_errors(sources):
    experts = [ExpertSource(str(sources["code"]), ["same"]), ExpertSource(str(sources["numbers"]), ["same"])]
    with pytest.raises(MoEMergeError, match="every expert has the same prompts"):
        MoEMergeConfig(str(sources["base"]), experts)
    experts[1].positive_prompts = None
    with pytest.raises(MoEMergeError, match=r"experts.1 \(.*numbers\) has no positive_prompts; gate_mode hidden"):
        MoEMergeConfig(str(sources["base"]), experts)
    assert MoEMergeConfig(str(sources["base"]), experts, gate_mode="random").experts == experts


def test_model_errors(sources, tmp_path):
    wide = save_checkpoint(dense(5, intermediate_size=256), tmp_path / "wide", tokenizer())
    config = _config(sources)
    config.experts[2].source_model = str(wide)
    with pytest.raises(
        MoEMergeError, match=r"experts.2 \(.*wide\) does not match .* intermediate_size 256 \(base 128\)"
    ):
        moe_merge(config, progress=False)
    moe = save_checkpoint(OrionLM(preset("tiny-moe")), tmp_path / "moe", tokenizer())
    with pytest.raises(MoEMergeError, match="is a moe model with a swiglu MLP; moe-merge builds from dense"):
        moe_merge(_config(sources, base_model=str(moe)), progress=False)


def test_cli_writes_a_model_that_loads_and_generates(sources, tmp_path, capsys):
    config = {
        "base_model": str(sources["base"]),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [{"source_model": str(sources[n]), "positive_prompts": list(p)} for n, (p, _) in PROMPTS.items()],
    }
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    main(["moe-merge", str(tmp_path / "moe.yaml"), str(tmp_path / "out")])
    assert "3 experts, top-2, hidden gates" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "out" / "moe_merge.yaml").read_text()) == config
    model, tokenizer, _ = load_model(tmp_path / "out", device="cpu")
    assert model.config.num_experts == 3 and model.config.extra["moe_merge"]["gate_mode"] == "hidden"
    from orionlm.generation import GenerationConfig, generate_ids

    (out,) = generate_ids(model, [tokenizer.encode("hello")], config=GenerationConfig(max_new_tokens=5))
    assert len(out) == 5


def test_cli_errors_are_one_line(sources, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base_model": str(sources["base"]), "experts": [], "gate_modes": "hidden"}))
    assert cli_error("moe-merge", str(bad), str(tmp_path / "o")) == [
        f"orionlm: error: {bad}: unknown key in config: 'gate_modes' (did you mean 'gate_mode'?)"
    ]
    with pytest.raises(OrionError, match="moe-merge config .*missing.yaml does not exist"):
        load_moe_merge_config(tmp_path / "missing.yaml")


def test_matches_mergekit_moe(sources, tmp_path):
    """mergekit-moe on the same models (Hugging Face llama directories) gives the same tensors: the MLPs and
    everything else exactly, the routers to bfloat16 precision (mergekit runs the base model in bfloat16).
    One prompt per expert: mergekit pads a batch of prompts, which shifts the last position of shorter ones."""
    pytest.importorskip("mergekit")
    names = list(PROMPTS)
    config = {
        "base_model": str(sources["base"].with_name("base-hf")),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(sources[n].with_name(f"{n}-hf")), "positive_prompts": PROMPTS[n][0][:1]} for n in names
        ],
    }
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-m", "mergekit.scripts.moe", str(tmp_path / "moe.yaml"), str(tmp_path / "mk"),
         "--device", "cpu", "--allow-crimes"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    theirs, _ = load_hf(tmp_path / "mk", device="cpu", dtype=torch.float32)
    ours, _ = built(moe_merge(load_moe_merge_config(tmp_path / "moe.yaml"), progress=False))
    their_state = theirs.state_dict()
    for key, tensor in ours.state_dict().items():
        if key.endswith("mlp.gate.weight"):
            cosine = F.cosine_similarity(tensor, their_state[key], dim=-1)
            assert float(cosine.min()) > 0.995, (key, cosine)
        else:
            assert torch.equal(tensor, their_state[key]), key
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["num_local_experts"] == len(names)


def test_a_lora_adapter_source_is_folded_in(sources, tmp_path):
    """An expert given as a LoRA adapter directory (on the base) lends its merged MLPs, not the base's."""
    from orionlm.convert.peft import write_adapter
    from orionlm.nn.lora import LoRAConfig, apply_lora, merge_lora

    model, _, _ = load_model(sources["base"], device="cpu")
    apply_lora(model, LoRAConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    (tmp_path / "adapter").mkdir()
    write_adapter(model, tmp_path / "adapter", base_model=str(sources["base"]))
    merge_lora(model)
    config = _config(sources)
    config.experts[1].source_model = str(tmp_path / "adapter")
    merged, _ = built(moe_merge(config, progress=False))
    mlp = model.model.layers[1].mlp
    assert not torch.equal(
        mlp.gate_proj.weight, load_model(sources["base"], device="cpu")[0].model.layers[1].mlp.gate_proj.weight
    )
    torch.testing.assert_close(
        merged.model.layers[1].mlp.experts.gate_up_proj[1], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    )


def test_the_shipped_recipe_merges_by_name(sources, tmp_path, monkeypatch, capsys):
    """`orionlm moe-merge recipe:moe-merge OUT` reads the recipe that ships with orionlm (its model paths relative to
    the working directory) and keeps a copy of it beside the MoE."""
    config = load_moe_merge_config("recipe:moe-merge")
    assert [len(e.positive_prompts or []) for e in config.experts] == [3, 3, 3, 3]
    assert config.architecture == "mixtral" and config.gate_mode == "hidden"
    models = tmp_path / "runs" / "frankenmoe"
    models.mkdir(parents=True)
    stand_ins = {"base": "base", "english": "code", "python": "numbers", "portuguese": "base", "finnish": "code"}
    for name, source in stand_ins.items():
        (models / name).symlink_to(sources[source])
    monkeypatch.chdir(tmp_path)
    main(["moe-merge", "recipe:moe-merge", "moe"])
    assert "wrote moe: 4 experts, top-2, hidden gates" in capsys.readouterr().out
    assert (tmp_path / "moe" / "moe_merge.yaml").read_bytes() == (RECIPES_DIR / "moe-merge.yaml").read_bytes()
