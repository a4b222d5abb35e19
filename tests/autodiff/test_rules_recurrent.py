"""Op table for RNN, GRU and LSTM: backpropagation through time against finite differences."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxgrad import gradient_model
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.gradcheck import check_gradients
from onnxgrad.runtime.session import Session
from tests.optable import Case, away_from, check_case, params, uniform

SEQ, BATCH, INPUT, HIDDEN = 3, 2, 3, 4
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
LENS = np.array([3, 1], np.int32)


def inputs(
    op: str,
    dirs: int = 1,
    layout: int = 0,
    bias: bool = True,
    lens: bool = False,
    initial: bool = False,
    peepholes: bool = False,
) -> list:
    """The input list of a case: shapes for random inputs, LENS for sequence_lens."""
    g = GATES[op]
    x = (SEQ, BATCH, INPUT) if layout == 0 else (BATCH, SEQ, INPUT)
    state = (dirs, BATCH, HIDDEN) if layout == 0 else (BATCH, dirs, HIDDEN)
    spec = [
        x,
        (dirs, g * HIDDEN, INPUT),
        (dirs, g * HIDDEN, HIDDEN),
        (dirs, 2 * g * HIDDEN) if bias else None,
        LENS if lens else None,
        state if initial else None,
    ]
    if op == "LSTM":
        spec += [state if initial else None, (dirs, 3 * HIDDEN) if peepholes else None]
    while spec[-1] is None:
        spec.pop()
    return spec


def case(op: str, id: str, dirs: int = 1, layout: int = 0, outputs: int | None = None, **kw):
    """One recurrent Case; keyword arguments are attributes except the input switches."""
    switches = {k: kw.pop(k) for k in ("bias", "lens", "initial", "peepholes") if k in kw}
    direction = {1: kw.pop("direction", "forward"), 2: "bidirectional"}[dirs]
    attrs = {"hidden_size": HIDDEN, "direction": direction, **kw}
    if layout:
        attrs["layout"] = layout
    loss_outputs = None if outputs is None else [outputs]
    return Case(
        op,
        inputs(op, dirs, layout, **switches),
        attrs=attrs,
        id=id,
        sampler=uniform(-1.0, 1.0),
        outputs=3 if op == "LSTM" else 2,
        loss_outputs=loss_outputs,
        # onnxruntime's CPU kernels refuse layout = 1 (batch first): float64 check only.
        ort=not layout,
    )


CASES = []
for _op in ("RNN", "GRU", "LSTM"):
    _peep = {"peepholes": True} if _op == "LSTM" else {}
    CASES += [
        case(_op, "forward"),
        case(_op, "reverse", direction="reverse"),
        case(_op, "bidirectional", dirs=2),
        case(_op, "no_bias", bias=False),
        case(_op, "initial", initial=True),
        case(_op, "lens", lens=True, initial=True),
        case(_op, "lens_reverse", direction="reverse", lens=True, initial=True, **_peep),
        case(_op, "lens_bidir", dirs=2, lens=True),
        case(_op, "layout1", layout=1, initial=True),
        case(_op, "layout1_bidir_lens", dirs=2, layout=1, lens=True, initial=True),
        case(_op, "only_Y", outputs=0),
        case(_op, "only_Y_h", outputs=1, initial=True, direction="reverse"),
        # The clip bound cuts some pre-activations: their gradient stops there.
        case(_op, "clip", clip=0.6, initial=True),
    ]
CASES += [
    case("GRU", "linear_before_reset", linear_before_reset=1, initial=True),
    case("GRU", "linear_before_reset_bidir_lens", dirs=2, linear_before_reset=1, lens=True),
    case("GRU", "linear_before_reset_layout1", layout=1, linear_before_reset=1, initial=True),
    case("GRU", "linear_before_reset_no_bias", linear_before_reset=1, bias=False),
    case("LSTM", "peepholes", peepholes=True, initial=True),
    case("LSTM", "peepholes_bidir", dirs=2, peepholes=True, initial=True),
    case("LSTM", "input_forget", input_forget=1, peepholes=True, initial=True),
    case("LSTM", "only_Y_c", outputs=2, initial=True),
    # |Cₜ| passes the clip bound here: clip bounds the gates, h(Cₜ) reads Cₜ unclipped.
    case("LSTM", "clip_cell_state", dirs=2, clip=0.6, initial=True),
    case("LSTM", "only_Y_c_lens", outputs=2, lens=True, peepholes=True),
    case("RNN", "sigmoid", activations=["Sigmoid"]),
    case("GRU", "tanh_sigmoid", activations=["Tanh", "Sigmoid", "Sigmoid", "Tanh"], dirs=2),
    case("LSTM", "sigmoid_tanh_sigmoid", activations=["Sigmoid", "Tanh", "Sigmoid"]),
    case("RNN", "softsign_softplus", dirs=2, activations=["Softsign", "Softplus"]),
    case(
        "LSTM",
        "hardsigmoid",
        activations=["HardSigmoid", "Tanh", "Tanh"],
        activation_alpha=[0.3],
        activation_beta=[0.45],
    ),
]

# Relu and the other piecewise activations: inputs scaled down and kept off the kink, so that
# no pre-activation sits near 0.
_PIECEWISE = [
    ("relu", ["Relu"], {}),
    ("leakyrelu", ["LeakyRelu"], {"activation_alpha": [0.2]}),
    ("elu", ["Elu"], {"activation_alpha": [0.7]}),
    ("affine", ["Affine"], {"activation_alpha": [0.8], "activation_beta": [0.1]}),
    ("scaledtanh", ["ScaledTanh"], {"activation_alpha": [1.3], "activation_beta": [0.7]}),
]
for _id, _acts, _kw in _PIECEWISE:
    _case = case("RNN", _id, activations=_acts, **_kw)
    _case.sampler = away_from([0.0], 0.2, -1.0, 1.0)
    CASES.append(_case)

# A sequence of length 0: its Y_h (and Y_c) is 0, and its initial state gets no gradient.
for _op in ("RNN", "GRU", "LSTM"):
    _case = case(_op, "lens_empty", dirs=2, lens=True, initial=True)
    _case.inputs[4] = np.array([0, 2], np.int32)
    CASES.append(_case)


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)


def _model(x_dims, op="GRU"):
    g = GATES[op]
    ins = [
        helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, x_dims),
        helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [1, g * HIDDEN, INPUT]),
        helper.make_tensor_value_info("R", onnx.TensorProto.FLOAT, [1, g * HIDDEN, HIDDEN]),
    ]
    nodes = [
        helper.make_node(op, ["X", "W", "R"], ["Y", "Y_h"], name="rec", hidden_size=HIDDEN),
        helper.make_node("ReduceSum", ["Y"], ["loss"], keepdims=0, name="sum"),
    ]
    out = helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])
    graph = helper.make_graph(nodes, "g", ins, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("time", [SEQ, "T"], ids=["static_time", "symbolic_time"])
def test_symbolic_batch(op, time):
    grad = gradient_model(_model([time, "batch", INPUT], op), wrt=["X", "W", "R"])
    rng = np.random.default_rng(0)
    g = GATES[op]
    names = [o.name for o in grad.graph.output]
    ours, theirs = Session(grad), Session(grad, backend="onnxruntime")
    for length, batch in ((SEQ, 5), (SEQ, 1)) if time == SEQ else ((2, 5), (6, 1)):
        feeds = {
            "X": rng.uniform(-1, 1, (length, batch, INPUT)).astype(np.float32),
            "W": rng.uniform(-1, 1, (1, g * HIDDEN, INPUT)).astype(np.float32),
            "R": rng.uniform(-1, 1, (1, g * HIDDEN, HIDDEN)).astype(np.float32),
        }
        for name, a, b in zip(names, ours.run(names, feeds), theirs.run(names, feeds)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_unknown_activation_is_named():
    model = _model([SEQ, BATCH, INPUT], "RNN")
    model.graph.node[0].attribute.append(helper.make_attribute("activations", ["Swish"]))
    with pytest.raises(UnsupportedOpError, match="activation 'Swish'"):
        gradient_model(model, wrt=["W"])


# A symbolic sequence length: the backward runs as two Scans per direction. One gradient
# model serves every length; it must match finite differences, the unrolled backward of a
# static copy of the same model, and onnxruntime.

TIMES = (1, 3, 5)


@dataclass
class Symbolic:
    """A recurrent node whose X has a symbolic time dimension, in a model with a loss.

    The loss L = Σ r·Y + Σ q·Y² + Σ r_h·Y_h + Σ r_c·Y_c keeps the terms of `outputs`
    (0: Y, 1: Y_h, 2: Y_c; Y is not an output of the node when 0 is absent). r and q
    broadcast over time, so the loss takes any length, and Y² makes each step's seed differ.
    """

    op: str
    id: str
    dirs: int = 1
    layout: int = 0
    lens: bool = False
    initial: bool = False
    peepholes: bool = False
    bias: bool = True
    outputs: tuple = (0, 1, 2)
    attrs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.op}-{self.id}"

    def model(self, time: int | str = "T", dtype=np.float64) -> onnx.ModelProto:
        """The model, with X's time dimension `time` (a name keeps it symbolic)."""
        g, d, lstm = GATES[self.op], self.dirs, self.op == "LSTM"
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        x = [time, BATCH, INPUT] if self.layout == 0 else [BATCH, time, INPUT]
        state = [d, BATCH, HIDDEN] if self.layout == 0 else [BATCH, d, HIDDEN]
        specs = {
            "X": x,
            "W": [d, g * HIDDEN, INPUT],
            "R": [d, g * HIDDEN, HIDDEN],
            "B": [d, 2 * g * HIDDEN] if self.bias else None,
            "L": "lens" if self.lens else None,
            "h0": state if self.initial else None,
            "c0": state if self.initial and lstm else None,
            "P": [d, 3 * HIDDEN] if self.peepholes else None,
        }
        if not lstm:
            del specs["c0"], specs["P"]
        ins, names = [], []
        for name, dims in specs.items():
            names.append("" if dims is None else name)
            if dims == "lens":
                ins.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT32, [BATCH]))
            elif dims is not None:
                ins.append(helper.make_tensor_value_info(name, elem, dims))
        while not names[-1]:
            names.pop()
        outs = ["Y" if 0 in self.outputs else "", "Y_h"] + (["Y_c"] if lstm else [])
        direction = "bidirectional" if d == 2 else self.attrs.get("direction", "forward")
        attrs = {**self.attrs, "hidden_size": HIDDEN, "direction": direction}
        if self.layout:
            attrs["layout"] = 1
        nodes = [helper.make_node(self.op, names, outs, name="rec", **attrs)]

        # The loss, its weights drawn once whatever the length.
        rng = np.random.default_rng(7)
        y_w = [1, d, BATCH, HIDDEN] if self.layout == 0 else [BATCH, 1, d, HIDDEN]
        weights, terms = [], []

        def term(value: str, label: str, shape: list) -> None:
            w = rng.standard_normal(shape).astype(dtype)
            weights.append(numpy_helper.from_array(w, f"w_{label}"))
            nodes.append(helper.make_node("Mul", [value, f"w_{label}"], [f"m_{label}"]))
            nodes.append(helper.make_node("ReduceSum", [f"m_{label}"], [label], keepdims=0))
            terms.append(label)

        if 0 in self.outputs:
            term("Y", "l_y", y_w)
            nodes.append(helper.make_node("Mul", ["Y", "Y"], ["Y2"]))
            term("Y2", "l_y2", y_w)
        for k, name in ((1, "Y_h"), (2, "Y_c")):
            if k in self.outputs and k < len(outs):
                term(name, f"l_{name}", state)
        nodes.append(helper.make_node("Sum", terms, ["loss"]))
        loss = helper.make_tensor_value_info("loss", elem, [])
        graph = helper.make_graph(nodes, "symbolic", ins, [loss], weights)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    def feeds(self, time: int, dtype=np.float64, empty: bool = True) -> dict:
        """Inputs for length `time`; sequence_lens [T, T // 2] (an empty sequence at T = 1),
        or [T, ⌈T / 2⌉] without `empty` (onnxruntime refuses a length of 0)."""
        rng = np.random.default_rng(time)
        out = {}
        for vi in self.model(time, dtype).graph.input:
            if vi.name == "L":
                short = time // 2 if empty else (time + 1) // 2
                out["L"] = np.array([time, short], np.int32)
                continue
            dims = [dim.dim_value for dim in vi.type.tensor_type.shape.dim]
            out[vi.name] = rng.uniform(-1.0, 1.0, dims).astype(dtype)
        return out

    def wrt(self) -> list[str]:
        return [i.name for i in self.model().graph.input if i.name != "L"]


