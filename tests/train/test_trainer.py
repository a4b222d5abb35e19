"""The Trainer: fitting, frozen parameters, non-finite detection, save round trip."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad import NonFiniteLossError, Trainer
from onnxgrad.errors import GradientError
from onnxgrad.optim import SGD, Adam
from onnxgrad.train.data import DataError


def mlp(n_in: int = 64, hidden: int = 32, n_out: int = 10, seed: int = 0) -> onnx.ModelProto:
    """logits = relu(x·W1 + b1)·W2 + b2, float32, with a symbolic batch dimension."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(
            rng.normal(scale=n_in**-0.5, size=(n_in, hidden)).astype(np.float32), "W1"
        ),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        numpy_helper.from_array(
            rng.normal(scale=hidden**-0.5, size=(hidden, n_out)).astype(np.float32), "W2"
        ),
        numpy_helper.from_array(np.full(n_out, 0.01, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["logits"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def forward(params: dict, x: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ params["W1"] + params["b1"], 0.0)
    return h @ params["W2"] + params["b2"]


def regression_data(n: int = 256, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = np.stack([np.sin(x[:, 0]) + x[:, 1], x[:, 2] * x[:, 3]], axis=1).astype(np.float32)
    return x, y


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target


def initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def test_fits_digits():
    x, y = digits()
    trainer = Trainer(mlp(), "cross_entropy", Adam(0.01))
    history = trainer.fit(x, y, epochs=8, batch_size=32, val_split=0.2, progress=False)
    assert history[-1]["val_accuracy"] > 0.9
    assert history[-1]["loss"] < history[0]["loss"]
    assert set(history[0]) == {
        "epoch",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "lr",
        "steps",
        "seconds",
    }
    metrics = trainer.evaluate(x, y)
    assert set(metrics) == {"loss", "accuracy"} and metrics["accuracy"] > 0.9
    predicted = trainer.predict(x[:50], batch_size=16)
    np.testing.assert_allclose(predicted, forward(trainer.parameters, x[:50]), rtol=1e-4, atol=1e-5)


def test_validation_data_and_callback():
    x, y = digits()
    trainer = Trainer(mlp(), "cross_entropy", Adam(0.01))
    seen = []
    history = trainer.fit(
        x[:1000],
        y[:1000],
        epochs=3,
        progress=False,
        validation_data=(x[1000:], y[1000:]),
        callback=seen.append,
    )
    assert seen == history and [r["epoch"] for r in seen] == [1, 2, 3]
    held = trainer.evaluate(x[1000:], y[1000:], batch_size=1000)
    assert history[-1]["val_loss"] == pytest.approx(held["loss"], rel=1e-6)
    assert history[-1]["val_accuracy"] == pytest.approx(held["accuracy"])
    with pytest.raises(DataError, match="not both"):
        trainer.fit(x, y, val_split=0.1, validation_data=(x, y))


def test_fits_a_regression():
    x, y = regression_data()
    trainer = Trainer(mlp(8, 16, 2), "mse", Adam(0.01))
    before = trainer.evaluate(x, y)["loss"]
    history = trainer.fit(x, y, epochs=15, batch_size=32, val_split=0.25, progress=False)
    after = trainer.evaluate(x, y)
    assert set(after) == {"loss"}
    assert after["loss"] < 0.3 * before
    assert history[-1]["val_loss"] is not None and history[-1]["val_accuracy"] is None
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert trainer.steps == 15 * 6  # 192 training samples in batches of 32
    np.testing.assert_allclose(
        trainer.predict(x), forward(trainer.parameters, x), rtol=1e-4, atol=1e-5
    )


def test_step_matches_a_hand_written_sgd_step():
    x, y = regression_data(16)
    model = mlp(8, 4, 2)
    trainer = Trainer(model, "mse", SGD(0.1))
    params = {k: v.copy() for k, v in trainer.parameters.items()}
    loss = trainer.step(x, y)
    assert loss == pytest.approx(float(np.mean((forward(params, x) - y) ** 2)), rel=1e-5)
    grads = onnxgrad.Session(trainer.training_graph).run(
        [f"{n}_grad" for n in trainer.trainable], {"x": x, "target": y, **params}
    )
    for name, grad in zip(trainer.trainable, grads):
        np.testing.assert_allclose(trainer.parameters[name], params[name] - 0.1 * grad, rtol=1e-6)


@pytest.mark.parametrize("trainable", [["W2", "b2"], lambda name: name.startswith("b")])
def test_frozen_parameters_do_not_change(trainable, tmp_path):
    x, y = regression_data(64)
    model = mlp(8, 4, 2)
    trainer = Trainer(model, "mse", Adam(0.05), trainable=trainable)
    expected = ["W2", "b2"] if isinstance(trainable, list) else ["b1", "b2"]
    assert trainer.trainable == expected
    assert sorted(trainer.parameters) == sorted(expected)
    grad_outputs = [o.name for o in trainer.training_graph.graph.output if o.name.endswith("_grad")]
    assert grad_outputs == [f"{n}_grad" for n in expected]
    trainer.fit(x, y, epochs=2, batch_size=16, progress=False)

    trainer.save(tmp_path / "m.onnx")
    before = initializers(model)
    after = initializers(onnx.load(tmp_path / "m.onnx"))
    for name in before:
        if name in expected:
            assert after[name] != before[name], name
        else:
            assert after[name] == before[name], name  # byte for byte


def log_model(with_constant: bool = False) -> onnx.ModelProto:
    """loss = mean(log(x·w)) (+ sum(log(c)) when with_constant): a scalar output."""
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["xw"]),
        helper.make_node("Log", ["xw"], ["log"]),
        helper.make_node("ReduceMean", ["log"], ["main" if with_constant else "loss"], keepdims=0),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])]
    if with_constant:
        nodes += [
            helper.make_node("Log", ["c"], ["log_c"]),
            helper.make_node("ReduceSum", ["log_c"], ["sum_c"], keepdims=0),
            helper.make_node("Add", ["main", "sum_c"], ["loss"]),
        ]
        inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [2]))
    graph = helper.make_graph(
        nodes,
        "log",
        inputs,
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.ones(3, np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_non_finite_gradient_is_caught_before_the_update():
    trainer = Trainer(log_model(), loss="loss", optimizer=SGD(0.1))
    assert trainer.target_name is None and trainer.output is None
    good = np.full((2, 3), 2.0, np.float32)
    trainer.step(good)
    w = trainer.parameters["w"].copy()
    bad = good.copy()
    bad[1, 2] = 0.0  # log 0 = −inf, and its gradient 1/0 = inf
    with pytest.raises(NonFiniteLossError, match=r"step 2: the loss is -inf.*parameter 'w'"):
        trainer.step(bad)
    np.testing.assert_array_equal(trainer.parameters["w"], w)
    assert trainer.steps == 1
    trainer.step(good)  # training goes on after the error
    assert trainer.steps == 2


def test_non_finite_loss_with_finite_gradients():
    trainer = Trainer(log_model(), loss="loss", optimizer=SGD(0.1))
    x = np.full((2, 3), 2.0, np.float32)
    x[0, 0] = -1.0  # log of a negative is NaN, but its gradient 1/x is finite
    with pytest.raises(NonFiniteLossError, match=r"step 1: the loss itself is nan"):
        trainer.step(x)
    np.testing.assert_array_equal(trainer.parameters["w"], np.ones(3, np.float32))

    trainer = Trainer(log_model(with_constant=True), loss="loss", optimizer=SGD(0.1))
    feeds = {"x": np.full((2, 3), 2.0, np.float32), "c": np.array([1.0, 0.0], np.float32)}
    with pytest.raises(NonFiniteLossError, match=r"step 1: the loss itself is -inf"):
        trainer.step(feeds)


def test_named_loss_takes_targets_as_inputs():
    trainer = Trainer(log_model(with_constant=True), loss="loss", optimizer=SGD(0.1))
    x = np.full((2, 3), 2.0, np.float32)
    c = np.ones(2, np.float32)
    loss = trainer.step(x, {"c": c})  # targets that are ordinary inputs, as a dict
    assert loss == pytest.approx(np.log(2.0), rel=1e-6)
    assert trainer.step({"x": x, "c": c}) < loss
    assert trainer.evaluate({"x": x, "c": c}).keys() == {"loss"}
    with pytest.raises(DataError, match="ordinary inputs"):
        trainer.step({"x": x, "c": c}, np.zeros(2))
    with pytest.raises(GradientError, match="output="):
        trainer.predict({"x": x, "c": c})


def test_targets_are_conformed():
    x, y = regression_data(32)
    one = mlp(8, 4, 1)
    trainer = Trainer(one, "mse", SGD(0.01))
    # [N] float64 targets for an [N, 1] float32 output.
    loss = trainer.step(x.astype(np.float64), y[:, 0].astype(np.float64))
    assert np.isfinite(loss)
    with pytest.raises(DataError, match="needs targets"):
        trainer.step(x)
    with pytest.raises(DataError, match="disagree"):
        trainer.step(x, y[:10, :1])


def test_class_targets_are_conformed():
    x, y = digits()
    trainer = Trainer(mlp(), "cross_entropy", SGD(0.01))
    assert np.isfinite(trainer.step(x[:8], y[:8].astype(np.int32)))  # int32 labels
    assert np.isfinite(trainer.step(x[:8], y[:8, None].astype(np.float64)))  # [N, 1] floats
    with pytest.raises(DataError, match="int64"):
        trainer.step(x[:8], y[:8] + 0.5)


def test_save_round_trip(tmp_path):
    x, y = regression_data(64)
    model = mlp(8, 6, 2)
    model.doc_string = "a small MLP"
    onnx.helper.set_model_props(model, {"author": "tests"})
    source = tmp_path / "original.onnx"
    onnx.save(model, source)
    trainer = Trainer(str(source), "mse", Adam(0.02))
    trainer.fit(x, y, epochs=3, batch_size=16, progress=False)
    out = tmp_path / "trained" / "model.onnx"
    trainer.save(out)

    saved = onnx.load(out)
    # Only initializer values differ.
    values = initializers(saved)
    for name, value in trainer.parameters.items():
        assert values[name] == value.tobytes()
    assert _blanked(saved) == _blanked(onnx.load(source))

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    theirs = session.run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(theirs, trainer.predict(x), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temporary files


def _blanked(model: onnx.ModelProto) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        for field in ("float_data", "raw_data", "double_data", "int32_data", "int64_data"):
            t.ClearField(field)
    return copy.SerializeToString()


def test_onnxruntime_backend_gives_the_same_steps():
    x, y = regression_data(64)
    ours = Trainer(mlp(8, 4, 2), "mse", SGD(0.05))
    theirs = Trainer(mlp(8, 4, 2), "mse", SGD(0.05), backend="onnxruntime")
    for start in range(0, 64, 16):
        a = ours.step(x[start : start + 16], y[start : start + 16])
        b = theirs.step(x[start : start + 16], y[start : start + 16])
        assert a == pytest.approx(b, rel=1e-5)
    for name in ours.parameters:
        np.testing.assert_allclose(
            ours.parameters[name], theirs.parameters[name], rtol=1e-4, atol=1e-6
        )
    np.testing.assert_allclose(ours.predict(x), theirs.predict(x), rtol=1e-4, atol=1e-5)


def test_progress_bar_and_logging(capsys, caplog):
    x, y = regression_data(64)
    trainer = Trainer(mlp(8, 4, 2), "mse")
    with caplog.at_level(logging.INFO, logger="onnxgrad.train.trainer"):
        trainer.fit(x, y, epochs=2, batch_size=16, progress=True)
    assert "epoch 1/2" in capsys.readouterr().err
    assert any("epoch 2/2: loss" in r.getMessage() for r in caplog.records)


def test_checkpoint_resumes_exactly():
    x, y = regression_data(64)
    first = Trainer(mlp(8, 4, 2), "mse", Adam(0.01))
    first.fit(x, y, epochs=1, batch_size=16, progress=False)
    checkpoint = first.state_dict()
    second = Trainer(mlp(8, 4, 2), "mse", Adam(0.5))
    second.load_state_dict(checkpoint)
    assert second.steps == first.steps == 4
    for start in (0, 16):
        assert first.step(x[start : start + 16], y[start : start + 16]) == second.step(
            x[start : start + 16], y[start : start + 16]
        )
    for name in first.parameters:
        np.testing.assert_array_equal(first.parameters[name], second.parameters[name])
    with pytest.raises(GradientError, match="checkpoint holds parameters"):
        Trainer(mlp(8, 4, 2), "mse", trainable=["W1"]).load_state_dict(checkpoint)


def test_defaults_and_parameters():
    trainer = Trainer(mlp(8, 4, 2), "mse")
    assert isinstance(trainer.optimizer, Adam) and trainer.optimizer.lr == 1e-3
    assert trainer.trainable == ["W1", "b1", "W2", "b2"]
    params = trainer.parameters
    with pytest.raises(ValueError):
        params["W1"][0, 0] = 5.0  # read-only views of the trainer's arrays
    assert params["W1"].dtype == np.float32
    assert "Trainer(loss='mse'" in repr(trainer)


def test_errors():
    with pytest.raises(GradientError, match="unknown loss 'hinge'.*logits"):
        Trainer(mlp(8, 4, 2), "hinge")
    with pytest.raises(GradientError, match="'W9'.*W1, b1, W2, b2"):
        Trainer(mlp(8, 4, 2), "mse", trainable=["W9"])
    with pytest.raises(GradientError, match="no parameter is selected"):
        Trainer(mlp(8, 4, 2), "mse", trainable=lambda name: False)
    with pytest.raises(GradientError, match="not a scalar"):
        Trainer(mlp(8, 4, 2), "logits")


def test_export_training_model(tmp_path):
    x, y = regression_data(16)
    trainer = Trainer(mlp(8, 4, 2), "mse", SGD(0.1))
    trainer.step(x, y)
    path = tmp_path / "train.onnx"
    onnxgrad.export_training_model(trainer, path)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ["loss", *[f"{n}_grad" for n in trainer.trainable]]
    theirs = session.run(names, {"x": x, "target": y})
    ours = onnxgrad.Session(trainer.training_graph).run(
        names, {"x": x, "target": y, **trainer.parameters}
    )
    for a, b in zip(theirs, ours):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_inputs_with_a_fixed_first_dimension_are_not_batched():
    # A recurrent state laid out [directions, batch, hidden] beside a batch-first input.
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["h", "axis0"], ["hs"], keepdims=0),
            helper.make_node("Add", ["x", "hs"], ["xh"]),
            helper.make_node("Mul", ["xh", "w"], ["y"]),
        ],
        "state",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, "N", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(np.ones(3, np.float32), "w"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    trainer = Trainer(model, loss="mse", optimizer=SGD(0.1))
    feeds = {"x": np.ones((4, 3), np.float32), "h": np.zeros((2, 4, 3), np.float32)}
    losses = [trainer.step(feeds, np.zeros((4, 3), np.float32)) for _ in range(3)]
    assert losses[-1] < losses[0]
    with pytest.raises(DataError, match="disagree on the number of samples"):
        trainer.step(feeds, np.zeros((5, 3), np.float32))
