import math

import pytest

from orionlm.errors import OrionError
from orionlm.train.schedule import ScheduleConfig, ScheduleError, lr_factor


def cosine(t: float, floor: float) -> float:
    """The textbook cosine annealing from 1 to floor, t in [0, 1]."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def test_cosine_key_points() -> None:
    config = ScheduleConfig(kind="cosine", warmup_steps=100, min_lr_ratio=0.1)
    f = [lr_factor(s, 1000, config) for s in range(1000)]
    assert f[0] == 1 / 100  # the first step already learns
    assert f[49] == 50 / 100
    assert f[99] == 1.0  # end of warm-up: the peak
    # decay over steps 100..999 (900 steps), step s at progress (s - 99) / 900
    assert f[100] == pytest.approx(cosine(1 / 900, 0.1), rel=1e-12)
    assert f[549] == pytest.approx(0.55, rel=1e-12)  # half way down
    assert f[774] == pytest.approx(cosine(0.75, 0.1), rel=1e-12)
    assert f[999] == 0.1  # the last step is at the floor, exactly
    assert all(a < b for a, b in zip(f[:100], f[1:100], strict=False))
    assert all(a >= b for a, b in zip(f[99:], f[100:], strict=False))


def test_cosine_without_warmup_and_warmup_fraction() -> None:
    assert lr_factor(0, 10, ScheduleConfig(warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(cosine(0.1, 0.0))
    assert lr_factor(9, 10, ScheduleConfig(warmup_steps=0, min_lr_ratio=0.0)) == 0.0
    by_fraction = ScheduleConfig(warmup_steps=7, warmup_fraction=0.1)  # the fraction wins: 100 of 1000 steps
    by_steps = ScheduleConfig(warmup_steps=100)
    assert [lr_factor(s, 1000, by_fraction) for s in range(1000)] == [lr_factor(s, 1000, by_steps) for s in range(1000)]


@pytest.mark.parametrize(
    ("shape", "at_quarter", "at_half"),
    [
        ("linear", 0.1 + 0.9 * 0.75, 0.55),
        ("cosine", cosine(0.25, 0.1), 0.55),
        ("sqrt", 0.1 + 0.9 * 0.5, 0.1 + 0.9 * (1 - math.sqrt(0.5))),
    ],
)
def test_wsd_flat_then_decay(shape: str, at_quarter: float, at_half: float) -> None:
    config = ScheduleConfig(kind="wsd", warmup_steps=100, decay_fraction=0.2, min_lr_ratio=0.1, decay_shape=shape)
    f = [lr_factor(s, 1000, config) for s in range(1000)]
    assert f[0] == 0.01 and f[99] == 1.0
    assert f[100:800] == [1.0] * 700  # stable until the last 200 steps
    # decay over steps 800..999, step s at progress (s - 799) / 200
    assert f[849] == pytest.approx(at_quarter, rel=1e-12)
    assert f[899] == pytest.approx(at_half, rel=1e-12)
    assert f[999] == 0.1
    assert all(a > b for a, b in zip(f[799:], f[800:], strict=False))


def test_wsd_linear_steps() -> None:
    linear = ScheduleConfig(kind="wsd", warmup_steps=0, decay_fraction=0.5, min_lr_ratio=0.0, decay_shape="linear")
    assert [lr_factor(s, 10, linear) for s in range(10)] == pytest.approx([1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_constant() -> None:
    config = ScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_factor(s, 8, config) for s in range(8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert lr_factor(0, 3, ScheduleConfig(kind="constant", warmup_steps=0)) == 1.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(kind="cosin"), "did you mean 'cosine'"),
        (dict(decay_shape="lin"), "did you mean 'linear'"),
        (dict(decay_fraction=0.0), "decay_fraction"),
        (dict(decay_fraction=1.5), "decay_fraction"),
        (dict(warmup_fraction=1.0), "warmup_fraction"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(warmup_steps=-1), "warmup_steps"),
    ],
)
def test_invalid_settings(settings: dict, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        ScheduleConfig(**settings)
    assert issubclass(ScheduleError, OrionError)


def test_phases_that_do_not_fit() -> None:
    with pytest.raises(ScheduleError, match=r"warm-up \(100 steps\).*total_steps \(100\)"):
        lr_factor(0, 100, ScheduleConfig(kind="cosine", warmup_steps=100))
    with pytest.raises(ScheduleError, match=r"warm-up \(90 steps\) and decay \(20 steps\)"):
        lr_factor(0, 100, ScheduleConfig(kind="wsd", warmup_steps=90, decay_fraction=0.2))
    with pytest.raises(ScheduleError, match="outside"):
        lr_factor(100, 100, ScheduleConfig(warmup_steps=10))
    with pytest.raises(ScheduleError, match="total_steps"):
        lr_factor(0, 0, ScheduleConfig(warmup_steps=0))
