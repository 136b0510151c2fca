import gzip
import json

import pytest

from orionlm.data.chat import IGNORE, ChatDataError, read_conversations, to_messages, tokenize_chat
from orionlm.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_assistant_only_labels():
    tok = Tokenizer.byte_level()  # ChatML template
    ids, labels = tokenize_chat(tok, CONVERSATION)
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(
        CONVERSATION, add_generation_prompt=False
    )
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert tok.decode(trained, skip_special_tokens=False) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels, strict=True))
    _, everything = tokenize_chat(tok, CONVERSATION, train_on_all=True)
    assert everything == ids


def test_formats_become_messages():
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}]}  # fmt: skip
    assert to_messages(sharegpt, "x") == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                          {"role": "assistant", "content": "A"}]  # fmt: skip
    alpaca = {"instruction": "Add", "input": "2 and 2", "output": "4"}
    assert to_messages(alpaca, "x") == [
        {"role": "user", "content": "Add\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    with pytest.raises(ChatDataError, match="f.jsonl:3: ShareGPT speaker 'bot'"):
        to_messages({"conversations": [{"from": "bot", "value": "x"}]}, "f.jsonl:3")
    with pytest.raises(ChatDataError, match="no assistant turn"):
        to_messages({"messages": [{"role": "user", "content": "x"}]}, "f")
    with pytest.raises(ChatDataError, match="not a conversation"):
        to_messages({"text": "x"}, "f")


def test_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": [{"role": "x"}]}) + "\n")
    with pytest.raises(ChatDataError, match=r"chat.jsonl:2: each message needs a role"):
        read_conversations(path)


def test_shared_sft_data_tokenizes(shared_data):
    tok = Tokenizer.byte_level()
    for name in ("gsm8k_train_messages", "hh_rlhf_helpful_base_test_messages", "oasst1_en_validation_messages"):
        path = shared_data / "sft" / f"{name}.jsonl.gz"
        conversations = read_conversations(path)
        with gzip.open(path, "rt") as f:
            assert len(conversations) == sum(1 for line in f if line.strip())
        ids, labels = tokenize_chat(tok, conversations[0])
        assert 0 < sum(label != IGNORE for label in labels) < len(ids)
