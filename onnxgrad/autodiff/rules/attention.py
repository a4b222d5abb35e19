"""Derivative rules for Attention and RotaryEmbedding (opset 23), composed of standard ops.

Attention recomputes its attention probabilities P (not an output of the node) from Q and K
and then follows the chain of scaled dot-product attention:

    S = scale · Q Kᵀ,  C = softcap · tanh(S / softcap),  Z = C + bias,  P = softmax(Z),
    Y = P V

    dV = Pᵀ dY,  dP = dY Vᵀ,  dZ = P ⊙ (dP − Σⱼ dP ⊙ P),  dC = dZ,
    dS = dC ⊙ (1 − tanh²(S / softcap)),  dQ = scale · dS K,  dK = scale · dSᵀ Q

With grouped-query attention, each K and V head serves several Q heads; their gradients are
summed back over the group.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, numpy_helper

from onnxgrad.autodiff.rules import rule
from onnxgrad.errors import GradientError, UnsupportedOpError


def _split_heads(b, t: str, n: int) -> str:
    """(B, S, n·E) → (B, n, S, E)."""
    return b.Transpose(b.Reshape(t, b.ints([0, 0, n, -1])), perm=[0, 2, 1, 3])


def _merge_heads(b, t: str) -> str:
    """(B, n, S, E) → (B, S, n·E)."""
    return b.Reshape(b.Transpose(t, perm=[0, 2, 1, 3]), b.ints([0, 0, -1]))


def _group_ints(b, group: int | str) -> str:
    return b.ints([group]) if isinstance(group, int) else group


def _repeat_heads(b, t: str, group: int | str) -> str:
    """(B, H, S, E) → (B, H·group, S, E), each head repeated `group` times in a row."""
    if group == 1:
        return t
    shape = b.Shape(t)
    lead, tail = b.Slice(shape, b.ints([0]), b.ints([2])), b.Slice(shape, b.ints([2]), b.ints([4]))
    expanded = b.Expand(b.unsqueeze(t, [2]), b.Concat(lead, _group_ints(b, group), tail, axis=0))
    heads = b.Mul(b.Slice(shape, b.ints([1]), b.ints([2])), _group_ints(b, group))
    batch = b.Slice(shape, b.ints([0]), b.ints([1]))
    return b.Reshape(expanded, b.Concat(batch, heads, tail, axis=0))


def _sum_groups(b, t: str, like: str, group: int | str) -> str:
    """(B, H·group, S, E) → (B, H, S, E): the sum over each head's group."""
    if group == 1:
        return t
    shape = b.Shape(like)
    lead, tail = b.Slice(shape, b.ints([0]), b.ints([2])), b.Slice(shape, b.ints([2]), b.ints([4]))
    split = b.Concat(lead, _group_ints(b, group), tail, axis=0)
    return b.reduce_sum(b.Reshape(t, split), [2], keepdims=0)


def _group(b, q, k, q4, k4, q_heads, kv_heads) -> int | str:
    """How many Q heads share each K/V head: an int when the shapes tell, else a tensor."""
    if q_heads and kv_heads:
        return q_heads // kv_heads
    qs, ks = b.shape(q), b.shape(k)
    known = qs is not None and ks is not None and len(qs) == 4 and len(ks) == 4
    if known and isinstance(qs[1], int) and isinstance(ks[1], int):
        return qs[1] // ks[1]
    heads = [b.Slice(b.Shape(t), b.ints([1]), b.ints([2])) for t in (q4, k4)]
    return b.Div(*heads)


