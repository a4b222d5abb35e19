"""Attention and RotaryEmbedding kernels against onnxruntime or onnx's reference evaluator:
the outputs and inputs the gradient table does not reach (past caches, present outputs, the
qk_matmul_output modes, windows, nonpad_kv_seqlen). Where neither runs a case (bfloat16,
float16 within a few ulps, masks shorter than the keys), against a plain float64 formula."""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from onnxgrad.errors import ExecutionError
from onnxgrad.runtime.session import Session
from tests.runtime.test_kernels_shape import KCase, check_kernel, kparams, model_of

_RNG = np.random.default_rng(2)


def _r(*shape):
    return _RNG.standard_normal(shape).astype(np.float32)


def _u(*shape, dtype=np.float32):
    """Uniform in [0, 1), as onnx's cases draw them: no cancellation in the outputs, so a
    relative tolerance of a few ulps of the type holds."""
    return _RNG.random(shape).astype(dtype)


def _n(*values):
    return np.array(values, dtype=np.int64)


Q, K, V = _r(2, 2, 3, 4), _r(2, 2, 3, 4), _r(2, 2, 3, 5)
PK, PV = _r(2, 2, 2, 4), _r(2, 2, 2, 5)
MASK = np.array([[True, True, False, True, True]] * 3)
ANG = _RNG.uniform(0, 3, (6, 2)).astype(np.float32)
POS = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int64)

CASES = [
    KCase("Attention", [Q, K, V], outputs=1, opset=23, ref="onnx"),
    KCase("Attention", [Q, K, V, None, PK, PV], outputs=3, opset=23, id="past", ref="onnx"),
    KCase(
        "Attention",
        [Q, K, V, None, PK, PV],
        attrs={"is_causal": 1},
        outputs=3,
        opset=23,
        id="past_causal",
        ref="onnx",
    ),
    KCase("Attention", [Q, K, V, MASK, PK, PV], outputs=3, opset=23, id="past_mask", ref="onnx"),
    KCase(
        "Attention",
        [
            Q.transpose(0, 2, 1, 3).reshape(2, 3, 8),
            K.transpose(0, 2, 1, 3).reshape(2, 3, 8),
            V.transpose(0, 2, 1, 3).reshape(2, 3, 10),
        ],
        attrs={"q_num_heads": 2, "kv_num_heads": 2},
        opset=23,
        id="3d",
        ref="onnx",
    ),
]
# Mode 0 without softcap: onnx's reference evaluator emits the soft-capped scores there, where
# the spec says the raw product.
for _mode in range(4):
    CASES.append(
        KCase(
            "Attention",
            [Q, K, V, _r(3, 5), PK, PV],
            attrs={"qk_matmul_output_mode": _mode, "softcap": 1.5 if _mode else 0.0},
            outputs=4,
            opset=23,
            id=f"qk_mode{_mode}",
            ref="onnx",
        )
    )
