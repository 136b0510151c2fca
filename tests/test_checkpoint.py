import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orionlm.checkpoint import (
    CheckpointError,
    LazyTensors,
    TensorSpec,
    load_checkpoint,
    save_checkpoint,
    save_model,
    state_dict_for_saving,
    write_safetensors,
)
from orionlm.config import preset
from orionlm.errors import OrionError
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer


@pytest.fixture
def saved(tmp_path):
    model = OrionLM(preset("tiny-moe")).eval()
    return model, save_checkpoint(model, tmp_path / "model", Tokenizer.byte_level())


def test_round_trip_is_exact(saved):
    model, path = saved
    loaded, tokenizer = load_checkpoint(path, device="cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert tokenizer.encode("hello") == Tokenizer.byte_level().encode("hello")
    files = sorted(p.name for p in path.iterdir())
    assert files == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [256, 258]  # <|endoftext|>, <|im_end|>


def test_a_routing_bias_is_saved_and_used_after_loading(tmp_path):
    model = OrionLM(preset("tiny-moe", router_bias_update_rate=1e-3)).eval()
    bias = torch.tensor([0.5, 0.0, -0.5, 0.25])
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(bias)
    loaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "model"), device="cpu")
    assert loaded.config.router_score_bias and loaded.config.router_bias_update_rate == 1e-3
    assert torch.equal(loaded.model.layers[1].mlp.gate.e_score_correction_bias, bias)
    x = torch.randn(9, model.config.hidden_size)
    assert torch.equal(loaded.model.layers[1].mlp.route(x)[2], model.model.layers[1].mlp.route(x)[2])


def test_save_model_round_trips_with_load_model(saved, tmp_path):
    import orionlm

    assert orionlm.save_model is save_model
    _, path = saved
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 7, "eos_token_id": 0}))
    model, tokenizer, _ = load_model(path, device="cpu")
    assert save_model(model, tmp_path / "copy", tokenizer) == tmp_path / "copy"
    again, tokenizer_again, _ = load_model(tmp_path / "copy", device="cpu")
    assert again.config == model.config
    # the sampling defaults it was loaded with, not the preset's (the writer adds the tokenizer's pad id, and its
    # EOS and end-of-turn token to the stop ids)
    loaded, saved = dict(model.generation_defaults), dict(again.generation_defaults)
    assert saved.pop("eos_token_id") == [loaded.pop("eos_token_id"), tokenizer.eos_id, tokenizer.end_of_turn_id]
    assert loaded.items() <= saved.items()
    assert again.generation_defaults["top_k"] == 7
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert tokenizer_again.encode("hello") == tokenizer.encode("hello")
    save_model(again, tmp_path / "copy", generation_config={"temperature": 1.0})  # a model directory is replaced
    assert load_model(tmp_path / "copy", device="cpu")[0].generation_defaults == {"temperature": 1.0}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(OrionError, match="not a model directory, so it is never replaced"):
        save_model(model, tmp_path / "notes")
    with pytest.raises(OrionError, match="is a file"):
        save_model(model, tmp_path / "notes" / "todo.txt")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_sharded_save_has_an_index(tmp_path):
    model = OrionLM(preset("tiny-alibi")).eval()
    path = save_checkpoint(model, tmp_path / "m", max_shard_bytes=50_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((path / s).is_file() for s in shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    loaded, _ = load_checkpoint(path, device="cpu")
    ids = torch.randint(0, 512, (1, 5))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_failed_save_keeps_the_previous_directory(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("orionlm.checkpoint.write_safetensors", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["model"]  # no temporary left behind


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)


def test_truncated_safetensors_names_the_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        load_checkpoint(path)


def _rewrite(path, edit):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_shape_mismatch_names_the_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(3,\), config.json implies \(64,\)"):
        load_checkpoint(path)


def test_dtype_and_missing_and_extra_tensors(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype torch.int32"):
        load_checkpoint(path)
    _rewrite(path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is missing"):
        load_checkpoint(path)
    _rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(64), "extra": torch.ones(1)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra'"):
        load_checkpoint(path)


def test_unknown_config_key(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["num_expert"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="did you mean 'num_experts'"):
        load_checkpoint(path)


def test_lazy_tensors_give_specs_and_read_one_tensor(tmp_path):
    model = OrionLM(preset("tiny-alibi")).eval()
    path = save_checkpoint(model, tmp_path / "m", max_shard_bytes=50_000)
    lazy = LazyTensors.from_directory(path)
    state = state_dict_for_saving(model)
    assert sorted(lazy) == sorted(state) and len(lazy) == len(state)
    for name, tensor in state.items():
        assert lazy.specs[name] == TensorSpec(tuple(tensor.shape), torch.float32)
        assert torch.equal(lazy[name], tensor), name
    with pytest.raises(KeyError):
        lazy["model.missing.weight"]
    half = lazy.cast(torch.bfloat16)
    name = next(iter(state))
    assert half.specs[name].dtype == half[name].dtype == torch.bfloat16
    assert half.specs[name].nbytes == state[name].numel() * 2


def test_lazy_tensors_stream_into_shards(tmp_path):
    model = OrionLM(preset("tiny-alibi")).eval()
    source = save_checkpoint(model, tmp_path / "m")
    lazy = LazyTensors.from_directory(source).cast(torch.bfloat16)
    out = tmp_path / "out"
    out.mkdir()
    write_safetensors(lazy, out, max_shard_bytes=25_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(spec.nbytes for spec in lazy.specs.values())
    assert len(set(index["weight_map"].values())) == len(list(out.glob("*.safetensors"))) > 2
    written = LazyTensors.from_directory(out)
    assert written.specs == lazy.specs
    for name in lazy:
        assert torch.equal(written[name], lazy[name]), name
