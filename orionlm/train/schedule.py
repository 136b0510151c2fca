"""Learning-rate schedules, as a factor of each param group's peak lr: lr = base_lr * lr_factor(step, total, config).

Steps are 0-based; a run of `total_steps` optimizer steps uses steps 0 .. total_steps - 1.

- Warm-up (every kind): factor (step + 1) / warmup for step < warmup, so the first step already learns and step
  warmup - 1 reaches the peak (1.0). The warm-up is `warmup_steps`, or `warmup_fraction` of the run (give one;
  neither: 5% of the run, so that a short run warms up as briefly as a long one, in proportion). A warm-up that
  leaves no room for the decay (e.g. 30 steps in a 20-step run) is cut to the room left, with a warning.
- "cosine": after the warm-up, cosine from the peak down to the floor `min_lr_ratio`, reached at the last step.
- "wsd" (warm-up, stable, decay): the peak until the last `decay_fraction` of the steps, then down to the floor
  (reached at the last step) with the shape `decay_shape`: "cosine", "linear" or "sqrt" (1 - sqrt, Hägele et
  al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").
- "constant": the peak after the warm-up.

A decay phase of n steps gives its i-th step (i = 1 .. n) the progress i / n, so the step before it is at the
peak and its last step at the floor; "cosine" is a WSD whose decay starts right after the warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import OrionError, checker, unknown_names

KINDS = ("cosine", "wsd", "constant")
DEFAULT_WARMUP_FRACTION = 0.05
DECAY_SHAPES = ("cosine", "linear", "sqrt")


class ScheduleError(OrionError):
    """A learning-rate schedule that cannot be used; the message says what to change."""


@dataclass
class ScheduleConfig:
    """The learning-rate schedule of a training run (see the module docstring)."""

    kind: str = "cosine"
    warmup_steps: int | None = None  # give warmup_steps or warmup_fraction (neither: DEFAULT_WARMUP_FRACTION)
    warmup_fraction: float | None = None  # the warm-up as a fraction of the run: round(fraction * total_steps)
    min_lr_ratio: float = 0.1  # the floor, as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: decay over the last fraction of the steps
    decay_shape: str = "cosine"  # wsd: "cosine" | "linear" | "sqrt"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need = checker(ScheduleError)

        need(self.kind in KINDS, f"unknown schedule kind {unknown_names([self.kind], KINDS)}; use one of {KINDS}")
        need(
            self.decay_shape in DECAY_SHAPES,
            f"unknown decay_shape {unknown_names([self.decay_shape], DECAY_SHAPES)}; use one of {DECAY_SHAPES}",
        )
        need(
            self.warmup_steps is None or self.warmup_fraction is None,
            "give one of warmup_steps and warmup_fraction, not both",
        )
        need(self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps ({self.warmup_steps}) must be >= 0")
        need(
            self.warmup_fraction is None or 0 <= self.warmup_fraction < 1,
            f"warmup_fraction ({self.warmup_fraction}) must be in [0, 1), e.g. 0.01",
        )
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1], e.g. 0.1")
        need(0 < self.decay_fraction <= 1, f"decay_fraction ({self.decay_fraction}) must be in (0, 1], e.g. 0.2")

    def requested_warmup(self, total_steps: int) -> int:
        """The warm-up steps the config asks for in a run of total_steps, before phases() fits them in."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        fraction = DEFAULT_WARMUP_FRACTION if self.warmup_fraction is None else self.warmup_fraction
        return round(fraction * total_steps)

    def phases(self, total_steps: int) -> tuple[int, int]:
        """(warm-up steps, decay steps) of a run of total_steps. The decay keeps its length (cosine: at least one
        step) and the warm-up is cut to the steps left before it; warmup_warning() says when it was."""
        if total_steps < 1:
            raise ScheduleError(f"total_steps ({total_steps}) must be >= 1")
        requested = self.requested_warmup(total_steps)
        if self.kind == "cosine":
            warmup = min(requested, total_steps - 1)
            return warmup, total_steps - warmup
        decay = max(1, round(self.decay_fraction * total_steps)) if self.kind == "wsd" else 0
        return min(requested, total_steps - decay), decay

    def warmup_warning(self, total_steps: int) -> str | None:
        """One line saying that the warm-up asked for does not fit a run of total_steps and what it became."""
        requested, (warmup, decay) = self.requested_warmup(total_steps), self.phases(total_steps)
        if warmup == requested:
            return None
        room = f"a {total_steps}-step run" + (f" with {decay} decay steps" if self.kind == "wsd" else "")
        return (f"warning: the warm-up ({requested} steps) does not fit {room}: warming up over {warmup} steps "
                "(schedule.warmup_fraction scales the warm-up with the run)")  # fmt: skip


def _decay(progress: float, shape: str, floor: float) -> float:
    """The factor at `progress` (0: peak, 1: floor) through a decay of this shape."""
    if shape == "cosine":
        left = 0.5 * (1 + math.cos(math.pi * progress))
    elif shape == "linear":
        left = 1 - progress
    else:  # "sqrt"
        left = 1 - math.sqrt(progress)
    return floor + (1 - floor) * left


def lr_factor(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """The learning rate at 0-based `step` of a run of `total_steps` steps, as a fraction of the peak."""
    warmup, decay = config.phases(total_steps)
    if not 0 <= step < total_steps:
        raise ScheduleError(f"step {step} is outside the run's steps 0 .. {total_steps - 1}")
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps - decay
    if step < decay_start:
        return 1.0
    shape = "cosine" if config.kind == "cosine" else config.decay_shape
    return _decay((step - decay_start + 1) / decay, shape, config.min_lr_ratio)
