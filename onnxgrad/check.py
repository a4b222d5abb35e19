"""`onnxgrad check MODEL`: a pre-flight report, a float64 gradient check, and repairs.

Three questions are answered before anyone trains:

1. **Pre-flight.** Which nodes lie on the paths from the loss to the trainable parameters,
   what gradient state each op has (rule, zero, non_differentiable, unsupported), and
   whether the numpy executor can run it. Every rule on the way is tried once on its own,
   so an attribute value a rule rejects is reported with the others, all at once.

2. **Gradient check.** The model is upcast to float64, fed random inputs (or samples from
   an .npz file), reduced to a scalar loss L = Σₖ sum(rₖ · yₖ) with fixed random weights
   rₖ (or the scalar output itself), and each parameter's analytic gradient is compared with
   central differences along random directions.

3. **Repairs.** Semantics-preserving fixes for traps exporters set: optional outputs a rule
   needs (a training-mode Dropout without its mask), weights held in Constant or
   ConstantOfShape nodes (which are then not trainable), and training-mode ops in inference
   graphs. Each repair is a function `model -> (new model, descriptions)`; an empty list
   means nothing to do.

Nothing here prints; `render` turns a report into the text the CLI shows.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxgrad.autodiff import rules as rule_registry
from onnxgrad.autodiff.builder import GRAD_SUFFIX, Node, names_in_use
from onnxgrad.autodiff.emitter import Emitter, GraphInfo
from onnxgrad.errors import DataError, GradientError, OnnxgradError, UnsupportedOpError
from onnxgrad.gradcheck import GradReport, check_gradients
from onnxgrad.importer import (
    FLOAT_TYPES,
    Source,
    attributes,
    graph_inputs,
    load,
    name_nodes,
    op_label,
    opset_of,
    read,
    subgraphs,
    tensor_array,
    trainable_parameters,
)
from onnxgrad.runtime import kernels as kernel_registry
from onnxgrad.runtime.kernels import KernelNode
from onnxgrad.runtime.plan import needed_nodes, outer_names, reads
from onnxgrad.runtime.session import Session

logger = logging.getLogger(__name__)

UNSUPPORTED = "unsupported"
LOSS_NAME = "onnxgrad_check_loss"
"""The scalar the gradient check differentiates, appended to the float64 copy."""

# Problem kinds.
MISSING_RULE = "missing rule"
RULE_REJECTS = "rule rejects node"
RULE_FAILS = "rule fails"
MISSING_KERNEL = "missing kernel"
KERNEL_REJECTS = "kernel rejects node"
GRADIENT_BUILD = "gradient graph"
NOT_FINITE = "not finite"
NO_PARAMETERS = "no parameters"

# Ops whose outputs are random draws: the float64 copy gets a fixed seed, so that the two
# runs of a central difference see the same draw.
_RANDOM_OPS = frozenset(
    {
        "Dropout",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
    }
)

# Where a Constant or ConstantOfShape holds a weight: (op type, input positions that hold weights).
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1),
    "Gemm": (0, 1, 2),
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "Einsum": tuple(range(8)),
    "PRelu": (1,),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "RNN": (1, 2, 3),
    "GRU": (1, 2, 3),
    "LSTM": (1, 2, 3, 7),
}

# Ops that only rearrange their data input (input 0): a weight read through them is still a
# weight (caffe2 exports Unsqueeze a normalization's scale before multiplying by it).
_VIEW_OPS = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"})

# Inputs the spec types as float32 only: the float64 copy leaves what feeds them alone.
_FLOAT32_INPUTS = (("Resize", 2), ("Upsample", 1))

_DEFAULT_INDEX_BOUND = 2
"""Random integer inputs are drawn from [0, bound); the bound when no consumer tells."""


@dataclass(frozen=True)
class NodeState:
    """A node on the paths from the loss to the parameters.

    Attributes:
        name, op_type, domain: the node's.
        opset: the opset of its domain in the loaded model.
        state: "rule", "zero", "non_differentiable" or "unsupported".
        kernel: whether the numpy executor has a kernel for the op.
    """

    name: str
    op_type: str
    domain: str
    opset: int
    state: str
    kernel: bool

    @property
    def op(self) -> str:
        """The op type, prefixed by its domain outside ai.onnx."""
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type


@dataclass(frozen=True)
class Problem:
    """Something that stops training or makes its gradients wrong.

    Attributes:
        kind: one of the problem kinds of this module (MISSING_RULE, ...).
        detail: what went wrong and what to do, in one sentence or two.
        op_type, domain, node, opset: where, when the problem belongs to a node.
    """

    kind: str
    detail: str
    op_type: str = ""
    domain: str = ""
    node: str = ""
    opset: int = 0

    def text(self) -> str:
        """One line: where, then what."""
        if not self.node:
            return f"{self.kind}: {self.detail}"
        op = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        return f"{self.kind}: {op} (node '{self.node}', opset {self.opset}): {self.detail}"


@dataclass(frozen=True)
class ParameterCheck:
    """The gradient check of one parameter.

    Attributes:
        name: the parameter.
        shape: its shape.
        grad_norm: the L2 norm of its analytic gradient.
        rel_error: |analytic − numeric| / (atol / rtol + scale), the worst direction;
            the check passes when it is at most rtol.
        ok: whether it passed.
        report: the raw comparison.
        note: set when the check passed only at a smaller step (a kink near the point).
    """

    name: str
    shape: tuple[int, ...]
    grad_norm: float
    rel_error: float
    ok: bool
    report: GradReport
    note: str = ""


@dataclass
class CheckReport:
    """Everything `check` found.

    Attributes:
        model: what was checked (a path or a description).
        opset, loaded_opset: the model's default-domain opset as written and as checked.
        loss: the outputs the loss reads.
        parameters: the parameters checked.
        elements: how many values they hold together.
        nodes: the nodes on the paths from the loss to the parameters.
        problems: every problem found, all at once.
        notes: facts worth knowing that are not problems (zero gradients, frozen paths).
        repairs: (repair kind, description) for each repair found.
        repaired: the repaired model (at the original opset) when repairs were applied.
        checks: the gradient check per parameter (empty when it did not run).
        skipped: why the gradient check did not run, if it did not.
        loss_text: how the scalar loss is formed from the outputs.
        settings: how the gradient check ran (inputs, directions, eps, tolerances).
    """

    model: str
    opset: int = 0
    loaded_opset: int = 0
    loss: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    elements: int = 0
    nodes: list[NodeState] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repairs: list[tuple[str, str]] = field(default_factory=list)
    repaired: onnx.ModelProto | None = None
    checks: list[ParameterCheck] = field(default_factory=list)
    skipped: str = ""
    loss_text: str = ""
    settings: str = ""

    @property
    def ok(self) -> bool:
        """No problem found and every gradient agrees."""
        return not self.problems and not self.skipped and all(c.ok for c in self.checks)


# Pre-flight.


@dataclass
class _Trial:
    """What trying one rule on its own gave."""

    error: BaseException | None
    emitted: list[onnx.NodeProto]


def on_path(
    model: onnx.ModelProto, loss: Sequence[str], wrt: Sequence[str]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """Nodes that a `wrt` tensor reaches and that reach a `loss` output, in graph order.

    Gradients flow through ops with a rule and through ops with none (so that a missing rule
    is seen); zero and non-differentiable ops are on the path but stop the flow, as they
    do in the gradient builder.

    Args:
        model: a loaded model.
        loss: output names.
        wrt: the tensors gradients are wanted for.

    Returns:
        (the nodes, the names of the float tensors that carry a gradient).
    """
    dtypes = GraphInfo.from_graph(model.graph).dtypes
    needs = set(wrt)
    for node in model.graph.node:
        if not any(i in needs for i in node.input if i):
            continue
        entry = rule_registry.lookup(node.op_type, node.domain)
        if entry is not None and entry.state != rule_registry.RULE:
            continue
        needs.update(
            o for o in node.output if o and dtypes.get(o, onnx.TensorProto.FLOAT) in FLOAT_TYPES
        )
    reaches = set(loss)
    for node in reversed(model.graph.node):
        if any(o in reaches for o in node.output):
            reaches.update(i for i in node.input if i)
    nodes = [
        n
        for n in model.graph.node
        if any(i in needs for i in n.input if i) and any(o in reaches for o in n.output)
    ]
    return nodes, needs & (reaches | set(wrt))


def preflight(
    model: onnx.ModelProto, loss: Sequence[str], wrt: Sequence[str]
) -> tuple[list[NodeState], list[Problem], list[str]]:
    """Every node between the loss and the parameters, and every problem, at once.

    1. Each node on the path gets its rule's state; a missing rule is a problem.

    2. Each rule on the path is tried on its own with stand-in output gradients: an
       UnsupportedOpError or NotImplementedError (an attribute value the rule does not
       handle) is a problem naming the node, and so is any other failure (a rule bug).

    3. Every forward node needs a numpy kernel that accepts its attributes, and every op
       the tried rules emit needs a kernel too.

    Args:
        model: a loaded model.
        loss: the output names the loss reads.
        wrt: the parameters.

    Returns:
        (the nodes on the path, the problems, notes).
    """
    nodes, needs = on_path(model, loss, wrt)
    states, problems, notes = [], [], []
    info = GraphInfo.from_graph(model.graph)
    taken = names_in_use(model.graph)
    backward_ops: dict[str, str] = {}

    # 1 and 2. States, and one trial per rule.
    for node in nodes:
        opset = opset_of(model, node.domain)
        entry = rule_registry.lookup(node.op_type, node.domain)
        state = UNSUPPORTED if entry is None else entry.state
        has_kernel = kernel_registry.lookup(node.op_type, node.domain) is not None
        states.append(NodeState(node.name, node.op_type, node.domain, opset, state, has_kernel))
        where = _where(node, opset)
        if entry is None:
            problems.append(
                Problem(
                    MISSING_RULE,
                    "no gradient rule is registered for this op; freeze the parameters "
                    "before it (--wrt) or file an issue",
                    **where,
                )
            )
            continue
        if entry.state == rule_registry.ZERO:
            notes.append(
                f"{node.op_type} node '{node.name}' is piecewise constant: gradients through "
                "it are zero"
            )
            continue
        if entry.state == rule_registry.NON_DIFFERENTIABLE:
            if not any(info.dtypes.get(o) in FLOAT_TYPES for o in node.output if o):
                continue  # integer or boolean results (Shape, ArgMax, Equal) carry none anyway
            notes.append(
                f"{node.op_type} node '{node.name}' is not differentiable: no gradient flows "
                "back through it"
            )
            continue
        trial = _try_rule(model, info, taken, node, needs, opset)
        for emitted in trial.emitted:
            backward_ops.setdefault(emitted.op_type, node.name)
        if trial.error is None:
            continue
        err = trial.error
        if isinstance(err, (UnsupportedOpError, NotImplementedError)):
            problems.append(Problem(RULE_REJECTS, _one_line(err), **where))
        else:
            problems.append(
                Problem(
                    RULE_FAILS,
                    f"the rule raised {type(err).__name__}: {_one_line(err)} (an onnxgrad bug; "
                    "please report it)",
                    **where,
                )
            )

    # 3. Kernels: the whole forward graph runs, and so does what the rules emit.
    problems.extend(_kernel_problems(model))
    for op_type, origin in sorted(backward_ops.items()):
        if kernel_registry.lookup(op_type) is None:
            problems.append(
                Problem(
                    MISSING_KERNEL,
                    f"the backward op {op_type}, emitted by the rule of node '{origin}', has no "
                    "numpy kernel; run the gradient model with backend='onnxruntime'",
                )
            )

    reached = {i for n in nodes for i in n.input}
    for name in wrt:
        if name not in reached and name not in loss:
            notes.append(f"the loss does not depend on '{name}': its gradient is zero")
    return states, problems, notes


def _try_rule(
    model: onnx.ModelProto,
    info: GraphInfo,
    taken: set[str],
    node: onnx.NodeProto,
    needs: set[str],
    opset: int,
) -> _Trial:
    """Run one rule against a scratch emitter, as the builder would, and keep what it did."""
    entry = rule_registry.lookup(node.op_type, node.domain)
    emitter = Emitter(info, opset_of(model), nodes=[], taken=taken)
    dys: list[str | None] = []
    for out in node.output:
        if out and out in needs:
            dy = f"{out}{GRAD_SUFFIX}/preflight"
            info.dtypes[dy] = info.dtypes.get(out, onnx.TensorProto.FLOAT)
            if out in info.shapes:
                info.shapes[dy] = list(info.shapes[out])
            dys.append(dy)
        else:
            dys.append(None)
    if entry is None or entry.fn is None or all(dy is None for dy in dys):
        return _Trial(None, [])
    view = Node(node, opset, attributes(node), tuple(bool(i) and i in needs for i in node.input))
    b = emitter.scoped(f"{node.name}{GRAD_SUFFIX}/")
    try:
        dxs = list(entry.fn(b, view, dys))
        if entry.broadcast:
            for x, dx in zip(node.input, dxs):
                if dx is not None and x in needs:
                    b.sum_to(dx, x, b.shape(node.output[0]))
    except Exception as err:  # noqa: BLE001 - every rule failure is reported, none stops the rest
        return _Trial(err, emitter.nodes)
    return _Trial(None, emitter.nodes)


def _kernel_problems(model: onnx.ModelProto) -> list[Problem]:
    """Forward nodes (subgraphs included) without a numpy kernel, or whose kernel refuses."""
    problems = []
    dtypes = {k: helper.tensor_dtype_to_np_dtype(v) for k, v in _dtypes(model.graph).items()}

    def visit(graph: onnx.GraphProto, inside: str) -> None:
        for node in graph.node:
            opset = opset_of(model, node.domain)
            where = _where(node, opset)
            factory = kernel_registry.lookup(node.op_type, node.domain)
            if factory is None:
                problems.append(
                    Problem(
                        MISSING_KERNEL,
                        f"the numpy executor has no kernel for this op{inside}; run with "
                        "backend='onnxruntime'",
                        **where,
                    )
                )
            elif not inside:
                info = KernelNode(
                    node.op_type,
                    node.domain,
                    node.name,
                    opset,
                    attributes(node),
                    list(node.input),
                    list(node.output),
                    [dtypes.get(i) for i in node.input],
                    outer_names(node),
                )
                try:
                    factory(info)
                except Exception as err:  # noqa: BLE001 - reported as a problem of this node
                    problems.append(Problem(KERNEL_REJECTS, _one_line(err), **where))
            for g in subgraphs(node):
                visit(g, f" (in a subgraph of node '{node.name}')")

    visit(model.graph, "")
    return problems


# The float64 copy and its inputs.


def upcast(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float64 copy of a model: every floating-point tensor becomes double.

    Initializers, Constant values, tensor attributes, Cast and dtype targets, and the
    element types of inputs, outputs and value_info change, subgraphs included; integer
    and boolean tensors stay as they are, and so do Resize and Upsample scales (and the
    node or initializer that makes them), which the spec allows in float32 only.

    Args:
        model: a ModelProto (not modified).

    Returns:
        The float64 model.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _upcast_graph(out.graph)
    return out


def _upcast_graph(graph: onnx.GraphProto, keep: set[str] | None = None) -> None:
    keep = set() if keep is None else keep
    keep |= _float_only(graph)
    for i, t in enumerate(graph.initializer):
        if t.data_type in FLOAT_TYPES and t.name not in keep:
            graph.initializer[i].CopyFrom(_double(t))
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type in FLOAT_TYPES and vi.name not in keep:
            tt.elem_type = onnx.TensorProto.DOUBLE
    for node in graph.node:
        if not any(o in keep for o in node.output):
            _upcast_node(node, keep)


def _float_only(graph: onnx.GraphProto) -> set[str]:
    """Tensors read where the spec allows float32 only (Resize and Upsample scales)."""
    names = set()
    for node in graph.node:
        for op, index in _FLOAT32_INPUTS:
            if node.op_type == op and len(node.input) > index and node.input[index]:
                names.add(node.input[index])
    return names


def _upcast_node(node: onnx.NodeProto, keep: set[str]) -> None:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in FLOAT_TYPES:
            attr.t.CopyFrom(_double(attr.t))
        elif attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT:
            if attr.i in FLOAT_TYPES:
                attr.i = onnx.TensorProto.DOUBLE
        elif attr.type == onnx.AttributeProto.GRAPH:
            _upcast_graph(attr.g, set(keep))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                _upcast_graph(g, set(keep))
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        # value_float(s) always make float32: restate them as a double tensor.
        for attr in list(node.attribute):
            if attr.name in ("value_float", "value_floats"):
                value = np.asarray(helper.get_attribute_value(attr), np.float64)
                node.attribute.remove(attr)
                node.attribute.append(
                    helper.make_attribute("value", numpy_helper.from_array(value))
                )


def _double(tensor: onnx.TensorProto) -> onnx.TensorProto:
    value = tensor_array(tensor).astype(np.float64)
    return numpy_helper.from_array(value, tensor.name)


def seeded(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy whose random ops (Dropout, RandomNormal, ...) all carry a fixed seed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type in _RANDOM_OPS and not any(a.name == "seed" for a in node.attribute):
            # Dropout's seed is an int; the samplers' is a float.
            value = seed if node.op_type == "Dropout" else float(seed)
            node.attribute.append(helper.make_attribute("seed", value))
    return out


def random_feeds(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray] | None = None,
    *,
    samples: int = 2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Inputs for every graph input of a (float64) model.

    Arrays from `data` are used first: the first `samples` rows, floats cast to the input's
    type. The others are drawn: floats from a standard normal; integers (class labels,
    token ids) from [0, bound), where the bound comes from what reads them (the size of
    the axis a Gather indexes, a OneHot depth, a loss's number of classes), else 2;
    booleans at random. A symbolic dimension is `samples` long, the same one everywhere.

    Raises:
        DataError: a data array does not fit its input.
    """
    rng = np.random.default_rng(seed)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the bounds then fall back to the default
        inferred = model
    sizes: dict[str, int] = {}
    feeds = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type or onnx.TensorProto.FLOAT)
        if data is not None and vi.name in data:
            value = np.asarray(data[vi.name])
            if value.ndim >= 1 and tt.shape.dim and not tt.shape.dim[0].HasField("dim_value"):
                value = value[:samples]
            if value.dtype.kind != np.dtype(dtype).kind and not (
                value.dtype.kind in "iu" and np.dtype(dtype).kind in "iu"
            ):
                raise DataError(
                    f"data array '{vi.name}' is {value.dtype.name} but the input is "
                    f"{np.dtype(dtype).name}: save it with the input's type"
                )
            feeds[vi.name] = value.astype(dtype)
            continue
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(sizes.setdefault(d.dim_param or f"?{len(sizes)}", samples))
        kind = np.dtype(dtype).kind
        if kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif kind in "iu":
            bound = _index_bound(inferred, vi.name)
            feeds[vi.name] = rng.integers(0, bound, size=shape).astype(dtype)
        elif kind == "b":
            feeds[vi.name] = rng.random(shape) < 0.5
        else:
            raise DataError(
                f"input '{vi.name}' is {np.dtype(dtype).name}: random values cannot be made for "
                "it; give it with --data"
            )
    return feeds


