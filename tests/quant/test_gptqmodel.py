"""GPTQModel (github.com/ModelCloud/GPTQModel) as an independent reference for orionlm's GPTQ checkpoints and
quantizer: its checkpoints load in orionlm, orionlm's exports load in GPTQModel, and on the same base and
calibration the two quantizers move the model about as far. Skipped without `pip install gptqmodel`.

GPTQModel's own CPU kernels run a float32 model through bfloat16 (TorchFusedLinear, transformers' TorchAtenLinear),
so its float32 reference here is its model with every quantized layer replaced by a float32 nn.Linear holding the
layer's own dequantize_weight() (float32 scales: exact), before any forward pass repacks the codes."""

from pathlib import Path

import pytest
import torch

from orionlm.checkpoint import save_checkpoint
from orionlm.cli import main
from orionlm.config import preset
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.quant.linear import QuantExperts, QuantLinear
from orionlm.quant.model import MIN_EXPERT_TOKENS, calibration_samples
from orionlm.tokenizer import Tokenizer


@pytest.fixture(scope="module", autouse=True)
def gptqmodel():
    """Skips the module without GPTQModel; imported only when these tests run (its import takes seconds and sets
    process-wide state), never at collection."""
    return pytest.importorskip("gptqmodel")


BITS, GROUP, NSAMPLES, SEQ_LEN = 4, 32, 16, 64
ARCHS = ["tiny-dense", "tiny-moe"]  # exported as llama and mixtral


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gptqmodel")


@pytest.fixture(scope="module")
def text(workdir) -> Path:
    """Calibration and test text: the Python standard library's json package (present wherever Python is)."""
    import json as json_package

    path = workdir / "text.txt"
    path.write_text("\n".join(p.read_text() for p in sorted(Path(json_package.__file__).parent.glob("*.py"))))
    return path


@pytest.fixture(scope="module")
def bases(workdir, text) -> dict[str, tuple[Path, Path]]:
    """Per architecture: a tiny orionlm model directory with a BPE tokenizer, and its `convert to-hf` export."""
    tokenizer = Tokenizer.train_bpe_from_texts([text.read_text()], vocab_size=400)
    out = {}
    for arch in ARCHS:
        model = OrionLM(preset(arch, vocab_size=tokenizer.vocab_size, initializer_range=0.1))
        model.reset_parameters(seed=0)
        save_checkpoint(model, workdir / arch, tokenizer)
        main(["convert", "to-hf", str(workdir / arch), str(workdir / f"{arch}-hf")])
        out[arch] = (workdir / arch, workdir / f"{arch}-hf")
    return out


def samples(base: Path, text: Path) -> torch.Tensor:
    """The calibration windows both quantizers get: orionlm's calibration_samples of the model's tokenizer."""
    return calibration_samples(Tokenizer.load(base), str(text), nsamples=NSAMPLES, seq_len=SEQ_LEN)


