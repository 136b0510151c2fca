"""Evaluation, checked against transformers running the same weights (exported with save_hf)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from orionlm.config import preset
from orionlm.convert.hf import save_hf
from orionlm.eval.report import format_table
from orionlm.eval.run import evaluate
from orionlm.eval.scoring import encode_pair, loglikelihood, perplexity
from orionlm.eval.tasks import EvalError, add_shots, load_choices, load_documents
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

TEXT = "The cat sat on the mat. It was a sunny day, and the dog barked at the birds in the tall green tree."


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(orionlm model, tokenizer, the transformers model with the same weights)."""
    tokenizer = Tokenizer.byte_level()
    model = OrionLM(preset("tiny-dense", vocab_size=tokenizer.vocab_size, max_seq_len=64, initializer_range=0.2))
    model.reset_parameters(seed=0)
    path = tmp_path_factory.mktemp("eval") / "hf"
    save_hf(model.eval(), tokenizer, path)
    return model, tokenizer, AutoModelForCausalLM.from_pretrained(path).eval()


def _reference_logprob(hf, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[0].float(), -1)
    n = len(continuation_ids)
    positions = range(len(context_ids) - 1, len(context_ids) - 1 + n)
    picked = [logprobs[p, t] for p, t in zip(positions, continuation_ids, strict=True)]
    greedy = all(logprobs[p].argmax() == t for p, t in zip(positions, continuation_ids, strict=True))
    return float(sum(picked)), greedy


def test_encode_pair_follows_lm_eval():
    tok = Tokenizer.byte_level()
    context, continuation = encode_pair(tok, "Question: hi\nAnswer: ", "yes")
    assert tok.decode(context) == "Question: hi\nAnswer:" and tok.decode(continuation) == " yes"
    context, continuation = encode_pair(tok, "", "hello")
    assert context == [tok.eos_id] and tok.decode(continuation) == "hello"


def test_loglikelihood_equals_transformers(pair):
    model, tok, hf = pair
    requests = [("The cat", " sat"), ("It was a sunny day, and ", "the dog"), ("", "The"), (TEXT[:40], TEXT[40:70]),
                ("x" * 90, " long context keeps its end")]  # fmt: skip
    scored = loglikelihood(model, tok, requests, batch_size=2, progress=False)
    for (context, continuation), got in zip(requests, scored, strict=True):
        context_ids, continuation_ids = encode_pair(tok, context, continuation)
        keep = (context_ids + continuation_ids)[-65:]
        expected, greedy = _reference_logprob(hf, keep[: len(keep) - len(continuation_ids)], continuation_ids)
        assert got.logprob == pytest.approx(expected, abs=1e-4) and got.greedy == greedy
        assert got.tokens == len(continuation_ids)


@pytest.mark.parametrize("context, stride", [(16, 16), (16, 5), (64, 64)])
def test_sliding_window_perplexity_equals_a_manual_loop(pair, context, stride):
    model, tok, hf = pair
    texts = [TEXT, TEXT[::-1][:60]]
    got = perplexity(model, tok, texts, context, stride, progress=False)
    nll = tokens = 0
    for text in texts:
        ids = [tok.eos_id] + tok.encode(text, add_special_tokens=False)  # the byte tokenizer has no BOS
        starts = list(range(0, len(ids), stride))
        for target in range(1, len(ids)):
            # the first window reaching the target scores it; the last window reaches back to full context
            begin = next(b for b in starts if target <= b + context)
            end = min(begin + context + 1, len(ids))
            lp, _ = _reference_logprob(hf, ids[max(0, end - context - 1) : target], [ids[target]])
            nll -= lp
            tokens += 1
    assert got.tokens == tokens
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.bits_per_byte == pytest.approx(nll / sum(len(t.encode()) for t in texts) / math.log(2))


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


ITEMS = [
    {"id": f"q{i}", "question": q, "choices": choices, "answer": a}
    for i, (q, choices, a) in enumerate([
        ("What sat on the mat?", ["The cat", "A car", "Nothing"], 0),
        ("What barked?", ["the moon", "the dog"], 1),
        ("Where were the birds?", ["in the tree", "under water", "on Mars", "inside"], 0),
        ("Was it sunny?", ["yes", "no"], 0),
    ])
]  # fmt: skip


def test_multiple_choice_accuracy_equals_manual_scoring(pair, tmp_path):
    model, tok, hf = pair
    path = _write(tmp_path / "arc.jsonl", ITEMS)
    report = evaluate(model, tok, ["arc_easy"], task_files={"arc_easy": path}, progress=False)
    hits, norm_hits = [], []
    for item in ITEMS:
        prompt = f"Question: {item['question']}\nAnswer:"
        lls = [_reference_logprob(hf, *encode_pair(tok, prompt, f" {c}"))[0] for c in item["choices"]]
        per_char = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]  # lm-eval: no delimiter
        hits.append(lls.index(max(lls)) == item["answer"])
        norm_hits.append(per_char.index(max(per_char)) == item["answer"])
    metrics = report["results"]["arc_easy"]
    assert metrics["acc"] == sum(hits) / 4 and metrics["acc_norm"] == sum(norm_hits) / 4 and metrics["n"] == 4
    assert "| arc_easy | 4 | acc |" in format_table(report)


