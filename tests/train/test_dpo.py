"""DPO (mode: dpo): the losses against hand-computed values, the reference as a frozen copy or as the model with its
adapters disabled, agreement with TRL's DPOTrainer on a tiny Hugging Face Llama (first-step loss and rewards, and a
few optimizer steps), and whole runs through the trainer that log the rewards and resume bit-identically."""

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from orionlm.checkpoint import save_checkpoint
from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.peft import load_adapter
from orionlm.data import DataConfig
from orionlm.data.chat import IGNORE
from orionlm.data.preference import build_preference_dataset, to_pair, tokenize_pair
from orionlm.errors import OrionError
from orionlm.loading import load_model
from orionlm.model import OrionLM
from orionlm.nn.lora import LoRAConfig, adapters_disabled, apply_lora
from orionlm.tokenizer import Tokenizer
from orionlm.train.dpo import DPO, DPOConfig, preference_loss, sequence_logps
from orionlm.train.plot import pyplot, run_figures
from orionlm.train.recipe import RecipeError, load_recipe
from orionlm.train.trainer import find_checkpoints, train

from .test_finetune import write_recipe as write_chat_recipe

TOK = Tokenizer.byte_level()


def pair(i: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"What is {i} plus {i}?" + " Please." * (i % 3)}],
            "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"It is {i}{i}, I think."}]}  # fmt: skip


def write_pairs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(n)))
    return path


# (2 pairs) summed log-probabilities of the model and the reference, and response token counts: pair 0's log-ratios
# are +1 (chosen) and -1 (rejected), pair 1's -0.5 and +1.5
LOGPS = torch.tensor([-10.0, -12.0, -20.0, -6.5])
REFERENCE = torch.tensor([-11.0, -11.0, -19.5, -8.0])
COUNTS = torch.tensor([2.0, 4.0, 1.0, 3.0])


@pytest.mark.parametrize(
    "settings, expected",
    [
        # -log sigmoid(0.1 * (1 - -1)) = log(1 + e^-0.2); pair 1: log(1 + e^0.2)
        (DPOConfig(beta=0.1), [0.5981388693815918, 0.7981388693815918]),
        # cDPO: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2), and the same with the margin's sign flipped
        (DPOConfig(beta=0.1, label_smoothing=0.1), [0.6181388693815918, 0.7781388693815918]),
        # IPO: per-token margin 1/2 - (-1/4) = 0.75, (0.75 - 1 / 0.2)^2; pair 1: -0.5 - 0.5 = -1, (-1 - 5)^2
        (DPOConfig(beta=0.1, loss_type="ipo"), [18.0625, 36.0]),
        (DPOConfig(beta=0.5, loss_type="ipo"), [0.0625, 4.0]),
    ],
)
def test_losses_by_hand(settings, expected):
    losses, chosen, rejected = preference_loss(LOGPS, REFERENCE, COUNTS, settings)
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-6, rtol=0)
    beta = settings.beta
    torch.testing.assert_close(chosen, torch.tensor([beta * 1.0, beta * -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([beta * -1.0, beta * 1.5]))


def test_sequence_logps_sum_each_sequence_over_its_targets():
    logits = torch.zeros(2, 5, 4)  # uniform: every token has log-probability -log 4
    logits[0, 1, 3] = math.log(3.0)  # position (0, 1): token 3 has probability 1/2, the others 1/6
    targets = torch.tensor([[1, 3, IGNORE, 2, 0], [IGNORE, 1, 1, 2, IGNORE]])
    sequence_ids = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 3, 3, -1]])
    sums, counts = sequence_logps(logits, targets, sequence_ids, 4)
    q = -math.log(4)
    torch.testing.assert_close(sums, torch.tensor([q + math.log(0.5), 2 * q, q, 2 * q]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 2.0, 1.0, 2.0]))


