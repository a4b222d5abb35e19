"""Recurrent kernels: RNN, GRU and LSTM with the full ONNX semantics.

Every direction works in layout 0 (time, batch, features): a layout-1 input is transposed on
the way in and the outputs on the way out. The input projection of all time steps is one
matrix product (with both biases folded in where they simply add); the loop over time then
does one product with R per step (two for GRU with linear_before_reset = 0) and elementwise
work. Shorter sequences (sequence_lens) keep their state once they end: their Y is zero past
their length and Y_h, Y_c hold the state of their last valid step (zero for an empty
sequence, as in onnxruntime); the reverse direction runs each sequence from its own last
valid step back to step 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxgrad.errors import UnsupportedOpError
from onnxgrad.runtime.kernels import KernelNode, kernel
from onnxgrad.runtime.kernels.activation import sigmoid, softplus

Activation = Callable[[np.ndarray], np.ndarray]

# Per activation name (lower case): how many of activation_alpha / activation_beta it takes,
# and their defaults (those of the ONNX op of the same name).
ACTIVATION_PARAMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "relu": ((), ()),
    "tanh": ((), ()),
    "sigmoid": ((), ()),
    "softsign": ((), ()),
    "softplus": ((), ()),
    "affine": ((1.0,), (0.0,)),
    "leakyrelu": ((0.01,), ()),
    "thresholdedrelu": ((1.0,), ()),
    "scaledtanh": ((1.0,), (1.0,)),
    "hardsigmoid": ((0.2,), (0.5,)),
    "elu": ((1.0,), ()),
}

DEFAULT_ACTIVATIONS = {
    "RNN": ("Tanh",),
    "GRU": ("Sigmoid", "Tanh"),
    "LSTM": ("Sigmoid", "Tanh", "Tanh"),
}

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def parse_activations(
    op_type: str, attrs: dict, directions: int, node_name: str = "", opset: int = 0
) -> list[list[tuple[str, float, float]]]:
    """The activations of each direction as (lower-case name, alpha, beta) triples.

    activation_alpha and activation_beta are consumed in the order of the activations, each
    value only by an activation that takes one (ONNX Runtime's reading of the spec). A list
    given for one direction of a bidirectional op serves both.

    Raises:
        UnsupportedOpError: an activation name that ONNX does not define for recurrent ops.
    """
    per_direction = len(DEFAULT_ACTIVATIONS[op_type])
    names = list(attrs.get("activations", DEFAULT_ACTIVATIONS[op_type] * directions))
    if len(names) == per_direction and directions == 2:
        names = names * 2
    if len(names) != per_direction * directions:
        raise UnsupportedOpError(
            op_type,
            node_name,
            opset,
            detail=f"activations has {len(names)} names; a {directions}-direction {op_type} "
            f"needs {per_direction * directions}",
        )
    alphas = [float(v) for v in attrs.get("activation_alpha", [])]
    betas = [float(v) for v in attrs.get("activation_beta", [])]
    parsed = []
    for name in names:
        key = name.lower()
        if key not in ACTIVATION_PARAMS:
            raise UnsupportedOpError(
                op_type,
                node_name,
                opset,
                detail=f"activation '{name}' is unknown; use one of "
                + ", ".join(sorted(ACTIVATION_PARAMS)),
            )
        alpha_default, beta_default = ACTIVATION_PARAMS[key]
        alpha = (alphas.pop(0) if alphas else alpha_default[0]) if alpha_default else 0.0
        beta = (betas.pop(0) if betas else beta_default[0]) if beta_default else 0.0
        parsed.append((key, alpha, beta))
    return [parsed[d * per_direction : (d + 1) * per_direction] for d in range(directions)]


def activation(key: str, alpha: float, beta: float) -> Activation:
    """The numpy function of one recurrent activation; it keeps its input's dtype."""
    if key == "tanh":
        return np.tanh
    if key == "sigmoid":
        return sigmoid
    if key == "relu":
        return lambda x: np.maximum(x, 0)
    if key == "softsign":
        return lambda x: x / (np.abs(x) + 1)
    if key == "softplus":
        return softplus
    if key == "affine":
        return lambda x: x * alpha + beta
    if key == "leakyrelu":
        return lambda x: np.where(x > 0, x, x * alpha)
    if key == "thresholdedrelu":
        return lambda x: np.where(x > alpha, x, 0).astype(x.dtype, copy=False)
    if key == "scaledtanh":
        return lambda x: np.tanh(x * beta) * alpha
    if key == "hardsigmoid":
        return lambda x: np.clip(x * alpha + beta, 0, 1)
    if key == "elu":
        return lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0)) * alpha)
    raise KeyError(key)


