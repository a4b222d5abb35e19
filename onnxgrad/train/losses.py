"""Losses appended to a model as ONNX nodes, so that the gradient builder sees one graph.

`append_loss` takes a model, picks the output the loss reads, adds the target as a new
graph input (named ``target``, with a symbolic batch dimension) and appends the loss as
standard ai.onnx nodes ending in a scalar output:

=================  ==============================================================
kind               loss (every reduction is a mean)
=================  ==============================================================
cross_entropy      SoftmaxCrossEntropyLoss(scores, target); int64 class targets
nll                NegativeLogLikelihoodLoss(log_prob, target); int64 targets
mse                mean((y − t)²)
l1                 mean(|y − t|)
bce_with_logits    mean(max(x, 0) − x·t + log(1 + exp(−|x|)))
=================  ==============================================================
"""

from __future__ import annotations

import logging
import os

import onnx
from onnx import helper

from onnxgrad.autodiff.builder import names_in_use
from onnxgrad.autodiff.emitter import Emitter, GraphInfo
from onnxgrad.errors import GradientError
from onnxgrad.importer import FLOAT_TYPES, checkable, load, opset_of

logger = logging.getLogger(__name__)

LOSSES = ("cross_entropy", "nll", "mse", "l1", "bce_with_logits")
"""The names `append_loss` and the trainer accept."""

CLASSIFICATION_LOSSES = frozenset({"cross_entropy", "nll"})
"""Losses whose targets are class indices (and for which accuracy means something)."""

# Opset at which ONNX defines the loss ops that the classification losses emit.
_LOSS_OPS_SINCE = 12


def append_loss(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    kind: str,
    output: str | None = None,
    target: str = "target",
) -> tuple[onnx.ModelProto, str]:
    """Append a loss on one of the model's outputs.

    Args:
        model: a path, bytes or ModelProto (loaded and normalized by `onnxgrad.load`; the
            argument itself is not modified).
        kind: one of `LOSSES`.
        output: the output the loss reads; default the model's only output.
        target: the name of the new target input.

    Returns:
        The model with the target input, the loss nodes and a scalar output added after the
        original outputs, and the loss output's name.

    Raises:
        GradientError: an unknown kind or output, a taken target name, a non-float output, or
            a classification loss on a model whose opset is below 12.
    """
    if kind not in LOSSES:
        raise GradientError(f"unknown loss '{kind}': choose one of {', '.join(LOSSES)}")
    model = load(model)
    graph = model.graph
    output = resolve_output(model, output)

    # 1. What the loss reads, and what the target must look like.
    info = GraphInfo.from_graph(graph)
    dtype = info.dtypes.get(output)
    if dtype is not None and dtype not in FLOAT_TYPES:
        raise GradientError(
            f"output '{output}' is {helper.tensor_dtype_to_string(dtype)}: a {kind} loss needs "
            "floating-point scores"
        )
    dtype = dtype or onnx.TensorProto.FLOAT
    shape = info.shapes.get(output)
    taken = names_in_use(graph)
    if target in taken:
        raise GradientError(
            f"the model already has a tensor named '{target}': pass another target name"
        )
    opset = opset_of(model)

    # 2. The loss nodes, emitted under the prefix `loss/`.
    taken.add(target)
    loss_name = _fresh("loss", taken)
    taken.add(loss_name)
    b = Emitter(info, opset, prefix="loss/", taken=taken)
    if kind in CLASSIFICATION_LOSSES:
        target_vi = _class_target(model, kind, output, shape, target)
        _classification(b, kind, output, target, loss_name, _fresh("loss/log_prob", taken))
    else:
        target_vi = helper.make_tensor_value_info(target, dtype, _batch_symbolic(shape))
        _regression(b, kind, output, target, loss_name)

    # 3. Splice them in: the target as an input, the loss as the last output.
    graph.node.extend(b.nodes)
    graph.input.append(target_vi)
    graph.output.append(helper.make_tensor_value_info(loss_name, dtype, []))
    try:
        onnx.checker.check_model(checkable(model))
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as err:
        raise GradientError(
            f"the {kind} loss graph is not valid ONNX (an onnxgrad bug): {err}"
        ) from err
    logger.debug("appended a %s loss '%s' on output '%s'", kind, loss_name, output)
    return model, loss_name


