"""Real torchrun processes (gloo on CPU): DDP and FSDP2 against one process with the same global batch."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from orionlm import load_model
from orionlm.checkpoint import read_safetensors
from orionlm.config import preset
from orionlm.model import OrionLM
from orionlm.train.distributed import load_full_state
from orionlm.train.optim import OptimConfig, build_optimizer

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


def test_dpo_in_two_processes_matches_one(tmp_path):
    """DPO with LoRA under DDP: packed rows hold different numbers of pairs on each process, and the step must
    still be the mean over all pairs of the global batch (loss and rewards), as in one process."""
    from safetensors.torch import load_file

    from .test_dpo import LORA, make_base
    from .test_dpo import write_recipe as write_dpo_recipe

    base = make_base(tmp_path / "base", "tiny-dense")
    lora = LORA | {"target_parameters": []}
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):
        recipe = write_dpo_recipe(tmp_path / str(processes), base, lora=lora, run={"max_steps": 3, "batch_size": batch})
        orionlm_train(recipe, processes=processes)
        runs[processes] = tmp_path / str(processes) / "run"
    logged = {
        p: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for p, run in runs.items()
    }
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
    steps = {p: [r for r in records if r["step"] > 0] for p, records in logged.items()}
    assert len(steps[2]) == len(steps[1]) == 3
    for a, b in zip(steps[1], steps[2], strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert steps[1][-1]["rewards/margin"] != 0  # the adapters moved
    adapters = [load_file(run / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors") for run in runs.values()]
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_expert_balance_counts_the_tokens_of_every_process(tmp_path):
    """Global-batch balancing and the routing bias under DDP: each process's balance loss takes f_e from the counts
    of both (all-reduced), and so does each step's bias update, so two processes of 2 rows train as one of 4."""
    overrides = {"max_seq_len": 64, "router_bias_update_rate": 0.01, "router_aux_loss_global": True}
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):
        run = {"max_steps": 4, "batch_size": batch, "save_every_steps": 0}
        orionlm_train(write_recipe(tmp_path / str(processes), model={"preset": "tiny-moe", "overrides": overrides},
                                   run=run), processes=processes)  # fmt: skip
        runs[processes] = tmp_path / str(processes) / "run"
    assert losses(runs[2]) == pytest.approx(losses(runs[1]), abs=1e-5)
    ours, _, _ = load_model(runs[2] / "model", device="cpu")
    reference, _, _ = load_model(runs[1] / "model", device="cpu")
    bias = reference.model.layers[0].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_fsdp_trains_and_resumes_looped_chimera_as_one_process(tmp_path):
    """FSDP2 shards a Chimera with residual lambdas (fully_shard refuses 0-dim parameters, so they are (1,)) and
    shared top blocks run twice per forward: two processes train as one does, the checkpoint keeps the lambdas
    0-dim as Auron's layout has them, and resuming the sharded run from its first checkpoint repeats the rest
    exactly."""
    config = preset("tiny-chimera")
    assert config.resid_lambdas and config.loops > 1
    model = {"preset": "tiny-chimera", "overrides": {"max_seq_len": 64}}
    run = {"max_steps": 4, "save_every_steps": 2}
    orionlm_train(write_recipe(tmp_path / "one", model=model, run=run | {"batch_size": 4}))
    recipe = write_recipe(tmp_path / "two", model=model, run=run | {"batch_size": 2})
    orionlm_train(recipe, "--run.fsdp=true", processes=2)
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    assert len(losses(two)) == 4
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    last = two / "checkpoints" / "512"
    tensors = read_safetensors(last)
    assert tensors["model.layers.3.attn_lambda"].shape == ()
    ours, _, _ = load_model(last, device="cpu")
    reference, _, _ = load_model(one / "checkpoints" / "512", device="cpu")
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

    uninterrupted = losses(two)
    orionlm_train(recipe, "--run.fsdp=true", f"--run.resume={two / 'checkpoints' / '256'}", processes=2)
    assert losses(two) == uninterrupted
    for name, tensor in read_safetensors(last).items():
        assert torch.equal(tensor, tensors[name]), name


@pytest.mark.parametrize("optim", ["muon", "adamw"])
def test_run_saved_with_0_dim_lambda_moments_resumes(optim):
    """Runs saved while Chimera's lambdas were 0-dim parameters hold their AdamW moments 0-dim: they load shaped
    as the (1,) parameters, and the next step is the one the saving run takes. (Fused AdamW, which Muon's
    CombinedOptimizer uses on CPU, would run on them as they are; multi-tensor AdamW, which other devices and
    sharded parameters take, could not.)"""
    torch.manual_seed(0)
    model = OrionLM(preset("tiny-chimera"))
    resumed = copy.deepcopy(model)
    optimizers = [
        build_optimizer(m, OptimConfig(name="muon", lr=1e-2))
        if optim == "muon"
        else torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True)
        for m in (model, resumed)
    ]
    tokens = torch.randint(0, 512, (2, 17))

    def step(m, optimizer):
        m(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(model, optimizers[0])
    saved = copy.deepcopy(optimizers[0].state_dict())
    old = [(state, key) for inner in saved.get("optimizers", [saved]) for state in inner["state"].values()
           for key in ("exp_avg", "exp_avg_sq") if key in state and state[key].shape == (1,)]  # fmt: skip
    assert len(old) == 2 * 8  # two moments of each block's two lambdas
    for state, key in old:
        state[key] = state[key].reshape(())
    load_full_state(resumed, optimizers[1], model.state_dict(), saved, fsdp=False)
    step(model, optimizers[0])
    step(resumed, optimizers[1])
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    lambdas = [p for name, p in resumed.named_parameters() if name.endswith("_lambda")]
    states = [inner.state[p] for inner in getattr(optimizers[1], "optimizers", [optimizers[1]]) for p in lambdas
              if p in inner.state]  # fmt: skip
    assert len(states) == 8 and all(s["exp_avg"].shape == s["exp_avg_sq"].shape == (1,) for s in states)
