"""Optimizers, importable as `onnxgrad.optim.SGD`, `Adam`, `AdamW` (PyTorch's spelling).

They live in `onnxgrad.train.optim`; this module only re-exports them.
"""

from __future__ import annotations

from onnxgrad.train.optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "clip_grad_norm"]