def test_settings_errors():
    with pytest.raises(OrionError, match="loss_type must be one of"):
        DPOConfig(loss_type="hinge")
    with pytest.raises(OrionError, match="smooths the sigmoid loss"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(OrionError, match=r"in \[0, 0.5\)"):
        DPOConfig(label_smoothing=0.5)


def batch_of(n: int, tmp_path: Path, packed: bool = True) -> dict[str, torch.Tensor]:
    """All n pairs in one batch."""
    config = DataConfig(sources=[str(write_pairs(tmp_path / "pairs.jsonl", n))], seq_len=512, val_fraction=0)
    dataset = build_preference_dataset(config, TOK, packed=packed, progress=False)
    return next(dataset.train_loader(batch_size=sum(dataset.train_windows)))


def test_lora_reference_is_the_base_model(tmp_path):
    """With adapters, the reference is the model with its adapters disabled: the same log-probabilities as a
    separate copy of the base model, the experts' and the router's adapters included."""
    model = OrionLM(preset("tiny-moe", vocab_size=TOK.vocab_size, initializer_range=0.1))
    model.reset_parameters(seed=0)
    base = OrionLM(model.config)
    base.load_state_dict(model.state_dict())
    config = LoRAConfig(r=2, target_modules=["q_proj", "gate"], target_parameters=["experts.gate_up_proj"])
    apply_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    batch = batch_of(3, tmp_path)
    model.eval(), base.eval()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "document_ids")}
    with torch.no_grad(), adapters_disabled(model):
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, atol=0, rtol=0)
    with torch.no_grad():
        assert (model(**inputs).logits - base(**inputs).logits).abs().max() > 1e-3  # the adapters are back
        adapted = DPO(model, DPOConfig(), reference=None)(**batch)
        copied = DPO(model, DPOConfig(), reference=base)(**batch)
    assert adapted.metrics["rewards/margin"].abs() > 1e-4
    torch.testing.assert_close(adapted.loss, copied.loss, atol=0, rtol=0)
    for key, value in adapted.metrics.items():
        torch.testing.assert_close(value, copied.metrics[key], atol=0, rtol=0)


def test_packed_and_padded_batches_give_the_same_loss(tmp_path):
    model = OrionLM(preset("tiny-dense", vocab_size=TOK.vocab_size, initializer_range=0.1))
    model.reset_parameters(seed=0)
    reference = OrionLM(model.config)
    reference.reset_parameters(seed=1)
    dpo = DPO(model, DPOConfig(), reference)
    assert model.training and not reference.training  # the reference copy stays in eval mode
    dpo.eval()
    with torch.no_grad():
        packed, padded = dpo(**batch_of(4, tmp_path)), dpo(**batch_of(4, tmp_path, packed=False))
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=0)
    for key, value in packed.metrics.items():
        torch.testing.assert_close(value, padded.metrics[key], atol=1e-5, rtol=0)


# --- agreement with TRL ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A tiny random Hugging Face Llama with the byte-level tokenizer and ChatML template, a second one with other
    weights (the reference, so that the first step's rewards are not all zero), and both converted by from-hf."""
    pytest.importorskip("trl", minversion="1.16")  # 1.x's loss_weights and default bf16 (see trl_history)
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    for seed, name in ((0, "policy"), (1, "reference")):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, initializer_range=0.1)  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(root / name)
        TOK.save(root / name)
        main(["convert", "from-hf", str(root / name), str(root / f"{name}-orion")])
    return root


def trl_history(
    root: Path, pairs: list[dict], settings: DPOConfig, optim: str, lr: float, steps: int, lora: Any = None
) -> list[dict]:
    """TRL's DPOTrainer on the pairs, all of them in each step: its log record of every step. With `lora` (a peft
    LoraConfig) it trains a new adapter, against the model with the adapter disabled, and saves the adapter as it
    starts in root/adapter."""
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM

    # bf16=False: TRL's DPOConfig turns bfloat16 autocast on by default, on CPU too
    args = trl.DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=len(pairs), max_steps=steps,
                         learning_rate=lr, optim=optim, weight_decay=0.0, lr_scheduler_type="constant",
                         max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         beta=settings.beta, bf16=False, disable_tqdm=True, **trl_loss(settings))  # fmt: skip
    trainer = trl.DPOTrainer(
        model=LlamaForCausalLM.from_pretrained(root / "policy"),
        ref_model=None if lora else LlamaForCausalLM.from_pretrained(root / "reference"),
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=AutoTokenizer.from_pretrained(root / "policy"),
        peft_config=lora,
    )
    if lora:
        trainer.model.save_pretrained(root / "adapter")
    for row in trainer.train_dataset:  # TRL's tokens and response masks are ours
        chosen, rejected = tokenize_pair(TOK, to_pair(row, "pair"))
        prompt = row["prompt_ids"]
        for ours, response in ((chosen, row["chosen_ids"]), (rejected, row["rejected_ids"])):
            assert ours == (prompt + response, [IGNORE] * len(prompt) + response)
    trainer.train()
    return [record for record in trainer.state.log_history if "rewards/chosen" in record]


