"""QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear kernels against onnxruntime or
onnx's reference evaluator."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from tests.runtime.test_kernels_shape import KCase, check_kernel, kparams

X = np.linspace(-30.0, 40.0, 24, dtype=np.float32).reshape(2, 3, 4)
S = np.array(0.25, np.float32)
S3 = np.array([0.2, 0.5, 0.1], np.float32)
SB = np.random.default_rng(0).uniform(0.1, 0.5, (2, 3, 2)).astype(np.float32)
Q8 = np.arange(-12, 12, dtype=np.int8).reshape(2, 3, 4) * 5

CASES = [
    KCase("QuantizeLinear", [X, S], id="uint8_default"),
    KCase("QuantizeLinear", [X, S, np.array(10, np.int8)], id="int8_zp"),
    KCase("QuantizeLinear", [X, S3, np.array([0, 100, 200], np.uint8)], id="per_axis"),
    KCase("QuantizeLinear", [X, S, np.array(3, np.int16)], id="int16", opset=21),
    KCase(
        "QuantizeLinear",
        [X, S],
        attrs={"output_dtype": TensorProto.INT8},
        id="output_dtype",
        opset=21,
        ref="onnx",
    ),
    KCase(
        "QuantizeLinear",
        [X, SB, np.zeros((2, 3, 2), np.int8)],
        attrs={"axis": 2, "block_size": 2},
        id="blocked",
        opset=21,
        ref="onnx",
    ),
    KCase("DequantizeLinear", [Q8, S, np.array(-3, np.int8)], id="int8"),
    KCase("DequantizeLinear", [Q8.astype(np.int32), S], id="int32"),
    KCase(
        "DequantizeLinear",
        [(Q8 + 100).astype(np.uint8), S3, np.array([1, 2, 3], np.uint8)],
        id="per_axis",
    ),
    KCase(
        "DequantizeLinear",
        [Q8, SB, np.ones((2, 3, 2), np.int8)],
        attrs={"axis": -1, "block_size": 2},
        id="blocked",
        opset=21,
        ref="onnx",
    ),
    KCase("DynamicQuantizeLinear", [X], outputs=3),
    KCase("DynamicQuantizeLinear", [np.abs(X) + 1], outputs=3, id="positive"),
]


@pytest.mark.parametrize("case", kparams(CASES))
def test_kernel(case):
    check_kernel(case)
