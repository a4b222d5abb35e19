"""Checkpoint files: a trainer's whole state in one .npz archive, written atomically.

A checkpoint is a nested structure of dicts, lists, numbers, strings and numpy arrays
(parameters, optimizer buffers, step and epoch counters, the data order's random state).
Arrays are stored as members of the archive, bit for bit; everything else goes into one
JSON member, `__state__`, where each array is replaced by a reference to its member.
Python's JSON writes floats by their shortest exact representation and integers of any
size, so a reloaded state equals the saved one exactly. Nothing is pickled.

The archive is written to a temporary file in the destination folder, flushed to disk,
then renamed over the target (`os.replace`): a run killed at any moment leaves either the
previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxgrad.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "onnxgrad-checkpoint"
VERSION = 1

_STATE = "__state__"
_ARRAY = "__array__"
_SCALAR = "__scalar__"
_TUPLE = "__tuple__"


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write `state` to `path` atomically.

    Args:
        path: the checkpoint file (conventionally `.npz`).
        state: nested dicts (string keys), lists, tuples, bools, ints, floats, strings, None
            and numpy arrays or scalars.

    Raises:
        CheckpointError: the state holds a value of another type.
    """
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(dict(state), arrays)
    arrays[_STATE] = np.array(json.dumps({"format": FORMAT, "version": VERSION, "state": tree}))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write_atomically(Path(path), buffer.getvalue())
    logger.debug("wrote checkpoint '%s' (%d array(s))", path, len(arrays) - 1)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read what `save_checkpoint` wrote.

    Raises:
        CheckpointError: the file is missing, unreadable, or not an onnxgrad checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        header = json.loads(str(arrays.pop(_STATE)[()]))
    except Exception as err:  # zipfile, numpy and JSON errors alike
        raise CheckpointError(
            f"cannot read '{path}' as an onnxgrad checkpoint: {err}; it may have been written "
            "by another program: start without resuming, or point to the right file"
        ) from err
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CheckpointError(
            f"'{path}' is not an onnxgrad checkpoint of version {VERSION} (format "
            f"{header.get('format')!r}, version {header.get('version')!r})"
        )
    return _decode(header["state"], arrays)


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {_ARRAY: key}
    if isinstance(value, np.generic):
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(value)
        return {_SCALAR: key}
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise CheckpointError(f"checkpoint keys must be strings, got {bad[0]!r}")
        return {k: _encode(v, arrays) for k, v in value.items()}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(
        f"cannot store a {type(value).__name__} in a checkpoint: use arrays, numbers, strings, "
        "lists and dicts"
    )


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return arrays[value[_ARRAY]]
        if set(value) == {_SCALAR}:
            return arrays[value[_SCALAR]][()]
        if set(value) == {_TUPLE}:
            return tuple(_decode(v, arrays) for v in value[_TUPLE])
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


def _write_atomically(path: Path, data: bytes) -> None:
    folder = path.resolve().parent
    if not folder.is_dir():
        raise CheckpointError(f"cannot write checkpoint '{path}': folder '{folder}' does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
