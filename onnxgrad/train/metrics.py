"""Per-epoch metrics: written to a CSV or JSON-lines log, and drawn as a loss curve.

The log holds one row per epoch record of `Trainer.fit` (epoch, loss, accuracy, val_loss,
val_accuracy, lr, steps, seconds). It is rewritten whole, atomically, after every epoch,
so a run resumed from a checkpoint (which carries the earlier epochs' records) leaves the
same log as a run never stopped. The format follows the file's extension: `.csv`, or
`.jsonl` / `.json` / `.ndjson` for JSON lines.

`plot_history` needs matplotlib, an optional extra (`pip install onnxgrad[plot]`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from onnxgrad.errors import MissingDependencyError, UsageError

logger = logging.getLogger(__name__)

COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "steps", "seconds")
"""The columns of a CSV log, in order (keys a record lacks are left empty)."""

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def log_format(path: str | os.PathLike) -> str:
    """The log format of a file, from its extension: "csv" or "jsonl".

    Raises:
        UsageError: another extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in _JSON_SUFFIXES:
        return "jsonl"
    raise UsageError(
        f"cannot tell the log format of '{path}' from its extension: name it .csv or .jsonl"
    )


def write_log(path: str | os.PathLike, history: Sequence[dict]) -> None:
    """Write every epoch record to `path` (CSV or JSON lines), replacing the file atomically.

    Args:
        path: the log file; its extension chooses the format.
        history: the epoch records, as `Trainer.fit` returns them.
    """
    path = Path(path)
    text = io.StringIO()
    if log_format(path) == "csv":
        extra = [k for r in history for k in r if k not in COLUMNS]
        columns = list(COLUMNS) + list(dict.fromkeys(extra))
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        for record in history:
            writer.writerow({k: "" if record.get(k) is None else record[k] for k in columns})
    else:
        for record in history:
            text.write(json.dumps(record) + "\n")
    _replace(path, text.getvalue().encode("utf-8"))


def read_log(path: str | os.PathLike) -> list[dict]:
    """Read a log `write_log` wrote (numbers back as numbers, empty cells as None)."""
    path = Path(path)
    content = path.read_text(encoding="utf-8")
    if log_format(path) == "jsonl":
        return [json.loads(line) for line in content.splitlines() if line.strip()]
    rows = []
    for row in csv.DictReader(io.StringIO(content)):
        rows.append({k: _number(v) for k, v in row.items()})
    return rows


def require_matplotlib() -> None:
    """Fail early, before training, when --plot cannot be honoured.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "plotting the loss curve needs matplotlib, which is not installed: install the "
            "extra with `pip install onnxgrad[plot]` (or `pip install matplotlib`), or drop --plot"
        ) from err


def plot_history(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Draw the training (and held-out) loss per epoch into a PNG file.

    Args:
        history: the epoch records, as `Trainer.fit` returns them.
        path: the image file to write.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    axes.plot(epochs, [r["loss"] for r in history], marker="o", label="training loss")
    held = [(r["epoch"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if held:
        axes.plot(*zip(*held), marker="s", label="held-out loss")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    data = io.BytesIO()
    figure.savefig(data, format="png")
    _replace(Path(path), data.getvalue())
    logger.info("wrote the loss curve to '%s'", path)


def _number(text: str):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _replace(path: Path, data: bytes) -> None:
    folder = path.resolve().parent
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