def _index_bound(model: onnx.ModelProto, name: str) -> int:
    """A safe exclusive upper bound for random integers fed to input `name`."""
    info = GraphInfo.from_graph(model.graph)
    bounds = []
    for node in model.graph.node:
        attrs = attributes(node)
        for k, i in enumerate(node.input):
            if i != name:
                continue
            size = None
            if node.op_type in ("Gather", "GatherElements") and k == 1:
                size = _dim(info, node.input[0], attrs.get("axis", 0))
            elif node.op_type == "OneHot" and k == 0:
                depth = _constant(info, node.input[1])
                size = None if depth is None else int(np.asarray(depth).reshape(-1)[0])
            elif (
                node.op_type in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss") and k == 1
            ):
                size = _dim(info, node.input[0], 1)
            if isinstance(size, int) and size > 0:
                bounds.append(size)
    return min(bounds) if bounds else _DEFAULT_INDEX_BOUND


def _dim(info: GraphInfo, name: str, axis: int) -> int | None:
    shape = info.shapes.get(name)
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def _constant(info: GraphInfo, name: str) -> np.ndarray | None:
    tensor = info.constants.get(name)
    return None if tensor is None else tensor_array(tensor)


def with_loss(
    model: onnx.ModelProto, outputs: Sequence[str], values: Sequence[np.ndarray], seed: int = 0
) -> tuple[onnx.ModelProto, str]:
    """Append L = Σₖ sum(rₖ · yₖ) over `outputs`, with fixed random weights rₖ.

    A single output that holds one element is the loss itself and nothing is appended.

    Args:
        model: a float64 model.
        outputs: the output names.
        values: their values on the check's feeds (for the shapes of rₖ).
        seed: seeds the weights rₖ.

    Returns:
        (the model, the loss output's name).
    """
    if len(outputs) == 1 and np.size(values[0]) == 1:
        return model, outputs[0]
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    parts = []
    for k, (name, value) in enumerate(zip(outputs, values)):
        r = rng.standard_normal(np.shape(value)).astype(value.dtype)
        prefix = f"{LOSS_NAME}/{k}"
        graph.node.extend(
            [
                helper.make_node(
                    "Constant",
                    [],
                    [f"{prefix}/r"],
                    name=f"{prefix}/r",
                    value=numpy_helper.from_array(r),
                ),
                helper.make_node("Mul", [name, f"{prefix}/r"], [f"{prefix}/ry"], f"{prefix}/Mul"),
                helper.make_node(
                    "ReduceSum", [f"{prefix}/ry"], [f"{prefix}/sum"], f"{prefix}/Sum", keepdims=0
                ),
            ]
        )
        parts.append(f"{prefix}/sum")
    graph.node.append(helper.make_node("Sum", parts, [LOSS_NAME], name=LOSS_NAME))
    dtype = helper.np_dtype_to_tensor_dtype(np.asarray(values[0]).dtype)
    graph.output.append(helper.make_tensor_value_info(LOSS_NAME, dtype, []))
    return out, LOSS_NAME


