"""The op table: one Case per (op, shapes, attributes) drives every per-op check.

For each case `check_case`:

1. builds a one-node model and a scalar loss L = Σₖ sum(rₖ · yₖ) over its float outputs,
   with fixed random weights rₖ, so every output's gradient is exercised;

2. builds the gradient model, checks it with `onnx.checker` (full_check) and that its
   backward nodes are all in the default domain;

3. compares the analytic gradient with central differences in float64;

4. runs the float32 gradient model in onnxruntime and compares it, loss and gradients,
   with onnxgrad's executor.

Family test modules define `CASES = [Case(...), ...]` and parametrize over `params(CASES)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxgrad import gradient_model
from onnxgrad.gradcheck import check_gradients
from onnxgrad.runtime.session import Session

Sampler = Callable[[np.random.Generator, tuple], np.ndarray]


def uniform(low: float = -2.0, high: float = 2.0) -> Sampler:
    """Samples uniformly in [low, high)."""
    return lambda rng, shape: rng.uniform(low, high, shape)


def away_from(points: Sequence[float] = (0.0,), gap: float = 0.1, low=-2.0, high=2.0) -> Sampler:
    """Uniform samples kept at least `gap` away from each kink in `points`."""

    def sample(rng, shape):
        x = rng.uniform(low, high, shape)
        for p in points:
            near = np.abs(x - p) < gap
            x = np.where(near, p + np.sign(x - p + 1e-12) * gap * 2, x)
        return x

    return sample


def positive(low: float = 0.2, high: float = 2.0) -> Sampler:
    """Samples in [low, high): for Log, Sqrt, Pow bases and the like."""
    return uniform(low, high)


def distinct(scale: float = 1.0) -> Sampler:
    """A shuffled grid of well-separated values: no ties for Max, MaxPool, TopK, sorting."""

    def sample(rng, shape):
        n = int(np.prod(shape)) if shape else 1
        values = (np.arange(n) - n / 2) * (0.37 * scale)
        return rng.permutation(values).reshape(shape)

    return sample


@dataclass
class Case:
    """One op-table entry.

    Attributes:
        op: the ONNX op type.
        inputs: per input, a shape tuple (a random float input), an ndarray (a constant
            initializer: indices, shapes, axes, fixed statistics), or None (absent).
        attrs: node attributes.
        id: a short label for the test id.
        sampler: draws the random float inputs; keep it away from kinks and out-of-domain
            values. One sampler for all inputs, or a list with one per input.
        outputs: the number of node outputs.
        loss_outputs: which outputs enter the loss (default: every float output).
        wrt: input indices to differentiate (default: every random float input).
        opset: the default-domain opset of the model.
        rtol, atol: tolerances of the float64 check.
        ort: also run the float32 gradient model in onnxruntime.
        dynamic: declare the random inputs with symbolic dimensions.
        full_check: run onnx.checker with full_check (off only where onnx's own function
            bodies fail its type check, with a comment saying so).
        marks: pytest marks (xfail with a reason, slow).
    """

    op: str
    inputs: Sequence[Any]
    attrs: dict = field(default_factory=dict)
    id: str = ""
    sampler: Sampler | Sequence[Sampler | None] | None = None
    outputs: int = 1
    loss_outputs: Sequence[int] | None = None
    wrt: Sequence[int] | None = None
    opset: int = 18
    rtol: float = 1e-6
    atol: float = 1e-8
    ort: bool = True
    dynamic: bool = False
    full_check: bool = True
    marks: tuple = ()

    @property
    def label(self) -> str:
        return f"{self.op}-{self.id}" if self.id else self.op


def params(cases: Sequence[Case]) -> list:
    """The cases as pytest params with readable ids."""
    seen: dict[str, int] = {}
    out = []
    for case in cases:
        label = case.label
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}-{seen[label]}"
        out.append(pytest.param(case, id=label, marks=case.marks))
    return out


def _sampler(case: Case, index: int) -> Sampler:
    if isinstance(case.sampler, (list, tuple)):
        return case.sampler[index] or uniform()
    return case.sampler or uniform()


def build(case: Case, dtype=np.float64, seed: int = 0):
    """The case's one-node model with its loss, the feeds, and the names to differentiate."""
    rng = np.random.default_rng(seed)
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph_inputs, inits, feeds, names, wrt = [], [], {}, [], []
    for i, spec in enumerate(case.inputs):
        name = f"in{i}"
        if spec is None:
            names.append("")
            continue
        names.append(name)
        if isinstance(spec, np.ndarray):
            value = spec.astype(dtype) if spec.dtype.kind == "f" else spec
            inits.append(numpy_helper.from_array(value, name))
            continue
        shape = tuple(spec)
        feeds[name] = _sampler(case, i)(rng, shape).astype(dtype)
        dims = [f"{name}_d{k}" for k in range(len(shape))] if case.dynamic else list(shape)
        graph_inputs.append(helper.make_tensor_value_info(name, onnx_type, dims))
        if case.wrt is None or i in case.wrt:
            wrt.append(name)
    outs = [f"y{k}" for k in range(case.outputs)]
    node = helper.make_node(case.op, names, outs, name="node", **case.attrs)

    # The node alone first, to learn which outputs are float and their shapes; its outputs
    # are read as intermediates, so the probe declares only a pass-through output.
    first = graph_inputs[0]
    passthrough = helper.make_node("Identity", [first.name], ["probe"], name="probe")
    probe_out = onnx.ValueInfoProto(name="probe", type=first.type)
    probe = _model([node, passthrough], graph_inputs, inits, [probe_out], case.opset)
    values = Session(probe).run(outs, feeds)
    chosen = case.loss_outputs
    if chosen is None:
        chosen = [k for k, v in enumerate(values) if np.asarray(v).dtype.kind == "f"]
    nodes, terms = [node], []
    for k in chosen:
        out = np.asarray(values[k])
        r = numpy_helper.from_array(rng.standard_normal(out.shape).astype(out.dtype), f"r{k}")
        inits.append(r)
        nodes.append(helper.make_node("Mul", [outs[k], r.name], [f"ry{k}"], name=f"weigh{k}"))
        nodes.append(
            helper.make_node("ReduceSum", [f"ry{k}"], [f"l{k}"], name=f"sum{k}", keepdims=0)
        )
        term = f"l{k}"
        if out.dtype != np.dtype(dtype):  # a Cast's output: the loss stays in the case's type
            nodes.append(helper.make_node("Cast", [term], [f"{term}_cast"], to=onnx_type))
            term = f"{term}_cast"
        terms.append(term)
    if len(terms) == 1:
        nodes.append(helper.make_node("Identity", terms, ["loss"], name="loss_node"))
    else:
        nodes.append(helper.make_node("Sum", terms, ["loss"], name="loss_node"))
    loss = helper.make_tensor_value_info("loss", onnx_type, [])
    model = _model(nodes, graph_inputs, inits, [loss], case.opset)
    return model, feeds, wrt


