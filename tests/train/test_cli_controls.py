"""The fine-tuning controls of `onnxgrad train`, run in process through main()."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxgrad.cli import main
from onnxgrad.train.metrics import read_log
from tests.train.test_modes import bn_model, dropout_model
from tests.train.test_trainer import digits, mlp


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


@pytest.fixture
def digits_files(tmp_path):
    x, y = digits()
    np.savez(tmp_path / "data.npz", x=x[:300], target=y[:300])
    onnx.save(mlp(), tmp_path / "model.onnx")
    return tmp_path


def train(folder, *options: str) -> int:
    return main(
        [
            "train",
            str(folder / "model.onnx"),
            "--data",
            str(folder / "data.npz"),
            "-o",
            str(folder / "out.onnx"),
            "--epochs",
            "2",
            *options,
        ]
    )


def test_train_after_schedule_clipping_accumulation_ema_log_plot(digits_files, capsys):
    pytest.importorskip("matplotlib")
    folder = digits_files
    status = train(
        folder,
        "--train-after",
        "relu",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--schedule",
        "step",
        "--step-size",
        "4",
        "--gamma",
        "0.5",
        "--warmup",
        "2",
        "--clip-value",
        "0.5",
        "--clip-norm",
        "5",
        "--accumulate",
        "2",
        "--ema",
        "0.5",
        "--log",
        str(folder / "log.csv"),
        "--plot",
        str(folder / "loss.png"),
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "trainable parameters: 2 tensor(s)" in out and "wrote" in out
    before, after = weights(folder / "model.onnx"), weights(folder / "out.onnx")
    np.testing.assert_array_equal(before["W1"], after["W1"])  # before the relu: frozen
    assert not np.array_equal(before["W2"], after["W2"])
    rows = read_log(folder / "log.csv")
    # 270 training samples, batches of 32: 9 batches, 5 steps an epoch with --accumulate 2.
    assert [r["steps"] for r in rows] == [5, 10]
    # warm-up of 2 steps, then step decay every 4: the 10th step (index 9) is at 0.5·0.5.
    assert rows[-1]["lr"] == pytest.approx(0.25)
    assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_trainable_globs(digits_files, capsys):
    assert train(digits_files, "--trainable", "b*") == 0
    assert "trainable parameters: 2 tensor(s)" in capsys.readouterr().out
    after = weights(digits_files / "out.onnx")
    np.testing.assert_array_equal(after["W2"], weights(digits_files / "model.onnx")["W2"])


def test_batchnorm_train_and_dropout(tmp_path, capsys):
    rng = np.random.default_rng(0)
    onnx.save(bn_model(), tmp_path / "model.onnx")
    np.savez(
        tmp_path / "data.npz",
        x=rng.normal(size=(40, 3, 2)).astype(np.float32),
        target=rng.normal(size=(40, 2)).astype(np.float32),
    )
    assert train(tmp_path, "--loss", "mse", "--batchnorm", "train") == 0
    after, before = weights(tmp_path / "out.onnx"), weights(tmp_path / "model.onnx")
    assert not np.array_equal(after["bn.running_mean"], before["bn.running_mean"])
    assert train(tmp_path, "--loss", "mse") == 0
    after = weights(tmp_path / "out.onnx")
    np.testing.assert_array_equal(after["bn.running_mean"], before["bn.running_mean"])

    onnx.save(dropout_model(), tmp_path / "model.onnx")
    np.savez(
        tmp_path / "data.npz",
        x=rng.normal(size=(40, 4)).astype(np.float32),
        target=rng.normal(size=(40, 6)).astype(np.float32),
    )
    assert train(tmp_path, "--loss", "mse", "--dropout") == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--resume"], "--resume and --checkpoint-every need --checkpoint"),
        (["--checkpoint-every", "3"], "need --checkpoint"),
        (["--log", "metrics.txt"], "name it .csv or .jsonl"),
        (["--batchnorm", "eval"], "invalid --batchnorm 'eval'"),
        (["--schedule", "linear"], "invalid --schedule 'linear'"),
        (["--ema", "1.5"], "--ema must be a decay in [0, 1)"),
        (["--accumulate", "0"], "--accumulate must be a whole number >= 1"),
        (["--train-after", "nowhere"], "no node named 'nowhere'"),
    ],
)
def test_usage_errors(digits_files, capsys, options, message):
    assert train(digits_files, *options) == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_training(digits_files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert train(digits_files, "--plot", str(digits_files / "loss.png")) == 2
    captured = capsys.readouterr()
    assert "pip install onnxgrad[plot]" in captured.err and "epoch" not in captured.out


def test_nan_stops_the_cli_with_the_checkpoint(tmp_path, capsys):
    x, y = digits()
    x = x[:100].copy()
    x[70] = np.nan
    np.savez(tmp_path / "data.npz", x=x, target=y[:100])
    onnx.save(mlp(), tmp_path / "model.onnx")
    status = train(
        tmp_path,
        "--val-split",
        "0",
        "--batch-size",
        "10",
        "--checkpoint",
        str(tmp_path / "ck.npz"),
        "--checkpoint-every",
        "2",
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "not finite" in err or "loss itself is nan" in err
    assert "last good checkpoint" in err and (tmp_path / "ck.npz").is_file()
    assert not (tmp_path / "out.onnx").exists()