def only_for(
    model: onnx.ModelProto, outputs: Sequence[str]
) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    """A copy that computes only `outputs`: the nodes they need, and the inputs those read.

    Args:
        model: a loaded model (not modified).
        outputs: names of graph outputs.

    Returns:
        (the copy, or `model` itself when it computes nothing else; the nodes left out, in
        graph order).
    """
    nodes = list(model.graph.node)  # one wrapper per node, so identities hold below
    kept = {id(n) for n in needed_nodes(nodes, outputs)}
    needed = {k for k, n in enumerate(nodes) if id(n) in kept}
    dropped = [n for k, n in enumerate(nodes) if k not in needed]
    if not dropped and len(model.graph.output) == len(outputs):
        return model, []
    wanted = set(outputs) | {name for k in needed for name in reads(nodes[k]) if name}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    keep = [n for k, n in enumerate(graph.node) if k in needed]
    del graph.node[:]
    graph.node.extend(keep)
    kept_outputs = [o for o in graph.output if o.name in wanted]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name in wanted or i.name in inits]
    del graph.input[:]
    graph.input.extend(inputs)
    return out, dropped


def _off_path_notes(dropped: Sequence[onnx.NodeProto], loss: Sequence[str]) -> list[str]:
    """A note on the nodes the loss does not need that the numpy executor cannot run."""
    missing = [n for n in dropped if kernel_registry.lookup(n.op_type, n.domain) is None]
    if not missing:
        return []
    ops = ", ".join(f"{op_label(n)} node '{n.name}'" for n in missing)
    note = (
        f"{len(missing)} node(s) that the loss ({', '.join(loss)}) does not need have no numpy "
        f"kernel: {ops}; they are left out of the check (the onnxruntime backend runs them)"
    )
    return [note]


