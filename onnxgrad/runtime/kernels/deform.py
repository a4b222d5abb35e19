"""Deformable convolution: DeformConv, 1-D to 3-D, with groups and offset groups.

Each kernel tap of each output position reads the input at its ordinary Conv location
moved by a learned fractional offset. The kernel samples every tap of every output at
once: per corner of the cell around each sampling point (2ⁿ corners in n dimensions) one
gather, weighted by the multilinear interpolation weight, zero where the corner falls
outside the unpadded input. The samples, scaled by the optional mask, form the same
columns im2col gives an ordinary Conv, and one matrix product (batched over the groups)
with the weights gives the output.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel
from onnxgrad.runtime.kernels.conv import spatial_attrs, windows


def _check_shapes(x, w, offset, mask, kernel_shape, group: int, offset_group: int, out) -> None:
    """Raise ValueError naming the tensor whose shape does not fit the others."""
    n, c = x.shape[:2]
    m, cw = w.shape[:2]
    nsp = x.ndim - 2
    taps = math.prod(kernel_shape)
    if c != cw * group or m % group:
        raise ValueError(f"X {x.shape} and W {w.shape} do not fit group={group}")
    if c % offset_group:
        raise ValueError(f"the {c} input channels do not split into offset_group={offset_group}")
    want = (n, offset_group * taps * nsp, *out)
    if offset.shape != want:
        raise ValueError(
            f"offset has shape {offset.shape}; for X {x.shape}, kernel {list(kernel_shape)} "
            f"and offset_group={offset_group} it must be {want}"
        )
    if mask is not None and mask.shape != (n, offset_group * taps, *out):
        raise ValueError(
            f"mask has shape {mask.shape}; it must be {(n, offset_group * taps, *out)}"
        )


def sample_taps(x: np.ndarray, positions: np.ndarray, offset_group: int) -> np.ndarray:
    """Multilinear samples of `x` at fractional positions, zero outside the input.

    Args:
        x: the input, (N, C, *sizes).
        positions: per spatial axis, the coordinate of every sample of every offset group,
            (nsp, N, offset_group, S) in input pixels.
        offset_group: how many channel groups share one set of positions.

    Returns:
        The samples, (N, offset_group, C / offset_group, S), in x's dtype.
    """
    n, c = x.shape[:2]
    sizes = x.shape[2:]
    nsp = len(sizes)
    flat_x = x.reshape(n, offset_group, c // offset_group, -1)
    low = np.floor(positions)
    frac = (positions - low).astype(x.dtype)
    low = low.astype(np.int64)
    steps = [math.prod(sizes[i + 1 :]) for i in range(nsp)]

    # One gather per corner of the cell around each point; a corner outside the input
    # contributes nothing (its index is clipped to stay valid, its weight set to zero).
    out = np.zeros(flat_x.shape[:3] + positions.shape[3:], dtype=x.dtype)
    for corner in itertools.product((0, 1), repeat=nsp):
        weight = np.ones(positions.shape[1:], dtype=x.dtype)
        index = np.zeros(positions.shape[1:], dtype=np.int64)
        for axis, bit in enumerate(corner):
            at = low[axis] + bit
            inside = (at >= 0) & (at < sizes[axis])
            weight *= np.where(inside, frac[axis] if bit else 1 - frac[axis], 0)
            index += np.clip(at, 0, sizes[axis] - 1) * steps[axis]
        picked = np.take_along_axis(flat_x, index[:, :, None, :], axis=3)
        out += picked * weight[:, :, None, :]
    return out


@kernel("DeformConv")
def deform_conv(node: KernelNode):
    """Y[m, o] = Σ_c Σ_k W[m, c, k] · mask[k, o] · X[c, o·s − pad + k·d + offset[k, o]]
    + B[m].

    X is read between pixels by multilinear interpolation, and as zero outside the
    unpadded input.
    """
    group = int(node.attrs.get("group", 1))
    offset_group = int(node.attrs.get("offset_group", 1))
    kernel_attr = node.attrs.get("kernel_shape")

    def run(x, w, offset, b=None, mask=None):
        # 1. Geometry: the output positions are those of an ordinary Conv.
        if x.ndim < 3:
            raise ValueError(f"X must be (N, C, D1, ...), got shape {x.shape}")
        nsp = x.ndim - 2
        kernel_shape = tuple(w.shape[2:])
        if kernel_attr is not None and tuple(kernel_attr) != kernel_shape:
            raise ValueError(f"kernel_shape {list(kernel_attr)} does not match W {w.shape}")
        strides, dilations, pads = spatial_attrs(node, nsp)
        win = windows(x.shape[2:], kernel_shape, strides, dilations, pads)
        _check_shapes(x, w, offset, mask, kernel_shape, group, offset_group, win.out)
        n, c = x.shape[:2]
        m = w.shape[0]
        taps, size = math.prod(kernel_shape), math.prod(win.out)

        # 2. Sampling positions, (nsp, N, offset_group, taps·out): the top-left corner of
        #    each window, plus the tap's place in the dilated kernel, plus its offset.
        tap_at = np.indices(kernel_shape).reshape(nsp, taps, 1)
        out_at = np.indices(win.out).reshape(nsp, 1, size)
        start = np.array(win.begin).reshape(nsp, 1, 1)
        base = (
            tap_at * np.array(dilations).reshape(nsp, 1, 1)
            + out_at * np.array(strides).reshape(nsp, 1, 1)
            - start
        )
        moved = offset.reshape(n, offset_group, taps, nsp, size).transpose(3, 0, 1, 2, 4)
        positions = (base[:, None, None] + moved.astype(np.float64)).reshape(
            nsp, n, offset_group, taps * size
        )

        # 3. The columns: (N, offset_group, C/offset_group, taps·out) samples, scaled by
        #    the mask of their offset group.
        cols = sample_taps(x, positions, offset_group)
        if mask is not None:
            cols *= mask.reshape(n, offset_group, 1, taps * size).astype(x.dtype, copy=False)

        # 4. One product per group: (M/g, Cg·taps) @ (Cg·taps, out), batched over images.
        cols = cols.reshape(n, group, (c // group) * taps, size)
        y = np.matmul(w.reshape(group, m // group, -1), cols).reshape((n, m) + win.out)
        if b is not None:
            y += b.reshape((m,) + (1,) * nsp)
        return (y,)

    return run
