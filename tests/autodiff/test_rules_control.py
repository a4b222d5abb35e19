"""Gradients through If, Loop and Scan: float64 finite differences and onnxruntime parity.

The op table's one-node models cannot hold subgraphs, so each case here is a small model
made by a function of the float dtype; `check` runs the same three checks as the table:
the gradient model is valid ONNX with a default-domain backward, its float64 gradients
match central differences, and its float32 version gives onnxruntime's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrad import gradient_model
from onnxgrad.gradcheck import check_gradients
from onnxgrad.runtime.session import Session

OPSET = 18
INT, BOOL = TensorProto.INT64, TensorProto.BOOL


def _vi(name: str, elem: int, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, inits, elem: int, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "control", inputs, [_vi("loss", elem, [])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _loss(y: str, r: np.ndarray, dtype, tag: str = "") -> tuple[list, list]:
    """Nodes and initializer for l = Σ r · y (a scalar named `loss` unless `tag` is given)."""
    name = f"r{tag}"
    init = numpy_helper.from_array(r.astype(dtype), name)
    nodes = [
        helper.make_node("Mul", [y, name], [f"ry{tag}"]),
        helper.make_node("ReduceSum", [f"ry{tag}"], [f"loss{tag}"], keepdims=0),
    ]
    return nodes, [init]


def _losses(ys: list[tuple[str, tuple]], dtype, rng) -> tuple[list, list]:
    nodes, inits, terms = [], [], []
    for k, (y, shape) in enumerate(ys):
        n, i = _loss(y, rng.standard_normal(shape), dtype, tag=str(k))
        nodes += n
        inits += i
        terms.append(f"loss{k}")
    nodes.append(helper.make_node("Sum", terms, ["loss"]))
    return nodes, inits


# The models: each a function of (dtype) -> (model, feeds, wrt).


def if_model(dtype, taken: bool, dynamic: bool = False):
    """y = cond ? x·w : sin(x) + c; a second output z = cond ? w : x·x (w read directly)."""
    rows = "n" if dynamic else 2
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(1)
    then = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "w"], ["t_y"]),
            helper.make_node("Identity", ["w"], ["t_z"]),
        ],
        "then",
        [],
        [_vi("t_y", elem, [rows, 3]), _vi("t_z", elem, [rows, 3])],
    )
    otherwise = helper.make_graph(
        [
            helper.make_node("Sin", ["x"], ["e_s"]),
            helper.make_node("Add", ["e_s", "c"], ["e_y"]),
            helper.make_node("Mul", ["x", "x"], ["e_z"]),
        ],
        "else",
        [],
        [_vi("e_y", elem, [rows, 3]), _vi("e_z", elem, [rows, 3])],
    )
    nodes = [helper.make_node("If", ["cond"], ["y", "z"], then_branch=then, else_branch=otherwise)]
    more, inits = _losses([("y", (2, 3)), ("z", (2, 3))], dtype, rng)
    inputs = [_vi("cond", BOOL, []), _vi("x", elem, [rows, 3]), _vi("w", elem, [rows, 3])]
    inputs.append(_vi("c", elem, [3]))
    feeds = {
        "cond": np.array(taken),
        "x": rng.uniform(-1, 1, (2, 3)).astype(dtype),
        "w": rng.uniform(-1, 1, (2, 3)).astype(dtype),
        "c": rng.uniform(-1, 1, (3,)).astype(dtype),
    }
    return _model(nodes + more, inputs, inits, elem), feeds, ["x", "w", "c"]


def if_in_if_model(dtype, outer: bool, inner: bool):
    """y = outer ? (inner ? x·w : sin(w)) : x + w, the inner branches reading x and w two
    scopes up."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(4)
    inner_then = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["it"])], "inner_then", [], [_vi("it", elem, [3])]
    )
    inner_else = helper.make_graph(
        [helper.make_node("Sin", ["w"], ["ie"])], "inner_else", [], [_vi("ie", elem, [3])]
    )
    then = helper.make_graph(
        [helper.make_node("If", ["c2"], ["t_y"], then_branch=inner_then, else_branch=inner_else)],
        "then",
        [],
        [_vi("t_y", elem, [3])],
    )
    otherwise = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["e_y"])], "else", [], [_vi("e_y", elem, [3])]
    )
    nodes = [helper.make_node("If", ["c1"], ["y"], then_branch=then, else_branch=otherwise)]
    more, inits = _losses([("y", (3,))], dtype, rng)
    inputs = [_vi("c1", BOOL, []), _vi("c2", BOOL, []), _vi("x", elem, [3]), _vi("w", elem, [3])]
    feeds = {
        "c1": np.array(outer),
        "c2": np.array(inner),
        "x": rng.uniform(-1, 1, (3,)).astype(dtype),
        "w": rng.uniform(-1, 1, (3,)).astype(dtype),
    }
    return _model(nodes + more, inputs, inits, elem), feeds, ["x", "w"]


