"""Fine-tuning through `orionlm train`: full (mode sft) and LoRA (mode lora) on chat rows, step-named
checkpoints, bit-identical resume, and merge-lora from the recipe the adapter was trained with."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from orionlm.checkpoint import save_checkpoint
from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.peft import load_adapter
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer
from orionlm.train.recipe import RecipeError, load_recipe
from orionlm.train.trainer import find_checkpoints, train

IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}  # fmt: skip


def make_base(root: Path, name: str, seed: int = 0) -> Path:
    """A small saved model to fine-tune, with chat data beside it."""
    tokenizer = Tokenizer.byte_level()
    model = OrionLM(preset(name, vocab_size=tokenizer.vocab_size, max_seq_len=128))
    model.reset_parameters(seed=seed)
    save_checkpoint(model, root / "model", tokenizer)
    (root / "chat.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(60)))
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"), "tiny-moe")


def write_recipe(tmp_path: Path, base: Path, mode: str, **sections) -> Path:
    recipe = {
        "mode": mode,
        "model": {"path": str(base / "model")},
        "data": {"sources": [{"path": str(base / "chat.jsonl")}], "seq_len": 96, "val_fraction": 0.1},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 1},
        "run": {"out_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 2, "log_every": 1,
                "eval_every": 3, "eval_batches": 2, "save_every_steps": 3, "keep_last": 0, "progress": False,
                "plot": False, "tensorboard": False},
    }  # fmt: skip
    for section, values in sections.items():
        recipe[section] = recipe.get(section, {}) | values if isinstance(values, dict) else values
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml"


def metrics(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_full_fine_tuning_writes_step_checkpoints(tmp_path, base):
    run_dir = train(load_recipe(write_recipe(tmp_path, base, "sft")))
    found = find_checkpoints(run_dir)
    assert [(step, path.name) for step, path in found] == [(3, "checkpoint-3"), (6, "checkpoint-6")]
    records = metrics(run_dir)
    assert records[0][:2] == (0, None)  # step 0: the base model's held-out assistant-token loss
    assert records[-1][2] < records[0][2] - 0.5
    tuned, _, _ = load_model(run_dir, device="cpu")  # a run directory loads its newest checkpoint
    original, _, _ = load_model(base / "model", device="cpu")
    assert not torch.allclose(logits(tuned), logits(original))
    final, _, _ = load_model(run_dir / "model", device="cpu")  # RUN/model: the final model
    torch.testing.assert_close(logits(final), logits(tuned), atol=0, rtol=0)


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}  # fmt: skip


def test_lora_trains_adapters_resumes_exactly_and_merges(tmp_path, base):
    full = train(load_recipe(write_recipe(tmp_path / "a", base, "lora", lora=LORA)))
    last = find_checkpoints(full)[-1][1]
    assert (last / "adapter_config.json").is_file() and (last / "adapter_model.safetensors").is_file()
    assert not list(last.glob("model*.safetensors"))  # the frozen base is not copied
    run = json.loads((full / "run.json").read_text())
    assert 0 < run["trainable_params"] < run["total_params"] / 10

    interrupted = train(load_recipe(write_recipe(tmp_path / "b", base, "lora", lora=LORA)))
    shutil.rmtree(find_checkpoints(interrupted)[-1][1])
    train(load_recipe(tmp_path / "b" / "recipe.yaml", ["--resume"]))
    assert metrics(interrupted) == metrics(full)
    resumed_last = find_checkpoints(interrupted)[-1][1]
    assert (resumed_last / "adapter_model.safetensors").read_bytes() == (
        last / "adapter_model.safetensors"
    ).read_bytes()

    adapted, _, _ = load_model(base / "model", device="cpu")
    load_adapter(adapted, last)
    expected = logits(adapted)
    # An adapter directory loads as its base (named in adapter_config.json) with the adapter on it; RUN/model is
    # the final adapter, with its tokenizer and recipe and without the training state.
    torch.testing.assert_close(logits(load_model(last, device="cpu")[0]), expected, atol=0, rtol=0)
    torch.testing.assert_close(logits(load_model(full / "model", device="cpu")[0]), expected, atol=0, rtol=0)
    names = {p.name for p in (full / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "tokenizer.json"} <= names
    assert names == {p.name for p in last.iterdir()} - {"trainer_state.pt", "trainer_state.json"}
    # The recipe saved beside the adapter is all merge-lora needs.
    main(["merge-lora", str(last / "recipe.yaml"), f"--lora_model_dir={last}", f"--output_dir={tmp_path / 'merged'}"])
    merged, _, _ = load_model(tmp_path / "merged", device="cpu")
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
    original, _, _ = load_model(base / "model", device="cpu")
    assert (logits(original) - expected).abs().max() > 1e-3


def test_merge_lora_folds_the_adapter_into_the_base_it_was_trained_on(tmp_path, capsys):
    """An adapter trained with --model.path=B on a recipe naming A merges onto B (its adapter_config.json names B):
    every adapted weight is B's plus scaling * lora_B @ lora_A, every other tensor B's own. A --base other than B
    is one line, and writes nothing."""
    a, b = make_base(tmp_path / "a", "tiny-dense", seed=0), make_base(tmp_path / "b", "tiny-dense", seed=1)
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    recipe = write_recipe(tmp_path / "r", a, "lora", lora=lora, run={"max_steps": 2, "save_every_steps": 0})
    last = find_checkpoints(train(load_recipe(recipe, [f"--model.path={b / 'model'}"])))[-1][1]
    capsys.readouterr()
    main(["merge-lora", str(recipe), f"--lora_model_dir={last}"])  # out: the run's out_dir/merged
    out, err = capsys.readouterr()
    merged_dir = tmp_path / "r" / "run" / "merged"
    assert out.startswith(f"wrote {merged_dir} ({b / 'model'} + {last}: rank 4")
    assert err == (f"note: adapter {last} was trained on {b / 'model'}, not on the recipe's model.path "
                   f"{a / 'model'}; merging onto {b / 'model'}\n")  # fmt: skip
    merged, base_b = load_file(merged_dir / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    factors = load_file(last / "adapter_model.safetensors")
    assert set(merged) == set(base_b)
    adapted = 0
    for name, weight in base_b.items():
        module = name.removesuffix(".weight")
        if module.endswith(("q_proj", "v_proj")):
            down, up = (factors[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
            assert up.abs().max() > 0  # trained: B left zero would hide the adapter
            torch.testing.assert_close(merged[name], weight + 8 / 4 * up @ down, atol=1e-6, rtol=0)
            adapted += 1
        else:
            assert torch.equal(merged[name], weight), name
    assert adapted == 2 * preset("tiny-dense").num_layers
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(load_file(a / "model" / "model.safetensors")[q_proj], base_b[q_proj])

    with pytest.raises(SystemExit) as refused:
        main(["merge-lora", "--base", str(a / "model"), "--adapter", str(last), "--out", str(tmp_path / "x")])
    assert refused.value.code == 2 and not (tmp_path / "x").exists()
    assert capsys.readouterr().err == (f"orionlm: error: adapter {last} was trained on {b / 'model'}, not on --base "
                                       f"{a / 'model'}: leave out --base to merge it onto {b / 'model'}\n")  # fmt: skip
    # The same base spelled another way, and a shipped recipe naming neither, merge onto B as well.
    main(["merge-lora", "--base", f"{b}/./model/", "--adapter", str(last), "--out", str(tmp_path / "same")])
    main(["merge-lora", "recipe:sft-lora", f"--lora_model_dir={last}", "--out", str(tmp_path / "shipped")])
    for other in ("same", "shipped"):
        assert load_file(tmp_path / other / "model.safetensors").keys() == merged.keys()
        assert all(torch.equal(t, merged[n]) for n, t in load_file(tmp_path / other / "model.safetensors").items())


def test_lora_on_a_quantized_base(tmp_path, base):
    """QLoRA: an adapter trained on a GPTQ model (codes frozen, adapters in float32); full fine-tuning refused."""
    quantized = tmp_path / "q"
    main(["quantize", str(base / "model"), str(quantized / "model"), "--method", "rtn", "--bits", "4",
          "--group-size", "32"])  # fmt: skip
    shutil.copy(base / "chat.jsonl", quantized / "chat.jsonl")
    with pytest.raises(RecipeError, match="is quantized: .* train a LoRA adapter on it"):
        train(load_recipe(write_recipe(tmp_path / "sft", quantized, "sft")))
    run_dir = train(load_recipe(write_recipe(tmp_path / "lora", quantized, "lora", lora=LORA, optim={"lr": 2e-2})))
    records = metrics(run_dir)
    assert records[-1][2] < records[0][2] - 0.3
    tuned, _, _ = load_model(run_dir, device="cpu")
    assert tuned.config.quantization_config["bits"] == 4
    assert (logits(tuned) - logits(load_model(quantized / "model", device="cpu")[0])).abs().max() > 1e-3


def test_accumulated_micro_batches_weigh_every_target_equally(tmp_path):
    """Chat rows hold different numbers of assistant tokens: two micro-batches of 2 rows must train like
    one batch of 4 (the mean over all targets), not like the mean of two means. (A dense model: MoE's
    load-balancing loss is computed per micro-batch, which is not linear in the batch.)"""
    base = make_base(tmp_path / "base", "tiny-dense")
    one = train(load_recipe(write_recipe(tmp_path / "a", base, "sft", run={"max_steps": 2, "batch_size": 4})))
    two = train(load_recipe(write_recipe(tmp_path / "b", base, "sft", run={"max_steps": 2, "grad_accum": 2})))
    for a, b in zip(metrics(one)[1:], metrics(two)[1:], strict=True):
        assert a[1] == pytest.approx(b[1], abs=1e-5)


def test_fine_tuning_recipe_errors(tmp_path, base):
    with pytest.raises(RecipeError, match=r"lora: adapters need a trained base: give model.path \(a model directory"):
        load_recipe(write_recipe(tmp_path, base, "lora"), ["--model.path=null", "--model.preset=tiny-dense"])
    with pytest.raises(RecipeError, match="did you mean 'lora'"):
        load_recipe(write_recipe(tmp_path, base, "lorra"))
    with pytest.raises(RecipeError, match="set optim.name=adamw"):
        load_recipe(write_recipe(tmp_path, base, "lora"), ["--optim.name=muon"])
    chimera = tmp_path / "chimera"
    save_checkpoint(OrionLM(preset("tiny-chimera", vocab_size=260)), chimera / "model", Tokenizer.byte_level())
    shutil.copy(base / "chat.jsonl", chimera / "chat.jsonl")
    recipe = load_recipe(write_recipe(tmp_path / "c", chimera, "sft"), ["--data.packing=true"])
    with pytest.raises(RecipeError, match="GDN layers carry state across packed conversations"):
        train(recipe)
    longer = rf"data.seq_len \(200\) is longer than {base / 'model'}'s context \(max_seq_len 128\): lower data.seq_len"
    with pytest.raises(RecipeError, match=longer + " to 128, or start from a model with a longer max_seq_len"):
        train(load_recipe(write_recipe(tmp_path / "d", base, "lora"), ["--data.seq_len=200"]))