# nonpad_kv_seqlen (an external cache: the causal and window bounds sit at nonpad - S_q) and
# opset 25's windows, which onnxruntime runs.
QN, KN, VN = _r(2, 2, 3, 4), _r(2, 2, 6, 4), _r(2, 2, 6, 5)
CASES += [
    KCase("Attention", [QN, KN, VN, None, None, None, _n(4, 6)], opset=24, id="nonpad"),
    KCase(
        "Attention",
        [QN, KN, VN, None, None, None, _n(4, 5)],
        attrs={"is_causal": 1},
        opset=24,
        id="nonpad_causal",
    ),
    KCase(
        "Attention",
        [_r(2, 4, 1, 4), KN, VN, None, None, None, _n(6, 3)],
        attrs={"is_causal": 1},
        opset=24,
        id="nonpad_gqa_decode",
    ),
    KCase(
        "Attention",
        [QN, KN, VN, _r(2, 1, 3, 6), None, None, _n(5, 6)],
        attrs={"is_causal": 1},
        opset=24,
        id="nonpad_float_mask",
    ),
    KCase("Attention", [QN, KN, VN], attrs={"left_window_size": 1}, opset=25, id="left_window"),
    KCase(
        "Attention",
        [QN, KN, VN],
        attrs={"is_causal": 1, "left_window_size": 2},
        opset=25,
        id="causal_window",
    ),
    KCase(
        "Attention",
        [QN, KN, VN],
        attrs={"left_window_size": 1, "right_window_size": 2},
        opset=25,
        id="two_sided_window",
    ),
    KCase(
        "Attention",
        [QN, KN, VN, None, None, None, _n(4, 6)],
        attrs={"is_causal": 1, "left_window_size": 1},
        opset=25,
        id="nonpad_window",
    ),
    KCase(
        "Attention",
        [QN, KN[:, :, :2], VN[:, :, :2], None, PK, PV],
        attrs={"is_causal": 1, "left_window_size": 2},
        outputs=3,
        opset=25,
        id="past_window",
    ),
    KCase(
        "Attention",
        [QN.transpose(0, 2, 1, 3).reshape(2, 3, 8), KN[:, 0], VN[:, 0]],
        attrs={"q_num_heads": 2, "kv_num_heads": 1, "is_causal": 1, "left_window_size": 1},
        opset=25,
        id="3d_mqa_window",
    ),
]
CASES += [
    KCase("RotaryEmbedding", [Q, np.cos(ANG), np.sin(ANG), POS], opset=23),
    KCase(
        "RotaryEmbedding",
        [Q, np.cos(ANG), np.sin(ANG), POS],
        attrs={"interleaved": 1},
        opset=23,
        id="interleaved",
    ),
    KCase(
        "RotaryEmbedding",
        [Q.reshape(2, 3, 8), np.cos(ANG), np.sin(ANG), POS],
        attrs={"num_heads": 2},
        opset=23,
        id="3d",
    ),
    KCase(
        "RotaryEmbedding",
        [Q, np.cos(ANG[:, :1]), np.sin(ANG[:, :1]), POS],
        attrs={"rotary_embedding_dim": 2},
        opset=23,
        id="partial",
    ),
]


@pytest.mark.parametrize("case", kparams(CASES))
def test_kernel(case):
    check_kernel(case)


# The formula cases: float64 softmax attention with the allowed keys spelled out per
# position, as the spec words them.


@dataclass
class FCase:
    """One Attention check against `_formula`.

    Attributes:
        inputs: the node's inputs (4-D Q, K, V; None where absent), in their own dtype.
        attrs: node attributes.
        id: a short label.
        opset: the default-domain opset.
        offset: per batch, the keys before the query block (for causal and windows).
        valid: per batch, how many keys are valid (None: all).
        rtol: relative tolerance, a few ulps of the type.
        outputs: 1, or 4 to also check qk_matmul_output (mode 3 then: the probabilities).
    """

    inputs: list
    attrs: dict = field(default_factory=dict)
    id: str = ""
    opset: int = 24
    offset: tuple = (0,)
    valid: tuple | None = None
    rtol: float = 1e-5
    outputs: int = 1


def _allowed(case: FCase, batch: int, n_q: int, n_k: int) -> np.ndarray:
    """(B, 1, n_q, n_k): query i of batch b, at absolute position p = offset[b] + i, sees key
    j iff j <= p (is_causal), p - left <= j (left >= 0), j <= p + right (right >= 0), and
    j < valid[b]."""
    a = case.attrs
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    out = np.zeros((batch, 1, n_q, n_k), dtype=bool)
    for b in range(batch):
        offset = case.offset[b % len(case.offset)]
        valid = n_k if case.valid is None else case.valid[b]
        for i in range(n_q):
            p = offset + i
            for j in range(n_k):
                ok = j < valid and (not a.get("is_causal") or j <= p)
                ok = ok and (left < 0 or j >= p - left) and (right < 0 or j <= p + right)
                out[b, 0, i, j] = ok
    return out


def _formula(case: FCase) -> tuple[np.ndarray, np.ndarray]:
    """Y and the probabilities in float64, from the inputs upcast; a mask shorter than the
    keys is padded as disallowed; a row with no key allowed is zeros."""
    q, k, v, raw_mask = [*case.inputs, None][:4]
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    k, v = np.repeat(k, heads // k.shape[1], axis=1), np.repeat(v, heads // v.shape[1], axis=1)
    allowed = _allowed(case, batch, n_q, n_k)
    bias = np.zeros((n_q, n_k))
    if raw_mask is not None:
        short = n_k - raw_mask.shape[-1]
        if raw_mask.dtype == bool:
            allowed = allowed & np.pad(raw_mask, [(0, 0)] * (raw_mask.ndim - 1) + [(0, short)])
        else:
            pad = [(0, 0)] * (raw_mask.ndim - 1) + [(0, short)]
            bias = np.pad(raw_mask.astype(np.float64), pad, constant_values=-np.inf)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]) + bias
    scores = np.where(allowed, scores, -np.inf)
    live = np.isfinite(scores).any(axis=-1, keepdims=True)
    e = np.exp(scores - np.where(live, scores.max(axis=-1, keepdims=True), 0))
    probs = np.where(live, e / np.where(live, e.sum(axis=-1, keepdims=True), 1), 0)
    return probs @ v, probs


