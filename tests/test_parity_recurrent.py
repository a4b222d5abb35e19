"""Gradient parity with PyTorch autograd on exported nn.RNN, nn.GRU and nn.LSTM.

Each module is exported with a static sequence length by the legacy exporter (opset 17)
and by the dynamo exporter (opset 18). The model's output concatenates the sequence output
with the final hidden (and cell) states, so the gradients of Y, Y_h and Y_c all enter the
loss = sum(output · r) for fixed random weights r. Every parameter's gradient and the input's
must agree with torch's to 1e-9 relative error in float64 and 1e-4 in float32, and the
float32 gradient model must give the same numbers in onnxruntime as in onnxgrad's executor.

Both exporters fold the weights into W, R and B initializers laid out as ONNX wants (gates
reordered, both directions stacked, the two biases concatenated); torch's gradients are laid
out the same way before the comparison. The dynamo exporter emits GRU and LSTM nodes but
unrolls nn.RNN into MatMul, Add and Tanh per step, and its optimizer folds the first step's
H₀·Rᵀ + Rb (H₀ = 0) into a constant, so part of bias_hh's gradient has no path in the graph:
nn.RNN is compared through the legacy export only.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

import onnxgrad
from onnxgrad.autodiff.builder import GRAD_SUFFIX
from tests.models import quiet

BATCH, SEQ, INPUT, HIDDEN = 2, 5, 3, 4
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# ONNX gate block j holds torch's gate block ORDER[op][j]: torch LSTM is (i, f, g, o) and
# ONNX (i, o, f, c); torch GRU is (r, z, n) and ONNX (z, r, h).
ORDER = {"RNN": [0], "GRU": [1, 0, 2], "LSTM": [0, 3, 1, 2]}
MODULES = {"RNN": "RNN", "GRU": "GRU", "LSTM": "LSTM"}

# (op, layers, bidirectional, batch_first)
CONFIGS = [
    (op, layers, bidir, batch_first)
    for op in ("RNN", "GRU", "LSTM")
    for layers, bidir, batch_first in ((1, False, False), (2, True, True))
]
EXPORTERS = ("legacy", "dynamo")


def _exporters(config) -> tuple[str, ...]:
    """The legacy exporter always; the dynamo one (slow) for the stacked GRU and LSTM only."""
    return EXPORTERS if config[0] != "RNN" and config[1] > 1 else ("legacy",)


def _label(config) -> str:
    op, layers, bidir, batch_first = config
    return f"{op}-{layers}layer{'-bidir' if bidir else ''}{'-batch_first' if batch_first else ''}"


class Wrapped(torch.nn.Module):
    """The recurrent module with every output joined into one (batch, ·) tensor."""

    def __init__(self, op: str, layers: int, bidir: bool, batch_first: bool):
        super().__init__()
        cls = getattr(torch.nn, MODULES[op])
        self.rec = cls(
            INPUT, HIDDEN, num_layers=layers, bidirectional=bidir, batch_first=batch_first
        )
        self.batch_first = batch_first

    def forward(self, x):
        y, state = self.rec(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        parts = [y.reshape(y.shape[0], -1)]
        parts += [s.transpose(0, 1).reshape(y.shape[0], -1) for s in states]
        return torch.cat(parts, dim=1)


def _input(config, dtype: str, seq: int = SEQ) -> np.ndarray:
    shape = (BATCH, seq, INPUT) if config[3] else (seq, BATCH, INPUT)
    return np.random.default_rng(1).standard_normal(shape).astype(dtype)


@dataclass
class Exported:
    """One export, and which torch parameters each W, R, B initializer holds."""

    module: Wrapped
    model: onnx.ModelProto
    # initializer name -> (kind "W" | "R" | "B", layer)
    slots: dict[str, tuple[str, int]]


def _onnx_layout(op: str, kind: str, layer: int, values: dict, dirs: int) -> np.ndarray:
    """torch's weights (or gradients) of one layer in the layout of ONNX's W, R or B."""

    def reorder(p: np.ndarray) -> np.ndarray:
        blocks = np.split(p, len(ORDER[op]), axis=0)
        return np.concatenate([blocks[j] for j in ORDER[op]], axis=0)

    out = []
    for d in range(dirs):
        sfx = f"l{layer}" + ("_reverse" if d else "")
        if kind == "W":
            out.append(reorder(values[f"rec.weight_ih_{sfx}"]))
        elif kind == "R":
            out.append(reorder(values[f"rec.weight_hh_{sfx}"]))
        else:
            ih, hh = values[f"rec.bias_ih_{sfx}"], values[f"rec.bias_hh_{sfx}"]
            out.append(np.concatenate([reorder(ih), reorder(hh)]))
    return np.stack(out)


def _export(config, exporter: str, dtype: str) -> Exported:
    op = config[0]
    torch.manual_seed(0)
    module = Wrapped(*config).to(DTYPES[dtype]).eval()
    x = torch.from_numpy(_input(config, dtype))
    with quiet():
        if exporter in ("legacy", "legacy_dynamic"):
            # legacy_dynamic: the time axis (and so the output's width) symbolic.
            dynamic = {"input": {1 if config[3] else 0: "time"}, "output": {1: "width"}}
            f = io.BytesIO()
            torch.onnx.export(
                module,
                (x,),
                f,
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes=dynamic if exporter == "legacy_dynamic" else None,
            )
            raw = onnx.load_from_string(f.getvalue())
        else:
            program = torch.onnx.export(
                module,
                (x,),
                dynamo=True,
                opset_version=18,
                input_names=["input"],
                output_names=["output"],
                verbose=False,
                report=False,
            )
            raw = program.model_proto
    model = onnxgrad.load(raw)

    # Which initializer is which: the recurrent nodes in graph order are the layers.
    values = {n: p.detach().numpy() for n, p in module.named_parameters()}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dirs = 2 if config[2] else 1
    slots: dict[str, tuple[str, int]] = {}
    layers = [n for n in model.graph.node if n.op_type == op]
    for layer, node in enumerate(layers):
        for kind, name in zip("WRB", node.input[1:4]):
            expected = _onnx_layout(op, kind, layer, values, dirs)
            assert np.array_equal(inits[name], expected), f"{name} is not {kind} of layer {layer}"
            slots[name] = (kind, layer)
    assert layers, f"the {exporter} exporter wrote no {op} node"
    return Exported(module, model, slots)


@pytest.fixture(scope="session")
def exports():
    """Exports made on first use and kept for the whole test session."""
    cache: dict = {}

    def get(config, exporter: str, dtype: str) -> Exported:
        key = (config, exporter, dtype)
        if key not in cache:
            cache[key] = _export(config, exporter, dtype)
        return cache[key]

    return get


def _torch_gradients(module, x: np.ndarray, r: np.ndarray):
    module.zero_grad(set_to_none=True)
    inp = torch.from_numpy(x.copy()).requires_grad_(True)
    out = module(inp)
    (out * torch.from_numpy(r)).sum().backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in module.named_parameters()}
    return out.detach().numpy(), grads, inp.grad.detach().numpy()


def _expected(ex: Exported, config, name: str, grads: dict) -> np.ndarray:
    kind, where = ex.slots[name]
    return _onnx_layout(config[0], kind, where, grads, 2 if config[2] else 1)


def _errors(ex: Exported, config, got: dict, x: np.ndarray, r: np.ndarray) -> dict:
    """Per compared tensor, the relative error of onnxgrad's result against torch's."""
    out_t, grads_t, dx_t = _torch_gradients(ex.module, x, r)
    errors = {
        "output": rel_error(got["output"], out_t),
        "input": rel_error(got["input_grad"], dx_t),
    }
    for name in ex.slots:
        ours, theirs = got[f"{name}{GRAD_SUFFIX}"], _expected(ex, config, name, grads_t)
        assert ours.dtype == x.dtype and ours.shape == theirs.shape, name
        errors[name] = rel_error(ours, theirs)
    return errors


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the largest |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


CASES = [
    pytest.param(config, exporter, dtype, id=f"{_label(config)}-{exporter}-{dtype}")
    for config in CONFIGS
    for exporter, dtype in itertools.product(_exporters(config), DTYPES)
]


@pytest.mark.parametrize("config, exporter, dtype", CASES)
def test_gradients_match_torch(exports, config, exporter, dtype, record_property):
    ex = exports(config, exporter, dtype)
    wrt = [*ex.slots, "input"]
    grad = onnxgrad.gradient_model(ex.model, wrt=wrt, loss="output")
    onnx.checker.check_model(grad, full_check=True)

    x = _input(config, dtype)
    with torch.no_grad():
        shape = tuple(ex.module(torch.from_numpy(x)).shape)
    r = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    names = ["output"] + [f"{w}{GRAD_SUFFIX}" for w in wrt]
    got = dict(zip(names, onnxgrad.Session(grad).run(names, {"input": x, "output_grad": r})))
    errors = _errors(ex, config, got, x, r)
    worst = max(errors, key=errors.get)
    record_property("worst_rel_error", errors[worst])
    bad = {k: f"{v:.3g}" for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]:g} against torch: {bad}"


@pytest.mark.parametrize(
    "config, exporter",
    [pytest.param(c, e, id=f"{_label(c)}-{e}") for c in CONFIGS for e in _exporters(c)],
)
def test_gradient_model_runs_in_onnxruntime(exports, config, exporter):
    ex = exports(config, exporter, "float32")
    grad = onnxgrad.gradient_model(ex.model, wrt=[*ex.slots, "input"], loss="output")
    x = _input(config, "float32")
    out_shape = onnxgrad.Session(ex.model).run(["output"], {"input": x})[0].shape
    r = np.random.default_rng(2).standard_normal(out_shape).astype(np.float32)
    feeds = {"input": x, "output_grad": r}
    names = [o.name for o in grad.graph.output]
    ours = onnxgrad.Session(grad).run(names, feeds)
    theirs = onnxgrad.Session(grad, backend="onnxruntime").run(names, feeds)
    for name, a, b in zip(names, ours, theirs):
        assert a.shape == b.shape, name
        scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


# A dynamic time axis (dynamic_axes): the backward runs as Scans over the length the feeds
# give, so one gradient model serves every length.
DYNAMIC = [("LSTM", 1, False, False), ("GRU", 2, True, True), ("LSTM", 2, True, True)]


@pytest.mark.parametrize(
    "config, dtype",
    [pytest.param(c, d, id=f"{_label(c)}-{d}") for c in DYNAMIC for d in DTYPES],
)
def test_dynamic_time_axis_gradients_match_torch(exports, config, dtype, record_property):
    ex = exports(config, "legacy_dynamic", dtype)
    time_axis = 1 if config[3] else 0
    assert ex.model.graph.input[0].type.tensor_type.shape.dim[time_axis].dim_param == "time"
    wrt = [*ex.slots, "input"]
    grad = onnxgrad.gradient_model(ex.model, wrt=wrt, loss="output")
    onnx.checker.check_model(grad, full_check=True)
    layers = config[1] * (2 if config[2] else 1)
    assert sum(n.op_type == "Scan" for n in grad.graph.node) == 2 * layers

    names = ["output"] + [f"{w}{GRAD_SUFFIX}" for w in wrt]
    ours = onnxgrad.Session(grad)
    theirs = onnxgrad.Session(grad, backend="onnxruntime") if dtype == "float32" else None
    worst = 0.0
    for seq in (SEQ, 1, 8):
        x = _input(config, dtype, seq)
        with torch.no_grad():
            shape = tuple(ex.module(torch.from_numpy(x)).shape)
        r = np.random.default_rng(seq).standard_normal(shape).astype(dtype)
        feeds = {"input": x, "output_grad": r}
        got = dict(zip(names, ours.run(names, feeds)))
        errors = _errors(ex, config, got, x, r)
        bad = {k: f"{v:.3g}" for k, v in errors.items() if not v <= TOLERANCE[dtype]}
        assert not bad, (
            f"T = {seq}: relative errors above {TOLERANCE[dtype]:g} against torch: {bad}"
        )
        worst = max(worst, *errors.values())
        if theirs is not None:
            for name, b in zip(names, theirs.run(names, feeds)):
                scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
                np.testing.assert_allclose(
                    got[name], b, rtol=1e-4, atol=1e-5 * scale, err_msg=f"T = {seq}: {name}"
                )
    record_property("worst_rel_error", worst)
