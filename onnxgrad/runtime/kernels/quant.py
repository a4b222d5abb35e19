"""Kernels for QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear (integer types;
per-tensor, per-axis and blocked scales).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from onnxgrad.runtime.kernels import KernelNode, kernel

_INTEGER_TYPES = {
    TensorProto.UINT8: np.uint8,
    TensorProto.INT8: np.int8,
    TensorProto.UINT16: np.uint16,
    TensorProto.INT16: np.int16,
    TensorProto.INT32: np.int32,
}


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


@kernel("QuantizeLinear")
def quantize_linear(node: KernelNode):
    axis = node.attrs.get("axis", 1)
    block = node.attrs.get("block_size", 0)
    out_attr = node.attrs.get("output_dtype", 0)

    def run(x, scale, zero_point=None):
        if out_attr:
            if out_attr not in _INTEGER_TYPES:
                raise NotImplementedError(
                    f"QuantizeLinear node '{node.name}': output_dtype {out_attr} (only "
                    "8-, 16- and 32-bit integers)"
                )
            dtype = np.dtype(_INTEGER_TYPES[out_attr])
        else:
            dtype = np.dtype(np.uint8) if zero_point is None else zero_point.dtype
        if dtype.kind not in "iu":
            raise NotImplementedError(
                f"QuantizeLinear node '{node.name}': output type {dtype} (only integer types)"
            )
        s = _spread(scale, x, axis, block)
        # The division happens in the scale's precision; rounding is half to even.
        q = np.rint(x.astype(scale.dtype) / s)
        if zero_point is not None:
            q = q + _spread(zero_point, x, axis, block).astype(q.dtype)
        info = np.iinfo(dtype)  # integer outputs always saturate
        return (np.clip(q, info.min, info.max).astype(dtype),)

    return run


@kernel("DequantizeLinear")
def dequantize_linear(node: KernelNode):
    axis = node.attrs.get("axis", 1)
    block = node.attrs.get("block_size", 0)
    out_attr = node.attrs.get("output_dtype", 0)

    def run(x, scale, zero_point=None):
        out = helper.tensor_dtype_to_np_dtype(out_attr) if out_attr else scale.dtype
        centered = x.astype(np.int64 if x.dtype.kind in "iu" else np.float64)
        if zero_point is not None:
            centered = centered - _spread(zero_point, x, axis, block).astype(centered.dtype)
        y = centered.astype(scale.dtype) * _spread(scale, x, axis, block)
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
