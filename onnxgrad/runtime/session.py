"""Session: run an ONNX model with onnxgrad's numpy kernels (or onnxruntime).

The call shape is onnxruntime's: ``Session(model).run(output_names, feeds)``. Feeds may
also override initializers by name, which is how the trainer hands in updated parameters
without re-serializing the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxgrad.errors import ExecutionError
from onnxgrad.importer import attributes, graph_inputs, load, op_label, opset_of, tensor_array
from onnxgrad.runtime import kernels as registry
from onnxgrad.runtime.kernels import KernelNode
from onnxgrad.runtime.plan import Plan, needed_nodes, outer_names, topological_order

logger = logging.getLogger(__name__)

BACKENDS = ("numpy", "onnxruntime")


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output, as `get_inputs()` / `get_outputs()` describe it."""

    name: str
    type: str
    shape: list


class Session:
    """A compiled model, run many times.

    Args:
        model: a path, bytes or ModelProto.
        backend: "numpy" (onnxgrad's kernels) or "onnxruntime".
        fold_constants: compute constant subgraphs once, at compile time.
        threads: onnxruntime's intra-op threads (None: its default, every core). The numpy
            backend's matrix products use numpy's BLAS threads, which threadpoolctl sets.
    """

    def __init__(
        self,
        model,
        backend: str = "numpy",
        *,
        fold_constants: bool = True,
        threads: int | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        if backend == "onnxruntime":
            from onnxgrad.runtime.ort import OrtSession

            self._impl = OrtSession(model, threads=threads)
        else:
            self._impl = _NumpySession(model, fold_constants)

    @property
    def model(self) -> onnx.ModelProto:
        """The model as loaded."""
        return self._impl.model

    def get_inputs(self) -> list[TensorInfo]:
        """The graph's inputs (initializers excluded)."""
        return _infos(graph_inputs(self._impl.model))

    def get_outputs(self) -> list[TensorInfo]:
        """The graph's outputs."""
        return _infos(self._impl.model.graph.output)

    def run(self, output_names: Sequence[str] | None, feeds: dict, run_options=None) -> list:
        """Compute `output_names` (all outputs when None) from `feeds`.

        Args:
            output_names: names of graph outputs or of any intermediate tensor.
            feeds: arrays by input name; initializers may be overridden the same way.
            run_options: accepted for onnxruntime compatibility; ignored.

        Raises:
            ExecutionError: unknown or missing feeds, wrong dtype or rank, or a failing
                kernel (naming the node).
        """
        return self._impl.run(output_names, feeds)


class _NumpySession:
    def __init__(self, model, fold: bool):
        self.model = load(model, convert=False, infer_shapes=False)
        graph = self.model.graph
        self.fold = fold
        self.initializers = {t.name: tensor_array(t) for t in graph.initializer}
        self.inputs = {i.name: i for i in graph_inputs(self.model)}
        self.output_names = [o.name for o in graph.output]
        self.nodes = topological_order(graph.node, set(self.initializers) | set(self.inputs))
        self.kernels, self.missing = self._compile()
        self._plans: dict[tuple, Plan] = {}

    def _compile(self) -> tuple[dict, dict[str, str]]:
        """Kernels by node name, and what stands in the way of the nodes that have none.

        A node without a kernel is only an error when a run needs it: an ai.onnx.ml label
        head or a vendor op off the requested outputs' path is never in the way.
        """
        dtypes = _known_dtypes(self.model)
        kernels, missing = {}, {}
        for node in self.nodes:
            factory = registry.lookup(node.op_type, node.domain)
            opset = opset_of(self.model, node.domain)
            op = op_label(node)
            if factory is None:
                missing[node.name] = f"{op} (node '{node.name}', opset {opset})"
                continue
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
                kernels[node.name] = factory(info)
            except NotImplementedError as err:
                missing[node.name] = f"{op} (node '{node.name}', opset {opset}): {err}"
        return kernels, missing

    def _check_runnable(self, names: Sequence[str]) -> None:
        """Raise, naming every one, when the nodes that `names` need include some without
        a kernel."""
        if not self.missing:
            return
        needed = needed_nodes(self.nodes, names)
        blocked = [self.missing[n.name] for n in needed if n.name in self.missing]
        if blocked:
            raise ExecutionError(
                f"the numpy backend cannot run {len(blocked)} node(s): "
                + "; ".join(blocked)
                + ". Try backend='onnxruntime'."
            )

    def run(self, output_names, feeds) -> list:
        names = tuple(self.output_names if output_names is None else output_names)
        feeds = self._check_feeds(feeds)
        overridden = frozenset(n for n in feeds if n in self.initializers)
        key = (names, overridden)
        plan = self._plans.get(key)
        if plan is None:
            self._check_runnable(names)
            constants = {k: v for k, v in self.initializers.items() if k not in overridden}
            plan = Plan(
                self.nodes,
                self.kernels,
                constants,
                list(self.inputs) + list(overridden),
                names,
                self.fold,
            )
            self._plans[key] = plan
        return plan.run(feeds)

    def _check_feeds(self, feeds: dict) -> dict:
        out = {}
        for name, value in feeds.items():
            if name in self.inputs:
                if self.inputs[name].type.WhichOneof("value") in ("sequence_type", "optional_type"):
                    out[name] = value  # a sequence (a list) or an optional (None if empty): as is
                    continue
                declared = self.inputs[name].type.tensor_type
            elif name in self.initializers:
                declared = None
                want = self.initializers[name]
                value = np.asarray(value)
                if value.dtype != want.dtype or value.shape != want.shape:
                    raise ExecutionError(
                        f"feed '{name}' overrides an initializer of {want.dtype}{list(want.shape)} "
                        f"with {value.dtype}{list(value.shape)}"
                    )
            else:
                raise ExecutionError(
                    f"'{name}' is not an input of the model; its inputs are: "
                    f"{', '.join(self.inputs) or '(none)'}"
                )
            value = np.asarray(value)
            if declared is not None:
                _check_against(name, value, declared)
            out[name] = value
        missing = [n for n in self.inputs if n not in out]
        if missing:
            raise ExecutionError(f"missing input(s): {', '.join(missing)}")
        return out


def _check_against(name: str, value: np.ndarray, declared: onnx.TypeProto.Tensor) -> None:
    if declared.elem_type:
        want = helper.tensor_dtype_to_np_dtype(declared.elem_type)
        if value.dtype != want and not (want == np.dtype(object) and value.dtype.kind in "OUS"):
            raise ExecutionError(
                f"input '{name}' must be {np.dtype(want).name}, got {value.dtype.name}"
            )
    if declared.HasField("shape"):
        dims = declared.shape.dim
        if len(dims) != value.ndim:
            raise ExecutionError(
                f"input '{name}' must have rank {len(dims)}, got shape {list(value.shape)}"
            )
        for axis, (d, n) in enumerate(zip(dims, value.shape)):
            if d.HasField("dim_value") and d.dim_value != n:
                raise ExecutionError(
                    f"input '{name}' must have {d.dim_value} at axis {axis}, got shape "
                    f"{list(value.shape)}"
                )


def _known_dtypes(model: onnx.ModelProto) -> dict:
    out = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    for t in g.initializer:
        out[t.name] = helper.tensor_dtype_to_np_dtype(t.data_type)
    return out


def _infos(values) -> list[TensorInfo]:
    out = []
    for vi in values:
        tt = vi.type.tensor_type
        type_name = helper.tensor_dtype_to_string(tt.elem_type) if tt.elem_type else "undefined"
        type_name = f"tensor({type_name.removeprefix('TensorProto.').lower()})"
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        ]
        out.append(TensorInfo(vi.name, type_name, shape))
    return out
