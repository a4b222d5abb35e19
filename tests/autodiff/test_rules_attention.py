"""Op table for Attention and RotaryEmbedding (opset 23)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.optable import Case, check_case, params

_RNG = np.random.default_rng(5)
ANGLES = _RNG.uniform(0, 3, (6, 2))
COS, SIN = np.cos(ANGLES), np.sin(ANGLES)
COS3, SIN3 = np.cos(ANGLES[:3, :1]), np.sin(ANGLES[:3, :1])  # rotary_embedding_dim 2
POS = np.array([[0, 2, 5], [1, 1, 3]], dtype=np.int64)
BATCH_ANGLES = _RNG.uniform(0, 3, (2, 3, 2))
BMASK = np.array([[True, False, True, True], [True, True, False, True], [False, True, True, True]])

CASES = [
    # Attention: 4-D (B, H, S, E) and 3-D (B, S, H·E); MHA, GQA, MQA; masks; causal; softcap.
    Case("Attention", [(2, 2, 3, 4), (2, 2, 4, 4), (2, 2, 4, 3)], opset=23, id="mha"),
    Case("Attention", [(1, 4, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2)], opset=23, id="gqa"),
    Case("Attention", [(1, 3, 2, 2), (1, 1, 4, 2), (1, 1, 4, 3)], opset=23, id="mqa"),
    Case(
        "Attention",
        [(2, 3, 8), (2, 4, 8), (2, 4, 6)],
        attrs={"q_num_heads": 2, "kv_num_heads": 2},
        opset=23,
        id="3d",
    ),
    Case(
        "Attention",
        [(1, 3, 8), (1, 3, 4), (1, 3, 4)],
        attrs={"q_num_heads": 4, "kv_num_heads": 2},
        opset=23,
        id="3d_gqa",
    ),
    Case(
        "Attention", [(1, 2, 3, 4), (1, 2, 4, 4), (1, 2, 4, 2), (3, 4)], opset=23, id="float_mask"
    ),
    Case("Attention", [(1, 2, 3, 4), (1, 2, 4, 4), (1, 2, 4, 2), BMASK], opset=23, id="bool_mask"),
    Case(
        "Attention",
        [(1, 2, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2)],
        attrs={"is_causal": 1},
        opset=23,
        id="causal",
    ),
    Case(
        "Attention",
        [(1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 2)],
        attrs={"softcap": 2.0, "scale": 0.8},
        opset=23,
        id="softcap_scale",
    ),
    Case(
        "Attention",
        [(2, 2, 3, 4), (2, 2, 4, 4), (2, 2, 4, 3)],
        opset=23,
        id="dynamic",
        dynamic=True,
    ),
    Case(
        "Attention",
        [(1, 4, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2)],
        opset=23,
        id="gqa_dynamic",
        dynamic=True,
    ),
    # onnx infers a wrong output width for 3-D inputs with symbolic dimensions, which its full
    # check and onnxruntime then reject against the loss's weights.
    Case(
        "Attention",
        [(1, 3, 8), (1, 3, 4), (1, 3, 4)],
        attrs={"q_num_heads": 4, "kv_num_heads": 2},
        opset=23,
        id="3d_dynamic",
        dynamic=True,
        full_check=False,
        ort=False,
    ),
    # RotaryEmbedding (onnx types it for float32 and 16-bit floats only, so the float64 models
    # skip onnx's full check): halves or interleaved, 4-D or 3-D, partial rotation, position ids.
    Case("RotaryEmbedding", [(2, 2, 3, 4), COS, SIN, POS], opset=23, wrt=[0], id="halves"),
    Case(
        "RotaryEmbedding",
        [(2, 2, 3, 4), COS, SIN, POS],
        attrs={"interleaved": 1},
        opset=23,
        wrt=[0],
        id="interleaved",
    ),
    Case(
        "RotaryEmbedding",
        [(2, 3, 8), COS, SIN, POS],
        attrs={"num_heads": 2},
        opset=23,
        wrt=[0],
        id="3d",
    ),
    Case(
        "RotaryEmbedding",
        [(2, 1, 3, 4), np.cos(BATCH_ANGLES[..., :1]), np.sin(BATCH_ANGLES[..., :1])],
        attrs={"rotary_embedding_dim": 2},
        opset=23,
        wrt=[0],
        id="partial_no_positions",
    ),
    Case(
        "RotaryEmbedding",
        [(2, 1, 3, 4), np.cos(BATCH_ANGLES), np.sin(BATCH_ANGLES)],
        opset=23,
        wrt=[0],
        id="batch_caches",
        dynamic=True,
    ),
]


for _case in CASES:
    if _case.op == "RotaryEmbedding":
        _case.full_check = False


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)
