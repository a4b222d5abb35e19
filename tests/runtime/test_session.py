"""The Session API and the plan: feeds, overrides, folding, freeing, errors."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad.errors import ExecutionError
from onnxgrad.runtime.plan import topological_order

F32 = TensorProto.FLOAT


def chain_model():
    """y = exp(x + w) · k, where k = c + c comes from a Constant node."""
    c = helper.make_tensor("c", F32, [3], [1.0, 2.0, 3.0])
    nodes = [
        helper.make_node("Constant", [], ["c"], name="const", value=c),
        helper.make_node("Add", ["c", "c"], ["k"], name="k"),
        helper.make_node("Add", ["x", "w"], ["a"], name="add"),
        helper.make_node("Exp", ["a"], ["e"], name="exp"),
        helper.make_node("Mul", ["e", "k"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", F32, ["N", 3])],
        [helper.make_tensor_value_info("y", F32, ["N", 3])],
        [numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def expected(x, w=np.array([0.1, 0.2, 0.3], np.float32)):
    return np.exp(x + w) * np.array([2.0, 4.0, 6.0], np.float32)


X = np.arange(6, dtype=np.float32).reshape(2, 3) / 10


def test_run_all_outputs_and_intermediates():
    session = onnxgrad.Session(chain_model())
    (y,) = session.run(None, {"x": X})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected(X), rtol=1e-6)
    a, y2 = session.run(["a", "y"], {"x": X})
    np.testing.assert_allclose(a, X + np.array([0.1, 0.2, 0.3], np.float32))
    np.testing.assert_array_equal(y, y2)


def test_initializers_can_be_overridden_by_feeds():
    session = onnxgrad.Session(chain_model())
    w = np.array([1.0, 0.0, -1.0], np.float32)
    (y,) = session.run(None, {"x": X, "w": w})
    np.testing.assert_allclose(y, expected(X, w), rtol=1e-6)
    (y,) = session.run(None, {"x": X})  # the original value is back when not fed
    np.testing.assert_allclose(y, expected(X), rtol=1e-6)


def test_matches_onnxruntime():
    model = chain_model()
    ours = onnxgrad.Session(model).run(None, {"x": X})[0]
    theirs = onnxgrad.Session(model, backend="onnxruntime").run(None, {"x": X})[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    w = np.array([1.0, 0.0, -1.0], np.float32)
    theirs = onnxgrad.Session(model, backend="onnxruntime").run(None, {"x": X, "w": w})[0]
    np.testing.assert_allclose(theirs, expected(X, w), rtol=1e-6)


def test_onnxruntime_backend_takes_a_thread_count():
    model = chain_model()
    session = onnxgrad.Session(model, backend="onnxruntime", threads=1)
    assert session._impl._session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_allclose(session.run(None, {"x": X})[0], expected(X), rtol=1e-6)
    trainer = onnxgrad.Trainer(model, "mse", backend="onnxruntime", threads=1)
    assert trainer._session._impl._session.get_session_options().intra_op_num_threads == 1


def test_constants_are_folded_and_intermediates_freed():
    session = onnxgrad.Session(chain_model())
    session.run(None, {"x": X})
    plan = next(iter(session._impl._plans.values()))
    assert [s.node.name for s in plan.steps] == ["add", "exp", "mul"]
    freed = {plan.slots[name] for name in ("a", "e")}
    released = {i for step in plan.steps for i in step.free}
    assert freed <= released
    assert plan.slots["y"] not in released


def test_feed_errors_are_one_clear_line():
    session = onnxgrad.Session(chain_model())
    with pytest.raises(ExecutionError, match="missing input"):
        session.run(None, {})
    with pytest.raises(ExecutionError, match="'z' is not an input of the model"):
        session.run(None, {"x": X, "z": X})
    with pytest.raises(ExecutionError, match="must be float32, got float64"):
        session.run(None, {"x": X.astype(np.float64)})
    with pytest.raises(ExecutionError, match="rank 2"):
        session.run(None, {"x": X[0]})
    with pytest.raises(ExecutionError, match="overrides an initializer"):
        session.run(None, {"x": X, "w": np.zeros(4, np.float32)})


def test_kernel_failures_name_the_node():
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"], name="bad_reshape")],
        "g",
        [
            helper.make_tensor_value_info("x", F32, [None]),
            helper.make_tensor_value_info("s", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", F32, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExecutionError, match="Reshape node 'bad_reshape' failed on inputs"):
        onnxgrad.Session(model).run(None, {"x": np.zeros(5, np.float32), "s": np.array([3])})


def test_ops_without_a_kernel_are_listed_at_compile_time():
    graph = helper.make_graph(
        [
            helper.make_node("Frob", ["x"], ["y"], name="f1", domain="custom.ops"),
            helper.make_node("Frob", ["y"], ["z"], name="f2", domain="custom.ops"),
        ],
        "g",
        [helper.make_tensor_value_info("x", F32, [2])],
        [helper.make_tensor_value_info("z", F32, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("custom.ops", 1)]
    )
    session = onnxgrad.Session(model)  # nothing is refused until a run needs the nodes
    with pytest.raises(ExecutionError, match=r"cannot run 2 node.*custom\.ops::Frob \(node 'f1'"):
        session.run(None, {"x": np.zeros(2, np.float32)})
    (y,) = session.run(["x"], {"x": np.ones(2, np.float32)})  # off their path: runs
    np.testing.assert_array_equal(y, np.ones(2, np.float32))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        onnxgrad.Session(chain_model(), backend="tpu")


def test_inputs_and_outputs_are_described_like_onnxruntime():
    session = onnxgrad.Session(chain_model())
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("x", "tensor(float)", ["N", 3])
    assert [o.name for o in session.get_outputs()] == ["y"]


def test_unsorted_graphs_are_ordered():
    nodes = list(reversed(chain_model().graph.node))
    ordered = topological_order(nodes, {"x", "w"})
    position = {n.name: k for k, n in enumerate(ordered)}
    assert position["const"] < position["k"] < position["mul"]
    assert position["add"] < position["exp"] < position["mul"]
    with pytest.raises(ExecutionError, match="which no node, input or initializer produces"):
        topological_order(nodes, {"x"})
