"""The training step inside the model, as ONNX defines it: TrainingInfoProto.

The ONNX IR (version 7 on) lets a model carry its own training step: `ModelProto.training_info`
holds an `algorithm` graph run together with the inference graph (its nodes may read the
inference graph's tensors), an `initialization` graph, and bindings that say which
initializer takes which output after each run. No runtime implements it; this module
writes such models and trains them with onnxgrad's executor.

`training_info_model` builds the step (`onnxgrad.train.step.build_step_model`) and splits
it:

- `graph`: the model as onnxgrad loads it (converted to its canonical opset when it was
  older, nodes named), the trainable parameters kept as plain initializers;
- `training_info[0].algorithm`: the loss, backward and optimizer nodes; its input is
  ``target`` (for an appended loss), its initializers the optimizer state (``p.m``,
  ``p.v`` or ``p.momentum``), ``step`` and ``lr``; its outputs those of the step model;
- `training_info[0].update_binding`: ``p`` ← ``p.updated`` for every parameter and state,
  ``step`` ← ``step.updated``;
- `training_info[0].initialization`: zeros for the optimizer state and ``step``, bound by
  `initialization_binding` (it resets the optimizer; the weights keep their values, since
  fine-tuning starts from them).

`onnx.checker` does not look inside training_info; `check_training_info` does: the
combined graph passes the full checker, and every binding names an initializer and an
output. `TrainingSession` loads any model with training_info (one or several) and trains it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxgrad.errors import ExecutionError, GradientError, ModelLoadError
from onnxgrad.importer import checkable, name_nodes, read, tensor_array
from onnxgrad.runtime.session import Session
from onnxgrad.train.step import LR, STEP, StepLayout, build_step_model, save_model_atomically

logger = logging.getLogger(__name__)

INITIAL = ".initial"
"""Suffix of the initialization graph's outputs (``p.m.initial``, ``step.initial``)."""

_TRAINING_INFO_IR = 7  # the IR version that introduced TrainingInfoProto


def training_info_model(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    loss: str = "cross_entropy",
    optimizer=None,
    trainable=None,
    clip_norm: float | None = None,
    opset: int | None = None,
    *,
    output: str | None = None,
) -> onnx.ModelProto:
    """The model with its training step embedded as a TrainingInfoProto.

    Args:
        model: a path, bytes or ModelProto (not modified).
        loss, optimizer, trainable, clip_norm, opset, output: as for
            `onnxgrad.train.step.build_step_model`.

    Returns:
        A model whose `graph` runs inference as before and whose `training_info[0]` trains
        it; it passes `onnx.checker.check_model(full_check=True)` and `check_training_info`.

    Raises:
        GradientError: as `build_step_model`, or `opset` is older than 12 (IR 7).
        UnsupportedOpError: `opset` is too old for an op of the step.
    """
    step = build_step_model(
        model, loss, optimizer, trainable, clip_norm, opset, output=output, defaults=True
    )
    return embed_training_info(step)


