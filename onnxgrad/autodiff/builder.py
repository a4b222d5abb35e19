"""Reverse-mode autodiff over an ONNX graph: append the backward nodes.

The builder owns the bookkeeping so that rules only write math: it finds the nodes
between the parameters and the loss, walks them in reverse, sums gradients that meet at
one tensor, reduces broadcast gradients to their input's shape, stops at integer and
boolean tensors, names everything deterministically and reports every missing rule at
once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxgrad.autodiff import rules as registry
from onnxgrad.autodiff.emitter import Emitter, GraphInfo
from onnxgrad.errors import GradientError, MissingGradientError, UnsupportedOpError
from onnxgrad.importer import (
    FLOAT_TYPES,
    attributes,
    checkable,
    load,
    opset_of,
    subgraphs,
    trainable_parameters,
)

logger = logging.getLogger(__name__)

GRAD_SUFFIX = "_grad"


@dataclass
class Node:
    """The forward node as a rule sees it.

    Attributes:
        proto: the NodeProto.
        opset: the opset of the node's domain in the model.
        attrs: attribute values by name (strings decoded, tensors as numpy arrays).
        needs: per input, then per outer-scope name, whether its gradient is wanted.
        outer: for nodes with subgraphs (If, Loop, Scan), the enclosing-scope tensors the
            subgraphs read, sorted. A rule returns one gradient per input, then one per
            outer name.
        opsets: the model's opset per domain (for rules that differentiate subgraphs).
    """

    proto: onnx.NodeProto
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)
    needs: tuple[bool, ...] = ()
    outer: tuple[str, ...] = ()
    opsets: dict[str, int] = field(default_factory=dict)

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def domain(self) -> str:
        return self.proto.domain

    @property
    def input(self) -> list[str]:
        return list(self.proto.input)

    @property
    def output(self) -> list[str]:
        return list(self.proto.output)

    def needs_grad(self, i: int) -> bool:
        """Whether the gradient of input `i` is wanted (i ≥ len(input): outer name i − len(input))."""
        return i < len(self.needs) and self.needs[i]


def gradient_model(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    wrt: Sequence[str] | None = None,
    loss: str | None = None,
) -> onnx.ModelProto:
    """Append the backward graph of `d loss / d wrt` to a model.

    Args:
        model: a path, bytes or ModelProto (loaded and normalized by `onnxgrad.load`).
        wrt: tensors to differentiate with respect to: initializers, graph inputs or
            intermediate tensors. Default: every trainable parameter.
        loss: the output to differentiate. Default: the only output. When it is not a
            scalar, the result takes its gradient as an extra input `<loss>_grad`.

    Returns:
        A model whose outputs are the original outputs, then `<name>_grad` for each `wrt`
        name, in order. The backward nodes use standard ai.onnx ops only.

    Raises:
        GradientError: unknown loss or wrt names, or a non-float wrt tensor.
        MissingGradientError: ops on the loss's path have no rule (all listed at once).
    """
    model = load(model)
    return _Builder(model).build(wrt, loss)


class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = opset_of(model)
        self.opsets = _opsets(model)
        self.info = GraphInfo.from_graph(self.graph)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
        self.root = Emitter(self.info, self.opset, taken=names_in_use(self.graph))

    def build(self, wrt: Sequence[str] | None, loss: str | None) -> onnx.ModelProto:
        # 1. What to differentiate, with respect to what.
        loss = self._loss_name(loss)
        wrt = self._wrt_names(wrt)

        # 2. The nodes between them, and a rule for each.
        walk = _Pass(self.root, self.opsets)
        active, needs = walk.active_nodes(self.graph.node, wrt, [loss])
        walk.check_rules(active)

        # 3. Reverse walk: each rule turns output gradients into input gradients.
        seed, seed_input = self._seed(loss)
        grads: dict[str, list[str]] = {loss: [seed]}
        final: dict[str, str] = {}
        for node in reversed(active):
            walk.backward(node, needs, grads, final)

        # 4. The wrt gradients as outputs, named `<name>_grad`.
        outputs = [self._wrt_output(walk, w, grads, final) for w in wrt]
        self._rename(final, outputs, seed)
        return self._assemble(wrt, outputs, seed_input)

    # Step 1.

    def _loss_name(self, loss: str | None) -> str:
        outputs = [o.name for o in self.graph.output]
        if loss is None:
            if len(outputs) != 1:
                raise GradientError(
                    f"the model has {len(outputs)} outputs ({', '.join(outputs)}): "
                    "name the one to differentiate with loss="
                )
            return outputs[0]
        if loss not in outputs:
            raise GradientError(
                f"loss '{loss}' is not an output of the model; its outputs are: "
                f"{', '.join(outputs)}"
            )
        return loss

    def _wrt_names(self, wrt: Sequence[str] | None) -> list[str]:
        if wrt is None:
            wrt = trainable_parameters(self.model)
            if not wrt:
                raise GradientError(
                    "the model has no trainable parameters (floating-point initializers): "
                    "name the tensors to differentiate with wrt="
                )
        known = set(self.producer) | {t.name for t in self.graph.initializer}
        known |= {i.name for i in self.graph.input}
        wrt = list(wrt)
        for name in wrt:
            if name not in known:
                raise GradientError(
                    f"wrt name '{name}' is not a tensor of the model (not an initializer, "
                    "input or node output)"
                )
            if self.info.dtypes.get(name, onnx.TensorProto.FLOAT) not in FLOAT_TYPES:
                raise GradientError(
                    f"wrt tensor '{name}' is of type "
                    f"{helper.tensor_dtype_to_string(self.info.dtypes[name])}: only floating-point "
                    "tensors have gradients"
                )
        if len(set(wrt)) != len(wrt):
            raise GradientError("wrt names a tensor twice")
        return wrt

    # Step 3.

    def _seed(self, loss: str) -> tuple[str, onnx.ValueInfoProto | None]:
        shape = self.info.shapes.get(loss)
        dtype = self.info.dtypes.get(loss, onnx.TensorProto.FLOAT)
        b = self.root.scoped(f"{loss}{GRAD_SUFFIX}/")
        if (
            shape is not None
            and all(isinstance(d, int) for d in shape)
            and int(np.prod(shape)) == 1
        ):
            return b.const(np.ones(shape), dtype=dtype), None
        if shape is None:
            logger.warning("loss '%s' has an unknown shape: taking the gradient of its sum", loss)
            one = numpy_helper.from_array(np.ones(1, helper.tensor_dtype_to_np_dtype(dtype)))
            return b.ConstantOfShape(b.Shape(loss), value=one), None
        name = f"{loss}{GRAD_SUFFIX}"
        vi = helper.make_tensor_value_info(name, dtype, shape)
        self.info.dtypes[name] = dtype
        self.info.shapes[name] = list(shape)
        return name, vi

    # Step 4.

    def _wrt_output(self, walk: _Pass, w: str, grads, final) -> str:
        g = final.get(w) or walk.accumulate(w, grads, final)
        if g is None:
            logger.warning("the loss does not depend on '%s': its gradient is zero", w)
            g = self.root.scoped(f"{w}{GRAD_SUFFIX}/").zeros_like(w)
            final[w] = g
        return g

    def _rename(self, final: dict[str, str], outputs: list[str], seed: str) -> None:
        """Name each gradient `<tensor>_grad` where that is unambiguous, in place."""
        emitted = {o for n in self.root.nodes for o in n.output}
        claims: dict[str, int] = {}
        for g in final.values():
            claims[g] = claims.get(g, 0) + 1
        mapping: dict[str, str] = {}
        for t, g in final.items():
            target = f"{t}{GRAD_SUFFIX}"
            if g in emitted and claims[g] == 1 and g != seed and target not in self.root._taken:
                mapping[g] = target
                self.root._taken.add(target)
        for node in self.root.nodes:
            node.input[:] = [mapping.get(i, i) for i in node.input]
            node.output[:] = [mapping.get(o, o) for o in node.output]
            _rename_reads(node, mapping)  # subgraphs of backward If nodes read gradients too
        for t, g in list(final.items()):
            final[t] = mapping.get(g, g)
        for i, g in enumerate(outputs):
            outputs[i] = mapping.get(g, g)

    def _assemble(self, wrt: list[str], outputs: list[str], seed_input) -> onnx.ModelProto:
        out_names = []
        for w, g in zip(wrt, outputs):
            name = f"{w}{GRAD_SUFFIX}"
            if g != name:
                if name in self.root._taken:
                    # Taken already, as when differentiating a gradient model a second time.
                    name = self.root._fresh(name)
                self.root.Identity(g, name=name)
            out_names.append(name)

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        graph.node.extend(self.root.nodes)
        if seed_input is not None:
            graph.input.append(seed_input)
        for w, name in zip(wrt, out_names):
            shape = self.info.shapes.get(w)
            vi = helper.make_tensor_value_info(name, self.info.dtypes.get(w, 1), shape)
            graph.output.append(vi)
        try:
            onnx.checker.check_model(checkable(model))
        except Exception as err:
            raise GradientError(
                f"the gradient graph is not valid ONNX (an onnxgrad bug): {err}"
            ) from err
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as err:  # onnx's own function bodies can fail its type check
            logger.warning("shape inference failed on the gradient graph: %s", err)
        return model


class _Pass:
    """One reverse pass over a list of forward nodes, emitting through one emitter.

    The main graph gets one pass; a rule that differentiates a subgraph (If, Loop, Scan)
    runs another over the subgraph's nodes, copied into the emitter's scope.
    """

    def __init__(self, base: Emitter, opsets: dict[str, int]):
        self.base = base
        self.opsets = opsets

    def is_float(self, name: str) -> bool:
        return self.base.info.dtypes.get(name, onnx.TensorProto.FLOAT) in FLOAT_TYPES

    def active_nodes(
        self, nodes: Sequence[onnx.NodeProto], wrt: Iterable[str], seeds: Iterable[str]
    ) -> tuple[list[onnx.NodeProto], set[str]]:
        """Nodes that some wrt tensor reaches and that reach a seed, in graph order.

        A node's subgraphs' outer-scope reads count as its inputs.
        """
        needs = set(wrt)
        for node in nodes:
            if any(i in needs for i in _reads(node) if i):
                entry = registry.lookup(node.op_type, node.domain)
                if entry is not None and entry.state != registry.RULE:
                    continue
                through = entry is not None and entry.through_integers
                needs.update(o for o in node.output if o and (through or self.is_float(o)))
        reaches = set(seeds)
        for node in reversed(nodes):
            if any(o in reaches for o in node.output):
                reaches.update(i for i in _reads(node) if i)
        active = [
            n
            for n in nodes
            if any(o in reaches and o in needs for o in n.output)
            and any(i in needs for i in _reads(n) if i)
        ]
        return active, needs

    def check_rules(self, active: Iterable[onnx.NodeProto]) -> None:
        missing = []
        for node in active:
            if registry.lookup(node.op_type, node.domain) is None:
                opset = _opset(self.opsets, node.domain)
                missing.append((node.op_type, node.domain, opset, node.name))
        if missing:
            raise MissingGradientError(missing)

    def accumulate(
        self, name: str, grads: dict[str, list[str]], final: dict[str, str]
    ) -> str | None:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) == 1:
            total = parts[0]
        else:
            b = self.base.scoped(f"{name}{GRAD_SUFFIX}/")
            total = b.Sum(*parts)  # dt = Σ grads that meet at t
        grads[name] = [total]
        final[name] = total
        return total

    def backward(self, node: onnx.NodeProto, needs: set[str], grads, final) -> None:
        dys = [self.accumulate(o, grads, final) if o else None for o in node.output]
        if all(dy is None for dy in dys):
            return
        entry = registry.lookup(node.op_type, node.domain)
        assert entry is not None and entry.fn is not None  # check_rules saw to it
        outer = tuple(scope_reads(node))
        sources = list(node.input) + list(outer)
        view = Node(
            node,
            _opset(self.opsets, node.domain),
            attributes(node),
            tuple(bool(i) and i in needs for i in sources),
            outer,
            self.opsets,
        )
        b = self.base.scoped(f"{node.name}{GRAD_SUFFIX}/")
        try:
            dxs = list(entry.fn(b, view, dys))
        except NotImplementedError as err:  # an attribute value or opset the rule lacks
            raise _unsupported(node, view.opset, str(err)) from err
        if any(dx is not None for dx in dxs[len(sources) :]):
            raise GradientError(
                f"the {node.op_type} rule returned {len(dxs)} gradients for {len(sources)} "
                f"inputs at node '{node.name}'"
            )
        logger.debug(
            "backward of %s '%s': %d input gradients",
            node.op_type,
            node.name,
            sum(dx is not None for dx in dxs),
        )
        for x, dx in zip(sources, dxs):
            if dx is None or not x or x not in needs:
                continue
            if entry.broadcast:
                dx = b.sum_to(dx, x, b.shape(node.output[0]))
            grads.setdefault(x, []).append(dx)


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if e.domain == "ai.onnx" else e.domain): e.version for e in model.opset_import}


def _opset(opsets: dict[str, int], domain: str) -> int:
    return opsets.get("" if domain == "ai.onnx" else domain, 0)


# Subgraphs: what rules for If, Loop and Scan build on.


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """The enclosing-scope tensors a graph reads: its nodes' inputs and their subgraphs'
    reads, less what the graph defines itself."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        local.update(node.output)
    names: set[str] = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        names.update(scope_reads(node))
    names.update(o.name for o in graph.output)
    return names - local


