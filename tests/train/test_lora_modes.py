"""LoRA under every mode: a `lora:` section trains adapters on the frozen base under sft and quietstar (where the
thinking head and meta embeddings train fully beside them), resumes bit-identically, merges into whatever the run
trained, and is refused where a mode cannot use it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orionlm.checkpoint import save_checkpoint
from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.peft import thinking_base
from orionlm.generation import stream_thoughts
from orionlm.loading import load_model, open_adapter_base
from orionlm.model import END_THOUGHT, START_THOUGHT, OrionLM
from orionlm.tokenizer import Tokenizer
from orionlm.train.recipe import RecipeError, load_recipe
from orionlm.train.trainer import Trainer, find_checkpoints, train

from .test_finetune import make_base
from .test_finetune import write_recipe as write_chat_recipe
from .test_trainer import metrics
from .test_trainer import write_recipe as write_text_recipe

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
QUIETSTAR = {"n_ahead": 4, "n_ahead_talk": 2, "n_passes": 2}
# The thinking parts (nn/thinking.py): the meta embeddings and the mixing head (its last layer has no bias)
THINKING = {"thinking.meta_embeddings", "thinking.mixing_head.4.weight"} | {
    f"thinking.mixing_head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
}
FACTORS = {f"model.layers.{i}.self_attn.{m}.lora_{x}.weight" for i in range(2) for m in ("q_proj", "v_proj")
           for x in "AB"}  # fmt: skip
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def text_base(tmp_path_factory) -> Path:
    """A small saved model to teach thinking, with a byte-level tokenizer."""
    tokenizer = Tokenizer.byte_level()
    model = OrionLM(preset("tiny-dense", vocab_size=tokenizer.vocab_size, max_seq_len=64))
    model.reset_parameters(seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("text-base") / "model", tokenizer)


def quietstar_lora_recipe(tmp_path: Path, base: Path, *overrides: str, lora: bool = True):
    path = write_text_recipe(tmp_path, model={"path": str(base)}, run={"batch_size": 2})
    settings = [f"quietstar.{k}={v}" for k, v in QUIETSTAR.items()]
    adapters = [f"lora.{k}={json.dumps(v)}" for k, v in LORA.items()] if lora else []
    return load_recipe(path, ["mode=quietstar", *settings, *adapters, "--model.preset=null", *overrides])


def trained_by(trainer: Trainer) -> set[str]:
    return {name for name, p in trainer.model.named_parameters() if p.requires_grad}


def steps_leave_frozen_weights_alone(trainer: Trainer) -> None:
    """Train the run: every frozen tensor is bit for bit what it was, every trained one moved."""
    params = dict(trainer.model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    try:
        trainer.train()
    finally:
        trainer.close()
    for name, p in params.items():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def untimed(records: list[dict]) -> list[dict]:
    """Metrics records without the measured speeds."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in records]


def logits(model: OrionLM) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits.float()


def test_a_lora_section_under_sft_trains_only_the_adapters(tmp_path):
    base = make_base(tmp_path / "base", "tiny-dense")
    recipe = load_recipe(write_chat_recipe(tmp_path, base, "sft", lora=LORA, run={"max_steps": 2}))
    assert recipe.mode == "sft" and recipe.adapters.r == 4
    trainer = Trainer(recipe)
    assert trained_by(trainer) == FACTORS
    steps_leave_frozen_weights_alone(trainer)
    last = find_checkpoints(tmp_path / "run")[-1][1]
    assert not list(last.glob("model*.safetensors"))  # an adapter directory: the frozen base is not copied
    assert set(load_file(last / "adapter_model.safetensors")) == {f"base_model.model.{n}" for n in FACTORS}


@pytest.fixture(scope="module")
def thinking_run(tmp_path_factory, text_base) -> tuple[Path, set[str], torch.Tensor]:
    """A Quiet-STaR run with adapters: its directory, the parameters it trained, its final model's logits."""
    tmp_path = tmp_path_factory.mktemp("quietstar-lora")
    trainer = Trainer(quietstar_lora_recipe(tmp_path, text_base))
    assert trainer.recipe.lora.modules_to_save == ["thinking"]  # said in the saved recipe too
    trained, model = trained_by(trainer), trainer.model
    steps_leave_frozen_weights_alone(trainer)
    return tmp_path / "run", trained, logits(model)


