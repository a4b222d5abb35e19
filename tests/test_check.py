"""`onnxgrad check`: the pre-flight report, the float64 gradient check, and the repairs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrad import check
from onnxgrad.autodiff import rules
from onnxgrad.cli import main
from onnxgrad.errors import GradientError
from onnxgrad.importer import trainable_parameters
from onnxgrad.runtime.session import Session

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "digits_cnn.onnx"
TEST_DATA = ROOT / "models" / "digits_test.npz"


def make_model(nodes, inputs, outputs, inits=(), opset: int = 18, domains=()) -> onnx.ModelProto:
    """A model from nodes, (name, dtype, shape) inputs and outputs, and initializer arrays."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def mlp() -> onnx.ModelProto:
    """y = tanh(x·W1 + b1)·W2."""
    rng = np.random.default_rng(1)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "b1"], ["a"], name="add"),
            helper.make_node("Tanh", ["a"], ["t"], name="tanh"),
            helper.make_node("MatMul", ["t", "W2"], ["y"], name="mm2"),
        ],
        [("x", TensorProto.FLOAT, ["batch", 3])],
        [("y", TensorProto.FLOAT, ["batch", 2])],
        [
            ("W1", rng.standard_normal((3, 4)).astype(np.float32)),
            ("b1", rng.standard_normal(4).astype(np.float32)),
            ("W2", rng.standard_normal((4, 2)).astype(np.float32)),
        ],
    )


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return Session(model).run(None, feeds)


def result_lines(text: str) -> dict[str, str]:
    """The gradient table: parameter name -> its result (OK or FAIL)."""
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^  (\S+)\s+\[.*?\]\s+\S+\s+\S+\s+(OK|FAIL)$", text, re.MULTILINE)
    }


# The example model.


def test_example_model_passes(capsys):
    assert main(["check", str(CNN)]) == 0
    out = capsys.readouterr().out
    assert "pre-flight: 8 node(s)" in out
    assert "problems: none" in out
    assert re.search(r"parameter\s+shape\s+\|grad\|\s+rel\. error\s+result", out)
    results = result_lines(out)
    assert set(results) == set(trainable_parameters(onnx.load(CNN)))
    assert set(results.values()) == {"OK"}
    assert out.rstrip().endswith("result: OK")


