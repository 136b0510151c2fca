import gzip
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orionlm import OrionError, generate, load_model
from orionlm.checkpoint import model_from_tensors, save_checkpoint
from orionlm.config import preset
from orionlm.generation import generate_ids
from orionlm.loading import resolve_model_path
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer


def test_orionlm_directory_with_generation_defaults(tmp_path):
    save_checkpoint(OrionLM(preset("tiny-dense")), tmp_path / "m", Tokenizer.byte_level(), {"temperature": 0.3})
    model, tokenizer, device = load_model(tmp_path / "m", device="cpu")
    assert device == torch.device("cpu") and model.dtype == torch.float32
    assert model.generation_defaults["temperature"] == 0.3
    assert tokenizer.eos_id == 256


def test_stored_dtype_is_loaded_as_stored(tmp_path):
    """A bf16 checkpoint loaded in bf16 (asked for, or "auto") holds its stored values in bf16 and generates, as
    the float32 load of it does; tensors already in the dtype asked for are adopted, not copied."""
    model = OrionLM(preset("tiny-dense", vocab_size=Tokenizer.byte_level().vocab_size)).to(torch.bfloat16)
    save_checkpoint(model, tmp_path / "m", Tokenizer.byte_level())
    wide, _, _ = load_model(tmp_path / "m", device="cpu")
    assert wide.dtype == torch.float32
    for dtype in (torch.bfloat16, "auto"):
        narrow, _, _ = load_model(tmp_path / "m", device="cpu", dtype=dtype)
        floats = [p for p in narrow.state_dict().values() if p.is_floating_point()]
        assert {p.dtype for p in floats} == {torch.bfloat16}
        for name, p in narrow.state_dict().items():
            assert torch.equal(p, model.state_dict()[name]), name
        [tokens] = generate_ids(narrow, [[72, 105]], max_new_tokens=6, temperature=0)
        assert len(tokens) == 6
    tensors = {name: t.clone() for name, t in model.state_dict().items()}
    adopted = model_from_tensors(model.config, tensors, torch.device("cpu"), torch.bfloat16, "m")
    assert all(p.data_ptr() == tensors[name].data_ptr() for name, p in adopted.state_dict().items())


def test_hugging_face_directory(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, tokenizer, _ = load_model(tmp_path / "hf", device="cpu")
    assert model.config.hf_model_type == "llama" and tokenizer is None
    ids = torch.randint(0, 128, (1, 6))
    torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_gguf_file_generates_a_story(tmp_path, shared_data):
    path = tmp_path / "stories260K.gguf"
    path.write_bytes(gzip.open(shared_data / "models" / "stories260K" / "stories260K.gguf.gz").read())
    model, tokenizer, device = load_model(path, device="cpu")
    text = generate(model, tokenizer, device, "", max_new_tokens=18, temperature=0)
    assert text == "Once upon a time, there was a little girl named Lily. She loved"


def test_bad_paths(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(OrionError, match="is a file but not a .gguf file"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(OrionError, match="config.json is missing"):
        load_model(tmp_path)
    with pytest.raises(OrionError, match="not a local path, and not a Hub id"):
        load_model("./no/such/dir")


def test_a_relative_path_that_does_not_exist_says_not_found_locally_first(tmp_path):
    """runs/stories (a run not trained yet, a typo) has the form of a Hub id too: offline, one line says both."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "orionlm", "generate", "hi", "--model", "runs/stories"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("orionlm: error: runs/stories: not found locally, and as a Hub id it could not be "
                                    "downloaded (offline mode is on): ")  # fmt: skip
    assert result.stderr.rstrip().endswith("Check the path, or the id and your connection")
    assert len(result.stderr.splitlines()) == 1


def test_a_run_directory_without_checkpoints_is_its_final_model(tmp_path):
    """A finished run whose checkpoints were deleted to save space still loads: RUN/model stands for it."""
    run = tmp_path / "run"
    save_checkpoint(OrionLM(preset("tiny-dense")), run / "model")
    assert resolve_model_path(run) == run / "model"
    (run / "checkpoints").mkdir()
    assert resolve_model_path(run) == run / "model"
    assert load_model(run, device="cpu")[0].config == preset("tiny-dense")
    (run / "model").rename(tmp_path / "elsewhere")
    with pytest.raises(OrionError, match="a training run without a complete checkpoint yet"):
        resolve_model_path(run)
