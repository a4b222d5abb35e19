"""Derivative rules for elementwise arithmetic and unary math.

Broadcasting ops return gradients shaped like their output; the builder reduces them to
each input's shape.
"""

from __future__ import annotations

import math

from onnxgrad.autodiff.rules import non_differentiable, rule, zero


@rule("Add", broadcast=True)
def add(b, node, dys):
    """y = A + B  →  dA = dy, dB = dy"""
    dy = dys[0]
    return [dy, dy]


@rule("Sub", broadcast=True)
def sub(b, node, dys):
    """y = A − B  →  dA = dy, dB = −dy"""
    dy = dys[0]
    return [dy, b.Neg(dy) if node.needs_grad(1) else None]


@rule("Mul", broadcast=True)
def mul(b, node, dys):
    """y = A · B  →  dA = dy · B, dB = dy · A"""
    dy = dys[0]
    a, c = node.input
    return [
        b.Mul(dy, c) if node.needs_grad(0) else None,
        b.Mul(dy, a) if node.needs_grad(1) else None,
    ]


@rule("Div", broadcast=True)
def div(b, node, dys):
    """y = A / B  →  dA = dy / B, dB = −dy · y / B"""
    dy = dys[0]
    a, c = node.input
    y = node.output[0]
    return [
        b.Div(dy, c) if node.needs_grad(0) else None,
        b.Neg(b.Div(b.Mul(dy, y), c)) if node.needs_grad(1) else None,
    ]


@rule("Pow", broadcast=True)
def pow_(b, node, dys):
    """y = X ** Y  →  dX = dy · Y · X ** (Y − 1), dY = dy · y · ln X

    dY uses ln X, defined for X > 0 only; where X <= 0 it is NaN, as in PyTorch.
    """
    dy = dys[0]
    x, p = node.input
    y = node.output[0]
    dx = dp = None
    if node.needs_grad(0):
        p_like = b.CastLike(p, x) if b.dtype(p) != b.dtype(x) else p
        one = b.const(1.0, like=x)
        dx = b.Mul(dy, b.Mul(p_like, b.Pow(x, b.Sub(p_like, one))))
    if node.needs_grad(1):
        dp = b.Mul(dy, b.Mul(y, b.Log(x)))
    return [dx, dp]


@rule("Neg")
def neg(b, node, dys):
    """y = −x  →  dx = −dy"""
    return [b.Neg(dys[0])]


@rule("Exp")
def exp(b, node, dys):
    """y = eˣ  →  dx = dy · y"""
    return [b.Mul(dys[0], node.output[0])]


@rule("Log")
def log(b, node, dys):
    """y = ln x  →  dx = dy / x"""
    return [b.Div(dys[0], node.input[0])]


@rule("Sqrt")
def sqrt(b, node, dys):
    """y = √x  →  dx = dy / (2y)"""
    y = node.output[0]
    return [b.Div(dys[0], b.Mul(b.const(2.0, like=y), y))]


@rule("Reciprocal")
def reciprocal(b, node, dys):
    """y = 1/x  →  dx = −dy · y²"""
    y = node.output[0]
    return [b.Neg(b.Mul(dys[0], b.Mul(y, y)))]


@rule("Abs")
def abs_(b, node, dys):
    """y = |x|  →  dx = dy · sign(x)

    At x = 0 we take the subgradient 0 (sign(0) = 0), as PyTorch does.
    """
    return [b.Mul(dys[0], b.Sign(node.input[0]))]


@rule("Erf")
def erf(b, node, dys):
    """y = erf(x)  →  dx = dy · 2/√π · exp(−x²)"""
    x = node.input[0]
    scale = b.const(2.0 / math.sqrt(math.pi), like=x)
    return [b.Mul(dys[0], b.Mul(scale, b.Exp(b.Neg(b.Mul(x, x)))))]


@rule("Sum", broadcast=True)
def sum_(b, node, dys):
    """y = Σ xᵢ  →  dxᵢ = dy"""
    return [dys[0]] * len(node.input)


# Piecewise constant: the gradient is zero almost everywhere (and we take 0 at the jumps).
zero("Floor", "Ceil", "Round", "Sign")

non_differentiable(
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "Not",
    "IsNaN",
    "IsInf",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "BitwiseNot",
    "BitShift",
)