def embed_training_info(step_model: onnx.ModelProto) -> onnx.ModelProto:
    """Split a step model (from `build_step_model`, with defaults) into graph + training_info.

    Raises:
        GradientError: the model was not written by `build_step_model` with defaults, or its
            IR version is older than 7.
    """
    layout = StepLayout.of(step_model)
    if step_model.ir_version < _TRAINING_INFO_IR:
        raise GradientError(
            f"TrainingInfoProto needs IR version {_TRAINING_INFO_IR} (opset 12) or later; the "
            f"step model is IR {step_model.ir_version}: target opset 12 or later"
        )
    step_model = onnx.shape_inference.infer_shapes(step_model)
    graph = step_model.graph
    inits = {t.name: t for t in graph.initializer}
    missing = [n for n in [*layout.parameters, *layout.state_names, STEP, LR] if n not in inits]
    if missing:
        raise GradientError(
            f"the step model has no initial value for {', '.join(missing)} (built with "
            "defaults=False): build it with defaults to embed it"
        )
    types = {vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]}

    # 1. Inference nodes: those the original outputs need; the rest is the algorithm.
    needed = set(layout.outputs)
    inference_ids = set()
    for k in range(len(graph.node) - 1, -1, -1):
        node = graph.node[k]
        if any(o in needed for o in node.output):
            inference_ids.add(k)
            needed.update(i for i in node.input if i)
    inference = [n for k, n in enumerate(graph.node) if k in inference_ids]
    algorithm = [n for k, n in enumerate(graph.node) if k not in inference_ids]
    produced = {o for n in inference for o in n.output}
    owned = {*layout.state_names, STEP, LR}

    # 2. The inference graph: the model as loaded, parameters as plain initializers.
    main = helper.make_graph(
        inference,
        graph.name.removesuffix("_training_step") or "model",
        [types[n] for n in layout.inputs],
        [_typed(types, n) for n in layout.outputs],
        [t for t in graph.initializer if t.name not in owned],
        value_info=[vi for vi in graph.value_info if vi.name in produced],
    )

    # 3. The algorithm: target in, state as its initializers, the step's outputs out.
    inputs = [types[layout.target]] if layout.target is not None else []
    outs = [o for o in graph.output if o.name not in set(layout.outputs)]
    algo = helper.make_graph(
        algorithm,
        "training_step",
        inputs,
        outs,
        [inits[n] for n in [*layout.state_names, STEP, LR]],
        value_info=[vi for vi in graph.value_info if vi.name not in produced],
    )

    # 4. Initialization: the optimizer state and the step count back to zero.
    init_nodes, init_outputs = [], []
    for name in [*layout.state_names, STEP]:
        tensor = inits[name]
        shape = f"{name}{INITIAL}/shape"
        init_nodes.append(
            helper.make_node(
                "Constant",
                [],
                [shape],
                name=shape,
                value=numpy_helper.from_array(np.array(tensor.dims, np.int64)),
            )
        )
        value = numpy_helper.from_array(np.zeros(1, _np(tensor)))
        init_nodes.append(
            helper.make_node(
                "ConstantOfShape",
                [shape],
                [f"{name}{INITIAL}"],
                name=f"{name}{INITIAL}",
                value=value,
            )
        )
        init_outputs.append(
            helper.make_tensor_value_info(f"{name}{INITIAL}", tensor.data_type, list(tensor.dims))
        )
    initialization = helper.make_graph(init_nodes, "initialization", [], init_outputs)

    # 5. The model: the step model's header, one TrainingInfoProto.
    out = onnx.ModelProto()
    out.CopyFrom(step_model)
    out.graph.CopyFrom(main)
    out.ir_version = max(out.ir_version, _TRAINING_INFO_IR)
    info = out.training_info.add()
    info.algorithm.CopyFrom(algo)
    info.initialization.CopyFrom(initialization)
    for name in [*layout.parameters, *layout.state_names, STEP]:
        info.update_binding.add(key=name, value=f"{name}.updated")
    for name in [*layout.state_names, STEP]:
        info.initialization_binding.add(key=name, value=f"{name}{INITIAL}")
    try:
        onnx.checker.check_model(checkable(out), full_check=True)
        check_training_info(out)
    except (onnx.checker.ValidationError, ValueError, ModelLoadError) as err:
        raise GradientError(
            f"the TrainingInfoProto model is not valid (an onnxgrad bug): {err}"
        ) from err
    logger.info(
        "embedded the training step: %d inference and %d algorithm nodes, %d bindings",
        len(inference),
        len(algorithm),
        len(info.update_binding),
    )
    return out


def check_training_info(model: onnx.ModelProto) -> None:
    """What `onnx.checker` leaves out: each inference+algorithm graph and each binding.

    Raises:
        ModelLoadError: the model has no training_info, a combined graph fails the full
            checker, or a binding names no initializer or no output, or a key twice.
    """
    if not model.training_info:
        raise ModelLoadError("the model has no training_info: there is no training step in it")
    keys: set[str] = set()
    main_inits = {t.name for t in model.graph.initializer}
    for k, info in enumerate(model.training_info):
        where = f"training_info[{k}]"
        combined = _combined(model, info.algorithm)
        try:
            onnx.checker.check_model(checkable(combined), full_check=True)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ModelLoadError(
                f"{where}: the inference graph combined with the algorithm fails the ONNX "
                f"checker: {first}"
            ) from err
        inits = main_inits | {t.name for t in info.algorithm.initializer}
        outputs = {o.name for o in info.algorithm.output} | {o.name for o in model.graph.output}
        for entry in info.update_binding:
            if entry.key in keys:
                raise ModelLoadError(f"{where}: '{entry.key}' is bound twice by update_binding")
            keys.add(entry.key)
            if entry.key not in inits:
                raise ModelLoadError(
                    f"{where}: update_binding key '{entry.key}' is not an initializer of the "
                    "graph or of the algorithm"
                )
            if entry.value not in outputs:
                raise ModelLoadError(
                    f"{where}: update_binding value '{entry.value}' is not an output of the "
                    "algorithm or of the graph"
                )
        if info.initialization.input:
            raise ModelLoadError(f"{where}: the initialization graph must have no inputs")
        init_outputs = {o.name for o in info.initialization.output}
        for entry in info.initialization_binding:
            if entry.key not in inits or entry.value not in init_outputs:
                raise ModelLoadError(
                    f"{where}: initialization_binding '{entry.key}' <- '{entry.value}' must map "
                    "an initializer to an output of the initialization graph"
                )


