"""Derivative rules for control flow: If, Loop and Scan.

A subgraph's intermediates live only inside it, so every rule here recomputes the forward
part of the subgraph it differentiates (the only values that exist outside are the node's
outputs), then differentiates that copy with the same rules as the main graph:

- If: the backward is an If on the same condition whose branches each recompute their
  forward branch and return the gradients of every enclosing-scope tensor the node reads
  (zeros where a branch does not depend on one).
- Loop and Scan with a static trip count (a constant M and a condition that stays true, a
  static scan axis): the loop is unrolled. The body is copied once per iteration, inline,
  with its inputs bound to the previous iteration's copies, and the reverse pass runs over
  the copies. This costs one more forward pass of the loop (the node's own outputs
  included) and keeps every iteration's values, which any reverse pass needs.
- Loop and Scan whose number of steps only the run decides (M computed, a condition the
  body recomputes, a symbolic scan axis): a reverse Loop. The forward runs again as a copy
  of the node that also stacks, as scan outputs, the carried values entering each step;
  their length is the number of steps n. A Loop of n steps then walks t = n − 1 … 0: its
  body recomputes step t from the stacked values, differentiates it, and carries the
  carried values' gradients back one step and the outer tensors' gradients summed so far.

Both reuse every rule as it is, nested subgraphs included.

Gradients reach loop-carried initial values, scan inputs, and the enclosing-scope tensors
a body reads (a weight used in every iteration gets the sum over iterations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import onnx
from onnx import numpy_helper

from onnxgrad.autodiff.builder import (
    graph_gradient,
    inline_graph,
    make_subgraph,
    nodes_gradient,
    scope_reads,
    subgraph_emitter,
    subgraph_input,
)
from onnxgrad.autodiff.emitter import GraphInfo
from onnxgrad.autodiff.rules import rule
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.importer import FLOAT_TYPES, tensor_array

INT64, BOOL = onnx.TensorProto.INT64, onnx.TensorProto.BOOL


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
            return bool(tensor_array(inits[name]).all())
        n = producer.get(name)
        if n is None:
            return False
        if n.op_type == "Identity":
            name = n.input[0]
            continue
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            return bool(numpy_helper.to_array(n.attribute[0].t).all())
        return False


def _trip_count(b, node, body: onnx.GraphProto) -> int | None:
    """The static number of iterations of a Loop, or None where only the run decides it."""
    trip_name = node.input[0] if node.input else ""
    cond_name = node.input[1] if len(node.input) > 1 else ""
    if cond_name:
        value = b.constant_value(cond_name)
        if value is None:
            return None
        if not bool(value.reshape(-1)[0]):
            return 0
    if not trip_name:
        return None
    value = b.constant_value(trip_name)
    if value is None:
        return None
    trip = max(int(value.reshape(-1)[0]), 0)
    # The body's condition ends a loop early even without a cond input (onnxruntime).
    if trip and not _always_true(body):
        return None
    return trip


@rule("Loop")
def loop(b, node, dys):
    """(v_final, scans) = loop: (cond, v, s) = body(i, cond, v)
    →  vₜ₊₁, sₜ = body(t, true, vₜ) for the n steps run, and
    dv₀ = ∂/∂v₀ (Σₜ ⟨dscans[t], sₜ⟩ + ⟨dv_final, vₙ⟩),
    likewise for the outer tensors the body reads (summed over steps).
    A static n unrolls the steps; otherwise a reverse Loop runs
    dvₜ = ∂/∂vₜ (⟨dvₜ₊₁, vₜ₊₁⟩ + ⟨dscans[t], sₜ⟩)
    for t = n − 1 … 0 from dvₙ = dv_final.
    M, cond and integer carried values: none.
    """
    body = node.attrs["body"]
    sources, wanted = _wanted(b, node)
    if not wanted:
        return [None] * len(sources)
    trip = _trip_count(b, node, body)
    if trip is None:
        return _spread(sources, wanted, _reverse_loop(b, node, body, dys, wanted))
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
    return [b.squeeze(p, [axis]) for p in b.split(x, [1] * length, axis)]


@rule("Scan")
def scan(b, node, dys):
    """(s_final, ys) = scan(s₀, xs)
    →  sₜ₊₁, yₜ = body(sₜ, x₁[t] … xₘ[t]) for t < L, with each xⱼ sliced along
    its axis (from the end for a reverse direction) and ys stacked the same way; dxⱼ is
    the stack of the slices' gradients and an outer weight's gradient is summed over the
    L steps. A static L unrolls the steps; otherwise a reverse Loop runs
    them backward, as for Loop.
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
        axes = (in_axes, in_back, out_axes, out_back)
        return _spread(sources, wanted, _reverse_scan(b, node, body, dys, wanted, axes))
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


