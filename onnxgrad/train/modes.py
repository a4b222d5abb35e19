"""Training and inference modes of BatchNormalization and Dropout, as graph transforms.

Models reach us exported for inference: BatchNormalization normalizes with its stored
running statistics, Dropout passes its input through. Fine-tuning keeps it that way by
default. On request:

- `batchnorm="train"` switches every BatchNormalization node to training mode: it
  normalizes with the batch's own mean and (biased) variance, and outputs the updated
  running statistics, ``running = momentum · running + (1 − momentum) · batch statistic``
  (ONNX's definition of momentum, which is 1 − PyTorch's). The updated statistics become
  graph outputs, so the trainer can read them after each step and feed them back, and
  `save` writes them into the model.
- `dropout=True` switches every Dropout node on at its own ratio: its training_mode input
  becomes a constant true, and it gets a mask output (the gradient rule multiplies by it).

`set_modes(model)` with the defaults does the opposite: it puts nodes that an exporter left
in training mode into inference mode, so evaluation never depends on the batch. Only the
main graph is transformed; nodes inside If/Loop/Scan bodies keep their mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxgrad.errors import GradientError
from onnxgrad.importer import opset_of, tensor_array

logger = logging.getLogger(__name__)

BATCHNORM_MODES = ("frozen", "train")

DROPOUT_ON = "onnxgrad_dropout_training"
"""The boolean initializer that switches Dropout nodes on."""


@dataclass
class Modes:
    """What `set_modes` changed.

    Attributes:
        running: for BatchNormalization in training mode, the running-statistics
            initializer name → the graph output holding its updated value.
        batchnorm_nodes: names of the BatchNormalization nodes switched to training mode.
        dropout_nodes: names of the Dropout nodes switched on.
    """

    running: dict[str, str] = field(default_factory=dict)
    batchnorm_nodes: list[str] = field(default_factory=list)
    dropout_nodes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether any node was put in training mode."""
        return bool(self.batchnorm_nodes or self.dropout_nodes)


def set_modes(
    model: onnx.ModelProto, batchnorm: str = "frozen", dropout: bool = False
) -> tuple[onnx.ModelProto, Modes]:
    """A copy of `model` with BatchNormalization and Dropout in the requested modes.

    Args:
        model: a loaded model (its default-domain opset decides each op's form).
        batchnorm: "frozen" (inference, the stored statistics) or "train" (batch
            statistics, running statistics updated and output).
        dropout: switch Dropout on at its ratio (False: identity).

    Returns:
        The transformed copy, and what was changed.

    Raises:
        GradientError: an unknown mode, or an op version that has no training form.
    """
    if batchnorm not in BATCHNORM_MODES:
        raise GradientError(
            f"unknown batchnorm mode '{batchnorm}': choose one of {', '.join(BATCHNORM_MODES)}"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = opset_of(out)
    used = _consumed(graph)
    modes = Modes()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "BatchNormalization":
            if batchnorm == "train":
                _bn_train(graph, node, opset, modes)
            else:
                _bn_infer(node, opset, used)
        elif node.op_type == "Dropout":
            if dropout:
                _dropout_on(graph, node, opset, modes)
            else:
                _dropout_off(graph, node, opset)
    if modes.dropout_nodes and not any(t.name == DROPOUT_ON for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(True), DROPOUT_ON))
    if modes.changed:
        logger.info(
            "training mode: %d BatchNormalization node(s) on batch statistics, %d Dropout "
            "node(s) on",
            len(modes.batchnorm_nodes),
            len(modes.dropout_nodes),
        )
    return out, modes


def _consumed(graph: onnx.GraphProto) -> set[str]:
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(i for i in node.input if i)
    return names


def _bn_train(graph: onnx.GraphProto, node: onnx.NodeProto, opset: int, modes: Modes) -> None:
    if opset < 9:
        raise GradientError(
            f"BatchNormalization node '{node.name}' is at opset {opset}, whose training form "
            "onnxgrad does not build: convert the model to opset 14 or later"
        )
    inits = {t.name: t for t in graph.initializer}
    mean, var = node.input[3], node.input[4]
    outputs = [node.output[0]]
    for stat, kind in ((mean, "running_mean"), (var, "running_var")):
        name = _fresh(graph, f"{node.name}_{kind}")
        outputs.append(name)
        if stat in inits:
            if stat in modes.running:
                raise GradientError(
                    f"BatchNormalization node '{node.name}' shares its {kind} '{stat}' with "
                    "another node: its updates would collide; give each node its own statistics"
                )
            modes.running[stat] = name
            tensor = inits[stat]
            graph.output.append(
                helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
            )
        else:
            logger.warning(
                "BatchNormalization node '%s': its %s '%s' is not an initializer, so its "
                "updated value is not kept between steps",
                node.name,
                kind,
                stat,
            )
    del node.output[:]
    node.output.extend(outputs)
    if opset >= 14:
        _set_int(node, "training_mode", 1)
    modes.batchnorm_nodes.append(node.name)


def _bn_infer(node: onnx.NodeProto, opset: int, used: set[str]) -> None:
    training = (
        any(a.name == "training_mode" and a.i for a in node.attribute)
        if opset >= 14
        else sum(1 for o in node.output if o) > 1
    )
    if not training:
        return
    extra = [o for o in node.output[1:] if o]
    if any(o in used for o in extra):
        logger.warning(
            "BatchNormalization node '%s' is in training mode and its statistics outputs are "
            "read by the graph: it is left in training mode",
            node.name,
        )
        return
    del node.output[1:]
    if opset >= 14:
        _set_int(node, "training_mode", 0)


def _dropout_on(graph: onnx.GraphProto, node: onnx.NodeProto, opset: int, modes: Modes) -> None:
    if opset < 12:
        raise GradientError(
            f"Dropout node '{node.name}' is at opset {opset}, where Dropout only describes "
            "inference: convert the model to opset 12 or later to train with dropout"
        )
    inputs = list(node.input) + [""] * (3 - len(node.input))
    inputs[2] = DROPOUT_ON
    del node.input[:]
    node.input.extend(inputs)
    if len(node.output) < 2 or not node.output[1]:
        mask = _fresh(graph, f"{node.name}_mask")
        if len(node.output) < 2:
            node.output.append(mask)
        else:
            node.output[1] = mask
    modes.dropout_nodes.append(node.name)


def _dropout_off(graph: onnx.GraphProto, node: onnx.NodeProto, opset: int) -> None:
    if opset < 12 or len(node.input) < 3 or not node.input[2]:
        return
    training = node.input[2]
    constant = next((t for t in graph.initializer if t.name == training), None)
    if constant is None:
        # A graph input: the user feeds the mode; leave it to them.
        return
    if not bool(tensor_array(constant)):
        return
    inputs = list(node.input[:2])
    while inputs and not inputs[-1]:
        inputs.pop()
    del node.input[:]
    node.input.extend(inputs)


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _fresh(graph: onnx.GraphProto, base: str) -> str:
    taken = {o for n in graph.node for o in n.output}
    taken.update(i.name for i in graph.input)
    taken.update(t.name for t in graph.initializer)
    name = base
    while name in taken:
        name += "_"
    return name
