"""Learning-rate schedules: the learning rate as a function of the optimizer step.

Each schedule maps (step, base learning rate) to the learning rate of that step, where
`step` counts the optimizer updates made before it (0 for the first update). The formulas
are the closed forms of `torch.optim.lr_scheduler`, with `step` playing the part of the
number of `scheduler.step()` calls made so far:

- `StepLR`:  lr = base · γ^⌊step / step_size⌋
- `CosineAnnealingLR`:  lr = η_min + (base − η_min) · (1 + cos(π · step / T_max)) / 2
- `LinearLR` (linear warm-up):  lr = base · (f₀ + (f₁ − f₀) · min(step, total) / total)
- `SequentialLR`:  schedule k runs on its own step count (step − milestone k) between its
  milestones, so "warm-up then cosine" is `SequentialLR([LinearLR(...), CosineAnnealingLR(...)],
  [warmup])`; `warmup_cosine` builds exactly that.

A schedule is a pure function of the step, so a resumed run needs nothing but the step
count and the base learning rate to continue where it stopped.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


class Schedule:
    """Base class: `lr(step, base_lr)` gives the learning rate of optimizer step `step`."""

    def lr(self, step: int, base_lr: float) -> float:
        """The learning rate of the update numbered `step` (0-based).

        Args:
            step: optimizer updates made before this one.
            base_lr: the optimizer's learning rate before scheduling.
        """
        raise NotImplementedError

    def __call__(self, step: int, base_lr: float) -> float:
        return self.lr(step, base_lr)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantLR(Schedule):
    """No schedule: lr = base at every step."""

    def lr(self, step: int, base_lr: float) -> float:
        return base_lr


class StepLR(Schedule):
    """Decay by `gamma` every `step_size` steps: lr = base · γ^⌊step / step_size⌋.

    Args:
        step_size: steps between two decays (>= 1).
        gamma: the decay factor.
    """

    def __init__(self, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)

    def lr(self, step: int, base_lr: float) -> float:
        return base_lr * self.gamma ** (step // self.step_size)


class CosineAnnealingLR(Schedule):
    """Half a cosine from base down to η_min over `t_max` steps.

    lr = η_min + (base − η_min) · (1 + cos(π · step / T_max)) / 2. As in PyTorch, the
    cosine goes on past T_max (rising again); give T_max = the number of steps to train.

    Args:
        t_max: the steps of the half period (>= 1).
        eta_min: the lowest learning rate.
    """

    def __init__(self, t_max: int, eta_min: float = 0.0):
        if t_max < 1:
            raise ValueError(f"t_max must be >= 1, got {t_max}")
        self.t_max = int(t_max)
        self.eta_min = float(eta_min)

    def lr(self, step: int, base_lr: float) -> float:
        cosine = (1.0 + math.cos(math.pi * step / self.t_max)) / 2.0
        return self.eta_min + (base_lr - self.eta_min) * cosine


class LinearLR(Schedule):
    """Scale the learning rate linearly from `start_factor` to `end_factor` over `total_iters`
    steps, then hold it: lr = base · (f₀ + (f₁ − f₀) · min(step, total) / total).

    With the default end_factor 1 this is a linear warm-up.

    Args:
        start_factor: f₀, the factor of the first step (> 0).
        end_factor: f₁, the factor from step `total_iters` on.
        total_iters: the steps of the ramp (>= 1).
    """

    def __init__(
        self, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5
    ):
        if not 0.0 < start_factor <= 1.0 or not 0.0 <= end_factor <= 1.0:
            raise ValueError(
                f"start_factor must lie in (0, 1] and end_factor in [0, 1], got {start_factor} "
                f"and {end_factor}"
            )
        if total_iters < 1:
            raise ValueError(f"total_iters must be >= 1, got {total_iters}")
        self.start_factor = float(start_factor)
        self.end_factor = float(end_factor)
        self.total_iters = int(total_iters)

    def lr(self, step: int, base_lr: float) -> float:
        done = min(step, self.total_iters) / self.total_iters
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * done)


class SequentialLR(Schedule):
    """Run schedules one after the other, switching at the milestones.

    Schedule k covers steps [milestone k−1, milestone k) and sees them counted from its own
    start (step − milestone k−1), as PyTorch's SequentialLR does.

    Args:
        schedules: n schedules.
        milestones: n − 1 increasing steps at which the next schedule takes over.
    """

    def __init__(self, schedules: Sequence[Schedule], milestones: Sequence[int]):
        if len(schedules) != len(milestones) + 1:
            raise ValueError(
                f"{len(schedules)} schedules need {len(schedules) - 1} milestones, got "
                f"{len(milestones)}"
            )
        if list(milestones) != sorted(milestones) or any(m < 0 for m in milestones):
            raise ValueError(f"milestones must be increasing and >= 0, got {list(milestones)}")
        self.schedules = list(schedules)
        self.milestones = [int(m) for m in milestones]

    def lr(self, step: int, base_lr: float) -> float:
        k = bisect.bisect_right(self.milestones, step)
        start = self.milestones[k - 1] if k else 0
        return self.schedules[k].lr(step - start, base_lr)


def warmup_cosine(
    warmup_steps: int, total_steps: int, start_factor: float = 0.01, eta_min: float = 0.0
) -> Schedule:
    """A linear warm-up over `warmup_steps`, then a cosine down to `eta_min` at `total_steps`.

    Args:
        warmup_steps: steps of the warm-up (0: cosine only).
        total_steps: the steps of the whole run.
        start_factor: the warm-up's first factor.
        eta_min: the final learning rate.
    """
    cosine = CosineAnnealingLR(max(total_steps - warmup_steps, 1), eta_min)
    if warmup_steps <= 0:
        return cosine
    return SequentialLR([LinearLR(start_factor, 1.0, warmup_steps), cosine], [warmup_steps])


def make_schedule(
    kind: str | None,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    step_size: int | None = None,
    gamma: float = 0.1,
    eta_min: float = 0.0,
    warmup_start: float = 0.01,
) -> Schedule | None:
    """A schedule by name, for the command line: "constant", "step" or "cosine", each after
    an optional linear warm-up of `warmup_steps`.

    Args:
        kind: "constant", "step", "cosine", or None (constant).
        total_steps: the optimizer steps of the whole run (sets the cosine's period).
        warmup_steps: steps of linear warm-up before the schedule starts (0: none).
        step_size: for "step": steps between decays (default: a third of the run).
        gamma: for "step": the decay factor.
        eta_min: for "cosine": the final learning rate.
        warmup_start: the warm-up's first factor.

    Returns:
        The schedule, or None for a constant learning rate without warm-up.
    """
    kind = kind or "constant"
    after = max(total_steps - warmup_steps, 1)
    if kind == "constant":
        main: Schedule | None = None if warmup_steps <= 0 else ConstantLR()
    elif kind == "step":
        main = StepLR(step_size or max(after // 3, 1), gamma)
    elif kind == "cosine":
        main = CosineAnnealingLR(after, eta_min)
    else:
        raise ValueError(f"unknown schedule '{kind}': choose constant, step or cosine")
    if warmup_steps <= 0 or main is None:
        return main
    return SequentialLR([LinearLR(warmup_start, 1.0, warmup_steps), main], [warmup_steps])
