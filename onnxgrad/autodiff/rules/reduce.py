"""Derivative rules for reductions."""

from __future__ import annotations

import numpy as np

from onnxgrad.autodiff.rules import rule


def _axes(b, node) -> list[int] | str | None:
    """The reduced axes as a list, an int64 tensor name (runtime axes), or None (all)."""
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
    return axes


def _expand_back(b, node, dy: str) -> str:
    """dy of a reduction, broadcast back to the input's shape.

    With keepdims=0 the reduced axes are first put back as 1s so that Expand lines up.
    """
    x = node.input[0]
    axes = _axes(b, node)
    if axes is None and node.attrs.get("noop_with_empty_axes", 0):
        return dy
    if not node.attrs.get("keepdims", 1):
        rank = b.rank(x)
        if axes is None:
            if rank is None:
                raise NotImplementedError("ReduceSum over all axes of a tensor of unknown rank")
            axes = list(range(rank))
        if isinstance(axes, str):
            dy = b.Unsqueeze(dy, axes)
        else:
            if rank is not None:
                axes = sorted(a % rank for a in axes)
            elif any(a < 0 for a in axes):
                raise NotImplementedError("negative reduction axes on a tensor of unknown rank")
            dy = b.unsqueeze(dy, axes)
    return b.Expand(dy, b.Shape(x))


@rule("ReduceSum")
def reduce_sum(b, node, dys):
    """y = Σ_axes x  →  dx = expand(dy)"""
    return [_expand_back(b, node, dys[0]), None]


@rule("ReduceMean")
def reduce_mean(b, node, dys):
    """y = mean_axes x  →  dx = expand(dy) · size(y) / size(x)"""
    x, y = node.input[0], node.output[0]
    grad = _expand_back(b, node, dys[0])
    ratio = b.Div(b.Cast(b.Size(y), to=b.dtype(x)), b.Cast(b.Size(x), to=b.dtype(x)))
    return [b.Mul(grad, ratio), None]
