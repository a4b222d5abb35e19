"""BatchNormalization and Dropout modes: frozen/off by default, training mode on request."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxgrad import Trainer
from onnxgrad.errors import GradientError
from onnxgrad.importer import trainable_parameters
from onnxgrad.optim import SGD
from onnxgrad.train.modes import DROPOUT_ON, set_modes

C = 3
MOMENTUM = 0.8
EPS = 1e-5


def bn_model(training_mode: int = 0, opset: int = 18) -> onnx.ModelProto:
    """y = W·BatchNormalization(x) over [N, C, 2] inputs, reduced to [N, 2] outputs."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, C).astype(np.float32), "bn.weight"),
        numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "bn.running_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, C).astype(np.float32), "bn.running_var"),
        numpy_helper.from_array(rng.normal(size=(C * 2, 2)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.array([0, C * 2], np.int64), "shape"),
    ]
    bn = helper.make_node(
        "BatchNormalization",
        ["x", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
        ["h"],
        name="bn",
        epsilon=EPS,
        momentum=MOMENTUM,
    )
    if training_mode:
        bn.attribute.append(helper.make_attribute("training_mode", 1))
    nodes = [
        bn,
        helper.make_node("Reshape", ["h", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc.weight"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def data(n: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(1.0, 2.0, size=(n, C, 2)).astype(np.float32),
        rng.normal(size=(n, 2)).astype(np.float32),
    )


def values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def bn_forward(w: dict, x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    shape = (1, C, 1)
    h = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS)
    h = h * w["bn.weight"].reshape(shape) + w["bn.bias"].reshape(shape)
    return h.reshape(len(x), -1) @ w["fc.weight"]


# BatchNormalization.


def test_batchnorm_is_frozen_by_default():
    model = bn_model()
    x, y = data()
    trainer = Trainer(model, "mse", SGD(0.1))
    assert trainer.buffers == {} and not trainer.modes.changed
    assert trainer.trainable == ["bn.weight", "bn.bias", "fc.weight"]
    w = values(model)
    expected = np.mean((bn_forward(w, x, w["bn.running_mean"], w["bn.running_var"]) - y) ** 2)
    assert trainer.step(x, y) == pytest.approx(expected, rel=1e-5)


def test_exported_training_mode_is_put_in_inference_by_default():
    model = bn_model(training_mode=1)
    frozen, modes = set_modes(model)
    node = frozen.graph.node[0]
    assert [a.i for a in node.attribute if a.name == "training_mode"] == [0]
    assert not modes.changed
    x, _ = data()
    trainer = Trainer(model, "mse", SGD(0.1))
    w = values(model)
    prediction = bn_forward(w, x, w["bn.running_mean"], w["bn.running_var"])
    np.testing.assert_allclose(trainer.predict(x), prediction, rtol=1e-5, atol=1e-6)


def test_batchnorm_train_matches_torch_and_updates_running_statistics(tmp_path):
    model = bn_model()
    w = values(model)
    x, y = data()
    trainer = Trainer(model, "mse", SGD(0.1), batchnorm="train")
    assert trainer.modes.batchnorm_nodes == ["bn"]
    assert sorted(trainer.buffers) == ["bn.running_mean", "bn.running_var"]
    assert trainer.trainable == trainable_parameters(trainer.forward_model)

    # 1. Torch's BatchNorm1d in training mode: its momentum is 1 − ONNX's.
    bn = torch.nn.BatchNorm1d(C, eps=EPS, momentum=1 - MOMENTUM)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(w["bn.weight"]))
        bn.bias.copy_(torch.tensor(w["bn.bias"]))
        bn.running_mean.copy_(torch.tensor(w["bn.running_mean"]))
        bn.running_var.copy_(torch.tensor(w["bn.running_var"]))
    fc = torch.nn.Parameter(torch.tensor(w["fc.weight"]))
    optimizer = torch.optim.SGD([bn.weight, bn.bias, fc], lr=0.1)
    for k in range(2):
        xb, yb = x[k * 4 : k * 4 + 4], y[k * 4 : k * 4 + 4]
        loss = trainer.step(xb, yb)
        out = bn(torch.tensor(xb)).reshape(4, -1) @ fc
        theirs = torch.nn.functional.mse_loss(out, torch.tensor(yb))
        optimizer.zero_grad()
        theirs.backward()
        optimizer.step()
        assert loss == pytest.approx(float(theirs.detach()), rel=1e-5)
    params = trainer.parameters
    np.testing.assert_allclose(params["bn.weight"], bn.weight.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(params["bn.bias"], bn.bias.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(params["fc.weight"], fc.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        trainer.buffers["bn.running_mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-7
    )

    # 2. The running variance follows ONNX: the biased batch variance (torch: unbiased).
    mean, var = w["bn.running_mean"].astype(np.float64), w["bn.running_var"].astype(np.float64)
    for k in range(2):
        xb = x[k * 4 : k * 4 + 4].astype(np.float64)
        mean = MOMENTUM * mean + (1 - MOMENTUM) * xb.mean(axis=(0, 2))
        var = MOMENTUM * var + (1 - MOMENTUM) * xb.var(axis=(0, 2))
    np.testing.assert_allclose(trainer.buffers["bn.running_mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(trainer.buffers["bn.running_var"], var, rtol=1e-5)

    # 3. Evaluation and predict run in inference mode, with the updated statistics.
    now = {**values(model), **trainer.parameters}
    expected = bn_forward(
        now, x, trainer.buffers["bn.running_mean"], trainer.buffers["bn.running_var"]
    )
    np.testing.assert_allclose(trainer.predict(x), expected, rtol=1e-5, atol=1e-6)
    assert trainer.evaluate(x, y)["loss"] == pytest.approx(np.mean((expected - y) ** 2), rel=1e-5)

    # 4. save writes the running statistics back; the saved graph stays in inference mode.
    trainer.save(tmp_path / "tuned.onnx")
    saved = onnx.load(tmp_path / "tuned.onnx")
    stored = values(saved)
    np.testing.assert_array_equal(stored["bn.running_var"], trainer.buffers["bn.running_var"])
    np.testing.assert_array_equal(stored["bn.weight"], trainer.parameters["bn.weight"])
    assert list(saved.graph.node[0].output) == ["h"]

    # 5. Checkpoints carry the statistics.
    other = Trainer(model, "mse", SGD(0.1), batchnorm="train")
    other.load_state_dict(trainer.state_dict())
    np.testing.assert_array_equal(
        other.buffers["bn.running_var"], trainer.buffers["bn.running_var"]
    )
    with pytest.raises(GradientError, match="running statistics"):
        Trainer(
            model, "mse", SGD(0.1), trainable=["bn.weight", "bn.bias", "fc.weight"]
        ).load_state_dict(trainer.state_dict())


def test_batchnorm_train_on_onnxruntime_matches_numpy():
    x, y = data()
    ours = Trainer(bn_model(), "mse", SGD(0.1), batchnorm="train")
    theirs = Trainer(bn_model(), "mse", SGD(0.1), batchnorm="train", backend="onnxruntime")
    for k in range(2):
        assert ours.step(x[k * 4 : k * 4 + 4], y[k * 4 : k * 4 + 4]) == pytest.approx(
            theirs.step(x[k * 4 : k * 4 + 4], y[k * 4 : k * 4 + 4]), rel=1e-5
        )
    for name, value in {**ours.parameters, **ours.buffers}.items():
        np.testing.assert_allclose({**theirs.parameters, **theirs.buffers}[name], value, rtol=1e-5)


def test_batchnorm_train_at_opset_13():
    model = bn_model(opset=13)
    trained, modes = set_modes(model, batchnorm="train")
    assert len(trained.graph.node[0].output) == 3 and modes.changed
    x, y = data()
    trainer = Trainer(model, "mse", SGD(0.1), batchnorm="train")
    trainer.step(x, y)
    assert not np.array_equal(trainer.buffers["bn.running_mean"], values(model)["bn.running_mean"])


def test_unknown_batchnorm_mode():
    with pytest.raises(GradientError, match="unknown batchnorm mode 'eval'"):
        Trainer(bn_model(), "mse", batchnorm="eval")


# Dropout.


def dropout_model(ratio: float | None = 0.5, training_input: bool | None = None, opset: int = 18):
    """y = Dropout(x·W) with an optional ratio input and training_mode initializer."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "W")]
    inputs = ["h"]
    if opset >= 12:
        if ratio is not None or training_input is not None:
            inputs.append("" if ratio is None else "ratio")
        if ratio is not None:
            inits.append(numpy_helper.from_array(np.array(ratio, np.float32), "ratio"))
        if training_input is not None:
            inputs.append("training")
            inits.append(numpy_helper.from_array(np.array(training_input), "training"))
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        helper.make_node("Dropout", inputs, ["y"], name="drop"),
    ]
    graph = helper.make_graph(
        nodes,
        "drop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset >= 12 else 6
    return model


def test_dropout_is_off_by_default():
    x = np.random.default_rng(2).normal(size=(16, 4)).astype(np.float32)
    y = np.zeros((16, 6), np.float32)
    trainer = Trainer(dropout_model(), "mse", SGD(0.1))
    first, second = trainer.step(x, y), trainer.step(x, y)
    assert second < first  # deterministic descent on the same batch
    w = values(dropout_model())["W"]
    assert first == pytest.approx(np.mean((x @ w) ** 2), rel=1e-5)


def test_exported_training_dropout_is_switched_off_by_default():
    off, modes = set_modes(dropout_model(training_input=True))
    assert list(off.graph.node[1].input) == ["h", "ratio"] and not modes.changed
    # A training_mode fed by the user as a graph input is theirs to set.
    kept, _ = set_modes(dropout_model(training_input=False))
    assert list(kept.graph.node[1].input) == ["h", "ratio", "training"]


@pytest.mark.parametrize("ratio", [0.5, 0.25, None])
def test_dropout_on_uses_its_ratio_and_its_mask(ratio):
    model = dropout_model(ratio)
    trainer = Trainer(model, "mse", SGD(0.1), dropout=True)
    assert trainer.modes.dropout_nodes == ["drop"]
    node = next(n for n in trainer.training_graph.graph.node if n.name == "drop")
    assert node.input[2] == DROPOUT_ON and node.output[1]
    rate = 0.5 if ratio is None else ratio

    # The gradient multiplies by the node's own mask: dW = xᵀ·(dy · mask / (1 − ratio)).
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    target = np.zeros((64, 6), np.float32)
    w = values(model)["W"]
    _, grad, mask, y = trainer._session.run(
        ["loss", "W_grad", node.output[1], "y"], {"x": x, "target": target, "W": w}
    )
    assert 0.0 < 1.0 - mask.mean() < 2 * rate + 0.1  # about `rate` of the elements dropped
    np.testing.assert_allclose(y, (x @ w) * mask / (1 - rate), rtol=1e-5, atol=1e-6)
    dy = 2.0 * y / y.size
    np.testing.assert_allclose(grad, x.T @ (dy * mask / (1 - rate)), rtol=1e-4, atol=1e-6)

    # Evaluation and predict stay deterministic (inference mode).
    np.testing.assert_allclose(trainer.predict(x), x @ w, rtol=1e-5, atol=1e-6)
    assert trainer.evaluate(x, target)["loss"] == pytest.approx(np.mean((x @ w) ** 2), rel=1e-5)


def test_dropout_needs_opset_12():
    with pytest.raises(GradientError, match="convert the model to opset 12"):
        set_modes(dropout_model(opset=11), dropout=True)
