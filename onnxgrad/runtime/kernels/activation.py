"""Activation kernels: ReLU family, sigmoids, softmax family, Clip, Gelu and the rest.

Every kernel keeps its input's dtype (attribute constants enter as Python floats, which
numpy 2 does not let widen a float32 array) and allocates fresh outputs, working in place
only on arrays it made itself. Exponentials only ever see arguments that cannot overflow,
so large inputs give finite results and no warnings.
"""

from __future__ import annotations

import math

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel

SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875

# erf(x) ≈ x · P(x²) / Q(x²) on |x| ≤ 4, a rational fit (relative error 3e-8 in exact
# arithmetic, under 4e-7 evaluated in float32) made for onnxgrad by weighted least squares
# on Chebyshev nodes; past 4, erf is ±1 to float32 precision. Lowest degree first.
_ERF_P = (
    1.128379142477644,
    0.19313167579532717,
    0.05304470424564444,
    0.0038651914217302428,
    0.00028408981031072955,
    1.9889453078345945e-06,
)
_ERF_Q = (
    1.0,
    0.5044911186895077,
    0.11517704796773527,
    0.015170658365381421,
    0.0011810600363535266,
    3.741793281674685e-05,
)
_ERF_CHUNK = 65536  # elements per pass: the temporaries stay in cache
_erf_exact = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, keeping the dtype.

    float32 (and the narrower floats, computed in float32) use the rational fit above, in
    cache-sized chunks; float64 and integers go through math.erf, exact but slow.
    """
    if x.dtype == np.float32:
        return _erf_float32(x)
    if x.dtype.kind == "f" and x.dtype.itemsize < 4 or x.dtype.kind == "V":
        return _erf_float32(x.astype(np.float32)).astype(x.dtype)
    return np.asarray(_erf_exact(x)).astype(x.dtype) if x.size else x.copy()


def _erf_float32(x: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    f = np.float32
    p_coef = [f(c) for c in reversed(_ERF_P)]
    q_coef = [f(c) for c in reversed(_ERF_Q)]
    size = min(_ERF_CHUNK, flat.size)
    u_buf, p_buf, q_buf = (np.empty(size, np.float32) for _ in range(3))
    for start in range(0, flat.size, _ERF_CHUNK):
        stop = min(start + _ERF_CHUNK, flat.size)
        n = stop - start
        y, u, p, q = out[start:stop], u_buf[:n], p_buf[:n], q_buf[:n]
        np.clip(flat[start:stop], f(-4.0), f(4.0), out=y)  # NaN stays NaN, ±inf → ±1
        np.multiply(y, y, out=u)
        np.multiply(u, p_coef[0], out=p)
        np.multiply(u, q_coef[0], out=q)
        for cp, cq in zip(p_coef[1:-1], q_coef[1:-1]):
            p += cp
            p *= u
            q += cq
            q *= u
        p += p_coef[-1]
        q += q_coef[-1]
        y *= p
        y /= q
        np.clip(y, f(-1.0), f(1.0), out=y)
    return out.reshape(x.shape)


def _float(node: KernelNode, name: str, default: float) -> float:
    return float(node.attrs.get(name, default))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e⁻ˣ) without overflow: e^(−|x|) never exceeds 1."""
    e = np.exp(-np.abs(x))
    denom = e + 1
    return np.where(x >= 0, 1 / denom, e / denom).astype(x.dtype, copy=False)


def softplus(x: np.ndarray) -> np.ndarray:
    """ln(1 + eˣ), computed as max(x, 0) + ln(1 + e^(−|x|)) so that it never overflows."""
    return np.logaddexp(x, x.dtype.type(0))


@kernel("Relu")
def relu(node: KernelNode):
    """max(x, 0), for floats and signed integers."""
    return lambda x: (np.maximum(x, 0),)


@kernel("LeakyRelu")
def leaky_relu(node: KernelNode):
    """x where x > 0, else alpha · x."""
    alpha = _float(node, "alpha", 0.01)
    return lambda x: (np.where(x > 0, x, x * alpha),)


@kernel("Sigmoid")
def sigmoid_kernel(node: KernelNode):
    """1 / (1 + e⁻ˣ), overflow-free."""
    return lambda x: (sigmoid(x),)


@kernel("Tanh")
def tanh(node: KernelNode):
    """tanh x."""
    return lambda x: (np.tanh(x),)


def _softmax_axis(node: KernelNode) -> tuple[int, bool]:
    """The axis and whether the opset < 13 "flatten to 2-D at axis" semantics apply."""
    if node.opset >= 13:
        return int(node.attrs.get("axis", -1)), False
    return int(node.attrs.get("axis", 1)), True


def _along_axis(node: KernelNode, fn):
    """Run `fn(x, axis)` over one axis (opset >= 13) or over a 2-D flattening (opset < 13)."""
    axis, flatten = _softmax_axis(node)

    def run(x):
        if x.size == 0:
            return (x.copy(),)
        if not flatten:
            return (fn(x, axis),)
        a = axis % x.ndim if x.ndim else 0
        outer = int(np.prod(x.shape[:a], dtype=np.int64))
        return (fn(x.reshape(outer, -1), 1).reshape(x.shape),)

    return run


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = x - x.max(axis=axis, keepdims=True)  # largest exponent 0: nothing overflows
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    s = x - x.max(axis=axis, keepdims=True)
    s -= np.log(np.exp(s).sum(axis=axis, keepdims=True))
    return s


def _hardmax(x: np.ndarray, axis: int) -> np.ndarray:
    out = np.zeros_like(x)
    first = np.expand_dims(np.argmax(x, axis=axis), axis)  # ties: the first index wins
    np.put_along_axis(out, first, 1, axis=axis)
    return out


