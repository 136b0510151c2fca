import gzip

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orionlm import OrionError, generate, load_model
from orionlm.checkpoint import save_checkpoint
from orionlm.config import preset
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer


def test_orionlm_directory_with_generation_defaults(tmp_path):
    save_checkpoint(OrionLM(preset("tiny-dense")), tmp_path / "m", Tokenizer.byte_level(), {"temperature": 0.3})
    model, tokenizer, device = load_model(tmp_path / "m", device="cpu")
    assert device == torch.device("cpu") and model.dtype == torch.float32
    assert model.generation_defaults["temperature"] == 0.3
    assert tokenizer.eos_id == 256


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
