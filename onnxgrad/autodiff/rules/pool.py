"""Derivative rules for pooling: MaxPool, AveragePool, LpPool and their Global forms.

Windowed pools reuse the convolution machinery: the adjoint of "sum each window" is a
ConvTranspose with a kernel of ones, applied to every (n, c) plane on its own (the planes
are folded into the batch axis, so the channel count need not be static).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper, numpy_helper

from onnxgrad.autodiff.rules import rule
from onnxgrad.autodiff.rules.conv import (
    Padded,
    Sweep,
    crop,
    pad_same,
    spatial_shape,
    spread,
    sweep,
)
from onnxgrad.autodiff.rules.shape import need_rank


def _pool_sweep(b, node) -> tuple[Sweep, Padded | None]:
    """The windows' geometry, and the padded input when SAME padding is known only at run
    time (then the geometry is over the padded input; see `conv.pad_same`)."""
    x = node.input[0]
    kernel = node.attrs.get("kernel_shape")
    if not kernel:
        raise NotImplementedError(f"{node.op_type} node '{node.name}' has no kernel_shape")
    kernel = [int(k) for k in kernel]
    padded = pad_same(b, node, x, kernel)
    if padded is not None:
        return padded.sweep, padded
    return sweep(b, node, x, kernel, bool(node.attrs.get("ceil_mode", 0))), None


def _spread_back(b, g: str, x: str, sw: Sweep, padded: Padded | None) -> str:
    """`_spread_planes` of g onto x, through the run-time padding when there is one."""
    if padded is None:
        return _spread_planes(b, g, x, sw)
    return padded.unpad(b, _spread_planes(b, g, padded.x, sw))


def _spread_planes(b, g: str, x: str, sw: Sweep) -> str:
    """Each window's g, added back onto every input entry of that window (pads dropped)."""
    planes = b.Reshape(g, b.Concat(b.ints([-1, 1]), spatial_shape(b, g, sw.out), axis=0))
    ones = b.const(np.ones((1, 1, *sw.kernel)), like=x)
    dx = spread(b, planes, ones, x, sw)
    return b.Reshape(dx, b.Shape(x))


def _ones_plane(b, x: str, sizes: str) -> str:
    """A (1, 1, *sizes) tensor of ones, typed like x."""
    np_dtype = helper.tensor_dtype_to_np_dtype(b.dtype(x))
    shape = b.Concat(b.ints([1, 1]), sizes, axis=0)
    return b.ConstantOfShape(shape, value=numpy_helper.from_array(np.ones(1, np_dtype)))


def window_counts(sw: Sweep, include_pad: bool) -> np.ndarray:
    """How many taps of each window land in the input (or in input + pads); static sizes.

    A box window's count is the outer product of one count per axis. A window that
    overhangs the end padding (ceil_mode) counts only the taps it covers, as onnxruntime
    divides.
    """
    count = np.ones((), dtype=np.int64)
    for i in range(sw.nsp):
        starts = np.arange(sw.out[i]) * sw.strides[i] - sw.begin[i]
        taps = starts[:, None] + np.arange(sw.kernel[i])[None, :] * sw.dilations[i]
        low, high = (-sw.begin[i], sw.sizes[i] + sw.end[i]) if include_pad else (0, sw.sizes[i])
        count = np.multiply.outer(count, ((taps >= low) & (taps < high)).sum(axis=1))
    return count


def _counts(b, node, sw: Sweep, dy: str, padded: Padded | None = None) -> str:
    """The divisor of AveragePool per output position, shaped to broadcast against dy.

    With `padded` (SAME padding at run time, which ignores ceil_mode) `sw` sweeps the
    padded input.
    """
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    ceil_mode = bool(node.attrs.get("ceil_mode", 0)) and padded is None
    x = node.input[0]
    if sw.static:
        count = window_counts(sw, include_pad)
        if np.all(count == count.flat[0]):
            return b.const(float(count.flat[0]), like=x)
        return b.const(count.astype(np.float64), like=x)
    if include_pad and not ceil_mode:
        return b.const(float(math.prod(sw.kernel)), like=x)  # every window lies in the pads

    # Sizes known only at run time: count by sweeping a plane of ones with a ones kernel.
    # With count_include_pad the plane covers the pads too. An extra s − 1 of zero end
    # padding gives ceil_mode's last (overhanging) window; the crop drops any surplus.
    n = sw.nsp
    ones = b.const(np.ones((1, 1, *sw.kernel)), like=x)
    if padded is not None:  # the padding is zeros in a plane of ones, the sweep has none
        plane = b.Pad(_ones_plane(b, x, padded.sizes), padded.pads)
        return b.Conv(plane, ones, strides=sw.strides, dilations=sw.dilations)
    sizes = spatial_shape(b, x, sw.sizes)
    if include_pad:
        sizes = b.Add(sizes, b.ints([bg + e for bg, e in zip(sw.begin, sw.end)]))
        begin, end = [0] * n, [0] * n
    else:
        begin, end = list(sw.begin), list(sw.end)
    if ceil_mode:
        end = [e + s - 1 for e, s in zip(end, sw.strides)]
    count = b.Conv(
        _ones_plane(b, x, sizes), ones, strides=sw.strides, dilations=sw.dilations, pads=begin + end
    )
    if ceil_mode:
        count = crop(b, count, spatial_shape(b, dy, sw.out), n)
    return count


