"""Convolution kernels: Conv and ConvTranspose, 1-D to 3-D, with groups.

Conv is im2col: a strided view puts every window of the padded input side by side
without copying, one copy lays the windows out as a matrix, and one (batched over
groups) matrix product with the weights gives the output. ConvTranspose
is the reverse: one matrix product spreads each input value over its kernel's taps, and
col2im adds the taps back into the output with one strided slice-add per kernel offset,
so the Python loop runs over kernel offsets, never over elements.

The window geometry (auto_pad, pads, ceil_mode, output sizes) lives here too; the pooling
kernels share it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from onnxgrad.runtime.kernels import KernelNode, kernel

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")

# Output sizes from which Conv runs one product per image (outputs in place) rather than
# one product over the whole batch followed by a transposing copy.
BATCHED_MIN_OUT = 64
CANVAS_COL2IM = True
# How many im2col entries Conv lays out at a time (2 MiB of float32).
COLUMNS_PER_CHUNK = 1 << 19


@dataclass(frozen=True)
class Windows:
    """Where the windows of a strided, dilated, padded sweep fall, per spatial axis.

    Attributes:
        begin, end: padding before and after each axis.
        out: output size per axis.
        kernel, strides, dilations: per axis.
    """

    begin: tuple[int, ...]
    end: tuple[int, ...]
    out: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]

    @property
    def span(self) -> tuple[int, ...]:
        """The extent of a dilated kernel per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilations))

    @property
    def reach(self) -> tuple[int, ...]:
        """How far into the padded input the last window reaches, per axis."""
        return tuple((o - 1) * s + sp for o, s, sp in zip(self.out, self.strides, self.span))


def spatial_attrs(node: KernelNode, nsp: int) -> tuple[list[int], list[int], list[int] | None]:
    """strides, dilations and the pads attribute (None when absent) for `nsp` spatial axes."""
    strides = list(node.attrs.get("strides") or [1] * nsp)
    dilations = list(node.attrs.get("dilations") or [1] * nsp)
    pads = node.attrs.get("pads")
    return strides, dilations, (list(pads) if pads else None)


