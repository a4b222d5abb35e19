"""Derivative rules for Conv and ConvTranspose.

Both gradients of a convolution are convolutions again:

- the input's gradient spreads each output gradient back over the window it came from,
  which is a ConvTranspose of dY with the same weights, strides, dilations and group;
- the weight's gradient correlates the input with dY. With the batch axis moved into the
  channel axis, that is a Conv whose "weights" are dY: the forward strides become its
  dilations and the forward dilations its strides.

The only subtle part is the sizes. When the stride does not divide the padded input
evenly, the last few input entries are never read; the backward ops are padded and
cropped so that every gradient has exactly the shape of its tensor. The window geometry
(auto_pad, ceil_mode, output sizes) is resolved here from static shapes; the pooling
rules share it. SAME padding over sizes known only at run time is applied by a Pad whose
pads are computed from the input's shape, and the padded tensor is swept without padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxgrad.autodiff.rules import rule

Dim = int | None


@dataclass
class Sweep:
    """The geometry of a windowed op, as far as the static shapes tell.

    Attributes:
        nsp: the number of spatial axes.
        kernel: kernel size per axis (None where unknown).
        strides, dilations: per axis.
        begin, end: explicit padding per axis (auto_pad resolved).
        sizes: the input's spatial sizes (None where not static).
        out: the output's spatial sizes (None where not computable).
    """

    nsp: int
    kernel: list[Dim]
    strides: list[int]
    dilations: list[int]
    begin: list[int]
    end: list[int]
    sizes: list[Dim]
    out: list[Dim]

    @property
    def static(self) -> bool:
        """Whether every size, kernel extent and output size is a known integer."""
        return None not in self.sizes and None not in self.kernel and None not in self.out

    def span(self, i: int) -> int:
        """The extent of the dilated kernel along axis i (kernel must be known)."""
        return self.dilations[i] * (self.kernel[i] - 1) + 1

    def full(self, i: int) -> int:
        """Length along axis i of the zero-padded region that the windows sweep."""
        return (self.out[i] - 1) * self.strides[i] + self.span(i)


def spatial_rank(b, node, *names: str) -> int:
    """The number of spatial axes, from attributes or from any tensor of known rank."""
    for attr in ("kernel_shape", "strides", "dilations"):
        if node.attrs.get(attr):
            return len(node.attrs[attr])
    if node.attrs.get("pads"):
        return len(node.attrs["pads"]) // 2
    for name in names:
        rank = b.rank(name)
        if rank is not None:
            return rank - 2
    raise NotImplementedError(
        f"{node.op_type} node '{node.name}': the gradient needs the rank of its input; "
        "run shape inference on the model or give the inputs static ranks"
    )


def sweep(b, node, x: str, kernel: Sequence[Dim], ceil_mode: bool = False) -> Sweep:
    """Resolve the window geometry of `node` over input `x`.

    Raises:
        NotImplementedError: auto_pad is SAME_UPPER or SAME_LOWER and a spatial size or
            kernel extent is not static, so the padding cannot be resolved.
    """
    nsp = len(kernel)
    strides = list(node.attrs.get("strides") or [1] * nsp)
    dilations = list(node.attrs.get("dilations") or [1] * nsp)
    shape = b.shape(x)
    sizes: list[Dim] = [None] * nsp
    if shape is not None and len(shape) == nsp + 2:
        sizes = [d if isinstance(d, int) else None for d in shape[2:]]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")

    begin, end = [0] * nsp, [0] * nsp
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if None in sizes or None in kernel:
            raise NotImplementedError(
                f"{node.op_type} node '{node.name}' with auto_pad={auto_pad}: the gradient "
                f"needs static spatial sizes to resolve the padding, but input '{x}' has "
                f"shape {shape}; give the model static spatial sizes or explicit pads"
            )
        for i in range(nsp):
            target = -(-sizes[i] // strides[i])
            span = dilations[i] * (kernel[i] - 1) + 1
            total = max(0, (target - 1) * strides[i] + span - sizes[i])
            small = total // 2
            begin[i], end[i] = (
                (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
            )
    elif auto_pad == "NOTSET" and node.attrs.get("pads"):
        pads = [int(p) for p in node.attrs["pads"]]
        begin, end = pads[:nsp], pads[nsp:]
    elif auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"{node.op_type} node '{node.name}': auto_pad={auto_pad}")

    out: list[Dim] = []
    for i in range(nsp):
        if sizes[i] is None or kernel[i] is None:
            out.append(None)
            continue
        room = sizes[i] + begin[i] + end[i] - dilations[i] * (kernel[i] - 1) - 1
        if ceil_mode:
            o = -(-room // strides[i]) + 1
            if (o - 1) * strides[i] >= sizes[i] + begin[i]:  # would start in the end padding
                o -= 1
        else:
            o = room // strides[i] + 1
        out.append(o)
    return Sweep(nsp, list(kernel), strides, dilations, begin, end, sizes, out)


@dataclass
class Padded:
    """A tensor padded at run time as auto_pad SAME_UPPER or SAME_LOWER pads it.

    For spatial sizes known only at run time: the rule sweeps `x` (the padded tensor) with
    `sweep`, which has no padding left, then `unpad` cuts its gradient back to the input.

    Attributes:
        x: the padded tensor.
        begin: the padding before each spatial axis, int64 (nsp,).
        pads: Pad's pads for all axes, int64 (2·(nsp + 2),).
        sizes: the input's spatial sizes, int64 (nsp,).
        sweep: the windows' geometry over `x` (VALID).
    """

    x: str
    begin: str
    pads: str
    sizes: str
    sweep: Sweep

    def unpad(self, b, g: str) -> str:
        """g, shaped like the padded tensor, without the padding."""
        axes = b.ints(list(range(2, 2 + self.sweep.nsp)))
        return b.Slice(g, self.begin, b.Add(self.begin, self.sizes), axes)


def pad_same(b, node, x: str, kernel: Sequence[Dim], weights: str | None = None) -> Padded | None:
    """`x` padded as auto_pad SAME_* pads it, when that padding is known only at run time.

    Returns None when the node has no SAME auto_pad or x's spatial sizes are static (then
    `sweep` resolves the padding as constants). Per axis, the padding brings the output to
    ⌈L / s⌉ windows:
        total = max(0, (⌈L / s⌉ − 1)·s + d·(k − 1) + 1 − L),
    split with the odd entry at the end (SAME_UPPER) or the start (SAME_LOWER); the padding
    is zeros. A kernel size that is not static is read from the shape of `weights` at run
    time.

    Raises:
        NotImplementedError: the kernel's size is not static and no `weights` are given, or
            the opset is below 11 (Pad takes its pads as an input from 11 on).
    """
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return None
    nsp = len(kernel)
    shape = b.shape(x)
    if shape is not None and len(shape) == nsp + 2 and all(isinstance(d, int) for d in shape[2:]):
        return None
    if (None in kernel and weights is None) or b.opset < 11:
        need = "opset 11 (run-time Pad)" if b.opset < 11 else "a static kernel size"
        raise NotImplementedError(
            f"{node.op_type} node '{node.name}' with auto_pad={auto_pad} over spatial sizes "
            f"known only at run time: padding them needs {need}; give the model static "
            "spatial sizes or explicit pads"
        )
    strides = list(node.attrs.get("strides") or [1] * nsp)
    dilations = list(node.attrs.get("dilations") or [1] * nsp)
    sizes = spatial_shape(b, x)
    stride = b.ints(strides)
    one, zero = b.ints([1]), b.ints([0])
    target = b.Div(b.Add(sizes, b.Sub(stride, one)), stride)  # ⌈L / s⌉
    if None in kernel:  # d·(k − 1) + 1 from the weights' shape
        span = b.Add(b.Mul(b.ints(dilations), b.Sub(spatial_shape(b, weights), one)), one)
    else:
        span = b.ints([d * (k - 1) + 1 for d, k in zip(dilations, kernel)])
    total = b.Sub(b.Add(b.Mul(b.Sub(target, one), stride), span), sizes)
    total = b.Where(b.Less(total, zero), zero, total)
    half = b.Div(total, b.ints([2]))
    rest = b.Sub(total, half)
    begin, end = (half, rest) if auto_pad == "SAME_UPPER" else (rest, half)
    outer = b.ints([0, 0])
    pads = b.Concat(outer, begin, outer, end, axis=0)
    padded = b.Pad(x, pads)
    none = [None] * nsp
    sw = Sweep(nsp, list(kernel), strides, dilations, [0] * nsp, [0] * nsp, none, none)
    return Padded(padded, begin, pads, sizes, sw)


def spatial_shape(b, x: str, dims: Sequence[Dim] | None = None) -> str:
    """The spatial part of x's shape as an int64 tensor (a constant when static)."""
    if dims is not None and None not in dims:
        return b.ints(list(dims))
    if b.opset >= 15:
        return b.Shape(x, start=2)
    return b.Slice(b.Shape(x), b.ints([2]), b.ints([np.iinfo(np.int64).max]))


