"""Resize and Upsample: separable interpolation, one matrix per resized axis.

Every mode Resize defines (nearest, linear, cubic, with antialias, exclude_outside and each
coordinate transformation) is linear along each axis and acts on the axes independently, so
the kernel builds, per axis, the (output length × input length) matrix of weights and
contracts the input with it. Edge pixels repeat beyond the border, as the spec's padding
says; tf_crop_and_resize writes extrapolation_value where a coordinate falls outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel


@dataclass(frozen=True)
class ResizeAttrs:
    """The attributes of a Resize (or Upsample) node that shape the weights."""

    mode: str = "nearest"
    coordinate_mode: str = "half_pixel"
    nearest_mode: str = "round_prefer_floor"
    cubic_a: float = -0.75
    exclude_outside: bool = False
    antialias: bool = False
    extrapolation_value: float = 0.0


def source_coordinates(
    attrs: ResizeAttrs, n_in: int, n_out: int, scale: float, roi: tuple[float, float]
) -> np.ndarray:
    """The input coordinate each output index samples, per the coordinate transformation."""
    y = np.arange(n_out, dtype=np.float64)
    width = scale * n_in  # the real-valued output length the spec's formulas use
    mode = attrs.coordinate_mode
    if mode == "align_corners":
        return np.zeros(n_out) if width == 1 else y * (n_in - 1) / (width - 1)
    if mode == "asymmetric":
        return y / scale
    if mode == "tf_crop_and_resize":
        start, end = roi
        if width == 1:
            x = np.full(n_out, (end - start) * (n_in - 1) / 2)
        else:
            x = y * (end - start) * (n_in - 1) / (width - 1)
        return x + start * (n_in - 1)
    if mode == "pytorch_half_pixel":
        return np.full(n_out, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    if mode == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = n_in / 2 * (1 - n_out / width)
        return offset + (y + 0.5) / scale - 0.5
    raise NotImplementedError(f"Resize coordinate_transformation_mode '{mode}'")


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    """The cubic convolution kernel with coefficient a, at distances t."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _taps(attrs: ResizeAttrs, ratio: np.ndarray, scale: float) -> tuple[int, np.ndarray]:
    """The first tap offset (relative to the left neighbour) and the weights of each tap.

    ratio ∈ (0, 1] is the distance from the left neighbour (an exact integer coordinate
    counts as ratio 1 from the pixel before it, as the spec's neighbour choice does).
    """
    r = ratio[:, None]
    if attrs.mode == "nearest":
        if attrs.nearest_mode == "round_prefer_floor":
            right = r > 0.5
        elif attrs.nearest_mode == "round_prefer_ceil":
            right = r >= 0.5
        elif attrs.nearest_mode == "floor":
            right = r == 1.0
        elif attrs.nearest_mode == "ceil":
            right = np.ones_like(r, dtype=bool)
        else:
            raise NotImplementedError(f"Resize nearest_mode '{attrs.nearest_mode}'")
        return 0, np.concatenate([~right, right], axis=1).astype(np.float64)
    shrink = min(scale, 1.0) if attrs.antialias else 1.0
    if attrs.mode == "linear":
        start = math.floor(-1 / shrink) + 1
        k = np.arange(start, 2 - start)[None, :]
        return start, np.clip(1 - np.abs((k - r) * shrink), 0.0, 1.0)
    if attrs.mode == "cubic":
        start = math.floor(-2 / shrink) + 1
        k = np.arange(start, 2 - start)[None, :]
        return start, _cubic((k - r) * shrink, attrs.cubic_a)
    raise NotImplementedError(f"Resize mode '{attrs.mode}'")


