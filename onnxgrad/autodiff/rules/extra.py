"""Derivative rules for the less common ops: Det, Compress, ReverseSequence, CenterCropPad,
CumProd, Swish, SwiGLU, MaxUnpool, AffineGrid, and the explicit "no gradient" states of the
ops that carry none.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxgrad.autodiff.rules import non_differentiable, rule
from onnxgrad.errors import GradientError, UnsupportedOpError


def _trailing_axes(axis: int, rank: int) -> list[int]:
    """The axes to unsqueeze so that a vector along `axis` broadcasts against rank `rank`."""
    return list(range(1, rank - axis))


@rule("Det")
def det(b, node, dys):
    """y = det(A)  →  dA = dy · cof(A),  cof(A)ᵢⱼ = (−1)ⁱ⁺ʲ det(A without row i, column j)

    The cofactor matrix equals det(A) · A⁻ᵀ where A is invertible and stays exact where it
    is not; it is built from the (n−1)×(n−1) minors with Gather and Det, since ai.onnx has
    no matrix inverse.
    """
    a = node.input[0]
    dy = dys[0]
    shape = b.shape(a)
    if shape is None or not isinstance(shape[-1], int):
        raise GradientError(
            f"Det node '{node.name}': the gradient needs the matrix size (the last dimension "
            f"of '{a}') statically known; give the model static matrix dimensions"
        )
    rank, n = len(shape), shape[-1]
    dy_mat = b.unsqueeze(dy, [rank - 2, rank - 1])
    if n == 1:
        return [dy_mat]
    keep = np.array([[k for k in range(n) if k != i] for i in range(n)], dtype=np.int64)
    rows = b.Gather(a, b.ints(keep.tolist()), axis=rank - 2)  # (…, i, r, n)
    minors = b.Gather(rows, b.ints(keep.tolist()), axis=rank)  # (…, i, r, j, c)
    lead = list(range(rank - 2))
    minors = b.Transpose(minors, perm=lead + [rank - 2, rank, rank - 1, rank + 1])
    signs = np.array([[(-1.0) ** (i + j) for j in range(n)] for i in range(n)])
    cofactors = b.Mul(b.Det(minors), b.const(signs, like=a))
    return [b.Mul(dy_mat, cofactors)]


@rule("Compress")
def compress(b, node, dys):
    """y = x[condition] along axis (x flattened when no axis)  →  dx = dy put back at the
    kept positions, 0 elsewhere; condition gets none

    The position p of x along the axis is kept when condition[p]; it is then entry
    cumsum(condition)[p] − 1 of y, so dx = where(kept, gather(dy, that entry), 0).
    """
    x, condition = node.input
    dy = dys[0]
    axis = node.attrs.get("axis")
    flat = axis is None
    source = b.Reshape(x, b.ints([-1])) if flat else x
    rank = 1 if flat else b.rank(x)
    if rank is None:
        raise GradientError(
            f"Compress node '{node.name}': the gradient needs the rank of '{x}'; run shape "
            "inference on the model or declare the input's shape"
        )
    axis = 0 if flat else axis % rank
    length = b.Reshape(b.Gather(b.Shape(source), b.ints(axis)), b.ints([1]))
    kept = b.Cast(condition, to=TensorProto.INT64)
    # condition may be shorter than the axis: the positions past its end are dropped.
    missing = b.Sub(length, b.Shape(kept))
    kept = b.Pad(kept, b.Concat(b.ints([0]), missing, axis=0))
    slot = b.Max(b.Sub(b.CumSum(kept, b.ints(0)), b.ints(1)), b.ints(0))
    picked = b.Gather(dy, slot, axis=axis)
    mask = b.Cast(kept, to=b.dtype(dy))
    if rank - axis - 1:
        mask = b.unsqueeze(mask, _trailing_axes(axis, rank))
    # TODO: a condition with no true entry leaves dy empty and Gather fails on it.
    dx = b.Mul(picked, mask)
    if flat:
        dx = b.Reshape(dx, b.Shape(x))
    return [dx, None]


@rule("ReverseSequence")
def reverse_sequence(b, node, dys):
    """y = x with the first lens[b] steps of each batch entry reversed  →
    dx = the same reversal of dy (a permutation that is its own inverse); lens gets none
    """
    attrs = {k: node.attrs[k] for k in ("batch_axis", "time_axis") if k in node.attrs}
    return [b.ReverseSequence(dys[0], node.input[1], **attrs), None]


@rule("CenterCropPad")
def center_crop_pad(b, node, dys):
    """y = center_crop_pad(x, shape, axes)  →  dx = center_crop_pad(dy, shape(x)[axes], axes)

    Cropping and zero padding are each other's adjoints with the same offset,
    ⌊(larger − smaller) / 2⌋, so the backward is the op again, back to x's shape.
    """
    x = node.input[0]
    axes = node.attrs.get("axes")
    target = b.Shape(x)
    if axes is not None:
        target = b.Gather(target, b.ints(list(axes)))
        return [b.CenterCropPad(dys[0], target, axes=list(axes)), None]
    return [b.CenterCropPad(dys[0], target), None]


@rule("CumProd")
def cum_prod(b, node, dys):
    """y = cumprod(x, axis)  →  dx = cumsum(dy · y, axis, in the opposite direction) / x

    yⱼ contains xᵢ as a factor exactly when cumsum would add xᵢ into yⱼ, so
    dxᵢ = Σⱼ dyⱼ · yⱼ / xᵢ over those j; exclusive stays exclusive. The division makes the
    gradient inf or NaN where x = 0 (TODO: a zero-safe form needs products that skip one
    factor, which ai.onnx has no op for).
    """
    x, axis = node.input
    dy, y = dys[0], node.output[0]
    reverse = 0 if node.attrs.get("reverse", 0) else 1
    exclusive = node.attrs.get("exclusive", 0)
    carried = b.CumSum(b.Mul(dy, y), axis, reverse=reverse, exclusive=exclusive)
    return [b.Div(carried, x), None]


def _swish_slope(b, x: str, alpha: float) -> str:
    """d/dx of x · σ(αx) = s + αx · s · (1 − s),  s = σ(αx)."""
    ax = x if alpha == 1.0 else b.Mul(x, b.const(alpha, like=x))
    s = b.Sigmoid(ax)
    one = b.const(1.0, like=x)
    return b.Add(s, b.Mul(b.Mul(ax, s), b.Sub(one, s)))


@rule("Swish")
def swish(b, node, dys):
    """y = x · σ(αx)  →  dx = dy · (s + αx · s · (1 − s)),  s = σ(αx)"""
    alpha = float(node.attrs.get("alpha", 1.0))
    return [b.Mul(dys[0], _swish_slope(b, node.input[0], alpha))]


@rule("SwiGLU")
def swiglu(b, node, dys):
    """y = A · σ(αA) · B  →  dA = dy · B · (s + αA · s · (1 − s)),  dB = dy · A · σ(αA)"""
    a, v = node.input
    dy = dys[0]
    alpha = float(node.attrs.get("alpha", 1.0))
    da = db = None
    if node.needs_grad(0):
        da = b.Mul(b.Mul(dy, v), _swish_slope(b, a, alpha))
    if node.needs_grad(1):
        ax = a if alpha == 1.0 else b.Mul(a, b.const(alpha, like=a))
        db = b.Mul(dy, b.Mul(a, b.Sigmoid(ax)))
    return [da, db]


# Outputs that carry no gradient. Each group says why.
non_differentiable(
    # No inputs, or outputs that depend on the inputs' shape and type only.
    "Constant",
    "EyeLike",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "SequenceEmpty",
    "HannWindow",
    "HammingWindow",
    "BlackmanWindow",
    "MelWeightMatrix",
    # Samplers with discrete results: the draw does not move smoothly with its probabilities.
    "Bernoulli",
    "Multinomial",
    # Integer, boolean or string results.
    "NonMaxSuppression",
    "OptionalHasElement",
    "SequenceLength",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    # DynamicQuantizeLinear's y_scale is a float of x's range, but its derivative is zero
    # except at the min/max elements; the op marks the quantization boundary of a graph.
    "DynamicQuantizeLinear",
    "BitCast",
    "ImageDecoder",
    "TfIdfVectorizer",
    "RegexFullMatch",
    "StringConcat",
    "StringNormalizer",
    "StringSplit",
)


@rule("MaxUnpool")
def max_unpool(b, node, dys):
    """Y = zeros; Y.flat[I] = X  →  dX = dY.flat[I]; I and output_shape get none

    I holds flat positions in the default output, (L − 1)·s + k − pads per spatial axis; a
    larger output_shape only adds zeros at the end of each axis, so dY is first cut back to
    the default shape. Where I repeats a position, the forward keeps one of the writes;
    every X entry that wrote there gets that position's dy (TODO: the kept write alone, if
    it matters).
    """
    dy = dys[0]
    x, indices = node.input[0], node.input[1]
    if len(node.input) > 2 and node.input[2]:
        kernel = [int(k) for k in node.attrs["kernel_shape"]]
        nsp = len(kernel)
        strides = [int(s) for s in node.attrs.get("strides") or [1] * nsp]
        pads = [int(p) for p in node.attrs.get("pads") or [0] * (2 * nsp)]
        extra = [k - pads[i] - pads[i + nsp] for i, k in enumerate(kernel)]
        default = b.Add(
            b.Mul(b.Sub(b.Shape(x), b.ints([1])), b.ints([1, 1, *strides])),
            b.ints([1, 1, *extra]),
        )
        dy = b.Slice(dy, b.ints([0] * (nsp + 2)), default)
    flat = b.Reshape(dy, b.ints([-1]))
    return [b.Gather(flat, indices, axis=0), None, None][: len(node.input)]


@rule("AffineGrid")
def affine_grid(b, node, dys):
    """grid[n, p] = θₙ · [base(p); 1]  →  dθₙ = Σₚ dgrid[n, p] ⊗ [base(p); 1]; size gets none

    The base coordinates are the op itself applied to the identity matrix, so both
    align_corners settings and 2-D or 3-D grids follow without restating the formula.
    """
    theta, size = node.input
    dims = (b.shape(theta) or [None, None, None])[1]
    if not isinstance(dims, int):
        raise GradientError(
            f"AffineGrid node '{node.name}': the gradient needs the spatial rank (dimension 1 "
            f"of '{theta}') statically known"
        )
    eye = np.eye(dims, dims + 1)[None]
    one_batch = b.Concat(b.ints([1]), b.Slice(size, b.ints([1]), b.ints([dims + 2])), axis=0)
    base = b.AffineGrid(b.const(eye, like=theta), one_batch, **_align(node))
    base = b.Reshape(base, b.ints([-1, dims]))
    ones = b.ConstantOfShape(
        b.Concat(b.Slice(b.Shape(base), b.ints([0]), b.ints([1])), b.ints([1]), axis=0),
        value=numpy_helper.from_array(np.ones(1, helper.tensor_dtype_to_np_dtype(b.dtype(theta)))),
    )
    homogeneous = b.Concat(base, ones, axis=1)  # (P, dims + 1)
    batch = b.Slice(b.Shape(theta), b.ints([0]), b.ints([1]))
    dgrid = b.Reshape(dys[0], b.Concat(batch, b.ints([-1, dims]), axis=0))  # (N, P, dims)
    return [b.MatMul(b.Transpose(dgrid, perm=[0, 2, 1]), homogeneous), None]


def _align(node) -> dict:
    return {"align_corners": node.attrs["align_corners"]} if "align_corners" in node.attrs else {}


@rule("TensorScatter")
def tensor_scatter(b, node, dys):
    """present = past with update written at positions wᵦ + s along axis  →
    d past = dy with the written positions zeroed, d update = dy read back at those positions;
    write_indices gets none

    Both halves reuse the op: d past is TensorScatter(dy, zeros like update); d update is a
    GatherElements of dy at the index tensor wᵦ + s (mod the axis length when circular).
    """
    past, update = node.input[:2]
    indices = node.input[2] if len(node.input) > 2 and node.input[2] else None
    dy = dys[0]
    rank = b.rank(past)
    if rank is None:
        raise GradientError(
            f"TensorScatter node '{node.name}': the gradient needs the rank of '{past}'"
        )
    axis = node.attrs.get("axis", -2) % rank
    attrs = {k: node.attrs[k] for k in ("axis", "mode") if k in node.attrs}
    dpast = dupdate = None
    if node.needs_grad(0):
        rest = [indices] if indices else []
        dpast = b.op("TensorScatter", dy, b.zeros_like(update), *rest, **attrs)
    if node.needs_grad(1):
        length = b.Gather(b.Shape(update), b.ints(axis))
        steps = b.Range(b.ints(0), length, b.ints(1))  # s = 0 … sequence_length − 1
        steps = _along(b, steps, axis, rank)
        where = steps
        if indices is not None:
            start = b.unsqueeze(indices, list(range(1, rank)))
            where = b.Add(steps, start)
        if node.attrs.get("mode", "linear") == "circular":
            where = b.Mod(where, b.Gather(b.Shape(past), b.ints(axis)))
        where = b.Expand(where, b.Shape(update))
        dupdate = b.GatherElements(dy, where, axis=axis)
    return [dpast, dupdate, None][: len(node.input)]


def _along(b, vector: str, axis: int, rank: int) -> str:
    """A vector reshaped to lie along `axis` of a rank-`rank` tensor: (1, …, n, …, 1)."""
    shape = [1] * rank
    shape[axis] = -1
    return b.Reshape(vector, b.ints(shape))


@rule("Unique")
def unique(b, node, dys):
    """Y = the distinct values (or slices) of X  →  dX[i] = dY[inverse[i]] / counts[inverse[i]]

    For X without repeats each Y entry has one source and this is the exact derivative.
    Repeated values are a kink (moving one copy splits them into two outputs); there dY is
    shared evenly among the copies, as Max shares among ties. Only Y carries a gradient.
    """
    x = node.input[0]
    dy = dys[0]
    axis = node.attrs.get("axis")
    outs = list(node.output) + [""] * 4
    if not (outs[2] and outs[3]):
        attrs = {k: node.attrs[k] for k in ("axis", "sorted") if k in node.attrs}
        _, _, inverse, counts = b.op("Unique", x, outputs=4, **attrs)
    else:
        inverse, counts = outs[2], outs[3]
    share = b.Cast(b.Gather(counts, inverse), to=b.dtype(dy))
    if axis is None:
        dx = b.Div(b.Gather(dy, inverse, axis=0), share)
        return [b.Reshape(dx, b.Shape(x))]
    rank = b.rank(x)
    if rank is None:
        raise GradientError(f"Unique node '{node.name}': the gradient needs the rank of '{x}'")
    axis %= rank
    if rank - axis > 1:
        share = b.unsqueeze(share, list(range(1, rank - axis)))
    return [b.Div(b.Gather(dy, inverse, axis=axis), share)]


@rule("Col2Im")
def col2im(b, node, dys):
    """Y = col2im(X) (blocks summed back into an image)  →  dX = im2col(dY); image_shape and
    block_shape get none

    im2col is a grouped Conv with one-hot kernels: output channel c·K + k of channel group c
    picks block offset k, with the node's strides, pads and dilations.
    """
    x, _, block_shape = node.input
    block = b.constant_value(block_shape)
    shape = b.shape(x)
    if block is None or shape is None or not isinstance(shape[1], int):
        raise GradientError(
            f"Col2Im node '{node.name}': the gradient needs block_shape constant and the "
            f"channel dimension of '{x}' static"
        )
    block = [int(v) for v in np.asarray(block).reshape(-1)]
    k = int(np.prod(block))
    channels = shape[1] // k
    picks = np.eye(k).reshape(k, 1, *block)
    weight = b.const(np.tile(picks, (channels,) + (1,) * (len(block) + 1)), like=x)
    conv_attrs = {
        key: list(node.attrs[key]) for key in ("strides", "pads", "dilations") if key in node.attrs
    }
    cols = b.Conv(dys[0], weight, group=channels, **conv_attrs)  # (N, C·K, *counts)
    return [b.Reshape(cols, b.Shape(x)), None, None]


@rule("DFT")
def dft(b, node, dys):
    """Y = F x (forward) or Y = F̄ x / L (inverse), F the L-point DFT matrix, x zero-padded or
    cut to L  →  dx = F̄ dY = L · IDFT(dY) (forward), dx = F dY / L (inverse), then cut or
    padded back to x's length, real part only for a real x; dft_length and axis get none

    As a map of real and imaginary parts, the adjoint of a complex matrix is its conjugate
    transpose, and F is symmetric. A one-sided output is the full one cut to L//2 + 1 bins,
    whose adjoint pads dY with zero bins back to L.
    """
    x = node.input[0]
    length_in = node.input[1] if len(node.input) > 1 and node.input[1] else None
    rank = b.rank(x)
    if rank is None:
        raise GradientError(f"DFT node '{node.name}': the gradient needs the rank of '{x}'")
    if node.opset >= 20:
        axis_in = node.input[2] if len(node.input) > 2 and node.input[2] else None
        value = -2 if axis_in is None else b.constant_value(axis_in)
        if value is None:
            raise GradientError(
                f"DFT node '{node.name}': the gradient needs the axis input to be a constant"
            )
        axis = int(np.asarray(value).reshape(-1)[0]) % rank
    else:
        axis = node.attrs.get("axis", 1) % rank
    inverse = bool(node.attrs.get("inverse", 0))
    onesided = bool(node.attrs.get("onesided", 0))
    dy = dys[0]
    n = b.Slice(b.Shape(x), b.ints([axis]), b.ints([axis + 1]))
    length = (
        n if length_in is None else b.Reshape(b.Cast(length_in, to=TensorProto.INT64), b.ints([1]))
    )

    def pad_to(t: str, size: str) -> str:
        """t padded with zeros (or cut) along the axis to `size` entries."""
        t = b.Slice(t, b.ints([0]), size, b.ints([axis]))
        have = b.Slice(b.Shape(t), b.ints([axis]), b.ints([axis + 1]))
        extra = b.Max(b.Sub(size, have), b.ints([0]))
        zeros_before = b.ints([0] * (rank + axis))
        zeros_after = b.ints([0] * (rank - axis - 1))
        return b.Pad(t, b.Concat(zeros_before, extra, zeros_after, axis=0))

    if onesided:
        dy = pad_to(dy, length)  # the dropped bins get zero gradient
    size = b.Cast(length, to=b.dtype(dy))
    if node.opset >= 20:
        args = [None, b.ints(axis)]
    else:
        args = []
    axis_attr = {} if node.opset >= 20 else {"axis": axis}
    if inverse:
        dx = b.Div(b.op("DFT", dy, *args, inverse=0, **axis_attr), size)
    else:
        dx = b.Mul(b.op("DFT", dy, *args, inverse=1, **axis_attr), size)
    if length_in is not None:
        dx = pad_to(dx, n)
    shape = b.shape(x)
    if shape is not None and shape[-1] == 1:  # a real x: the real part
        dx = b.Slice(dx, b.ints([0]), b.ints([1]), b.ints([rank - 1]))
    return [dx] + [None] * (len(node.input) - 1)


@rule("MaxRoiPool")
def max_roi_pool(b, node, dys):
    """Y[r, c, o] = max over bin o of roi r of X[batch(r), c]  →  dX[batch(r), c, p] +=
    dY[r, c, o] · [p in bin o, X[batch(r), c, p] = Y[r, c, o]] / (number of such p); rois
    get none

    The bins come from the op itself: MaxRoiPool of an identity image (one channel per
    input position p) is 1 exactly where p lies in bin o. Ties in a bin share dy evenly, as
    Max does; an empty bin (Y = 0) passes nothing.
    """
    x, rois = node.input
    y, dy = node.output[0], dys[0]
    if node.needs_grad(1):
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail="the gradient with respect to rois is not supported",
        )
    shape = b.Shape(x)
    spatial = b.Slice(shape, b.ints([2]), b.ints([4]))
    positions = b.reduce("ReduceProd", spatial, [0], keepdims=1)
    square = b.Concat(positions, positions, axis=0)
    eye = b.EyeLike(b.ConstantOfShape(square, value=_zero_like(b, x)))
    eye = b.Reshape(eye, b.Concat(b.ints([1]), positions, spatial, axis=0))
    eye = b.Expand(
        eye, b.Concat(b.Slice(shape, b.ints([0]), b.ints([1])), b.ints([1, 1, 1]), axis=0)
    )
    attrs = {k: node.attrs[k] for k in ("pooled_shape", "spatial_scale") if k in node.attrs}
    inside = b.MaxRoiPool(eye, rois, **attrs)  # (R, P, ph, pw): 1 where p is in the bin
    inside = b.unsqueeze(b.Reshape(inside, b.ints([0, 0, -1])), [1])  # (R, 1, P, O)

    batch = b.Cast(b.Gather(rois, b.ints(0), axis=1), to=TensorProto.INT64)  # (R,)
    per_roi = b.Gather(x, batch, axis=0)  # (R, C, H, W)
    flat = b.Reshape(per_roi, b.ints([0, 0, -1, 1]))  # (R, C, P, 1)
    best = b.Reshape(y, b.ints([0, 0, 1, -1]))  # (R, C, 1, O)
    hit = b.Mul(inside, b.Cast(b.Equal(flat, best), to=b.dtype(x)))  # (R, C, P, O)
    count = b.Max(b.reduce_sum(hit, [2], keepdims=1), b.const(1.0, like=x))
    share = b.Div(b.Reshape(dy, b.ints([0, 0, 1, -1])), count)
    grads = b.reduce_sum(b.Mul(hit, share), [3], keepdims=0)  # (R, C, P)
    zeros = b.ConstantOfShape(
        b.Concat(b.Slice(shape, b.ints([0]), b.ints([2])), positions, axis=0),
        value=_zero_like(b, x),
    )
    dx = b.ScatterND(zeros, b.unsqueeze(batch, [1]), grads, reduction="add")
    return [b.Reshape(dx, shape), None]


def _zero_like(b, x: str):
    """A one-element zero tensor in x's element type (a ConstantOfShape value)."""
    return numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(b.dtype(x))))