def crop(b, t: str, ends: Sequence[int] | str, nsp: int) -> str:
    """t[:, :, :e₁, …, :eₙ]: keep the leading entries of each spatial axis."""
    ends = ends if isinstance(ends, str) else b.ints(list(ends))
    return b.Slice(t, b.ints([0] * nsp), ends, b.ints(list(range(2, 2 + nsp))))


def spread(b, g: str, w: str, x: str, sw: Sweep, group: int = 1) -> str:
    """ConvTranspose of g with w, shaped exactly like the spatial part of x.

    This is the adjoint of a windowed sweep over x: every window's value goes back, weighted
    by w, onto the input entries it read. The ConvTranspose crops `begin` entries at the
    start; at the end it crops or extends with zeros so that input entries no window read
    (the stride did not divide evenly) get a zero gradient.
    """
    n = sw.nsp
    attrs = dict(strides=sw.strides, dilations=sw.dilations, group=group if group != 1 else None)
    if sw.static:
        end, extra = [], []
        for i in range(n):
            over = sw.full(i) - sw.begin[i] - sw.sizes[i]  # past x's end: crop, or pad if < 0
            end.append(max(over, 0))
            extra.append(max(-over, 0))
        return b.ConvTranspose(
            g, w, pads=sw.begin + end, output_padding=extra if any(extra) else None, **attrs
        )
    # Sizes known only at run time: make the result at least as long as x (an output
    # padding of s − 1 covers the unread tail), then crop it to x's shape.
    extra = [s - 1 for s in sw.strides]
    wide = b.ConvTranspose(
        g, w, pads=sw.begin + [0] * n, output_padding=extra if any(extra) else None, **attrs
    )
    return crop(b, wide, spatial_shape(b, x, sw.sizes), n)


