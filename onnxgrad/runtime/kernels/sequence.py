"""Sequence and Optional kernels.

A sequence value is a Python list of arrays; an optional value is its element itself, or
None when empty. So Identity passes both through unchanged, and an absent optional input
and an empty optional look the same to a kernel, as the spec intends for OptionalHasElement.

SequenceEmpty SequenceConstruct SequenceAt SequenceInsert SequenceErase SequenceLength
ConcatFromSequence SplitToSequence SequenceMap Optional OptionalHasElement
OptionalGetElement
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxgrad.runtime.kernels import KERNELS, KernelNode, kernel, lookup


def kernel_if_missing(*op_types: str):
    """Register a kernel factory for each op type that no family loaded earlier provides.

    The conformance families (sequence, string, random, signal, vision) load last and
    register through this, so a kernel that another family also defines (the gradient
    rules' kernels in extra.py, say) is never registered twice.
    """

    def register(factory):
        for op in op_types:
            if (op, "") not in KERNELS:
                kernel(op)(factory)
        return factory

    return register


def _int(value) -> int:
    return int(np.asarray(value).reshape(-1)[0])


def _position(seq: list, position, insert: bool = False) -> int:
    """A sequence position, negative ones counted from the end; checked against bounds."""
    n = len(seq)
    p = _int(position)
    p = p + n if p < 0 else p
    if not 0 <= p <= (n if insert else n - 1):
        raise IndexError(f"position {_int(position)} is outside a sequence of length {n}")
    return p


@kernel_if_missing("SequenceEmpty")
def sequence_empty(node: KernelNode):
    """SequenceEmpty: a new, empty sequence."""
    return lambda: ([],)


@kernel_if_missing("SequenceConstruct")
def sequence_construct(node: KernelNode):
    """SequenceConstruct: the inputs, in order, as one sequence."""
    return lambda *xs: (list(xs),)


@kernel_if_missing("SequenceAt")
def sequence_at(node: KernelNode):
    """SequenceAt: the tensor at `position` (negative counts from the end)."""
    return lambda seq, position: (seq[_position(seq, position)],)


@kernel_if_missing("SequenceInsert")
def sequence_insert(node: KernelNode):
    """SequenceInsert: a new sequence with `tensor` at `position` (default: at the end)."""

    def run(seq, tensor, position=None):
        p = len(seq) if position is None else _position(seq, position, insert=True)
        return (seq[:p] + [tensor] + seq[p:],)

    return run


@kernel_if_missing("SequenceErase")
def sequence_erase(node: KernelNode):
    """SequenceErase: a new sequence without the tensor at `position` (default: the last)."""

    def run(seq, position=None):
        p = len(seq) - 1 if position is None else _position(seq, position)
        return (seq[:p] + seq[p + 1 :],)

    return run


@kernel_if_missing("SequenceLength")
def sequence_length(node: KernelNode):
    """SequenceLength: the number of tensors, as an int64 scalar."""
    return lambda seq: (np.array(len(seq), dtype=np.int64),)


@kernel_if_missing("ConcatFromSequence")
def concat_from_sequence(node: KernelNode):
    """ConcatFromSequence: concatenated along `axis`, or stacked on a new axis (new_axis=1)."""
    axis = node.attrs["axis"]
    new_axis = node.attrs.get("new_axis", 0)

    def run(seq):
        if new_axis:
            return (np.stack(seq, axis=axis),)
        return (np.concatenate(seq, axis=axis),)

    return run


@kernel_if_missing("SplitToSequence")
def split_to_sequence(node: KernelNode):
    """SplitToSequence: pieces of the given sizes (a scalar: equal pieces, the last one
    smaller), or single slices, squeezed when keepdims=0 and no split is given."""
    axis = node.attrs.get("axis", 0)
    keepdims = node.attrs.get("keepdims", 1)

    def run(x, split=None):
        a = axis % x.ndim
        dim = x.shape[a]
        if split is None:
            pieces = np.split(x, dim, axis=a)
            return ([p if keepdims else np.squeeze(p, axis=a) for p in pieces],)
        split = np.asarray(split)
        if split.ndim == 0:
            size = int(split)
            cuts = list(range(size, dim, size))
        else:
            cuts = np.cumsum(split.reshape(-1))[:-1].tolist()
        return (np.split(x, cuts, axis=a),)

    return run


@kernel_if_missing("Optional")
def optional(node: KernelNode):
    """Optional: the input as a non-empty optional, or an empty one when there is none."""
    return lambda x=None: (x,)


@kernel_if_missing("OptionalHasElement")
def optional_has_element(node: KernelNode):
    """OptionalHasElement: whether the optional (or plain tensor) input holds a value."""
    return lambda x=None: (np.array(x is not None),)


@kernel_if_missing("OptionalGetElement")
def optional_get_element(node: KernelNode):
    """OptionalGetElement: the value of a non-empty optional (a plain input passes as is)."""

    def run(x=None):
        if x is None:
            raise ValueError("OptionalGetElement of an empty optional")
        return (x,)

    return run


class Subgraph:
    """A graph attribute compiled once and run as a function of its inputs.

    Args:
        graph: the subgraph (If/Loop/Scan/SequenceMap body).
        opset: the default-domain opset of the enclosing model.
        outer: names the subgraph reads from the enclosing scope; their values follow the
            graph's own inputs when the subgraph is called.
    """

    def __init__(self, graph: onnx.GraphProto, opset: int, outer: list[str] | None = None):
        from onnxgrad.importer import attributes, tensor_array
        from onnxgrad.runtime.plan import Plan, outer_names, topological_order

        self.inputs = [i.name for i in graph.input] + list(outer or [])
        self.outputs = [o.name for o in graph.output]
        constants = {t.name: tensor_array(t) for t in graph.initializer}
        nodes = topological_order(graph.node, set(self.inputs) | set(constants))
        kernels = {}
        for k, n in enumerate(nodes):
            if not n.name:
                n.name = f"{graph.name or 'subgraph'}/{n.op_type}_{k}"
            factory = lookup(n.op_type, n.domain)
            if factory is None:
                raise NotImplementedError(f"{n.op_type} inside a subgraph has no numpy kernel")
            info = KernelNode(
                n.op_type,
                n.domain,
                n.name,
                opset,
                attributes(n),
                list(n.input),
                list(n.output),
                [None] * len(n.input),
                outer_names(n),
            )
            kernels[n.name] = factory(info)
        self.plan = Plan(nodes, kernels, constants, self.inputs, self.outputs)

    def __call__(self, *values) -> list:
        """The subgraph's outputs for its inputs (and outer values) in order."""
        return self.plan.run(dict(zip(self.inputs, values)))


@kernel_if_missing("SequenceMap")
def sequence_map(node: KernelNode):
    """SequenceMap: the body applied to the i-th element of every sequence input (tensor
    inputs are passed whole each time); each body output is gathered into a sequence."""
    body = onnx.GraphProto()
    body.CopyFrom(node.attrs["body"])
    n_inputs = sum(1 for i in node.inputs if i)
    run_body = Subgraph(body, node.opset, node.outer)

    def run(*values):
        inputs, outer = values[:n_inputs], values[n_inputs:]
        seq = inputs[0]
        results: list[list] = [[] for _ in run_body.outputs]
        for i in range(len(seq)):
            args = [v[i] if isinstance(v, list) else v for v in inputs]
            for out, value in zip(results, run_body(*args, *outer)):
                out.append(value)
        return tuple(results)

    return run
