"""Normalization kernels, and Dropout.

BatchNormalization InstanceNormalization LayerNormalization GroupNormalization
RMSNormalization MeanVarianceNormalization LpNormalization LRN Dropout.

Statistics are computed in the wider of the input's type and the op's stash type (float32
by default), so float16 inputs are normalized in float32 and float64 inputs stay float64;
the results are cast back to the input's type.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from onnxgrad.runtime.kernels import KernelNode, kernel

# stash_type values numpy computes in; any other (bfloat16) is stashed as float32.
_STASH = {
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
}


def _stash_dtype(node: KernelNode) -> np.dtype:
    return _STASH.get(node.attrs.get("stash_type", TensorProto.FLOAT), np.dtype(np.float32))


def _wide(x: np.ndarray, stash: np.dtype) -> np.ndarray:
    """`x` in the wider of its own type and the stash type (no copy when already there)."""
    return x.astype(np.result_type(x.dtype, stash), copy=False)


def _standardize(x: np.ndarray, axes: tuple[int, ...], epsilon: float):
    """(x − mean) / √(var + ε) over `axes`, with the mean and 1/√(var + ε) (kept dims)."""
    mean = np.mean(x, axis=axes, keepdims=True)
    d = x - mean
    var = np.mean(d * d, axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(var + x.dtype.type(epsilon))
    return d * inv, mean, inv


def _per_channel(p: np.ndarray, rank: int) -> np.ndarray:
    """A per-channel vector (C,) shaped to broadcast against (N, C, D1, ...)."""
    return p.reshape((-1,) + (1,) * (rank - 2)) if rank > 2 else p


@kernel("BatchNormalization")
def batch_normalization(node: KernelNode):
    """Inference with the given statistics, or training with the batch's (opset >= 14:
    training_mode=1; older opsets: is_test=0 or more than one output)."""
    epsilon = node.attrs.get("epsilon", 1e-5)
    momentum = node.attrs.get("momentum", 0.9)
    if node.opset >= 14:
        training = bool(node.attrs.get("training_mode", 0))
    elif node.opset >= 7:
        training = sum(1 for o in node.outputs if o) > 1
    else:
        training = not node.attrs.get("is_test", 0)
    if not node.attrs.get("spatial", 1):
        raise NotImplementedError("BatchNormalization with spatial=0 (opset < 9)")

    def infer(x, scale, bias, mean, var):
        rank = x.ndim
        t = np.result_type(x.dtype, scale.dtype, mean.dtype)
        inv = scale.astype(t) / np.sqrt(var.astype(t) + t.type(epsilon))
        shift = bias.astype(t) - mean.astype(t) * inv
        y = x * _per_channel(inv.astype(x.dtype), rank) + _per_channel(shift.astype(x.dtype), rank)
        return (y,)

    def train(x, scale, bias, mean, var):
        axes = (0,) + tuple(range(2, x.ndim))
        t = np.result_type(x.dtype, scale.dtype, mean.dtype)
        xw = x.astype(t, copy=False)
        batch_mean = np.mean(xw, axis=axes)
        batch_var = np.var(xw, axis=axes)  # biased, as the spec's reference computes it
        (y,) = infer(x, scale, bias, batch_mean, batch_var)
        m = t.type(momentum)
        running_mean = (mean * m + batch_mean * (1 - m)).astype(mean.dtype)
        running_var = (var * m + batch_var * (1 - m)).astype(var.dtype)
        return (
            y,
            running_mean,
            running_var,
            batch_mean.astype(mean.dtype),
            batch_var.astype(var.dtype),
        )

    return train if training else infer


@kernel("InstanceNormalization")
def instance_normalization(node: KernelNode):
    """scale · (x − mean) / √(var + ε) + bias, statistics over the spatial axes of each (n, c)."""
    epsilon = node.attrs.get("epsilon", 1e-5)

    def run(x, scale, bias):
        xhat, _, _ = _standardize(_wide(x, np.dtype(np.float32)), tuple(range(2, x.ndim)), epsilon)
        rank = x.ndim
        y = xhat * _per_channel(scale, rank) + _per_channel(bias, rank)
        return (y.astype(x.dtype, copy=False),)

    return run


@kernel("LayerNormalization")
def layer_normalization(node: KernelNode):
    """Y, Mean and InvStdDev; Mean and InvStdDev are of the stash type."""
    axis = node.attrs.get("axis", -1)
    epsilon = node.attrs.get("epsilon", 1e-5)
    stash = _stash_dtype(node)

    def run(x, scale, bias=None):
        a = axis % x.ndim if x.ndim else 0
        xhat, mean, inv = _standardize(_wide(x, stash), tuple(range(a, x.ndim)), epsilon)
        y = xhat * scale
        if bias is not None:
            y = y + bias
        return (
            y.astype(x.dtype, copy=False),
            mean.astype(stash, copy=False),
            inv.astype(stash, copy=False),
        )

    return run


@kernel("GroupNormalization")
def group_normalization(node: KernelNode):
    """Scale and bias per channel (opset 21). The per-group form of opset 18 is deprecated
    and onnx's checker rejects it, so no model that loads can hold it."""
    groups = node.attrs["num_groups"]
    epsilon = node.attrs.get("epsilon", 1e-5)
    stash = _stash_dtype(node)
    if node.opset < 21:
        raise NotImplementedError(
            "GroupNormalization before opset 21 (per-group scale, deprecated): convert the "
            "model to opset 21, with the scale and bias repeated for each channel of a group"
        )

    def run(x, scale, bias):
        n, c = x.shape[0], x.shape[1]
        if c % groups:
            raise ValueError(f"{c} channels do not split into num_groups={groups} groups")
        grouped = _wide(x, stash).reshape(n, groups, -1)
        xhat, _, _ = _standardize(grouped, (2,), epsilon)
        xhat = xhat.astype(x.dtype, copy=False).reshape(x.shape)
        return (xhat * _per_channel(scale, x.ndim) + _per_channel(bias, x.ndim),)

    return run


