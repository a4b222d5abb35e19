"""The whole training step as one ONNX model: forward, loss, backward, clipping, update.

`build_step_model` writes a model whose single run is one training step, in standard
ai.onnx ops only, so that any ONNX runtime (a stock onnxruntime `InferenceSession`
included) can train with it: feed the batch and the current state, read the loss and the
next state, feed that next state to the following run.

Names (one convention for every model; `p` is a trainable parameter's initializer name):

==================  ======================  ==============================================
input               output                  what it is
==================  ======================  ==============================================
data inputs         (none)                  the model's own inputs
``target``          (none)                  the targets, for an appended loss
(none)              the loss                ``loss`` for an appended loss, else its name
``p``               ``p.updated``           every trainable parameter
``p.momentum``      ``p.momentum.updated``  SGD with momentum > 0: the momentum buffer
``p.m``, ``p.v``    ``p.m.updated``, ...    Adam and AdamW: first and second moments
``step``            ``step.updated``        int64 scalar: steps taken before this one
``lr``              (none)                  float64 scalar: the learning rate
==================  ======================  ==============================================

Outputs come in this order: the loss, each ``p.updated`` (trainable order), each state's
``.updated`` (per parameter, in the order above), ``step.updated``.

Every input that is not data keeps its initial value as an initializer of the same name (an
input with a default, IR >= 4): the model's weights, zero optimizer state, step 0 and the
optimizer's learning rate. Feeding them is optional on the first step; feed ``lr`` to
schedule it. `initial_state` reads those defaults; `defaults=False` drops them (a smaller
file, every one must then be fed). The other hyper-parameters are constants in the graph.
onnxruntime logs a warning for each initializer that is also an input (it will not fold
it as a constant): that is intended here; `defaults=False` avoids it.

The arithmetic is `onnxgrad.optim`'s (PyTorch's) operation for operation, in the
parameter's dtype, with scalar factors (bias corrections, the decoupled decay factor, the
clipping scale) computed in float64 and rounded once, as Python floats are. A zero
momentum buffer makes the first SGD step ``buf = g``, exactly as PyTorch's copy does.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.version_converter
from onnx import helper, numpy_helper

from onnxgrad.autodiff.builder import GRAD_SUFFIX, gradient_model, names_in_use
from onnxgrad.autodiff.emitter import Emitter, GraphInfo
from onnxgrad.errors import GradientError, UnsupportedOpError
from onnxgrad.export import write_model
from onnxgrad.importer import (
    FLOAT_TYPES,
    checkable,
    graph_inputs,
    load,
    opset_of,
    tensor_array,
    trainable_parameters,
)
from onnxgrad.train.losses import LOSSES, append_loss
from onnxgrad.train.optim import SGD, Adam, AdamW, Optimizer

logger = logging.getLogger(__name__)

STEP = "step"
"""The int64 scalar input counting the steps taken before this one."""

LR = "lr"
"""The float64 scalar input holding the learning rate."""

UPDATED = ".updated"
"""Suffix of every output that replaces an input for the next step."""

METADATA_KEY = "onnxgrad.training_step"
"""metadata_props key under which a step model records the role of each tensor (JSON)."""

# Which hyper-parameters each optimizer's graph honors; any other must be at its default.
_KNOWN = {
    SGD: {"lr", "momentum", "nesterov", "weight_decay"},
    Adam: {"lr", "betas", "eps", "weight_decay"},
    AdamW: {"lr", "betas", "eps", "weight_decay"},
}

Trainable = Sequence[str] | Callable[[str], bool] | None


@dataclass
class StepLayout:
    """What each tensor of a step model is (also stored in its metadata as JSON).

    Attributes:
        loss: the loss output's name.
        target: the target input's name, or None when the loss is a model output.
        inputs: the model's data inputs.
        outputs: the original model's outputs (tensors of the step graph, not its outputs).
        parameters: the trainable parameters, in order.
        state: per parameter, its optimizer state tensors (possibly none).
        optimizer: the optimizer's repr, for people.
    """

    loss: str
    target: str | None
    inputs: list[str]
    outputs: list[str]
    parameters: list[str]
    state: dict[str, list[str]] = field(default_factory=dict)
    optimizer: str = ""

    @property
    def state_names(self) -> list[str]:
        """Every optimizer state tensor, parameter by parameter."""
        return [s for p in self.parameters for s in self.state.get(p, [])]

    @property
    def variables(self) -> list[str]:
        """Everything a step replaces: parameters, optimizer state, then the step count."""
        return [*self.parameters, *self.state_names, STEP]

    def to_json(self) -> str:
        return json.dumps(
            {
                "loss": self.loss,
                "target": self.target,
                "inputs": self.inputs,
                "outputs": self.outputs,
                "parameters": self.parameters,
                "state": self.state,
                "optimizer": self.optimizer,
            }
        )

    @classmethod
    def of(cls, model: onnx.ModelProto) -> StepLayout:
        """The layout recorded in a step model's metadata.

        Raises:
            GradientError: the model was not written by `build_step_model`.
        """
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                return cls(**json.loads(prop.value))
        raise GradientError(
            f"the model has no '{METADATA_KEY}' metadata: it was not written by "
            "onnxgrad.train.step.build_step_model"
        )


def build_step_model(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    loss: str = "cross_entropy",
    optimizer: Optimizer | None = None,
    trainable: Trainable = None,
    clip_norm: float | None = None,
    opset: int | None = None,
    *,
    output: str | None = None,
    defaults: bool = True,
) -> onnx.ModelProto:
    """One model whose single run is a whole training step (see the module's naming table).

    Args:
        model: a path, bytes or ModelProto (not modified).
        loss: one of `onnxgrad.train.losses.LOSSES` (appended, with a new input ``target``),
            or the name of a scalar output of the model that already is the loss.
        optimizer: SGD, Adam or AdamW from `onnxgrad.optim`; default SGD(lr=0.01).
        trainable: the parameters to train: None (all), a list of names, or a predicate.
        clip_norm: scale all gradients together so that their joint L2 norm is at most this
            (as `onnxgrad.optim.clip_grad_norm`), before the optimizer sees them.
        opset: the default-domain opset to write (older than the model's: down-converted).
        output: the output an appended loss reads when the model has several.
        defaults: keep the initial value of every parameter, state, ``step`` and ``lr``
            as the default of its input.

    Returns:
        The step model, checked with `onnx.checker.check_model(full_check=True)`.

    Raises:
        GradientError: an unknown loss, bad trainable names, a non-scalar loss, an optimizer
            setting the graph cannot express, or a name the convention needs already taken.
        MissingGradientError: ops between the loss and a trainable parameter lack a rule.
        UnsupportedOpError: `opset` is too old for an op of the step.
    """
    optimizer = SGD(0.01) if optimizer is None else optimizer
    _check_optimizer(optimizer)
    if clip_norm is not None and not clip_norm > 0:
        raise GradientError(f"clip_norm must be a number > 0, got {clip_norm}")

    # 1. The loss: appended to an output, or one the model already computes.
    forward = load(model)
    outputs = [o.name for o in forward.graph.output]
    data_inputs = [i.name for i in graph_inputs(forward)]
    if loss in LOSSES:
        train_model, loss_name = append_loss(forward, loss, output)
        target: str | None = "target"
    elif loss in outputs:
        _check_scalar(forward, loss)
        train_model, loss_name, target = forward, loss, None
    else:
        raise GradientError(
            f"unknown loss '{loss}': give one of {', '.join(LOSSES)}, or the name of a scalar "
            f"output of the model ({', '.join(outputs)})"
        )

    # 2. Forward, loss and backward: the gradient model.
    params = _select(forward, trainable)
    grads = gradient_model(train_model, wrt=params, loss=loss_name)
    graph = grads.graph
    layout = StepLayout(loss_name, target, data_inputs, outputs, params, optimizer=repr(optimizer))

    # 3. The names the convention claims must be free.
    taken = names_in_use(graph)
    states = {p: [f"{p}{s}" for s in _state_suffixes(optimizer)] for p in params}
    layout.state = states
    claimed = [f"{p}{UPDATED}" for p in params] + [STEP, f"{STEP}{UPDATED}", LR]
    claimed += [n for p in params for s in states[p] for n in (s, f"{s}{UPDATED}")]
    clash = sorted(n for n in claimed if n in taken)
    if clash:
        raise GradientError(
            f"the step model's naming convention needs the name(s) {', '.join(clash)}, which "
            "the model already uses: rename those tensors in the model first"
        )

    # 4. Clipping and the optimizer update, emitted after the backward nodes.
    info = GraphInfo.from_graph(graph)
    for name in [STEP, LR]:
        taken.add(name)
    info.dtypes[STEP] = onnx.TensorProto.INT64
    info.dtypes[LR] = onnx.TensorProto.DOUBLE
    inits = {t.name: t for t in graph.initializer}
    for p in params:
        for s in states[p]:
            info.dtypes[s] = inits[p].data_type
    b = Emitter(info, opset_of(grads), prefix="optimizer/", taken=taken)
    grad_of = {p: f"{p}{GRAD_SUFFIX}" for p in params}
    if clip_norm is not None:
        grad_of = _clip(b.scoped("optimizer/clip/"), grad_of, float(clip_norm))
    t = b.Add(STEP, b.ints(1), name=f"{STEP}{UPDATED}")  # t = step + 1
    for p in params:
        _update(b.scoped(f"optimizer/{p}/"), optimizer, p, grad_of[p], states[p], t)

    # 5. Assemble: the original inputs, the state inputs (with defaults), the new outputs.
    step_model = _assemble(grads, b.nodes, layout, optimizer, defaults)
    if opset is not None:
        step_model = convert_opset(step_model, opset)
    logger.info(
        "built a training step: %d parameter tensor(s), %s, loss '%s', %d nodes",
        len(params),
        optimizer,
        loss_name,
        len(step_model.graph.node),
    )
    return step_model


def initial_state(step_model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The default values of a step model's parameters, optimizer state, ``step`` and ``lr``.

    Raises:
        GradientError: the model was not written by `build_step_model`, or without defaults.
    """
    layout = StepLayout.of(step_model)
    inits = {t.name: t for t in step_model.graph.initializer}
    wanted = [*layout.variables, LR]
    missing = [n for n in wanted if n not in inits]
    if missing:
        raise GradientError(
            f"the step model has no default for {', '.join(missing)}: it was built with "
            "defaults=False, so the initial state must come from elsewhere"
        )
    return {n: tensor_array(inits[n]).copy() for n in wanted}


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at another default-domain opset (and the IR version that opset came with).

    Tries `onnx.version_converter` first. It has no way down for many ops whose newer
    version only added element types (Pow 15, Where 16, ...), so when it fails the graph is
    retargeted here: ops whose older definition computes the same for the types used are
    relabeled, axes inputs become attributes where the older op wants one, and anything else
    that changed is refused by name. Either way the full checker validates the result
    against the older definitions (element types included).

    Args:
        model: the model (not modified).
        opset: the target opset.

    Raises:
        UnsupportedOpError: an op is not defined at `opset`, or its older definition cannot
            express what the node does.
    """
    current = opset_of(model)
    if opset == current:
        return model

    # 1. Ops that do not exist at the target opset: refuse, naming them.
    for node in _default_nodes(model):
        if _since(node.op_type, opset) is None and node.op_type not in _REWRITTEN:
            first = _first_since(node.op_type)
            raise UnsupportedOpError(
                node.op_type,
                node.name,
                opset,
                detail=f"ONNX defines {node.op_type} from opset {first} on, so the graph cannot "
                f"be written at opset {opset}: target opset {first} or later"
                + (", or pick another loss" if node.name.startswith("loss/") else ""),
            )
    model = _explicit_axes(model) if opset < current else model

    # 2. The converter, then the full checker on what it wrote.
    try:
        converted = onnx.version_converter.convert_version(model, opset)
        converted.ir_version = ir_version_of(opset)
        onnx.checker.check_model(checkable(converted), full_check=True)
    except Exception as err:  # noqa: BLE001 - the converter raises bare C++ errors; we go on
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        logger.debug("onnx's version converter failed (%s); retargeting op by op", first)
    else:
        logger.info("converted the graph from opset %d to %d", current, opset)
        return converted
    if opset > current:
        raise UnsupportedOpError(
            "graph", "", opset, detail=f"onnx's version converter cannot bring it up from {current}"
        )

    # 3. Op by op, where the older definition computes the same thing.
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = _constant_values(out.graph)
    dtypes = GraphInfo.from_graph(onnx.shape_inference.infer_shapes(out).graph).dtypes
    for node in _default_nodes(out):
        if _since(node.op_type, opset) != _since(node.op_type, current):
            _retarget(node, opset, current, constants, dtypes)
    for entry in out.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    out.ir_version = ir_version_of(opset)
    try:
        onnx.checker.check_model(checkable(out), full_check=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        node = next((n for n in out.graph.node if n.name and f"'{n.name}'" in first), None)
        op = node.op_type if node is not None else "graph"
        raise UnsupportedOpError(
            op,
            node.name if node is not None else "",
            opset,
            detail=f"the graph does not hold at opset {opset} ({first}): target a newer opset",
        ) from err
    logger.info("retargeted the graph from opset %d to %d", current, opset)
    return out


def ir_version_of(opset: int) -> int:
    """The IR version of the first onnx release that defined default-domain `opset`."""
    versions = [ir for _, ir, ai_onnx, *_ in helper.VERSION_TABLE if ai_onnx == opset]
    if not versions:
        raise UnsupportedOpError(
            "opset", "", opset, detail="onnx knows no such default-domain opset version"
        )
    return min(versions)


# The update rules, one graph per parameter.


def _check_optimizer(optimizer: Optimizer) -> None:
    kind = type(optimizer)
    if kind not in _KNOWN:
        raise GradientError(
            f"the step model can express SGD, Adam and AdamW from onnxgrad.optim, not "
            f"{kind.__name__}: use one of those"
        )
    defaults = kind(lr=optimizer.lr).hyperparameters()
    extra = {
        k: v
        for k, v in optimizer.hyperparameters().items()
        if k not in _KNOWN[kind] and v != defaults.get(k)
    }
    if extra:
        raise GradientError(
            f"the step model cannot express {kind.__name__} settings "
            f"{', '.join(f'{k}={v!r}' for k, v in extra.items())}: leave them at their defaults"
        )


def _state_suffixes(optimizer: Optimizer) -> list[str]:
    if isinstance(optimizer, Adam):
        return [".m", ".v"]
    if isinstance(optimizer, SGD) and optimizer.momentum:
        return [".momentum"]
    return []


def _scalar(b: Emitter, value_f64: str, like: str) -> str:
    """A float64 scalar rounded once to the parameter's dtype (as numpy rounds a Python float)."""
    return b.Cast(value_f64, to=b.dtype(like))


def _clip(b: Emitter, grad_of: dict[str, str], max_norm: float) -> dict[str, str]:
    """Joint clipping by global norm, as `onnxgrad.optim.clip_grad_norm`.

    norm = √(Σ_p Σ g_p²) in float64; when norm > max_norm every g_p becomes
    g_p · max_norm / (norm + 1e-6), else stays as it is.
    """
    f64 = onnx.TensorProto.DOUBLE
    squares = [b.op("ReduceSumSquare", b.Cast(g, to=f64), keepdims=0) for g in grad_of.values()]
    norm = b.Sqrt(b.Sum(*squares))
    limit = b.const(max_norm, dtype=f64)
    scale = b.Div(limit, b.Add(norm, b.const(1e-6, dtype=f64)))
    # At norm == max_norm exactly nothing is scaled (clip_grad_norm's `<=`).
    scale = b.Where(b.Greater(norm, limit), scale, b.const(1.0, dtype=f64))
    out = {}
    for p, g in grad_of.items():
        out[p] = b.Mul(g, _scalar(b, scale, g), name=f"{g}/clipped")
    return out


def _update(b: Emitter, optimizer: Optimizer, p: str, g: str, states: list[str], t: str) -> None:
    """Emit the update of parameter `p` from its gradient `g`, as `onnxgrad.optim` does it.

    SGD:  g ← g + λ·p;  buf ← μ·buf + g;  g ← g + μ·buf (Nesterov) or buf;  p ← p − lr·g.
    Adam: g ← g + λ·p (AdamW instead: p ← p·(1 − lr·λ));  m ← m + (1 − β₁)(g − m);
    v ← β₂·v + (1 − β₂)·g²;  p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε), t = step + 1.
    """
    f64 = onnx.TensorProto.DOUBLE
    if b.dtype(g) != b.dtype(p):
        g = b.Cast(g, to=b.dtype(p))
    if isinstance(optimizer, SGD):
        lr = _scalar(b, LR, p)
        if optimizer.weight_decay:
            g = b.Add(g, b.Mul(b.const(optimizer.weight_decay, like=p), p))  # g + λ·p
        if optimizer.momentum:
            (buf,) = states
            mu = b.const(optimizer.momentum, like=p)
            # buf = μ·buf + g; the zero initial buffer gives PyTorch's first-step buf = g.
            buf = b.Add(b.Mul(buf, mu), g, name=f"{buf}{UPDATED}")
            g = b.Add(g, b.Mul(mu, buf)) if optimizer.nesterov else buf  # g + μ·buf
        b.Sub(p, b.Mul(lr, g), name=f"{p}{UPDATED}")  # p − lr·g
        return

    # Adam and AdamW.
    beta1, beta2 = optimizer.betas
    m, v = states
    param = p
    if optimizer.weight_decay:
        if isinstance(optimizer, AdamW):
            decay = b.Sub(
                b.const(1.0, dtype=f64), b.Mul(LR, b.const(optimizer.weight_decay, dtype=f64))
            )
            param = b.Mul(p, _scalar(b, decay, p))  # p·(1 − lr·λ)
        else:
            g = b.Add(g, b.Mul(b.const(optimizer.weight_decay, like=p), p))  # g + λ·p
    m_new = b.Add(m, b.Mul(b.const(1.0 - beta1, like=p), b.Sub(g, m)), name=f"{m}{UPDATED}")
    v_new = b.Add(
        b.Mul(v, b.const(beta2, like=p)),
        b.Mul(b.const(1.0 - beta2, like=p), b.Mul(g, g)),
        name=f"{v}{UPDATED}",
    )
    t64 = b.Cast(t, to=f64)
    one = b.const(1.0, dtype=f64)
    bias1 = b.Sub(one, b.Pow(b.const(beta1, dtype=f64), t64))  # 1 − β₁ᵗ
    bias2 = b.Sqrt(b.Sub(one, b.Pow(b.const(beta2, dtype=f64), t64)))  # √(1 − β₂ᵗ)
    step_size = _scalar(b, b.Div(LR, bias1), p)
    denom = b.Add(b.Div(b.Sqrt(v_new), _scalar(b, bias2, p)), b.const(optimizer.eps, like=p))
    b.Sub(param, b.Mul(step_size, b.Div(m_new, denom)), name=f"{p}{UPDATED}")


# Assembly.


def _assemble(
    grads: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    layout: StepLayout,
    optimizer: Optimizer,
    defaults: bool,
) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(grads)
    graph = model.graph
    graph.node.extend(nodes)
    inits = {t.name: t for t in graph.initializer}
    vis = {o.name: o for o in graph.output}

    # 1. Inputs: data, target, then every variable and the learning rate.
    new_inits: list[onnx.TensorProto] = []
    new_inputs: list[onnx.ValueInfoProto] = []
    outputs = [vis[layout.loss]]
    for p in layout.parameters:
        tensor = inits[p]
        new_inputs.append(helper.make_tensor_value_info(p, tensor.data_type, list(tensor.dims)))
        outputs.append(
            helper.make_tensor_value_info(f"{p}{UPDATED}", tensor.data_type, list(tensor.dims))
        )
    for p in layout.parameters:
        tensor = inits[p]
        zeros = np.zeros(tuple(tensor.dims), helper.tensor_dtype_to_np_dtype(tensor.data_type))
        for s in layout.state.get(p, []):
            new_inputs.append(helper.make_tensor_value_info(s, tensor.data_type, list(tensor.dims)))
            new_inits.append(numpy_helper.from_array(zeros, s))
            outputs.append(
                helper.make_tensor_value_info(f"{s}{UPDATED}", tensor.data_type, list(tensor.dims))
            )
    new_inputs.append(helper.make_tensor_value_info(STEP, onnx.TensorProto.INT64, []))
    new_inits.append(numpy_helper.from_array(np.array(0, np.int64), STEP))
    outputs.append(helper.make_tensor_value_info(f"{STEP}{UPDATED}", onnx.TensorProto.INT64, []))
    new_inputs.append(helper.make_tensor_value_info(LR, onnx.TensorProto.DOUBLE, []))
    new_inits.append(numpy_helper.from_array(np.array(optimizer.lr, np.float64), LR))

    # Models below IR 4 already list their initializers, parameters included, as inputs:
    # those entries give way to the convention's order.
    renamed = {i.name for i in new_inputs}
    kept = [i for i in graph.input if i.name not in renamed]
    del graph.input[:]
    graph.input.extend(kept + new_inputs)
    if defaults:
        graph.initializer.extend(new_inits)
    else:
        keep = [t for t in graph.initializer if t.name not in set(layout.parameters)]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    del graph.output[:]
    graph.output.extend(outputs)

    # 2. Overridable initializers need IR >= 4; the record of what is what.
    model.ir_version = max(model.ir_version, 4)
    del model.metadata_props[:]
    for prop in grads.metadata_props:
        if prop.key != METADATA_KEY:
            model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(key=METADATA_KEY, value=layout.to_json())
    graph.name = f"{graph.name or 'model'}_training_step"
    try:
        onnx.checker.check_model(checkable(model), full_check=True)
    except Exception as err:
        raise GradientError(
            f"the training step graph is not valid ONNX (an onnxgrad bug): {err}"
        ) from err
    return model


# Helpers.


# Ops whose older definitions (back to the first version listed there) compute the same as
# the newer ones for the element types they accept: a newer version only added types, or
# added an attribute (listed) whose default keeps the old behavior.
_SAME_BACK_TO = {
    **dict.fromkeys(
        [
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Pow",
            "Neg",
            "Abs",
            "Sqrt",
            "Exp",
            "Log",
            "Tanh",
            "Sigmoid",
            "Relu",
            "Sum",
            "Max",
            "Min",
            "Mean",
            "Floor",
            "Ceil",
            "Sign",
            "Reciprocal",
            "Erf",
            "Where",
            "Greater",
            "Less",
            "Equal",
            "GreaterOrEqual",
            "LessOrEqual",
            "Not",
            "And",
            "Or",
            "Xor",
            "MatMul",
            "Gemm",
            "Expand",
            "ConstantOfShape",
            "Concat",
            "Gather",
            "GatherElements",
            "Transpose",
            "Identity",
            "Size",
            "NonZero",
            "Flatten",
            "Tile",
            "Slice",
            "Conv",
            "ConvTranspose",
            "MaxPool",
            "AveragePool",
            "GlobalAveragePool",
            "GlobalMaxPool",
            "LeakyRelu",
            "Elu",
            "Selu",
            "HardSigmoid",
            "Softplus",
            "Softsign",
            "IsNaN",
            "IsInf",
            "Mod",
            "CumSum",
            "Einsum",
            "Trilu",
            "Range",
            "Clip",
            "Pad",
            "ScatterElements",
            "ScatterND",
            "Constant",
            "Cast",
            "Reshape",
            "Shape",
            "SoftmaxCrossEntropyLoss",
            "NegativeLogLikelihoodLoss",
            "BatchNormalization",
            "Dropout",
        ],
        11,
    ),
    # Before 13 these flatten the input to 2-D at `axis`: the same only for the last axis.
    **dict.fromkeys(["Softmax", "LogSoftmax", "Hardmax"], 13),
    "Constant": 1,  # the `value` attribute means the same in every version
}

# Ops that do not exist at older opsets but that `_retarget` rewrites into ones that do.
_REWRITTEN = frozenset({"CastLike"})

# Attributes added in a later version: the version, and the default that keeps the old behavior
# (None: no such value; the attribute must be absent).
_ADDED_LATER = {
    ("Reshape", "allowzero"): (14, 0),
    ("Shape", "start"): (15, 0),
    ("Shape", "end"): (15, None),
    ("Cast", "saturate"): (19, 1),
    ("ScatterElements", "reduction"): (16, "none"),
    ("ScatterND", "reduction"): (16, "none"),
    ("AveragePool", "dilations"): (19, None),
    ("BatchNormalization", "training_mode"): (14, 0),
}

# Ops that take their axes as an input from this opset on (an attribute before).
_AXES_INPUT = {
    "ReduceSum": 13,
    "Squeeze": 13,
    "Unsqueeze": 13,
    **dict.fromkeys(
        [
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        ],
        18,
    ),
}


def _default_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain in ("", "ai.onnx")]


def _first_since(op_type: str) -> int | None:
    versions = [
        s.since_version
        for s in onnx.defs.get_all_schemas_with_history()
        if s.name == op_type and s.domain in ("", "ai.onnx")
    ]
    return min(versions, default=None)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: tensor_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _explicit_axes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reductions over all axes get their axes spelled out (the converter needs them).

    A Reduce* node without axes (and noop_with_empty_axes 0) reduces every axis; with its
    input's rank known, the same reduction with axes [0, ..., rank − 1] can be written at
    any opset.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(out)
    info = GraphInfo.from_graph(inferred.graph)
    opset = opset_of(out)
    extra = []
    for node in out.graph.node:
        if not node.op_type.startswith("Reduce") or node.domain not in ("", "ai.onnx"):
            continue
        takes_input = opset >= _AXES_INPUT.get(node.op_type, 1_000)
        has_axes = (len(node.input) > 1 and node.input[1]) or any(
            a.name == "axes" for a in node.attribute
        )
        noop = any(a.name == "noop_with_empty_axes" and a.i for a in node.attribute)
        rank = len(info.shapes[node.input[0]]) if node.input[0] in info.shapes else None
        if has_axes or noop or rank is None or not takes_input:
            continue
        name = f"{node.name}/axes"
        extra.append(
            helper.make_node(
                "Constant",
                [],
                [name],
                name=name,
                value=numpy_helper.from_array(np.arange(rank, dtype=np.int64)),
            )
        )
        del node.input[1:]
        node.input.append(name)
    if not extra:
        return out
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(extra + nodes)
    return out


def _retarget(
    node: onnx.NodeProto,
    opset: int,
    current: int,
    constants: dict[str, np.ndarray],
    dtypes: dict[str, int],
) -> None:
    """Rewrite `node` in place into its form at `opset`, or refuse naming it."""
    op = node.op_type

    def refuse(why: str) -> UnsupportedOpError:
        return UnsupportedOpError(op, node.name, opset, detail=f"{why}: target a newer opset")

    # 0. CastLike (opset 15) is a Cast to the element type of its second input, when known.
    if op == "CastLike" and _since(op, opset) is None:
        to = dtypes.get(node.input[1])
        if not to:
            raise refuse("CastLike exists from opset 15 on, and the type it casts to is unknown")
        node.op_type = "Cast"
        del node.input[1:]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("to", to))
        return

    # 1. Axes given as an input, wanted as an attribute.
    since = _AXES_INPUT.get(op)
    if since is not None and opset < since and len(node.input) > 1 and node.input[1]:
        axes = constants.get(node.input[1])
        if axes is None:
            raise refuse(
                f"its axes are computed at run time, but before opset {since} {op} "
                "takes them as a constant attribute"
            )
        del node.input[1:]
        node.attribute.append(helper.make_attribute("axes", [int(a) for a in axes.reshape(-1)]))
        return
    if since is not None:
        return

    # 2. Ops that compute the same thing at the older version.
    back_to = _SAME_BACK_TO.get(op)
    if back_to is None or opset < back_to:
        raise refuse(
            f"its definition at opset {opset} differs from the one the graph uses (opset "
            f"{_since(op, current)}) and onnxgrad cannot rewrite it"
        )
    for attr in list(node.attribute):
        since, default = _ADDED_LATER.get((op, attr.name), (0, None))
        if opset >= since:
            continue
        value = helper.get_attribute_value(attr)
        value = value.decode() if isinstance(value, bytes) else value
        if default is None or value != default:
            raise refuse(f"attribute {attr.name}={value!r} exists only from opset {since} on")
        node.attribute.remove(attr)  # the default: the older op behaves this way already
    if op == "BatchNormalization" and len(node.output) > 1:
        raise refuse("its training-mode outputs differ before opset 14")


