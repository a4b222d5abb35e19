"""Normalization and Dropout kernels against onnxruntime and onnx's reference evaluator, for
what the gradient table does not reach: statistics outputs, stash types, float16, older
opsets, Dropout's masks."""

from __future__ import annotations

import numpy as np
import pytest

from onnxgrad.runtime.session import Session
from tests.runtime.test_kernels_reduce import compare, one_node_model

RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32, low=-2.0, high=2.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(dtype)


def bn_inputs(shape, dtype=np.float32):
    c = shape[1]
    return [
        rand(*shape, dtype=dtype),
        rand(c, dtype=dtype),
        rand(c, dtype=dtype),
        rand(c, dtype=dtype, low=-0.5, high=0.5),
        rand(c, dtype=dtype, low=0.5, high=1.5),
    ]


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 2, 2), (2, 2, 2, 2, 2)])
def test_batch_norm_inference(shape):
    compare("BatchNormalization", bn_inputs(shape), epsilon=1e-3)


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 2)])
def test_batch_norm_training_outputs(shape):
    compare("BatchNormalization", bn_inputs(shape), outputs=3, training_mode=1, momentum=0.8)


def test_batch_norm_float64_and_float16():
    compare("BatchNormalization", bn_inputs((2, 3, 4), np.float64))
    compare("BatchNormalization", bn_inputs((2, 3, 4), np.float16), rtol=2e-3, atol=2e-3)


def test_batch_norm_opset15_mixed_types():
    # Opset 15: float16 x and scale with float32 statistics.
    x, scale, bias, mean, var = bn_inputs((2, 3, 4))
    inputs = [x.astype(np.float16), scale.astype(np.float16), bias.astype(np.float16), mean, var]
    compare("BatchNormalization", inputs, opset=15, rtol=2e-3, atol=2e-3)


def test_batch_norm_opset9_inference():
    compare("BatchNormalization", bn_inputs((2, 3, 4)), opset=9)


@pytest.mark.parametrize("axis", [-1, 1, -2, 0])
def test_layer_norm_statistics(axis):
    x = rand(2, 3, 4)
    shape = (2, 3, 4)[axis:] if axis else (2, 3, 4)
    compare("LayerNormalization", [x, rand(*shape), rand(*shape)], outputs=3, axis=axis)


def test_layer_norm_no_bias_epsilon():
    compare("LayerNormalization", [rand(3, 5), rand(5)], outputs=3, epsilon=0.1)


def test_layer_norm_stash_type():
    # float16 x, float32 statistics (stash_type 1): Mean and InvStdDev come out float32.
    x = rand(2, 8, dtype=np.float16)
    scale, bias = rand(8, dtype=np.float16), rand(8, dtype=np.float16)
    y, mean, inv = compare("LayerNormalization", [x, scale, bias], outputs=3, rtol=2e-3, atol=2e-3)
    assert y.dtype == np.float16 and mean.dtype == np.float32 and inv.dtype == np.float32
    # A float64 x with the default stash type: Y stays float64, the statistics are float32.
    model = one_node_model(
        "LayerNormalization", [rand(2, 3, dtype=np.float64), rand(3, dtype=np.float64)], 3, 18
    )
    y, mean, inv = Session(model).run(
        None, {"in0": rand(2, 3, dtype=np.float64), "in1": rand(3, dtype=np.float64)}
    )
    assert y.dtype == np.float64 and mean.dtype == np.float32 and inv.dtype == np.float32


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 2, 2), (1, 2, 2, 2, 2)])
def test_instance_norm(shape):
    compare("InstanceNormalization", [rand(*shape), rand(shape[1]), rand(shape[1])], epsilon=1e-3)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm_opset21(groups):
    compare("GroupNormalization", [rand(2, 4, 3, 2), rand(4), rand(4)], opset=21, num_groups=groups)


def test_group_norm_before_opset21_is_refused():
    with pytest.raises(NotImplementedError, match="opset 21"):
        from onnxgrad.runtime.kernels import KernelNode, lookup

        lookup("GroupNormalization")(
            KernelNode("GroupNormalization", "", "n", 18, {"num_groups": 2})
        )


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_rms_norm_opset23(axis):
    x = rand(2, 3, 4)
    shape = (2, 3, 4)[axis:]
    compare("RMSNormalization", [x, rand(*shape)], opset=23, axis=axis, epsilon=1e-4)


