"""Derivative rules for control flow: If, Loop and Scan.

A subgraph's intermediates live only inside it, so every rule here recomputes the forward
part of the subgraph it differentiates (the only values that exist outside are the node's
outputs), then differentiates that copy with the same rules as the main graph:

- If: the backward is an If on the same condition whose branches each recompute their
  forward branch and return the gradients of every enclosing-scope tensor the node reads
  (zeros where a branch does not depend on one).
- Loop and Scan: the loop is unrolled. With a static trip count (a constant M, a static
  scan axis) the body is copied once per iteration, inline, with its inputs bound to the
  previous iteration's copies, and the reverse pass runs over the copies. This costs one
  more forward pass of the loop (the node's own outputs included) and keeps every
  iteration's values, which any reverse pass needs. We chose it over a reverse Loop
  because it reuses every rule as it is, nested subgraphs included. A trip count known
  only at run time raises UnsupportedOpError.

Gradients reach loop-carried initial values, scan inputs, and the enclosing-scope tensors
a body reads (a weight used in every iteration gets the sum over iterations).
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from onnxgrad.autodiff.builder import (
    graph_gradient,
    inline_graph,
    make_subgraph,
    nodes_gradient,
    subgraph_emitter,
)
from onnxgrad.autodiff.rules import rule
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.importer import FLOAT_TYPES

# TODO: a Loop whose trip count is known only at run time needs a reverse Loop in the
# backward (the forward's per-iteration values kept as scan outputs); not built yet.


def _wanted(b, node) -> tuple[list[str], list[str]]:
    """Every input and outer-scope name in order, and the distinct float ones needing a gradient."""
    sources = node.input + list(node.outer)
    wanted: list[str] = []
    for i, x in enumerate(sources):
        if x and node.needs_grad(i) and b.dtype(x) in FLOAT_TYPES and x not in wanted:
            wanted.append(x)
    return sources, wanted


def _spread(sources: list[str], wanted: list[str], grads: list[str | None]) -> list[str | None]:
    """One gradient per source position; a name read twice gets its total once."""
    by_name = dict(zip(wanted, grads))
    out: list[str | None] = []
    for x in sources:
        out.append(by_name.pop(x, None))
    return out


@rule("If")
def if_(b, node, dys):
    """y = cond ? then() : else()  →  (dx₁ … dxₙ) = cond ? then′(dy) : else′(dy)

    The xᵢ are the enclosing-scope tensors the branches read; each branch′ recomputes its
    branch and returns dxᵢ (zeros where the branch does not depend on xᵢ). cond: none.
    """
    sources, wanted = _wanted(b, node)
    if not wanted:
        return [None] * len(sources)
    branches = {}
    for attr in ("then_branch", "else_branch"):
        sub = subgraph_emitter(b, f"{attr}/")
        grads = graph_gradient(sub, node, node.attrs[attr], {}, dys, wanted)
        outputs = [g if g is not None else sub.zeros_like(x) for g, x in zip(grads, wanted)]
        branches[attr] = make_subgraph(sub, f"{node.name}_grad_{attr}", outputs)
    results = b.op("If", node.input[0], outputs=len(wanted), **branches)
    results = [results] if len(wanted) == 1 else list(results)
    for dx, x in zip(results, wanted):  # the emitter typed them like cond
        b.info.dtypes[dx] = b.dtype(x)
        if b.shape(x) is not None:
            b.info.shapes[dx] = list(b.shape(x))
    return _spread(sources, wanted, results)


def _unsupported(node, detail: str) -> UnsupportedOpError:
    return UnsupportedOpError(node.op_type, node.name, node.opset, node.domain, detail)


def _always_true(body: onnx.GraphProto) -> bool:
    """Whether the body's condition output is its condition input or a constant true."""
    producer: dict[str, onnx.NodeProto] = {}
    for n in body.node:
        for o in n.output:
            producer[o] = n
    inits = {t.name: t for t in body.initializer}
    name = body.output[0].name
    while True:
        if name == body.input[1].name:
            return True
        if name in inits:
            return bool(numpy_helper.to_array(inits[name]).all())
        n = producer.get(name)
        if n is None:
            return False
        if n.op_type == "Identity":
            name = n.input[0]
            continue
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            return bool(numpy_helper.to_array(n.attribute[0].t).all())
        return False


def _trip_count(b, node, body: onnx.GraphProto) -> int:
    """The static number of iterations of a Loop, or UnsupportedOpError."""
    trip_name = node.input[0] if node.input else ""
    cond_name = node.input[1] if len(node.input) > 1 else ""
    todo = "unrolling it needs a static trip count (a constant M) (TODO: a reverse Loop)"
    if cond_name:
        value = b.constant_value(cond_name)
        if value is None:
            raise _unsupported(
                node, f"the condition '{cond_name}' is known only at run time; {todo}"
            )
        if not bool(value.reshape(-1)[0]):
            return 0
    if not trip_name:
        raise _unsupported(node, f"the loop has no trip count M; {todo}")
    value = b.constant_value(trip_name)
    if value is None:
        raise _unsupported(
            node, f"the trip count M '{trip_name}' is known only at run time; {todo}"
        )
    trip = max(int(value.reshape(-1)[0]), 0)
    # The body's condition ends a loop early even without a cond input (onnxruntime).
    if trip and not _always_true(body):
        raise _unsupported(node, f"the body's condition may end the loop early; {todo}")
    return trip