def test_example_model_passes_on_data(capsys):
    code = main(["check", str(CNN), "--data", str(TEST_DATA), "--samples", "3", "--wrt", "fc.*"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "inputs from --data (input [3, 1, 8, 8])" in out
    assert set(result_lines(out)) == {"fc.weight", "fc.bias"}


# Failures are found and named.


def test_broken_rule_fails_naming_the_parameters(monkeypatch, capsys):
    def wrong(b, node, dys):
        """y = tanh(x)  →  dx = dy  (deliberately wrong: the factor 1 − y² is missing)"""
        return [dys[0]]

    rules.load_all()
    monkeypatch.setitem(rules.RULES, ("Tanh", ""), rules.RuleEntry("Tanh", "", rules.RULE, wrong))
    report = check.check(mlp())
    assert not report.ok
    verdicts = {c.name: c.ok for c in report.checks}
    assert verdicts == {"W1": False, "b1": False, "W2": True}
    text = check.render(report)
    assert "2 of 3 gradient(s) FAIL: W1, b1" in text
    assert result_lines(text) == {"W1": "FAIL", "b1": "FAIL", "W2": "OK"}


def test_a_kink_within_eps_is_retried_with_a_smaller_step():
    # relu(x·W) with x = [1, 0]: the first pre-activation is 3e-7, so a step of 1e-6 along a
    # direction crosses the kink while one of 1e-7 almost surely does not.
    w = np.array([[3e-7, 1.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["z"], name="mm"),
            helper.make_node("Relu", ["z"], ["y"], name="relu"),
        ],
        [("x", TensorProto.FLOAT, [1, 2])],
        [("y", TensorProto.FLOAT, [1, 3])],
        [("W", w)],
    )
    report = check.check(model, data={"x": np.array([[1.0, 0.0]], np.float32)})
    assert report.ok, check.render(report)
    assert "passes at eps 1e-07" in report.checks[0].note


def test_unsupported_ops_are_all_listed_with_node_and_opset(monkeypatch, tmp_path, capsys):
    model = mlp()
    model.graph.node[2].op_type = "Foo"
    model.graph.node[2].domain = "com.example"
    model.graph.node[2].name = "foo"
    model.graph.node.append(helper.make_node("Sin", ["y"], ["z"], name="sin"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    rules.load_all()
    monkeypatch.delitem(rules.RULES, ("Sin", ""))

    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "missing rule: com.example::Foo (node 'foo', opset 1)" in out
    assert "missing rule: Sin (node 'sin', opset 18)" in out
    assert "missing kernel: com.example::Foo (node 'foo', opset 1)" in out
    assert re.search(r"foo\s+com\.example::Foo\s+1\s+unsupported\s+NO", out)
    assert "gradient check: skipped" in out


def test_a_rule_that_rejects_a_node_is_reported():
    model = dropout_model(training=np.array(True), mask=False)
    report = check.check(model)
    kinds = [(p.kind, p.op_type, p.node, p.opset) for p in report.problems]
    assert kinds == [(check.RULE_REJECTS, "Dropout", "drop", 18)]
    assert "mask output" in report.problems[0].detail
    assert {kind for kind, _ in report.repairs} == {"inference mode", "optional outputs"}


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "missing.onnx"],
        ["check", str(CNN), "--fix"],
        ["check", str(CNN), "--loss", "nope"],
        ["check", str(CNN), "--wrt", "nope"],
        ["check", str(CNN), "--data", "missing.npz"],
    ],
    ids=["no-model", "fix-without-output", "bad-loss", "bad-wrt", "no-data"],
)
def test_usage_and_load_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("onnxgrad: error: ")


# The float64 copy and its inputs.


def test_upcast_keeps_integers_and_values():
    model = make_model(
        [
            helper.make_node("Constant", [], ["c"], name="c", value_float=0.5),
            helper.make_node("Cast", ["n"], ["nf"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "c"], ["xc"], name="mul"),
            helper.make_node("Add", ["xc", "nf"], ["s"], name="add"),
            helper.make_node("Add", ["s", "h"], ["y"], name="add2"),
            helper.make_node("Shape", ["y"], ["shape"], name="shape"),
        ],
        [("x", TensorProto.FLOAT, [2, 3]), ("n", TensorProto.INT64, [2, 3])],
        [("y", TensorProto.FLOAT, [2, 3]), ("shape", TensorProto.INT64, [2])],
        [("h", np.full((2, 3), 0.25, np.float16))],
    )
    model64 = check.upcast(model)
    onnx.checker.check_model(model64, full_check=True)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    n = np.arange(6, dtype=np.int64).reshape(2, 3)
    y32, shape32 = run(model, {"x": x, "n": n})
    y64, shape64 = run(model64, {"x": x.astype(np.float64), "n": n})
    assert y64.dtype == np.float64 and shape64.dtype == np.int64
    np.testing.assert_allclose(y64, y32, rtol=1e-6)
    np.testing.assert_array_equal(shape64, shape32)


def test_upcast_leaves_resize_scales_in_float32():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
            helper.make_node("Resize", ["c", "", "scales"], ["y"], name="resize", mode="linear"),
        ],
        [("x", TensorProto.FLOAT, [1, 1, 3, 3])],
        [("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        [
            ("W", np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 1, 2, 2)),
            ("scales", np.array([1.0, 1.0, 1.0, 1.0], np.float32)),
        ],
    )
    model64 = check.upcast(model)
    onnx.checker.check_model(model64, full_check=True)
    types = {t.name: t.data_type for t in model64.graph.initializer}
    assert types == {"W": TensorProto.DOUBLE, "scales": TensorProto.FLOAT}


