import errno
import importlib.util
import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from orionlm import OrionLM, load_model
from orionlm.config import preset
from orionlm.data.chat import IGNORE
from orionlm.errors import OrionError
from orionlm.tokenizer import Tokenizer
from orionlm.train.distributed import Dist
from orionlm.train.metrics import MetricsLog, flops_per_token, throughput
from orionlm.train.recipe import RecipeError, load_recipe
from orionlm.train.run_tokenizer import TRAINED_FOR, prepare_tokenizer
from orionlm.train.trainer import STATE_FILE, STATE_JSON, Trainer, find_checkpoints, train

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")  # a few small real text files on every machine


def write_recipe(tmp_path: Path, **sections) -> Path:
    import yaml

    recipe = {
        "model": {"preset": "tiny-dense", "overrides": {"max_seq_len": 64}},
        "data": {"sources": [{"path": STDLIB_JSON, "glob": "*.py"}], "seq_len": 32, "val_fraction": 0.1,
                 "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "run": {"out_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 4, "log_every": 1,
                "eval_every": 3, "eval_batches": 2, "save_every_steps": 3, "keep_last": 0, "progress": False,
                "plot": False, "tensorboard": False},
    }  # fmt: skip
    for section, values in sections.items():
        recipe[section].update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_unknown_keys_and_overrides(tmp_path):
    path = write_recipe(tmp_path)
    with pytest.raises(RecipeError, match=r"unknown key in recipe.optim: 'lrr' \(did you mean 'lr'\?\)"):
        load_recipe(path, ["optim.lrr=1"])
    with pytest.raises(RecipeError, match=r"unknown key in recipe.run: 'max_step' \(did you mean 'max_steps'\?\)"):
        load_recipe(path, ["run.max_step=3"])
    with pytest.raises(RecipeError, match="recipe.run.batch_size must be int, got 'big'"):
        load_recipe(path, ["run.batch_size=big"])
    with pytest.raises(RecipeError, match=r"model: .*did you mean 'hidden_size'"):
        load_recipe(path, ["model.overrides.hiden_size=32"])
    recipe = load_recipe(
        path, ["data.sources.0.weight=2.5", "optim.betas=[0.8, 0.9]", "run.max_steps=9", "--optim.lr=1e-3"]
    )
    assert recipe.data.sources[0].weight == 2.5 and recipe.optim.betas == (0.8, 0.9) and recipe.run.max_steps == 9
    assert recipe.optim.lr == 1e-3


def test_yaml_reads_exponents_without_a_dot_as_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads `lr: 1e-3` as the string '1e-3'; recipes read it as the number a user means
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("lr: 0.003", "lr: 1e-3").replace("max_steps: 6", "max_steps: 6e0"))
    with pytest.raises(RecipeError, match="recipe.run.max_steps must be int, got 6.0"):
        load_recipe(path)
    recipe = load_recipe(path, ["run.max_steps=6", "optim.weight_decay=2E-1", "data.sources.0.glob=1e"])
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.data.sources[0].glob) == (1e-3, 0.2, "1e")


def test_training_learns_checkpoints_and_logs(tmp_path):
    run_dir = train(load_recipe(write_recipe(tmp_path)))
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in records] == [128 * s for s in range(1, 7)]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # byte-level text: ln(260) = 5.56 at the start
    assert "val_loss" in records[2] and "val_loss" in records[5] and "val_loss" not in records[0]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in records)
    found = find_checkpoints(run_dir)
    assert [(step, path.name) for step, path in found] == [(3, "384"), (6, "768")]
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "run.json").is_file()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["peak_lr"] == 3e-3 and 0 < info["unigram_entropy"] < math.log(260)
    # RUN/model: the final checkpoint's model, without the training state
    final = run_dir / "model"
    assert sorted(p.name for p in final.iterdir()) == sorted(
        p.name for p in found[-1][1].iterdir() if p.name not in (STATE_FILE, STATE_JSON)
    )
    assert (final / "model.safetensors").read_bytes() == (found[-1][1] / "model.safetensors").read_bytes()
    # the weights are linked, not stored twice; the small files are copies, to edit without touching the checkpoint
    inode = {
        name: [(d / name).stat().st_ino for d in (final, found[-1][1])] for name in ("model.safetensors", "config.json")
    }
    assert inode["model.safetensors"][0] == inode["model.safetensors"][1] and len(set(inode["config.json"])) == 2
    # Every checkpoint is a model directory, holding the trained weights: it predicts the corpus
    # better than the initial weights do.
    model, tokenizer, _ = load_model(found[-1][1], device="cpu")
    ids = torch.tensor([tokenizer.encode((Path(STDLIB_JSON) / "decoder.py").read_text()[:2000])])

    def loss(m) -> float:
        return torch.nn.functional.cross_entropy(m(ids).logits[0, :-1], ids[0, 1:]).item()

    initial = OrionLM(model.config)
    initial.reset_parameters(seed=0)
    assert loss(model) < loss(initial) - 0.3


