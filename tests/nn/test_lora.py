"""LoRA against the real `peft` on the Hugging Face export of the same base model."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.hf import save_hf
from orionlm.convert.peft import load_adapter, save_adapter
from orionlm.errors import OrionError
from orionlm.generation import generate_ids
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.nn.linear import use_decode_layout
from orionlm.nn.lora import LoRAConfig, LoRAExperts, LoRALinear, apply_lora, merge_lora
from orionlm.nn.moe import MoE
from orionlm.tokenizer import Tokenizer

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "experts.down_proj"]  # PEFT's target_parameters: suffixes, any depth
GDN = ["q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj"]  # attention's q/k/v/o too
SMALL_MOE = dict(hidden_size=32, expert_intermediate_size=48)


def _model(name, **changes):
    model = OrionLM(preset(name, vocab_size=Tokenizer.byte_level().vocab_size, **changes)).eval()
    model.reset_parameters(seed=0)
    return model


def _export(tmp_path, name, **changes):
    model = _model(name, initializer_range=0.1, **changes)
    save_hf(model, Tokenizer.byte_level(), tmp_path / "hf")
    return model, tmp_path / "hf"


@pytest.fixture
def base(tmp_path):
    return _export(tmp_path, "tiny-dense")


def _randomize_adapters(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)


IDS = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))


def assert_matches_peft(model, hf_dir, adapter_dir):
    """peft, with the adapter on the Hugging Face export, gives our logits, and its merge_and_unload ours."""
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter_dir).eval()
    with torch.no_grad():
        ours, theirs = model(IDS).logits, hf(IDS).logits
        merged = hf.merge_and_unload()(IDS).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear | LoRAExperts) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_written_here_loads_in_peft(base, tmp_path, rslora):
    model, hf_dir = base
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS, rslora=rslora))
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", str(hf_dir))
    assert_matches_peft(model, hf_dir, tmp_path / "adapter")


def test_adapter_written_by_peft_loads_here(base, tmp_path):
    model, hf_dir = base
    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    hf = peft.get_peft_model(hf, lora)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "peft")
    config = load_adapter(model, tmp_path / "peft")
    assert sorted(config.target_modules) == ["down_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf.eval()(IDS).logits, atol=1e-5, rtol=1e-5)


def test_adapter_on_some_layers_round_trips(base, tmp_path):
    # a regex that picks one layer's q_proj is written as that layer's full name, which peft and load_adapter
    # match exactly; the v_proj of every layer stays a leaf name
    model, hf_dir = base
    fresh = copy.deepcopy(model)
    names = apply_lora(model, LoRAConfig(r=2, target_modules=[r"model\.layers\.1\.self_attn\.q_proj", "v_proj"]))
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", str(hf_dir))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["model.layers.1.self_attn.q_proj", "v_proj"]
    load_adapter(fresh, tmp_path / "adapter")
    assert [n for n, m in fresh.named_modules() if isinstance(m, LoRALinear)] == names
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(IDS).logits
        assert torch.equal(fresh(IDS).logits, ours)
        torch.testing.assert_close(ours, hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_only_adapters_train_and_decoding_keeps_them(base):
    model, _ = base
    names = apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert len(names) == 2 * model.config.num_layers
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(3):
        model(IDS[:, :-1], targets=IDS[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed and all(".lora_" in n for n in changed)
    model.eval()
    with torch.no_grad():
        expected = model(IDS[:1]).logits[0, -1].argmax().item()
    assert generate_ids(model, [IDS[0].tolist()], max_new_tokens=1, do_sample=False)[0] == [expected]


def test_bad_adapters_are_refused(base, tmp_path):
    model, _ = base
    with pytest.raises(Exception, match="not a LoRA adapter directory"):
        load_adapter(model, tmp_path)
    with pytest.raises(Exception, match="no linear layer matches"):
        apply_lora(model, LoRAConfig(target_modules=["nope"]))
    # bad adapter files (junk or list config, no r, truncated weights, an adapter as base): tests/test_bad_files.py


def test_merge_lora_command(base, tmp_path, capsys):
    import subprocess
    import sys

    from orionlm.checkpoint import save_checkpoint

    model, _ = base
    save_checkpoint(model, tmp_path / "base", Tokenizer.byte_level())
    apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "up_proj"]))
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    command = [sys.executable, "-m", "orionlm", "merge-lora", "--base", str(tmp_path / "base"),
               "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    merged, _, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model.eval()(IDS).logits, atol=1e-5, rtol=1e-5)
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr
    # This adapter names no base, and has no recipe beside it to name the output directory.
    adapter, fp = str(tmp_path / "adapter"), str(tmp_path / "base")
    for args, message in [([], "does not name its base model: give --base MODEL"),
                          (["--base", fp], "give the output directory: --out DIR")]:  # fmt: skip
        with pytest.raises(SystemExit):
            main(["merge-lora", "--adapter", adapter, *args])
        assert message in capsys.readouterr().err


def _routes(model):
    """The top-k expert ids every MoE layer picks for IDS."""
    with torch.no_grad():
        return torch.stack([lg.topk(model.config.experts_per_token).indices for lg in model(IDS).router_logits])


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-qwen-moe"])
def test_moe_adapter_written_here_loads_in_peft(tmp_path, name):
    # attention, the router and both expert stacks; Qwen-MoE's shared expert and its gate are plain linears
    model, hf_dir = _export(tmp_path, name, **SMALL_MOE)
    shared = ["gate_proj", "up_proj", "down_proj", "shared_expert_gate"] if name == "tiny-qwen-moe" else []
    config = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "gate", *shared], target_parameters=EXPERTS)
    names = apply_lora(model, config)
    layer0 = [
        "model.layers.0.mlp.gate",  # the router, not shared_expert_gate nor gate_proj
        *[f"model.layers.0.mlp.shared_expert.{p}" for p in shared[:3]],
        *["model.layers.0.mlp.shared_expert_gate"] * bool(shared),
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]
    assert [n for n in names if n.startswith("model.layers.0.mlp")] == layer0
    state = model.state_dict()  # base names unchanged, PEFT's nesting for the two stacks of one module
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)
    assert state["model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (2 * 4, 32)  # gate_up_proj
    assert state["model.layers.0.mlp.experts.base_layer.lora_B.weight"].shape == (96, 2 * 4)
    assert state["model.layers.0.mlp.experts.lora_A.weight"].shape == (2 * 4, 48)  # down_proj
    assert state["model.layers.0.mlp.experts.lora_B.weight"].shape == (32, 2 * 4)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", str(hf_dir))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert "gate" not in written["target_modules"]  # transformers' routers are not nn.Linear
    assert_matches_peft(model, hf_dir, tmp_path / "adapter")


def test_moe_adapter_written_by_peft_loads_here(tmp_path):
    # peft on transformers 5 turns the target module "gate" (Mixtral's router) into the parameter gate.weight
    model, hf_dir = _export(tmp_path, "tiny-moe", **SMALL_MOE)
    before = _routes(model)
    # the nesting of the two stacks follows the module's parameter order, whatever the order of this list
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "gate"], target_parameters=EXPERTS[::-1])
    hf = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), lora)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft")
    assert isinstance(model.model.layers[0].mlp.gate, LoRALinear)
    with torch.no_grad():
        ours, theirs = model(IDS), hf.eval()(IDS, output_router_logits=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(ours.router_logits), torch.stack(theirs.router_logits), atol=1e-5, rtol=0)
    assert not torch.equal(_routes(model), before)  # the router's adapter changes which experts run


def test_every_expert_path_sees_the_adapter():
    # the sorted dispatch, both single-token paths (a strided bmm over evenly spaced experts, one by one
    # otherwise) and the reference multiply by stack + delta: they equal the merged stacks' reference
    torch.manual_seed(0)
    moe = MoE(preset("tiny-moe", num_experts=5, experts_per_token=3, **SMALL_MOE))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    plain = copy.deepcopy(moe)
    stacks = ["experts.gate_up_proj", "experts.down_proj"]  # a bare MoE: no "mlp." above them
    assert apply_lora(moe, LoRAConfig(r=2, target_modules=[], target_parameters=stacks)) == [
        "experts.gate_up_proj",
        "experts.down_proj",
    ]
    _randomize_adapters(moe)
    merged = copy.deepcopy(moe)
    merge_lora(merged)
    x = torch.randn(6, 32)
    _, weights, ids = moe.route(x)
    expected = merged._reference(x, weights, ids)
    assert (expected - plain._reference(x, weights, ids)).abs().max() > 1e-2
    torch.testing.assert_close(moe._dispatch(x, weights, ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe._reference(x, weights, ids), expected, atol=1e-5, rtol=1e-5)
    for chosen in ([0, 2, 4], [1, 0, 3]):
        one, ids_one = x[:1], torch.tensor([chosen])
        expected_one = merged._reference(one, weights[:1], ids_one)
        torch.testing.assert_close(moe._single_token(one, weights[:1], ids_one), expected_one)
    moe.train()
    moe(x.unsqueeze(0))[0].square().sum().backward()
    grads = {n for n, p in moe.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert grads == {f"experts.{s}lora_{f}.weight" for s in ("", "base_layer.") for f in "AB"}


def test_chimera_gdn_adapter_merges_and_round_trips(tmp_path):
    model = _model("tiny-chimera")
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        plain = model(IDS).logits
    names = apply_lora(model, LoRAConfig(r=4, target_modules=GDN))
    assert {n.split("layers.0.")[-1] for n in names if "layers.0." in n} == {f"linear_attn.{p}" for p in GDN}
    _randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDS).logits
    assert (adapted - plain).abs().max() > 1e-2
    save_adapter(model, tmp_path / "adapter")
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, adapted)
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, adapted, atol=1e-5, rtol=1e-5)


def test_adapters_added_after_decode_layout_are_used():
    # generation packs sibling linears (q/k/v, GDN's input projections, gate/up) into one matrix; an adapter
    # added afterwards must drop that pack, which would multiply by the base weights alone
    model = _model("tiny-chimera")
    reference = copy.deepcopy(model)
    generate_ids(model, [IDS[0].tolist()], max_new_tokens=1, do_sample=False)
    assert model.model.layers[0].linear_attn.packed is not None
    config = LoRAConfig(r=4, target_modules=[*GDN, "gate_proj"])
    for m in (model, reference):
        torch.manual_seed(0)
        apply_lora(m, config)
        _randomize_adapters(m)
    with torch.no_grad():
        expected = reference(IDS).logits
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert generate_ids(model, [IDS[0].tolist()], max_new_tokens=1, do_sample=False)[0] == [
        expected[0, -1].argmax().item()
    ]
    merge_lora(model)
    use_decode_layout(model)  # packs the merged linears again
    assert model.model.layers[0].linear_attn.packed is not None
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_bad_moe_targets_are_refused():
    model = _model("tiny-qwen-moe", **SMALL_MOE)
    with pytest.raises(OrionError, match="dropout .* target_parameters"):
        LoRAConfig(dropout=0.1, target_parameters=EXPERTS)
    with pytest.raises(OrionError, match="dropout .* router"):
        apply_lora(model, LoRAConfig(dropout=0.1, target_modules=["gate"]))
    with pytest.raises(OrionError, match="RMSNorm parameter"):
        apply_lora(model, LoRAConfig(target_parameters=["input_layernorm.weight"]))
    with pytest.raises(OrionError, match="no parameter matches"):
        apply_lora(model, LoRAConfig(target_parameters=["mlp.expert.gate_up_proj"]))
    with pytest.raises(OrionError, match="lm_head"):
        apply_lora(model, LoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(OrionError, match="target_modules or target_parameters"):
        LoRAConfig(target_modules=[])


def test_modules_to_save_train_fully_and_round_trip_with_peft(base, tmp_path):
    """PEFT's modules_to_save: modules trained in full beside the adapters, saved in the adapter file (read here
    from peft's, and by peft from ours)."""
    model, hf_dir = base
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["model.norm"])
    hf = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:  # the factors and the copy of the norm that PEFT trains
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "peft")
    config = load_adapter(model, tmp_path / "peft")
    assert config.modules_to_save == ["model.norm"]
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained - {n for n in trained if ".lora_" in n} == {"model.norm.weight"}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf.eval()(IDS).logits, atol=1e-5, rtol=1e-5)
    save_adapter(model, tmp_path / "ours", str(hf_dir))
    again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_modules_to_save_must_exist_and_hold_no_adapter(thinking_model):
    with pytest.raises(OrionError, match=r"no module matches LoRA modules_to_save \['thought'\]"):
        apply_lora(thinking_model("tiny-dense"), LoRAConfig(modules_to_save=["thinking", "thought"]))
    adapted_head = LoRAConfig(target_modules=["q_proj", r"thinking\.mixing_head\.0"], modules_to_save=["thinking"])
    with pytest.raises(OrionError, match="LoRA module to save thinking holds adapted layers"):
        apply_lora(thinking_model("tiny-dense"), adapted_head)


def test_an_adapted_router_keeps_its_routing_bias_and_merges_with_it():
    model = _model("tiny-moe", router_bias_update_rate=1e-3)
    bias = torch.tensor([0.2, -0.1, 0.0, 0.3])
    model.model.layers[0].mlp.gate.e_score_correction_bias.copy_(bias)
    names = set(model.state_dict())
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["gate"]))
    gate = model.model.layers[0].mlp.gate
    assert isinstance(gate, LoRALinear) and torch.equal(gate.e_score_correction_bias, bias)
    merge_lora(model)
    assert set(model.state_dict()) == names
    assert torch.equal(model.model.layers[0].mlp.gate.e_score_correction_bias, bias)
