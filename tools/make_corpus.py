"""Build the model corpus: real ONNX models from many exporters, for tests/test_corpus.py.

Every source but pypi is offline: files that installed wheels ship, and models made here from
code.

- onnx-light: the onnx wheel's model-zoo graphs (caffe2 exports: IR 3, opset 9), whose large
  weights are ConstantOfShape outputs; the expected outputs beside them are for the input
  arange(n) / n that onnx's backend runner feeds.
- onnx-pytorch: a selection of the onnx wheel's pytorch-converted models (the old PyTorch
  exporter: IR 3, opset 6, initializers listed as graph inputs), with their test_data_set_0.
- onnxruntime: the onnxruntime wheel's logreg_iris.onnx (ai.onnx.ml ops only, weights in
  attributes: nothing to train).
- sklearn: scikit-learn models converted by skl2onnx (default-domain MatMul/Add/Relu with
  ai.onnx.ml nodes around them: ArrayFeatureExtractor, ZipMap, Scaler).
- transformers: HuggingFace architectures with tiny configs built from code (random
  weights, nothing downloaded), exported with torch.onnx.export; one of them is also fused
  by onnxruntime's transformer optimizer into com.microsoft ops.
- torch: small PyTorch models exported the old ways (opset 9, initializers as inputs).
- tensorflow: small Keras 3 models (weights drawn here) converted by tf2onnx, NHWC
  convolutions, attention, an LSTM and TensorFlow while loops among them. TensorFlow is too
  large to install for CI, so these live in tests/data/: rebuild them where tensorflow and
  tf2onnx are installed, with `--small --only tensorflow`.
- pypi (opt-in: `--pypi`, or `--only pypi`; it needs the network): the ONNX files that
  wheels on PyPI ship, taken out of the wheel without installing it. magika carries Google's
  file-type classifier, a Keras model converted by tf2onnx; rapidocr-onnxruntime
  carries PaddleOCR's text detector, direction classifier and recognizer, converted by
  paddle2onnx (weights in Constant nodes, -1 for dynamic sizes); silero-vad its voice
  activity detector (an STFT as a Conv, then an LSTM), exported from PyTorch, and once
  more written by spox with the whole network inside an If. The wheels are downloaded once
  into OUT/.pypi-cache/.

Each model gets a folder OUT/<name>/ holding model.onnx, data.npz (inputs as
"input/<name>", expected outputs as "output/<name>" where the source gives them, training
targets as "target") and manifest.json:

    name, source, origin (where the file or its recipe comes from), made (how),
    ir_version, opsets ({domain: version}), inputs and outputs ([{name, dtype, shape}],
    symbolic dimensions as their names and unnamed ones as null), loss ({kind, output}, or
    null when nothing can be trained), backend (the one training needs: "onnxruntime" where
    the forward graph holds ops onnxgrad's numpy executor lacks), repair (whether
    `onnxgrad check --fix` must first turn Constant/ConstantOfShape weights into
    initializers), redraw (whether those weights are one constant fill, to be redrawn at
    random before a gradient check means anything), slow (kept out of the default test
    run), trainable (parameter globs, where not all of them can be trained), bytes; and
    where a source sets them, lr (the Adam step size of the training check) and note (why
    the trainable set is what it is).

The onnx-wheel models need no build: `wheel_cases()` describes them in place, and the tests
read them from the installed onnx package. `--small` writes the set kept in tests/data/
(each under 200 KB).

Run:
    python tools/make_corpus.py                       # everything that can be built, to corpus/
    python tools/make_corpus.py --only sklearn transformers
    python tools/make_corpus.py --small --out tests/data
    python tools/make_corpus.py --list
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger("make_corpus")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "corpus"
SMALL_LIMIT = 200 * 1024
"""Bytes: a model kept in tests/data/ stays below this."""
SEED = 0

ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"

LIGHT = {
    "light_bvlc_alexnet": True,
    "light_densenet121": False,
    "light_inception_v1": False,
    "light_inception_v2": False,
    "light_resnet50": False,
    "light_shufflenet": False,
    "light_squeezenet": False,
    "light_vgg19": True,
    "light_zfnet512": True,
}
"""The onnx wheel's model-zoo graphs, and whether each is slow (AlexNet, VGG-19 and ZFNet
hold 61 to 144 million weights)."""

PYTORCH_CONVERTED = (
    "test_BatchNorm1d_3d_input_eval",
    "test_BatchNorm2d_momentum_eval",
    "test_BatchNorm3d_eval",
    "test_Conv1d_dilated",
    "test_Conv1d_groups",
    "test_Conv2d_depthwise_with_multiplier",
    "test_Conv2d_groups",
    "test_Conv2d_no_bias",
    "test_Conv3d_dilated_strided",
    "test_ConvTranspose2d",
    "test_Embedding",
    "test_Linear",
    "test_PReLU_1d_multiparam",
    "test_PReLU_2d_multiparam",
    "test_PReLU_3d_multiparam",
)
"""The pytorch-converted models picked: one or two per layer kind that has weights."""


@dataclass
class Case:
    """One corpus model where it lies: its file, its manifest and its arrays.

    Attributes:
        name: the model's name.
        model_path: the .onnx file.
        manifest: the manifest (see the module docstring).
        data_path: the .npz file, or None when `arrays` makes the data.
        arrays: makes the data in place of a file (the wheel cases).
    """

    name: str
    model_path: Path
    manifest: dict
    data_path: Path | None = None
    arrays: Callable[[], dict[str, np.ndarray]] | None = None

    def data(self) -> dict[str, np.ndarray]:
        """Inputs ("input/<name>"), expected outputs ("output/<name>") and "target"."""
        if self.arrays is not None:
            return self.arrays()
        if self.data_path is None or not self.data_path.is_file():
            return {}
        with np.load(self.data_path) as f:
            return {k: f[k] for k in f.files}

    def inputs(self) -> dict[str, np.ndarray]:
        """The input arrays by input name."""
        return _strip(self.data(), "input/")

    def expected(self) -> dict[str, np.ndarray]:
        """The expected output arrays by output name (empty when the source gives none)."""
        return _strip(self.data(), "output/")


def _strip(data: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}


# Reading cases.


def folder_cases(folder: Path) -> list[Case]:
    """The cases a built folder holds (OUT/<name>/manifest.json), sorted by name."""
    cases = []
    if not folder.is_dir():
        return cases
    for manifest_path in sorted(folder.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        here = manifest_path.parent
        cases.append(Case(manifest["name"], here / "model.onnx", manifest, here / "data.npz"))
    return cases


def wheel_cases() -> list[Case]:
    """The onnx wheel's light and pytorch-converted models, described where they lie."""
    cases = []
    for name, slow in LIGHT.items():
        path = ONNX_DATA / "light" / f"{name}.onnx"
        if path.is_file():
            cases.append(_light_case(name, path, slow))
    for name in PYTORCH_CONVERTED:
        folder = ONNX_DATA / "pytorch-converted" / name
        if (folder / "model.onnx").is_file():
            cases.append(_pytorch_converted_case(name, folder))
    return cases


