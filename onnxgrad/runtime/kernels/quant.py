"""Quantization kernels: QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear (integer,
float8, float6 and float4 types; per-tensor, per-axis and blocked scales), and the integer
products MatMulInteger, ConvInteger, QLinearMatMul and QLinearConv.

The integer products run in float64, which holds every product and sum of 8-bit values
exactly (up to 2^53), so numpy's BLAS does the work; the sums are then wrapped to int32, as
an int32 accumulator would wrap. ConvInteger and QLinearConv reuse the Conv kernel's
im2col on the zero-point-shifted operands, whose zero padding is then the zero point.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

from onnxgrad.runtime.kernels import KernelNode, kernel
from onnxgrad.runtime.kernels.conv import conv
from onnxgrad.runtime.kernels.linalg import matmul_nd

# The output types QuantizeLinear can produce (int32 too, as earlier onnxgrad accepted).
_QUANT_TYPES = frozenset(
    {
        TensorProto.UINT8,
        TensorProto.INT8,
        TensorProto.UINT16,
        TensorProto.INT16,
        TensorProto.INT32,
        TensorProto.UINT4,
        TensorProto.INT4,
        TensorProto.UINT2,
        TensorProto.INT2,
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E4M3FNUZ,
        TensorProto.FLOAT8E5M2,
        TensorProto.FLOAT8E5M2FNUZ,
        TensorProto.FLOAT4E2M1,
        TensorProto.FLOAT6E2M3,
        TensorProto.FLOAT6E3M2,
    }
)

_PRECISIONS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})

_QUANT_DTYPES = frozenset(helper.tensor_dtype_to_np_dtype(t) for t in _QUANT_TYPES)

# The float types numpy computes in (ml_dtypes' float8 types convert, but do not compute).
_ARITHMETIC = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)
)

# ml_dtypes' sub-byte integers are numpy kind "V", so dtype.kind does not find them.
_SMALL_INTS = frozenset(
    np.dtype(t) for t in (ml_dtypes.int2, ml_dtypes.uint2, ml_dtypes.int4, ml_dtypes.uint4)
)


def _is_integer(dtype: np.dtype) -> bool:
    return dtype.kind in "iu" or dtype in _SMALL_INTS


def _arithmetic(dtype: np.dtype) -> np.dtype:
    """`dtype` where numpy computes in it (float16 to float64, bfloat16), else float64
    for integers (exact for int32) and float32 for the rest (float8e8m0 scales)."""
    if dtype in _ARITHMETIC:
        return dtype
    return np.dtype(np.float64 if dtype.kind in "iu" else np.float32)


def _spread(param: np.ndarray, x: np.ndarray, axis: int, block: int) -> np.ndarray:
    """A scale or zero point broadcast against x: per tensor, per axis or blocked."""
    if param.ndim == 0 or param.size == 1 and not block:
        return param.reshape(())
    axis %= x.ndim
    if not block:
        shape = [1] * x.ndim
        shape[axis] = -1
        return param.reshape(shape)
    return np.repeat(param, block, axis=axis)[(slice(None),) * axis + (slice(0, x.shape[axis]),)]


def _saturate_to(
    scaled: np.ndarray, zero_point: np.ndarray | None, dtype: np.dtype, saturate: bool = True
) -> np.ndarray:
    """y = saturate(round(scaled) + zero_point) in the quantized type `dtype`.

    Integer types round half to even and always saturate. Float types (float8, float6,
    float4) add the zero point, then round once in the cast (to nearest, ties to even);
    with `saturate`, values beyond the largest finite one (±inf too) become ±max, else
    they become what the type has for them (inf for e5m2, NaN for e4m3fn and the fnuz
    types; float6 and float4 have neither, so they saturate anyway).
    """
    if _is_integer(dtype):
        q = np.rint(scaled.astype(np.float64, copy=False))
        if zero_point is not None:
            q += zero_point.astype(np.float64)
        info = ml_dtypes.iinfo(dtype)
        return np.clip(q, info.min, info.max).astype(dtype)
    # float64 stays float64, so that the cast rounds once; narrower floats widen exactly.
    wide = np.float64 if scaled.dtype == np.float64 else np.float32
    q = scaled.astype(wide, copy=False)
    if zero_point is not None:
        q = q + zero_point.astype(wide)
    if saturate:
        info = ml_dtypes.finfo(dtype)
        q = np.clip(q, float(info.min), float(info.max))  # NaN stays NaN
    return q.astype(dtype)


@kernel("QuantizeLinear")
def quantize_linear(node: KernelNode):
    """y = saturate(round(x / y_scale) + y_zero_point), rounding half to even."""
    axis = node.attrs.get("axis", 1)
    block = node.attrs.get("block_size", 0)
    out_attr = node.attrs.get("output_dtype", 0)
    saturate = bool(node.attrs.get("saturate", 1))
    precision = node.attrs.get("precision", 0)
    if out_attr and out_attr not in _QUANT_TYPES:
        raise NotImplementedError(
            f"QuantizeLinear node '{node.name}': output_dtype "
            f"{helper.tensor_dtype_to_string(out_attr)} is not a quantized type; use one of "
            "the 2- to 16-bit integers or the float8, float6 and float4 types"
        )
    if precision and precision not in _PRECISIONS:
        raise NotImplementedError(
            f"QuantizeLinear node '{node.name}': precision "
            f"{helper.tensor_dtype_to_string(precision)}; use float, float16 or bfloat16"
        )

    def run(x, scale, zero_point=None):
        if out_attr:
            dtype = helper.tensor_dtype_to_np_dtype(out_attr)
        else:
            dtype = np.dtype(np.uint8) if zero_point is None else zero_point.dtype
        if dtype not in _QUANT_DTYPES:
            raise NotImplementedError(
                f"QuantizeLinear node '{node.name}': output type {dtype} is not a quantized type"
            )

        # 1. The division, in the precision attribute's type, else the scale's.
        division = (
            helper.tensor_dtype_to_np_dtype(precision) if precision else _arithmetic(scale.dtype)
        )
        s = _spread(scale, x, axis, block).astype(division, copy=False)
        scaled = x.astype(division, copy=False) / s

        # 2. Round, shift and saturate into the output type.
        zp = None if zero_point is None else _spread(zero_point, x, axis, block)
        return (_saturate_to(scaled, zp, dtype, saturate),)

    return run


@kernel("DequantizeLinear")
def dequantize_linear(node: KernelNode):
    """y = (x − x_zero_point) · x_scale, rounded once into the output type."""
    axis = node.attrs.get("axis", 1)
    block = node.attrs.get("block_size", 0)
    out_attr = node.attrs.get("output_dtype", 0)

    def run(x, scale, zero_point=None):
        out = helper.tensor_dtype_to_np_dtype(out_attr) if out_attr else scale.dtype
        # float64 holds every integer and float8/6/4 difference exactly.
        centered = x.astype(np.float64)
        if zero_point is not None:
            centered -= _spread(zero_point, x, axis, block).astype(np.float64)
        # The product in float32 (float64 for float64 outputs), as numpy's own float16 and
        # bfloat16 products are computed, then rounded once to the output type.
        wide = np.float64 if out == np.float64 else np.float32
        y = centered.astype(wide) * _spread(scale, x, axis, block).astype(wide)
        return (y.astype(out, copy=False),)

    return run


@kernel("DynamicQuantizeLinear")
def dynamic_quantize_linear(node: KernelNode):
    def run(x):
        lo = min(float(x.min(initial=0.0)), 0.0)
        hi = max(float(x.max(initial=0.0)), 0.0)
        scale = np.float32((hi - lo) / 255.0)
        zp = np.clip(np.rint(-lo / scale), 0, 255) if scale else 0.0
        q = np.rint(x / scale) + zp if scale else np.zeros_like(x)
        y = np.clip(q, 0, 255).astype(np.uint8)
        return y, np.array(scale, np.float32), np.array(zp, np.uint8)

    return run


def _centered(q: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    """q − zero_point in float64: exact for the integer and float8 types."""
    out = q.astype(np.float64)
    if zero_point is not None:
        out -= zero_point.astype(np.float64)
    return out


def _wrap_int32(acc: np.ndarray) -> np.ndarray:
    """Exact integer sums (float64) as an int32 accumulator holds them, wrapping on overflow."""
    return acc.astype(np.int64).astype(np.int32)


def _per_row(param: np.ndarray | None) -> np.ndarray | None:
    """A's zero point or scale against A (..., M, K): a vector is one value per row."""
    if param is None or param.size == 1:
        return None if param is None else param.reshape(())
    return param.reshape(-1, 1) if param.ndim == 1 else param


