"""Auron checkpoints through `orionlm convert`: to-auron and from-auron stream tensor by tensor into shards,
and the round trip gives the model back tensor for tensor, with Auron's sampling defaults."""

import json

import torch

from orionlm.checkpoint import LazyTensors, load_checkpoint, save_checkpoint
from orionlm.cli import main
from orionlm.config import AURON_GENERATION, preset
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

SMALL_SHARDS = str(20_000 / 1024**3)  # --shard-gb of about 20 KB: the tiny model takes several shards


def test_round_trip_through_shards(tmp_path):
    torch.manual_seed(0)
    model = OrionLM(preset("tiny-chimera")).eval()
    with torch.no_grad():  # the residual scalars start at 0 and 1; moved, a swapped pair would show
        for p in model.parameters():
            if p.dim() < 2:
                p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(model, tmp_path / "ours", Tokenizer.byte_level())
    (tmp_path / "ours" / "generation_config.json").unlink()
    main(["convert", "to-auron", str(tmp_path / "ours"), str(tmp_path / "auron"), "--shard-gb", SMALL_SHARDS])
    index = json.loads((tmp_path / "auron" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "bottom_blocks.0.gdn.q_conv1d.weight" in index["weight_map"] and "embed.weight" in index["weight_map"]
    # the source has no sampling defaults of its own, so Auron's are written
    assert json.loads((tmp_path / "auron" / "generation_config.json").read_text()) == AURON_GENERATION
    main(["convert", "from-auron", str(tmp_path / "auron"), str(tmp_path / "back"), "--shard-gb", SMALL_SHARDS])
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 2
    back, _ = load_checkpoint(tmp_path / "back", device="cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    ours, again = LazyTensors.from_directory(tmp_path / "ours"), LazyTensors.from_directory(tmp_path / "back")
    assert again.specs == ours.specs
