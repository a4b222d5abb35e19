"""Op table for elementwise rules: float64 finite differences and onnxruntime parity."""

from __future__ import annotations

import numpy as np
import pytest

from tests.optable import Case, away_from, check_case, params, positive, uniform

BROADCAST_SHAPES = [
    ("same", (3, 4), (3, 4)),
    ("row", (3, 4), (4,)),
    ("col", (3, 1), (1, 4)),
    ("scalar", (2, 3, 4), ()),
    ("lead", (4,), (2, 3, 4)),
]

CASES = []
for _op in ("Add", "Sub", "Mul"):
    for _id, _a, _b in BROADCAST_SHAPES:
        CASES.append(Case(_op, [_a, _b], id=_id))
    CASES.append(Case(_op, [(2, 3), (3,)], id="dynamic", dynamic=True))
for _id, _a, _b in BROADCAST_SHAPES:
    CASES.append(Case("Div", [_a, _b], id=_id, sampler=[uniform(), away_from([0.0], 0.5)]))
    CASES.append(Case("Pow", [_a, _b], id=_id, sampler=[positive(0.5, 2.0), uniform(-1.5, 1.5)]))
CASES += [
    Case("Pow", [(3, 4), np.array(2.0)], id="const_exponent"),
    Case("Neg", [(3, 4)]),
    Case("Exp", [(2, 3, 4)]),
    Case("Log", [(3, 4)], sampler=positive()),
    Case("Sqrt", [(3, 4)], sampler=positive()),
    Case("Reciprocal", [(3, 4)], sampler=away_from([0.0], 0.4)),
    # |x| has a kink at 0; the sampler keeps clear of it.
    Case("Abs", [(3, 4)], sampler=away_from([0.0])),
    Case("Erf", [(3, 4)]),
    Case("Sum", [(3, 4)], id="one"),
    Case("Sum", [(3, 4), (4,), (3, 1)], id="three_bcast"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)
