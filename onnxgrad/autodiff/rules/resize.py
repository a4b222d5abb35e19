"""Derivative rules for Resize, Upsample and GridSample.

Every Resize mode is linear in X and separable: along each axis k the output is
Aₖ · x (contracted over that axis), with Aₖ an (output length × input length) matrix of
interpolation weights that depends only on the shapes, the scales or sizes, the roi and the
attributes. So dX = dY contracted with each Aₖᵀ in turn.

The rule does not rebuild the weights formula by formula: it asks the op itself. Resizing
the n×n identity matrix along its first axis only, with the node's attributes and that
axis's scale (or size) and roi, gives exactly Aₖ. This covers nearest, linear and cubic,
every coordinate transformation mode, exclude_outside and antialias, at run time, so
symbolic shapes work too. tf_crop_and_resize writes extrapolation_value outside the roi: a
constant, whose rows of Aₖ the identity resize (with extrapolation 0) leaves at zero.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxgrad.autodiff.rules import rule
from onnxgrad.errors import GradientError, UnsupportedOpError


def _contract(b, dy: str, a: str, axis: int, rank: int) -> str:
    """dx[…, j, …] = Σᵢ A[i, j] · dy[…, i, …] along `axis`."""
    if axis == rank - 1:
        return b.MatMul(dy, a)
    perm = [k for k in range(rank) if k != axis] + [axis]
    back = list(range(axis)) + [rank - 1] + list(range(axis, rank - 1))
    return b.Transpose(b.MatMul(b.Transpose(dy, perm=perm), a), perm=back)


def _identity(b, x: str, axis: int) -> tuple[str, str]:
    """The n×n identity in x's element type, n = x's length along `axis`, and n as [n]."""
    n = b.Gather(b.Shape(x), b.ints([axis]))
    zeros = b.ConstantOfShape(b.Concat(n, n, axis=0), value=_zero_tensor(b.dtype(x)))
    return b.EyeLike(zeros), n


def _zero_tensor(dtype: int):
    return numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(dtype)))


def _constant(b, name: str | None) -> np.ndarray | None:
    return None if not name else b.constant_value(name)


@rule("Resize")
def resize(b, node, dys):
    """Y = X ×₁ A₁ ⋯ ×ᵣ Aᵣ (separable interpolation)  →  dX = dY ×₁ A₁ᵀ ⋯ ×ᵣ Aᵣᵀ;
    roi, scales and sizes get none

    Aₖ = Resize(identity(nₖ)) along one axis (see the module docstring). nearest is
    piecewise constant in the coordinates but linear in X, so the rule is exact for X in
    every mode; the coordinates themselves are not differentiated.
    """
    x = node.input[0]
    dy = dys[0]
    attrs = dict(node.attrs)
    if node.opset < 11:  # Resize-10: (X, scales)
        roi, scales, sizes = None, node.input[1], None
    else:
        padded = list(node.input) + [""] * 4
        roi, scales, sizes = padded[1] or None, padded[2] or None, padded[3] or None
    policy = attrs.pop("keep_aspect_ratio_policy", "stretch")
    if sizes is not None and policy != "stretch":
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail=f"the gradient supports keep_aspect_ratio_policy 'stretch' only, not '{policy}'",
        )
    rank = b.rank(x)
    if rank is None:
        raise GradientError(
            f"Resize node '{node.name}': the gradient needs the rank of '{x}'; run shape "
            "inference or declare the input's shape"
        )
    axes = attrs.pop("axes", None)
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    crop = attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
    attrs["extrapolation_value"] = 0.0 if crop else None
    known_scales = _constant(b, scales)
    known_sizes = _constant(b, sizes)
    shape = b.shape(x)

    dx = dy
    for p, axis in enumerate(axes):
        # An axis that is provably left alone needs no work.
        if not crop:
            if known_scales is not None and known_scales.size and known_scales[p] == 1.0:
                continue
            if (
                known_sizes is not None
                and known_sizes.size
                and shape is not None
                and shape[axis] == int(known_sizes[p])
            ):
                continue
        eye, n = _identity(b, x, axis)
        pick = b.ints([p])
        args: list[str | None]
        # Before opset 13 a node with sizes also carries an (empty) scales input.
        no_sizes = sizes is None or (known_sizes is not None and not known_sizes.size)
        if no_sizes and scales is not None:
            scale = b.Gather(scales, pick)
            if b.dtype(scales) != TensorProto.FLOAT:  # scales are float32 in every opset
                scale = b.Cast(scale, to=TensorProto.FLOAT)
            one = b.const([1.0], dtype=TensorProto.FLOAT)
            args = [None, b.Concat(scale, one, axis=0), None]
        else:
            args = [None, None, b.Concat(b.Gather(sizes, pick), n, axis=0)]
        if crop:
            half = len(axes)
            start, end = b.Gather(roi, b.ints([p])), b.Gather(roi, b.ints([half + p]))
            zero, one_r = b.const([0.0], like=roi), b.const([1.0], like=roi)
            args[0] = b.Concat(start, zero, end, one_r, axis=0)
        if node.opset < 13:  # roi and scales are required inputs before opset 13
            args = [
                a if a is not None else b.const(np.zeros(0), dtype=TensorProto.FLOAT) for a in args
            ]
        if node.opset < 11:
            weights = b.Resize(eye, args[1], **attrs)
        else:
            weights = b.op("Resize", eye, *args, **attrs)
        dx = _contract(b, dx, weights, axis, rank)
    return [dx] + [None] * (len(node.input) - 1)


@rule("Upsample")
def upsample(b, node, dys):
    """Y = X ×₁ A₁ ⋯ ×ᵣ Aᵣ (nearest or linear, asymmetric coordinates)  →
    dX = dY ×₁ A₁ᵀ ⋯ ×ᵣ Aᵣᵀ; scales gets none

    As for Resize, Aₖ is the op applied to an identity matrix along one axis.
    """
    x = node.input[0]
    rank = b.rank(x)
    if rank is None:
        raise GradientError(
            f"Upsample node '{node.name}': the gradient needs the rank of '{x}'; run shape "
            "inference or declare the input's shape"
        )
    fixed = node.attrs.get("scales")
    scales = None if fixed is not None else node.input[1]
    known = np.asarray(fixed) if fixed is not None else b.constant_value(scales)
    mode = node.attrs.get("mode", "nearest")
    dx = dys[0]
    for axis in range(rank):
        if known is not None and float(known[axis]) == 1.0:
            continue
        eye, _ = _identity(b, x, axis)
        if fixed is not None:
            weights = b.Upsample(eye, mode=mode, scales=[float(fixed[axis]), 1.0])
        else:
            scale = b.Gather(scales, b.ints([axis]))
            if b.dtype(scales) != TensorProto.FLOAT:
                scale = b.Cast(scale, to=TensorProto.FLOAT)
            pair = b.Concat(scale, b.const([1.0], dtype=TensorProto.FLOAT), axis=0)
            weights = b.op("Upsample", eye, pair, mode=mode)
        dx = _contract(b, dx, weights, axis, rank)
    return [dx] + [None] * (len(node.input) - 1)


@rule("GridSample")
def grid_sample(b, node, dys):
    """Y[n, c, o] = Σₚ W[n, p, o] · X[n, c, p]  →  dX[n, c, p] = Σₒ W[n, p, o] · dY[n, c, o];
    grid: not supported

    Y is linear in X for a fixed grid, whatever the mode (nearest, linear, cubic) and the
    padding (zeros, border, reflection). The weights W are the op applied to an identity
    image, one channel per input position: memory grows as N · (input positions) ·
    (output positions), fine for the small images of spatial transformers.
    TODO: the grid's gradient (the derivative of the weights by the coordinates).
    """
    x, grid = node.input
    if node.needs_grad(1):
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail="the gradient with respect to the grid is not supported; only X gets one",
        )
    shape = b.Shape(x)
    spatial = b.Slice(shape, b.ints([2]), b.ints([2**31 - 1]))
    positions = b.reduce("ReduceProd", spatial, [0], keepdims=1)
    square = b.Concat(positions, positions, axis=0)
    zeros = b.ConstantOfShape(square, value=_zero_tensor(b.dtype(x)))
    eye = b.Reshape(b.EyeLike(zeros), b.Concat(b.ints([1]), positions, spatial, axis=0))
    batch = b.Slice(shape, b.ints([0]), b.ints([1]))
    ones = b.ConstantOfShape(
        b.Reshape(b.Sub(b.Size(shape), b.ints(1)), b.ints([1])),
        value=numpy_helper.from_array(np.ones(1, np.int64)),
    )
    eye = b.Expand(eye, b.Concat(batch, ones, axis=0))
    keys = ("mode", "padding_mode", "align_corners")
    attrs = {k: node.attrs[k] for k in keys if k in node.attrs}
    weights = b.GridSample(eye, grid, **attrs)  # (N, P, *out)
    weights = b.Reshape(weights, b.Concat(batch, positions, b.ints([-1]), axis=0))
    lead = b.Slice(shape, b.ints([0]), b.ints([2]))
    dy = b.Reshape(dys[0], b.Concat(lead, b.ints([-1]), axis=0))
    dx = b.MatMul(dy, b.Transpose(weights, perm=[0, 2, 1]))
    return [b.Reshape(dx, shape), None]


@rule("RoiAlign")
def roi_align(b, node, dys):
    """Y[r, c, o] = Σₚ W[r, p, o] · X[batch(r), c, p] (mode avg)  →
    dX[n, c, p] = Σ_{r: batch(r) = n} Σₒ W[r, p, o] · dY[r, c, o]; rois and batch_indices
    get none

    Averaging bilinear samples is linear in X; W is the op applied to an identity image, one
    channel per input position, as for GridSample. mode "max" takes a maximum of samples and
    is not supported. TODO: gradients for the roi coordinates.
    """
    x, rois, batch_indices = node.input
    if node.attrs.get("mode", "avg") != "avg":
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail=f"the gradient supports mode 'avg' only, not '{node.attrs['mode']}'",
        )
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
    eye = b.EyeLike(b.ConstantOfShape(square, value=_zero_tensor(b.dtype(x))))
    eye = b.Reshape(eye, b.Concat(b.ints([1]), positions, spatial, axis=0))
    batch = b.Slice(shape, b.ints([0]), b.ints([1]))
    eye = b.Expand(eye, b.Concat(batch, b.ints([1, 1, 1]), axis=0))  # (N, P, H, W)
    keys = (
        "coordinate_transformation_mode",
        "output_height",
        "output_width",
        "sampling_ratio",
        "spatial_scale",
    )
    attrs = {k: node.attrs[k] for k in keys if k in node.attrs}
    weights = b.RoiAlign(eye, rois, batch_indices, **attrs)  # (R, P, h, w)
    count = b.Slice(b.Shape(weights), b.ints([0]), b.ints([1]))
    weights = b.Reshape(weights, b.Concat(count, positions, b.ints([-1]), axis=0))
    dy = b.Reshape(
        dys[0], b.Concat(b.Slice(b.Shape(dys[0]), b.ints([0]), b.ints([2])), b.ints([-1]), axis=0)
    )
    per_roi = b.MatMul(dy, b.Transpose(weights, perm=[0, 2, 1]))  # (R, C, P)
    flat = b.Concat(b.Slice(shape, b.ints([0]), b.ints([2])), positions, axis=0)
    where = b.unsqueeze(b.Cast(batch_indices, to=TensorProto.INT64), [1])
    dx = b.ScatterND(
        b.ConstantOfShape(flat, value=_zero_tensor(b.dtype(x))), where, per_roi, reduction="add"
    )
    return [b.Reshape(dx, shape), None, None]