def test_rms_norm_float16():
    compare(
        "RMSNormalization",
        [rand(2, 8, dtype=np.float16), rand(8, dtype=np.float16)],
        opset=23,
        rtol=2e-3,
        atol=2e-3,
    )


@pytest.mark.parametrize("axes", [None, [2], [0, 1, 2, 3], [1, -1]])
def test_mean_variance_norm(axes):
    attrs = {} if axes is None else {"axes": axes}
    compare("MeanVarianceNormalization", [rand(2, 3, 2, 3)], **attrs)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_lp_norm(p, axis):
    compare("LpNormalization", [rand(3, 4, 2)], p=p, axis=axis)


def test_lp_norm_zero_vector():
    x = np.zeros((2, 3), np.float32)
    x[1] = [3, 0, -4]
    (y,) = compare("LpNormalization", [x], p=2, axis=1)
    np.testing.assert_allclose(y, [[0, 0, 0], [0.6, 0, -0.8]], rtol=1e-6)


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_lrn_odd(size):
    compare("LRN", [rand(2, 5, 3, 3)], size=size, alpha=0.3, beta=0.8, bias=1.5)


@pytest.mark.parametrize("size", [2, 4])
def test_lrn_even_window(size):
    # onnxruntime takes odd sizes only; the spec's window is [c − ⌊(s−1)/2⌋, c + ⌈(s−1)/2⌉].
    x = rand(2, 5, 2, 3, dtype=np.float64)
    model = one_node_model("LRN", [x], 1, 18, size=size, alpha=0.5, beta=0.75, bias=1.25)
    (y,) = Session(model).run(None, {"in0": x})
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    expected = np.empty_like(x)
    for c in range(5):
        window = x[:, max(0, c - before) : c + after + 1]
        s = 1.25 + 0.5 / size * np.sum(window**2, axis=1)
        expected[:, c] = x[:, c] / s**0.75
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def _dropout(x, outputs=2, opset=18, ratio=None, training=None, **attrs):
    inputs = [
        x,
        None if ratio is None else np.array(ratio, x.dtype),
        None if training is None else np.array(training),
    ]
    while inputs[-1] is None:
        inputs.pop()
    model = one_node_model("Dropout", inputs, outputs, opset, **attrs)
    feeds = {i.name: inputs[int(i.name[2:])] for i in model.graph.input}
    return Session(model).run(None, feeds)


def test_dropout_inference_is_identity():
    x = rand(3, 4)
    y, mask = _dropout(x, ratio=0.5, training=False)
    np.testing.assert_array_equal(y, x)
    assert mask.dtype == np.bool_ and mask.all()
    (y,) = _dropout(x, outputs=1)
    np.testing.assert_array_equal(y, x)
    compare("Dropout", [x, np.array(0.3, np.float32), np.array(False)], outputs=2)


def test_dropout_training_scales_kept_elements():
    x = rand(20, 30, dtype=np.float64)
    y, mask = _dropout(x, ratio=0.4, training=True, seed=1)
    np.testing.assert_allclose(y, np.where(mask, x / 0.6, 0.0))
    assert 0.5 < mask.mean() < 0.7
    # The same seed draws the same mask on every run; no seed draws new ones.
    np.testing.assert_array_equal(_dropout(x, ratio=0.4, training=True, seed=1)[1], mask)
    a = _dropout(x, ratio=0.4, training=True)[1]
    b = _dropout(x, ratio=0.4, training=True)[1]
    assert (a != b).any()


def test_dropout_ratio_zero_and_old_opsets():
    x = rand(3, 4)
    y, mask = _dropout(x, ratio=0.0, training=True)
    np.testing.assert_array_equal(y, x)
    assert mask.all()
    # Opsets 7 to 11 describe inference only. (onnxruntime gives an all-false mask there;
    # the reference evaluator, like onnxgrad, an all-true one.)
    compare("Dropout", [x], outputs=2, opset=10, ref="onnx", ratio=0.3)
    compare("Dropout", [x], outputs=2, opset=7, ref="onnx", ratio=0.3)
