"""Reduction kernels: ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceProd, ReduceL1,
ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceSumSquare.

Axes come as an attribute before opset 18 (13 for ReduceSum) and as an optional int64
input from then on; both forms are read. An empty or absent axes list reduces everything,
unless noop_with_empty_axes is set: then the reduction runs over no axes at all, so the
composite reductions still apply their elementwise part (ReduceSumSquare squares,
ReduceLogSum takes the log), as the spec says.
"""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel


def reduce_axes(node: KernelNode, x: np.ndarray, axes_input) -> tuple[int, ...] | None:
    """The axes to reduce, from the attribute or the input; None means all of them.

    An empty axes list reduces everything, unless noop_with_empty_axes is set: then the
    result is `()`, a reduction over no axes.
    """
    if axes_input is not None:
        axes = [int(a) for a in np.asarray(axes_input).reshape(-1)]
    else:
        axes = node.attrs.get("axes")
    if not axes:
        return () if node.attrs.get("noop_with_empty_axes", 0) else None
    return tuple(a % x.ndim if x.ndim else 0 for a in axes)


def _lowest(dtype: np.dtype):
    if dtype.kind == "b":
        return False
    if dtype.kind in "iu":
        return np.iinfo(dtype).min
    return -np.inf


def _highest(dtype: np.dtype):
    if dtype.kind == "b":
        return True
    if dtype.kind in "iu":
        return np.iinfo(dtype).max
    return np.inf


def _max(x, axis, keepdims):
    # `initial` gives the spec's value for an empty set: the lowest value of the type.
    return np.max(x, axis=axis, keepdims=keepdims, initial=_lowest(x.dtype))


def _min(x, axis, keepdims):
    return np.min(x, axis=axis, keepdims=keepdims, initial=_highest(x.dtype))


def _l1(x, axis, keepdims):
    return np.sum(np.abs(x), axis=axis, keepdims=keepdims)


def _l2(x, axis, keepdims):
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


def _sum_square(x, axis, keepdims):
    return np.sum(np.square(x), axis=axis, keepdims=keepdims)


def _log_sum(x, axis, keepdims):
    return np.log(np.sum(x, axis=axis, keepdims=keepdims))


def _log_sum_exp(x, axis, keepdims):
    # Shift by the maximum so that exp never overflows; a slice that is all -inf (or
    # empty) keeps a shift of 0 and gives log(0) = -inf.
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0).astype(x.dtype, copy=False)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    if not keepdims:
        out = np.squeeze(out, axis=tuple(range(x.ndim)) if axis is None else axis)
    return out


def _reducer(fn, identity_on_noop: bool = False):
    def factory(node: KernelNode):
        keepdims = bool(node.attrs.get("keepdims", 1))

        def run(x, axes=None):
            ax = reduce_axes(node, x, axes)
            if ax == () and identity_on_noop:
                return (x,)
            out = fn(x, axis=ax, keepdims=keepdims)
            return (np.asarray(out, dtype=x.dtype),)

        return run

    return factory


kernel("ReduceSum")(_reducer(np.sum, identity_on_noop=True))
kernel("ReduceMean")(_reducer(np.mean, identity_on_noop=True))
kernel("ReduceMax")(_reducer(_max, identity_on_noop=True))
kernel("ReduceMin")(_reducer(_min, identity_on_noop=True))
kernel("ReduceProd")(_reducer(np.prod, identity_on_noop=True))
kernel("ReduceL1")(_reducer(_l1))
kernel("ReduceL2")(_reducer(_l2))
kernel("ReduceSumSquare")(_reducer(_sum_square))
kernel("ReduceLogSum")(_reducer(_log_sum))
kernel("ReduceLogSumExp")(_reducer(_log_sum_exp))
