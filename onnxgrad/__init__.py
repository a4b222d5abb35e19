"""onnxgrad: fine-tune ONNX models and write training graphs any ONNX runtime can run.

The pipeline, one stage a module: `load` (import) → `gradient_model` (autodiff) →
`Session` (executor) → `Trainer` (losses, optimizers, loop) → `save` (export).
"""

from __future__ import annotations

from onnxgrad import optim
from onnxgrad.autodiff.builder import gradient_model
from onnxgrad.errors import (
    DataError,
    ExecutionError,
    ExportError,
    GradientError,
    MissingGradientError,
    ModelLoadError,
    NonFiniteLossError,
    OnnxgradError,
    UnsupportedOpError,
)
from onnxgrad.export import export_training_model, save_model
from onnxgrad.importer import load, trainable_parameters
from onnxgrad.runtime.session import Session
from onnxgrad.train.step import build_step_model
from onnxgrad.train.trainer import Trainer
from onnxgrad.train.training_info import TrainingSession, training_info_model

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "ExecutionError",
    "ExportError",
    "GradientError",
    "MissingGradientError",
    "ModelLoadError",
    "NonFiniteLossError",
    "OnnxgradError",
    "Session",
    "Trainer",
    "TrainingSession",
    "UnsupportedOpError",
    "build_step_model",
    "export_training_model",
    "gradient_model",
    "load",
    "optim",
    "save_model",
    "trainable_parameters",
    "training_info_model",
]
