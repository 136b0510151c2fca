"""Quantizing whole models block by block: the checkpoint round trip, GPTQ against RTN on real text, what
stays in full precision, and the command line."""

import json
import re
from collections.abc import Mapping

import pytest
import torch

from orionlm.checkpoint import meta_model, save_checkpoint, state_dict_for_saving
from orionlm.cli import main
from orionlm.config import preset
from orionlm.generation import generate_ids
from orionlm.loading import load_model, open_model
from orionlm.model import OrionLM
from orionlm.quant.gptq import QuantConfig, QuantError
from orionlm.quant.linear import QuantExperts, QuantLinear
from orionlm.quant.model import MIN_EXPERT_TOKENS, calibration_samples, quantize_model, save_quantized
from orionlm.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()


def tiny(name: str) -> OrionLM:
    model = OrionLM(preset(name, vocab_size=TOK.vocab_size, initializer_range=0.1)).eval()
    model.reset_parameters(seed=0)
    return model


@pytest.fixture
def text(shared_data):
    return str(shared_data / "pretrain" / "tinyshakespeare.txt.gz")


@pytest.mark.parametrize("sym, checkpoint_format", [(True, "gptq"), (False, "gptq_v2")])
def test_quantized_checkpoint_round_trip(tmp_path, text, sym, checkpoint_format):
    model = tiny("tiny-dense")
    samples = calibration_samples(TOK, text, nsamples=8, seq_len=64)
    reports = quantize_model(model, samples, QuantConfig(bits=4, group_size=32, sym=sym), progress=False)
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(reports) == len(linears) == 7 * model.config.num_layers and all(r.method == "gptq" for r in reports)
    save_quantized(model, tmp_path / "q", TOK)
    settings = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert settings["bits"] == 4 and settings["group_size"] == 32 and settings["quant_method"] == "gptq"
    assert settings["sym"] == sym and settings["checkpoint_format"] == checkpoint_format
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"] == settings
    loaded, _, _ = load_model(tmp_path / "q", device="cpu")
    assert loaded.model.layers[0].self_attn.q_proj.qweight.dtype == torch.int32
    with torch.no_grad():
        torch.testing.assert_close(loaded(samples[:2]).logits, model(samples[:2]).logits, atol=0, rtol=0)
    # generation packs q/k/v for decoding only where layers hold float weights
    assert generate_ids(loaded, [samples[0, :8].tolist()], max_new_tokens=4, temperature=0) == generate_ids(
        model, [samples[0, :8].tolist()], max_new_tokens=4, temperature=0
    )


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_moves_the_logits_less_than_rtn(text, bits):
    reference = tiny("tiny-dense")
    calibration = calibration_samples(TOK, text, nsamples=16, seq_len=64, seed=0)
    held_out = calibration_samples(TOK, text, nsamples=4, seq_len=64, seed=1)
    with torch.no_grad():
        want = reference(held_out).logits
    errors = {}
    for method in ("gptq", "rtn"):
        model = tiny("tiny-dense")
        quantize_model(model, calibration, QuantConfig(bits=bits, group_size=32), method=method, progress=False)
        with torch.no_grad():
            errors[method] = (model(held_out).logits - want).square().mean().item()
    assert errors["gptq"] < 0.7 * errors["rtn"]


def test_a_calibration_pass_stops_at_the_last_layer_it_calibrates(text):
    """q/k/v, o, gate/up and down are calibrated in turn; a pass that calibrates attention layers never reaches
    the MLP. The MLP runs on the probe chunk, in the gate/up and down passes, and on the final pass."""
    model = tiny("tiny-dense")
    samples = calibration_samples(TOK, text, nsamples=4, seq_len=32)
    entered = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: entered.append(args[0].shape[0]))
    quantize_model(model, samples, QuantConfig(bits=4, group_size=32), batch_size=1, progress=False)
    assert len(entered) == 1 + 4 + 4 + 4  # without stopping: 1 + 4 passes x 4 chunks + 4


