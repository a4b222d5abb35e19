"""The gradient registry as data: one record per op type, for `onnxgrad ops` and docs/ops.md.

Each record says, for one op type that onnx defines in the default domain (and for each
op of another domain that onnxgrad registers), how onnxgrad differentiates it:

- ``rule``: a derivative rule emits the backward nodes;
- ``zero``: the op is piecewise constant and its inputs get a true zero gradient;
- ``non_differentiable``: its outputs carry no gradient (integers, samplers, constants);
- ``unsupported``: no rule yet; a model that needs one gets an error naming the op.

Regenerate the document with ``python -m onnxgrad.opsdoc --write docs/ops.md``.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnx.defs

from onnxgrad.autodiff import rules
from onnxgrad.runtime import kernels

logger = logging.getLogger(__name__)

STATES = (rules.RULE, rules.ZERO, rules.NON_DIFFERENTIABLE, "unsupported")

_STATE_TEXT = {
    rules.RULE: "a derivative rule emits the backward nodes",
    rules.ZERO: "piecewise constant: the inputs get a true zero gradient",
    rules.NON_DIFFERENTIABLE: "the outputs carry no gradient (integers, samplers, constants)",
    "unsupported": "no rule yet: a model that needs one fails with an error naming the op",
}


@dataclass(frozen=True)
class OpRecord:
    """How onnxgrad handles one op type.

    Attributes:
        op: the op type, as the spec names it.
        domain: "" for ai.onnx.
        state: one of STATES.
        since: the newest opset version of the op's schema that onnx knows (None when onnx
            has no schema for it).
        kernel: whether the numpy executor has a kernel for it.
        deprecated: onnx marks the op deprecated.
    """

    op: str
    domain: str
    state: str
    since: int | None
    kernel: bool
    deprecated: bool = False


def _newest_schemas() -> dict[tuple[str, str], onnx.defs.OpSchema]:
    newest: dict[tuple[str, str], onnx.defs.OpSchema] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        domain = "" if schema.domain == "ai.onnx" else schema.domain
        key = (schema.name, domain)
        if key not in newest or schema.since_version > newest[key].since_version:
            newest[key] = schema
    return newest


def records() -> list[OpRecord]:
    """One record per default-domain op type onnx defines and per registered op elsewhere.

    Sorted by domain (ai.onnx first), then op type.
    """
    rules.load_all()
    kernels.load_all()
    schemas = _newest_schemas()
    keys = {k for k in schemas if k[1] == ""} | set(rules.RULES)
    out = []
    for op, domain in sorted(keys, key=lambda k: (k[1], k[0])):
        entry = rules.RULES.get((op, domain))
        schema = schemas.get((op, domain))
        out.append(
            OpRecord(
                op=op,
                domain=domain,
                state=entry.state if entry is not None else "unsupported",
                since=schema.since_version if schema is not None else None,
                kernel=(op, domain) in kernels.KERNELS,
                deprecated=bool(schema is not None and schema.deprecated),
            )
        )
    return out


def as_dicts(recs: Sequence[OpRecord] | None = None) -> list[dict]:
    """The records as JSON-ready dicts with the keys op, domain, state, since, kernel,
    deprecated."""
    return [asdict(r) for r in (records() if recs is None else recs)]


def counts(recs: Sequence[OpRecord] | None = None, domain: str = "") -> dict[str, int]:
    """How many non-deprecated op types of `domain` are in each state (every state listed)."""
    recs = records() if recs is None else recs
    tally = Counter(r.state for r in recs if r.domain == domain and not r.deprecated)
    return {state: tally.get(state, 0) for state in STATES}


def table(recs: Sequence[OpRecord] | None = None) -> str:
    """The records as a plain-text table, then the count per state."""
    recs = records() if recs is None else recs
    width = max(len(r.op) for r in recs)
    lines = [f"{'op':<{width}}  {'domain':<10}  {'state':<18}  {'since':>5}  kernel"]
    for r in recs:
        since = "" if r.since is None else str(r.since)
        note = "  (deprecated)" if r.deprecated else ""
        lines.append(
            f"{r.op:<{width}}  {r.domain or 'ai.onnx':<10}  {r.state:<18}  {since:>5}  "
            f"{'yes' if r.kernel else 'no'}{note}"
        )
    lines.append("")
    lines.append(_count_line(recs))
    return "\n".join(lines)


def _count_line(recs: Sequence[OpRecord]) -> str:
    tally = counts(recs)
    total = sum(tally.values())
    parts = ", ".join(f"{state} {n}" for state, n in tally.items())
    registered = total - tally["unsupported"]
    return f"ai.onnx (not deprecated): {total} op types, {registered} registered: {parts}"


def markdown(recs: Sequence[OpRecord] | None = None) -> str:
    """docs/ops.md: the states explained, the counts, and one table row per op type."""
    recs = records() if recs is None else recs
    lines = [
        "# Supported ops",
        "",
        "<!-- Generated by `python -m onnxgrad.opsdoc --write docs/ops.md`; do not edit. -->",
        "",
        (
            f"Every op type that onnx {onnx.__version__} defines in the default domain "
            "(ai.onnx), in one of four states:"
        ),
        "",
    ]
    for state in STATES:
        lines.append(f"- `{state}`: {_STATE_TEXT[state]}.")
    lines += ["", _count_line(recs) + ".", ""]
    lines += [
        (
            "`since` is the newest opset version of the op's schema; `kernel` says whether the "
            "numpy executor runs the op (onnxruntime runs the rest)."
        ),
        "",
        "| op | domain | state | since | kernel |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for r in recs:
        op = f"{r.op} (deprecated)" if r.deprecated else r.op
        since = "" if r.since is None else str(r.since)
        kernel = "yes" if r.kernel else "no"
        lines.append(f"| {op} | {r.domain or 'ai.onnx'} | {r.state} | {since} | {kernel} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m onnxgrad.opsdoc [--write PATH]`: print or write the markdown document."""
    parser = argparse.ArgumentParser(prog="python -m onnxgrad.opsdoc", description=__doc__)
    parser.add_argument("--write", metavar="PATH", help="write the document here")
    args = parser.parse_args(argv)
    text = markdown()
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text, encoding="utf-8")
        logger.info("wrote %s", args.write)
    else:
        print(text, end="")  # a script's own output, as the CLI's
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
