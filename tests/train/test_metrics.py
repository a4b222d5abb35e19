"""Per-epoch metrics: CSV and JSON-lines logs, the loss curve."""

from __future__ import annotations

import sys

import pytest

from onnxgrad import Trainer
from onnxgrad.errors import OnnxgradError
from onnxgrad.optim import Adam
from onnxgrad.train.metrics import log_format, plot_history, read_log, require_matplotlib, write_log
from tests.train.test_trainer import digits, mlp, regression_data

HISTORY = [
    {"epoch": 1, "loss": 0.5, "accuracy": 0.75, "val_loss": 0.25, "val_accuracy": None},
    {"epoch": 2, "loss": 0.125, "accuracy": 1.0, "val_loss": None, "val_accuracy": 0.5, "extra": 3},
]


@pytest.mark.parametrize("name", ["log.csv", "log.jsonl", "log.JSON", "log.ndjson"])
def test_log_round_trip(tmp_path, name):
    write_log(tmp_path / name, HISTORY)
    back = read_log(tmp_path / name)
    for record, row in zip(HISTORY, back):
        assert {k: row[k] for k in record} == record
    if name.endswith(".csv"):
        header = (tmp_path / name).read_text().splitlines()[0]
        assert header == "epoch,loss,accuracy,val_loss,val_accuracy,lr,steps,seconds,extra"


def test_log_format_by_extension():
    assert log_format("a.CSV") == "csv" and log_format("b.jsonl") == "jsonl"
    with pytest.raises(OnnxgradError, match=r"name it \.csv or \.jsonl"):
        log_format("metrics.txt")


def test_fit_writes_the_log_every_epoch(tmp_path):
    x, y = digits()
    trainer = Trainer(mlp(), "cross_entropy", Adam(0.01))
    seen = []

    def count(record):
        seen.append(len(read_log(tmp_path / "log.csv")))

    history = trainer.fit(
        x[:400], y[:400], epochs=3, val_split=0.25, log=tmp_path / "log.csv", callback=count
    )
    assert seen == [1, 2, 3]
    rows = read_log(tmp_path / "log.csv")
    assert [r["loss"] for r in rows] == [r["loss"] for r in history]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert rows[-1]["steps"] == 30 and rows[-1]["lr"] == 0.01


def test_regression_has_no_accuracy(tmp_path):
    x, y = regression_data(32)
    history = Trainer(mlp(8, 4, 2), "mse").fit(x, y, batch_size=8, log=tmp_path / "m.jsonl")
    assert history[0]["accuracy"] is None
    assert read_log(tmp_path / "m.jsonl")[0]["accuracy"] is None


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot_history(HISTORY, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(OnnxgradError, match=r"pip install onnxgrad\[plot\]"):
        require_matplotlib()
    with pytest.raises(OnnxgradError, match="needs matplotlib"):
        plot_history(HISTORY, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
