"""Kernels for Attention (opset 23+) and RotaryEmbedding (opset 23).

Attention covers 3-D and 4-D inputs, multi-head, grouped-query and multi-query attention,
boolean and float masks, is_causal (bottom-right aligned after a past cache), softcap,
past_key/past_value with the present outputs, and the four qk_matmul_output modes.
Sliding windows and nonpad_kv_seqlen are not implemented (NotImplementedError).
"""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel


def _heads(t: np.ndarray, n: int) -> np.ndarray:
    """(B, S, n·E) → (B, n, S, E); 4-D input is returned as is."""
    if t.ndim == 4:
        return t
    b, s, hidden = t.shape
    return t.reshape(b, s, n, hidden // n).transpose(0, 2, 1, 3)


@kernel("Attention")
def attention(node: KernelNode):
    a = node.attrs
    q_heads = a.get("q_num_heads", 0)
    kv_heads = a.get("kv_num_heads", 0)
    causal = a.get("is_causal", 0)
    softcap = float(a.get("softcap", 0.0))
    mode = a.get("qk_matmul_output_mode", 0)
    scale_attr = a.get("scale")
    for key in ("left_window_size", "right_window_size"):
        if a.get(key, -1) != -1:
            raise NotImplementedError(f"Attention node '{node.name}': {key} (sliding windows)")

    def run(q, k, v, mask=None, past_key=None, past_value=None, nonpad=None):
        if nonpad is not None:
            raise NotImplementedError(f"Attention node '{node.name}': nonpad_kv_seqlen")
        three_d = q.ndim == 3
        q4, k4, v4 = _heads(q, q_heads), _heads(k, kv_heads), _heads(v, kv_heads)
        if past_key is not None:
            k4 = np.concatenate([past_key, k4], axis=2)
            v4 = np.concatenate([past_value, v4], axis=2)
        offset = 0 if past_key is None else past_key.shape[2]
        group = q4.shape[1] // k4.shape[1]
        kr, vr = np.repeat(k4, group, axis=1), np.repeat(v4, group, axis=1)
        scale = scale_attr if scale_attr is not None else 1.0 / np.sqrt(q4.shape[-1])
        raw = (q4 @ np.swapaxes(kr, -1, -2)) * q.dtype.type(scale)
        capped = softcap * np.tanh(raw / softcap) if softcap > 0 else raw
        logits = capped.astype(np.float64)
        allowed = np.ones(logits.shape[-2:], dtype=bool)
        if causal:
            n_q, n_k = logits.shape[-2:]
            allowed = np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + offset
        allowed = np.broadcast_to(allowed, logits.shape)
        if mask is not None:
            if mask.dtype == bool:
                allowed = allowed & mask
            else:
                logits = logits + mask
        logits = np.where(allowed, logits, -np.inf)
        top = logits.max(axis=-1, keepdims=True)
        live = np.isfinite(top)
        e = np.exp(logits - np.where(live, top, 0.0))
        total = e.sum(axis=-1, keepdims=True)
        # A row with no key allowed gives zeros, not NaN.
        probs = np.where(live, e / np.where(total == 0, 1.0, total), 0.0).astype(q.dtype)
        y = probs @ vr
        if three_d:
            b, h, s, ev = y.shape
            y = y.transpose(0, 2, 1, 3).reshape(b, s, h * ev)
        qk = {0: raw, 1: capped, 2: logits.astype(q.dtype), 3: probs}.get(mode, raw)
        return y, k4, v4, qk.astype(q.dtype, copy=False)

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
