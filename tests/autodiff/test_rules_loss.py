"""Op table for the loss rules: float64 finite differences and onnxruntime parity."""

from __future__ import annotations

import numpy as np
import pytest

from tests.optable import Case, check_case, params, positive, uniform


def labels(
    shape: tuple, classes: int, seed: int = 0, dtype=np.int64, ignore=None, every: int = 3
) -> np.ndarray:
    """Fixed labels in [0, classes), every `every`-th one set to `ignore` when given."""
    out = np.random.default_rng(seed).integers(0, classes, shape).astype(dtype)
    if ignore is not None:
        out.reshape(-1)[::every] = ignore
    return out


# Class weights kept positive, so that the mean's denominator Σ w_t stays away from 0.
WEIGHTED = [uniform(), None, positive(0.5, 1.5)]

CASES = []
for _op in ("NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"):
    for _red in ("none", "sum", "mean"):
        CASES += [
            Case(_op, [(3, 5), labels((3,), 5)], attrs={"reduction": _red}, id=f"{_red}_2d"),
            Case(
                _op,
                [(2, 3, 2, 2), labels((2, 2, 2), 3, 1)],
                attrs={"reduction": _red},
                id=f"{_red}_kdim",
            ),
            Case(
                _op,
                [(4, 3), labels((4,), 3, 2), (3,)],
                attrs={"reduction": _red},
                id=f"{_red}_weights",
                sampler=WEIGHTED,
            ),
            # An ignore_index inside [0, C) and one outside it.
            Case(
                _op,
                [(2, 4, 3), labels((2, 3), 4, 3, ignore=2)],
                attrs={"reduction": _red, "ignore_index": 2},
                id=f"{_red}_ignore_in_range",
            ),
            Case(
                _op,
                [(5, 3), labels((5,), 3, 4, ignore=-1), (3,)],
                attrs={"reduction": _red, "ignore_index": -1},
                id=f"{_red}_ignore_weights",
                sampler=WEIGHTED,
            ),
        ]
    CASES += [
        Case(_op, [(2, 3, 2, 2, 2), labels((2, 2, 2, 2), 3, 5)], id="mean_3d"),
        Case(_op, [(3, 4), labels((3,), 4, 6, dtype=np.int32)], id="int32_labels"),
        Case(
            _op,
            [(3, 4, 2), labels((3, 2), 4, 7), (4,)],
            attrs={"reduction": "sum"},
            id="dynamic",
            dynamic=True,
            sampler=WEIGHTED,
        ),
        Case(
            _op,
            [(3, 4, 2), labels((3, 2), 4, 8)],
            attrs={"reduction": "none"},
            id="dynamic_none",
            dynamic=True,
        ),
        Case(_op, [(3, 4), labels((3,), 4, 9), (4,)], id="weights_only", wrt=[2], sampler=WEIGHTED),
    ]
CASES += [
    # The log_prob output in the loss too, or present but unused.
    Case("SoftmaxCrossEntropyLoss", [(3, 5), labels((3,), 5)], outputs=2, id="log_prob"),
    Case(
        "SoftmaxCrossEntropyLoss",
        [(2, 3, 4), labels((2, 4), 3, 1, ignore=0), (3,)],
        attrs={"reduction": "mean", "ignore_index": 0},
        outputs=2,
        id="log_prob_weights",
        sampler=WEIGHTED,
    ),
    Case(
        "SoftmaxCrossEntropyLoss",
        [(3, 5), labels((3,), 5)],
        outputs=2,
        loss_outputs=[0],
        id="log_prob_unused",
    ),
    Case(
        "SoftmaxCrossEntropyLoss",
        [(3, 5), labels((3,), 5)],
        outputs=2,
        loss_outputs=[1],
        id="log_prob_only",
    ),
    # Large scores: the log softmax must not overflow.
    Case(
        "SoftmaxCrossEntropyLoss",
        [(3, 4), labels((3,), 4)],
        id="large",
        sampler=uniform(40.0, 60.0),
        rtol=1e-5,
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)
