"""Training data: read it from .npz files, split it, cut it into (shuffled) batches.

Inputs are always a dict of arrays by model input name, all sharing the first
(sample) dimension; targets are one array with the same first dimension, or None when
the model computes its own loss from ordinary inputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from onnxgrad.errors import DataError

logger = logging.getLogger(__name__)

TARGET_KEY = "target"
"""The .npz entry that holds the targets."""

SINGLE_INPUT_ALIASES = ("x", "input", "data")
"""Other .npz entry names accepted for the input of a single-input model."""


Inputs = Mapping[str, np.ndarray]


def load_npz(
    path: str | os.PathLike, input_names: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read model inputs and targets from an .npz file.

    Each input is stored under the model input's name; a single-input model may also use
    "x", "input" or "data". Targets are stored under "target" (optional).

    Args:
        path: the .npz file.
        input_names: the model's input names (excluding the target).

    Returns:
        (inputs by name, targets or None).

    Raises:
        DataError: the file is missing or unreadable, an input is not in it, or the arrays
            disagree on the number of samples.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # zipfile and numpy format errors
        raise DataError(f"cannot read '{path}' as an .npz archive: {err}") from err
    held = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()) or "nothing"

    inputs: dict[str, np.ndarray] = {}
    missing = []
    for name in input_names:
        if name in arrays:
            inputs[name] = arrays[name]
            continue
        alias = None
        if len(input_names) == 1:
            alias = next((a for a in SINGLE_INPUT_ALIASES if a in arrays), None)
        if alias is None:
            missing.append(name)
        else:
            inputs[name] = arrays[alias]
    if missing:
        hint = f" (or one of {', '.join(SINGLE_INPUT_ALIASES)})" if len(input_names) == 1 else ""
        raise DataError(
            f"'{path}' has no array for model input(s) {', '.join(missing)}{hint}; it holds: "
            f"{held}. Save each input under its model input name (np.savez(path, "
            f"{input_names[0]}=..., target=...))"
        )
    targets = arrays.get(TARGET_KEY)
    num_samples(inputs, targets)
    logger.debug("read %s from '%s'", held, path)
    return inputs, targets


def as_inputs(inputs: np.ndarray | Inputs, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Inputs as a dict by name: a bare array is the input of a single-input model.

    Raises:
        DataError: a bare array for a model with several inputs, or missing/unknown names.
    """
    if isinstance(inputs, Mapping):
        out = {k: np.asarray(v) for k, v in inputs.items()}
        missing = [n for n in input_names if n not in out]
        if missing:
            raise DataError(
                f"missing model input(s) {', '.join(missing)}; got {', '.join(out) or 'nothing'}"
            )
        return out
    if len(input_names) != 1:
        raise DataError(
            f"the model has {len(input_names)} inputs ({', '.join(input_names)}): pass a dict of "
            "arrays by input name instead of one array"
        )
    return {input_names[0]: np.asarray(inputs)}


def num_samples(inputs: Inputs, targets: np.ndarray | None = None) -> int:
    """The common first dimension of every input and the targets.

    A scalar input (a sample rate, a flag) has no sample dimension: every batch gets it
    whole, and it does not count.

    Raises:
        DataError: no input or target has a sample dimension, or the counts differ.
    """
    counts = {}
    for name, value in inputs.items():
        if np.ndim(value) > 0:
            counts[name] = len(value)
    if targets is not None:
        if np.ndim(targets) == 0:
            raise DataError("targets are a scalar: they need a sample (first) dimension")
        counts[TARGET_KEY] = len(targets)
    if not counts:
        raise DataError(
            "no inputs given"
            if not inputs
            else "every input is a scalar: at least one needs a sample (first) dimension"
        )
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DataError(f"inputs and targets disagree on the number of samples ({detail})")
    return next(iter(counts.values()))


def take(inputs: Inputs, targets: np.ndarray | None, index) -> tuple[dict, np.ndarray | None]:
    """The samples at `index` (a slice or an index array) of every input and the targets;
    scalar inputs whole."""
    picked = {k: v if np.ndim(v) == 0 else v[index] for k, v in inputs.items()}
    return picked, None if targets is None else targets[index]


def batches(
    inputs: Inputs,
    targets: np.ndarray | None,
    batch_size: int,
    shuffle: bool = False,
    rng: np.random.Generator | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """Yield (inputs, targets) batches of `batch_size` samples; the last may be smaller.

    Args:
        inputs: arrays by name, sharing their first dimension.
        targets: the targets, or None.
        batch_size: samples per batch (>= 1).
        shuffle: visit the samples in a random order (drawn from `rng`).
        rng: the random generator; default a fresh unseeded one.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = num_samples(inputs, targets)
    if shuffle:
        order = (rng if rng is not None else np.random.default_rng()).permutation(n)
        for start in range(0, n, batch_size):
            yield take(inputs, targets, order[start : start + batch_size])
    else:
        for start in range(0, n, batch_size):
            yield take(inputs, targets, slice(start, start + batch_size))


def num_batches(n: int, batch_size: int) -> int:
    """How many batches `batches` yields for `n` samples."""
    return -(-n // batch_size)


def split(
    inputs: Inputs,
    targets: np.ndarray | None,
    val_fraction: float,
    rng: np.random.Generator | None = None,
) -> tuple[tuple[dict, np.ndarray | None], tuple[dict, np.ndarray | None]]:
    """Split the samples at random into a training and a validation part.

    Args:
        inputs: arrays by name.
        targets: the targets, or None.
        val_fraction: the share of samples held out, in [0, 1).
        rng: the random generator; None keeps the order and holds out the last samples.

    Returns:
        ((train inputs, train targets), (validation inputs, validation targets)).

    Raises:
        DataError: val_fraction out of range, or too few samples to keep both parts non-empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"the validation fraction must lie in [0, 1), got {val_fraction}")
    n = num_samples(inputs, targets)
    n_val = round(n * val_fraction)
    if val_fraction > 0.0 and (n_val == 0 or n_val == n):
        raise DataError(
            f"cannot hold out {val_fraction:.0%} of {n} samples and keep both parts non-empty"
        )
    order = np.arange(n) if rng is None else rng.permutation(n)
    train_idx, val_idx = order[: n - n_val], order[n - n_val :]
    return take(inputs, targets, train_idx), take(inputs, targets, val_idx)
