"""Three tiny dense models that the merge tests combine, each as an orionlm and a Hugging Face directory."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from orionlm.checkpoint import save_checkpoint
from orionlm.config import preset
from orionlm.convert.hf import save_hf
from orionlm.merge.sources import MergedModel
from orionlm.model import OrionLM
from orionlm.tokenizer import EOS, PAD, Tokenizer

NAMES = ("base", "code", "numbers")


def tokenizer() -> Tokenizer:
    """Byte-level, with a BOS token (mergekit puts BOS before every router prompt)."""
    return Tokenizer(Tokenizer.byte_level().backend, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def dense(seed: int, **overrides) -> OrionLM:
    torch.manual_seed(seed)
    model = OrionLM(dataclasses.replace(preset("tiny-dense"), hf_model_type="llama", **overrides)).eval()
    with torch.no_grad():  # norms away from 1, so a norm taken from the wrong model would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return model


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """{name: orionlm directory}; the Hugging Face (llama) copy of each is beside it as NAME-hf."""
    root = tmp_path_factory.mktemp("sources")
    paths = {}
    for seed, name in enumerate(NAMES):
        model = dense(seed)
        paths[name] = save_checkpoint(model, root / name, tokenizer())
        save_hf(model, tokenizer(), root / f"{name}-hf")
    return paths


def built(merged: MergedModel) -> tuple[OrionLM, Tokenizer | None]:
    """A merge's result as a model (every tensor computed) and its tokenizer."""
    return merged.load(), merged.tokenizer


def cli_error(*args: str) -> list[str]:
    """The stderr lines of `orionlm ARGS` run as a real process, which must exit with status 2."""
    run = subprocess.run([sys.executable, "-m", "orionlm", *args], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    return run.stderr.strip().splitlines()
