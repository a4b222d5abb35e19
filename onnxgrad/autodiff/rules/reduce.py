"""Derivative rules for reductions.

Every rule first brings the output gradient (and, where needed, the output) back to a
shape that broadcasts against the input: with keepdims=0 the reduced axes are put back as
1s. Axes may be an attribute, a constant input or a runtime input; negative axes count
from the end; no axes means all of them, or none at all with noop_with_empty_axes=1.
"""

from __future__ import annotations

import numpy as np

from onnxgrad.autodiff.rules import rule


def _axes(b, node) -> list[int] | str | None:
    """The reduced axes as a list, an int64 tensor name (runtime axes), or None (none given)."""
    if len(node.input) > 1 and node.input[1]:
        name = node.input[1]
        value = b.constant_value(name)
        if value is None:
            return name
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    else:
        axes = node.attrs.get("axes")
    if not axes:
        return None
    return list(axes)


def _noop(b, node) -> bool:
    """Whether the node reduces over no axes at all (known at build time)."""
    return _axes(b, node) is None and bool(node.attrs.get("noop_with_empty_axes", 0))


def _kept(b, node, t: str) -> str:
    """`t`, shaped like the node's output, with the reduced axes restored as 1s.

    With keepdims=1 (or a reduction over no axes) that is `t` itself.
    """
    if _noop(b, node) or node.attrs.get("keepdims", 1):
        return t
    x = node.input[0]
    axes = _axes(b, node)
    rank = b.rank(x)
    if isinstance(axes, str):
        # Unsqueeze reads negative axes against its output's rank, which is x's rank.
        return b.Unsqueeze(t, axes)
    if axes is None:
        return t  # a scalar: it broadcasts against x as it is
    if rank is not None:
        axes = sorted(a % rank for a in axes)
    elif any(a < 0 for a in axes):
        raise NotImplementedError(
            f"{node.op_type} node '{node.name}': negative axes on a tensor of unknown rank; "
            "give the input a shape (run shape inference)"
        )
    return b.unsqueeze(t, sorted(axes))


def _expand_back(b, node, dy: str) -> str:
    """dy of a reduction, broadcast back to the input's shape."""
    if _noop(b, node):
        return dy
    return b.Expand(_kept(b, node, dy), b.Shape(node.input[0]))


def _reduce_like(b, node, op_type: str, t: str) -> str:
    """The node's own reduction (same axes, keepdims=1) applied to `t`, shaped like x."""
    if _noop(b, node):
        return t
    axes = _axes(b, node)
    noop = node.attrs.get("noop_with_empty_axes", 0) if isinstance(axes, str) else None
    return b.reduce(op_type, t, axes, keepdims=1, noop_with_empty_axes=noop or None)


@rule("ReduceSum")
def reduce_sum(b, node, dys):
    """y = Σ_axes x  →  dx = expand(dy)"""
    return [_expand_back(b, node, dys[0]), None]


@rule("ReduceMean")
def reduce_mean(b, node, dys):
    """y = mean_axes x  →  dx = expand(dy) · size(y) / size(x)"""
    x, y = node.input[0], node.output[0]
    grad = _expand_back(b, node, dys[0])
    if _noop(b, node):
        return [grad, None]
    ratio = b.Div(b.Cast(b.Size(y), to=b.dtype(x)), b.Cast(b.Size(x), to=b.dtype(x)))
    return [b.Mul(grad, ratio), None]


@rule("ReduceMax", "ReduceMin")
def reduce_max(b, node, dys):
    """y = max_axes x (or min)  →  dx = dy · [x = y] / #{x = y}

    Ties: the gradient is split evenly among every element that attains the extremum
    (a convex combination of the one-hot subgradients, as TensorFlow and PyTorch's amax
    do), so the result does not depend on the order of the elements.
    """
    x, y = node.input[0], node.output[0]
    dy = _kept(b, node, dys[0])
    hit = b.Cast(b.Equal(x, _kept(b, node, y)), to=b.dtype(x))
    count = _reduce_like(b, node, "ReduceSum", hit)
    return [b.Mul(b.Div(dy, count), hit), None]


@rule("ReduceProd")
def reduce_prod(b, node, dys):
    """y = Π_axes x  →  dx_i = dy · Π_{j≠i} x_j

    Π_{j≠i} x_j is y / x_i where x_i ≠ 0. Where x_i = 0 it is the product of the other
    elements: that product with the zero replaced by 1 when x_i is the only zero of its
    slice, and 0 when the slice has another zero.
    """
    x, y = node.input[0], node.output[0]
    dy = _kept(b, node, dys[0])
    zero, one = b.const(0.0, like=x), b.const(1.0, like=x)
    is_zero = b.Equal(x, zero)
    safe = b.Where(is_zero, one, x)
    zeros = _reduce_like(b, node, "ReduceSum", b.Cast(is_zero, to=b.dtype(x)))
    others = b.Where(b.Equal(zeros, one), _reduce_like(b, node, "ReduceProd", safe), zero)
    partial = b.Where(is_zero, others, b.Div(_kept(b, node, y), safe))
    return [b.Mul(dy, partial), None]


@rule("ReduceL1")
def reduce_l1(b, node, dys):
    """y = Σ_axes |x|  →  dx = dy · sign(x)

    At x = 0 we take the subgradient 0 (sign(0) = 0).
    """
    x = node.input[0]
    return [b.Mul(_kept(b, node, dys[0]), b.Sign(x)), None]


@rule("ReduceL2")
def reduce_l2(b, node, dys):
    """y = √(Σ_axes x²)  →  dx = dy · x / y

    Where y = 0 (an all-zero slice) we take the subgradient 0.
    """
    x, y = node.input[0], node.output[0]
    dy, y = _kept(b, node, dys[0]), _kept(b, node, y)
    zero, one = b.const(0.0, like=x), b.const(1.0, like=x)
    is_zero = b.Equal(y, zero)
    scale = b.Where(is_zero, zero, b.Div(dy, b.Where(is_zero, one, y)))
    return [b.Mul(scale, x), None]


@rule("ReduceSumSquare")
def reduce_sum_square(b, node, dys):
    """y = Σ_axes x²  →  dx = 2 · dy · x"""
    x = node.input[0]
    two = b.const(2.0, like=x)
    return [b.Mul(b.Mul(_kept(b, node, dys[0]), two), x), None]


@rule("ReduceLogSum")
def reduce_log_sum(b, node, dys):
    """y = ln Σ_axes x  →  dx = dy / Σ_axes x = dy · e^(−y)"""
    x, y = node.input[0], node.output[0]
    scale = b.Mul(_kept(b, node, dys[0]), b.Exp(b.Neg(_kept(b, node, y))))
    return [_broadcast_to(b, scale, x), None]


@rule("ReduceLogSumExp")
def reduce_log_sum_exp(b, node, dys):
    """y = ln Σ_axes eˣ  →  dx = dy · e^(x − y)"""
    x, y = node.input[0], node.output[0]
    return [b.Mul(_kept(b, node, dys[0]), b.Exp(b.Sub(x, _kept(b, node, y)))), None]


def _broadcast_to(b, t: str, like: str) -> str:
    """`t` expanded to the shape of `like` (nothing emitted when the static shapes agree)."""
    st, sl = b.static_shape(t), b.static_shape(like)
    if st is not None and st == sl:
        return t
    return b.Expand(t, b.Shape(like))
