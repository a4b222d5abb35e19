"""If, Loop and Scan kernels against onnxruntime: early exits, integer state, zero
iterations, axes and directions, opset 8 batched Scan with sequence_lens, and subgraphs
that read names from two scopes up."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrad.errors import ExecutionError
from onnxgrad.runtime.session import Session

FLOAT, INT, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _vi(name: str, elem: int, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "control", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def while_loop(trip: int | None, start: float):
    """k, x = 0, start; while max(x) < 10 (and k < M): k += 1; x *= 1.5; scan out x."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["k", "one"], ["k_next"]),
            helper.make_node("Mul", ["x", "rate"], ["x_next"]),
            helper.make_node("ReduceMax", ["x_next"], ["top"], keepdims=0),
            helper.make_node("Less", ["top", "limit"], ["go"]),
            helper.make_node("Identity", ["x_next"], ["seen"]),
        ],
        "body",
        [_vi("i", INT, []), _vi("c", BOOL, []), _vi("k", INT, []), _vi("x", FLOAT, [2])],
        [_vi("go", BOOL, None), _vi("k_next", INT, []), _vi("x_next", FLOAT, [2])]
        + [_vi("seen", FLOAT, [2])],
        [_const("one", np.int64(1)), _const("rate", np.float32(1.5))],
    )
    inits = [_const("limit", np.float32(10.0)), _const("k0", np.int64(0))]
    if trip is not None:
        inits.append(_const("M", np.int64(trip)))
    node = helper.make_node(
        "Loop", ["M" if trip is not None else "", "c0", "k0", "x0"], ["k", "x", "xs"], body=body
    )
    model = _model(
        [node],
        [_vi("c0", BOOL, []), _vi("x0", FLOAT, [2])],
        [_vi("k", INT, []), _vi("x", FLOAT, [2]), _vi("xs", FLOAT, [None, 2])],
        inits,
    )
    feeds = {"c0": np.array(True), "x0": np.array([start, start / 2], np.float32)}
    return model, feeds


def for_loop(trip: int):
    """M only, with a body condition that turns false after two steps (onnxruntime and
    onnx's reference stop there, though the spec calls it ignored); an integer sum and a
    scan output of a known shape, so zero iterations give a (0, 3) stack."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc", "i"], ["acc_next"]),
            helper.make_node("Cast", ["i"], ["i_f"], to=FLOAT),
            helper.make_node("Mul", ["i_f", "w"], ["row"]),
            helper.make_node("Less", ["i", "one"], ["stop"]),
        ],
        "body",
        [_vi("i", INT, []), _vi("c", BOOL, []), _vi("acc", INT, [])],
        [_vi("stop", BOOL, []), _vi("acc_next", INT, []), _vi("row", FLOAT, [3])],
        [_const("one", np.int64(1))],
    )
    node = helper.make_node("Loop", ["M", "", "acc0"], ["acc", "rows"], body=body)
    model = _model(
        [node],
        [_vi("w", FLOAT, [3])],
        [_vi("acc", INT, []), _vi("rows", FLOAT, [None, 3])],
        [_const("M", np.int64(trip)), _const("acc0", np.int64(5))],
    )
    return model, {"w": np.array([1.0, -2.0, 0.5], np.float32)}


def scan(opset: int, in_axes, in_dirs, out_axes, out_dirs):
    """A running sum over a (3, 4) and a (4, 3) input, with an int64 step counter."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["s", "a_t"], ["s1"]),
            helper.make_node("Sub", ["s1", "b_t"], ["s_next"]),
            helper.make_node("Add", ["n", "one"], ["n_next"]),
            helper.make_node("Mul", ["s_next", "a_t"], ["y"]),
            helper.make_node("Identity", ["b_t"], ["z"]),
        ],
        "body",
        [_vi("s", FLOAT, [4]), _vi("n", INT, []), _vi("a_t", FLOAT, [4])]
        + [_vi("b_t", FLOAT, [4])],
        [_vi("s_next", FLOAT, [4]), _vi("n_next", INT, []), _vi("y", FLOAT, [4])]
        + [_vi("z", FLOAT, [4])],
        [_const("one", np.int64(1))],
    )
    attrs = {"body": body, "num_scan_inputs": 2}
    if opset >= 9:
        for key, value in (
            ("scan_input_axes", in_axes),
            ("scan_input_directions", in_dirs),
            ("scan_output_axes", out_axes),
            ("scan_output_directions", out_dirs),
        ):
            if value is not None:
                attrs[key] = list(value)
    shape_a = (3, 4) if (in_axes or (0, 0))[0] % 2 == 0 else (4, 3)
    shape_b = (3, 4) if (in_axes or (0, 0))[1] % 2 == 0 else (4, 3)
    node = helper.make_node("Scan", ["s0", "n0", "a", "b"], ["s", "n", "ys", "zs"], **attrs)
    model = _model(
        [node],
        [_vi("s0", FLOAT, [4]), _vi("a", FLOAT, list(shape_a)), _vi("b", FLOAT, list(shape_b))],
        [_vi("s", FLOAT, [4]), _vi("n", INT, []), _vi("ys", FLOAT, [None, None])]
        + [_vi("zs", FLOAT, [None, None])],
        [_const("n0", np.int64(0))],
        opset,
    )
    rng = np.random.default_rng(0)
    feeds = {
        "s0": rng.standard_normal(4).astype(np.float32),
        "a": rng.standard_normal(shape_a).astype(np.float32),
        "b": rng.standard_normal(shape_b).astype(np.float32),
    }
    return model, feeds