def sym(op: str, id: str, direction: str = "forward", **kw) -> Symbolic:
    if direction != "forward":
        kw["attrs"] = {**kw.get("attrs", {}), "direction": direction}
    return Symbolic(op, id, **kw)


# op × direction × layout × sequence_lens, all of them.
SYMBOLIC = []
for _op in ("RNN", "GRU", "LSTM"):
    for _direction in ("forward", "reverse", "bidirectional"):
        for _layout in (0, 1):
            for _lens in (False, True):
                _id = f"{_direction}-layout{_layout}{'-lens' if _lens else ''}"
                _kw = {"layout": _layout, "lens": _lens, "initial": _direction != "forward"}
                if _direction == "bidirectional":
                    SYMBOLIC.append(sym(_op, _id, dirs=2, **_kw))
                else:
                    SYMBOLIC.append(sym(_op, _id, _direction, **_kw))

# Every other switch the unrolled table covers.
SYMBOLIC_EXTRA = [
    sym("RNN", "no_bias_only_Y", bias=False, outputs=(0,)),
    sym("GRU", "only_Y_h_lens", "reverse", outputs=(1,), lens=True, initial=True),
    sym("LSTM", "only_Y_c_lens", outputs=(2,), lens=True, peepholes=True),
    sym("LSTM", "Y_h_Y_c_bidir_lens", dirs=2, outputs=(1, 2), lens=True, initial=True),
    sym("LSTM", "Y_Y_c_layout1", layout=1, outputs=(0, 2), initial=True),
    sym("RNN", "clip", attrs={"clip": 0.6}, initial=True),
    sym("GRU", "clip_lens", attrs={"clip": 0.6}, lens=True),
    sym("LSTM", "clip_bidir", dirs=2, attrs={"clip": 0.6}, initial=True),
    sym("GRU", "lbr", attrs={"linear_before_reset": 1}, initial=True),
    sym(
        "GRU",
        "lbr_bidir_lens_layout1",
        dirs=2,
        layout=1,
        lens=True,
        attrs={"linear_before_reset": 1},
    ),
    sym("GRU", "lbr_no_bias", bias=False, attrs={"linear_before_reset": 1}),
    sym("LSTM", "peepholes_bidir_lens", dirs=2, peepholes=True, lens=True, initial=True),
    sym("LSTM", "input_forget", attrs={"input_forget": 1}, peepholes=True, initial=True),
    sym("RNN", "softsign_softplus", dirs=2, attrs={"activations": ["Softsign", "Softplus"]}),
    sym(
        "GRU", "tanh_sigmoid", dirs=2, attrs={"activations": ["Tanh", "Sigmoid", "Sigmoid", "Tanh"]}
    ),
    sym(
        "LSTM",
        "hardsigmoid",
        "reverse",
        lens=True,
        attrs={
            "activations": ["HardSigmoid", "Tanh", "Tanh"],
            "activation_alpha": [0.3],
            "activation_beta": [0.45],
        },
    ),
]


