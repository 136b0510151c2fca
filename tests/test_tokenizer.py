import pytest
from transformers import AutoTokenizer

from orionlm.tokenizer import CHATML_TEMPLATE, LONG_TEXT, Tokenizer, TokenizerError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hei! Mitä kuuluu?"},
    {"role": "assistant", "content": "Hyvää."},
    {"role": "system", "content": "Now answer in English."},  # a system message mid-conversation
    {"role": "user", "content": "And you?"},
]


def test_byte_level_round_trips_any_text():
    tok = Tokenizer.byte_level()
    text = "héllo wörld € 🙂 \t\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]
    assert tok.decode(tok.encode("a<|im_end|>b")) == "ab"
    assert tok.decode(tok.encode("a<|im_end|>b"), skip_special_tokens=False) == "a<|im_end|>b"


def test_chat_template_matches_transformers(tmp_path):
    tok = Tokenizer.byte_level()
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for generation_prompt in (True, False):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt)
        theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == theirs
    assert ours.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>system\nNow answer in English.<|im_end|>\n" in ours
    assert hf.encode("Hei <|im_end|>") == tok.encode("Hei <|im_end|>")


def test_chat_template_is_sandboxed():
    tok = Tokenizer(
        Tokenizer.byte_level().backend, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}"
    )
    with pytest.raises(TokenizerError, match="chat template failed"):
        tok.apply_chat_template(MESSAGES)
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(TokenizerError, match="only user turns"):
        tok.apply_chat_template(MESSAGES)


def test_bad_messages_are_rejected():
    with pytest.raises(TokenizerError, match="message 0 needs 'role' and 'content'"):
        Tokenizer.byte_level().apply_chat_template([{"content": "hi"}])


def test_train_bpe_on_real_text(tmp_path, shared_data):
    tok = Tokenizer.train_bpe([shared_data / "pretrain" / "tinyshakespeare.txt.gz"], vocab_size=1000)
    assert tok.vocab_size == 1000
    text = "First Citizen:\nBefore we proceed any further, hear me speak. Æsir ☃"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) * 0.6  # merges were learned
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode(text) == ids
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == ids
    assert tok.apply_chat_template(MESSAGES) == Tokenizer.byte_level().apply_chat_template(MESSAGES)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json is missing"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json could not be read"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size must be at least 260"):
        Tokenizer.train_bpe([], vocab_size=10)


def test_default_template_is_chatml():
    assert Tokenizer.byte_level().chat_template == CHATML_TEMPLATE


def test_long_texts_encode_as_short_ones_do():
    """Texts past LONG_TEXT go through encode_batch (which lets other threads run); the ids are the same."""
    tokenizer = Tokenizer.byte_level()
    text = "Once upon a time, ünïcode 😀 <|endoftext|> " * (LONG_TEXT // 40 + 1)
    assert len(text) > LONG_TEXT
    assert tokenizer.encode(text) == tokenizer.backend.encode(text).ids
    assert (
        tokenizer.encode(text, add_special_tokens=False) == tokenizer.backend.encode(text, add_special_tokens=False).ids
    )


LLAMA3_STYLE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
)


@pytest.mark.parametrize(
    "template, expected",
    [
        (CHATML_TEMPLATE, "<|im_end|>"),
        (LLAMA3_STYLE, "<|eot_id|>"),
        ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}", "<|endoftext|>"),
        ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", None),  # ends in plain text
        ("{{ raise_exception('system message first') }}", None),
        (None, None),
    ],
)
def test_end_of_turn_token_is_read_from_the_chat_template(template, expected):
    tok = Tokenizer.byte_level()
    tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.chat_template = template
    assert tok.end_of_turn_id == (None if expected is None else tok.token_to_id(expected))