# The whole check.


def check(
    source: Source,
    *,
    data: dict[str, np.ndarray] | None = None,
    loss: Sequence[str] | None = None,
    wrt: Sequence[str] | None = None,
    samples: int = 2,
    directions: int = 3,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    seed: int = 0,
    fix: bool = False,
) -> CheckReport:
    """Pre-flight report, repairs, and a float64 gradient check of a model.

    Args:
        source: a path, bytes or ModelProto.
        data: input arrays by name (e.g. from an .npz); missing inputs are drawn at random.
        loss: the outputs the loss reads (default: every floating-point output).
        wrt: the parameters to check (default: every trainable parameter).
        samples: rows taken from `data`, and the length of symbolic dimensions.
        directions: random directions per parameter.
        eps: the finite-difference step.
        rtol: the relative tolerance of the comparison.
        seed: seeds the inputs, the loss weights and the directions.
        fix: apply the repairs; the report then checks (and holds) the repaired model.

    Returns:
        The report; `report.ok` tells whether everything passed.

    Raises:
        ModelLoadError: the model cannot be read.
        GradientError: a `loss` name is not an output, or a `wrt` name is not a tensor.
        DataError: `data` does not fit the model.
    """
    original = read(source)
    name_nodes(original.graph)
    report = CheckReport(
        model=str(source) if isinstance(source, (str, os.PathLike)) else "the model"
    )
    report.opset = opset_of(original)

    # 1. Repairs: found on the model as written, applied in order when asked.
    target = original
    for kind, repair in REPAIRS:
        repaired, changes = repair(target if fix else original)
        report.repairs.extend((kind, c) for c in changes)
        if fix:
            target = repaired
    if fix:
        report.repaired = target

    # 2. What to differentiate, with respect to what. Only what computes the loss is
    #    checked: nodes that make other outputs (a classifier's label, a ZipMap) stay out
    #    of the way, and are only noted when the numpy executor cannot run them.
    model = load(target)
    report.loaded_opset = opset_of(model)
    report.loss = _loss_outputs(model, loss)
    model, dropped = only_for(model, report.loss)
    report.notes.extend(_off_path_notes(dropped, report.loss))
    report.parameters = _parameters(model, wrt)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    report.elements = sum(sizes.get(p, 0) for p in report.parameters)
    if not report.parameters:
        report.problems.append(
            Problem(NO_PARAMETERS, "the model has no trainable parameters: nothing to check")
        )
        report.skipped = "there are no parameters"
        return report

    # 3. Pre-flight.
    report.nodes, problems, notes = preflight(model, report.loss, report.parameters)
    report.notes.extend(notes)
    report.problems.extend(problems)
    if report.problems:
        report.skipped = "fix the problems above first"
        return report

    # 4. The gradient check, in float64.
    _gradient_check(model, report, data, samples, directions, eps, rtol, seed)
    return report


