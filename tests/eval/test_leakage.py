import json

import numpy as np
import pytest

from orionlm.eval.leakage import CHANCE, ORDERINGS, detect, flag, leak_text, option_block, ordering_scores
from orionlm.eval.scoring import loglikelihood

pytest.importorskip("sklearn")

WORDS = "red green blue black white pink gold grey teal navy lime plum rose sand mint jade".split()


def _items(start: int, count: int) -> list[dict]:
    rng = np.random.default_rng(start)
    return [
        {"id": f"item{start + i}", "question": f"Which colour is number {start + i}?",
         "choices": [str(w) for w in rng.choice(WORDS, 4, replace=False)], "answer": 0}
        for i in range(count)
    ]  # fmt: skip


def test_orderings_and_blocks():
    assert len(ORDERINGS) == 24 and ORDERINGS[0] == (0, 1, 2, 3) and CHANCE == 1 / 24
    assert option_block(["w", "x", "y", "z"], (2, 0, 3, 1)) == "A. y\nB. w\nC. z\nD. x"
    assert leak_text({"question": " Q? ", "choices": list("wxyz")}) == "Q?\nA. w\nB. x\nC. y\nD. z"


def test_flag_rules_on_known_scores():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, (3, 24))
    outlier = noise[0].copy()
    outlier[0] = 5.0  # the original far above the rest: a leak
    close_call = np.linspace(0, 1, 24)[::-1].copy()  # the original best, but evenly spaced: not an outlier
    other_best = noise[2].copy()
    other_best[7] = 5.0  # another ordering is the outlier: no evidence of a leak
    flags = flag(np.stack([outlier, close_call, other_best]))
    assert flags["max_original"].tolist() == [True, True, False]
    for threshold in ("-0.2", "-0.17", "-0.15"):
        assert flags[f"iforest@{threshold}"].tolist() == [True, False, False]


def test_ordering_scores_are_option_block_loglikelihoods():
    from orionlm.config import preset
    from orionlm.model import OrionLM
    from orionlm.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    model = OrionLM(preset("tiny-dense", vocab_size=tok.vocab_size)).eval()
    item = _items(0, 1)[0]
    scores = ordering_scores(model, tok, [item], progress=False)
    (direct,) = loglikelihood(model, tok, [(item["question"] + "\n", option_block(item["choices"], ORDERINGS[5]))],
                              progress=False)  # fmt: skip
    assert scores.shape == (1, 24) and scores[0, 5] == pytest.approx(direct.logprob, abs=1e-5)


def test_a_deliberate_leak_is_found(tmp_path):
    """A tiny model trained on half the items (as question + options in published order) flags those items
    and not the other half."""
    import yaml

    from orionlm.loading import load_model
    from orionlm.train.recipe import load_recipe
    from orionlm.train.trainer import find_checkpoints, train

    leaked, clean = _items(0, 6), _items(100, 6)
    (tmp_path / "leak.txt").write_text("<|endoftext|>".join(leak_text(item) for item in leaked))
    for name, part in (("leaked", leaked), ("clean", clean)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in part))
    recipe = {
        "model": {"preset": "tiny-dense", "overrides": {"max_seq_len": 128}},
        "data": {"sources": [{"path": str(tmp_path / "leak.txt"), "doc_separator": "<|endoftext|>"}],
                 "seq_len": 128, "val_fraction": 0.0, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 1e-2, "weight_decay": 0.0},
        "schedule": {"kind": "cosine", "warmup_steps": 10},
        "run": {"out_dir": str(tmp_path / "run"), "max_steps": 150, "batch_size": 4, "eval_every": 0,
                "progress": False, "plot": False, "tensorboard": False},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = train(load_recipe(tmp_path / "recipe.yaml"))
    model, tok, _ = load_model(find_checkpoints(run)[-1][1])
    rates = {name: detect(model, tok, tmp_path / f"{name}.jsonl", progress=False) for name in ("leaked", "clean")}
    assert rates["leaked"]["methods"]["max_original"]["rate"] >= 5 / 6
    assert rates["clean"]["methods"]["max_original"]["rate"] <= 2 / 6
    assert rates["leaked"]["methods"]["max_original"]["flagged"][0].startswith("item")
