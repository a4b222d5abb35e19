"""Op table for Conv and ConvTranspose: float64 finite differences and onnxruntime parity."""

from __future__ import annotations

import pytest

from tests.optable import Case, check_case, params

CASES = []


def _conv(x, w, bias=False, id="", dynamic=False, marks=(), **attrs):
    m = w[0]
    inputs = [x, w] + ([(m,)] if bias else [])
    CASES.append(Case("Conv", inputs, attrs, id=id, dynamic=dynamic, marks=marks))


# 1-D, 2-D, 3-D; with and without bias.
_conv((2, 3, 7), (4, 3, 3), id="1d")
_conv((2, 3, 7), (4, 3, 3), bias=True, id="1d_bias")
_conv((2, 2, 5, 6), (3, 2, 3, 2), bias=True, id="2d_bias")
_conv((2, 2, 5, 6), (3, 2, 3, 2), id="2d_kernel_shape", kernel_shape=[3, 2])
_conv((1, 2, 4, 5, 4), (2, 2, 2, 3, 2), bias=True, id="3d_bias")
# Pads, strides that do and do not divide the padded size, dilations.
_conv((2, 2, 7), (3, 2, 3), id="1d_pads", pads=[1, 2])
_conv((2, 2, 7), (3, 2, 3), id="1d_stride2_even", strides=[2])
_conv((2, 2, 6), (3, 2, 3), id="1d_stride2_uneven", strides=[2])
_conv((2, 2, 7), (3, 2, 2), id="1d_stride3_uneven", strides=[3])
_conv((2, 2, 7), (3, 2, 2), id="1d_stride3_pads", strides=[3], pads=[2, 1])
_conv((2, 2, 8), (3, 2, 2), id="1d_dilation3", dilations=[3])
_conv((2, 2, 9), (2, 2, 3), id="1d_stride2_dilation2", strides=[2], dilations=[2], pads=[1, 0])
_conv((2, 2, 6, 7), (3, 2, 3, 2), id="2d_stride2_uneven_pads", strides=[2, 3], pads=[1, 0, 0, 2])
_conv((2, 2, 7, 6), (3, 2, 2, 3), id="2d_dilation", dilations=[2, 1], pads=[0, 1, 1, 0])
_conv((2, 2, 7, 7), (2, 2, 2, 2), id="2d_stride3_dil2", strides=[3, 3], dilations=[2, 2])
_conv(
    (1, 2, 5, 6, 5),
    (2, 2, 2, 2, 3),
    id="3d_stride2_pads",
    strides=[2, 2, 1],
    pads=[1, 0, 1, 0, 1, 0],
)
# Groups: 2 groups, depthwise (one channel per group), depthwise with a multiplier.
_conv((2, 4, 6), (4, 2, 3), bias=True, id="1d_group2", group=2)
_conv(
    (2, 4, 5, 6), (6, 2, 3, 2), id="2d_group2_stride2", group=2, strides=[2, 2], pads=[1, 1, 0, 0]
)
_conv((2, 3, 6, 5), (3, 1, 3, 3), bias=True, id="2d_depthwise", group=3, pads=[1, 1, 1, 1])
_conv((2, 2, 7), (4, 1, 3), id="1d_depthwise_x2", group=2, strides=[2])
_conv((1, 4, 4, 5, 4), (4, 2, 2, 2, 2), id="3d_group2", group=2, strides=[1, 2, 1])
# auto_pad.
for _mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
    _conv((2, 2, 7), (3, 2, 2), id=f"1d_{_mode.lower()}_stride2", auto_pad=_mode, strides=[2])
    _conv((2, 2, 5, 6), (3, 2, 3, 2), id=f"2d_{_mode.lower()}", auto_pad=_mode, strides=[1, 2])
