"""Chat rows for fine-tuning: packing keeps conversations apart (the model computes on a packed row exactly
what it computes on each conversation alone), padding is what recurrent models get, and the rows are
split, drawn and resumed like pretraining windows."""

import json

import pytest
import torch

from orionlm.config import preset
from orionlm.data import DataConfig
from orionlm.data.chat import IGNORE, tokenize_chat
from orionlm.data.sft import PAD_DOCUMENT, build_chat_dataset, layout_rows
from orionlm.errors import OrionError
from orionlm.model import OrionLM
from orionlm.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()


def conversation(i: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"What is {i} plus {i}?" + " Please." * (i % 4)},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
    ]


def write_chat(path, n: int):
    path.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(n)))
    return path


def test_packed_rows_never_cross_conversations():
    examples = [tokenize_chat(TOK, conversation(i)) for i in range(3)]
    lengths = [len(ids) - 1 for ids, _ in examples]
    rows = layout_rows(examples, seq_len=lengths[0] + lengths[1] + 5, packed=True, pad_id=0)
    assert len(rows) == 2  # the third conversation does not fit beside the first two
    first = lengths[0]
    assert rows.document_ids[0].tolist() == [0] * first + [1] * lengths[1] + [PAD_DOCUMENT] * 5
    assert rows.position_ids[0, first : first + 3].tolist() == [0, 1, 2]  # positions restart
    # The last target of a conversation is its own last token, never the next conversation's first.
    assert rows.targets[0, first - 1] == examples[0][1][-1]
    assert rows.input_ids[0, first] == examples[1][0][0]
    assert (rows.targets[0, -5:] == IGNORE).all()
    padded = layout_rows(examples, seq_len=max(lengths), packed=False, pad_id=0)
    assert len(padded) == 3 and (padded.document_ids[:, 0] == 0).all()


@pytest.mark.parametrize(
    "name, overrides",
    [("tiny-dense", {}), ("tiny-dense", {"sliding_window": 16}), ("tiny-qwen-moe", {}), ("tiny-alibi", {})],
)
def test_a_packed_row_computes_each_conversation_alone(name, overrides):
    config = preset(name, vocab_size=TOK.vocab_size, initializer_range=0.1, **overrides)
    model = OrionLM(config).eval()
    model.reset_parameters(seed=0)
    examples = [tokenize_chat(TOK, conversation(i)) for i in (3, 11, 7)]
    rows = layout_rows(examples, seq_len=sum(len(ids) - 1 for ids, _ in examples), packed=True, pad_id=0)
    packed = {k: torch.from_numpy(getattr(rows, k)) for k in ("input_ids", "position_ids", "document_ids")}
    with torch.no_grad():
        logits = model(**packed).logits[0]
        start = 0
        alone_losses, counts = [], []
        for ids, labels in examples:
            n = len(ids) - 1
            alone = model(torch.tensor([ids[:-1]])).logits[0]
            torch.testing.assert_close(logits[start : start + n], alone, atol=2e-5, rtol=1e-4)
            alone_losses.append(model(torch.tensor([ids[:-1]]), targets=torch.tensor([labels[1:]])).loss)
            counts.append(sum(label != IGNORE for label in labels[1:]))
            start += n
        packed_loss = model(**packed, targets=torch.from_numpy(rows.targets)).loss
    # One packed row's loss is the mean over every assistant token of the three conversations.
    expected = sum(loss * c for loss, c in zip(alone_losses, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(packed_loss, expected, atol=1e-5, rtol=1e-5)


def test_recurrent_models_refuse_packed_rows():
    model = OrionLM(preset("tiny-chimera", vocab_size=TOK.vocab_size)).eval()
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(OrionError, match="attention-only"):
        model(ids, document_ids=torch.zeros_like(ids))


def test_dataset_split_draw_and_resume(tmp_path):
    config = DataConfig(
        sources=[{"path": str(write_chat(tmp_path / "chat.jsonl", 40))}], seq_len=96, val_fraction=0.1, format="chat"
    )
    dataset = build_chat_dataset(config, TOK, packed=True, progress=False)
    (stats,) = dataset.stats()
    assert stats["conversations"] == 40 and stats["truncated"] == 0 and stats["dropped"] == 0
    assert 0.5 < stats["fill"] <= 1
    source = dataset.sources[0]

    def conversations(rows) -> set[str]:
        text = TOK.decode(rows.input_ids[rows.document_ids != PAD_DOCUMENT].tolist(), skip_special_tokens=False)
        return {part.split("?")[0] for part in text.split("What is ")[1:]}

    held_out, trained = conversations(source.val), conversations(source.train)
    assert len(held_out) == 4 and len(trained) == 36 and not held_out & trained

    loader = dataset.train_loader(batch_size=3)
    batch = next(loader)
    assert set(batch) == {"input_ids", "targets", "position_ids", "document_ids"}
    assert (batch["document_ids"] != PAD_DOCUMENT).any(dim=0)[-1]  # trailing all-padding columns are cut
    state = loader.state_dict()
    expected = [next(loader) for _ in range(5)]  # crosses an epoch: the rows come in a fresh order
    resumed = dataset.train_loader(batch_size=3)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    padded = build_chat_dataset(config, TOK, packed=False, progress=False)
    assert "document_ids" not in next(padded.train_loader(batch_size=2))
    assert len(padded.sources[0].train) == 36


def test_too_long_conversations_are_cut_or_dropped(tmp_path):
    config = DataConfig(
        sources=[str(write_chat(tmp_path / "chat.jsonl", 6))], seq_len=40, val_fraction=0, format="chat"
    )
    (stats,) = build_chat_dataset(config, TOK, packed=True, progress=False).stats()
    assert stats["truncated"] == 6  # each renders to 52 or more byte tokens, more than seq_len + 1 = 41
    # The answer starts at token 36, after the user turn; the "Please." of conversations 1, 2, 3 and 5
    # pushes it past token 41, leaving nothing to learn.
    assert stats["dropped"] == 4
    config.seq_len = 16
    with pytest.raises(OrionError, match="no conversation left to train on"):
        build_chat_dataset(config, TOK, packed=True, progress=False)


def test_real_chat_files(shared_data):
    config = DataConfig(sources=[str(shared_data / "sft" / "oasst1_en_validation_messages.jsonl.gz")], seq_len=512,
                        val_fraction=0.05, format="chat")  # fmt: skip
    dataset = build_chat_dataset(config, TOK, packed=True, progress=False)
    (stats,) = dataset.stats()
    assert stats["conversations"] == 901 and stats["val_rows"] > 0
    batch = next(dataset.train_loader(batch_size=2))
    # Only assistant text (and its end-of-turn marker) is learned.
    trained = TOK.decode(batch["targets"][batch["targets"] != IGNORE].tolist(), skip_special_tokens=False)
    assert "<|im_end|>" in trained and "<|im_start|>user" not in trained
