"""Run the ONNX node conformance cases through onnxgrad's numpy executor.

The installed onnx wheel carries the generators of its backend node tests;
`onnx.backend.test.case.node.collect_testcases()` rebuilds every case (a one-node model or
its function expansion, with input and expected output data). This tool runs each case
whose nodes are all in the default domain through `onnxgrad.Session` and compares the
outputs the way onnx's backend runner does: same shapes and dtypes, strings exactly,
numbers within the case's tolerances (rtol 1e-3, atol 1e-7; two ulps for bfloat16).

A case fails when the Session cannot be built, the run raises, the run exceeds the time
limit, or an output differs. Usage:

    python tools/conformance.py                    # every case: a line per op, failures
    python tools/conformance.py --only-failing     # only the ops with a failing case
    python tools/conformance.py --op Resize --op Pad
    python tools/conformance.py --case 'test_resize_.*cubic'
    python tools/conformance.py --json report.json --list-failures
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import re
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
_EXPANDED = re.compile(r"_expanded(_ver\d+)?$")


@dataclass
class Result:
    """The outcome of one case.

    Attributes:
        name: the case's name (test_...).
        op: the op type the case tests (for function expansions, the expanded op).
        passed: whether every output matched.
        error: why it failed: the exception or the mismatch, empty when it passed.
        seconds: time to build the session and run it.
    """

    name: str
    op: str
    passed: bool
    error: str = ""
    seconds: float = 0.0

    @property
    def first_line(self) -> str:
        """The first non-empty line of the error."""
        for line in self.error.splitlines():
            if line.strip():
                return line.strip()
        return ""


def collect(ops: Sequence[str] | None = None, pattern: str | None = None) -> list:
    """The default-domain node cases of the installed onnx, in a stable order.

    Args:
        ops: keep only cases of these op types (None: all).
        pattern: keep only cases whose name matches this regular expression (search).

    Returns:
        onnx's TestCase objects, each with an extra attribute `op`.
    """
    from onnx.backend.test.case.node import collect_testcases

    # The generators compute their expected outputs with numpy and warn about 1/0 etc.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = list(collect_testcases())
    ops_by_name = {}
    for case in cases:
        nodes = case.model.graph.node
        if len(nodes) == 1 and not _EXPANDED.search(case.name):
            ops_by_name[case.name] = nodes[0].op_type
    selected = []
    seen = set()
    for case in cases:
        if case.name in seen or not is_default_domain(case.model):
            continue
        seen.add(case.name)
        case = dataclasses.replace(case)  # onnx hands out its one shared list: copy
        base = _EXPANDED.sub("", case.name)
        case.op = ops_by_name.get(base) or _guess_op(case)
        if ops and case.op not in ops:
            continue
        if pattern and not re.search(pattern, case.name):
            continue
        selected.append(case)
    selected.sort(key=lambda c: (c.op, c.name))
    return selected


def is_default_domain(model: onnx.ModelProto) -> bool:
    """Whether every node of the model (subgraphs included) is in the default domain."""
    return all(n.domain in DEFAULT_DOMAINS for n in _all_nodes(model.graph))


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _guess_op(case) -> str:
    nodes = case.model.graph.node
    return nodes[0].op_type if len(nodes) == 1 else "(expanded)"


def to_value(value):
    """A test datum as the executor sees it: arrays for tensors (TensorProto and numpy
    scalars included), lists for sequences, None for an empty optional."""
    if value is None:
        return None
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [to_value(v) for v in value]
    return np.asarray(value)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise _Timeout after `seconds` (main thread, POSIX only; otherwise no limit)."""
    usable = (
        seconds
        and hasattr(signal, "setitimer")
        and _is_main_thread()
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)
    )
    if not usable:
        yield
        return

    def alarm(signum, frame):
        raise _Timeout(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_case(case, timeout: float | None = 60.0, backend: str = "numpy") -> Result:
    """Build a Session for the case's model, run it on each data set and compare.

    Never raises: a failure of any kind is recorded in the Result.
    """
    from onnxgrad import Session

    start = time.perf_counter()
    try:
        with _time_limit(timeout), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            session = Session(case.model, backend=backend)
            names = [i.name for i in case.model.graph.input]
            out_names = [o.name for o in case.model.graph.output]
            for inputs, outputs in case.data_sets:
                feeds = {n: to_value(v) for n, v in zip(names, inputs)}
                actual = session.run(out_names, feeds)
                expected = [to_value(v) for v in outputs]
                compare(expected, list(actual), case.rtol, case.atol)
    except Exception as err:  # noqa: BLE001 (every failure is a result, never a crash)
        message = f"{type(err).__name__}: {err}"
        return Result(case.name, case.op, False, message, time.perf_counter() - start)
    return Result(case.name, case.op, True, "", time.perf_counter() - start)


def compare(expected: Sequence, actual: Sequence, rtol: float, atol: float, where="") -> None:
    """Assert that `actual` matches `expected` as onnx's backend runner does.

    Raises:
        AssertionError: naming the output (and sequence position) that differs.
    """
    if len(actual) != len(expected):
        raise AssertionError(f"{len(actual)} outputs{where}, expected {len(expected)}")
    for i, (want, got) in enumerate(zip(expected, actual)):
        here = f"{where}[{i}]"
        if want is None or got is None:
            if want is not None or got is not None:
                raise AssertionError(f"output{here} is {_kind(got)}, expected {_kind(want)}")
            continue
        if isinstance(want, list):
            if not isinstance(got, (list, tuple)):
                message = f"output{here} is {_kind(got)}, expected a sequence"
                raise AssertionError(message)  # noqa: TRY004 (a mismatch, not a type error)
            compare(want, list(got), rtol, atol, here)
            continue
        if not isinstance(got, np.ndarray):
            if isinstance(got, (list, tuple)) or not np.isscalar(got):
                raise AssertionError(f"output{here} is {_kind(got)}, expected a tensor")
            got = np.asarray(got)
        if got.shape != want.shape:
            raise AssertionError(f"output{here} has shape {got.shape}, expected {want.shape}")
        if want.dtype == object:
            if not np.array_equal(got.astype(object), want):
                raise AssertionError(f"output{here} strings differ: {got!r} vs {want!r}")
            continue
        if got.dtype != want.dtype:
            raise AssertionError(f"output{here} is {got.dtype}, expected {want.dtype}")
        tol = rtol
        if want.dtype.name == "bfloat16":
            tol = max(rtol, 2.0**-6)  # two bfloat16 ulps, as onnx's runner allows
        if want.dtype.kind not in "biuf" or want.dtype.name == "bfloat16":
            want, got = want.astype(np.float32), got.astype(np.float32)
        try:
            np.testing.assert_allclose(got, want, rtol=tol, atol=atol)
        except AssertionError as err:
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            detail = "; ".join(ln.strip() for ln in lines[:4])
            raise AssertionError(f"output{here} differs: {detail}") from None


def _kind(value) -> str:
    if value is None:
        return "None (empty optional)"
    if isinstance(value, (list, tuple)):
        return f"a sequence of {len(value)}"
    return f"a tensor {getattr(value, 'dtype', type(value).__name__)}{list(np.shape(value))}"


def run_all(cases: Sequence, timeout: float | None = 60.0, backend: str = "numpy") -> list[Result]:
    """Run every case; log each failure at DEBUG."""
    results = []
    for case in cases:
        result = run_case(case, timeout, backend)
        if not result.passed:
            logger.debug("%s failed: %s", result.name, result.first_line)
        results.append(result)
    return results


def summarize(results: Sequence[Result]) -> dict:
    """Passes and failures per op, the totals, and every failure's first line."""
    per_op: dict[str, dict] = collections.defaultdict(lambda: {"passed": 0, "failed": 0})
    for r in results:
        per_op[r.op]["passed" if r.passed else "failed"] += 1
    passed = sum(r.passed for r in results)
    return {
        "onnx_version": onnx.__version__,
        "total": len(results),
        "passed": passed,
        "failed": len(results) - passed,
        "ops": dict(sorted(per_op.items())),
        "failures": {r.name: {"op": r.op, "error": r.first_line} for r in results if not r.passed},
        "cases": [asdict(r) | {"error": r.first_line} for r in results],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0 when every selected case passes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", help="only cases of this op type (repeatable)")
    parser.add_argument("--case", help="only cases whose name matches this regular expression")
    parser.add_argument("--json", metavar="OUT", help="write the full report as JSON to OUT")
    parser.add_argument(
        "--list-failures",
        action="store_true",
        help="print only the names of the failing cases, one per line",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds allowed per case (default 60)"
    )
    parser.add_argument(
        "--backend",
        choices=("numpy", "onnxruntime"),
        default="numpy",
        help="the Session backend to run (onnxruntime: for comparison)",
    )
    parser.add_argument(
        "--only-failing", action="store_true", help="leave out the ops that pass every case"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    cases = collect(args.op, args.case)
    if not cases:
        print("no case matches the filters", file=sys.stderr)
        return 2
    results = run_all(cases, args.timeout, args.backend)
    report = summarize(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    if args.list_failures:
        for r in results:
            if not r.passed:
                print(r.name)
        return 0 if report["failed"] == 0 else 1

    by_op = collections.defaultdict(list)
    for r in results:
        by_op[r.op].append(r)
    width = max(len(op) for op in by_op)
    for op, rs in sorted(by_op.items()):
        failed = [r for r in rs if not r.passed]
        if not failed and args.only_failing:
            continue
        print(f"{op:<{width}}  {len(rs) - len(failed):4d} passed  {len(failed):4d} failed")
        for r in failed:
            print(f"    {r.name}: {r.first_line[:300]}")
    full = sum(1 for rs in by_op.values() if all(r.passed for r in rs))
    print(
        f"total: {report['passed']} of {report['total']} cases pass "
        f"({report['failed']} fail); {full} of {len(by_op)} ops pass every case "
        f"(onnx {onnx.__version__})"
    )
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
