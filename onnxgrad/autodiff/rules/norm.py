"""Derivative rules for normalization layers, and Dropout.

The standardizing layers (BatchNormalization in training mode, InstanceNormalization,
LayerNormalization, GroupNormalization) share one formula. With x̂ = (x − μ) · r,
r = 1/√(σ² + ε), the statistics taken over a set of M elements, and g = dy · scale the
gradient that reaches x̂:

    dx = r · (g − mean(g) − x̂ · mean(g · x̂))

Statistics that the forward node does not output are recomputed here (they are
intermediates of the forward op, not node outputs). Per-channel parameters (C,) are
shaped (C, 1, ..., 1) to broadcast against (N, C, D1, ...).
"""

from __future__ import annotations

import numpy as np

from onnxgrad.autodiff.rules import rule
from onnxgrad.autodiff.rules.shape import need_rank


def _like(b, t: str, x: str) -> str:
    """`t` in the element type of `x` (nothing emitted when it already is)."""
    return t if b.dtype(t) == b.dtype(x) else b.CastLike(t, x)


def _per_channel(b, v: str, rank: int) -> str:
    """A (C,) vector shaped (C, 1, ..., 1) for an input of rank `rank` (N, C, ...)."""
    return b.unsqueeze(v, list(range(1, rank - 1))) if rank > 2 else v


def _mean(b, t: str, axes: list[int]) -> str:
    return b.reduce("ReduceMean", t, axes, keepdims=1)


def _standardize(b, x: str, axes: list[int], epsilon: float) -> tuple[str, str]:
    """x̂ = (x − μ) · r and r = 1/√(σ² + ε) over `axes` (biased variance)."""
    d = b.Sub(x, _mean(b, x, axes))
    inv = b.Reciprocal(b.Sqrt(b.Add(_mean(b, b.Mul(d, d), axes), b.const(epsilon, like=x))))
    return b.Mul(d, inv), inv


def _standardized_grad(b, g: str, xhat: str, inv: str, axes: list[int]) -> str:
    """dx = r · (g − mean(g) − x̂ · mean(g · x̂)), the means over `axes`."""
    centered = b.Sub(g, _mean(b, g, axes))
    return b.Mul(inv, b.Sub(centered, b.Mul(xhat, _mean(b, b.Mul(g, xhat), axes))))


def _bn_training(node) -> bool:
    if node.opset >= 14:
        return bool(node.attrs.get("training_mode", 0))
    if node.opset >= 7:
        return sum(1 for o in node.output if o) > 1
    return not node.attrs.get("is_test", 0)


