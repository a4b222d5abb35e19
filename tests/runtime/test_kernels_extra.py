"""Kernels of runtime/kernels/extra.py against onnxruntime or onnx's reference evaluator:
integer types and attributes the gradient table does not reach."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from onnxgrad.errors import ExecutionError
from onnxgrad.runtime.session import Session
from tests.runtime.test_kernels_shape import KCase, check_kernel, kparams, model_of


def _x(*shape, dtype=np.float32):
    n = int(np.prod(shape)) if shape else 1
    return ((np.arange(n) * 7) % n - n // 3).reshape(shape).astype(dtype)


def _i(*values):
    return np.array(values, dtype=np.int64)


X = _x(3, 4, 5)
XI = _x(3, 4, 5, dtype=np.int32)
M = np.random.default_rng(0).standard_normal((2, 3, 3)).astype(np.float32)

CASES = [
    KCase("Det", [M]),
    KCase("Det", [M[0]], id="single"),
    KCase("Compress", [XI, np.array([True, False, True])], attrs={"axis": 0}),
    KCase("Compress", [X, np.array([False, True])], attrs={"axis": -1}, id="short"),
    KCase("Compress", [XI[0], np.array([True, False, True, True])], id="flat"),
    KCase("ReverseSequence", [XI, np.array([3, 0, 2, 1])], id="time_major"),
    KCase(
        "ReverseSequence",
        [X, np.array([4, 1, 2])],
        attrs={"batch_axis": 0, "time_axis": 1},
        id="batch_major",
    ),
    KCase("CenterCropPad", [XI, np.array([2, 6, 3])], id="mixed"),
    KCase("CenterCropPad", [X, np.array([5, 1])], attrs={"axes": [0, 2]}, id="axes"),
    KCase("CumProd", [XI, np.array(1)], opset=26, ref="onnx"),
    KCase(
        "CumProd",
        [X, np.array(-1)],
        attrs={"exclusive": 1, "reverse": 1},
        opset=26,
        ref="onnx",
        id="excl_rev",
    ),
    KCase("CumProd", [X, np.array(0)], attrs={"exclusive": 1}, opset=26, ref="onnx", id="excl"),
    KCase("Swish", [X], attrs={"alpha": 0.6}, opset=24, ref="onnx"),
    KCase("SwiGLU", [X, X + 1], attrs={"alpha": 1.3}, opset=28, ref="onnx"),
    KCase("EyeLike", [_x(3, 4)]),
    KCase("EyeLike", [_x(4, 3)], attrs={"k": -1, "dtype": TensorProto.INT32}, id="k_dtype"),
    KCase("EyeLike", [_x(3, 5, dtype=np.int64)], attrs={"k": 2}, id="int"),
    KCase(
        "MaxUnpool",
        [_x(1, 2, 2, 2), np.array([[[[0, 3], [9, 14]], [[17, 18], [24, 31]]]])],
        attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
    ),
    KCase(
        "MaxUnpool",
        [_x(1, 1, 2), np.array([[[0, 1]]])],
        attrs={"kernel_shape": [2], "pads": [1, 0]},
        id="pads_1d",
    ),
    KCase(
        "MaxRoiPool",
        [
            _x(2, 3, 6, 7),
            np.array(
                [
                    [0, 0.4, 1.2, 4.6, 5.1],
                    [1, 2, 0, 6, 3],
                    [1, 5.5, 4.5, 9, 9],
                    [0, -2, -1, 1.5, 0.5],
                ],
                np.float32,
            ),
        ],
        attrs={"pooled_shape": [2, 3]},
    ),
    KCase(
        "MaxRoiPool",
        [_x(1, 2, 5, 5), np.array([[0, 1, 1, 7, 6]], np.float32)],
        attrs={"pooled_shape": [3, 2], "spatial_scale": 0.5},
        id="scale",
    ),
]


@pytest.mark.parametrize("case", kparams(CASES))
def test_kernel(case):
    check_kernel(case)


UNPOOL = [
    # A larger output_shape: the indices stay flat positions in the default (1, 2, 4, 4)
    # output, zeros follow at the end of each axis (onnxruntime reads them in the larger
    # layout, so the reference evaluator judges).
    KCase(
        "MaxUnpool",
        [_x(1, 2, 2, 2), np.array([[[[0, 3], [9, 14]], [[17, 18], [24, 31]]]]), _i(1, 2, 5, 6)],
        attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
        ref="onnx",
        id="output_shape_larger",
    ),
    KCase(
        "MaxUnpool",
        [_x(1, 2, 2), np.array([[[1, 0], [3, 2]]]), _i(1, 2, 4)],
        attrs={"kernel_shape": [2], "pads": [1, 0]},
        ref="onnx",
        id="output_shape_larger_pads_1d",
    ),
    KCase(
        "MaxUnpool",
        [_x(1, 2, 2, 2), np.array([[[[0, 3], [9, 14]], [[17, 18], [24, 31]]]]), _i(1, 2, 4, 4)],
        attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
        id="output_shape_default",
    ),
]


def _unpool_model(case: KCase):
    """model_of(case), its output given a shape of unknown sizes: shape inference leaves
    MaxUnpool with an output_shape input shapeless, which the checker refuses."""
    model, feeds, outs = model_of(case)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    for k in range(np.ndim(case.inputs[0])):
        dims.add().dim_param = f"d{k}"
    return model, feeds, outs


@pytest.mark.parametrize("case", kparams(UNPOOL))
def test_max_unpool_output_shape(case):
    model, feeds, outs = _unpool_model(case)
    (ours,) = Session(model).run(outs, feeds)
    if case.ref == "ort":
        import onnxruntime

        sess = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        (theirs,) = sess.run(outs, feeds)
    else:
        (theirs,) = ReferenceEvaluator(model).run(outs, feeds)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_max_unpool_refuses_a_smaller_output_shape():
    # As onnxruntime and the reference evaluator refuse it: indices of the default layout
    # need not fit a smaller output.
    case = KCase(
        "MaxUnpool",
        [_x(1, 1, 2, 2), np.array([[[[4, 5], [7, 8]]]]), _i(1, 1, 3, 3)],
        attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
    )
    model, feeds, outs = _unpool_model(case)
    with pytest.raises(ExecutionError, match="default output shape"):
        Session(model).run(outs, feeds)
