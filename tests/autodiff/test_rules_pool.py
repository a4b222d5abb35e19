"""Op table for the pooling rules: float64 finite differences and onnxruntime parity.

MaxPool inputs come from `distinct`, so that no window holds a tie. Dilations are not
combined with auto_pad=SAME_* here: onnxruntime's pools resolve that padding from the
undilated kernel, against the spec (and onnxgrad's kernels).
"""

from __future__ import annotations

import pytest

from tests.optable import Case, check_case, distinct, params, uniform

CASES = []


def _pool(op, x, id="", dynamic=False, marks=(), **attrs):
    sampler = distinct() if "Max" in op else uniform()
    # AveragePool takes dilations since opset 19.
    opset = 19 if op == "AveragePool" and "dilations" in attrs else 18
    CASES.append(
        Case(op, [x], attrs, id=id, sampler=sampler, dynamic=dynamic, marks=marks, opset=opset)
    )


# Geometry shared by MaxPool and AveragePool: (id, shape, attributes).
WINDOWS = [
    ("1d", (2, 3, 7), dict(kernel_shape=[3])),
    ("1d_stride2_uneven", (2, 2, 6), dict(kernel_shape=[3], strides=[2])),
    ("1d_stride3_pads", (2, 2, 7), dict(kernel_shape=[2], strides=[3], pads=[1, 1])),
    ("1d_overlap_dilation", (2, 2, 7), dict(kernel_shape=[2], dilations=[2], pads=[0, 1])),
    ("2d", (2, 2, 5, 6), dict(kernel_shape=[2, 2])),
    ("2d_stride2_pads", (2, 2, 5, 6), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1])),
    (
        "2d_dilation_stride",
        (2, 2, 7, 6),
        dict(kernel_shape=[2, 2], strides=[2, 1], dilations=[2, 2]),
    ),
    ("2d_ceil", (2, 2, 6, 5), dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1)),
    (
        "2d_ceil_pads",
        (2, 2, 5, 7),
        dict(kernel_shape=[2, 3], strides=[2, 3], pads=[1, 0, 0, 1], ceil_mode=1),
    ),
    ("3d", (1, 2, 4, 5, 4), dict(kernel_shape=[2, 2, 2])),
    (
        "3d_stride2_pads",
        (1, 2, 5, 4, 5),
        dict(kernel_shape=[2, 3, 2], strides=[2, 1, 2], pads=[1, 1, 0, 0, 1, 1]),
    ),
    (
        "2d_same_upper",
        (2, 2, 5, 6),
        dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    ),
    (
        "2d_same_lower",
        (2, 2, 5, 6),
        dict(kernel_shape=[2, 3], strides=[2, 1], auto_pad="SAME_LOWER"),
    ),
    ("2d_valid", (2, 2, 5, 6), dict(kernel_shape=[2, 3], strides=[2, 2], auto_pad="VALID")),
]

for _id, _x, _attrs in WINDOWS:
    _pool("MaxPool", _x, id=_id, **_attrs)
    if "same" in _id or "valid" in _id:
        _pool("AveragePool", _x, id=_id, **_attrs)
        continue
    for _cip in (0, 1):
        _pool("AveragePool", _x, id=f"{_id}_cip{_cip}", count_include_pad=_cip, **_attrs)
_pool("MaxPool", (2, 2, 6, 5), id="2d_storage_order", kernel_shape=[2, 2], storage_order=1)
CASES.append(
    Case(
        "MaxPool",
        [(2, 2, 5, 6)],
        dict(kernel_shape=[2, 2], strides=[2, 1]),
        id="2d_indices_output",
        outputs=2,
        sampler=distinct(),
    )
)
CASES.append(
    Case(
        "MaxPool",
        [(2, 2, 5, 6)],
        dict(kernel_shape=[2, 2], storage_order=1),
        id="2d_indices_column_major",
        outputs=2,
        sampler=distinct(),
    )
)
# Symbolic dimensions: counts, crops and scatters built from run-time shapes.
_pool(
    "MaxPool", (2, 2, 7), id="1d_dynamic", dynamic=True, kernel_shape=[3], strides=[2], pads=[1, 0]
)
for _cip in (0, 1):
    _pool(
        "AveragePool",
        (2, 2, 7, 6),
        id=f"2d_dynamic_cip{_cip}",
        dynamic=True,
        kernel_shape=[2, 3],
        strides=[2, 2],
        pads=[1, 0, 0, 1],
        count_include_pad=_cip,
    )
    _pool(
        "AveragePool",
        (2, 2, 6, 5),
        id=f"2d_dynamic_ceil_cip{_cip}",
        dynamic=True,
        kernel_shape=[3, 2],
        strides=[2, 2],
        pads=[1, 0, 0, 1],
        ceil_mode=1,
        count_include_pad=_cip,
    )
# SAME padding over sizes known only at run time: the rules pad at run time. Kernels at
# least as long as the stride and no dilations: onnxruntime's forward fails otherwise.
_pool(
    "AveragePool",
    (2, 2, 7),
    id="1d_dynamic_same",
    dynamic=True,
    kernel_shape=[3],
    auto_pad="SAME_UPPER",
)
for _cip in (0, 1):
    _pool(
        "AveragePool",
        (2, 2, 7, 6),
        id=f"2d_dynamic_same_lower_cip{_cip}",
        dynamic=True,
        kernel_shape=[3, 3],
        strides=[2, 2],
        auto_pad="SAME_LOWER",
        count_include_pad=_cip,
    )
_pool(
    "MaxPool",
    (2, 2, 7, 6),
    id="2d_dynamic_same_upper",
    dynamic=True,
    kernel_shape=[3, 3],
    strides=[2, 2],
    auto_pad="SAME_UPPER",
)
_pool(
    "MaxPool",
    (2, 2, 8),
    id="1d_dynamic_same_lower_stride2",
    dynamic=True,
    kernel_shape=[3],
    strides=[2],
    auto_pad="SAME_LOWER",
)
_pool(
    "LpPool",
    (2, 2, 5, 6),
    id="2d_dynamic_same_p2",
    dynamic=True,
    kernel_shape=[2, 3],
    strides=[2, 2],
    auto_pad="SAME_UPPER",
    p=2,
)

# LpPool: p = 1 has a kink at 0 (uniform samples avoid it almost surely), p = 2, 3.
for _p in (1, 2, 3):
    _pool("LpPool", (2, 2, 6), id=f"1d_p{_p}", kernel_shape=[3], strides=[2], pads=[1, 1], p=_p)
_pool(
    "LpPool",
    (2, 2, 5, 6),
    id="2d_dilation_ceil",
    kernel_shape=[2, 2],
    strides=[2, 2],
    dilations=[1, 2],
    ceil_mode=1,
)

# Global pools.
for _x in ((2, 3, 5), (2, 2, 3, 4), (1, 2, 3, 2, 3)):
    _id = f"{len(_x) - 2}d"
    _pool("GlobalAveragePool", _x, id=_id)
    _pool("GlobalMaxPool", _x, id=_id)
    _pool("GlobalLpPool", _x, id=_id)
_pool("GlobalAveragePool", (2, 3, 4, 5), id="dynamic", dynamic=True)
_pool("GlobalMaxPool", (2, 3, 4, 5), id="dynamic", dynamic=True)
_pool("GlobalLpPool", (2, 3, 5), id="p3", p=3)
_pool("GlobalLpPool", (2, 3, 5), id="p1", p=1)


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)
