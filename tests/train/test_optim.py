"""Optimizers against torch.optim: the same parameters and gradients, step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import onnxgrad.optim
from onnxgrad.errors import OnnxgradError
from onnxgrad.train import optim

STEPS = 25

CONFIGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.05, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05}),
    ("Adam", {}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("AdamW", {}),
    ("AdamW", {"lr": 0.02, "betas": (0.5, 0.9), "weight_decay": 0.3}),
    ("AdamW", {"lr": 0.02, "weight_decay": 0.0}),
]


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


@pytest.mark.parametrize(
    "name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)]
)
def test_matches_torch(name, kwargs):
    params, grads = _problem()
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ours = getattr(onnxgrad.optim, name)(**kwargs)
    theirs = getattr(torch.optim, name)(list(tensors.values()), foreach=False, **kwargs)
    for step_grads in grads:
        ours.step(params, step_grads)
        for k, t in tensors.items():
            t.grad = torch.tensor(step_grads[k])
        theirs.step()
        for k in params:
            np.testing.assert_allclose(params[k], tensors[k].detach().numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_updates_in_place_and_keeps_dtype(name):
    kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    opt = getattr(onnxgrad.optim, name)(**kwargs)
    w = np.ones((2, 3), np.float32)
    grad = np.full((2, 3), 0.5, np.float32)
    grad_before = grad.copy()
    params = {"w": w}
    for _ in range(3):
        opt.step(params, {"w": grad})
    assert params["w"] is w
    assert w.dtype == np.float32
    assert not np.allclose(w, 1.0)
    np.testing.assert_array_equal(grad, grad_before)  # gradients are never modified
    for buf in opt.state["w"].values():
        if isinstance(buf, np.ndarray):
            assert buf.dtype == np.float32


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_state_dict_round_trip(name):
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.05}
    params, grads = _problem(1)
    first = getattr(onnxgrad.optim, name)(**kwargs)
    for g in grads[:5]:
        first.step(params, g)
    saved = first.state_dict()
    copy = {k: v.copy() for k, v in params.items()}

    second = getattr(onnxgrad.optim, name)(lr=1.0)
    second.load_state_dict(saved)
    assert second.hyperparameters() == first.hyperparameters()
    for g in grads[5:]:
        first.step(params, g)
        second.step(copy, g)
    for k in params:
        np.testing.assert_array_equal(params[k], copy[k])
    # The saved state is a copy: later steps did not change it.
    assert saved["state"]["w"]["step"] == 5


def test_parameters_without_gradient_are_left_alone():
    params = {"w": np.ones(3), "frozen": np.ones(3)}
    opt = onnxgrad.optim.SGD(lr=0.5)
    opt.step(params, {"w": np.ones(3)})
    np.testing.assert_array_equal(params["w"], 0.5)
    np.testing.assert_array_equal(params["frozen"], 1.0)
    assert "frozen" not in opt.state


def test_errors():
    opt = onnxgrad.optim.Adam()
    with pytest.raises(OnnxgradError, match="'v'.*not among the parameters"):
        opt.step({"w": np.ones(2)}, {"v": np.ones(2)})
    with pytest.raises(OnnxgradError, match="shape"):
        opt.step({"w": np.ones(2)}, {"w": np.ones(3)})
    with pytest.raises(ValueError, match="Nesterov"):
        onnxgrad.optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        onnxgrad.optim.Adam(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="learning rate"):
        onnxgrad.optim.SGD(lr=-1.0)


def test_reexports():
    assert "optim" in onnxgrad.__all__  # `import onnxgrad; onnxgrad.optim.SGD` works
    assert onnxgrad.optim.SGD is optim.SGD
    assert onnxgrad.optim.Adam is optim.Adam
    assert onnxgrad.optim.AdamW is optim.AdamW


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(3)
    grads = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    tensors = [
        torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads.values()
    ]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.tensor(g)
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    assert norm == pytest.approx(float(torch_norm), rel=1e-12)
    for t, g in zip(tensors, clipped.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12)
    unchanged, _ = optim.clip_grad_norm(grads, 100.0)
    assert all(unchanged[k] is grads[k] for k in grads)