@rule("Attention")
def attention(b, node, dys):
    """Y = softmax(softcap · tanh(scale · Q Kᵀ / softcap) + bias) · V  →
    dQ, dK, dV, d attn_mask as in the module docstring; the other inputs get none

    Supported: 3-D and 4-D inputs, MHA, GQA and MQA, boolean and float masks, is_causal
    without a cache, softcap, scale. Only Y may carry a gradient.
    """
    q, k, v = node.input[:3]
    extra = list(node.input[3:]) + [""] * 4
    mask = extra[0] or None
    for i, what in ((1, "past_key"), (2, "past_value"), (3, "nonpad_kv_seqlen")):
        if extra[i]:
            raise UnsupportedOpError(
                node.op_type,
                node.name,
                node.opset,
                detail=f"the gradient does not support the {what} input",
            )
    for key in ("left_window_size", "right_window_size"):
        if node.attrs.get(key, -1) != -1:
            raise UnsupportedOpError(
                node.op_type, node.name, node.opset, detail=f"the gradient does not support {key}"
            )
    if any(dy is not None for dy in dys[1:]):
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail="gradients through present_key, present_value or "
            "qk_matmul_output are not supported; only Y may feed the loss",
        )
    dy = dys[0]
    rank = b.rank(q)
    if rank is None:
        raise GradientError(
            f"Attention node '{node.name}': the gradient needs the rank of '{q}'; run shape "
            "inference or declare the input shapes"
        )
    three_d = rank == 3
    q_heads = node.attrs.get("q_num_heads") if three_d else None
    kv_heads = node.attrs.get("kv_num_heads") if three_d else None
    if three_d and not (q_heads and kv_heads):
        raise GradientError(
            f"Attention node '{node.name}': 3-D inputs need q_num_heads and kv_num_heads"
        )

    # 1. The forward chain again, in (B, H, S, E) layout.
    q4 = _split_heads(b, q, q_heads) if three_d else q
    k4 = _split_heads(b, k, kv_heads) if three_d else k
    v4 = _split_heads(b, v, kv_heads) if three_d else v
    group = _group(b, q, k, q4, k4, q_heads, kv_heads)
    scale = node.attrs.get("scale")
    if scale is not None:
        scale = b.const(float(scale), like=q)
    else:
        e = (b.shape(q) or [None])[-1]
        if isinstance(e, int) and (not three_d or q_heads):
            scale = b.const(1.0 / math.sqrt(e // q_heads if three_d else e), like=q)
        else:  # 1/√E from the run-time head size
            size = b.Cast(b.Slice(b.Shape(q4), b.ints([3]), b.ints([4])), to=b.dtype(q))
            scale = b.Reciprocal(b.Sqrt(size))
    softcap = float(node.attrs.get("softcap", 0.0))
    kr, vr = _repeat_heads(b, k4, group), _repeat_heads(b, v4, group)
    s = b.Mul(b.MatMul(q4, b.Transpose(kr, perm=[0, 1, 3, 2])), scale)
    t = None
    if softcap > 0:
        t = b.Tanh(b.Div(s, b.const(softcap, like=q)))
        z = b.Mul(t, b.const(softcap, like=q))
    else:
        z = s
    allowed = None
    if node.attrs.get("is_causal", 0):
        # Query i sees key j ≤ i (no cache, so no offset): a lower-triangular mask.
        ones = b.ConstantOfShape(b.Slice(b.Shape(z), b.ints([2]), b.ints([4])), value=_bool_one())
        allowed = b.Trilu(ones, upper=0)
    if mask is not None:
        if b.dtype(mask) == TensorProto.BOOL:
            allowed = mask if allowed is None else b.And(allowed, mask)
        else:
            z = b.Add(z, mask)
    if allowed is not None:
        z = b.Where(allowed, z, b.const(-math.inf, like=q))
    p = b.Softmax(z, axis=-1)

    # 2. Backward through P V, the softmax, the softcap and Q Kᵀ.
    dy4 = _split_heads(b, dy, q_heads) if three_d else dy
    dq = dk = dv = dmask = None
    if node.needs_grad(2):
        dvr = b.MatMul(b.Transpose(p, perm=[0, 1, 3, 2]), dy4)
        dv = _sum_groups(b, dvr, v4, group)
        dv = _merge_heads(b, dv) if three_d else dv
    want_scores = node.needs_grad(0) or node.needs_grad(1)
    want_mask = mask is not None and node.needs_grad(3) and b.dtype(mask) != TensorProto.BOOL
    if want_scores or want_mask:
        dp = b.MatMul(dy4, b.Transpose(vr, perm=[0, 1, 3, 2]))
        dz = b.Mul(p, b.Sub(dp, b.reduce_sum(b.Mul(dp, p), [-1], keepdims=1)))
        if want_mask:
            dmask = b.sum_to(dz, mask, b.shape(z))
        ds = dz
        if t is not None:
            ds = b.Mul(dz, b.Sub(b.const(1.0, like=q), b.Mul(t, t)))
        ds = b.Mul(ds, scale)
        if node.needs_grad(0):
            dq = b.MatMul(ds, kr)
            dq = _merge_heads(b, dq) if three_d else dq
        if node.needs_grad(1):
            dkr = b.MatMul(b.Transpose(ds, perm=[0, 1, 3, 2]), q4)
            dk = _sum_groups(b, dkr, k4, group)
            dk = _merge_heads(b, dk) if three_d else dk
    return [dq, dk, dv, dmask] + [None] * (len(node.input) - 4)


def _bool_one():
    return numpy_helper.from_array(np.ones(1, dtype=bool))


@rule("RotaryEmbedding")
def rotary_embedding(b, node, dys):
    """Y = rotate(X; cos θ, sin θ)  →  dX = rotate(dY; cos θ, −sin θ); the caches and
    position_ids get none

    Each rotated pair (x₁, x₂) ↦ (x₁ cos θ − x₂ sin θ, x₁ sin θ + x₂ cos θ) is a rotation, whose
    transpose is the rotation by −θ; the dimensions past rotary_embedding_dim pass through.
    """
    if node.needs_grad(1) or node.needs_grad(2):
        raise UnsupportedOpError(
            node.op_type,
            node.name,
            node.opset,
            detail="gradients for cos_cache and sin_cache are "
            "not supported (they are usually constants of the positions)",
        )
    cos, sin = node.input[1:3]
    rest = list(node.input[3:])
    attrs = {
        k: node.attrs[k]
        for k in ("interleaved", "rotary_embedding_dim", "num_heads")
        if k in node.attrs
    }
    dx = b.op("RotaryEmbedding", dys[0], cos, b.Neg(sin), *rest, **attrs)
    return [dx, None, None] + [None] * len(rest)