def _loss_outputs(model: onnx.ModelProto, loss: Sequence[str] | None) -> list[str]:
    outputs = [o.name for o in model.graph.output]
    if loss:
        unknown = [n for n in loss if n not in outputs]
        if unknown:
            raise GradientError(
                f"loss output(s) {', '.join(unknown)} not in the model; its outputs are: "
                f"{', '.join(outputs)}"
            )
        chosen = list(loss)
    else:
        chosen = outputs
    floats = [
        o.name
        for o in model.graph.output
        if o.name in chosen
        and o.type.HasField("tensor_type")
        and o.type.tensor_type.elem_type in FLOAT_TYPES
    ]
    if loss and len(floats) != len(chosen):
        bad = [n for n in chosen if n not in floats]
        raise GradientError(
            f"loss output(s) are not floating-point tensors: {_describe_outputs(model, bad)}"
        )
    if not floats:
        raise GradientError(
            "the model has no floating-point tensor output to differentiate: "
            f"{_describe_outputs(model, outputs)}; name one with --loss, or make the float "
            "tensor such a node reads an output of the model"
        )
    return floats


def _describe_outputs(model: onnx.ModelProto, names: Sequence[str]) -> str:
    """Each output's type and the node that makes it: 'p' is a sequence made by ZipMap ..."""
    types = {o.name: o.type for o in model.graph.output}
    makers = {o: n for n in model.graph.node for o in n.output}
    parts = []
    for name in names:
        text = f"'{name}' is {_type_name(types[name])}"
        node = makers.get(name)
        if node is not None:
            text += f" (made by {op_label(node)} node '{node.name}'"
            reads = [i for i in node.input if i]
            text += f" from '{reads[0]}')" if reads else ")"
        parts.append(text)
    return "; ".join(parts)


def _type_name(tp: onnx.TypeProto) -> str:
    """A type as the spec writes it: tensor(float), seq(map(int64,tensor(float)))."""
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        elem = tp.tensor_type.elem_type
        return f"tensor({helper.tensor_dtype_to_np_dtype(elem).name if elem else '?'})"
    if kind == "sequence_type":
        return f"seq({_type_name(tp.sequence_type.elem_type)})"
    if kind == "map_type":
        key = helper.tensor_dtype_to_np_dtype(tp.map_type.key_type).name
        return f"map({key},{_type_name(tp.map_type.value_type)})"
    if kind == "optional_type":
        return f"optional({_type_name(tp.optional_type.elem_type)})"
    return kind or "of unknown type"


def _parameters(model: onnx.ModelProto, wrt: Sequence[str] | None) -> list[str]:
    if wrt is None:
        return trainable_parameters(model)
    inits = {t.name: t for t in model.graph.initializer}
    for name in wrt:
        if name not in inits:
            raise GradientError(
                f"'{name}' is not an initializer of the model; its trainable parameters are: "
                f"{', '.join(trainable_parameters(model)) or '(none)'}"
            )
        if inits[name].data_type not in FLOAT_TYPES:
            raise GradientError(f"'{name}' is not floating point: it has no gradient")
    return list(wrt)


def _gradient_check(
    model: onnx.ModelProto,
    report: CheckReport,
    data: dict[str, np.ndarray] | None,
    samples: int,
    directions: int,
    eps: float,
    rtol: float,
    seed: int,
) -> None:
    # 1. The float64 copy, its inputs, and its outputs there.
    model64 = seeded(upcast(model), seed)
    feeds = random_feeds(model64, data, samples=samples, seed=seed)
    drawn = [n for n in feeds if data is None or n not in data]
    report.settings = (
        f"float64; inputs {'drawn at random' if len(drawn) == len(feeds) else 'from --data'}"
        f" ({', '.join(f'{k} {list(v.shape)}' for k, v in feeds.items())}); {directions} random "
        f"direction(s) per parameter; eps {eps:g}; rtol {rtol:g}"
    )
    try:
        values = Session(model64).run(report.loss, feeds)
    except (OnnxgradError, NotImplementedError) as err:
        report.problems.append(
            Problem(GRADIENT_BUILD, f"the float64 model does not run: {_one_line(err)}")
        )
        report.skipped = "the model does not run in float64"
        return
    bad = [n for n, v in zip(report.loss, values) if not np.all(np.isfinite(v))]
    if bad:
        report.problems.append(
            Problem(
                NOT_FINITE,
                f"output(s) {', '.join(bad)} are not finite on the check's inputs; give "
                "realistic inputs with --data",
            )
        )
        report.skipped = "the outputs are not finite"
        return
    scale = max(1.0, sum(float(np.sum(np.abs(v))) for v in values))

    # 2. Analytic gradients against central differences.
    with_l, loss_name = with_loss(model64, report.loss, values, seed)
    if loss_name != LOSS_NAME:
        report.loss_text = f"{loss_name} (a scalar output)"

    def compare(wrt: list[str], step: float, draw: int) -> list[GradReport]:
        return check_gradients(
            with_l,
            feeds,
            wrt=wrt,
            loss=loss_name,
            eps=step,
            full_max=0,
            directions=directions,
            seed=draw,
        )

    try:
        results = compare(report.parameters, eps, seed)
    except (OnnxgradError, NotImplementedError) as err:
        report.problems.append(
            Problem(GRADIENT_BUILD, f"the gradient check could not run: {_one_line(err)}")
        )
        report.skipped = "the gradient graph could not be built or run"
        return

    # 3. One verdict per parameter. A failure is tried again with steps ten and a hundred
    #    times smaller along new directions: a ReLU or max whose input lies within eps of
    #    its kink spoils central differences (and a net with millions of ReLUs has some that
    #    close), while a wrong gradient stays wrong at any step.
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for result in results:
        rel = _relative_error(result, scale, eps, rtol)
        note = ""
        for k, smaller in enumerate((eps / 10, eps / 100)):
            if rel <= rtol:
                break
            retry = compare([result.name], smaller, seed + 1 + k)[0]
            retry_rel = _relative_error(retry, scale, smaller, rtol)
            if retry_rel <= rtol:
                note = (
                    f"'{result.name}' passes at eps {smaller:g} (relative error {retry_rel:.1e}) "
                    f"but not at {eps:g} ({rel:.1e}): the loss has a kink (ReLU, max, ...) "
                    "that close to the test point"
                )
                rel = retry_rel
        norm = float(np.linalg.norm(result.grad)) if result.grad is not None else float("nan")
        ok = bool(rel <= rtol and np.isfinite(norm))
        report.checks.append(
            ParameterCheck(result.name, dims.get(result.name, ()), norm, rel, ok, result, note)
        )


