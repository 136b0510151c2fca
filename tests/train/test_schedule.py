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
    by_fraction = ScheduleConfig(warmup_fraction=0.1)  # 100 of 1000 steps
    by_steps = ScheduleConfig(warmup_steps=100)
    assert [lr_factor(s, 1000, by_fraction) for s in range(1000)] == [lr_factor(s, 1000, by_steps) for s in range(1000)]
    assert ScheduleConfig(warmup_fraction=0.0).phases(1000) == (0, 1000)


def test_the_default_warmup_is_five_percent_of_the_run() -> None:
    assert [ScheduleConfig().phases(total) for total in (20, 600, 10_000)] == [(1, 19), (30, 570), (500, 9500)]
    assert ScheduleConfig(kind="constant").phases(20) == (1, 0)


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
        (dict(warmup_steps=10, warmup_fraction=0.1), "one of warmup_steps and warmup_fraction"),
    ],
)
def test_invalid_settings(settings: dict, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        ScheduleConfig(**settings)
    assert issubclass(ScheduleError, OrionError)


def test_a_warmup_that_does_not_fit_is_cut_to_the_room_left_with_a_warning() -> None:
    cosine_30 = ScheduleConfig(kind="cosine", warmup_steps=30)
    assert cosine_30.phases(20) == (19, 1)  # the cosine keeps one decay step: the last step is at the floor
    assert [lr_factor(s, 20, cosine_30) for s in (0, 18, 19)] == [1 / 19, 1.0, 0.1]
    assert cosine_30.warmup_warning(20) == (
        "warning: the warm-up (30 steps) does not fit a 20-step run: warming up over 19 steps "
        "(schedule.warmup_fraction scales the warm-up with the run)"
    )
    assert cosine_30.warmup_warning(31) is None and cosine_30.phases(31) == (30, 1)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=90, decay_fraction=0.2)
    assert wsd.phases(100) == (80, 20) and "fit a 100-step run with 20 decay steps: warming up over 80" in (
        wsd.warmup_warning(100)
    )
    assert ScheduleConfig(kind="constant", warmup_steps=30).phases(20) == (20, 0)
    assert ScheduleConfig(warmup_fraction=0.99).phases(10) == (9, 1)  # round(9.9) = 10 steps leave no decay
    assert ScheduleConfig(warmup_steps=5).phases(1) == (0, 1)


def test_steps_outside_the_run() -> None:
    with pytest.raises(ScheduleError, match="outside"):
        lr_factor(100, 100, ScheduleConfig(warmup_steps=10))
    with pytest.raises(ScheduleError, match="total_steps"):
        lr_factor(0, 0, ScheduleConfig(warmup_steps=0))