def loop_if_scan_model(dtype, flag: bool):
    """Loop → If → Scan: h ← flag ? scan(acc += x_t·w + i) from h : −h, three times. The
    Scan body reads w three scopes up and the iteration number i two scopes up."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(5)
    scan_body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["i_f"], to=elem),
            helper.make_node("Mul", ["x_t", "w"], ["xw"]),
            helper.make_node("Add", ["acc", "xw"], ["acc1"]),
            helper.make_node("Add", ["acc1", "i_f"], ["acc2"]),
            helper.make_node("Sin", ["acc2"], ["acc_next"]),
        ],
        "scan_body",
        [_vi("acc", elem, [2]), _vi("x_t", elem, [2])],
        [_vi("acc_next", elem, [2])],
    )
    then = helper.make_graph(
        [helper.make_node("Scan", ["h", "xs"], ["t_h"], body=scan_body, num_scan_inputs=1)],
        "then",
        [],
        [_vi("t_h", elem, [2])],
    )
    otherwise = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e_h"])], "else", [], [_vi("e_h", elem, [2])]
    )
    body = helper.make_graph(
        [helper.make_node("If", ["flag"], ["h_next"], then_branch=then, else_branch=otherwise)],
        "body",
        [_vi("i", INT, []), _vi("c", BOOL, []), _vi("h", elem, [2])],
        [_vi("c", BOOL, []), _vi("h_next", elem, [2])],
    )
    nodes = [helper.make_node("Loop", ["M", "", "h0"], ["h"], body=body)]
    more, inits = _losses([("h", (2,))], dtype, rng)
    inits.append(numpy_helper.from_array(np.array(3, np.int64), "M"))
    inputs = [_vi("flag", BOOL, []), _vi("h0", elem, [2]), _vi("xs", elem, [3, 2])]
    inputs.append(_vi("w", elem, [2]))
    feeds = {
        "flag": np.array(flag),
        "h0": rng.uniform(-1, 1, (2,)).astype(dtype),
        "xs": rng.uniform(-1, 1, (3, 2)).astype(dtype),
        "w": rng.uniform(-1, 1, (2,)).astype(dtype),
    }
    return _model(nodes + more, inputs, inits, elem), feeds, ["h0", "xs", "w"]


def _loop_body(elem: int, nested: bool = False, cond_out: str = "cond_in", dim=3):
    """h' = tanh(h·w + xs[i]) (or, nested, an If on i's parity), s = h'·u, cond passed on."""
    nodes = [
        helper.make_node("Gather", ["xs", "i"], ["x_i"], axis=0),
        helper.make_node("Mul", ["h", "w"], ["hw"]),
        helper.make_node("Add", ["hw", "x_i"], ["pre"]),
    ]
    if nested:
        # even iterations: tanh(pre); odd ones: sin(pre) · u (u read two scopes up)
        even = helper.make_graph(
            [helper.make_node("Tanh", ["pre"], ["ev"])], "even", [], [_vi("ev", elem, [dim])]
        )
        odd = helper.make_graph(
            [
                helper.make_node("Sin", ["pre"], ["od_s"]),
                helper.make_node("Mul", ["od_s", "u"], ["od"]),
            ],
            "odd",
            [],
            [_vi("od", elem, [dim])],
        )
        nodes += [
            helper.make_node("Mod", ["i", "two"], ["parity"]),
            helper.make_node("Equal", ["parity", "zero"], ["is_even"]),
            helper.make_node("If", ["is_even"], ["h_out"], then_branch=even, else_branch=odd),
        ]
    else:
        nodes.append(helper.make_node("Tanh", ["pre"], ["h_out"]))
    nodes.append(helper.make_node("Mul", ["h_out", "u"], ["s"]))
    if cond_out != "cond_in":
        nodes.append(helper.make_node("Identity", ["cond_in"], [cond_out]))
    inits = [
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    return helper.make_graph(
        nodes,
        "body",
        [_vi("i", INT, []), _vi("cond_in", BOOL, []), _vi("h", elem, [dim])],
        [_vi(cond_out, BOOL, []), _vi("h_out", elem, [dim]), _vi("s", elem, [dim])],
        inits if nested else [],
    )


def loop_model(
    dtype, trip: int = 3, nested: bool = False, with_cond: bool = False, dynamic: bool = False
):
    """A Loop of `trip` steps over a carried h, with a scan output and outer weights w, u."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(2)
    dim = "d" if dynamic else 3
    body = _loop_body(elem, nested, "cond_out" if with_cond else "cond_in", dim)
    inits = [numpy_helper.from_array(np.array(trip, np.int64), "M")]
    cond = ""
    if with_cond:
        inits.append(numpy_helper.from_array(np.array(True), "go"))
        cond = "go"
    nodes = [helper.make_node("Loop", ["M", cond, "h0"], ["h_final", "ss"], body=body)]
    more, extra = _losses([("h_final", (3,)), ("ss", (trip, 3))], dtype, rng)
    inputs = [
        _vi("h0", elem, [dim]),
        _vi("xs", elem, [max(trip, 1), dim]),
        _vi("w", elem, [dim]),
        _vi("u", elem, [dim]),
    ]
    feeds = {
        "h0": rng.uniform(-1, 1, (3,)).astype(dtype),
        "xs": rng.uniform(-1, 1, (max(trip, 1), 3)).astype(dtype),
        "w": rng.uniform(-1, 1, (3,)).astype(dtype),
        "u": rng.uniform(-1, 1, (3,)).astype(dtype),
    }
    model = _model(nodes + more, inputs, inits + extra, elem)
    wrt = ["h0", "xs", "w", "u"] if trip else ["h0"]
    return model, feeds, wrt


def rnn_loop_model(dtype, trip="input", seeds="both", early=False, steps=4):
    """h ← tanh(xs[i]·W + h·R) with s = sin(h) stacked, for a number of steps the run decides.

    trip: "input" (M fed), "shape" (M = len(xs)), "none" (no M: the body's condition ends
        it) or an int (a constant M: the unrolled path).
    early: the body's condition i + 1 < K ends the loop after K steps (K fed).
    seeds: what the loss reads: "final" (h_final), "scan" (the squares of ss) or "both".
    steps: the length of xs.
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Gather", ["xs", "i"], ["x_i"], axis=0),
        helper.make_node("MatMul", ["x_i", "W"], ["xW"]),
        helper.make_node("MatMul", ["h", "R"], ["hR"]),
        helper.make_node("Add", ["xW", "hR"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_next"]),
        helper.make_node("Sin", ["h_next"], ["s"]),
    ]
    if early or trip == "none":
        nodes.append(helper.make_node("Add", ["i", "one"], ["i1"]))
        nodes.append(helper.make_node("Less", ["i1", "K"], ["c_out"]))
    else:
        nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
    body = helper.make_graph(
        nodes,
        "body",
        [_vi("i", INT, []), _vi("c_in", BOOL, []), _vi("h", elem, [2, 4])],
        [_vi("c_out", BOOL, []), _vi("h_next", elem, [2, 4]), _vi("s", elem, [2, 4])],
        [numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    inputs = [
        _vi("xs", elem, ["T", 2, 3]),
        _vi("h0", elem, [2, 4]),
        _vi("W", elem, [3, 4]),
        _vi("R", elem, [4, 4]),
    ]
    inits, nodes, feeds = [], [], {}
    if trip == "input":
        inputs.append(_vi("M", INT, []))
        feeds["M"] = np.array(steps, np.int64)
    elif trip == "shape":
        nodes.append(helper.make_node("Shape", ["xs"], ["xs_shape"]))
        nodes.append(helper.make_node("Gather", ["xs_shape", "zero"], ["M"], axis=0))
        inits.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
    elif isinstance(trip, int):
        inits.append(numpy_helper.from_array(np.array(trip, np.int64), "M"))
    cond = ""
    if trip == "none":
        inits.append(numpy_helper.from_array(np.array(True), "go"))
        cond = "go"
    if early or trip == "none":
        inputs.append(_vi("K", INT, []))
        feeds["K"] = np.array(max(steps - 2, 1), np.int64)
    trip_name = "" if trip == "none" else "M"
    nodes.append(helper.make_node("Loop", [trip_name, cond, "h0"], ["h_final", "ss"], body=body))
    r_h = numpy_helper.from_array(rng.standard_normal((2, 4)).astype(dtype), "r_h")
    r_s = numpy_helper.from_array(rng.standard_normal((2, 4)).astype(dtype), "r_s")
    terms = []
    if seeds in ("final", "both"):
        nodes.append(helper.make_node("Mul", ["h_final", "r_h"], ["rh"]))
        nodes.append(helper.make_node("ReduceSum", ["rh"], ["loss_h"], keepdims=0))
        terms.append("loss_h")
    if seeds in ("scan", "both"):
        nodes.append(helper.make_node("Mul", ["ss", "ss"], ["ss2"]))
        nodes.append(helper.make_node("Mul", ["ss2", "r_s"], ["rs"]))
        nodes.append(helper.make_node("ReduceSum", ["rs"], ["loss_s"], keepdims=0))
        terms.append("loss_s")
    nodes.append(helper.make_node("Sum", terms, ["loss"]))
    feeds["xs"] = rng.uniform(-1, 1, (steps, 2, 3)).astype(dtype)
    feeds["h0"] = rng.uniform(-1, 1, (2, 4)).astype(dtype)
    feeds["W"] = rng.uniform(-1, 1, (3, 4)).astype(dtype)
    feeds["R"] = rng.uniform(-1, 1, (4, 4)).astype(dtype)
    model = _model(nodes, inputs, inits + [r_h, r_s], elem)
    return model, feeds, ["xs", "h0", "W", "R"]


def until_model(dtype):
    """A while loop whose count the data decide: acc += Σ xs[i]², h ← sin(h·w + xs[i]),
    until acc passes a limit set halfway between two partial sums (so the count holds under
    small perturbations). acc is a float carried value that only feeds the condition."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(7)
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["xs", "i"], ["x_i"], axis=0),
            helper.make_node("Mul", ["x_i", "x_i"], ["x2"]),
            helper.make_node("ReduceSum", ["x2"], ["sq"], keepdims=0),
            helper.make_node("Add", ["acc", "sq"], ["acc_next"]),
            helper.make_node("Less", ["acc_next", "limit"], ["c_out"]),
            helper.make_node("Mul", ["h", "w"], ["hw"]),
            helper.make_node("Add", ["hw", "x_i"], ["pre"]),
            helper.make_node("Sin", ["pre"], ["h_next"]),
        ],
        "body",
        [_vi("i", INT, []), _vi("c_in", BOOL, []), _vi("acc", elem, []), _vi("h", elem, [3])],
        [_vi("c_out", BOOL, []), _vi("acc_next", elem, []), _vi("h_next", elem, [3])],
    )
    xs = rng.uniform(-1, 1, (8, 3)).astype(dtype)
    partial = np.cumsum((xs.astype(np.float64) ** 2).sum(axis=1))
    limit = (partial[3] + partial[4]) / 2  # stops after 5 steps of 8
    inits = [
        numpy_helper.from_array(np.array(True), "go"),
        numpy_helper.from_array(np.array(0, dtype), "acc0"),
        numpy_helper.from_array(np.array(limit, dtype), "limit"),
    ]
    node = helper.make_node("Loop", ["M", "go", "acc0", "h0"], ["acc", "h_final"], body=body)
    more, extra = _losses([("h_final", (3,))], dtype, rng)
    inputs = [
        _vi("M", INT, []),
        _vi("xs", elem, ["T", 3]),
        _vi("h0", elem, [3]),
        _vi("w", elem, [3]),
    ]
    feeds = {
        "M": np.array(8, np.int64),
        "xs": xs,
        "h0": rng.uniform(-1, 1, (3,)).astype(dtype),
        "w": rng.uniform(-1, 1, (3,)).astype(dtype),
    }
    return _model([node] + more, inputs, inits + extra, elem), feeds, ["xs", "h0", "w"]


def keras_while_model(dtype, shared: bool = False):
    """The Loop tf2onnx makes of a Keras SimpleRNN: M and the condition computed at run
    time, an integer counter and time index carried, and the input sequence and weights
    carried through unchanged: h ← tanh(xs[t]·W + h·R) while counter < M and t < T.
    shared: the body also reads W itself from the enclosing scope (h ← tanh(xs[t]·2W + h·R))."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(8)
    weight = "Wc_W" if shared else "Wc"
    body = helper.make_graph(
        [helper.make_node("Add", ["Wc", "W"], ["Wc_W"])] * shared
        + [
            helper.make_node("Add", ["k", "one"], ["k_next"]),
            helper.make_node("Add", ["t", "one"], ["t_next"]),
            helper.make_node("Gather", ["seq", "t"], ["x_t"], axis=0),
            helper.make_node("MatMul", ["x_t", weight], ["xW"]),
            helper.make_node("MatMul", ["h", "Rc"], ["hR"]),
            helper.make_node("Add", ["xW", "hR"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_next"]),
            helper.make_node("Less", ["k_next", "M_outer"], ["more_k"]),
            helper.make_node("Less", ["t_next", "T_outer"], ["more_t"]),
            helper.make_node("And", ["more_k", "more_t"], ["c_out"]),
            helper.make_node("Identity", ["h_next"], ["y_t"]),
        ],
        "body",
        [
            _vi("i", INT, []),
            _vi("c_in", BOOL, []),
            _vi("k", INT, []),
            _vi("t", INT, []),
            _vi("h", elem, [None, 4]),
            _vi("seq", elem, [None, None, 3]),
            _vi("Wc", elem, [3, 4]),
            _vi("Rc", elem, [4, 4]),
        ],
        [
            _vi("c_out", BOOL, []),
            _vi("k_next", INT, []),
            _vi("t_next", INT, []),
            _vi("h_next", elem, [None, 4]),
            _vi("seq", elem, [None, None, 3]),
            _vi("Wc", elem, [3, 4]),
            _vi("Rc", elem, [4, 4]),
            _vi("y_t", elem, [None, 4]),
        ],
        [numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    nodes = [
        helper.make_node("Transpose", ["x"], ["seq0"], perm=[1, 0, 2]),
        helper.make_node("Shape", ["seq0"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["T_outer"], axis=0),
        helper.make_node("Max", ["T_outer", "zero"], ["M_outer"]),
        helper.make_node("Less", ["zero", "M_outer"], ["go"]),
        helper.make_node(
            "Loop",
            ["M_outer", "go", "zero", "zero", "h0", "seq0", "W", "R"],
            ["k", "t", "h_final", "seq_out", "W_out", "R_out", "ys"],
            body=body,
        ),
    ]
    more, inits = _losses([("h_final", (2, 4))], dtype, rng)
    inits.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
    inputs = [_vi("x", elem, [2, "T", 3]), _vi("h0", elem, [2, 4])]
    inputs += [_vi("W", elem, [3, 4]), _vi("R", elem, [4, 4])]
    feeds = {
        "x": rng.uniform(-1, 1, (2, 5, 3)).astype(dtype),
        "h0": rng.uniform(-1, 1, (2, 4)).astype(dtype),
        "W": rng.uniform(-1, 1, (3, 4)).astype(dtype),
        "R": rng.uniform(-1, 1, (4, 4)).astype(dtype),
    }
    return _model(nodes + more, inputs, inits, elem), feeds, ["x", "h0", "W", "R"]


def loop_in_loop_model(dtype, outer_trip=None, inner_trip=None):
    """h ← u · loop M₂ times (g ← tanh(g·w + i)) from h, M₁ times:
    a Loop in a Loop's body, each M fed at run time (or constant when given)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(9)
    inner = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["i_f"], to=elem),
            helper.make_node("Mul", ["g", "w"], ["gw"]),
            helper.make_node("Add", ["gw", "i_f"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["g_next"]),
        ],
        "inner",
        [_vi("j", INT, []), _vi("c2", BOOL, []), _vi("g", elem, [3])],
        [_vi("c2", BOOL, []), _vi("g_next", elem, [3])],
    )
    outer = helper.make_graph(
        [
            helper.make_node("Loop", ["M2", "", "h"], ["h_in"], body=inner),
            helper.make_node("Mul", ["h_in", "u"], ["h_next"]),
        ],
        "outer",
        [_vi("i", INT, []), _vi("c1", BOOL, []), _vi("h", elem, [3])],
        [_vi("c1", BOOL, []), _vi("h_next", elem, [3])],
    )
    nodes = [helper.make_node("Loop", ["M1", "", "h0"], ["h_final"], body=outer)]
    more, inits = _losses([("h_final", (3,))], dtype, rng)
    inputs = [_vi("h0", elem, [3]), _vi("w", elem, [3]), _vi("u", elem, [3])]
    feeds = {
        "h0": rng.uniform(-1, 1, (3,)).astype(dtype),
        "w": rng.uniform(-1, 1, (3,)).astype(dtype),
        "u": rng.uniform(-1, 1, (3,)).astype(dtype),
    }
    for name, trip, value in (("M1", outer_trip, 3), ("M2", inner_trip, 2)):
        if trip is None:
            inputs.append(_vi(name, INT, []))
            feeds[name] = np.array(value, np.int64)
        else:
            inits.append(numpy_helper.from_array(np.array(trip, np.int64), name))
    return _model(nodes + more, inputs, inits, elem), feeds, ["h0", "w", "u"]


def runtime_trip(make):
    """`make` with its constant M turned into a graph input fed the same value."""

    def made(dtype):
        model, feeds, wrt = make(dtype)
        init = next(t for t in model.graph.initializer if t.name == "M")
        model.graph.initializer.remove(init)
        model.graph.input.append(_vi("M", INT, []))
        return model, {**feeds, "M": numpy_helper.to_array(init)}, wrt

    return made


def runtime_length(make, dims):
    """`make` with dimension dims[name] of each named input made symbolic ("T")."""

    def made(dtype):
        model, feeds, wrt = make(dtype)
        for vi in model.graph.input:
            if vi.name in dims:
                vi.type.tensor_type.shape.dim[dims[vi.name]].dim_param = "T"
        return model, feeds, wrt

    return made


def scan_model(dtype, in_axes=(0, 1), in_dirs=(0, 1), out_axes=(0, 1), out_dirs=(0, 1)):
    """Scan over a (4, 2) and a (2, 4) input: h' = tanh(h·W + a + b), outputs h'·b and h'."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(3)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h", "W"], ["hW"]),
            helper.make_node("Add", ["hW", "a_t"], ["p"]),
            helper.make_node("Add", ["p", "b_t"], ["q"]),
            helper.make_node("Tanh", ["q"], ["h_next"]),
            helper.make_node("Mul", ["h_next", "b_t"], ["y1"]),
            helper.make_node("Identity", ["h_next"], ["y2"]),
        ],
        "body",
        [_vi("h", elem, [2]), _vi("a_t", elem, [2]), _vi("b_t", elem, [2])],
        [_vi("h_next", elem, [2]), _vi("y1", elem, [2]), _vi("y2", elem, [2])],
    )
    node = helper.make_node(
        "Scan",
        ["h0", "a", "b"],
        ["h_final", "ys1", "ys2"],
        body=body,
        num_scan_inputs=2,
        scan_input_axes=list(in_axes),
        scan_input_directions=list(in_dirs),
        scan_output_axes=list(out_axes),
        scan_output_directions=list(out_dirs),
    )
    a_shape = (4, 2) if in_axes[0] in (0, -2) else (2, 4)
    b_shape = (4, 2) if in_axes[1] in (0, -2) else (2, 4)
    y_shapes = [(4, 2) if ax in (0, -2) else (2, 4) for ax in out_axes]
    more, inits = _losses(
        [("h_final", (2,)), ("ys1", y_shapes[0]), ("ys2", y_shapes[1])], dtype, rng
    )
    inputs = [
        _vi("h0", elem, [2]),
        _vi("a", elem, list(a_shape)),
        _vi("b", elem, list(b_shape)),
        _vi("W", elem, [2, 2]),
    ]
    feeds = {
        "h0": rng.uniform(-1, 1, (2,)).astype(dtype),
        "a": rng.uniform(-1, 1, a_shape).astype(dtype),
        "b": rng.uniform(-1, 1, b_shape).astype(dtype),
        "W": rng.uniform(-1, 1, (2, 2)).astype(dtype),
    }
    return _model([node] + more, inputs, inits, elem), feeds, ["h0", "a", "b", "W"]


@dataclass(frozen=True)
class ControlCase:
    """One entry of this family's table (test_registry reads `op`).

    Attributes:
        op: the control-flow op the model is built around.
        id: a short label.
        make: builds (model, feeds, wrt) for a float dtype.
    """

    op: str
    id: str
    make: Callable


CASES = [
    ControlCase("If", "then", lambda d: if_model(d, True)),
    ControlCase("If", "else", lambda d: if_model(d, False)),
    ControlCase("If", "If_nested_then", lambda d: if_in_if_model(d, True, False)),
    ControlCase("If", "If_nested_else", lambda d: if_in_if_model(d, False, True)),
    ControlCase("If", "dynamic", lambda d: if_model(d, True, dynamic=True)),
    ControlCase("Loop", "M", lambda d: loop_model(d, 3)),
    ControlCase("Loop", "M_cond", lambda d: loop_model(d, 2, with_cond=True)),
    ControlCase("Loop", "zero", lambda d: loop_model(d, 0)),
    ControlCase("Loop", "one", lambda d: loop_model(d, 1)),
    ControlCase("Loop", "dynamic", lambda d: loop_model(d, 2, dynamic=True)),
    ControlCase("Scan", "forward", lambda d: scan_model(d, (0, 0), (0, 0), (0, 0), (0, 0))),
    ControlCase("Scan", "reverse_axes", lambda d: scan_model(d)),
    ControlCase(
        "Scan", "negative_axes", lambda d: scan_model(d, (-2, -1), (1, 0), (-1, -2), (1, 0))
    ),
    ControlCase("Loop", "If_nested", lambda d: loop_model(d, 3, nested=True)),
    ControlCase("Loop", "If_Scan_nested_then", lambda d: loop_if_scan_model(d, True)),
    ControlCase("Loop", "If_Scan_nested_else", lambda d: loop_if_scan_model(d, False)),
    # A number of steps the run decides: the reverse Loop.
    ControlCase("Loop", "runtime_M", runtime_trip(lambda d: loop_model(d, 3))),
    ControlCase("Loop", "runtime_M_If_nested", runtime_trip(lambda d: loop_model(d, 3, True))),
    ControlCase("Loop", "runtime_M_zero", runtime_trip(lambda d: loop_model(d, 0))),
    ControlCase("Loop", "M_from_shape", lambda d: rnn_loop_model(d, "shape")),
    ControlCase("Loop", "M_fed_final_only", lambda d: rnn_loop_model(d, seeds="final")),
    ControlCase("Loop", "M_fed_scan_only", lambda d: rnn_loop_model(d, seeds="scan")),
    ControlCase("Loop", "early_exit", lambda d: rnn_loop_model(d, early=True)),
    ControlCase("Loop", "no_M_while", lambda d: rnn_loop_model(d, "none")),
    ControlCase("Loop", "data_decides_count", until_model),
    ControlCase("Loop", "keras_while", keras_while_model),
    ControlCase("Loop", "keras_while_shared_weight", lambda d: keras_while_model(d, True)),
    ControlCase("Loop", "Loop_nested_runtime", loop_in_loop_model),
    ControlCase("Loop", "Loop_nested_inner_runtime", lambda d: loop_in_loop_model(d, 3)),
    ControlCase("Loop", "Loop_nested_outer_runtime", lambda d: loop_in_loop_model(d, None, 2)),
    ControlCase(
        "Scan",
        "runtime_length",
        runtime_length(lambda d: scan_model(d, (0, 0), (0, 0), (0, 0), (0, 0)), {"a": 0, "b": 0}),
    ),
    ControlCase(
        "Scan", "runtime_length_reverse_axes", runtime_length(scan_model, {"a": 0, "b": 1})
    ),
    ControlCase(
        "Scan",
        "runtime_length_negative_axes",
        runtime_length(
            lambda d: scan_model(d, (-2, -1), (1, 0), (-1, -2), (1, 0)), {"a": 0, "b": 1}
        ),
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.op}-{c.id}") for c in CASES])
def test_gradient(case):
    # 1. Valid ONNX, default-domain backward, float64 gradients match central differences.
    model, feeds, wrt = case.make(np.float64)
    grad = gradient_model(model, wrt=wrt)
    onnx.checker.check_model(grad, full_check=True)
    domains = {n.domain for n in grad.graph.node[len(model.graph.node) :]}
    assert domains <= {"", "ai.onnx"}, f"backward nodes outside ai.onnx: {domains}"
    for report in check_gradients(model, feeds, wrt=wrt):
        assert report.ok(1e-6, 1e-8), (
            f"d loss/d {report.name} ({report.mode}) off by {report.abs_error:.3g}\n"
            f"analytic {report.analytic[:6]}\nnumeric  {report.numeric[:6]}"
        )

    # 2. The float32 gradient model gives onnxruntime's numbers.
    model32, feeds32, wrt32 = case.make(np.float32)
    grad32 = gradient_model(model32, wrt=wrt32)
    names = [o.name for o in grad32.graph.output]
    ours = Session(grad32).run(names, feeds32)
    theirs = Session(grad32, backend="onnxruntime").run(names, feeds32)
    for name, a, b in zip(names, ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name} vs onnxruntime")


def test_if_gradient_is_an_if():
    model, _, wrt = if_model(np.float64, True)
    grad = gradient_model(model, wrt=wrt)
    backward = grad.graph.node[len(model.graph.node) :]
    assert [n.op_type for n in backward].count("If") == 1


def _backward_ops(model: onnx.ModelProto, grad: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in grad.graph.node[len(model.graph.node) :]]


def _reverse_carried(grad: onnx.ModelProto) -> list[int]:
    """The number of values each reverse Loop of a gradient model carries."""
    loops = [n for n in grad.graph.node if n.op_type == "Loop"]
    return [len(n.input) - 2 for n in loops if n.attribute[0].g.name.endswith("_grad_reverse")]


def _grads(model: onnx.ModelProto, feeds: dict, wrt: list[str], backend: str = "numpy"):
    grad = gradient_model(model, wrt=wrt)
    return Session(grad, backend=backend).run([f"{w}_grad" for w in wrt], feeds)


@pytest.mark.parametrize("seeds", ["final", "scan", "both"])
def test_reverse_loop_matches_the_unrolled_one(seeds):
    # The same Loop with M fed (a reverse Loop) and M constant (unrolled): one gradient model
    # serves every M fed, 0 and 1 steps included, and matches the unrolled one to rounding.
    model, feeds, wrt = rnn_loop_model(np.float64, seeds=seeds, steps=5)
    grad = gradient_model(model, wrt=wrt)
    assert _backward_ops(model, grad).count("Loop") == 2  # the recording forward, the reverse
    session = Session(grad)
    for trip in (0, 1, 2, 5):
        fixed, _, _ = rnn_loop_model(np.float64, trip, seeds=seeds, steps=5)
        unrolled = gradient_model(fixed, wrt=wrt)
        assert "Loop" not in _backward_ops(fixed, unrolled)
        ours = session.run([f"{w}_grad" for w in wrt], {**feeds, "M": np.array(trip)})
        theirs = Session(unrolled).run([f"{w}_grad" for w in wrt], feeds)
        for w, a, b in zip(wrt, ours, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"{w}, M={trip}")


def test_reverse_loop_runs_in_onnxruntime_for_every_trip_count():
    model, feeds, wrt = rnn_loop_model(np.float32, steps=4)
    grad = gradient_model(model, wrt=wrt)
    names = [o.name for o in grad.graph.output]
    ours_session, theirs_session = Session(grad), Session(grad, backend="onnxruntime")
    for trip in (0, 1, 4):
        run = {**feeds, "M": np.array(trip, np.int64)}
        ours, theirs = ours_session.run(names, run), theirs_session.run(names, run)
        for name, a, b in zip(names, ours, theirs):
            assert a.shape == b.shape, f"{name}, M={trip}: {a.shape} vs {b.shape}"
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name}, M={trip}")
    if not trip:
        np.testing.assert_array_equal(ours[names.index("W_grad")], 0)


def test_reverse_loop_zero_steps_passes_the_final_gradient_to_the_start():
    model, feeds, _ = rnn_loop_model(np.float64, seeds="final")
    dh0, dW = _grads(model, {**feeds, "M": np.array(0)}, ["h0", "W"])
    np.testing.assert_array_equal(dh0, numpy_helper.to_array(model.graph.initializer[0]))
    np.testing.assert_array_equal(dW, np.zeros((3, 4)))


def test_early_exit_matches_the_unrolled_loop_of_that_many_steps():
    # M = 6 with a body condition that stops after K = 3 steps, against a constant M = 3.
    model, feeds, wrt = rnn_loop_model(np.float64, early=True, steps=6)
    feeds = {**feeds, "M": np.array(6), "K": np.array(3)}
    fixed, fixed_feeds, _ = rnn_loop_model(np.float64, 3, steps=6)
    ours, theirs = _grads(model, feeds, wrt), _grads(fixed, fixed_feeds, wrt)
    for w, a, b in zip(wrt, ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=w)


def test_loop_whose_body_condition_turns_false_runs_one_step():
    # A constant M with a body condition that is false at once: one step, not M.
    model, feeds, _ = loop_model(np.float64, 2, with_cond=True)
    body = model.graph.node[0].attribute[0].g
    body.node[-1].CopyFrom(helper.make_node("Greater", ["i", "i"], ["cond_out"]))
    grad = gradient_model(model, wrt=["h0", "w"])
    assert "Loop" in _backward_ops(model, grad)
    for report in check_gradients(model, feeds, wrt=["h0", "w"]):
        assert report.ok(1e-6, 1e-8), f"{report.name}: off by {report.abs_error:.3g}"


def test_keras_while_gradient_skips_the_sequence_when_not_wanted():
    # The input sequence rides along as a loop-invariant carried value: wanted, its gradient
    # is carried back through the steps; not wanted, the reverse Loop carries only h, W, R.
    model, feeds, _ = keras_while_model(np.float64)
    with_x = gradient_model(model, wrt=["x", "W", "R"])
    without = gradient_model(model, wrt=["W", "R"])
    carried, fewer = _reverse_carried(with_x), _reverse_carried(without)
    assert carried == [4] and fewer == [3], (carried, fewer)
    ours = Session(without).run(["W_grad", "R_grad"], feeds)
    full = Session(with_x).run(["W_grad", "R_grad"], feeds)
    for a, b in zip(ours, full):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_data_dependent_count_is_what_the_forward_ran():
    model, feeds, wrt = until_model(np.float64)
    grad = gradient_model(model, wrt=wrt)
    dxs = Session(grad).run(["xs_grad"], feeds)[0]
    # Rows past the fifth are never read: their gradient is a true zero; the others are not.
    assert np.all(dxs[5:] == 0) and np.all(np.abs(dxs[:5]).sum(axis=1) > 0)
