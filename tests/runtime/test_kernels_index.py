"""Indexing kernels against onnxruntime (or onnx's reference evaluator)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime.test_kernels_shape import KCase, check_kernel, kparams


def _x(*shape, dtype=np.float32):
    n = int(np.prod(shape)) if shape else 1
    return ((np.arange(n) * 7) % n - n // 3).reshape(shape).astype(dtype)


def _i(*values, shape=None):
    out = np.array(values, dtype=np.int64)
    return out if shape is None else out.reshape(shape)


X = _x(3, 4, 5)
XI = _x(3, 4, 5, dtype=np.int32)
TIES = np.array([[1, 3, 3, 0], [2, 2, 1, 2]], dtype=np.float32)

CASES = [
    # Gather: any axis, negative axis and indices, scalar and 2-D indices.
    KCase("Gather", [X, _i(2, 0, 2)]),
    KCase("Gather", [X, _i(-1, 0, -4, 3, shape=(2, 2))], attrs={"axis": 1}, id="neg_2d"),
    KCase("Gather", [X, np.array(-2, np.int64)], attrs={"axis": -1}, id="scalar"),
    KCase("Gather", [XI, _i(1, 1)], attrs={"axis": 2}, id="int"),
    KCase("GatherElements", [X, _i(0, 2, -1, 1, shape=(1, 4, 1))], attrs={"axis": 0}),
    KCase("GatherElements", [XI, _i(*range(-4, 4), shape=(1, 2, 4))], attrs={"axis": -1}, id="neg"),
    KCase("GatherND", [X, _i(0, 1, 2, -1, shape=(2, 2))]),
    KCase("GatherND", [X, _i(1, 0, 2, shape=(1, 3))], id="full"),
    KCase("GatherND", [X, _i(1, 3, 0, -1, shape=(2, 1, 2))], attrs={"batch_dims": 0}, id="lead"),
    KCase("GatherND", [X, _i(1, 0, 3, shape=(3, 1))], attrs={"batch_dims": 1}, id="batch1"),
    KCase(
        "GatherND", [X, _i(*range(12), shape=(3, 4, 1)) % 5], attrs={"batch_dims": 2}, id="batch2"
    ),
]
for _red in ("none", "add", "mul", "max", "min"):
    _dup = _red != "none"  # repeated indices are only defined with a reduction
    CASES += [
        KCase(
            "ScatterElements",
            [X, _i(0, 2, 1, 0 if _dup else 1, shape=(2, 2, 1)), _x(2, 2, 1) + 1],
            attrs={"axis": 0, "reduction": _red},
            id=_red,
        ),
        KCase(
            "ScatterElements",
            [XI, _i(-1, 0, 3 if _dup else -1, shape=(1, 1, 3)), _x(1, 1, 3, dtype=np.int32)],
            attrs={"axis": -1, "reduction": _red},
            id=f"{_red}_neg_int",
        ),
        KCase(
            "ScatterND",
            [X, _i(0, 1, 2, 3, 0 if _dup else 1, 1, shape=(3, 2)), _x(3, 5) - 2],
            attrs={"reduction": _red},
            id=_red,
        ),
        KCase(
            "ScatterND",
            [XI, _i(2, 1 if _dup else 0, 2, shape=(3, 1)), _x(3, 4, 5, dtype=np.int32)],
            attrs={"reduction": _red},
            id=f"{_red}_rows_int",
        ),
    ]
    # Flat (1-D) data and indices, the pooling gradients' scatter: its own kernel path.
    CASES.append(
        KCase(
            "ScatterElements",
            [_x(10), _i(3, -1, 3, -7) if _dup else _i(3, -1, 0, -8), _x(4) + 1],
            attrs={"axis": -1 if _dup else 0, "reduction": _red},
            id=f"{_red}_flat",
        )
    )
CASES += [
    KCase("Scatter", [X, _i(1, 0, shape=(1, 2, 1)), _x(1, 2, 1)], attrs={"axis": 1}, opset=10),
    KCase("ArgMax", [X]),
    KCase("ArgMax", [TIES], attrs={"axis": -1, "keepdims": 0}, id="ties"),
    KCase("ArgMax", [TIES], attrs={"axis": 1, "select_last_index": 1}, id="last"),
    KCase("ArgMin", [XI], attrs={"axis": 2, "keepdims": 0}, id="int"),
    KCase("ArgMin", [TIES.T], attrs={"axis": 0, "select_last_index": 1}, id="last"),
    KCase(
        "Range",
        [np.array(1.5, np.float32), np.array(-2.0, np.float32), np.array(-0.75, np.float32)],
    ),
    KCase(
        "Range", [np.array(2, np.int32), np.array(11, np.int32), np.array(3, np.int32)], id="int32"
    ),
    KCase(
        "Range",
        [np.array(5, np.int64), np.array(1, np.int64), np.array(1, np.int64)],
        id="empty",
        ref="onnx",
    ),
    KCase("OneHot", [_i(0, 2, -1, 5), np.array(3, np.int64), np.array([0.5, 2.0], np.float32)]),
    KCase(
        "OneHot",
        [_i(1, 0, 2, 1, shape=(2, 2)), np.array(3.0, np.float32), np.array([0, 1], np.int32)],
        attrs={"axis": 0},
        id="axis0",
    ),
    KCase(
        "OneHot",
        [_x(2, 2) % 3, np.array([4], np.int64), np.array([0, 7], np.int64)],
        attrs={"axis": -2},
        id="float_indices",
    ),
    KCase("Trilu", [X]),
    KCase("Trilu", [X, np.array(-1, np.int64)], attrs={"upper": 0}, id="lower_k"),
    KCase("Trilu", [XI, np.array(2, np.int64)], id="int_k"),
    KCase("CumSum", [X, np.array(1, np.int32)]),
    KCase("CumSum", [X, np.array(-1, np.int64)], attrs={"exclusive": 1}, id="exclusive"),
    KCase("CumSum", [XI, np.array(0, np.int64)], attrs={"reverse": 1}, id="reverse_int"),
    KCase(
        "CumSum",
        [X, np.array(2, np.int64)],
        attrs={"exclusive": 1, "reverse": 1},
        id="exclusive_reverse",
    ),
    KCase("TopK", [X, _i(2)], outputs=2),
    KCase("TopK", [TIES, _i(3)], attrs={"axis": 1, "largest": 0}, outputs=2, id="smallest"),
    KCase("TopK", [TIES, _i(2)], outputs=2, id="ties"),
    KCase("TopK", [XI, _i(3)], attrs={"axis": 0}, outputs=2, id="int"),
    KCase("TopK", [X], attrs={"k": 2, "axis": 1}, outputs=2, opset=9, id="attr"),
]


@pytest.mark.parametrize("case", kparams(CASES))
def test_kernel(case):
    check_kernel(case)