def test_quietstar_with_lora_trains_adapters_and_the_thinking_parts_and_merges_into_a_thinking_model(
    thinking_run, capsys
):
    run_dir, trained, expected = thinking_run
    assert trained == FACTORS | THINKING

    # The adapter directory: PEFT's files (the thinking head as a module to save) and how the base thinks.
    saved = run_dir / "model"
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["thinking"]
    assert set(load_file(saved / "adapter_model.safetensors")) == {f"base_model.model.{n}" for n in FACTORS | THINKING}
    assert json.loads((saved / "thinking_config.json").read_text()) == {"thought_length": 4, "meta_init": "---"}
    assert not list(saved.glob("model*.safetensors"))
    adapted, tokenizer, _ = load_model(saved, device="cpu")  # the base made to think, with the adapter on it
    assert adapted.config.thinks and adapted.config.thought_length == 4
    assert tokenizer.token_to_id(START_THOUGHT) == adapted.config.thought_start_id
    torch.testing.assert_close(logits(adapted), expected, atol=0, rtol=0)

    capsys.readouterr()
    main(["merge-lora", str(saved / "recipe.yaml"), f"--lora_model_dir={saved}"])
    assert "thinking trained fully" in capsys.readouterr().out
    merged, merged_tokenizer, _ = load_model(run_dir / "merged", device="cpu")
    assert merged.config == adapted.config
    assert merged_tokenizer.token_to_id(END_THOUGHT) == merged.config.thought_end_id
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
    for name, tensor in load_file(saved / "adapter_model.safetensors").items():
        if ".thinking." in name:
            assert torch.equal(merged.get_parameter(name.removeprefix("base_model.model.")), tensor), name
    # It generates with thoughts, as the adapter model does.
    pieces = list(stream_thoughts(merged, merged_tokenizer, ["Hello"], max_new_tokens=3, do_sample=False))
    assert sum(bool(thought) for _, thought, _ in pieces) == 3
    assert pieces == list(stream_thoughts(adapted, tokenizer, ["Hello"], max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("lora", [True, False])
def test_quietstar_resumes_bit_identically_with_and_without_adapters(tmp_path, text_base, lora):
    """Thoughts are sampled from the run's random numbers: a resumed run draws the ones the uninterrupted run drew."""
    full = train(quietstar_lora_recipe(tmp_path / "a", text_base, lora=lora))
    interrupted = train(quietstar_lora_recipe(tmp_path / "b", text_base, lora=lora))
    shutil.rmtree(find_checkpoints(interrupted)[-1][1])
    train(quietstar_lora_recipe(tmp_path / "b", text_base, "--resume", lora=lora))
    assert untimed(metrics(interrupted)) == untimed(metrics(full))
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    for name in (weights, "tokenizer.json"):
        assert (interrupted / "model" / name).read_bytes() == (full / "model" / name).read_bytes(), name


def test_a_section_that_the_mode_cannot_use_is_an_error(tmp_path, text_base):
    path = write_text_recipe(tmp_path)
    with pytest.raises(RecipeError, match="lora: adapters need a trained base, and pretraining starts from scratch"):
        load_recipe(path, ["lora.r=4"])
    with pytest.raises(RecipeError, match="quietstar: the section is for mode: quietstar, not sft"):
        load_recipe(path, ["mode=sft", "quietstar.n_ahead=4", f"model.path={text_base}", "model.preset=null"])
    with pytest.raises(RecipeError, match="lora: adapters need a trained base: give model.path"):
        load_recipe(path, ["mode=quietstar", "lora.r=4"])
    with pytest.raises(RecipeError, match="lora: adapters train with one process or DDP: set run.fsdp=false"):
        quietstar_lora_recipe(tmp_path, text_base, "run.fsdp=true")


def test_peft_reads_a_quietstar_adapter(thinking_run):
    """PEFT, given the thinking base, loads the adapter and the thinking head (a module to save) as load_model does."""
    peft = pytest.importorskip("peft")
    run_dir, _, expected = thinking_run
    saved = run_dir / "model"
    source = open_adapter_base(saved)
    base = thinking_base(source.load("cpu", torch.float32), source.tokenizer, saved)
    assert (logits(base) - expected).abs().max() > 1e-4  # what the adapter and the head change
    config = peft.LoraConfig.from_pretrained(saved)
    config.task_type = None  # an orionlm model: PEFT's plain wrapper, not the transformers causal-LM one
    adapted = peft.PeftModel.from_pretrained(base, saved, config=config)
    torch.testing.assert_close(logits(adapted), expected, atol=1e-6, rtol=0)


def test_weight_merges_take_a_quietstar_adapter_only_once_merged(thinking_run):
    """`orionlm merge` folds factors into base tensors one at a time; the thinking head is no base tensor."""
    from orionlm.merge.sources import MergeError, open_source

    with pytest.raises(MergeError, match=r"also trains \['thinking'\] fully, .*\(orionlm merge-lora\)"):
        open_source(str(thinking_run[0] / "model"))