def _per_column(param: np.ndarray | None) -> np.ndarray | None:
    """B's zero point or scale against B (..., K, N): a vector is one value per column."""
    if param is None or param.size == 1:
        return None if param is None else param.reshape(())
    return param


def _per_channel(param: np.ndarray | None, ndim: int, axis: int, name: str) -> np.ndarray | None:
    """A per-tensor or per-output-channel conv parameter, shaped to broadcast on `axis`."""
    if param is None or param.size == 1:
        return None if param is None else param.reshape(())
    if param.ndim != 1:
        raise ValueError(f"{name} must be a scalar or a 1-D tensor, got shape {list(param.shape)}")
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def _scalar(param: np.ndarray | None, name: str) -> np.ndarray | None:
    if param is not None and param.size != 1:
        raise ValueError(f"{name} must be a scalar (per tensor), got shape {list(param.shape)}")
    return None if param is None else param.reshape(())


@kernel("MatMulInteger")
def matmul_integer(node: KernelNode):
    """Y = (A − a_zero_point) · (B − b_zero_point), accumulated in int32."""

    def run(a, b, a_zero_point=None, b_zero_point=None):
        acc = matmul_nd(
            _centered(a, _per_row(a_zero_point)), _centered(b, _per_column(b_zero_point))
        )
        return (_wrap_int32(acc),)

    return run