@rule("STFT")
def stft(b, node, dys):
    """Y[b, f, k] = Σₜ w[t] · x[b, f·step + t] · e^(−2πi·kt/N)  →
    dx[b, f·step + t] += w[t] · (N · IDFT(dY[b, f]))[t], summed over overlapping frames (real
    part for a real signal); frame_step, window and frame_length get none

    Each frame is a windowed DFT, whose adjoint is the window times the conjugate DFT;
    overlapping frames add up (a ScatterElements with reduction add). A one-sided output is
    padded with zero bins back to N first. TODO: the window's gradient.
    """
    signal, step = node.input[:2]
    extra = list(node.input[2:]) + ["", ""]
    window, frame_length = extra[0] or None, extra[1] or None
    if window is not None and node.needs_grad(2):
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail="the gradient with respect to the window is not supported",
        )
    dy = dys[0]  # (B, frames, bins, 2)
    if frame_length is not None:
        n = b.Reshape(b.Cast(frame_length, to=TensorProto.INT64), b.ints([1]))
    elif window is not None:
        n = b.Slice(b.Shape(window), b.ints([0]), b.ints([1]))
    else:
        n = b.Slice(b.Shape(signal), b.ints([1]), b.ints([2]))
    if node.attrs.get("onesided", 1):
        have = b.Slice(b.Shape(dy), b.ints([2]), b.ints([3]))
        pads = b.Concat(b.ints([0, 0, 0, 0, 0, 0]), b.Sub(n, have), b.ints([0]), axis=0)
        dy = b.Pad(dy, pads)
    if b.opset >= 20:
        frames_grad = b.DFT(dy, None, b.ints(2), inverse=1)
    else:
        frames_grad = b.DFT(dy, inverse=1, axis=2)
    frames_grad = b.Mul(frames_grad, b.Cast(n, to=b.dtype(dy)))  # N · IDFT = conjugate DFT
    shape = b.shape(signal)
    if shape is not None and shape[-1] == 1:
        frames_grad = b.Slice(frames_grad, b.ints([0]), b.ints([1]), b.ints([3]))
    if window is not None:
        frames_grad = b.Mul(frames_grad, b.Reshape(window, b.ints([1, 1, -1, 1])))
    # Overlap-add: entry (f, t) of the frames lands on position f·step + t of the signal.
    count = b.Slice(b.Shape(dy), b.ints([1]), b.ints([2]))
    one = b.ints(1)
    starts = b.Mul(
        b.Range(b.ints(0), b.Squeeze(count), one),
        b.Cast(b.Reshape(step, b.ints([])), to=TensorProto.INT64),
    )
    offsets = b.Range(b.ints(0), b.Squeeze(n), one)
    where = b.Add(b.unsqueeze(starts, [1]), b.unsqueeze(offsets, [0]))  # (frames, N)
    where = b.Reshape(where, b.ints([1, -1, 1]))
    updates = b.Reshape(
        frames_grad,
        b.Concat(
            b.Slice(b.Shape(frames_grad), b.ints([0]), b.ints([1])),
            b.ints([-1]),
            b.Slice(b.Shape(frames_grad), b.ints([3]), b.ints([4])),
            axis=0,
        ),
    )
    where = b.Expand(where, b.Shape(updates))
    zeros = b.ConstantOfShape(b.Shape(signal), value=_zero_like(b, signal))
    dx = b.ScatterElements(zeros, where, updates, axis=1, reduction="add")
    return [dx] + [None] * (len(node.input) - 1)
