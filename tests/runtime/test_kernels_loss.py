"""Loss kernels against onnxruntime: reductions, K-dimensional inputs, class weights,
ignore_index, integer label types, the log_prob output."""

from __future__ import annotations

import numpy as np
import pytest

from onnxgrad.errors import ExecutionError
from onnxgrad.runtime.session import Session
from tests.runtime.test_kernels_reduce import compare, one_node_model

RNG = np.random.default_rng(0)
OPS = ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"]


def scores(*shape, dtype=np.float32) -> np.ndarray:
    return RNG.uniform(-3.0, 3.0, shape).astype(dtype)


def labels(shape, classes, dtype=np.int64, ignore=None) -> np.ndarray:
    out = RNG.integers(0, classes, shape).astype(dtype)
    if ignore is not None:
        out.reshape(-1)[::2] = ignore
    return out


def outputs(op: str) -> int:
    return 2 if op == "SoftmaxCrossEntropyLoss" else 1


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4), (2, 3, 2, 2), (2, 3, 2, 1, 2)])
def test_reductions_and_shapes(op, reduction, shape):
    x = scores(*shape)
    t = labels(shape[:1] + shape[2:], shape[1])
    compare(op, [x, t], outputs=outputs(op), reduction=reduction)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("op", OPS)
def test_weights_and_ignore_index(op, reduction):
    x = scores(3, 4, 5)
    w = RNG.uniform(0.5, 2.0, 4).astype(np.float32)
    for ignore in (1, -100):
        t = labels((3, 5), 4, ignore=ignore)
        compare(op, [x, t, w], outputs=outputs(op), reduction=reduction, ignore_index=ignore)
        compare(op, [x, t], outputs=outputs(op), reduction=reduction, ignore_index=ignore)


@pytest.mark.parametrize("op", OPS)
def test_int32_labels_and_float64(op):
    x = scores(5, 3, dtype=np.float64)
    compare(op, [x, labels((5,), 3, np.int32)], outputs=outputs(op))
    compare(op, [x, labels((5,), 3), RNG.uniform(0.5, 2, 3)], outputs=outputs(op), reduction="sum")


def test_log_prob_output_is_stable():
    x = np.array([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]], np.float32)
    loss, log_prob = compare("SoftmaxCrossEntropyLoss", [x, np.array([0, 2])], outputs=2)
    assert np.isfinite(loss).all()
    np.testing.assert_allclose(log_prob[1], np.log(1 / 3), rtol=1e-6)


def test_label_out_of_range_is_an_error():
    x = scores(2, 3)
    model = one_node_model("NegativeLogLikelihoodLoss", [x, np.array([0, 3])], 1, 18)
    with pytest.raises(ExecutionError, match="label 3 is outside"):
        Session(model).run(None, {"in0": x})
