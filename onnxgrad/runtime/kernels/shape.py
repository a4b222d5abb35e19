"""Shape-manipulation kernels. Views instead of copies wherever numpy allows.

Reshape Flatten Transpose Squeeze Unsqueeze Concat Split Slice Expand Tile Pad
DepthToSpace SpaceToDepth NonZero, each reading every opset form of its op that ONNX
defines (attribute or input forms of axes, split, starts, pads).
"""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel


def _ints(value) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


@kernel("Reshape")
def reshape(node: KernelNode):
    """Reshape: a view; 0 copies the input dimension unless allowzero, -1 is inferred."""
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
    """Flatten: a 2-D view split at `axis` (negative counts from the end)."""
    axis = node.attrs.get("axis", 1)

    def run(x):
        a = axis + x.ndim if axis < 0 else axis
        outer = int(np.prod(x.shape[:a], dtype=np.int64))
        inner = int(np.prod(x.shape[a:], dtype=np.int64))
        return (x.reshape(outer, inner),)

    return run


@kernel("Transpose")
def transpose(node: KernelNode):
    """Transpose: a view; no perm reverses the axes."""
    perm = node.attrs.get("perm")  # absent: reverse the axes, as numpy does
    return lambda x: (np.transpose(x, perm),)


def _axes(node: KernelNode, axes_input) -> list[int] | None:
    if axes_input is not None:
        return _ints(axes_input)
    return node.attrs.get("axes")


@kernel("Squeeze")
def squeeze(node: KernelNode):
    """Squeeze: axes from the input (opset 13) or the attribute; none drops every 1."""

    def run(x, axes=None):
        ax = _axes(node, axes)
        if ax is None:
            return (np.squeeze(x),)
        return (np.squeeze(x, axis=tuple(a % x.ndim for a in ax)),)

    return run


@kernel("Unsqueeze")
def unsqueeze(node: KernelNode):
    """Unsqueeze: axes from the input (opset 13) or the attribute, negative ones too."""

    def run(x, axes=None):
        ax = _axes(node, axes)
        rank = x.ndim + len(ax)
        return (np.expand_dims(x, tuple(sorted(a % rank for a in ax))),)

    return run


@kernel("Concat")
def concat(node: KernelNode):
    """Concat along `axis` (negative counts from the end)."""
    axis = node.attrs["axis"]
    return lambda *xs: (np.concatenate(xs, axis=axis),)