# The reverse Loop, for a Loop or Scan whose number of steps only the run decides.


@dataclass(frozen=True)
class _Steps:
    """A Loop or Scan node seen as a recurrence over its carried values.

    Attributes:
        node: the forward node.
        body: its body.
        state_in: the body inputs of the carried values.
        state_out: the body outputs of their next values.
        scan_out: the body outputs stacked over the steps.
        inits: the node inputs the carried values start from.
        finals: the node outputs of their last values ("" where not named).
        first: the position of inits[0] among the node's inputs (2 for a Loop).
        offset: the position of state_out[0] among the body's outputs (1 for a Loop).
    """

    node: object
    body: onnx.GraphProto
    state_in: list[str]
    state_out: list[str]
    scan_out: list[str]
    inits: list[str]
    finals: list[str]
    first: int
    offset: int

    @classmethod
    def of(cls, node) -> _Steps:
        """The recurrence of a Loop (inputs M, cond, then the carried values; body outputs
        cond, then their next values) or a Scan (the carried values first everywhere)."""
        body = node.attrs["body"]
        loop = node.op_type == "Loop"
        first, offset = (2, 1) if loop else (0, 0)
        n = len(node.input) - 2 if loop else len(node.input) - int(node.attrs["num_scan_inputs"])
        body_in = [i.name for i in body.input]
        body_out = [o.name for o in body.output]
        return cls(
            node,
            body,
            body_in[first : first + n],
            body_out[offset : offset + n],
            body_out[offset + n :],
            list(node.input[first : first + n]),
            list(node.output[:n]),
            first,
            offset,
        )

    @cached_property
    def info(self) -> GraphInfo:
        """Types, shapes and constants of the body."""
        return GraphInfo.from_graph(self.body)

    def moving(self) -> list[int]:
        """The carried values that change from step to step, by position."""
        return [
            k
            for k, (x, y) in enumerate(zip(self.state_in, self.state_out))
            if not _same(self, y, x)
        ]

    def dtype(self, b, k: int) -> int:
        """The element type of carried value k."""
        return self.info.dtypes.get(self.state_in[k], b.dtype(self.inits[k]))


def _same(steps: _Steps, out: str, inp: str) -> bool:
    """Whether body output `out` is body input `inp`, maybe through Identity nodes."""
    producer = {o: n for n in steps.body.node for o in n.output}
    while out != inp:
        n = producer.get(out)
        if n is None or n.op_type != "Identity":
            return False
        out = n.input[0]
    return True


def _reaches(graph: onnx.GraphProto, sources: set[str]) -> set[str]:
    """The names of `graph` computed from any of `sources`, the sources included."""
    seen = set(sources)
    for n in graph.node:
        if any(i in seen for i in [*n.input, *scope_reads(n)] if i):
            seen.update(o for o in n.output if o)
    return seen


