"""Derivative rules for elementwise arithmetic and unary math.

Broadcasting ops return gradients shaped like their output; the builder reduces them to
each input's shape.
"""

from __future__ import annotations

import math

from onnxgrad.autodiff.rules import non_differentiable, rule, zero
from onnxgrad.importer import FLOAT_TYPES


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


def _extremum(b, node, dys):
    """The rule of Max and Min: dy goes to the inputs equal to y, split evenly among ties."""
    dy, y = dys[0], node.output[0]
    if len(node.input) == 1:
        return [dy]
    # Where several inputs reach the extremum, each gets dy / (number of ties): the average
    # of the one-sided derivatives, so that Σ dxᵢ = dy always holds.
    hits = [b.Cast(b.Equal(x, y), to=b.dtype(y)) for x in node.input]
    share = b.Div(dy, b.Sum(*hits))
    return [b.Mul(share, hit) if node.needs_grad(i) else None for i, hit in enumerate(hits)]


@rule("Max", broadcast=True)
def max_(b, node, dys):
    """y = max(x₁, …, xₙ)  →  dxᵢ = dy · [xᵢ = y] / Σⱼ [xⱼ = y]

    Ties share dy evenly (see _extremum).
    """
    return _extremum(b, node, dys)


@rule("Min", broadcast=True)
def min_(b, node, dys):
    """y = min(x₁, …, xₙ)  →  dxᵢ = dy · [xᵢ = y] / Σⱼ [xⱼ = y]

    Ties share dy evenly (see _extremum).
    """
    return _extremum(b, node, dys)


@rule("Mean", broadcast=True)
def mean(b, node, dys):
    """y = (1/n) Σ xᵢ  →  dxᵢ = dy / n"""
    dy = dys[0]
    n = len(node.input)
    share = dy if n == 1 else b.Div(dy, b.const(float(n), like=dy))
    return [share] * n


@rule("Mod", broadcast=True)
def mod(b, node, dys):
    """y = A − B · q,  q = trunc(A/B) (fmod=1) or floor(A/B) (fmod=0)  →  dA = dy, dB = −dy · q

    q is piecewise constant: at the jumps (A/B an integer) we take the one-sided derivative
    that treats q as constant there too. Only float tensors get gradients (integer Mod is
    stopped by the builder).
    """
    dy = dys[0]
    a, c = node.input
    if not node.needs_grad(1):
        return [dy, None]
    ratio = b.Div(a, c)
    if node.attrs.get("fmod", 0):
        q = b.Mul(b.Sign(ratio), b.Floor(b.Abs(ratio)))  # trunc(r) = sign(r) · ⌊|r|⌋
    else:
        q = b.Floor(ratio)
    return [dy, b.Neg(b.Mul(dy, q))]


@rule("CastLike")
def cast_like(b, node, dys):
    """y = cast(x, type(target))  →  dx = cast(dy, type(x)); target gets none

    As for Cast, rounding to a narrower float type is taken as the identity. Integer or
    boolean x gets no gradient.
    """
    x = node.input[0]
    if b.dtype(x) not in FLOAT_TYPES:
        return [None, None]
    return [b.CastLike(dys[0], x), None]


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
