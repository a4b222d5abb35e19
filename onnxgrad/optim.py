"""Optimizers and schedules, importable as `onnxgrad.optim.SGD`, `Adam`, `AdamW`,
`onnxgrad.optim.StepLR`, ... (PyTorch's spelling).

They live in `onnxgrad.train.optim` and `onnxgrad.train.schedules`; this module only
re-exports them.
"""

from __future__ import annotations

from onnxgrad.train.optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm, clip_grad_value
from onnxgrad.train.schedules import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    Schedule,
    SequentialLR,
    StepLR,
    warmup_cosine,
)

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "ConstantLR",
    "CosineAnnealingLR",
    "LinearLR",
    "Optimizer",
    "Schedule",
    "SequentialLR",
    "StepLR",
    "clip_grad_norm",
    "clip_grad_value",
    "warmup_cosine",
]