def _light_case(name: str, path: Path, slow: bool) -> Case:
    model = onnx.load(path)
    inputs = _real_inputs(model)

    def arrays() -> dict[str, np.ndarray]:
        data = {}
        for vi in inputs:
            shape = [d.dim_value if d.HasField("dim_value") else 1 for d in _dims(vi)]
            n = int(np.prod(shape))
            data[f"input/{vi.name}"] = (np.arange(n).reshape(shape) / n).astype(np.float32)
        for k, out in enumerate(model.graph.output):
            expected = path.with_name(f"{name}_output_{k}.pb")
            if expected.is_file():
                data[f"output/{out.name}"] = numpy_helper.to_array(onnx.load_tensor(expected))
        return data

    manifest = _manifest(
        model,
        name,
        source="onnx-light",
        origin=f"onnx {onnx.__version__} wheel: {path.relative_to(ONNX_DATA.parents[3])}",
        made="caffe2 model zoo export; weights replaced by ConstantOfShape fills",
        loss={"kind": "mse", "output": model.graph.output[0].name},
        repair=True,
        redraw=True,
        slow=slow,
        size=path.stat().st_size,
    )
    return Case(name, path, manifest, arrays=arrays)


def _pytorch_converted_case(name: str, folder: Path) -> Case:
    model = onnx.load(folder / "model.onnx")
    inputs = _real_inputs(model)

    def arrays() -> dict[str, np.ndarray]:
        data = {}
        sets = folder / "test_data_set_0"
        for k, vi in enumerate(inputs):
            data[f"input/{vi.name}"] = _read_pb(sets / f"input_{k}.pb")
        for k, out in enumerate(model.graph.output):
            data[f"output/{out.name}"] = _read_pb(sets / f"output_{k}.pb")
        return data

    manifest = _manifest(
        model,
        name,
        source="onnx-pytorch",
        origin=f"onnx {onnx.__version__} wheel: {folder.relative_to(ONNX_DATA.parents[3])}",
        made="the old PyTorch exporter (torch-jit-export), with test_data_set_0",
        loss={"kind": "mse", "output": model.graph.output[0].name},
        size=(folder / "model.onnx").stat().st_size,
    )
    return Case(name, folder / "model.onnx", manifest, arrays=arrays)


def _read_pb(path: Path) -> np.ndarray:
    return numpy_helper.to_array(onnx.load_tensor(path))


# Writing cases.


@dataclass(frozen=True)
class Recipe:
    """How to make one corpus model.

    Attributes:
        name: the model's name (its folder).
        source: one of the sources of the module docstring.
        make: writes model.onnx and data.npz into a folder and returns the manifest.
        small: part of the set kept in tests/data/.
    """

    name: str
    source: str
    make: Callable[[Path], dict]
    small: bool = False


def recipes() -> list[Recipe]:
    """Every model the tool can make, the copied wheel files included."""
    out = [Recipe(case.name, case.manifest["source"], _copier(case)) for case in wheel_cases()]
    out += [
        Recipe("ort_logreg_iris", "onnxruntime", make_ort_logreg_iris, small=True),
        Recipe("sklearn_mlp_digits", "sklearn", make_sklearn_mlp, small=True),
        Recipe("sklearn_mlp_digits_zipmap", "sklearn", make_sklearn_mlp_zipmap, small=True),
        Recipe("sklearn_scaler_mlp_regressor", "sklearn", make_sklearn_pipeline, small=True),
        Recipe("hf_bert_tiny", "transformers", make_bert, small=True),
        Recipe("hf_bert_tiny_dynamo", "transformers", make_bert_dynamo),
        Recipe("hf_bert_tiny_dynamo_opset23", "transformers", make_bert_opset23),
        Recipe("hf_bert_tiny_opset11", "transformers", make_bert_opset11),
        Recipe("hf_bert_tiny_ort_fused", "transformers", make_bert_fused, small=True),
        Recipe("hf_gpt2_tiny_dynamo", "transformers", make_gpt2, small=True),
        Recipe("hf_vit_tiny", "transformers", make_vit),
        Recipe("hf_llama_tiny_dynamo", "transformers", make_llama),
        Recipe("torch_cnn_opset9_inputs", "torch", make_torch_cnn_opset9, small=True),
        Recipe("tf_keras_cnn", "tensorflow", make_keras_cnn, small=True),
        Recipe("tf_keras_fcn", "tensorflow", make_keras_fcn, small=True),
        Recipe("tf_keras_transformer", "tensorflow", make_keras_transformer, small=True),
        Recipe("tf_keras_lstm", "tensorflow", make_keras_lstm, small=True),
        Recipe("tf_keras_gru", "tensorflow", make_keras_gru, small=True),
        Recipe("tf_function", "tensorflow", make_tf_function, small=True),
    ]
    out += [Recipe(w.name, "pypi", _from_wheel(w)) for w in PYPI]
    return out


def _copier(case: Case) -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        shutil.copyfile(case.model_path, folder / "model.onnx")
        np.savez(folder / "data.npz", **case.data())
        return dict(case.manifest)

    return make