BALANCED = {"router_bias_update_rate": 0.01, "router_aux_loss_global": True, "router_aux_loss_per_layer": True}


@pytest.mark.parametrize(
    "preset, optim, overrides",
    [
        ("tiny-dense", "adamw", {}),
        ("tiny-moe", "muon", {}),
        ("tiny-chimera", "muon", {}),
        ("tiny-moe", "adamw", BALANCED),
    ],
)
def test_resume_is_bit_identical(tmp_path, preset, optim, overrides):
    """A run interrupted after its step-3 checkpoint and resumed gives exactly the uninterrupted losses (with expert
    balancing: the routing biases are in the checkpoint, the load counts start anew each step)."""
    sections = dict(
        model={"preset": preset, "overrides": {"max_seq_len": 64} | overrides}, optim={"name": optim, "lr": 3e-3}
    )
    if overrides:
        sections["run"] = {"grad_accum": 2, "batch_size": 2}
    full = train(load_recipe(write_recipe(tmp_path / "a", **sections)))
    interrupted = train(load_recipe(write_recipe(tmp_path / "b", **sections)))
    # Forget everything after step 3, as if the process had been killed just after that checkpoint.
    for step, path in find_checkpoints(interrupted):
        if step > 3:
            shutil.rmtree(path)
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    # step 4 was logged, not saved, and the process died while writing step 5's record
    (interrupted / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    train(load_recipe(write_recipe(tmp_path / "b", **sections), ["--resume"]))
    expected = [(r["step"], r["loss"], r.get("val_loss")) for r in metrics(full)]
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in metrics(interrupted)] == expected


def test_a_cut_short_last_metrics_line_is_dropped(tmp_path):
    # (a corrupt line before the last is refused: tests/test_bad_files.py)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "l')
    MetricsLog(tmp_path, resume_step=2, tensorboard=False)  # the cut-short last line is a killed write
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_moe_logs_router_stats_and_plots(tmp_path):
    recipe = write_recipe(tmp_path, model={"preset": "tiny-moe"}, run={"plot": True, "max_steps": 4})
    run_dir = train(load_recipe(recipe))
    record = metrics(run_dir)[-1]
    fractions = torch.tensor(record["expert_fractions"])
    assert fractions.shape == (2, 4)
    torch.testing.assert_close(fractions.sum(-1), torch.ones(2), atol=1e-4, rtol=0)
    assert record["aux_loss"] >= 1.0  # E * sum f_e P_e is at least 1 for top-k routing... and k at balance
    for chart in ("loss.png", "lr.png", "expert_load.png"):
        assert (run_dir / chart).stat().st_size > 10_000


def test_killed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, run={"max_steps": 6, "save_every_steps": 3}))
    calls = {"n": 0}
    real_save = torch.save

    def dies_on_second_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is stopped in the middle of writing checkpoint 2
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["384"]
    assert json.loads((checkpoints / "384" / STATE_JSON).read_text())["step"] == 3
    monkeypatch.setattr(torch, "save", real_save)
    train(load_recipe(write_recipe(tmp_path, run={"max_steps": 6, "save_every_steps": 3}), ["--resume"]))
    assert [p.name for p in checkpoints.iterdir()] == sorted(["384", "768"]) or sorted(
        p.name for p in checkpoints.iterdir()
    ) == ["384", "768"]


@pytest.mark.parametrize("failure", ["ENOSPC", "torch's RuntimeError on a full disk"])
def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, failure):
    def no_space(*args, **kwargs):
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OrionError, match=r"the disk is full: .*checkpoints.384 was not written"):
        train(load_recipe(write_recipe(tmp_path, run={"max_steps": 3, "save_every_steps": 3})))
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_grad_accumulation_and_activation_checkpointing_change_nothing(tmp_path):
    """Two micro-batches of 2 (with recomputed activations) train exactly like one batch of 4. (A dense
    model: MoE's load-balancing loss is computed per micro-batch, which is not linear in the batch.)"""
    base = dict(run={"max_steps": 3, "save_every_steps": 0})
    reference = train(load_recipe(write_recipe(tmp_path / "a", **base), ["--run.batch_size=4"]))
    other = write_recipe(tmp_path / "b", **base)
    accumulated = train(
        load_recipe(other, ["--run.batch_size=2", "--run.grad_accum=2", "--run.activation_checkpointing=true"])
    )
    assert [r["loss"] for r in metrics(accumulated)] == pytest.approx([r["loss"] for r in metrics(reference)], abs=1e-5)


