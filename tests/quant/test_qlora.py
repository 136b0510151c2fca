"""LoRA on a quantized model (QLoRA with GPTQ codes): the adapted GPTQ layers and experts compute what LoRA
computes on their dequantized weights, train through them, and save adapters that load on either."""

import copy

import pytest
import torch
from torch import nn

from orionlm.checkpoint import save_checkpoint
from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.peft import load_adapter, save_adapter
from orionlm.errors import OrionError
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.nn.linear import Linear
from orionlm.nn.lora import LoRAConfig, apply_lora, merge_lora
from orionlm.nn.moe import STACKS, Experts
from orionlm.quant.gptq import QuantConfig
from orionlm.quant.linear import QuantExperts, QuantLinear
from orionlm.quant.lora import LoRAQuantExperts, LoRAQuantLinear
from orionlm.quant.model import quantize_model, save_quantized
from orionlm.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
LORA = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "shared_expert.down_proj"],
                  target_parameters=["experts.gate_up_proj", "experts.down_proj"])  # fmt: skip


def quantized(name: str = "tiny-qwen-moe") -> OrionLM:
    model = OrionLM(preset(name, vocab_size=TOK.vocab_size, initializer_range=0.1))
    model.reset_parameters(seed=0)
    quantize_model(model, None, QuantConfig(bits=4, group_size=32), method="rtn", progress=False)
    return model.eval()


def dequantized(model: OrionLM) -> OrionLM:
    """A copy of the model in full precision, holding the weights its GPTQ layers and experts decode to."""
    copied = copy.deepcopy(model)
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if isinstance(module, QuantExperts):
            num_experts, hidden = len(module.down_proj), module.down_proj[0].out_features
            experts = Experts(num_experts, hidden, module.down_proj[0].in_features)
            for stack, weight in zip(STACKS, module.weights(), strict=True):
                setattr(experts, stack, nn.Parameter(weight))
            setattr(copied.get_submodule(parent), leaf, experts)
        elif isinstance(module, QuantLinear) and not isinstance(model.get_submodule(parent), nn.ModuleList):
            layer = Linear(module.in_features, module.out_features, bias=module.bias is not None)
            layer.weight = nn.Parameter(module.dequantize())
            if module.bias is not None:
                layer.bias = nn.Parameter(module.bias.float())
            setattr(copied.get_submodule(parent), leaf, layer)
    return copied


def adapted(model: OrionLM, config: LoRAConfig = LORA, seed: int = 1) -> OrionLM:
    """The model with LoRA applied and every factor random (B starts at zero, which would hide the adapter)."""
    apply_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def test_lora_on_gptq_layers_matches_lora_on_their_dequantized_weights():
    model = adapted(quantized())
    reference = dequantized(quantized())
    apply_lora(reference, LORA)
    state = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert state and set(state) == {n for n, p in reference.named_parameters() if ".lora_" in n}  # PEFT's names
    reference.load_state_dict(state, strict=False)
    attention, moe = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attention.q_proj, LoRAQuantLinear) and isinstance(moe.experts, LoRAQuantExperts)
    assert not isinstance(attention.k_proj, LoRAQuantLinear)  # not a target
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(state)

    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-4, rtol=1e-4)
    for module in (moe, reference.model.layers[0].mlp):  # the per-expert reference path and single tokens
        module.use_reference = True
    x = torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference.model.layers[0].mlp(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe(x[:, :1]), reference.model.layers[0].mlp(x[:, :1]), atol=1e-5, rtol=1e-5)

    # Training: the gradients reach every factor through the GPTQ layers, as through the float ones.
    codes = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    for m in (model, reference):
        m.train()
        m(IDS[:, :-1], targets=IDS[:, 1:]).loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, grads[name], atol=1e-4, rtol=1e-3)
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n.endswith("qweight"))


def test_adapter_saved_on_a_quantized_base_loads_on_it_and_on_full_precision(tmp_path):
    base = quantized()
    save_quantized(base, tmp_path / "q", TOK)
    model = adapted(quantized())
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "q"))
    loaded, _, _ = load_model(tmp_path / "adapter", device="cpu")  # the base named in adapter_config.json
    assert loaded.config.quantization_config and isinstance(loaded.model.layers[1].mlp.experts, LoRAQuantExperts)
    with torch.no_grad():
        want = model(IDS).logits
        torch.testing.assert_close(loaded(IDS).logits, want, atol=0, rtol=0)
        # an adapter trained on GPTQ codes applies to the float model they decode to
        on_float = dequantized(base)
        load_adapter(on_float, tmp_path / "adapter")
        torch.testing.assert_close(on_float(IDS).logits, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(OrionError, match="merge it into the full-precision model"):
        merge_lora(loaded)
    # ... which merge-lora does when --base names it, though the adapter names the quantized model as its base
    save_checkpoint(dequantized(base), tmp_path / "fp", TOK)
    main(["merge-lora", "--base", str(tmp_path / "fp"), "--adapter", str(tmp_path / "adapter"), "--out",
          str(tmp_path / "merged")])  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")[0](IDS).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-chimera"])
def test_gptq_layers_of_other_families_take_adapters(name):
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = adapted(quantized(name), config, seed=2)
    reference = dequantized(quantized(name))
    apply_lora(reference, config)
    reference.load_state_dict({n: p for n, p in model.named_parameters() if ".lora_" in n}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-4, rtol=1e-4)
