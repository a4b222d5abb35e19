"""The plan's rewrites: MatMul → ReduceSum fused into one product, and the kernels' fast paths.

Every fused or fast result is compared with the plain numpy computation and with
onnxruntime; the cases where the fast path does not apply (other axes, broadcast batch,
integers, a MatMul output read elsewhere) must fall back to the two kernels.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad.runtime.kernels import KernelNode
from onnxgrad.runtime.kernels.linalg import matmul_nd
from onnxgrad.runtime.kernels.pool import max_pool

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def matmul_sum_model(
    a_shape,
    b_shape,
    axes,
    keepdims=1,
    opset=18,
    dtype=F32,
    transpose_a=False,
    also_output=False,
    rank=None,
):
    """y = ReduceSum(A' · B, axes); A' = A with its last two axes swapped if transpose_a."""
    nodes = []
    a = "a"
    if transpose_a:
        perm = list(range(len(a_shape)))
        perm[-2:] = perm[-2:][::-1]
        nodes.append(helper.make_node("Transpose", ["a"], ["at"], name="t", perm=perm))
        a = "at"
    nodes.append(helper.make_node("MatMul", [a, "b"], ["p"], name="mm"))
    inits = []
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        nodes.append(
            helper.make_node("ReduceSum", ["p", "axes"], ["y"], name="rs", keepdims=keepdims)
        )
    else:
        nodes.append(
            helper.make_node("ReduceSum", ["p"], ["y"], name="rs", axes=axes, keepdims=keepdims)
        )
    rank = rank or max(len(a_shape), len(b_shape))
    y_rank = rank if keepdims else rank - len(axes)
    outputs = [helper.make_tensor_value_info("y", dtype, _dims("y", y_rank))]
    if also_output:
        outputs.append(helper.make_tensor_value_info("p", dtype, _dims("p", rank)))
    graph = helper.make_graph(
        nodes,
        "matmul_sum",
        [
            helper.make_tensor_value_info("a", dtype, a_shape or _dims("a", rank)),
            helper.make_tensor_value_info("b", dtype, b_shape or _dims("b", rank)),
        ],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _dims(name, rank):
    """Symbolic dimensions: the rank is declared, the sizes are not."""
    return [f"{name}{i}" for i in range(rank)]


def _data(shape, dtype=np.float32):
    if np.dtype(dtype).kind == "i":
        return RNG.integers(-3, 4, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


def _expected(a, b, axes, keepdims, transpose_a):
    if transpose_a:
        a = np.swapaxes(a, -1, -2)
    return np.sum(np.matmul(a, b), axis=tuple(axes), keepdims=bool(keepdims))


def _op_types(session, outputs=("y",)):
    plan = session._impl._plans[(tuple(outputs), frozenset())]
    return [step.node.op_type for step in plan.steps]


CASES = [
    # a_shape, b_shape, axes, keepdims, opset, transpose_a
    ((4, 3, 5), (4, 5, 2), [0], 1, 18, False),
    ((4, 5, 3), (4, 5, 2), [0], 0, 18, True),  # the builder's Aᵀ·dY
    ((2, 3, 4, 5), (2, 3, 5, 6), [0, 1], 1, 18, False),
    ((2, 3, 5, 4), (2, 3, 5, 6), [-4, -3], 0, 13, True),
    ((4, 3, 5), (4, 5, 2), [0], 1, 11, False),  # axes as an attribute
    # The fused step's run-time guard sends these through MatMul then ReduceSum:
    ((4, 3, 5), (4, 5, 2), [1], 1, 18, False),  # not the batch axes
    ((4, 3, 5), (4, 5, 2), [0, 2], 0, 18, False),
    ((4, 3, 5), (5, 2), [0], 1, 18, False),  # a broadcast B
    ((1, 3, 5), (4, 5, 2), [0], 1, 18, False),  # a broadcast batch
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matmul_reduce_sum_matches_numpy_and_onnxruntime(case):
    a_shape, b_shape, axes, keepdims, opset, transpose_a = case
    model = matmul_sum_model(a_shape, b_shape, axes, keepdims, opset, transpose_a=transpose_a)
    a, b = _data(a_shape), _data(b_shape)
    session = onnxgrad.Session(model)
    (y,) = session.run(["y"], {"a": a, "b": b})
    want = _expected(a, b, axes, keepdims, transpose_a)
    assert y.shape == want.shape and y.dtype == want.dtype
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    (theirs,) = ort.InferenceSession(model.SerializeToString()).run(["y"], {"a": a, "b": b})
    np.testing.assert_allclose(y, theirs, rtol=1e-5, atol=1e-5)
    assert "MatMul+ReduceSum" in _op_types(session)


def test_fused_step_falls_back_at_run_time_when_shapes_do_not_fit():
    # The axes are the batch axes of the declared rank-3 shapes, but a rank-4 feed makes
    # axis 0 only part of the batch: the fused step must run MatMul then ReduceSum.
    model = matmul_sum_model(None, None, [0], 1, rank=4)
    a, b = _data((2, 3, 4, 5)), _data((2, 3, 5, 6))
    (y,) = onnxgrad.Session(model).run(["y"], {"a": a, "b": b})
    np.testing.assert_allclose(y, _expected(a, b, [0], 1, False), rtol=1e-5, atol=1e-5)


def test_integers_fall_back_to_the_two_kernels():
    model = matmul_sum_model((3, 2, 4), (3, 4, 2), [0], 0, dtype=TensorProto.INT32)
    a, b = _data((3, 2, 4), np.int32), _data((3, 4, 2), np.int32)
    (y,) = onnxgrad.Session(model).run(["y"], {"a": a, "b": b})
    want = np.sum(np.matmul(a, b), axis=0)
    np.testing.assert_array_equal(y, want)
    assert y.dtype == np.int32


def test_no_fusion_when_the_product_is_read_elsewhere():
    model = matmul_sum_model((4, 3, 5), (4, 5, 2), [0], 1, also_output=True)
    a, b = _data((4, 3, 5)), _data((4, 5, 2))
    session = onnxgrad.Session(model)
    y, p = session.run(["y", "p"], {"a": a, "b": b})
    np.testing.assert_allclose(p, np.matmul(a, b), rtol=1e-6)
    np.testing.assert_allclose(y, p.sum(0, keepdims=True), rtol=1e-5, atol=1e-6)
    assert "MatMul+ReduceSum" not in _op_types(session, ("y", "p"))
    (y_only,) = session.run(["y"], {"a": a, "b": b})  # a plan of its own: fused there
    np.testing.assert_allclose(y_only, y, rtol=1e-5, atol=1e-6)
    assert "MatMul+ReduceSum" in _op_types(session)


def test_fused_errors_name_both_nodes():
    model = matmul_sum_model(None, None, [0], 1, rank=3)
    with pytest.raises(onnxgrad.errors.ExecutionError, match="mm\\+rs"):
        onnxgrad.Session(model).run(["y"], {"a": _data((4, 3, 5)), "b": _data((4, 6, 2))})


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((2, 3, 4), (4, 5)), ((2, 2, 3, 4), (4, 5)), ((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5))],
)
def test_matmul_folds_batch_axes_into_rows(a_shape, b_shape):
    a, b = _data(a_shape), _data(b_shape)
    np.testing.assert_allclose(matmul_nd(a, b), np.matmul(a, b), rtol=1e-5, atol=1e-6)
    strided = _data(a_shape[:-2] + a_shape[-1:] + a_shape[-2:-1]).swapaxes(-1, -2)
    np.testing.assert_allclose(matmul_nd(strided, b), np.matmul(strided, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "attrs, shape",
    [
        ({"kernel_shape": [2, 2], "strides": [2, 2]}, (2, 3, 6, 6)),
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (1, 2, 5, 4)),
        ({"kernel_shape": [3, 2], "strides": [2, 1], "dilations": [1, 2]}, (2, 1, 7, 6)),
        (
            {"kernel_shape": [2, 2], "storage_order": 1, "ceil_mode": 1, "strides": [2, 2]},
            (1, 2, 5, 5),
        ),
        ({"kernel_shape": [12], "strides": [1]}, (2, 2, 140)),  # 12 taps... and 129 windows
        ({"kernel_shape": [130]}, (1, 1, 131)),  # more taps than int8 counts
    ],
)
def test_max_pool_indices_match_onnxruntime(attrs, shape):
    x = _data(shape)
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)
    graph = helper.make_graph(
        [node],
        "pool",
        [helper.make_tensor_value_info("x", F32, _dims("x", len(shape)))],
        [
            helper.make_tensor_value_info("y", F32, _dims("y", len(shape))),
            helper.make_tensor_value_info("i", TensorProto.INT64, _dims("i", len(shape))),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    kernel = max_pool(KernelNode("MaxPool", "", "p", 12, attrs, ["x"], ["y", "i"]))
    for _ in range(2):  # the second run reads the cached window origins
        y, i = kernel(x)
        np.testing.assert_array_equal(y, want[0])
        np.testing.assert_array_equal(i, want[1])
    y, i = kernel(x[:1])  # a new batch size: new origins
    np.testing.assert_array_equal(
        i, ort.InferenceSession(model.SerializeToString()).run(None, {"x": x[:1]})[1]
    )


def _run_ort(node, feeds, out_rank, opset=17):
    inputs = [helper.make_tensor_value_info(k, F32, _dims(k, v.ndim)) for k, v in feeds.items()]
    graph = helper.make_graph(
        [node], "one", inputs, [helper.make_tensor_value_info("y", F32, _dims("y", out_rank))]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]


@pytest.mark.parametrize(
    "x_shape, w_shape, attrs",
    [
        ((5, 4, 9, 10), (6, 4, 3, 3), {"pads": [1, 1, 1, 1]}),
        ((5, 4, 9, 10), (6, 2, 3, 2), {"group": 2, "dilations": [2, 1], "strides": [1, 2]}),
        ((3, 2, 6, 5, 4), (4, 2, 2, 2, 2), {"pads": [1, 0, 1, 0, 1, 0]}),
        ((7, 3, 12), (2, 3, 3), {"strides": [1]}),
        ((3, 4, 9, 8), (5, 4, 8, 7), {"pads": [1, 1, 1, 1]}),  # a huge kernel, a tiny output
    ],
)
def test_conv_per_image_products_in_chunks_match_onnxruntime(monkeypatch, x_shape, w_shape, attrs):
    from onnxgrad.runtime.kernels import conv as conv_module

    x, w, b = _data(x_shape), _data(w_shape), _data(w_shape[:1])
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    want = _run_ort(node, {"x": x, "w": w, "b": b}, len(x_shape))
    for chunk_entries, min_out in itertools.product((1, 200, 1 << 19), (1, 10**9)):
        # min_out: per-image products, or one product over the batch (both layouts).
        monkeypatch.setattr(conv_module, "BATCHED_MIN_OUT", min_out)
        monkeypatch.setattr(conv_module, "COLUMNS_PER_CHUNK", chunk_entries)
        kernel = conv_module.conv(KernelNode("Conv", "", "c", 17, attrs, ["x", "w", "b"], ["y"]))
        (y,) = kernel(x, w, b)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "x_shape, w_shape, attrs",
    [
        ((2, 4, 5, 6), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
        ((2, 4, 5, 6), (4, 3, 3, 2), {"dilations": [2, 1], "pads": [1, 0, 2, 1]}),
        (
            (2, 4, 5, 6, 3),
            (4, 2, 3, 2, 2),
            {"group": 2, "output_padding": [1, 0, 1], "strides": [2, 1, 2]},
        ),
        ((2, 4, 3, 4, 3), (4, 2, 3, 2, 2), {"group": 2, "dilations": [1, 2, 2]}),
        ((1, 2, 4, 4), (2, 3, 2, 2), {"output_shape": [5, 5]}),
        ((1, 2, 4, 4), (2, 3, 3, 3), {"auto_pad": "SAME_UPPER"}),
    ],
)
def test_conv_transpose_canvas_col2im_matches_onnxruntime(monkeypatch, x_shape, w_shape, attrs):
    from onnxgrad.runtime.kernels import conv as conv_module

    x, w = _data(x_shape), _data(w_shape)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
    want = _run_ort(node, {"x": x, "w": w}, len(x_shape))
    kernel = conv_module.conv_transpose(
        KernelNode("ConvTranspose", "", "t", 17, attrs, ["x", "w"], ["y"])
    )
    for chunk_entries in (1, 1 << 19):  # one image at a time, all of them
        monkeypatch.setattr(conv_module, "COLUMNS_PER_CHUNK", chunk_entries)
        (y,) = kernel(x, w)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def _two_max_pools(second: dict, y_read: bool = False) -> onnx.ModelProto:
    """Relu → MaxPool (Y only), and a second MaxPool of the same Relu for its Indices, as
    the MaxPool gradient rule emits it; `second` overrides the second's attributes."""
    first = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["y"], name="fwd", **first),
        helper.make_node("MaxPool", ["r"], ["y2", "i"], name="bwd", **{**first, **second}),
    ]
    outputs = [
        helper.make_tensor_value_info("y", F32, _dims("y", 4)),
        helper.make_tensor_value_info("i", TensorProto.INT64, _dims("i", 4)),
    ]
    if y_read:
        nodes.append(helper.make_node("Neg", ["y2"], ["n2"], name="neg"))
        outputs.append(helper.make_tensor_value_info("n2", F32, _dims("n2", 4)))
    graph = helper.make_graph(
        nodes, "pools", [helper.make_tensor_value_info("x", F32, _dims("x", 4))], outputs
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "second, y_read, shared",
    [
        ({}, False, True),
        ({"storage_order": 0}, False, True),  # the default, spelled out
        ({"storage_order": 1}, False, False),  # other indices
        ({"strides": [1, 1]}, False, False),  # other windows
        ({}, True, False),  # the second's Y is read: both stay
    ],
    ids=["same", "storage_order_0", "storage_order_1", "other_strides", "y_read"],
)
def test_max_pool_recomputed_for_indices_runs_once(second, y_read, shared):
    model = _two_max_pools(second, y_read)
    x = _data((2, 3, 6, 6))
    x[0, 0, :2, :2] = 0.0  # a window of ties (ReLU zeros): the first one wins
    session = onnxgrad.Session(model)
    ours = session.run(None, {"x": x})
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for a, b in zip(ours, want):
        np.testing.assert_array_equal(a, b)
    plan = next(iter(session._impl._plans.values()))
    pools = [s.node for s in plan.steps if s.node.op_type == "MaxPool"]
    assert len(pools) == (1 if shared else 2)
    if shared:
        assert list(pools[0].output) == ["y", "i"]


def test_max_pool_alone_computes_no_indices():
    model = _two_max_pools({})
    session = onnxgrad.Session(model)
    x = _data((1, 2, 4, 4))
    (y,) = session.run(["y"], {"x": x})
    plan = next(iter(session._impl._plans.values()))
    (pool,) = [s.node for s in plan.steps if s.node.op_type == "MaxPool"]
    assert list(pool.output) == ["y"]
    np.testing.assert_array_equal(y, x.reshape(1, 2, 2, 2, 2, 2).max(axis=(3, 5)).clip(0))
