import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orionlm.data import (
    DataConfig,
    DataError,
    MixtureDataset,
    SourceConfig,
    TrainLoader,
    build_dataset,
    feistel_permute,
)
from orionlm.tokenizer import Tokenizer

T = 16
# Three sources with disjoint alphabets, so that the content of a row tells which source and window it is.
SOURCES = [("a", "abcdefgh", 3000, 6.0), ("b", "ijklmnop", 1500, 3.0), ("c", "qrstuvwx", 700, 1.0)]
TOKENIZER = Tokenizer.byte_level()


def source_of(token: int) -> int:
    """Which source a (letter) token comes from."""
    letter = TOKENIZER.decode([token])
    return next(i for i, (_, alphabet, _, _) in enumerate(SOURCES) if letter in alphabet)


def build(
    tmp_path: Path, seed: int = 0, seq_len: int = T, specs: list[tuple[str, str, int, float]] = SOURCES
) -> MixtureDataset:
    sources = []
    for name, alphabet, chars, weight in specs:
        path = tmp_path / f"{name}.txt"
        if not path.exists():
            rng = np.random.default_rng(len(alphabet) + chars)
            path.write_text("".join(rng.choice(list(alphabet), size=chars)))
        sources.append(SourceConfig(path=str(path), weight=weight))
    config = DataConfig(sources, seq_len=seq_len, val_fraction=0.1, seed=seed, cache_dir=str(tmp_path / "cache"))
    return build_dataset(config, TOKENIZER, progress=False)


def locate(dataset: MixtureDataset, inputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[int, int]]:
    """(source, first token) of each row, found by searching the rows' content in the token streams."""
    found = []
    for x, y in zip(inputs, targets, strict=True):
        assert torch.equal(x[1:], y[:-1])  # targets are the inputs shifted by one
        window = torch.cat([x, y[-1:]]).numpy()
        source = dataset.names.index(SOURCES[source_of(int(window[0]))][0])
        tokens = np.asarray(dataset.shards[source].tokens, dtype=np.int64)
        (starts,) = np.nonzero((np.lib.stride_tricks.sliding_window_view(tokens, T + 1) == window).all(axis=1))
        assert len(starts) == 1
        found.append((source, int(starts[0])))
    return found


def take(loader: TrainLoader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(steps)]


def test_layout_windows_and_disjoint_validation(tmp_path: Path) -> None:
    dataset = build(tmp_path)
    stats = {s["name"]: s for s in dataset.stats()}
    # a: 3001 tokens (with EOS) = 187 windows of 16; val = ceil(18.7) = 19 windows from token 3001 - 305 = 2696
    assert (stats["a"]["tokens"], stats["a"]["train_windows"], stats["a"]["val_windows"]) == (3001, 168, 19)
    assert dataset.layouts[0].val_start == 2696 and 168 * T + 1 <= 2696
    assert (stats["c"]["train_windows"], stats["c"]["val_windows"]) == (38, 5)
    assert dataset.num_train_tokens == (168 + 83 + 38) * T
    # every validation window exactly once; none overlaps a training window's tokens
    val = list(dataset.val_batches(batch_size=7))
    assert [len(x) for x, _ in val] == [7] * 4 + [6]  # 19 + 10 + 5 = 34 windows
    located = [loc for x, y in val for loc in locate(dataset, x, y)]
    for i, layout in enumerate(dataset.layouts):
        starts = sorted(s for source, s in located if source == i)
        assert starts == [layout.val_start + j * T for j in range(layout.val_windows)]
    loader = dataset.train_loader(batch_size=10)
    for x, y in take(loader, 30):
        for source, start in locate(dataset, x, y):
            assert start % T == 0 and start + T < dataset.layouts[source].val_start  # last token before validation


def test_val_batches_are_fixed_and_filterable(tmp_path: Path) -> None:
    dataset, other_seed = build(tmp_path), build(tmp_path, seed=5)
    first = list(dataset.val_batches(4, max_batches=3))
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, other_seed.val_batches(4, max_batches=3), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    only_c = list(dataset.val_batches(2, source="c"))
    assert [len(x) for x, _ in only_c] == [2, 2, 1]
    assert all(source_of(t) == 2 for x, _ in only_c for t in x[:, 0].tolist())
    with pytest.raises(DataError, match="no data source named 'd'"):
        dataset.val_batches(2, source="d")


