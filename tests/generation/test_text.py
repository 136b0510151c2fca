import inspect
from collections.abc import Callable

import pytest
import torch
from numerics import assert_within_float32_noise, float64_twin
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from orionlm.config import preset
from orionlm.generation.engine import Engine, Request
from orionlm.generation.sampling import GenerationConfig, GenerationError
from orionlm.generation.text import (
    IncrementalDetokenizer,
    TextStream,
    generate,
    generate_ids,
    stream,
)
from orionlm.model import ModelOutput, OrionLM
from orionlm.tokenizer import Tokenizer

FAMILIES = ["tiny-dense", "tiny-moe", "tiny-qwen-moe", "tiny-alibi"]
PROMPTS = [[5, 17, 301, 42, 9, 77, 123], [8, 250], [99, 3, 64, 200]]  # different lengths: left padding
TEXT = "héllo wörld €"
VOCAB = 512  # 1-, 2- and 3-byte characters


def _model(name: str) -> OrionLM:
    # A larger init than the default makes the logits far from uniform, so greedy choices are clear-cut
    # (with less, the tied ALiBi model only repeats its input).
    model = OrionLM(preset(name, initializer_range=0.3 if name == "tiny-alibi" else 0.1)).eval()
    model.reset_parameters(seed=0)
    return model


class ScriptedLM(OrionLM):
    """A real tiny decoder (its cache, masks and padding all run) whose logits are then replaced so
    that the argmax is rule(previous token, step)."""

    def __init__(self, rule: Callable[[int, int], int]) -> None:
        super().__init__(preset("tiny-dense"))
        self.eval()
        self.rule = rule
        self.forward_calls = 0

    def forward(
        self, input_ids, position_ids=None, attention_mask=None, cache=None, logits_to_keep=0, output_hidden=False
    ):
        if cache.length == 0:
            self.prompt_len = input_ids.shape[1]
        out = super().forward(input_ids, position_ids, attention_mask, cache, logits_to_keep)
        self.forward_calls += 1
        step = cache.length - self.prompt_len
        logits = torch.full_like(out.logits, -10.0)
        for row, prev in enumerate(input_ids[:, -1].tolist()):
            logits[row, -1, self.rule(prev, step)] = 10.0
        return ModelOutput(logits)


def _byte_tokenizer() -> Tokenizer:
    return Tokenizer.byte_level()


def _scripted_text_model(tok: Tokenizer, text: str) -> ScriptedLM:
    script = tok.encode(text, add_special_tokens=False) + [tok.eos_id]
    return ScriptedLM(lambda prev, step: script[min(step, len(script) - 1)])


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decode_equals_full_recompute(name):
    """Each step's distribution (the engine's log-probabilities of every token) equals a full forward pass."""
    model = _model(name)
    prompt = PROMPTS[0]
    engine = Engine(model)
    request = Request(prompt, GenerationConfig(max_new_tokens=8, do_sample=False), logprobs=VOCAB)
    engine.submit(request)
    steps = []
    while engine.has_work:
        steps += [event.logprob for event in engine.step()]
    tokens = request.output
    exact_model = float64_twin(model)
    with torch.no_grad():
        for t, value in enumerate(steps):
            ids = torch.tensor([prompt + tokens[:t]])
            full = torch.log_softmax(model(ids).logits[0, -1], -1)
            cached = torch.empty_like(full)
            cached[[i for i, _ in value.top]] = torch.tensor([lp for _, lp in value.top])
            exact = torch.log_softmax(exact_model(ids).logits[0, -1], -1)
            assert_within_float32_noise(cached, full, exact)
            assert tokens[t] == full.argmax().item() == value.token
    assert len(set(tokens)) > 1  # a model stuck on one token would prove little


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_equals_one_by_one(name):
    model = _model(name)
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    singles = [generate_ids(model, [p], config=config)[0] for p in PROMPTS]
    assert generate_ids(model, PROMPTS, config=config) == singles


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-qwen-moe"])
def test_rows_stop_independently_at_stop_ids(name):
    model = _model(name)
    free = generate_ids(model, PROMPTS, max_new_tokens=8, do_sample=False)
    # a token of the second row that it has not produced before ends that row early
    stop = next(token for i, token in enumerate(free[1]) if i >= 2 and token not in free[1][:i])
    expected = [out[: out.index(stop) + 1] if stop in out else out for out in free]
    assert len(expected[1]) < 8
    assert generate_ids(model, PROMPTS, max_new_tokens=8, do_sample=False, stop_token_ids=[stop]) == expected


