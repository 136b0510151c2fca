"""Real torchrun processes (gloo on CPU): DDP and FSDP2 against one process with the same global batch."""

import json
import subprocess
import sys

import pytest
import torch

from orionlm import load_model

from .test_trainer import write_recipe


def losses(run_dir):
    return [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def orionlm_train(recipe, *args, processes=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "orionlm", "train", str(recipe), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    recipe = write_recipe(tmp, run={"max_steps": 4, "batch_size": 4, "save_every_steps": 0})
    orionlm_train(recipe)
    return tmp / "run"


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, fsdp):
    recipe = write_recipe(tmp_path, run={"max_steps": 4, "batch_size": 2, "save_every_steps": 0})
    result = orionlm_train(recipe, f"--run.fsdp={str(fsdp).lower()}", processes=2)
    assert result.stdout.count("2 process(es)") == 1  # rank 0 alone reports, logs and saves
    run_dir = tmp_path / "run"
    assert losses(run_dir) == pytest.approx(losses(single), abs=1e-5)
    assert len(losses(run_dir)) == 4
    [checkpoint] = (run_dir / "checkpoints").iterdir()
    ours, _, _ = load_model(checkpoint, device="cpu")
    reference, _, _ = load_model(next((single / "checkpoints").iterdir()), device="cpu")
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_lora_on_chat_rows_in_two_processes_matches_one(tmp_path):
    """Each process's rows hold different numbers of assistant tokens: the step must still be the mean
    over all targets of the global batch, as in one process."""
    from safetensors.torch import load_file

    from .test_finetune import make_base
    from .test_finetune import write_recipe as write_finetune_recipe

    base = make_base(tmp_path / "base", "tiny-dense")
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):
        recipe = write_finetune_recipe(
            tmp_path / str(processes), base, "lora", lora=lora, run={"max_steps": 3, "batch_size": batch}
        )
        orionlm_train(recipe, processes=processes)
        runs[processes] = tmp_path / str(processes) / "run"
    assert losses(runs[2])[1:] == pytest.approx(losses(runs[1])[1:], abs=1e-5)  # [0]: the starting val_loss
    adapters = [load_file(run / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors") for run in runs.values()]
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
