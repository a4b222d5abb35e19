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
from onnxgrad.errors import GradientError, MissingGradientError
from onnxgrad.importer import FLOAT_TYPES, attributes, load, opset_of, trainable_parameters

logger = logging.getLogger(__name__)

GRAD_SUFFIX = "_grad"


@dataclass
class Node:
    """The forward node as a rule sees it.

    Attributes:
        proto: the NodeProto.
        opset: the opset of the node's domain in the model.
        attrs: attribute values by name (strings decoded, tensors as numpy arrays).
        needs: per input, whether its gradient is wanted.
    """

    proto: onnx.NodeProto
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)
    needs: tuple[bool, ...] = ()

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
        """Whether the gradient of input `i` is wanted."""
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
        self.info = GraphInfo.from_graph(self.graph)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
        taken = set(self.producer) | {t.name for t in self.graph.initializer}
        taken |= {i.name for i in self.graph.input} | {n.name for n in self.graph.node}
        self.root = Emitter(self.info, self.opset, taken=taken)

    def build(self, wrt: Sequence[str] | None, loss: str | None) -> onnx.ModelProto:
        # 1. What to differentiate, with respect to what.
        loss = self._loss_name(loss)
        wrt = self._wrt_names(wrt)

        # 2. The nodes between them, and a rule for each.
        active, needs = self._active_nodes(wrt, loss)
        self._check_rules(active)

        # 3. Reverse walk: each rule turns output gradients into input gradients.
        seed, seed_input = self._seed(loss)
        grads: dict[str, list[str]] = {loss: [seed]}
        final: dict[str, str] = {}
        for node in reversed(active):
            self._backward(node, needs, grads, final)

        # 4. The wrt gradients as outputs, named `<name>_grad`.
        outputs = [self._wrt_output(w, grads, final) for w in wrt]
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

    # Step 2.

    def _is_float(self, name: str) -> bool:
        return self.info.dtypes.get(name, onnx.TensorProto.FLOAT) in FLOAT_TYPES

    def _active_nodes(self, wrt: list[str], loss: str) -> tuple[list[onnx.NodeProto], set[str]]:
        """Nodes that some wrt tensor reaches and that reach the loss, in graph order."""
        needs = set(wrt)
        for node in self.graph.node:
            if any(i in needs for i in node.input if i):
                entry = registry.lookup(node.op_type, node.domain)
                if entry is not None and entry.state != registry.RULE:
                    continue
                needs.update(o for o in node.output if o and self._is_float(o))
        reaches = {loss}
        for node in reversed(self.graph.node):
            if any(o in reaches for o in node.output):
                reaches.update(i for i in node.input if i)
        active = [
            n
            for n in self.graph.node
            if any(o in reaches and o in needs for o in n.output)
            and any(i in needs for i in n.input if i)
        ]
        return active, needs

    def _check_rules(self, active: Iterable[onnx.NodeProto]) -> None:
        missing = []
        for node in active:
            if registry.lookup(node.op_type, node.domain) is None:
                opset = opset_of(self.model, node.domain)
                missing.append((node.op_type, node.domain, opset, node.name))
        if missing:
            raise MissingGradientError(missing)

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

    def _accumulate(
        self, name: str, grads: dict[str, list[str]], final: dict[str, str]
    ) -> str | None:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) == 1:
            total = parts[0]
        else:
            b = self.root.scoped(f"{name}{GRAD_SUFFIX}/")
            total = b.Sum(*parts)  # dt = Σ grads that meet at t
        grads[name] = [total]
        final[name] = total
        return total

    def _backward(self, node: onnx.NodeProto, needs: set[str], grads, final) -> None:
        dys = [self._accumulate(o, grads, final) if o else None for o in node.output]
        if all(dy is None for dy in dys):
            return
        entry = registry.lookup(node.op_type, node.domain)
        assert entry is not None and entry.fn is not None  # _check_rules saw to it
        view = Node(
            node,
            opset_of(self.model, node.domain),
            attributes(node),
            tuple(bool(i) and i in needs for i in node.input),
        )
        b = self.root.scoped(f"{node.name}{GRAD_SUFFIX}/")
        dxs = list(entry.fn(b, view, dys))
        if any(dx is not None for dx in dxs[len(node.input) :]):
            raise GradientError(
                f"the {node.op_type} rule returned {len(dxs)} gradients for {len(node.input)} "
                f"inputs at node '{node.name}'"
            )
        logger.debug(
            "backward of %s '%s': %d input gradients",
            node.op_type,
            node.name,
            sum(dx is not None for dx in dxs),
        )
        for x, dx in zip(node.input, dxs):
            if dx is None or not x or x not in needs:
                continue
            if entry.broadcast:
                dx = b.sum_to(dx, x, b.shape(node.output[0]))
            grads.setdefault(x, []).append(dx)

    # Step 4.

    def _wrt_output(self, w: str, grads, final) -> str:
        g = final.get(w) or self._accumulate(w, grads, final)
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
        for t, g in list(final.items()):
            final[t] = mapping.get(g, g)
        for i, g in enumerate(outputs):
            outputs[i] = mapping.get(g, g)

    def _assemble(self, wrt: list[str], outputs: list[str], seed_input) -> onnx.ModelProto:
        out_names = []
        for w, g in zip(wrt, outputs):
            name = f"{w}{GRAD_SUFFIX}"
            if g != name:
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
            onnx.checker.check_model(model)
        except Exception as err:
            raise GradientError(
                f"the gradient graph is not valid ONNX (an onnxgrad bug): {err}"
            ) from err
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as err:  # onnx's own function bodies can fail its type check
            logger.warning("shape inference failed on the gradient graph: %s", err)
        return model