@rule("Loop")
def loop(b, node, dys):
    """(v_final, scans) = loop M times: (cond, v, s) = body(i, cond, v)  →  unrolled:
    vₜ₊₁, sₜ = body(t, true, vₜ), and the reverse pass runs over the copies:
    dv₀ = ∂/∂v₀ Σₜ ⟨dscans[t], sₜ⟩ + ⟨dv_final, v_M⟩, likewise for the outer tensors the body
    reads (summed over iterations). M and cond: none.
    """
    body = node.attrs["body"]
    trip = _trip_count(b, node, body)
    sources, wanted = _wanted(b, node)
    if not wanted:
        return [None] * len(sources)
    n_carried = len(node.input) - 2
    body_in = [i.name for i in body.input]
    body_out = [o.name for o in body.output]

    # 1. The body once per iteration, each reading the previous copy's carried values.
    start = len(b.nodes)
    carried = list(node.input[2:])
    steps = []
    true = b.const(True, dtype=onnx.TensorProto.BOOL)
    for t in range(trip):
        bindings = {body_in[0]: b.ints(t), body_in[1]: true, **dict(zip(body_in[2:], carried))}
        _, names = inline_graph(b, body, bindings, f"iter{t}/")
        outs = [names.get(o, o) for o in body_out]
        carried = outs[1 : 1 + n_carried]
        steps.append(outs[1 + n_carried :])
    forward = list(b.nodes[start:])

    # 2. Seeds: dv_final on the last copies, dscans[t] on iteration t's scan values.
    seeds: dict[str, list[str]] = {}
    for x, dy in zip(carried, dys[:n_carried]):
        if dy is not None:
            seeds.setdefault(x, []).append(dy)
    for k, dy in enumerate(dys[n_carried:]):
        if dy is None:
            continue
        for t in range(trip):
            seeds.setdefault(steps[t][k], []).append(b.Gather(dy, b.ints(t), axis=0))
    return _spread(sources, wanted, nodes_gradient(b, node, forward, seeds, wanted))


def _axis(b, node, axis: int, name: str, extra: int = 0) -> int:
    """`axis` made non-negative against the rank of `name` (plus `extra`)."""
    if axis >= 0:
        return axis
    rank = b.rank(name)
    if rank is None:
        raise _unsupported(
            node, f"the gradient needs the rank of '{name}' for axis {axis}; give it a shape"
        )
    return axis + rank + extra


def _pieces(b, x: str, length: int, axis: int) -> list[str]:
    """`x` cut into `length` slices along `axis`, the axis removed from each."""
    if length == 1:
        return [b.squeeze(x, [axis])]
    if b.opset >= 13:
        parts = b.op("Split", x, b.ints([1] * length), outputs=length, axis=axis)
    else:
        parts = b.op("Split", x, outputs=length, axis=axis, split=[1] * length)
    return [b.squeeze(p, [axis]) for p in parts]


@rule("Scan")
def scan(b, node, dys):
    """(s_final, ys) = scan(s₀, xs)  →  unrolled over the static scan length L:
    sₜ₊₁, yₜ = body(sₜ, x₁[t] … xₘ[t]) with each xⱼ split along its axis (reversed for a
    reverse direction) and ys stacked the same way; the reverse pass runs over the copies,
    so dxⱼ is the concatenation of the slices' gradients and an outer weight's gradient is
    summed over the L steps.
    """
    if node.opset < 9:
        raise _unsupported(node, "Scan before opset 9 (batched, with sequence_lens)")
    body = node.attrs["body"]
    n_scan = int(node.attrs["num_scan_inputs"])
    n_state = len(node.input) - n_scan
    n_out = len(body.output) - n_state
    sources, wanted = _wanted(b, node)
    if not wanted:
        return [None] * len(sources)
    xs = node.input[n_state:]
    in_axes = list(node.attrs.get("scan_input_axes", [0] * n_scan))
    in_back = [bool(d) for d in node.attrs.get("scan_input_directions", [0] * n_scan)]
    out_axes = list(node.attrs.get("scan_output_axes", [0] * n_out))
    out_back = [bool(d) for d in node.attrs.get("scan_output_directions", [0] * n_out)]
    in_axes = [_axis(b, node, a, x) for a, x in zip(in_axes, xs)]
    shape = b.shape(xs[0])
    length = shape[in_axes[0]] if shape is not None and in_axes[0] < len(shape) else None
    if not isinstance(length, int):
        raise _unsupported(
            node,
            f"the scan length (axis {in_axes[0]} of '{xs[0]}') is known only at run time; "
            "unrolling the Scan needs it static (TODO: a reverse Loop)",
        )
    body_in = [i.name for i in body.input]
    body_out = [o.name for o in body.output]

    # 1. The scan inputs cut into steps, then the body once per step.
    start = len(b.nodes)
    slices = []
    for x, axis, back in zip(xs, in_axes, in_back):
        parts = _pieces(b, x, length, axis) if length else []
        slices.append(parts[::-1] if back else parts)  # step t reads position L − 1 − t
    states = list(node.input[:n_state])
    steps = []
    for t in range(length):
        values = states + [parts[t] for parts in slices]
        _, names = inline_graph(b, body, dict(zip(body_in, values)), f"step{t}/")
        outs = [names.get(o, o) for o in body_out]
        states = outs[:n_state]
        steps.append(outs[n_state:])
    forward = list(b.nodes[start:])

    # 2. Seeds: ds_final on the last states, each output step's slice of dys.
    seeds: dict[str, list[str]] = {}
    for s, dy in zip(states, dys[:n_state]):
        if dy is not None:
            seeds.setdefault(s, []).append(dy)
    for k, dy in enumerate(dys[n_state:]):
        if dy is None or not length:
            continue
        y = node.output[n_state + k]
        parts = _pieces(b, dy, length, _axis(b, node, out_axes[k], y))
        if out_back[k]:
            parts = parts[::-1]
        for t in range(length):
            seeds.setdefault(steps[t][k], []).append(parts[t])
    return _spread(sources, wanted, nodes_gradient(b, node, forward, seeds, wanted))
