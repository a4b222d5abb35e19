"""Models whose weights stay on disk: `load` keeps large external initializers memory-mapped.

The real threshold (`importer.KEEP_EXTERNAL_FROM`, 256 MiB) is lowered to one byte by the
`keep` fixture, so that a model of a few kilobytes takes the same path as a model of many
gigabytes; `tests/test_importer.py` has the slow test with a real 2 GB model. Where they
can, tests compare with the same model read into memory (the default threshold) or with
onnxruntime on the original file.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad import ExportError, ModelLoadError, Session, Trainer, importer
from onnxgrad.export import write_model
from onnxgrad.gradcheck import check_gradients
from onnxgrad.importer import BASEPATH, SMALL_TENSOR, checkable, kept_external, tensor_array
from onnxgrad.optim import SGD
from onnxgrad.train.step import StepLayout, build_step_model, initial_state, save_model_atomically
from onnxgrad.train.training_info import TrainingSession, training_info_model

DATA = "weights.bin"

# In float32: W1 is exactly SMALL_TENSOR bytes and W3 four times that (both stay on disk);
# b1, W2, b2 and the Reshape shape are smaller (read into memory).
KEPT = ["W1", "W3"]


def mlp_weights(dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.normal(scale=0.4, size=(32, 8)),
        "b1": rng.normal(scale=0.1, size=32),
        "W3": rng.normal(scale=0.2, size=(32, 32)),
        "W2": rng.normal(scale=0.3, size=(3, 32)),
        "b2": rng.normal(scale=0.1, size=3),
    }
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    weights["shape"] = np.array([-1, 32], np.int64)
    return weights


def mlp(dtype=np.float32, seed: int = 0) -> onnx.ModelProto:
    """y = Gemm(Reshape(relu(Gemm(x, W1ᵀ, b1)) · W3, shape), W2ᵀ, b2)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "W3"], ["m"], name="mix"),
        helper.make_node("Reshape", ["m", "shape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "kept_mlp",
        [helper.make_tensor_value_info("x", elem, ["batch", 8])],
        [helper.make_tensor_value_info("y", elem, ["batch", 3])],
        [numpy_helper.from_array(v, k) for k, v in mlp_weights(dtype, seed).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def save_external(model: onnx.ModelProto, folder, name: str = "model.onnx", threshold: int = 64):
    """`model` in `folder`, its initializers of `threshold` bytes or more in one file, `DATA`.

    The default keeps the Reshape shape in the proto: onnxruntime cannot infer shapes from
    a shape held in external data.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA,
        size_threshold=threshold,
    )
    return path


def layout(path) -> dict[str, dict[str, str]]:
    """Each initializer's external-data entries, as the file at `path` stores them."""
    model = onnx.load(path, load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer}


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def batch(n: int = 16, dtype=np.float32, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype(dtype), rng.normal(size=(n, 3)).astype(dtype)


@pytest.fixture
def keep(monkeypatch):
    """Keep external data on disk from one byte on: what `load` does past 256 MiB."""
    monkeypatch.setattr(importer, "KEEP_EXTERNAL_FROM", 1)


def kept_names(model: onnx.ModelProto) -> list[str]:
    return sorted(t.name for t in kept_external(model))


# Import.


def test_load_keeps_large_initializers_on_disk(tmp_path, keep):
    path = save_external(mlp(), tmp_path, threshold=0)  # the shape constant too
    assert all(layout(path).values())
    model = onnxgrad.load(path)
    tensors = {t.name: t for t in model.graph.initializer}
    saved = layout(path)
    assert kept_names(model) == KEPT
    for name in KEPT:
        info = {e.key: e.value for e in tensors[name].external_data}
        assert info == {**saved[name], BASEPATH: str(tmp_path.resolve())}
    for name in ("b1", "W2", "b2", "shape"):
        assert tensors[name].data_location == TensorProto.DEFAULT
        assert not tensors[name].external_data
        assert len(tensors[name].raw_data) < SMALL_TENSOR
    for name, value in mlp_weights().items():
        array = tensor_array(tensors[name])
        assert array.dtype == value.dtype
        np.testing.assert_array_equal(array, value)
    assert tensors["W1"].ByteSize() < 200  # a reference, not the kilobyte of data
    w3 = tensor_array(tensors["W3"])
    assert not w3.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        w3[0, 0] = 1.0


def test_below_the_threshold_everything_is_in_memory(tmp_path):
    path = save_external(mlp(), tmp_path)
    model = onnxgrad.load(path)
    assert kept_external(model) == []
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    assert b"basepath" not in model.SerializeToString()


def test_kept_tensors_survive_a_change_of_directory(tmp_path, keep, monkeypatch):
    save_external(mlp(), tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    model = onnxgrad.load("m/model.onnx")
    monkeypatch.chdir(tmp_path / "m")
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    np.testing.assert_array_equal(tensor_array(w1), mlp_weights()["W1"])


def test_checkable_turns_kept_initializers_into_inputs(tmp_path, keep):
    model = onnxgrad.load(save_external(mlp(), tmp_path))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)
    copy = checkable(model)
    onnx.checker.check_model(copy, full_check=True)
    inputs = {i.name: i.type.tensor_type for i in copy.graph.input}
    assert [d.dim_value for d in inputs["W3"].shape.dim] == [32, 32]
    assert sorted(t.name for t in copy.graph.initializer) == ["W2", "b1", "b2", "shape"]
    assert kept_names(model) == KEPT  # the model itself is left as it was


# Where data may come from.


def _with_entry(path, target, key: str, value: str) -> None:
    """Rewrite the model at `path` into `target` with one external-data entry set everywhere."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        entries[key] = value
        del tensor.external_data[:]
        for k, v in entries.items():
            tensor.external_data.add(key=k, value=v)
    onnx.save(model, target)


@pytest.mark.parametrize("threshold", ["kept", "default"])
def test_a_basepath_in_a_file_is_ignored(tmp_path, monkeypatch, threshold):
    if threshold == "kept":
        monkeypatch.setattr(importer, "KEEP_EXTERNAL_FROM", 1)
    own, other = tmp_path / "own", tmp_path / "other"
    save_external(mlp(seed=0), own)
    save_external(mlp(seed=5), other)
    _with_entry(own / "model.onnx", own / "model.onnx", BASEPATH, str(other))

    # The data comes from the file's own folder, and any basepath is the file's folder.
    model = onnxgrad.load(own / "model.onnx")
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(tensor_array(tensor), mlp_weights(seed=0)[tensor.name])
        info = {e.key: e.value for e in tensor.external_data}
        assert info.get(BASEPATH, str(own.resolve())) == str(own.resolve())

    # Bytes name no folder at all, whatever they claim.
    with pytest.raises(ModelLoadError, match="load it from its path"):
        onnxgrad.load((own / "model.onnx").read_bytes())

    # A file whose data is missing from its folder is refused, not read from elsewhere.
    (own / DATA).unlink()
    with pytest.raises(ModelLoadError, match=r"weights\.bin.*missing"):
        onnxgrad.load(own / "model.onnx")


def test_save_model_ignores_a_basepath_in_the_original_file(tmp_path):
    # save_model re-reads the original without its data: it must copy the untrained bytes
    # from the model's own folder, as load read them, never from a folder the file names.
    own, other = tmp_path / "own", tmp_path / "other"
    save_external(mlp(seed=0), own)
    save_external(mlp(seed=5), other)
    _with_entry(own / "model.onnx", own / "model.onnx", BASEPATH, str(other))
    onnxgrad.save_model(own / "model.onnx", {}, tmp_path / "out" / "model.onnx")
    assert (tmp_path / "out" / DATA).read_bytes() == (own / DATA).read_bytes()
    assert b"basepath" not in (tmp_path / "out" / "model.onnx").read_bytes()


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_data_outside_the_folder_is_refused(tmp_path, keep, location):
    folder = tmp_path / "m"
    save_external(mlp(), folder)
    (tmp_path / "outside.bin").write_bytes((folder / DATA).read_bytes())
    _with_entry(folder / "model.onnx", folder / "bad.onnx", "location", location)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        onnxgrad.load(folder / "bad.onnx")


def test_a_data_file_linked_from_outside_is_refused(tmp_path, keep):
    folder = tmp_path / "m"
    save_external(mlp(), folder)
    (folder / DATA).rename(tmp_path / "elsewhere.bin")
    (folder / DATA).symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        onnxgrad.load(folder / "model.onnx")


def test_a_proto_with_a_basepath_is_confined_to_it(tmp_path, keep):
    model = onnxgrad.load(save_external(mlp(), tmp_path / "m"))
    (tmp_path / "outside.bin").write_bytes((tmp_path / "m" / DATA).read_bytes())
    w3 = next(t for t in model.graph.initializer if t.name == "W3")
    for entry in w3.external_data:
        if entry.key == "location":
            entry.value = "../outside.bin"
    with pytest.raises(ModelLoadError, match="'W3'.*outside the model's folder"):
        onnxgrad.load(model)
    with pytest.raises(ModelLoadError, match="'W3'.*outside the model's folder"):
        tensor_array(w3)


@pytest.mark.parametrize("threshold", ["kept", "default"])
def test_a_truncated_data_file_names_the_tensor(tmp_path, monkeypatch, threshold):
    if threshold == "kept":
        monkeypatch.setattr(importer, "KEEP_EXTERNAL_FROM", 1)
    path = save_external(mlp(), tmp_path)
    saved = layout(path)
    data = (tmp_path / DATA).read_bytes()
    # Cut into W3: every tensor before it is whole.
    cut = int(saved["W3"]["offset"]) + 100
    (tmp_path / DATA).write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match=r"'W3' needs bytes .* holds \d+: .*truncated"):
        onnxgrad.load(path)


def test_a_data_file_cut_after_load_is_refused_on_read(tmp_path, keep):
    path = save_external(mlp(), tmp_path)
    model = onnxgrad.load(path)
    w3 = next(t for t in model.graph.initializer if t.name == "W3")
    # A new, shorter file under the name (an in-place truncation would fault live mappings).
    shorter = tmp_path / "shorter.bin"
    shorter.write_bytes((tmp_path / DATA).read_bytes()[:2000])
    shorter.replace(tmp_path / DATA)
    with pytest.raises(ModelLoadError, match="'W3'.*truncated"):
        tensor_array(w3)


# The executor and the gradient builder.


def test_forward_matches_onnxruntime_on_the_original(tmp_path, keep):
    path = save_external(mlp(), tmp_path)
    x, _ = batch(8)
    model = onnxgrad.load(path)
    assert kept_names(model) == KEPT
    ours = Session(model).run(["y"], {"x": x})[0]
    ort = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = ort.run(["y"], {"x": x})[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    in_memory = Session(mlp()).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(ours, in_memory)
    np.testing.assert_array_equal(Session(path).run(["y"], {"x": x})[0], in_memory)


def test_gradients_equal_those_of_the_model_in_memory(tmp_path, monkeypatch):
    path = save_external(mlp(), tmp_path)
    x, _ = batch(8)
    upstream = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    feeds = {"x": x, "y_grad": upstream}
    in_memory = onnxgrad.gradient_model(onnxgrad.load(path))
    assert kept_external(in_memory) == []
    monkeypatch.setattr(importer, "KEEP_EXTERNAL_FROM", 1)
    kept = onnxgrad.gradient_model(onnxgrad.load(path))
    assert kept_names(kept) == KEPT
    names = [o.name for o in in_memory.graph.output]
    assert names == [o.name for o in kept.graph.output]
    assert {"W1_grad", "W3_grad", "b1_grad"} <= set(names)
    expected = Session(in_memory).run(names, feeds)
    for name, got, want in zip(names, Session(kept).run(names, feeds), expected):
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_gradcheck_on_a_kept_float64_model(tmp_path, monkeypatch):
    path = save_external(mlp(np.float64), tmp_path)
    x, _ = batch(4, np.float64)
    memory = check_gradients(path, {"x": x})
    monkeypatch.setattr(importer, "KEEP_EXTERNAL_FROM", 1)
    assert kept_names(onnxgrad.load(path)) == KEPT
    kept = check_gradients(path, {"x": x})
    assert [r.name for r in kept] == [r.name for r in memory]
    assert {"W1", "W3"} <= {r.name for r in kept}
    for ours, theirs in zip(kept, memory):
        assert ours.ok(), (ours.name, ours.rel_error)
        np.testing.assert_array_equal(ours.analytic, theirs.analytic)


# Training and saving.


def train(source, steps: int = 4, trainable=("W1", "b1", "W3")) -> tuple[Trainer, list[float]]:
    trainer = Trainer(source, "mse", SGD(0.05), trainable=list(trainable))
    x, y = batch()
    return trainer, [trainer.step(x, y) for _ in range(steps)]


def test_trainer_on_a_kept_model_matches_the_model_in_memory(tmp_path, monkeypatch):
    path = save_external(mlp(), tmp_path)
    memory, memory_losses = train(path)
    assert kept_external(memory.forward_model) == []
    monkeypatch.setattr(importer, "KEEP_EXTERNAL_FROM", 1)
    kept, losses = train(path)
    assert kept_names(kept.forward_model) == KEPT
    assert losses[-1] < losses[0]
    assert losses == memory_losses
    for name, value in memory.parameters.items():
        np.testing.assert_array_equal(kept.parameters[name], value, err_msg=name)
        assert not np.array_equal(value, mlp_weights()[name])
    x, _ = batch(5, seed=9)
    np.testing.assert_array_equal(kept.predict(x), memory.predict(x))


def patched(data: bytes, saved_layout: dict, values: dict[str, np.ndarray]) -> bytes:
    """`data` with each named tensor's region replaced by its value's bytes."""
    out = bytearray(data)
    for name, value in values.items():
        offset, length = int(saved_layout[name]["offset"]), int(saved_layout[name]["length"])
        raw = np.ascontiguousarray(value).tobytes()
        assert len(raw) == length
        out[offset : offset + length] = raw
    return bytes(out)


@pytest.mark.parametrize("source", ["path", "proto"])
def test_save_keeps_the_step_layoutand_patches_the_trained_values(tmp_path, keep, source):
    src, out = tmp_path / "src", tmp_path / "out"
    path = save_external(mlp(), src)
    before = files(src)
    trainer, _ = train(path if source == "path" else onnxgrad.load(path))
    assert kept_names(trainer.forward_model) == KEPT
    trainer.save(out / "model.onnx")

    # The same files, the same locations, offsets and lengths, no basepath. A proto from
    # `load` already holds its small tensors: they stay in it, and only the kept ones are
    # patched in the data file (the others' old bytes stay there, unused).
    original = layout(path)
    if source == "proto":
        original = {name: info if name in KEPT else {} for name, info in original.items()}
    assert sorted(files(out)) == ["model.onnx", DATA]
    assert layout(out / "model.onnx") == original
    assert b"basepath" not in (out / "model.onnx").read_bytes()
    if source == "path":
        assert (
            onnx.load(out / "model.onnx", load_external_data=False).graph.node
            == onnx.load(path, load_external_data=False).graph.node
        )

    # The trained tensors' bytes replaced, every other byte as it was; the originals intact.
    data = (out / DATA).read_bytes()
    trained = {k: v for k, v in trainer.parameters.items() if original[k]}
    assert sorted(trained) == (["W1", "W3", "b1"] if source == "path" else KEPT)
    assert data == patched(before[DATA], layout(path), trained)
    assert data != before[DATA]
    assert files(src) == before
    saved = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(out / "model.onnx").graph.initializer
    }
    for name, value in mlp_weights().items():
        want = trainer.parameters.get(name, value)
        np.testing.assert_array_equal(saved[name], want, err_msg=name)

    # The saved model runs, in onnxruntime too, as the trainer predicts.
    x, _ = batch(6, seed=4)
    ort = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        ort.run(["y"], {"x": x})[0], trainer.predict(x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("source", ["path", "proto"])
def test_save_never_overwrites_the_data_it_reads(tmp_path, keep, source):
    path = save_external(mlp(), tmp_path)
    before = files(tmp_path)
    trainer, _ = train(path if source == "path" else onnxgrad.load(path))
    with pytest.raises(ExportError, match=r"overwrite the external data.*weights\.bin"):
        trainer.save(tmp_path / "trained.onnx")
    assert files(tmp_path) == before


def test_save_over_the_original_while_training_on_it(tmp_path, keep):
    # The trainer's mapped weights view the file that saving replaces (by rename): they stay
    # valid, and the next save reads the data the first one wrote.
    path = save_external(mlp(), tmp_path)
    original = (tmp_path / DATA).read_bytes()
    trainer, _ = train(path, steps=2, trainable=["W1"])
    trainer.save(path)
    x, y = batch()
    trainer.step(x, y)
    trainer.save(path)
    assert sorted(files(tmp_path)) == ["model.onnx", DATA]
    assert (tmp_path / DATA).read_bytes() == patched(original, layout(path), trainer.parameters)
    reloaded = onnxgrad.load(path)
    w3 = next(t for t in reloaded.graph.initializer if t.name == "W3")
    np.testing.assert_array_equal(tensor_array(w3), mlp_weights()["W3"])


# The training graph and the step model.


def data_offsets(path) -> dict[str, tuple[str, int, int]]:
    out = {}
    for name, info in layout(path).items():
        if info:
            out[name] = (info["location"], int(info["offset"]), int(info["length"]))
    return out


def test_export_training_model_streams_the_weights(tmp_path, keep):
    src, out = tmp_path / "src", tmp_path / "out"
    path = save_external(mlp(), src)
    before = files(src)
    trainer, _ = train(path, trainable=["W1", "b1"])
    target = out / "train.onnx"
    onnxgrad.export_training_model(trainer, target)

    assert sorted(files(out)) == ["train.onnx", "train.onnx.data"]
    assert b"basepath" not in target.read_bytes()
    offsets = data_offsets(target)
    assert sorted(offsets) == KEPT  # only tensors of SMALL_TENSOR bytes or more
    assert {loc for loc, _, _ in offsets.values()} == {"train.onnx.data"}
    assert all(offset % 64 == 0 for _, offset, _ in offsets.values())
    assert files(src) == before

    exported = onnx.load(target)
    onnx.checker.check_model(exported, full_check=True)
    values = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    for name, value in mlp_weights().items():
        np.testing.assert_array_equal(values[name], trainer.parameters.get(name, value))
    assert not np.array_equal(values["W1"], mlp_weights()["W1"])

    # onnxruntime runs the file as onnxgrad runs the trainer's graph at its parameters.
    x, y = batch(8, seed=6)
    names = [o.name for o in exported.graph.output]
    ort = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    theirs = ort.run(names, {"x": x, "target": y})
    ours = Session(trainer.training_graph).run(names, {"x": x, "target": y, **trainer.parameters})
    for name, a, b in zip(names, theirs, ours):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_export_training_model_from_a_kept_model_path(tmp_path, keep):
    path = save_external(mlp(), tmp_path / "src")
    target = tmp_path / "out" / "grad.onnx"
    onnxgrad.export_training_model(path, target, wrt=["W3"])
    assert sorted(files(tmp_path / "out")) == ["grad.onnx", "grad.onnx.data"]
    assert b"basepath" not in target.read_bytes()
    exported = onnx.load(target)
    values = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    for name, value in mlp_weights().items():
        np.testing.assert_array_equal(values[name], value, err_msg=name)
    x, _ = batch(4)
    feeds = {"x": x, "y_grad": np.ones((4, 3), np.float32)}
    ort = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    theirs = ort.run(["y", "W3_grad"], feeds)
    ours = Session(onnxgrad.gradient_model(mlp(), wrt=["W3"])).run(["y", "W3_grad"], feeds)
    for a, b in zip(theirs, ours):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_write_model_aligns_offsets(tmp_path, keep):
    # Sizes that are no multiple of 64: each tensor must still start on a 64-byte boundary,
    # and one of 1 MiB or more on a 64 KiB one.
    rng = np.random.default_rng(2)
    weights = {
        "a": rng.normal(size=257).astype(np.float32),  # 1,028 bytes
        "big": rng.normal(size=2**18 + 1).astype(np.float32),  # 1 MiB + 4 bytes
        "c": rng.normal(size=300).astype(np.float32),
    }
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name in weights],
        "three",
        [],
        [
            helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, list(value.shape))
            for name, value in weights.items()
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    kept = onnxgrad.load(save_external(model, tmp_path / "src", threshold=0))
    assert kept_names(kept) == ["a", "big", "c"]
    new_c = np.full(300, 7.0, np.float32)
    write_model(kept, tmp_path / "out" / "m.onnx", {"c": new_c})

    offsets = data_offsets(tmp_path / "out" / "m.onnx")
    assert offsets == {
        "a": ("m.onnx.data", 0, 1028),
        "big": ("m.onnx.data", 65536, 2**20 + 4),
        "c": ("m.onnx.data", 65536 + 2**20 + 64, 1200),
    }
    assert b"basepath" not in (tmp_path / "out" / "m.onnx").read_bytes()
    assert kept_names(kept) == ["a", "big", "c"]  # the model given is not modified
    ort = onnxruntime.InferenceSession(
        str(tmp_path / "out" / "m.onnx"), providers=["CPUExecutionProvider"]
    )
    outputs = ort.run(None, {})
    np.testing.assert_array_equal(outputs[0], weights["a"])
    np.testing.assert_array_equal(outputs[1], weights["big"])
    np.testing.assert_array_equal(outputs[2], new_c)


def ort_steps(source, feeds: dict, target: np.ndarray, state: dict, steps: int = 3):
    """Run a step model in onnxruntime, feeding each `.updated` output back."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # initializers that are also inputs are intended
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    step_layout = StepLayout.of(
        onnx.load(source) if isinstance(source, str) else onnx.load_from_string(source)
    )
    losses = []
    for _ in range(steps):
        values = dict(zip(names, session.run(None, {**feeds, step_layout.target: target, **state})))
        losses.append(float(values[step_layout.loss]))
        state = {name: values[f"{name}.updated"] for name in step_layout.variables}
    return losses, state


def test_step_model_of_a_kept_model_is_written_with_external_data(tmp_path, monkeypatch):
    path = save_external(mlp(), tmp_path / "src")
    memory = build_step_model(path, "mse", SGD(0.05))
    monkeypatch.setattr(importer, "KEEP_EXTERNAL_FROM", 1)
    step = build_step_model(path, "mse", SGD(0.05))
    assert kept_names(step) == KEPT
    out = tmp_path / "out"
    out.mkdir()
    save_model_atomically(step, out / "step.onnx")

    assert sorted(files(out)) == ["step.onnx", "step.onnx.data"]
    assert b"basepath" not in (out / "step.onnx").read_bytes()
    assert sorted(data_offsets(out / "step.onnx")) == KEPT
    onnx.checker.check_model(str(out / "step.onnx"), full_check=True)
    written = onnx.load(out / "step.onnx")
    state = initial_state(written)
    for name, value in mlp_weights().items():
        if name in state:
            np.testing.assert_array_equal(state[name], value, err_msg=name)

    # In onnxruntime, from its file, it trains exactly as the step model built in memory.
    x, y = batch()
    losses, final = ort_steps(str(out / "step.onnx"), {"x": x}, y, state)
    want_losses, want = ort_steps(memory.SerializeToString(), {"x": x}, y, initial_state(memory))
    assert losses == want_losses and losses[-1] < losses[0]
    for name, value in want.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)

    # And onnxgrad reads it back (kept on disk again, here).
    reloaded = onnxgrad.load(out / "step.onnx")
    assert kept_names(reloaded) == KEPT
    assert str(out.resolve()) in {
        e.value for t in kept_external(reloaded) for e in t.external_data if e.key == BASEPATH
    }


def test_training_info_model_of_a_kept_model(tmp_path, keep):
    path = save_external(mlp(), tmp_path / "src")
    session = TrainingSession(training_info_model(path, "mse", SGD(0.05), trainable=["W1"]))
    x, y = batch()
    first = session.step({"x": x, "target": y})["loss"]
    session.save(tmp_path / "ti.onnx")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "ti.onnx",
        "ti.onnx.data",
    ]
    assert b"basepath" not in (tmp_path / "ti.onnx").read_bytes()
    resumed = TrainingSession(tmp_path / "ti.onnx", initialize=False)
    np.testing.assert_array_equal(resumed.variables["W1"], session.variables["W1"])
    assert resumed.step({"x": x, "target": y})["loss"] < first
