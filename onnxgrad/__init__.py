"""onnxgrad: fine-tune ONNX models and write training graphs any ONNX runtime can run.

The pipeline, one stage a module: `load` (import) → `gradient_model` (autodiff) →
`Session` (executor) → `Trainer` (losses, optimizers, loop) → `save` (export).
"""

from __future__ import annotations

from onnxgrad.autodiff.builder import gradient_model
from onnxgrad.errors import (
    ExecutionError,
    ExportError,
    GradientError,
    MissingGradientError,
    ModelLoadError,
    NonFiniteLossError,
    OnnxgradError,
    UnsupportedOpError,
)
from onnxgrad.importer import load, trainable_parameters
from onnxgrad.runtime.session import Session

__version__ = "0.1.0"

__all__ = [
    "ExecutionError",
    "ExportError",
    "GradientError",
    "MissingGradientError",
    "ModelLoadError",
    "NonFiniteLossError",
    "OnnxgradError",
    "Session",
    "UnsupportedOpError",
    "gradient_model",
    "load",
    "trainable_parameters",
]
