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
from onnxgrad.errors import UnsupportedOpError
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


def test_loop_with_runtime_trip_count_is_refused():
    model, _, wrt = loop_model(np.float64, 3)
    model.graph.initializer.pop(0)  # M becomes a graph input
    model.graph.input.append(_vi("M", INT, []))
    with pytest.raises(UnsupportedOpError, match="static trip count"):
        gradient_model(model, wrt=wrt)


def test_loop_that_can_end_early_is_refused():
    model, _, wrt = loop_model(np.float64, 2, with_cond=True)
    body = model.graph.node[0].attribute[0].g
    body.node[-1].CopyFrom(helper.make_node("Greater", ["i", "i"], ["cond_out"]))
    with pytest.raises(UnsupportedOpError, match="end the loop early"):
        gradient_model(model, wrt=wrt)


def test_scan_with_runtime_length_is_refused():
    model, _, wrt = scan_model(np.float64, (0, 0), (0, 0), (0, 0), (0, 0))
    for vi in model.graph.input[1:3]:
        vi.type.tensor_type.shape.dim[0].dim_param = "T"
    with pytest.raises(UnsupportedOpError, match="known only at run time"):
        gradient_model(model, wrt=wrt)