def scan8(lens, directions=None):
    """Opset 8 Scan: a running sum over a (3, 4, 2) and a reversed (3, 4, 2) input, batched
    along axis 0, with an int64 state per batch entry and optional sequence_lens."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["s", "a_t"], ["s1"]),
            helper.make_node("Mul", ["s1", "b_t"], ["s_next"]),
            helper.make_node("Add", ["n", "one"], ["n_next"]),
            helper.make_node("Identity", ["s_next"], ["y"]),
            helper.make_node("Cast", ["n_next"], ["z"], to=FLOAT),
        ],
        "body",
        [_vi("s", FLOAT, [2]), _vi("n", INT, []), _vi("a_t", FLOAT, [2])]
        + [_vi("b_t", FLOAT, [2])],
        [_vi("s_next", FLOAT, [2]), _vi("n_next", INT, []), _vi("y", FLOAT, [2])]
        + [_vi("z", FLOAT, [])],
        [_const("one", np.int64(1))],
    )
    attrs = {"body": body, "num_scan_inputs": 2}
    if directions is not None:
        attrs["directions"] = list(directions)
    inputs = [_vi("s0", FLOAT, [3, 2]), _vi("a", FLOAT, [3, 4, 2]), _vi("b", FLOAT, [3, 4, 2])]
    inits = [_const("n0", np.zeros(3, np.int64))]
    if lens is not None:
        inits.append(_const("lens", np.array(lens, np.int64)))
    node = helper.make_node(
        "Scan",
        ["lens" if lens is not None else "", "s0", "n0", "a", "b"],
        ["s", "n", "ys", "zs"],
        **attrs,
    )
    model = _model(
        [node],
        inputs,
        [_vi("s", FLOAT, [3, 2]), _vi("n", INT, [3]), _vi("ys", FLOAT, [3, 4, 2])]
        + [_vi("zs", FLOAT, [3, 4])],
        inits,
        opset=8,
    )
    rng = np.random.default_rng(2)
    feeds = {
        "s0": rng.standard_normal((3, 2)).astype(np.float32),
        "a": rng.standard_normal((3, 4, 2)).astype(np.float32),
        "b": rng.uniform(0.5, 1.5, (3, 4, 2)).astype(np.float32),
    }
    return model, feeds


def nested(flag: bool):
    """Loop → If → Scan: the Scan body reads `w` from the top graph, three scopes up, and
    `i` from the Loop body, two scopes up."""
    scan_body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["i_f"], to=FLOAT),
            helper.make_node("Mul", ["x_t", "w"], ["xw"]),
            helper.make_node("Add", ["acc", "xw"], ["acc1"]),
            helper.make_node("Add", ["acc1", "i_f"], ["acc_next"]),
        ],
        "scan_body",
        [_vi("acc", FLOAT, [2]), _vi("x_t", FLOAT, [2])],
        [_vi("acc_next", FLOAT, [2])],
    )
    then = helper.make_graph(
        [helper.make_node("Scan", ["h", "xs"], ["t_h"], body=scan_body, num_scan_inputs=1)],
        "then",
        [],
        [_vi("t_h", FLOAT, [2])],
    )
    otherwise = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e_h"])], "else", [], [_vi("e_h", FLOAT, [2])]
    )
    body = helper.make_graph(
        [
            helper.make_node("If", ["flag"], ["h_next"], then_branch=then, else_branch=otherwise),
            helper.make_node("Identity", ["c"], ["c_out"]),
        ],
        "body",
        [_vi("i", INT, []), _vi("c", BOOL, []), _vi("h", FLOAT, [2])],
        [_vi("c_out", BOOL, []), _vi("h_next", FLOAT, [2])],
    )
    node = helper.make_node("Loop", ["M", "", "h0"], ["h"], body=body)
    model = _model(
        [node],
        [_vi("flag", BOOL, []), _vi("h0", FLOAT, [2]), _vi("xs", FLOAT, [3, 2])]
        + [_vi("w", FLOAT, [2])],
        [_vi("h", FLOAT, [2])],
        [_const("M", np.int64(3))],
    )
    rng = np.random.default_rng(1)
    feeds = {
        "flag": np.array(flag),
        "h0": rng.standard_normal(2).astype(np.float32),
        "xs": rng.standard_normal((3, 2)).astype(np.float32),
        "w": rng.standard_normal(2).astype(np.float32),
    }
    return model, feeds


def if_int(flag: bool):
    """Branches of integer type, one of them returning a branch initializer."""
    then = helper.make_graph(
        [helper.make_node("Add", ["n", "k"], ["t"])],
        "then",
        [],
        [_vi("t", INT, [2])],
        [_const("k", np.array([10, 20], np.int64))],
    )
    otherwise = helper.make_graph(
        [helper.make_node("Identity", ["k2"], ["e"])],
        "else",
        [],
        [_vi("e", INT, [2])],
        [_const("k2", np.array([-1, -2], np.int64))],
    )
    node = helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=otherwise)
    model = _model([node], [_vi("flag", BOOL, [1]), _vi("n", INT, [2])], [_vi("y", INT, [2])])
    return model, {"flag": np.array([flag]), "n": np.array([3, 4], np.int64)}


CASES = [
    pytest.param(lambda: while_loop(None, 1.0), id="Loop-while"),
    pytest.param(lambda: while_loop(2, 1.0), id="Loop-M-stops-first"),
    pytest.param(lambda: while_loop(20, 1.0), id="Loop-cond-stops-first"),
    pytest.param(lambda: while_loop(20, 50.0), id="Loop-one-step-then-stop"),
    pytest.param(lambda: for_loop(4), id="Loop-for-int"),
    pytest.param(lambda: for_loop(0), id="Loop-zero"),
    pytest.param(lambda: scan(9, None, None, None, None), id="Scan-opset9-defaults"),
    pytest.param(lambda: scan(18, (0, 1), (0, 1), (1, 0), (1, 0)), id="Scan-axes-directions"),
    pytest.param(lambda: scan(18, (-2, -1), (1, 1), (-1, -2), (0, 1)), id="Scan-negative-axes"),
    pytest.param(lambda: scan8(None), id="Scan-opset8"),
    pytest.param(lambda: scan8([4, 2, 1]), id="Scan-opset8-sequence_lens"),
    pytest.param(lambda: scan8([3, 1, 4], (0, 1)), id="Scan-opset8-lens-directions"),
    pytest.param(lambda: scan8(None, (1, 1)), id="Scan-opset8-reverse"),
    pytest.param(lambda: nested(True), id="Loop-If-Scan-then"),
    pytest.param(lambda: nested(False), id="Loop-If-Scan-else"),
    pytest.param(lambda: if_int(True), id="If-int-then"),
    pytest.param(lambda: if_int(False), id="If-int-else"),
]


@pytest.mark.parametrize("make", CASES)
def test_against_onnxruntime(make):
    model, feeds = make()
    onnx.checker.check_model(model, full_check=True)
    ours = Session(model).run(None, feeds)
    theirs = Session(model, backend="onnxruntime").run(None, feeds)
    for out, a, b in zip(model.graph.output, ours, theirs):
        assert a.dtype == b.dtype, f"{out.name}: {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{out.name}: {a.shape} vs {b.shape}"
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=out.name)


def test_subgraph_is_compiled_once():
    model, feeds = while_loop(None, 1.0)
    session = Session(model)
    first = session.run(None, feeds)
    again = session.run(None, {**feeds, "x0": np.array([9.0, 4.5], np.float32)})
    assert int(first[0]) == 6 and int(again[0]) == 1


def test_loop_without_trip_count_or_condition_is_refused():
    model, feeds = while_loop(None, 1.0)
    model.graph.node[0].input[1] = ""
    with pytest.raises(ExecutionError, match="never ends"):
        Session(model).run(None, feeds)


def test_failing_body_node_is_named():
    model, feeds = for_loop(2)
    feeds["w"] = np.ones(3, np.float32)
    body = model.graph.node[0].attribute[0].g
    body.node[2].input[0] = "bad"
    body.initializer.append(_const("bad", np.ones(2, np.float32)))
    with pytest.raises(ExecutionError, match="Mul"):
        Session(model).run(None, feeds)


def test_scan_opset8_zero_length_keeps_the_initial_state():
    # onnxruntime refuses a zero sequence length; the spec allows any length up to the
    # longest: that entry keeps its initial state and its scan outputs stay zero.
    model, feeds = scan8([4, 0, 2])
    s, n, ys, zs = Session(model).run(None, feeds)
    full, _ = scan8(None)
    s_full, _, ys_full, _ = Session(full).run(None, feeds)
    np.testing.assert_array_equal(s[0], s_full[0])
    np.testing.assert_array_equal(s[1], feeds["s0"][1])
    np.testing.assert_array_equal(n, [4, 0, 2])
    np.testing.assert_array_equal(ys[1], np.zeros((4, 2), np.float32))
    np.testing.assert_array_equal(zs, [[1, 2, 3, 4], [0, 0, 0, 0], [1, 2, 0, 0]])
    np.testing.assert_array_equal(ys[2, :2], ys_full[2, :2])


def test_scan_opset8_refuses_a_sequence_length_past_the_end():
    model, feeds = scan8([4, 5, 1])
    with pytest.raises(ExecutionError, match="sequence_lens"):
        Session(model).run(None, feeds)