def gptqmodel_quantize(export: Path, windows: torch.Tensor, out: Path) -> Path:
    """GPTQModel's GPTQ of a Hugging Face directory with orionlm's defaults (damp 0.01, no act order or group-aware
    reordering, symmetric, true-sequential, experts with < MIN_EXPERT_TOKENS tokens rounded to nearest)."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import Fallback

    config = QuantizeConfig(bits=BITS, group_size=GROUP, sym=True, desc_act=False, act_group_aware=False,
                            damp_percent=0.01, fallback=Fallback(threshold=MIN_EXPERT_TOKENS),
                            pack_impl="original")  # fmt: skip  # original: no C++ extension to compile
    calibration = [{"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]} for ids in windows]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel 7.6's default of (cores + 1) // 2 fails on 2 cores
        env.chdir(out.parent)  # it writes logs/ into the working directory
        model = GPTQModel.load(str(export), config, device="cpu", dtype=torch.float32)
        model.quantize(calibration, batch_size=NSAMPLES)
        model.save(str(out))
    return out


@pytest.fixture(scope="module")
def gptqmodel_checkpoints(bases, text, workdir) -> dict[str, Path]:
    return {arch: gptqmodel_quantize(hf, samples(base, text), workdir / f"{arch}-gptqmodel")
            for arch, (base, hf) in bases.items()}  # fmt: skip


def gptqmodel_reference(directory: Path) -> torch.nn.Module:
    """A GPTQ directory as GPTQModel reads it, every quantized layer replaced by its float32 dequantization."""
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    model = GPTQModel.load(str(directory), device="cpu", dtype=torch.float32).model
    with torch.compiler.set_stance("force_eager"):  # dequantize_weight is compiled per shape: tens of seconds
        for name, layer in list(model.named_modules()):
            if isinstance(layer, BaseQuantLinear):
                layer.scales = layer.scales.float()
                linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                linear.weight.data = layer.dequantize_weight().float().t().contiguous()
                if layer.bias is not None:
                    linear.bias.data = layer.bias.float()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, linear)
    return model.float().eval()


def test_gptqmodel_writes_what_the_reader_expects(gptqmodel_checkpoints):
    """The facts the reader relies on: v1 zero points (zero - 1), per-expert names under mlp.experts."""
    from safetensors.torch import load_file

    tensors = load_file(gptqmodel_checkpoints["tiny-moe"] / "model.safetensors")
    assert {n for n in tensors if n.startswith("model.layers.0.mlp.experts.0.")} == {
        f"model.layers.0.mlp.experts.0.{p}.{part}" for p in ("gate_proj", "up_proj", "down_proj")
        for part in ("qweight", "qzeros", "scales", "g_idx")
    }  # fmt: skip
    zeros = tensors["model.layers.0.self_attn.q_proj.qzeros"]
    assert (zeros == 0x77777777).all()  # symmetric 4-bit: zero point 8 stored as 7 in every nibble


@pytest.mark.parametrize("arch", ARCHS)
def test_gptqmodel_checkpoint_loads_in_orionlm_with_its_logits(gptqmodel_checkpoints, arch):
    directory = gptqmodel_checkpoints[arch]
    model, _, _ = load_model(directory, device="cpu", dtype=torch.float32)
    layers = model.model.layers[0]
    assert isinstance(layers.self_attn.q_proj, QuantLinear)  # the codes are kept, not dequantized at load
    if arch == "tiny-moe":
        assert isinstance(layers.mlp.experts, QuantExperts)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(ids).logits, gptqmodel_reference(directory)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_orionlm_export_loads_in_gptqmodel_with_our_logits(bases, text, workdir, arch):
    base, _ = bases[arch]
    quantized, export = workdir / f"{arch}-ours", workdir / f"{arch}-ours-hf"
    main(["quantize", str(base), str(quantized), "--bits", str(BITS), "--group-size", str(GROUP),
          "--dataset", str(text), "--nsamples", str(NSAMPLES), "--seq-len", str(SEQ_LEN)])  # fmt: skip
    main(["convert", "to-hf", str(quantized), str(export)])
    model, _, _ = load_model(quantized, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(ids).logits, gptqmodel_reference(export)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_orionlm_export_runs_in_transformers(bases, text, workdir):
    """transformers (with optimum and GPTQModel's CPU kernel, bfloat16 inside) runs a dense export close to our
    logits. MoE exports are left out: transformers 5 fuses experts and does not read per-expert GPTQ layers."""
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    base, _ = bases["tiny-dense"]
    quantized, export = workdir / "dense-tf", workdir / "dense-tf-hf"
    main(["quantize", str(base), str(quantized), "--bits", str(BITS), "--group-size", str(GROUP),
          "--dataset", str(text), "--nsamples", str(NSAMPLES), "--seq-len", str(SEQ_LEN)])  # fmt: skip
    main(["convert", "to-hf", str(quantized), str(export)])
    model, _, _ = load_model(quantized, device="cpu", dtype=torch.float32)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GPTQMODEL_CPU_WORKERS", "2")
        theirs_model, info = AutoModelForCausalLM.from_pretrained(
            export, dtype=torch.float32, device_map="cpu", output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(ids).logits, theirs_model(ids).logits
    # bfloat16 activations: about 3 significant digits
    torch.testing.assert_close(theirs, ours, atol=0.05 * float(ours.abs().max()), rtol=0)


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    reference, logits = reference.log_softmax(-1), logits.log_softmax(-1)
    return float((reference.exp() * (reference - logits)).sum(-1).mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_both_gptqs_move_the_model_alike(bases, gptqmodel_checkpoints, text, workdir, arch):
    """Same base, calibration windows and settings: orionlm's and GPTQModel's GPTQ reach output errors (KL from
    the float model on held-out windows) within 25% of each other, both below round-to-nearest's."""
    from orionlm.quant import QuantConfig, quantize_model

    base, _ = bases[arch]
    windows = samples(base, text)
    held_out = calibration_samples(Tokenizer.load(base), str(text), nsamples=4, seq_len=SEQ_LEN, seed=1)
    fp32, _, _ = load_model(base, device="cpu", dtype=torch.float32)
    ours, rtn = (load_model(base, device="cpu", dtype=torch.float32)[0] for _ in range(2))
    quantize_model(ours, windows, QuantConfig(BITS, GROUP), progress=False)
    quantize_model(rtn, None, QuantConfig(BITS, GROUP), "rtn", progress=False)
    theirs = gptqmodel_reference(gptqmodel_checkpoints[arch])
    with torch.no_grad():
        reference = fp32.eval()(held_out).logits
        kl = {name: kl_from(reference, m.eval()(held_out).logits) for name, m in
              [("ours", ours), ("theirs", theirs), ("rtn", rtn)]}  # fmt: skip
    assert 0.8 < kl["ours"] / kl["theirs"] < 1.25, kl
    assert max(kl["ours"], kl["theirs"]) < kl["rtn"], kl
