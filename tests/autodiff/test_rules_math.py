"""Op table for trigonometric and hyperbolic rules: float64 finite differences and onnxruntime
parity."""

from __future__ import annotations

import pytest

from tests.optable import Case, check_case, params, uniform

CASES = [
    Case("Sin", [(3, 4)]),
    Case("Cos", [(3, 4)]),
    Case("Tan", [(3, 4)], sampler=uniform(-1.2, 1.2)),
    Case("Asin", [(3, 4)], sampler=uniform(-0.9, 0.9)),
    Case("Acos", [(3, 4)], sampler=uniform(-0.9, 0.9)),
    Case("Atan", [(3, 4)]),
    Case("Sinh", [(3, 4)]),
    Case("Cosh", [(3, 4)]),
    Case("Asinh", [(3, 4)]),
    Case("Acosh", [(3, 4)], sampler=uniform(1.1, 3.0)),
    Case("Atanh", [(3, 4)], sampler=uniform(-0.9, 0.9)),
    Case("Sin", [(2, 5)], id="dynamic", dynamic=True),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)