@kernel("Softmax")
def softmax(node: KernelNode):
    """eˣ / Σ eˣ over `axis` (over the 2-D flattening at `axis` before opset 13)."""
    return _along_axis(node, _softmax)


@kernel("LogSoftmax")
def log_softmax(node: KernelNode):
    """x − ln Σ eˣ over `axis` (over the 2-D flattening at `axis` before opset 13)."""
    return _along_axis(node, _log_softmax)


@kernel("Hardmax")
def hardmax(node: KernelNode):
    """A one-hot of the first maximum along `axis` (2-D flattening before opset 13)."""
    return _along_axis(node, _hardmax)


@kernel("Clip")
def clip(node: KernelNode):
    """min(max(x, min), max); bounds are attributes before opset 11, optional inputs after."""
    if node.opset < 11:
        # Opset 1 and 6: the bounds are attributes, defaulting to the float range.
        low = node.attrs.get("min")
        high = node.attrs.get("max")
        return lambda x: (
            np.clip(x, low, high) if low is not None or high is not None else x.copy(),
        )

    def run(x, low=None, high=None):
        if low is None and high is None:
            return (x.copy(),)
        # min(max(x, low), high): with low > high every element becomes high, as ONNX says.
        out = x if low is None else np.maximum(x, low.astype(x.dtype, copy=False))
        if high is not None:
            out = np.minimum(out, high.astype(x.dtype, copy=False))
        return (out,)

    return run


@kernel("Gelu")
def gelu(node: KernelNode):
    """x · Φ(x), exact (approximate='none') or with the tanh approximation."""
    approximate = node.attrs.get("approximate", "none")
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)

        def run_tanh(x):
            inner = x * x
            inner *= 0.044715
            inner += 1
            inner *= x
            inner *= k
            np.tanh(inner, out=inner)
            inner += 1
            inner *= x
            inner *= 0.5
            return (inner,)

        return run_tanh
    if approximate != "none":
        raise NotImplementedError(f"Gelu approximate='{approximate}'")
    r = 1.0 / math.sqrt(2.0)

    def run(x):
        cdf = erf(x * r)
        cdf += 1
        cdf *= x
        cdf *= 0.5
        return (cdf,)

    return run


@kernel("Elu")
def elu(node: KernelNode):
    """x where x > 0, else alpha · (eˣ − 1)."""
    alpha = _float(node, "alpha", 1.0)
    return lambda x: (np.where(x > 0, x, np.expm1(np.minimum(x, 0)) * alpha),)


@kernel("Selu")
def selu(node: KernelNode):
    """gamma · x where x > 0, else gamma · alpha · (eˣ − 1)."""
    alpha = _float(node, "alpha", SELU_ALPHA)
    gamma = _float(node, "gamma", SELU_GAMMA)
    return lambda x: (np.where(x > 0, x * gamma, np.expm1(np.minimum(x, 0)) * (alpha * gamma)),)


@kernel("Celu")
def celu(node: KernelNode):
    """max(0, x) + min(0, alpha · (e^(x/alpha) − 1))."""
    alpha = _float(node, "alpha", 1.0)
    inv = 1.0 / alpha
    return lambda x: (np.where(x > 0, x, np.expm1(np.minimum(x, 0) * inv) * alpha),)


@kernel("Softplus")
def softplus_kernel(node: KernelNode):
    """ln(1 + eˣ), overflow-free."""
    return lambda x: (softplus(x),)


@kernel("Softsign")
def softsign(node: KernelNode):
    """x / (1 + |x|)."""
    return lambda x: (x / (np.abs(x) + 1),)


@kernel("HardSigmoid")
def hard_sigmoid(node: KernelNode):
    """clip(alpha · x + beta, 0, 1)."""
    alpha = _float(node, "alpha", 0.2)
    beta = _float(node, "beta", 0.5)

    def run(x):
        out = x * alpha
        out += beta
        np.clip(out, 0, 1, out=out)
        return (out,)

    return run


@kernel("HardSwish")
def hard_swish(node: KernelNode):
    """x · clip(x/6 + 1/2, 0, 1)."""

    def run(x):
        gate = x * (1.0 / 6.0)
        gate += 0.5
        np.clip(gate, 0, 1, out=gate)
        gate *= x
        return (gate,)

    return run


@kernel("Mish")
def mish(node: KernelNode):
    """x · tanh(softplus(x))."""

    def run(x):
        out = np.tanh(softplus(x))
        out *= x
        return (out,)

    return run


@kernel("PRelu")
def prelu(node: KernelNode):
    """x where x ≥ 0, else slope · x, the slope broadcasting to x's shape."""
    # The slope broadcasts to x (unidirectionally); the output keeps x's shape.
    return lambda x, slope: (np.where(x < 0, x * slope, x).astype(x.dtype, copy=False),)


@kernel("ThresholdedRelu")
def thresholded_relu(node: KernelNode):
    """x where x > alpha, else 0."""
    alpha = _float(node, "alpha", 1.0)
    return lambda x: (np.where(x > alpha, x, x.dtype.type(0)),)


@kernel("Shrink")
def shrink(node: KernelNode):
    """x + bias where x < −lambd, x − bias where x > lambd, else 0."""
    bias = _float(node, "bias", 0.0)
    lambd = _float(node, "lambd", 0.5)

    def run(x):
        # Integer inputs compute in float64 and are cast back, as the reference does.
        out = np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, 0))
        return (out.astype(x.dtype, copy=False),)

    return run
