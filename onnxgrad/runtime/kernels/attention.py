"""Kernels for Attention (opset 23 to 25) and RotaryEmbedding (opset 23).

Attention covers 3-D and 4-D inputs; multi-head, grouped-query and multi-query attention;
boolean and additive masks, a mask shorter than the keys counting as disallowed past its
end; is_causal and opset 25's left/right windows, both aligned at the cache offset (the
keys before the query block: the past length, or nonpad_kv_seqlen minus the query length
for an external cache); past_key/past_value with the present outputs; nonpad_kv_seqlen;
softcap, softmax_precision and the four qk_matmul_output modes. A query row that may
attend no key gives zeros, in Y and in the mode-3 probabilities.

bfloat16 and float16 are computed in float32 and rounded to the input type after each
stage of the spec's diagram (scaled Q and K, their product, softcap, bias, softmax, the
product with V): onnx's reference, which the conformance outputs come from, runs each
stage in the input type, and numpy's half-precision ops compute in float32 and round once.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnxgrad.runtime.kernels import KernelNode, kernel

_HALF = ("float16", "bfloat16")
_SOFTMAX_PRECISIONS = {1: "FLOAT", 10: "FLOAT16", 11: "DOUBLE", 16: "BFLOAT16"}


def _heads(t: np.ndarray, n: int) -> np.ndarray:
    """(B, S, n·E) → (B, n, S, E); 4-D input is returned as is."""
    if t.ndim == 4:
        return t
    b, s, hidden = t.shape
    return t.reshape(b, s, n, hidden // n).transpose(0, 2, 1, 3)


class _Precision:
    """The rounding of one type: float32 values rounded to a half type and back after each
    stage; float32 and float64 are computed in their own type and left as they are."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.half = self.dtype.name in _HALF
        self.work = np.float64 if self.dtype == np.float64 else np.float32

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.dtype).astype(np.float32) if self.half else x

    def sum(self, x: np.ndarray) -> np.ndarray:
        """The sum over the last axis (kept), accumulated as numpy does in the type itself.

        numpy sums float16 in float32 but bfloat16 in bfloat16, and the reference outputs
        carry that difference.
        """
        if not self.half:
            return x.sum(axis=-1, keepdims=True)
        return x.astype(self.dtype).sum(axis=-1, keepdims=True).astype(np.float32)


def _offset(n_q: int, past_key, nonpad):
    """The keys before the query block: an int, or a (B, 1, 1, 1) array for an external
    cache (negative where the queries outnumber the valid keys)."""
    if past_key is not None:
        return past_key.shape[2]
    if nonpad is not None:
        return nonpad.reshape(-1, 1, 1, 1) - n_q
    return 0


def _structure(n_q, n_k, offset, causal, left, right, nonpad) -> np.ndarray | None:
    """Which keys each query may see by position alone: causal, window and padding bounds.

    Args:
        n_q, n_k: query and key (total) sequence lengths.
        offset: from _offset.
        causal: whether keys after the query's absolute position are excluded.
        left, right: window bounds (-1: unbounded).
        nonpad: valid keys per batch, or None.

    Returns:
        A boolean array broadcastable to (B, H, n_q, n_k), or None when nothing is excluded.
    """
    # ahead[..., i, j]: how far key j lies after the absolute position of query i.
    ahead = np.arange(n_k) - (np.arange(n_q)[:, None] + offset)
    allowed = np.ones(ahead.shape, dtype=bool)
    if causal:
        allowed &= ahead <= 0
    if left >= 0:
        allowed &= ahead >= -left
    if right >= 0:
        allowed &= ahead <= right
    if nonpad is not None:  # (B, 1, 1, n_k): may widen `allowed`, so not in place
        allowed = allowed & (np.arange(n_k) < nonpad.reshape(-1, 1, 1, 1))
    return None if allowed.all() else allowed


def _bias(mask, allowed, n_k: int, prec: _Precision) -> np.ndarray | None:
    """The additive bias: the numeric mask (or 0), and -inf wherever a key is disallowed by
    `allowed` or a boolean mask. A mask shorter than the keys disallows the keys past its
    end. None when nothing is added."""
    if mask is not None:
        if mask.dtype != bool:
            mask = prec(mask.astype(prec.work))
        if mask.shape[-1] < n_k:
            fill = False if mask.dtype == bool else -np.inf
            pad = [(0, 0)] * (mask.ndim - 1) + [(0, n_k - mask.shape[-1])]
            mask = np.pad(mask, pad, constant_values=fill)
        if mask.dtype == bool:
            allowed = mask if allowed is None else allowed & mask
            mask = None
    if allowed is None:
        return mask
    neg_inf = prec.work(-np.inf)
    return np.where(allowed, prec.work(0) if mask is None else mask, neg_inf)


def _softmax(x: np.ndarray, dead: np.ndarray | None, prec: _Precision) -> np.ndarray:
    """Softmax over the last axis, rounded as `prec` after each step; `dead` rows (no key
    allowed) give zeros, not NaN."""
    top = x.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    e = prec(np.exp(prec(x - top)))
    total = prec.sum(e)
    probs = prec(e / np.where(total == 0, 1, total))
    return probs if dead is None else np.where(dead, 0, probs)


