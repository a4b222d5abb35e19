"""Every opset from 7 to the newest onnx knows, on the same models, against PyTorch autograd.

The models of tests/models.py are exported by torch's legacy exporter at each opset it
writes (7 to 20) and carried on from its opset-18 export by onnx's version converter to
each newer one (21 to the newest). Each is loaded as a user would (old opsets are brought
up to the canonical one, newer ones kept) and its gradients, for loss = sum(output · r),
must match torch's to 1e-4 of the largest torch gradient in float32 and 1e-9 in float64.

torch writes Erf for GELU at opsets 7 and 8, where Erf does not exist yet: those exports
fail the ONNX checker, and the test checks that the error says so. (In float64 the CNN's
Pad at opsets 7 to 9 is where onnx's version converter writes a float32 constant_value;
the importer retypes it.)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import version_converter

torch = pytest.importorskip("torch")

import onnxgrad
from onnxgrad.autodiff.builder import GRAD_SUFFIX
from onnxgrad.errors import ModelLoadError
from onnxgrad.importer import CANONICAL_OPSET, opset_of
from tests.models import MODELS, build, example_input, map_parameters, quiet, torch_gradients

NEWEST = onnx.defs.onnx_opset_version()
LEGACY = range(7, 21)
"""The opsets torch's legacy exporter writes."""
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


def _export(module, kind: str, dtype: str, opset: int, path) -> onnx.ModelProto:
    x = torch.from_numpy(example_input(kind, dtype))
    with quiet():
        torch.onnx.export(
            module,
            (x,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=False,
        )
    return onnx.load(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(kind, dtype, opset) -> (torch module, the ONNX model as written), made on first use."""
    folder = tmp_path_factory.mktemp("opsets")
    cache: dict = {}

    def get(kind: str, dtype: str, opset: int):
        key = (kind, dtype, opset)
        if key not in cache:
            module = cache.setdefault((kind, dtype), build(kind, dtype))
            if opset in LEGACY:
                model = _export(module, kind, dtype, opset, folder / f"{kind}{opset}.onnx")
            else:
                model = version_converter.convert_version(get(kind, dtype, 18)[1], opset)
            cache[key] = (module, model)
        return cache[key]

    return get


def _known_failure(kind: str, dtype: str, opset: int) -> str | None:
    if kind == "transformer" and opset < 9:
        return "Erf"
    return None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opset", range(7, NEWEST + 1))
@pytest.mark.parametrize("kind", list(MODELS))
def test_gradients_match_torch_at_every_opset(exported, kind, dtype, opset):
    module, written = exported(kind, dtype, opset)
    assert opset_of(written) == opset
    failure = _known_failure(kind, dtype, opset)
    if failure == "Erf":
        with pytest.raises(ModelLoadError, match=f"No Op registered for Erf .* {opset}"):
            onnxgrad.load(written)
        return
    model = onnxgrad.load(written)
    mapping = map_parameters(model, module)
    wrt = [*mapping.onnx_to_torch, "input"]
    assert opset_of(model) == max(opset, CANONICAL_OPSET)

    grad = onnxgrad.gradient_model(model, wrt=wrt, loss="output")
    x = example_input(kind, dtype)
    with torch.no_grad():
        shape = tuple(module(torch.from_numpy(x)).shape)
    r = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    _, grads_t, dx_t = torch_gradients(module, x, r)
    names = [f"{w}{GRAD_SUFFIX}" for w in wrt]
    feeds = {"input": x, f"output{GRAD_SUFFIX}": r}
    got = dict(zip(wrt, onnxgrad.Session(grad).run(names, feeds)))
    theirs = {init: mapping.torch_grad(grads_t, init) for init in mapping.onnx_to_torch}
    theirs["input"] = dx_t
    scale = max(float(np.abs(g).max()) for g in theirs.values())
    errors = {k: float(np.abs(got[k] - v).max()) / scale for k, v in theirs.items()}
    bad = {k: f"{v:.2g}" for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"opset {opset}: relative errors above {TOLERANCE[dtype]:g}: {bad}"
