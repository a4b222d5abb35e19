"""Op table for RNN, GRU and LSTM: backpropagation through time against finite differences."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxgrad import gradient_model
from onnxgrad.errors import UnsupportedOpError
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


def test_symbolic_sequence_length_is_refused():
    with pytest.raises(UnsupportedOpError, match="rec.*sequence length .* must be static"):
        gradient_model(_model(["T", BATCH, INPUT]), wrt=["W"])


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_symbolic_batch(op):
    grad = gradient_model(_model([SEQ, "batch", INPUT], op), wrt=["X", "W", "R"])
    rng = np.random.default_rng(0)
    g = GATES[op]
    feeds = {
        "X": rng.uniform(-1, 1, (SEQ, 5, INPUT)).astype(np.float32),
        "W": rng.uniform(-1, 1, (1, g * HIDDEN, INPUT)).astype(np.float32),
        "R": rng.uniform(-1, 1, (1, g * HIDDEN, HIDDEN)).astype(np.float32),
    }
    names = [o.name for o in grad.graph.output]
    ours = Session(grad).run(names, feeds)
    theirs = Session(grad, backend="onnxruntime").run(names, feeds)
    for name, a, b in zip(names, ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_unknown_activation_is_named():
    model = _model([SEQ, BATCH, INPUT], "RNN")
    model.graph.node[0].attribute.append(helper.make_attribute("activations", ["Swish"]))
    with pytest.raises(UnsupportedOpError, match="activation 'Swish'"):
        gradient_model(model, wrt=["W"])