def trl_loss(settings: DPOConfig) -> dict:
    """TRL's settings for the loss: TRL 1.x has no cDPO loss of its own, but its sigmoid loss S(d) and robust loss
    R(d) = ((1 - eps) S(d) - eps S(-d)) / (1 - 2 eps) combine to cDPO's (1 - eps) S(d) + eps S(-d) =
    2 (1 - eps) S(d) - (1 - 2 eps) R(d)."""
    eps = settings.label_smoothing
    if eps:
        return {"loss_type": ["sigmoid", "robust"], "loss_weights": [2 * (1 - eps), -(1 - 2 * eps)],
                "label_smoothing": eps}  # fmt: skip
    return {"loss_type": [settings.loss_type]}


def orion_history(
    root: Path, batch: dict, settings: DPOConfig, optim: str, lr: float, steps: int, lora: bool = False
) -> list[dict]:
    """The same steps with orionlm's DPO on the from-hf models (`lora`: TRL's starting adapter, root/adapter, on the
    policy, and no reference model)."""
    model, _, _ = load_model(root / "policy-orion", device="cpu", dtype=torch.float32)
    if lora:
        load_adapter(model, root / "adapter")
        reference = None
    else:
        reference = load_model(root / "reference-orion", device="cpu", dtype=torch.float32)[0].eval()
    dpo = DPO(model, settings, reference).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    if optim == "sgd":
        optimizer = torch.optim.SGD(trained, lr=lr)
    else:
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0, eps=1e-8)
    history = []
    for _ in range(steps):
        out = dpo(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"loss": out.loss.item()} | {key: value.item() for key, value in out.metrics.items()})
    return history


TRL_NAMES = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
             "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}  # fmt: skip


@pytest.mark.parametrize(
    "settings, optim, lr",
    [
        (DPOConfig(beta=0.1), "sgd", 0.5),
        (DPOConfig(beta=0.2, label_smoothing=0.1), "sgd", 0.1),
        (DPOConfig(beta=0.5, loss_type="ipo"), "sgd", 0.05),
        (DPOConfig(beta=0.1), "adamw_torch", 1e-2),
    ],
)
def test_agrees_with_trl(hf_models, tmp_path, settings, optim, lr):
    """The first step's loss and rewards equal TRL's to float32 precision, and so do the next steps' after SGD or
    AdamW updates (the loss falls alike)."""
    pairs = [pair(i) for i in range(4)]
    theirs = trl_history(hf_models, pairs, settings, optim, lr, steps=3)
    ours = orion_history(hf_models, batch_of(4, tmp_path), settings, optim, lr, steps=3)
    assert len(theirs) == len(ours) == 3
    assert theirs[0]["rewards/margins"] != 0  # the reference differs from the policy
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        tolerance = 1e-5 * (1 + step)
        assert a["loss"] == pytest.approx(b["loss"], rel=tolerance, abs=tolerance)
        for key, trl_key in TRL_NAMES.items():
            assert a[key] == pytest.approx(b[trl_key], rel=tolerance, abs=tolerance), (step, key)
    assert ours[-1]["loss"] < ours[0]["loss"]


def test_lora_agrees_with_trl_and_peft(hf_models, tmp_path):
    """With a new LoRA adapter TRL's reference is the model with the adapter disabled, as ours: after the first
    step (rewards 0: the adapter starts at zero) the losses and rewards equal TRL's."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    settings = DPOConfig(beta=0.1)
    theirs = trl_history(hf_models, [pair(i) for i in range(4)], settings, "sgd", 0.5, steps=3, lora=lora)
    ours = orion_history(hf_models, batch_of(4, tmp_path), settings, "sgd", 0.5, steps=3, lora=True)
    assert theirs[0]["rewards/margins"] == 0 and theirs[-1]["rewards/margins"] > 0.1
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        for key, trl_key in TRL_NAMES.items():
            assert a[key] == pytest.approx(b[trl_key], abs=1e-5), (step, key)


# --- whole runs ---------------------------------------------------------------------------------------------------


def make_base(root: Path, name: str) -> Path:
    model = OrionLM(preset(name, vocab_size=TOK.vocab_size, max_seq_len=256, initializer_range=0.1))
    model.reset_parameters(seed=0)
    save_checkpoint(model, root / "model", TOK)
    write_pairs(root / "pairs.jsonl", 40)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"), "tiny-moe")


def write_recipe(tmp_path: Path, base: Path, mode: str = "dpo", **sections) -> Path:
    """test_finetune's recipe (a tiny chat model, 6 steps) on the pairs."""
    data = {"sources": [{"path": str(base / "pairs.jsonl")}], "seq_len": 192}
    return write_chat_recipe(tmp_path, base, mode, data=data, **sections)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("tokens_per_s", "mfu")}


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "target_parameters": ["experts.gate_up_proj"]}