@rule("BatchNormalization")
def batch_normalization(b, node, dys):
    """Inference:  y = scale · (x − mean) · r + B,  r = 1/√(var + ε)
        →  dx = dy · scale · r,  dscale = Σ dy · (x − mean) · r,  dB = Σ dy

    Training mode (batch statistics μ_B, σ²_B over N and the spatial axes, M elements):
        →  dx = r · (g − mean(g) − x̂ · mean(g · x̂)),  g = dy · scale
           plus, when the running statistics feed the loss,
           dx += (1 − momentum) · (d running_mean + 2 · d running_var · (x − μ_B)) / M

    Sums run over every axis but the channel axis 1. mean and var are statistics, not
    weights: they get no gradient.
    """
    x, scale = node.input[0], node.input[1]
    rank = need_rank(b, node, x)
    axes = [0] + list(range(2, rank))
    epsilon = node.attrs.get("epsilon", 1e-5)
    if not node.attrs.get("spatial", 1):
        raise NotImplementedError(
            f"BatchNormalization node '{node.name}' (opset {node.opset}) with spatial=0: "
            "convert the model to opset 9 or later, where every BatchNormalization is spatial"
        )
    dy = dys[0]
    scale_c = _per_channel(b, _like(b, scale, x), rank)

    if not _bn_training(node):
        mean_c = _per_channel(b, _like(b, node.input[3], x), rank)
        var = _like(b, node.input[4], x)
        inv_c = _per_channel(b, b.Reciprocal(b.Sqrt(b.Add(var, b.const(epsilon, like=x)))), rank)
        dx = b.Mul(dy, b.Mul(scale_c, inv_c)) if node.needs_grad(0) else None
        dscale = dbias = None
        if node.needs_grad(1):
            xhat = b.Mul(b.Sub(x, mean_c), inv_c)
            dscale = _like(b, b.reduce_sum(b.Mul(dy, xhat), axes, keepdims=0), scale)
        if node.needs_grad(2):
            dbias = _like(b, b.reduce_sum(dy, axes, keepdims=0), node.input[2])
        return [dx, dscale, dbias, None, None]

    if any(d is not None for d in dys[3:]):
        raise NotImplementedError(
            f"BatchNormalization node '{node.name}' (opset {node.opset}): the gradient through "
            "the saved_mean / saved_var outputs; use the Y output or convert to opset 14+"
        )
    xhat, inv = _standardize(b, x, axes, epsilon)
    dx = dscale = dbias = None
    if dy is not None:
        if node.needs_grad(0):
            dx = _standardized_grad(b, b.Mul(dy, scale_c), xhat, inv, axes)
        if node.needs_grad(1):
            dscale = _like(b, b.reduce_sum(b.Mul(dy, xhat), axes, keepdims=0), scale)
        if node.needs_grad(2):
            dbias = _like(b, b.reduce_sum(dy, axes, keepdims=0), node.input[2])
    d_mean, d_var = (list(dys) + [None, None, None])[1:3]
    if node.needs_grad(0) and (d_mean is not None or d_var is not None):
        # running = momentum · running_in + (1 − momentum) · batch statistic.
        momentum = node.attrs.get("momentum", 0.9)
        h = None
        if d_mean is not None:
            h = _per_channel(b, _like(b, d_mean, x), rank)
        if d_var is not None:
            # ∂σ²_B/∂x = 2 (x − μ_B) / M, and x − μ_B = x̂ / r.
            two_d = b.Mul(b.const(2.0, like=x), b.Div(xhat, inv))
            term = b.Mul(_per_channel(b, _like(b, d_var, x), rank), two_d)
            h = term if h is None else b.Add(h, term)
        per_m = b.Div(b.Cast(b.Size(scale), to=b.dtype(x)), b.Cast(b.Size(x), to=b.dtype(x)))
        extra = b.Mul(h, b.Mul(b.const(1.0 - momentum, like=x), per_m))
        extra = b.Expand(extra, b.Shape(x))
        dx = extra if dx is None else b.Add(dx, extra)
    return [dx, dscale, dbias, None, None]


@rule("InstanceNormalization")
def instance_normalization(b, node, dys):
    """y = scale · x̂ + B, x̂ standardized over the spatial axes of each (n, c)
    →  dx = r · (g − mean(g) − x̂ · mean(g · x̂)),  g = dy · scale,
       dscale = Σ_{n, spatial} dy · x̂,  dB = Σ_{n, spatial} dy
    """
    x, scale = node.input[0], node.input[1]
    rank = need_rank(b, node, x)
    dy = dys[0]
    xhat, inv = _standardize(b, x, list(range(2, rank)), node.attrs.get("epsilon", 1e-5))
    outer = [0] + list(range(2, rank))
    dx = dscale = dbias = None
    if node.needs_grad(0):
        g = b.Mul(dy, _per_channel(b, scale, rank))
        dx = _standardized_grad(b, g, xhat, inv, list(range(2, rank)))
    if node.needs_grad(1):
        dscale = b.reduce_sum(b.Mul(dy, xhat), outer, keepdims=0)
    if node.needs_grad(2):
        dbias = b.reduce_sum(dy, outer, keepdims=0)
    return [dx, dscale, dbias]