def test_random_integer_inputs_stay_in_range():
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["y"], name="gather", axis=0)],
        [("ids", TensorProto.INT64, ["batch", 7])],
        [("y", TensorProto.FLOAT, ["batch", 7, 4])],
        [("E", np.ones((5, 4), np.float32))],
    )
    feeds = check.random_feeds(check.upcast(model), samples=50, seed=3)
    ids = feeds["ids"]
    assert ids.shape == (50, 7) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() == 4
    assert check.check(model).ok


def test_class_labels_are_drawn_below_the_number_of_classes():
    rng = np.random.default_rng(5)
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "W", "b"], ["scores"], name="fc", transB=1),
            helper.make_node("SoftmaxCrossEntropyLoss", ["scores", "labels"], ["loss"], name="ce"),
        ],
        [("x", TensorProto.FLOAT, ["batch", 4]), ("labels", TensorProto.INT64, ["batch"])],
        [("loss", TensorProto.FLOAT, [])],
        [
            ("W", rng.standard_normal((7, 4)).astype(np.float32)),
            ("b", rng.standard_normal(7).astype(np.float32)),
        ],
    )
    labels = check.random_feeds(check.upcast(model), samples=200)["labels"]
    assert labels.min() == 0 and labels.max() == 6
    report = check.check(model, samples=8)
    assert report.ok, check.render(report)
    assert "loss: loss (a scalar output)" in check.render(report)


# Repairs: each keeps the outputs and gives a valid model.