def test_moe_experts_are_quantized_each_on_its_own_tokens(tmp_path, text):
    model = tiny("tiny-qwen-moe")
    samples = calibration_samples(TOK, text, nsamples=8, seq_len=64)
    reports = quantize_model(model, samples, QuantConfig(bits=4, group_size=32), progress=False)
    moe = model.model.layers[0].mlp
    assert type(moe.gate).__name__ == "Linear"  # the router stays in full precision
    assert isinstance(moe.experts, QuantExperts) and isinstance(moe.shared_expert.down_proj, QuantLinear)
    first = [r for r in reports if r.name.startswith("model.layers.0.mlp.experts.gate_up_proj.")]
    assert len(first) == model.config.num_experts
    routed = [int(re.search(r"(\d+) (calibration )?tokens", r.method).group(1)) for r in first]
    assert sum(routed) == samples.numel() * model.config.experts_per_token  # every routed slot, once
    for report, count in zip(first, routed, strict=True):
        assert report.method.startswith("gptq" if count >= MIN_EXPERT_TOKENS else "rtn")
    save_quantized(model, tmp_path / "q", TOK)
    loaded, _, _ = load_model(tmp_path / "q", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(samples[:2]).logits, model(samples[:2]).logits, atol=0, rtol=0)
        # every MoE path (grouped, single token, per-expert reference) computes the same quantized experts
        x = torch.randn(5, model.config.hidden_size)
        grouped = moe(x.unsqueeze(0))[0]
        moe.use_reference = True
        torch.testing.assert_close(moe(x.unsqueeze(0))[0], grouped, atol=1e-5, rtol=1e-5)
        moe.use_reference = False
        torch.testing.assert_close(moe(x[:1].unsqueeze(0))[0], grouped[:, :1], atol=1e-5, rtol=1e-5)


def test_chimera_gdn_and_attention_projections(tmp_path, text):
    model = tiny("tiny-chimera")
    samples = calibration_samples(TOK, text, nsamples=4, seq_len=64)
    with torch.no_grad():
        want = model(samples).logits
    reports = quantize_model(model, samples, QuantConfig(bits=8, group_size=32), progress=False)
    names = [r.name for r in reports]
    assert len(names) == len(set(names))  # a looped block is quantized once
    gdn = next(b.linear_attn for b in model.model.layers if not b.is_attention)
    assert isinstance(gdn.q_proj, QuantLinear) and isinstance(gdn.o_proj, QuantLinear)
    assert gdn.A_log.is_floating_point() and type(gdn.q_conv1d) is torch.nn.Conv1d  # kept in full precision
    save_quantized(model, tmp_path / "q", TOK)
    loaded, _, _ = load_model(tmp_path / "q", device="cpu")
    with torch.no_grad():
        got = loaded(samples).logits
        torch.testing.assert_close(got, model(samples).logits, atol=0, rtol=0)
    assert (got - want).abs().max() < 0.05  # 8 bits move a Chimera's logits little


class BlockWatch(Mapping):
    """A model's tensors that check, as each is read, that the model is held a block at a time: every block
    before the one being read is quantized already (its modules those of `done`'s block), every block after it
    is still on the meta device."""

    def __init__(self, tensors: Mapping, model: OrionLM, done: OrionLM) -> None:
        self.tensors, self.model, self.done, self.reads = tensors, model, done, []

    def __getitem__(self, name):
        self.reads.append(name)
        if m := re.match(r"model\.layers\.(\d+)\.", name):
            index = int(m.group(1))
            for i, block in enumerate(self.model.model.layers):
                if i < index:
                    assert [type(m) for m in block.modules()] == [type(m) for m in self.done.model.layers[i].modules()]
                elif i > index:
                    assert all(t.is_meta for t in block.state_dict().values()), (name, i)
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


@pytest.mark.parametrize("name, method", [("tiny-dense", "gptq"), ("tiny-qwen-moe", "gptq"),
                                          ("tiny-qwen-moe", "rtn"), ("tiny-chimera", "gptq")])  # fmt: skip