def _since(op_type: str, opset: int) -> int | None:
    """The since_version of the definition of `op_type` in force at `opset`, or None."""
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


def _select(model: onnx.ModelProto, trainable: Trainable) -> list[str]:
    """The trainable parameters in graph order (the Trainer's rules for `trainable=`)."""
    candidates = trainable_parameters(model)
    if trainable is None:
        names = candidates
    elif callable(trainable):
        names = [n for n in candidates if trainable(n)]
    else:
        if isinstance(trainable, str):
            trainable = [trainable]
        floats = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
        bad = [n for n in trainable if n not in floats]
        if bad:
            raise GradientError(
                f"cannot train {', '.join(repr(n) for n in bad)}: not a floating-point "
                f"initializer of the model; its trainable parameters are: "
                f"{', '.join(candidates) or '(none)'}"
            )
        order = {t.name: i for i, t in enumerate(model.graph.initializer)}
        names = sorted(dict.fromkeys(trainable), key=order.__getitem__)
    if not names:
        raise GradientError(
            f"no parameter is selected for training; the model's trainable parameters are: "
            f"{', '.join(candidates) or '(none)'}"
        )
    return names


def _check_scalar(model: onnx.ModelProto, loss: str) -> None:
    tt = next(o for o in model.graph.output if o.name == loss).type.tensor_type
    if tt.elem_type and tt.elem_type not in FLOAT_TYPES:
        raise GradientError(f"loss output '{loss}' is not floating-point: it cannot be trained on")
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d != 1 for d in dims):
            raise GradientError(
                f"loss output '{loss}' has shape {dims}, not a scalar: reduce it to one value "
                "(ReduceMean) or use one of the built-in losses"
            )


def save_model_atomically(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` to `path` through a temporary file in the same folder, then rename it
    (`onnxgrad.export.write_model`: weights kept on disk by `load`, or past protobuf's
    2 GiB, go to `<file name>.data` beside it).

    Raises:
        ExportError: the file cannot be written.
    """
    write_model(model, path)
