"""Elementwise kernels beyond what the op tables cover: Where's bitwise fast path, Erf."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxgrad.runtime.kernels import KernelNode, lookup


def kernel(op: str):
    return lookup(op)(KernelNode(op, "", "node", 18))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_where_with_a_zero_branch_is_bit_exact(dtype):
    run = kernel("Where")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7)).astype(dtype)
    x[0, 0], x[1, 1], x[2, 2] = np.nan, -0.0, np.inf
    c = rng.standard_normal((5, 7)) > 0
    c[1, 1] = True
    zero = np.array(0, dtype)
    cases = [
        (c, x, zero),  # the fast path
        (c, zero, x),  # the fast path, mask inverted
        (c, x, np.array(-0.0, dtype)),  # -0 is not +0: np.where
        (c[:, :1], x, zero),  # a broadcast mask: np.where
        (c, x, 2 * x),  # no zero branch: np.where
        (c, x[:, ::-1], zero),  # not contiguous: np.where
        (np.array(True), np.array(2.0, dtype), zero),  # 0-d: np.where
    ]
    for args in cases:
        got, want = run(*args)[0], np.where(*args)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf(dtype):
    x = np.linspace(-6, 6, 1001).astype(dtype)
    got = kernel("Erf")(x)[0]
    want = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-15, atol=1e-7)
