"""The gradient builder's bookkeeping: accumulation, unbroadcasting, pruning, naming, errors."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad.errors import GradientError, MissingGradientError
from onnxgrad.gradcheck import check_gradients

F64 = TensorProto.DOUBLE


def make(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def vi(name, shape, dtype=F64):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float64), name)


def fan_out_model():
    """loss = Σ (x · w + w): w meets the loss on two paths."""
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["xw"], name="mul"),
        helper.make_node("Add", ["xw", "w"], ["s"], name="add"),
        helper.make_node("ReduceSum", ["s"], ["loss"], name="sum", keepdims=0),
    ]
    return make(nodes, [vi("x", [3])], [vi("loss", [])], [init("w", [0.5, -1.0, 2.0])])


def test_fan_out_gradients_are_summed():
    model = fan_out_model()
    grad = onnxgrad.gradient_model(model)
    onnx.checker.check_model(grad, full_check=True)
    assert [o.name for o in grad.graph.output] == ["loss", "w_grad"]
    sums = [n for n in grad.graph.node if n.op_type == "Sum"]
    assert len(sums) == 1 and sums[0].output[0] == "w_grad"
    x = np.array([1.0, 2.0, 3.0])
    (dw,) = onnxgrad.Session(grad).run(["w_grad"], {"x": x})
    np.testing.assert_allclose(dw, x + 1)


def test_names_are_deterministic():
    a = onnxgrad.gradient_model(fan_out_model())
    b = onnxgrad.gradient_model(fan_out_model())
    assert a.SerializeToString() == b.SerializeToString()
    backward = a.graph.node[3:]
    for node in backward:
        assert node.name.startswith(
            ("mul_grad/", "add_grad/", "sum_grad/", "w_grad/", "loss_grad/", "onnxgrad_const/")
        ), node.name


def test_broadcast_gradients_are_reduced_static_and_dynamic():
    # loss = Σ r · (x + b) with b broadcast over a symbolic batch.
    nodes = [
        helper.make_node("Add", ["x", "b"], ["y"], name="add"),
        helper.make_node("Mul", ["y", "r"], ["ry"], name="weigh"),
        helper.make_node("ReduceSum", ["ry"], ["loss"], name="sum", keepdims=0),
    ]
    rng = np.random.default_rng(0)
    for dims in (["N", 4], [5, 4]):
        model = make(
            nodes,
            [vi("x", dims), vi("r", dims)],
            [vi("loss", [])],
            [init("b", rng.standard_normal(4))],
        )
        grad = onnxgrad.gradient_model(model, wrt=["b", "x"])
        onnx.checker.check_model(grad, full_check=True)
        for n in (1, 5):
            if dims[0] != "N" and n != 5:
                continue
            r = rng.standard_normal((n, 4))
            x = rng.standard_normal((n, 4))
            db, dx = onnxgrad.Session(grad).run(["b_grad", "x_grad"], {"x": x, "r": r})
            np.testing.assert_allclose(db, r.sum(axis=0))
            np.testing.assert_allclose(dx, r)


def test_non_scalar_loss_takes_its_gradient_as_input():
    nodes = [helper.make_node("Mul", ["x", "w"], ["y"], name="mul")]
    model = make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], [init("w", np.ones(3))])
    grad = onnxgrad.gradient_model(model)
    assert "y_grad" in [i.name for i in grad.graph.input]
    x = np.arange(6.0).reshape(2, 3)
    seed = np.full((2, 3), 2.0)
    (dw,) = onnxgrad.Session(grad).run(["w_grad"], {"x": x, "y_grad": seed})
    np.testing.assert_allclose(dw, (x * seed).sum(axis=0))


def test_unrelated_branches_are_pruned_and_unreached_weights_get_zeros(caplog):
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["y"], name="mul"),
        helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
        helper.make_node("Exp", ["v"], ["other"], name="unrelated"),
    ]
    model = make(
        nodes,
        [vi("x", [3])],
        [vi("loss", []), vi("other", [3])],
        [init("w", np.ones(3)), init("v", np.ones(3))],
    )
    with caplog.at_level(logging.WARNING):
        grad = onnxgrad.gradient_model(model, wrt=["w", "v"], loss="loss")
    assert "does not depend on 'v'" in caplog.text
    assert not any(n.name.startswith("unrelated_grad/") for n in grad.graph.node)
    dw, dv = onnxgrad.Session(grad).run(["w_grad", "v_grad"], {"x": np.arange(3.0)})
    np.testing.assert_allclose(dw, np.arange(3.0))
    np.testing.assert_array_equal(dv, np.zeros(3))


def test_constant_branches_need_no_rule():
    # The Shape → ConstantOfShape branch carries no gradient, so no rule is asked of it.
    nodes = [
        helper.make_node("Shape", ["w"], ["s"], name="shape"),
        helper.make_node(
            "ConstantOfShape",
            ["s"],
            ["ones"],
            name="ones",
            value=numpy_helper.from_array(np.array([3.0])),
        ),
        helper.make_node("Mul", ["w", "ones"], ["y"], name="mul"),
        helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
    ]
    model = make(nodes, [], [vi("loss", [])], [init("w", np.ones(4))])
    grad = onnxgrad.gradient_model(model)
    (dw,) = onnxgrad.Session(grad).run(["w_grad"], {})
    np.testing.assert_allclose(dw, np.full(4, 3.0))


def test_every_missing_rule_is_reported_at_once():
    nodes = [
        helper.make_node("Frob", ["x", "w"], ["a"], name="frob1", domain="custom.ops"),
        helper.make_node("Frob", ["a", "w"], ["b"], name="frob2", domain="custom.ops"),
        helper.make_node("ReduceSum", ["b"], ["loss"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(nodes, "g", [vi("x", [3])], [vi("loss", [])], [init("w", np.ones(3))])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("custom.ops", 1)]
    )
    with pytest.raises(MissingGradientError) as info:
        onnxgrad.gradient_model(model, wrt=["w"])
    message = str(info.value)
    assert "custom.ops::Frob (opset 1) at node 'frob1'" in message
    assert "frob2" in message
    assert len(info.value.missing) == 2


def test_bad_loss_and_wrt_names_are_explained():
    model = fan_out_model()
    with pytest.raises(GradientError, match="loss 'nope' is not an output"):
        onnxgrad.gradient_model(model, loss="nope")
    with pytest.raises(GradientError, match="wrt name 'nope'"):
        onnxgrad.gradient_model(model, wrt=["nope"])
    two = make(
        [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Exp", ["x"], ["b"])],
        [vi("x", [2])],
        [vi("a", [2]), vi("b", [2])],
    )
    with pytest.raises(GradientError, match="name the one to differentiate"):
        onnxgrad.gradient_model(two, wrt=["x"])


def test_integer_wrt_is_refused():
    model = make(
        [
            helper.make_node("Cast", ["i"], ["f"], to=F64),
            helper.make_node("ReduceSum", ["f"], ["loss"], keepdims=0),
        ],
        [vi("i", [3], TensorProto.INT64)],
        [vi("loss", [])],
    )
    with pytest.raises(GradientError, match="only floating-point"):
        onnxgrad.gradient_model(model, wrt=["i"])


def test_gradient_with_respect_to_an_input_and_an_intermediate():
    model = fan_out_model()
    x = np.array([0.3, -0.2, 1.5])
    for report in check_gradients(model, {"x": x}, wrt=["x", "w"]):
        assert report.ok(1e-7, 1e-9), (report.name, report.abs_error)
    grad = onnxgrad.gradient_model(model, wrt=["xw"])
    (dxw,) = onnxgrad.Session(grad).run(["xw_grad"], {"x": x})
    np.testing.assert_array_equal(dxw, np.ones(3))