def axis_weights(
    attrs: ResizeAttrs, n_in: int, n_out: int, scale: float, roi=(0.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """The (n_out × n_in) interpolation matrix of one axis, and the mask of output indices
    that fall outside the input (tf_crop_and_resize only; their rows are zero)."""
    x = source_coordinates(attrs, n_in, n_out, scale, roi)
    left = np.ceil(x).astype(np.int64) - 1  # the neighbour strictly before x
    ratio = x - left
    start, w = _taps(attrs, ratio, scale)
    idx = left[:, None] + np.arange(start, start + w.shape[1])[None, :]
    if attrs.exclude_outside and attrs.mode != "nearest":
        w = np.where((idx >= 0) & (idx < n_in), w, 0.0)
    if attrs.antialias or attrs.exclude_outside:
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    weights = np.zeros((n_out, n_in))
    rows = np.repeat(np.arange(n_out), w.shape[1])
    np.add.at(weights, (rows, np.clip(idx, 0, n_in - 1).reshape(-1)), w.reshape(-1))
    outside = np.zeros(n_out, dtype=bool)
    if attrs.coordinate_mode == "tf_crop_and_resize":
        outside = (x < 0) | (x > n_in - 1)
        weights[outside] = 0.0
    return weights, outside


def resize(x: np.ndarray, attrs: ResizeAttrs, scales, sizes, rois) -> np.ndarray:
    """Resize x to `sizes` with per-axis `scales` and `rois` (one (start, end) per axis)."""
    out = x.astype(np.float64)
    anywhere = np.zeros(tuple(sizes), dtype=bool)
    for axis, (n_out, scale, roi) in enumerate(zip(sizes, scales, rois)):
        n_in = x.shape[axis]
        if n_out == n_in and scale == 1.0 and attrs.coordinate_mode != "tf_crop_and_resize":
            continue
        weights, outside = axis_weights(attrs, n_in, n_out, scale, roi)
        out = np.moveaxis(np.tensordot(weights, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
        if outside.any():
            shape = [1] * x.ndim
            shape[axis] = n_out
            anywhere = anywhere | outside.reshape(shape)
    if anywhere.any():
        out = np.where(anywhere, attrs.extrapolation_value, out)
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(x.dtype)


def _plan(x, roi, scales, sizes, axes, policy):
    """Per-axis output sizes, scales and rois from the node's inputs."""
    rank = x.ndim
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    full_scales = [1.0] * rank
    full_sizes = list(x.shape)
    full_rois = [(0.0, 1.0)] * rank
    if roi is not None and roi.size:
        half = roi.size // 2
        for p, a in enumerate(axes[:half]):
            full_rois[a] = (float(roi[p]), float(roi[half + p]))
    if scales is not None and scales.size:
        for p, a in enumerate(axes):
            full_scales[a] = float(scales[p])
            full_sizes[a] = math.floor(x.shape[a] * float(scales[p]))
    elif sizes is not None and sizes.size:
        wanted = [int(s) for s in sizes]
        if policy in ("not_larger", "not_smaller"):
            pick = min if policy == "not_larger" else max
            scale = pick(wanted[p] / x.shape[a] for p, a in enumerate(axes))
            for a in axes:
                full_scales[a] = scale
                full_sizes[a] = math.floor(scale * x.shape[a] + 0.5)
        else:
            for p, a in enumerate(axes):
                full_sizes[a] = wanted[p]
                full_scales[a] = wanted[p] / x.shape[a]
    else:
        raise ValueError("Resize needs scales or sizes")
    return full_sizes, full_scales, full_rois


@kernel("Resize")
def resize_kernel(node: KernelNode):
    a = node.attrs
    old = node.opset < 11  # Resize-10: (X, scales), asymmetric coordinates, floor for nearest
    attrs = ResizeAttrs(
        mode=a.get("mode", "nearest"),
        coordinate_mode="asymmetric"
        if old
        else a.get("coordinate_transformation_mode", "half_pixel"),
        nearest_mode="floor" if old else a.get("nearest_mode", "round_prefer_floor"),
        cubic_a=float(a.get("cubic_coeff_a", -0.75)),
        exclude_outside=bool(a.get("exclude_outside", 0)),
        antialias=bool(a.get("antialias", 0)),
        extrapolation_value=float(a.get("extrapolation_value", 0.0)),
    )
    axes = a.get("axes")
    policy = a.get("keep_aspect_ratio_policy", "stretch")

    def run(x, roi=None, scales=None, sizes=None):
        if old:
            roi, scales, sizes = None, roi, None
        plan = _plan(x, roi, scales, sizes, axes, policy)
        return (resize(x, attrs, plan[1], plan[0], plan[2]),)

    return run


@kernel("Upsample")
def upsample_kernel(node: KernelNode):
    mode = node.attrs.get("mode", "nearest")
    attrs = ResizeAttrs(
        mode="linear" if mode in ("linear", "bilinear") else mode,
        coordinate_mode="asymmetric",
        nearest_mode="floor",
    )
    fixed = node.attrs.get("scales")

    def run(x, scales=None):
        scales = np.asarray(fixed if scales is None else scales, dtype=np.float64)
        plan = _plan(x, None, scales, None, None, "stretch")
        return (resize(x, attrs, plan[1], plan[0], plan[2]),)

    return run
