"""Op table for DequantizeLinear (the exact scale gradient) and the straight-through estimator
of QuantizeLinear-DequantizeLinear pairs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrad import gradient_model
from onnxgrad.runtime.session import Session
from tests.optable import Case, check_case, params, positive

_RNG = np.random.default_rng(3)
U8 = _RNG.integers(0, 256, (3, 4)).astype(np.uint8)
I8 = _RNG.integers(-128, 128, (2, 3, 4)).astype(np.int8)

# onnx types the scale as float32, float16 or bfloat16 only, so onnx's full check rejects the
# float64 models of the finite-difference check: every case skips it (onnxruntime's float32
# run still checks the graph).
CASES = [
    Case(
        "DequantizeLinear", [U8, ()], id="per_tensor", sampler=positive(0.05, 0.5), full_check=False
    ),
    Case(
        "DequantizeLinear",
        [U8, (), np.array(128, np.uint8)],
        id="zero_point",
        sampler=positive(0.05, 0.5),
        full_check=False,
    ),
    Case(
        "DequantizeLinear",
        [I8, (3,), np.array([1, -2, 3], np.int8)],
        id="per_axis",
        sampler=positive(0.05, 0.5),
        full_check=False,
    ),
    Case(
        "DequantizeLinear",
        [I8, (4,)],
        attrs={"axis": -1},
        id="per_axis_last",
        sampler=positive(0.05, 0.5),
        full_check=False,
    ),
    # Blocked (opset 21): blocks of 2 along axis 2; onnxruntime's blocked kernel wants int4.
    Case(
        "DequantizeLinear",
        [I8, (2, 3, 2)],
        attrs={"axis": 2, "block_size": 2},
        id="blocked",
        opset=21,
        ort=False,
        sampler=positive(0.05, 0.5),
        full_check=False,
    ),
    Case(
        "DequantizeLinear",
        [I8[:, :, :3], (2, 3, 2)],
        attrs={"axis": 2, "block_size": 2},
        id="blocked_ragged",
        opset=21,
        ort=False,
        sampler=positive(0.05, 0.5),
        full_check=False,
    ),
    # QuantizeLinear's only output is an integer, so a one-node table has no loss to build;
    # its rule is checked through QDQ pairs below.
    Case(
        "QuantizeLinear",
        [(3, 4), np.array(0.1, np.float32)],
        id="no_float_output",
        marks=(
            pytest.mark.xfail(
                strict=True,
                reason="the op table's loss needs a float output; QuantizeLinear has none",
            ),
        ),
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)


def _qdq(scale: float, zero_point: int, per_axis: bool = False):
    """x → QuantizeLinear → DequantizeLinear → y, loss = Σ r · y."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    s = np.full((3,) if per_axis else (), scale, np.float32)
    zp = np.full((3,) if per_axis else (), zero_point, np.uint8)
    r = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    attrs = {"axis": 0} if per_axis else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q", **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq", **attrs),
        helper.make_node("Mul", ["y", "r"], ["ry"], name="weigh"),
        helper.make_node("ReduceSum", ["ry"], ["loss"], name="sum", keepdims=0),
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in (("s", s), ("zp", zp), ("r", r))]
    loss = helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])
    graph = helper.make_graph(nodes, "qdq", [x], [loss], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), r


@pytest.mark.parametrize("per_axis", [False, True])
def test_qdq_straight_through(per_axis):
    # QuantizeLinear's integer output carries the gradient (its rule is registered with
    # through_integers): inside the range (x / 0.1 + 100 in [0, 255]) dx = dy; outside, 0.
    model, r = _qdq(0.1, 100, per_axis)
    x = np.linspace(-15.0, 20.0, 12).reshape(3, 4).astype(np.float32)
    grad = gradient_model(model, wrt=["x"])
    names = [o.name for o in grad.graph.output]
    ours = Session(grad).run(names, {"x": x})
    theirs = Session(grad, backend="onnxruntime").run(names, {"x": x})
    inside = (np.rint(x / 0.1) + 100 >= 0) & (np.rint(x / 0.1) + 100 <= 255)
    assert not inside.all() and inside.any()
    np.testing.assert_allclose(ours[1], np.where(inside, r, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
