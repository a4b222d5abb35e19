"""Op table for index rules: float64 finite differences and onnxruntime parity."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxgrad import gradient_model
from onnxgrad.runtime.session import Session
from tests.optable import Case, away_from, check_case, distinct, params, uniform


def _i(*values, shape=None):
    out = np.array(values, dtype=np.int64)
    return out if shape is None else out.reshape(shape)


CASES = [
    # Gather: repeated indices accumulate, negative indices count from the end.
    Case("Gather", [(5, 3), _i(0, 2, 0, -1, 2)], id="repeated"),
    Case("Gather", [(2, 4, 3), _i(-1, 0, -1, 1, shape=(2, 2))], attrs={"axis": 1}, id="axis1_2d"),
    Case("Gather", [(2, 3, 4), np.array(-2, np.int64)], attrs={"axis": -1}, id="scalar_index"),
    Case("Gather", [(6,), _i(5, 5, 1)], id="rank1"),
    Case("Gather", [(2, 4, 3), _i(3, 3, -4)], attrs={"axis": -2}, id="dynamic", dynamic=True),
    Case("Gather", [(4, 3), np.array([1, -1, 1], np.int32)], id="int32"),
    Case("GatherElements", [(3, 4), _i(0, 2, 2, -1, 1, 0, 0, 0, shape=(2, 4))], id="repeated"),
    Case(
        "GatherElements",
        [(2, 3, 4), _i(*range(-3, 3), shape=(2, 3, 1))],
        attrs={"axis": -1},
        id="neg_axis",
    ),
    Case("GatherElements", [(3, 4), _i(1, 1, 0, 2, shape=(1, 4))], id="dynamic", dynamic=True),
    Case("GatherND", [(3, 4), _i(0, 1, 2, -1, 0, 1, shape=(3, 2))], id="repeated"),
    Case("GatherND", [(3, 4, 2), _i(2, 0, -1, shape=(3, 1))], id="rows"),
    Case(
        "GatherND",
        [(2, 3, 4), _i(1, 3, 0, 0, 2, 3, 2, 3, shape=(2, 2, 2))],
        attrs={"batch_dims": 1},
        id="batch1",
    ),
    Case(
        "GatherND",
        [(2, 3, 4), _i(*[v % 4 for v in range(12)], shape=(2, 3, 2, 1))],
        attrs={"batch_dims": 2},
        id="batch2",
    ),
    Case(
        "GatherND",
        [(2, 3, 4), _i(1, -1, 1, 0, 0, 2, shape=(2, 3, 1))],
        attrs={"batch_dims": 1},
        id="dynamic",
        dynamic=True,
    ),
    # Where: the condition is a constant; A and B broadcast.
    Case("Where", [np.array([[True, False, True]]), (2, 3), (2, 1)]),
    Case("Where", [np.array([True, False, False, True]), (3, 4), ()], id="scalar_b"),
    Case("Where", [np.array([[True], [False]]), (2, 3), (3,)], id="dynamic", dynamic=True),
    # TopK: distinct values, so the selection is unambiguous.
    Case("TopK", [(3, 5), _i(2)], outputs=2, sampler=distinct()),
    Case(
        "TopK",
        [(4, 3), _i(3)],
        attrs={"axis": 0, "largest": 0},
        outputs=2,
        sampler=distinct(),
        id="smallest",
    ),
    Case("TopK", [(2, 4), _i(2)], outputs=2, sampler=distinct(), id="dynamic", dynamic=True),
    Case("Trilu", [(3, 4)]),
    Case("Trilu", [(2, 3, 4), np.array(-1, np.int64)], attrs={"upper": 0}, id="lower_k"),
    Case("Trilu", [(4, 3), np.array(1, np.int64)], id="dynamic", dynamic=True),
    Case("CumSum", [(3, 4), np.array(1, np.int64)]),
    Case("CumSum", [(3, 4), np.array(-2, np.int32)], attrs={"exclusive": 1}, id="exclusive"),
    Case("CumSum", [(2, 3, 2), np.array(1, np.int64)], attrs={"reverse": 1}, id="reverse"),
    Case(
        "CumSum",
        [(5,), np.array(0, np.int64)],
        attrs={"exclusive": 1, "reverse": 1},
        id="exclusive_reverse",
        dynamic=True,
    ),
    Case("OneHot", [_i(0, 2, -1, 1, 1), np.array(3, np.int64), (2,)]),
    Case(
        "OneHot",
        [_i(1, 0, 3, shape=(3, 1)), np.array([4], np.int64), (2,)],
        attrs={"axis": 0},
        id="axis0",
    ),
]


def _shifted(rng, shape):
    """Distinct values that never equal distinct()'s: no ties between data and updates."""
    return distinct()(rng, shape) + 0.1


