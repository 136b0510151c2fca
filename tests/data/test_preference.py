"""Preference pairs for DPO: every format becomes the same prompt and responses, Anthropic HH dialogues split at
their last assistant turn (checked on the real hh-rlhf rows against their messages form), labels on the response
only, and a pair's two sequences always in the same batch, numbered chosen 2k, rejected 2k + 1."""

import gzip
import json

import pytest
import torch

from orionlm.data import DataConfig
from orionlm.data.chat import IGNORE, ChatDataError
from orionlm.data.preference import Pair, build_preference_dataset, fit_pair, parse_hh, to_pair, tokenize_pair
from orionlm.data.sft import PAD_DOCUMENT
from orionlm.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
USER = {"role": "user", "content": "Name a colour."}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_every_format_gives_the_same_pair():
    expected = Pair([USER], [assistant("Blue.")], [assistant("No.")])
    records = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": [USER], "chosen": [assistant("Blue.")], "rejected": [assistant("No.")]},
        {"chosen": [USER, assistant("Blue.")], "rejected": [USER, assistant("No.")]},
        {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: Name a colour.\n\nAssistant: No."},
        {"messages": [USER, assistant("Blue.")], "rejected": "No."},
    ]  # fmt: skip
    for record in records:
        assert to_pair(record, "x") == expected


def test_hh_dialogues_split_at_the_last_assistant_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: Why did the chicken..."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: No."
    pair = to_pair({"chosen": chosen, "rejected": rejected}, "x")
    prompt = [{"role": "user", "content": "Hi"}, assistant("Hello!"), {"role": "user", "content": "A joke?"}]
    assert pair == Pair(prompt, [assistant("Why did the chicken...")], [assistant("No.")])
    assert parse_hh("\n\nHuman: a\n\nb\n\nAssistant: c", "x") == [{"role": "user", "content": "a\n\nb"},
                                                                   assistant("c")]  # fmt: skip


@pytest.mark.parametrize(
    "record, message",
    [
        ({"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: Z\n\nAssistant: C"}, "differ before"),
        ({"chosen": "Human: A", "rejected": "\n\nHuman: A\n\nAssistant: C"}, "must start with"),
        ({"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C", "rejected": "\n\nHuman: A\n\nAssistant: C"},
         "end with"),
        ({"prompt": "A", "chosen": [USER], "rejected": "B"}, "assistant messages"),
        ({"prompt": "A", "chosen": "B"}, "not a preference pair"),
    ],
)  # fmt: skip
def test_bad_pairs_say_what_is_wrong(record, message):
    with pytest.raises(ChatDataError, match=message):
        to_pair(record, "f.jsonl:3")


def test_hh_rlhf_rows_split_as_their_messages_form(shared_data):
    """The published HH pairs, split here, equal the messages form the shared data holds for them (made by
    another program: its README describes the split)."""
    sft = shared_data / "sft"
    with gzip.open(sft / "original" / "hh_rlhf_helpful_base_test.jsonl.gz", "rt", encoding="utf-8") as f:
        original = [json.loads(line) for _, line in zip(range(300), f, strict=False)]
    with gzip.open(sft / "hh_rlhf_helpful_base_test_messages.jsonl.gz", "rt", encoding="utf-8") as f:
        converted = [json.loads(line) for _, line in zip(range(300), f, strict=False)]
    compared = 0
    for row in converted:
        number = int(row["id"].rsplit("-", 1)[1])
        if number >= len(original):
            continue
        assert to_pair(original[number], f"line {number}") == to_pair(row, row["id"])
        compared += 1
    assert compared > 250


def test_labels_cover_the_response_only():
    prompt = [USER, assistant("Red?"), {"role": "user", "content": "Another."}]  # an earlier assistant turn
    (ids, labels), (rejected_ids, rejected_labels) = tokenize_pair(TOK, Pair(prompt, [assistant("Blue.")],
                                                                              [assistant("No.")]))  # fmt: skip
    rendered = TOK.apply_chat_template(prompt, add_generation_prompt=True)
    start = len(TOK.encode(rendered, add_special_tokens=False))
    assert ids[:start] == rejected_ids[:start]  # the same prompt tokens
    assert all(label == IGNORE for label in labels[:start] + rejected_labels[:start])
    assert labels[start:] == ids[start:] and rejected_labels[start:] == rejected_ids[start:]
    assert TOK.decode(ids[start:], skip_special_tokens=False) == "Blue.<|im_end|>\n"
    assert TOK.decode(rejected_ids[start:], skip_special_tokens=False) == "No.<|im_end|>\n"


def test_a_pair_too_long_for_a_packed_row_is_cut_to_fit():
    chosen, rejected = ([0] * 11, [1] * 11), ([2] * 41, [3] * 41)  # 10 and 40 (input, target) pairs
    (c, r), cut = fit_pair((chosen, rejected), seq_len=30, packed=True)
    assert cut and (len(c[0]), len(r[0])) == (11, 21)  # the shorter keeps its 10, the longer gets the other 20
    (c, r), cut = fit_pair((rejected, rejected), seq_len=30, packed=True)
    assert cut and (len(c[0]), len(r[0])) == (16, 16)
    (c, r), cut = fit_pair((chosen, rejected), seq_len=30, packed=False)  # padded: one row each
    assert cut and (len(c[0]), len(r[0])) == (11, 31)
    assert fit_pair((chosen, chosen), seq_len=30, packed=True) == ((chosen, chosen), False)


def write_pairs(path, n: int):
    rows = [{"prompt": f"What is {i} plus {i}?" + " Please." * (i % 3), "chosen": f"{2 * i}.",
             "rejected": f"It is {i}{i}, I think."} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("packed", [True, False])
def test_batches_hold_whole_pairs_numbered_chosen_then_rejected(tmp_path, packed):
    seq_len = 400 if packed else 160  # packed: several pairs a row
    config = DataConfig(sources=[str(write_pairs(tmp_path / "pairs.jsonl", 20))], seq_len=seq_len, val_fraction=0.2)
    dataset = build_preference_dataset(config, TOK, packed=packed, progress=False)
    assert dataset.stats()[0]["pairs"] == 20
    batch = next(dataset.train_loader(batch_size=3))
    sequences, targets = batch["sequence_ids"], batch["targets"]
    assert ("document_ids" in batch) == packed
    n = int(sequences.max()) + 1
    assert n % 2 == 0 and set(sequences.unique().tolist()) == set(range(-1 if (sequences < 0).any() else 0, n))
    if packed:
        assert n > 6
    else:
        assert n == 6 and sequences[:, 0].tolist() == list(range(6))  # a pair is two consecutive rows
    for k in range(n // 2):
        chosen, rejected = (TOK.decode(batch["input_ids"][sequences == 2 * k + side].tolist()) for side in (0, 1))
        assert chosen.partition("assistant\n")[0] == rejected.partition("assistant\n")[0]  # the same prompt
        assert " I think." not in chosen and rejected.endswith("I think.")  # the last target is not an input
        for side in (0, 1):
            assert (targets[sequences == 2 * k + side] != IGNORE).any()
    if packed:
        documents = batch["document_ids"]
        assert ((documents == PAD_DOCUMENT) == (sequences == -1)).all()
    val = list(dataset.val_batches(batch_size=2))
    assert sum(int(b["sequence_ids"].max()) + 1 for b in val) == 2 * 4  # 20% of 20 pairs, all in validation
    assert torch.equal(next(dataset.train_loader(batch_size=3))["input_ids"], batch["input_ids"])
