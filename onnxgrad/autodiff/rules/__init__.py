"""The registry of derivative rules, one entry per op type.

Every op type is in one of three explicit states:

- ``rule``: a function ``(b, node, dys) -> [dx or None per input]`` emits the gradient;
- ``zero``: the op is piecewise constant (Floor, Sign): its inputs get a true zero gradient;
- ``non_differentiable``: its outputs carry no gradient at all (Shape, comparisons, ArgMax).

An op that is absent is not implemented, and the builder reports it by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RULE = "rule"
ZERO = "zero"
NON_DIFFERENTIABLE = "non_differentiable"

Rule = Callable[..., Sequence["str | None"]]


@dataclass(frozen=True)
class RuleEntry:
    """How the gradient of one op type is made.

    Attributes:
        op_type: the ONNX op type, exactly as the spec names it.
        domain: "" for ai.onnx.
        state: RULE, ZERO or NON_DIFFERENTIABLE.
        fn: the rule function (RULE only).
        broadcast: the rule returns input gradients in the output's shape; the builder
            reduces them to each input's shape.
        through_integers: the op's integer outputs carry a gradient (a straight-through
            estimator, as for QuantizeLinear), where integers otherwise stop it.
    """

    op_type: str
    domain: str
    state: str
    fn: Rule | None = None
    broadcast: bool = False
    through_integers: bool = False


RULES: dict[tuple[str, str], RuleEntry] = {}

FAMILIES = (
    "elementwise",
    "activation",
    "linalg",
    "conv",
    "pool",
    "norm",
    "shape",
    "reduce",
    "index",
    "loss",
    "math",
    "control",
    "recurrent",
    "resize",
    "attention",
    "quant",
    "extra",
)


def _add(entry: RuleEntry) -> None:
    key = (entry.op_type, entry.domain)
    if key in RULES:
        raise RuntimeError(f"two gradient registrations for {entry.op_type}")
    RULES[key] = entry


def rule(
    *op_types: str, domain: str = "", broadcast: bool = False, through_integers: bool = False
) -> Callable[[Rule], Rule]:
    """Register `fn(b, node, dys)` as the derivative rule of each op type given.

    Args:
        op_types: ONNX op types the rule handles.
        domain: the op's domain ("" for ai.onnx).
        broadcast: the op broadcasts its inputs (numpy style); the rule returns gradients
            shaped like the output and the builder reduces them.
        through_integers: let the gradient pass the op's integer outputs (straight-through
            estimators); everywhere else integer tensors stop gradients.
    """

    def register(fn: Rule) -> Rule:
        for op in op_types:
            _add(RuleEntry(op, domain, RULE, fn, broadcast, through_integers))
        return fn

    return register


def zero(*op_types: str, domain: str = "") -> None:
    """Declare ops whose inputs get a true zero gradient (piecewise constant functions)."""
    for op in op_types:
        _add(RuleEntry(op, domain, ZERO))


def non_differentiable(*op_types: str, domain: str = "") -> None:
    """Declare ops whose outputs carry no gradient (integer results, constants, samplers)."""
    for op in op_types:
        _add(RuleEntry(op, domain, NON_DIFFERENTIABLE))


def lookup(op_type: str, domain: str = "") -> RuleEntry | None:
    """The registry entry for an op type, loading every family module on first use."""
    load_all()
    return RULES.get((op_type, "" if domain == "ai.onnx" else domain))


_loaded = False


def load_all() -> None:
    """Import every rule family module so that all rules are registered."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for family in FAMILIES:
        try:
            importlib.import_module(f"onnxgrad.autodiff.rules.{family}")
        except ModuleNotFoundError as err:
            if err.name != f"onnxgrad.autodiff.rules.{family}":
                raise
