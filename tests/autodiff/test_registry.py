"""The op tables and the rule registry stay in sync, and every state is explicit."""

from __future__ import annotations

import importlib
import pkgutil

import tests.autodiff as family_tests
from onnxgrad.autodiff import rules
from onnxgrad.autodiff.rules import NON_DIFFERENTIABLE, RULE, ZERO


def all_cases():
    cases = []
    for info in pkgutil.iter_modules(family_tests.__path__):
        if info.name.startswith("test_rules_"):
            module = importlib.import_module(f"tests.autodiff.{info.name}")
            cases += list(getattr(module, "CASES", []))
    return cases


def test_every_rule_has_op_table_cases():
    rules.load_all()
    tested = {case.op for case in all_cases()}
    untested = sorted(
        op for (op, _), e in rules.RULES.items() if e.state == RULE and op not in tested
    )
    assert not untested, f"rules without op-table cases: {untested}"


def test_every_case_has_a_rule():
    rules.load_all()
    registered = {op for (op, _), e in rules.RULES.items() if e.state == RULE}
    strays = sorted({case.op for case in all_cases()} - registered)
    assert not strays, f"op-table cases for ops without a rule: {strays}"


def test_states_are_explicit():
    rules.load_all()
    for (op, _), entry in rules.RULES.items():
        assert entry.state in (RULE, ZERO, NON_DIFFERENTIABLE), op
        assert (entry.fn is not None) == (entry.state == RULE), op
        if entry.fn is not None:
            assert entry.fn.__doc__ and "→" in entry.fn.__doc__, f"{op} rule lacks its formula"