def dropout_model(training, mask: bool, ratio: float = 0.5) -> onnx.ModelProto:
    """y = Dropout(x·W), training_mode a constant (an ndarray) or a graph input (None)."""
    inputs = [("x", TensorProto.FLOAT, [2, 3])]
    inits = [("W", np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))]
    inits.append(("ratio", np.array(ratio, np.float32)))
    if training is None:
        inputs.append(("training", TensorProto.BOOL, []))
    else:
        inits.append(("training", training))
    outputs = ["y", "mask"] if mask else ["y"]
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Dropout", ["h", "ratio", "training"], outputs, name="drop", seed=7),
        ],
        inputs,
        [("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )


def test_repair_names_the_dropout_mask():
    model = dropout_model(training=None, mask=False)
    repaired, changes = check.name_needed_outputs(model)
    assert len(changes) == 1 and "Dropout node 'drop'" in changes[0]
    assert list(repaired.graph.node[1].output) == ["y", "drop_mask"]
    onnx.checker.check_model(repaired, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for training in (False, True):
        feeds = {"x": x, "training": np.array(training)}
        np.testing.assert_array_equal(run(repaired, feeds)[0], run(model, feeds)[0])
    assert not check.check(model).ok
    assert check.check(repaired).ok


def test_maxpool_without_indices_needs_no_repair():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
            helper.make_node("MaxPool", ["c"], ["y"], name="pool", kernel_shape=[2, 2]),
        ],
        [("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [("y", TensorProto.FLOAT, [1, 2, 1, 1])],
        [("W", np.linspace(-1, 1, 18, dtype=np.float32).reshape(2, 1, 3, 3))],
    )
    _, changes = check.name_needed_outputs(model)
    assert changes == []


def test_repair_turns_constant_weights_into_parameters(tmp_path, capsys):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Constant", [], ["W"], name="w", value=numpy_helper.from_array(w)),
            helper.make_node("Constant", [], ["B"], name="b", value=numpy_helper.from_array(b)),
            helper.make_node("Constant", [], ["half"], name="half", value_float=0.5),
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "B"], ["a"], name="add"),
            helper.make_node("Mul", ["a", "half"], ["m"], name="mul"),
            helper.make_node("MatMul", ["m", "W2"], ["y"], name="mm2"),
        ],
        [("x", TensorProto.FLOAT, ["batch", 3])],
        [("y", TensorProto.FLOAT, ["batch", 2])],
        [("W2", rng.standard_normal((4, 2)).astype(np.float32))],
    )
    repaired, changes = check.constants_to_initializers(model)
    assert len(changes) == 2
    assert [n.op_type for n in repaired.graph.node].count("Constant") == 1
    assert trainable_parameters(repaired) == ["W2", "W", "B"]
    onnx.checker.check_model(repaired, full_check=True)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(repaired, {"x": x})[0], run(model, {"x": x})[0])

    # Through the command line: offered without --fix, applied and checked with it.
    path, out = tmp_path / "const.onnx", tmp_path / "fixed.onnx"
    onnx.save(model, path)
    assert main(["check", str(path)]) == 0
    text = capsys.readouterr().out
    assert "repairs offered (apply with --fix -o OUT): 2" in text
    assert set(result_lines(text)) == {"W2"}
    assert main(["check", str(path), "--fix", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "repairs applied: 2" in text and f"wrote {out}" in text
    assert set(result_lines(text)) == {"W2", "W", "B"}
    assert trainable_parameters(onnx.load(out)) == ["W2", "W", "B"]


def constant_of_shape_model(ir_version: int = 8, opset: int = 18) -> onnx.ModelProto:
    """y = Conv(x, W, b) · s, the caffe2 way: W, b and s are ConstantOfShape fills.

    W's shape is an initializer, b's a Constant node; s is Unsqueezed before the Mul
    reads it. The fill of `zero` is an int (not a weight), and `scratch` is read by
    nothing that holds a weight: both stay nodes.
    """
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["W_shape"],
            ["W"],
            name="fill_w",
            value=numpy_helper.from_array(np.array([0.5], np.float32)),
        ),
        helper.make_node(
            "Constant",
            [],
            ["b_shape"],
            name="b_shape",
            value=numpy_helper.from_array(np.array([2], np.int64)),
        ),
        helper.make_node("ConstantOfShape", ["b_shape"], ["b"], name="fill_b"),
        helper.make_node(
            "ConstantOfShape",
            ["s_shape"],
            ["s"],
            name="fill_s",
            value=numpy_helper.from_array(np.array([1.5], np.float32)),
        ),
        helper.make_node("Unsqueeze", ["s", "axes"], ["s4"], name="unsq")
        if opset >= 13
        else helper.make_node("Unsqueeze", ["s"], ["s4"], name="unsq", axes=[0, 2, 3]),
        helper.make_node(
            "ConstantOfShape",
            ["s_shape"],
            ["zero"],
            name="fill_int",
            value=numpy_helper.from_array(np.array([0], np.int64)),
        ),
        helper.make_node("ConstantOfShape", ["s_shape"], ["scratch"], name="fill_scratch"),
        helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "s4"], ["y"], name="mul"),
        helper.make_node("Shape", ["scratch"], ["n"], name="shape"),
    ]
    inits = [
        ("W_shape", np.array([2, 1, 3, 3], np.int64)),
        ("s_shape", np.array([2], np.int64)),
        ("axes", np.array([0, 2, 3], np.int64)),
    ]
    model = make_model(
        nodes,
        [("x", TensorProto.FLOAT, ["batch", 1, 5, 5])],
        [("y", TensorProto.FLOAT, ["batch", 2, 3, 3]), ("n", TensorProto.INT64, [1])],
        inits,
        opset=opset,
    )
    model.ir_version = ir_version
    if ir_version < 4:
        # IR 3 lists every initializer as a graph input too.
        model.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in model.graph.initializer
        )
    return model