def write(recipe: Recipe, out: Path) -> dict:
    """Make one model into OUT/<name>/ and return its manifest."""
    folder = out / recipe.name
    tmp = out / f".{recipe.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = recipe.make(tmp)
        manifest["bytes"] = (tmp / "model.onnx").stat().st_size
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _manifest(
    model: onnx.ModelProto,
    name: str,
    *,
    source: str,
    origin: str,
    made: str,
    loss: dict | None,
    backend: str = "numpy",
    repair: bool = False,
    redraw: bool = False,
    slow: bool = False,
    size: int | None = None,
    trainable: list[str] | None = None,
    lr: float | None = None,
    note: str | None = None,
) -> dict:
    manifest = {
        "name": name,
        "source": source,
        "origin": origin,
        "made": made,
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "inputs": [_value(vi) for vi in _real_inputs(model)],
        "outputs": [_value(vi) for vi in model.graph.output],
        "loss": loss,
        "backend": backend,
        "repair": repair,
        "redraw": redraw,
        "slow": slow,
    }
    extras = {"trainable": trainable, "lr": lr, "note": note, "bytes": size}
    manifest.update({k: v for k, v in extras.items() if v is not None})
    return manifest


def _value(vi: onnx.ValueInfoProto) -> dict:
    tp = vi.type
    if not tp.HasField("tensor_type"):
        return {"name": vi.name, "dtype": tp.WhichOneof("value"), "shape": None}
    elem = tp.tensor_type.elem_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in _dims(vi)]
    return {
        "name": vi.name,
        "dtype": helper.tensor_dtype_to_np_dtype(elem).name if elem else None,
        "shape": shape,
    }


def _dims(vi: onnx.ValueInfoProto):
    return vi.type.tensor_type.shape.dim


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """onnxgrad.importer.graph_inputs, which this tool does not import at module level: it
    also runs where only an exporter is installed (TensorFlow and tf2onnx)."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _save(folder: Path, model: onnx.ModelProto, data: dict[str, np.ndarray]) -> None:
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    np.savez(folder / "data.npz", **data)


# onnxruntime's bundled model.


def make_ort_logreg_iris(folder: Path) -> dict:
    """onnxruntime's datasets/logreg_iris.onnx: LinearClassifier, Normalizer, ZipMap."""
    import onnxruntime

    path = Path(onnxruntime.__file__).parent / "datasets" / "logreg_iris.onnx"
    model = onnx.load(path)
    (shape,) = [[d.dim_value for d in _dims(vi)] for vi in _real_inputs(model)]
    x = np.random.default_rng(SEED).standard_normal(shape).astype(np.float32) + 3
    _save(folder, model, {"input/float_input": x})
    return _manifest(
        model,
        "ort_logreg_iris",
        source="onnxruntime",
        origin=f"onnxruntime {onnxruntime.__version__} wheel: onnxruntime/datasets/"
        "logreg_iris.onnx",
        made="copied (a scikit-learn LogisticRegression converted long ago)",
        loss=None,
        backend="onnxruntime",
    )


# scikit-learn through skl2onnx.


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def _fitted_mlp():
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a deliberately short fit does not converge
        return MLPClassifier(hidden_layer_sizes=(32,), max_iter=30, random_state=SEED).fit(x, y)


def _sklearn_made(what: str) -> str:
    import skl2onnx
    import sklearn

    return f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}: {what}"


def make_sklearn_mlp(folder: Path) -> dict:
    """MLPClassifier(32) on the digits, without ZipMap: probabilities are a float tensor."""
    from skl2onnx import to_onnx

    x, y = _digits()
    clf = _fitted_mlp()
    model = to_onnx(clf, x[:1], options={"zipmap": False}, target_opset={"": 18, "ai.onnx.ml": 3})
    batch = x[:32]
    _save(
        folder,
        model,
        {
            "input/X": batch,
            "output/label": clf.predict(batch).astype(np.int64),
            "output/probabilities": clf.predict_proba(batch).astype(np.float32),
            "target": np.eye(10, dtype=np.float32)[y[:32]],
        },
    )
    return _manifest(
        model,
        "sklearn_mlp_digits",
        source="sklearn",
        origin="tools/make_corpus.py: MLPClassifier(hidden_layer_sizes=(32,)) fit on the digits",
        made=_sklearn_made("to_onnx(options={'zipmap': False})"),
        loss={"kind": "mse", "output": "probabilities"},
        backend="onnxruntime",
    )


def make_sklearn_mlp_zipmap(folder: Path) -> dict:
    """The same MLPClassifier with skl2onnx's default ZipMap: no float tensor output."""
    from skl2onnx import to_onnx

    x, _ = _digits()
    clf = _fitted_mlp()
    model = to_onnx(clf, x[:1], target_opset={"": 18, "ai.onnx.ml": 3})
    batch = x[:8]
    _save(folder, model, {"input/X": batch, "output/output_label": clf.predict(batch)})
    return _manifest(
        model,
        "sklearn_mlp_digits_zipmap",
        source="sklearn",
        origin="tools/make_corpus.py: MLPClassifier(hidden_layer_sizes=(32,)) fit on the digits",
        made=_sklearn_made("to_onnx() with its default ZipMap on the probabilities"),
        loss=None,
        backend="onnxruntime",
    )