def test_stop_ids_and_stop_strings_on_scripted_text():
    tok = _byte_tokenizer()
    model = _scripted_text_model(tok, TEXT)
    prompt = tok.encode("x", add_special_tokens=False)
    ids = generate_ids(model, [prompt], max_new_tokens=40, do_sample=False, stop_token_ids=[tok.eos_id])[0]
    assert ids[-1] == tok.eos_id and tok.decode(ids) == TEXT  # the stop id is returned, as transformers does
    assert generate(model, tok, "cpu", "x", max_new_tokens=40, do_sample=False) == TEXT  # EOS stops, not shown
    model.forward_calls = 0
    assert generate(model, tok, None, "x", max_new_tokens=40, do_sample=False, stop=["wör"]) == "héllo "
    # one forward for the prompt and one per byte fed back: none for the byte that completed the stop string
    assert model.forward_calls == len("héllo wör".encode())
    w_id = tok.encode("w", add_special_tokens=False)[0]
    assert generate(model, tok, None, "x", max_new_tokens=40, do_sample=False, stop_token_ids=[w_id]) == "héllo "
    # the budget ends generation too, mid-character: the incomplete byte shows as U+FFFD at the end
    assert generate(model, tok, None, "x", max_new_tokens=2, do_sample=False) == "h\ufffd"


def test_stream_takes_generates_arguments_and_gives_its_text():
    assert inspect.signature(stream).parameters == inspect.signature(generate).parameters
    model, tok = _model("tiny-moe"), Tokenizer.byte_level()
    prompts = ["Once upon", "The cat sat"]
    texts = generate(model, tok, "cpu", prompts, max_new_tokens=12, temperature=0)
    assert all(texts)
    assert "".join(stream(model, tok, "cpu", prompts[0], max_new_tokens=12, temperature=0)) == texts[0]
    rows = ["", ""]
    for row, piece in stream(model, tok, "cpu", prompts, {"max_new_tokens": 12}, temperature=0):
        rows[row] += piece
    assert rows == texts
    with pytest.raises(GenerationError, match="the model is on cpu, not cuda:0"):
        stream(model, tok, "cuda:0", prompts[0])


def test_stream_never_splits_a_character_and_hides_stop_strings():
    tok = _byte_tokenizer()
    model = _scripted_text_model(tok, TEXT)
    pieces = list(stream(model, tok, None, "x", max_new_tokens=40, do_sample=False))
    assert pieces == list(TEXT)  # one piece per character, as soon as its last byte arrives
    # "wx" might start at "w": "w" is held back until "ö" shows it is not a stop string
    pieces = list(stream(model, tok, None, "x", max_new_tokens=40, do_sample=False, stop=["wx", "€!"]))
    assert "".join(pieces) == TEXT and "wö" in pieces and "w" not in pieces
    pieces = list(stream(model, tok, None, "x", max_new_tokens=40, do_sample=False, stop=["ld €"]))
    assert "".join(pieces) == "héllo wör" and all("\ufffd" not in p for p in pieces)


def test_batched_text_rows_stop_independently():
    tok = _byte_tokenizer()
    ids = {ch: tok.encode(ch, add_special_tokens=False)[0] for ch in "abxyzpqrs"}
    chain = {"a": "x", "x": "y", "y": "z", "b": "p", "p": "q", "q": "r", "r": "s", "s": "p"}
    successor = {ids[k]: ids[v] for k, v in chain.items()}
    model = ScriptedLM(lambda prev, step: tok.eos_id if prev == ids["z"] else successor[prev])
    texts = generate(model, tok, "cpu", ["a", "bb"], max_new_tokens=9, do_sample=False, stop=["yz", "sp"])
    assert texts == ["x", "pqr"]
    texts = generate(model, tok, "cpu", ["bb", "a"], max_new_tokens=9, do_sample=False)
    assert texts == ["pqrspqrsp", "xyz"]


