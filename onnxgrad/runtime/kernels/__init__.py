"""The registry of numpy kernels, one factory per op type.

A kernel factory receives the node once, at compile time, parses what it needs from the
attributes, and returns a function of the input arrays that returns a tuple of output
arrays. Absent optional inputs arrive as None; a kernel may return fewer outputs than the
node declares when the trailing ones are optional and unused.

    @kernel("LeakyRelu")
    def leaky_relu(node: KernelNode):
        alpha = node.attrs.get("alpha", 0.01)
        return lambda x: (np.where(x > 0, x, x * x.dtype.type(alpha)),)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Kernel = Callable[..., tuple]
Factory = Callable[["KernelNode"], Kernel]

KERNELS: dict[tuple[str, str], Factory] = {}

FAMILIES = (
    "elementwise",
    "activation",
    "linalg",
    "conv",
    "deform",
    "pool",
    "norm",
    "shape",
    "reduce",
    "index",
    "loss",
    "misc",
    "control",
    "recurrent",
    "resize",
    "attention",
    "quant",
    "extra",
    "sequence",
    "string",
    "random",
    "signal",
    "vision",
)


@dataclass
class KernelNode:
    """What a kernel factory knows about its node.

    Attributes:
        op_type, domain, name: the node's.
        opset: the opset of the node's domain in the model.
        attrs: attribute values (strings decoded, tensors as numpy arrays, graphs as
            GraphProto).
        inputs, outputs: tensor names ("" for an absent optional one).
        input_dtypes: numpy dtypes of the inputs where known at compile time (else None).
        outer: for nodes with subgraphs (If, Loop, Scan), the enclosing-scope tensors the
            subgraphs read, sorted; their values are passed to the kernel after the inputs.
    """

    op_type: str
    domain: str
    name: str
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    input_dtypes: list[Any] = field(default_factory=list)
    outer: list[str] = field(default_factory=list)


def kernel(*op_types: str, domain: str = "") -> Callable[[Factory], Factory]:
    """Register a kernel factory for each op type given."""

    def register(factory: Factory) -> Factory:
        for op in op_types:
            key = (op, domain)
            if key in KERNELS:
                raise RuntimeError(f"two kernels registered for {op}")
            KERNELS[key] = factory
        return factory

    return register


_loaded = False


def load_all() -> None:
    """Import every kernel family module so that all kernels are registered."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for family in FAMILIES:
        try:
            importlib.import_module(f"onnxgrad.runtime.kernels.{family}")
        except ModuleNotFoundError as err:
            if err.name != f"onnxgrad.runtime.kernels.{family}":
                raise


def lookup(op_type: str, domain: str = "") -> Factory | None:
    """The kernel factory for an op type, or None."""
    load_all()
    return KERNELS.get((op_type, "" if domain == "ai.onnx" else domain))