def test_micro_batches_weigh_by_their_share_of_the_targets(tmp_path):
    """Micro-batches of 3 and 9 targets weigh 0.5 and 1.5: their accumulated gradient is that of one batch's
    mean over all 12 targets, not the mean of the two means."""
    trainer = Trainer(load_recipe(write_recipe(tmp_path, run={"batch_size": 1, "grad_accum": 2})))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(ids, -1, dims=1)
    targets[0, 3:] = IGNORE
    targets[1, 9:] = IGNORE
    micro_batches = [{"input_ids": ids[i : i + 1], "targets": targets[i : i + 1]} for i in range(2)]
    weights = trainer.target_weights(micro_batches)
    assert weights.tolist() == [0.5, 1.5]

    def gradients(weights) -> list[torch.Tensor]:
        trainer.model.zero_grad()
        for i, batch in enumerate(micro_batches):
            trainer.forward_backward(batch, weights[i], sync=i == 1)
        return [p.grad.clone() for p in trainer.model.parameters()]

    accumulated, mean_of_means = gradients(weights), gradients(torch.ones(2))
    trainer.model.zero_grad()
    trainer.model(ids, targets=targets).loss.backward()
    whole = [p.grad for p in trainer.model.parameters()]
    for a, b in zip(accumulated, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(mean_of_means, whole, strict=True)) > 1e-3
    trainer.close()


def test_mfu_counts_six_flops_per_matmul_parameter_plus_attention():
    config = preset("tiny-dense")
    matmul_parameters = sum(p.numel() for p in OrionLM(config).parameters()) - config.vocab_size * config.hidden_size
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * 64  # QK^T and AV, forward + backward
    assert flops_per_token(config, seq_len=64) == 6 * matmul_parameters + attention
    assert throughput(1000, flops=6e9, seconds=2.0, peak_flops=1e10) == {"tokens_per_s": 500.0, "mfu": 0.3}


def test_token_named_checkpoints_and_keep_last(tmp_path):
    recipe = write_recipe(
        tmp_path, run={"max_steps": 8, "save_every_steps": 0, "save_every_tokens": 300, "keep_last": 2}
    )
    run_dir = train(load_recipe(recipe))
    # 128 tokens per step: the 300-token marks are crossed at steps 3, 5, 8 (384, 640, 1024 tokens); the
    # final step saves anyway; the two newest are kept.
    assert [path.name for _, path in find_checkpoints(run_dir)] == ["640", "1.024K"]


def test_a_run_directorys_tokenizer_is_reused_only_for_the_size_it_was_trained_for(tmp_path, monkeypatch):
    """A run that stopped before its first record left its tokenizer: the same recipe reuses it (BPE on 3 KB stops
    short of 1000 tokens, so the size asked is what counts); another size, or a tokenizer no run trained, is refused."""
    path = write_recipe(tmp_path, data={"sources": [{"path": STDLIB_JSON, "glob": "tool.py"}]})
    recipe = load_recipe(path, ["tokenizer.train_vocab_size=1000"])
    out, d = tmp_path / "run", Dist(0, 1, torch.device("cpu"))
    trained = prepare_tokenizer(recipe, out, d, None, None)
    assert 256 < trained.vocab_size < 1000 and (out / "tokenizer" / TRAINED_FOR).is_file()
    monkeypatch.setattr(Tokenizer, "train_bpe_from_texts", None)  # a second training would fail
    assert prepare_tokenizer(recipe, out, d, None, None).vocab_size == trained.vocab_size
    other = load_recipe(path, ["tokenizer.train_vocab_size=2000"])
    message = rf"holds a {trained.vocab_size}-token tokenizer trained for train_vocab_size 1000, the recipe asks for "
    with pytest.raises(RecipeError, match=message + "tokenizer.train_vocab_size 2000: delete"):
        prepare_tokenizer(other, out, d, None, None)
    (out / "tokenizer" / TRAINED_FOR).unlink()
    with pytest.raises(RecipeError, match="tokenizer that no run trained"):
        prepare_tokenizer(recipe, out, d, None, None)


