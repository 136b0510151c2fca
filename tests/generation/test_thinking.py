"""Generation with thoughts: the engine (KV cache, ragged batch, rewinds) against a full recompute of every
thought from scratch, the zero mixing head against the base model, and think=False."""

import pytest
import torch

from orionlm.generation.engine import Engine, Request
from orionlm.generation.sampling import GenerationConfig, GenerationError
from orionlm.generation.text import generate_ids
from orionlm.model import OrionLM

START, END = 60, 61  # conftest's thinking_model
GREEDY = GenerationConfig(max_new_tokens=5, do_sample=False)


def reference(model, prompt: list[int], steps: int) -> tuple[list[int], list[list[int]], list[float]]:
    """Greedy thinking generation with no cache: every thought is a fresh forward pass over text + thought.
    Returns the tokens, the thoughts and the tokens' log-probabilities."""
    n = model.config.thought_length
    text, output, thoughts, logprobs = list(prompt), [], [], []
    with torch.no_grad():
        for _ in range(steps):
            base = model(torch.tensor([text]), output_hidden=True).hidden[0, -1]
            context = [*text, START]
            for _ in range(n - 3):
                logits = model(torch.tensor([context])).logits[0, -1]
                logits[[START, END]] = float("-inf")
                context.append(int(logits.argmax()))
            thought = model(torch.tensor([[*context, END]]), output_hidden=True).hidden[0, -1]
            mixed, _ = model.thinking.mix(base, thought)
            logits = model.lm_head(mixed)
            logits[[START, END]] = float("-inf")
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            output.append(token)
            thoughts.append(context[len(text) + 1 :])
            text.append(token)
    return output, thoughts, logprobs


def run(engine: Engine, requests: list[Request]) -> dict[int, list]:
    """Each request's events, by request id, with the engine drained."""
    events = {r.id: [] for r in requests}
    for i, request in enumerate(requests):
        engine.submit(request, f"prompt {i}")
    while engine.has_work:
        for event in engine.step():
            events[event.request.id].append(event)
    return events


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-alibi", "tiny-chimera"])
def test_thinking_generation_equals_recomputing_every_thought(name, thinking_model):
    """Prompts of different lengths, prefilled in chunks, decoding side by side in a ragged batch: each token
    and thought equals the no-cache reference, so the cache rewinds (KV lengths, GDN states) are exact."""
    model = thinking_model(name)
    model.config = model.config.replace(thought_length=6)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, START, (n,), generator=g).tolist() for n in (7, 2, 12)]
    requests = [Request(p, GREEDY, logprobs=0) for p in prompts]
    events = run(Engine(model, max_batch=3, prefill_chunk=5), requests)
    for request in requests:
        output, thoughts, logprobs = reference(model, request.prompt, GREEDY.max_new_tokens)
        assert request.output == output
        assert [e.thought for e in events[request.id]] == thoughts
        assert all(len(t) == 3 for t in thoughts)
        assert [e.logprob.logprob for e in events[request.id]] == pytest.approx(logprobs, abs=1e-5)
        assert not {START, END} & set(request.output)


def test_a_zero_mixing_head_generates_what_the_base_model_does(thinking_model):
    model = thinking_model("tiny-dense")
    model.thinking.mixing_head[-1].weight.data.normal_(std=1.0)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    thinking = generate_ids(model, prompts, config=GREEDY)
    model.thinking.mixing_head[-1].weight.data.zero_()
    assert generate_ids(model, prompts, config=GREEDY) == generate_ids(
        model, prompts, config=GREEDY.replace(think=False)
    )
    assert thinking != generate_ids(model, prompts, config=GREEDY)  # the head used to mix: the test can see it


def test_a_request_that_does_not_think_is_unaffected_by_thinking_neighbours(thinking_model):
    """think=False in a batch where others think: the base model's tokens, and seeded samples equal to the
    same request run alone."""
    model = thinking_model("tiny-moe")
    sampled = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=7, think=False)
    alone = generate_ids(model, [[4, 5, 6]], config=sampled)[0]
    plain = Request([4, 5, 6], sampled)
    run(Engine(model, max_batch=3), [Request([1, 2], GREEDY), plain, Request([3] * 9, GREEDY)])
    assert plain.output == alone
    base = OrionLM(model.config.replace(thought_start_id=None, thought_end_id=None)).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("thinking.")})
    never_meta = GREEDY.replace(logit_bias={START: -100, END: -100})  # the thinking model never outputs them
    assert generate_ids(model, [[4, 5]], config=GREEDY.replace(think=False)) == generate_ids(
        base, [[4, 5]], config=never_meta
    )


def test_a_thought_is_counted_in_the_cache_budget(thinking_model):
    model = thinking_model("tiny-dense")  # thought_length 12: 11 slots
    engine = Engine(model, max_batch=1, max_cached_tokens=20)
    engine.check(Request([1] * 4, GREEDY))  # 4 + 5 + 11 fits
    with pytest.raises(GenerationError, match="needs 21 cached tokens; the engine holds 20"):
        engine.check(Request([1] * 5, GREEDY))
    engine.check(Request([1] * 15, GREEDY.replace(think=False)))
