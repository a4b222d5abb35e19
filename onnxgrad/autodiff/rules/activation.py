"""Derivative rules for activations: the ReLU family, sigmoids, the softmax family, Clip.

Where an activation has a kink, its rule says which subgradient it takes there.
"""

from __future__ import annotations

import math

from onnxgrad.autodiff.rules import rule, zero
from onnxgrad.errors import UnsupportedOpError

SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875


def _float(node, name: str, default: float) -> float:
    return float(node.attrs.get(name, default))


def _where(b, condition: str, x: str, y: str) -> str:
    """x where `condition` holds, y elsewhere (Where needs opset 9: a blend of masks before)."""
    if b.opset >= 9:
        return b.Where(condition, x, y)
    dtype = b.dtype(x)
    keep = b.Cast(condition, to=dtype)
    return b.Add(b.Mul(x, keep), b.Mul(y, b.Sub(b.const(1.0, dtype=dtype), keep)))


def _mask(b, condition: str, dy: str) -> str:
    """dy where `condition` holds, 0 elsewhere."""
    if b.opset < 9:
        return b.Mul(dy, b.Cast(condition, to=b.dtype(dy)))
    return b.Where(condition, dy, b.const(0.0, like=dy))


@rule("Relu")
def relu(b, node, dys):
    """y = max(x, 0)  →  dx = dy · [x > 0]

    At x = 0 we take the subgradient 0, as PyTorch does.
    """
    x = node.input[0]
    return [_mask(b, b.Greater(x, b.const(0.0, like=x)), dys[0])]


@rule("LeakyRelu")
def leaky_relu(b, node, dys):
    """y = x if x > 0 else α·x  →  dx = dy if x > 0 else α·dy

    At x = 0 we take the left slope α.
    """
    x, dy = node.input[0], dys[0]
    alpha = b.const(_float(node, "alpha", 0.01), like=x)
    return [_where(b, b.Greater(x, b.const(0.0, like=x)), dy, b.Mul(dy, alpha))]


@rule("Sigmoid")
def sigmoid(b, node, dys):
    """y = 1 / (1 + e⁻ˣ)  →  dx = dy · y · (1 − y)"""
    y = node.output[0]
    return [b.Mul(dys[0], b.Mul(y, b.Sub(b.const(1.0, like=y), y)))]


@rule("Tanh")
def tanh(b, node, dys):
    """y = tanh x  →  dx = dy · (1 − y²)"""
    y = node.output[0]
    return [b.Mul(dys[0], b.Sub(b.const(1.0, like=y), b.Mul(y, y)))]


def _softmax_axes(b, node) -> list[int]:
    """The axes a Softmax-family node normalizes over.

    Opset >= 13: the one `axis` (default −1). Before 13 the input was flattened to 2-D at
    `axis` (default 1), so every axis from `axis` on is normalized together.
    """
    if node.opset >= 13:
        return [int(node.attrs.get("axis", -1))]
    axis = int(node.attrs.get("axis", 1))
    rank = b.rank(node.input[0])
    if rank is None:
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail="opset < 13 needs the input's rank; run shape inference or convert the model "
            "to opset 13 or later",
        )
    return list(range(axis % rank if rank else 0, rank))


@rule("Softmax")
def softmax(b, node, dys):
    """y = eˣ / Σ_axis eˣ  →  dx = y · (dy − Σ_axis dy · y)"""
    y, dy = node.output[0], dys[0]
    dot = b.reduce_sum(b.Mul(dy, y), _softmax_axes(b, node), keepdims=1)
    return [b.Mul(y, b.Sub(dy, dot))]


@rule("LogSoftmax")
def log_softmax(b, node, dys):
    """y = x − ln Σ_axis eˣ  →  dx = dy − eʸ · Σ_axis dy"""
    y, dy = node.output[0], dys[0]
    total = b.reduce_sum(dy, _softmax_axes(b, node), keepdims=1)
    return [b.Sub(dy, b.Mul(b.Exp(y), total))]


# Hardmax is a one-hot of the argmax: piecewise constant, so its gradient is zero.
zero("Hardmax")