def test_few_shot_draws_are_seeded_and_exclude_the_item(tmp_path):
    path = _write(tmp_path / "arc.jsonl", ITEMS)
    first, again = load_choices("arc_easy", path), load_choices("arc_easy", path)
    add_shots(first, load_choices("arc_easy", path), 2, seed=1)
    add_shots(again[:1], load_choices("arc_easy", path), 2, seed=1)  # fewer items: the same shots for item 0
    assert [s.id for s in first[0].shots] == [s.id for s in again[0].shots]
    assert all(item.id not in [s.id for s in item.shots] for item in first)
    with pytest.raises(EvalError, match="4 shots"):
        add_shots(first, load_choices("arc_easy", path), 4, seed=1)


def test_bad_inputs_name_file_and_line(pair, tmp_path):
    model, tok, _ = pair
    bad = tmp_path / "arc.jsonl"
    bad.write_text(json.dumps(ITEMS[0]) + "\n{oops\n")
    with pytest.raises(EvalError, match=r"arc.jsonl:2: not valid JSON"):
        load_choices("arc_easy", bad)
    _write(bad, [ITEMS[0], {"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(EvalError, match=r"arc.jsonl:2: 'answer' must be an index"):
        load_choices("arc_easy", bad)
    with pytest.raises(EvalError, match="pass --data-dir"):
        evaluate(model, tok, ["hellaswag"], data_dir=tmp_path, progress=False)
    with pytest.raises(EvalError, match="unknown tasks"):
        evaluate(model, tok, ["hellaswagg"], progress=False)


def test_wikitext_documents_split_at_top_headings(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(" \n = A = \n \n text a \n = = sub = = \n more \n = B = \n text b \n")
    docs = load_documents(path)
    assert len(docs) == 2 and "sub" in docs[0] and docs[1].startswith(" = B =")


def test_cli_writes_json_and_refuses_bad_task_files(tmp_path):
    from orionlm.checkpoint import save_checkpoint

    tok = Tokenizer.byte_level()
    model = OrionLM(preset("tiny-dense", vocab_size=tok.vocab_size))
    save_checkpoint(model, tmp_path / "m", tok)
    path = _write(tmp_path / "piqa.jsonl", ITEMS)
    command = [sys.executable, "-m", "orionlm", "eval", str(tmp_path / "m"), "--tasks", "piqa",
               "--task-file", f"piqa={path}", "--out", str(tmp_path / "r.json")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"]["piqa"]["n"] == 4 and "acc_stderr" in report["results"]["piqa"]
    assert report["versions"]["orionlm"] and report["timing_s"]["piqa"] >= 0
    result = subprocess.run(command[:-4] + ["--task-file", "piqa"], capture_output=True, text=True)
    assert result.returncode == 2 and "TASK=PATH" in result.stderr
    other = report | {"results": {"piqa": report["results"]["piqa"] | {"acc": 0.75}}}
    (tmp_path / "s.json").write_text(json.dumps(other))
    compare = [sys.executable, "-m", "orionlm", "eval", "compare", str(tmp_path / "r.json"), str(tmp_path / "s.json"),
               "--chart", str(tmp_path / "c.png")]  # fmt: skip
    result = subprocess.run(compare, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "| task | metric | r | s |" in result.stdout and "| 0.7500 |" in result.stdout
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text("{}")
    result = subprocess.run(compare[:5] + [str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert result.returncode == 2 and "not an `orionlm eval --out` report" in result.stderr


def test_real_model_on_shared_items(shared_data, tmp_path):
    """stories260K (a real trained model) on real HellaSwag and LAMBADA items: the same numbers as
    transformers computes from the exported weights."""
    import gzip

    from orionlm.convert.gguf import load_gguf

    gguf = tmp_path / "s.gguf"
    gguf.write_bytes(gzip.open(shared_data / "models" / "stories260K" / "stories260K.gguf.gz").read())
    model, tok = load_gguf(gguf, device="cpu", dtype=torch.float32)
    save_hf(model, tok, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    eval_dir = shared_data / "eval"
    report = evaluate(model, tok, ["hellaswag", "lambada"], data_dir=eval_dir, limit=12, progress=False)
    hits, greedy = [], []
    for item in load_choices("hellaswag", eval_dir / "hellaswag_val.jsonl")[:12]:
        lls = [_reference_logprob(hf, *encode_pair(tok, item.prompt, c))[0] for c in item.continuations]
        hits.append(lls.index(max(lls)) == item.answer)
    from orionlm.eval.tasks import load_lambada

    for context, continuation in load_lambada(eval_dir / "lambada_openai.jsonl.gz")[:12]:
        greedy.append(_reference_logprob(hf, *encode_pair(tok, context, continuation))[1])
    assert report["results"]["hellaswag"]["acc"] == sum(hits) / 12
    assert report["results"]["lambada"]["acc"] == sum(greedy) / 12


def test_continuation_longer_than_the_window_scores_its_end(pair):
    model, tok, hf = pair
    (scored,) = loglikelihood(model, tok, [("Q", " " + TEXT)], progress=False)
    ids = tok.encode("Q" + " " + TEXT, add_special_tokens=False)[-65:]
    expected, _ = _reference_logprob(hf, ids[:1], ids[1:])
    assert scored.tokens == 64 and scored.logprob == pytest.approx(expected, abs=1e-4)


def test_gsm8k_answers_and_a_run(pair, tmp_path):
    from orionlm.eval.tasks import extract_answers, load_problems

    assert extract_answers("so 3 + 4 = 7 apples\n#### 1,234.50") == ("1234.5", "1234.5")
    assert extract_answers("the total is $18.") == (None, "18")
    assert extract_answers("no digits") == (None, None)
    problems = [{"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
                {"question": "What is 3 + 5?", "answer": "3 + 5 = 8\n#### 8"}]  # fmt: skip
    path = _write(tmp_path / "gsm8k_test.jsonl", problems)
    assert [p.answer for p in load_problems(path)] == ["4", "8"]
    model, tok, _ = pair
    report = evaluate(model, tok, ["gsm8k"], data_dir=tmp_path, num_fewshot=1, max_new_tokens=8, progress=False)
    assert report["results"]["gsm8k"]["n"] == 2 and report["results"]["gsm8k"]["exact_match"] == 0.0
    _write(path, [{"question": "q", "answer": "no marker"}])
    with pytest.raises(EvalError, match=r"gsm8k_test.jsonl:1: the answer has no '#### <number>' line"):
        load_problems(path)


def test_hub_items_are_normalised_and_offline_is_a_clear_error(pair, tmp_path, monkeypatch):
    from orionlm.eval import hub

    monkeypatch.setattr(hub, "CACHE", tmp_path / "cache")
    arc = tmp_path / "ai2_arc"  # a local dataset directory in the Hub dataset's schema
    arc.mkdir()
    rows = [{"question": "What barked?", "choices": {"text": ["the moon", "the dog"], "label": ["A", "B"]},
             "answerKey": "B"}]  # fmt: skip
    _write(arc / "test.jsonl", rows)
    path = hub.fetch("arc_easy", str(arc))
    (item,) = load_choices("arc_easy", path)
    assert item.choices == ["the moon", "the dog"] and item.answer == 1
    assert hub.fetch("arc_easy", str(arc)) == path  # cached
    swag = hub._hellaswag({"activity_label": "Cooking", "ctx_a": "A man [title] cuts", "ctx_b": "the  bread",
                          "endings": [" slices it [step] ", "eats"], "label": "0"})  # fmt: skip
    # as lm-eval cleans it: markers out after the strip, so a space before a marker stays
    assert swag == {"context": "Cooking: A man. cuts The bread", "choices": ["slices it ", "eats"], "answer": 0}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok, _ = pair
    with pytest.raises(EvalError, match=r"no items for piqa: pass --data-dir .*could not load baber/piqa"):
        evaluate(model, tok, ["piqa"], progress=False)


def test_a_dataset_name_that_is_no_local_directory_says_both(tmp_path, monkeypatch):
    """A name like data/arc may be a mistyped directory as well as a Hub name: offline, the one line says both."""
    from orionlm.eval import hub

    monkeypatch.setattr(hub, "CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(EvalError) as info:
        hub.fetch("arc_easy", "data/arc")
    message = str(info.value)
    assert message.startswith("data/arc: not found locally, and as a Hub dataset (test) it could not be downloaded "
                              "(offline mode is on): ")  # fmt: skip
    assert "\n" not in message


def test_published_formats_give_the_normalised_items(shared_data):
    eval_dir, original = shared_data / "eval", shared_data / "eval" / "original"
    pairs = [("arc_easy", "arc_easy_test.jsonl", "llmfoundry_arc_easy.jsonl"),
             ("piqa", "piqa_val.jsonl", "llmfoundry_piqa.jsonl"),
             ("hellaswag", "hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2")]  # fmt: skip
    for task, normalised, published in pairs:
        ours = [(c.prompt, c.choices, c.answer) for c in load_choices(task, eval_dir / normalised)[:50]]
        theirs = [(c.prompt, c.choices, c.answer) for c in load_choices(task, original / published)[:50]]
        assert ours == theirs, task
    mmlu = [c for c in load_choices("mmlu", original / "mmlu.zip") if c.subject == "anatomy"][:35]
    subset = [c for c in load_choices("mmlu", eval_dir / "mmlu_test_subset.jsonl") if c.subject == "anatomy"]
    assert [(c.prompt, c.answer) for c in mmlu] == [(c.prompt, c.answer) for c in subset]
    dev = load_choices("mmlu", original / "mmlu.zip", split="dev")
    assert len(dev) == 285 and dev[0].subject == "abstract_algebra"