def test_each_epoch_of_a_source_visits_every_window_once_in_a_new_order(tmp_path: Path) -> None:
    dataset = build(tmp_path, specs=[SOURCES[2]])  # 38 training windows
    rows = [loc for x, y in take(dataset.train_loader(batch_size=4), 19) for loc in locate(dataset, x, y)]
    epoch0, epoch1 = [s for _, s in rows[:38]], [s for _, s in rows[38:76]]
    assert sorted(epoch0) == sorted(epoch1) == [j * T for j in range(38)]
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)


def test_mixture_proportions_follow_the_weights_at_every_step(tmp_path: Path) -> None:
    dataset = build(tmp_path)
    loader = dataset.train_loader(batch_size=20)
    counts = np.zeros(3)
    for step in range(1, 51):
        x, _ = next(loader)
        for first in x[:, 0].tolist():
            counts[source_of(first)] += 1
        assert np.abs(counts - step * 20 * np.array([0.6, 0.3, 0.1])).max() <= 1
    assert counts.tolist() == [600, 300, 100]
    # 600 rows of a = 3.57 epochs of its 168 windows
    assert loader.epochs() == pytest.approx({"a": 600 / 168, "b": 300 / 83, "c": 100 / 38})


def test_order_is_determined_by_the_seed(tmp_path: Path) -> None:
    a, b, c = (build(tmp_path, seed=s).train_loader(batch_size=8) for s in (0, 0, 1))
    batches_a, batches_b, batches_c = take(a, 10), take(b, 10), take(c, 10)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(batches_a, batches_b, strict=True))
    assert not any(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(batches_a, batches_c, strict=True))


def test_rank_slices_concatenate_to_the_single_process_batch(tmp_path: Path) -> None:
    dataset = build(tmp_path)
    single = dataset.train_loader(batch_size=6)
    ranks = [dataset.train_loader(batch_size=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(100):  # 600 rows: every source wraps into later epochs
        x, y = next(single)
        parts = [next(loader) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(loader.state_dict() == single.state_dict() for loader in ranks)
    with pytest.raises(DataError, match="rank must be in"):
        dataset.train_loader(batch_size=2, rank=3, world_size=3)


def test_resume_yields_exactly_the_batches_that_would_have_come_next(tmp_path: Path) -> None:
    dataset = build(tmp_path)
    original = dataset.train_loader(batch_size=4)
    take(original, 13)
    state = json.loads(json.dumps(original.state_dict()))  # survives serialisation
    assert state["taken"] == {"a": 31, "b": 16, "c": 5}
    expected = take(original, 40)
    restored = build(tmp_path).train_loader(batch_size=4)
    restored.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(take(restored, 40), expected, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # the position is global: two ranks of 2 rows continue the same stream
    ranks = [build(tmp_path).train_loader(batch_size=2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    for x, _ in expected[:10]:
        assert torch.equal(torch.cat([next(loader)[0] for loader in ranks]), x)


def test_resume_into_different_data_is_refused(tmp_path: Path) -> None:
    state = build(tmp_path).train_loader(batch_size=4).state_dict()
    for other in (build(tmp_path, seq_len=8), build(tmp_path, seed=1), build(tmp_path, specs=SOURCES[:2])):
        with pytest.raises(DataError, match="different data"):
            other.train_loader(batch_size=4).load_state_dict(state)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n: int) -> None:
    perm = feistel_permute(np.arange(n), n, key=12345)
    assert sorted(perm.tolist()) == list(range(n))
    assert np.array_equal(feistel_permute(np.arange(n)[::-1].copy(), n, key=12345), perm[::-1])  # pointwise
    if n >= 64:
        other = feistel_permute(np.arange(n), n, key=54321)
        assert (perm == other).mean() < 0.1 and (perm == np.arange(n)).mean() < 0.1
        # no visible order: rank correlation with the identity near zero
        assert abs(np.corrcoef(np.arange(n), perm)[0, 1]) < 0.3


def test_unigram_entropy_mixes_the_sources_token_frequencies_by_weight(tmp_path: Path) -> None:
    # one letter per source: the mixture's frequencies are the weights (plus each source's closing EOS)
    dataset = build(tmp_path, specs=[("a", "a", 999, 3.0), ("b", "b", 999, 1.0)])
    assert [shard.num_tokens for shard in dataset.shards] == [1000, 1000]  # the letters and one EOS
    eos = 0.75 * 0.001 + 0.25 * 0.001
    p = np.array([0.75 * 0.999, 0.25 * 0.999, eos])
    assert dataset.unigram_entropy(TOKENIZER.vocab_size) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    # from each source's first 500 tokens only: the letters alone
    expected = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert dataset.unigram_entropy(TOKENIZER.vocab_size, max_tokens=500) == pytest.approx(expected, rel=1e-12)
