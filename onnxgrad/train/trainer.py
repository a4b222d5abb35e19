"""The training loop: a model, a loss, an optimizer, and parameters kept as numpy arrays.

A `Trainer` builds everything once: the loss is appended to the model, the gradient model
is built for the trainable parameters, and one `Session` is compiled. Each step then feeds
the batch and the current parameters by name (feeds override initializers), reads the
loss and the gradients, and lets the optimizer update the parameters in place. Nothing is
re-serialized between steps.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxgrad.autodiff.builder import GRAD_SUFFIX, gradient_model
from onnxgrad.errors import GradientError, NonFiniteLossError
from onnxgrad.export import save_model
from onnxgrad.importer import FLOAT_TYPES, graph_inputs, load, trainable_parameters
from onnxgrad.runtime.session import Session
from onnxgrad.train import data as datalib
from onnxgrad.train.data import DataError
from onnxgrad.train.losses import CLASSIFICATION_LOSSES, LOSSES, append_loss, resolve_output
from onnxgrad.train.optim import Adam, Optimizer

logger = logging.getLogger(__name__)

Trainable = Sequence[str] | Callable[[str], bool] | None


class Trainer:
    """Fine-tune the parameters of an ONNX model.

    Args:
        model: a path, bytes or ModelProto. The original is kept, so that `save` writes
            the trained weights into it unchanged otherwise.
        loss: one of "cross_entropy", "nll", "mse", "l1", "bce_with_logits" (appended to the
            model's output, with a new input "target"), or the name of a scalar output of
            the model that already is the loss (its targets are then ordinary inputs).
        optimizer: an `onnxgrad.optim` optimizer; default Adam(lr=1e-3).
        trainable: the parameters to train: None (every trainable parameter), a list of
            initializer names, or a predicate on parameter names. Everything else is frozen.
        output: the output the loss reads (and `predict` returns) when there are several.
        backend: the Session backend, "numpy" or "onnxruntime".

    Raises:
        GradientError: an unknown loss or output, bad trainable names, or no parameters.
        MissingGradientError: ops between the loss and a trainable parameter lack a rule.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes | onnx.ModelProto,
        loss: str = "cross_entropy",
        optimizer: Optimizer | None = None,
        trainable: Trainable = None,
        *,
        output: str | None = None,
        backend: str = "numpy",
    ):
        # 1. The original, to write back into; the normalized forward model to work on.
        self._source = _keep(model)
        self.forward_model = load(model)
        self.backend = backend
        outputs = [o.name for o in self.forward_model.graph.output]

        # 2. The loss: appended to an output, or one the model already computes.
        if loss in LOSSES:
            self.loss_kind: str | None = loss
            self.output: str | None = resolve_output(self.forward_model, output)
            train_model, self.loss_name = append_loss(self.forward_model, loss, self.output)
            self.target_name: str | None = "target"
        elif loss in outputs:
            self.loss_kind = None
            self.loss_name = loss
            self.target_name = None
            self.output = _other_output(outputs, loss, output)
            _check_scalar(self.forward_model, loss)
            train_model = self.forward_model
        else:
            raise GradientError(
                f"unknown loss '{loss}': give one of {', '.join(LOSSES)}, or the name of a "
                f"scalar output of the model ({', '.join(outputs)})"
            )

        # 3. What to train; the gradient model and its session, built once.
        self.trainable = _select(self.forward_model, trainable)
        self.training_graph = gradient_model(train_model, wrt=self.trainable, loss=self.loss_name)
        self._grad_names = [f"{name}{GRAD_SUFFIX}" for name in self.trainable]
        self._session = Session(self.training_graph, backend=backend)
        self._predict_session: Session | None = None

        # 4. The parameters: writable arrays owned by the trainer, fed by name each step.
        inits = {t.name: t for t in self.forward_model.graph.initializer}
        self._params = {name: numpy_helper.to_array(inits[name]).copy() for name in self.trainable}
        self._input_types = _input_types(self.forward_model)
        self._target_type = None
        if self.target_name is not None:
            self._target_type = next(
                i.type.tensor_type
                for i in self.training_graph.graph.input
                if i.name == self.target_name
            )
        self.optimizer = optimizer if optimizer is not None else Adam(1e-3)
        self.steps = 0
        logger.info(
            "training %d parameter tensor(s) (%d values) with %s on loss '%s'",
            len(self.trainable),
            sum(p.size for p in self._params.values()),
            self.optimizer,
            self.loss_name,
        )

    # Parameters.

    @property
    def parameters(self) -> dict[str, np.ndarray]:
        """The trained parameters by name, as read-only views that follow training."""
        views = {}
        for name, value in self._params.items():
            view = value.view()
            view.flags.writeable = False
            views[name] = view
        return views

    @property
    def training_model(self) -> onnx.ModelProto:
        """The training graph (forward, loss, gradients) with the current parameter values."""
        model = onnx.ModelProto()
        model.CopyFrom(self.training_graph)
        for tensor in model.graph.initializer:
            if tensor.name in self._params:
                tensor.CopyFrom(numpy_helper.from_array(self._params[tensor.name], tensor.name))
        return model

    def state_dict(self) -> dict:
        """A checkpoint: copies of the parameters, the optimizer's state and the step count."""
        return {
            "parameters": {k: v.copy() for k, v in self._params.items()},
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from `state_dict()`: parameters are copied into the trainer's own arrays.

        Raises:
            GradientError: the checkpoint's parameters differ in names, shapes or dtypes.
        """
        params = state["parameters"]
        if set(params) != set(self._params):
            raise GradientError(
                f"the checkpoint holds parameters {sorted(params)}, but this trainer trains "
                f"{sorted(self._params)}"
            )
        for name, value in params.items():
            own = self._params[name]
            if value.shape != own.shape or value.dtype != own.dtype:
                raise GradientError(
                    f"checkpoint parameter '{name}' is {value.dtype}{list(value.shape)}, the "
                    f"model's is {own.dtype}{list(own.shape)}"
                )
        for name, value in params.items():
            np.copyto(self._params[name], value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])

    # Training.

    def step(self, inputs: np.ndarray | Mapping[str, np.ndarray], targets=None) -> float:
        """One optimizer step on one batch.

        Args:
            inputs: one array (single-input models) or arrays by input name.
            targets: the batch's targets (for an appended loss), or None.

        Returns:
            The batch's loss, before the update.

        Raises:
            NonFiniteLossError: the loss or a gradient is NaN or infinite (nothing updated).
        """
        return self._step(self._feeds(inputs, targets))

    def _step(self, feeds: dict[str, np.ndarray]) -> float:
        # NaN and inf are checked for below, with a better message than numpy's warnings.
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            values = self._session.run(
                [self.loss_name, *self._grad_names], {**feeds, **self._params}
            )
        loss = float(np.asarray(values[0]).reshape(-1)[0])
        grads = dict(zip(self.trainable, values[1:]))
        self._check_finite(loss, grads)
        self.optimizer.step(self._params, grads)
        self.steps += 1
        return loss

    def _check_finite(self, loss: float, grads: Mapping[str, np.ndarray]) -> None:
        bad = next((n for n in self.trainable if not np.isfinite(grads[n]).all()), None)
        if bad is None and math.isfinite(loss):
            return
        step = self.steps + 1
        if bad is not None:
            raise NonFiniteLossError(
                f"step {step}: the loss is {loss} and the gradient of parameter '{bad}' is not "
                "finite (the first such parameter); no parameter was updated. Check the batch "
                "for NaN/inf or out-of-domain values (log or sqrt of negatives), or lower the "
                "learning rate"
            )
        raise NonFiniteLossError(
            f"step {step}: the loss itself is {loss} while every gradient is finite; no "
            "parameter was updated. Check the batch and the targets for NaN/inf or values "
            "outside the loss's domain"
        )

    def fit(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        targets=None,
        epochs: int = 1,
        batch_size: int = 32,
        val_split: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
        progress: bool | None = None,
        validation_data: tuple | None = None,
        callback: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """Train for whole epochs over the data.

        Args:
            inputs: one array (single-input models) or arrays by input name.
            targets: the targets (for an appended loss), or None.
            epochs: passes over the training data.
            batch_size: samples per step (the last batch of an epoch may be smaller).
            val_split: the share of samples held out for validation (drawn with `seed`).
            shuffle: visit the training samples in a new random order each epoch.
            seed: seeds the validation split and the shuffling.
            progress: show a progress bar; None shows one when stderr is a terminal.
            validation_data: (inputs, targets) to score after each epoch instead of a split.
            callback: called with each epoch's record as soon as it is complete.

        Returns:
            One dict per epoch: epoch, loss (mean over the epoch's batches, weighted by
            their size), val_loss and val_accuracy (None when not applicable), seconds.
        """
        rng = np.random.default_rng(seed)
        feeds = self._feeds(inputs, targets)
        if validation_data is not None:
            if val_split:
                raise DataError("give either val_split or validation_data, not both")
            train, val = feeds, self._feeds(*validation_data)
        else:
            train, val = self._split_feeds(feeds, val_split, rng)
        show = sys.stderr.isatty() if progress is None else bool(progress)
        history = []
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            total, seen = 0.0, 0
            batches = self._batches(train, batch_size, shuffle, rng)
            bar = None
            if show:
                from tqdm.auto import tqdm

                n = datalib.num_batches(datalib.num_samples(train), batch_size)
                bar = tqdm(
                    batches, total=n, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False
                )
            try:
                for batch in bar if bar is not None else batches:
                    n = datalib.num_samples(batch)
                    total += self._step(batch) * n
                    seen += n
                    if bar is not None:
                        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
            finally:
                if bar is not None:
                    bar.close()
            record = {
                "epoch": epoch,
                "loss": total / max(seen, 1),
                "val_loss": None,
                "val_accuracy": None,
            }
            if val is not None:
                metrics = self._evaluate(val, batch_size)
                record["val_loss"] = metrics["loss"]
                record["val_accuracy"] = metrics.get("accuracy")
            record["seconds"] = time.perf_counter() - start
            logger.info(
                "epoch %d/%d: loss %.4f%s%s (%.1fs)",
                epoch,
                epochs,
                record["loss"],
                "" if record["val_loss"] is None else f", val_loss {record['val_loss']:.4f}",
                ""
                if record["val_accuracy"] is None
                else f", val_accuracy {record['val_accuracy']:.4f}",
                record["seconds"],
            )
            history.append(record)
            if callback is not None:
                callback(record)
        return history

    def _batches(self, feeds, batch_size, shuffle, rng):
        """The batches of `feeds` as feed dicts (targets included under their input name)."""
        inputs, targets = self._unzip(feeds)
        for batch, target in datalib.batches(inputs, targets, batch_size, shuffle, rng):
            yield batch if self.target_name is None else {**batch, self.target_name: target}

    # Evaluation.

    def evaluate(self, inputs, targets=None, batch_size: int = 256) -> dict:
        """The mean loss over the data (and, for cross_entropy and nll, the accuracy).

        Args:
            inputs: one array (single-input models) or arrays by input name.
            targets: the targets (for an appended loss), or None.
            batch_size: samples per forward run.

        Returns:
            {"loss": float} plus "accuracy" for classification losses.
        """
        return self._evaluate(self._feeds(inputs, targets), batch_size)

    def _evaluate(self, feeds: dict[str, np.ndarray], batch_size: int) -> dict:
        classify = self.loss_kind in CLASSIFICATION_LOSSES
        names = [self.loss_name, self.output] if classify else [self.loss_name]
        inputs, targets = self._unzip(feeds)
        total, seen, correct, counted = 0.0, 0, 0, 0
        for batch, target in datalib.batches(inputs, targets, batch_size):
            if self.target_name is not None:
                batch = {**batch, self.target_name: target}
            values = self._session.run(names, {**batch, **self._params})
            n = datalib.num_samples(batch)
            total += float(np.asarray(values[0]).reshape(-1)[0]) * n
            seen += n
            if classify:
                predicted = np.argmax(values[1], axis=1)
                correct += int(np.sum(predicted == target))
                counted += target.size
        metrics = {"loss": total / max(seen, 1)}
        if classify:
            metrics["accuracy"] = correct / max(counted, 1)
        return metrics

    def predict(self, inputs: np.ndarray | Mapping[str, np.ndarray], batch_size: int = 256):
        """The model's output for `inputs`, computed with the current parameters.

        Raises:
            GradientError: the model has no output besides the loss to return.
        """
        if self.output is None:
            raise GradientError(
                "the model has no single output besides the loss: name it with output= when "
                "creating the Trainer"
            )
        if self._predict_session is None:
            self._predict_session = Session(self.forward_model, backend=self.backend)
        feeds = self._feeds(inputs, None, with_targets=False)
        results = [
            self._predict_session.run([self.output], {**batch, **self._params})[0]
            for batch, _ in datalib.batches(feeds, None, batch_size)
        ]
        return np.concatenate(results, axis=0)

    # Export.

    def save(self, path: str | os.PathLike) -> None:
        """Write the original model with the trained parameters (see `onnxgrad.export`)."""
        save_model(self._source, self._params, path)

    # Feeds.

    def _feeds(self, inputs, targets, with_targets: bool = True) -> dict[str, np.ndarray]:
        """Inputs (and targets) as feeds by name, cast to the types the model declares."""
        names = list(self._input_types)
        if self.target_name is None and isinstance(targets, Mapping):
            rest = [n for n in names if n not in targets]
            inputs = {**datalib.as_inputs(inputs, rest), **targets}
            targets = None
        feeds = datalib.as_inputs(inputs, names)
        for name, value in feeds.items():
            if name in self._input_types:
                feeds[name] = _conform(name, value, self._input_types[name])
        if not with_targets:
            return feeds
        if self.target_name is None:
            if targets is not None:
                raise DataError(
                    f"the loss '{self.loss_name}' is an output of the model: its targets are "
                    "ordinary inputs; pass them in the inputs dict (or as a dict in targets=)"
                )
            return feeds
        if targets is None:
            raise DataError(
                f"the {self.loss_kind} loss needs targets: pass them as targets= (or under "
                f"'{self.target_name}' in an .npz file)"
            )
        feeds[self.target_name] = self._conform_target(np.asarray(targets))
        datalib.num_samples(feeds)
        return feeds

    def _conform_target(self, value: np.ndarray) -> np.ndarray:
        declared = self._target_type
        if declared.HasField("shape"):
            rank = len(declared.shape.dim)
            last = declared.shape.dim[-1] if rank else None
            if value.ndim == rank - 1 and last is not None and last.dim_value == 1:
                value = value[..., None]  # [N] targets for an [N, 1] output
            elif value.ndim == rank + 1 and value.shape[-1] == 1:
                value = value[..., 0]  # [N, 1] class indices for [N] targets
        return _conform(
            self.target_name, value, helper.tensor_dtype_to_np_dtype(declared.elem_type)
        )

    def _unzip(self, feeds: dict) -> tuple[dict, np.ndarray | None]:
        if self.target_name is None:
            return feeds, None
        inputs = {k: v for k, v in feeds.items() if k != self.target_name}
        return inputs, feeds[self.target_name]

    def _split_feeds(self, feeds, val_split, rng):
        if val_split <= 0.0:
            return feeds, None
        (train_in, train_t), (val_in, val_t) = datalib.split(*self._unzip(feeds), val_split, rng)
        if self.target_name is not None:
            train_in[self.target_name] = train_t
            val_in[self.target_name] = val_t
        return train_in, val_in

    def __repr__(self) -> str:
        return (
            f"Trainer(loss={self.loss_kind or self.loss_name!r}, {len(self.trainable)} "
            f"parameter tensor(s), optimizer={self.optimizer!r}, steps={self.steps})"
        )


def _keep(model):
    """The source as the user gave it: an absolute path, the bytes, or a private proto copy."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model).resolve()
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    return model


def _select(model: onnx.ModelProto, trainable: Trainable) -> list[str]:
    """The names of the parameters to train, in graph order."""
    candidates = trainable_parameters(model)
    if trainable is None:
        names = candidates
    elif callable(trainable):
        names = [n for n in candidates if trainable(n)]
    else:
        if isinstance(trainable, str):
            trainable = [trainable]
        floats = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
        bad = [n for n in trainable if n not in floats]
        if bad:
            raise GradientError(
                f"cannot train {', '.join(repr(n) for n in bad)}: not a floating-point "
                f"initializer of the model; its trainable parameters are: "
                f"{', '.join(candidates) or '(none)'}"
            )
        order = {t.name: i for i, t in enumerate(model.graph.initializer)}
        names = sorted(dict.fromkeys(trainable), key=order.__getitem__)
    if not names:
        raise GradientError(
            "no parameter is selected for training: the model has "
            f"{len(candidates)} trainable parameter(s) ({', '.join(candidates) or 'none'}); "
            "check trainable="
        )
    return names


def _other_output(outputs: list[str], loss: str, output: str | None) -> str | None:
    if output is not None:
        if output not in outputs:
            raise GradientError(
                f"'{output}' is not an output of the model; its outputs are: {', '.join(outputs)}"
            )
        return output
    others = [o for o in outputs if o != loss]
    return others[0] if len(others) == 1 else None


def _check_scalar(model: onnx.ModelProto, loss: str) -> None:
    vi = next(o for o in model.graph.output if o.name == loss)
    tt = vi.type.tensor_type
    if tt.elem_type and tt.elem_type not in FLOAT_TYPES:
        raise GradientError(f"loss output '{loss}' is not floating-point: it cannot be trained on")
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None or d != 1 for d in dims):
            raise GradientError(
                f"loss output '{loss}' has shape {dims}, not a scalar: reduce it to one value "
                "(ReduceMean) or use one of the built-in losses"
            )


def _input_types(model: onnx.ModelProto) -> dict[str, np.dtype | None]:
    out = {}
    for vi in graph_inputs(model):
        elem = vi.type.tensor_type.elem_type
        out[vi.name] = np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None
    return out


def _conform(name: str, value: np.ndarray, want) -> np.ndarray:
    """`value` in dtype `want` when the cast is lossless in kind (float↔float, int↔int, ...)."""
    value = np.asarray(value)
    if want is None or value.dtype == want:
        return value
    want = np.dtype(want)
    if want.kind == "f" and value.dtype.kind in "fiub":
        return value.astype(want)
    if want.kind in "iu" and value.dtype.kind in "iub":
        return value.astype(want)
    if want.kind in "iu" and value.dtype.kind == "f" and np.all(np.mod(value, 1) == 0):
        return value.astype(want)  # integral floats used as class labels
    raise DataError(
        f"'{name}' holds {value.dtype} values, but the model wants {want}: convert them first"
    )
