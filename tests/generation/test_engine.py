import pytest
import torch

from orionlm.config import preset
from orionlm.generation.engine import Engine, Request, RequestFailed
from orionlm.generation.sampling import GenerationConfig, GenerationError
from orionlm.generation.text import generate_ids
from orionlm.model import OrionLM

FAMILIES = ["tiny-dense", "tiny-moe", "tiny-alibi", "tiny-chimera"]


def _model(name: str) -> OrionLM:
    model = OrionLM(preset(name, initializer_range=0.3 if name == "tiny-alibi" else 0.1)).eval()
    model.reset_parameters(seed=0)
    return model


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 3, 40, 9, 1, 23)]


def _drain(engine: Engine) -> int:
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    return steps


@pytest.mark.parametrize("name", FAMILIES)
def test_continuous_batching_equals_one_by_one(name):
    """Requests that join a running batch at different times, with chunked prefill and different lengths,
    get exactly the tokens they get alone."""
    model = _model(name)
    greedy = GenerationConfig(max_new_tokens=12, do_sample=False)
    prompts = _prompts()
    alone = [generate_ids(model, [p], config=greedy.replace(max_new_tokens=12 - i))[0] for i, p in enumerate(prompts)]
    engine = Engine(model, max_batch=3, prefill_chunk=7)
    requests = [Request(p, greedy.replace(max_new_tokens=12 - i)) for i, p in enumerate(prompts)]
    for request in requests[:4]:
        engine.submit(request)
    engine.step()
    engine.step()
    for request in requests[4:]:  # these join while the first ones run
        engine.submit(request)
    _drain(engine)
    assert [r.output for r in requests] == alone
    assert all(r.finish_reason == "length" for r in requests)
    assert engine.cache.rows == 0


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = _model("tiny-moe")
    config = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=50, seed=7)
    prompt = _prompts()[1]
    alone = Engine(model)
    request = Request(prompt, config)
    alone.submit(request)
    _drain(alone)
    busy = Engine(model, max_batch=4)
    others = [Request(p, config.replace(seed=i)) for i, p in enumerate(_prompts())]
    same = Request(prompt, config)
    for r in others[:3] + [same] + others[3:]:
        busy.submit(r)
    _drain(busy)
    assert same.output == request.output


def test_stop_tokens_cancel_budget_and_queue():
    model = _model("tiny-dense")
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False)
    prompt = _prompts()[0]
    first = generate_ids(model, [prompt], config=greedy)[0]
    engine = Engine(model, max_batch=2, max_cached_tokens=2 * (len(prompt) + 8))
    stopped = Request(prompt, greedy, stop_ids=frozenset({first[2]}))
    cancelled = Request(prompt, greedy)
    waiting = Request(prompt, greedy)
    for r in (stopped, cancelled, waiting):
        engine.submit(r)
    engine.step()
    assert len(engine.waiting) == 1  # two rows, and the token budget holds two requests
    engine.cancel(cancelled)
    _drain(engine)
    assert stopped.output == first[: first.index(first[2]) + 1] and stopped.finish_reason == "stop"
    assert cancelled.finish_reason is None and len(cancelled.output) < 8
    assert waiting.output == first


def test_logprobs_are_the_models():
    model = _model("tiny-dense")
    prompt = _prompts()[1]
    engine = Engine(model, prefill_chunk=5)  # prompt logprobs across chunk borders
    request = Request(prompt, GenerationConfig(max_new_tokens=3, do_sample=False), logprobs=2, prompt_logprobs=1)
    engine.submit(request)
    _drain(engine)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + request.output[:-1]])).logits[0]
    expected = torch.log_softmax(logits, -1)
    values = request.prompt_logprob_values
    assert values[0] is None and len(values) == len(prompt)
    for position, value in enumerate(values[1:], start=1):
        assert value.token == prompt[position]
        assert value.logprob == pytest.approx(expected[position - 1, prompt[position]].item(), abs=1e-4)
        assert value.top[0][0] == expected[position - 1].argmax().item()


def test_requests_that_cannot_run_are_refused():
    engine = Engine(_model("tiny-dense"), max_cached_tokens=100)
    with pytest.raises(GenerationError, match="context"):
        engine.submit(Request([1] * 250, GenerationConfig(max_new_tokens=10)))
    with pytest.raises(GenerationError, match="cached tokens"):
        engine.submit(Request([1] * 95, GenerationConfig(max_new_tokens=10)))
    with pytest.raises(GenerationError, match="vocabulary"):
        engine.submit(Request([1, 9999]))
    with pytest.raises(GenerationError, match="empty"):
        engine.submit(Request([]))


def test_an_error_in_one_request_fails_it_alone():
    """A request whose own work fails (here its sampler: a seed torch refuses, set past validation) is dropped
    with RequestFailed naming it; the requests running beside it, and those after it, get their tokens as alone."""
    model = _model("tiny-dense")
    config = GenerationConfig(max_new_tokens=12, temperature=0.9, seed=5)
    prompts = _prompts()[:3]
    alone = [generate_ids(model, [p], config=config)[0] for p in prompts]
    engine = Engine(model, max_batch=4, prefill_chunk=7)
    good = [Request(p, config) for p in prompts]
    bad = Request(prompts[0], config.replace(seed=1))
    bad.config.seed = 2**64  # what GenerationConfig refuses: torch's generators overflow
    for request in (good[0], bad, good[1]):
        engine.submit(request)
    failed = []
    while engine.has_work:
        try:
            engine.step()
        except RequestFailed as e:
            failed.append(e)
            engine.submit(good[2])
    assert [e.request for e in failed] == [bad] and isinstance(failed[0].__cause__, ValueError)
    assert [r.output for r in good] == alone and bad.output == []
    assert engine.cache.rows == 0