@rule("AveragePool")
def average_pool(b, node, dys):
    """y = Σ_window x / count  →  dx = Σ over the windows that hold x of dy / count"""
    sw, padded = _pool_sweep(b, node)
    g = b.Div(dys[0], _counts(b, node, sw, dys[0], padded))
    return [_spread_back(b, g, node.input[0], sw, padded)]


@rule("LpPool")
def lp_pool(b, node, dys):
    """y = (Σ_window |x|ᵖ)^(1/p)  →  dx = sign(x)·|x|^(p−1) · Σ_windows∋x dy·y^(1−p)"""
    x, y = node.input[0], node.output[0]
    p = float(node.attrs.get("p", 2))
    sw, padded = _pool_sweep(b, node)
    g = _lp_scale(b, dys[0], y, p)
    return [b.Mul(_spread_back(b, g, x, sw, padded), _lp_local(b, x, p))]


def _lp_scale(b, dy: str, y: str, p: float) -> str:
    """dy · y^(1−p), and 0 where y = 0."""
    if p == 1.0:
        return dy
    zero = b.const(0.0, like=y)
    # y = 0 (an all-zero window): the norm has no derivative there; we pick 0 (and keep
    # y^(1−p) from dividing by zero).
    is_zero = b.Equal(y, zero)
    safe = b.Where(is_zero, b.const(1.0, like=y), y)
    return b.Where(is_zero, zero, b.Mul(dy, b.Pow(safe, b.const(1.0 - p, like=y))))


def _lp_local(b, x: str, p: float) -> str:
    """d|x|ᵖ/dx / p = sign(x)·|x|^(p−1)."""
    # At x = 0 (p = 1) sign gives 0: we pick the zero subgradient of |x|.
    if p == 1.0:
        return b.Sign(x)
    if p == 2.0:
        return x
    return b.Mul(b.Sign(x), b.Pow(b.Abs(x), b.const(p - 1.0, like=x)))


@rule("MaxPool")
def max_pool(b, node, dys):
    """y = max_window x  →  dx[argmax of each window] += dy"""
    x = node.input[0]
    dy = dys[0]
    if dy is None:  # only Indices was used: it carries no gradient
        return [None]
    if b.opset < 16:
        raise NotImplementedError(
            f"MaxPool node '{node.name}': the gradient scatters with ScatterElements "
            f"reduction='add', which needs opset >= 16 (the model has {b.opset}); convert "
            "the model to a newer opset"
        )

    # 1. Where each window's maximum sits. Reuse the forward Indices output when the
    #    node has one in row-major order; otherwise recompute it with a second MaxPool,
    #    because a MaxPool without the output does not keep the positions anywhere.
    #    Ties: the position MaxPool reports (the first maximum in scan order in
    #    onnxruntime) gets the whole gradient.
    #    Indices are positions in x whatever the padding (SAME at run time included).
    outputs = node.output
    if len(outputs) > 1 and outputs[1] and not node.attrs.get("storage_order", 0):
        indices = outputs[1]
    else:
        attrs = {k: v for k, v in node.attrs.items() if k != "storage_order"}
        _, indices = b.op("MaxPool", x, outputs=2, **attrs)

    # 2. Scatter-add dy there; indices are flat over the whole of x (N, C and space), and
    #    windows that overlap can pick one entry several times.
    flat = b.ints([-1])
    zeros = b.ConstantOfShape(
        b.Reshape(b.Size(x), flat),
        value=numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(b.dtype(x)))),
    )
    dx = b.ScatterElements(
        zeros, b.Reshape(indices, flat), b.Reshape(dy, flat), axis=0, reduction="add"
    )
    return [b.Reshape(dx, b.Shape(x))]


@rule("GlobalAveragePool")
def global_average_pool(b, node, dys):
    """y = mean_space x  →  dx = dy / size(space), broadcast"""
    x, y = node.input[0], node.output[0]
    shape = b.static_shape(x)
    if shape is not None:
        scale = b.const(1.0 / math.prod(shape[2:]), like=x)
    else:
        scale = b.Div(b.Cast(b.Size(y), to=b.dtype(x)), b.Cast(b.Size(x), to=b.dtype(x)))
    return [b.Expand(b.Mul(dys[0], scale), b.Shape(x))]


@rule("GlobalMaxPool")
def global_max_pool(b, node, dys):
    """y = max_space x  →  dx = dy · [x = y] / #{x = y}"""
    x, y = node.input[0], node.output[0]
    # Ties: the gradient is split evenly among every entry equal to the maximum (the
    # average of the one-hot subgradients), not all to the first as MaxPool does.
    mask = b.Cast(b.Equal(x, y), to=b.dtype(x))
    count = b.reduce_sum(mask, list(range(2, need_rank(b, node, node.input[0]))), keepdims=1)
    return [b.Mul(mask, b.Div(dys[0], count))]


@rule("GlobalLpPool")
def global_lp_pool(b, node, dys):
    """y = (Σ_space |x|ᵖ)^(1/p)  →  dx = sign(x)·|x|^(p−1) · dy · y^(1−p)"""
    x, y = node.input[0], node.output[0]
    p = float(node.attrs.get("p", 2))
    return [b.Mul(_lp_scale(b, dys[0], y, p), _lp_local(b, x, p))]
