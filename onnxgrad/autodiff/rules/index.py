"""Derivative rules for indexing: gathers, scatters, Where, TopK, Trilu, CumSum, OneHot.

A gather's gradient scatter-adds dy back to the positions it read (repeated indices
accumulate); a scatter's gradient gathers dy at the positions it wrote.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxgrad.autodiff.rules import non_differentiable, rule
from onnxgrad.autodiff.rules.shape import dims_of, need_opset, need_rank, shape_of
from onnxgrad.errors import UnsupportedOpError

INT64 = onnx.TensorProto.INT64


def _int64(b, indices: str) -> str:
    return indices if b.dtype(indices) == INT64 else b.Cast(indices, to=INT64)


def _ones_like(b, x: str) -> str:
    one = numpy_helper.from_array(np.ones(1, helper.tensor_dtype_to_np_dtype(b.dtype(x))))
    return b.ConstantOfShape(b.Shape(x), value=one)


def _normalized(b, indices: str, dims: str) -> str:
    """Indices with negative entries counted from the end of their axis (`dims` broadcasts)."""
    indices = _int64(b, indices)
    return b.Where(b.Less(indices, b.ints(0)), b.Add(indices, dims), indices)


@rule("Where", broadcast=True)
def where(b, node, dys):
    """y = where(c, A, B)  →  dA = where(c, dy, 0), dB = where(c, 0, dy); c gets none"""
    c = node.input[0]
    dy = dys[0]
    zero = b.const(0.0, like=node.output[0])
    return [
        None,
        b.Where(c, dy, zero) if node.needs_grad(1) else None,
        b.Where(c, zero, dy) if node.needs_grad(2) else None,
    ]


# Gathers: scatter-add dy back.


@rule("Gather")
def gather(b, node, dys):
    """y = take(x, i, axis)  →  dx = zeros(shape(x)); dx[…, i[j], …] += dy[…, j, …]

    dy is viewed as (x's dims before axis, all indices, x's dims after axis) and added
    with ScatterElements(reduction="add"), so repeated indices accumulate.
    """
    need_opset(b, node, 16, "ScatterElements with reduction='add'")
    x, indices = node.input
    rank = need_rank(b, node, x)
    axis = node.attrs.get("axis", 0) % rank
    dy = dys[0]

    # 1. dy as (before, K, after); the indices as (1…, K, 1…), normalized and broadcast.
    target = b.Concat(dims_of(b, x, 0, axis), b.ints([-1]), dims_of(b, x, axis + 1), axis=0)
    rows = b.Reshape(dy, target)
    column = b.ints([1] * axis + [-1] + [1] * (rank - axis - 1))
    where = b.Reshape(_normalized(b, indices, dims_of(b, x, axis, axis + 1)), column)

    # 2. Scatter-add into zeros.
    where = b.Expand(where, b.Shape(rows))
    return [b.ScatterElements(b.zeros_like(x), where, rows, axis=axis, reduction="add"), None]


@rule("GatherElements")
def gather_elements(b, node, dys):
    """y[p] = x[p with p[axis] = i[p]]  →  dx = scatter_add(zeros(shape(x)), i, dy, axis)"""
    need_opset(b, node, 16, "ScatterElements with reduction='add'")
    x, indices = node.input
    rank = need_rank(b, node, x)
    axis = node.attrs.get("axis", 0) % rank
    where = _normalized(b, indices, dims_of(b, x, axis, axis + 1))
    dx = b.ScatterElements(b.zeros_like(x), where, dys[0], axis=axis, reduction="add")
    return [dx, None]


@rule("GatherND")
def gather_nd(b, node, dys):
    """y[p] = x[batch(p), i[p]]  →  dx = scatter_nd_add(zeros(shape(x)), i, dy)

    With batch_dims > 0, x is viewed as (B, rest) and each index tuple is prefixed with
    its batch number, so one ScatterND(reduction="add") does the whole batch.
    """
    need_opset(b, node, 16, "ScatterND with reduction='add'")
    x, indices = node.input
    dy = dys[0]
    batch = node.attrs.get("batch_dims", 0)
    index_shape = b.shape(indices)
    if not index_shape or not isinstance(index_shape[-1], int):
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail=f"the gradient needs the last dimension of the indices '{indices}', which "
            "shape inference did not find; make it static and retry",
        )
    k = index_shape[-1]
    where = _normalized(b, indices, dims_of(b, x, batch, batch + k))
    if batch == 0:
        return [b.ScatterND(b.zeros_like(x), where, dy, reduction="add"), None]

    # 1. Flatten the batch dimensions of x, the indices and dy into one, B.
    lead = b.ints([-1])
    zeros = b.Reshape(b.zeros_like(x), b.Concat(lead, dims_of(b, x, batch), axis=0))
    where = b.Reshape(where, b.Concat(lead, dims_of(b, indices, batch), axis=0))
    rows = b.Reshape(dy, b.Concat(lead, dims_of(b, node.output[0], batch), axis=0))

    # 2. Prefix each index tuple with its batch number.
    depth = len(index_shape) - batch + 1  # rank of the flattened indices
    count = b.Gather(b.Shape(where), b.ints(0))
    numbers = b.Reshape(b.Range(b.ints(0), count, b.ints(1)), b.ints([-1] + [1] * (depth - 1)))
    grid = b.Concat(dims_of(b, where, 0, depth - 1), b.ints([1]), axis=0)
    where = b.Concat(b.Expand(numbers, grid), where, axis=-1)

    # 3. Scatter-add, then restore x's shape.
    dx = b.ScatterND(zeros, where, rows, reduction="add")
    return [b.Reshape(dx, shape_of(b, x)), None]


# Scatters: gather dy back.


def _scatter(b, node, dys, gather_op: str, scatter_op: str, **attrs) -> list:
    """The rule of ScatterElements (gather_op GatherElements) and ScatterND (GatherND)."""
    data, indices, updates = node.input
    dy = dys[0]
    y = node.output[0]
    reduction = node.attrs.get("reduction", "none")

    def gather(t):
        return b.op(gather_op, t, indices, **attrs)

    def scatter(t, u, how="none"):
        return b.op(scatter_op, t, indices, u, reduction=None if how == "none" else how, **attrs)

    ddata = dupdates = None
    if reduction == "none":
        # Written positions lose data's gradient. Repeated indices are undefined in ONNX.
        if node.needs_grad(0):
            ddata = scatter(dy, b.zeros_like(updates))
        if node.needs_grad(2):
            dupdates = gather(dy)
    elif reduction == "add":
        ddata = dy
        dupdates = gather(dy) if node.needs_grad(2) else None
    elif reduction == "mul":
        # y = data · Π updates at each position: d updatesⱼ = dy · y / updatesⱼ.
        # TODO: exact only where updatesⱼ ≠ 0; a zero gives inf/NaN (a product of the
        # others would need a second scatter per update).
        if node.needs_grad(0):
            ddata = b.Mul(dy, scatter(_ones_like(b, data), updates, "mul"))
        if node.needs_grad(2):
            dupdates = b.Div(gather(b.Mul(dy, y)), updates)
    elif reduction in ("max", "min"):
        # y = max (min) of data and the updates at each position. Ties: every element equal
        # to y gets an equal share of dy (the subgradient PyTorch's scatter_reduce takes).
        data_won = b.Equal(data, y)
        update_won = b.Equal(updates, gather(y))
        wins = b.Add(
            b.Cast(data_won, to=b.dtype(y)),
            scatter(b.zeros_like(data), b.Cast(update_won, to=b.dtype(y)), "add"),
        )
        share = b.Div(dy, wins)
        zero = b.const(0.0, like=y)
        ddata = b.Where(data_won, share, zero) if node.needs_grad(0) else None
        dupdates = b.Where(update_won, gather(share), zero) if node.needs_grad(2) else None
    else:
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail=f"no gradient for reduction '{reduction}'; use none, add, mul, max or min",
        )
    return [ddata, None, dupdates]


@rule("ScatterElements", "Scatter")
def scatter_elements(b, node, dys):
    """y = data; y[p with p[axis] = i[p]] ⊕= updates[p]  →  d updates = gather_elements(dy, i)

    reduction none: d data = dy with the written positions zeroed; add: d data = dy;
    mul: d data = dy · Π updates, d updates = dy · y / updates; max, min: dy goes to the
    winners.
    """
    need_opset(b, node, 16, "ScatterElements with a reduction")
    rank = need_rank(b, node, node.input[0])
    return _scatter(
        b, node, dys, "GatherElements", "ScatterElements", axis=node.attrs.get("axis", 0) % rank
    )


@rule("ScatterND")
def scatter_nd(b, node, dys):
    """y = data; y[i[j]] ⊕= updates[j]  →  d updates = gather_nd(dy, i)

    reduction none: d data = dy with the written slices zeroed; add: d data = dy;
    mul: d data = dy · Π updates, d updates = dy · y / updates; max, min: dy goes to the
    winners.
    """
    need_opset(b, node, 16, "ScatterND with a reduction")
    return _scatter(b, node, dys, "GatherND", "ScatterND")


# Selections of elements.


@rule("TopK")
def top_k(b, node, dys):
    """values, indices = topk(x, k, axis)  →  dx = scatter(zeros(shape(x)), indices, d values)"""
    x = node.input[0]
    dvalues = dys[0]
    rank = need_rank(b, node, x)
    axis = node.attrs.get("axis", -1) % rank
    # Tied values: dy goes to the element TopK picked (the lower index), not shared.
    # The k indices along the axis are distinct: a plain scatter places each gradient.
    dx = b.ScatterElements(b.zeros_like(x), node.output[1], dvalues, axis=axis)
    return [dx] + [None] * (len(node.input) - 1)


@rule("Trilu")
def trilu(b, node, dys):
    """y = triu(x, k) (or tril)  →  dx = triu(dy, k) (or tril): the same mask"""
    k = node.input[1:2]
    return [b.Trilu(dys[0], *k, upper=node.attrs.get("upper", 1))] + [None] * len(k)


@rule("CumSum")
def cumsum(b, node, dys):
    """y = cumsum(x, axis)  →  dx = cumsum(dy, axis) in the opposite direction

    yᵢ = Σ_{j ≤ i} xⱼ (or j < i when exclusive) gives dxⱼ = Σ_{i ≥ j} dyᵢ (i > j): the
    same exclusivity, the other direction.
    """
    reverse = node.attrs.get("reverse", 0)
    exclusive = node.attrs.get("exclusive", 0)
    dx = b.CumSum(dys[0], node.input[1], exclusive=exclusive, reverse=1 - reverse)
    return [dx, None]


@rule("OneHot")
def one_hot(b, node, dys):
    """y = where(onehot(i, depth), on, off)  →  d on = Σ dy · hot, d off = Σ dy · (1 − hot)"""
    indices, depth, values = node.input
    dy = dys[0]
    hot = b.OneHot(
        indices, depth, b.const([0.0, 1.0], like=values), axis=node.attrs.get("axis", -1)
    )
    on = b.reduce_sum(b.Mul(dy, hot), None, keepdims=0)
    off = b.Sub(b.reduce_sum(dy, None, keepdims=0), on)
    one = b.ints([1])
    return [None, None, b.Concat(b.Reshape(off, one), b.Reshape(on, one), axis=0)]


non_differentiable("ArgMax", "ArgMin", "Range")
