"""Compile a graph into a flat run plan.

A plan is made once per (requested outputs, overridden initializers): only the nodes the
outputs need, in topological order, each bound to its kernel and to integer slots;
nodes whose inputs are all constants are computed once, at compile time; each slot is
released right after its last reader, so intermediates do not outlive their use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxgrad.errors import ExecutionError
from onnxgrad.runtime.kernels import Kernel

logger = logging.getLogger(__name__)

# Ops whose results must not be computed at compile time.
_NOT_FOLDABLE = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


@dataclass(frozen=True)
class Step:
    """One node of the plan: its kernel, the slots it reads and writes, what dies after it."""

    fn: Kernel
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    free: tuple[int, ...]
    node: onnx.NodeProto


class Plan:
    """The compiled form of a graph for one set of requested outputs.

    Slot 0 always holds None and stands for absent optional inputs.
    """

    def __init__(
        self,
        nodes: Sequence[onnx.NodeProto],
        kernels: dict[str, Kernel],
        constants: dict[str, np.ndarray],
        inputs: Sequence[str],
        outputs: Sequence[str],
        fold: bool = True,
    ):
        self.slots: dict[str, int] = {"": 0}
        self.outputs = list(outputs)

        # 1. Keep only the nodes the outputs depend on.
        needed = _needed_nodes(nodes, outputs)

        # 2. Fold the nodes whose inputs are all known now.
        known = dict(constants)
        live = []
        for node in needed:
            ins = [i for i in node.input if i]
            foldable = fold and node.op_type not in _NOT_FOLDABLE and not _has_subgraph(node)
            if foldable and all(i in known for i in ins):
                values = [known[i] if i else None for i in node.input]
                results = run_kernel(kernels[node.name], values, node)
                known.update(zip(node.output, results))
            else:
                live.append(node)

        produced = set(known) | set(inputs) | {o for n in live for o in n.output}
        for name in self.outputs:
            if name not in produced:
                raise ExecutionError(f"output '{name}' is not produced by any node of the model")

        # 3. Slots: constants first, then inputs, then what the live nodes write.
        def slot(name: str) -> int:
            if name not in self.slots:
                self.slots[name] = len(self.slots)
            return self.slots[name]

        for name in inputs:
            slot(name)
        for name in self.outputs:
            slot(name)
        for node in live:
            for name in reads(node) + list(node.output):
                slot(name)
        self.base: list[np.ndarray | None] = [None] * len(self.slots)
        for name, index in self.slots.items():
            if name in known:
                self.base[index] = known[name]

        # 4. Release each intermediate after its last reader.
        last: dict[int, int] = {}
        for k, node in enumerate(live):
            for name in reads(node):
                if name:
                    last[self.slots[name]] = k
        keep = {self.slots[o] for o in self.outputs} | {
            self.slots[n] for n in known if n in self.slots
        }
        frees: list[list[int]] = [[] for _ in live]
        for index, k in last.items():
            if index not in keep:
                frees[k].append(index)
        for k, node in enumerate(live):  # outputs nobody reads die at once
            for name in node.output:
                index = self.slots[name]
                if name and index not in last and index not in keep:
                    frees[k].append(index)
        self.steps = [
            Step(
                kernels[node.name],
                tuple(self.slots[i] for i in reads(node)),
                tuple(self.slots[o] for o in node.output),
                tuple(frees[k]),
                node,
            )
            for k, node in enumerate(live)
        ]
        self.output_slots = [self.slots[o] for o in self.outputs]
        logger.debug("plan: %d nodes live, %d folded", len(live), len(needed) - len(live))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the plan on `feeds` (validated by the caller) and return the outputs."""
        env = list(self.base)
        slots = self.slots
        for name, value in feeds.items():
            index = slots.get(name)
            if index is not None:
                env[index] = value
        step = None
        try:
            for step in self.steps:
                results = step.fn(*[env[i] for i in step.ins])
                for index, value in zip(step.outs, results):
                    env[index] = value
                for index in step.free:
                    env[index] = None
        except ExecutionError:
            raise
        except Exception as err:
            values = [env[i] for i in step.ins]
            raise _kernel_error(step.node, values, err) from err
        return [env[i] for i in self.output_slots]


def run_kernel(fn: Kernel, values: list, node: onnx.NodeProto) -> tuple:
    """Run one kernel with errors that name the node."""
    try:
        return tuple(fn(*values))
    except ExecutionError:
        raise
    except Exception as err:
        raise _kernel_error(node, values, err) from err


def _kernel_error(node: onnx.NodeProto, values: list, err: Exception) -> ExecutionError:
    shapes = ", ".join(
        "None" if v is None else f"{getattr(v, 'dtype', type(v).__name__)}{list(np.shape(v))}"
        for v in values
    )
    return ExecutionError(
        f"{node.op_type} node '{node.name}' failed on inputs ({shapes}): "
        f"{type(err).__name__}: {err}"
    )


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def _needed_nodes(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    wanted = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in wanted for o in node.output):
            keep.append(node)
            wanted.update(i for i in node.input if i)
            wanted.update(_outer_names(node))
    keep.reverse()
    return keep


def reads(node: onnx.NodeProto) -> list[str]:
    """What a node's kernel receives: its inputs, then the outer-scope names its subgraphs
    read, sorted (the order `outer_names` gives the kernel)."""
    if not _has_subgraph(node):
        return list(node.input)
    return list(node.input) + outer_names(node)


def outer_names(node: onnx.NodeProto) -> list[str]:
    """The enclosing-scope tensors a node's subgraphs read, sorted by name."""
    return sorted(_outer_names(node))


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names.update(i for i in n.input if i and i not in local)
                names.update(_outer_names(n) - local)
    return names


def topological_order(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """The nodes sorted so that each comes after the producers of its inputs.

    Raises:
        ExecutionError: a node reads a tensor nothing produces, or the graph has a cycle.
    """
    produced = set(available) | {""}
    pending = list(nodes)
    order: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            reads = [i for i in node.input if i] + sorted(_outer_names(node))
            if all(i in produced for i in reads):
                order.append(node)
                produced.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            node = rest[0]
            missing = [i for i in node.input if i and i not in produced]
            raise ExecutionError(
                f"{node.op_type} node '{node.name}' reads {missing}, which no node, input or "
                "initializer produces (or the graph has a cycle)"
            )
        pending = rest
    return order
