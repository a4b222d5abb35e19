"""Derivative rules for QuantizeLinear and DequantizeLinear: the straight-through estimator.

Quantization rounds, so its true derivative is zero almost everywhere, which would stop all
training behind a QDQ pair. As in quantization-aware training, these rules use the
straight-through estimator (STE) instead: an estimate, not the true derivative.

- QuantizeLinear, y = saturate(round(x / scale) + zero_point):
  dx = dy / scale where round(x / scale) + zero_point lies in the representable range,
  0 where it is clipped. The rounding is taken as the identity.
- DequantizeLinear, y = (x − zero_point) · scale: dx = dy · scale (exact, for the integer
  x taken as a real number), d scale = Σ dy · (x − zero_point) (exact).

A QDQ pair thus passes dy through unchanged inside the range and stops it outside. The
integer tensor between the two carries a float gradient, in quantized units.
"""

from __future__ import annotations

from onnx import TensorProto

from onnxgrad.autodiff.rules import rule
from onnxgrad.errors import GradientError, UnsupportedOpError

# The representable range of each integer type QuantizeLinear can produce.
_RANGES = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT4: (-8, 7),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
for _name, _range in (("UINT2", (0, 3)), ("INT2", (-2, 1))):
    if hasattr(TensorProto, _name):
        _RANGES[getattr(TensorProto, _name)] = _range


def _spread(b, node, param: str, x: str) -> str:
    """`param` (a scale or zero point) broadcast against x: per tensor, per axis or blocked."""
    rank_p, rank_x = b.rank(param), b.rank(x)
    if rank_p is None or rank_x is None:
        raise GradientError(
            f"{node.op_type} node '{node.name}': the gradient needs the ranks of '{param}' and "
            f"'{x}'; run shape inference or declare their shapes"
        )
    if rank_p == 0 or rank_x == 0:
        return param
    axis = node.attrs.get("axis", 1) % rank_x
    block = node.attrs.get("block_size", 0)
    if not block:
        if rank_p == 1 and rank_x > 1:  # per axis: a vector along `axis`
            return b.unsqueeze(param, [k for k in range(rank_x) if k != axis])
        return param
    # Blocked: repeat each entry `block` times along the axis, then cut to x's length.
    grown = b.unsqueeze(param, [axis + 1])
    shape = b.Shape(grown)
    reps = b.Concat(
        b.Slice(shape, b.ints([0]), b.ints([axis + 1])),
        b.ints([block]),
        b.Slice(shape, b.ints([axis + 2]), b.ints([rank_x + 1])),
        axis=0,
    )
    grown = b.Expand(grown, reps)
    merged = b.Concat(
        b.Slice(b.Shape(param), b.ints([0]), b.ints([axis])),
        b.ints([-1]),
        b.Slice(b.Shape(param), b.ints([axis + 1]), b.ints([rank_x])),
        axis=0,
    )
    flat = b.Reshape(grown, merged)
    length = b.Slice(b.Shape(x), b.ints([axis]), b.ints([axis + 1]))
    return b.Slice(flat, b.ints([0]), length, b.ints([axis]))


def _to_like(b, t: str, like: str) -> str:
    return t if b.dtype(t) == b.dtype(like) else b.CastLike(t, like)


@rule("QuantizeLinear", through_integers=True)
def quantize_linear(b, node, dys):
    """y = saturate(round(x / scale) + zp)  →  dx ≈ dy / scale · [qmin ≤ round(x / scale) + zp
    ≤ qmax]; scale and zp get none

    The straight-through estimator (see the module docstring), not the true derivative,
    which is zero almost everywhere. At the ends of the range (equal to qmin or qmax) the
    gradient passes.
    """
    x, scale = node.input[0], node.input[1]
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    dy = dys[0]
    out_type = node.attrs.get("output_dtype") or (b.dtype(zp) if zp else TensorProto.UINT8)
    if out_type not in _RANGES:
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail=f"the straight-through gradient supports integer "
            f"outputs only, not element type {out_type} (float8 and float4 outputs)",
        )
    qmin, qmax = _RANGES[out_type]
    s = _to_like(b, _spread(b, node, scale, x), x)
    q = b.Round(b.Div(x, s))
    if zp is not None:
        q = b.Add(q, b.Cast(_spread(b, node, zp, x), to=b.dtype(x)))
    inside = b.And(
        b.GreaterOrEqual(q, b.const(float(qmin), like=x)),
        b.LessOrEqual(q, b.const(float(qmax), like=x)),
    )
    dq = _to_like(b, dy, x)
    dx = b.Where(inside, b.Div(dq, s), b.const(0.0, like=x))
    return [dx, None, None]


@rule("DequantizeLinear")
def dequantize_linear(b, node, dys):
    """y = (x − zp) · scale  →  dx = dy · scale (x taken as a real number),
    d scale = Σ dy · (x − zp) over the entries that share each scale; zp gets none
    """
    x, scale = node.input[0], node.input[1]
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    dy = dys[0]
    dx = dscale = None
    s = _spread(b, node, scale, x)
    if node.needs_grad(0):
        # An integer x carries a float gradient only where the builder lets one through
        # (a QDQ pair); a float8 x gets an ordinary derivative.
        dx = b.Mul(dy, _to_like(b, s, dy))
    if node.needs_grad(1):
        centered = b.Cast(x, to=b.dtype(dy))
        if zp is not None:
            centered = b.Sub(centered, b.Cast(_spread(b, node, zp, x), to=b.dtype(dy)))
        dscale = _sum_to_param(b, node, b.Mul(dy, centered), scale, x)
        dscale = _to_like(b, dscale, scale)
    return [dx, dscale, None]


def _sum_to_param(b, node, full: str, param: str, x: str) -> str:
    """Sum a tensor shaped like x down to the shape of a scale (per tensor, axis or block)."""
    rank_p, rank_x = b.rank(param), b.rank(x)
    if rank_p == 0 or rank_x == 0:
        return b.reduce_sum(full, None, keepdims=0)
    axis = node.attrs.get("axis", 1) % rank_x
    block = node.attrs.get("block_size", 0)
    if not block:
        if rank_p == 1 and rank_x > 1:
            others = [k for k in range(rank_x) if k != axis]
            return b.reduce_sum(full, others, keepdims=0)
        return b.Reshape(b.reduce_sum(full, None, keepdims=0), b.Shape(param))
    shape = b.static_shape(x)
    if shape is None:
        raise GradientError(
            f"DequantizeLinear node '{node.name}': the blocked scale gradient needs the static "
            f"shape of '{x}'"
        )
    n = shape[axis]
    blocks = -(-n // block)
    pads = [0] * (2 * rank_x)
    pads[rank_x + axis] = blocks * block - n
    padded = b.Pad(full, b.ints(pads)) if blocks * block != n else full
    split = shape[:axis] + [blocks, block] + shape[axis + 1 :]
    return b.reduce_sum(b.Reshape(padded, b.ints(split)), [axis + 1], keepdims=0)