def test_repair_turns_constant_of_shape_weights_into_parameters(tmp_path, capsys):
    model = constant_of_shape_model()
    held = check.constant_weights(model)
    assert [(w.name, w.op_type, w.shape, w.reader) for w in held] == [
        ("W", "ConstantOfShape", (2, 1, 3, 3), ("Conv", "conv")),
        ("b", "ConstantOfShape", (2,), ("Conv", "conv")),
        ("s", "ConstantOfShape", (2,), ("Mul", "mul")),
    ]
    repaired, changes = check.constants_to_initializers(model)
    assert len(changes) == 3
    assert "ConstantOfShape node 'fill_w' holds a [2, 1, 3, 3] weight read by Conv" in changes[0]
    ops = [n.op_type for n in repaired.graph.node]
    assert ops.count("ConstantOfShape") == 2  # the int fill and the unread scratch
    assert "b_shape" not in {o for n in repaired.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in repaired.graph.initializer}
    assert "W_shape" not in inits and "s_shape" in inits  # s_shape still makes `zero`
    np.testing.assert_array_equal(inits["W"], np.full((2, 1, 3, 3), 0.5, np.float32))
    np.testing.assert_array_equal(inits["b"], np.zeros(2, np.float32))
    assert trainable_parameters(repaired) == ["W", "b", "s"]
    onnx.checker.check_model(repaired, full_check=True)
    x = np.random.default_rng(3).standard_normal((2, 1, 5, 5)).astype(np.float32)
    for ours, theirs in zip(run(repaired, {"x": x}), run(model, {"x": x})):
        np.testing.assert_array_equal(ours, theirs)
    assert check.constants_to_initializers(repaired)[1] == []

    # Offered without --fix, applied with it; the gradients of the new parameters check out.
    path, out = tmp_path / "cos.onnx", tmp_path / "fixed.onnx"
    onnx.save(model, path)
    assert main(["check", str(path), "--loss", "y"]) == 1  # no parameters yet
    assert "repairs offered (apply with --fix -o OUT): 3" in capsys.readouterr().out
    assert main(["check", str(path), "--loss", "y", "--fix", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "repairs applied: 3" in text
    assert set(result_lines(text)) == {"W", "b", "s"}


def test_constant_of_shape_repair_keeps_a_shape_that_a_branch_still_reads():
    # s makes the weight w and is also read inside an If branch: lifting w must keep s.
    shape = helper.make_node(
        "Constant", [], ["s"], value=numpy_helper.from_array(np.array([3, 3], np.int64))
    )
    fill = helper.make_node(
        "ConstantOfShape", ["s"], ["w"], value=numpy_helper.from_array(np.full(1, 0.5, np.float32))
    )
    then_branch = helper.make_graph(
        [helper.make_node("Reshape", ["y", "s"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3, 3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3, 3])],
    )
    nodes = [
        shape,
        fill,
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("If", ["c"], ["z"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    repaired, changes = check.constants_to_initializers(model)
    assert len(changes) == 1 and trainable_parameters(repaired) == ["w"]
    onnx.checker.check_model(repaired, full_check=True)
    feeds = {"x": np.arange(9, dtype=np.float32).reshape(3, 3), "c": np.array(True)}
    np.testing.assert_array_equal(run(repaired, feeds)[0], run(model, feeds)[0])


def test_constant_of_shape_repair_keeps_ir3_initializers_listed_as_inputs():
    model = constant_of_shape_model(ir_version=3, opset=9)
    repaired, changes = check.constants_to_initializers(model)
    assert len(changes) == 3
    inputs = [i.name for i in repaired.graph.input]
    assert {"W", "b", "s"} <= set(inputs) and "W_shape" not in inputs
    assert {t.name for t in repaired.graph.initializer} <= set(inputs)
    onnx.checker.check_model(repaired)
    x = np.ones((1, 1, 5, 5), np.float32)
    np.testing.assert_array_equal(run(repaired, {"x": x})[0], run(model, {"x": x})[0])


def test_a_shape_that_a_feed_can_change_is_no_constant():
    # From IR 4 on, an initializer that is also a graph input is only a default.
    model = constant_of_shape_model()
    model.graph.input.append(helper.make_tensor_value_info("W_shape", TensorProto.INT64, [4]))
    assert "W" not in {w.name for w in check.constant_weights(model)}


def branch_weights_model(use_first: bool) -> onnx.ModelProto:
    """y = If(c, then: (x·W + b) with b from a nested If, else: x·W), x (2, 3) -> y (2, 2).

    Both branches hold a Constant named W, with different values: lifted out, one of them
    must be renamed. The nested If's Constant b is read inside it, two bodies down.
    """
    rng = np.random.default_rng(5)

    def const(name: str, shape: tuple[int, ...]) -> onnx.NodeProto:
        value = numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32))
        return helper.make_node("Constant", [], [name], name=f"const_{name}", value=value)

    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    nested = helper.make_graph(
        [const("b", (2,)), helper.make_node("Add", ["xw", "b"], ["out"], name="bias")],
        "nested",
        [],
        [out],
    )
    keep = helper.make_graph(
        [helper.make_node("Identity", ["xw"], ["out"], name="same")], "keep", [], [out]
    )
    then = helper.make_graph(
        [
            const("W", (3, 2)),
            helper.make_node("MatMul", ["x", "W"], ["xw"], name="then_mm"),
            helper.make_node(
                "If", ["c"], ["out"], name="inner", then_branch=nested, else_branch=keep
            ),
        ],
        "then",
        [],
        [out],
    )
    other = helper.make_graph(
        [const("W", (3, 2)), helper.make_node("MatMul", ["x", "W"], ["out"], name="else_mm")],
        "other",
        [],
        [out],
    )
    flag = numpy_helper.from_array(np.array(use_first), "c")
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="outer", then_branch=then, else_branch=other)],
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [flag],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("use_first", [True, False])
def test_constant_weights_inside_if_branches_become_parameters(tmp_path, capsys, use_first):
    model = branch_weights_model(use_first)
    held = check.constant_weights(model)
    assert sorted((w.name, w.shape, w.reader) for w in held) == [
        ("W", (3, 2), ("MatMul", "else_mm")),
        ("W", (3, 2), ("MatMul", "then_mm")),
        ("b", (2,), ("Add", "bias")),
    ]
    repaired, changes = check.constants_to_initializers(model)
    assert len(changes) == 3 and "now initializer 'W__" in " ".join(changes)
    names = trainable_parameters(repaired)
    assert len(names) == 3 and len(set(names)) == 3 and "b" in names
    assert not any(
        n.op_type == "Constant" for g in check._all_graphs(repaired.graph) for n in g.node
    )
    onnx.checker.check_model(repaired, full_check=True)
    x = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(repaired, {"x": x})[0], run(model, {"x": x})[0])
    assert check.constants_to_initializers(repaired)[1] == []

    # The gradients of the lifted weights pass the finite-difference check through both Ifs;
    # the branch not taken gets zeros.
    path, out = tmp_path / "branches.onnx", tmp_path / "fixed.onnx"
    onnx.save(model, path)
    assert main(["check", str(path), "--loss", "y", "--fix", "-o", str(out)]) == 0
    results = result_lines(capsys.readouterr().out)
    assert set(results) == set(names) and set(results.values()) == {"OK"}