BF16, F16 = ml_dtypes.bfloat16, np.float16


def _qkv(dtype, heads=(2, 2), n_q=3, n_k=6, batch=2):
    return [
        _u(batch, heads[0], n_q, 4, dtype=dtype),
        _u(batch, heads[1], n_k, 4, dtype=dtype),
        _u(batch, heads[1], n_k, 5, dtype=dtype),
    ]


FCASES = [
    # bfloat16 and float16: computed in float32, rounded to the type after each stage.
    FCase(_qkv(BF16), {"is_causal": 1}, "bf16_causal", rtol=2**-6),
    FCase(_qkv(F16), {"is_causal": 1}, "fp16_causal", rtol=3e-3),
    FCase(_qkv(BF16, heads=(4, 2)), id="bf16_gqa", rtol=2**-6),
    FCase(
        [*_qkv(BF16), _u(2, 1, 3, 6, dtype=BF16), None, None, _n(4, 6)],
        {"is_causal": 1},
        "bf16_nonpad_causal_mask",
        offset=(1, 3),
        valid=(4, 6),
        rtol=2**-6,
    ),
    FCase(
        [*_qkv(F16, heads=(4, 2), n_q=1), None, None, None, _n(6, 2)],
        {"is_causal": 1},
        "fp16_gqa_decode",
        offset=(5, 1),
        valid=(6, 2),
        rtol=3e-3,
    ),
    FCase(
        [*_qkv(F16), _u(3, 6, dtype=F16), None, None, _n(5, 6)],
        {"is_causal": 1, "left_window_size": 2},
        "fp16_window_nonpad",
        opset=25,
        offset=(2, 3),
        valid=(5, 6),
        rtol=3e-3,
    ),
    FCase(
        _qkv(F16),
        {"softmax_precision": onnx.TensorProto.FLOAT, "qk_matmul_output_mode": 3},
        "fp16_softmax_in_float",
        rtol=3e-3,
        outputs=4,
    ),
    # A mask shorter than the keys: the keys past its end are disallowed.
    FCase([*_qkv(np.float32), _u(2, 2, 3, 4)], id="short_float_mask"),
    FCase(
        [*_qkv(np.float32), _RNG.random((3, 5)) < 0.7, None, None, _n(5, 6)],
        id="short_bool_mask_nonpad",
        valid=(5, 6),
    ),
    FCase(
        [*_qkv(np.float32), _u(2, 2, 3, 4), None, None, _n(3, 4)],
        {"is_causal": 1},
        "short_mask_nonpad_causal",
        offset=(0, 1),
        valid=(3, 4),
    ),
    # More queries than valid keys: the leading rows see no key and are zeros, in Y and in
    # the mode-3 probabilities.
    FCase(
        [*_qkv(np.float32, n_q=4, n_k=4, batch=1), None, None, None, _n(2)],
        {"is_causal": 1, "qk_matmul_output_mode": 3},
        "negative_offset",
        offset=(-2,),
        valid=(2,),
        outputs=4,
    ),
    FCase(
        [*_qkv(np.float32), np.array([True, False, True, True, False, True])],
        {"is_causal": 1, "left_window_size": 1, "right_window_size": 0},
        "rank1_bool_mask_window",
        opset=25,
    ),
]


