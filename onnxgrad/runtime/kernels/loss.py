"""Loss kernels: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss.

Both take scores of shape (N, C) or (N, C, D1, ..., Dk) and integer labels of shape (N)
or (N, D1, ..., Dk). Each element's loss is −w[t] · x[n, t, d...], with w the optional
class weights (1 when absent) and 0 where the label equals ignore_index. reduction "mean"
divides the sum by Σ w[t] over the elements not ignored.
"""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel

_REDUCTIONS = ("none", "sum", "mean")


def _parse(node: KernelNode) -> tuple[str, int | None]:
    reduction = node.attrs.get("reduction", "mean")
    if reduction not in _REDUCTIONS:
        raise NotImplementedError(
            f"reduction '{reduction}'; the spec defines {', '.join(_REDUCTIONS)}"
        )
    return reduction, node.attrs.get("ignore_index")


def log_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """log softmax along `axis`, shifted by the maximum so that exp never overflows."""
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def negative_log_likelihood(
    x: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    reduction: str,
    ignore_index: int | None,
) -> np.ndarray:
    """The NegativeLogLikelihoodLoss of log-probabilities `x` (N, C, ...)."""
    c = x.shape[1]
    keep = np.ones(target.shape, dtype=bool) if ignore_index is None else target != ignore_index
    safe = np.where(keep, target, 0)
    if np.any((safe < 0) | (safe >= c)):
        bad = int(target[keep & ((target < 0) | (target >= c))].reshape(-1)[0])
        raise ValueError(f"label {bad} is outside [0, {c}) and is not ignore_index")
    picked = np.take_along_axis(x, np.expand_dims(safe, 1), axis=1).squeeze(1)
    w = np.ones(target.shape, x.dtype) if weight is None else weight.astype(x.dtype)[safe]
    w = w * keep.astype(x.dtype)
    loss = -(picked * w)
    if reduction == "none":
        return loss
    total = np.sum(loss, dtype=x.dtype)
    if reduction == "sum":
        return np.asarray(total, dtype=x.dtype)
    return np.asarray(total / np.sum(w, dtype=x.dtype), dtype=x.dtype)


@kernel("NegativeLogLikelihoodLoss")
def negative_log_likelihood_loss(node: KernelNode):
    """The loss of log-probabilities `input` (N, C, ...) for integer labels `target`."""
    reduction, ignore_index = _parse(node)

    def run(x, target, weight=None):
        return (negative_log_likelihood(x, target, weight, reduction, ignore_index),)

    return run


@kernel("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy_loss(node: KernelNode):
    """The loss, and the log-probabilities (log softmax along C) as the optional output."""
    reduction, ignore_index = _parse(node)

    def run(scores, labels, weights=None):
        log_prob = log_softmax(scores)
        loss = negative_log_likelihood(log_prob, labels, weights, reduction, ignore_index)
        return (loss, log_prob)

    return run