def correlate(b, inp: str, g: str, sw: Sweep, group: int, kernel_of: str) -> str:
    """Σ over batch and windows of inp · g: the weight gradient of a windowed op.

    Args:
        inp: the tensor that was swept, (N, C, *L).
        g: the output gradient, (N, M, *Y).
        sw: the sweep's geometry over `inp`.
        group: the op's group.
        kernel_of: a tensor whose spatial shape is the kernel's (the weights).

    Returns:
        (M, C/group, *kernel).
    """
    n = sw.nsp
    space = list(range(2, 2 + n))

    # 1. The batch moves into the channel axis: (C/group, group·N, *L), each group's
    #    channels contiguous, so that a grouped Conv keeps the groups apart.
    if group == 1:
        xt = b.Transpose(inp, perm=[1, 0] + space)
    else:
        sizes = spatial_shape(b, inp, sw.sizes)
        split = b.Reshape(inp, b.Concat(b.ints([0, group, -1]), sizes, axis=0))
        xt = b.Transpose(split, perm=[2, 1, 0] + [a + 1 for a in space])
        xt = b.Reshape(xt, b.Concat(b.ints([0, -1]), sizes, axis=0))

    # 2. g as the weights: (M, N, *Y).
    gt = b.Transpose(g, perm=[1, 0] + space)

    # 3. Correlate: the forward strides step within the kernel (dilations), the forward
    #    dilations step between kernel taps (strides). The end padding beyond the last
    #    entry any window read is dropped, so the result is as long as the kernel or a
    #    little longer, and cropped.
    end = list(sw.end)
    longer = not sw.static
    if sw.static:
        for i in range(n):
            unread = sw.sizes[i] + sw.begin[i] + sw.end[i] - sw.full(i)
            cut = min(end[i], unread)
            end[i] -= cut
            longer = longer or (unread - cut) >= sw.dilations[i]
    dw = b.Conv(
        xt,
        gt,
        strides=sw.dilations,
        dilations=sw.strides,
        pads=sw.begin + end,
        group=group if group != 1 else None,
    )
    dw = b.Transpose(dw, perm=[1, 0] + space)
    if longer:
        dw = crop(b, dw, spatial_shape(b, kernel_of, sw.kernel), n)
    return dw


def _kernel(b, node, w: str, nsp: int) -> list[Dim]:
    if node.attrs.get("kernel_shape"):
        return [int(k) for k in node.attrs["kernel_shape"]]
    shape = b.shape(w)
    if shape is None or len(shape) != nsp + 2:
        return [None] * nsp
    return [d if isinstance(d, int) else None for d in shape[2:]]


def _bias_grad(b, dy: str, nsp: int) -> str:
    return b.reduce_sum(dy, [0] + list(range(2, 2 + nsp)), keepdims=0)


