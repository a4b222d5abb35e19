"""The ONNX node conformance cases through the numpy executor (tools/conformance.py).

The default run checks every default-domain case of the installed onnx except those in
KNOWN_FAILURES, a committed list: a regression in any op fails CI. The slow run
(`pytest -m slow`) adds the known failures as strict xfails, so the list shrinks as soon as
a kernel starts to pass them. `python tools/conformance.py` prints the same picture per op.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import conformance

# Cases that fail today, by reason. Keep each reason precise; remove names as they pass.
_KNOWN: dict[str, list[str]] = {
    "Bernoulli: the expected values come from numpy's unseeded global random stream at "
    "generation time (onnx's generator says so); no implementation can reproduce them": [
        "test_bernoulli",
        "test_bernoulli_double",
        "test_bernoulli_double_expanded",
        "test_bernoulli_expanded",
        "test_bernoulli_seed",
        "test_bernoulli_seed_expanded",
    ],
}
KNOWN_FAILURES = {name: reason for reason, names in _KNOWN.items() for name in names}

CASES = {case.name: case for case in conformance.collect()}


def test_known_failures_are_real_cases():
    """Every name in KNOWN_FAILURES is a case of the installed onnx (no stale entries)."""
    assert sorted(set(KNOWN_FAILURES) - set(CASES)) == []


@pytest.mark.parametrize("name", sorted(set(CASES) - set(KNOWN_FAILURES)))
def test_case(name):
    result = conformance.run_case(CASES[name], timeout=None)
    assert result.passed, result.error


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[n]))
        for n in sorted(KNOWN_FAILURES)
        if n in CASES
    ],
)
def test_known_failure(name):
    result = conformance.run_case(CASES[name], timeout=None)
    assert result.passed, result.error


# The tool's own logic.


def test_collect_keeps_default_domain_and_names_ops():
    cases = conformance.collect(ops=["Abs"])
    assert cases and all(c.op == "Abs" for c in cases)
    assert all(conformance.is_default_domain(c.model) for c in cases)
    expanded = [c for c in conformance.collect(pattern="^test_sce_.*_expanded$")]
    assert expanded and all(c.op == "SoftmaxCrossEntropyLoss" for c in expanded)


def test_compare_accepts_equal_values():
    a = np.array([1.0, 2.0], np.float32)
    conformance.compare([a, [a, a], None], [a + 1e-5, [a, a], None], 1e-3, 1e-7)
    strings = np.array(["a", "b"], dtype=object)
    conformance.compare([strings], [strings.copy()], 1e-3, 1e-7)
    b = np.array([1.0, 3.0], ml_dtypes.bfloat16)
    conformance.compare([b], [b], 1e-3, 1e-7)


@pytest.mark.parametrize(
    "expected, actual, message",
    [
        ([np.zeros(2, np.float32)], [np.zeros(2, np.float64)], "float64, expected float32"),
        ([np.zeros(2, np.float32)], [np.zeros(3, np.float32)], "shape"),
        ([np.zeros(2, np.float32)], [np.ones(2, np.float32)], "differs"),
        ([[np.zeros(2)]], [np.zeros((1, 2))], "expected a sequence"),
        ([None], [np.zeros(2)], "expected None"),
        ([np.zeros(2)], [], "0 outputs"),
        ([np.array(["a"], dtype=object)], [np.array(["b"], dtype=object)], "strings differ"),
    ],
)
def test_compare_reports_mismatches(expected, actual, message):
    with pytest.raises(AssertionError, match=message):
        conformance.compare(expected, actual, 1e-3, 1e-7)


def test_run_case_records_errors_instead_of_raising():
    case = conformance.collect(ops=["Abs"])[0]
    case.data_sets = [([np.zeros((1,), np.float64)], case.data_sets[0][1])]
    result = conformance.run_case(case)
    assert not result.passed and "ExecutionError" in result.first_line


def test_main_filters_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = conformance.main(["--op", "Abs", "--op", "Neg", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0 and report["failed"] == 0
    assert set(report["ops"]) == {"Abs", "Neg"}
    assert "total:" in printed and "Abs" in printed


# Ops the node cases do not reach (or reach only inside function expansions).


def _model(nodes, inputs, outputs, opset=18):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_sequence_ops_match_the_reference_evaluator():
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from onnxgrad import Session

    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("SequenceConstruct", ["a", "b", "c"], ["s"]),
        helper.make_node("SequenceErase", ["s", "minus_one"], ["s2"]),
        helper.make_node("SequenceAt", ["s", "minus_one"], ["last"]),
        helper.make_node("ConcatFromSequence", ["s2"], ["cat"], axis=1),
        helper.make_node("ConcatFromSequence", ["s"], ["stacked"], axis=0, new_axis=1),
        helper.make_node("SequenceLength", ["s2"], ["n"]),
    ]
    vi = helper.make_tensor_value_info
    inputs = [vi(n, f32, [2, 3]) for n in "abc"] + [vi("minus_one", TensorProto.INT64, [])]
    outputs = [
        vi("last", f32, [2, 3]),
        vi("cat", f32, [2, 6]),
        vi("stacked", f32, [3, 2, 3]),
        vi("n", TensorProto.INT64, []),
    ]
    model = _model(nodes, inputs, outputs)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 3)).astype(np.float32) for n in "abc"}
    feeds["minus_one"] = np.array(-1, np.int64)
    want = ReferenceEvaluator(model).run(None, feeds)
    got = Session(model).run(None, feeds)
    conformance.compare(want, got, 1e-6, 0.0)


def test_optional_wraps_a_tensor_and_an_empty_one():
    from onnx import TensorProto, helper

    from onnxgrad import Session

    f32 = TensorProto.FLOAT
    tensor_type = helper.make_tensor_type_proto(f32, [2])
    nodes = [
        helper.make_node("Optional", ["x"], ["full"]),
        helper.make_node("Optional", [], ["empty"], type=tensor_type),
        helper.make_node("OptionalHasElement", ["full"], ["has_full"]),
        helper.make_node("OptionalHasElement", ["empty"], ["has_empty"]),
        helper.make_node("OptionalGetElement", ["full"], ["x_again"]),
    ]
    vi = helper.make_tensor_value_info
    outputs = [vi("has_full", TensorProto.BOOL, []), vi("has_empty", TensorProto.BOOL, [])]
    model = _model(nodes, [vi("x", f32, [2])], outputs + [vi("x_again", f32, [2])])
    x = np.array([1.0, 2.0], np.float32)
    has_full, has_empty, x_again = Session(model).run(None, {"x": x})
    assert bool(has_full) and not bool(has_empty)
    np.testing.assert_array_equal(x_again, x)


def _random_model(op, out_shape, inputs=(), outputs_type=None, **attrs):
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    node = helper.make_node(op, [i.name for i in inputs], ["y"], **attrs)
    return _model([node], list(inputs), [vi("y", outputs_type or TensorProto.FLOAT, out_shape)])


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("RandomUniform", {"shape": [200, 3], "low": -2.0, "high": 3.0}),
        ("RandomNormal", {"shape": [200, 3], "mean": 1.0, "scale": 0.5}),
    ],
)
def test_seeded_generators_repeat_and_unseeded_ones_do_not(op, attrs):
    from onnxgrad import Session

    seeded = Session(_random_model(op, [200, 3], seed=3.0, **attrs))
    a, b = seeded.run(None, {})[0], seeded.run(None, {})[0]
    assert a.shape == (200, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    free = Session(_random_model(op, [200, 3], **attrs))
    assert not np.array_equal(free.run(None, {})[0], free.run(None, {})[0])
    if op == "RandomUniform":
        assert a.min() >= -2.0 and a.max() < 3.0
    else:
        assert abs(a.mean() - 1.0) < 0.1 and abs(a.std() - 0.5) < 0.1


def test_like_generators_take_shape_and_dtype_from_the_input():
    from onnx import TensorProto, helper

    from onnxgrad import Session

    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [4, 5])
    for op in ("RandomUniformLike", "RandomNormalLike"):
        y = Session(_random_model(op, [4, 5], [x], TensorProto.DOUBLE, seed=1.0)).run(
            None, {"x": np.zeros((4, 5))}
        )[0]
        assert y.shape == (4, 5) and y.dtype == np.float64


def test_multinomial_draws_the_dominant_class():
    from onnx import TensorProto, helper

    from onnxgrad import Session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    model = _random_model(
        "Multinomial",
        [2, 50],
        [x],
        TensorProto.INT64,
        sample_size=50,
        seed=2.0,
        dtype=TensorProto.INT64,
    )
    logits = np.array([[0.0, 30.0, 0.0], [0.0, 0.0, 30.0]], np.float32)
    y = Session(model).run(None, {"x": logits})[0]
    assert y.shape == (2, 50) and y.dtype == np.int64
    assert (y[0] == 1).all() and (y[1] == 2).all()
