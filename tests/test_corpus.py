"""Real models from many exporters, end to end: forward, gradients, training.

The corpus is what `tools/make_corpus.py` describes. The onnx wheel's model-zoo graphs
(light_*) and pytorch-converted models are read from the installed onnx package; a small
set lives in tests/data/; the rest is built into corpus/ by the tool, and its cases skip
when it has not been built. For every model that can be trained:

1. forward parity: onnxgrad's numpy Session against onnxruntime, and against the expected
   outputs the source gives (the wheel's test data, scikit-learn, PyTorch);

2. a float64 gradient check (`onnxgrad.check.check`, which upcasts a copy) along random
   directions, on a few parameters of each model;

3. a few Trainer steps that lower the loss.

The light_* graphs hold their weights in ConstantOfShape nodes, all one value (0.02): they
are repaired first (`constants_to_initializers`), and for steps 2 and 3 their weights are
redrawn at random (He-normal), since identical weights make every channel the same and
saturate the softmax. Models with ops onnxgrad's numpy executor lacks (ai.onnx.ml,
com.microsoft) must be rejected with those ops named, and train on the onnxruntime backend.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad import check
from onnxgrad.errors import ExecutionError, GradientError, MissingGradientError
from onnxgrad.importer import load, opset_of, trainable_parameters
from onnxgrad.runtime import kernels as kernel_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_corpus

ort = pytest.importorskip("onnxruntime")

DATA = ROOT / "tests" / "data"
CORPUS = ROOT / "corpus"
RECIPES = make_corpus.recipes()
CASES = {case.name: case for case in make_corpus.iter_cases(DATA, CORPUS)}

UNTRAINABLE = {
    "ort_logreg_iris": "weights in ai.onnx.ml attributes, no initializers",
    "sklearn_mlp_digits_zipmap": "ZipMap makes the probabilities a sequence of maps",
}
"""Models with nothing to train, and why; their own tests check how they are refused."""

SLOW_STEPS = {"light_resnet50", "light_densenet121"}
"""Models whose gradient check and training run only with -m slow (their forward is cheap)."""


TRAINING_FAILS: dict[str, str] = {}
"""Models whose training check fails, and what fails (strict xfails)."""


def _params(names, slow_extra=frozenset(), fails=None) -> list:
    """pytest params, marked slow for the large light_* graphs, for `slow_extra` and for
    the models whose manifest says slow; strict xfails for the names in `fails`."""
    slow = {n for n, heavy in make_corpus.LIGHT.items() if heavy} | set(slow_extra)
    slow |= {n for n, case in CASES.items() if case.manifest.get("slow")}
    params = []
    for n in names:
        marks = [pytest.mark.slow] if n in slow else []
        if fails and n in fails:
            marks.append(pytest.mark.xfail(strict=True, reason=fails[n]))
        params.append(pytest.param(n, id=n, marks=marks))
    return params


ALL = [r.name for r in RECIPES]
TRAINABLE = [n for n in ALL if n not in UNTRAINABLE]


def case_for(name: str) -> make_corpus.Case:
    """The case, or a skip naming the command that builds it."""
    case = CASES.get(name)
    if case is None or not case.model_path.is_file():
        pytest.skip(f"'{name}' is not built: run python tools/make_corpus.py")
    return case


def foreign_ops(model: onnx.ModelProto) -> list[str]:
    """The op types the numpy executor has no kernel for."""
    ops = {
        n.op_type for n in model.graph.node if kernel_registry.lookup(n.op_type, n.domain) is None
    }
    return sorted(ops)


def ort_run(model: onnx.ModelProto, feeds: dict, outputs=None) -> list[np.ndarray]:
    """onnxruntime's outputs. It runs nothing below opset 7: those models go in as onnxgrad
    converts them."""
    opset = opset_of(model)
    if 0 < opset < 7:
        model = load(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def assert_close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.max(np.abs(theirs), initial=0.0)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-5 * scale, err_msg=what)


# Preparing a model for steps 2 and 3.


def prepared(case: make_corpus.Case, seed: int = 0) -> onnx.ModelProto:
    """The model as steps 2 and 3 use it: repaired, and with constant fills redrawn."""
    model = onnx.load(case.model_path)
    if case.manifest.get("repair"):
        held = {w.name for w in check.constant_weights(model)}
        model, changes = check.constants_to_initializers(model)
        assert len(changes) == len(held) > 0
        if case.manifest.get("redraw"):
            model = calibrated(redraw(model, held, seed), case)
    return model


def redraw(model: onnx.ModelProto, names: set[str], seed: int) -> onnx.ModelProto:
    """Draw the initializers `names` at random, by what reads them; reset constant statistics.

    Conv and Gemm weights are He-normal for their fan-in; normalization scales (and the Mul
    that caffe2 applies them with) are near one; everything else is a small bias. The
    BatchNormalization statistics that stay ConstantOfShape nodes become mean 0, variance 1.
    """
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    readers = _readers(graph)
    for k, tensor in enumerate(graph.initializer):
        if tensor.name not in names:
            continue
        shape = tuple(tensor.dims)
        node, position = readers.get(tensor.name, (None, -1))
        op = node.op_type if node is not None else ""
        if op in ("Conv", "ConvTranspose") and position == 1:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif op == "Gemm" and position == 1:
            trans_b = helper.get_node_attr_value(node, "transB") if _has(node, "transB") else 0
            fan_in = shape[1] if trans_b else shape[0]
            value = rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)
        elif (op == "BatchNormalization" and position == 1) or op == "Mul":
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.05 * rng.standard_normal(shape)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        graph.initializer[k].CopyFrom(numpy_helper.from_array(value.astype(dtype), tensor.name))
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            continue
        reader, position = readers.get(node.output[0], (None, -1))
        if reader is not None and reader.op_type == "BatchNormalization" and position in (3, 4):
            fill = np.array([0.0 if position == 3 else 1.0], np.float32)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(fill)))
    return out


def calibrated(model: onnx.ModelProto, case: make_corpus.Case) -> onnx.ModelProto:
    """Scale the layer before the final Softmax so that its logits spread about 1.

    Redrawn residual networks (ResNet, ShuffleNet) grow their activations through every
    Sum; logits in the thousands would saturate the softmax and zero its gradients. The
    layer is a Conv or Gemm, reached back through ops that scale with it (ReLU, pooling,
    reshapes): dividing its weight and bias by s divides the logits by s.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    passive = {"Reshape", "Flatten", "Squeeze", "Identity", "Dropout"}
    scaling = passive | {"Relu", "GlobalAveragePool", "AveragePool", "MaxPool"}
    node = producers.get(case.manifest["loss"]["output"])
    while node is not None and node.op_type in passive:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Softmax":
        return model
    logits = node.input[0]
    layer = producers.get(logits)
    while layer is not None and layer.op_type in scaling:
        layer = producers.get(layer.input[0])
    if layer is None or layer.op_type not in ("Conv", "Gemm"):
        return model
    weights = set()
    for name in layer.input[1:3]:
        while name in producers and producers[name].op_type in passive:
            name = producers[name].input[0]  # a weight reshaped before use (Inception v1)
        weights.add(name)
    (value,) = onnxgrad.Session(model).run([logits], case.inputs())
    spread = float(np.std(value))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, tensor in enumerate(out.graph.initializer):
        if tensor.name in weights:
            scaled = numpy_helper.to_array(tensor) / np.float32(spread)
            out.graph.initializer[k].CopyFrom(numpy_helper.from_array(scaled, tensor.name))
    return out


