"""The emitter: names, shared constants, element types of what it emits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxgrad.autodiff.emitter import Emitter, GraphInfo
from onnxgrad.errors import GradientError
from onnxgrad.runtime.session import Session


def emitter(**dtypes: int) -> Emitter:
    return Emitter(GraphInfo(dtypes=dict(dtypes)), opset=18).scoped("n_grad/")


def test_element_types_follow_the_data_not_the_condition():
    b = emitter(c=TensorProto.BOOL, x=TensorProto.DOUBLE)
    picked = b.Where("c", "x", b.const(0.0, like="x"))
    assert b.dtype(picked) == TensorProto.DOUBLE
    # A constant typed like the result is of the data's type, not bool.
    assert b.const(0.0, like=picked) == b.const(0.0, like="x")
    assert b.dtype(b.Greater("x", "x")) == TensorProto.BOOL
    assert b.dtype(b.Shape("x")) == TensorProto.INT64
    assert b.dtype(b.Cast("x", to=TensorProto.FLOAT16)) == TensorProto.FLOAT16


def test_outputs_after_the_first_are_typed_only_when_known():
    b = emitter(x=TensorProto.FLOAT, k=TensorProto.INT64)
    values, indices = b.op("TopK", "x", "k", outputs=2)
    assert b.dtype(values) == TensorProto.FLOAT
    assert b.info.dtypes[indices] == TensorProto.INT64
    parts = b.op("Split", "x", outputs=2, axis=0, num_outputs=2)
    assert [b.info.dtypes[p] for p in parts] == [TensorProto.FLOAT] * 2


def test_names_are_scoped_and_constants_shared():
    b = emitter(x=TensorProto.FLOAT)
    first = b.Neg("x")
    second = b.Neg("x")
    assert first.startswith("n_grad/Neg") and first != second
    other = b.scoped("m_grad/")
    assert other.const(2.0, like="x") == b.const(2.0, like="x")
    assert all(isinstance(n, onnx.NodeProto) for n in b.nodes)


@pytest.mark.parametrize("opset", [10, 12, 13, 18])
@pytest.mark.parametrize(
    ("x_shape", "dx_shape"),
    [((3, 1), (2, 3, 4)), ((1, 4), (3, 4)), ((3, 4), (3, 4)), ((1, 1), (2, 5))],
)
def test_sum_to_with_broadcasts_known_only_at_run_time(opset, x_shape, dx_shape):
    # Every dimension symbolic: which axes to sum is known only from the fed shapes.
    x_dims = [f"x{k}" for k in range(len(x_shape))]
    dx_dims = [f"d{k}" for k in range(len(dx_shape))]
    info = GraphInfo(
        dtypes={"x": TensorProto.DOUBLE, "dx": TensorProto.DOUBLE},
        shapes={"x": x_dims, "dx": dx_dims},
    )
    b = Emitter(info, opset=opset).scoped("t/")
    total = b.sum_to("dx", "x", dx_dims)
    graph = helper.make_graph(
        b.nodes,
        "sum_to",
        [
            helper.make_tensor_value_info("x", TensorProto.DOUBLE, x_dims),
            helper.make_tensor_value_info("dx", TensorProto.DOUBLE, dx_dims),
        ],
        [helper.make_tensor_value_info(total, TensorProto.DOUBLE, x_dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    if opset < 13:  # ReduceSum takes no axes input there
        assert all(len(n.input) == 1 for n in b.nodes if n.op_type == "ReduceSum")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape)
    dx = rng.standard_normal(dx_shape)
    lead = len(dx_shape) - len(x_shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(x_shape) if d == 1 and dx_shape[lead + i] != 1
    )
    want = dx.sum(axis=axes, keepdims=True).reshape(x_shape)
    (got,) = Session(model).run(None, {"x": x, "dx": dx})
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_sum_to_before_opset_10_with_run_time_broadcasts_says_what_to_do():
    info = GraphInfo(dtypes={"x": TensorProto.DOUBLE}, shapes={"x": ["a"], "dx": ["b", "c"]})
    b = Emitter(info, opset=9).scoped("t/")
    with pytest.raises(GradientError, match="needs opset 10 .* onnx.version_converter"):
        b.sum_to("dx", "x", ["b", "c"])