def _relative_error(result: GradReport, scale: float, eps: float, rtol: float) -> float:
    """|analytic − numeric| / (atol / rtol + size): at most rtol means the check passes.

    Central differences lose about 1e-16 · Σ|terms of the loss| / eps to rounding; atol
    allows a hundred times that, so that a zero gradient passes against numeric noise.
    """
    atol = 1e-8 * scale * max(1e-6 / eps, 1.0)
    size = max(
        float(np.max(np.abs(result.numeric), initial=0.0)),
        float(np.max(np.abs(result.analytic), initial=0.0)),
    )
    return result.abs_error / (atol / rtol + size)


# Repairs.


def name_needed_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Name the optional outputs that exporters omit but a gradient rule needs.

    A rule that refuses a node is tried again with each absent optional output (from the
    op's schema) given a name; when that satisfies it, the repair names that output. Adding
    an output changes no value the model computes. A training-mode Dropout without its mask
    is the common case; MaxPool without Indices needs nothing.

    Args:
        model: a ModelProto (not modified), at any opset.

    Returns:
        (the repaired model, one description per output named).
    """
    out = _copy_named(model)
    loaded = load(out)
    info = GraphInfo.from_graph(loaded.graph)
    taken = names_in_use(loaded.graph)
    by_name = {n.name: n for n in out.graph.node}
    changes = []
    for node in loaded.graph.node:
        entry = rule_registry.lookup(node.op_type, node.domain)
        if entry is None or entry.state != rule_registry.RULE or node.name not in by_name:
            continue
        opset = opset_of(loaded, node.domain)
        needs = _float_names(info, node)
        first = _try_rule(loaded, info, taken, node, needs, opset)
        if not isinstance(first.error, (UnsupportedOpError, NotImplementedError)):
            continue
        for index, label in _absent_optional_outputs(node, opset):
            trial_node = onnx.NodeProto()
            trial_node.CopyFrom(node)
            name = _fresh(f"{node.name}_{label}", taken)
            while len(trial_node.output) <= index:
                trial_node.output.append("")
            trial_node.output[index] = name
            if _try_rule(loaded, info, taken, trial_node, needs, opset).error is not None:
                continue
            target = by_name[node.name]
            while len(target.output) <= index:
                target.output.append("")
            target.output[index] = name
            changes.append(
                f"{node.op_type} node '{node.name}': named its optional output '{label}' as "
                f"'{name}': its gradient rule needs it"
            )
            break
    return out, changes


@dataclass(frozen=True)
class ConstantWeight:
    """A weight held in a Constant or ConstantOfShape node instead of an initializer.

    Such a weight computes like any other but is not trainable: only initializers are
    parameters. `constants_to_initializers` turns it into one.

    Attributes:
        name: the node's output, the name the initializer takes.
        node: the node's name.
        op_type: "Constant" or "ConstantOfShape".
        shape: the weight's shape.
        dtype: its ONNX element type.
        reader: the op type and name of a node that reads it at a weight position
            (directly, or through Reshape, Unsqueeze and other view ops).
    """

    name: str
    node: str
    op_type: str
    shape: tuple[int, ...]
    dtype: int
    reader: tuple[str, str]

    @property
    def elements(self) -> int:
        """How many values it holds."""
        return int(np.prod(self.shape, dtype=np.int64))


def constant_weights(model: onnx.ModelProto) -> list[ConstantWeight]:
    """The weights of a model that Constant or ConstantOfShape nodes hold.

    A Constant qualifies when it holds a finite floating-point tensor of rank 1 or more and
    at least two elements; a ConstantOfShape when its shape is a constant (an initializer or
    a Constant) of that size and its fill value is a finite float. Either must be read at a
    weight position (MatMul, Gemm, Conv, Add, Mul, normalization scales and biases,
    recurrent weights), directly or through view ops (Reshape, Unsqueeze, ...) that only
    rearrange it. Nothing is computed: a ConstantOfShape's values are not materialized.
    Nodes inside the bodies of If, Loop and Scan count too, read there or in bodies nested
    deeper: some exporters put the whole network, weights included, in an If branch.

    Args:
        model: a ModelProto, at any opset.

    Returns:
        One entry per qualifying node, in graph order (unnamed nodes named as `load`
        names them).
    """
    named = _copy_named(model)
    shapes = _constant_shapes(named)
    return [w for g in _all_graphs(named.graph) for w, _ in _constant_weights_in(g, shapes)]


def constants_to_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Turn weights held in Constant or ConstantOfShape nodes into trainable initializers.

    Which nodes qualify is `constant_weights`'s rule. The initializer keeps the node's
    output name, so every reader is unchanged; a ConstantOfShape becomes a tensor of its
    shape filled with its value, and its shape tensor goes when nothing else reads it. In
    IR < 4 models, where every initializer is also a graph input, the new ones are listed
    as inputs too. A node inside a subgraph becomes an initializer of the main graph, which
    the subgraph reads from its enclosing scope; its name is made unique in the model first
    when another subgraph defines the same one.

    Args:
        model: a ModelProto (not modified).

    Returns:
        (the repaired model, one description per node converted).
    """
    out = _copy_named(model)
    graph = out.graph
    graphs = list(_all_graphs(graph))
    shapes = _constant_shapes(out)
    defined = Counter(name for g in graphs for name in _defined(g))
    taken = set(defined)
    changes: dict[int, list[str]] = {}
    # Deepest bodies first: rewriting a graph's node list copies the bodies inside it.
    for order, home in reversed(list(enumerate(graphs))):
        converted, fills = set(), set()
        for weight, node in _constant_weights_in(home, shapes):
            name = weight.name
            if home is not graph and defined[name] > 1:
                name = _fresh(f"{name}__{home.name}", taken)
                _rename_reads(home, weight.name, name)
            if weight.op_type == "Constant":
                init = onnx.TensorProto()
                init.CopyFrom(_constant_tensor(node))
                init.name = name
            else:
                fill = _fill_value(node)
                init = numpy_helper.from_array(np.full(weight.shape, fill, fill.dtype), name)
                fills.add(node.input[0])
            graph.initializer.append(init)
            if out.ir_version < 4:
                graph.input.append(
                    helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                )
            converted.add(weight.name)
            reader_op, reader = weight.reader
            changes.setdefault(order, []).append(
                f"{weight.op_type} node '{weight.node}' holds a {list(weight.shape)} weight read "
                f"by {reader_op} node '{reader}': now initializer '{name}', a trainable parameter"
            )
        if converted:
            keep = [n for n in home.node if not (n.output and n.output[0] in converted)]
            del home.node[:]
            home.node.extend(keep)
            _drop_unused(home, fills)
    return out, [line for k in sorted(changes) for line in changes[k]]


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A graph, then every If, Loop and Scan body inside it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _all_graphs(sub)


def _defined(graph: onnx.GraphProto) -> list[str]:
    """The names a graph itself defines: inputs, initializers, node outputs."""
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    return names + [o for n in graph.node for o in n.output if o]


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every read of `old` in `graph`, and in bodies that do not redefine it, read `new`."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for sub in subgraphs(node):
            if old not in _defined(sub):
                _rename_reads(sub, old, new)
    for output in graph.output:
        if output.name == old:
            output.name = new


def _constant_weights_in(
    graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...]]
) -> list[tuple[ConstantWeight, onnx.NodeProto]]:
    """The qualifying nodes of one graph, read there or in the bodies nested in it."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for g in _all_graphs(graph):
        for node in g.node:
            for k, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, k))
    found = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        if node.op_type == "Constant":
            tensor = _constant_tensor(node)
            if tensor is None:
                continue
            shape, dtype = tuple(tensor.dims), tensor.data_type
            finite = None  # read the values only for a tensor of a weight's size
        elif node.op_type == "ConstantOfShape":
            shape = shapes.get(node.input[0]) if node.input else None
            fill = _fill_value(node)
            if shape is None or fill is None:
                continue
            dtype = helper.np_dtype_to_tensor_dtype(fill.dtype)
            finite = bool(np.isfinite(fill))
        else:
            continue
        if len(shape) == 0 or int(np.prod(shape, dtype=np.int64)) < 2 or finite is False:
            continue
        if finite is None and not np.all(np.isfinite(tensor_array(tensor))):
            continue
        reader = _weight_reader(node.output[0], readers)
        if reader is not None:
            weight = ConstantWeight(
                node.output[0],
                node.name or node.output[0],
                node.op_type,
                shape,
                dtype,
                (reader.op_type, reader.name or reader.output[0]),
            )
            found.append((weight, node))
    return found


def _constant_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Integer vectors that cannot change at run time: candidate ConstantOfShape shapes.

    An initializer counts unless it is also a graph input (which a feed may override) in
    an IR >= 4 model; before IR 4 every initializer was listed as an input.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input} if model.ir_version >= 4 else set()
    tensors = [t for t in graph.initializer if t.name not in inputs]
    for node in (n for g in _all_graphs(graph) for n in g.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attr.t)
                    tensor.name = node.output[0]
                    tensors.append(tensor)
                elif attr.name == "value_ints":
                    tensors.append(numpy_helper.from_array(np.array(attr.ints), node.output[0]))
    shapes = {}
    for t in tensors:
        if t.data_type != onnx.TensorProto.INT64 or len(t.dims) != 1:
            continue
        value = numpy_helper.to_array(t)
        if np.all(value >= 0):
            shapes[t.name] = tuple(int(v) for v in value)
    return shapes


def _fill_value(node: onnx.NodeProto) -> np.ndarray | None:
    """A ConstantOfShape's fill value as a numpy scalar when it is a float, else None."""
    for attr in node.attribute:
        if attr.name == "value":
            if attr.t.data_type not in FLOAT_TYPES:
                return None
            return numpy_helper.to_array(attr.t).reshape(-1)[0]
    # The spec's default: float32 zeros.
    return np.float32(0.0)