def scope_reads(node: onnx.NodeProto) -> list[str]:
    """The enclosing-scope tensors a node's subgraphs read, sorted (empty for most nodes)."""
    names: set[str] = set()
    for g in subgraphs(node):
        names |= graph_reads(g)
    return sorted(names)


def _unsupported(node: onnx.NodeProto, opset: int, text: str) -> UnsupportedOpError:
    """A rule's NotImplementedError as an UnsupportedOpError, its own words kept.

    Rules name the op and node themselves ("Conv node 'c' with auto_pad=SAME_UPPER: ...");
    such a message stays as it is, with the opset added where it lacks one.
    """
    error = UnsupportedOpError(node.op_type, node.name, opset, node.domain, detail=text)
    lead = f"{node.op_type} node '{node.name}'"
    if text.startswith(lead):
        rest = text[len(lead) :]
        if not rest.startswith(" (opset"):
            rest = f" (opset {opset}){rest}"
        error.args = (f"{lead}{rest}",)
    return error


def _reads(node: onnx.NodeProto) -> list[str]:
    return list(node.input) + scope_reads(node)


def names_in_use(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name a graph defines or outputs, inside its subgraphs too.

    What a node appended to the graph must not be called: ONNX needs one name per value
    across a graph and every body nested in it.
    """
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {o.name for o in graph.output}
    for node in graph.node:
        names.update(o for o in node.output if o)
        if node.name:
            names.add(node.name)
        for g in subgraphs(node):
            names |= names_in_use(g)
    return names


def _rename_reads(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    """Apply `mapping` to what a node's subgraphs read from enclosing scopes, at any depth."""
    if not mapping:
        return
    for g in subgraphs(node):
        for n in g.node:
            n.input[:] = [mapping.get(i, i) for i in n.input]
            _rename_reads(n, mapping)
        for out in g.output:
            out.name = mapping.get(out.name, out.name)


def subgraph_emitter(b: Emitter, label: str) -> Emitter:
    """An emitter for the body of a new subgraph (an If branch): its own node list, the
    names and tensor facts of `b`, the constants `b` has made so far (readable from inside)."""
    return Emitter(b.info, b.opset, [], f"{b.prefix}{label}", dict(b._constants), b._taken)


def inline_graph(
    b: Emitter, graph: onnx.GraphProto, bindings: dict[str, str], label: str
) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """Copy a subgraph's nodes into `b` under fresh names, its inputs bound to tensors.

    Args:
        b: where the copies go.
        graph: a GRAPH attribute (a Loop or Scan body, an If branch).
        bindings: the tensor each graph input reads.
        label: put into the copies' names, after the emitter's prefix (e.g. "iter3/").

    Returns:
        The copied nodes, and the new name of every name the graph defines (its inputs,
        initializers and node outputs). Tensor types and shapes carry over; names the
        graph reads from enclosing scopes stay as they are.
    """
    local = GraphInfo.from_graph(graph)
    mapping = dict(bindings)
    copies: list[onnx.NodeProto] = []
    for inner, outer in bindings.items():  # what the graph declares holds for what it reads
        if outer not in b.info.shapes and inner in local.shapes:
            b.info.shapes[outer] = list(local.shapes[inner])
        if outer not in b.info.dtypes and inner in local.dtypes:
            b.info.dtypes[outer] = local.dtypes[inner]

    def fresh(name: str) -> str:
        new = b._fresh(f"{b.prefix}{label}{name}")
        mapping[name] = new
        if name in local.dtypes:
            b.info.dtypes[new] = local.dtypes[name]
        if name in local.shapes:
            b.info.shapes[new] = list(local.shapes[name])
        return new

    for t in graph.initializer:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(t)
        tensor.name = fresh(t.name)
        copy = helper.make_node("Constant", [], [tensor.name], name=tensor.name, value=tensor)
        b.info.constants[tensor.name] = tensor
        b.nodes.append(copy)
        copies.append(copy)
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [mapping.get(i, i) for i in node.input]
        _rename_reads(copy, mapping)
        copy.output[:] = [fresh(o) if o else "" for o in node.output]
        copy.name = b._fresh(f"{b.prefix}{label}{node.name or node.op_type}")
        if node.op_type == "Constant" and node.output[0] in local.constants:
            b.info.constants[copy.output[0]] = local.constants[node.output[0]]
        b.nodes.append(copy)
        copies.append(copy)
    return copies, mapping


def nodes_gradient(
    b: Emitter,
    parent: Node,
    nodes: Sequence[onnx.NodeProto],
    seeds: dict[str, list[str]],
    wrt: Sequence[str],
) -> list[str | None]:
    """Emit, through `b`, the gradient of forward nodes already emitted there.

    Args:
        b: the emitter that holds (or whose scope can read) `nodes`.
        parent: the node whose rule asks (gives the opsets).
        nodes: forward nodes, in topological order.
        seeds: gradients of tensors (a list of parts for each; the parts are summed).
        wrt: the tensors whose gradients are wanted (distinct names).

    Returns:
        Per wrt name, its gradient, or None where the seeds do not depend on it.

    Raises:
        MissingGradientError: nodes on the way lack a rule (all named at once).
    """
    walk = _Pass(b, parent.opsets)
    active, needs = walk.active_nodes(nodes, wrt, seeds)
    walk.check_rules(active)
    grads = {name: list(parts) for name, parts in seeds.items() if parts}
    final: dict[str, str] = {}
    for node in reversed(active):
        walk.backward(node, needs, grads, final)
    return [walk.accumulate(w, grads, final) for w in wrt]


def graph_gradient(
    b: Emitter,
    parent: Node,
    graph: onnx.GraphProto,
    bindings: dict[str, str],
    dys: Sequence[str | None],
    wrt: Sequence[str],
    label: str = "",
) -> list[str | None]:
    """Recompute a subgraph in `b`'s scope and emit the gradient of its outputs.

    Args:
        b: the emitter (the rule's own, or one from `subgraph_emitter`).
        parent: the node that holds the subgraph.
        graph: the subgraph.
        bindings: the tensor each graph input reads.
        dys: per graph output, its gradient (or None).
        wrt: the tensors whose gradients are wanted: bound tensors or tensors the graph
            reads from enclosing scopes.
        label: put into the copies' names.

    Returns:
        Per wrt name, its gradient, or None where the outputs do not depend on it.
    """
    copies, mapping = inline_graph(b, graph, bindings, label)
    seeds: dict[str, list[str]] = {}
    for out, dy in zip(graph.output, dys):
        if dy is not None:
            seeds.setdefault(mapping.get(out.name, out.name), []).append(dy)
    return nodes_gradient(b, parent, copies, seeds, wrt)


def subgraph_input(
    b: Emitter, label: str, dtype: int | None = None, shape: Sequence | None = None
) -> str:
    """A fresh name for an input of a subgraph being built in `b` (a Loop body), typed when
    `dtype` (and `shape`) are given; pass it to `make_subgraph` among its `inputs`."""
    name = b._fresh(f"{b.prefix}{label}")
    if dtype is not None:
        b.info.dtypes[name] = dtype
    if shape is not None:
        b.info.shapes[name] = list(shape)
    return name


def make_subgraph(
    b: Emitter, name: str, outputs: Sequence[str], inputs: Sequence[str] = ()
) -> onnx.GraphProto:
    """A GraphProto of the nodes `b` emitted that `outputs` need, returning them.

    `inputs` (names from `subgraph_input`) become the graph's inputs, typed as `b` knows
    them; an If branch has none. An output that is not made inside (an input, an
    enclosing-scope tensor, or one returned twice) is passed through an Identity, so the
    graph defines each of its outputs.
    """
    made = {o for n in b.nodes for o in n.output}
    names, seen = [], set()
    for out in outputs:
        if out not in made or out in seen:
            out = b.Identity(out)
            made.add(out)
        seen.add(out)
        names.append(out)
    # The recomputed forward may hold nodes these outputs do not need: leave them out.
    live, kept = set(names), []
    for node in reversed(b.nodes):
        if any(o in live for o in node.output if o):
            kept.append(node)
            live.update(i for i in _reads(node) if i)
    kept.reverse()
    return helper.make_graph(kept, name, value_infos(b, inputs), value_infos(b, names))


def value_infos(b: Emitter, names: Sequence[str]) -> list[onnx.ValueInfoProto]:
    """ValueInfos of tensors `b` emitted or was told of, typed and shaped as `b` knows them."""
    return [
        helper.make_tensor_value_info(
            x, b.dtype(x), _dims(b.shape(x)) if b.shape(x) is not None else None
        )
        for x in names
    ]


def _dims(shape: Sequence[int | str | None]) -> list[int | str | None]:
    return [d if isinstance(d, (int, str)) else None for d in shape]