@rule("Clip")
def clip(b, node, dys):
    """y = min(max(x, lo), hi)  →  dx = dy · [lo < x < hi],
    dhi = Σ dy · [y = hi],  dlo = Σ dy · [y = lo ≠ hi]

    At x = lo or x = hi we take the subgradient 0 for x and give dy to the bound instead, so
    that dx + dbound = dy (moving x and the bound together moves y one for one). When
    lo > hi every element is hi, so x and lo get nothing. An absent bound is no bound.
    """
    x, y, dy = node.input[0], node.output[0], dys[0]

    # 1. The bounds: inputs since opset 11, attributes before.
    if node.opset >= 11:
        lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
        hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    else:
        lo = b.const(node.attrs["min"], like=x) if "min" in node.attrs else None
        hi = b.const(node.attrs["max"], like=x) if "max" in node.attrs else None

    # 2. dx: dy strictly inside the bounds.
    inside = None
    if lo is not None:
        inside = b.Greater(x, lo)
    if hi is not None:
        below = b.Less(x, hi)
        inside = below if inside is None else b.And(inside, below)
    dx = dy if inside is None else _mask(b, inside, dy)

    # 3. The bounds (0-D tensors) collect dy where y sits on them.
    dlo = dhi = None
    if node.opset >= 11 and (node.needs_grad(1) or node.needs_grad(2)):
        at_hi = b.Equal(y, hi) if hi is not None else None
        if node.needs_grad(2) and hi is not None:
            dhi = b.reduce_sum(_mask(b, at_hi, dy), None, keepdims=0)
        if node.needs_grad(1) and lo is not None:
            at_lo = b.Equal(y, lo)
            if at_hi is not None:
                at_lo = b.And(at_lo, b.Not(at_hi))
            dlo = b.reduce_sum(_mask(b, at_lo, dy), None, keepdims=0)
    return [dx, dlo, dhi]


@rule("Gelu")
def gelu(b, node, dys):
    """y = x · Φ(x)  →  dx = dy · (Φ(x) + x · φ(x)),  Φ(x) = (1 + erf(x/√2)) / 2,
    φ(x) = e^(−x²/2) / √(2π)

    approximate="tanh": y = x/2 · (1 + t), t = tanh(√(2/π) · (x + 0.044715 x³))  →
    dx = dy · ((1 + t)/2 + x/2 · (1 − t²) · √(2/π) · (1 + 3 · 0.044715 x²))
    """
    x, dy = node.input[0], dys[0]
    approximate = node.attrs.get("approximate", "none")
    half = b.const(0.5, like=x)
    one = b.const(1.0, like=x)
    x2 = b.Mul(x, x)
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = b.Mul(
            b.const(k, like=x), b.Mul(x, b.Add(one, b.Mul(b.const(0.044715, like=x), x2)))
        )
        t = b.Tanh(inner)
        dinner = b.Mul(b.const(k, like=x), b.Add(one, b.Mul(b.const(3 * 0.044715, like=x), x2)))
        slope = b.Add(
            b.Mul(half, b.Add(one, t)),
            b.Mul(b.Mul(half, x), b.Mul(b.Sub(one, b.Mul(t, t)), dinner)),
        )
        return [b.Mul(dy, slope)]
    if approximate != "none":
        raise UnsupportedOpError(
            "Gelu", node.name, node.opset, detail=f"approximate='{approximate}' is not defined"
        )
    cdf = b.Mul(half, b.Add(one, b.Erf(b.Mul(x, b.const(1.0 / math.sqrt(2.0), like=x)))))
    pdf = b.Mul(b.const(1.0 / math.sqrt(2.0 * math.pi), like=x), b.Exp(b.Mul(b.Neg(half), x2)))
    return [b.Mul(dy, b.Add(cdf, b.Mul(x, pdf)))]


@rule("Elu")
def elu(b, node, dys):
    """y = x if x > 0 else α(eˣ − 1)  →  dx = dy if x > 0 else dy · (y + α)

    At x = 0 we take the left slope α (1 when α = 1, where Elu is smooth).
    """
    x, y, dy = node.input[0], node.output[0], dys[0]
    alpha = b.const(_float(node, "alpha", 1.0), like=x)
    return [_where(b, b.Greater(x, b.const(0.0, like=x)), dy, b.Mul(dy, b.Add(y, alpha)))]


@rule("Selu")
def selu(b, node, dys):
    """y = γx if x > 0 else γα(eˣ − 1)  →  dx = γ·dy if x > 0 else dy · (y + γα)

    At x = 0 we take the left slope γα.
    """
    x, y, dy = node.input[0], node.output[0], dys[0]
    alpha = _float(node, "alpha", SELU_ALPHA)
    gamma = _float(node, "gamma", SELU_GAMMA)
    left = b.Mul(dy, b.Add(y, b.const(alpha * gamma, like=x)))
    return [_where(b, b.Greater(x, b.const(0.0, like=x)), b.Mul(dy, b.const(gamma, like=x)), left)]