def test_block_wise_quantization_reads_the_model_a_block_at_a_time_and_gives_the_same_codes(
    tmp_path, text, name, method
):
    """The lazy path (a meta-built model, its tensors read a block at a time from a sharded bf16 checkpoint, as
    `orionlm quantize` does) against the in-memory path on the same model loaded whole in float32: the same
    codes, scales, zero points, g_idx and full-precision tensors, bit for bit. (Both are one algorithm; the
    in-memory one gave the same bytes as the implementation before block-wise loading on these models.)"""
    save_checkpoint(tiny(name).to(torch.bfloat16), tmp_path / "m", TOK, max_shard_bytes=100_000)
    samples = calibration_samples(TOK, text, nsamples=4, seq_len=64) if method == "gptq" else None
    config = QuantConfig(bits=4, group_size=32, desc_act=name == "tiny-dense")
    whole, _, _ = load_model(tmp_path / "m", device="cpu", dtype=torch.float32)
    want = quantize_model(whole, samples, config, method, batch_size=2, progress=False)
    source = open_model(tmp_path / "m")
    lazy = meta_model(source.config, source.tensors, "m")
    watch = BlockWatch(source.tensors, lazy, whole)
    got = quantize_model(lazy, samples, config, method, batch_size=2, progress=False, tensors=watch, device="cpu")
    assert [(r.name, r.method, r.error) for r in got] == [(r.name, r.method, r.error) for r in want]
    assert sorted(watch.reads) == sorted(source.tensors)  # each tensor read once, a looped block's too
    blocks = [int(n.split(".")[2]) for n in watch.reads if n.startswith("model.layers.")]
    assert blocks == sorted(blocks)
    assert lazy.config == whole.config and lazy.device.type == "cpu"
    want_state, got_state = state_dict_for_saving(whole), state_dict_for_saving(lazy)
    assert got_state.keys() == want_state.keys() and any(k.endswith(".qweight") for k in got_state)
    for key, tensor in want_state.items():
        assert got_state[key].dtype == tensor.dtype and torch.equal(got_state[key], tensor), key
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(lazy(ids).logits, whole(ids).logits, atol=0, rtol=0)


def test_refusals(tmp_path):
    with pytest.raises(QuantError, match="calibration samples"):
        quantize_model(tiny("tiny-dense"), None, QuantConfig(), progress=False)
    save_checkpoint(tiny("tiny-dense"), tmp_path / "m", TOK)
    with pytest.raises(QuantError, match="pass tensors="):
        quantize_model(OrionLM(tiny("tiny-dense").config).to("meta"), None, QuantConfig(), "rtn", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(tmp_path / "m"), str(tmp_path / "q")])
    assert exit_info.value.code == 2  # gptq without --dataset
    main(["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--method", "rtn", "--bits", "8", "--group-size", "-1"])
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["bits"] == 8
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(tmp_path / "q"), str(tmp_path / "q2"), "--method", "rtn"])
    assert exit_info.value.code == 2 and not (tmp_path / "q2").exists()  # already quantized


def test_rtn_quantizes_experts_too():
    model = tiny("tiny-qwen-moe")
    reports = quantize_model(model, None, QuantConfig(bits=4, group_size=32), method="rtn", progress=False)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    experts = [r for r in reports if ".experts." in r.name]
    assert len(experts) == 2 * model.config.num_experts * model.config.num_layers and experts[0].method == "rtn"
    # quantized experts dequantize to float32; a bfloat16 model's single-token decoding must still run
    [tokens] = generate_ids(model.to(torch.bfloat16), [[1, 2, 3]], max_new_tokens=3, temperature=0)
    assert len(tokens) == 3


def test_info_shows_bits_and_sizes(tmp_path, capsys):
    model = tiny("tiny-dense")
    save_checkpoint(model, tmp_path / "m", TOK)
    quantize_model(model, None, QuantConfig(bits=4, group_size=32), method="rtn", progress=False)
    save_quantized(model, tmp_path / "q", TOK)
    sizes = {}
    for name in ("m", "q"):
        main(["info", str(tmp_path / name), "--json"])
        sizes[name] = json.loads(capsys.readouterr().out)
    # The block stack's 4-bit weights (plus scales and g_idx) take under a fifth of their float32 bytes;
    # the embedding and the head stay float32.
    stack = sum(p.numel() for n, p in tiny("tiny-dense").named_parameters() if ".layers." in n and p.dim() == 2)
    saved = sizes["m"]["memory_bytes"] - sizes["q"]["memory_bytes"]
    assert 0.75 * 4 * stack < saved < 4 * stack
    assert sizes["q"]["disk_bytes"] < sizes["m"]["disk_bytes"] and sizes["q"]["config"]["quantization_config"]
    main(["info", str(tmp_path / "q")])
    assert "GPTQ 4-bit, groups of 32, sym" in capsys.readouterr().out
