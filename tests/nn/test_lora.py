"""LoRA against the real `peft` on the Hugging Face export of the same base model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from orionlm.config import preset
from orionlm.convert.hf import save_hf
from orionlm.generation import generate_ids
from orionlm.model import OrionLM
from orionlm.nn.lora import LoRAConfig, LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from orionlm.tokenizer import Tokenizer

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def base(tmp_path):
    tok = Tokenizer.byte_level()
    model = OrionLM(preset("tiny-dense", vocab_size=tok.vocab_size, initializer_range=0.1)).eval()
    model.reset_parameters(seed=0)
    save_hf(model, tok, tmp_path / "hf")
    return model, tmp_path / "hf"


def _randomize_adapters(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)


IDS = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_written_here_loads_in_peft(base, tmp_path, rslora):
    model, hf_dir = base
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS, rslora=rslora))
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", str(hf_dir))
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(IDS).logits, hf(IDS).logits
        merged = hf.merge_and_unload()(IDS).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, merged, atol=1e-5, rtol=1e-5)


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


def test_merge_lora_command(base, tmp_path):
    import subprocess
    import sys

    from orionlm.checkpoint import save_checkpoint
    from orionlm.loading import load_model

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