_conv((2, 2, 6), (2, 2, 4), id="1d_same_lower_even_kernel", auto_pad="SAME_LOWER")
# Every dimension symbolic: the geometry is only known at run time. (kernel_shape lets
# onnx shape inference give the output a rank, which the harness needs.)
_conv(
    (2, 3, 7),
    (4, 3, 3),
    bias=True,
    id="1d_dynamic",
    dynamic=True,
    pads=[1, 0],
    strides=[2],
    kernel_shape=[3],
)
_conv(
    (2, 4, 6, 5),
    (2, 2, 2, 3),
    id="2d_dynamic_group2",
    dynamic=True,
    group=2,
    strides=[2, 2],
    dilations=[1, 2],
    kernel_shape=[2, 3],
)
# SAME padding over sizes known only at run time (tf2onnx writes it for Keras models with
# dynamic image sizes): the rule pads at run time. Odd and even totals, both sides; no
# dilations (onnxruntime refuses them with SAME).
_conv((2, 2, 7), (3, 2, 2), id="1d_dynamic_same", dynamic=True, auto_pad="SAME_UPPER")
_conv(
    (2, 2, 6),
    (3, 2, 3),
    bias=True,
    id="1d_dynamic_same_lower_stride2",
    dynamic=True,
    auto_pad="SAME_LOWER",
    strides=[2],
)
_conv(
    (2, 4, 7, 6),
    (4, 2, 3, 2),
    bias=True,
    id="2d_dynamic_same_group2_stride",
    dynamic=True,
    auto_pad="SAME_UPPER",
    group=2,
    strides=[2, 3],
)
_conv(
    (2, 2, 5, 4),
    (3, 2, 2, 3),
    id="2d_dynamic_same_lower_stride3",
    dynamic=True,
    auto_pad="SAME_LOWER",
    strides=[3, 1],
)


def _conv_t(x, w, bias=False, id="", group=1, dynamic=False, **attrs):
    m = w[1] * group
    inputs = [x, w] + ([(m,)] if bias else [])
    if group != 1:
        attrs["group"] = group
    CASES.append(Case("ConvTranspose", inputs, attrs, id=id, dynamic=dynamic))


_conv_t((2, 3, 4), (3, 2, 3), bias=True, id="1d_bias")
_conv_t((2, 2, 4), (2, 3, 3), id="1d_stride2_pads", strides=[2], pads=[1, 0])
_conv_t((2, 2, 3), (2, 2, 2), id="1d_stride3_output_padding", strides=[3], output_padding=[2])
_conv_t((2, 2, 3), (2, 2, 3), id="1d_dilation2", dilations=[2], pads=[1, 2])
_conv_t((2, 2, 3, 4), (2, 2, 3, 2), bias=True, id="2d_stride2", strides=[2, 2], pads=[0, 1, 1, 0])
_conv_t((2, 4, 3, 3), (4, 1, 2, 2), id="2d_group2", group=2, strides=[2, 1])
_conv_t((1, 2, 2, 3, 2), (2, 2, 2, 2, 2), id="3d_stride2", strides=[2, 1, 2])
_conv_t((2, 2, 4), (2, 2, 3), id="1d_output_shape", strides=[2], output_shape=[8])
_conv_t((2, 2, 4), (2, 2, 3), id="1d_output_shape_exact", strides=[3], output_shape=[12])
_conv_t((2, 2, 3), (2, 2, 2), id="1d_output_shape_long", strides=[3], output_shape=[10])
_conv_t((2, 2, 4, 3), (2, 1, 3, 2), id="2d_same_upper", strides=[2, 2], auto_pad="SAME_UPPER")
_conv_t((2, 2, 4), (2, 1, 3), id="1d_same_lower", strides=[2], auto_pad="SAME_LOWER")
_conv_t(
    (2, 4, 3),
    (4, 1, 3),
    id="1d_dynamic_group2",
    dynamic=True,
    group=2,
    strides=[3],
    pads=[0, 1],
    output_padding=[2],
    kernel_shape=[3],
)


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)
