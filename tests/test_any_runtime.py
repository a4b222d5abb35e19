"""Training graphs any ONNX runtime can run: checker, default domain only, onnxruntime parity.

For every model the suite can reach cheaply (the torch parity models under both exporters,
the example CNN, a hand-built MLP), the gradient model and the step model:

- pass `onnx.checker.check_model(full_check=True)`;
- contain no node outside the default domain;
- give the same numbers in a stock onnxruntime `InferenceSession` as in onnxgrad's Session.

And the onnxruntime backend behind onnxgrad's own API (`Session(..., backend="onnxruntime")`,
`Trainer(..., backend="onnxruntime")`) follows the numpy backend step after step.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

import onnxgrad
from onnxgrad import Session, Trainer, check, gradient_model
from onnxgrad.optim import SGD, Adam
from onnxgrad.train.losses import append_loss
from onnxgrad.train.step import StepLayout, build_step_model, initial_state
from tests.train.test_step import DIGITS, mlp, ort_session

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

from tests.models import EXPORTERS, MODELS, build, export

PARITY = [f"{kind}-{exporter}" for kind, exporter in itertools.product(MODELS, EXPORTERS)]
ALL = ["digits", "mlp", *PARITY]
CLASSIFIERS = {"digits", "mlp", *(p for p in PARITY if not p.startswith("transformer"))}
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model sources by name, exported on first use and kept for the module."""
    folder = tmp_path_factory.mktemp("any_runtime")
    cache: dict[str, object] = {"digits": str(DIGITS), "mlp": mlp()}

    def get(name: str):
        if name not in cache:
            kind, exporter = name.split("-")
            cache[name] = str(export(build(kind), kind, exporter, folder / f"{name}.onnx"))
        return cache[name]

    return get


def sample(source, loss: str, n: int = 5, seed: int = 0):
    """Random feeds for the model's inputs and a target for `loss`, batch size n."""
    rng = np.random.default_rng(seed)
    model = onnxgrad.load(source)
    feeds = {}
    for vi in onnxgrad.importer.graph_inputs(model):
        dims = [
            d.dim_value if d.HasField("dim_value") else n for d in vi.type.tensor_type.shape.dim
        ]
        feeds[vi.name] = rng.normal(size=dims).astype(np.float32)
    out = model.graph.output[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else n for d in out]
    if loss == "cross_entropy":
        target = rng.integers(0, shape[1], [shape[0], *shape[2:]]).astype(np.int64)
    else:
        target = rng.normal(size=shape).astype(np.float32)
    return feeds, target