def _flowing(b, steps: _Steps, sources: set[str]) -> list[int]:
    """The float carried values whose gradient can reach a wanted tensor, by position: those
    whose initial value needs one, and those whose next value is computed from a wanted
    tensor (`sources`) or from a value already found (to a fixed point)."""
    floats = [k for k in range(len(steps.inits)) if steps.dtype(b, k) in FLOAT_TYPES]
    flowing = {k for k in floats if steps.node.needs_grad(steps.first + k)}
    while True:
        reach = _reaches(steps.body, sources | {steps.state_in[k] for k in flowing})
        more = {k for k in floats if k not in flowing and steps.state_out[k] in reach}
        if not more:
            return sorted(flowing)
        flowing |= more


def _with_records(b, steps: _Steps, keep: int, record: list[int]) -> onnx.GraphProto:
    """A copy of the body under fresh names that returns its first `keep` outputs, then the
    values of its inputs at positions `record`: what enters each step, stacked by the node."""
    sub = subgraph_emitter(b, "record/")
    body_in = [i.name for i in steps.body.input]
    inputs = [subgraph_input(sub, x) for x in body_in]
    _, names = inline_graph(sub, steps.body, dict(zip(body_in, inputs)), "")
    outs = [names.get(o.name, o.name) for o in steps.body.output[:keep]]
    outs += [inputs[p] for p in record]
    return make_subgraph(sub, f"{steps.node.name}_grad_record", outs, inputs)


def _emit(b, op_type: str, inputs: list[str], types: list[tuple], **attrs) -> list[str]:
    """One Loop or Scan node with an output per (dtype, shape or None) in `types`."""
    outs = b.op(op_type, *inputs, outputs=len(types), **attrs)
    outs = [outs] if len(types) == 1 else list(outs)
    for out, (dtype, shape) in zip(outs, types):
        b.info.dtypes[out] = dtype
        if shape is not None:
            b.info.shapes[out] = list(shape)
    return outs


def _stacked(shape) -> list | None:
    return None if shape is None else [None, *shape]


