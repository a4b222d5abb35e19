"""Derivative rules for ops that move, copy or reshape data without changing values.

Each of these ops is linear in its data input, so each rule applies the adjoint data
movement to dy: reshape back, transpose back, split back, scatter back, sum the copies.
Shapes come from `Shape` at run time wherever they are not known statically, so symbolic
batch dimensions work.
"""

from __future__ import annotations

import numpy as np

from onnxgrad.autodiff.rules import non_differentiable, rule
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.importer import FLOAT_TYPES

# Larger than any dimension: a Slice end that means "to the end" whatever the sign of the step.
_FAR = 2**62


# Helpers shared with the index family.


def shape_of(b, x: str) -> str:
    """The shape of `x` as an int64 tensor: a constant when static, else `Shape` at run time."""
    static = b.static_shape(x)
    return b.ints(static) if static is not None else b.Shape(x)


def dims_of(b, x: str, start: int, end: int | None = None) -> str:
    """Dimensions `start:end` of `x` as a 1-D int64 tensor (constant when they are static)."""
    shape = b.shape(x)
    if shape is not None:
        part = shape[start:end]
        if all(isinstance(d, int) for d in part):
            return b.ints(list(part))
    if b.opset >= 15:
        return b.Shape(x, start=start, end=end)
    return b.Slice(b.Shape(x), b.ints([start]), b.ints([_FAR if end is None else end]))


def need_rank(b, node, x: str) -> int:
    """The rank of `x`, which the rule of `node` cannot do without."""
    rank = b.rank(x)
    if rank is None:
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail=f"the gradient needs the rank of '{x}', which shape inference did not find; "
            "give the model's inputs a shape (onnx.shape_inference) and retry",
        )
    return rank


def need_opset(b, node, since: int, what: str) -> None:
    """Refuse a rule that must emit `what`, which needs opset `since`, in an older model."""
    if b.opset < since:
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail=f"the gradient emits {what}, which needs opset >= {since} (the model has "
            f"{b.opset}); convert the model with onnx.version_converter",
        )


def flat_scatter(b, x: str, index: str, dy: str, reduction: str = "add") -> str:
    """dx of shape(x), with dx.flat[index.flat[j]] += dy.flat[j].

    reduction="add" accumulates repeated indices (opset 16); "none" is for distinct ones.
    """
    zeros = b.Reshape(b.zeros_like(x), b.ints([-1]))
    flat = b.ScatterElements(
        zeros,
        b.Reshape(index, b.ints([-1])),
        b.Reshape(dy, b.ints([-1])),
        axis=0,
        reduction=None if reduction == "none" else reduction,
    )
    return b.Reshape(flat, shape_of(b, x))


def positions(b, x: str) -> str:
    """An int64 tensor shaped like `x` holding each element's flat (row-major) position."""
    count = b.Size(x)
    return b.Reshape(b.Range(b.ints(0), count, b.ints(1)), shape_of(b, x))


# Pure reshapes.


@rule("Identity")
def identity(b, node, dys):
    """y = x  →  dx = dy"""
    return [dys[0]]


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(b, node, dys):
    """y = reshape(x)  →  dx = reshape(dy, shape(x))"""
    x = node.input[0]
    return [b.Reshape(dys[0], shape_of(b, x))]


@rule("Transpose")
def transpose(b, node, dys):
    """y = transpose(x, perm)  →  dx = transpose(dy, perm⁻¹)"""
    perm = node.attrs.get("perm")
    if perm is None:  # the reversal is its own inverse
        return [b.Transpose(dys[0])]
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return [b.Transpose(dys[0], perm=inverse)]


@rule("Cast")
def cast(b, node, dys):
    """y = cast(x, T)  →  dx = cast(dy, type(x)); none for integer or boolean x

    Rounding to a narrower float type is taken as the identity: its true derivative is 0
    almost everywhere, which would stop all training behind a float16 cast.
    """
    x = node.input[0]
    if b.dtype(x) not in FLOAT_TYPES:
        return [None]
    return [b.Cast(dys[0], to=b.dtype(x))]


@rule("Expand", broadcast=True)
def expand(b, node, dys):
    """y = expand(x, shape)  →  dx = sum_to(dy, shape(x)) (the builder reduces)"""
    return [dys[0], None]


# Joining and splitting.


