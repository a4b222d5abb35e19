"""Losses appended as ONNX nodes: values and gradients against torch.nn.functional (float64)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from onnxgrad import Session, gradient_model
from onnxgrad.errors import GradientError
from onnxgrad.train.losses import append_loss


def _identity_model(shape, dtype=TensorProto.DOUBLE, opset=18) -> onnx.ModelProto:
    """scores = Identity(logits), so that d loss / d logits is the gradient of the loss."""
    x = helper.make_tensor_value_info("logits", dtype, shape)
    y = helper.make_tensor_value_info("scores", dtype, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["logits"], ["scores"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _loss_and_grad(kind, logits, target):
    model = _identity_model(["N", *logits.shape[1:]])
    with_loss, loss = append_loss(model, kind)
    grad = gradient_model(with_loss, wrt=["logits"], loss=loss)
    value, dx = Session(grad).run([loss, "logits_grad"], {"logits": logits, "target": target})
    return float(value), dx


def _torch(fn, logits, target):
    x = torch.tensor(logits, requires_grad=True)
    value = fn(x, torch.tensor(target))
    value.backward()
    return float(value.detach()), x.grad.numpy()


def _check(kind, fn, logits, target):
    value, dx = _loss_and_grad(kind, logits, target)
    want, want_dx = _torch(fn, logits, target)
    assert value == pytest.approx(want, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-14)


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(5, 3), (4,), (2, 3, 4)])
def test_mse(shape):
    _check("mse", F.mse_loss, RNG.normal(size=shape), RNG.normal(size=shape))


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4)])
def test_l1(shape):
    logits = RNG.normal(size=shape)
    target = logits + np.where(RNG.random(shape) < 0.5, -1.0, 1.0) * RNG.uniform(0.1, 1.0, shape)
    _check("l1", F.l1_loss, logits, target)


@pytest.mark.parametrize("shape", [(6, 3), (7,)])
def test_bce_with_logits(shape):
    logits = RNG.normal(scale=3.0, size=shape)
    logits.flat[0] = 0.0  # the kink of |x|: the gradient must still be σ(0) − t
    logits.flat[1] = 80.0  # exp(80) would overflow a naive log(1 + exp(x)) in float32
    logits.flat[2] = -80.0
    target = RNG.random(shape)
    _check("bce_with_logits", F.binary_cross_entropy_with_logits, logits, target)


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 2), (2, 3, 2, 2)])
def test_cross_entropy(shape):
    logits = RNG.normal(scale=2.0, size=shape)
    target = RNG.integers(0, shape[1], size=(shape[0], *shape[2:]))
    _check("cross_entropy", F.cross_entropy, logits, target)


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 2)])
def test_nll(shape):
    log_prob = np.log(RNG.dirichlet(np.ones(shape[1]), size=(shape[0], *shape[2:])))
    log_prob = np.moveaxis(log_prob, -1, 1)
    target = RNG.integers(0, shape[1], size=(shape[0], *shape[2:]))
    _check("nll", F.nll_loss, log_prob, target)


@pytest.mark.parametrize("kind", ["mse", "l1", "bce_with_logits"])
def test_float32_in_onnxruntime(kind):
    """The loss graph is valid ONNX: onnxruntime computes the same value as the executor."""
    model, loss = append_loss(_identity_model(["N", 3], TensorProto.FLOAT), kind)
    feeds = {
        "logits": RNG.normal(size=(4, 3)).astype(np.float32),
        "target": RNG.random((4, 3)).astype(np.float32),
    }
    ours = Session(model).run([loss], feeds)[0]
    theirs = onnxruntime.InferenceSession(model.SerializeToString()).run([loss], feeds)[0]
    assert ours.dtype == np.float32 and ours.shape == ()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def _target(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    return next(i for i in model.graph.input if i.name == "target")


def _dims(vi):
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in vi.type.tensor_type.shape.dim
    ]


def test_target_inputs():
    model, loss = append_loss(_identity_model(["N", 10]), "cross_entropy")
    target = _target(model)
    assert target.type.tensor_type.elem_type == TensorProto.INT64
    assert _dims(target) == ["N"]
    assert [o.name for o in model.graph.output] == ["scores", loss]
    assert _dims(model.graph.output[-1]) == []

    model, _ = append_loss(_identity_model([8, 10, 3]), "nll")
    assert _dims(_target(model)) == ["batch", 3]  # the batch dimension becomes symbolic

    model, _ = append_loss(_identity_model([8, 2], TensorProto.FLOAT), "mse")
    target = _target(model)
    assert target.type.tensor_type.elem_type == TensorProto.FLOAT
    assert _dims(target) == ["batch", 2]
    onnx.checker.check_model(model, full_check=True)


def test_leaves_the_argument_alone():
    model = _identity_model(["N", 3])
    before = model.SerializeToString()
    append_loss(model, "mse")
    assert model.SerializeToString() == before


def test_several_outputs_need_a_name():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")]
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], outs), opset_imports=[helper.make_opsetid("", 18)]
    )
    with pytest.raises(GradientError, match="2 outputs.*output="):
        append_loss(model, "mse")
    with pytest.raises(GradientError, match="'c' is not an output"):
        append_loss(model, "mse", output="c")
    with_loss, loss = append_loss(model, "mse", output="b")
    node = next(n for n in with_loss.graph.node if "b" in n.input)
    assert node.op_type == "Sub"


def test_errors():
    with pytest.raises(GradientError, match="unknown loss 'hinge'.*cross_entropy"):
        append_loss(_identity_model(["N", 3]), "hinge")
    with pytest.raises(GradientError, match="named 'logits'"):
        append_loss(_identity_model(["N", 3]), "mse", target="logits")
    with pytest.raises(GradientError, match=r"\[N, C\]"):
        append_loss(_identity_model(["N"]), "cross_entropy")
    with pytest.raises(GradientError, match="floating-point"):
        append_loss(_identity_model(["N", 3], TensorProto.INT64), "mse")


def test_old_opset_model_is_converted_first():
    model, loss = append_loss(_identity_model(["N", 4], opset=11), "cross_entropy")
    assert any(n.op_type == "SoftmaxCrossEntropyLoss" for n in model.graph.node)
    assert loss in [o.name for o in model.graph.output]