def _reverse(
    b,
    steps: _Steps,
    records: dict[int, str],
    count: str,
    dys: list[str | None],
    bind: Callable,
    scan_dy: Callable,
    extra: list[str],
) -> tuple[dict[int, str], dict[str, list[str]], list[str]]:
    """Emit the reverse Loop over the `count` steps of a recurrence; return its gradients.

    Args:
        b: the rule's emitter.
        steps: the recurrence.
        records: per moving carried value (by position), the stack of its values entering
            each step; the others keep their initial value throughout.
        count: the number of steps run (an int64 scalar).
        dys: the node's output gradients: carried values, then scan outputs.
        bind: (emitter, t, j) -> the tensors the body's other inputs read at step t, where
            j = count − 1 − t is the reverse Loop's own iteration number.
        scan_dy: (emitter, k, dy, t, j) -> the slice of scan output k's gradient dy at t.
        extra: inputs that `bind` binds whose gradients are wanted; the reverse Loop stacks
            them in the order it runs (t = count − 1 first).

    Returns:
        Per carried value that carries a gradient (by position), the gradient of its
        initial value; per wanted outer tensor, its gradient (as a list of one); per
        `extra` input, the stack of its gradients.
    """
    node, body, n = steps.node, steps.body, len(steps.inits)
    reads = len(node.input)
    outer = [
        x
        for k, x in enumerate(node.outer)
        if node.needs_grad(reads + k) and b.dtype(x) in FLOAT_TYPES
    ]
    info = steps.info
    flowing = _flowing(b, steps, set(outer) | set(extra))
    last = b.Sub(count, b.ints(1))

    # 1. The reverse body's inputs: its iteration j, a condition, the gradients it carries.
    sub = subgraph_emitter(b, "reverse/")
    j = subgraph_input(sub, "j", INT64, [])
    go = subgraph_input(sub, "cond", BOOL, [])
    dvs = [
        subgraph_input(sub, f"{steps.state_in[k]}_grad", steps.dtype(b, k), info.shapes.get(x))
        for k, x in ((k, steps.state_in[k]) for k in flowing)
    ]
    accs = [subgraph_input(sub, f"{x}_grad", b.dtype(x), b.shape(x)) for x in outer]

    # 2. Step t = count − 1 − j again: moving values from their records, the others as given.
    t = sub.Sub(last, j)
    bindings = bind(sub, t, j)
    for k, x in enumerate(steps.state_in):
        if k in records:
            bindings[x] = sub.Gather(records[k], t, axis=0)
        elif k in flowing:
            bindings[x] = sub.Identity(steps.inits[k])  # a name of its own: its gradient alone
        else:
            bindings[x] = steps.inits[k]

    # 3. Its gradient, seeded with the carried gradients and the scan outputs' slices at t.
    seeds: list[str | None] = [None] * len(body.output)
    for k, dv in zip(flowing, dvs):
        seeds[steps.offset + k] = dv
    for k, dy in enumerate(dys[n:]):
        if dy is not None:
            seeds[steps.offset + n + k] = scan_dy(sub, k, dy, t, j)
    wrt = [bindings[steps.state_in[k]] for k in flowing] + outer + [bindings[x] for x in extra]
    grads = graph_gradient(sub, node, body, bindings, seeds, wrt, "step/")

    # 4. It returns dvₜ per carried value, the outer gradients summed so far, the extras.
    outs = [sub.const(True, dtype=BOOL)]
    for k, g in zip(flowing, grads):
        outs.append(g if g is not None else sub.zeros_like(bindings[steps.state_in[k]]))
    for acc, g in zip(accs, grads[len(flowing) :]):
        outs.append(acc if g is None else sub.Add(acc, g))  # dx = Σₜ dxₜ
    for x, g in zip(extra, grads[len(flowing) + len(outer) :]):
        outs.append(g if g is not None else sub.zeros_like(bindings[x]))
    graph = make_subgraph(sub, f"{node.name}_grad_reverse", outs, [j, go, *dvs, *accs])

    # 5. The reverse Loop, from dvₙ = dv_final (zeros where no gradient arrives there).
    starts, types = [], []
    for k in flowing:
        x = steps.finals[k] or steps.inits[k]
        starts.append(dys[k] if dys[k] is not None else b.zeros_like(x))
        types.append((steps.dtype(b, k), b.shape(steps.inits[k])))
    starts += [b.zeros_like(x) for x in outer]
    types += [(b.dtype(x), b.shape(x)) for x in outer]
    types += [(b.dtype(bindings[x]), None) for x in extra]
    results = _emit(b, "Loop", [count, "", *starts], types, body=graph)
    dinit = dict(zip(flowing, results))
    douter = {x: [g] for x, g in zip(outer, results[len(flowing) :])}
    return dinit, douter, results[len(flowing) + len(outer) :]


def _collect(b, steps: _Steps, wanted, dinit, parts: dict[str, list[str]]) -> list:
    """Per wanted name, the sum of its gradients: as an initial value and as anything else."""
    for k, g in dinit.items():
        if steps.node.needs_grad(steps.first + k):
            parts.setdefault(steps.inits[k], []).append(g)
    out: list[str | None] = []
    for x in wanted:
        got = parts.get(x)
        out.append(None if not got else got[0] if len(got) == 1 else b.Sum(*got))
    return out


