"""Op table for MatMul, Gemm and Einsum rules: float64 finite differences and onnxruntime parity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.optable import Case, check_case, params

MATMUL_SHAPES = [
    ("2d", (3, 4), (4, 2)),
    ("vec_mat", (4,), (4, 3)),
    ("mat_vec", (3, 4), (4,)),
    ("vec_vec", (4,), (4,)),
    ("batched", (2, 3, 4), (2, 4, 2)),
    ("batch_lhs", (2, 3, 4), (4, 2)),
    ("batch_rhs", (3, 4), (2, 4, 2)),
    ("bcast_batch", (2, 1, 3, 4), (3, 4, 2)),
    ("bcast_ones", (1, 2, 3, 4), (2, 1, 4, 2)),
    ("vec_batched", (4,), (2, 4, 3)),
    ("batched_vec", (2, 3, 4), (4,)),
]

CASES = []
for _id, _a, _b in MATMUL_SHAPES:
    CASES.append(Case("MatMul", [_a, _b], id=_id))
CASES += [
    Case("MatMul", [(2, 1, 3, 4), (3, 4, 2)], id="bcast_dynamic", dynamic=True),
    Case("MatMul", [(3, 4), (4, 2)], id="2d_dynamic", dynamic=True),
    Case("MatMul", [(4,), (2, 4, 3)], id="vec_batched_dynamic", dynamic=True),
    Case("MatMul", [(2, 3, 4), (4,)], id="batched_vec_dynamic", dynamic=True),
    Case("MatMul", [(3, 4), np.arange(8.0).reshape(4, 2) / 8], id="const_rhs"),
]

# Gemm: A is (M, K) or (K, M), B is (K, N) or (N, K), with M, K, N = 3, 4, 2.
GEMM_C = [
    ("noC", None),
    ("scalar", ()),
    ("one", (1,)),
    ("row", (2,)),
    ("row2d", (1, 2)),
    ("col", (3, 1)),
    ("full", (3, 2)),
]
for (_c_id, _c), _ta, _tb in itertools.product(GEMM_C, (0, 1), (0, 1)):
    _a = (4, 3) if _ta else (3, 4)
    _b = (2, 4) if _tb else (4, 2)
    _attrs = {"transA": _ta, "transB": _tb}
    if (_ta, _tb) == (1, 0):
        _attrs.update(alpha=0.5)
    if (_ta, _tb) == (0, 1):
        _attrs.update(alpha=1.5, beta=-2.0)
    inputs = [_a, _b] if _c is None else [_a, _b, _c]
    CASES.append(Case("Gemm", inputs, attrs=_attrs, id=f"{_c_id}_t{_ta}{_tb}"))
CASES += [
    Case("Gemm", [(3, 4), (4, 2), (2,)], attrs={"beta": 0.0}, id="beta0", wrt=[0, 1]),
    Case(
        "Gemm",
        [(3, 4), (4, 2), (3, 2)],
        attrs={"alpha": 2.0, "beta": 0.5, "transB": 0},
        id="dynamic",
        dynamic=True,
    ),
    Case(
        "Gemm",
        [(4, 3), (2, 4), (2,)],
        attrs={"transA": 1, "transB": 1},
        id="dynamic_t11",
        dynamic=True,
    ),
]

# Einsum: the contractions exporters write, plus one-operand forms.
EINSUM = [
    ("mm", "ij,jk->ik", (3, 4), (4, 2)),
    ("bmm", "bij,bjk->bik", (2, 3, 4), (2, 4, 2)),
    ("attn_scores", "bhqd,bhkd->bhqk", (1, 2, 3, 4), (1, 2, 2, 4)),
    ("attn_values", "bhqk,bhkd->bhqd", (1, 2, 3, 2), (1, 2, 2, 4)),
    ("dot", "i,i->", (5,), (5,)),
    ("rowdot", "bi,bi->b", (3, 4), (3, 4)),
    ("outer", "i,j->ij", (3,), (4,)),
    ("linear", "bsi,oi->bso", (2, 3, 4), (5, 4)),
    ("implicit", "ij,jk", (3, 4), (4, 2)),
    ("ellipsis", "...ij,...jk->...ik", (2, 3, 4), (2, 4, 2)),
    ("ellipsis_bcast", "...ij,...jk->...ik", (2, 1, 3, 4), (1, 5, 4, 2)),
    ("sum_inside", "ij,k->ik", (3, 4), (2,)),
    ("sum_two_inside", "ijk,j->j", (2, 3, 4), (3,)),
    ("spaces", "ij, jk -> ik", (3, 4), (4, 2)),
]
for _id, _eq, _a, _b in EINSUM:
    CASES.append(Case("Einsum", [_a, _b], attrs={"equation": _eq}, id=_id))
CASES += [
    Case("Einsum", [(3, 4)], attrs={"equation": "ij->ji"}, id="transpose"),
    Case("Einsum", [(3, 4)], attrs={"equation": "ij->i"}, id="rowsum"),
    Case(
        "Einsum",
        [(2, 3, 4), (2, 4, 2)],
        attrs={"equation": "bij,bjk->bik"},
        id="bmm_dynamic",
        dynamic=True,
    ),
    # onnx's shape inference cannot follow "..." of different lengths, which the harness needs.
    Case(
        "Einsum",
        [(2, 1, 3, 4), (1, 5, 4, 2)],
        attrs={"equation": "...ij,...jk->...ik"},
        id="ellipsis_dynamic",
        dynamic=True,
    ),
    Case("Einsum", [(3, 4), (4, 2), (2, 5)], attrs={"equation": "ij,jk,kl->il"}, id="chain3"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)