class _Spec:
    """The attributes of one recurrent node, parsed once."""

    def __init__(self, node: KernelNode):
        attrs = node.attrs
        self.op = node.op_type
        self.direction = attrs.get("direction", "forward")
        if self.direction not in ("forward", "reverse", "bidirectional"):
            raise UnsupportedOpError(
                node.op_type,
                node.name,
                node.opset,
                detail=f"direction '{self.direction}'; use forward, reverse or bidirectional",
            )
        self.num_directions = 2 if self.direction == "bidirectional" else 1
        self.clip = attrs.get("clip")
        self.layout = int(attrs.get("layout", 0))
        self.linear_before_reset = int(attrs.get("linear_before_reset", 0))
        self.input_forget = int(attrs.get("input_forget", 0))
        groups = parse_activations(node.op_type, attrs, self.num_directions, node.name, node.opset)
        self.activations = [[activation(*a) for a in group] for group in groups]

    def reverse(self, d: int) -> bool:
        return self.direction == "reverse" or (self.direction == "bidirectional" and d == 1)


def _clip(x: np.ndarray, bound: float | None) -> np.ndarray:
    return x if bound is None else np.clip(x, -bound, bound)


def _run(spec: _Spec, x, w, r, b=None, lens=None, h0=None, c0=None, p=None) -> tuple:
    """Every output of one recurrent node (layout handled here)."""
    # 1. Layout 1 holds batch first: work in layout 0 throughout.
    if spec.layout == 1:
        x = x.swapaxes(0, 1)
        h0 = None if h0 is None else h0.swapaxes(0, 1)
        c0 = None if c0 is None else c0.swapaxes(0, 1)
    seq, batch = x.shape[0], x.shape[1]
    hidden = r.shape[-1]
    gates = GATES[spec.op]
    dtype = x.dtype
    lstm = spec.op == "LSTM"

    y = np.zeros((seq, spec.num_directions, batch, hidden), dtype)
    y_h = np.zeros((spec.num_directions, batch, hidden), dtype)
    y_c = np.zeros((spec.num_directions, batch, hidden), dtype) if lstm else None
    lens = None if lens is None else np.asarray(lens).astype(np.int64)
    for d in range(spec.num_directions):
        # 2. The input projection of every time step at once: (seq, batch, G·H).
        proj = np.matmul(x, w[d].T)
        bias_w = bias_r = None
        if b is not None:
            bias_w, bias_r = b[d][: gates * hidden], b[d][gates * hidden :]
            proj += bias_w
            if spec.op != "GRU":
                proj += bias_r
            else:  # the candidate's recurrent bias may sit inside r ⊙ (·)
                proj[..., : 2 * hidden] += bias_r[: 2 * hidden]
        h = np.zeros((batch, hidden), dtype) if h0 is None else h0[d].astype(dtype)
        c = None
        if lstm:
            c = np.zeros((batch, hidden), dtype) if c0 is None else c0[d].astype(dtype)
        peep = None if p is None or not lstm else p[d]
        step = _STEPS[spec.op]
        acts = spec.activations[d]
        order = range(seq - 1, -1, -1) if spec.reverse(d) else range(seq)

        # 3. The loop over time, one step at a time.
        for t in order:
            h_new, c_new = step(spec, proj[t], h, c, r[d], bias_r, peep, acts, hidden)
            if lens is not None:
                # A finished (or not yet started, in reverse) sequence keeps its state.
                active = (t < lens)[:, None]
                h_new = np.where(active, h_new, h)
                y[t, d] = np.where(active, h_new, 0)
                if lstm:
                    c_new = np.where(active, c_new, c)
            else:
                y[t, d] = h_new
            h, c = h_new, c_new
        if lens is not None:
            # An empty sequence (length 0) ends in zero states, as onnxruntime has it.
            h = np.where((lens > 0)[:, None], h, 0)
            c = None if c is None else np.where((lens > 0)[:, None], c, 0)
        y_h[d] = h
        if lstm:
            y_c[d] = c

    # 4. Back to the node's layout.
    if spec.layout == 1:
        y = y.transpose(2, 0, 1, 3)
        y_h = y_h.swapaxes(0, 1)
        y_c = None if y_c is None else y_c.swapaxes(0, 1)
    return (y, y_h, y_c) if lstm else (y, y_h)


