"""Pooling kernels against onnxruntime over a grid of attributes.

Known disagreements, where onnxgrad follows the spec:

- with dilations and auto_pad=SAME_*, onnxruntime's pools pad for the undilated kernel
  (their outputs are not "same" sized), and onnx's reference evaluator is off there too;
  those cases are judged against the same pool with the padding spelled out (the Conv
  tests check the dilated SAME padding itself against the reference evaluator);
- with auto_pad=SAME_* and a stride larger than the kernel, onnxruntime's MaxPool fails
  ("padding values must be non-negative"); onnxgrad pads with zero there.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxgrad.runtime.kernels.conv import windows
from onnxgrad.runtime.session import Session
from tests.runtime.test_kernels_conv import check, one_node, sample

SPATIAL = {1: ([7], [3]), 2: ([6, 7], [3, 2]), 3: ([5, 4, 5], [2, 2, 3])}
PADDINGS = ("none", "pads", "SAME_UPPER", "SAME_LOWER", "VALID")


def _attrs(nsp, stride, dilation, ceil, mode) -> dict:
    kernel = SPATIAL[nsp][1]
    attrs = dict(kernel_shape=kernel, strides=[stride] * nsp, ceil_mode=ceil)
    if dilation > 1:
        attrs["dilations"] = [dilation] * nsp
    if mode == "pads":
        attrs["pads"] = [1] * nsp + [1] * nsp
    elif mode != "none":
        attrs["auto_pad"] = mode
    return attrs


def _explicit(attrs: dict, sizes) -> dict:
    """The same pool with auto_pad resolved into explicit pads."""
    nsp = len(sizes)
    win = windows(
        sizes,
        attrs["kernel_shape"],
        attrs["strides"],
        attrs.get("dilations", [1] * nsp),
        None,
        attrs["auto_pad"],
    )
    out = {k: v for k, v in attrs.items() if k != "auto_pad"}
    out["pads"] = list(win.begin + win.end)
    return out


GRID = []
for _nsp, _s, _d, _ceil, _mode in itertools.product((1, 2, 3), (1, 2, 3), (1, 2), (0, 1), PADDINGS):
    if _nsp == 3 and _d == 2 and _s == 3:
        continue
    _id = f"{_nsp}d-s{_s}-d{_d}-c{_ceil}-{_mode}"
    GRID.append(pytest.param(_nsp, _s, _d, _ceil, _mode, id=_id))


def _same_stride_over_kernel(nsp, stride, mode) -> bool:
    return mode.startswith("SAME") and stride > min(SPATIAL[nsp][1])


def check_like_explicit(op: str, x: np.ndarray, attrs: dict, outputs: int = 1) -> None:
    """The pool with auto_pad gives exactly what it gives with those pads spelled out."""
    feeds = {"in0": x}
    ours = Session(one_node(op, [x], attrs, outputs)).run(None, feeds)
    explicit = Session(one_node(op, [x], _explicit(attrs, x.shape[2:]), outputs)).run(None, feeds)
    for a, b in zip(ours, explicit):
        np.testing.assert_array_equal(a, b)


def _dilated_same(dilation: int, mode: str) -> bool:
    return dilation > 1 and mode.startswith("SAME")


@pytest.mark.parametrize("nsp, stride, dilation, ceil, mode", GRID)
def test_max_pool(nsp, stride, dilation, ceil, mode):
    attrs = _attrs(nsp, stride, dilation, ceil, mode)
    x = sample((2, 3, *SPATIAL[nsp][0]))
    if _dilated_same(dilation, mode) or _same_stride_over_kernel(nsp, stride, mode):
        check_like_explicit("MaxPool", x, attrs, outputs=2)
        return
    check("MaxPool", [x], attrs)
    check("MaxPool", [x], attrs, outputs=2)
    check("MaxPool", [x.astype(np.float64)], dict(attrs, storage_order=1), outputs=2)
    check("MaxPool", [(x * 40).astype(np.int8)], attrs)
    check("MaxPool", [(x * 40 + 100).astype(np.uint8)], attrs, outputs=2)


@pytest.mark.parametrize("nsp", [1, 2, 3])
@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_ties_pick_what_onnxruntime_picks(nsp, storage_order):
    sizes, kernel = SPATIAL[nsp]
    x = np.random.default_rng(3).integers(-2, 3, (2, 3, *sizes)).astype(np.float32)
    attrs = dict(
        kernel_shape=kernel, strides=[1] * nsp, pads=[1] * nsp * 2, storage_order=storage_order
    )
    check("MaxPool", [x], attrs, outputs=2)


# onnxruntime's AveragePool refuses ceil_mode together with auto_pad.
AVERAGE_GRID = [p for p in GRID if not (p.values[3] and p.values[4] not in ("none", "pads"))]


@pytest.mark.parametrize("nsp, stride, dilation, ceil, mode", AVERAGE_GRID)
def test_average_pool(nsp, stride, dilation, ceil, mode):
    sizes = SPATIAL[nsp][0]
    x = sample((2, 3, *sizes))
    for include in (0, 1):
        attrs = dict(_attrs(nsp, stride, dilation, ceil, mode), count_include_pad=include)
        if _dilated_same(dilation, mode):
            check_like_explicit("AveragePool", x, attrs)
            continue
        check("AveragePool", [x], attrs)
        check("AveragePool", [x.astype(np.float64)], attrs)


@pytest.mark.parametrize("nsp, stride, dilation, ceil, mode", GRID)
def test_lp_pool(nsp, stride, dilation, ceil, mode):
    sizes = SPATIAL[nsp][0]
    x = sample((2, 3, *sizes))
    for p in (1, 2, 3):
        attrs = dict(_attrs(nsp, stride, dilation, ceil, mode), p=p)
        if _dilated_same(dilation, mode):
            check_like_explicit("LpPool", x, attrs)
            continue
        check("LpPool", [x], attrs)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 4, 2)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_global_pools(op, shape, dtype):
    x = sample(shape, dtype)
    (y,) = check(op, [x], {})
    assert y.dtype == dtype
    if op == "GlobalLpPool":
        check(op, [x], {"p": 3})


def test_average_pool_dilations_opset_19():
    x = sample((1, 2, 7))
    attrs = dict(kernel_shape=[2], dilations=[3], pads=[1, 1], count_include_pad=0)
    check("AveragePool", [x], attrs, opset=19)
