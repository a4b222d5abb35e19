"""Optimizers that update numpy parameters in place: SGD, Adam, AdamW.

The update rules are PyTorch's (`torch.optim`), step for step, so a model fine-tuned here
follows the same trajectory it would in PyTorch from the same gradients:

- SGD: ``g = grad + λ·p``; with momentum μ, ``buf = g`` on the first step, then
  ``buf = μ·buf + g`` (dampening 0); ``g = g + μ·buf`` (Nesterov) or ``g = buf``;
  ``p = p − lr·g``.
- Adam: ``g = grad + λ·p`` (L2 added to the gradient); ``m = β₁·m + (1 − β₁)·g``;
  ``v = β₂·v + (1 − β₂)·g²``; ``p = p − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε)``.
- AdamW: ``p = p·(1 − lr·λ)`` (decoupled decay), then Adam's update without L2.

State is kept per parameter name. Learning-rate schedules live in
`onnxgrad.train.schedules` (the Trainer applies them); `optimizer.lr` may also be assigned
between steps by hand. Every array stays in its parameter's dtype: scalars
enter the arithmetic as Python floats, which numpy does not let widen float32.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxgrad.errors import OnnxgradError

logger = logging.getLogger(__name__)


class Optimizer:
    """Base class: per-name state, `step`, `state_dict` and `load_state_dict`.

    Attributes:
        lr: the learning rate; assign to it between steps to schedule it.
        state: per parameter name, a dict of its step count and buffers.
    """

    def __init__(self, lr: float):
        if not lr >= 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.lr = float(lr)
        self.state: dict[str, dict[str, Any]] = {}

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """Update each parameter that has a gradient, in place.

        Args:
            params: the parameters by name (writable arrays; updated in place).
            grads: their gradients by name (read, never modified). Parameters without an
                entry here are left as they are.

        Raises:
            OnnxgradError: a gradient names no parameter, or its shape differs.
        """
        for name, grad in grads.items():
            if name not in params:
                raise OnnxgradError(
                    f"{type(self).__name__}.step got a gradient for '{name}', which is not among "
                    f"the parameters ({', '.join(params) or 'none'})"
                )
            param = params[name]
            grad = np.asarray(grad)
            if grad.shape != param.shape:
                raise OnnxgradError(
                    f"gradient of '{name}' has shape {list(grad.shape)}, but the parameter has "
                    f"{list(param.shape)}"
                )
            if grad.dtype != param.dtype:
                grad = grad.astype(param.dtype)
            state = self.state.setdefault(name, {"step": 0})
            state["step"] += 1
            self._update(param, grad, state)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that define the optimizer (learning rate included)."""
        return {"lr": self.lr}

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of the settings and of every parameter's state."""
        return {"hyperparameters": self.hyperparameters(), "state": copy.deepcopy(self.state)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (copied, so the argument stays independent)."""
        for key, value in state_dict.get("hyperparameters", {}).items():
            setattr(self, key, tuple(value) if isinstance(value, list) else value)
        self.state = copy.deepcopy(dict(state_dict.get("state", {})))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 decay.

    Args:
        lr: the learning rate.
        momentum: μ, the momentum factor (0 disables the buffer).
        nesterov: use Nesterov momentum (needs momentum > 0).
        weight_decay: λ, added as λ·p to the gradient (L2 regularization).
    """

    def __init__(
        self, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
    ):
        super().__init__(lr)
        if momentum < 0.0 or weight_decay < 0.0:
            raise ValueError("momentum and weight_decay must be >= 0")
        if nesterov and momentum <= 0.0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }

    def _update(self, param, grad, state):
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= self.momentum
                buf += grad
            grad = grad + self.momentum * buf if self.nesterov else buf
        param -= self.lr * grad


class Adam(Optimizer):
    """Adam with bias correction; weight decay is L2 added to the gradient.

    Args:
        lr: the learning rate.
        betas: (β₁, β₂), the decay rates of the first and second moment estimates.
        eps: ε, added to the denominator.
        weight_decay: λ, added as λ·p to the gradient.
    """

    _decoupled = False

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(lr)
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError("eps and weight_decay must be >= 0")
        self.betas = (float(beta1), float(beta2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def _update(self, param, grad, state):
        beta1, beta2 = self.betas
        t = state["step"]
        if self.weight_decay:
            if self._decoupled:
                param *= 1.0 - self.lr * self.weight_decay
            else:
                grad = grad + self.weight_decay * param
        if "exp_avg" not in state:
            state["exp_avg"] = np.zeros_like(param)
            state["exp_avg_sq"] = np.zeros_like(param)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m += (1.0 - beta1) * (grad - m)
        v *= beta2
        v += (1.0 - beta2) * (grad * grad)
        step_size = self.lr / (1.0 - beta1**t)
        denom = np.sqrt(v) / math.sqrt(1.0 - beta2**t)
        denom += self.eps
        param -= step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay: p ← p·(1 − lr·λ) before the Adam update.

    Args:
        lr: the learning rate.
        betas: (β₁, β₂), the decay rates of the moment estimates.
        eps: ε, added to the denominator.
        weight_decay: λ, the decoupled decay rate.
    """

    _decoupled = True

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        super().__init__(lr, betas, eps, weight_decay)


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float) -> tuple[dict, float]:
    """Scale all gradients together so that their joint L2 norm is at most `max_norm`.

    Args:
        grads: gradients by name (not modified).
        max_norm: the largest allowed norm.

    Returns:
        The (possibly scaled) gradients and the norm they had before clipping.
    """
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if total <= max_norm or total == 0.0:
        return dict(grads), total
    scale = max_norm / (total + 1e-6)
    logger.debug("clipping gradients: norm %.4g > %.4g", total, max_norm)
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}, total


def clip_grad_value(grads: Mapping[str, np.ndarray], clip_value: float) -> dict:
    """Clip every gradient element to [−clip_value, clip_value] (PyTorch's clip_grad_value_).

    Args:
        grads: gradients by name (not modified).
        clip_value: the largest allowed magnitude (> 0).

    Returns:
        The clipped gradients, in their own dtypes.
    """
    out = {}
    for name, grad in grads.items():
        limit = grad.dtype.type(clip_value)
        out[name] = np.clip(grad, -limit, limit)
    return out


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
"""Optimizer classes by lower-case name (for the CLI)."""
