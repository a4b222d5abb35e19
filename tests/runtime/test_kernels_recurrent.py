"""RNN, GRU and LSTM kernels against onnxruntime (float32) over attribute combinations."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxgrad.errors import UnsupportedOpError
from onnxgrad.runtime.session import Session

SEQ, BATCH, INPUT, HIDDEN = 4, 3, 3, 5
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def make(
    op: str,
    direction: str = "forward",
    layout: int = 0,
    bias: bool = True,
    lens: bool = False,
    initial: bool = False,
    peepholes: bool = False,
    outputs: tuple[bool, ...] = (True, True, True),
    seed: int = 0,
    dtype=np.float32,
    **attrs,
):
    """A one-node model of the op and random feeds for it."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    x_shape = (SEQ, BATCH, INPUT) if layout == 0 else (BATCH, SEQ, INPUT)
    state_shape = (dirs, BATCH, HIDDEN) if layout == 0 else (BATCH, dirs, HIDDEN)
    specs = [
        ("X", x_shape),
        ("W", (dirs, g * HIDDEN, INPUT)),
        ("R", (dirs, g * HIDDEN, HIDDEN)),
        ("B", (dirs, 2 * g * HIDDEN) if bias else None),
        ("sequence_lens", (BATCH,) if lens else None),
        ("initial_h", state_shape if initial else None),
    ]
    if op == "LSTM":
        specs += [
            ("initial_c", state_shape if initial else None),
            ("P", (dirs, 3 * HIDDEN) if peepholes else None),
        ]
    while specs[-1][1] is None:
        specs.pop()
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs, names, feeds = [], [], {}
    for name, shape in specs:
        if shape is None:
            names.append("")
            continue
        names.append(name)
        if name == "sequence_lens":
            feeds[name] = np.array([SEQ, 1, SEQ - 2][:BATCH], np.int32)
            inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT32, shape))
        else:
            feeds[name] = rng.uniform(-1, 1, shape).astype(dtype)
            inputs.append(helper.make_tensor_value_info(name, onnx_type, shape))
    n_out = 3 if op == "LSTM" else 2
    outs = [f"out{k}" if outputs[k] else "" for k in range(n_out)]
    while outs and not outs[-1]:
        outs.pop()
    node = helper.make_node(
        op,
        names,
        outs,
        name="rec",
        hidden_size=HIDDEN,
        direction=direction,
        layout=layout if layout else None,
        **attrs,
    )
    y_shape = (SEQ, dirs, BATCH, HIDDEN) if layout == 0 else (BATCH, SEQ, dirs, HIDDEN)
    shapes = [y_shape, state_shape, state_shape]
    graph_outputs = [
        helper.make_tensor_value_info(o, onnx_type, shapes[k]) for k, o in enumerate(outs) if o
    ]
    graph = helper.make_graph([node], "rec", inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return model, feeds, [o for o in outs if o]


def batch_first(kwargs: dict):
    """Our outputs of the layout-1 model, and onnxruntime's of the same model in layout 0.

    onnxruntime's CPU kernels refuse layout = 1, so the reference is the layout-0 node fed the
    transposed inputs, with its outputs transposed back.
    """
    model, feeds, names = make(**kwargs)
    ours = Session(model).run(names, feeds)
    model0, _, _ = make(**{**kwargs, "layout": 0})
    feeds0 = {
        k: v.swapaxes(0, 1) if k in ("X", "initial_h", "initial_c") else v for k, v in feeds.items()
    }
    theirs = Session(model0, backend="onnxruntime").run(names, feeds0)
    theirs = [v.transpose(2, 0, 1, 3) if v.ndim == 4 else v.swapaxes(0, 1) for v in theirs]
    return names, ours, theirs


def compare(kwargs: dict, rtol=1e-5, atol=1e-5):
    if kwargs.get("layout", 0) == 1:
        names, ours, theirs = batch_first(kwargs)
    else:
        model, feeds, names = make(**kwargs)
        ours = Session(model).run(names, feeds)
        theirs = Session(model, backend="onnxruntime").run(names, feeds)
    for name, a, b in zip(names, ours, theirs):
        assert a.shape == b.shape, f"{name}: {a.shape} here, {b.shape} in onnxruntime"
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


COMBOS = list(
    itertools.product(
        ["RNN", "GRU", "LSTM"],
        ["forward", "reverse", "bidirectional"],
        [0, 1],  # layout
        [False, True],  # sequence_lens
    )
)


@pytest.mark.parametrize(
    "op, direction, layout, lens",
    COMBOS,
    ids=[f"{o}-{d}-layout{la}-{'lens' if le else 'full'}" for o, d, la, le in COMBOS],
)
def test_against_onnxruntime(op, direction, layout, lens):
    compare(
        {
            "op": op,
            "direction": direction,
            "layout": layout,
            "lens": lens,
            "initial": True,
            "peepholes": op == "LSTM",
        }
    )


EXTRA = [
    ("RNN-no_bias", {"op": "RNN", "bias": False}),
    ("GRU-no_bias", {"op": "GRU", "bias": False, "direction": "bidirectional"}),
    ("LSTM-no_bias-no_initial", {"op": "LSTM", "bias": False}),
    (
        "GRU-linear_before_reset",
        {"op": "GRU", "linear_before_reset": 1, "lens": True, "initial": True},
    ),
    (
        "GRU-linear_before_reset-bidir-layout1",
        {"op": "GRU", "linear_before_reset": 1, "direction": "bidirectional", "layout": 1},
    ),
    ("RNN-relu", {"op": "RNN", "activations": ["Relu"]}),
    (
        "RNN-sigmoid-bidir",
        {"op": "RNN", "activations": ["Sigmoid", "Tanh"], "direction": "bidirectional"},
    ),
    ("GRU-tanh-relu", {"op": "GRU", "activations": ["Tanh", "Relu"]}),
    ("LSTM-tanh-sigmoid-relu", {"op": "LSTM", "activations": ["Tanh", "Sigmoid", "Relu"]}),
    (
        "RNN-leakyrelu-alpha",
        {"op": "RNN", "activations": ["LeakyRelu"], "activation_alpha": [0.3]},
    ),
    (
        "GRU-hardsigmoid-alpha-beta",
        {
            "op": "GRU",
            "activations": ["HardSigmoid", "Tanh"],
            "activation_alpha": [0.3],
            "activation_beta": [0.4],
        },
    ),
    ("RNN-clip", {"op": "RNN", "clip": 0.5, "lens": True}),
    ("GRU-clip", {"op": "GRU", "clip": 0.3, "linear_before_reset": 1}),
    ("GRU-clip-lbr0", {"op": "GRU", "clip": 0.3}),
    ("LSTM-clip-peepholes", {"op": "LSTM", "clip": 0.4, "peepholes": True, "initial": True}),
    ("LSTM-input_forget", {"op": "LSTM", "input_forget": 1, "peepholes": True, "initial": True}),
    ("RNN-only_Y", {"op": "RNN", "outputs": (True, False)}),
    ("RNN-only_Y_h", {"op": "RNN", "outputs": (False, True)}),
    ("LSTM-only_Y_c", {"op": "LSTM", "outputs": (False, False, True), "lens": True}),
    ("LSTM-Y_h-Y_c", {"op": "LSTM", "outputs": (False, True, True), "direction": "reverse"}),
]


@pytest.mark.parametrize("kwargs", [k for _, k in EXTRA], ids=[i for i, _ in EXTRA])
def test_attributes_against_onnxruntime(kwargs):
    compare(kwargs)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_float64_matches_float32(op):
    model32, feeds32, names = make(op, "bidirectional", lens=True, initial=True)
    model64, feeds64, _ = make(op, "bidirectional", lens=True, initial=True, dtype=np.float64)
    out32 = Session(model32).run(names, feeds32)
    out64 = Session(model64).run(names, feeds64)
    for a, b in zip(out32, out64):
        assert b.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_activation_is_named():
    model, feeds, names = make("RNN", activations=["Swish"])
    with pytest.raises(UnsupportedOpError, match="Swish"):
        Session(model).run(names, feeds)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_empty_sequence_ends_in_zero_states(op, direction):
    # onnxruntime's reading: a sequence of length 0 has Y = 0 and Y_h = Y_c = 0, not initial_h.
    model, feeds, names = make(op, direction, lens=True, initial=True)
    feeds["sequence_lens"] = np.array([0, SEQ, 2], np.int32)
    ours = Session(model).run(names, feeds)
    theirs = Session(model, backend="onnxruntime").run(names, feeds)
    for name, a, b in zip(names, ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
