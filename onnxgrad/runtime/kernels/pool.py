"""Pooling kernels: MaxPool (with Indices), AveragePool, LpPool and their Global forms.

Each windowed pool runs a loop over kernel offsets; every step combines one strided slice
of the padded input (one value per output position) into the result, so Python never
touches single elements. Window geometry (auto_pad, ceil_mode) comes from the conv module.
"""

from __future__ import annotations

import math

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel
from onnxgrad.runtime.kernels.conv import (
    Windows,
    check_auto_pad,
    kernel_offsets,
    pad_input,
    spatial_attrs,
    windows,
)


def _windows(node: KernelNode, x: np.ndarray) -> Windows:
    nsp = x.ndim - 2
    kernel_shape = node.attrs.get("kernel_shape")
    if kernel_shape is None:
        raise ValueError(f"{node.op_type} needs the kernel_shape attribute")
    strides, dilations, pads = spatial_attrs(node, nsp)
    return windows(
        x.shape[2:],
        kernel_shape,
        strides,
        dilations,
        pads,
        node.attrs.get("auto_pad", "NOTSET"),
        bool(node.attrs.get("ceil_mode", 0)),
    )


def _lowest(dtype: np.dtype):
    return -np.inf if dtype.kind == "f" else np.iinfo(dtype).min


def window_counts(win: Windows, sizes, include_pad: bool) -> np.ndarray:
    """How many taps of each window fall inside the input (or inside input + pads).

    Windows are boxes, so the count is the outer product of one count per axis. A window
    that overhangs the end padding (ceil_mode) counts only the taps it really covers,
    pads included or not, as onnxruntime does.
    """
    count = np.ones((), dtype=np.int64)
    for i, size in enumerate(sizes):
        starts = np.arange(win.out[i]) * win.strides[i] - win.begin[i]
        taps = starts[:, None] + np.arange(win.kernel[i])[None, :] * win.dilations[i]
        low, high = (-win.begin[i], size + win.end[i]) if include_pad else (0, size)
        axis = ((taps >= low) & (taps < high)).sum(axis=1)
        count = np.multiply.outer(count, axis)
    return count


@kernel("MaxPool")
def max_pool(node: KernelNode):
    """Y = max over each window; Indices = where each max sits in X, flattened."""
    check_auto_pad(node)
    storage_order = int(node.attrs.get("storage_order", 0))
    want_indices = len(node.outputs) > 1 and bool(node.outputs[1])

    def run(x):
        win = _windows(node, x)
        xp = pad_input(x, win, _lowest(x.dtype))
        if not want_indices:
            y = None
            for _, taps in kernel_offsets(win):
                part = xp[(Ellipsis, *taps)]
                y = part.copy() if y is None else np.maximum(y, part, out=y)
            return (y,)

        # Ties: the first maximum in scan order wins (strict >), as in onnxruntime. The
        # winning tap is tracked without branches, arg += better · (flat − arg), in the
        # narrowest integer type that holds every tap number.
        taps_total = math.prod(win.kernel)
        small = np.int8 if taps_total <= 127 else np.int32
        y, arg, better, step = None, None, None, None
        for flat, (_, taps) in enumerate(kernel_offsets(win)):
            part = xp[(Ellipsis, *taps)]
            if y is None:
                y = part.copy()
                arg = np.zeros(y.shape, small)
                better = np.empty(y.shape, bool)
                step = np.empty(y.shape, small)
                continue
            np.greater(part, y, out=better)
            np.maximum(y, part, out=y)
            np.subtract(small(flat), arg, out=step)
            step *= better
            arg += step

        # The flat index: each tap's offset (a take from a table of one entry per tap,
        # faster than fancy indexing with the narrow type) plus the window's origin.
        indices = np.take(tap_offsets(x.shape, win), arg)
        indices += origins(x.shape, win)
        return (y, indices)

    cache: dict = {}

    def origins(shape, win: Windows) -> np.ndarray:
        # Kept for one shape at a time: batch sizes rarely change between steps.
        key = (shape, win)
        found = cache.get(key)
        if found is None:
            found = _window_origins(shape, win, storage_order)
            cache.clear()
            cache[key] = found
        return found

    def tap_offsets(shape, win: Windows) -> np.ndarray:
        return _tap_offsets(shape, win, storage_order)

    return run