def test_the_light_model_zoo_graphs_get_their_weights():
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    model = onnx.load(path)
    assert len(trainable_parameters(check.load(model))) == 13  # the biases only
    repaired, changes = check.constants_to_initializers(model)
    assert len(changes) == 39
    assert len(trainable_parameters(check.load(repaired))) == 52
    assert not any(n.op_type == "ConstantOfShape" for n in repaired.graph.node)
    assert not any(i.name.endswith("__SHAPE") for i in repaired.graph.input)


def test_nodes_the_loss_does_not_need_stay_out_of_the_check():
    # The second output comes from a node no executor here knows: checking y needs none of it.
    model = mlp()
    model.graph.node.append(helper.make_node("Frob", ["y"], ["z"], name="frob", domain="com.x"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 2]))
    model.opset_import.append(helper.make_opsetid("com.x", 1))
    report = check.check(model, loss=["y"])
    assert report.ok, check.render(report)
    assert any("com.x::Frob node 'frob'" in note for note in report.notes)
    # Asked for, it is refused with its name.
    report = check.check(model)
    assert not report.ok and "com.x::Frob" in check.render(report)


def test_outputs_that_are_no_tensors_are_described_with_their_maker():
    model = mlp()
    model.graph.node.append(helper.make_node("SequenceConstruct", ["y"], ["seq"], name="pack"))
    del model.graph.output[:]
    model.graph.output.append(
        helper.make_value_info(
            "seq",
            helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None)),
        )
    )
    with pytest.raises(
        GradientError,
        match=r"'seq' is seq\(tensor\(float32\)\) \(made by "
        r"SequenceConstruct node 'pack' from 'y'\)",
    ):
        check.check(model)