def _readers(graph: onnx.GraphProto) -> dict[str, tuple[onnx.NodeProto, int]]:
    """For each tensor, the first node that reads it past view ops, and at which input."""
    direct: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            direct.setdefault(name, []).append((node, k))
    views = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}

    def follow(name: str) -> tuple[onnx.NodeProto, int] | None:
        for node, k in direct.get(name, []):
            if node.op_type in views and k == 0:
                found = follow(node.output[0])
                if found is not None:
                    return found
            else:
                return node, k
        return None

    return {name: found for name in direct if (found := follow(name)) is not None}


def _has(node: onnx.NodeProto, attr: str) -> bool:
    return any(a.name == attr for a in node.attribute)


def choose(params: list[str], wanted: int = 3) -> list[str]:
    """A few parameters spread over the graph: the first, the last, and between."""
    if len(params) <= wanted:
        return list(params)
    picks = np.linspace(0, len(params) - 1, wanted).round().astype(int)
    return [params[k] for k in sorted(set(picks))]


def trainable_of(case: make_corpus.Case, model: onnx.ModelProto) -> list[str]:
    params = trainable_parameters(load(model))
    globs = case.manifest.get("trainable")
    if globs:
        params = [p for p in params if any(fnmatch.fnmatchcase(p, g) for g in globs)]
    return params


# 1. Forward parity.


