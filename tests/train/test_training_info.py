"""TrainingInfoProto: the step embedded in the model, checked, loaded and trained."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxgrad import Session, Trainer
from onnxgrad.cli import main
from onnxgrad.errors import GradientError, ModelLoadError
from onnxgrad.optim import SGD, Adam, AdamW
from onnxgrad.train.step import STEP, build_step_model
from onnxgrad.train.training_info import (
    TrainingSession,
    check_training_info,
    embed_training_info,
    training_info_model,
)
from tests.train.test_step import DIGITS, batch, mlp, ort_session


def test_layout_and_checkers():
    model = training_info_model(mlp(), "cross_entropy", Adam(0.01), clip_norm=1.0)
    onnx.checker.check_model(model, full_check=True)
    check_training_info(model)
    assert len(model.training_info) == 1
    info = model.training_info[0]

    # The inference graph is the forward model, parameters as plain initializers.
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {"W1", "b1", "W2", "b2"} <= {t.name for t in model.graph.initializer}
    assert len(model.graph.node) == 5
    assert all(n.domain in ("", "ai.onnx") for n in info.algorithm.node)

    # The algorithm: target in, optimizer state and the step count as its initializers.
    assert [i.name for i in info.algorithm.input] == ["target"]
    assert {t.name for t in info.algorithm.initializer} == {
        *(f"{p}.{s}" for p in ["W1", "b1", "W2", "b2"] for s in "mv"),
        "step",
        "lr",
    }
    bindings = {e.key: e.value for e in info.update_binding}
    assert bindings["W1"] == "W1.updated" and bindings["W1.v"] == "W1.v.updated"
    assert bindings[STEP] == "step.updated" and "lr" not in bindings
    assert {e.key for e in info.initialization_binding} == {
        *(f"{p}.{s}" for p in ["W1", "b1", "W2", "b2"] for s in "mv"),
        "step",
    }
    assert not info.initialization.input


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
@pytest.mark.parametrize(
    "optimizer", [lambda: SGD(0.05, momentum=0.9, nesterov=True), lambda: AdamW(0.01)]
)
def test_training_session_matches_trainer(backend, optimizer):
    feeds, target = batch("cross_entropy")
    session = TrainingSession(
        training_info_model(mlp(), "cross_entropy", optimizer()), backend=backend
    )
    trainer = Trainer(mlp(), "cross_entropy", optimizer())
    for _ in range(5):
        loss = session.step({**feeds, "target": target})[session.loss_name]
        np.testing.assert_allclose(float(loss), trainer.step(feeds, target), rtol=1e-5)
    for name, value in trainer.parameters.items():
        np.testing.assert_allclose(session.variables[name], value, rtol=1e-5, atol=1e-6)
    assert int(session.variables[STEP]) == 5


def test_digits_cnn_trains_and_the_trained_model_runs_in_onnxruntime(tmp_path):
    feeds, target = batch("cross_entropy", "cnn", n=32)
    session = TrainingSession(training_info_model(str(DIGITS), "cross_entropy", Adam(0.01)))
    losses = [float(session.step({**feeds, "target": target})["loss"]) for _ in range(5)]
    assert losses[-1] < losses[0]

    # The saved model: inference in stock onnxruntime uses the trained weights.
    path = tmp_path / "trained.onnx"
    session.save(path)
    saved = onnx.load(path)
    onnx.checker.check_model(saved, full_check=True)
    ours = Session(saved).run(["logits"], feeds)[0]
    theirs = ort_session(saved).run(["logits"], feeds)[0]
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    weight = {t.name: t for t in saved.graph.initializer}["fc.weight"]
    np.testing.assert_array_equal(numpy_helper.to_array(weight), session.variables["fc.weight"])


def test_resume_and_initialize(tmp_path):
    feeds, target = batch("mse")
    feeds = {**feeds, "target": target}
    model = training_info_model(mlp(), "mse", Adam(0.01))
    straight = TrainingSession(model)
    for _ in range(4):
        straight.step(feeds)

    first = TrainingSession(model)
    for _ in range(2):
        first.step(feeds)
    first.save(tmp_path / "half.onnx")
    resumed = TrainingSession(tmp_path / "half.onnx", initialize=False)
    assert int(resumed.variables[STEP]) == 2
    for _ in range(2):
        resumed.step(feeds)
    for name, value in straight.variables.items():
        np.testing.assert_array_equal(resumed.variables[name], value)

    # The initialization graph resets the optimizer, not the weights.
    resumed.initialize()
    assert int(resumed.variables[STEP]) == 0 and not resumed.variables["W1.m"].any()
    np.testing.assert_array_equal(resumed.variables["W1"], straight.variables["W1"])


def test_check_training_info_rejects_bad_bindings():
    model = training_info_model(mlp(), "mse", SGD(0.1))
    with pytest.raises(ModelLoadError, match="no training_info"):
        check_training_info(mlp())

    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.training_info[0].update_binding.add(key="nope", value="W1.updated")
    with pytest.raises(ModelLoadError, match="key 'nope' is not an initializer"):
        check_training_info(bad)

    bad.CopyFrom(model)
    bad.training_info[0].update_binding[0].value = "nothing"
    with pytest.raises(ModelLoadError, match="value 'nothing' is not an output"):
        check_training_info(bad)

    bad.CopyFrom(model)
    bad.training_info[0].algorithm.node[-1].input[0] = "undefined_tensor"
    with pytest.raises(ModelLoadError, match="fails the ONNX checker"):
        TrainingSession(bad)


def test_embedding_needs_defaults_and_ir7():
    with pytest.raises(GradientError, match="defaults=False"):
        embed_training_info(build_step_model(mlp(), "mse", SGD(0.1), defaults=False))
    with pytest.raises(GradientError, match="IR version 7"):
        training_info_model(mlp(), "mse", SGD(0.1), opset=11)
    older = training_info_model(mlp(), "mse", Adam(), opset=13)
    check_training_info(older)
    assert older.opset_import[0].version == 13


def test_cli_training_info(tmp_path, capsys):
    out = tmp_path / "with_training.onnx"
    args = ["grad", str(DIGITS), "--loss", "cross_entropy", "--optimizer", "adamw"]
    assert main([*args, "--lr", "0.01", "--training-info", "-o", str(out)]) == 0
    assert "update bindings: 25" in capsys.readouterr().out  # 8 parameters, m, v, step
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    check_training_info(model)
    feeds, target = batch("cross_entropy", "cnn")
    session = TrainingSession(out)
    trainer = Trainer(str(DIGITS), "cross_entropy", AdamW(0.01))
    for _ in range(3):
        loss = session.step({**feeds, "target": target})["loss"]
        np.testing.assert_allclose(float(loss), trainer.step(feeds, target), rtol=1e-5)
