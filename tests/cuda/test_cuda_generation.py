"""Generation on the GPU: the continuous-batching engine's greedy tokens on a float32 model equal the CPU
engine's, and a torch.compile'd decode step picks the same tokens as the eager one.

Float32 on both devices differs only in the order of additions (~1e-6 relative on the logits), so greedy tokens
can only differ where the CPU's best two logits are closer than that; each test first checks that its tokens
are no such near-tie (a gap of at least 1e-3 at every step), so a failure means a wrong GPU path."""

import copy

import pytest
import torch

from orionlm.config import preset
from orionlm.generation import generate_ids
from orionlm.model import OrionLM

pytestmark = pytest.mark.cuda

FAMILIES = ["tiny-dense", "tiny-moe", "tiny-alibi", "tiny-chimera"]
NEW_TOKENS = 12
MIN_GAP = 1e-3


def sharp_model(name: str) -> OrionLM:
    """A random model whose next-token distributions are peaked (init std 0.1), so greedy choices are clear."""
    model = OrionLM(preset(name, initializer_range=0.1))
    model.reset_parameters(seed=0)
    return model.eval()


def prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (9, 4, 17)]


def smallest_gap(model: OrionLM, prompt: list[int], output: list[int]) -> float:
    """The smallest gap between the best and second-best logit at the steps that chose `output`, recomputed
    without a cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).min().item()


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_equal_cpu_engine(name, device, float32_cuda):
    model = sharp_model(name)
    batch = prompts(model.config.vocab_size)
    expected = generate_ids(model, batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    for prompt, output in zip(batch, expected, strict=True):
        assert len(output) == NEW_TOKENS and smallest_gap(model, prompt, output) > MIN_GAP
    gpu = copy.deepcopy(model).to(device)
    assert generate_ids(gpu, batch, max_new_tokens=NEW_TOKENS, do_sample=False) == expected


def greedy_decode(forward, model: OrionLM, prompt: list[int], new_tokens: int) -> list[int]:
    """Prefill, then one token per step through `forward` (the model or its compiled form) on the model's cache."""
    cache = model.new_cache(1, len(prompt) + new_tokens)
    ids = torch.tensor([prompt], device=model.device)
    tokens = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = forward(ids, cache=cache, logits_to_keep=1).logits
            ids = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(ids.item())
    return tokens


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-chimera"])
def test_compiled_decode_step_picks_eager_tokens(name, device, float32_cuda):
    torch._dynamo.reset()
    model = sharp_model(name).to(device)
    prompt = prompts(model.config.vocab_size)[0]
    eager = greedy_decode(model, model, prompt, NEW_TOKENS)
    assert smallest_gap(model.cpu(), prompt, eager) > MIN_GAP
    model.to(device)
    compiled = greedy_decode(torch.compile(model), model, prompt, NEW_TOKENS)
    assert compiled == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it compiled, not only fell back to eager