@rule("Concat")
def concat(b, node, dys):
    """y = concat(x₁ … xₙ, axis)  →  dxᵢ = dy[…, offsetᵢ : offsetᵢ + sizeᵢ, …]"""
    dy = dys[0]
    xs = node.input
    if len(xs) == 1:
        return [dy]
    axis = node.attrs["axis"]
    sizes = []
    for x in xs:
        shape = b.shape(x)
        known = shape is not None and -len(shape) <= axis < len(shape)
        sizes.append(shape[axis] if known else None)
    if all(isinstance(s, int) for s in sizes):
        parts = b.split(dy, sizes, axis)
    else:
        need_opset(b, node, 13, "Split with runtime sizes")
        runtime = [b.Gather(b.Shape(x), b.ints([axis])) for x in xs]
        parts = b.op("Split", dy, b.Concat(*runtime, axis=0), outputs=len(xs), axis=axis)
    return [p if node.needs_grad(i) else None for i, p in enumerate(parts)]


@rule("Split")
def split(b, node, dys):
    """y₁ … yₙ = split(x, axis)  →  dx = concat(dy₁ … dyₙ, axis), zeros for unused yᵢ"""
    parts = [dy if dy is not None else b.zeros_like(y) for dy, y in zip(dys, node.output)]
    dx = parts[0] if len(parts) == 1 else b.Concat(*parts, axis=node.attrs.get("axis", 0))
    return [dx] + [None] * (len(node.input) - 1)


# Slicing and padding.


def _static_ints(b, node, index: int, attr: str) -> list[int] | None:
    """Input `index` (or, before opset 10, attribute `attr`) as constant ints, else None."""
    if node.opset < 10:
        value = node.attrs.get(attr)
        return None if value is None else [int(v) for v in value]
    name = node.input[index] if index < len(node.input) else ""
    if not name:
        return None
    value = b.constant_value(name)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _slice_static(b, node, dy: str, shape: list[int]) -> str | None:
    """dx for a Slice whose shape and parameters are constant and whose steps are ±1: Pad."""
    starts = _static_ints(b, node, 1, "starts")
    ends = _static_ints(b, node, 2, "ends")
    if starts is None or ends is None:
        return None
    axes = _static_ints(b, node, 3, "axes")
    axes = list(range(len(starts))) if axes is None else [a % len(shape) for a in axes]
    has_steps = node.opset >= 10 and len(node.input) > 4 and node.input[4]
    steps = _static_ints(b, node, 4, "steps") if has_steps else [1] * len(starts)
    if steps is None or any(abs(k) != 1 for k in steps):
        return None
    before, after, flipped = [0] * len(shape), [0] * len(shape), []
    for a, s, e, k in zip(axes, starts, ends, steps):
        picked = range(*slice(s, e, k).indices(shape[a]))
        if not picked:
            return None  # nothing selected: leave it to the general scatter
        lo, hi = min(picked), max(picked) + 1
        before[a], after[a] = lo, shape[a] - hi
        if k < 0:
            flipped.append(a)
    if flipped:  # a negative step reversed these axes: reverse dy back
        n = len(flipped)
        dy = b.Slice(dy, b.ints([-1] * n), b.ints([-_FAR] * n), b.ints(flipped), b.ints([-1] * n))
    if not any(before) and not any(after):
        return dy
    return b.Pad(dy, b.ints(before + after))


@rule("Slice")
def slice_(b, node, dys):
    """y = x[starts:ends:steps]  →  dx = zeros(shape(x)) with dx[starts:ends:steps] = dy

    Constant slices with unit steps give one Pad (and a reversal for step −1); any other
    slice scatters dy to the flat positions of the selected elements.
    """
    x = node.input[0]
    dy = dys[0]
    static = b.static_shape(x)
    dx = _slice_static(b, node, dy, static) if static is not None else None
    if dx is None:
        need_opset(b, node, 11, "Range and ScatterElements")
        picked = b.Slice(positions(b, x), *node.input[1:])
        # A slice selects each position at most once: a plain scatter places dy.
        dx = flat_scatter(b, x, picked, dy, reduction="none")
    return [dx] + [None] * (len(node.input) - 1)


