"""Linear-algebra kernels: MatMul, Gemm, Einsum, all through numpy's BLAS-backed products."""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel


@kernel("MatMul")
def matmul(node: KernelNode):
    """A · B with numpy's matmul rules (1-D promotion, broadcast batch dimensions)."""

    # np.matmul follows numpy's matmul rules, which ONNX's MatMul copies: 1-D operands are
    # promoted and the promoted axis removed again, batch dimensions broadcast.
    def run(a, b):
        y = matmul_nd(a, b)
        # numpy multiplies ml_dtypes' bfloat16 (and the float8 types) in float32 and returns
        # float32; ONNX keeps the input type.
        if y.dtype != a.dtype and a.dtype == b.dtype:
            y = y.astype(a.dtype)
        return (y,)

    return run


def matmul_nd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.matmul(a, b), with (..., M, K) @ (K, N) done as one (…·M, K) @ (K, N) product.

    numpy runs a stack of small products for a batched `a` against a matrix; folding the
    batch axes into the rows gives BLAS one large product instead (the same sums; only
    BLAS's blocking, and so the rounding, may differ).
    """
    if a.ndim > 2 and b.ndim == 2:
        rows = a.reshape(-1, a.shape[-1])
        return np.matmul(rows, b).reshape(a.shape[:-1] + b.shape[-1:])
    return np.matmul(a, b)


@kernel("Gemm")
def gemm(node: KernelNode):
    """alpha · A' · B' + beta · C: one product, then scaling in place."""
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    trans_a = bool(node.attrs.get("transA", 0))
    trans_b = bool(node.attrs.get("transB", 0))

    def run(a, b, c=None):
        # 1. One product; the transposes are views.
        out = np.matmul(a.T if trans_a else a, b.T if trans_b else b)

        # 2. Scale and add C in place: `out` is a fresh array that nobody else holds.
        integer = out.dtype.kind in "iu"
        if alpha != 1.0:
            if integer:
                out = (out * alpha).astype(out.dtype)
            else:
                out *= alpha
        if c is not None and beta != 0.0:
            if beta == 1.0:
                out += c
            elif integer:
                out += (c * beta).astype(out.dtype)
            else:
                out += c * beta
        return (out,)

    return run


@kernel("Einsum")
def einsum(node: KernelNode):
    """numpy's einsum, which reads ONNX equations as written ('...', implicit output)."""
    equation = node.attrs["equation"].replace(" ", "")

    def run(*xs):
        dtype = xs[0].dtype if xs else None
        if dtype is not None and dtype.kind not in "biuf":
            # bfloat16 (ml_dtypes) has no einsum loop: compute in float32, round back once.
            wide = [x.astype(np.float32) for x in xs]
            y = np.einsum(equation, *wide, optimize=len(xs) > 1)
            return (np.asarray(y).astype(dtype),)
        return (np.asarray(np.einsum(equation, *xs, optimize=len(xs) > 1)),)

    return run