def make_sklearn_pipeline(folder: Path) -> dict:
    """StandardScaler then MLPRegressor(16): an ai.onnx.ml Scaler before the weights."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _digits()
    target = y.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = make_pipeline(
            StandardScaler(), MLPRegressor(hidden_layer_sizes=(16,), max_iter=30, random_state=0)
        ).fit(x, target)
    model = to_onnx(pipe, x[:1], target_opset={"": 18, "ai.onnx.ml": 3})
    batch = x[:32]
    _save(
        folder,
        model,
        {
            "input/X": batch,
            "output/variable": pipe.predict(batch).astype(np.float32).reshape(-1, 1),
            "target": target[:32].reshape(-1, 1),
        },
    )
    return _manifest(
        model,
        "sklearn_scaler_mlp_regressor",
        source="sklearn",
        origin="tools/make_corpus.py: make_pipeline(StandardScaler(), MLPRegressor((16,))) "
        "fit on the digits",
        made=_sklearn_made("to_onnx()"),
        loss={"kind": "mse", "output": "variable"},
        backend="onnxruntime",
    )


# HuggingFace transformers with tiny configs.


_CHATTY = ("torch", "torch.onnx", "torch.export", "onnxscript", "tensorflow", "tf2onnx")
"""The loggers of the exporters, whose handlers write to the streams they first saw."""


@contextlib.contextmanager
def _quiet():
    """Silence the exporters: warnings, their loggers, and what they print."""
    loggers = [logging.getLogger(n) for n in _CHATTY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quiet_export(module, args: tuple, path: Path, **kwargs) -> None:
    """torch.onnx.export without its warnings and progress lines."""
    import torch

    with _quiet():
        torch.onnx.export(module, args, str(path), **kwargs)


def _perturb(module, seed: int = SEED) -> None:
    """Add small noise to every weight, as training would.

    Freshly initialized norms are all ones and biases all zeros; the dynamo exporter's
    optimizer then merges equal initializers into one, tying weights that a trained model
    keeps apart.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _torch_outputs(module, args: tuple, names: list[str]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        values = module(*args)
    values = values if isinstance(values, tuple) else (values,)
    return {f"output/{n}": v.detach().numpy() for n, v in zip(names, values)}


def _export_torch(
    folder: Path, module, inputs: dict, outputs: list[str], **export
) -> onnx.ModelProto:
    """Export `module` on `inputs` (tensors by input name) to folder/model.onnx with
    torch.onnx.export's `export` options, and write data.npz: the inputs and torch's
    outputs under the names `outputs`. Returns the exported model."""
    path = folder / "model.onnx"
    args = tuple(inputs.values())
    _quiet_export(module, args, path, input_names=list(inputs), output_names=outputs, **export)
    data = {f"input/{name}": value.numpy() for name, value in inputs.items()}
    data.update(_torch_outputs(module, args, outputs))
    np.savez(folder / "data.npz", **data)
    return onnx.load(path)


def _call_args(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def _transformers_made(exporter: str) -> str:
    import torch
    import transformers

    return (
        f"transformers {transformers.__version__}, torch {torch.__version__}: "
        f"torch.onnx.export({exporter})"
    )


def _bert(attention: str = "sdpa"):
    """BertModel with 1 layer, hidden 16, 2 heads, vocabulary 64, and its example inputs."""
    import torch
    from transformers import BertConfig, BertModel

    class Bert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = BertConfig(
                attn_implementation=attention,
                vocab_size=64,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
                type_vocab_size=2,
            )
            self.bert = BertModel(config)

        def forward(self, input_ids, attention_mask):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    torch.manual_seed(SEED)
    module = Bert().eval()
    _perturb(module)
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, 64, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 6:] = 0
    return module, (ids, mask)


_BERT_IO = {
    "input_names": ["input_ids", "attention_mask"],
    "output_names": ["last_hidden_state", "pooler_output"],
}
_BERT_AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
}


def _bert_data(module, args) -> dict[str, np.ndarray]:
    data = {"input/input_ids": args[0].numpy(), "input/attention_mask": args[1].numpy()}
    data.update(_torch_outputs(module, args, _BERT_IO["output_names"]))
    return data


def _bert_manifest(model, name: str, made: str, backend: str = "numpy") -> dict:
    return _manifest(
        model,
        name,
        source="transformers",
        origin="tools/make_corpus.py: BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, "
        "num_attention_heads=2, vocab_size=64)), random weights",
        made=made,
        loss={"kind": "mse", "output": "last_hidden_state"},
        backend=backend,
    )


def _export_bert(module, args, path: Path, dynamo: bool, opset: int) -> str:
    """Export tiny BERT (the legacy exporter with dynamic batch and length); its `made`."""
    axes = {} if dynamo else {"dynamic_axes": _BERT_AXES}
    _quiet_export(module, args, path, dynamo=dynamo, opset_version=opset, **axes, **_BERT_IO)
    return _transformers_made(
        f"dynamo={dynamo}, opset_version={opset}" + ("" if dynamo else ", dynamic_axes")
    )


def _bert_case(folder: Path, name: str, dynamo: bool, opset: int, attention: str = "sdpa"):
    module, args = _bert(attention)
    made = _export_bert(module, args, folder / "model.onnx", dynamo, opset)
    np.savez(folder / "data.npz", **_bert_data(module, args))
    return _bert_manifest(onnx.load(folder / "model.onnx"), name, made)


def make_bert(folder: Path) -> dict:
    """Tiny BERT through the legacy TorchScript exporter at opset 17, dynamic batch and length."""
    return _bert_case(folder, "hf_bert_tiny", dynamo=False, opset=17)


def make_bert_dynamo(folder: Path) -> dict:
    """Tiny BERT through the dynamo exporter (opset 18)."""
    return _bert_case(folder, "hf_bert_tiny_dynamo", dynamo=True, opset=18)


def make_bert_opset23(folder: Path) -> dict:
    """Tiny BERT through the dynamo exporter at opset 23, the newest it writes."""
    return _bert_case(folder, "hf_bert_tiny_dynamo_opset23", dynamo=True, opset=23)


def make_bert_opset11(folder: Path) -> dict:
    """Tiny BERT through the legacy exporter at opset 11 (LayerNorm written out in ops).

    Eager attention: opset 11 has nothing to export scaled_dot_product_attention to.
    """
    return _bert_case(folder, "hf_bert_tiny_opset11", dynamo=False, opset=11, attention="eager")


def make_bert_fused(folder: Path) -> dict:
    """Tiny BERT fused by onnxruntime's transformer optimizer: com.microsoft ops inside."""
    from onnxruntime.transformers.optimizer import optimize_model

    module, args = _bert()
    exported = folder / "exported.onnx"
    made = _export_bert(module, args, exported, dynamo=False, opset=17)
    with _quiet():
        fused = optimize_model(str(exported), model_type="bert", num_heads=2, hidden_size=16)
    exported.unlink()
    model = fused.model  # importing every onnxruntime domain, as users' fused models do
    _save(folder, model, _bert_data(module, args))
    made += ", then onnxruntime.transformers.optimizer.optimize_model(model_type='bert')"
    manifest = _bert_manifest(model, "hf_bert_tiny_ort_fused", made, backend="onnxruntime")
    # Only the pooler lies after the last com.microsoft node: that is what can be trained.
    manifest["loss"] = {"kind": "mse", "output": "pooler_output"}
    manifest["trainable"] = ["bert.pooler.*"]
    return manifest