@rule("LayerNormalization")
def layer_normalization(b, node, dys):
    """y = scale · x̂ + B,  x̂ = (x − μ) · r over axes [axis, rank), M elements each;
    also the outputs Mean = μ and InvStdDev = r
    →  dx = r · (g − mean(g) − x̂ · mean(g · x̂)) + (dMean − dInvStdDev · r² · x̂) / M,
       g = dy · scale,  dscale = Σ dy · x̂,  dB = Σ dy  (summed to their shapes)

    Mean and InvStdDev are reused when they are of x's type; when the stash type is
    narrower (float32 statistics of a float64 x) they are recomputed in x's type.
    """
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    rank = need_rank(b, node, x)
    axis = node.attrs.get("axis", -1) % rank
    axes = list(range(axis, rank))
    epsilon = node.attrs.get("epsilon", 1e-5)
    outs = node.output + ["", ""]
    dy, d_mean, d_inv = (list(dys) + [None, None])[:3]

    # 1. The statistics: the node's outputs where they are exact, else recomputed.
    mean = outs[1] if outs[1] and b.dtype(outs[1]) == b.dtype(x) else _mean(b, x, axes)
    d = b.Sub(x, mean)
    if outs[2] and b.dtype(outs[2]) == b.dtype(x):
        inv = outs[2]
    else:
        var = _mean(b, b.Mul(d, d), axes)
        inv = b.Reciprocal(b.Sqrt(b.Add(var, b.const(epsilon, like=x))))
    xhat = b.Mul(d, inv)

    # 2. dx through Y, then through Mean and InvStdDev.
    dx = None
    if node.needs_grad(0):
        if dy is not None:
            dx = _standardized_grad(b, b.Mul(dy, scale), xhat, inv, axes)
        if d_mean is not None or d_inv is not None:
            h = None if d_mean is None else _like(b, d_mean, x)
            if d_inv is not None:
                # ∂r/∂x = −r³ · (x − μ) / M = −r² · x̂ / M.
                term = b.Mul(_like(b, d_inv, x), b.Mul(b.Mul(inv, inv), xhat))
                h = b.Neg(term) if h is None else b.Sub(h, term)
            per_m = b.Div(b.Cast(b.Size(mean), to=b.dtype(x)), b.Cast(b.Size(x), to=b.dtype(x)))
            extra = b.Expand(b.Mul(h, per_m), b.Shape(x))
            dx = extra if dx is None else b.Add(dx, extra)

    # 3. The affine parameters, summed down to their (broadcast) shapes.
    dscale = dbias = None
    if dy is not None and node.needs_grad(1):
        dscale = b.sum_to(b.Mul(dy, xhat), scale, b.shape(x))
    if dy is not None and bias is not None and node.needs_grad(2):
        dbias = b.sum_to(dy, bias, b.shape(x))
    return [dx, dscale, dbias]


@rule("GroupNormalization")
def group_normalization(b, node, dys):
    """x viewed as (N, G, C/G · D1 · ...), each group standardized to x̂; y = scale · x̂ + B
    with scale and B per channel (opset 21)
    →  dx = r · (g − mean(g) − x̂ · mean(g · x̂)) per group,  g = dy · scale,
       dscale = Σ dy · x̂,  dB = Σ dy  over all axes but the channel axis
    """
    x, scale = node.input[0], node.input[1]
    rank = need_rank(b, node, x)
    if node.opset < 21:
        raise NotImplementedError(
            f"GroupNormalization node '{node.name}' (opset {node.opset}): the deprecated "
            "per-group form; convert the model to opset 21"
        )
    groups = node.attrs["num_groups"]
    dy = dys[0]
    grouped = b.ints([0, groups, -1])  # Reshape's 0 keeps N as it is
    xhat_g, inv = _standardize(b, b.Reshape(x, grouped), [2], node.attrs.get("epsilon", 1e-5))
    outer = [0] + list(range(2, rank))
    dx = dscale = dbias = None
    if node.needs_grad(0):
        g = b.Reshape(b.Mul(dy, _per_channel(b, scale, rank)), grouped)
        dx = b.Reshape(_standardized_grad(b, g, xhat_g, inv, [2]), b.Shape(x))
    if node.needs_grad(1):
        xhat = b.Reshape(xhat_g, b.Shape(x))
        dscale = b.reduce_sum(b.Mul(dy, xhat), outer, keepdims=0)
    if node.needs_grad(2):
        dbias = b.reduce_sum(dy, outer, keepdims=0)
    return [dx, dscale, dbias]


