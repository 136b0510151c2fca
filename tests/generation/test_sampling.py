import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from orionlm.generation.sampling import (
    GenerationConfig,
    GenerationError,
    Sampler,
    apply_min_p,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    token_mask,
)

V = 64


def _logits(seed: int = 0, ties: bool = False, with_inf: bool = False) -> torch.Tensor:
    """(6, V) float32 logits; `ties` rounds them to a few values, `with_inf` masks some entries."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, V, generator=g) * 3
    if ties:
        logits = logits.round()  # about a dozen distinct values per row: many exact ties
    if with_inf:
        logits[:, ::5] = float("-inf")
    return logits


CASES = [dict(), dict(ties=True), dict(with_inf=True), dict(ties=True, with_inf=True)]


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different tokens filtered"
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(case, penalty):
    logits = _logits(1, **case)
    ids = torch.randint(0, V, (6, 20), generator=torch.Generator().manual_seed(2))  # with repeats
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    _assert_same(apply_repetition_penalty(logits, token_mask(ids, V), penalty), theirs)
    assert not torch.equal(theirs, logits)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(case, temperature):
    logits = _logits(3, **case)
    _assert_same(apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(None, logits))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [1, 2, 10, V - 1, V, V + 5])
def test_top_k_matches_transformers(case, k):
    logits = _logits(4, **case)
    ours = apply_top_k(logits, k)
    _assert_same(ours, TopKLogitsWarper(k)(None, logits))
    # ties with the k-th value survive, so at least min(k, finite) tokens remain
    assert (torch.isfinite(ours).sum(-1) >= min(k, torch.isfinite(logits).sum(-1).min())).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("p", [1e-6, 0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(case, p):
    logits = _logits(5, **case)
    ours = apply_top_p(logits, p)
    _assert_same(ours, TopPLogitsWarper(p)(None, logits))
    assert (torch.isfinite(ours).sum(-1) >= 1).all()
    if p == 1e-6:  # only one token survives, a most likely one
        assert (torch.isfinite(ours).sum(-1) == 1).all()
        assert torch.equal(ours.amax(-1), logits.amax(-1))


@pytest.mark.parametrize("p, kept", [(0.25, 1), (0.5, 2), (0.6, 3), (1.0, 4)])
def test_top_p_on_exact_cumulative_boundaries(p, kept):
    # uniform over 4 tokens: the cumulative probabilities 0.25, 0.5, 0.75, 1 are exact in float32, so a set
    # whose mass equals top_p exactly is enough (transformers removes tokens with cumulative <= 1 - top_p)
    logits = torch.zeros(1, 4)
    ours = apply_top_p(logits, p)
    _assert_same(ours, TopPLogitsWarper(p)(None, logits))
    assert torch.isfinite(ours).sum().item() == kept


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(case, min_p):
    logits = _logits(6, **case)
    ours = apply_min_p(logits, min_p)
    _assert_same(ours, MinPLogitsWarper(min_p)(None, logits))
    if min_p == 1.0 and not case.get("ties"):
        assert torch.equal(torch.isfinite(ours).sum(-1), torch.ones(6, dtype=torch.long))


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    counts = torch.tensor([[0, 3, 1, 0]])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    # token 1: 2 - 0.5 - 3 * 0.25; token 2: -1 - 0.5 - 0.25; unseen tokens unchanged
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.75, -1.75, 0.5]]))
    negative = apply_presence_frequency_penalty(logits, counts, presence=-1.0, frequency=0.0)
    torch.testing.assert_close(negative, torch.tensor([[1.0, 3.0, 0.0, 0.5]]))


@pytest.mark.parametrize("case", CASES)
def test_process_logits_chain_matches_transformers_order(case):
    logits = _logits(7, **case)
    ids = torch.randint(0, V, (6, 12), generator=torch.Generator().manual_seed(8))
    config = GenerationConfig(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    chain = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.8),
            MinPLogitsWarper(0.05),
        ]
    )
    _assert_same(process_logits(logits, config, seen=token_mask(ids, V)), chain(ids, logits.clone()))


def test_greedy_applies_penalties_but_no_warpers():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    seen = torch.tensor([[True, False, False]])
    config = GenerationConfig(do_sample=False, repetition_penalty=1.5, top_k=1, temperature=0.1)
    out = process_logits(logits, config, seen=seen)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.9, 0.0]]))
    assert Sampler(config, 1, torch.device("cpu"))(out).tolist() == [1]


def test_sampler_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    torch.manual_seed(0)
    tokens = Sampler(GenerationConfig(), 40000, torch.device("cpu"))(probs.log().expand(40000, -1))
    freq = torch.bincount(tokens, minlength=5).float() / 40000
    # 4 standard errors of a binomial proportion at n = 40000 is at most 0.01
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[4] == 0
    # a seeded row draws from the same distribution, step after step
    seeded = Sampler(GenerationConfig(seed=3), 1, torch.device("cpu"))
    tokens = torch.cat([seeded(probs.log().view(1, -1)) for _ in range(4000)])
    freq = torch.bincount(tokens, minlength=5).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.032, rtol=0)


def test_sampler_seed_reproducible_and_independent_of_batch():
    logits = _logits(9)
    config = GenerationConfig(seed=123)
    first = Sampler(config, 6, torch.device("cpu"))
    draws = torch.stack([first(logits) for _ in range(5)])
    second = Sampler(config, 6, torch.device("cpu"))
    assert torch.equal(draws, torch.stack([second(logits) for _ in range(5)]))
    # row 3 alone, with the same seed, draws what it drew inside the batch
    alone = Sampler(config, 1, torch.device("cpu"))
    assert torch.equal(draws[:, 3], torch.cat([alone(logits[3:4]) for _ in range(5)]))
    other = Sampler(GenerationConfig(seed=124), 6, torch.device("cpu"))
    assert not torch.equal(draws, torch.stack([other(logits) for _ in range(5)]))


def test_config_from_hf_generation_config():
    hf = {
        "bos_token_id": 1,
        "eos_token_id": [2, 7],
        "pad_token_id": 0,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_new_tokens": 64,
        "num_beams": 1,
        "transformers_version": "4.46.0",
    }
    config = GenerationConfig.from_dict(hf)
    assert config.stop_token_ids == [2, 7]
    assert (config.temperature, config.top_p, config.max_new_tokens, config.do_sample) == (0.6, 0.9, 64, True)
    assert GenerationConfig.from_dict({"eos_token_id": 5}).stop_token_ids == [5]
    assert GenerationConfig.from_dict({"temperature": 0.0}).greedy
    assert GenerationConfig(stop="###").stop == ["###"]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(min_p=1.5), "min_p must be in [0, 1]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2]"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(stop=[""]), "stop must be a list of non-empty strings"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of token ids"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_config_validation_messages(changes, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GenerationConfig(**changes)


def test_unknown_setting_suggests_the_right_name():
    with pytest.raises(GenerationError, match="'temprature' \\(did you mean 'temperature'\\?\\)"):
        GenerationConfig().replace(temprature=0.5)


def test_seed_must_fit_a_generator():
    """torch's generators take seeds in [-2**63, 2**64 - 1]; anything else is refused before a sampler is made."""
    for seed in (-(2**63), 2**64 - 1):
        Sampler(GenerationConfig(seed=seed), 1, torch.device("cpu"))
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(GenerationError, match="seed"):
            GenerationConfig(seed=seed)
    with pytest.raises(GenerationError, match="seed"):
        GenerationConfig(seed=2**64 - 1).replace(seed=2**64)
