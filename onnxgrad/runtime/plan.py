"""Compile a graph into a flat run plan.

A plan is made once per (requested outputs, overridden initializers): only the nodes the
outputs need, in topological order, each bound to its kernel and to integer slots;
nodes whose inputs are all constants are computed once, at compile time; a MatMul whose
product is only summed over its batch axes runs with that sum as one matrix product; each
slot is released right after its last reader, so intermediates do not outlive their use.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxgrad.errors import ExecutionError
from onnxgrad.importer import subgraphs
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


# glibc mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of returning them at once.

    A training step allocates and frees the same large arrays every time. By default
    glibc hands blocks above 128 KiB (a threshold that creeps up as blocks are freed)
    straight back to the system and trims the heap as soon as its top is free, so each
    step pays page faults to get the same memory back, which costs more than many
    kernels do. Raising both thresholds makes the heap act as a buffer pool: memory
    freed in one step serves the next. The process keeps its peak footprint instead of
    shrinking between steps, as any arena allocator (onnxruntime's, PyTorch's on GPU)
    does. The Trainer does this once per process, on Linux with glibc; set
    ONNXGRAD_MALLOC=default to leave malloc alone.

    Returns:
        Whether malloc was tuned (now or earlier).
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("ONNXGRAD_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) and libc.mallopt(
            _M_TRIM_THRESHOLD, 256 * 2**20
        )
    except (OSError, AttributeError):  # not glibc (musl, for one): nothing to tune
        return False
    _malloc_tuned = bool(ok)
    logger.debug("malloc tuned to keep freed blocks: %s", _malloc_tuned)
    return _malloc_tuned


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
        needed = needed_nodes(nodes, outputs)

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

        # 3. Fuse the pairs that one call computes faster (same sums, fewer passes).
        kernels = dict(kernels)
        live = _fuse_matmul_reduce_sum(live, kernels, known, set(outputs))
        live = _share_max_pool(live, kernels, set(outputs))

        produced = set(known) | set(inputs) | {o for n in live for o in n.output}
        for name in self.outputs:
            if name not in produced:
                raise ExecutionError(f"output '{name}' is not produced by any node of the model")

        # 4. Slots: constants first, then inputs, then what the live nodes write.
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

        # 5. Release each intermediate after its last reader.
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
        self._program = [(s.fn, s.ins, s.outs, s.free) for s in self.steps]
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
        k = 0
        try:
            # Plain tuples and a one-output shortcut: this loop is the executor's whole
            # per-node overhead.
            for k, (fn, ins, outs, free) in enumerate(self._program):
                results = fn(*[env[i] for i in ins])
                if len(outs) == 1 and results:
                    env[outs[0]] = results[0]
                else:
                    for index, value in zip(outs, results):
                        env[index] = value
                for index in free:
                    env[index] = None
        except ExecutionError:
            raise
        except Exception as err:
            step = self.steps[k]
            values = [env[i] for i in step.ins]
            raise _kernel_error(step.node, values, err) from err
        # Some numpy reductions give scalars; callers (and onnxruntime, fed them back) want
        # 0-d arrays.
        return [_as_array(env[i]) for i in self.output_slots]


def _as_array(value):
    return np.asarray(value) if isinstance(value, np.generic) else value


def _fuse_matmul_reduce_sum(
    live: list[onnx.NodeProto], kernels: dict[str, Kernel], known: dict, outputs: set[str]
) -> list[onnx.NodeProto]:
    """Replace MatMul → ReduceSum over the batch axes by one product.

    Weight gradients of layers applied to batched activations come out of the gradient
    builder as a batched MatMul (one small product per batch entry) whose result is summed
    over the batch: Σ_b A_b·B_b. That is one matrix product of A's rows laid side by side
    with B's rows stacked, (M, B·K) · (B·K, N), which BLAS runs much faster and which never
    materializes the (B, M, N) stack. The fused node keeps the ReduceSum's output name; the
    MatMul's output, read by nothing else, disappears. Shapes are only known at run time,
    so the fused kernel checks them and otherwise runs the two original kernels in turn.
    """
    readers: dict[str, int] = {}
    for node in live:
        for name in reads(node):
            readers[name] = readers.get(name, 0) + 1
    producer = {o: k for k, node in enumerate(live) for o in node.output}
    replaced: dict[int, onnx.NodeProto | None] = {}
    for k, node in enumerate(live):
        if node.op_type != "ReduceSum" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.input[0] if node.input else ""
        j = producer.get(source)
        if j is None or j in replaced or live[j].op_type != "MatMul":
            continue
        if readers.get(source) != 1 or source in outputs or len(live[j].input) != 2:
            continue
        axes = _constant_axes(node, known)
        if not axes:
            continue
        fused = onnx.NodeProto()
        fused.op_type = "MatMul+ReduceSum"
        fused.name = f"{live[j].name}+{node.name}"
        fused.input.extend(live[j].input)
        fused.output.extend(node.output[:1])
        keepdims = bool(next((a.i for a in node.attribute if a.name == "keepdims"), 1))
        axes_value = known.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        kernels[fused.name] = _matmul_reduce_sum(
            kernels[live[j].name], kernels[node.name], axes, keepdims, axes_value
        )
        replaced[j] = None
        replaced[k] = fused
    if replaced:
        logger.debug("plan: fused %d MatMul+ReduceSum pair(s)", len(replaced) // 2)
    return [replaced.get(k, node) for k, node in enumerate(live) if replaced.get(k, node)]


def _share_max_pool(
    live: list[onnx.NodeProto], kernels: dict[str, Kernel], outputs: set[str]
) -> list[onnx.NodeProto]:
    """Compute a MaxPool once when a later one repeats it only for its Indices.

    A MaxPool without the Indices output keeps no positions, so its gradient rule emits a
    second MaxPool over the same input with the same attributes, for Indices alone. The
    first node then takes the second's kernel (which yields both outputs) and its Indices
    name; the second disappears. Plans without the second node (forward only) are left
    as they are and pay nothing for indices.
    """
    readers: set[str] = {name for node in live for name in reads(node)}
    first: dict[tuple, int] = {}
    merged: dict[int, onnx.NodeProto | None] = {}
    for k, node in enumerate(live):
        if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx"):
            continue
        key = (tuple(node.input), _attribute_key(node))
        j = first.get(key)
        if j is None:
            if len(node.output) < 2 or not node.output[1]:
                first[key] = k
            continue
        y = node.output[0]
        if len(node.output) < 2 or not node.output[1] or y in readers or y in outputs:
            continue
        shared = onnx.NodeProto()
        shared.CopyFrom(live[j])
        shared.name = f"{live[j].name}+{node.name}"
        del shared.output[:]
        shared.output.extend([live[j].output[0], node.output[1]])
        kernels[shared.name] = kernels[node.name]
        merged[j] = shared
        merged[k] = None
        del first[key]
    if merged:
        logger.debug("plan: %d MaxPool(s) computed once with Indices", len(merged) // 2)
    return [merged.get(k, node) for k, node in enumerate(live) if merged.get(k, node)]


def _attribute_key(node: onnx.NodeProto) -> tuple:
    """A node's attributes as a comparable value, storage_order=0 counted as absent."""
    items = []
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "storage_order" and not value:
            continue
        items.append((attr.name, repr(value)))
    return tuple(sorted(items))