@rule("RMSNormalization")
def rms_normalization(b, node, dys):
    """y = scale · x̂,  x̂ = x · r,  r = 1/√(mean(x²) + ε) over axes [axis, rank)
    →  dx = r · (g − x̂ · mean(g · x̂)),  g = dy · scale,  dscale = Σ dy · x̂
    """
    x, scale = node.input[0], node.input[1]
    rank = need_rank(b, node, x)
    axes = list(range(node.attrs.get("axis", -1) % rank, rank))
    dy = dys[0]
    epsilon = b.const(node.attrs.get("epsilon", 1e-5), like=x)
    inv = b.Reciprocal(b.Sqrt(b.Add(_mean(b, b.Mul(x, x), axes), epsilon)))
    xhat = b.Mul(x, inv)
    dx = dscale = None
    if node.needs_grad(0):
        g = b.Mul(dy, scale)
        dx = b.Mul(inv, b.Sub(g, b.Mul(xhat, _mean(b, b.Mul(g, xhat), axes))))
    if node.needs_grad(1):
        dscale = b.sum_to(b.Mul(dy, xhat), scale, b.shape(x))
    return [dx, dscale]


@rule("MeanVarianceNormalization")
def mean_variance_normalization(b, node, dys):
    """y = (x − μ) / s,  s = σ + 1e-9,  σ = √(mean((x − μ)²)) over `axes`
    →  dx = (dy − mean(dy)) / s − y · mean(dy · y) / σ

    A slice that is constant (σ = 0) has no finite gradient; it gives inf or NaN, as the
    forward op's own derivative does.
    """
    x, y = node.input[0], node.output[0]
    rank = need_rank(b, node, x)
    axes = sorted(a % rank for a in node.attrs.get("axes", [0, 2, 3]))
    dy = dys[0]
    d = b.Sub(x, _mean(b, x, axes))
    sigma = b.Sqrt(_mean(b, b.Mul(d, d), axes))
    s = b.Add(sigma, b.const(1e-9, like=x))
    first = b.Div(b.Sub(dy, _mean(b, dy, axes)), s)
    second = b.Div(b.Mul(y, _mean(b, b.Mul(dy, y), axes)), sigma)
    return [b.Sub(first, second)]


@rule("LpNormalization")
def lp_normalization(b, node, dys):
    """y = x / n,  n = ‖x‖_p along `axis`
    →  dx = (dy − ∂n/∂x · Σ dy · y) / n,  ∂n/∂x = y (p = 2) or sign(x) (p = 1)

    At n = 0 the forward op returns 0 and has no derivative; we take the gradient 0. For
    p = 1 at x = 0 we take the subgradient sign(0) = 0.
    """
    x, y = node.input[0], node.output[0]
    dy = dys[0]
    axis = node.attrs.get("axis", -1)
    p = node.attrs.get("p", 2)
    if p not in (1, 2):
        raise NotImplementedError(
            f"LpNormalization node '{node.name}' with p={p}: the spec allows p = 1 or 2"
        )
    norm = b.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [axis], keepdims=1)
    zero, one = b.const(0.0, like=x), b.const(1.0, like=x)
    is_zero = b.Equal(norm, zero)
    dnorm = y if p == 2 else b.Sign(x)
    proj = b.reduce_sum(b.Mul(dy, y), [axis], keepdims=1)
    dx = b.Div(b.Sub(dy, b.Mul(dnorm, proj)), b.Where(is_zero, one, norm))
    return [b.Where(is_zero, zero, dx)]


