"""Export: trained weights into the original model (external data kept), training graphs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad import ExportError, Trainer, export_training_model, save_model
from onnxgrad.optim import SGD


def gemm_model(opset: int = 18, seed: int = 0) -> onnx.ModelProto:
    """y = Gemm(relu(Gemm(x, W1ᵀ, b1)), W2ᵀ, b2), with metadata to be kept on save."""
    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.normal(scale=0.5, size=(6, 4)),
        "b1": rng.normal(scale=0.1, size=6),
        "W2": rng.normal(scale=0.5, size=(3, 6)),
        "b2": np.zeros(3),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
        doc_string="two layers",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="tests",
        producer_version="1.0",
        model_version=7,
    )
    model.ir_version = 8
    helper.set_model_props(model, {"license": "none"})
    return model


def data(n: int = 32, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, rng.normal(size=(n, 3)).astype(np.float32)


def trained(source, steps: int = 3, **kwargs) -> Trainer:
    trainer = Trainer(source, "mse", SGD(0.1), **kwargs)
    x, y = data()
    for _ in range(steps):
        trainer.step(x, y)
    return trainer


def values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def blanked(model: onnx.ModelProto) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        for field in ("float_data", "raw_data", "double_data", "int32_data", "int64_data"):
            t.ClearField(field)
    return copy.SerializeToString()


def check_runs_like(trainer: Trainer, path) -> None:
    x, _ = data(8, seed=5)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(["y"], {"x": x})[0], trainer.predict(x), rtol=1e-5, atol=1e-6
    )


def test_only_initializer_values_change(tmp_path):
    # Opset 13: the trainer works on a converted copy, but the saved model stays at 13.
    model = gemm_model(opset=13)
    trainer = trained(model, trainable=["W1", "b2"])
    path = tmp_path / "out.onnx"
    trainer.save(path)
    saved = onnx.load(path)
    assert blanked(saved) == blanked(model)
    assert saved.opset_import[0].version == 13 and saved.ir_version == 8
    assert saved.metadata_props[0].key == "license" and saved.model_version == 7
    new, old = values(saved), values(model)
    for name in ("W1", "b2"):
        np.testing.assert_array_equal(new[name], trainer.parameters[name])
        assert not np.array_equal(new[name], old[name])
    for name in ("b1", "W2"):
        assert new[name].tobytes() == old[name].tobytes()
    check_runs_like(trainer, path)


def test_bytes_and_path_sources(tmp_path):
    model = gemm_model()
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    weights = {"b2": np.ones(3, np.float32)}
    save_model(model.SerializeToString(), weights, tmp_path / "from_bytes.onnx")
    save_model(source, weights, tmp_path / "from_path.onnx")
    save_model(model, weights, tmp_path / "from_proto.onnx")
    outputs = [(tmp_path / f"from_{k}.onnx").read_bytes() for k in ("bytes", "path", "proto")]
    assert outputs[0] == outputs[1] == outputs[2]
    np.testing.assert_array_equal(values(onnx.load(tmp_path / "from_path.onnx"))["b2"], 1.0)


@pytest.mark.parametrize(
    "layout",
    [
        {"all_tensors_to_one_file": True, "location": "weights.bin"},
        {"all_tensors_to_one_file": True, "location": "data/weights.bin"},
        {"all_tensors_to_one_file": False},
    ],
    ids=["one_file", "subfolder", "file_per_tensor"],
)
def test_external_data_stays_external(tmp_path, layout):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    if "/" in layout.get("location", ""):
        (src_dir / "data").mkdir()  # onnx does not create the subfolder itself
    onnx.save(
        gemm_model(), src_dir / "model.onnx", save_as_external_data=True, size_threshold=0, **layout
    )
    original_files = {
        p.relative_to(src_dir): p.read_bytes() for p in src_dir.rglob("*") if p.is_file()
    }
    trainer = trained(str(src_dir / "model.onnx"), trainable=["W1", "b1"])
    trainer.save(out_dir / "model.onnx")

    # The same files, and the same proto: locations, offsets and lengths all kept.
    out_files = {p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file()}
    assert out_files == set(original_files)
    before = onnx.load(src_dir / "model.onnx", load_external_data=False)
    after = onnx.load(out_dir / "model.onnx", load_external_data=False)
    assert after.SerializeToString() == before.SerializeToString()
    assert all(t.data_location == TensorProto.EXTERNAL for t in after.graph.initializer)

    # The trained values in the new files; the originals untouched.
    old, new = values(onnx.load(src_dir / "model.onnx")), values(onnx.load(out_dir / "model.onnx"))
    for name in ("W1", "b1"):
        np.testing.assert_array_equal(new[name], trainer.parameters[name])
    for name in ("W2", "b2"):
        np.testing.assert_array_equal(new[name], old[name])
    for rel, content in original_files.items():
        assert (src_dir / rel).read_bytes() == content
    check_runs_like(trainer, out_dir / "model.onnx")


def test_overwrite_in_place(tmp_path):
    onnx.save(
        gemm_model(),
        tmp_path / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    trainer = trained(str(tmp_path / "model.onnx"))
    trainer.save(tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "weights.bin"]
    new = values(onnx.load(tmp_path / "model.onnx"))
    for name, value in trainer.parameters.items():
        np.testing.assert_array_equal(new[name], value)


def test_never_overwrites_the_external_data_of_the_original(tmp_path):
    onnx.save(
        gemm_model(),
        tmp_path / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    before = (tmp_path / "weights.bin").read_bytes()
    trainer = trained(str(tmp_path / "model.onnx"))
    with pytest.raises(ExportError, match=r"overwrite the external data.*weights\.bin"):
        trainer.save(tmp_path / "trained.onnx")
    assert (tmp_path / "weights.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "weights.bin"]


def test_written_with_default_permissions(tmp_path):
    save_model(gemm_model(), {}, tmp_path / "m.onnx")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~mask


def test_errors_leave_nothing_behind(tmp_path):
    model = gemm_model()
    target = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"'W9'.*no initializer of that name.*W1, b1, W2, b2"):
        save_model(model, {"W9": np.zeros(3, np.float32)}, target)
    with pytest.raises(ExportError, match=r"'b1' is float64.*float32"):
        save_model(model, {"b1": np.zeros(6)}, target)
    with pytest.raises(ExportError, match=r"'b1' has shape \[5\].*\[6\]"):
        save_model(model, {"b1": np.zeros(5, np.float32)}, target)
    assert list(tmp_path.iterdir()) == []


def test_external_data_needs_its_folder(tmp_path):
    onnx.save(
        gemm_model(),
        tmp_path / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    raw = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    with pytest.raises(ExportError, match="path"):
        save_model(raw.SerializeToString(), {}, tmp_path / "out.onnx")
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ExportError, match="'weights.bin' is missing"):
        save_model(tmp_path / "model.onnx", {}, tmp_path / "out" / "m.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_export_training_model_from_a_model(tmp_path):
    model = gemm_model()
    x, _ = data(4)
    scalar = helper.make_node("ReduceSum", ["y"], ["total"], keepdims=0)
    model.graph.node.append(scalar)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    path = tmp_path / "grad.onnx"
    export_training_model(model, path, wrt=["W2"])
    exported = onnx.load(path)
    assert [o.name for o in exported.graph.output] == ["total", "W2_grad"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"x": x})
    ours = onnxgrad.Session(exported).run(None, {"x": x})
    for a, b in zip(theirs, ours):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grad.onnx"]


# Weights out for other frameworks.


def test_export_weights_npz_all_and_trainable(tmp_path):
    model = gemm_model()
    scale = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    model.graph.initializer.append(scale)
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 3], np.int64), "shape"))
    model.graph.node.append(helper.make_node("Mul", ["y", "two"], ["y2"], name="double"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 3]))
    names = onnxgrad.export.export_weights(model, tmp_path / "all.npz")
    assert names == ["W1", "b1", "W2", "b2", "two"]  # floats only, constants included
    with np.load(tmp_path / "all.npz") as npz:
        assert npz.files == names
        for t in model.graph.initializer[:4]:
            np.testing.assert_array_equal(npz[t.name], numpy_helper.to_array(t))
    only = onnxgrad.export.export_weights(model, tmp_path / "some.npz", trainable_only=True)
    assert only == ["W1", "b1", "W2", "b2"]
    assert sorted(os.listdir(tmp_path)) == ["all.npz", "some.npz"]


def test_export_weights_safetensors(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "w.safetensors"
    trainer = trained(gemm_model())
    trainer.save(tmp_path / "tuned.onnx")
    onnxgrad.export.export_weights(tmp_path / "tuned.onnx", path)
    loaded = safetensors_numpy.load_file(str(path))
    assert sorted(loaded) == ["W1", "W2", "b1", "b2"]
    for name, value in trainer.parameters.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_export_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match=r"name it \.safetensors or \.npz"):
        onnxgrad.export.export_weights(gemm_model(), tmp_path / "w.pt")
    with pytest.raises(ExportError, match="cannot read the model"):
        onnxgrad.export.export_weights(tmp_path / "missing.onnx", tmp_path / "w.npz")
    monkeypatch.setitem(__import__("sys").modules, "safetensors", None)
    monkeypatch.setitem(__import__("sys").modules, "safetensors.numpy", None)
    with pytest.raises(ExportError, match=r"pip install onnxgrad\[safetensors\]"):
        onnxgrad.export.export_weights(gemm_model(), tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


def test_export_weights_cli(tmp_path, capsys):
    from onnxgrad.cli import main

    onnx.save(gemm_model(), tmp_path / "m.onnx")
    assert main(["export-weights", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "w.npz")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "w.npz").is_file()
    args = ["export-weights", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "t.npz")]
    assert main([*args, "--trainable-only"]) == 0
    assert main(["export-weights", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "w.txt")]) == 2
    assert "safetensors or .npz" in capsys.readouterr().err


def test_export_weights_load_into_torch_state_dict(tmp_path):
    """A dynamo export keeps the state_dict names: fine-tune it, export the weights, and
    load them into the PyTorch module, which then computes what onnxgrad computes."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 3, 3)
            self.bn = torch.nn.BatchNorm2d(3)
            self.fc = torch.nn.Linear(3 * 4 * 4, 5)
            self.norm = torch.nn.LayerNorm(5)

        def forward(self, x):
            return self.norm(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)))

    torch.manual_seed(0)
    net = Net().eval()
    x = np.random.default_rng(0).normal(size=(8, 1, 6, 6)).astype(np.float32)
    path = tmp_path / "net.onnx"
    # optimize=False: the graph optimizer would fold the BatchNormalization into the Conv.
    torch.onnx.export(
        net,
        (torch.tensor(x[:2]),),
        str(path),
        dynamo=True,
        optimize=False,
        input_names=["x"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    trainer = Trainer(path, "mse", SGD(0.1), batchnorm="train")
    target = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
    for _ in range(2):
        trainer.step(x, target)
    (tmp_path / "out").mkdir()
    trainer.save(tmp_path / "out" / "tuned.onnx")  # beside its own copy of the external data
    onnxgrad.export.export_weights(tmp_path / "out" / "tuned.onnx", tmp_path / "w.npz")

    fresh = Net().eval()
    with np.load(tmp_path / "w.npz") as npz:
        state = {k: torch.tensor(npz[k]) for k in npz.files}
    # strict: every key matches. (BatchNorm's int64 num_batches_tracked is not a float weight
    # and is not exported; torch's BatchNorm fills it in when it is missing.)
    fresh.load_state_dict(state, strict=True)
    assert set(state) == set(fresh.state_dict()) - {"bn.num_batches_tracked"}
    with torch.no_grad():
        theirs = fresh(torch.tensor(x)).numpy()
    np.testing.assert_allclose(trainer.predict(x), theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(theirs, net(torch.tensor(x)).detach().numpy(), atol=1e-4)