def assert_portable(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    foreign = {(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    assert not foreign, f"nodes outside the default domain: {sorted(foreign)}"


def assert_same_in_onnxruntime(model: onnx.ModelProto, feeds: dict) -> None:
    names = [o.name for o in model.graph.output]
    ours = Session(model).run(names, feeds)
    theirs = ort_session(model).run(names, feeds)
    for name, a, b in zip(names, ours, theirs):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("name", ALL)
def test_gradient_model_runs_anywhere(models, name):
    source = models(name)
    loss = "cross_entropy" if name in CLASSIFIERS else "mse"
    model, loss_name = append_loss(source, loss)
    grads = gradient_model(model, loss=loss_name)
    assert_portable(grads)
    feeds, target = sample(source, loss)
    assert_same_in_onnxruntime(grads, {**feeds, "target": target})


@pytest.mark.parametrize("name", ALL)
def test_step_model_runs_anywhere(models, name):
    source = models(name)
    loss = "cross_entropy" if name in CLASSIFIERS else "mse"
    # The transformer's key bias has a gradient of exactly zero in theory (softmax ignores a
    # shift shared by all keys), so both runtimes compute rounding noise there; Adam with its
    # default ε would blow that noise up to steps of ±lr. A larger ε keeps it noise.
    step = build_step_model(source, loss, Adam(0.01, eps=1e-3), clip_norm=1.0)
    assert_portable(step)
    feeds, target = sample(source, loss)

    # Two steps, the second from the first's state, on both runtimes.
    layout = StepLayout.of(step)
    state = initial_state(step)
    names = [o.name for o in step.graph.output]
    session = ort_session(step)
    for _ in range(2):
        run = {**feeds, "target": target, **state}
        ours = dict(zip(names, Session(step).run(names, run)))
        theirs = dict(zip(names, session.run(names, run)))
        for out in names:
            np.testing.assert_allclose(theirs[out], ours[out], rtol=RTOL, atol=ATOL, err_msg=out)
        # np.asarray: the numpy backend may give 0-d results as numpy scalars, not arrays.
        state.update({v: np.asarray(ours[f"{v}.updated"]) for v in layout.variables})


@pytest.mark.parametrize("name", ["digits", "mlp", "transformer-dynamo"])
def test_trainer_backends_agree_step_by_step(models, name):
    source = models(name)
    loss = "cross_entropy" if name in CLASSIFIERS else "mse"
    feeds, target = sample(source, loss, n=8)
    optimizer = lambda: SGD(0.05, momentum=0.9)
    numpy_trainer = Trainer(source, loss, optimizer())
    ort_trainer = Trainer(source, loss, optimizer(), backend="onnxruntime")
    for _ in range(5):
        a = numpy_trainer.step(feeds, target)
        b = ort_trainer.step(feeds, target)
        np.testing.assert_allclose(b, a, rtol=1e-4)


@pytest.mark.parametrize("name", ["digits", "cnn-legacy"])
def test_session_backends_agree(models, name):
    source = models(name)
    feeds, _ = sample(source, "mse", n=3)
    a = Session(source).run(None, feeds)
    b = Session(source, backend="onnxruntime").run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)


# The real-model corpus (tools/make_corpus.py): every model whose loss path is default-domain.


DEEP = 16
"""Convolutions from which a network counts as deep for `corpus_atol` (VGG-19 has 16)."""


def corpus_atol(model: onnx.ModelProto, reference: np.ndarray) -> float:
    """The absolute tolerance for one float32 tensor that came through corpus model `model`.

    The suite's floor, relative to the tensor's largest entry. Deep convolutional networks
    (`DEEP` convolutions or more) get more: two runtimes that sum in different orders (and
    pick different convolution algorithms) through the 60 convolutions of Inception,
    forward and backward, end up about 1e-3 of a gradient's largest entry apart in its
    smallest entries. The float64 gradient check in test_corpus.py is what proves the
    numbers right.
    """
    scale = float(np.max(np.abs(reference), initial=0.0))
    deep = sum(n.op_type == "Conv" for n in model.graph.node) >= DEEP
    return ATOL * max(1.0, scale) + (1e-3 * scale if deep else 0.0)


def _corpus_params():
    from tests import test_corpus

    return test_corpus._params(test_corpus.TRAINABLE, test_corpus.SLOW_STEPS)


def corpus_model(name: str):
    """(model, its loss output, a few parameters, feeds) of a corpus model whose loss path
    is default-domain only; a skip otherwise, or when the model is not built."""
    from tests import test_corpus as corpus

    case = corpus.case_for(name)
    model = onnxgrad.load(corpus.prepared(case))
    output = case.manifest["loss"]["output"]
    needed, _ = check.only_for(model, [output])
    if corpus.foreign_ops(needed) or any(
        n.domain not in ("", "ai.onnx") for n in needed.graph.node
    ):
        pytest.skip(f"'{name}': ops outside the default domain on the loss's path")
    return model, output, corpus.choose(corpus.trainable_of(case, model)), case.inputs()


@pytest.mark.parametrize("name", _corpus_params())
def test_corpus_gradient_models_run_anywhere(name):
    model, output, wrt, feeds = corpus_model(name)
    grads = gradient_model(model, wrt=wrt, loss=output)
    # The forward part stays as the model has it (an ai.onnx.ml label head off the loss's
    # path included); what onnxgrad appends is default-domain only.
    onnx.checker.check_model(grads, full_check=True)
    appended = grads.graph.node[len(model.graph.node) :]
    assert appended and {n.domain for n in appended} <= {"", "ai.onnx"}
    (y,) = Session(model).run([output], feeds)
    upstream = np.random.default_rng(2).standard_normal(y.shape).astype(y.dtype)
    names = [output, *(f"{w}_grad" for w in wrt)]
    run = {**feeds, f"{output}_grad": upstream}
    ours = Session(grads).run(names, run)
    theirs = ort_session(grads).run(names, run)
    for out, a, b in zip(names, ours, theirs):
        np.testing.assert_allclose(
            b, a, rtol=RTOL, atol=corpus_atol(model, b), err_msg=f"{name}: {out}"
        )


@pytest.mark.parametrize("name", _corpus_params())
def test_corpus_step_models_run_anywhere(name):
    model, output, wrt, feeds = corpus_model(name)
    (y,) = Session(model).run([output], feeds)
    target = np.random.default_rng(3).standard_normal(y.shape).astype(y.dtype)
    step = build_step_model(model, "mse", Adam(1e-3, eps=1e-3), trainable=wrt, output=output)
    onnx.checker.check_model(step, full_check=True)
    appended = step.graph.node[len(model.graph.node) :]
    assert appended and {n.domain for n in appended} <= {"", "ai.onnx"}

    # One step on both runtimes: the loss and every updated variable.
    layout = StepLayout.of(step)
    run = {**feeds, layout.target: target, **initial_state(step)}
    names = [layout.loss, *(f"{v}.updated" for v in layout.variables)]
    ours = Session(step).run(names, run)
    theirs = ort_session(step).run(names, run)
    for out, a, b in zip(names, ours, theirs):
        np.testing.assert_allclose(
            b, a, rtol=RTOL, atol=corpus_atol(model, b), err_msg=f"{name}: {out}"
        )
