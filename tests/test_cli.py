"""The command line, end to end on the example in models/.

Training runs twice: once as a subprocess (`python -m onnxgrad train`, as a user runs it)
and once through `main()` in process. The tuned model must give the same predictions in
onnxruntime as in onnxgrad's executor.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxgrad
from onnxgrad.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CNN = MODELS / "digits_cnn.onnx"
TRAIN = MODELS / "digits_train.npz"
TEST = MODELS / "digits_test.npz"


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    """Run `python -m onnxgrad ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "onnxgrad", *map(str, args)],
        check=False,  # the tests read the exit status themselves
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def accuracies(text: str) -> tuple[float, float]:
    """The held-out accuracy printed on the 'before:' and 'after:' lines."""
    before = re.search(r"^before: .*accuracy ([\d.]+)%", text, re.MULTILINE)
    after = re.search(r"^after: .*accuracy ([\d.]+)%", text, re.MULTILINE)
    assert before and after, text
    return float(before.group(1)), float(after.group(1))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The example CNN fine-tuned for two epochs by `python -m onnxgrad train`."""
    out = tmp_path_factory.mktemp("cli") / "tuned.onnx"
    result = cli(
        "train",
        CNN,
        "--data",
        TRAIN,
        "--eval",
        TEST,
        "-o",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
    )
    return out, result


# train


def test_train_subprocess_writes_a_better_model(tuned):
    out, result = tuned
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    assert "epoch 1/2" in result.stdout and "epoch 2/2" in result.stdout
    before, after = accuracies(result.stdout)
    assert after > before
    assert result.stderr == ""


def test_tuned_model_keeps_the_graph_and_changes_weights(tuned):
    out, _ = tuned
    original, trained = onnx.load(str(CNN)), onnx.load(str(out))
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in original.graph.node]
    assert trained.opset_import == original.opset_import
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    assert before.keys() == after.keys()
    assert not np.array_equal(before["fc.weight"], after["fc.weight"])
    # BatchNormalization's running statistics are not parameters: they stay as they were.
    np.testing.assert_array_equal(before["bn1.running_mean"], after["bn1.running_mean"])


def test_tuned_model_same_in_onnxruntime_and_onnxgrad(tuned):
    ort = pytest.importorskip("onnxruntime")
    out, _ = tuned
    x = np.load(TEST)["input"]
    theirs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input": x}
    )[0]
    ours = onnxgrad.Session(str(out)).run(["logits"], {"input": x})[0]
    np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_train_in_process_with_sgd_and_frozen_features(tmp_path, capsys):
    out = tmp_path / "head.onnx"
    code = main(
        [
            "train",
            str(CNN),
            "--data",
            str(TRAIN),
            "-o",
            str(out),
            "--epochs",
            "1",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--momentum",
            "0.9",
            "--trainable",
            "fc.*",
            "--val-split",
            "0.2",
            "--seed",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trainable parameters: 2 tensor(s), 2,570 element(s)" in captured.out
    assert "0.2 validation split" in captured.out
    assert re.search(r"^epoch 1/1: train loss [\d.]+, held-out loss", captured.out, re.MULTILINE)
    accuracies(captured.out)

    # Only the head moved.
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(CNN)).graph.initializer}
    trained = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    changed = sorted(n for n in original if not np.array_equal(original[n], trained[n]))
    assert changed == ["fc.bias", "fc.weight"]


# grad


def test_grad_appends_a_loss_and_passes_the_full_checker(tmp_path, capsys):
    out = tmp_path / "training.onnx"
    assert main(["grad", str(CNN), "--loss", "cross_entropy", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target" in printed and "fc.weight_grad" in printed

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert "target" in [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    params = onnxgrad.trainable_parameters(onnxgrad.load(str(CNN)))
    assert outputs[-len(params) :] == [f"{p}_grad" for p in params]
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was left behind"


def test_grad_on_an_output_with_globbed_wrt(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "vjp.onnx"
    argv = ["grad", str(CNN), "--loss", "logits", "--wrt", "fc.*", "input", "-o", str(out)]
    assert main(argv) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == [
        "logits",
        "fc.weight_grad",
        "fc.bias_grad",
        "input_grad",
    ]

    # The gradient graph runs in onnxruntime as in onnxgrad.
    x = np.load(TEST)["input"][:7]
    seed = np.random.default_rng(0).standard_normal((7, 10)).astype(np.float32)
    feeds = {"input": x, "logits_grad": seed}
    theirs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    ours = onnxgrad.Session(str(out)).run(None, feeds)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# info


def test_info_lists_everything(capsys):
    assert main(["info", str(CNN)]) == 0
    out = capsys.readouterr().out
    assert "input: float32 [batch, 1, 8, 8]" in out
    assert "logits: float32 [batch, 10]" in out
    assert "trainable parameters: 8 tensor(s), 3,834 element(s)" in out
    assert re.search(r"^  fc\.weight +\[10, 256\] +2,560$", out, re.MULTILINE)
    assert "bn1.running_mean" not in out
    assert re.search(r"^  Conv +2$", out, re.MULTILINE)
    assert re.search(r"^  BatchNormalization +1$", out, re.MULTILINE)
    assert "missing gradient rules: none" in out


def test_info_reports_weights_held_in_constant_nodes(tmp_path, capsys):
    # A Constant weight and a ConstantOfShape one (its shape an initializer), as exporters
    # and caffe2's model zoo leave them: they compute, but are not trainable as they are.
    w = numpy_helper.from_array(np.full((3, 4), 0.5, np.float32))
    nodes = [
        helper.make_node("Constant", [], ["W"], name="const_w", value=w),
        helper.make_node(
            "ConstantOfShape",
            ["b_shape"],
            ["b"],
            name="fill_b",
            value=numpy_helper.from_array(np.array([0.1], np.float32)),
        ),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.array([4], np.int64), "b_shape")],
    )
    path = tmp_path / "held.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 0 tensor(s), 0 element(s)" in out
    assert (
        "weights held in Constant/ConstantOfShape nodes (not trainable): 2 tensor(s), "
        "16 element(s)" in out
    )
    assert f"`onnxgrad check {path} --fix -o FIXED.onnx` makes them parameters" in out
    assert re.search(r"^  W +\[3, 4\] +12  Constant 'const_w'$", out, re.MULTILINE)
    assert re.search(r"^  b +\[4\] +4  ConstantOfShape 'fill_b'$", out, re.MULTILINE)

    # The example holds none.
    assert main(["info", str(CNN)]) == 0
    assert "weights held in Constant/ConstantOfShape nodes: none" in capsys.readouterr().out


def test_info_names_every_node_without_a_rule(tmp_path, capsys):
    # MatMul has a rule; the two custom-domain nodes cannot have one.
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    nodes = [
        helper.make_node("Frob", ["x"], ["a"], domain="com.example", name="frob"),
        helper.make_node("MatMul", ["a", "w"], ["b"], name="mm"),
        helper.make_node("Frob", ["b"], ["y"], domain="com.example", name="frob2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
        [w],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "missing gradient rules: 2 node(s)" in out
    assert re.search(r"com\.example::Frob +node 'frob'$", out, re.MULTILINE)
    assert re.search(r"com\.example::Frob +node 'frob2'$", out, re.MULTILINE)
    assert "node 'mm'" not in out


# run


def test_run_prints_shapes_and_accuracy(tmp_path, capsys):
    out = tmp_path / "out.npz"
    assert main(["run", str(CNN), "--data", str(TEST), "-o", str(out), "--batch-size", "128"]) == 0
    printed = capsys.readouterr().out
    assert "logits: float32 [500, 10]" in printed
    match = re.search(r"^accuracy: ([\d.]+)%", printed, re.MULTILINE)
    assert match and 50 < float(match.group(1)) < 95
    with np.load(out) as saved:
        assert saved["logits"].shape == (500, 10)


# errors


def _one_line_error(result_or_err: str) -> str:
    lines = result_or_err.strip().splitlines()
    assert len(lines) == 1, result_or_err
    assert lines[0].startswith("onnxgrad: error: "), result_or_err
    assert "Traceback" not in result_or_err
    return lines[0]


def test_missing_model_file_subprocess(tmp_path):
    result = cli("info", tmp_path / "nope.onnx")
    assert result.returncode == 2
    assert "does not exist" in _one_line_error(result.stderr)
    assert result.stdout == ""


def test_truncated_model_file_subprocess(tmp_path):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(CNN.read_bytes()[:3000])
    result = cli("run", path, "--data", TEST)
    assert result.returncode == 2
    assert "truncated.onnx" in _one_line_error(result.stderr)


def test_bad_loss_subprocess(tmp_path):
    result = cli("train", CNN, "--data", TRAIN, "-o", tmp_path / "x.onnx", "--loss", "hinge")
    assert result.returncode == 2
    line = _one_line_error(result.stderr)
    assert "hinge" in line and "cross_entropy" in line
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["info", "{tmp}/missing.onnx"], "does not exist"),
        (["grad", str(CNN), "--loss", "nonsense", "-o", "{tmp}/g.onnx"], "nonsense"),
        (["grad", str(CNN), "--wrt", "conv9.*", "-o", "{tmp}/g.onnx"], "conv9.*"),
        (["run", str(CNN), "--data", "{tmp}/missing.npz"], "missing.npz"),
        (
            ["train", str(CNN), "--data", str(TRAIN), "-o", "{tmp}/t.onnx", "--epochs", "0"],
            "--epochs",
        ),
        (
            ["train", str(CNN), "--data", str(TRAIN), "-o", "{tmp}/t.onnx", "--trainable", "nope"],
            "nope",
        ),
        (["grad", str(CNN), "-o", "{tmp}/no/such/folder/g.onnx"], "does not exist"),
        (["frobnicate"], "frobnicate"),
        ([], "required"),
    ],
    ids=[
        "missing-model",
        "bad-grad-loss",
        "bad-wrt-glob",
        "missing-data",
        "zero-epochs",
        "bad-trainable",
        "missing-out-folder",
        "bad-command",
        "no-command",
    ],
)
def test_errors_in_process(tmp_path, capsys, argv, expected):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert expected in _one_line_error(captured.err)
    assert captured.out == ""
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed command left a file"


def test_data_without_targets_is_an_error_for_train(tmp_path, capsys):
    data = tmp_path / "x_only.npz"
    np.savez(data, input=np.load(TRAIN)["input"][:10])
    assert main(["train", str(CNN), "--data", str(data), "-o", str(tmp_path / "t.onnx")]) == 2
    assert "'target'" in _one_line_error(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(onnxgrad.ModelLoadError):
        main(["info", str(tmp_path / "nope.onnx"), "--debug"])


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    assert "--trainable" in capsys.readouterr().out