@kernel("RMSNormalization")
def rms_normalization(node: KernelNode):
    """scale · x / √(mean(x²) + ε), the mean over the axes from `axis` on."""
    axis = node.attrs.get("axis", -1)
    epsilon = node.attrs.get("epsilon", 1e-5)
    stash = _stash_dtype(node)

    def run(x, scale):
        a = axis % x.ndim if x.ndim else 0
        xw = _wide(x, stash)
        ms = np.mean(xw * xw, axis=tuple(range(a, x.ndim)), keepdims=True)
        y = (xw / np.sqrt(ms + xw.dtype.type(epsilon))).astype(x.dtype, copy=False)
        return (y * scale,)

    return run


@kernel("MeanVarianceNormalization")
def mean_variance_normalization(node: KernelNode):
    """(x − E x) / (√(E (x − E x)²) + 1e-9), the epsilon of the spec's function body."""
    axes = tuple(node.attrs.get("axes", (0, 2, 3)))

    def run(x):
        ax = tuple(a % x.ndim for a in axes)
        mean = np.mean(x, axis=ax, keepdims=True)
        d = x - mean
        std = np.sqrt(np.mean(d * d, axis=ax, keepdims=True))
        return (d / (std + x.dtype.type(1e-9)),)

    return run


@kernel("LpNormalization")
def lp_normalization(node: KernelNode):
    """x / ‖x‖_p along one axis (p = 1 or 2); a zero norm gives 0."""
    axis = node.attrs.get("axis", -1)
    p = node.attrs.get("p", 2)
    if p not in (1, 2):
        raise NotImplementedError(f"LpNormalization with p={p}: the spec allows 1 and 2")

    def run(x):
        if p == 1:
            norm = np.sum(np.abs(x), axis=axis, keepdims=True)
        else:
            norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True))
        zero = norm == 0
        return (np.where(zero, 0, x / np.where(zero, 1, norm)).astype(x.dtype, copy=False),)

    return run


def channel_window_sum(v: np.ndarray, size: int) -> np.ndarray:
    """Σ v over the LRN window of each channel: [c − ⌊(size−1)/2⌋, c + ⌈(size−1)/2⌉].

    A cumulative sum along the channels, padded so that every window is one difference.
    """
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    pad = [(0, 0)] * v.ndim
    pad[1] = (before + 1, after)
    cum = np.cumsum(np.pad(v, pad), axis=1)
    c = v.shape[1]
    return cum[:, size : size + c] - cum[:, :c]


@kernel("LRN")
def lrn(node: KernelNode):
    """y = x / (bias + α/size · Σ_window x²)^β, the window running across channels."""
    size = node.attrs["size"]
    alpha = node.attrs.get("alpha", 1e-4)
    beta = node.attrs.get("beta", 0.75)
    bias = node.attrs.get("bias", 1.0)

    def run(x):
        t = x.dtype.type
        s = t(bias) + t(alpha / size) * channel_window_sum(x * x, size)
        return ((x * s ** t(-beta)).astype(x.dtype, copy=False),)

    return run


@kernel("Dropout")
def dropout(node: KernelNode):
    """Identity in inference (mask all true); in training, keep each element with
    probability 1 − ratio and scale it by 1 / (1 − ratio).

    With a seed attribute every run draws the same mask, so a graph can be differentiated
    numerically; without one each run draws a new mask.
    """
    seed = node.attrs.get("seed")
    shared = np.random.default_rng() if seed is None else None
    attr_ratio = node.attrs.get("ratio", 0.5)  # opset < 12
    if node.opset < 7:
        attr_training = not node.attrs.get("is_test", 0)
    else:
        attr_training = False  # opsets 7 to 11 only describe inference

    def run(x, ratio=None, training_mode=None):
        r = float(attr_ratio if ratio is None else np.asarray(ratio))
        training = attr_training if training_mode is None else bool(np.asarray(training_mode))
        if not training or r == 0.0:
            return (x, np.ones(x.shape, dtype=bool))
        if seed is None:
            mask = shared.random(x.shape) >= r
        else:
            # numpy's legacy generator, seeded afresh: the mask onnx's conformance cases expect.
            mask = np.random.RandomState(int(seed) % 2**32).random_sample(x.shape) >= r
        if r >= 1.0:
            return (np.zeros_like(x), mask)
        return ((x * mask) * x.dtype.type(1.0 / (1.0 - r)), mask)

    return run