def _axis_steps(sizes, storage_order: int) -> list[int]:
    """How far apart neighbours along each spatial axis are in the flattened X."""
    nsp = len(sizes)
    if storage_order:
        # Column-major within the spatial block: the first spatial axis varies fastest.
        return [math.prod(sizes[:i]) for i in range(nsp)]
    return [math.prod(sizes[i + 1 :]) for i in range(nsp)]


def _window_origins(shape, win: Windows, storage_order: int) -> np.ndarray:
    """Flat position in X (over N, C and space) of each window's first tap (maybe in the pads)."""
    nsp = len(shape) - 2
    sizes = shape[2:]
    steps = _axis_steps(sizes, storage_order)
    index = np.zeros((1,) * nsp, np.int64)
    for i in range(nsp):
        grid = np.arange(win.out[i], dtype=np.int64) * win.strides[i] - win.begin[i]
        index = index + grid.reshape((win.out[i],) + (1,) * (nsp - 1 - i)) * steps[i]
    block = math.prod(sizes)
    base = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape[:2] + (1,) * nsp)
    return index + base * block


def _tap_offsets(shape, win: Windows, storage_order: int) -> np.ndarray:
    """Flat offset from a window's first tap to each of its taps, in scan order."""
    steps = _axis_steps(shape[2:], storage_order)
    offsets = np.zeros((), np.int64)
    for i, k in enumerate(win.kernel):
        axis = np.arange(k, dtype=np.int64) * win.dilations[i] * steps[i]
        offsets = np.add.outer(offsets, axis)
    return offsets.reshape(-1)


@kernel("AveragePool")
def average_pool(node: KernelNode):
    """Y = Σ window / count, count with or without the pads (count_include_pad)."""
    check_auto_pad(node)
    include_pad = bool(node.attrs.get("count_include_pad", 0))

    def run(x):
        win = _windows(node, x)
        total = _window_sum(pad_input(x, win, 0), win)
        count = window_counts(win, x.shape[2:], include_pad)
        return (total / count.astype(x.dtype),)

    return run


def _window_sum(xp: np.ndarray, win: Windows) -> np.ndarray:
    total = None
    for _, taps in kernel_offsets(win):
        part = xp[(Ellipsis, *taps)]
        total = part.copy() if total is None else np.add(total, part, out=total)
    return total


@kernel("LpPool")
def lp_pool(node: KernelNode):
    """Y = (Σ window |x|ᵖ)^(1/p), the pads counting as zeros."""
    check_auto_pad(node)
    p = node.attrs.get("p", 2)

    def run(x):
        win = _windows(node, x)
        powered = np.abs(x) ** x.dtype.type(p)
        total = _window_sum(pad_input(powered, win, 0), win)
        return (total ** x.dtype.type(1.0 / p),)

    return run


def _spatial_axes(x: np.ndarray) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


@kernel("GlobalAveragePool")
def global_average_pool(node: KernelNode):
    """Y = mean over every spatial axis, kept as size 1."""
    return lambda x: (np.mean(x, axis=_spatial_axes(x), keepdims=True, dtype=x.dtype),)


@kernel("GlobalMaxPool")
def global_max_pool(node: KernelNode):
    """Y = max over every spatial axis, kept as size 1."""
    return lambda x: (np.max(x, axis=_spatial_axes(x), keepdims=True),)


@kernel("GlobalLpPool")
def global_lp_pool(node: KernelNode):
    """Y = (Σ_space |x|ᵖ)^(1/p), kept as size 1."""
    p = node.attrs.get("p", 2)

    def run(x):
        total = np.sum(np.abs(x) ** x.dtype.type(p), axis=_spatial_axes(x), keepdims=True)
        return (total ** x.dtype.type(1.0 / p),)

    return run