def _weight_reader(
    name: str, readers: dict[str, list[tuple[onnx.NodeProto, int]]]
) -> onnx.NodeProto | None:
    """A node that reads `name` at a weight position, directly or through view ops."""
    pending, seen = [name], {name}
    while pending:
        current = pending.pop(0)
        for node, k in readers.get(current, []):
            if k in _WEIGHT_INPUTS.get(node.op_type, ()):
                return node
            if node.op_type in _VIEW_OPS and k == 0 and node.output and node.output[0] not in seen:
                seen.add(node.output[0])
                pending.append(node.output[0])
    return None


def to_inference_mode(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Switch training-mode Dropout and BatchNormalization nodes to inference mode.

    Dropout whose training_mode is a constant true loses that input (inference is the
    default; the flag is removed when nothing else reads it); BatchNormalization with
    training_mode=1 (or, before opset 14, with extra outputs) gets training_mode=0 and drops
    its running-statistics outputs. A Dropout whose training mode is a graph input (chosen
    at run time), and a BatchNormalization whose statistics some node or graph output
    reads, are left alone.

    Args:
        model: a ModelProto (not modified).

    Returns:
        (the repaired model, one description per node switched).
    """
    out = _copy_named(model)
    graph = out.graph
    opset = opset_of(out)
    info = GraphInfo.from_graph(graph)
    read_by = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    changes, dropped = [], set()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Dropout" and opset >= 12 and len(node.input) > 2 and node.input[2]:
            flag = node.input[2]
            value = _constant(info, flag)
            # A training_mode fed at run time is the user's choice: left as it is.
            if value is not None and bool(np.asarray(value)):
                del node.input[2:]
                if not node.input[-1]:
                    del node.input[1:]
                dropped.add(flag)
                changes.append(
                    f"Dropout node '{node.name}': training_mode '{flag}' was true; removed, so "
                    "it runs in inference mode (the identity)"
                )
        elif node.op_type == "Dropout" and opset < 7 and not attributes(node).get("is_test", 0):
            _set_int(node, "is_test", 1)
            changes.append(f"Dropout node '{node.name}': is_test set to 1 (inference mode)")
        elif node.op_type == "BatchNormalization" and _bn_training(node, opset):
            extra = [o for o in node.output[1:] if o]
            used = [o for o in extra if o in read_by]
            if used:
                logger.info(
                    "BatchNormalization node '%s' stays in training mode: its statistics "
                    "output(s) %s are read",
                    node.name,
                    ", ".join(used),
                )
                continue
            del node.output[1:]
            if opset >= 14:
                _set_int(node, "training_mode", 0)
            elif opset < 7:
                _set_int(node, "is_test", 1)
            changes.append(
                f"BatchNormalization node '{node.name}': switched to inference mode (running "
                "statistics instead of batch statistics)"
            )
    _drop_unused(graph, dropped)
    return out, changes


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers and Constant nodes among `names` that nothing reads anymore
    (the bodies of If, Loop and Scan nodes included)."""
    read = {i for n in graph.node for i in reads(n)} | {o.name for o in graph.output}
    unused = names - read
    if not unused:
        return
    keep = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in unused]
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in unused)]
    del graph.node[:]
    graph.node.extend(nodes)