@rule("Pad")
def pad(b, node, dys):
    """y = pad(x, pads, mode)  →  dx[i] = Σ dy[j] over the j that copy x[i]

    constant: dx = pad(dy, −pads) (a crop; negative pads become zero padding), and
    d value = Σ dy − Σ dx. reflect, edge, wrap: each output position is a copy of one
    input position; the rule pads a tensor of positions in the same way and scatter-adds
    dy to where each copy came from. Before opset 11, pads is an attribute: the constant
    crop is then one Slice (and a Pad of the negative pads' zeros), written as that opset
    writes them.
    """
    if b.opset < 11 and node.attrs.get("mode", "constant") == "constant":
        return [_unpad_attribute(b, node, dys[0])]
    need_opset(b, node, 11, "Pad with pads as an input")
    x, pads = node.input[:2]
    dy = dys[0]
    mode = node.attrs.get("mode", "constant")
    # The axes input (opset 18), after an absent constant_value; nothing when there is none.
    axes = [None, node.input[3]] if len(node.input) > 3 and node.input[3] else []
    if mode == "constant":
        dx = b.Pad(dy, b.Neg(pads), *axes)
        dvalue = None
        if node.needs_grad(2):
            total = b.Sub(b.reduce_sum(dy, None, keepdims=0), b.reduce_sum(dx, None, keepdims=0))
            dvalue = b.Reshape(total, b.Shape(node.input[2]))
        return [dx, None, dvalue, None][: len(node.input)]
    need_opset(b, node, 16, "ScatterElements with reduction='add'")
    source = b.Pad(positions(b, x), pads, *axes, mode=mode)
    return [flat_scatter(b, x, source, dy)] + [None] * (len(node.input) - 1)


def _unpad_attribute(b, node, dy: str) -> str:
    """dx for a constant Pad of opset 2 to 10, whose pads (begins, then ends) are an attribute.

    That Pad takes negative pads (they remove entries): padding dy by the negated pads
    crops what the forward added and gives the entries it removed a zero gradient.
    """
    pads = [int(v) for v in node.attrs.get("pads", node.attrs.get("paddings", []))]
    return b.Pad(dy, pads=[-v for v in pads])


@rule("Tile")
def tile(b, node, dys):
    """y = tile(x, r)  →  dx = Σ over the r₀ · r₁ · … copies of dy's blocks

    dy is viewed as (r₀, d₀, r₁, d₁, …) and summed over the r axes.
    """
    x, repeats = node.input
    rank = need_rank(b, node, x)
    reps = b.constant_value(repeats)
    static = b.static_shape(x)
    if reps is not None and static is not None:
        pairs = b.ints([v for r, d in zip(reps.reshape(-1), static) for v in (int(r), d)])
    else:
        column = b.ints([-1, 1])
        both = b.Concat(b.Reshape(repeats, column), b.Reshape(shape_of(b, x), column), axis=1)
        pairs = b.Reshape(both, b.ints([-1]))
    blocks = b.Reshape(dys[0], pairs)
    return [b.reduce_sum(blocks, list(range(0, 2 * rank, 2)), keepdims=0), None]


# Moving blocks between depth and space.


@rule("DepthToSpace")
def depth_to_space(b, node, dys):
    """y = depth_to_space(x, s, mode)  →  dx = space_to_depth(dy, s) (DCR), or its CRD twin"""
    dy = dys[0]
    size = node.attrs["blocksize"]
    if node.attrs.get("mode", "DCR") == "DCR":
        return [b.SpaceToDepth(dy, blocksize=size)]

    # CRD: y = reshape(transpose(reshape(x, (n, c', s, s, h, w)), (0, 1, 4, 2, 5, 3))).
    x = node.input[0]
    split = b.Concat(
        dims_of(b, node.output[0], 0, 2),
        dims_of(b, x, 2, 3),
        b.ints([size]),
        dims_of(b, x, 3, 4),
        b.ints([size]),
        axis=0,
    )
    blocks = b.Transpose(b.Reshape(dy, split), perm=[0, 1, 3, 5, 2, 4])
    return [b.Reshape(blocks, shape_of(b, x))]


@rule("SpaceToDepth")
def space_to_depth(b, node, dys):
    """y = space_to_depth(x, s)  →  dx = depth_to_space(dy, s, DCR)"""
    return [b.DepthToSpace(dys[0], blocksize=node.attrs["blocksize"], mode="DCR")]


non_differentiable("Shape", "Size", "ConstantOfShape", "NonZero")