@pytest.mark.parametrize("name", _params(ALL))
def test_forward_parity(name):
    case = case_for(name)
    model = onnx.load(case.model_path)
    feeds = case.inputs()
    expected = case.expected()
    theirs = dict(zip([o.name for o in model.graph.output], ort_run(model, feeds)))
    foreign = foreign_ops(model)

    # Ops without a numpy kernel: refused with every one of them named, run by onnxruntime.
    if foreign:
        with pytest.raises(ExecutionError) as err:
            onnxgrad.Session(model).run(None, feeds)
        for op in foreign:
            assert op in str(err.value)
        session = onnxgrad.Session(model, backend="onnxruntime")
    else:
        session = onnxgrad.Session(model)
    names = [o.name for o in model.graph.output if o.type.HasField("tensor_type")]
    ours = dict(zip(names, session.run(names, feeds)))
    for out in names:
        assert_close(ours[out], theirs[out], f"{name}: '{out}' against onnxruntime")
        if out in expected:
            assert_close(ours[out], expected[out], f"{name}: '{out}' against the source")
    if case.manifest.get("repair"):
        repaired, _ = check.constants_to_initializers(model)
        again = onnxgrad.Session(repaired).run(names, feeds)
        for out, value in zip(names, again):
            np.testing.assert_array_equal(value, ours[out])


# 2. The float64 gradient check.


@pytest.mark.parametrize("name", _params(TRAINABLE, SLOW_STEPS))
def test_gradient_check(name):
    case = case_for(name)
    model = prepared(case)
    loss = case.manifest["loss"]
    needed, _ = check.only_for(load(model), [loss["output"]])
    foreign = foreign_ops(needed)
    if foreign:
        # The float64 check runs on onnxgrad's executor: the ops it lacks are named.
        report = check.check(model, data=case.inputs(), loss=[loss["output"]])
        missing = {p.op_type for p in report.problems if p.kind == check.MISSING_KERNEL}
        assert missing == set(foreign) and not report.checks, check.render(report)
        return
    wrt = choose(trainable_of(case, model))
    # The model-zoo graphs hold millions of ReLUs at 224x224: a step of 1e-6 along a random
    # direction carries some of them across their kink. 1e-8 crosses a hundred times
    # fewer, and float64 rounding still stays far below the tolerance.
    eps = 1e-8 if case.manifest["source"] == "onnx-light" else 1e-6
    report = check.check(
        model,
        data=case.inputs(),
        loss=[loss["output"]],
        wrt=wrt,
        directions=2,
        samples=2,
        eps=eps,
    )
    assert report.ok, check.render(report)
    assert [c.name for c in report.checks] == wrt


# 3. Training lowers the loss.


@pytest.mark.parametrize("name", _params(TRAINABLE, SLOW_STEPS, TRAINING_FAILS))
def test_training_lowers_the_loss(name):
    case = case_for(name)
    model = prepared(case)
    loss = case.manifest["loss"]
    inputs = case.inputs()
    data = case.data()
    if "target" in data:
        target = data["target"]
    else:
        (y,) = ort_run(model, inputs, [loss["output"]])
        target = np.random.default_rng(1).standard_normal(y.shape).astype(y.dtype)
    default_lr = 1e-2 if case.manifest.get("redraw") else 3e-3
    trainer = onnxgrad.Trainer(
        model,
        loss=loss["kind"],
        output=loss["output"],
        optimizer=onnxgrad.optim.Adam(lr=case.manifest.get("lr") or default_lr),
        trainable=trainable_of(case, model),
        backend=case.manifest["backend"],
    )
    losses = [trainer.step(inputs, target) for _ in range(4)]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses


# Models with nothing to train.


def test_zipmap_probabilities_are_refused_naming_the_zipmap():
    case = case_for("sklearn_mlp_digits_zipmap")
    with pytest.raises(GradientError, match=r"ai\.onnx\.ml::ZipMap node 'ZipMap'"):
        check.check(case.model_path)


def test_a_model_of_ml_ops_only_is_refused_naming_them():
    case = case_for("ort_logreg_iris")
    with pytest.raises(GradientError) as err:
        check.check(case.model_path)
    text = str(err.value)
    assert "ai.onnx.ml::LinearClassifier node" in text and "ai.onnx.ml::ZipMap node" in text


