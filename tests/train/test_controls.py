"""Fine-tuning controls: what trains, gradient accumulation, clipping, schedules, EMA."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from onnxgrad import Trainer
from onnxgrad.errors import GradientError
from onnxgrad.optim import SGD, Adam, AdamW
from onnxgrad.train.optim import clip_grad_norm, clip_grad_value
from onnxgrad.train.schedules import StepLR, warmup_cosine
from onnxgrad.train.trainer import parameters_after
from tests.train.test_trainer import mlp, regression_data


def grad_outputs(trainer: Trainer) -> list[str]:
    return [o.name for o in trainer.training_graph.graph.output if o.name.endswith("_grad")]


# What trains.


@pytest.mark.parametrize(
    "patterns, expected",
    [
        (["W*"], ["W1", "W2"]),
        (["*2"], ["W2", "b2"]),
        (["b?", "W1"], ["W1", "b1", "b2"]),
        (["[Wb]1"], ["W1", "b1"]),
    ],
)
def test_trainable_globs(patterns, expected):
    trainer = Trainer(mlp(8, 4, 2), "mse", trainable=patterns)
    assert trainer.trainable == expected
    assert grad_outputs(trainer) == [f"{n}_grad" for n in expected]


def test_trainable_glob_matching_nothing():
    with pytest.raises(GradientError, match="pattern 'conv.*' matches no trainable parameter"):
        Trainer(mlp(8, 4, 2), "mse", trainable=["conv.*"])


@pytest.mark.parametrize(
    "node, expected",
    [
        ("relu", ["W2", "b2"]),
        ("fc1", ["b1", "W2", "b2"]),  # fc1's own weight W1 stays frozen
        ("fc2", ["b2"]),
    ],
)
def test_train_after(node, expected):
    assert parameters_after(mlp(8, 4, 2), node) == expected
    x, y = regression_data(16)
    trainer = Trainer(mlp(8, 4, 2), "mse", SGD(0.1), train_after=node)
    assert trainer.trainable == expected
    assert grad_outputs(trainer) == [f"{n}_grad" for n in expected]
    trainer.step(x, y)


def test_train_after_with_trainable_and_errors():
    trainer = Trainer(mlp(8, 4, 2), "mse", trainable=["b*"], train_after="fc1")
    assert trainer.trainable == ["b1", "b2"]
    with pytest.raises(GradientError, match="no node named 'fc9'.*fc1"):
        Trainer(mlp(8, 4, 2), "mse", train_after="fc9")
    with pytest.raises(GradientError, match="no parameter is selected for training after node"):
        Trainer(mlp(8, 4, 2), "mse", train_after="fc2_bias")


# Gradient accumulation.


@pytest.mark.parametrize("optimizer", [SGD(0.1, momentum=0.9), Adam(0.01), AdamW(0.01)])
@pytest.mark.parametrize("sizes", [(8, 8), (8, 4), (4, 6, 2)])
def test_accumulation_is_one_step_over_the_union(optimizer, sizes):
    x, y = regression_data(sum(sizes) * 2)
    accumulated = Trainer(
        mlp(8, 4, 2), "mse", type(optimizer)(**optimizer.hyperparameters()), accumulate=len(sizes)
    )
    union = Trainer(mlp(8, 4, 2), "mse", type(optimizer)(**optimizer.hyperparameters()))
    start = 0
    for _ in range(2):  # two accumulated steps: the optimizer state carries over too
        for n in sizes:
            accumulated.step(x[start : start + n], y[start : start + n])
            start += n
        union.step(x[start - sum(sizes) : start], y[start - sum(sizes) : start])
        assert accumulated.steps == union.steps
    for name in union.parameters:
        np.testing.assert_allclose(
            accumulated.parameters[name], union.parameters[name], rtol=2e-5, atol=1e-6
        )


def test_accumulation_steps_only_every_n_batches_and_flushes_at_epoch_end():
    x, y = regression_data(40)
    trainer = Trainer(mlp(8, 4, 2), "mse", SGD(0.1), accumulate=3)
    before = {k: v.copy() for k, v in trainer.parameters.items()}
    trainer.step(x[:8], y[:8])
    trainer.step(x[8:16], y[8:16])
    assert trainer.steps == 0
    np.testing.assert_array_equal(trainer.parameters["W1"], before["W1"])
    trainer.step(x[16:24], y[16:24])
    assert trainer.steps == 1
    # 5 batches of 8 per epoch: one step of 3 batches, one of the 2 left at the epoch's end.
    history = trainer.fit(x, y, epochs=2, batch_size=8, progress=False)
    assert [r["steps"] for r in history] == [3, 5]
    assert not trainer.flush()


# Clipping.


def test_clip_functions_match_torch():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)}
    tensors = [torch.tensor(g) for g in grads.values()]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.5)
    clipped, ours = clip_grad_norm(grads, 1.5)
    assert ours == pytest.approx(float(norm), rel=1e-6)
    for p, g in zip(params, clipped.values()):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-6)
    for p, t in zip(params, tensors):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_value_(params, 0.5)
    by_value = clip_grad_value(grads, 0.5)
    for p, g in zip(params, by_value.values()):
        np.testing.assert_array_equal(g, p.grad.numpy())
    assert by_value["a"].dtype == np.float32 and by_value["b"].dtype == np.float64


def test_trainer_clips_by_norm_and_by_value():
    x, y = regression_data(32)
    x = x * 50.0  # large gradients
    by_norm = Trainer(mlp(8, 4, 2), "mse", SGD(1.0), clip_norm=0.5)
    before = {k: v.astype(np.float64) for k, v in by_norm.parameters.items()}
    by_norm.step(x, y)
    moved = [before[k] - v for k, v in by_norm.parameters.items()]
    assert np.sqrt(sum(np.sum(d * d) for d in moved)) == pytest.approx(0.5, rel=1e-4)

    by_value = Trainer(mlp(8, 4, 2), "mse", SGD(1.0), clip_value=0.01)
    before = {k: v.copy() for k, v in by_value.parameters.items()}
    by_value.step(x, y)
    largest = max(np.max(np.abs(before[k] - v)) for k, v in by_value.parameters.items())
    assert largest == pytest.approx(0.01, rel=1e-3)


# Schedules in the trainer.


def test_trainer_follows_the_schedule():
    x, y = regression_data(64)
    trainer = Trainer(mlp(8, 4, 2), "mse", SGD(0.2), schedule=StepLR(2, 0.5))
    seen = []
    for k in range(5):
        trainer.step(x[k * 8 : k * 8 + 8], y[k * 8 : k * 8 + 8])
        seen.append(trainer.optimizer.lr)
    assert seen == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05])
    assert trainer.base_lr == 0.2


def test_trainer_with_a_schedule_matches_torch():
    """The same linear model, SGD with momentum, warm-up then cosine, in both."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 8)).astype(np.float32)
    y = rng.normal(size=(48, 2)).astype(np.float32)
    model = mlp(8, 4, 2)
    trainer = Trainer(model, "mse", SGD(0.05, momentum=0.9), schedule=warmup_cosine(2, 6, 0.1))
    weights = {t.name: torch.tensor(numpy_helper.to_array(t)) for t in model.graph.initializer}
    params = [torch.nn.Parameter(weights[n].clone()) for n in ("W1", "b1", "W2", "b2")]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, 2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], [2])
    for k in range(6):
        xb, yb = x[k * 8 : k * 8 + 8], y[k * 8 : k * 8 + 8]
        trainer.step(xb, yb)
        w1, b1, w2, b2 = params
        out = torch.relu(torch.tensor(xb) @ w1 + b1) @ w2 + b2
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(out, torch.tensor(yb)).backward()
        optimizer.step()
        scheduler.step()
    for name, p in zip(("W1", "b1", "W2", "b2"), params):
        np.testing.assert_allclose(
            trainer.parameters[name], p.detach().numpy(), rtol=1e-4, atol=1e-6
        )


