"""Op table for reduction rules: float64 finite differences and onnxruntime parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxgrad import gradient_model
from onnxgrad.gradcheck import check_gradients
from onnxgrad.runtime.session import Session
from tests.optable import Case, away_from, check_case, distinct, params, positive


def axes(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# (id, input shape, axes input or None, attributes)
LAYOUTS = [
    ("keep", (3, 4), axes(1), {}),
    ("drop", (3, 4), axes(1), {"keepdims": 0}),
    ("neg", (2, 3, 4), axes(-1), {}),
    ("neg_drop", (2, 3, 4), axes(-1, 0), {"keepdims": 0}),
    ("all", (2, 3, 4), None, {}),
    ("all_drop", (2, 3, 4), None, {"keepdims": 0}),
    ("noop", (3, 4), axes(), {"noop_with_empty_axes": 1}),
    ("empty_all", (3, 4), axes(), {"keepdims": 0}),
]

# op -> sampler, kept away from kinks and out-of-domain values.
OPS = {
    "ReduceSum": None,
    "ReduceMean": None,
    # Max/Min: no ties, so the gradient is the one-hot one everywhere.
    "ReduceMax": distinct(),
    "ReduceMin": distinct(),
    "ReduceProd": away_from([0.0], 0.3, -1.5, 1.5),
    # |x| has a kink at 0.
    "ReduceL1": away_from([0.0], 0.2),
    "ReduceL2": None,
    "ReduceSumSquare": None,
    "ReduceLogSum": positive(0.5, 2.0),
    "ReduceLogSumExp": None,
}

CASES = []
for _op, _sampler in OPS.items():
    for _id, _shape, _axes, _attrs in LAYOUTS:
        inputs = [_shape] if _axes is None else [_shape, _axes]
        CASES.append(Case(_op, inputs, attrs=_attrs, id=_id, sampler=_sampler))
    CASES.append(
        Case(
            _op,
            [(2, 3, 4), axes(1)],
            attrs={"keepdims": 0},
            id="dynamic",
            sampler=_sampler,
            dynamic=True,
        )
    )
# Ties in ReduceMax/ReduceMin have no finite-difference gradient: test_ties_split_evenly.
CASES += [
    Case("ReduceSum", [(3, 4), axes(0, 1)], attrs={"keepdims": 0}, id="both_axes"),
    Case("ReduceSum", [(2, 3, 4)], attrs={"keepdims": 0}, id="opset13", opset=13),
    Case("ReduceMean", [(2, 3, 4, 5), axes(1, 3)], id="rank4"),
    Case("ReduceProd", [(2, 3, 4), axes(2)], id="small", sampler=positive(0.5, 1.5)),
    Case(
        "ReduceMax", [(2, 3, 4)], attrs={"keepdims": 0}, id="opset13", opset=13, sampler=distinct()
    ),
    Case("ReduceL2", [(2, 3, 4), axes(0, 2)], attrs={"keepdims": 0}, id="two_axes"),
    Case("ReduceLogSumExp", [(2, 3, 4)], attrs={"axes": [1]}, id="opset13", opset=13),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)


def _one_node(op: str, x: np.ndarray, axes_value: np.ndarray | None, runtime_axes: bool, **attrs):
    dtype = helper.np_dtype_to_tensor_dtype(x.dtype)
    inputs = [helper.make_tensor_value_info("x", dtype, list(x.shape))]
    inits, names = [], ["x"]
    if axes_value is not None:
        names.append("axes")
        if runtime_axes:
            inputs.append(helper.make_tensor_value_info("axes", onnx.TensorProto.INT64, [None]))
        else:
            inits.append(numpy_helper.from_array(axes_value, "axes"))
    nodes = [
        helper.make_node(op, names, ["y"], name="node", **attrs),
        helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
    ]
    loss = helper.make_tensor_value_info("loss", dtype, [])
    graph = helper.make_graph(nodes, "g", inputs, [loss], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize(
    "op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceL2", "ReduceLogSumExp", "ReduceProd"]
)
def test_runtime_axes(op, keepdims):
    rng = np.random.default_rng(0)
    x = distinct()(rng, (2, 3, 4)) * 0.5 + 0.05
    model = _one_node(op, x, axes(-1, 0), True, keepdims=keepdims)
    feeds = {"x": x, "axes": axes(-1, 0)}
    for report in check_gradients(model, feeds, wrt=["x"]):
        assert report.ok(1e-6, 1e-8), report


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
def test_ties_split_evenly(op):
    x = np.array([[1.0, 3.0, 3.0, -1.0], [2.0, 2.0, 2.0, 2.0]])
    model = _one_node(op, x, axes(1), False, keepdims=0)
    grad = gradient_model(model, wrt=["x"])
    (dx,) = Session(grad).run(["x_grad"], {"x": x})
    if op == "ReduceMax":
        np.testing.assert_allclose(dx, [[0, 0.5, 0.5, 0], [0.25, 0.25, 0.25, 0.25]])
    else:
        np.testing.assert_allclose(dx, [[0, 0, 0, 1], [0.25, 0.25, 0.25, 0.25]])


def test_prod_with_zeros():
    # One zero: its gradient is the product of the others; the others get 0.
    # Two zeros: every gradient is 0.
    x = np.array([[2.0, 0.0, 3.0], [0.0, 5.0, 0.0], [1.0, 2.0, 4.0]])
    model = _one_node("ReduceProd", x, axes(1), False, keepdims=0)
    grad = gradient_model(model, wrt=["x"])
    (dx,) = Session(grad).run(["x_grad"], {"x": x})
    np.testing.assert_allclose(dx, [[0, 6, 0], [0, 0, 0], [8, 4, 2]])


def test_l2_of_zero_slice():
    # At an all-zero slice ReduceL2 has no gradient; we take the subgradient 0.
    x = np.array([[0.0, 0.0], [3.0, 4.0]])
    model = _one_node("ReduceL2", x, axes(1), False, keepdims=0)
    grad = gradient_model(model, wrt=["x"])
    (dx,) = Session(grad).run(["x_grad"], {"x": x})
    np.testing.assert_allclose(dx, [[0, 0], [0.6, 0.8]])
