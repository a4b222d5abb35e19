"""Kernels that make or pass tensors: Constant, Identity, Shape, Size, ConstantOfShape."""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel


@kernel("Constant")
def constant(node: KernelNode):
    attrs = node.attrs
    if "value" in attrs:
        value = np.asarray(attrs["value"])
    elif "value_float" in attrs:
        value = np.array(attrs["value_float"], dtype=np.float32)
    elif "value_floats" in attrs:
        value = np.array(attrs["value_floats"], dtype=np.float32)
    elif "value_int" in attrs:
        value = np.array(attrs["value_int"], dtype=np.int64)
    elif "value_ints" in attrs:
        value = np.array(attrs["value_ints"], dtype=np.int64)
    elif "value_string" in attrs:
        value = np.array(attrs["value_string"], dtype=object)
    elif "value_strings" in attrs:
        value = np.array(attrs["value_strings"], dtype=object)
    else:
        raise NotImplementedError(f"Constant with attributes {sorted(attrs)}")
    return lambda: (value,)


@kernel("Identity")
def identity(node: KernelNode):
    return lambda x: (x,)


@kernel("Shape")
def shape(node: KernelNode):
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end")

    def run(x):
        dims = x.shape[start:end] if end is not None else x.shape[start:]
        return (np.array(dims, dtype=np.int64),)

    return run


@kernel("Size")
def size(node: KernelNode):
    return lambda x: (np.array(x.size, dtype=np.int64),)


@kernel("ConstantOfShape")
def constant_of_shape(node: KernelNode):
    value = node.attrs.get("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)

    def run(shape):
        return (np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype),)

    return run