def make_gpt2(folder: Path) -> dict:
    """Tiny GPT-2 through the dynamo exporter (the legacy one cannot export aten::diff)."""
    return _export_decoder(
        folder,
        "hf_gpt2_tiny_dynamo",
        "gpt2",
        "GPT2",
        vocab_size=64,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )


def make_vit(folder: Path) -> dict:
    """Tiny ViT (16x16 images, 4x4 patches) through the legacy exporter at opset 17."""
    import torch
    from transformers import ViTConfig, ViTModel

    class ViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = ViTConfig(
                image_size=16,
                patch_size=4,
                num_channels=3,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            )
            self.vit = ViTModel(config, add_pooling_layer=False)

        def forward(self, pixel_values):
            return self.vit(pixel_values=pixel_values, return_dict=True).last_hidden_state

    torch.manual_seed(SEED)
    module = ViT().eval()
    _perturb(module)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(SEED))
    model = _export_torch(
        folder,
        module,
        {"pixel_values": pixels},
        ["last_hidden_state"],
        dynamo=False,
        opset_version=17,
        dynamic_axes={"pixel_values": {0: "batch"}},
    )
    return _manifest(
        model,
        "hf_vit_tiny",
        source="transformers",
        origin="tools/make_corpus.py: ViTModel(ViTConfig(image_size=16, patch_size=4, "
        "hidden_size=16, num_hidden_layers=1)), random weights",
        made=_transformers_made("dynamo=False, opset_version=17, dynamic batch"),
        loss={"kind": "mse", "output": "last_hidden_state"},
    )


def make_llama(folder: Path) -> dict:
    """Tiny Llama (RMSNorm, rotary embeddings, SiLU gate) through the dynamo exporter."""
    return _export_decoder(
        folder,
        "hf_llama_tiny_dynamo",
        "llama",
        "Llama",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )


def _export_decoder(folder: Path, name: str, attr: str, family: str, **config) -> dict:
    """A transformers decoder (token ids to last_hidden_state), seeded, exported by dynamo.

    The model is transformers' `<family>Model(<family>Config(**config))`; it sits under
    `attr`, which prefixes every weight name in the export.
    """
    import torch
    import transformers

    def build():
        settings = getattr(transformers, f"{family}Config")(**config)
        return getattr(transformers, f"{family}Model")(settings)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, attr, build())

        def forward(self, input_ids):
            out = getattr(self, attr)(input_ids=input_ids, use_cache=False, return_dict=True)
            return out.last_hidden_state

    torch.manual_seed(SEED)
    module = Decoder().eval()
    _perturb(module)
    vocab = config["vocab_size"]
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(SEED))
    model = _export_torch(
        folder, module, {"input_ids": ids}, ["last_hidden_state"], dynamo=True, opset_version=18
    )
    return _manifest(
        model,
        name,
        source="transformers",
        origin=f"tools/make_corpus.py: {family}Model({family}Config({_call_args(config)})), "
        "random weights",
        made=_transformers_made("dynamo=True, opset_version=18"),
        loss={"kind": "mse", "output": "last_hidden_state"},
    )


# Small PyTorch models, exported the old ways.