@kernel("Attention")
def attention(node: KernelNode):
    a = node.attrs
    q_heads = a.get("q_num_heads", 0)
    kv_heads = a.get("kv_num_heads", 0)
    causal = a.get("is_causal", 0)
    softcap = float(a.get("softcap", 0.0))
    mode = a.get("qk_matmul_output_mode", 0)
    scale_attr = a.get("scale")
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    precision = a.get("softmax_precision")

    def check(past_key, past_value, nonpad):
        for key, value in (("left_window_size", left), ("right_window_size", right)):
            if value < -1:
                raise ValueError(f"{key} is {value}; use -1 (unbounded) or a bound >= 0")
        if precision is not None and precision not in _SOFTMAX_PRECISIONS:
            names = ", ".join(f"{k} ({v})" for k, v in _SOFTMAX_PRECISIONS.items())
            raise ValueError(f"softmax_precision is {precision}; use one of {names}")
        if (past_key is None) != (past_value is None):
            raise ValueError("past_key and past_value must be given together")
        if nonpad is not None and past_key is not None:
            raise ValueError(
                "nonpad_kv_seqlen (an external cache) cannot be combined with past_key and "
                "past_value (an internal cache); give one or the other"
            )

    def run(q, k, v, mask=None, past_key=None, past_value=None, nonpad=None):
        check(past_key, past_value, nonpad)

        # 1. Heads and caches.
        q4, k4, v4 = _heads(q, q_heads), _heads(k, kv_heads), _heads(v, kv_heads)
        if past_key is not None:
            k4 = np.concatenate([past_key, k4], axis=2)
            v4 = np.concatenate([past_value, v4], axis=2)
        prec = _Precision(q.dtype)
        work = prec.work

        # 2. Which keys each query sees, as an additive bias (-inf: not allowed).
        n_q, n_k = q4.shape[2], k4.shape[2]
        offset = _offset(n_q, past_key, nonpad)
        allowed = _structure(n_q, n_k, offset, causal, left, right, nonpad)
        bias = _bias(mask, allowed, n_k, prec)

        # 3. Scores: Q and K each scaled by sqrt(scale), rounded to the type, then multiplied.
        group = q4.shape[1] // k4.shape[1]
        kr = np.repeat(k4, group, axis=1).astype(work)
        vr = np.repeat(v4, group, axis=1).astype(work)
        scale = scale_attr if scale_attr is not None else 1.0 / np.sqrt(q4.shape[-1])
        root = work(q.dtype.type(np.sqrt(scale)))
        raw = prec(prec(q4.astype(work) * root) @ prec(np.swapaxes(kr, -1, -2) * root))
        capped = prec(softcap * np.tanh(raw / softcap)) if softcap > 0 else raw
        logits = capped if bias is None else prec(capped + bias)

        # 4. Softmax, in softmax_precision where set; a row with no key allowed is zeros.
        dead = None if bias is None else np.isneginf(bias.max(axis=-1, keepdims=True))
        if precision is None:
            probs = _softmax(logits, dead, prec)
        else:
            inner = _Precision(helper.tensor_dtype_to_np_dtype(precision))
            x = inner(logits.astype(inner.work))
            probs = prec(_softmax(x, dead, inner).astype(work))

        # 5. The weighted values, back to (B, S, H·E) for 3-D input.
        y = (probs @ vr).astype(q.dtype)
        if q.ndim == 3:
            b, h, s, ev = y.shape
            y = y.transpose(0, 2, 1, 3).reshape(b, s, h * ev)

        # Mode 0 is the raw product, as the spec says, even with softcap (onnx's reference
        # evaluator emits the soft-capped scores there).
        qk = {0: raw, 1: capped, 2: logits, 3: probs}.get(mode, raw)
        return y, k4, v4, qk.astype(q.dtype)

    return run


@kernel("RotaryEmbedding")
def rotary_embedding(node: KernelNode):
    interleaved = node.attrs.get("interleaved", 0)
    rot_dim = node.attrs.get("rotary_embedding_dim", 0)
    num_heads = node.attrs.get("num_heads", 0)

    def run(x, cos, sin, position_ids=None):
        if x.ndim == 4:  # (B, H, S, D) → (B, S, H, D)
            t = x.transpose(0, 2, 1, 3)
        else:
            b, s, hidden = x.shape
            t = x.reshape(b, s, num_heads, hidden // num_heads)
        dim = rot_dim or t.shape[-1]
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        c, s_ = cos[:, :, None, :], sin[:, :, None, :]
        rot = t[..., :dim]
        if interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        else:
            x1, x2 = rot[..., : dim // 2], rot[..., dim // 2 :]
        real, imag = c * x1 - s_ * x2, s_ * x1 + c * x2
        if interleaved:
            rotated = np.stack([real, imag], axis=-1).reshape(rot.shape)
        else:
            rotated = np.concatenate([real, imag], axis=-1)
        out = np.concatenate([rotated, t[..., dim:]], axis=-1).astype(x.dtype, copy=False)
        if x.ndim == 4:
            return (out.transpose(0, 2, 1, 3),)
        return (out.reshape(x.shape),)

    return run
