"""Finite-difference gradient checking.

The analytic gradient comes from `gradient_model` run by onnxgrad's executor; the
numeric one from central differences of the forward model. Small tensors get their whole
gradient checked element by element; large ones are checked along a few random
directions, which costs two forward runs per direction whatever the tensor's size.
Run it in float64: in float32 the differences drown in rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxgrad.autodiff.builder import GRAD_SUFFIX, gradient_model
from onnxgrad.importer import load, tensor_array
from onnxgrad.runtime.session import Session


@dataclass
class GradReport:
    """The comparison for one tensor.

    Attributes:
        name: the tensor.
        analytic: the gradient's projections on the checked directions (or the whole gradient).
        numeric: the same, by central differences.
        mode: "full" (every element) or "directions".
        grad: the whole analytic gradient, shaped like the tensor (None when not kept).
        terms: per direction, the root-sum-square of the products g·d that the projection
            adds up (None in "full" mode). A projection that nearly cancels is small while
            its rounding is set by these terms, so tolerances scale with them.
    """

    name: str
    analytic: np.ndarray
    numeric: np.ndarray
    mode: str
    grad: np.ndarray | None = None
    terms: np.ndarray | None = None

    def _scale(self) -> np.ndarray:
        """Per entry, the magnitude that relative tolerances are taken against."""
        scale = np.abs(self.numeric)
        if self.terms is not None:
            scale = np.maximum(scale, self.terms)
        return scale

    @property
    def abs_error(self) -> float:
        """The largest absolute difference."""
        return float(np.max(np.abs(self.analytic - self.numeric), initial=0.0))

    @property
    def rel_error(self) -> float:
        """The largest difference relative to the numeric gradient's scale."""
        scale = max(float(np.max(self._scale(), initial=0.0)), 1e-12)
        return self.abs_error / scale

    def ok(self, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """Whether every entry agrees within atol + rtol · scale.

        The scale is |numeric| for whole gradients; for projections, the larger of
        |numeric| and the size of the terms the projection sums (see `terms`).
        """
        return bool(np.all(np.abs(self.analytic - self.numeric) <= atol + rtol * self._scale()))


def check_gradients(
    model,
    feeds: dict[str, np.ndarray],
    wrt: Sequence[str] | None = None,
    loss: str | None = None,
    *,
    eps: float = 1e-6,
    full_max: int = 32,
    directions: int = 3,
    seed: int = 0,
) -> list[GradReport]:
    """Compare analytic and numeric gradients of `loss` (or of Σ r·loss for a non-scalar one).

    Args:
        model: the forward model (path, bytes or ModelProto), ideally float64.
        feeds: every graph input; may also override initializers.
        wrt: tensors to check (default: the trainable parameters); graph inputs and
            initializers can be perturbed.
        loss: the output to differentiate (default: the only one).
        eps: the finite-difference step.
        full_max: tensors with at most this many elements are checked element by element.
        directions: random directions for larger tensors.
        seed: seeds the random directions and the upstream weights r.

    Returns:
        One report per wrt tensor.
    """
    model = load(model)
    grad = gradient_model(model, wrt=wrt, loss=loss)
    loss = loss or model.graph.output[0].name
    wrt_names = [o.name[: -len(GRAD_SUFFIX)] for o in grad.graph.output[len(model.graph.output) :]]
    rng = np.random.default_rng(seed)
    forward = Session(model)
    backward = Session(grad)

    # 1. Fix the upstream weights for a non-scalar loss: L = Σ r · y.
    y = forward.run([loss], feeds)[0]
    seed_name = f"{loss}{GRAD_SUFFIX}"
    seeded = any(i.name == seed_name for i in grad.graph.input)
    r = rng.standard_normal(np.shape(y)).astype(y.dtype) if seeded else np.ones_like(y)
    extra = {seed_name: r} if seeded else {}

    def scalar_loss(values: dict) -> float:
        out = forward.run([loss], values)[0]
        return float(np.sum(r * out))

    # 2. The analytic gradients, all at once.
    analytic = backward.run([f"{w}{GRAD_SUFFIX}" for w in wrt_names], {**feeds, **extra})
    values = dict(feeds)
    inits = {t.name: t for t in model.graph.initializer}
    reports = []
    for name, g in zip(wrt_names, analytic):
        if name in values:
            base = np.array(values[name], copy=True)
        elif name in inits:
            base = tensor_array(inits[name]).copy()
        else:
            raise ValueError(f"cannot perturb '{name}': it is neither fed nor an initializer")

        def at(x: np.ndarray, name=name) -> float:
            return scalar_loss({**values, name: x})

        # 3. Central differences: whole gradient for small tensors, else random directions.
        if base.size <= full_max:
            numeric = np.zeros(base.size)
            for k in range(base.size):
                step = np.zeros(base.size, dtype=base.dtype)
                step[k] = eps
                step = step.reshape(base.shape)
                numeric[k] = (at(base + step) - at(base - step)) / (2 * eps)
            whole = np.asarray(g, np.float64)
            reports.append(GradReport(name, whole.reshape(-1), numeric, "full", whole))
        else:
            proj_a, proj_n, terms = [], [], []
            for _ in range(directions):
                d = rng.standard_normal(base.shape).astype(base.dtype)
                products = np.asarray(g, np.float64) * d
                proj_a.append(float(np.sum(products)))
                terms.append(float(np.sqrt(np.sum(products * products))))
                proj_n.append((at(base + eps * d) - at(base - eps * d)) / (2 * eps))
            reports.append(
                GradReport(
                    name,
                    np.array(proj_a),
                    np.array(proj_n),
                    "directions",
                    np.asarray(g),
                    np.array(terms),
                )
            )
    return reports