def test_a_rerun_replaces_the_final_model_and_says_what_it_resumed(tmp_path, capsys):
    path = write_recipe(tmp_path, run={"max_steps": 3, "save_every_steps": 3, "eval_every": 0})
    run_dir = train(load_recipe(path))
    assert f"wrote {run_dir / 'model'} (the final model)" in capsys.readouterr().out
    step_3 = (run_dir / "model" / "model.safetensors").read_bytes()
    train(load_recipe(path, ["--resume", "--run.max_steps=5"]))
    resumed = f"resuming from {run_dir / 'checkpoints' / '384'} (step 3, 384 tokens); running to step 5"
    assert f"{resumed} (the checkpoint's run was to step 3)\n" in capsys.readouterr().out
    final = (run_dir / "model" / "model.safetensors").read_bytes()
    assert final != step_3 and final == (run_dir / "checkpoints" / "640" / "model.safetensors").read_bytes()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no temporary left
    train(load_recipe(path, ["--resume", "--run.max_steps=5"]))  # nothing left to do: said so
    done = "(step 5, 640 tokens); its 5 steps are done: raise run.max_steps (or max_tokens, max_epochs) to go on"
    assert done in capsys.readouterr().out
    assert (run_dir / "model" / "model.safetensors").read_bytes() == final


def test_a_length_or_warmup_on_the_command_line_replaces_the_recipes(tmp_path):
    path = write_recipe(tmp_path, run={"max_steps": None, "max_epochs": 1})

    def lengths(*overrides: str) -> tuple:
        run = load_recipe(path, overrides).run
        return run.max_steps, run.max_tokens, run.max_epochs

    assert lengths() == (None, None, 1.0)
    assert lengths("--run.max_steps=20") == (20, None, None)
    assert lengths("--run.max_tokens=5000") == (None, 5000, None)
    assert lengths("--run.max_steps=20", "--run.max_epochs=null") == (20, None, None)  # the old way still works
    schedule = load_recipe(path, ["--schedule.warmup_fraction=0.1"]).schedule
    assert (schedule.warmup_steps, schedule.warmup_fraction) == (None, 0.1)
    with pytest.raises(RecipeError, match="give exactly one of max_steps, max_tokens or max_epochs"):
        train(load_recipe(path, ["--run.max_steps=20", "--run.max_tokens=5000"]))
    # A shipped recipe made short: its length in epochs gives way, and its warm-up fits.
    for name in ("sft-lora", "tinyshakespeare-moe", "tinystories-chimera", "gsm8k-base"):
        recipe = load_recipe(f"recipe:{name}", ["--run.max_steps=20"])
        assert (recipe.run.max_steps, recipe.run.max_epochs, recipe.run.max_tokens) == (20, None, None)
        assert recipe.schedule.warmup_warning(20) is None and recipe.schedule.phases(20)[0] == 1


def test_a_short_run_says_once_that_its_warmup_was_cut_and_that_tensorboard_is_off(tmp_path, capsys):
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    path = write_recipe(tmp_path, run={"max_steps": 4, "tensorboard": True, "save_every_steps": 0})
    run_dir = train(load_recipe(path, ["--schedule.warmup_steps=30"]))
    err = capsys.readouterr().err
    assert err.count("warning: the warm-up (30 steps) does not fit a 4-step run: warming up over 3 steps") == 1
    assert err.count("TensorBoard logging (run.tensorboard) needs tensorboard") == (0 if tensorboard else 1)
    if not tensorboard:
        assert "pip install 'orionlm[tensorboard]'; logging to metrics.jsonl only" in err
    assert [r["lr"] for r in metrics(run_dir)] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-4])  # 1/3, 2/3, 1, the floor


def test_windows_longer_than_the_models_context_are_refused(tmp_path):
    path = write_recipe(tmp_path)
    message = (r"data.seq_len \(128\) is longer than the model's context \(max_seq_len 64\): lower data.seq_len to "
               r"64, or lengthen the context with --model.overrides.max_seq_len=128")  # fmt: skip
    with pytest.raises(RecipeError, match=message):
        train(load_recipe(path, ["--data.seq_len=128"]))
    assert not (tmp_path / "run").exists()  # a refused run writes nothing
    trainer = Trainer(load_recipe(path, ["--data.seq_len=128", "--model.overrides.max_seq_len=128"]))
    assert trainer.config.max_seq_len == 128
    trainer.close()
