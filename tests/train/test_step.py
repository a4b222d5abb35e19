"""The training step as one ONNX model: N steps in stock onnxruntime match N Trainer steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrad import Session, Trainer, gradient_model
from onnxgrad.check import upcast
from onnxgrad.cli import main
from onnxgrad.errors import GradientError, UnsupportedOpError
from onnxgrad.optim import SGD, Adam, AdamW, clip_grad_norm
from onnxgrad.train.losses import append_loss
from onnxgrad.train.step import (
    LR,
    STEP,
    StepLayout,
    build_step_model,
    convert_opset,
    initial_state,
)

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
STEPS = 5

OPTIMIZERS = {
    "sgd": lambda: SGD(0.1),
    "sgd-momentum": lambda: SGD(0.05, momentum=0.9),
    "sgd-nesterov-decay": lambda: SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam-l2": lambda: Adam(0.01, weight_decay=0.05),
    "adamw": lambda: AdamW(0.01, weight_decay=0.1),
}
LOSSES = ("cross_entropy", "mse", "bce_with_logits")
ALL_LOSSES = (*LOSSES, "nll", "l1")  # nll reads the logits as log-probabilities


def mlp(n_in: int = 12, hidden: int = 16, n_out: int = 4, seed: int = 0) -> onnx.ModelProto:
    """logits = tanh(x·W1 + b1)·W2 + b2, float32, with a symbolic batch dimension."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.normal(size=(n_in, hidden)).astype(np.float32) / 3, "W1"),
        numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32) / 10, "b1"),
        numpy_helper.from_array(rng.normal(size=(hidden, n_out)).astype(np.float32) / 4, "W2"),
        numpy_helper.from_array(np.full(n_out, 0.01, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Tanh", ["h1"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "W2"], ["o"], name="fc2"),
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


def batch(loss: str, kind: str = "mlp", n: int = 16, seed: int = 3):
    """(feeds without the target, target) for a model kind and a loss."""
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        feeds, classes = {"x": rng.normal(size=(n, 12)).astype(np.float32)}, 4
    else:
        data = np.load(ROOT / "models" / "digits_train.npz")
        feeds, classes = {"input": data["input"][:n]}, 10
    labels = rng.integers(0, classes, n)
    if loss in ("cross_entropy", "nll"):
        return feeds, labels.astype(np.int64)
    if loss in ("mse", "l1"):
        return feeds, rng.normal(size=(n, classes)).astype(np.float32)
    return feeds, np.eye(classes, dtype=np.float32)[labels]


def ort_session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the overridable initializers are intended
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_steps(step_model, feeds, target, steps=STEPS, run=None):
    """Losses and final state of `steps` runs, feeding each run's `.updated` outputs back."""
    session = ort_session(step_model)
    names = [o.name for o in session.get_outputs()]
    state = initial_state(step_model)
    layout = StepLayout.of(step_model)
    losses = []
    for _ in range(steps):
        target_feed = {} if layout.target is None else {layout.target: target}
        values = dict(zip(names, session.run(None, {**feeds, **target_feed, **state})))
        losses.append(float(values[layout.loss]))
        for name in layout.variables:
            state[name] = values[f"{name}.updated"]
    return losses, state


def parameter_atol(optimizer) -> float:
    """How far one float32 parameter may drift between two runtimes over STEPS steps.

    SGD's step is the gradient times lr, so rounding stays at float32 noise. Adam and AdamW
    divide each element by its own sqrt(v): where a gradient element is itself near rounding
    (a sum that almost cancels), two runtimes that sum in different orders give it steps that
    differ by a visible fraction of lr. One percent of one step bounds that, far below any
    mistake in the update formula, which moves every element by about lr.
    """
    if isinstance(optimizer, Adam):
        return max(1e-6, 1e-2 * optimizer.lr)
    return 1e-6


def assert_matches_trainer(source, loss, optimizer, feeds, target, **trainer_kw):
    step_model = build_step_model(source, loss, optimizer())
    losses, state = run_steps(step_model, feeds, target)
    trainer = Trainer(source, loss, optimizer(), **trainer_kw)
    expected = [trainer.step(feeds, target) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    atol = parameter_atol(optimizer())
    for name, value in trainer.parameters.items():
        np.testing.assert_allclose(state[name], value, rtol=1e-5, atol=atol, err_msg=name)
    assert int(state[STEP]) == STEPS


@pytest.mark.parametrize("loss", ALL_LOSSES)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_mlp_steps_match_trainer(loss, opt):
    feeds, target = batch(loss)
    assert_matches_trainer(mlp(), loss, OPTIMIZERS[opt], feeds, target)


@pytest.mark.parametrize("loss", ALL_LOSSES)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_float64_steps_match_trainer_to_rounding(loss, opt):
    """In float64 the step model in onnxruntime and the Trainer agree to the last bits: the
    float32 tolerances above cover rounding, not a difference in the update formulas."""
    model = upcast(mlp())
    feeds, target = batch(loss)
    feeds = {k: v.astype(np.float64) for k, v in feeds.items()}
    if target.dtype == np.float32:
        target = target.astype(np.float64)
    losses, state = run_steps(build_step_model(model, loss, OPTIMIZERS[opt]()), feeds, target)
    trainer = Trainer(model, loss, OPTIMIZERS[opt]())
    expected = [trainer.step(feeds, target) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, expected, rtol=1e-12)
    for name, value in trainer.parameters.items():
        assert value.dtype == np.float64
        np.testing.assert_allclose(state[name], value, rtol=1e-12, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("opt", ["sgd-nesterov-decay", "adam-l2", "adamw"])
def test_digits_cnn_steps_match_trainer(loss, opt):
    feeds, target = batch(loss, "cnn")
    assert_matches_trainer(str(DIGITS), loss, OPTIMIZERS[opt], feeds, target)


@pytest.mark.parametrize("opt", ["sgd-momentum", "adamw"])
def test_clip_norm_matches_clip_grad_norm(opt):
    # A reference loop: onnxgrad's gradients, clip_grad_norm, then the optimizer.
    feeds, target = batch("mse")
    model, loss_name = append_loss(mlp(), "mse")
    params = ["W1", "b1", "W2", "b2"]
    session = Session(gradient_model(model, wrt=params, loss=loss_name))
    values = {t.name: numpy_helper.to_array(t).copy() for t in mlp().graph.initializer}
    optimizer = OPTIMIZERS[opt]()
    expected, clipped = [], 0
    for _ in range(STEPS):
        out = session.run(
            [loss_name, *[f"{p}_grad" for p in params]], {**feeds, "target": target, **values}
        )
        grads, norm = clip_grad_norm(dict(zip(params, out[1:])), 0.5)
        clipped += norm > 0.5
        optimizer.step(values, grads)
        expected.append(float(out[0]))
    assert clipped >= 2  # the limit is met on some steps, not only as a no-op

    losses, state = run_steps(
        build_step_model(mlp(), "mse", OPTIMIZERS[opt](), clip_norm=0.5), feeds, target
    )
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(state[name], values[name], rtol=1e-5, atol=1e-6)


def test_names_order_and_defaults():
    step = build_step_model(mlp(), "cross_entropy", Adam(0.01))
    params = ["W1", "b1", "W2", "b2"]
    states = [f"{p}.{s}" for p in params for s in ("m", "v")]
    assert [i.name for i in step.graph.input] == ["x", "target", *params, *states, STEP, LR]
    assert [o.name for o in step.graph.output] == [
        "loss",
        *[f"{p}.updated" for p in params],
        *[f"{s}.updated" for s in states],
        "step.updated",
    ]
    assert all(n.domain in ("", "ai.onnx") for n in step.graph.node)
    onnx.checker.check_model(step, full_check=True)
    state = initial_state(step)
    assert float(state[LR]) == 0.01 and int(state[STEP]) == 0
    assert not state["W1.m"].any()
    layout = StepLayout.of(step)
    assert layout.parameters == params and layout.target == "target" and layout.inputs == ["x"]

    # SGD without momentum keeps no state.
    sgd = build_step_model(mlp(), "mse", SGD(0.1))
    assert StepLayout.of(sgd).state_names == []


def test_feeding_lr_schedules_it():
    feeds, target = batch("mse")
    step = build_step_model(mlp(), "mse", SGD(0.1, momentum=0.9))
    session = ort_session(step)
    state = initial_state(step)
    outs = session.run(["W1.updated"], {**feeds, "target": target, **state, LR: np.array(0.0)})
    np.testing.assert_array_equal(outs[0], state["W1"])  # lr 0: nothing moves

    # Running without any state feeds uses the defaults: the first step from the model.
    first = session.run(["loss", "W1.updated"], {**feeds, "target": target})
    again = session.run(["loss", "W1.updated"], {**feeds, "target": target, **state})
    np.testing.assert_array_equal(first[1], again[1])


def test_without_defaults_every_state_is_fed():
    step = build_step_model(mlp(), "mse", Adam(), defaults=False)
    inits = {t.name for t in step.graph.initializer}
    assert not inits & {"W1", "W1.m", STEP, LR}
    with pytest.raises(GradientError, match="defaults=False"):
        initial_state(step)


def test_named_loss_output_and_frozen_parameters():
    # A model that computes its own loss: its targets are an ordinary input.
    model, _ = append_loss(mlp(), "mse", target="y")
    feeds, target = batch("mse")
    feeds = {**feeds, "y": target}
    step = build_step_model(model, "loss", AdamW(0.01), trainable=["W2", "b2"])
    layout = StepLayout.of(step)
    assert layout.target is None and layout.parameters == ["W2", "b2"]
    assert "W1" not in {i.name for i in step.graph.input}  # frozen: stays a plain initializer
    losses, state = run_steps(step, feeds, None)
    trainer = Trainer(model, "loss", AdamW(0.01), trainable=["W2", "b2"])
    expected = [trainer.step(feeds) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    np.testing.assert_allclose(state["W2"], trainer.parameters["W2"], rtol=1e-5, atol=1e-6)


def test_float64_model():
    model = mlp()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    feeds, target = batch("mse")
    feeds = {"x": feeds["x"].astype(np.float64)}
    target = target.astype(np.float64)
    step = build_step_model(model, "mse", Adam(0.01))
    losses, state = run_steps(step, feeds, target)
    trainer = Trainer(model, "mse", Adam(0.01))
    expected = [trainer.step(feeds, target) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, expected, rtol=1e-10)
    np.testing.assert_allclose(state["W1"], trainer.parameters["W1"], rtol=1e-10, atol=1e-12)


def test_errors():
    with pytest.raises(GradientError, match="unknown loss 'hinge'"):
        build_step_model(mlp(), "hinge", SGD(0.1))
    with pytest.raises(GradientError, match="not a scalar"):
        build_step_model(mlp(), "logits", SGD(0.1))
    with pytest.raises(GradientError, match="clip_norm"):
        build_step_model(mlp(), "mse", SGD(0.1), clip_norm=0.0)

    class Custom(SGD):
        pass

    with pytest.raises(GradientError, match="not Custom"):
        build_step_model(mlp(), "mse", Custom(0.1))

    # A tensor already named like the convention's.
    model = mlp()
    model.graph.node[2].output[0] = "step"
    model.graph.node[3].input[0] = "step"
    with pytest.raises(GradientError, match="naming convention needs the name"):
        build_step_model(model, "mse", SGD(0.1))


def test_older_opset_runs_the_same():
    feeds, target = batch("cross_entropy")
    base, _ = run_steps(
        build_step_model(mlp(), "cross_entropy", Adam(0.01), clip_norm=1.0), feeds, target
    )
    for opset in (17, 13, 12):
        step = build_step_model(mlp(), "cross_entropy", Adam(0.01), clip_norm=1.0, opset=opset)
        assert step.opset_import[0].version == opset
        onnx.checker.check_model(step, full_check=True)
        losses, _ = run_steps(step, feeds, target)
        np.testing.assert_allclose(losses, base, rtol=1e-6)

    # mse needs nothing newer than opset 11 (IR 6).
    step = build_step_model(mlp(), "mse", SGD(0.1, momentum=0.9), opset=11)
    assert step.ir_version == 6
    feeds, target = batch("mse")
    run_steps(step, feeds, target, steps=2)


def test_older_opset_refusals_name_the_op():
    with pytest.raises(UnsupportedOpError, match="SoftmaxCrossEntropyLoss.*from opset 12"):
        build_step_model(mlp(), "cross_entropy", SGD(0.1), opset=11)
    with pytest.raises(UnsupportedOpError, match="Expand.*from opset 8"):
        build_step_model(mlp(), "mse", SGD(0.1), opset=7)
    # The CNN's MaxPool gradient scatters with reduction='add', which needs opset 16.
    with pytest.raises(UnsupportedOpError, match="ScatterElements.*reduction='add'.*16"):
        build_step_model(str(DIGITS), "mse", SGD(0.1), opset=13)
    # Softmax changed meaning at opset 13: onnx's converter rewrites it, with the same numbers.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    soft = helper.make_model(
        helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="s")], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    old = convert_opset(soft, 11)
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(
        ort_session(old).run(None, {"x": x})[0], ort_session(soft).run(None, {"x": x})[0]
    )


def test_cli_writes_the_step(tmp_path, capsys):
    out = tmp_path / "step.onnx"
    code = main(
        [
            "grad",
            str(DIGITS),
            "--loss",
            "cross_entropy",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--momentum",
            "0.9",
            "--nesterov",
            "--weight-decay",
            "0.01",
            "--clip-norm",
            "5",
            "-o",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    step = onnx.load(out)
    onnx.checker.check_model(step, full_check=True)
    assert "fc.weight.momentum" in {i.name for i in step.graph.input}
    assert float(initial_state(step)[LR]) == 0.05
    assert "fc.weight.updated" in capsys.readouterr().out

    code = main(
        [
            "grad",
            str(DIGITS),
            "--loss",
            "mse",
            "--optimizer",
            "adam",
            "--betas",
            "0.8",
            "0.99",
            "--eps",
            "1e-6",
            "--opset",
            "16",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    assert onnx.load(out).opset_import[0].version == 16
    assert "betas=(0.8, 0.99), eps=1e-06" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "adam", "--momentum", "0.9"], "apply to sgd only"),
        (["--optimizer", "sgd", "--betas", "0.9", "0.99"], "apply to adam and adamw"),
        (["--optimizer", "adam", "--opset", "11"], "SoftmaxCrossEntropyLoss"),
        (["--training-info"], "needs --optimizer"),
    ],
)
def test_cli_refusals(tmp_path, capsys, args, message):
    code = main(
        ["grad", str(DIGITS), "--loss", "cross_entropy", *args, "-o", str(tmp_path / "o.onnx")]
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_gradient_graph_at_older_opset(tmp_path):
    out = tmp_path / "grad.onnx"
    assert main(["grad", str(DIGITS), "--loss", "mse", "--opset", "16", "-o", str(out)]) == 0
    model = onnx.load(out)
    assert model.opset_import[0].version == 16
    onnx.checker.check_model(model, full_check=True)