def split_sizes(dim: int, parts: int) -> list[int]:
    """Sizes of `parts` chunks of `dim`: equal, ceil(dim / parts), the last one smaller."""
    chunk = -(-dim // parts)
    sizes = [chunk] * (parts - 1)
    return sizes + [dim - chunk * (parts - 1)]


@kernel("Split")
def split(node: KernelNode):
    """Split: sizes from the input (13), the attribute (< 13), or num_outputs chunks (18)."""
    axis = node.attrs.get("axis", 0)
    attr_split = node.attrs.get("split")  # opset < 13
    parts = node.attrs.get("num_outputs") or len(node.outputs)

    def run(x, split_input=None):
        if split_input is not None:
            sizes = _ints(split_input)
        elif attr_split is not None:
            sizes = list(attr_split)
        else:
            sizes = split_sizes(x.shape[axis], parts)
        cuts = np.cumsum(sizes)[:-1]
        return tuple(np.split(x, cuts, axis=axis))

    return run


def slice_of(start: int, end: int, step: int, dim: int) -> slice:
    """The Python slice for ONNX Slice's (start, end, step) on a dimension of size `dim`.

    Negative starts and ends count from the end; both are then clamped: to [0, dim] for a
    positive step, to [0, dim − 1] (start) and [−1, dim − 1] (end) for a negative one,
    where end = −1 means "past the first element".
    """
    if step == 0:
        raise ValueError("Slice step cannot be 0")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


@kernel("Slice")
def slice_(node: KernelNode):
    """Slice: a view; inputs (opset 10) or attributes, negative steps, clamped bounds."""
    attrs = node.attrs  # opset < 10: starts, ends, axes as attributes, no steps

    def run(x, starts=None, ends=None, axes=None, steps=None):
        if starts is None:
            starts, ends, axes = attrs["starts"], attrs["ends"], attrs.get("axes")
        starts, ends = _ints(starts), _ints(ends)
        axes = list(range(len(starts))) if axes is None else _ints(axes)
        steps = [1] * len(starts) if steps is None else _ints(steps)
        index = [slice(None)] * x.ndim
        for a, s, e, k in zip(axes, starts, ends, steps):
            a = a % x.ndim
            index[a] = slice_of(s, e, k, x.shape[a])
        return (x[tuple(index)],)

    return run


@kernel("Expand")
def expand(node: KernelNode):
    """Expand: numpy broadcasting of x against `shape`."""

    def run(x, shape):
        target = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
        # A copy: a broadcast view is read-only, and outputs may be handed to callers.
        return (np.broadcast_to(x, target).copy(),)

    return run


@kernel("Tile")
def tile(node: KernelNode):
    """Tile: x repeated `repeats[i]` times along each axis i."""
    return lambda x, repeats: (np.tile(x, _ints(repeats)),)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


@kernel("Pad")
def pad(node: KernelNode):
    """Pad: constant, reflect, edge, wrap; negative pads crop; the axes input of opset 18."""
    mode = node.attrs.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad mode '{mode}'")
    attr_pads = node.attrs.get("pads", node.attrs.get("paddings"))  # opset < 11
    attr_value = node.attrs.get("value", 0.0)

    def run(x, pads=None, constant_value=None, axes=None):
        pads = _ints(pads) if pads is not None else list(attr_pads)
        axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in _ints(axes)]
        n = len(axes)
        before, after = [0] * x.ndim, [0] * x.ndim
        for k, a in enumerate(axes):
            before[a], after[a] = pads[k], pads[k + n]

        # 1. Negative pads crop.
        crop = tuple(slice(max(-b, 0), d - max(-e, 0)) for d, b, e in zip(x.shape, before, after))
        x = x[crop]

        # 2. Positive pads pad.
        widths = [(max(b, 0), max(e, 0)) for b, e in zip(before, after)]
        if not any(b or e for b, e in widths):
            return (x,)
        if mode == "constant":
            value = attr_value if constant_value is None else np.asarray(constant_value).item()
            return (np.pad(x, widths, mode="constant", constant_values=x.dtype.type(value)),)
        return (np.pad(x, widths, mode=_PAD_MODES[mode]),)

    return run


@kernel("DepthToSpace")
def depth_to_space(node: KernelNode):
    """DepthToSpace in DCR (default) or CRD order."""
    size = node.attrs["blocksize"]
    crd = node.attrs.get("mode", "DCR") == "CRD"

    def run(x):
        n, c, h, w = x.shape
        depth = c // (size * size)
        if crd:
            t = x.reshape(n, depth, size, size, h, w).transpose(0, 1, 4, 2, 5, 3)
        else:
            t = x.reshape(n, size, size, depth, h, w).transpose(0, 3, 4, 1, 5, 2)
        return (t.reshape(n, depth, h * size, w * size),)

    return run


@kernel("SpaceToDepth")
def space_to_depth(node: KernelNode):
    """SpaceToDepth: the inverse of DepthToSpace, in DCR (default) or CRD order."""
    size = node.attrs["blocksize"]
    crd = node.attrs.get("mode", "DCR") == "CRD"

    def run(x):
        n, c, h, w = x.shape
        t = x.reshape(n, c, h // size, size, w // size, size)
        t = t.transpose(0, 1, 3, 5, 2, 4) if crd else t.transpose(0, 3, 5, 1, 2, 4)
        return (t.reshape(n, c * size * size, h // size, w // size),)

    return run


@kernel("NonZero")
def nonzero(node: KernelNode):
    """NonZero: the indices of the non-zero elements, one row per axis."""
    return lambda x: (np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1),)
