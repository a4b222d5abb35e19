"""Training: losses appended as ONNX nodes, optimizers, data handling and the Trainer loop."""

from __future__ import annotations

from onnxgrad.train.data import DataError, batches, load_npz, split
from onnxgrad.train.losses import LOSSES, append_loss
from onnxgrad.train.optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm
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
    "load_npz",
    "split",
]
