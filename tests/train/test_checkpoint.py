"""Checkpoints: atomic files, bit-for-bit resume (in process and after killing the CLI), and
the last good checkpoint left by a NaN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxgrad import NonFiniteLossError, Trainer
from onnxgrad.optim import SGD, Adam, AdamW
from onnxgrad.train import trainer as trainer_module
from onnxgrad.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from onnxgrad.train.metrics import read_log
from onnxgrad.train.schedules import warmup_cosine
from onnxgrad.train.trainer import KILL_AFTER_CHECKPOINT
from tests.train.test_modes import bn_model
from tests.train.test_trainer import digits, mlp, regression_data

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "arrays": {
            "f32": rng.normal(size=(3, 2)).astype(np.float32),
            "i8": np.arange(4, dtype=np.int8),
        },
        "scalars": [np.float32(0.1), np.int64(7), 2**80 + 1, 0.1 + 0.2, float("inf"), None, True],
        "betas": (0.9, 0.999),
        "rng": np.random.default_rng(5).bit_generator.state,
        "text": "é",
    }
    path = tmp_path / "state.npz"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    np.testing.assert_array_equal(back["arrays"]["f32"], state["arrays"]["f32"])
    assert back["arrays"]["f32"].dtype == np.float32 and back["arrays"]["i8"].dtype == np.int8
    assert back["scalars"] == state["scalars"]
    assert type(back["scalars"][0]) is np.float32
    assert back["betas"] == (0.9, 0.999) and back["rng"] == state["rng"] and back["text"] == "é"
    assert sorted(os.listdir(tmp_path)) == ["state.npz"]  # no temporary file left behind


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="cannot store a set"):
        save_checkpoint(tmp_path / "bad.npz", {"s": {1, 2}})
    with pytest.raises(CheckpointError, match="folder"):
        save_checkpoint(tmp_path / "no" / "such.npz", {})


class Crash(Exception):
    pass


def crash_after(monkeypatch, n: int) -> None:
    """Make the n-th checkpoint written by `fit` the last thing the run does."""
    written = []
    real = trainer_module.save_checkpoint

    def save(path, state):
        real(path, state)
        written.append(path)
        if len(written) == n:
            raise Crash

    monkeypatch.setattr(trainer_module, "save_checkpoint", save)


def classification_trainer(**kwargs) -> Trainer:
    return Trainer(
        mlp(),
        "cross_entropy",
        AdamW(0.01),
        schedule=warmup_cosine(3, 30),
        clip_norm=1.0,
        accumulate=2,
        ema=0.9,
        **kwargs,
    )


@pytest.mark.parametrize("crash_at", [1, 2, 4])
def test_resume_continues_bit_for_bit(tmp_path, monkeypatch, crash_at):
    x, y = digits()
    x, y = x[:300], y[:300]
    run = {"epochs": 3, "batch_size": 16, "val_split": 0.2, "seed": 4, "progress": False}
    steady = classification_trainer()
    expected = steady.fit(x, y, **run)

    ck = tmp_path / "ck.npz"
    crash_after(monkeypatch, crash_at)
    first = classification_trainer()
    with pytest.raises(Crash):
        first.fit(x, y, checkpoint=ck, checkpoint_every=4, log=tmp_path / "log.csv", **run)
    monkeypatch.undo()
    stopped_at = load_checkpoint(ck)["steps"]
    assert 0 < stopped_at < steady.steps

    resumed = classification_trainer()
    history = resumed.fit(
        x, y, checkpoint=ck, checkpoint_every=4, resume=True, log=tmp_path / "log.csv", **run
    )
    assert resumed.steps == steady.steps
    for name, value in steady.parameters.items():
        np.testing.assert_array_equal(resumed.parameters[name], value)
        np.testing.assert_array_equal(resumed.ema_parameters[name], steady.ema_parameters[name])
    assert resumed.optimizer.lr == steady.optimizer.lr
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in history] == [
        {k: v for k, v in r.items() if k not in drop} for r in expected
    ]
    assert [r["loss"] for r in read_log(tmp_path / "log.csv")] == [r["loss"] for r in expected]

    # A finished run resumed does nothing more.
    again = classification_trainer()
    assert len(again.fit(x, y, checkpoint=ck, resume=True, **run)) == 3
    np.testing.assert_array_equal(again.parameters["W1"], steady.parameters["W1"])


def test_resume_with_batchnorm_statistics(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 2)).astype(np.float32)
    y = rng.normal(size=(40, 2)).astype(np.float32)
    run = {"epochs": 2, "batch_size": 8, "seed": 1, "progress": False}
    steady = Trainer(bn_model(), "mse", Adam(0.01), batchnorm="train")
    steady.fit(x, y, **run)
    ck = tmp_path / "ck.npz"
    crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        Trainer(bn_model(), "mse", Adam(0.01), batchnorm="train").fit(
            x, y, checkpoint=ck, checkpoint_every=3, **run
        )
    monkeypatch.undo()
    resumed = Trainer(bn_model(), "mse", Adam(0.01), batchnorm="train")
    resumed.fit(x, y, checkpoint=ck, checkpoint_every=3, resume=True, **run)
    for name, value in {**steady.parameters, **steady.buffers}.items():
        np.testing.assert_array_equal({**resumed.parameters, **resumed.buffers}[name], value)


def test_resume_refuses_another_setup(tmp_path):
    x, y = regression_data(48)
    ck = tmp_path / "ck.npz"
    Trainer(mlp(8, 4, 2), "mse").fit(x, y, batch_size=8, checkpoint=ck, progress=False)
    with pytest.raises(CheckpointError, match="same data, seed and batch size"):
        Trainer(mlp(8, 4, 2), "mse").fit(x, y, batch_size=16, checkpoint=ck, resume=True)
    trainer = Trainer(mlp(8, 4, 2), "mse")
    trainer.save_checkpoint(ck)
    with pytest.raises(CheckpointError, match="no position in the data"):
        trainer.fit(x, y, batch_size=8, checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match="checkpoint file"):
        trainer.fit(x, y, resume=True)
    # Resuming without a checkpoint yet starts afresh.
    fresh = Trainer(mlp(8, 4, 2), "mse")
    fresh.fit(x, y, batch_size=8, checkpoint=tmp_path / "new.npz", resume=True, progress=False)
    assert fresh.steps == 6 and (tmp_path / "new.npz").is_file()


def test_save_and_load_checkpoint_methods(tmp_path):
    x, y = regression_data(32)
    trainer = Trainer(mlp(8, 4, 2), "mse", SGD(0.1, momentum=0.9), ema=0.5)
    trainer.step(x[:16], y[:16])
    trainer.save_checkpoint(tmp_path / "ck.npz")
    other = Trainer(mlp(8, 4, 2), "mse", SGD(0.3, momentum=0.9), ema=0.5)
    other.load_checkpoint(tmp_path / "ck.npz")
    assert other.optimizer.lr == 0.1 and other.steps == 1
    trainer.step(x[16:], y[16:])
    other.step(x[16:], y[16:])
    for name in trainer.parameters:
        np.testing.assert_array_equal(trainer.parameters[name], other.parameters[name])
        np.testing.assert_array_equal(trainer.ema_parameters[name], other.ema_parameters[name])


def test_nan_stops_and_leaves_the_last_good_checkpoint(tmp_path):
    x, y = regression_data(48)
    x[37] = np.nan  # in the fifth batch of 8
    ck = tmp_path / "ck.npz"
    trainer = Trainer(mlp(8, 4, 2), "mse", SGD(0.1))
    with pytest.raises(NonFiniteLossError, match=r"step 5: .*last good checkpoint is '.*ck.npz'"):
        trainer.fit(x, y, batch_size=8, shuffle=False, checkpoint=ck, checkpoint_every=2)
    state = load_checkpoint(ck)
    assert state["steps"] == 4 and state["fit"]["batch"] == 4
    reference = Trainer(mlp(8, 4, 2), "mse", SGD(0.1))
    for k in range(4):
        reference.step(x[k * 8 : k * 8 + 8], y[k * 8 : k * 8 + 8])
    for name, value in reference.parameters.items():
        np.testing.assert_array_equal(state["parameters"][name], value)
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written"):
        Trainer(mlp(8, 4, 2), "mse").fit(
            x, y, batch_size=8, shuffle=False, checkpoint=tmp_path / "none.npz", checkpoint_every=9
        )


# The command line, killed and resumed.


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxgrad", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def initializers(path: Path) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in onnx.load(path).graph.initializer}


def test_cli_killed_and_resumed_reaches_the_same_weights(tmp_path):
    x, y = digits()
    np.savez(tmp_path / "data.npz", x=x[:200], target=y[:200])
    onnx.save(mlp(), tmp_path / "model.onnx")
    args = [
        "train",
        tmp_path / "model.onnx",
        "--data",
        tmp_path / "data.npz",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--optimizer",
        "adamw",
        "--schedule",
        "cosine",
        "--warmup",
        "3",
        "--accumulate",
        "2",
        "--clip-norm",
        "2",
        "--ema",
        "0.9",
        "--seed",
        "3",
    ]
    steady = cli(*args, "-o", tmp_path / "steady.onnx")
    assert steady.returncode == 0, steady.stderr

    ck = tmp_path / "ck.npz"
    resumable = [
        *args,
        "-o",
        tmp_path / "resumed.onnx",
        "--checkpoint",
        ck,
        "--checkpoint-every",
        "5",
    ]
    killed = cli(*resumable, "--log", tmp_path / "log.jsonl", env={KILL_AFTER_CHECKPOINT: "3"})
    assert killed.returncode == -signal.SIGKILL
    assert ck.is_file() and not (tmp_path / "resumed.onnx").exists()
    stopped = load_checkpoint(ck)
    assert stopped["steps"] == 10 and stopped["fit"]["epoch"] == 1  # inside the second epoch

    resumed = cli(*resumable, "--resume", "--log", tmp_path / "log.jsonl")
    assert resumed.returncode == 0, resumed.stderr
    assert initializers(tmp_path / "resumed.onnx") == initializers(tmp_path / "steady.onnx")
    assert [r["epoch"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]
