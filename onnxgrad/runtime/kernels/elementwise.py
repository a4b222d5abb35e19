"""Elementwise kernels: arithmetic, unary math, comparisons, logic, casts, Where."""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from onnxgrad.runtime.kernels import KernelNode, kernel

_erf = np.frompyfunc(math.erf, 1, 1)


def _unary(fn):
    def factory(node: KernelNode):
        return lambda x: (fn(x),)

    return factory


def _binary(fn):
    def factory(node: KernelNode):
        return lambda a, b: (fn(a, b),)

    return factory


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu":
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer division truncates toward zero
    return np.divide(a, b)


def _mod(node: KernelNode):
    if node.attrs.get("fmod", 0):
        return lambda a, b: (np.fmod(a, b),)
    return lambda a, b: (np.mod(a, b),)


def _pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # ONNX Pow keeps the type of the base.
    return np.power(a, b.astype(a.dtype) if a.dtype != b.dtype else b).astype(a.dtype, copy=False)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, keeping the dtype."""
    return _erf(x).astype(x.dtype) if x.size else x.copy()


_BINARY = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": _int_div,
    "Pow": _pow,
    "Equal": np.equal,
    "Less": np.less,
    "LessOrEqual": np.less_equal,
    "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
    "Xor": np.logical_xor,
    "BitwiseAnd": np.bitwise_and,
    "BitwiseOr": np.bitwise_or,
    "BitwiseXor": np.bitwise_xor,
}

_UNARY = {
    "Neg": np.negative,
    "Abs": np.abs,
    "Exp": np.exp,
    "Log": np.log,
    "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal,
    "Floor": np.floor,
    "Ceil": np.ceil,
    "Round": np.round,  # round half to even, as ONNX says
    "Sign": np.sign,
    "Erf": erf,
    "Sin": np.sin,
    "Cos": np.cos,
    "Tan": np.tan,
    "Asin": np.arcsin,
    "Acos": np.arccos,
    "Atan": np.arctan,
    "Sinh": np.sinh,
    "Cosh": np.cosh,
    "Asinh": np.arcsinh,
    "Acosh": np.arccosh,
    "Atanh": np.arctanh,
    "Not": np.logical_not,
    "BitwiseNot": np.invert,
    "IsNaN": np.isnan,
}

for _op, _fn in _BINARY.items():
    kernel(_op)(_binary(_fn))
for _op, _fn in _UNARY.items():
    kernel(_op)(_unary(_fn))
kernel("Mod")(_mod)


@kernel("Sum", "Mean", "Max", "Min")
def variadic(node: KernelNode):
    """Sum, Mean, Max, Min over any number of broadcasting inputs."""
    reduce = {"Sum": np.add, "Mean": np.add, "Max": np.maximum, "Min": np.minimum}[node.op_type]
    mean = node.op_type == "Mean"

    def run(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = reduce(out, x)
        if mean:
            out = out / out.dtype.type(len(xs))
        elif len(xs) == 1:
            out = out.copy()
        return (out,)

    return run


@kernel("IsInf")
def is_inf(node: KernelNode):
    pos = node.attrs.get("detect_positive", 1)
    neg = node.attrs.get("detect_negative", 1)

    def run(x):
        out = np.isinf(x)
        if not pos:
            out &= x < 0
        if not neg:
            out &= x > 0
        return (out,)

    return run


@kernel("Where")
def where(node: KernelNode):
    return lambda c, a, b: (np.where(c, a, b),)


@kernel("Cast")
def cast(node: KernelNode):
    to = helper.tensor_dtype_to_np_dtype(node.attrs["to"])
    return lambda x: (x.astype(to),)


@kernel("CastLike")
def cast_like(node: KernelNode):
    return lambda x, like: (x.astype(like.dtype),)
