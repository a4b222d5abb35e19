"""The registry as data: `onnxgrad ops`, its JSON form, and docs/ops.md kept current."""

from __future__ import annotations

import json
from pathlib import Path

import onnx.defs

from onnxgrad import cli, opsdoc

DOC = Path(__file__).resolve().parent.parent / "docs" / "ops.md"


def test_docs_ops_md_is_current():
    expected = opsdoc.markdown()
    assert DOC.exists(), "docs/ops.md is missing: run python -m onnxgrad.opsdoc --write docs/ops.md"
    assert DOC.read_text(encoding="utf-8") == expected, (
        "docs/ops.md is stale: run python -m onnxgrad.opsdoc --write docs/ops.md"
    )


def test_one_record_per_default_domain_op():
    recs = opsdoc.records()
    names = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    default = [r for r in recs if r.domain == ""]
    assert {r.op for r in default} == names
    assert len(default) == len(names)
    assert all(r.state in opsdoc.STATES for r in recs)


def test_since_is_the_newest_schema_version():
    rec = {r.op: r for r in opsdoc.records() if r.domain == ""}
    assert rec["Relu"].since == onnx.defs.get_schema("Relu").since_version
    assert rec["Shape"].state == "non_differentiable"
    assert rec["Floor"].state == "zero"
    assert rec["MatMul"].state == "rule" and rec["MatMul"].kernel


def test_at_least_180_op_types_have_an_explicit_state():
    tally = opsdoc.counts()
    registered = sum(n for state, n in tally.items() if state != "unsupported")
    assert registered >= 180, tally


def test_cli_ops_json(capsys):
    assert cli.main(["ops", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list) and data
    assert all({"op", "domain", "state", "since"} <= set(d) for d in data)
    assert {"op": "Relu", "domain": ""}.items() <= next(
        d for d in data if d["op"] == "Relu"
    ).items()


def test_cli_ops_table(capsys):
    assert cli.main(["ops"]) == 0
    out = capsys.readouterr().out
    assert "MatMul" in out and "unsupported" in out
    assert "registered:" in out.splitlines()[-1]


def test_write(tmp_path):
    target = tmp_path / "ops.md"
    assert opsdoc.main(["--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == opsdoc.markdown()
