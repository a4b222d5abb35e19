"""Derivative rules for the loss ops: NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss.

Both pick, for each element (n, d...), the entry of its label t along the class axis 1.
With S the 0/1 selection tensor (shaped like the scores: 1 at [n, t, d...] unless t is
ignore_index) and w the class weights (1 when absent), the weight of an element is
w_t = Σ_c S · w, and

    reduction none:  loss = −w_t · x_t          →  dx = −S · w · dy
    reduction sum:   L = Σ −w_t · x_t           →  dx = −S · w · dy
    reduction mean:  L = Σ −w_t · x_t / Σ w_t   →  dx = −S · w · dy / Σ w_t

S is built by comparing the labels with the class indices (no scatter, no gather), so the
gradient graph needs no index ops. Labels are integers and get no gradient.
"""

from __future__ import annotations

import numpy as np

from onnxgrad.autodiff.rules import rule
from onnxgrad.autodiff.rules.shape import need_rank


def _classes(b, node, x: str, like: str, rank: int) -> str:
    """The class indices 0..C−1 shaped (1, C, 1, ..., 1), in the labels' integer type."""
    shape = b.shape(x)
    c = shape[1] if shape is not None else None
    layout = [1, -1] + [1] * (rank - 2)
    if isinstance(c, int):
        return b.const(np.arange(c).reshape(layout), dtype=b.dtype(like))
    if b.opset < 15:
        raise NotImplementedError(
            f"{node.op_type} node '{node.name}' with a class count unknown before run time "
            "needs opset >= 15 (Shape with start/end); convert the model or give it static shapes"
        )
    count = b.Squeeze(b.Shape(x, start=1, end=2), b.ints([0]))
    classes = b.Range(b.ints(0), count, b.ints(1))
    if b.dtype(like) != b.dtype(classes):
        classes = b.Cast(classes, to=b.dtype(like))
    return b.Reshape(classes, b.ints(layout))


def _selection(b, node, x: str, rank: int) -> str:
    """S: 1 where the class axis index equals the element's label (and it is not ignored)."""
    target = node.input[1]
    label = b.unsqueeze(target, [1])
    hit = b.Equal(label, _classes(b, node, x, target, rank))
    ignore = node.attrs.get("ignore_index")
    if ignore is not None:
        hit = b.And(hit, b.Not(b.Equal(label, b.const(ignore, like=target))))
    return b.Cast(hit, to=b.dtype(x))


def _weights(b, node, rank: int) -> str | None:
    """The class weights shaped (C, 1, ..., 1) to broadcast against the scores, or None."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    w = node.input[2]
    return b.unsqueeze(w, list(range(1, rank - 1))) if rank > 2 else w


def _loss_grads(b, node, x: str, picked: str, dy: str | None):
    """dx of the picking step (−S · w · dy, reduced as the node reduces) and d weights.

    Args:
        x: the scores the loss picks from (log-probabilities for SoftmaxCrossEntropyLoss).
        picked: the tensor whose picked entries form the loss (x itself, or log_prob).
        dy: the loss output's gradient, or None.

    Returns:
        (dx or None, dweight or None).
    """
    if dy is None:
        return None, None
    rank = need_rank(b, node, x)
    reduction = node.attrs.get("reduction", "mean")
    select = _selection(b, node, x, rank)
    w = _weights(b, node, rank)
    chosen = select if w is None else b.Mul(select, w)

    # 1. The gradient that reaches each picked element.
    if reduction == "none":
        coef = b.unsqueeze(dy, [1])
    elif reduction == "sum":
        coef = dy
    elif reduction == "mean":
        total = b.reduce_sum(chosen, None, keepdims=0)  # Σ w_t over the elements not ignored
        coef = b.Div(dy, total)
    else:
        raise NotImplementedError(
            f"{node.op_type} node '{node.name}' with reduction='{reduction}': the spec "
            "defines none, sum and mean"
        )
    dx = b.Neg(b.Mul(chosen, coef))

    # 2. Class weights: loss_el = −w_t · x_t, and for mean also the denominator Σ w_t:
    #    dw_c = Σ_{t = c} −x_t · dy  (none, sum),  Σ_{t = c} (−x_t − L) · dy / Σ w_t  (mean).
    dweight = None
    if w is not None and node.needs_grad(2):
        value = b.reduce_sum(b.Mul(select, picked), [1], keepdims=1)  # x_t
        if reduction == "mean":
            value = b.Add(value, node.output[0])
        per_element = b.Neg(b.Mul(value, coef))
        outer = [0] + list(range(2, rank))
        dweight = b.reduce_sum(b.Mul(select, per_element), outer, keepdims=0)
    return dx, dweight


@rule("NegativeLogLikelihoodLoss")
def negative_log_likelihood_loss(b, node, dys):
    """loss = −w_t · input[n, t, d...], reduced  →  dinput = −S · w · dy (/ Σ w_t for mean)

    dweight_c = Σ_{t = c} −input_t · dy (none, sum) or Σ_{t = c} (−input_t − L) · dy / Σ w_t
    (mean). target is integer: no gradient.
    """
    x = node.input[0]
    dx, dweight = _loss_grads(b, node, x, x, dys[0])
    return [dx if node.needs_grad(0) else None, None, dweight]


@rule("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy_loss(b, node, dys):
    """log_prob = log softmax(scores) along C,  loss = NLL(log_prob)
    →  dlog_prob = −S · w · dy (/ Σ w_t for mean)  (+ the gradient of the log_prob output)
       dscores = dlog_prob − softmax · Σ_c dlog_prob

    softmax is exp(log_prob), from the node's log_prob output when it has one.
    """
    scores = node.input[0]
    outs = node.output + [""]
    if outs[1]:
        log_prob = outs[1]
    else:
        log_prob = b.Sub(scores, b.reduce("ReduceLogSumExp", scores, [1], keepdims=1))
    dlog_prob, dweight = _loss_grads(b, node, scores, log_prob, dys[0])
    d_out = dys[1] if len(dys) > 1 else None
    if d_out is not None:
        dlog_prob = d_out if dlog_prob is None else b.Add(dlog_prob, d_out)
    dscores = None
    if dlog_prob is not None and node.needs_grad(0):
        total = b.reduce_sum(dlog_prob, [1], keepdims=1)
        dscores = b.Sub(dlog_prob, b.Mul(b.Exp(log_prob), total))
    return [dscores, None, dweight]