def check_auto_pad(node: KernelNode) -> str:
    """The node's auto_pad value, validated."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in AUTO_PADS:
        raise NotImplementedError(f"auto_pad='{auto_pad}' is not one of {', '.join(AUTO_PADS)}")
    return auto_pad


def windows(
    sizes: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None,
    auto_pad: str = "NOTSET",
    ceil_mode: bool = False,
) -> Windows:
    """Resolve padding and output sizes the way ONNX (and onnxruntime) define them.

    Args:
        sizes: the input's spatial sizes.
        kernel_shape, strides, dilations: per spatial axis.
        pads: [begin..., end...] (NOTSET only; None means zeros).
        auto_pad: NOTSET, SAME_UPPER, SAME_LOWER or VALID.
        ceil_mode: pooling rounds the output size up; a last window that would start in
            the end padding is dropped.
    """
    n = len(sizes)
    begin, end, out = [], [], []
    for i in range(n):
        size, k, s, d = sizes[i], kernel_shape[i], strides[i], dilations[i]
        span = d * (k - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = -(-size // s)
            total = max(0, (target - 1) * s + span - size)
            small = total // 2
            b, e = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
        elif auto_pad == "VALID" or pads is None:
            b, e = 0, 0
        else:
            b, e = int(pads[i]), int(pads[i + n])
        room = size + b + e - span
        if ceil_mode:
            o = -(-room // s) + 1
            if (o - 1) * s >= size + b:  # the last window would start in the end padding
                o -= 1
        else:
            o = room // s + 1
        if o <= 0:
            raise ValueError(
                f"the kernel (extent {span}) does not fit the padded input (size {size + b + e}) "
                f"along spatial axis {i}"
            )
        begin.append(b)
        end.append(e)
        out.append(o)
    return Windows(
        tuple(begin), tuple(end), tuple(out), tuple(kernel_shape), tuple(strides), tuple(dilations)
    )


def pad_input(x: np.ndarray, win: Windows, fill=0) -> np.ndarray:
    """`x` padded per `win`, long enough for every window (ceil_mode can overhang the pads)."""
    lead = x.ndim - len(win.begin)
    sizes = x.shape[lead:]
    padded = [max(sz + b + e, r) for sz, b, e, r in zip(sizes, win.begin, win.end, win.reach)]
    if all(b == 0 for b in win.begin) and list(sizes) == padded:
        return x
    buf = np.full(x.shape[:lead] + tuple(padded), fill, dtype=x.dtype)
    inner = tuple(slice(b, b + sz) for b, sz in zip(win.begin, sizes))
    buf[(Ellipsis, *inner)] = x
    return buf


def window_view(xp: np.ndarray, win: Windows) -> np.ndarray:
    """A read-only view of shape (*lead, *out, *kernel) over the padded input `xp`."""
    lead = xp.ndim - len(win.out)
    st = xp.strides
    shape = xp.shape[:lead] + win.out + win.kernel
    strides = (
        st[:lead]
        + tuple(st[lead + i] * s for i, s in enumerate(win.strides))
        + tuple(st[lead + i] * d for i, d in enumerate(win.dilations))
    )
    return as_strided(xp, shape, strides, writeable=False)


def kernel_offsets(win: Windows):
    """Every kernel offset, and the slices of the padded input that offset reads per output."""
    for offset in itertools.product(*(range(k) for k in win.kernel)):
        yield (
            offset,
            tuple(
                slice(k * d, k * d + (o - 1) * s + 1, s)
                for k, d, o, s in zip(offset, win.dilations, win.out, win.strides)
            ),
        )


@kernel("Conv")
def conv(node: KernelNode):
    """Y = X ⋆ W + B, by im2col and one batched matrix product over the groups."""
    group = int(node.attrs.get("group", 1))
    auto_pad = check_auto_pad(node)
    kernel_attr = node.attrs.get("kernel_shape")

    def run(x, w, b=None):
        nsp = x.ndim - 2
        strides, dilations, pads = spatial_attrs(node, nsp)
        win = windows(x.shape[2:], w.shape[2:], strides, dilations, pads, auto_pad)
        if kernel_attr is not None and list(kernel_attr) != list(w.shape[2:]):
            raise ValueError(f"kernel_shape {list(kernel_attr)} does not match W {w.shape}")
        n, c = x.shape[:2]
        m, cg = w.shape[:2]
        if c != cg * group or m % group:
            raise ValueError(f"X {x.shape} and W {w.shape} do not fit group={group}")

        # 1. im2col: the windows side by side, copied out of a strided view. The longer of
        #    (output positions, kernel taps) goes innermost, so the copy runs in long
        #    strides: output positions for ordinary convolutions, taps for the huge-kernel,
        #    tiny-output ones that weight gradients are.
        view = window_view(pad_input(x, win), win)
        view = view.reshape((n, group, cg) + win.out + win.kernel)
        space, taps = tuple(range(3, 3 + nsp)), tuple(range(3 + nsp, 3 + 2 * nsp))
        wg = w.reshape(group, m // group, -1)
        if math.prod(win.out) >= BATCHED_MIN_OUT:
            # 2. Per image and group, (M/g, Cg·k) @ (Cg·k, out): the products land in
            #    (N, M, *out) order, so no transposing copy follows. The columns are laid
            #    out (N, group, Cg·k, out), the cheapest order to copy out of the view,
            #    a few images at a time, so that they stay in cache and small.
            rows, size = cg * math.prod(win.kernel), math.prod(win.out)
            view = view.transpose((0, 1, 2) + taps + space)
            y = np.empty((n, group, m // group, size), dtype=np.result_type(x, w))
            chunk = max(1, min(n, COLUMNS_PER_CHUNK // (group * rows * size)))
            cols = np.empty((chunk,) + view.shape[1:], dtype=x.dtype)
            for start in range(0, n, chunk):
                part = cols[: min(chunk, n - start)]
                np.copyto(part, view[start : start + chunk])
                np.matmul(wg, part.reshape(-1, group, rows, size), out=y[start : start + chunk])
            y = y.reshape((n, m) + win.out)
            if b is not None:
                y += b.reshape((m,) + (1,) * nsp)
            return (y,)
        if math.prod(win.out) >= math.prod(win.kernel):
            # 2. One matrix product per group: (M/g, Cg·k) @ (Cg·k, N·out).
            cols = np.ascontiguousarray(view.transpose((1, 2) + taps + (0,) + space))
            y = np.matmul(wg, cols.reshape(group, cg * math.prod(win.kernel), -1))
            y = y.reshape((group, m // group, n) + win.out).transpose((2, 0, 1) + space)
        else:
            # 2. One matrix product per group over columns laid out (N·out, Cg·k), the
            #    longer of its two sides as BLAS's rows, which runs a short one (a 3×3
            #    kernel's 9 rows) much slower: (N·out, Cg·k) @ (Cg·k, M/g), or its
            #    transpose (M/g, Cg·k) @ (Cg·k, N·out).
            cols = np.ascontiguousarray(view.transpose((1, 0) + space + (2,) + taps))
            cols = cols.reshape(group, n * math.prod(win.out), -1)
            if n * math.prod(win.out) >= m // group:
                y = np.matmul(cols, wg.transpose(0, 2, 1))
                y = y.reshape((group, n) + win.out + (m // group,))
                y = y.transpose((1, 0, 2 + nsp) + tuple(range(2, 2 + nsp)))
            else:
                y = np.matmul(wg, cols.transpose(0, 2, 1))
                y = y.reshape((group, m // group, n) + win.out).transpose((2, 0, 1) + space)

        # 3. Back to (N, M, *out).
        y = np.ascontiguousarray(y).reshape((n, m) + win.out)
        if b is not None:
            y += b.reshape((m,) + (1,) * nsp)
        return (y,)

    return run


def transpose_windows(
    sizes: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None,
    output_padding: Sequence[int] | None,
    output_shape: Sequence[int] | None,
    auto_pad: str = "NOTSET",
) -> tuple[list[int], list[int]]:
    """ConvTranspose's crop at the start of each axis and its output sizes.

    The full (uncropped) result of an axis has s·(L−1) + d·(k−1) + 1 entries; the output
    starts `begin` entries in and has `out` entries, padded with zeros past the full
    result when output_padding or output_shape asks for more.
    """
    n = len(sizes)
    extra = list(output_padding or [0] * n)
    begin, out = [], []
    for i in range(n):
        full = strides[i] * (sizes[i] - 1) + dilations[i] * (kernel_shape[i] - 1) + 1
        if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = output_shape[i] if output_shape is not None else sizes[i] * strides[i]
            # As onnxruntime does: a negative total padding is clamped to zero; then an
            # explicit output_shape is met by zeros at the end, while SAME keeps the full
            # result (the spec's reference evaluator pads SAME out to L·s instead).
            total = max(0, full + extra[i] - target)
            # The odd unit goes to the end for SAME_UPPER, to the start otherwise.
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            out.append(target if output_shape is not None else full + extra[i] - total)
        else:
            if auto_pad == "VALID" or pads is None:
                b, e = 0, 0
            else:
                b, e = int(pads[i]), int(pads[i + n])
            begin.append(b)
            out.append(full + extra[i] - b - e)
    return begin, out


@kernel("ConvTranspose")
def conv_transpose(node: KernelNode):
    """Y = Xᵀ ⋆ W + B: one matrix product per group, then col2im by kernel offset."""
    group = int(node.attrs.get("group", 1))
    auto_pad = check_auto_pad(node)
    output_padding = node.attrs.get("output_padding")
    output_shape = node.attrs.get("output_shape")

    def run(x, w, b=None):
        nsp = x.ndim - 2
        strides, dilations, pads = spatial_attrs(node, nsp)
        n, c = x.shape[:2]
        og = w.shape[1]
        sizes, kshape = x.shape[2:], w.shape[2:]
        if w.shape[0] != c or c % group:
            raise ValueError(f"X {x.shape} and W {w.shape} do not fit group={group}")
        target = list(output_shape)[-nsp:] if output_shape else None
        begin, out = transpose_windows(
            sizes, kshape, strides, dilations, pads, output_padding, target, auto_pad
        )
        if min(out, default=1) <= 0:
            raise ValueError(f"the pads leave no output: output sizes {out}")

        cg = c // group
        wg = w.reshape(group, cg, -1).transpose(0, 2, 1)
        extent = tuple(
            max(s * (sz - 1) + d * (k - 1) + 1, bg + o)
            for s, sz, d, k, bg, o in zip(strides, sizes, dilations, kshape, begin, out)
        )
        if nsp >= 2 and all(s == 1 for s in strides) and CANVAS_COL2IM:
            buf = _spread_on_canvas(x, wg, group, og, kshape, dilations, extent)
        else:
            # 1. Spread every input value over the kernel, one matrix product per group:
            #    (Og·k, Cg) @ (Cg, N·L) gives (group, Og, *k, N, *L), one slab per offset.
            xg = np.ascontiguousarray(x.reshape((n, group, cg, -1)).transpose(1, 2, 0, 3))
            cols = np.matmul(wg, xg.reshape(group, cg, -1))
            cols = cols.reshape((group, og) + kshape + (n,) + sizes)

            # 2. col2im: add each offset's slab into a buffer that covers the full result
            #    and the output window (which may end past it: zeros there).
            buf = np.zeros((group, og, n) + extent, dtype=x.dtype)
            for offset in itertools.product(*(range(k) for k in kshape)):
                where = tuple(
                    slice(k * d, k * d + s * (sz - 1) + 1, s)
                    for k, d, s, sz in zip(offset, dilations, strides, sizes)
                )
                buf[(Ellipsis, *where)] += cols[(slice(None), slice(None), *offset)]

        # 3. Crop to the output window, as (N, M, *out).
        crop = tuple(slice(bg, bg + o) for bg, o in zip(begin, out))
        y = buf[(Ellipsis, *crop)].transpose((2, 0, 1) + tuple(range(3, 3 + nsp)))
        y = np.ascontiguousarray(y).reshape((n, group * og) + tuple(out))
        if b is not None:
            y += b.reshape((group * og,) + (1,) * nsp)
        return (y,)

    return run


def _spread_on_canvas(x, wg, group, og, kshape, dilations, extent) -> np.ndarray:
    """ConvTranspose's steps 1 and 2 for unit strides, with col2im as contiguous adds.

    The input is laid on a canvas as wide as the full result along every spatial axis
    but the first (zeros beyond the input). On that canvas a kernel offset moves every
    value by one fixed flat distance, so col2im adds each offset's slab into the result
    as one contiguous run instead of many short rows. Zeros that run past a row end land
    in the next row and add nothing. The price: the product covers the canvas's zeros.

    Returns:
        The (group, Og, N, *extent) sums, as the strided col2im would give them.
    """
    n, nsp = x.shape[0], x.ndim - 2
    sizes = x.shape[2:]
    cg = x.shape[1] // group
    canvas = (sizes[0],) + tuple(extent[1:])
    run, taps = math.prod(canvas), math.prod(kshape)
    steps = [math.prod(extent[i + 1 :]) for i in range(nsp)]
    shifts = [
        sum(o * d * st for o, d, st in zip(offset, dilations, steps))
        for offset in itertools.product(*(range(k) for k in kshape))
    ]
    # Planes with room for the last offset's overhang (under one row of the first axis).
    plane = math.prod(extent)
    buf = np.zeros((group, og, n, plane + steps[0]), dtype=x.dtype)
    moved = x.reshape((n, group, cg) + sizes).transpose((1, 2, 0) + tuple(range(3, 3 + nsp)))
    corner = (Ellipsis, *(slice(0, sz) for sz in sizes))

    # A few images at a time, so that the columns stay in cache and small.
    chunk = max(1, min(n, COLUMNS_PER_CHUNK // (group * og * taps * run)))
    xg = np.zeros((group, cg, chunk) + canvas, dtype=x.dtype)
    for start in range(0, n, chunk):
        # 1. The images on (group, Cg, chunk, *canvas), in the low corner (the rest stays
        #    zero); one product per group spreads them over the kernel.
        count = min(chunk, n - start)
        part = xg[:, :, :count]
        part[corner] = moved[:, :, start : start + count]
        cols = np.matmul(wg, part.reshape(group, cg, -1)).reshape(group, og, taps, count, run)

        # 2. col2im: one contiguous slice-add per kernel offset.
        target = buf[:, :, start : start + count]
        for t, shift in enumerate(shifts):
            target[..., shift : shift + run] += cols[:, :, t]
    return buf[..., :plane].reshape((group, og, n) + tuple(extent))