def _params(specs: list[Symbolic]) -> list:
    return [pytest.param(s, id=s.label) for s in specs]


@pytest.mark.parametrize("spec", _params(SYMBOLIC + SYMBOLIC_EXTRA))
def test_symbolic_length_gradient(spec):
    model = spec.model()
    wrt = spec.wrt()
    grad = gradient_model(model, wrt=wrt)
    onnx.checker.check_model(grad, full_check=True)
    appended = grad.graph.node[len(model.graph.node) :]
    assert sum(n.op_type == "Scan" for n in appended) == 2 * spec.dirs, "not the Scan backward"
    session = Session(grad)
    names = [f"{w}_grad" for w in wrt]
    for time in TIMES:
        feeds = spec.feeds(time)
        ours = dict(zip(wrt, session.run(names, feeds)))
        for report in check_gradients(model, feeds, wrt=wrt, full_max=8):
            # The same graph again, built inside check_gradients: the same numbers.
            np.testing.assert_array_equal(report.grad, ours[report.name])
            assert report.ok(1e-6, 1e-8), (
                f"{spec.label}, T = {time}: d loss/d {report.name} ({report.mode}) off by "
                f"{report.abs_error:.3g} (rel {report.rel_error:.3g})"
            )


@pytest.mark.parametrize("spec", _params(SYMBOLIC + SYMBOLIC_EXTRA))
def test_symbolic_length_matches_unrolled(spec):
    # The Scans and the unrolled steps emit the same step math: float64 rounding apart.
    wrt = spec.wrt()
    names = [f"{w}_grad" for w in wrt]
    scanned = Session(gradient_model(spec.model(), wrt=wrt))
    for time in (1, 4):
        static = gradient_model(spec.model(time), wrt=wrt)
        assert not any(n.op_type == "Scan" for n in static.graph.node)
        feeds = spec.feeds(time)
        for name, a, b in zip(names, scanned.run(names, feeds), Session(static).run(names, feeds)):
            scale = max(1.0, float(np.max(np.abs(b))))
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * scale, err_msg=f"T={time} {name}")


# onnxruntime refuses layout = 1 and a sequence length of 0: layout 0, lengths from 1.
ORT_SYMBOLIC = [
    sym("RNN", "bidir_lens", dirs=2, lens=True, initial=True),
    sym("GRU", "reverse_lens", "reverse", lens=True, initial=True),
    sym("GRU", "lbr_bidir", dirs=2, attrs={"linear_before_reset": 1}),
    sym("LSTM", "forward", outputs=(1, 2)),
    sym("LSTM", "peepholes_bidir_lens", dirs=2, peepholes=True, lens=True, initial=True),
]


@pytest.mark.parametrize("spec", _params(ORT_SYMBOLIC))
def test_symbolic_length_runs_in_onnxruntime(spec):
    wrt = spec.wrt()
    grad = gradient_model(spec.model(dtype=np.float32), wrt=wrt)
    names = [o.name for o in grad.graph.output]
    ours, theirs = Session(grad), Session(grad, backend="onnxruntime")
    for time in (2, 5):
        feeds = spec.feeds(time, np.float32, empty=False)
        for name, a, b in zip(names, ours.run(names, feeds), theirs.run(names, feeds)):
            scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
            np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=f"T={time} {name}"
            )