# Scatters: data and updates both get gradients. Indices are distinct for "none" (repeated
# writes are undefined there), repeated for the reductions; max and min use distinct values
# (no ties, not even between data and updates), mul keeps updates away from 0.
_SAMPLERS = {
    "none": None,
    "add": None,
    "mul": [uniform(), None, away_from([0.0], 0.3)],
    "max": [distinct(), None, _shifted],
    "min": [distinct(), None, _shifted],
}
for _red, _sampler in _SAMPLERS.items():
    _dup = _red != "none"
    CASES += [
        Case(
            "ScatterElements",
            [(3, 4), _i(1, 0, 2, 0 if _dup else 1, shape=(2, 2)), (2, 2)],
            attrs={"axis": 0, "reduction": _red},
            sampler=_sampler,
            id=_red,
        ),
        Case(
            "ScatterElements",
            [(2, 3, 4), _i(-1, 0, 3 if _dup else 1, shape=(1, 1, 3)), (1, 1, 3)],
            attrs={"axis": -1, "reduction": _red},
            sampler=_sampler,
            id=f"{_red}_neg",
        ),
        Case(
            "ScatterND",
            [(3, 4), _i(0, 1, 2, 3, 0 if _dup else 1, 1, shape=(3, 2)), (3,)],
            attrs={"reduction": _red},
            sampler=_sampler,
            id=_red,
        ),
        Case(
            "ScatterND",
            [(3, 4, 2), _i(2, 2 if _dup else 0, shape=(2, 1)), (2, 4, 2)],
            attrs={"reduction": _red},
            sampler=_sampler,
            id=f"{_red}_rows",
        ),
    ]
CASES += [
    Case(
        "ScatterElements",
        [(3, 4), _i(2, 0, shape=(1, 2)), (1, 2)],
        attrs={"axis": 1},
        wrt=[0],
        id="data_only",
    ),
    Case(
        "ScatterElements",
        [(3, 4), _i(2, 0, shape=(1, 2)), (1, 2)],
        attrs={"axis": 1},
        id="dynamic",
        dynamic=True,
    ),
    Case("ScatterND", [(3, 4), _i(2, 0, shape=(2, 1)), (2, 4)], wrt=[2], id="updates_only"),
    Case(
        "ScatterND",
        [(3, 4), _i(2, 0, shape=(2, 1)), (2, 4)],
        attrs={"reduction": "add"},
        id="dynamic",
        dynamic=True,
    ),
    # Scatter (opsets 9 and 10) is converted to ScatterElements on import.
    Case("Scatter", [(3, 4), _i(2, 0, shape=(1, 2)), (1, 2)], attrs={"axis": 1}, opset=10),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_argmax_indices_carry_no_gradient(backend):
    """max over rows by ArgMax then GatherElements: the gradient is the argmax one-hot."""
    nodes = [
        helper.make_node("ArgMax", ["x"], ["at"], name="argmax", axis=1),
        helper.make_node("GatherElements", ["x", "at"], ["top"], name="pick", axis=1),
        helper.make_node("ReduceSum", ["top"], ["loss"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "argmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    grad = gradient_model(model, wrt=["x"])
    x = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 0.0, 4.0], [1.0, 1.5, 2.0, 2.5]], np.float32)
    (dx,) = Session(grad, backend=backend).run(["x_grad"], {"x": x})
    np.testing.assert_array_equal(dx, np.eye(4, dtype=np.float32)[[1, 0, 3]])
