"""Activation kernels against onnxruntime and onnx's reference evaluator.

The gradient table (tests/autodiff/test_rules_activation.py) already runs the float kernels
at opset 18; here are the forms it does not reach: the opset < 13 softmax semantics, Clip's
attribute bounds and absent inputs, integer inputs, extreme values, float32 staying float32.
`run_both` is shared with the linalg kernel tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxgrad.runtime.session import Session


def one_node(op: str, inputs: Sequence[np.ndarray | None], opset: int, **attrs) -> onnx.ModelProto:
    """A model of one node whose inputs are all graph inputs ("" where None).

    The output's shape comes from onnx's reference evaluator, so that shapes onnx cannot infer
    (Einsum with "..." of different lengths) still make a valid model.
    """
    names = ["" if v is None else f"in{i}" for i, v in enumerate(inputs)]
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for n, v in zip(names, inputs)
        if v is not None
    ]
    node = helper.make_node(op, names, ["out"], name="node", **attrs)
    opsets = [helper.make_opsetid("", opset)]
    graph = helper.make_graph([node], "g", graph_inputs, [])
    probe = helper.make_model(graph, opset_imports=opsets)
    feeds = {n: v for n, v in zip(names, inputs) if v is not None}
    with np.errstate(all="ignore"):  # the reference's own overflows are not ours to test
        value = np.asarray(ReferenceEvaluator(probe).run(["out"], feeds)[0])
    out = helper.make_tensor_value_info(
        "out", helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)
    )
    graph = helper.make_graph([node], "g", graph_inputs, [out])
    return helper.make_model(graph, opset_imports=opsets)


def run_both(
    op: str,
    inputs: Sequence[np.ndarray | None],
    *,
    opset: int = 18,
    ref: str = "ort",
    rtol: float = 1e-5,
    atol: float = 1e-6,
    **attrs,
) -> np.ndarray:
    """Run one node on onnxgrad and on a reference ("ort" or "onnx"); assert they agree in
    value, shape and dtype, and that no input was written to. Returns onnxgrad's output."""
    model = one_node(op, inputs, opset, **attrs)
    feeds = {f"in{i}": v for i, v in enumerate(inputs) if v is not None}
    before = {k: v.copy() for k, v in feeds.items()}
    ours = Session(model).run(["out"], feeds)[0]
    for k, v in feeds.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{op} wrote to its input {k}")
    if ref == "ort":
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        theirs = session.run(None, feeds)[0]
    else:
        with np.errstate(all="ignore"):
            theirs = ReferenceEvaluator(model).run(None, feeds)[0]
    assert ours.dtype == theirs.dtype, f"{op}: {ours.dtype} vs {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{op}: {ours.shape} vs {theirs.shape}"
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol, err_msg=op)
    return ours


RNG = np.random.default_rng(0)


def f32(*shape: int, scale: float = 2.0) -> np.ndarray:
    return np.asarray(RNG.standard_normal(shape) * scale, dtype=np.float32)


UNARY = [
    ("Relu", {}),
    ("LeakyRelu", {}),
    ("LeakyRelu", {"alpha": 0.2}),
    ("Sigmoid", {}),
    ("Tanh", {}),
    ("Elu", {"alpha": 0.7}),
    ("Selu", {}),
    ("Celu", {"alpha": 1.5}),
    ("Softplus", {}),
    ("Softsign", {}),
    ("HardSigmoid", {}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.6}),
    ("HardSwish", {}),
    ("Mish", {}),
    ("ThresholdedRelu", {"alpha": 0.8}),
    ("Shrink", {}),
    ("Shrink", {"bias": 0.2, "lambd": 1.0}),
]


@pytest.mark.parametrize("op, attrs", UNARY, ids=[f"{o}-{sorted(a)}" for o, a in UNARY])
def test_unary_float32(op, attrs):
    run_both(op, [f32(2, 3, 4, scale=4.0)], **attrs)


@pytest.mark.parametrize("op", ["Sigmoid", "Softplus", "Tanh", "Mish", "Elu", "Softsign"])
def test_extreme_values_stay_finite(op):
    x = np.array([-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0], dtype=np.float32)
    out = run_both(op, [x])
    assert np.all(np.isfinite(out))


def test_float64_stays_float64():
    x = RNG.standard_normal((3, 4))
    for op in ("Relu", "LeakyRelu", "Sigmoid", "Softplus", "HardSwish", "Softmax"):
        out = Session(one_node(op, [x], 18)).run(["out"], {"in0": x})[0]
        assert out.dtype == np.float64, op


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    run_both("Gelu", [f32(3, 5)], opset=20, approximate=approximate)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1, -2])
def test_softmax_family(op, opset, axis):
    attrs = {} if axis is None else {"axis": axis}
    run_both(op, [f32(2, 3, 4)], opset=opset, **attrs)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_large_inputs(op):
    x = np.array([[1e4, 1e4 - 1, -1e4], [-1e4, -1e4, 0.0]], dtype=np.float32)
    out = run_both(op, [x])
    assert np.all(np.isfinite(out))


def test_softmax_opset1_rank4():
    run_both("Softmax", [f32(2, 3, 2, 2)], opset=1, axis=2)


def test_hardmax_ties_pick_the_first():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], dtype=np.float32)
    out = run_both("Hardmax", [x], opset=13)
    np.testing.assert_array_equal(out, [[0, 1, 0], [1, 0, 0]])


def test_softmax_empty():
    x = np.zeros((0, 4), dtype=np.float32)
    out = Session(one_node("Softmax", [x], 18)).run(["out"], {"in0": x})[0]
    assert out.shape == (0, 4) and out.dtype == np.float32


LO = np.array(-0.5, dtype=np.float32)
HI = np.array(0.7, dtype=np.float32)


@pytest.mark.parametrize(
    "bounds",
    [(LO, HI), (LO, None), (None, HI), (None, None), (HI, LO)],
    ids=["both", "min_only", "max_only", "none", "crossed"],
)
@pytest.mark.parametrize("opset", [11, 13])
def test_clip_inputs(bounds, opset):
    run_both("Clip", [f32(3, 4), *bounds], opset=opset)


@pytest.mark.parametrize(
    "attrs",
    [{"min": -0.5, "max": 0.7}, {"min": -0.5}, {"max": 0.7}, {}],
    ids=["both", "min_only", "max_only", "none"],
)
def test_clip_opset6_attributes(attrs):
    run_both("Clip", [f32(3, 4)], opset=6, **attrs)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8])
def test_clip_integer(dtype):
    x = np.arange(-6, 6).astype(dtype) if dtype != np.uint8 else np.arange(12).astype(dtype)
    run_both("Clip", [x, np.array(2, dtype), np.array(7, dtype)], opset=13, ref="onnx")


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64])
def test_relu_integer(dtype):
    run_both("Relu", [np.arange(-6, 6).astype(dtype)], ref="onnx")


@pytest.mark.parametrize(
    "slope_shape",
    [(4,), (3, 1), (1,), (), (2, 3, 4)],
    ids=["row", "channel", "one", "scalar", "full"],
)
def test_prelu(slope_shape):
    run_both("PRelu", [f32(2, 3, 4), f32(*slope_shape)])


def test_prelu_integer():
    x = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    run_both("PRelu", [x, np.array([2], dtype=np.int32)], ref="onnx")


def test_shrink_integer():
    x = np.arange(-6, 6, dtype=np.int32)
    run_both("Shrink", [x], ref="onnx", bias=1.0, lambd=2.0)
