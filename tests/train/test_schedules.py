"""Learning-rate schedules against torch.optim.lr_scheduler, step for step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from onnxgrad.train.schedules import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    SequentialLR,
    StepLR,
    make_schedule,
    warmup_cosine,
)

BASE = 0.1


def torch_lrs(make, steps: int) -> list[float]:
    """The learning rate torch uses at each of `steps` optimizer steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE)
    scheduler = make(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def ours(schedule, steps: int) -> list[float]:
    return [schedule(k, BASE) for k in range(steps)]


CASES = [
    (StepLR(3, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), 12),
    (StepLR(1), lambda o: torch.optim.lr_scheduler.StepLR(o, 1), 5),
    (CosineAnnealingLR(10), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10), 11),
    (
        CosineAnnealingLR(7, 0.01),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 7, 0.01),
        8,
    ),
    (LinearLR(0.1, 1.0, 4), lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 4), 8),
    (LinearLR(1.0, 0.2, 5), lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.2, 5), 9),
    (LinearLR(), lambda o: torch.optim.lr_scheduler.LinearLR(o), 8),
    (
        SequentialLR([LinearLR(0.25, 1.0, 3), CosineAnnealingLR(6)], [3]),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, 0.25, 1.0, 3),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, 6),
            ],
            [3],
        ),
        9,
    ),
    (
        SequentialLR([LinearLR(0.5, 1.0, 2), StepLR(2, 0.5)], [2]),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, 0.5, 1.0, 2),
                torch.optim.lr_scheduler.StepLR(o, 2, 0.5),
            ],
            [2],
        ),
        8,
    ),
]


@pytest.mark.parametrize(
    "schedule, make, steps", CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(CASES)]
)
def test_matches_torch(schedule, make, steps):
    np.testing.assert_allclose(
        ours(schedule, steps), torch_lrs(make, steps), rtol=1e-12, atol=1e-15
    )


def test_warmup_cosine_is_warmup_then_cosine():
    schedule = warmup_cosine(4, 20, start_factor=0.1, eta_min=0.001)
    lrs = ours(schedule, 21)
    assert lrs[0] == pytest.approx(0.1 * BASE)
    assert lrs[:5] == sorted(lrs[:5])  # rising during the warm-up
    assert lrs[4] == pytest.approx(BASE)  # the cosine starts at the base rate
    assert lrs[4:] == sorted(lrs[4:], reverse=True)
    assert lrs[20] == pytest.approx(0.001)
    assert warmup_cosine(0, 10)(5, 1.0) == pytest.approx(0.5)


def test_make_schedule():
    assert make_schedule("constant", 10) is None
    assert make_schedule(None, 10) is None
    warm = make_schedule("constant", 10, warmup_steps=2)
    assert [warm(k, 1.0) for k in range(4)] == pytest.approx([0.01, 0.505, 1.0, 1.0])
    step = make_schedule("step", 9)
    assert [step(k, 1.0) for k in (0, 2, 3, 6)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    cosine = make_schedule("cosine", 10, warmup_steps=2, eta_min=0.5)
    assert cosine(2, 1.0) == pytest.approx(1.0) and cosine(10, 1.0) == pytest.approx(0.5)
    assert cosine(6, 1.0) == pytest.approx(0.5 + 0.5 * (1 + math.cos(math.pi / 2)) / 2)
    assert ConstantLR()(7, 0.3) == 0.3
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="step_size"):
        StepLR(0)
    with pytest.raises(ValueError, match="t_max"):
        CosineAnnealingLR(0)
    with pytest.raises(ValueError, match="start_factor"):
        LinearLR(0.0)
    with pytest.raises(ValueError, match="milestones"):
        SequentialLR([StepLR(1), StepLR(1)], [])
    with pytest.raises(ValueError, match="increasing"):
        SequentialLR([StepLR(1), StepLR(1), StepLR(1)], [4, 2])
    assert "StepLR(step_size=3" in repr(StepLR(3))
