"""Kernels for control flow: If, Loop and Scan.

Each subgraph is compiled once, in the kernel factory, into a `Plan` of its own, with kernels
from the registry. The plan's inputs are the subgraph's declared inputs followed by the
enclosing-scope tensors its nodes read (from any number of scopes up); the kernel receives
the values of those after its regular inputs, in the order of `KernelNode.outer`, and hands
them on to every run of the subgraph. Nested subgraphs compile recursively the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxgrad.importer import attributes, tensor_array
from onnxgrad.runtime import kernels as registry
from onnxgrad.runtime.kernels import KernelNode, kernel
from onnxgrad.runtime.plan import Plan, outer_names, topological_order

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subgraph:
    """A compiled subgraph.

    Attributes:
        plan: the plan that computes every declared output.
        inputs: the declared input names, in order.
        outputs: the declared output names, in order.
        output_types: per output, (numpy dtype or None, static shape or None), to shape
            the empty results of zero iterations.
    """

    plan: Plan
    inputs: list[str]
    outputs: list[str]
    output_types: list[tuple]

    def run(self, values: Sequence, outer: dict) -> list:
        """The outputs for declared input `values` and enclosing-scope values `outer`."""
        feeds = dict(outer)
        feeds.update(zip(self.inputs, values))
        return self.plan.run(feeds)

    def empty(self, k: int, axis: int = 0) -> np.ndarray:
        """A zero-length stack of output `k` along `axis` (onnxruntime's shape when unknown)."""
        dtype, shape = self.output_types[k]
        dtype = np.float32 if dtype is None else dtype
        if shape is None:
            return np.zeros((0,), dtype)
        shape = list(shape)
        shape.insert(axis % (len(shape) + 1), 0)
        return np.zeros(shape, dtype)


def free_names(graph: onnx.GraphProto) -> list[str]:
    """The enclosing-scope tensors a graph's nodes (and their own subgraphs) read, sorted."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        local.update(node.output)
    names: set[str] = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        names.update(outer_names(node))
    return sorted(names - local)


def compile_graph(graph: onnx.GraphProto, owner: KernelNode, label: str) -> Subgraph:
    """Compile a subgraph of `owner` into a plan, once.

    Args:
        graph: the subgraph (a GRAPH attribute).
        owner: the node that holds it; its opset is used for the subgraph's nodes.
        label: the attribute's name, to name the subgraph's nodes `<owner>/<label>/<node>`.

    Raises:
        NotImplementedError: a node of the subgraph has no kernel, or the subgraph returns
            an enclosing-scope tensor directly (wrap it in an Identity).
    """
    # 1. Names: unique node names for the plan, the free names the plan takes as inputs.
    free = free_names(graph)
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {o for n in graph.node for o in n.output}
    for out in graph.output:
        if out.name not in local and out.name not in free:
            raise NotImplementedError(
                f"{owner.op_type} node '{owner.name}': subgraph '{label}' returns the "
                f"enclosing-scope tensor '{out.name}' directly; wrap it in an Identity node"
            )
    prefix = f"{owner.name}/{label}/"
    nodes = []
    for k, node in enumerate(graph.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{k}:{node.name or node.op_type}"
        nodes.append(copy)

    # 2. A kernel for each node, every missing one reported at once.
    dtypes = _dtypes(graph)
    kernels, missing = {}, []
    for node in nodes:
        factory = registry.lookup(node.op_type, node.domain)
        if factory is None:
            missing.append(f"{node.op_type} (node '{node.name}')")
            continue
        info = KernelNode(
            node.op_type,
            node.domain,
            node.name,
            owner.opset,
            attributes(node),
            list(node.input),
            list(node.output),
            [dtypes.get(i) for i in node.input],
            outer_names(node),
        )
        try:
            kernels[node.name] = factory(info)
        except NotImplementedError as err:
            missing.append(f"{node.op_type} (node '{node.name}'): {err}")
    if missing:
        raise NotImplementedError(
            f"subgraph '{label}' has nodes it cannot run: {'; '.join(missing)}"
        )

    # 3. The plan: declared inputs, then the enclosing-scope names.
    inputs = [i.name for i in graph.input]
    constants = {t.name: tensor_array(t) for t in graph.initializer}
    order = topological_order(nodes, set(inputs) | set(constants) | set(free))
    outputs = [o.name for o in graph.output]
    plan = Plan(order, kernels, constants, inputs + free, outputs)
    types = [_type_of(o) for o in graph.output]
    logger.debug("compiled subgraph '%s' of %s: %d nodes", label, owner.name, len(order))
    return Subgraph(plan, inputs, outputs, types)


def _dtypes(graph: onnx.GraphProto) -> dict:
    out = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    for t in graph.initializer:
        out[t.name] = helper.tensor_dtype_to_np_dtype(t.data_type)
    return out


def _type_of(vi: onnx.ValueInfoProto) -> tuple:
    if not vi.type.HasField("tensor_type"):
        return None, None
    tt = vi.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
    shape = None
    if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
        shape = [d.dim_value for d in tt.shape.dim]
    return dtype, shape


def _flag(value) -> bool:
    """A one-element condition tensor as a Python bool."""
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"a condition must hold one element, got shape {list(np.shape(value))}")
    return bool(flat[0])


@kernel("If")
def if_(node: KernelNode):
    then_branch = compile_graph(node.attrs["then_branch"], node, "then_branch")
    else_branch = compile_graph(node.attrs["else_branch"], node, "else_branch")
    names = node.outer

    def run(cond, *outer):
        branch = then_branch if _flag(cond) else else_branch
        return tuple(branch.run((), dict(zip(names, outer))))

    return run


@kernel("Loop")
def loop(node: KernelNode):
    # for (i = 0; (M absent or i < M) and cond; ++i): cond, v..., scans... = body(i, cond, v...)
    body = compile_graph(node.attrs["body"], node, "body")
    inputs = list(node.inputs) + [""] * max(0, 2 - len(node.inputs))
    has_trip, has_cond = bool(inputs[0]), bool(inputs[1])
    if not has_trip and not has_cond:
        raise NotImplementedError("a Loop with neither a trip count M nor a condition never ends")
    n_carried = len(inputs) - 2
    n_scan = len(body.outputs) - 1 - n_carried
    if n_scan < 0:
        raise NotImplementedError(
            f"the body returns {len(body.outputs)} outputs for {n_carried} loop-carried values"
        )
    n_in = len(node.inputs)
    names = node.outer

    def run(*values):
        values = list(values[:n_in]) + [None] * (2 - n_in) + list(values[n_in:])
        trip, cond, carried = values[0], values[1], values[2 : 2 + n_carried]
        outer = dict(zip(names, values[2 + n_carried :]))
        limit = int(np.asarray(trip).reshape(-1)[0]) if has_trip else None
        going = _flag(cond) if has_cond else True
        stacks: list[list] = [[] for _ in range(n_scan)]
        i = 0
        while going and (limit is None or i < limit):
            outs = body.run([np.array(i, np.int64), np.array(going), *carried], outer)
            # The spec calls the body's condition ignored without a cond input, but
            # onnxruntime and onnx's reference evaluator both stop on it: so do we.
            going = _flag(outs[0])
            carried = outs[1 : 1 + n_carried]
            for stack, value in zip(stacks, outs[1 + n_carried :]):
                stack.append(value)
            i += 1
        scans = [np.stack(s) if s else body.empty(1 + n_carried + k) for k, s in enumerate(stacks)]
        return tuple(carried) + tuple(scans)

    return run


@kernel("Scan")
def scan(node: KernelNode):
    # states, scans = body(states, x₁[t] … xₘ[t]) for t along each scan axis, in each direction
    body = compile_graph(node.attrs["body"], node, "body")
    if node.opset < 9:
        return _batched_scan(node, body)
    n_scan = int(node.attrs["num_scan_inputs"])
    n_state = len(node.inputs) - n_scan
    n_out = len(body.outputs) - n_state
    in_axes = list(node.attrs.get("scan_input_axes", [0] * n_scan))
    in_back = [bool(d) for d in node.attrs.get("scan_input_directions", [0] * n_scan)]
    out_axes = list(node.attrs.get("scan_output_axes", [0] * n_out))
    out_back = [bool(d) for d in node.attrs.get("scan_output_directions", [0] * n_out)]
    n_in = len(node.inputs)
    names = node.outer

    def run(*values):
        states = list(values[:n_state])
        xs = values[n_state:n_in]
        outer = dict(zip(names, values[n_in:]))
        axes = [a % x.ndim for a, x in zip(in_axes, xs)]
        lengths = {x.shape[a] for a, x in zip(axes, xs)}
        if len(lengths) != 1:
            raise ValueError(f"the scan inputs have different lengths {sorted(lengths)}")
        length = lengths.pop()
        stacks: list[list] = [[] for _ in range(n_out)]
        for t in range(length):
            picks = []
            for x, a, back in zip(xs, axes, in_back):
                index = (slice(None),) * a + (length - 1 - t if back else t,)
                picks.append(x[index])
            outs = body.run(states + picks, outer)
            states = outs[:n_state]
            for stack, value in zip(stacks, outs[n_state:]):
                stack.append(value)
        scans = []
        for k, (stack, axis, back) in enumerate(zip(stacks, out_axes, out_back)):
            if not stack:
                scans.append(body.empty(n_state + k, axis))
                continue
            if back:  # the output of step t goes to position length − 1 − t
                stack = stack[::-1]
            scans.append(np.stack(stack, axis=axis % (stack[0].ndim + 1)))
        return tuple(states) + tuple(scans)

    return run


def _batched_scan(node: KernelNode, body: Subgraph):
    """Scan as opset 8 defines it: every input batched along axis 0, scanned along axis 1.

    Each batch entry b runs its own recurrence from init[b] over its first
    sequence_lens[b] steps (all of them without sequence_lens); scan outputs are padded
    with zeros to the longest sequence, then stacked along the batch axis.
    """
    n_scan = int(node.attrs["num_scan_inputs"])
    n_in = len(node.inputs)
    n_state = n_in - 1 - n_scan
    n_out = len(body.outputs) - n_state
    if n_state < 0 or n_out < 0:
        raise NotImplementedError(
            f"{n_in - 1} state and scan inputs for num_scan_inputs={n_scan} and a body "
            f"with {len(body.outputs)} outputs"
        )
    back = [bool(d) for d in node.attrs.get("directions", [0] * n_scan)]
    names = node.outer

    def run(lens, *values):
        # 1. Shapes: one batch size and one maximum length for all scan inputs.
        inits = values[:n_state]
        xs = values[n_state : n_in - 1]
        outer = dict(zip(names, values[n_in - 1 :]))
        sizes = {x.shape[:2] for x in xs}
        if len(sizes) != 1 or any(s.shape[:1] != xs[0].shape[:1] for s in inits):
            raise ValueError(
                f"the scan inputs (batch, length) {sorted(sizes)} and the states' batch sizes "
                f"{[s.shape[:1] for s in inits]} disagree"
            )
        batch, length = sizes.pop()
        if lens is None:
            steps = [length] * batch
        else:
            steps = [int(v) for v in np.asarray(lens).reshape(-1)]
            if len(steps) != batch or not all(0 <= v <= length for v in steps):
                raise ValueError(
                    f"sequence_lens {steps} must hold {batch} lengths in [0, {length}]"
                )

        # 2. One recurrence per batch entry, over its own length.
        finals: list[list] = [[] for _ in range(n_state)]
        seen: list[list] = [[] for _ in range(n_out)]
        for b, count in enumerate(steps):
            states = [s[b] for s in inits]
            stacks: list[list] = [[] for _ in range(n_out)]
            for t in range(count):
                picks = [x[b, count - 1 - t if rev else t] for x, rev in zip(xs, back)]
                outs = body.run(states + picks, outer)
                states = outs[:n_state]
                for stack, value in zip(stacks, outs[n_state:]):
                    stack.append(value)
            for final, value in zip(finals, states):
                final.append(value)
            for k, stack in enumerate(stacks):
                seen[k].append(stack)

        # 3. Stack along the batch axis, the scan outputs padded with zeros to `length`.
        result = [np.stack(f) if batch else np.array(s) for f, s in zip(finals, inits)]
        for k, per_batch in enumerate(seen):
            first = next((st[0] for st in per_batch if st), None)
            if first is None:  # no step ran anywhere: the body's declared type
                empty = body.empty(n_state + k)
                first = np.zeros(empty.shape[1:], empty.dtype)
            out = np.zeros((batch, length) + first.shape, dtype=first.dtype)
            for b, stack in enumerate(per_batch):
                if stack:
                    out[b, : len(stack)] = np.stack(stack)
            result.append(out)
        return tuple(result)

    return run
