"""Reduction kernels (axes as an attribute before opset 13/18, as an input after)."""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel

def reduce_axes(node: KernelNode, x: np.ndarray, axes_input) -> tuple[int, ...] | None:
    """The axes to reduce, from the attribute or the input; None means all of them.

    An empty axes list reduces everything, unless noop_with_empty_axes is set (then the
    caller returns the input unchanged: the caller checks for `()`).
    """
    if axes_input is not None:
        axes = [int(a) for a in np.asarray(axes_input).reshape(-1)]
    else:
        axes = node.attrs.get("axes")
    if not axes:
        return () if node.attrs.get("noop_with_empty_axes", 0) else None
    return tuple(a % x.ndim if x.ndim else 0 for a in axes)


def _reducer(fn):
    def factory(node: KernelNode):
        keepdims = bool(node.attrs.get("keepdims", 1))

        def run(x, axes=None):
            ax = reduce_axes(node, x, axes)
            if ax == ():
                return (x,)
            out = fn(x, axis=ax, keepdims=keepdims)
            return (np.asarray(out, dtype=x.dtype),)

        return run

    return factory


kernel("ReduceSum")(_reducer(np.sum))
kernel("ReduceMean")(_reducer(np.mean))