@pytest.mark.parametrize("sections", [{}, {"lora": LORA}], ids=["full", "lora"])
def test_runs_log_rewards_and_resume_bit_identically(tmp_path, base, sections):
    full = train(load_recipe(write_recipe(tmp_path / "a", base, **sections)))
    logged = records(full)
    assert logged[0]["step"] == 0 and logged[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged[0]["val_rewards/margin"] == 0  # before training, the model is its reference
    steps = [r for r in logged if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for record in steps:
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= set(record)
        assert record["rewards/margin"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"])
    assert "val_rewards/accuracy" in steps[-1] and steps[-1]["val_loss"] < math.log(2)
    assert steps[-1]["rewards/margin"] > 0
    last = find_checkpoints(full)[-1][1]
    weights = "adapter_model.safetensors" if sections else "model.safetensors"
    assert (last / weights).is_file()

    interrupted = train(load_recipe(write_recipe(tmp_path / "b", base, **sections)))
    shutil.rmtree(find_checkpoints(interrupted)[-1][1])
    train(load_recipe(tmp_path / "b" / "recipe.yaml", ["--resume"]))
    assert [without_timing(r) for r in records(interrupted)] == [without_timing(r) for r in logged]
    resumed_last = find_checkpoints(interrupted)[-1][1]
    assert (resumed_last / weights).read_bytes() == (last / weights).read_bytes()
    pytest.importorskip("matplotlib")
    assert run_figures(pyplot(), full)["loss.png"].axes[0].get_ylabel() == "DPO loss (mean per pair)"


def test_accumulated_micro_batches_weigh_every_pair_equally(tmp_path):
    """Packed rows hold different numbers of pairs: two micro-batches of 2 rows must train like one batch of 4 (the
    mean over all pairs), loss and rewards alike. (A dense model: MoE's load-balancing loss is computed per
    micro-batch, which is not linear in the batch.)"""
    base = make_base(tmp_path / "base", "tiny-dense")
    settings = ["--run.max_steps=2", "--data.seq_len=256"]
    one = train(load_recipe(write_recipe(tmp_path / "a", base), [*settings, "--run.batch_size=4"]))
    two = train(load_recipe(write_recipe(tmp_path / "b", base), [*settings, "--run.grad_accum=2"]))
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
    steps = [[r for r in records(run) if r["step"] > 0] for run in (one, two)]
    # the second step's micro-batches differ in pairs (the first step's rewards are all 0: the model is its reference)
    assert [int(b["sequence_ids"].max() + 1) // 2 for b in batches_of(base, 2)][2:] == [3, 4]
    for a, b in zip(*steps, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def batches_of(base: Path, batch_size: int) -> list[dict]:
    config = DataConfig(sources=[str(base / "pairs.jsonl")], seq_len=256, val_fraction=0.1)
    loader = build_preference_dataset(config, TOK, packed=True, progress=False).train_loader(batch_size)
    return [next(loader) for _ in range(4)]


def test_dpo_recipe_errors(tmp_path, base):
    with pytest.raises(RecipeError, match="mode: dpo tunes a trained model: give model.path"):
        load_recipe(write_recipe(tmp_path, base), ["--model.path=null", "--model.preset=tiny-dense"])
    with pytest.raises(RecipeError, match="dpo: the section is for mode: dpo, not sft"):
        load_recipe(write_recipe(tmp_path, base, mode="sft", dpo={"beta": 0.2}))
    with pytest.raises(RecipeError, match="smooths the sigmoid loss"):
        load_recipe(write_recipe(tmp_path, base, dpo={"loss_type": "ipo", "label_smoothing": 0.1}))
    with pytest.raises(RecipeError, match="set data.format=chat and data.train_on_all=false"):
        load_recipe(write_recipe(tmp_path, base), ["--data.train_on_all=true"])
    with pytest.raises(RecipeError, match="lora: adapters train low-rank factors with AdamW"):
        load_recipe(write_recipe(tmp_path, base, lora=LORA), ["--optim.name=muon"])
    assert load_recipe(write_recipe(tmp_path, base, lora=LORA)).adapters
    assert not load_recipe(write_recipe(tmp_path, base)).adapters
