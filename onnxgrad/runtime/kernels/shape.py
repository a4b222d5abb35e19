"""Shape-manipulation kernels. Views instead of copies wherever numpy allows."""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel


def _ints(value) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


@kernel("Reshape")
def reshape(node: KernelNode):
    allowzero = node.attrs.get("allowzero", 0)
    attr_shape = node.attrs.get("shape")  # opset < 5

    def run(x, shape=None):
        dims = _ints(shape) if shape is not None else list(attr_shape)
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return (x.reshape(dims),)

    return run


@kernel("Flatten")
def flatten(node: KernelNode):
    axis = node.attrs.get("axis", 1)

    def run(x):
        a = axis % x.ndim if x.ndim and axis < 0 else axis
        outer = int(np.prod(x.shape[:a], dtype=np.int64))
        return (x.reshape(outer, -1) if x.size else x.reshape(outer, int(np.prod(x.shape[a:]))),)

    return run


@kernel("Transpose")
def transpose(node: KernelNode):
    perm = node.attrs.get("perm")
    return lambda x: (np.transpose(x, perm),)


def _axes(node: KernelNode, axes_input) -> list[int] | None:
    if axes_input is not None:
        return _ints(axes_input)
    return node.attrs.get("axes")


@kernel("Squeeze")
def squeeze(node: KernelNode):
    def run(x, axes=None):
        ax = _axes(node, axes)
        if ax is None:
            return (np.squeeze(x),)
        return (np.squeeze(x, axis=tuple(a % x.ndim for a in ax)),)

    return run


@kernel("Unsqueeze")
def unsqueeze(node: KernelNode):
    def run(x, axes=None):
        ax = _axes(node, axes)
        rank = x.ndim + len(ax)
        out = x
        for a in sorted(a % rank for a in ax):
            out = np.expand_dims(out, a)
        return (out,)

    return run


@kernel("Concat")
def concat(node: KernelNode):
    axis = node.attrs["axis"]
    return lambda *xs: (np.concatenate(xs, axis=axis),)


@kernel("Expand")
def expand(node: KernelNode):
    def run(x, shape):
        target = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
        return (np.broadcast_to(x, target).copy(),)

    return run


@kernel("NonZero")
def nonzero(node: KernelNode):
    return lambda x: (np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1),)