def make_torch_cnn_opset9(folder: Path) -> dict:
    """A Conv-BN-ReLU-pool-Linear CNN, legacy exporter, opset 9, initializers as inputs."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).eval()
    with torch.no_grad():
        module[1].running_mean.normal_(0, 0.1)
        module[1].running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(SEED))
    model = _export_torch(
        folder,
        module,
        {"x": x},
        ["y"],
        dynamo=False,
        opset_version=9,
        dynamic_axes={"x": {0: "batch"}},
        keep_initializers_as_inputs=True,
        do_constant_folding=False,
    )
    return _manifest(
        model,
        "torch_cnn_opset9_inputs",
        source="torch",
        origin="tools/make_corpus.py: Conv2d-BatchNorm2d-ReLU-MaxPool2d-Linear",
        made=f"torch {torch.__version__}: torch.onnx.export(dynamo=False, opset_version=9, "
        "keep_initializers_as_inputs=True, do_constant_folding=False)",
        loss={"kind": "mse", "output": "y"},
    )


# TensorFlow and Keras models converted by tf2onnx.


def _keras_case(
    name: str, what: str, build, signature: list[tuple], opset: int, folder: Path
) -> dict:
    """Build a Keras model, perturb its weights, convert it with tf2onnx, and save both sides.

    Args:
        name: the corpus name.
        what: the layers, for the manifest's origin.
        build: makes the keras.Model (Keras 3 on the TensorFlow backend).
        signature: per input, (name, shape with None for dynamic sizes, dtype, the value fed).
        opset: the opset tf2onnx writes.
        folder: where model.onnx and data.npz (inputs, Keras's outputs under the ONNX output
            names) go.

    Returns:
        The manifest; the loss is the mean squared error of the first output.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet():
        import keras
        import tensorflow as tf
        import tf2onnx

        keras.utils.set_random_seed(SEED)
        model = build(keras)
        rng = np.random.default_rng(SEED)
        for weight in model.weights:  # fresh biases are 0 and norms 1: tf2onnx folds those away
            value = weight.numpy()
            if "variance" in weight.path:
                weight.assign(rng.uniform(0.5, 1.5, value.shape).astype(value.dtype))
            else:
                weight.assign(value + 0.1 * rng.standard_normal(value.shape).astype(value.dtype))
        specs = [tf.TensorSpec(shape, dtype, name=n) for n, shape, dtype, _ in signature]
        converted, _ = tf2onnx.convert.from_keras(model, input_signature=specs, opset=opset)
        feeds = [value for *_, value in signature]
        outputs = model(feeds if len(feeds) > 1 else feeds[0], training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    data = {f"input/{n}": value for n, *_, value in signature}
    for vi, value in zip(converted.graph.output, outputs):
        data[f"output/{vi.name}"] = np.asarray(value)
    _save(folder, converted, data)
    made = f"Keras {keras.__version__} (TensorFlow {tf.__version__}) through tf2onnx "
    made += f"{tf2onnx.__version__}: tf2onnx.convert.from_keras(opset={opset})"
    return _manifest(
        converted,
        name,
        source="tensorflow",
        origin=f"tools/make_corpus.py: {what}",
        made=made,
        loss={"kind": "mse", "output": converted.graph.output[0].name},
    )


def make_keras_cnn(folder: Path) -> dict:
    """Conv2D, BatchNormalization, pooling, depthwise and separable convolutions, NHWC."""

    def build(keras):
        layers = keras.layers
        image = keras.Input((12, 12, 3), name="image")
        x = layers.Conv2D(8, 3, padding="same")(image)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
        x = layers.DepthwiseConv2D(3, padding="same", activation="relu6")(x)
        x = layers.SeparableConv2D(8, 3, strides=2, activation="swish")(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dropout(0.2)(x)
        return keras.Model(image, layers.Dense(5, activation="softmax", name="probs")(x))

    image = np.random.default_rng(SEED).standard_normal((4, 12, 12, 3)).astype(np.float32)
    return _keras_case(
        "tf_keras_cnn",
        "Conv2D-BatchNorm-MaxPool-DepthwiseConv2D-SeparableConv2D",
        build,
        [("image", (None, 12, 12, 3), "float32", image)],
        13,
        folder,
    )


def make_keras_fcn(folder: Path) -> dict:
    """A fully convolutional net over images of any size: tf2onnx writes auto_pad=SAME_UPPER
    (the padding is known only at run time) for its Conv and pooling."""

    def build(keras):
        layers = keras.layers
        image = keras.Input((None, None, 3), name="image")
        x = layers.Conv2D(6, 3, padding="same", activation="relu")(image)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        x = layers.Conv2D(8, 3, strides=2, padding="same", activation="tanh")(x)
        x = layers.AveragePooling2D(2, padding="same")(x)
        x = layers.GlobalAveragePooling2D()(x)
        return keras.Model(image, layers.Dense(4, name="logits")(x))

    image = np.random.default_rng(SEED).standard_normal((3, 11, 9, 3)).astype(np.float32)
    return _keras_case(
        "tf_keras_fcn",
        "Conv2D-MaxPooling2D-Conv2D-AveragePooling2D (padding='same'), any image size",
        build,
        [("image", (None, None, None, 3), "float32", image)],
        13,
        folder,
    )


def make_keras_transformer(folder: Path) -> dict:
    """One encoder block: MultiHeadAttention, LayerNormalization, a tanh-GELU feed-forward."""

    def build(keras):
        layers = keras.layers
        x = keras.Input((10, 8), name="x")
        h = layers.Dense(16)(x)
        h = layers.LayerNormalization()(h + layers.MultiHeadAttention(2, 8)(h, h))
        gelu = keras.activations.gelu  # the exact GELU is Erfc in TensorFlow; tf2onnx lacks it
        f = layers.Dense(32, activation=lambda v: gelu(v, approximate=True))(h)
        h = layers.LayerNormalization()(h + layers.Dense(16)(f))
        y = layers.Dense(4, name="y")(layers.GlobalAveragePooling1D()(h))
        return keras.Model(x, y)

    x = np.random.default_rng(SEED).standard_normal((3, 10, 8)).astype(np.float32)
    return _keras_case(
        "tf_keras_transformer",
        "Dense, MultiHeadAttention, LayerNormalization, GELU",
        build,
        [("x", (None, 10, 8), "float32", x)],
        17,
        folder,
    )


def make_keras_lstm(folder: Path) -> dict:
    """Embedding, then an LSTM over a dynamic number of tokens (tf2onnx writes an LSTM op)."""

    def build(keras):
        layers = keras.layers
        tokens = keras.Input((None,), dtype="int32", name="tokens")
        x = layers.Embedding(40, 8)(tokens)
        x = layers.LSTM(12, return_sequences=True)(x)
        x = layers.GlobalMaxPooling1D()(x)
        return keras.Model(tokens, layers.Dense(3, name="logits")(x))

    tokens = np.random.default_rng(SEED).integers(0, 40, (4, 7)).astype(np.int32)
    return _keras_case(
        "tf_keras_lstm",
        "Embedding-LSTM-GlobalMaxPooling1D-Dense",
        build,
        [("tokens", (None, None), "int32", tokens)],
        15,
        folder,
    )


def make_keras_gru(folder: Path) -> dict:
    """A GRU and a SimpleRNN: tf2onnx leaves both as the Loop of TensorFlow's while loop."""

    def build(keras):
        layers = keras.layers
        x = keras.Input((None, 6), name="x")
        h = layers.GRU(8, return_sequences=True)(x)
        h = layers.SimpleRNN(5)(h)
        return keras.Model(x, layers.Dense(2, name="y")(h))

    x = np.random.default_rng(SEED).standard_normal((3, 5, 6)).astype(np.float32)
    return _keras_case(
        "tf_keras_gru",
        "GRU-SimpleRNN-Dense",
        build,
        [("x", (None, None, 6), "float32", x)],
        15,
        folder,
    )


def make_tf_function(folder: Path) -> dict:
    """Plain TensorFlow, no Keras: a tf.function over tf.Variables, converted at opset 18.

    conv1d with SAME padding, a layer norm written out with tf.nn.moments, a tanh GELU,
    an attention-style softmax pooling over time, then a matmul.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet():
        import tensorflow as tf
        import tf2onnx

        rng = np.random.default_rng(SEED)

        def variable(*shape: int, scale: float = 0.3) -> tf.Variable:
            return tf.Variable((scale * rng.standard_normal(shape)).astype(np.float32))

        kernel, bias = variable(3, 4, 8), variable(8)
        gamma, beta = tf.Variable(1 + variable(8).numpy()), variable(8)
        query, head = variable(8, 1), variable(8, 3)

        signature = [tf.TensorSpec((None, 9, 4), tf.float32, name="x")]

        @tf.function(input_signature=signature)
        def net(x):
            h = tf.nn.conv1d(x, kernel, stride=1, padding="SAME") + bias
            mean, var = tf.nn.moments(h, axes=[-1], keepdims=True)
            h = (h - mean) * tf.math.rsqrt(var + 1e-5) * gamma + beta
            h = tf.nn.gelu(h, approximate=True)
            weights = tf.nn.softmax(tf.squeeze(tf.matmul(h, query), -1), axis=1)
            pooled = tf.reduce_sum(h * weights[..., None], axis=1)
            return tf.identity(tf.matmul(pooled, head), name="y")

        converted, _ = tf2onnx.convert.from_function(net, input_signature=signature, opset=18)
        x = rng.standard_normal((5, 9, 4)).astype(np.float32)
        y = net(x).numpy()
    output = converted.graph.output[0].name
    _save(folder, converted, {"input/x": x, f"output/{output}": y})
    return _manifest(
        converted,
        "tf_function",
        source="tensorflow",
        origin="tools/make_corpus.py: tf.function with conv1d, moments, GELU, softmax pooling",
        made=f"TensorFlow {tf.__version__} through tf2onnx {tf2onnx.__version__}: "
        "tf2onnx.convert.from_function(opset=18)",
        loss={"kind": "mse", "output": output},
    )


# ONNX files that wheels on PyPI ship.


@dataclass(frozen=True)
class WheelModel:
    """One ONNX file inside a wheel on PyPI, and how the corpus uses it.

    Attributes:
        name: the model's name.
        requirement: the pinned requirement `pip download` fetches.
        member: the file's path inside the wheel.
        made: what made the file (the converter, as its names and producer show).
        inputs: makes the input arrays by input name.
        loss: {kind, output}, or None when nothing can be trained.
        target: makes the training target from the output's shape (None: the test draws one).
        trainable: parameter globs, where not all of them can be trained.
        lr: the Adam step size of the training check, where the default is too large.
        note: why the trainable set is what it is.
    """

    name: str
    requirement: str
    member: str
    made: str
    inputs: Callable[[], dict[str, np.ndarray]]
    loss: dict | None
    target: Callable[[tuple[int, ...]], np.ndarray] | None = None
    trainable: list[str] | None = None
    lr: float | None = None
    note: str | None = None


class DownloadError(Exception):
    """A wheel could not be downloaded; its models are skipped."""


PIP_TIMEOUT = 300
"""Seconds one `pip download` may take."""

_WHEELS: dict[str, Path | DownloadError] = {}
"""Per requirement, the wheel fetched in this run, or why it could not be."""


def _wheel(requirement: str, cache: Path) -> Path:
    """The wheel of a pinned requirement: from the cache, else `pip download --no-deps`.

    Raises:
        DownloadError: pip failed or timed out (logged once per requirement).
    """
    if requirement in _WHEELS:
        found = _WHEELS[requirement]
        if isinstance(found, DownloadError):
            raise found
        return found
    project, version = requirement.split("==")
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
    cached = sorted(cache.glob(pattern))
    if not cached:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--dest", str(cache), requirement]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT
            )
            failed = done.returncode != 0 and (done.stderr.strip().splitlines() or ["failed"])[-1]
        except subprocess.TimeoutExpired:
            failed = f"no answer in {PIP_TIMEOUT} s"
        cached = sorted(cache.glob(pattern))
        if failed or not cached:
            err = DownloadError(f"pip download {requirement}: {failed or 'no wheel came'}")
            logger.warning("skipped the models of %s: %s", requirement, err)
            _WHEELS[requirement] = err
            raise err
        logger.info(
            "downloaded %s (%s bytes) in %.1f s",
            cached[-1].name,
            f"{cached[-1].stat().st_size:,}",
            time.perf_counter() - start,
        )
    _WHEELS[requirement] = cached[-1]
    return cached[-1]


def _from_wheel(spec: WheelModel) -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        from onnxgrad import check

        wheel = _wheel(spec.requirement, folder.parent / ".pypi-cache")
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as f:
            (folder / "model.onnx").write_bytes(f.read())
        model = onnx.load(folder / "model.onnx")
        data = {f"input/{k}": v for k, v in spec.inputs().items()}
        if spec.target is not None:
            out = spec.loss["output"]
            feeds = _strip(data, "input/")
            (y,) = _ort_session(folder / "model.onnx").run([out], feeds)
            data["target"] = spec.target(y.shape)
        np.savez(folder / "data.npz", **data)
        made = spec.made
        if model.producer_name:
            made += f" (producer {model.producer_name} {model.producer_version})".replace(" )", ")")
        return _manifest(
            model,
            spec.name,
            source="pypi",
            origin=f"PyPI {spec.requirement} wheel: {spec.member}",
            made=made,
            loss=spec.loss,
            repair=bool(spec.loss) and bool(check.constant_weights(model)),
            trainable=spec.trainable,
            lr=spec.lr,
            note=spec.note,
        )

    return make


def _ort_session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _page(height: int, width: int) -> dict[str, np.ndarray]:
    """A synthetic page for PaddleOCR: dark strokes in rows on white, normalized as it is.

    Random pixels show the detector no text: its sigmoid output is then about 1e-6
    everywhere, and no step of training moves the loss.
    """
    rng = np.random.default_rng(SEED)
    image = np.full((height, width, 3), 0.95, np.float32)
    for row in range(4, height - 8, 12):
        x = 4
        while x < width - 8:
            stroke = int(rng.integers(2, 6))
            image[row : row + 7, x : x + stroke] = 0.1
            x += stroke + int(rng.integers(1, 4))
    image += 0.02 * rng.standard_normal(image.shape).astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return {"x": ((image - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)}


def _chunk(**state: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A Silero VAD chunk at 16 kHz: 64 samples of context and 512 new ones, zero states."""
    rng = np.random.default_rng(SEED)
    data = {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32)}
    data.update({name: np.zeros(shape, np.float32) for name, shape in state.items()})
    return data


def _file_bytes(paths: list[str], size: int = 1024, pad: int = 256) -> dict[str, np.ndarray]:
    """Magika's input: per file, its first and last `size` bytes, short ends padded with 256."""
    rows = []
    for path in paths:
        raw = np.frombuffer(Path(path).read_bytes().strip(), np.uint8).astype(np.int32)
        head = np.full(size, pad, np.int32)
        tail = np.full(size, pad, np.int32)
        head[: min(size, raw.size)] = raw[:size]
        end = raw[-size:]
        tail[size - end.size :] = end
        rows.append(np.concatenate([head, tail]))
    return {"bytes": np.stack(rows)}


def _probabilities(shape: tuple[int, ...]) -> np.ndarray:
    """A target for an output of probabilities: uniform in [0, 1]."""
    return np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)


RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
MAGIKA = "magika==1.0.3"
SILERO = "silero-vad==6.2.3"
_PADDLE = "PaddlePaddle through paddle2onnx (p2o.* names, -1 for dynamic sizes)"
_SILERO_NOTE = "everything but the STFT basis trains, the LSTM over a symbolic sequence length"

PYPI = (
    WheelModel(
        "pypi_ppocr_v4_det",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        _PADDLE,
        lambda: _page(32, 64),  # the detector's sizes must be multiples of 32
        {"kind": "mse", "output": "sigmoid_0.tmp_0"},
        target=_probabilities,
        lr=1e-3,
    ),
    WheelModel(
        "pypi_ppocr_mobile_v2_cls",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        _PADDLE,
        lambda: _page(48, 96),
        {"kind": "mse", "output": "save_infer_model/scale_0.tmp_1"},
        target=_probabilities,
        lr=1e-4,  # at 1e-3 its two-way softmax saturates by the fourth step
    ),
    WheelModel(
        "pypi_ppocr_v4_rec",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        _PADDLE,
        lambda: _page(48, 96),
        {"kind": "mse", "output": "softmax_11.tmp_0"},
        target=_probabilities,
    ),
    WheelModel(
        "pypi_magika",
        MAGIKA,
        "magika/models/standard_v3_3/model.onnx",
        "Keras through tf2onnx: Google's file-type classifier (byte embedding, Conv, "
        "attention-like pooling)",
        lambda: _file_bytes([os.__file__, json.__file__, zipfile.__file__]),
        {"kind": "mse", "output": "target_label"},
        target=_probabilities,
        lr=1e-4,
    ),
    WheelModel(
        "pypi_silero_vad",
        SILERO,
        "silero_vad/data/silero_vad.onnx",
        "PyTorch, rewritten by spox: one If on the sample rate holds the whole network",
        lambda: {**_chunk(state=(2, 1, 128)), "sr": np.array(16000, np.int64)},
        {"kind": "mse", "output": "output"},
        target=_probabilities,
        trainable=["*encoder*", "*decoder*"],
        note="every weight is a Constant inside the If's branches, lifted out by the repair; "
        "the STFT basis stays frozen, and the LSTM's weights, sliced out of one Constant, "
        "stay constants",
    ),
    WheelModel(
        "pypi_silero_vad_16k_op15",
        SILERO,
        "silero_vad/data/silero_vad_16k_op15.onnx",
        "torch.onnx.export at opset 15: If nodes on the sample rate and on the input's rank",
        lambda: {**_chunk(state=(2, 1, 128)), "sr": np.array(16000, np.int64)},
        {"kind": "mse", "output": "output"},
        trainable=["model.encoder.*", "model.decoder.*"],
        note=_SILERO_NOTE,
    ),
    WheelModel(
        "pypi_silero_vad_16k_sequence",
        SILERO,
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        "torch.onnx.export at opset 16, no control flow: STFT Conv, encoder, LSTM over chunks",
        lambda: _chunk(h=(1, 1, 128), c=(1, 1, 128)),
        {"kind": "mse", "output": "speech_probs"},
        trainable=["encoder.*", "onnx::LSTM_*", "output.*"],
        note=_SILERO_NOTE,
    ),
)
"""The models of the pypi source. openwakeword 0.6.0 ships no ONNX file in its wheel (it
downloads its models at run time), so it is not among them."""


