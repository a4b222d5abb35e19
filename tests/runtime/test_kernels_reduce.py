"""Reduction kernels against onnxruntime and onnx's reference evaluator.

The gradient table (tests/autodiff/test_rules_reduce.py) already runs the float kernels at
opset 18; here are the forms it does not reach: attribute axes of older opsets, integer
and boolean inputs, empty tensors. `compare` is shared with the norm and loss kernel tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxgrad.runtime.session import Session


def one_node_model(
    op: str, inputs: Sequence[np.ndarray | None], outputs: int, opset: int, **attrs
) -> onnx.ModelProto:
    """A model of one node: the first input and every float input are graph inputs, the
    other integer ones (axes, labels) initializers, so that shapes can be inferred."""
    names = ["" if v is None else f"in{i}" for i, v in enumerate(inputs)]
    graph_inputs, inits = [], []
    for i, (n, v) in enumerate(zip(names, inputs)):
        if v is None:
            continue
        if i > 0 and v.dtype.kind in "iu":
            inits.append(numpy_helper.from_array(v, n))
            continue
        dtype = helper.np_dtype_to_tensor_dtype(v.dtype)
        graph_inputs.append(helper.make_tensor_value_info(n, dtype, list(v.shape)))
    outs = [f"out{k}" for k in range(outputs)]
    node = helper.make_node(op, names, outs, name="node", **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type for vi in inferred.graph.value_info}
    for name in outs:
        vi = model.graph.output.add()
        vi.name = name
        if name in types and types[name].tensor_type.HasField("shape"):
            vi.type.CopyFrom(types[name])
        else:  # no shape inference for the op (GroupNormalization): shaped like the input
            vi.type.CopyFrom(graph_inputs[0].type)
    return model


def compare(
    op: str,
    inputs: Sequence[np.ndarray | None],
    *,
    outputs: int = 1,
    opset: int = 18,
    ref: str = "ort",
    rtol: float = 1e-5,
    atol: float = 1e-6,
    **attrs,
) -> list:
    """Run one node on onnxgrad and on a reference ("ort" or "onnx"); assert they agree.

    Returns onnxgrad's outputs.
    """
    model = one_node_model(op, inputs, outputs, opset, **attrs)
    feeds = {i.name: inputs[int(i.name[2:])] for i in model.graph.input}
    ours = Session(model).run(None, feeds)
    if ref == "ort":
        sess = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        theirs = sess.run(None, feeds)
    else:
        theirs = ReferenceEvaluator(model).run(None, feeds)
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        b = np.asarray(b)
        assert a.dtype == b.dtype, f"{op} output {k}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{op} output {k}: shape {a.shape} vs {b.shape}"
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{op} output {k}")
    return ours


REDUCTIONS = [
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSum",
    "ReduceLogSumExp",
]


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("op", REDUCTIONS)
def test_attribute_axes_opset13(op, keepdims):
    x = np.random.default_rng(0).uniform(0.5, 2.0, (2, 3, 4)).astype(np.float32)
    if op == "ReduceSum":  # axes is an input from opset 13 on
        compare(op, [x, np.array([0, -1], np.int64)], opset=13, keepdims=keepdims)
    else:
        compare(op, [x], opset=13, axes=[0, -1], keepdims=keepdims)


@pytest.mark.parametrize("op", REDUCTIONS)
def test_all_axes_opset11(op):
    x = np.random.default_rng(1).uniform(0.5, 2.0, (3, 4)).astype(np.float64)
    compare(op, [x], opset=11, keepdims=0)


@pytest.mark.parametrize(
    "op", ["ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceSumSquare"]
)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integers(op, dtype):
    x = np.random.default_rng(2).integers(-5, 6, (3, 4)).astype(dtype)
    (y,) = compare(op, [x, np.array([1], np.int64)], keepdims=0)
    assert y.dtype == dtype


def test_bool_max_opset20():
    x = np.array([[True, False], [False, False]])
    compare("ReduceMax", [x, np.array([1], np.int64)], opset=20, keepdims=0)
    compare("ReduceMin", [x, np.array([0], np.int64)], opset=20, keepdims=1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mean and log of an empty set
@pytest.mark.parametrize("op", REDUCTIONS)
def test_empty_axis(op):
    # Reducing an empty axis gives the op's value for an empty set (0, 1, -inf, ...).
    x = np.zeros((2, 0, 3), np.float32)
    compare(op, [x, np.array([1], np.int64)], ref="onnx", keepdims=0)


@pytest.mark.parametrize("op", REDUCTIONS)
def test_noop_with_empty_axes(op):
    x = np.random.default_rng(3).uniform(0.5, 2.0, (2, 3)).astype(np.float32)
    compare(op, [x, np.array([], np.int64)], noop_with_empty_axes=1)
    compare(op, [x], noop_with_empty_axes=1)


def test_log_sum_exp_is_stable():
    x = np.array([[1000.0, 1000.0], [-1000.0, -np.inf]], np.float32)
    compare("ReduceLogSumExp", [x, np.array([1], np.int64)], keepdims=0)