def test_com_microsoft_ops_are_named_when_they_lie_on_the_path():
    case = case_for("hf_bert_tiny_ort_fused")
    model = onnx.load(case.model_path)
    with pytest.raises(MissingGradientError) as err:
        onnxgrad.Trainer(model, loss="mse", output="last_hidden_state", backend="onnxruntime")
    text = str(err.value)
    for op in ("SkipLayerNormalization", "BiasGelu"):
        assert f"com.microsoft::{op}" in text
    # Behind the last of them, the pooler builds a gradient of standard ops only.
    grad = onnxgrad.gradient_model(load(model), wrt=trainable_of(case, model), loss="pooler_output")
    emitted = grad.graph.node[len(model.graph.node) :]
    assert emitted and {n.domain for n in emitted} <= {"", "ai.onnx"}


def test_weights_inside_if_branches_are_lifted_out():
    # spox's Silero VAD: one If on the sample rate holds the whole network, its weights
    # Constants of the branches; nothing in the main graph is a parameter until the repair
    # lifts them out, one set per sample rate, and the outputs stay as they were.
    case = case_for("pypi_silero_vad")
    model = load(case.model_path)
    assert [n.op_type for n in model.graph.node if n.op_type == "If"] == ["If"]
    assert trainable_parameters(model) == []
    held = check.constant_weights(model)
    repaired, changes = check.constants_to_initializers(onnx.load(case.model_path))
    names = trainable_parameters(load(repaired))
    assert len(changes) == len(held) == len(names) == 20
    assert sum("then_branch" in n for n in names) == sum("else_branch" in n for n in names) == 10
    feeds = case.inputs()
    for ours, theirs in zip(
        onnxgrad.Session(repaired).run(None, feeds),
        onnxgrad.Session(case.model_path).run(None, feeds),
    ):
        np.testing.assert_array_equal(ours, theirs)


def test_numpy_runs_past_ml_nodes_off_the_requested_path():
    case = case_for("sklearn_mlp_digits")
    feeds = case.inputs()
    (probabilities,) = onnxgrad.Session(case.model_path).run(["probabilities"], feeds)
    assert_close(probabilities, case.expected()["probabilities"], "probabilities")


# Fixes the corpus found.


def test_opset6_prelu_slopes_apply_per_channel():
    # The old PyTorch exporter's PReLU(num_parameters=3) on [N, C, H, W]: a [3] slope that
    # opset 6 applied along the channels.
    slope = np.array([0.1, 0.2, 0.3], np.float32)
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5]),
            helper.make_tensor_value_info("slope", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 5])],
        [numpy_helper.from_array(slope, "slope")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    want = np.where(x < 0, slope.reshape(3, 1, 1) * x, x)
    (y,) = onnxgrad.Session(model).run(None, {"x": x})
    np.testing.assert_allclose(y, want, rtol=1e-6)
    loaded = load(model)
    assert trainable_parameters(loaded) == ["slope"]
    unsqueeze, prelu = loaded.graph.node[-2:]
    assert (unsqueeze.op_type, prelu.op_type) == ("Unsqueeze", "PRelu")
    assert list(prelu.input) == ["x", unsqueeze.output[0]] and unsqueeze.input[0] == "slope"
    report = check.check(model)
    assert report.ok, check.render(report)


def test_negative_input_sizes_are_unknown_sizes():
    # paddle2onnx declares dynamic sizes as -1 (PaddleOCR's classifier: [-1, 3, -1, -1]);
    # they held every batch to a size of -1.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.array([[-1.0, 2.0, 3.0], [4.0, -5.0, 6.0]], np.float32)
    (y,) = onnxgrad.Session(model).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    dims = load(model).graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and dims[1].dim_value == 3


def test_scaler_outputs_get_their_input_shape():
    # onnx infers no shape (nor type) for ai.onnx.ml Scaler, which left every MatMul after
    # it without ranks and the gradient rules refusing them.
    case = case_for("sklearn_scaler_mlp_regressor")
    model = load(case.model_path)
    infos = {vi.name: vi for vi in model.graph.value_info}
    scaled = infos[model.graph.node[0].output[0]].type.tensor_type
    assert scaled.elem_type == TensorProto.FLOAT and len(scaled.shape.dim) == 2
    grad = onnxgrad.gradient_model(model)
    assert [o.name for o in grad.graph.output][1:] == [
        f"{p}_grad" for p in trainable_parameters(model)
    ]


def test_check_leaves_out_what_the_loss_does_not_need():
    case = case_for("sklearn_mlp_digits")
    report = check.check(case.model_path, data=case.inputs(), loss=["probabilities"])
    assert report.ok, check.render(report)
    assert any(re.search(r"ai\.onnx\.ml::ArrayFeatureExtractor", n) for n in report.notes)
