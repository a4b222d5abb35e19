"""Derivative rules for ops that move or reshape data without changing values."""

from __future__ import annotations

from onnxgrad.autodiff.rules import non_differentiable, rule


@rule("Identity")
def identity(b, node, dys):
    """y = x  →  dx = dy"""
    return [dys[0]]


non_differentiable("Shape", "Size", "ConstantOfShape", "NonZero")
