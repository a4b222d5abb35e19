"""The exceptions every onnxgrad stage raises.

Each message answers three questions in one line: what failed, where (node, op type,
opset, tensor), and what the user can do about it.
"""

from __future__ import annotations


class OnnxgradError(Exception):
    """Base class of every error onnxgrad raises on purpose."""


class ModelLoadError(OnnxgradError):
    """The model file or proto cannot be read, checked or normalized."""


class UnsupportedOpError(OnnxgradError):
    """An op (or an attribute value of it) that a stage cannot handle."""

    def __init__(self, op_type: str, node: str, opset: int, domain: str = "", detail: str = ""):
        self.op_type = op_type
        self.node = node
        self.opset = opset
        self.domain = domain
        where = f"{domain}::{op_type}" if domain else op_type
        msg = f"{where} (node '{node}', opset {opset}) is not supported"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class MissingGradientError(OnnxgradError):
    """One or more ops between the loss and the parameters have no gradient rule.

    Attributes:
        missing: (op_type, domain, opset, node name) for every node that lacks a rule.
    """

    def __init__(self, missing: list[tuple[str, str, int, str]]):
        self.missing = missing
        parts = [
            f"{(d + '::') if d else ''}{op} (opset {v}) at node '{n}'" for op, d, v, n in missing
        ]
        super().__init__(
            f"no gradient rule for {len(missing)} node(s) on the loss's path: "
            + "; ".join(parts)
            + ". Freeze the parameters behind them (wrt=/--trainable) or file an issue."
        )


class GradientError(OnnxgradError):
    """The gradient graph cannot be built (bad loss or wrt names, shapes, ...)."""


class ExecutionError(OnnxgradError):
    """A kernel failed or the feeds do not match the model."""


class NonFiniteLossError(OnnxgradError):
    """Training produced a NaN or infinite loss or gradient."""


class DataError(OnnxgradError, ValueError):
    """Training data that is missing, unreadable, or does not fit the model."""


class CheckpointError(OnnxgradError):
    """A checkpoint that cannot be read, or does not fit the trainer resuming from it."""


class UsageError(OnnxgradError):
    """A bad command line: unknown option, missing argument, value out of range."""


class MissingDependencyError(OnnxgradError):
    """An optional package a feature needs is not installed (the message names the extra)."""


class ExportError(OnnxgradError):
    """Trained weights cannot be written back."""
