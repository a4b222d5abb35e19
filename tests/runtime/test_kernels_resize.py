"""Resize and Upsample kernels against onnx's reference evaluator and onnxruntime: every mode
and coordinate transformation, antialias, exclude_outside, axes, keep_aspect_ratio_policy,
integer inputs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

from onnxgrad.runtime.session import Session
from tests.runtime.test_kernels_shape import KCase, check_kernel, kparams, model_of

X = np.random.default_rng(0).standard_normal((1, 2, 4, 6)).astype(np.float32)
X64 = X.astype(np.float64)  # for the reference evaluator, which rounds less than float32
XU8 = (np.arange(48) * 5 % 256).astype(np.uint8).reshape(1, 2, 4, 6)
NO_ROI = np.zeros(0, np.float32)
ROI = np.array([0, 0, 0.15, -0.2, 1, 1, 0.85, 1.1], np.float32)
UP = np.array([1, 1, 2.0, 1.5], np.float32)
DOWN = np.array([1, 1, 0.5, 0.5], np.float32)
MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
)

CASES = []
for _mode in ("nearest", "linear", "cubic"):
    for _cm in MODES:
        for _scales, _sid in ((UP, "up"), (DOWN, "down")):
            _roi = ROI if _cm == "tf_crop_and_resize" else NO_ROI
            _attrs = {"mode": _mode, "coordinate_transformation_mode": _cm}
            if _cm == "tf_crop_and_resize":
                _attrs["extrapolation_value"] = -0.5
            CASES.append(
                KCase(
                    "Resize",
                    [X64, _roi, _scales],
                    attrs=_attrs,
                    id=f"{_mode}_{_cm}_{_sid}",
                    opset=19,
                    ref="onnx",
                )
            )
for _mode in ("linear", "cubic"):
    CASES += [
        KCase(
            "Resize",
            [X, NO_ROI, DOWN],
            attrs={"mode": _mode, "antialias": 1},
            id=f"{_mode}_antialias",
            opset=19,
        ),
        KCase(
            "Resize",
            [X, NO_ROI, UP],
            attrs={"mode": _mode, "exclude_outside": 1, "antialias": 1},
            id=f"{_mode}_exclude",
            opset=19,
        ),
    ]
for _nm in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
    CASES.append(
        KCase(
            "Resize",
            [X, NO_ROI, np.array([1, 1, 1.5, 0.5], np.float32)],
            attrs={"mode": "nearest", "nearest_mode": _nm},
            id=f"nearest_{_nm}",
        )
    )
CASES += [
    KCase(
        "Resize",
        [X, NO_ROI, None, np.array([1, 2, 7, 3], np.int64)],
        attrs={"mode": "linear"},
        id="sizes",
    ),
    KCase(
        "Resize",
        [X, None, None, np.array([5, 5], np.int64)],
        attrs={"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
        id="not_larger",
        opset=19,
        ref="onnx",
    ),
    KCase(
        "Resize",
        [X, None, None, np.array([5, 5], np.int64)],
        attrs={"mode": "nearest", "axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"},
        id="not_smaller",
        opset=19,
        ref="onnx",
    ),
    KCase(
        "Resize",
        [X, None, np.array([0.5, 2.0], np.float32)],
        attrs={"mode": "cubic", "axes": [3, 2]},
        id="axes",
        opset=19,
        ref="onnx",
    ),
    KCase("Resize", [XU8, NO_ROI, UP], attrs={"mode": "nearest"}, id="uint8"),
    KCase("Resize", [X, UP], attrs={"mode": "nearest"}, id="opset10", opset=10),
    KCase("Resize", [X, UP], attrs={"mode": "linear"}, id="opset10_linear", opset=10),
    KCase("Upsample", [X, UP], attrs={"mode": "nearest"}, opset=9),
    KCase("Upsample", [X, UP], attrs={"mode": "linear"}, id="linear", opset=9),
]


# onnx's reference evaluator and onnxruntime compute the cubic weights in float32 (the
# attribute cubic_coeff_a is a float32), we in float64: the cubic cases agree to about 1e-5.
CUBIC = [c for c in CASES if c.attrs.get("mode") == "cubic"]
CASES = [c for c in CASES if c.attrs.get("mode") != "cubic"]


@pytest.mark.parametrize("case", kparams(CASES))
def test_kernel(case):
    check_kernel(case)


@pytest.mark.parametrize("case", kparams(CUBIC))
def test_cubic(case):
    model, feeds, outs = model_of(case)
    ours = Session(model).run(outs, feeds)[0]
    if case.ref == "ort":
        import onnxruntime

        sess = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        theirs = sess.run(outs, feeds)[0]
    else:
        theirs = ReferenceEvaluator(model).run(outs, feeds)[0]
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-5)