def _reverse_loop(b, node, body: onnx.GraphProto, dys, wanted: list[str]) -> list:
    """The gradients of a Loop whose number of steps only the run decides, per wanted name."""
    n = len(node.input) - 2
    body_in = [i.name for i in body.input]
    steps = _Steps.of(node)
    info = steps.info

    # 1. The Loop again, stacking the iteration number and the moving values at each step.
    moving = steps.moving()
    graph = _with_records(b, steps, 1 + n, [0] + [2 + k for k in moving])
    types = [(b.dtype(x), None) for x in steps.inits] + [(INT64, [None])]
    types += [(steps.dtype(b, k), _stacked(info.shapes.get(body_in[2 + k]))) for k in moving]
    outs = _emit(b, "Loop", node.input, types, body=graph)
    count = b.Size(outs[n])  # the number of steps run
    records = dict(zip(moving, outs[n + 1 :]))

    # 2. The reverse Loop: step t runs with iteration number t and a true condition.
    def bind(sub, t, j):
        return {body_in[0]: t, body_in[1]: sub.const(True, dtype=BOOL)}

    def scan_dy(sub, k, dy, t, j):
        return sub.Gather(dy, t, axis=0)

    dinit, douter, _ = _reverse(b, steps, records, count, dys, bind, scan_dy, [])
    return _collect(b, steps, wanted, dinit, douter)


def _reverse_scan(b, node, body: onnx.GraphProto, dys, wanted: list[str], axes) -> list:
    """The gradients of a Scan whose length only the run decides, per wanted name."""
    if b.opset < 10:
        raise _unsupported(node, "a Scan of run-time length needs opset 10 (Slice with steps)")
    in_axes, in_back, out_axes, out_back = axes
    n_scan = int(node.attrs["num_scan_inputs"])
    n = len(node.input) - n_scan
    body_in = [i.name for i in body.input]
    steps = _Steps.of(node)
    info = steps.info
    xs = node.input[n:]

    # 1. The Scan again, stacking the moving states entering each step (if any move).
    moving = steps.moving()
    records: dict[int, str] = {}
    if moving:
        graph = _with_records(b, steps, n, moving)
        types = [(b.dtype(x), None) for x in steps.inits]
        types += [(steps.dtype(b, k), _stacked(info.shapes.get(body_in[k]))) for k in moving]
        outs = _emit(
            b,
            "Scan",
            node.input,
            types,
            body=graph,
            num_scan_inputs=n_scan,
            scan_input_axes=list(in_axes),
            scan_input_directions=[int(d) for d in in_back],
            scan_output_axes=[0] * len(moving),
            scan_output_directions=[0] * len(moving),
        )
        records = dict(zip(moving, outs[n:]))
    count = b.Gather(b.Shape(xs[0]), b.ints(in_axes[0]), axis=0)

    # 2. The reverse Loop: step t reads slice t of each scan input (count − 1 − t = j from
    #    the end in a reverse direction), and likewise for the scan outputs' gradients.
    def bind(sub, t, j):
        return {
            body_in[n + m]: sub.Gather(x, j if back else t, axis=axis)
            for m, (x, axis, back) in enumerate(zip(xs, in_axes, in_back))
        }

    def scan_dy(sub, k, dy, t, j):
        axis = _axis(b, node, out_axes[k], node.output[n + k])
        return sub.Gather(dy, j if out_back[k] else t, axis=axis)

    extra = [
        body_in[n + m]
        for m, x in enumerate(xs)
        if node.needs_grad(n + m) and b.dtype(x) in FLOAT_TYPES
    ]
    dinit, parts, stacks = _reverse(b, steps, records, count, dys, bind, scan_dy, extra)

    # 3. Each dxⱼ from its stack: back in position order, the scan axis moved into place.
    for name, stack in zip(extra, stacks):
        m = body_in.index(name) - n
        x, axis = xs[m], in_axes[m]
        if not in_back[m]:  # the stack runs t = count − 1 … 0
            stack = b.Slice(stack, b.ints([-1]), b.ints([-(2**63)]), b.ints([0]), b.ints([-1]))
        if axis:
            rank = b.rank(x)
            if rank is None:
                raise _unsupported(
                    node, f"the gradient needs the rank of '{x}' for axis {axis}; give it a shape"
                )
            stack = b.Transpose(stack, perm=[*range(1, axis + 1), 0, *range(axis + 1, rank)])
        parts.setdefault(x, []).append(stack)
    return _collect(b, steps, wanted, dinit, parts)
