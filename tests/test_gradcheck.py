"""The finite-difference checker itself: it passes right gradients and catches wrong ones."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxgrad.gradcheck import GradReport, check_gradients


def conv_model(seed: int = 0):
    """loss = Σ Conv(x, W) · Conv(x, W): large terms whose projections can nearly cancel."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)), "W")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["y", "y"], ["y2"]),
        helper.make_node("ReduceSum", ["y2"], ["loss"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 2, 6, 6])],
        [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_directions_pass_a_right_gradient_and_catch_a_wrong_one():
    x = np.random.default_rng(1).normal(size=(2, 2, 6, 6))
    reports = check_gradients(conv_model(), {"x": x}, wrt=["W", "x"], full_max=0, directions=4)
    assert [r.mode for r in reports] == ["directions", "directions"]
    for report in reports:
        assert report.ok(1e-6, 1e-8), (report.name, report.abs_error, report.rel_error)

        # One element of the gradient off by 1e-4 of the gradient's size shows in the
        # projection along any direction that touches it.
        wrong = report.grad.copy()
        wrong.flat[7] += 1e-4 * np.max(np.abs(report.grad))
        d = np.random.default_rng(5).standard_normal(wrong.shape)
        d.flat[7] = 1.0
        products = report.grad * d
        bad = GradReport(
            report.name,
            np.array([np.sum(wrong * d)]),
            np.array([np.sum(products)]),
            "directions",
            wrong,
            np.array([np.sqrt(np.sum(products * products))]),
        )
        assert not bad.ok(1e-6, 1e-8), report.name


def test_full_mode_compares_every_element():
    good = GradReport("w", np.array([1.0, -2.0, 1e-9]), np.array([1.0, -2.0, 1e-9]), "full")
    assert good.ok(1e-6, 1e-12)
    bad = GradReport("w", np.array([1.0, -2.0, 1e-3]), np.array([1.0, -2.0, 1e-9]), "full")
    assert not bad.ok(1e-6, 1e-12)
    assert bad.abs_error > 9e-4