# The command line.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the model corpus for tests/test_corpus.py (offline but for --pypi)."
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the folder (default: corpus/, or tests/data/)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SOURCE_OR_NAME",
        help="build only these sources (onnx-light, onnx-pytorch, onnxruntime, sklearn, "
        "transformers, torch, tensorflow, pypi) or model names",
    )
    parser.add_argument(
        "--pypi",
        action="store_true",
        help="add the pypi source (ONNX files from wheels on PyPI; needs the network)",
    )
    parser.add_argument(
        "--small", action="store_true", help="build only the small set kept in tests/data/"
    )
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args(argv)
    # Only this tool's own lines: the exporters log every pass at INFO.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    chosen = [r for r in recipes() if not args.small or r.small]
    if args.only:
        wanted = set(args.only)
        chosen = [r for r in chosen if r.name in wanted or r.source in wanted]
    elif not args.pypi:
        chosen = [r for r in chosen if r.source != "pypi"]
    if args.list:
        for r in chosen:
            print(f"{r.name:36s} {r.source}{'  (small)' if r.small else ''}")
        return 0
    out = args.out or (ROOT / "tests" / "data" if args.small else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)

    failed = []
    for recipe in chosen:
        try:
            manifest = write(recipe, out)
        except ImportError as err:
            logger.warning("skipped %s: %s (pip install it to build this model)", recipe.name, err)
            continue
        except DownloadError:
            continue  # logged once for its wheel
        except Exception as err:  # noqa: BLE001 - one failing recipe must not stop the others
            logger.error("FAILED %s: %s: %s", recipe.name, type(err).__name__, err)
            failed.append(recipe.name)
            continue
        size = manifest["bytes"]
        if args.small and size > SMALL_LIMIT:
            logger.error(
                "FAILED %s: %d bytes, over the %d of tests/data", recipe.name, size, SMALL_LIMIT
            )
            failed.append(recipe.name)
        logger.info("%-36s %-13s %9s bytes", recipe.name, recipe.source, f"{size:,}")
    if failed:
        logger.error("%d model(s) failed: %s", len(failed), ", ".join(failed))
        return 1
    return 0


def iter_cases(*folders: Path) -> Iterator[Case]:
    """The wheel cases, then each folder's, each name once (the first one found wins)."""
    seen = set()
    for case in wheel_cases() + [c for f in folders for c in folder_cases(f)]:
        if case.name not in seen:
            seen.add(case.name)
            yield case


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