@rule("Conv")
def conv(b, node, dys):
    """Y = X ⋆ W + B  →  dX = ConvTranspose(dY, W), dW = X ⋆ dY over the batch, dB = Σ dY"""
    dy = dys[0]
    x, w = node.input[0], node.input[1]
    group = int(node.attrs.get("group", 1))
    nsp = spatial_rank(b, node, x, w)
    kernel = _kernel(b, node, w, nsp)
    padded = pad_same(b, node, x, kernel, weights=w)
    if padded is not None:  # SAME padding over sizes known only at run time
        xp, sw = padded.x, padded.sweep
        dx = padded.unpad(b, spread(b, dy, w, xp, sw, group)) if node.needs_grad(0) else None
    else:
        xp, sw = x, sweep(b, node, x, kernel)
        dx = spread(b, dy, w, x, sw, group) if node.needs_grad(0) else None
    dw = correlate(b, xp, dy, sw, group, w) if node.needs_grad(1) else None
    db = _bias_grad(b, dy, nsp) if node.needs_grad(2) else None
    return [dx, dw, db]


@rule("ConvTranspose")
def conv_transpose(b, node, dys):
    """Y = ConvTranspose(X, W) + B  →  dX = Conv(dY, W), dW = dY ⋆ X, dB = Σ dY"""
    dy = dys[0]
    x, w = node.input[0], node.input[1]
    group = int(node.attrs.get("group", 1))
    nsp = spatial_rank(b, node, x, w)
    sw, longer = _adjoint_sweep(b, node, x, dy, _kernel(b, node, w, nsp))

    # ConvTranspose is the adjoint of the Conv over (padded) Y described by `sw`, whose
    # output has X's sizes: dX is that Conv, dW its weight gradient with dY as the input.
    dx = None
    if node.needs_grad(0):
        dx = b.Conv(
            dy,
            w,
            strides=sw.strides,
            dilations=sw.dilations,
            pads=sw.begin + sw.end,
            group=group if group != 1 else None,
        )
        if longer:
            dx = crop(b, dx, spatial_shape(b, x, sw.out), nsp)
    dw = correlate(b, dy, x, sw, group, w) if node.needs_grad(1) else None
    db = _bias_grad(b, dy, nsp) if node.needs_grad(2) else None
    return [dx, dw, db]


def _sizes(b, name: str, nsp: int) -> list[Dim]:
    shape = b.shape(name)
    if shape is None or len(shape) != nsp + 2:
        return [None] * nsp
    return [d if isinstance(d, int) else None for d in shape[2:]]


def _adjoint_sweep(b, node, x: str, dy: str, kernel: list[Dim]) -> tuple[Sweep, bool]:
    """The Conv over Y whose adjoint a ConvTranspose node is, and whether its output
    comes out longer than X (then it is cropped).

    The full result F of the ConvTranspose has s·(L−1) + d·(k−1) + 1 entries per axis and
    Y = F[begin : begin + Lout], zero past F's end. So dF is dY padded with `begin` zeros
    at the start and `full − begin − Lout` at the end; when that is negative, dY's tail
    lies past F (those entries of Y are constant zeros) and the Conv reads a little more.
    The crop at the start follows onnxruntime (see the ConvTranspose kernel).
    """
    nsp = len(kernel)
    strides = list(node.attrs.get("strides") or [1] * nsp)
    dilations = list(node.attrs.get("dilations") or [1] * nsp)
    sizes = _sizes(b, x, nsp)
    extra = [int(p) for p in node.attrs.get("output_padding") or [0] * nsp]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    output_shape = node.attrs.get("output_shape")
    begin, tail = [0] * nsp, [-p for p in extra]  # tail = full − begin − Lout
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if None in sizes or None in kernel:
            detail = "output_shape" if output_shape else f"auto_pad={auto_pad}"
            raise NotImplementedError(
                f"ConvTranspose node '{node.name}' with {detail}: the gradient needs static "
                f"spatial sizes of '{x}' and of the kernel to resolve the padding"
            )
        for i in range(nsp):
            full = strides[i] * (sizes[i] - 1) + dilations[i] * (kernel[i] - 1) + 1
            target = list(output_shape)[-nsp:][i] if output_shape else sizes[i] * strides[i]
            total = max(0, full + extra[i] - target)
            small = total // 2
            begin[i] = small if auto_pad == "SAME_UPPER" else total - small
            size = target if output_shape else full + extra[i] - total
            tail[i] = full - begin[i] - size
    elif auto_pad == "NOTSET" and node.attrs.get("pads"):
        pads = [int(p) for p in node.attrs["pads"]]
        begin = pads[:nsp]
        tail = [e - p for e, p in zip(pads[nsp:], extra)]
    # The Conv over dY (padded by `begin` and the non-negative part of `tail`) has
    # L + ⌊max(−tail, 0) / s⌋ outputs per axis.
    longer = any(-t >= s for t, s in zip(tail, strides))
    sw = Sweep(
        nsp, kernel, strides, dilations, begin, [max(t, 0) for t in tail], _sizes(b, dy, nsp), sizes
    )
    return sw, longer