REPAIRS: tuple[tuple[str, Callable[[onnx.ModelProto], tuple[onnx.ModelProto, list[str]]]], ...] = (
    ("constant weights", constants_to_initializers),
    ("inference mode", to_inference_mode),
    ("optional outputs", name_needed_outputs),
)
"""Every repair, in the order `--fix` applies them."""


def repair(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Apply every repair in order.

    Returns:
        (the repaired model, every change made).
    """
    changes = []
    for _, fn in REPAIRS:
        model, done = fn(model)
        changes.extend(done)
    return model, changes


def save(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write a model atomically: to a temporary file next to `path`, then renamed.

    Raises:
        OnnxgradError: the model is too large to write as one file.
    """
    path = Path(path)
    data = model.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Rendering.


def render(report: CheckReport) -> str:
    """The report as the text `onnxgrad check` prints."""
    lines = []
    about = f"opset {report.opset}"
    if report.loaded_opset and report.loaded_opset != report.opset:
        about += f", checked at {report.loaded_opset}"
    lines.append(f"model: {report.model} ({about})")
    if report.loss:
        lines.append(f"loss: {report.loss_text or _loss_text(report.loss)}")
    lines.append(f"parameters: {len(report.parameters)} tensor(s), {report.elements:,} element(s)")

    # 1. Pre-flight.
    lines.append("")
    lines.append(
        f"pre-flight: {len(report.nodes)} node(s) on the paths from the loss to the parameters"
    )
    if report.nodes:
        rows = [("node", "op", "opset", "gradient", "kernel")]
        rows += [
            (n.name, n.op, str(n.opset), n.state, "yes" if n.kernel else "NO") for n in report.nodes
        ]
        lines += _table(rows)
    for note in report.notes:
        lines.append(f"  note: {note}")
    if report.problems:
        lines.append(f"problems: {len(report.problems)}")
        lines += [f"  {p.text()}" for p in report.problems]
    else:
        lines.append("problems: none")

    # 2. Repairs.
    lines.append("")
    if report.repairs:
        verb = "applied" if report.repaired is not None else "offered (apply with --fix -o OUT)"
        lines.append(f"repairs {verb}: {len(report.repairs)}")
        lines += [f"  {kind}: {text}" for kind, text in report.repairs]
    else:
        lines.append("repairs: none needed")

    # 3. The gradient check.
    lines.append("")
    if report.skipped:
        lines.append(f"gradient check: skipped ({report.skipped})")
    else:
        lines.append(f"gradient check: {report.settings}")
        rows = [("parameter", "shape", "|grad|", "rel. error", "result")]
        rows += [
            (
                c.name,
                str(list(c.shape)),
                f"{c.grad_norm:.3e}",
                f"{c.rel_error:.1e}",
                "OK" if c.ok else "FAIL",
            )
            for c in report.checks
        ]
        lines += _table(rows)
        lines += [f"  note: {c.note}" for c in report.checks if c.note]
        failed = [c.name for c in report.checks if not c.ok]
        worst = max((c.rel_error for c in report.checks), default=0.0)
        if failed:
            lines.append(
                f"{len(failed)} of {len(report.checks)} gradient(s) FAIL: {', '.join(failed)}"
            )
        else:
            lines.append(
                f"all {len(report.checks)} gradient(s) agree (largest relative error {worst:.1e})"
            )
    lines.append("")
    lines.append("result: " + ("OK" if report.ok else "FAIL"))
    return "\n".join(lines)


def _loss_text(outputs: Sequence[str]) -> str:
    terms = " + ".join(f"sum(r{k} · {name})" for k, name in enumerate(outputs))
    return f"{terms}, with fixed random weights r"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


# Small helpers.


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _where(node: onnx.NodeProto, opset: int) -> dict:
    return {"op_type": node.op_type, "domain": node.domain, "node": node.name, "opset": opset}


def _dtypes(graph: onnx.GraphProto) -> dict[str, int]:
    return {k: v for k, v in GraphInfo.from_graph(graph).dtypes.items() if v}


def _float_names(info: GraphInfo, node: onnx.NodeProto) -> set[str]:
    """Every float input and output of a node, as if all of them carried a gradient."""
    return {
        n
        for n in list(node.input) + list(node.output)
        if n and info.dtypes.get(n, onnx.TensorProto.FLOAT) in FLOAT_TYPES
    }


def _absent_optional_outputs(node: onnx.NodeProto, opset: int) -> list[tuple[int, str]]:
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return []
    absent = []
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    for index, formal in enumerate(schema.outputs):
        present = index < len(node.output) and node.output[index]
        if formal.option == optional and not present:
            absent.append((index, formal.name))
    return absent


def _copy_named(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    name_nodes(out.graph)
    return out


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The float tensor a default-domain Constant node holds, or None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
            return attr.t
    return None


def _bn_training(node: onnx.NodeProto, opset: int) -> bool:
    if opset >= 14:
        return bool(attributes(node).get("training_mode", 0))
    if opset >= 7:
        return sum(1 for o in node.output if o) > 1
    return not attributes(node).get("is_test", 0)


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name