@kernel("QLinearMatMul")
def qlinear_matmul(node: KernelNode):
    """y = saturate(round((a − a_zp) · (b − b_zp) · a_scale · b_scale / y_scale) + y_zp)."""

    def run(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
        # 1. The product of the shifted operands: exact int32 sums for integer inputs.
        acc = matmul_nd(
            _centered(a, _per_row(a_zero_point)), _centered(b, _per_column(b_zero_point))
        )
        if _is_integer(a.dtype) and _is_integer(b.dtype):
            acc = _wrap_int32(acc)

        # 2. One multiplier per output element, in the scales' type. The product is float32
        #    for integer inputs, as onnxruntime requantizes; float8 sums keep float64, so
        #    that the cast to a float8 output rounds once.
        multiplier = _per_row(a_scale) * _per_column(b_scale) / _per_column(y_scale)
        wide = np.float32 if acc.dtype == np.int32 else np.float64
        scaled = acc.astype(wide) * multiplier.astype(wide)
        dtype = a.dtype if y_zero_point is None else y_zero_point.dtype
        return (_saturate_to(scaled, _per_column(y_zero_point), dtype),)

    return run


@kernel("ConvInteger")
def conv_integer(node: KernelNode):
    """Y = (X − x_zero_point) ⋆ (W − w_zero_point), accumulated in int32.

    Pads hold x_zero_point.
    """
    float_conv = conv(node)

    def run(x, w, x_zero_point=None, w_zero_point=None):
        xc = _centered(x, _scalar(x_zero_point, "x_zero_point"))
        wc = _centered(w, _per_channel(w_zero_point, w.ndim, 0, "w_zero_point"))
        (acc,) = float_conv(xc, wc)
        return (_wrap_int32(acc),)

    return run


@kernel("QLinearConv")
def qlinear_conv(node: KernelNode):
    """y = saturate(round(((x − x_zp) ⋆ (w − w_zp) + B) · x_scale · w_scale / y_scale)
    + y_zp), with B an int32 bias in units of x_scale · w_scale."""
    float_conv = conv(node)

    def run(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None):
        # 1. The int32 accumulator: the shifted convolution plus the bias.
        xc = _centered(x, _scalar(x_zero_point, "x_zero_point"))
        wc = _centered(w, _per_channel(w_zero_point, w.ndim, 0, "w_zero_point"))
        (acc,) = float_conv(xc, wc, None if bias is None else bias.astype(np.float64))
        acc = _wrap_int32(acc)

        # 2. Requantize per output channel in float32, as onnxruntime does.
        ws = _per_channel(w_scale, x.ndim, 1, "w_scale")
        multiplier = (_scalar(x_scale, "x_scale") * ws / _scalar(y_scale, "y_scale")).astype(
            np.float32
        )
        scaled = acc.astype(np.float32) * multiplier
        dtype = x.dtype if y_zero_point is None else y_zero_point.dtype
        return (_saturate_to(scaled, _scalar(y_zero_point, "y_zero_point"), dtype),)

    return run