def test_incremental_detokenizer_keeps_sentencepiece_spaces():
    vocab = {"▁hello": 0, "▁wor": 1, "ld": 2, "!": 3, "<0xC3>": 4, "<0xA9>": 5}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="!"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = Tokenizer(backend, eos_token=None, chat_template=None)
    ids = [0, 1, 2, 4, 5, 3]
    assert tok.decode(ids) == "hello worldé!" and tok.decode([1]) == "wor"  # a lone token loses its space
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert pieces == ["hello", " wor", "ld", "", "é", "!", ""]


def test_text_stream_flushes_held_text_at_the_end():
    tok = _byte_tokenizer()
    text_stream = TextStream(tok, stop=["lo!"])
    pieces = [text_stream.push(i) for i in tok.encode("hello", add_special_tokens=False)]
    # each "l" could start "lo!", so it waits for the next character
    assert pieces == ["h", "e", "", "l", ""] and text_stream.flush() == "lo"


def test_seeded_sampling_is_reproducible_across_calls_and_batches():
    model = _model("tiny-dense")
    kwargs = dict(max_new_tokens=12, temperature=1.5, seed=7)
    first = generate_ids(model, PROMPTS, **kwargs)
    assert first == generate_ids(model, PROMPTS, **kwargs)
    assert generate_ids(model, [PROMPTS[1]], **kwargs)[0] == first[1]
    assert generate_ids(model, PROMPTS, **{**kwargs, "seed": 8}) != first
    greedy = generate_ids(model, PROMPTS, max_new_tokens=12, do_sample=False)
    assert first != greedy


def test_penalties_change_greedy_output():
    model = _model("tiny-dense")
    plain = generate_ids(model, [PROMPTS[1]], max_new_tokens=16, do_sample=False)[0]
    assert len(set(plain)) < len(plain)  # the plain greedy output repeats itself
    for penalty in (dict(repetition_penalty=5.0), dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        out = generate_ids(model, [PROMPTS[1]], max_new_tokens=16, do_sample=False, **penalty)[0]
        assert len(set(out)) > len(set(plain)), penalty


def test_over_long_prompt_is_a_clear_error():
    model = _model("tiny-dense")  # max_seq_len 256
    with pytest.raises(GenerationError, match=r"prompt 1 has 250 tokens; .* 260 > the model's max_seq_len \(256\)"):
        generate_ids(model, [[1, 2], [3] * 250], max_new_tokens=10)
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        generate_ids(model, [[]], max_new_tokens=4)
    with pytest.raises(GenerationError, match=r"token ids \[512\] outside the vocabulary"):
        generate_ids(model, [[1, 512]], max_new_tokens=4)


def test_generation_defaults_precedence():
    tok = _byte_tokenizer()
    model = _scripted_text_model(tok, TEXT)
    model.generation_defaults = {"max_new_tokens": 3, "do_sample": False, "transformers_version": "4.46"}
    assert generate(model, tok, "cpu", "x") == "hé"  # 3 bytes from generation_config.json
    assert generate(model, tok, "cpu", "x", defaults={"max_new_tokens": 1}) == "h"
    assert generate(model, tok, "cpu", "x", defaults={"max_new_tokens": 1}, max_new_tokens=5) == "héll"
    stop_w = {"eos_token_id": tok.encode("w", add_special_tokens=False)[0], "max_new_tokens": 40}
    assert generate(model, tok, "cpu", "x", defaults=GenerationConfig.from_dict(stop_w | {"do_sample": False})) == (
        "héllo "
    )
    with pytest.raises(GenerationError, match="did you mean 'top_k'"):
        generate(model, tok, "cpu", "x", topk=3)
    with pytest.raises(GenerationError, match="temperature must be >= 0"):
        stream(model, tok, None, "x", temperature=-1.0)  # raised by the call, before any piece is asked for
