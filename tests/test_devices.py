"""A device this machine cannot compute on is one line and exit 2 for every verb that takes one (one check,
checkpoint.check_device, behind resolve_device), never torch's "Torch not compiled with CUDA enabled" later on."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from orionlm.checkpoint import check_device, save_checkpoint
from orionlm.cli import main
from orionlm.config import preset
from orionlm.errors import OrionError
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

# A CUDA device this machine lacks: any on a CPU-only one, the one past the last on a machine with CUDA.
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
if torch.version.cuda is None and torch.version.hip is None:
    WHY = f"this torch has no CUDA (torch {torch.__version__})"
elif torch.cuda.is_available():
    WHY = f"this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
else:
    WHY = f"no CUDA device is visible (torch {torch.__version__}; check the driver and CUDA_VISIBLE_DEVICES)"

VERBS = {
    "generate": ["generate", "hi", "--model", "{m}"],
    "chat": ["chat", "--model", "{m}"],
    "bench": ["bench", "{m}"],
    "serve": ["serve", "{m}"],
    "eval": ["eval", "{m}", "--tasks", "wikitext"],
    "leakage": ["leakage", "{m}", "{m}/config.json"],
    "quantize": ["quantize", "{m}", "{m}-rtn", "--method", "rtn"],
    "lm-eval": ["lm-eval", "--model", "orionlm", "--model_args", "pretrained={m}"],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("devices") / "m"
    save_checkpoint(OrionLM(preset("tiny-dense", vocab_size=320)), path, Tokenizer.byte_level())
    return path


def _error(args: list[str], capsys) -> str:
    """The one stderr line of `orionlm ARGS`, which must exit with status 2."""
    with pytest.raises(SystemExit) as info:
        main(args)
    error = capsys.readouterr().err
    assert info.value.code == 2, error
    assert len(error.splitlines()) == 1, error
    return error


@pytest.mark.parametrize("verb", VERBS)
def test_a_cuda_device_this_machine_lacks_is_one_line(verb, model_dir, capsys):
    args = [a.format(m=model_dir) for a in VERBS[verb]]
    error = _error([*args, "--device", MISSING_CUDA], capsys)
    assert error == f"orionlm: error: --device {MISSING_CUDA}: {WHY}; use --device cpu\n"
    assert not Path(f"{model_dir}-rtn").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_mps_without_an_apple_gpu_is_one_line(model_dir, capsys):
    error = _error(["generate", "hi", "--model", str(model_dir), "--device", "mps"], capsys)
    why = "this torch has no MPS" if not torch.backends.mps.is_built() else "no Apple GPU (MPS) is available"
    assert error == f"orionlm: error: --device mps: {why} (torch {torch.__version__}); use --device cpu\n"


def test_a_device_torch_does_not_know_is_one_line(model_dir, capsys):
    error = _error(["generate", "hi", "--model", str(model_dir), "--device", "gpu"], capsys)
    assert error == "orionlm: error: --device gpu: not a device; use cpu, cuda, cuda:N or mps\n"


def test_a_recipe_asking_for_a_missing_device_is_one_line(tmp_path, capsys):
    recipe = {
        "model": {"preset": "tiny-dense"},
        "data": {"sources": [{"path": str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "scanner.py")}]},
        "run": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "device": MISSING_CUDA},
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    error = _error(["train", str(tmp_path / "recipe.yaml")], capsys)
    assert error == f"orionlm: error: run.device {MISSING_CUDA}: {WHY}; use run.device cpu\n"


def test_check_device_passes_what_exists():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu", 0)) == torch.device("cpu", 0)
    if torch.cuda.is_available():
        assert check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(OrionError, match="^run.device gpu: not a device"):
        check_device("gpu", "run.device")
