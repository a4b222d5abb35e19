"""MatMul, Gemm and Einsum kernels against onnxruntime and onnx's reference evaluator.

The gradient table (tests/autodiff/test_rules_linalg.py) runs the float kernels on the shapes
the rules care about; here are integer inputs, Gemm's older opsets, Einsum's diagonals and
"..." of different lengths, and the guarantee that Gemm never writes to C.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxgrad.runtime.session import Session
from tests.runtime.test_kernels_activation import f32, one_node, run_both

MATMUL_SHAPES = [
    ((3, 4), (4, 2)),
    ((4,), (4, 2)),
    ((3, 4), (4,)),
    ((4,), (4,)),
    ((2, 1, 3, 4), (5, 4, 2)),
    ((4,), (2, 4, 3)),
    ((0, 4), (4, 2)),
]


@pytest.mark.parametrize("a, b", MATMUL_SHAPES, ids=[f"{a}x{b}" for a, b in MATMUL_SHAPES])
def test_matmul_float32(a, b):
    run_both("MatMul", [f32(*a), f32(*b)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32])
def test_matmul_integer(dtype):
    a = np.arange(12).reshape(3, 4).astype(dtype)
    b = np.arange(8).reshape(4, 2).astype(dtype)
    run_both("MatMul", [a, b], ref="onnx")


C_SHAPES = [None, (), (1,), (2,), (1, 2), (3, 1), (3, 2)]


@pytest.mark.parametrize("c", C_SHAPES, ids=[str(c) for c in C_SHAPES])
@pytest.mark.parametrize("trans", [(0, 0), (1, 0), (0, 1), (1, 1)], ids=lambda t: f"t{t[0]}{t[1]}")
@pytest.mark.parametrize(
    "scale", [(1.0, 1.0), (0.5, -2.0), (2.0, 0.0)], ids=["unit", "scaled", "beta0"]
)
def test_gemm(c, trans, scale):
    ta, tb = trans
    a = f32(4, 3) if ta else f32(3, 4)
    b = f32(2, 4) if tb else f32(4, 2)
    inputs = [a, b] if c is None else [a, b, f32(*c)]
    run_both("Gemm", inputs, transA=ta, transB=tb, alpha=scale[0], beta=scale[1])


@pytest.mark.parametrize("opset", [7, 9, 11])
def test_gemm_old_opsets(opset):
    run_both("Gemm", [f32(3, 4), f32(4, 2), f32(2)], opset=opset, alpha=0.5, beta=2.0, transA=0)


def test_gemm_opset6_broadcast_attribute():
    # onnxruntime has no Gemm before opset 7.
    run_both("Gemm", [f32(3, 4), f32(4, 2), f32(2)], opset=6, ref="onnx", broadcast=1)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_gemm_integer(dtype):
    a = np.arange(12).reshape(3, 4).astype(dtype)
    b = np.arange(8).reshape(4, 2).astype(dtype)
    c = np.array([1, -1], dtype=dtype)
    run_both("Gemm", [a, b, c], ref="onnx")
    run_both("Gemm", [a, b, c], ref="onnx", alpha=2.0, beta=3.0)


def test_gemm_leaves_full_c_alone():
    a, b, c = f32(3, 4), f32(4, 2), f32(3, 2)
    keep = c.copy()
    model = one_node("Gemm", [a, b, c], 18)
    out = Session(model).run(["out"], {"in0": a, "in1": b, "in2": c})[0]
    np.testing.assert_array_equal(c, keep)
    assert not np.shares_memory(out, c)


EINSUM = [
    ("ij,jk->ik", [(3, 4), (4, 2)]),
    ("ij,jk", [(3, 4), (4, 2)]),
    ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)]),
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),
    ("...ij,jk->...ik", [(2, 3, 3, 4), (4, 2)]),
    ("i,i->", [(5,), (5,)]),
    ("i,j->ij", [(3,), (4,)]),
    ("ii->i", [(3, 3)]),
    ("ii", [(3, 3)]),
    ("ij->", [(3, 4)]),
    ("ij,jk,kl->il", [(3, 4), (4, 2), (2, 5)]),
    ("bij, bjk -> bik", [(2, 3, 4), (2, 4, 2)]),
]


@pytest.mark.parametrize("equation, shapes", EINSUM, ids=[e for e, _ in EINSUM])
def test_einsum(equation, shapes):
    run_both("Einsum", [f32(*s) for s in shapes], ref="onnx", equation=equation)


def test_einsum_integer():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    b = np.arange(8, dtype=np.int64).reshape(4, 2)
    run_both("Einsum", [a, b], ref="onnx", equation="ij,jk->ik")
