"""Op table for shape rules: float64 finite differences and onnxruntime parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrad import gradient_model
from onnxgrad.runtime.session import Session
from tests.optable import Case, check_case, params


def _i(*values):
    return np.array(values, dtype=np.int64)


BIG = np.iinfo(np.int64).max

CASES = [
    Case("Identity", [(3, 4)]),
    Case("Reshape", [(2, 3, 4), _i(4, -1)]),
    Case("Reshape", [(2, 3, 4), _i(0, -1)], id="dynamic", dynamic=True),
    Case("Reshape", [(6,), _i(1, 6)], id="add_dim"),
    Case("Flatten", [(2, 3, 4)]),
    Case("Flatten", [(2, 3, 4)], attrs={"axis": -1}, id="neg_axis"),
    Case("Flatten", [(2, 3, 4)], attrs={"axis": 0}, id="axis0", dynamic=True),
    Case("Transpose", [(2, 3, 4)], attrs={"perm": [1, 2, 0]}),
    Case("Transpose", [(2, 3, 4, 2)], id="reverse"),
    Case("Transpose", [(2, 3, 4)], attrs={"perm": [2, 0, 1]}, id="dynamic", dynamic=True),
    Case("Squeeze", [(1, 3, 1, 2), _i(-2, 0)]),
    Case("Squeeze", [(1, 3, 1)], id="all"),
    Case("Squeeze", [(3, 1, 2), _i(1)], id="dynamic", dynamic=True),
    Case("Unsqueeze", [(3, 2), _i(0, -1)]),
    Case("Unsqueeze", [(), _i(0)], id="scalar"),
    Case("Unsqueeze", [(3, 2), _i(1)], id="dynamic", dynamic=True),
    # Concat: dy is split back by the inputs' sizes, static or at run time.
    Case("Concat", [(2, 3), (2, 1), (2, 2)], attrs={"axis": -1}),
    Case("Concat", [(1, 2, 3), (3, 2, 3)], attrs={"axis": 0}, id="axis0"),
    Case("Concat", [(2, 3)], attrs={"axis": 1}, id="one"),
    Case("Concat", [(2, 3), (2, 2), (2, 1)], attrs={"axis": 1}, wrt=[1], id="wrt_one"),
    Case("Concat", [(2, 3, 1), (2, 3, 2)], attrs={"axis": -1}, id="dynamic", dynamic=True),
    # Split: dys are concatenated back; unused outputs count as zeros.
    Case("Split", [(4, 3), _i(1, 3)], outputs=2),
    Case("Split", [(2, 7)], attrs={"axis": -1, "num_outputs": 3}, outputs=3, id="uneven"),
    Case("Split", [(6, 2), _i(2, 1, 3)], outputs=3, loss_outputs=[0, 2], id="unused"),
    Case(
        "Split",
        [(2, 6)],
        attrs={"axis": 1, "num_outputs": 2},
        outputs=2,
        id="dynamic",
        dynamic=True,
    ),
    Case("Split", [(6, 2)], outputs=3, opset=13, id="opset13"),
    # Slice: constant unit steps give Pad; other steps and dynamic shapes scatter.
    Case("Slice", [(4, 5), _i(1), _i(3), _i(0)]),
    Case("Slice", [(4, 5), _i(-1, 1), _i(-BIG, BIG), _i(0, 1), _i(-1, 1)], id="neg_step"),
    Case("Slice", [(4, 5), _i(-1, 0), _i(0, 5), _i(-1, -2), _i(-2, 2)], id="neg_step2"),
    Case("Slice", [(2, 3, 4), _i(-1, 1), _i(-BIG, 3), _i(-1, -2), _i(-1, 1)], id="neg_axes"),
    Case("Slice", [(2, 3, 4), _i(10, -3), _i(-10, BIG), _i(2, 1), _i(-3, 1)], id="clamp"),
    Case("Slice", [(4, 6), _i(0, 1), _i(4, 6)], id="no_axes_steps"),
    Case("Slice", [(4, 6), _i(1), _i(1), _i(1)], id="empty"),
    Case("Slice", [(4, 6), _i(5), _i(0), _i(-1), _i(-2)], id="dynamic", dynamic=True),
    Case("Slice", [(4, 6), _i(1), _i(-1), _i(0)], id="dynamic_unit", dynamic=True),
    Case("Slice", [(4, 6), _i(1), _i(-1), _i(0)], opset=13, id="opset13"),
    # Pad: constant is a crop (negative pads pad); the other modes scatter-add their copies.
    Case("Pad", [(2, 3), _i(1, 0, 0, 2)]),
    Case("Pad", [(2, 3), _i(1, -1, -1, 2), ()], id="negative_value"),
    Case("Pad", [(2, 3, 4), _i(1, -2), None, _i(-1)], id="axes"),
    Case("Pad", [(3, 4), _i(2, 1, 1, 3)], attrs={"mode": "reflect"}, id="reflect"),
    Case("Pad", [(3, 4), _i(2, -1, 1, 3)], attrs={"mode": "edge"}, id="edge"),
    Case("Pad", [(3, 4), _i(2, 5), None, _i(1)], attrs={"mode": "wrap"}, opset=19, id="wrap"),
    Case(
        "Pad",
        [(2, 3, 4), _i(0, 1, 2, 1, 0, 2)],
        attrs={"mode": "reflect"},
        id="dynamic",
        dynamic=True,
    ),
    Case("Pad", [(2, 3), _i(0, 1, 1, 0), ()], id="dynamic_value", dynamic=True),
    # Before opset 11 pads is an attribute: a Slice crops dy (attributes before opset 10).
    Case("Pad", [(2, 3, 4)], attrs={"pads": [0, 1, 2, 0, 2, 1]}, opset=9, id="attr_opset9"),
    Case("Pad", [(3, 4)], attrs={"pads": [1, -1, 0, 2], "value": 1.5}, opset=8, id="attr_crop"),
    Case("Pad", [(2, 3, 4)], attrs={"pads": [1, 0, 0, 0, 0, 3]}, opset=10, id="attr_opset10"),
    Case("Pad", [(2, 3)], attrs={"pads": [0, 2, 1, 0]}, opset=10, id="attr_dynamic", dynamic=True),
    Case("Tile", [(2, 3), _i(2, 3)]),
    Case("Tile", [(2, 1, 3), _i(1, 4, 2)], id="dynamic", dynamic=True),
    # Cast to the same type here (the harness weighs outputs in the input's type); the tests
    # below cast between float types and to integers.
    Case("Cast", [(3, 4)], attrs={"to": TensorProto.DOUBLE}, ort=False),
    Case("Expand", [(3, 1), _i(2, 3, 4)]),
    Case("Expand", [(3, 4), _i(1, 1)], id="same"),
    Case("Expand", [(1, 4), _i(3, 1)], id="dynamic", dynamic=True),
    Case("DepthToSpace", [(1, 8, 2, 3)], attrs={"blocksize": 2}),
    Case("DepthToSpace", [(2, 4, 2, 1)], attrs={"blocksize": 2, "mode": "CRD"}, id="crd"),
    Case(
        "DepthToSpace",
        [(1, 8, 2, 2)],
        attrs={"blocksize": 2, "mode": "CRD"},
        id="crd_dynamic",
        dynamic=True,
    ),
    Case("SpaceToDepth", [(2, 2, 4, 2)], attrs={"blocksize": 2}),
    Case("SpaceToDepth", [(1, 2, 2, 4)], attrs={"blocksize": 2}, id="dynamic", dynamic=True),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)


def _cast_model(to: int) -> onnx.ModelProto:
    """x (float64) → Cast(to) → Cast(double) → Σ w · _ ."""
    w = numpy_helper.from_array(np.array([1.5, -2.0, 0.25]), "w")
    nodes = [
        helper.make_node("Cast", ["x"], ["c"], name="cast", to=to),
        helper.make_node("Cast", ["c"], ["d"], name="back", to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["d", "w"], ["wd"], name="weigh"),
        helper.make_node("ReduceSum", ["wd"], ["loss"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3])],
        [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_cast_float_passes_gradient_back_in_the_input_type(backend):
    grad = gradient_model(_cast_model(TensorProto.FLOAT), wrt=["x"])
    onnx.checker.check_model(grad, full_check=True)
    x = np.array([0.5, 1.0, -3.0])
    (dx,) = Session(grad, backend=backend).run(["x_grad"], {"x": x})
    assert dx.dtype == np.float64
    np.testing.assert_allclose(dx, [1.5, -2.0, 0.25])


def test_cast_to_integer_stops_the_gradient():
    grad = gradient_model(_cast_model(TensorProto.INT64), wrt=["x"])
    (dx,) = Session(grad).run(["x_grad"], {"x": np.array([0.5, 1.0, -3.0])})
    np.testing.assert_array_equal(dx, np.zeros(3))
