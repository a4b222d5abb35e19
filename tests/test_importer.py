"""The import stage: reading, checking, normalizing, and finding parameters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from onnxgrad.errors import ModelLoadError
from onnxgrad.importer import (
    CANONICAL_OPSET,
    graph_inputs,
    load,
    opset_of,
    read,
    trainable_parameters,
)


def linear_model(opset: int = 18, ir: int | None = None) -> onnx.ModelProto:
    """y = x · W + b, with W and b as initializers."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        model.ir_version = ir
    return model


def test_load_from_path_bytes_and_proto_agree(tmp_path):
    model = linear_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    from_path = load(path)
    from_bytes = load(model.SerializeToString())
    from_proto = load(model)
    assert from_path.SerializeToString() == from_bytes.SerializeToString()
    assert from_proto.SerializeToString() == from_bytes.SerializeToString()
    assert [n.name for n in from_path.graph.node] == ["MatMul_0", "Add_1"]


def test_load_does_not_modify_the_given_proto():
    model = linear_model()
    before = model.SerializeToString()
    load(model)
    assert model.SerializeToString() == before


def test_truncated_file_gives_one_clear_error(tmp_path):
    data = linear_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load(path)


def test_garbage_and_missing_files(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\x01not a model at all")
    with pytest.raises(ModelLoadError, match="junk.onnx"):
        load(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nowhere.onnx")
    with pytest.raises(ModelLoadError, match="give a path, bytes or a ModelProto"):
        load(42)


def test_checker_failure_names_the_problem():
    model = linear_model()
    model.graph.node[1].input[1] = "not_there"
    with pytest.raises(ModelLoadError, match="fails the ONNX checker"):
        load(model)


def _external(tmp_path, location: str = "weights.bin"):
    model = linear_model()
    path = tmp_path / "ext.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def test_external_data_is_loaded(tmp_path):
    path = _external(tmp_path)
    model = load(path)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(weights["W"], np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    path = _external(tmp_path)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load(bad)


def test_missing_external_file_is_named(tmp_path):
    path = _external(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="weights.bin"):
        load(path)


def test_external_data_needs_its_folder(tmp_path):
    path = _external(tmp_path)
    with pytest.raises(ModelLoadError, match="load it from its path"):
        read(path.read_bytes())


def test_local_functions_are_inlined():
    fn = helper.make_function(
        "local",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 18)],
    )
    graph = helper.make_graph(
        [helper.make_node("Twice", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
        functions=[fn],
    )
    loaded = load(model)
    assert [n.op_type for n in loaded.graph.node] == ["Add"]
    assert not loaded.functions


def test_old_opsets_are_converted_and_keep_their_results():
    old = linear_model(opset=11)
    new = load(old)
    assert opset_of(new) == CANONICAL_OPSET
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    a = onnxgrad.Session(old).run(None, {"x": x})[0]
    b = onnxgrad.Session(new).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)


def test_shapes_are_inferred():
    model = load(linear_model())
    shapes = {vi.name for vi in model.graph.value_info}
    assert "xw" in shapes


def test_ir3_initializers_listed_as_inputs():
    model = linear_model(opset=8, ir=3)
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    loaded = load(model, convert=False)
    assert [i.name for i in graph_inputs(loaded)] == ["x"]
    assert trainable_parameters(loaded) == ["W", "b"]


def test_parameters_exclude_constants_and_statistics():
    init = [
        numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w"),
        numpy_helper.from_array(np.ones(2, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(2, np.float32), "bias"),
        numpy_helper.from_array(np.zeros(2, np.float32), "mean"),
        numpy_helper.from_array(np.ones(2, np.float32), "var"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"]),
        helper.make_node("Mul", ["n", "two"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert trainable_parameters(model) == ["w", "scale", "bias"]


def test_parameters_exclude_attention_mask_fills():
    # scores = Where(mask, Where(mask, 0, -inf) + qk, bias_fill) + b: the [1]-shaped 0 and
    # -inf that exporters write for a mask, and a [3] tensor with -inf, are not weights;
    # b (also [1], read by Add) and a [3] Where operand are.
    init = [
        numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
        numpy_helper.from_array(np.full(1, -np.inf, np.float32), "minus_inf"),
        numpy_helper.from_array(np.array([0.0, -np.inf, 1.0], np.float32), "inf_row"),
        numpy_helper.from_array(np.ones(3, np.float32), "select_row"),
        numpy_helper.from_array(np.ones(1, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Where", ["mask", "zero", "minus_inf"], ["fill"]),
        helper.make_node("Add", ["fill", "qk"], ["s"]),
        helper.make_node("Add", ["s", "inf_row"], ["s2"]),
        helper.make_node("Where", ["mask", "s2", "select_row"], ["t"]),
        helper.make_node("Add", ["t", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 3]),
            helper.make_tensor_value_info("qk", TensorProto.FLOAT, [2, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert trainable_parameters(model) == ["select_row", "b"]


def test_parameters_read_inside_if_branches_are_found():
    # y = If(c, then: x·w, else: x + b): w and b are read only inside the branches.
    def branch(op, weight, name):
        return helper.make_graph(
            [helper.make_node(op, ["x", weight], [f"{name}_y"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 3])],
        )

    graph = helper.make_graph(
        [
            helper.make_node(
                "If",
                ["c"],
                ["y"],
                then_branch=branch("Mul", "w", "then"),
                else_branch=branch("Add", "b", "else"),
            )
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [
            numpy_helper.from_array(np.full(3, 2.0, np.float32), "w"),
            numpy_helper.from_array(np.ones(3, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert trainable_parameters(model) == ["w", "b"]


@pytest.mark.slow
def test_a_model_over_2_gb_trains_and_saves_with_its_data_on_disk(tmp_path):
    # y = x · W + b, W 23,200² float32 (2.15 GB, more than one protobuf can hold) and b after
    # it in one data file, so b's offset is past 2 GiB. W is zero but for its first and
    # last rows; the file is sparse, so it costs no disk until save writes a copy.
    n = 23_200
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    w_bytes = n * n * 4
    rng = np.random.default_rng(0)
    first, last = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)
    with open(src / "w.bin", "wb") as f:
        f.truncate(w_bytes)
        f.write(first.tobytes())
        f.seek(w_bytes - n * 4)
        f.write(last.tobytes())
        f.write(b.tobytes())
    tensors = []
    for name, dims, offset, length in (
        ("W", [n, n], 0, w_bytes),
        ("b", [n], w_bytes, n * 4),
    ):
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "w.bin"), ("offset", offset), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))
        tensors.append(tensor)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        tensors,
    )
    onnx.save(helper.make_model(graph), src / "big.onnx")
    original = onnx.load(src / "big.onnx", load_external_data=False).SerializeToString()

    # 1. Loaded with the weights left on disk, the proto small; a forward run reads them.
    model = load(src / "big.onnx")
    assert model.ByteSize() < 10_000
    x = np.zeros((1, n), np.float32)
    x[0, 0], x[0, -1] = 2.0, -1.0
    y = onnxgrad.Session(model).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y[0], 2 * first - last + b, rtol=1e-6, atol=1e-6)

    # 2. One step that trains W alone, saved into another folder.
    trainer = onnxgrad.Trainer(src / "big.onnx", "mse", onnxgrad.optim.SGD(0.5), trainable=["W"])
    target = np.ones((1, n), np.float32)
    trainer.step(x, target)
    assert np.mean((trainer.predict(x) - target) ** 2) < np.mean((y - target) ** 2)
    trainer.save(out / "big.onnx")
    del model

    # 3. The same layout, W's trained value in the data file, b's bytes as they were.
    assert sorted(p.name for p in out.iterdir()) == ["big.onnx", "w.bin"]
    assert onnx.load(out / "big.onnx", load_external_data=False).SerializeToString() == original
    assert (out / "w.bin").stat().st_size == (src / "w.bin").stat().st_size
    saved_w = np.fromfile(out / "w.bin", np.float32, count=n * n).reshape(n, n)
    assert np.array_equal(saved_w, trainer.parameters["W"])
    assert not np.array_equal(saved_w[0], first)
    del saved_w
    saved_b = np.fromfile(out / "w.bin", np.float32, count=n, offset=w_bytes)
    assert saved_b.tobytes() == b.tobytes()
    np.testing.assert_array_equal(
        np.fromfile(src / "w.bin", np.float32, count=n, offset=w_bytes - n * 4), last
    )


def _lowest_ir(opset: int) -> int:
    """The lowest IR version that onnx's release table pairs with `opset`."""
    return min(ir for _, ir, top, *_ in helper.VERSION_TABLE if top >= opset and ir >= 3)


IR_OPSETS = sorted(
    {(_lowest_ir(op), op) for op in range(7, onnx.defs.onnx_opset_version() + 1)}
    | {(8, 7), (10, 18), (helper.VERSION_TABLE[-1][1], 18)}
)
"""Each opset from 7 to the newest at the lowest IR version that carries it, and a few
older opsets under newer IR versions (IR 3 lists initializers as graph inputs)."""


@pytest.mark.parametrize("ir, opset", IR_OPSETS, ids=[f"ir{i}-opset{o}" for i, o in IR_OPSETS])
def test_every_ir_version_trains_and_saves_as_it_came(tmp_path, ir, opset):
    # y = x·W + b: the gradient of Σ y·r is xᵀr and Σ r, whatever the versions say.
    model = linear_model(opset=opset, ir=ir)
    if ir < 4:
        for t in model.graph.initializer:
            model.graph.input.append(
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            )
    onnx.checker.check_model(model)
    rng = np.random.default_rng(opset)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    r = rng.standard_normal((5, 3)).astype(np.float32)
    grad = onnxgrad.gradient_model(model, wrt=["W", "b"], loss=None)
    dw, db = onnxgrad.Session(grad).run(["W_grad", "b_grad"], {"x": x, "y_grad": r})
    np.testing.assert_allclose(dw, x.T @ r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, r.sum(axis=0), rtol=1e-5, atol=1e-6)

    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    trainer = onnxgrad.Trainer(path, loss="mse", optimizer=onnxgrad.optim.SGD(lr=0.05))
    target = x @ rng.standard_normal((4, 3)).astype(np.float32)
    losses = [trainer.step(x, target) for _ in range(5)]
    assert losses[-1] < losses[0]
    trainer.save(tmp_path / "tuned.onnx")
    saved = onnx.load(tmp_path / "tuned.onnx")
    assert (saved.ir_version, opset_of(saved)) == (ir, opset)
    assert [i.name for i in saved.graph.input] == [i.name for i in model.graph.input]
    (y,) = onnxgrad.Session(saved).run(None, {"x": x})
    w, b = (numpy_helper.to_array(t) for t in saved.graph.initializer)
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(w, numpy_helper.to_array(model.graph.initializer[0]))


@pytest.mark.parametrize("dtype", [TensorProto.DOUBLE, TensorProto.FLOAT16])
def test_old_pad_of_a_non_float32_tensor_is_converted(dtype):
    # onnx's converter writes Pad-11's constant_value as float32 whatever the data type;
    # the importer gives it the data's type, so the model reaches the canonical opset.
    x = helper.make_tensor_value_info("x", dtype, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", dtype, [1, 2, 5, 4])
    pad = helper.make_node("Pad", ["x"], ["y"], pads=[0, 0, 1, 0, 0, 0, 1, 1], value=1.5)
    model = helper.make_model(
        helper.make_graph([pad], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 9)]
    )
    model.ir_version = 4
    loaded = load(model)
    assert opset_of(loaded) == CANONICAL_OPSET
    value = np.arange(18).reshape(1, 2, 3, 3).astype(helper.tensor_dtype_to_np_dtype(dtype))
    (out,) = onnxgrad.Session(loaded).run(None, {"x": value})
    want = np.pad(value, [(0, 0), (0, 0), (1, 1), (0, 1)], constant_values=1.5)
    np.testing.assert_array_equal(out, want)
    assert out.dtype == value.dtype
