"""Gradient parity with PyTorch autograd on exported models.

Each model of tests/models.py is exported with both torch exporters, in float32 and
float64. With loss = sum(output · r) for fixed random weights r in both frameworks, the
gradient of every parameter and of the input must agree with torch's: to 1e-4 relative
error in float32 and 1e-9 in float64. The float32 gradient models must also give the same
numbers in onnxruntime as in onnxgrad's executor, at a batch size other than the export's.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

import onnxgrad  # noqa: E402
from onnxgrad.autodiff.builder import GRAD_SUFFIX  # noqa: E402
from tests.models import (  # noqa: E402
    DTYPES,
    EXPORTERS,
    MODELS,
    Mapping,
    build,
    example_input,
    export,
    map_parameters,
    torch_gradients,
)

logger = logging.getLogger(__name__)

TOLERANCE = {"float32": 1e-4, "float64": 1e-9}

CASES = [
    pytest.param(kind, exporter, dtype, id=f"{kind}-{exporter}-{dtype}")
    for kind, exporter, dtype in itertools.product(MODELS, EXPORTERS, DTYPES)
]
CASES32 = [
    pytest.param(kind, exporter, id=f"{kind}-{exporter}")
    for kind, exporter in itertools.product(MODELS, EXPORTERS)
]


@dataclass
class Exported:
    """One export: the torch module, the loaded ONNX model, and which initializer is which."""

    module: torch.nn.Module
    path: Path
    model: onnx.ModelProto
    mapping: Mapping

    @property
    def wrt(self) -> list[str]:
        """Every initializer that holds a torch parameter, then the input."""
        return [*self.mapping.onnx_to_torch, "input"]


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Exports made on first use and kept for the whole test session."""
    folder = tmp_path_factory.mktemp("parity")
    cache: dict[tuple[str, str, str], Exported] = {}

    def get(kind: str, exporter: str, dtype: str) -> Exported:
        key = (kind, exporter, dtype)
        if key not in cache:
            module = build(kind, dtype)
            path = export(module, kind, exporter, folder / f"{kind}-{exporter}-{dtype}.onnx")
            model = onnxgrad.load(path)
            cache[key] = Exported(module, path, model, map_parameters(model, module))
        return cache[key]

    return get


ZERO_FLOOR = 1e-3
"""Errors are relative to at least this share of the model's largest gradient.

Some gradients are exactly zero in exact arithmetic: the key projection's bias, since
adding one constant to every attention score of a row leaves the softmax unchanged. Both
frameworks then return pure rounding noise, which no relative tolerance can compare.
"""


def rel_error(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """max |a - b| relative to the largest |b|, or to `floor` when that is larger."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b), initial=0.0)), floor, 1e-30)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def _weights(shape, dtype: str, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("kind, exporter, dtype", CASES)
def test_gradients_match_torch(exports, kind, exporter, dtype, record_property):
    ex = exports(kind, exporter, dtype)
    grad = onnxgrad.gradient_model(ex.model, wrt=ex.wrt, loss="output")
    onnx.checker.check_model(grad, full_check=True)

    x = example_input(kind, dtype)
    with torch.no_grad():
        r = _weights(tuple(ex.module(torch.from_numpy(x)).shape), dtype)
    out_t, grads_t, dx_t = torch_gradients(ex.module, x, r)

    names = ["output"] + [f"{w}{GRAD_SUFFIX}" for w in ex.wrt]
    values = onnxgrad.Session(grad).run(names, {"input": x, f"output{GRAD_SUFFIX}": r})
    got = dict(zip(names, values))
    floor = ZERO_FLOOR * max(float(np.max(np.abs(g))) for g in [dx_t, *grads_t.values()])
    errors = {"output": rel_error(got["output"], out_t)}
    for init in ex.mapping.onnx_to_torch:
        ours, theirs = got[f"{init}{GRAD_SUFFIX}"], ex.mapping.torch_grad(grads_t, init)
        assert ours.dtype == np.dtype(dtype) and ours.shape == theirs.shape, init
        errors[init] = rel_error(ours, theirs, floor)
    errors["input"] = rel_error(got[f"input{GRAD_SUFFIX}"], dx_t, floor)

    worst = max(errors, key=errors.get)
    record_property("worst_rel_error", errors[worst])
    logger.info(
        "%s-%s-%s: worst relative error %.3g (%s)", kind, exporter, dtype, errors[worst], worst
    )
    bad = {k: f"{v:.3g}" for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]:g} against torch: {bad}"


@pytest.mark.parametrize("kind, exporter", CASES32)
def test_gradient_model_runs_in_onnxruntime(exports, kind, exporter):
    ex = exports(kind, exporter, "float32")
    grad = onnxgrad.gradient_model(ex.model, wrt=ex.wrt, loss="output")
    onnx.checker.check_model(grad, full_check=True)

    # A batch size other than the export's: the batch dimension must stay dynamic.
    shape = (MODELS[kind].input_shape[0] + 2, *MODELS[kind].input_shape[1:])
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    out_shape = onnxgrad.Session(ex.model).run(["output"], {"input": x})[0].shape
    feeds = {"input": x, f"output{GRAD_SUFFIX}": _weights(out_shape, "float32")}
    names = [o.name for o in grad.graph.output]
    ours = onnxgrad.Session(grad).run(names, feeds)
    theirs = onnxgrad.Session(grad, backend="onnxruntime").run(names, feeds)
    for name, a, b in zip(names, ours, theirs):
        assert a.shape == b.shape, f"{name}: shape {a.shape} here, {b.shape} in onnxruntime"
        scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_every_parameter_is_mapped(exports):
    # The legacy exporter's constant folding stores Linear weights transposed under
    # generated names; the mapping must still find every torch parameter.
    ex = exports("transformer", "legacy", "float32")
    torch_names = {n for n, _ in ex.module.named_parameters()}
    assert {p for p, _ in ex.mapping.onnx_to_torch.values()} == torch_names
    assert set(ex.mapping.onnx_to_torch) <= set(onnxgrad.trainable_parameters(ex.model))
