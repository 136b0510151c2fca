import dataclasses
import os
import sysconfig
from pathlib import Path

import pytest
import torch

from orionlm.checkpoint import save_checkpoint
from orionlm.config import preset
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests run on 2 cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared test data is absent ({SHARED_DATA}); it only exists beside the project checkout")
    return SHARED_DATA


@pytest.fixture
def thinking_model():
    """Builds tiny thinking models from a preset name: vocabulary 64, <|startthought|> 60, <|endthought|> 61,
    meta embeddings unlike any other token and a mixing head that mixes."""

    def build(name: str) -> OrionLM:
        torch.manual_seed(0)
        config = dataclasses.replace(preset(name), vocab_size=64, thought_start_id=60, thought_end_id=61)
        model = OrionLM(config).eval()
        with torch.no_grad():
            model.thinking.meta_embeddings.normal_(std=0.02)
            model.thinking.mixing_head[-1].weight.normal_(std=0.1)
        return model

    return build


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory) -> Path:
    """A tiny dense model with a BPE tokenizer trained on the standard library's json package, for servers."""
    texts = [p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))]
    tokenizer = Tokenizer.train_bpe_from_texts(texts, vocab_size=400)
    config = preset("tiny-dense", vocab_size=tokenizer.vocab_size, max_seq_len=2048, initializer_range=0.1)
    model = OrionLM(config)
    model.reset_parameters(seed=0)
    path = tmp_path_factory.mktemp("serve") / "model"
    save_checkpoint(model, path, tokenizer, generation_config={})  # no defaults: OpenAI's apply
    return path
