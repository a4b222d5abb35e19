"""Derivative rules for the trigonometric and hyperbolic functions and their inverses.

The inverse functions' derivatives are infinite at the ends of their domains (Asin and
Acos at ±1, Acosh at 1, Atanh at ±1); there the gradient is ±inf or NaN, as in PyTorch.
"""

from __future__ import annotations

from onnxgrad.autodiff.rules import rule


def _one(b, x: str) -> str:
    return b.const(1.0, like=x)


@rule("Sin")
def sin(b, node, dys):
    """y = sin x  →  dx = dy · cos x"""
    return [b.Mul(dys[0], b.Cos(node.input[0]))]


@rule("Cos")
def cos(b, node, dys):
    """y = cos x  →  dx = −dy · sin x"""
    return [b.Neg(b.Mul(dys[0], b.Sin(node.input[0])))]


@rule("Tan")
def tan(b, node, dys):
    """y = tan x  →  dx = dy · (1 + y²)"""
    y = node.output[0]
    return [b.Mul(dys[0], b.Add(_one(b, y), b.Mul(y, y)))]


@rule("Asin")
def asin(b, node, dys):
    """y = asin x  →  dx = dy / √(1 − x²)"""
    x = node.input[0]
    return [b.Div(dys[0], b.Sqrt(b.Sub(_one(b, x), b.Mul(x, x))))]


@rule("Acos")
def acos(b, node, dys):
    """y = acos x  →  dx = −dy / √(1 − x²)"""
    x = node.input[0]
    return [b.Neg(b.Div(dys[0], b.Sqrt(b.Sub(_one(b, x), b.Mul(x, x)))))]


@rule("Atan")
def atan(b, node, dys):
    """y = atan x  →  dx = dy / (1 + x²)"""
    x = node.input[0]
    return [b.Div(dys[0], b.Add(_one(b, x), b.Mul(x, x)))]


@rule("Sinh")
def sinh(b, node, dys):
    """y = sinh x  →  dx = dy · cosh x"""
    return [b.Mul(dys[0], b.Cosh(node.input[0]))]


@rule("Cosh")
def cosh(b, node, dys):
    """y = cosh x  →  dx = dy · sinh x"""
    return [b.Mul(dys[0], b.Sinh(node.input[0]))]


@rule("Asinh")
def asinh(b, node, dys):
    """y = asinh x  →  dx = dy / √(x² + 1)"""
    x = node.input[0]
    return [b.Div(dys[0], b.Sqrt(b.Add(b.Mul(x, x), _one(b, x))))]


@rule("Acosh")
def acosh(b, node, dys):
    """y = acosh x  →  dx = dy / √(x² − 1)"""
    x = node.input[0]
    return [b.Div(dys[0], b.Sqrt(b.Sub(b.Mul(x, x), _one(b, x))))]


@rule("Atanh")
def atanh(b, node, dys):
    """y = atanh x  →  dx = dy / (1 − x²)"""
    x = node.input[0]
    return [b.Div(dys[0], b.Sub(_one(b, x), b.Mul(x, x)))]
