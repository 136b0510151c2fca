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
            failed += e.failures
            engine.submit(good[2])
    assert [request for request, _ in failed] == [bad] and isinstance(failed[0][1], ValueError)
    assert [r.output for r in good] == alone and bad.output == []
    assert engine.cache.rows == 0


@pytest.mark.parametrize("thinks", [False, True], ids=["token", "thought"])
def test_an_error_in_one_token_pick_fails_that_request_alone(thinks, thinking_model):
    """The decode pass is shared, each row's pick its own: a request whose sampling breaks after 3 tokens (top_k set
    to -1 past validation: torch.topk refuses it, in its token's pick or, on a thinking model, its thought's) is
    dropped with RequestFailed; the tokens the others got in that step come with it, and every other request gets
    exactly what it gets alone."""
    model = thinking_model("tiny-dense") if thinks else _model("tiny-dense")
    config = GenerationConfig(max_new_tokens=10, temperature=0.9, seed=5)
    prompts = [[t % 60 for t in p] for p in _prompts()[:3]]  # inside the thinking model's vocabulary of 64
    alone = [generate_ids(model, [p], config=config)[0] for p in prompts]
    engine = Engine(model, max_batch=4, prefill_chunk=7)
    good = [Request(p, config) for p in prompts]
    bad = Request(prompts[1], config.replace())
    tokens = {r.id: [] for r in (*good, bad)}
    for request in (good[0], bad, good[1], good[2]):
        engine.submit(request)
    failed = []
    while engine.has_work:
        try:
            events = engine.step()
        except RequestFailed as e:
            failed += e.failures
            events = e.events
        for event in events:
            tokens[event.request.id].append(event.token)
        if len(bad.output) == 3:
            bad.config.top_k = -1
    assert [request for request, _ in failed] == [bad] and "out of range" in str(failed[0][1])
    assert tokens[bad.id] == bad.output and len(bad.output) == 3
    assert [tokens[r.id] for r in good] == [r.output for r in good] == alone
    assert engine.cache.rows == 0


def _starts(engine: Engine, late: Request | None = None) -> list[int]:
    """Drain the engine, submitting `late` after the first step; the ids of the requests in the order they got
    their first tokens."""
    started: dict[int, None] = {}
    while engine.has_work:
        for event in engine.step():
            started.setdefault(event.request.id)
        if late is not None and late.id not in started:
            engine.submit(late)
            late = None
    return list(started)


def test_admission_is_fair_between_groups():
    """Rows go to the group holding the fewest, the oldest first: two groups of 6 (two HTTP requests' choices)
    alternate, and a lone request that arrives while a group of 12 fills every row starts at the first free row,
    not after the whole group (first come first served would start it 13th)."""
    model = _model("tiny-dense")
    config = GenerationConfig(max_new_tokens=4, do_sample=False)

    def group(size: int) -> list[Request]:
        first = Request([1, 2, 3], config)
        return [first] + [Request([1, 2, 3], config, group=first.group) for _ in range(size - 1)]

    engine = Engine(model, max_batch=4)
    a, b = group(6), group(6)
    for request in a + b:
        engine.submit(request)
    assert _starts(engine) == [r.id for pair in zip(a, b, strict=True) for r in pair]
    engine = Engine(model, max_batch=3)
    big, small = group(12), Request([4, 5], config)
    for request in big:
        engine.submit(request)
    assert _starts(engine, late=small) == [r.id for r in big[:3] + [small] + big[3:]]
    assert small.output == generate_ids(model, [small.prompt], config=config)[0]
