"""Random generators: RandomUniform, RandomNormal, RandomUniformLike, RandomNormalLike,
Bernoulli, Multinomial.

With a `seed` attribute every run draws the same values (numpy's legacy generator seeded
afresh, as Dropout does), so a graph stays a function of its inputs; without one each run
draws new values from a generator made when the model is compiled. The plan never folds
these ops into constants.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from onnxgrad.runtime.kernels import KernelNode
from onnxgrad.runtime.kernels.sequence import kernel_if_missing


def _generator(node: KernelNode):
    """A function that returns the generator for one run."""
    seed = node.attrs.get("seed")
    if seed is None:
        shared = np.random.RandomState()
        return lambda: shared
    return lambda: np.random.RandomState(int(seed) % 2**32)


def _dtype(node: KernelNode, like: np.dtype | None = None) -> np.dtype:
    if "dtype" in node.attrs:
        return helper.tensor_dtype_to_np_dtype(node.attrs["dtype"])
    return np.dtype(np.float32) if like is None else like


def _uniform(node: KernelNode, rng, shape, dtype):
    low, high = node.attrs.get("low", 0.0), node.attrs.get("high", 1.0)
    return rng.uniform(low, high, shape).astype(dtype)


def _normal(node: KernelNode, rng, shape, dtype):
    mean, scale = node.attrs.get("mean", 0.0), node.attrs.get("scale", 1.0)
    return rng.normal(mean, scale, shape).astype(dtype)


@kernel_if_missing("RandomUniform", "RandomNormal")
def random_fixed_shape(node: KernelNode):
    """Values of the `shape` attribute, uniform in [low, high) or normal(mean, scale)."""
    draw = _uniform if node.op_type == "RandomUniform" else _normal
    generator = _generator(node)
    shape, dtype = tuple(node.attrs["shape"]), _dtype(node)
    return lambda: (draw(node, generator(), shape, dtype),)


@kernel_if_missing("RandomUniformLike", "RandomNormalLike")
def random_like(node: KernelNode):
    """Values shaped like the input, of the dtype attribute (default: the input's)."""
    draw = _uniform if node.op_type == "RandomUniformLike" else _normal
    generator = _generator(node)
    return lambda x: (draw(node, generator(), x.shape, _dtype(node, x.dtype)),)


@kernel_if_missing("Bernoulli")
def bernoulli(node: KernelNode):
    """Bernoulli: 1 with probability x, else 0, in the dtype attribute (default: x's)."""
    generator = _generator(node)

    def run(x):
        u = generator().random_sample(x.shape)
        return ((u < x.astype(np.float64)).astype(_dtype(node, x.dtype)),)

    return run


@kernel_if_missing("Multinomial")
def multinomial(node: KernelNode):
    """Multinomial: sample_size class indices per row, drawn from softmax(input) (the input
    holds unnormalized log-probabilities); int32 unless dtype says int64."""
    size = node.attrs.get("sample_size", 1)
    dtype = helper.tensor_dtype_to_np_dtype(node.attrs.get("dtype", TensorProto.INT32))
    generator = _generator(node)

    def run(x):
        rng = generator()
        logits = x.astype(np.float64)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
        u = rng.random_sample((x.shape[0], size))
        out = np.stack([np.searchsorted(cdf[b], u[b], side="right") for b in range(x.shape[0])])
        return (np.minimum(out, x.shape[1] - 1).astype(dtype),)

    return run