def test_repair_switches_training_mode_ops_to_inference():
    # Running statistics equal to the feed's batch statistics: both modes give the same y.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    model = make_model(
        [
            helper.make_node(
                "BatchNormalization",
                ["x", "scale", "bias", "mean", "var"],
                ["b", "running_mean", "running_var"],
                name="bn",
                training_mode=1,
            ),
            helper.make_node("Dropout", ["b", "ratio", "training"], ["y"], name="drop"),
        ],
        [("x", TensorProto.FLOAT, [4, 3, 2, 2])],
        [("y", TensorProto.FLOAT, [4, 3, 2, 2])],
        [
            ("scale", np.array([1.0, 2.0, 0.5], np.float32)),
            ("bias", np.array([0.1, -0.2, 0.3], np.float32)),
            ("mean", mean),
            ("var", var),
            ("ratio", np.array(0.0, np.float32)),
            ("training", np.array(True)),
        ],
    )
    repaired, changes = check.to_inference_mode(model)
    assert len(changes) == 2
    bn, drop = repaired.graph.node
    assert list(bn.output) == ["b"] and helper.get_node_attr_value(bn, "training_mode") == 0
    assert list(drop.input) == ["b", "ratio"]
    assert "training" not in {t.name for t in repaired.graph.initializer}
    onnx.checker.check_model(repaired, full_check=True)
    np.testing.assert_allclose(run(repaired, {"x": x})[0], run(model, {"x": x})[0], atol=1e-5)
    assert check.check(repaired).ok


def test_training_mode_is_left_alone_when_its_statistics_are_read():
    model = make_model(
        [
            helper.make_node(
                "BatchNormalization",
                ["x", "scale", "bias", "mean", "var"],
                ["y", "running_mean"],
                name="bn",
                training_mode=1,
            )
        ],
        [("x", TensorProto.FLOAT, [4, 3])],
        [("y", TensorProto.FLOAT, [4, 3]), ("running_mean", TensorProto.FLOAT, [3])],
        [(k, np.ones(3, np.float32)) for k in ("scale", "bias", "mean", "var")],
    )
    repaired, changes = check.to_inference_mode(model)
    assert changes == []
    assert repaired.graph.node[0] == model.graph.node[0]
    _, changes = check.to_inference_mode(dropout_model(training=None, mask=True))
    assert changes == []


def test_fix_applies_every_repair_in_order():
    model = dropout_model(training=np.array(True), mask=False)
    report = check.check(model, fix=True)
    assert report.ok, check.render(report)
    assert [k for k, _ in report.repairs] == ["inference mode"]
    assert list(report.repaired.graph.node[1].input) == ["h", "ratio"]


# PyTorch recurrent exports.


def export_recurrent(kind: str, path: Path) -> None:
    """nn.GRU or nn.LSTM, batch-first, exported at opset 17 with a static sequence length."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, kind)(input_size=3, hidden_size=4, batch_first=True)

        def forward(self, x):
            y, state = self.rnn(x)
            return (y, *state) if isinstance(state, tuple) else (y, state)

    torch.manual_seed(0)
    module = Wrapped().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(2, 5, 3),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
        )


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_pytorch_recurrent_export_passes(kind, tmp_path, capsys):
    path = tmp_path / f"{kind}.onnx"
    export_recurrent(kind, path)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\s{kind}\s+18\s+rule\s+yes", out)
    results = result_lines(out)
    assert len(results) == 3 and set(results.values()) == {"OK"}