def _model(nodes, inputs, inits, outputs, opset):
    graph = helper.make_graph(nodes, "case", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check_case(case: Case) -> None:
    """Every check of one op-table case; raises AssertionError on the first that fails."""
    # 1. Gradient model in float64: valid ONNX, default domain only, matches finite differences.
    model, feeds, wrt = build(case, np.float64)
    assert wrt, f"{case.label}: nothing to differentiate"
    grad = gradient_model(model, wrt=wrt)
    onnx.checker.check_model(grad, full_check=case.full_check)
    forward_count = len(model.graph.node)
    domains = {n.domain for n in grad.graph.node[forward_count:]}
    assert domains <= {"", "ai.onnx"}, f"backward nodes outside ai.onnx: {domains}"
    for report in check_gradients(model, feeds, wrt=wrt):
        close = report.ok(case.rtol, case.atol)
        assert close, (
            f"{case.label}: d loss/d {report.name} ({report.mode}) off by "
            f"{report.abs_error:.3g} (rel {report.rel_error:.3g})\n"
            f"analytic {report.analytic[:6]}\nnumeric  {report.numeric[:6]}"
        )

    # 2. The float32 gradient model gives the same numbers in onnxruntime.
    if case.ort:
        model32, feeds32, wrt32 = build(case, np.float32)
        grad32 = gradient_model(model32, wrt=wrt32)
        names = [o.name for o in grad32.graph.output]
        ours = Session(grad32).run(names, feeds32)
        theirs = Session(grad32, backend="onnxruntime").run(names, feeds32)
        for name, a, b in zip(names, ours, theirs):
            scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
            np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{case.label}: {name} vs onnxruntime"
            )
