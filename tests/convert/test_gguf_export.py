"""GGUF export (orionlm convert to-gguf): orionlm -> GGUF -> orionlm gives the same model and tokenizer, and
llama.cpp itself (llama-cpp-python, when installed) runs the file with orionlm's logits and greedy tokens."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the `gguf` package (pip install 'orionlm[gguf]')")

from orionlm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from orionlm.cli import main  # noqa: E402
from orionlm.config import preset  # noqa: E402
from orionlm.convert.gguf import GGUFError, _permute, _unpermute, load_gguf, save_gguf  # noqa: E402
from orionlm.convert.hf import load_hf, save_hf  # noqa: E402
from orionlm.generation import GenerationConfig, generate_ids  # noqa: E402
from orionlm.model import OrionLM  # noqa: E402
from orionlm.tokenizer import CHATML_TEMPLATE, Tokenizer  # noqa: E402

TEXT = "def add(a, b):\n    return a + b  # the sum of two numbers"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [TEXT, "The cat sat on the mat. " * 20, "import os\nimport sys\n" * 10]
    tok = Tokenizer.train_bpe_from_texts(texts, 300)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _model(name: str, **overrides) -> OrionLM:
    torch.manual_seed(0)
    config = dataclasses.replace(preset(name), vocab_size=320, rope_theta=500.0, **overrides)
    model = OrionLM(config).eval()
    with torch.no_grad():  # norms away from 1 and larger routers: mistakes in either would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
            elif n.endswith("mlp.gate.weight"):
                p.mul_(20)
    return model


MODELS = {
    "dense": lambda: _model("tiny-dense"),
    "dense-tied-gqa": lambda: _model("tiny-dense", tie_embeddings=True, num_kv_heads=1),
    "moe": lambda: _model("tiny-moe"),
}
BLOOM = {  # llama.cpp's bloom architecture
    "bloom": lambda: _model("tiny-alibi"),
    "bloom-untied": lambda: _model("tiny-alibi", tie_embeddings=False),
}


def test_permutation_is_the_inverse_of_the_import():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(_unpermute(_permute(w, 4), 4), w)
    assert not torch.equal(_permute(w, 4), w)


@pytest.mark.parametrize("name", [*MODELS, *BLOOM])
def test_round_trip_is_exact_in_f32(name, tokenizer, tmp_path):
    model = (MODELS | BLOOM)[name]()
    save_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    back, tok = load_gguf(tmp_path / "m.gguf", device="cpu", dtype=torch.float32)
    ours = model.state_dict()
    theirs = back.state_dict()
    assert set(theirs) == set(ours)
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key
    assert tok.encode(TEXT) == tokenizer.encode(TEXT) and tok.decode(tokenizer.encode(TEXT)) == TEXT
    assert tok.eos_token == tokenizer.eos_token and tok.chat_template == tokenizer.chat_template
    assert back.config.num_experts == model.config.num_experts
    assert back.config.tie_embeddings == model.config.tie_embeddings
    assert back.config.family == model.config.family


@pytest.mark.parametrize("dtype, tolerance", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_f16_and_q8_0_stay_close(dtype, tolerance, tokenizer, tmp_path):
    model = MODELS["moe"]()
    save_gguf(model, tokenizer, tmp_path / "m.gguf", dtype=dtype)
    back, _ = load_gguf(tmp_path / "m.gguf", device="cpu", dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours, theirs = model(ids).logits, back(ids).logits
    assert float((ours - theirs).abs().max() / ours.abs().max()) < tolerance
    sizes = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert sizes["blk.0.attn_q.weight"] == dtype.upper() and sizes["blk.0.attn_norm.weight"] == "F32"
    assert sizes["blk.0.ffn_gate_inp.weight"] == "F32"  # routers stay in full precision


def test_refused_models(tokenizer, tmp_path):
    with pytest.raises(GGUFError, match="chimera family"):
        save_gguf(OrionLM(dataclasses.replace(preset("tiny-chimera"), vocab_size=320)), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="an ALiBi model that is not in BLOOM's layout"):
        save_gguf(_model("tiny-alibi", fused_qkv=False), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="a Quiet-STaR thinking head"):
        save_gguf(_model("tiny-dense", thought_start_id=300, thought_end_id=301), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="qk_norm"):
        save_gguf(_model("tiny-dense", qk_norm=True), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match=r"a routing bias \(e_score_correction_bias: llama.cpp's llama architecture"):
        save_gguf(_model("tiny-moe", router_bias_update_rate=1e-3), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="dtype 'q4' is not one of f32, f16, q8_0, q4_0, q4_1, .*, q6_k$"):
        save_gguf(_model("tiny-dense"), tokenizer, tmp_path / "x.gguf", dtype="q4")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*tmp"))


def test_cli(tokenizer, tmp_path, capsys):
    save_checkpoint(MODELS["dense"](), tmp_path / "m", tokenizer)
    main(["convert", "to-gguf", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--dtype", "f16"])
    assert "wrote" in capsys.readouterr().out
    main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "back")])
    assert (tmp_path / "back" / "config.json").is_file()


def test_a_byte_level_vocabulary_without_merges_is_refused(tmp_path, capsys):
    """llama.cpp cannot load a 'gpt2' vocabulary without merges ("cannot find tokenizer merges in model file"),
    so to-gguf refuses one in one line and writes nothing."""
    save_checkpoint(MODELS["dense"](), tmp_path / "m", Tokenizer.byte_level())
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "to-gguf", str(tmp_path / "m"), str(tmp_path / "m.gguf")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1
    assert "byte-level BPE without merges" in error and "orionlm tokenizer train" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("name", [*MODELS, *BLOOM])
def test_llama_cpp_runs_the_file_like_orionlm(name, tokenizer, tmp_path):
    """llama.cpp's logits on the same tokens (all positions) and its greedy continuation equal orionlm's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model = (MODELS | BLOOM)[name]()
    save_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, verbose=False, seed=0)
    ids = tokenizer.encode(TEXT)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-3 * np.abs(ours).max(), rtol=0)  # its KV cache is float16
    llm.reset()
    expected = generate_ids(model, [ids], config=GenerationConfig(max_new_tokens=20, do_sample=False))[0]
    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        got.append(token)
        if len(got) == len(expected):
            break
    assert got == expected