@rule("Celu")
def celu(b, node, dys):
    """y = max(0, x) + min(0, α(e^(x/α) − 1))  →  dx = dy if x > 0 else dy · (y/α + 1)

    Celu is smooth at 0 (both slopes are 1).
    """
    x, y, dy = node.input[0], node.output[0], dys[0]
    alpha = _float(node, "alpha", 1.0)
    left = b.Mul(dy, b.Add(b.Mul(y, b.const(1.0 / alpha, like=x)), b.const(1.0, like=x)))
    return [_where(b, b.Greater(x, b.const(0.0, like=x)), dy, left)]


@rule("Softplus")
def softplus(b, node, dys):
    """y = ln(1 + eˣ)  →  dx = dy · σ(x)"""
    return [b.Mul(dys[0], b.Sigmoid(node.input[0]))]


@rule("Softsign")
def softsign(b, node, dys):
    """y = x / (1 + |x|)  →  dx = dy / (1 + |x|)²"""
    x = node.input[0]
    d = b.Add(b.const(1.0, like=x), b.Abs(x))
    return [b.Div(dys[0], b.Mul(d, d))]


@rule("HardSigmoid")
def hard_sigmoid(b, node, dys):
    """y = clip(αx + β, 0, 1)  →  dx = α · dy · [0 < y < 1]

    At the corners (y = 0 or y = 1) we take the subgradient 0.
    """
    x, y, dy = node.input[0], node.output[0], dys[0]
    alpha = b.const(_float(node, "alpha", 0.2), like=x)
    inside = b.And(b.Greater(y, b.const(0.0, like=y)), b.Less(y, b.const(1.0, like=y)))
    return [_mask(b, inside, b.Mul(dy, alpha))]


@rule("HardSwish")
def hard_swish(b, node, dys):
    """y = x · clip(x/6 + 1/2, 0, 1)  →  dx = 0 if x < −3, dy · (x/3 + 1/2) if x ≤ 3, else dy

    At x = −3 and x = 3 we take the slope from the inside, x/3 + 1/2, as PyTorch does.
    """
    x, dy = node.input[0], dys[0]
    ramp = b.Add(b.Mul(x, b.const(1.0 / 3.0, like=x)), b.const(0.5, like=x))
    slope = _where(b, b.Greater(x, b.const(3.0, like=x)), b.const(1.0, like=x), ramp)
    slope = _where(b, b.Less(x, b.const(-3.0, like=x)), b.const(0.0, like=x), slope)
    return [b.Mul(dy, slope)]


@rule("Mish")
def mish(b, node, dys):
    """y = x · tanh(softplus(x))  →  dx = dy · (t + x · (1 − t²) · σ(x)),  t = tanh(softplus(x))"""
    x = node.input[0]
    t = b.Tanh(b.Softplus(x))
    one = b.const(1.0, like=x)
    slope = b.Add(t, b.Mul(x, b.Mul(b.Sub(one, b.Mul(t, t)), b.Sigmoid(x))))
    return [b.Mul(dys[0], slope)]


@rule("PRelu", broadcast=True)
def prelu(b, node, dys):
    """y = x if x ≥ 0 else slope · x  →  dx = dy if x ≥ 0 else dy · slope,
    dslope = dy · x if x < 0 else 0

    At x = 0 we take the right slope 1 (and dslope = dy · 0 = 0 either way).
    """
    x, slope = node.input
    dy = dys[0]
    negative = b.Less(x, b.const(0.0, like=x))
    dx = _where(b, negative, b.Mul(dy, slope), dy) if node.needs_grad(0) else None
    dslope = _mask(b, negative, b.Mul(dy, x)) if node.needs_grad(1) else None
    return [dx, dslope]


@rule("ThresholdedRelu")
def thresholded_relu(b, node, dys):
    """y = x if x > α else 0  →  dx = dy · [x > α]

    y jumps at x = α; there we take the subgradient 0.
    """
    x = node.input[0]
    alpha = b.const(_float(node, "alpha", 1.0), like=x)
    return [_mask(b, b.Greater(x, alpha), dys[0])]


@rule("Shrink")
def shrink(b, node, dys):
    """y = x + bias if x < −λ, x − bias if x > λ, else 0  →  dx = dy · [|x| > λ]

    At x = ±λ (a jump when bias ≠ λ) we take the subgradient 0.
    """
    x = node.input[0]
    lambd = b.const(_float(node, "lambd", 0.5), like=x)
    return [_mask(b, b.Greater(b.Abs(x), lambd), dys[0])]