def _constant_axes(node: onnx.NodeProto, known: dict) -> tuple[int, ...] | None:
    """A ReduceSum's axes when fixed at compile time (input from opset 13, else attribute)."""
    if len(node.input) > 1 and node.input[1]:
        value = known.get(node.input[1])
        return None if value is None else tuple(int(a) for a in np.asarray(value).reshape(-1))
    for attr in node.attribute:
        if attr.name == "axes":
            return tuple(attr.ints)
    return None


def _matmul_reduce_sum(
    matmul: Kernel, reduce_sum: Kernel, axes: tuple[int, ...], keepdims: bool, axes_value
) -> Kernel:
    """Σ over the batch axes of A·B as one product, or the two kernels where that does not fit."""

    def run(a, b):
        nd = a.ndim
        batch_only = (
            nd >= 3
            and b.ndim == nd
            and a.shape[:-2] == b.shape[:-2]
            and a.dtype.kind == "f"
            and a.dtype == b.dtype
            and sorted(x % nd for x in axes) == list(range(nd - 2))
        )
        if not batch_only:
            (y,) = matmul(a, b)
            return reduce_sum(y, axes_value)
        m, n = a.shape[-2], b.shape[-1]
        # (B…, M, K) → (M, B…·K): a view whenever A is a transposed contiguous array, as the
        # gradient builder's Aᵀ is; (B…, K, N) → (B…·K, N).
        rows = np.moveaxis(a, -2, 0).reshape(m, -1)
        y = np.matmul(rows, b.reshape(-1, n))
        if keepdims:
            y = y.reshape((1,) * (nd - 2) + (m, n))
        return (y,)

    return run


def run_kernel(fn: Kernel, values: list, node: onnx.NodeProto) -> tuple:
    """Run one kernel with errors that name the node."""
    try:
        return tuple(fn(*values))
    except ExecutionError:
        raise
    except Exception as err:
        raise _kernel_error(node, values, err) from err


def _describe(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, list):
        return f"sequence of {len(value)}"
    return f"{getattr(value, 'dtype', type(value).__name__)}{list(np.shape(value))}"


def _kernel_error(node: onnx.NodeProto, values: list, err: Exception) -> ExecutionError:
    shapes = ", ".join(_describe(v) for v in values)
    return ExecutionError(
        f"{node.op_type} node '{node.name}' failed on inputs ({shapes}): "
        f"{type(err).__name__}: {err}"
    )


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def needed_nodes(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """The nodes (in the given order) that computing `outputs` runs."""
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
    for g in subgraphs(node):
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