# ---------------------------------------------------------------------------------------------
# Streaming: any source, shards, a full disk
# ---------------------------------------------------------------------------------------------

SMALL_SHARDS = str(40_000 / 1024**3)  # --shard-gb of about 40 KB: the tiny models take several shards


@pytest.mark.parametrize("name", ["moe", "bloom"])
def test_to_gguf_of_any_source_writes_the_same_file(name, tokenizer, tmp_path, capsys):
    """A Hugging Face directory, the orionlm directory converted from it and a training run holding that as its
    newest checkpoint export to the same bytes (experts read per expert and stacked, QKV fused, a tied head)."""
    save_hf(((MODELS | BLOOM)[name])(), tokenizer, tmp_path / "hf")
    main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "orion")])
    step = tmp_path / "run" / "checkpoints" / "step-00000010"
    shutil.copytree(tmp_path / "orion", step)
    (step / "trainer_state.json").write_text(json.dumps({"step": 10}))
    for source in ("hf", "orion", "run"):
        main(["convert", "to-gguf", str(tmp_path / source), str(tmp_path / f"{source}.gguf"), "--dtype", "q8_0"])
    orion = (tmp_path / "orion.gguf").read_bytes()
    assert (tmp_path / "hf.gguf").read_bytes() == orion and (tmp_path / "run.gguf").read_bytes() == orion
    back, _ = load_gguf(tmp_path / "orion.gguf", device="cpu", dtype=torch.float32)
    assert back.config.num_experts == (4 if name == "moe" else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.gguf", "orion", "orion.gguf", "run", "run.gguf"]


def test_from_gguf_and_to_hf_write_shards_that_load_back(tokenizer, tmp_path):
    model = MODELS["moe"]()
    save_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "orion"), "--shard-gb", SMALL_SHARDS])
    main(["convert", "to-hf", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--shard-gb", SMALL_SHARDS])
    for directory, load in ((tmp_path / "orion", load_checkpoint), (tmp_path / "hf", load_hf)):
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
        back = load(directory, device="cpu")[0].state_dict()
        for key, tensor in model.state_dict().items():
            assert torch.equal(back[key], tensor), (directory.name, key)


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_failed_export_leaves_no_partial_file(failure, tokenizer, tmp_path, monkeypatch, capsys):
    """A full disk is the one-line error atomic_directory gives; any failure leaves neither the file nor a
    temporary one, and an existing file stays as it was."""
    save_checkpoint(MODELS["dense"](), tmp_path / "m", tokenizer)
    (tmp_path / "m.gguf").write_bytes(b"the old file")
    written = []

    def write_tensor_data(self, tensor):
        written.append(tensor.nbytes)
        if len(written) == 3:
            raise OSError(failure, os.strerror(failure))
        return real(self, tensor)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)
    args = ["convert", "to-gguf", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--force"]
    if failure == errno.ENOSPC:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        assert capsys.readouterr().err == (
            f"orionlm: error: the disk is full: {tmp_path / 'm.gguf'} was not written (nothing of it is left behind); "
            "free some space and run again\n"
        )
    else:
        with pytest.raises(OSError, match="Input/output error"):
            main(args)
    assert len(written) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == b"the old file"