def _rnn_step(spec, proj_t, h, c, r, bias_r, peep, acts, hidden):
    """Hₜ = f(Xₜ·Wᵀ + Hₜ₋₁·Rᵀ + Wb + Rb)."""
    return acts[0](_clip(proj_t + h @ r.T, spec.clip)), None


def _gru_step(spec, proj_t, h, c, r, bias_r, peep, acts, hidden):
    """zₜ, rₜ = f(·), hₜ = g(Xₜ·Whᵀ + (rₜ ⊙ Hₜ₋₁)·Rhᵀ + Rbh + Wbh) (or, with
    linear_before_reset, rₜ ⊙ (Hₜ₋₁·Rhᵀ + Rbh)), Hₜ = (1 − zₜ) ⊙ hₜ + zₜ ⊙ Hₜ₋₁."""
    f, g = acts
    two = 2 * hidden
    if spec.linear_before_reset:
        rec = h @ r.T
        if bias_r is not None:
            rec[:, two:] += bias_r[two:]
        zr = f(_clip(proj_t[:, :two] + rec[:, :two], spec.clip))
        z, reset = zr[:, :hidden], zr[:, hidden:]
        cand = g(_clip(proj_t[:, two:] + reset * rec[:, two:], spec.clip))
    else:
        zr = f(_clip(proj_t[:, :two] + h @ r[:two].T, spec.clip))
        z, reset = zr[:, :hidden], zr[:, hidden:]
        pre = proj_t[:, two:] + (reset * h) @ r[two:].T
        if bias_r is not None:
            pre = pre + bias_r[two:]
        cand = g(_clip(pre, spec.clip))
    return cand + z * (h - cand), None


def _lstm_step(spec, proj_t, h, c, r, bias_r, peep, acts, hidden):
    """iₜ, fₜ = f(· + P ⊙ Cₜ₋₁), cₜ = g(·), Cₜ = fₜ ⊙ Cₜ₋₁ + iₜ ⊙ cₜ,
    oₜ = f(· + Po ⊙ Cₜ), Hₜ = oₜ ⊙ h(Cₜ); gate order i, o, f, c."""
    f, g, hact = acts
    pre = proj_t + h @ r.T
    pre_i, pre_o = pre[:, :hidden], pre[:, hidden : 2 * hidden]
    pre_f, pre_c = pre[:, 2 * hidden : 3 * hidden], pre[:, 3 * hidden :]
    if peep is not None:
        pre_i = pre_i + peep[:hidden] * c
        pre_f = pre_f + peep[2 * hidden :] * c
    i = f(_clip(pre_i, spec.clip))
    # input_forget couples the gates: f = 1 − i.
    forget = 1 - i if spec.input_forget else f(_clip(pre_f, spec.clip))
    c_new = forget * c + i * g(_clip(pre_c, spec.clip))
    if peep is not None:
        pre_o = pre_o + peep[hidden : 2 * hidden] * c_new
    o = f(_clip(pre_o, spec.clip))
    return o * hact(c_new), c_new


_STEPS = {"RNN": _rnn_step, "GRU": _gru_step, "LSTM": _lstm_step}


@kernel("RNN", "GRU", "LSTM")
def recurrent(node: KernelNode):
    """The ONNX recurrent ops: every direction, layout, sequence_lens, clip and activation."""
    spec = _Spec(node)

    def run(x, w, r, b=None, lens=None, h0=None, c0=None, p=None):
        return _run(spec, x, w, r, b, lens, h0, c0, p)

    return run