class TrainingSession:
    """Train a model that carries TrainingInfoProto(s), with onnxgrad's executor.

    Each `step` runs every training_info's algorithm (combined with the inference graph) in
    order and applies its update bindings, as the ONNX IR defines one training iteration.

    Args:
        model: a path, bytes or ModelProto with training_info.
        backend: the Session backend, "numpy" or "onnxruntime".
        initialize: run the initialization graphs first (as the IR says training starts);
            pass False to resume from the values stored in the initializers.

    Attributes:
        variables: every bound initializer's current value, by name.

    Raises:
        ModelLoadError: no training_info, or an invalid one (see `check_training_info`).
    """

    def __init__(self, model, backend: str = "numpy", *, initialize: bool = True):
        self._model = read(model)
        check_training_info(self._model)
        self.backend = backend
        graph = self._model.graph
        values = {t.name: t for t in graph.initializer}
        for info in self._model.training_info:
            values.update({t.name: t for t in info.algorithm.initializer})
        bound = [e.key for info in self._model.training_info for e in info.update_binding]
        bound += [e.key for info in self._model.training_info for e in info.initialization_binding]
        self.variables: dict[str, np.ndarray] = {
            name: tensor_array(values[name]).copy() for name in dict.fromkeys(bound)
        }
        self._sessions = []
        for info in self._model.training_info:
            combined = _combined(self._model, info.algorithm)
            names = [o.name for o in info.algorithm.output]
            names += [e.value for e in info.update_binding if e.value not in names]
            self._sessions.append((Session(combined, backend=backend), names, info))
        self.layout = _layout_or_none(self._model)
        if initialize:
            self.initialize()

    @property
    def loss_name(self) -> str:
        """The loss output: as onnxgrad recorded it, else the first algorithm output."""
        if self.layout is not None:
            return self.layout.loss
        return self._model.training_info[0].algorithm.output[0].name

    def initialize(self) -> None:
        """Run each initialization graph and apply its initialization_binding."""
        for info in self._model.training_info:
            if not info.initialization_binding:
                continue
            model = helper.make_model(
                info.initialization, opset_imports=list(self._model.opset_import)
            )
            model.ir_version = self._model.ir_version
            name_nodes(model.graph)
            outputs = [e.value for e in info.initialization_binding]
            values = Session(model, backend=self.backend).run(outputs, {})
            for entry, value in zip(info.initialization_binding, values):
                self._assign(entry.key, value)

    def step(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One training iteration on a batch.

        Args:
            feeds: the inference graph's inputs and the algorithm's inputs (the target).

        Returns:
            Every algorithm output by name (of the last training_info), as computed before
            the bindings were applied.
        """
        results: dict[str, np.ndarray] = {}
        for session, names, info in self._sessions:
            values = session.run(names, {**feeds, **self.variables})
            results = dict(zip(names, values))
            for entry in info.update_binding:
                self._assign(entry.key, results[entry.value])
        return {o.name: results[o.name] for o in self._sessions[-1][2].algorithm.output}

    @property
    def model(self) -> onnx.ModelProto:
        """A copy of the model with every bound initializer at its current value."""
        out = onnx.ModelProto()
        out.CopyFrom(self._model)
        tensors = [*out.graph.initializer]
        for info in out.training_info:
            tensors.extend(info.algorithm.initializer)
        for tensor in tensors:
            if tensor.name in self.variables:
                tensor.CopyFrom(numpy_helper.from_array(self.variables[tensor.name], tensor.name))
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write `model` to `path` (atomically: a temporary file renamed over it)."""
        save_model_atomically(self.model, path)

    def _assign(self, name: str, value: np.ndarray) -> None:
        own = self.variables[name]
        value = np.asarray(value)
        if value.shape != own.shape or value.dtype != own.dtype:
            raise ExecutionError(
                f"binding gives '{name}' a {value.dtype}{list(value.shape)} value, but it is "
                f"{own.dtype}{list(own.shape)}: the training_info's outputs do not fit its "
                "initializers"
            )
        self.variables[name] = value


def load_training_model(model, backend: str = "numpy", *, initialize: bool = True):
    """`TrainingSession(model, backend, initialize=initialize)`."""
    return TrainingSession(model, backend, initialize=initialize)


# Helpers.


def _combined(model: onnx.ModelProto, algorithm: onnx.GraphProto) -> onnx.ModelProto:
    """The inference graph and the algorithm as one model, as the IR defines the combination."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.training_info[:]
    g = out.graph
    g.input.extend(algorithm.input)
    g.initializer.extend(algorithm.initializer)
    g.sparse_initializer.extend(algorithm.sparse_initializer)
    g.node.extend(algorithm.node)
    g.value_info.extend(algorithm.value_info)
    g.output.extend(algorithm.output)
    name_nodes(g)
    return out


def _typed(types: dict, name: str) -> onnx.ValueInfoProto:
    if name in types:
        return types[name]
    raise GradientError(
        f"the type of output '{name}' is unknown after shape inference: cannot declare it as "
        "the inference graph's output"
    )


def _np(tensor: onnx.TensorProto):
    return helper.tensor_dtype_to_np_dtype(tensor.data_type)


def _layout_or_none(model: onnx.ModelProto) -> StepLayout | None:
    try:
        return StepLayout.of(model)
    except GradientError:
        return None