def _channel_band(b, node, x: str, size: int) -> str:
    """The (C, C) 0/1 matrix B with B[j, i] = 1 when channel j is in channel i's window
    [i − ⌊(size−1)/2⌋, i + ⌈(size−1)/2⌉], so that the window sums are v · B along C."""
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    shape = b.shape(x)
    c = shape[1] if shape is not None and len(shape) > 1 else None
    if isinstance(c, int):
        j, i = np.arange(c)[:, None], np.arange(c)[None, :]
        return b.const(((j >= i - before) & (j <= i + after)).astype(np.float64), like=x)
    if b.opset < 15:
        raise NotImplementedError(
            f"LRN node '{node.name}' with a channel count unknown before run time needs "
            "opset >= 15; give the model's inputs static channel dimensions"
        )
    channels = b.Squeeze(b.Shape(x, start=1, end=2), b.ints([0]))
    zero, one = b.ints(0), b.ints(1)
    idx = b.Range(zero, channels, one)
    diff = b.Sub(b.Unsqueeze(idx, b.ints([1])), b.Unsqueeze(idx, b.ints([0])))  # j − i
    inside = b.And(b.GreaterOrEqual(diff, b.ints(-before)), b.LessOrEqual(diff, b.ints(after)))
    return b.Cast(inside, to=b.dtype(x))


def _along_channels(b, v: str, matrix: str, rank: int) -> str:
    """v · matrix along the channel axis 1 of v (channels moved last and back)."""
    last = [0] + list(range(2, rank)) + [1]
    back = [0, rank - 1] + list(range(1, rank - 1))
    return b.Transpose(b.MatMul(b.Transpose(v, perm=last), matrix), perm=back)


@rule("LRN")
def lrn(b, node, dys):
    """y = x · s^(−β),  s = bias + α/size · W(x²),  W the window sum across channels
    →  dx = dy · s^(−β) − (2αβ / size) · x · Wᵀ(dy · y / s)
    """
    x, y = node.input[0], node.output[0]
    dy = dys[0]
    rank = need_rank(b, node, x)
    size = node.attrs["size"]
    alpha = node.attrs.get("alpha", 1e-4)
    beta = node.attrs.get("beta", 0.75)
    bias = node.attrs.get("bias", 1.0)
    band = _channel_band(b, node, x, size)
    window = _along_channels(b, b.Mul(x, x), band, rank)
    s = b.Add(b.const(bias, like=x), b.Mul(b.const(alpha / size, like=x), window))
    direct = b.Mul(dy, b.Pow(s, b.const(-beta, like=x)))
    spread = _along_channels(b, b.Div(b.Mul(dy, y), s), b.Transpose(band, perm=[1, 0]), rank)
    coupled = b.Mul(b.const(2.0 * alpha * beta / size, like=x), b.Mul(x, spread))
    return [b.Sub(direct, coupled)]


@rule("Dropout")
def dropout(b, node, dys):
    """Inference:  y = x  →  dx = dy
    Training:  y = x · mask / (1 − ratio)  →  dx = dy · mask / (1 − ratio)

    The mask is the node's own mask output; a training-mode Dropout without one cannot
    be differentiated (its random draw is not in the graph). ratio and training_mode are
    not differentiable.
    """
    x = node.input[0]
    dy = dys[0]
    ratio = node.input[1] if len(node.input) > 1 and node.input[1] else None
    training = node.input[2] if len(node.input) > 2 and node.input[2] else None

    # 1. Inference when the graph says so at build time.
    if node.opset < 7:
        if node.attrs.get("is_test", 0):
            return [dy]
    elif node.opset < 12 or training is None:
        return [dy]
    else:
        value = b.constant_value(training)
        if value is not None and not bool(np.asarray(value)):
            return [dy]

    # 2. Training mode (or decided at run time): the forward node's mask is needed.
    mask = node.output[1] if len(node.output) > 1 and node.output[1] else None
    if mask is None:
        raise NotImplementedError(
            f"Dropout node '{node.name}' (opset {node.opset}) runs in training mode but has no "
            "mask output, so its gradient cannot be formed: add the mask output to the node, "
            "or set training_mode to false"
        )
    if ratio is None:
        keep = b.const(1.0 / (1.0 - node.attrs.get("ratio", 0.5)), like=x)
    else:
        keep = b.Reciprocal(b.Sub(b.const(1.0, like=x), _like(b, ratio, x)))
    if training is not None and b.constant_value(training) is None:
        # Inference at run time: the mask is all true and the scale must be 1.
        keep = b.Where(training, keep, b.const(1.0, like=x))
    return [b.Mul(b.Mul(dy, b.Cast(mask, to=b.dtype(x))), keep), None, None]