# Exponential moving average.


def test_ema_follows_the_weights_and_is_saved(tmp_path):
    x, y = regression_data(32)
    trainer = Trainer(mlp(8, 4, 2), "mse", SGD(0.1), ema=0.75)
    expected = {k: v.astype(np.float64) for k, v in trainer.parameters.items()}
    for k in range(3):
        trainer.step(x[k * 8 : k * 8 + 8], y[k * 8 : k * 8 + 8])
        for name, value in trainer.parameters.items():
            expected[name] = 0.75 * expected[name] + 0.25 * value
    for name, value in trainer.ema_parameters.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7)
        assert value.dtype == np.float32
    trainer.save(tmp_path / "ema.onnx", ema=True)
    trainer.save(tmp_path / "raw.onnx")
    ema = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "ema.onnx").graph.initializer
    }
    raw = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "raw.onnx").graph.initializer
    }
    np.testing.assert_array_equal(ema["W1"], trainer.ema_parameters["W1"])
    np.testing.assert_array_equal(raw["W1"], trainer.parameters["W1"])
    assert not np.array_equal(ema["W1"], raw["W1"])


def test_control_errors():
    with pytest.raises(GradientError, match="needs a moving average"):
        Trainer(mlp(8, 4, 2), "mse").save("never.onnx", ema=True)
    for kwargs, message in [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_value": -1.0}, "clip_value"),
        ({"accumulate": 0}, "accumulate"),
        ({"ema": 1.0}, "ema"),
    ]:
        with pytest.raises(ValueError, match=message):
            Trainer(mlp(8, 4, 2), "mse", **kwargs)
    assert Trainer(mlp(8, 4, 2), "mse").ema_parameters is None
