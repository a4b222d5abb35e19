"""Attention and RotaryEmbedding kernels against onnxruntime or onnx's reference evaluator:
the outputs and inputs the gradient table does not reach (past caches, present outputs, the
qk_matmul_output modes)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime.test_kernels_shape import KCase, check_kernel, kparams

_RNG = np.random.default_rng(2)


def _r(*shape):
    return _RNG.standard_normal(shape).astype(np.float32)


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
