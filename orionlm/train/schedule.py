"""Learning-rate schedules, as a factor of each param group's peak lr: lr = base_lr * lr_factor(step, total, config).

Steps are 0-based; a run of `total_steps` optimizer steps uses steps 0 .. total_steps - 1.

- Warm-up (every kind): factor (step + 1) / warmup_steps for step < warmup_steps, so the first step
  already learns and step warmup_steps - 1 reaches the peak (1.0).
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
DECAY_SHAPES = ("cosine", "linear", "sqrt")


class ScheduleError(OrionError):
    """A learning-rate schedule that cannot be used; the message says what to change."""


@dataclass
class ScheduleConfig:
    """The learning-rate schedule of a training run (see the module docstring)."""

    kind: str = "cosine"
    warmup_steps: int = 100
    warmup_fraction: float | None = None  # if given, replaces warmup_steps: round(fraction * total_steps)
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
        need(self.warmup_steps >= 0, f"warmup_steps ({self.warmup_steps}) must be >= 0")
        need(
            self.warmup_fraction is None or 0 <= self.warmup_fraction < 1,
            f"warmup_fraction ({self.warmup_fraction}) must be in [0, 1), e.g. 0.01",
        )
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1], e.g. 0.1")
        need(0 < self.decay_fraction <= 1, f"decay_fraction ({self.decay_fraction}) must be in (0, 1], e.g. 0.2")

    def phases(self, total_steps: int) -> tuple[int, int]:
        """(warm-up steps, decay steps) of a run of total_steps; raises ScheduleError if they do not fit."""
        if total_steps < 1:
            raise ScheduleError(f"total_steps ({total_steps}) must be >= 1")
        warmup = self.warmup_steps if self.warmup_fraction is None else round(self.warmup_fraction * total_steps)
        if self.kind == "cosine":
            decay = total_steps - warmup
        elif self.kind == "wsd":
            decay = max(1, round(self.decay_fraction * total_steps))
        else:
            decay = 0
        if warmup + decay > total_steps or (self.kind == "cosine" and decay < 1):
            raise ScheduleError(
                f"the {self.kind} schedule's warm-up ({warmup} steps) and decay ({decay} steps) do not fit in "
                f"total_steps ({total_steps}); lower warmup_steps (or warmup_fraction) or decay_fraction, "
                "or train longer"
            )
        return warmup, decay


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
