"""Derivative rules for RNN, GRU and LSTM: backpropagation through time.

The backward of a static sequence length is unrolled, one block of standard ai.onnx nodes
per time step (the fastest form for onnxgrad's executor). A symbolic length (an export with
a dynamic time axis) gets two Scans instead: a forward one that carries the state and stacks
each step's gates and states, then a backward one that walks those stacks the other way,
carries dH (and dC) and stacks the gate pre-activation gradients dAₜ. Both forms emit one
definition of the step math, into the rule's graph once per step or into each Scan body.

Which forward values the backward reads: the rule re-emits the forward recurrence (unrolled
or in the forward Scan) inside the backward graph, and differentiates that. The gates, the
candidate states and the LSTM cell states of the intermediate steps are not outputs of the
node, so they must be computed again in any case; Y could supply the hidden states, but it
is optional (exporters often drop it), it is zero past each sequence's length, and it does
not hold the cell states. Re-emitting the recurrence serves every combination of outputs,
sequence_lens and directions with one code path. Its cost is one matrix product per step
beyond what the backward needs.
TODO: when Y is present and sequence_lens absent, take Hₜ₋₁ from Y and form every gate of
RNN and GRU in one batched product instead of the forward loop.

The products that do not depend on the recurrence are batched over time: the input
projection Xₜ·Wᵀ of the forward, and dX = dA·W, dW = Σₜ dAₜᵀ·Xₜ, dR = Σₜ dAₜᵀ·Hₜ₋₁ and the
bias sums of the backward, where dAₜ are the gradients of the gate pre-activations. Each
step of the backward loop itself costs one product with R (two for GRU with
linear_before_reset = 0).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxgrad.autodiff.builder import (
    make_subgraph,
    subgraph_emitter,
    subgraph_input,
    value_infos,
)
from onnxgrad.autodiff.rules import rule
from onnxgrad.errors import UnsupportedOpError

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}

DEFAULT_ACTIVATIONS = {
    "RNN": ("Tanh",),
    "GRU": ("Sigmoid", "Tanh"),
    "LSTM": ("Sigmoid", "Tanh", "Tanh"),
}

# Per activation name (lower case): defaults of the alpha and beta it takes (none: it takes
# none), those of the ONNX op of the same name.
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


def _error(node, detail: str) -> UnsupportedOpError:
    return UnsupportedOpError(node.op_type, node.name, node.opset, detail=detail)


def _activations(node, directions: int) -> list[list[tuple[str, float, float]]]:
    """Per direction, the (lower-case name, alpha, beta) of each activation.

    alpha and beta values are consumed in order, each only by an activation that takes one
    (ONNX Runtime's reading of the spec), as the kernel does.
    """
    per_direction = len(DEFAULT_ACTIVATIONS[node.op_type])
    names = list(node.attrs.get("activations", DEFAULT_ACTIVATIONS[node.op_type] * directions))
    if len(names) == per_direction and directions == 2:
        names = names * 2
    if len(names) != per_direction * directions:
        raise _error(node, f"activations has {len(names)} names, not {per_direction * directions}")
    alphas = [float(v) for v in node.attrs.get("activation_alpha", [])]
    betas = [float(v) for v in node.attrs.get("activation_beta", [])]
    parsed = []
    for name in names:
        key = name.lower()
        if key not in ACTIVATION_PARAMS:
            raise _error(
                node,
                f"activation '{name}' is unknown; use one of {', '.join(sorted(ACTIVATION_PARAMS))}",
            )
        alpha_default, beta_default = ACTIVATION_PARAMS[key]
        alpha = (alphas.pop(0) if alphas else alpha_default[0]) if alpha_default else 0.0
        beta = (betas.pop(0) if betas else beta_default[0]) if beta_default else 0.0
        parsed.append((key, alpha, beta))
    return [parsed[d * per_direction : (d + 1) * per_direction] for d in range(directions)]


def _act(b, spec: tuple[str, float, float], a: str) -> str:
    """y = f(a) for one recurrent activation."""
    key, alpha, beta = spec
    if key == "tanh":
        return b.Tanh(a)
    if key == "sigmoid":
        return b.Sigmoid(a)
    if key == "relu":
        return b.Relu(a)
    if key == "softsign":
        return b.Softsign(a)
    if key == "softplus":
        return b.Softplus(a)
    if key == "affine":
        return b.Add(b.Mul(a, b.const(alpha, like=a)), b.const(beta, like=a))
    if key == "leakyrelu":
        return b.LeakyRelu(a, alpha=alpha)
    if key == "thresholdedrelu":
        return b.ThresholdedRelu(a, alpha=alpha)
    if key == "scaledtanh":
        return b.Mul(b.Tanh(b.Mul(a, b.const(beta, like=a))), b.const(alpha, like=a))
    if key == "hardsigmoid":
        return b.HardSigmoid(a, alpha=alpha, beta=beta)
    return b.Elu(a, alpha=alpha)  # "elu"; _activations admits no other name


def _act_grad(b, spec: tuple[str, float, float], a: str, y: str, dy: str) -> str:
    """da = dy · f′(a), from the pre-activation a and the activation y = f(a)."""
    key, alpha, beta = spec
    one = b.const(1.0, like=a)
    zero = b.const(0.0, like=a)
    if key == "tanh":
        return b.Mul(dy, b.Sub(one, b.Mul(y, y)))  # 1 − y²
    if key == "sigmoid":
        return b.Mul(dy, b.Mul(y, b.Sub(one, y)))  # y · (1 − y)
    if key == "relu":
        # At a = 0 we take the subgradient 0.
        return b.Where(b.Greater(a, zero), dy, zero)
    if key == "softsign":
        denom = b.Add(one, b.Abs(a))
        return b.Div(dy, b.Mul(denom, denom))  # 1 / (1 + |a|)²
    if key == "softplus":
        return b.Mul(dy, b.Sigmoid(a))
    if key == "affine":
        return b.Mul(dy, b.const(alpha, like=a))
    if key == "leakyrelu":
        # At a = 0 we take the left slope alpha.
        return b.Where(b.Greater(a, zero), dy, b.Mul(dy, b.const(alpha, like=a)))
    if key == "thresholdedrelu":
        # At a = alpha the output jumps; we take 0 there.
        return b.Where(b.Greater(a, b.const(alpha, like=a)), dy, zero)
    if key == "scaledtanh":
        t = b.Tanh(b.Mul(a, b.const(beta, like=a)))  # alpha · beta · (1 − tanh²(beta · a))
        return b.Mul(dy, b.Mul(b.Sub(one, b.Mul(t, t)), b.const(alpha * beta, like=a)))
    if key == "hardsigmoid":
        # At the two corners (y = 0 or y = 1) we take the flat side's 0.
        inside = b.And(b.Greater(y, zero), b.Less(y, one))
        return b.Where(inside, b.Mul(dy, b.const(alpha, like=a)), zero)
    # "elu": y + alpha = alpha · eᵃ on the left; at a = 0 we take that left slope alpha.
    return b.Where(b.Greater(a, zero), dy, b.Mul(dy, b.Add(y, b.const(alpha, like=a))))


class _Direction:
    """The forward and the backward of one direction of one recurrent node.

    The step math (`forward_step`, `backward_step`, and `forward_carry`, `backward_carry`
    that add the sequence_lens masking) takes the emitter it writes to: the unrolled path
    emits it once per time step into the rule's graph, the Scan path once into each Scan
    body. Both read the weights that `run` prepares from the enclosing scope.
    """

    def __init__(self, b, node, cfg: dict, d: int):
        self.b = b
        self.node = node
        self.op = node.op_type
        self.cfg = cfg
        self.d = d
        self.acts = cfg["activations"][d]
        self.hidden = cfg["hidden"]
        self.dtype = cfg["dtype"]

    # Small helpers.

    def take(self, x: str, i: int, axis: int) -> str:
        """x[i] along `axis`, the axis removed."""
        return self.b.Gather(x, self.b.ints(i), axis=axis)

    def clip(self, b, a: str) -> str:
        """The pre-activation clipped to [−clip, clip] (no-op without clip)."""
        bound = self.cfg["clip"]
        if bound is None:
            return a
        lo, hi = b.const(-bound, like=a), b.const(bound, like=a)
        if b.opset >= 11:
            return b.Clip(a, lo, hi)
        return b.Clip(a, min=-bound, max=bound)

    def unclip(self, b, a: str, da: str) -> str:
        """d(clip(a)) → da: the gradient passes strictly inside the bounds only."""
        bound = self.cfg["clip"]
        if bound is None:
            return da
        # At a = ±clip we take the subgradient 0, as the Clip rule does.
        inside = b.Less(b.Abs(a), b.const(bound, like=a))
        return b.Where(inside, da, b.const(0.0, like=a))

    def gate(self, b, k: int, a: str) -> str:
        return _act(b, self.acts[k], self.clip(b, a))

    def gate_grad(self, b, k: int, a: str, y: str, dy: str) -> str:
        return self.unclip(b, a, _act_grad(b, self.acts[k], self.clip(b, a), y, dy))

    # The whole direction.

    def run(self, x: str, x2d: str, dys: dict) -> dict:
        """Forward recurrence, then its backward; returns this direction's gradients."""
        b, cfg, d, hidden = self.b, self.cfg, self.d, self.hidden
        op, gates = self.op, GATES[self.op]
        inputs = cfg["inputs"]

        # 1. Weights of this direction; biases folded into the input projection where they
        # only add (all but the GRU candidate's recurrent bias under linear_before_reset).
        w = self.take(inputs["W"], d, 0)  # (G·H, I)
        self.r = self.take(inputs["R"], d, 0)  # (G·H, H)
        proj = b.MatMul(x, b.Transpose(w, perm=[1, 0]))  # (T, batch, G·H)
        self.rb_h = None
        if inputs["B"]:
            wb, rb = b.split(self.take(inputs["B"], d, 0), [gates * hidden] * 2, 0)
            if op == "GRU" and cfg["linear_before_reset"]:
                rb_zr, self.rb_h = b.split(rb, [2 * hidden, hidden], 0)
                zeros_h = b.const(np.zeros(hidden), like=rb)
                rb = b.Concat(rb_zr, zeros_h, axis=0)
            proj = b.Add(proj, b.Add(wb, rb))
        self.peep = None
        if inputs["P"]:
            self.peep = b.split(self.take(inputs["P"], d, 0), [hidden] * 3, 0)  # i, o, f
        if op == "GRU" and not cfg["linear_before_reset"]:
            r_zr, self.r_h = b.split(self.r, [2 * hidden, hidden], 0)
            self.r_zr_t = b.Transpose(r_zr, perm=[1, 0])
            self.r_h_t = b.Transpose(self.r_h, perm=[1, 0])
            self.r_zr = r_zr
        else:
            self.r_t = b.Transpose(self.r, perm=[1, 0])

        # 2. Where the forward starts (H₀, C₀) and where the backward does (dH, dC at the end).
        h = self.take(cfg["h0"], d, 0) if cfg["h0"] else cfg["zeros"]
        c = None
        if op == "LSTM":
            c = self.take(cfg["c0"], d, 0) if cfg["c0"] else cfg["zeros"]
        dh = dys["Y_h"][d] if dys["Y_h"] else cfg["zeros"]
        dc = (dys["Y_c"][d] if dys["Y_c"] else cfg["zeros"]) if op == "LSTM" else None
        if cfg["lens"] and (dys["Y_h"] or dys["Y_c"]):
            # Y_h and Y_c of an empty sequence are 0, whatever the state: no gradient there.
            nonempty = b.Cast(b.Greater(cfg["lens"], b.ints(0)), to=self.dtype)
            dh = b.Mul(dh, nonempty) if dys["Y_h"] else dh
            dc = b.Mul(dc, nonempty) if dys["Y_c"] and dc is not None else dc
        dy_d = self.take(dys["Y"], d, 1) if dys["Y"] else None  # (T, batch, H)

        # 3. The recurrence and its backward: unrolled over a static length, two Scans over
        # a symbolic one. Either gives its per-step values in time order; `join` turns them
        # into one (T·batch, ·) tensor.
        if isinstance(cfg["seq"], int):
            steps = self.unrolled(proj, h, c, dh, dc, dy_d)

            def join(parts: list[str]) -> str:
                return b.Concat(*parts, axis=0)

        else:
            steps = self.scanned(proj, h, c, dh, dc, dy_d)

            def join(stack: str) -> str:
                return b.Flatten(stack, axis=2)

        # 4. The products batched over time.
        out = {"dh0": steps["dh"], "dc0": steps["dc"]}
        dproj2d = join(steps["dproj"])  # (T·batch, G·H)
        need = cfg["need"]
        if need["X"]:
            out["dX"] = b.MatMul(dproj2d, w)  # dX = dA · W, (T·batch, I)
        if need["W"]:
            out["dW"] = b.Gemm(dproj2d, x2d, transA=1)  # dW = Σₜ dAₜᵀ · Xₜ
        rec = [(join(grads), ins) for grads, ins in steps["rec"]] if need["B"] or need["R"] else []
        if need["B"]:
            dwb = b.reduce_sum(dproj2d, [0], keepdims=0)
            drb = [b.reduce_sum(grads, [0], keepdims=0) for grads, _ in rec]
            out["dB"] = b.Concat(dwb, *drb, axis=0)
        if need["R"]:
            # dR = Σₜ dAₜᵀ · (what R multiplies at step t), one product per block of rows.
            blocks = [b.Gemm(grads, join(ins), transA=1) for grads, ins in rec]
            out["dR"] = blocks[0] if len(blocks) == 1 else b.Concat(*blocks, axis=0)
        if need["P"] and self.peep:
            zeros = b.const(np.zeros(hidden), like=inputs["P"])
            sums = [
                b.reduce_sum(join(steps["peep"][k]), [0], keepdims=0) if steps["peep"][k] else zeros
                for k in "iof"
            ]
            out["dP"] = b.Concat(*sums, axis=0)
        return out

    # Steps 2 and 3 of `run`, two ways.

    def unrolled(self, proj: str, h: str, c, dh: str, dc, dy_d) -> dict:
        """The recurrence and its backward with one block of nodes per step (static length).

        Returns per-step lists in time order: dproj (dAₜ), rec (per block of R's rows, the
        gradients of its products and what R multiplied), peep (the peephole products), and
        the gradients dh, dc of the initial states.
        """
        b, cfg = self.b, self.cfg
        seq = cfg["seq"]
        order = list(range(seq - 1, -1, -1)) if cfg["reverse"][self.d] else list(range(seq))
        saved = {}
        for t in order:
            keep = mask = None
            if cfg["lens"]:
                keep = b.Less(b.ints(t), cfg["lens"])  # (batch, 1) bool
                mask = b.Cast(keep, to=self.dtype)
            s, h, c = self.forward_carry(b, self.take(proj, t, 0), h, c, keep)
            saved[t] = (s, mask)
        dproj, rec, peep = {}, [], {"i": [], "o": [], "f": []}
        for t in reversed(order):
            s, mask = saved[t]
            dy_t = self.take(dy_d, t, 0) if dy_d else None
            dproj[t], dh, dc = self.backward_carry(b, s, dh, dc, dy_t, mask, rec, peep)
        return {
            "dproj": [dproj[t] for t in range(seq)],
            "rec": rec,
            "peep": peep,
            "dh": dh,
            "dc": dc,
        }

    def scanned(self, proj: str, h0: str, c0, dh0: str, dc0, dy_d) -> dict:
        """The recurrence and its backward as two Scans (a length known only at run time).

        The forward Scan carries H (and C) and stacks, per step, the values the backward
        step reads; the backward Scan walks the other way through those stacks carrying dH
        (and dC), and stacks dAₜ with what the batched products need. Both stack in time
        order (a Scan in reverse writes its outputs from the end), so this returns what
        `unrolled` does with each per-step list replaced by one (T, batch, ·) stack.
        """
        b, cfg, d, dtype = self.b, self.cfg, self.d, self.dtype
        lstm = c0 is not None
        back = int(cfg["reverse"][d])
        prefix = f"{self.node.name}_grad_d{d}"

        def step_input(e, label: str, elem: int = dtype) -> str:  # (batch, ·) per step
            return subgraph_input(e, label, elem, [None, None])

        # 1. The forward body: (H, C; Aₓ[t], keep[t]) → (H′, C′; the step's values).
        fb = subgraph_emitter(b, f"d{d}_forward/")
        f_states = [step_input(fb, "h")] + ([step_input(fb, "c")] if lstm else [])
        f_scans = [step_input(fb, "proj")]
        if cfg["lens"]:
            f_scans.append(step_input(fb, "keep", TensorProto.BOOL))
        h, c = f_states[0], f_states[1] if lstm else None
        keep = f_scans[1] if cfg["lens"] else None
        s, h_next, c_next = self.forward_carry(fb, f_scans[0], h, c, keep)
        saved = {k: v for k, v in s.items() if v is not None}

        # 2. The backward body: (dH, dC; saved[t], mask[t], dY[t]) → (dH′, dC′; dAₜ, ...).
        bb = subgraph_emitter(b, f"d{d}_backward/")
        b_states = [step_input(bb, "dh")] + ([step_input(bb, "dc")] if lstm else [])
        s_in = {k: step_input(bb, k) for k in saved}
        extra = []
        if cfg["lens"]:
            extra.append((step_input(bb, "mask"), cfg["mask"]))
        if dy_d:
            extra.append((step_input(bb, "dy"), dy_d))
        mask = extra[0][0] if cfg["lens"] else None
        dy_t = extra[-1][0] if dy_d else None
        rec, peep = [], {"i": [], "o": [], "f": []}
        dc_in = b_states[1] if lstm else None
        dproj, dh, dc = self.backward_carry(bb, s_in, b_states[0], dc_in, dy_t, mask, rec, peep)

        # 3. Its outputs: dAₜ; per block of R's rows, the gradient and (unless it is a saved
        # value already stacked by the forward Scan) what R multiplied; peephole products.
        key_of = {name: k for k, name in s_in.items()}
        scans, rec_ins = [dproj], []
        for grads, ins in rec:
            scans.append(grads[0])
            rec_ins.append(key_of.get(ins[0]))
        for grads, ins in rec:
            if ins[0] not in key_of:
                scans.append(ins[0])
        peep_keys = [k for k in "iof" if peep[k]]
        scans += [peep[k][0] for k in peep_keys]
        states_out = [dh, dc] if lstm else [dh]
        backward = make_subgraph(bb, f"{prefix}_backward", states_out + scans)

        # 4. Only the saved values the backward reads travel between the two Scans.
        reads = {i for n in backward.node for i in n.input}
        used = [k for k in saved if s_in[k] in reads or k in rec_ins]
        names = b_states + [s_in[k] for k in used] + [name for name, _ in extra]
        backward.input.extend(value_infos(bb, names))
        states_next = [h_next, c_next] if lstm else [h_next]
        outputs = states_next + [saved[k] for k in used]
        forward = make_subgraph(fb, f"{prefix}_forward", outputs, inputs=f_states + f_scans)

        # 5. The two Scans, the backward one in the other direction.
        xs = [proj, cfg["keep"]] if cfg["lens"] else [proj]
        outs = self.scan(forward, [h0, c0] if lstm else [h0], xs, back, len(used))
        stacks = dict(zip(used, outs[len(f_states) :]))
        xs = [stacks[k] for k in used] + [outer for _, outer in extra]
        outs = self.scan(backward, [dh0, dc0] if lstm else [dh0], xs, 1 - back, len(scans))
        stacked = iter(outs[len(b_states) :])
        dproj_all = next(stacked)
        grads = [next(stacked) for _ in rec]
        ins = [stacks[k] if k is not None else next(stacked) for k in rec_ins]
        return {
            "dproj": dproj_all,
            "rec": list(zip(grads, ins)),
            "peep": {k: next(stacked) if k in peep_keys else None for k in "iof"},
            "dh": outs[0],
            "dc": outs[1] if lstm else None,
        }

    def scan(self, body, states: list[str], xs: list[str], back: int, n_scans: int) -> list[str]:
        """A Scan of `body` over `xs` along axis 0, in reverse when `back`, its scan outputs
        stacked in the same direction (so in the order of the inputs)."""
        b = self.b
        outs = b.op(
            "Scan",
            *states,
            *xs,
            outputs=len(states) + n_scans,
            body=body,
            num_scan_inputs=len(xs),
            scan_input_directions=[back] * len(xs),
            scan_output_directions=[back] * n_scans,
        )
        for out in outs:  # the emitter typed only the first
            b.info.dtypes[out] = self.dtype
        return list(outs)

    # One step, into any emitter.

    def forward_carry(self, b, xp: str, h: str, c, keep) -> tuple[dict, str, str | None]:
        """One forward step and the state it hands on (H, C as they were where keep is false,
        past a sequence's length); returns the step's values, then the next H and C."""
        s = self.forward_step(b, xp, h, c)
        s["h"], s["c"] = h, c
        if keep is None:
            return s, s["h_new"], s.get("c_new")
        h_next = b.Where(keep, s["h_new"], h)
        c_next = b.Where(keep, s["c_new"], c) if c is not None else None
        return s, h_next, c_next

    def backward_carry(self, b, s: dict, dh: str, dc, dy_t, mask, rec: list, peep: dict):
        """One backward step, sequence_lens masking included: dAₜ, dHₜ₋₁ and dCₜ₋₁.

        dh, dc: the gradients of the state the step hands on; dy_t: that of Yₜ (or None).
        Where mask is 0, Yₜ = 0 and the state passes unchanged: the step receives nothing,
        and dH, dC pass through.
        """
        g = b.Add(dh, dy_t) if dy_t else dh
        dc_new = dc
        pass_h = pass_c = None
        if mask is not None:
            g = b.Mul(g, mask)
            pass_h = b.Sub(dh, b.Mul(dh, mask))
            if dc is not None:
                dc_new = b.Mul(dc, mask)
                pass_c = b.Sub(dc, dc_new)
        grads = self.backward_step(b, s, g, dc_new, rec, peep)
        dh, dc = grads["dh"], grads.get("dc")
        if pass_h is not None:
            dh = b.Add(dh, pass_h)
        if pass_c is not None:
            dc = b.Add(dc, pass_c)
        return grads["dproj"], dh, dc

    def forward_step(self, b, xp: str, h: str, c: str | None) -> dict:
        """One step of the forward; returns every value the backward step reads."""
        op, hidden = self.op, self.hidden
        if op == "RNN":
            a = b.Add(xp, b.MatMul(h, self.r_t))
            return {"a": a, "h_new": self.gate(b, 0, a)}
        if op == "GRU":
            x_zr, x_h = b.split(xp, [2 * hidden, hidden], 1)
            s = {}
            if self.cfg["linear_before_reset"]:
                rec_zr, rec_h = b.split(b.MatMul(h, self.r_t), [2 * hidden, hidden], 1)
                s["q"] = b.Add(rec_h, self.rb_h) if self.rb_h else rec_h  # Hₜ₋₁·Rhᵀ + Rbh
            else:
                rec_zr = b.MatMul(h, self.r_zr_t)
            s["a_zr"] = b.Add(x_zr, rec_zr)
            s["zr"] = self.gate(b, 0, s["a_zr"])
            z, reset = b.split(s["zr"], [hidden, hidden], 1)
            s["z"], s["r"] = z, reset
            if self.cfg["linear_before_reset"]:
                s["a_h"] = b.Add(x_h, b.Mul(reset, s["q"]))
            else:
                s["rh"] = b.Mul(reset, h)
                s["a_h"] = b.Add(x_h, b.MatMul(s["rh"], self.r_h_t))
            s["cand"] = self.gate(b, 1, s["a_h"])
            s["h_new"] = b.Add(s["cand"], b.Mul(z, b.Sub(h, s["cand"])))
            return s

        # LSTM, gate order i, o, f, c.
        a_i, a_o, a_f, a_c = b.split(b.Add(xp, b.MatMul(h, self.r_t)), [hidden] * 4, 1)
        if self.peep:
            a_i = b.Add(a_i, b.Mul(self.peep[0], c))
            a_f = b.Add(a_f, b.Mul(self.peep[2], c))
        s = {"a_i": a_i, "a_f": a_f, "a_c": a_c}
        s["i"] = self.gate(b, 0, a_i)
        if self.cfg["input_forget"]:
            s["f"] = b.Sub(b.const(1.0, like=a_i), s["i"])  # coupled gates: f = 1 − i
        else:
            s["f"] = self.gate(b, 0, a_f)
        s["cand"] = self.gate(b, 1, a_c)
        s["c_new"] = b.Add(b.Mul(s["f"], c), b.Mul(s["i"], s["cand"]))
        if self.peep:
            a_o = b.Add(a_o, b.Mul(self.peep[1], s["c_new"]))
        s["a_o"] = a_o
        s["o"] = self.gate(b, 0, a_o)
        # clip bounds the gates' pre-activations, not Cₜ: h(Cₜ) reads the cell state as it
        # is, as onnxruntime (and onnxgrad's kernel) compute it.
        s["hc"] = _act(b, self.acts[2], s["c_new"])
        s["h_new"] = b.Mul(s["o"], s["hc"])
        return s

    def backward_step(self, b, s: dict, dh_new: str, dc_new, rec: list, peep: dict) -> dict:
        """One step of the backward: from dH_new (and dC_new) to dHₜ₋₁, dCₜ₋₁ and dAₜ.

        Appends to `rec` (per block of R's rows: the gradients of that block's products and
        the tensors R multiplied) and to `peep` (the peephole products to sum).
        """
        op = self.op
        h = s["h"]

        def record(k: int, grad: str, rec_in: str) -> None:
            while len(rec) <= k:
                rec.append(([], []))
            rec[k][0].append(grad)
            rec[k][1].append(rec_in)

        if op == "RNN":
            da = self.gate_grad(b, 0, s["a"], s["h_new"], dh_new)
            record(0, da, h)
            return {"dproj": da, "dh": b.MatMul(da, self.r)}  # dHₜ₋₁ = dA · R

        if op == "GRU":
            # H_new = cand + z ⊙ (H − cand)
            dz = b.Mul(dh_new, b.Sub(h, s["cand"]))
            d_cand = b.Sub(dh_new, b.Mul(dh_new, s["z"]))
            dh = b.Mul(dh_new, s["z"])
            da_h = self.gate_grad(b, 1, s["a_h"], s["cand"], d_cand)
            if self.cfg["linear_before_reset"]:
                # a_h = x_h + r ⊙ q,  q = H·Rhᵀ + Rbh
                dr = b.Mul(da_h, s["q"])
                dq = b.Mul(da_h, s["r"])
                da_zr = self.gate_grad(b, 0, s["a_zr"], s["zr"], b.Concat(dz, dr, axis=1))
                drec = b.Concat(da_zr, dq, axis=1)
                record(0, drec, h)
                dh = b.Add(dh, b.MatMul(drec, self.r))
            else:
                # a_h = x_h + (r ⊙ H)·Rhᵀ
                drh = b.MatMul(da_h, self.r_h)
                dr = b.Mul(drh, h)
                dh = b.Add(dh, b.Mul(drh, s["r"]))
                da_zr = self.gate_grad(b, 0, s["a_zr"], s["zr"], b.Concat(dz, dr, axis=1))
                record(0, da_zr, h)
                record(1, da_h, s["rh"])
                dh = b.Add(dh, b.MatMul(da_zr, self.r_zr))
            return {"dproj": b.Concat(da_zr, da_h, axis=1), "dh": dh}

        # LSTM: H_new = o ⊙ h(C_new), C_new = f ⊙ C + i ⊙ cand.
        c = s["c"]
        da_o = self.gate_grad(b, 0, s["a_o"], s["o"], b.Mul(dh_new, s["hc"]))
        dc = _act_grad(b, self.acts[2], s["c_new"], s["hc"], b.Mul(dh_new, s["o"]))
        dc = b.Add(dc, dc_new)
        if self.peep:
            dc = b.Add(dc, b.Mul(da_o, self.peep[1]))
            peep["o"].append(b.Mul(da_o, s["c_new"]))
        di = b.Mul(dc, s["cand"])
        d_cand = b.Mul(dc, s["i"])
        d_prev = b.Mul(dc, s["f"])
        df = b.Mul(dc, c)
        if self.cfg["input_forget"]:
            di = b.Sub(di, df)  # f = 1 − i: df flows to i with a minus sign
            da_f = self.cfg["zeros"]
        else:
            da_f = self.gate_grad(b, 0, s["a_f"], s["f"], df)
        da_i = self.gate_grad(b, 0, s["a_i"], s["i"], di)
        da_c = self.gate_grad(b, 1, s["a_c"], s["cand"], d_cand)
        if self.peep:
            d_prev = b.Add(d_prev, b.Mul(da_i, self.peep[0]))
            peep["i"].append(b.Mul(da_i, c))
            if not self.cfg["input_forget"]:
                d_prev = b.Add(d_prev, b.Mul(da_f, self.peep[2]))
                peep["f"].append(b.Mul(da_f, c))
        da = b.Concat(da_i, da_o, da_f, da_c, axis=1)
        record(0, da, h)
        return {"dproj": da, "dh": b.MatMul(da, self.r), "dc": d_prev}


def _stack(b, parts: list[str]) -> str:
    """Concatenate per-direction tensors along a new leading axis."""
    parts = [b.unsqueeze(p, [0]) for p in parts]
    return parts[0] if len(parts) == 1 else b.Concat(*parts, axis=0)


@rule("RNN", "GRU", "LSTM")
def recurrent(b, node, dys):
    """Backpropagation through time: unrolled over a static sequence length, two Scans over a
    symbolic one.

    Per step, with pre-activations Aₜ = Xₜ·Wᵀ + Hₜ₋₁·Rᵀ + Wb + Rb and dAₜ their gradients:
    RNN   Hₜ = f(Aₜ)  →  dAₜ = dHₜ · f′,  dHₜ₋₁ = dAₜ · R
    GRU   Hₜ = h̃ + z ⊙ (Hₜ₋₁ − h̃)  →  dz = dHₜ ⊙ (Hₜ₋₁ − h̃),  dh̃ = dHₜ ⊙ (1 − z),
          dHₜ₋₁ = dHₜ ⊙ z + (paths through r and R)
    LSTM  Cₜ = f ⊙ Cₜ₋₁ + i ⊙ c̃,  Hₜ = o ⊙ h(Cₜ)  →  dCₜ += dHₜ ⊙ o ⊙ h′(Cₜ),
          di = dCₜ ⊙ c̃,  df = dCₜ ⊙ Cₜ₋₁,  dc̃ = dCₜ ⊙ i,  dCₜ₋₁ = dCₜ ⊙ f (+ peepholes)
    then, batched over time  →  dX = dA · W,  dW = Σₜ dAₜᵀ · Xₜ,  dR = Σₜ dAₜᵀ · Hₜ₋₁,
    dB = [Σ dA_W, Σ dA_R],  dinitial_h = dH₀,  dinitial_c = dC₀,  dP = Σ dA ⊙ C.

    Past a sequence's length (sequence_lens) the state is carried unchanged and Y is 0, so
    there dHₜ₋₁ = dHₜ and the step receives nothing. sequence_lens gets no gradient. Clip:
    the gradient passes strictly inside [−clip, clip]. Gate activations, candidates and cell
    states are recomputed by re-emitting the forward recurrence (see the module docstring).
    """
    # 1. Attributes, and whether the sequence length is static (unrolled) or not (Scans).
    op = node.op_type
    attrs = node.attrs
    names = list(node.input) + [""] * (8 - len(node.input))
    x = names[0]
    layout = int(attrs.get("layout", 0))
    direction = attrs.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _error(node, f"direction '{direction}'; use forward, reverse or bidirectional")
    directions = 2 if direction == "bidirectional" else 1
    x_shape = b.shape(x)
    seq = None if x_shape is None or len(x_shape) != 3 else x_shape[1 if layout else 0]
    if not isinstance(seq, int) and (b.opset < 9 or (names[4] and b.opset < 11)):
        raise _error(
            node,
            f"the sequence length of '{x}' is symbolic ({x_shape}); its backward needs Scan "
            f"(opset 9) and, with sequence_lens, Range (opset 11), not opset {b.opset}; "
            "convert the model to a newer opset or fix that dimension",
        )
    hidden = attrs.get("hidden_size")
    if hidden is None:
        r_shape = b.shape(names[2])
        hidden = r_shape[-1] if r_shape and isinstance(r_shape[-1], int) else None
    if hidden is None:
        raise _error(node, "hidden_size is absent and R's shape is unknown; set hidden_size")
    hidden = int(hidden)

    # 2. Everything in layout 0: (T, batch, ·) inputs, (T, D, batch, H) for Y.
    xc = b.Transpose(x, perm=[1, 0, 2]) if layout else x
    x2d = b.Flatten(xc, axis=2)  # (T·batch, I)
    shape = b.Shape(xc)
    lstm = op == "LSTM"
    dtype = b.dtype(x)

    def states(name: str) -> str | None:
        if not name:
            return None
        return b.Transpose(name, perm=[1, 0, 2]) if layout else name

    def state_grad(i: int) -> str | None:
        if i >= len(dys) or dys[i] is None:
            return None
        return b.Transpose(dys[i], perm=[1, 0, 2]) if layout else dys[i]

    dy = dys[0] if dys else None
    if dy is not None and layout:
        dy = b.Transpose(dy, perm=[1, 2, 0, 3])
    dh_all, dc_all = state_grad(1), state_grad(2) if lstm else None
    batch_dim = b.Slice(shape, b.ints([1]), b.ints([2]))
    zero = numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(dtype)))
    zeros = b.ConstantOfShape(b.Concat(batch_dim, b.ints([hidden]), axis=0), value=zero)
    lens = keep = mask = None
    if names[4]:
        lens = b.unsqueeze(b.Cast(names[4], to=TensorProto.INT64), [1])  # (batch, 1) int64
        if not isinstance(seq, int):
            # The Scans read keep[t] = t < sequence_lens and its 0/1 mask, (T, batch, 1).
            length = b.Gather(shape, b.ints(0), axis=0)
            times = b.unsqueeze(b.Range(b.ints(0), length, b.ints(1)), [1, 2])  # (T, 1, 1)
            keep = b.Less(times, lens)
            mask = b.Cast(keep, to=dtype)

    cfg = {
        "seq": seq,
        "dtype": dtype,
        "hidden": hidden,
        "clip": float(attrs["clip"]) if attrs.get("clip") is not None else None,
        "linear_before_reset": int(attrs.get("linear_before_reset", 0)),
        "input_forget": int(attrs.get("input_forget", 0)),
        "activations": _activations(node, directions),
        "reverse": [direction == "reverse" or d == 1 for d in range(directions)],
        "inputs": {"W": names[1], "R": names[2], "B": names[3], "P": names[7] if lstm else ""},
        "h0": states(names[5]),
        "c0": states(names[6]) if lstm else None,
        "lens": lens,
        "keep": keep,
        "mask": mask,
        "zeros": zeros,
        "need": {
            "X": node.needs_grad(0),
            "W": node.needs_grad(1),
            "R": node.needs_grad(2),
            "B": node.needs_grad(3),
            "P": lstm and node.needs_grad(7),
        },
    }
    split_dys = {"Y": dy, "Y_h": None, "Y_c": None}
    if dh_all:
        split_dys["Y_h"] = [b.Gather(dh_all, b.ints(d), axis=0) for d in range(directions)]
    if dc_all:
        split_dys["Y_c"] = [b.Gather(dc_all, b.ints(d), axis=0) for d in range(directions)]

    # 3. Each direction on its own; their gradients meet at X.
    results = [_Direction(b, node, cfg, d).run(xc, x2d, split_dys) for d in range(directions)]

    # 4. Back to the inputs' shapes and layout.
    grads: list[str | None] = [None] * len(node.input)
    if cfg["need"]["X"]:
        dx = results[0]["dX"] if directions == 1 else b.Add(*[r["dX"] for r in results])
        dx = b.Reshape(dx, shape)
        grads[0] = b.Transpose(dx, perm=[1, 0, 2]) if layout else dx
    for i, key in ((1, "dW"), (2, "dR"), (3, "dB"), (7, "dP")):
        if i < len(node.input) and node.needs_grad(i) and key in results[0]:
            grads[i] = _stack(b, [r[key] for r in results])
    for i, key in ((5, "dh0"), (6, "dc0")):
        if i < len(node.input) and node.needs_grad(i) and results[0][key] is not None:
            stacked = _stack(b, [r[key] for r in results])
            grads[i] = b.Transpose(stacked, perm=[1, 0, 2]) if layout else stacked
    return grads
