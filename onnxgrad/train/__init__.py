"""Training: losses appended as ONNX nodes, optimizers, data handling and the Trainer loop."""

from __future__ import annotations

from onnxgrad.train.data import DataError, batches, load_npz, split
from onnxgrad.train.losses import LOSSES, append_loss
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
from onnxgrad.train.trainer import Trainer

__all__ = [
    "LOSSES",
    "SGD",
    "Adam",
    "AdamW",
    "DataError",
    "Optimizer",
    "Trainer",
    "append_loss",
    "batches",
    "clip_grad_norm",
    "clip_grad_value",
    "ConstantLR",
    "CosineAnnealingLR",
    "LinearLR",
    "Schedule",
    "SequentialLR",
    "StepLR",
    "warmup_cosine",
    "load_npz",
    "split",
]