def _attention_model(inputs, attrs, opset, qk=False):
    """A one-node Attention model (4-D inputs) with Y, and qk_matmul_output when `qk`.

    The output types are written out: shape inference gives none for an invalid node, and
    the checker wants them.
    """
    model, feeds, _ = model_of(KCase("Attention", inputs, attrs, opset=opset))
    q, k, v = inputs[:3]  # 4-D
    y_shape = [*q.shape[:3], v.shape[-1]]
    past = inputs[4] if len(inputs) > 4 and inputs[4] is not None else None
    n_k = k.shape[-2] + (0 if past is None else past.shape[2])
    elem = onnx.helper.np_dtype_to_tensor_dtype(q.dtype)
    outputs = [onnx.helper.make_tensor_value_info("y0", elem, y_shape)]
    node = model.graph.node[0]
    del node.output[:]
    node.output.append("y0")
    if qk:
        node.output.extend(["", "", "y3"])
        qk_shape = [q.shape[0], y_shape[1], y_shape[2], n_k]
        outputs.append(onnx.helper.make_tensor_value_info("y3", elem, qk_shape))
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model, feeds, [o.name for o in outputs]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FCASES])
def test_against_formula(case):
    model, feeds, outs = _attention_model(case.inputs, case.attrs, case.opset, case.outputs == 4)
    ours = Session(model).run(outs, feeds)
    want_y, want_probs = _formula(case)
    dtype = case.inputs[0].dtype
    assert ours[0].dtype == dtype, f"Y is {ours[0].dtype}, expected {dtype}"
    np.testing.assert_allclose(ours[0].astype(np.float64), want_y, rtol=case.rtol, atol=1e-6)
    if case.outputs == 4:
        qk = ours[1]
        assert qk.dtype == dtype, f"qk_matmul_output is {qk.dtype}, expected {dtype}"
        np.testing.assert_allclose(qk.astype(np.float64), want_probs, rtol=case.rtol, atol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "attrs", "message"),
    [
        ([QN, KN, VN], {"left_window_size": -2}, "left_window_size is -2"),
        ([QN, KN, VN], {"softmax_precision": 7}, "softmax_precision is 7"),
        ([QN, KN[:, :, :2], VN[:, :, :2], None, PK, PV, _n(4, 4)], {}, "nonpad_kv_seqlen"),
    ],
    ids=["window_below_minus_one", "softmax_precision_int64", "nonpad_with_past"],
)
def test_bad_attention_raises(inputs, attrs, message):
    model, feeds, outs = _attention_model(inputs, attrs, opset=25)
    with pytest.raises(ExecutionError, match=message):
        Session(model).run(outs, feeds)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_row_without_keys_is_zero_whatever_its_scores():
    # An infinite query makes its scores inf, and inf + (-inf) NaN: the row is decided
    # dead on the bias alone, so it is still zeros, in Y and in the mode-3 probabilities.
    q, k, v = _qkv(np.float32, n_q=4, n_k=4, batch=1)
    q[0, :, 0, 0] = np.inf
    inputs = [q, k, v, None, None, None, _n(2)]
    attrs = {"is_causal": 1, "qk_matmul_output_mode": 3}
    model, feeds, outs = _attention_model(inputs, attrs, opset=24, qk=True)
    y, probs = Session(model).run(outs, feeds)
    assert np.all(y[:, :, :2] == 0) and np.all(probs[:, :, :2] == 0)
    want_y, want_probs = _formula(FCase(inputs, attrs, offset=(-2,), valid=(2,)))
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)


# Half types against onnx's reference evaluator, which runs each stage in the type: ours
# computes each in float32 and rounds once, which is what numpy's float16 and ml_dtypes'
# bfloat16 operations do, so the two agree to the bit. A kernel that rounded only at the end
# would be within a few ulps (test_against_formula) but not equal.
HALF_CASES = [
    ([*_qkv(BF16, heads=(4, 2)), _u(2, 1, 3, 4, dtype=BF16), None, None, _n(4, 6)], 1),
    ([*_qkv(F16, heads=(4, 2)), _u(2, 1, 3, 4, dtype=F16), None, None, _n(4, 6)], 1),
    ([*_qkv(BF16, n_q=4), _RNG.random((4, 6)) < 0.8], 0),
    ([*_qkv(F16, n_q=4), _RNG.random((4, 6)) < 0.8], 0),
]


@pytest.mark.parametrize(
    ("inputs", "causal"), HALF_CASES, ids=["bf16_nonpad", "fp16_nonpad", "bf16_bool", "fp16_bool"]
)
def test_half_types_match_reference_bitwise(inputs, causal):
    attrs = {"is_causal": causal, "qk_matmul_output_mode": 3}
    model, feeds, outs = _attention_model(inputs, attrs, opset=24, qk=True)
    ours = Session(model).run(outs, feeds)
    theirs = ReferenceEvaluator(model).run(outs, feeds)
    for name, a, b in zip(outs, ours, theirs):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs {b.dtype}"
        np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32), err_msg=name)