def resolve_output(model: onnx.ModelProto, output: str | None) -> str:
    """The output a loss reads: `output` when given (checked), else the only output.

    Raises:
        GradientError: `output` is not an output, or there are several and none was named.
    """
    outputs = [o.name for o in model.graph.output]
    if output is None:
        if len(outputs) != 1:
            raise GradientError(
                f"the model has {len(outputs)} outputs ({', '.join(outputs)}): name the one the "
                "loss reads with output="
            )
        return outputs[0]
    if output not in outputs:
        raise GradientError(
            f"'{output}' is not an output of the model; its outputs are: {', '.join(outputs)}"
        )
    return output


def _classification(
    b: Emitter, kind: str, scores: str, target: str, loss_name: str, log_prob: str
) -> None:
    if kind == "cross_entropy":
        # The second output (log-probabilities) lets the gradient rule reuse the softmax
        # instead of recomputing it.
        node = helper.make_node(
            "SoftmaxCrossEntropyLoss",
            [scores, target],
            [loss_name, log_prob],
            name="loss/SoftmaxCrossEntropyLoss",
            reduction="mean",
        )
    else:
        node = helper.make_node(
            "NegativeLogLikelihoodLoss",
            [scores, target],
            [loss_name],
            name="loss/NegativeLogLikelihoodLoss",
            reduction="mean",
        )
    b.nodes.append(node)


def _regression(b: Emitter, kind: str, y: str, t: str, loss_name: str) -> None:
    if kind == "mse":
        d = b.Sub(y, t)
        per = b.Mul(d, d)  # (y − t)²
    elif kind == "l1":
        per = b.Abs(b.Sub(y, t))  # |y − t|
    else:
        # max(x, 0) − x·t + log(1 + exp(−|x|)), with max(x, 0) written (x + |x|)/2 so that it
        # needs only Abs: exp never sees a positive argument, so nothing overflows. At x = 0
        # Abs takes the subgradient 0, which makes the gradient ½ − t = σ(0) − t, exact.
        abs_x = b.Abs(y)
        relu = b.Mul(b.Add(y, abs_x), b.const(0.5, like=y))
        softplus = b.Log(b.Add(b.const(1.0, like=y), b.Exp(b.Neg(abs_x))))
        per = b.Add(b.Sub(relu, b.Mul(y, t)), softplus)
    b.reduce("ReduceMean", per, None, keepdims=0, name=loss_name)


def _class_target(model, kind, scores, shape, target) -> onnx.ValueInfoProto:
    opset = opset_of(model)
    if opset < _LOSS_OPS_SINCE:
        op = "SoftmaxCrossEntropyLoss" if kind == "cross_entropy" else "NegativeLogLikelihoodLoss"
        raise GradientError(
            f"the {kind} loss uses {op}, defined from opset {_LOSS_OPS_SINCE}, but the model is "
            f"at opset {opset} and onnx could not convert it: convert the model, or append your "
            "own loss and pass its output name as loss="
        )
    if shape is not None and len(shape) < 2:
        raise GradientError(
            f"output '{scores}' has shape {shape}: {kind} needs scores shaped [N, C] or "
            "[N, C, d1, ...] (batch first, classes second)"
        )
    producer = next((n for n in model.graph.node if scores in n.output), None)
    if kind == "cross_entropy" and producer is not None and producer.op_type == "Softmax":
        logger.warning(
            "output '%s' comes from a Softmax: cross_entropy applies softmax itself, so it will "
            "see probabilities as logits; train on the Softmax's input instead (output=)",
            scores,
        )
    dims = None if shape is None else [shape[0], *shape[2:]]
    return helper.make_tensor_value_info(target, onnx.TensorProto.INT64, _batch_symbolic(dims))


def _batch_symbolic(shape):
    """`shape` with its first dimension made symbolic (kept when it already is)."""
    if shape is None:
        return None
    if not shape:
        return []
    first = shape[0] if isinstance(shape[0], str) else "batch"
    return [first, *(d if d is not None else None for d in shape[1:])]


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name
