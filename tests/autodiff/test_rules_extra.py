"""Op table for Max, Min, Mean, Mod, CastLike and the rules in rules/extra.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests.optable import Case, away_from, check_case, distinct, params, uniform

CASES = []
for _op in ("Max", "Min"):
    CASES += [
        Case(_op, [(3, 4)], id="one"),
        Case(_op, [(3, 4), (3, 4)], id="two", sampler=distinct()),
        Case(_op, [(3, 4), (4,), (3, 1)], id="three_bcast", sampler=distinct()),
        Case(_op, [(2, 3), (3,)], id="dynamic", sampler=distinct(), dynamic=True),
        # Exact ties: both inputs hold the same values; dy is split evenly between them.
        Case(
            _op,
            [(2, 3), np.arange(6.0).reshape(2, 3) / 4],
            id="tie_const",
            wrt=[0],
            sampler=uniform(0.0, 0.0),
        ),
    ]
CASES += [
    Case("Mean", [(3, 4)], id="one"),
    Case("Mean", [(3, 4), (4,), (3, 1)], id="three_bcast"),
    Case("Mean", [(2, 3), (3,)], id="dynamic", dynamic=True),
    # The sampler keeps A/B off integers, where the quotient jumps.
    Case(
        "Mod",
        [(3, 4), (3, 4)],
        attrs={"fmod": 1},
        id="fmod",
        sampler=[uniform(-5, 5), away_from([0.0], 0.7, -2.0, 2.0)],
    ),
    Case(
        "Mod",
        [(3, 4), (4,)],
        attrs={"fmod": 1},
        id="fmod_bcast",
        sampler=[uniform(-5, 5), away_from([0.0], 0.7, -2.0, 2.0)],
    ),
    # onnxruntime accepts fmod=0 for integers only.
    Case(
        "Mod",
        [(3, 4), (3, 4)],
        attrs={"fmod": 0},
        id="floor",
        ort=False,
        sampler=[uniform(-5, 5), away_from([0.0], 0.7, -2.0, 2.0)],
    ),
    Case("CastLike", [(3, 4), np.zeros((), np.float32)], id="to_f32", rtol=1e-5, atol=1e-6),
    Case("CastLike", [(3, 4), np.zeros((), np.float64)], id="same"),
    Case("Det", [(3, 3)], id="3x3"),
    Case("Det", [(2, 4, 4)], id="batch", rtol=1e-5),
    Case("Det", [(1, 1)], id="1x1"),
    Case("Det", [(2, 2, 2)], id="2x2"),
    Case("Compress", [(3, 4), np.array([True, False, True])], attrs={"axis": 0}, id="axis0"),
    Case("Compress", [(3, 4), np.array([False, True, True])], attrs={"axis": -1}, id="short"),
    Case(
        "Compress",
        [(2, 3, 2), np.array([True, False, True])],
        attrs={"axis": 1},
        id="mid",
        dynamic=True,
    ),
    Case("Compress", [(2, 3), np.array([False, True, True, False, True])], id="flat"),
    Case("ReverseSequence", [(4, 3, 2), np.array([4, 1, 3])], id="time_major"),
    Case(
        "ReverseSequence",
        [(3, 4, 2), np.array([2, 4, 0])],
        attrs={"batch_axis": 0, "time_axis": 1},
        id="batch_major",
    ),
    Case("CenterCropPad", [(4, 5), np.array([2, 7])], id="crop_pad"),
    Case("CenterCropPad", [(2, 5, 3), np.array([2, 4])], attrs={"axes": [1, 2]}, id="axes"),
    Case("CenterCropPad", [(3, 6), np.array([3])], attrs={"axes": [-1]}, id="odd_crop"),
    Case(
        "CumProd",
        [(3, 4), np.array(1)],
        id="axis1",
        opset=26,
        ort=False,
        sampler=away_from([0.0], 0.3),
    ),
    Case(
        "CumProd",
        [(3, 4), np.array(0)],
        attrs={"reverse": 1},
        id="reverse",
        opset=26,
        ort=False,
        sampler=away_from([0.0], 0.3),
    ),
    Case(
        "CumProd",
        [(3, 4), np.array(-1)],
        attrs={"exclusive": 1, "reverse": 1},
        id="exclusive",
        opset=26,
        ort=False,
        sampler=away_from([0.0], 0.3),
    ),
    Case("Swish", [(3, 4)], opset=24),
    Case("Swish", [(3, 4)], attrs={"alpha": 1.7}, id="alpha", opset=24),
    Case("SwiGLU", [(3, 4), (3, 4)], opset=28, ort=False),
    Case("SwiGLU", [(2, 3), (2, 3)], attrs={"alpha": 0.5}, id="alpha", opset=28, ort=False),
]


_POOL = np.array([[[[0, 3], [9, 14]], [[17, 18], [24, 31]]]])  # flat indices into (1, 2, 4, 4)
CASES += [
    Case("MaxUnpool", [(1, 2, 2, 2), _POOL], attrs={"kernel_shape": [2, 2], "strides": [2, 2]}),
    Case(
        "MaxUnpool",
        [(1, 2, 2, 2), _POOL, np.array([1, 2, 4, 5])],
        attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
        id="output_shape",
        # onnxruntime 1.32 reads the indices as positions in output_shape itself; the ONNX
        # conformance case and reference evaluator (and our kernel) read them in the default
        # output, padded with zeros at the end of each axis.
        ort=False,
    ),
    Case("AffineGrid", [(2, 2, 3), np.array([2, 1, 3, 4])], opset=20),
    Case(
        "AffineGrid",
        [(1, 2, 3), np.array([1, 1, 3, 2])],
        attrs={"align_corners": 1},
        opset=20,
        id="align",
    ),
    Case("AffineGrid", [(2, 3, 4), np.array([2, 1, 2, 3, 2])], opset=20, id="3d"),
    Case("TensorScatter", [(2, 2, 5, 3), (2, 2, 2, 3)], opset=24, id="prefill"),
    Case("TensorScatter", [(2, 2, 5, 3), (2, 2, 2, 3), np.array([1, 3])], opset=24, id="indices"),
    Case(
        "TensorScatter",
        [(2, 4, 3), (2, 3, 3), np.array([2, 3])],
        attrs={"mode": "circular", "axis": 1},
        opset=24,
        id="circular",
    ),
    Case(
        "TensorScatter",
        [(2, 5, 3), (2, 2, 3), np.array([0, 3])],
        attrs={"axis": 1},
        opset=24,
        id="dynamic",
        dynamic=True,
    ),
    Case("Col2Im", [(1, 4, 6), np.array([3, 4]), np.array([2, 2])], id="2x2"),
    Case(
        "Col2Im",
        [(2, 2 * 4, 4), np.array([4, 4]), np.array([2, 2])],
        attrs={"strides": [2, 2]},
        id="strided",
    ),
    Case(
        "Col2Im",
        [(1, 3 * 2, 20), np.array([3, 5]), np.array([1, 2])],
        attrs={"pads": [1, 0, 1, 1], "dilations": [1, 2]},
        id="pads_dilations",
    ),
    # DFT: real or complex input, forward or inverse, one-sided, dft_length, opset 17 and 20.
    Case("DFT", [(2, 5, 1)], opset=20, id="real"),
    Case("DFT", [(2, 4, 2)], opset=20, id="complex"),
    Case("DFT", [(2, 4, 2)], attrs={"inverse": 1}, opset=20, id="inverse"),
    Case("DFT", [(2, 6, 1)], attrs={"onesided": 1}, opset=20, id="onesided"),
    Case("DFT", [(2, 5, 1), np.array(7)], attrs={"onesided": 1}, opset=20, id="padded"),
    Case("DFT", [(2, 5, 2), np.array(3)], opset=20, id="cut"),
    Case("DFT", [(3, 2, 4, 2), None, np.array(1)], opset=20, id="axis1"),
    Case("DFT", [(2, 4, 1)], attrs={"axis": 1}, opset=17, id="opset17"),
    # Unique: distinct values (no ties), flattened or along an axis, sorted or in first order.
    Case("Unique", [(3, 4)], sampler=distinct(), outputs=4, loss_outputs=[0]),
    Case("Unique", [(3, 4)], attrs={"sorted": 0}, sampler=distinct(), id="unsorted"),
    Case("Unique", [(4, 3)], attrs={"axis": 0}, sampler=distinct(), id="axis0"),
    Case(
        "Unique",
        [(2, 3, 2)],
        attrs={"axis": -1},
        sampler=distinct(),
        outputs=4,
        loss_outputs=[0],
        id="axis_last",
    ),
    # MaxRoiPool: distinct values (no ties within a bin); roi corners off the .5 rounding edges.
    Case(
        "MaxRoiPool",
        [(2, 2, 5, 6), np.array([[0, 0.4, 1.2, 4.2, 3.9], [1, 2, 0, 5, 4], [1, -1, -1, 1.2, 0.7]])],
        attrs={"pooled_shape": [2, 2]},
        sampler=distinct(),
    ),
    Case(
        "MaxRoiPool",
        [(1, 2, 4, 4), np.array([[0, 1, 1, 7, 6], [0, 0, 0, 3, 3]], np.float64)],
        attrs={"pooled_shape": [3, 2], "spatial_scale": 0.5},
        sampler=distinct(),
        id="scale",
    ),
    # STFT (opset 17): real or complex signal, a window, overlapping frames, one-sided or not.
    # onnx infers a wrong number of bins for one-sided outputs, which its full check and
    # onnxruntime then reject against the loss's weights: those cases check float64 only.
    Case(
        "STFT",
        [(2, 10, 1), np.array(3), np.hanning(4)],
        opset=17,
        id="window",
        full_check=False,
        ort=False,
    ),
    Case(
        "STFT",
        [(1, 9, 1), np.array(2), None, np.array(5)],
        opset=17,
        id="frame_length",
        full_check=False,
        ort=False,
    ),
    Case(
        "STFT",
        [(2, 8, 2), np.array(2), np.hamming(4)],
        attrs={"onesided": 0},
        opset=17,
        id="complex",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)
