"""Kernels for the less common ops: Det, Compress, ReverseSequence, CenterCropPad, CumProd,
Swish, SwiGLU, EyeLike, MaxUnpool, MaxRoiPool.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from onnxgrad.runtime.kernels import KernelNode, kernel


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so that exp never overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


@kernel("Det")
def det(node: KernelNode):
    return lambda x: (np.asarray(np.linalg.det(x), dtype=x.dtype),)


@kernel("Compress")
def compress(node: KernelNode):
    axis = node.attrs.get("axis")

    def run(x, condition):
        cond = np.asarray(condition, dtype=bool).reshape(-1)
        return (np.compress(cond, x, axis=axis),)

    return run


@kernel("ReverseSequence")
def reverse_sequence(node: KernelNode):
    batch_axis = node.attrs.get("batch_axis", 1)
    time_axis = node.attrs.get("time_axis", 0)

    def run(x, lens):
        y = np.array(x, copy=True)
        for k, n in enumerate(np.asarray(lens).reshape(-1)):
            n = int(n)
            src = [slice(None)] * x.ndim
            src[batch_axis] = k
            src[time_axis] = slice(None, n)
            dst = list(src)
            dst[time_axis] = slice(n - 1, None, -1) if n > 0 else slice(0, 0)
            y[tuple(src)] = x[tuple(dst)]
        return (y,)

    return run


@kernel("CenterCropPad")
def center_crop_pad(node: KernelNode):
    axes = node.attrs.get("axes")

    def run(x, shape):
        chosen = range(x.ndim) if axes is None else [a % x.ndim for a in axes]
        target = list(x.shape)
        for a, n in zip(chosen, np.asarray(shape).reshape(-1)):
            target[a] = int(n)
        out = np.zeros(target, dtype=x.dtype)
        src, dst = [], []
        for have, want in zip(x.shape, target):
            if have >= want:  # crop: the window starts at ⌊(have − want) / 2⌋
                start = (have - want) // 2
                src.append(slice(start, start + want))
                dst.append(slice(None))
            else:  # pad: the extra pixel of an odd total goes to the right
                start = (want - have) // 2
                src.append(slice(None))
                dst.append(slice(start, start + have))
        out[tuple(dst)] = x[tuple(src)]
        return (out,)

    return run


@kernel("CumProd")
def cum_prod(node: KernelNode):
    reverse = node.attrs.get("reverse", 0)
    exclusive = node.attrs.get("exclusive", 0)

    def run(x, axis):
        axis = int(np.asarray(axis).reshape(-1)[0]) % max(x.ndim, 1)
        t = np.flip(x, axis) if reverse else x
        y = np.cumprod(t, axis=axis, dtype=x.dtype)
        if exclusive:
            ones = np.ones_like(np.take(y, [0], axis=axis))
            y = np.concatenate([ones, np.take(y, range(y.shape[axis] - 1), axis=axis)], axis)
        return (np.flip(y, axis) if reverse else y,)

    return run


@kernel("Swish")
def swish(node: KernelNode):
    alpha = float(node.attrs.get("alpha", 1.0))
    return lambda x: (x * _sigmoid(x * x.dtype.type(alpha)),)


@kernel("SwiGLU")
def swiglu(node: KernelNode):
    alpha = float(node.attrs.get("alpha", 1.0))
    return lambda a, v: (a * _sigmoid(a * a.dtype.type(alpha)) * v,)


@kernel("EyeLike")
def eye_like(node: KernelNode):
    k = node.attrs.get("k", 0)
    to = node.attrs.get("dtype")
    dtype = None if to is None else helper.tensor_dtype_to_np_dtype(to)

    def run(x):
        return (np.eye(x.shape[0], x.shape[1], k=k, dtype=dtype or x.dtype),)

    return run


@kernel("MaxUnpool")
def max_unpool(node: KernelNode):
    """Y = zeros(default shape); Y.flat[I] = X; then zeros up to output_shape, if larger.

    The default shape is the one kernel_shape, strides and pads give, and the indices are
    flat positions in it. An output_shape larger along some axis adds zeros at the end of
    that axis, as onnx's reference evaluator and its conformance case do (onnxruntime
    reads the indices as flat positions in output_shape instead). A smaller one is
    refused, as both of them refuse it.
    """
    kernel_shape = list(node.attrs["kernel_shape"])
    n = len(kernel_shape)
    strides = list(node.attrs.get("strides") or [1] * n)
    pads = list(node.attrs.get("pads") or [0] * (2 * n))

    def run(x, indices, output_shape=None):
        spatial = [
            (x.shape[2 + k] - 1) * strides[k] + kernel_shape[k] - pads[k] - pads[n + k]
            for k in range(n)
        ]
        default = list(x.shape[:2]) + spatial
        y = np.zeros(math.prod(default), dtype=x.dtype)
        y[np.asarray(indices).reshape(-1)] = x.reshape(-1)
        y = y.reshape(default)
        if output_shape is None:
            return (y,)
        shape = [int(d) for d in np.asarray(output_shape).reshape(-1)]
        if len(shape) != x.ndim or any(s < d for s, d in zip(shape, default)):
            raise ValueError(
                f"output_shape {shape} must have {x.ndim} sizes, none below the default "
                f"output shape {default} (kernel_shape, strides and pads give that one)"
            )
        if shape == default:
            return (y,)
        out = np.zeros(shape, dtype=x.dtype)
        out[tuple(slice(0, d) for d in default)] = y
        return (out,)

    return run


def _round_half_away(v: float) -> int:
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


@kernel("MaxRoiPool")
def max_roi_pool(node: KernelNode):
    pooled_h, pooled_w = node.attrs["pooled_shape"]
    scale = float(node.attrs.get("spatial_scale", 1.0))

    def run(x, rois):
        n_rois = rois.shape[0]
        height, width = x.shape[2:]
        out = np.zeros((n_rois, x.shape[1], pooled_h, pooled_w), dtype=x.dtype)
        for r in range(n_rois):
            batch = int(rois[r, 0])
            x1, y1, x2, y2 = (_round_half_away(float(v) * scale) for v in rois[r, 1:])
            bin_h = max(y2 - y1 + 1, 1) / pooled_h
            bin_w = max(x2 - x1 + 1, 1) / pooled_w
            for ph in range(pooled_h):
                h0 = min(max(math.floor(ph * bin_h) + y1, 0), height)
                h1 = min(max(math.ceil((ph + 1) * bin_h) + y1, 0), height)
                for pw in range(pooled_w):
                    w0 = min(max(math.floor(pw * bin_w) + x1, 0), width)
                    w1 = min(max(math.ceil((pw + 1) * bin_w) + x1, 0), width)
                    if h1 > h0 and w1 > w0:  # an empty bin stays 0
                        out[r, :, ph, pw] = x[batch, :, h0:h1, w0:w1].max(axis=(1, 2))
        return (out,)

    return run
