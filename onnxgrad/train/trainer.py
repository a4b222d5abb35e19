"""The training loop: a model, a loss, an optimizer, and parameters kept as numpy arrays.

A `Trainer` builds everything once: the loss is appended to the model, BatchNormalization
and Dropout are put in the requested modes (`onnxgrad.train.modes`), the gradient model is
built for the trainable parameters, and one `Session` is compiled. Each step then feeds the
batch and the current parameters by name (feeds override initializers), reads the loss and
the gradients, and lets the optimizer update the parameters in place. Nothing is
re-serialized between steps.

Around the optimizer update, in this order: gradients of `accumulate` batches are averaged
(weighted by batch size, so that for a mean loss N batches make one step over their union);
clipped by value, then by global norm; the learning rate is set from the schedule; the
optimizer steps; the exponential moving average of the weights follows.

`fit` can write a checkpoint every N optimizer steps (parameters, optimizer state, step,
epoch, position in the epoch's data order, random state, the epochs' records) and resume
from it, continuing bit for bit as if never stopped.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
import os
import signal
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
from onnxgrad.importer import FLOAT_TYPES, graph_inputs, load, tensor_array, trainable_parameters
from onnxgrad.runtime.plan import keep_freed_memory
from onnxgrad.runtime.session import Session
from onnxgrad.train import data as datalib
from onnxgrad.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from onnxgrad.train.data import DataError
from onnxgrad.train.losses import CLASSIFICATION_LOSSES, LOSSES, append_loss, resolve_output
from onnxgrad.train.modes import set_modes
from onnxgrad.train.optim import Adam, Optimizer, clip_grad_norm, clip_grad_value
from onnxgrad.train.schedules import Schedule

logger = logging.getLogger(__name__)

Trainable = Sequence[str] | Callable[[str], bool] | None

KILL_AFTER_CHECKPOINT = "ONNXGRAD_TEST_KILL_AFTER_CHECKPOINT"
"""Crash-test hook: with this environment variable set to k, the process kills itself with
SIGKILL right after writing its k-th checkpoint (tests use it to check `--resume`)."""


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
            initializer names and glob patterns (`fnmatch`: "encoder.*", "*.bias"), or a
            predicate on parameter names. Everything else is frozen: not differentiated.
        output: the output the loss reads (and `predict` returns) when there are several.
        backend: the Session backend, "numpy" or "onnxruntime".
        threads: onnxruntime's intra-op threads (None: its default); see `Session`.
        train_after: a node name: train only the parameters that are read by nodes
            downstream of that node alone (not by the node itself or anything before it).
            Combined with `trainable`, both must select a parameter.
        batchnorm: "frozen" (default: BatchNormalization normalizes with its stored
            statistics) or "train" (batch statistics; the running statistics are updated
            with the node's momentum and written back by `save`).
        dropout: switch Dropout on at its ratio while training (default off).
        schedule: a learning-rate schedule (`onnxgrad.train.schedules`), applied to the
            optimizer's learning rate at construction as the base rate.
        clip_norm: scale the gradients together so their global L2 norm is at most this.
        clip_value: clip each gradient element to [−clip_value, clip_value].
        accumulate: average the gradients of this many batches into one optimizer step.
        ema: the decay of an exponential moving average of the trained weights
            (e.g. 0.999), kept beside them; `save(path, ema=True)` writes it.

    Evaluation and `predict` always run the model in inference mode.

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
        threads: int | None = None,
        train_after: str | None = None,
        batchnorm: str = "frozen",
        dropout: bool = False,
        schedule: Schedule | None = None,
        clip_norm: float | None = None,
        clip_value: float | None = None,
        accumulate: int = 1,
        ema: float | None = None,
    ):
        _check_controls(clip_norm, clip_value, accumulate, ema)

        # 1. The original, to write back into; the normalized forward model to work on.
        self._source = _keep(model)
        self.forward_model = load(model)
        self.backend = backend
        self.threads = threads
        outputs = [o.name for o in self.forward_model.graph.output]

        # 2. The loss: appended to an output, or one the model already computes.
        if loss in LOSSES:
            self.loss_kind: str | None = loss
            self.output: str | None = resolve_output(self.forward_model, output)
            loss_model, self.loss_name = append_loss(self.forward_model, loss, self.output)
            self.target_name: str | None = "target"
        elif loss in outputs:
            self.loss_kind = None
            self.loss_name = loss
            self.target_name = None
            self.output = _other_output(outputs, loss, output)
            _check_scalar(self.forward_model, loss)
            loss_model = self.forward_model
        else:
            raise GradientError(
                f"unknown loss '{loss}': give one of {', '.join(LOSSES)}, or the name of a "
                f"scalar output of the model ({', '.join(outputs)})"
            )

        # 3. BatchNormalization and Dropout in the requested modes; evaluation in inference.
        train_model, self.modes = set_modes(loss_model, batchnorm, dropout)
        self._eval_model = None if not self.modes.changed else set_modes(loss_model)[0]
        self.batchnorm = batchnorm
        self.dropout = bool(dropout)

        # 4. What to train; the gradient model and its session, built once.
        self.trainable = _select(self.forward_model, trainable, train_after)
        self.training_graph = gradient_model(train_model, wrt=self.trainable, loss=self.loss_name)
        self._grad_names = [f"{name}{GRAD_SUFFIX}" for name in self.trainable]
        self._session = Session(self.training_graph, backend=backend, threads=threads)
        if backend == "numpy":
            # Every step allocates and frees the same arrays: let malloc keep them for reuse
            # (process-wide; ONNXGRAD_MALLOC=default opts out).
            keep_freed_memory()
        self._eval_session: Session | None = None
        self._predict_session: Session | None = None

        # 5. The parameters (and BatchNormalization running statistics, when they are
        #    updated): writable arrays owned by the trainer, fed by name each step.
        inits = {t.name: t for t in self.forward_model.graph.initializer}
        self._params = {name: tensor_array(inits[name]).copy() for name in self.trainable}
        self._buffers = {name: tensor_array(inits[name]).copy() for name in self.modes.running}
        self._buffer_outputs = [self.modes.running[name] for name in self._buffers]
        self._input_types = _input_types(self.forward_model)
        self._fixed_first = _fixed_first_dims(self.forward_model)
        self._target_type = None
        if self.target_name is not None:
            self._target_type = next(
                i.type.tensor_type
                for i in self.training_graph.graph.input
                if i.name == self.target_name
            )

        # 6. The update and what surrounds it.
        self.optimizer = optimizer if optimizer is not None else Adam(1e-3)
        self.base_lr = self.optimizer.lr
        self.schedule = schedule
        self.clip_norm = clip_norm
        self.clip_value = clip_value
        self.accumulate = int(accumulate)
        self.ema_decay = ema
        self._ema = None if ema is None else {k: v.copy() for k, v in self._params.items()}
        self._pending: dict[str, np.ndarray] = {}
        self._pending_samples = 0
        self._pending_batches = 0
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
        return _read_only(self._params)

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        """BatchNormalization running statistics updated by training (batchnorm="train"),
        by initializer name, as read-only views."""
        return _read_only(self._buffers)

    @property
    def ema_parameters(self) -> dict[str, np.ndarray] | None:
        """The exponential moving average of the parameters (None without `ema`)."""
        return None if self._ema is None else _read_only(self._ema)

    @property
    def training_model(self) -> onnx.ModelProto:
        """The training graph (forward, loss, gradients) with the current parameter values.

        The values are copied into the proto, which cannot pass 2 GiB: for a large model
        use `onnxgrad.export_training_model(trainer, path)`, which streams them to a file.
        """
        model = onnx.ModelProto()
        model.CopyFrom(self.training_graph)
        values = {**self._params, **self._buffers}
        for tensor in model.graph.initializer:
            if tensor.name in values:
                tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
        return model

    def state_dict(self) -> dict:
        """A checkpoint: copies of the parameters, the optimizer's state, the step count, the
        updated running statistics, the moving average, the base learning rate and the
        gradients accumulated towards the next step."""
        return {
            "parameters": {k: v.copy() for k, v in self._params.items()},
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
            "base_lr": self.base_lr,
            "buffers": {k: v.copy() for k, v in self._buffers.items()},
            "ema": None if self._ema is None else {k: v.copy() for k, v in self._ema.items()},
            "pending": {
                "grads": {k: v.copy() for k, v in self._pending.items()},
                "samples": self._pending_samples,
                "batches": self._pending_batches,
            },
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from `state_dict()`: values are copied into the trainer's own arrays.

        Raises:
            GradientError: the checkpoint's parameters differ in names, shapes or dtypes.
        """
        params = state["parameters"]
        if set(params) != set(self._params):
            raise GradientError(
                f"the checkpoint holds parameters {sorted(params)}, but this trainer trains "
                f"{sorted(self._params)}"
            )
        buffers = state.get("buffers") or {}
        if buffers and set(buffers) != set(self._buffers):
            raise GradientError(
                f"the checkpoint holds running statistics {sorted(buffers)}, but this trainer "
                f"updates {sorted(self._buffers)} (check batchnorm=)"
            )
        for name, value in {**params, **buffers}.items():
            own = self._params.get(name, self._buffers.get(name))
            if value.shape != own.shape or value.dtype != own.dtype:
                raise GradientError(
                    f"checkpoint tensor '{name}' is {value.dtype}{list(value.shape)}, the "
                    f"model's is {own.dtype}{list(own.shape)}"
                )
        for name, value in params.items():
            np.copyto(self._params[name], value)
        for name, value in buffers.items():
            np.copyto(self._buffers[name], value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.base_lr = float(state.get("base_lr", self.optimizer.lr))
        if self._ema is not None:
            saved = state.get("ema")
            source = saved if saved else self._params
            self._ema = {k: np.array(v, copy=True) for k, v in source.items()}
        pending = state.get("pending") or {}
        self._pending = {k: np.array(v, copy=True) for k, v in pending.get("grads", {}).items()}
        self._pending_samples = int(pending.get("samples", 0))
        self._pending_batches = int(pending.get("batches", 0))

    # Training.

    def step(self, inputs: np.ndarray | Mapping[str, np.ndarray], targets=None) -> float:
        """One optimizer step on one batch (with `accumulate` N: one N-th of a step; the
        update happens on every N-th call).

        Args:
            inputs: one array (single-input models) or arrays by input name.
            targets: the batch's targets (for an appended loss), or None.

        Returns:
            The batch's loss, before the update.

        Raises:
            NonFiniteLossError: the loss or a gradient is NaN or infinite (nothing updated).
        """
        return self._step(self._feeds(inputs, targets))

    def _step(self, feeds: dict[str, np.ndarray], scores: list | None = None) -> float:
        """Forward and backward on one batch, then the update when it is due.

        `scores` (a two-item list) accumulates [correct, counted] for classification.
        """
        names = [self.loss_name, *self._grad_names, *self._buffer_outputs]
        track = scores is not None and self.loss_kind in CLASSIFICATION_LOSSES
        if track:
            names.append(self.output)
        # NaN and inf are checked for below, with a better message than numpy's warnings.
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            values = self._session.run(names, {**feeds, **self._params, **self._buffers})
        loss = float(np.asarray(values[0]).reshape(-1)[0])
        k = len(self.trainable)
        grads = dict(zip(self.trainable, values[1 : 1 + k]))
        self._check_finite(loss, grads)

        # 1. Running statistics follow every forward batch, as in PyTorch.
        for name, value in zip(self._buffers, values[1 + k : 1 + k + len(self._buffers)]):
            np.copyto(self._buffers[name], value)
        if track:
            target = feeds[self.target_name]
            scores[0] += int(np.sum(np.argmax(values[-1], axis=1) == target))
            scores[1] += int(target.size)

        # 2. The update, now or after `accumulate` batches.
        if self.accumulate == 1:
            self._apply(grads)
        else:
            n = self._samples(feeds)
            for name, grad in grads.items():
                weighted = np.asarray(grad, dtype=np.float64) * float(n)
                if name in self._pending:
                    self._pending[name] += weighted
                else:
                    self._pending[name] = weighted
            self._pending_samples += n
            self._pending_batches += 1
            if self._pending_batches == self.accumulate:
                self.flush()
        return loss

    def flush(self) -> bool:
        """Apply the gradients accumulated so far as one step (`fit` calls it at the end of
        each epoch, so no batch is lost when the epoch is not a multiple of `accumulate`).

        Returns:
            Whether a step was made.
        """
        if not self._pending_batches:
            return False
        total = float(self._pending_samples)
        grads = {
            name: (acc / total).astype(self._params[name].dtype)
            for name, acc in self._pending.items()
        }
        self._pending, self._pending_samples, self._pending_batches = {}, 0, 0
        self._apply(grads)
        return True

    def _apply(self, grads: dict[str, np.ndarray]) -> None:
        """Clip, schedule, update, average: one optimizer step."""
        if self.clip_value is not None:
            grads = clip_grad_value(grads, self.clip_value)
        if self.clip_norm is not None:
            grads, _ = clip_grad_norm(grads, self.clip_norm)
        if self.schedule is not None:
            self.optimizer.lr = float(self.schedule(self.steps, self.base_lr))
        self.optimizer.step(self._params, grads)
        self.steps += 1
        if self._ema is not None:
            # ema ← d·ema + (1 − d)·p, written as ema += (1 − d)·(p − ema).
            rate = 1.0 - self.ema_decay
            for name, value in self._params.items():
                average = self._ema[name]
                average += rate * (value - average)

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
        *,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        log: str | os.PathLike | None = None,
    ) -> list[dict]:
        """Train for whole epochs over the data.

        Args:
            inputs: one array (single-input models) or arrays by input name.
            targets: the targets (for an appended loss), or None.
            epochs: passes over the training data (in all, counting those done before a
                resume).
            batch_size: samples per step (the last batch of an epoch may be smaller).
            val_split: the share of samples held out for validation (drawn with `seed`).
            shuffle: visit the training samples in a new random order each epoch.
            seed: seeds the validation split and the shuffling.
            progress: show a progress bar; None shows one when stderr is a terminal.
            validation_data: (inputs, targets) to score after each epoch instead of a split.
            callback: called with each epoch's record as soon as it is complete.
            checkpoint: the checkpoint file; written at the end of every epoch, and every
                `checkpoint_every` optimizer steps when that is > 0.
            checkpoint_every: optimizer steps between checkpoints (0: at epoch ends only).
            resume: continue from `checkpoint` when the file exists (bit for bit, given the
                same data, seed and batch size); start afresh when it does not.
            log: a .csv or .jsonl file that receives every epoch's record (rewritten whole
                after each epoch).

        Returns:
            One dict per epoch (those before a resume included): epoch, loss (mean over the
            epoch's batches, weighted by their size), accuracy (on the training batches, for
            classification; else None), val_loss and val_accuracy (None when not
            applicable), lr, steps (optimizer steps so far), seconds.

        Raises:
            NonFiniteLossError: a NaN or infinite loss or gradient; the checkpoint file
                keeps the last good state.
            CheckpointError: the checkpoint does not fit this run.
        """
        rng = np.random.default_rng(seed)
        feeds = self._feeds(inputs, targets)
        if validation_data is not None:
            if val_split:
                raise DataError("give either val_split or validation_data, not both")
            train, val = feeds, self._feeds(*validation_data)
        else:
            train, val = self._split_feeds(feeds, val_split, rng)
        if checkpoint is None and (checkpoint_every or resume):
            raise DataError("checkpoint_every and resume need a checkpoint file (checkpoint=)")
        if checkpoint is not None and self.dropout:
            # TODO: the executor's Dropout kernel draws its masks from its own unseeded
            # generator, which a checkpoint cannot hold; resuming needs a session-level one.
            logger.warning(
                "Dropout is on: a run resumed from '%s' continues from the same state, but "
                "draws other dropout masks than the run it replaces (not bit for bit)",
                checkpoint,
            )
        n_train = datalib.num_samples(train)
        n_batches = datalib.num_batches(n_train, batch_size)
        setup = {"batch_size": batch_size, "seed": seed, "samples": n_train, "shuffle": shuffle}

        # 1. Where to start: from the beginning, or where the checkpoint left off.
        history: list[dict] = []
        first_epoch, skip, sums = 0, 0, (0.0, 0, 0, 0)
        if resume and Path(checkpoint).is_file():
            where = self._resume(checkpoint, setup)
            rng.bit_generator.state = where["rng"]
            history = list(where["history"])
            first_epoch, skip = int(where["epoch"]), int(where["batch"])
            sums = tuple(where["sums"])
            logger.info(
                "resumed from '%s' at step %d (epoch %d, batch %d)",
                checkpoint,
                self.steps,
                first_epoch + 1,
                skip,
            )

        show = sys.stderr.isatty() if progress is None else bool(progress)
        written = [0]
        for epoch in range(first_epoch + 1, epochs + 1):
            start = time.perf_counter()
            epoch_rng = rng.bit_generator.state
            total, seen, correct, counted = sums
            scores = [correct, counted]
            batches = itertools.islice(self._batches(train, batch_size, shuffle, rng), skip, None)
            bar = None
            if show:
                from tqdm.auto import tqdm

                bar = tqdm(
                    batches,
                    total=n_batches - skip,
                    desc=f"epoch {epoch}/{epochs}",
                    unit="batch",
                    leave=False,
                )
            try:
                for index, batch in enumerate(bar if bar is not None else batches, start=skip + 1):
                    n = datalib.num_samples(batch)
                    try:
                        total += self._step(batch, scores) * n
                    except NonFiniteLossError as err:
                        if checkpoint is None:
                            raise
                        raise _with_checkpoint(err, checkpoint) from err
                    seen += n
                    if bar is not None:
                        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
                    due = checkpoint_every and self.steps % checkpoint_every == 0
                    if checkpoint is not None and due and not self._pending_batches:
                        where = (epoch - 1, index, epoch_rng, (total, seen, *scores))
                        self._write_checkpoint(checkpoint, setup, where, history, written)
            finally:
                if bar is not None:
                    bar.close()
            self.flush()
            skip, sums = 0, (0.0, 0, 0, 0)

            # 2. The epoch's record, the log, the checkpoint at the epoch's end.
            classify = self.loss_kind in CLASSIFICATION_LOSSES
            record = {
                "epoch": epoch,
                "loss": total / max(seen, 1),
                "accuracy": scores[0] / max(scores[1], 1) if classify and scores[1] else None,
                "val_loss": None,
                "val_accuracy": None,
            }
            if val is not None:
                metrics = self._evaluate(val, batch_size)
                record["val_loss"] = metrics["loss"]
                record["val_accuracy"] = metrics.get("accuracy")
            record["lr"] = self.optimizer.lr
            record["steps"] = self.steps
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
            if log is not None:
                from onnxgrad.train.metrics import write_log

                write_log(log, history)
            if checkpoint is not None:
                where = (epoch, 0, rng.bit_generator.state, (0.0, 0, 0, 0))
                self._write_checkpoint(checkpoint, setup, where, history, written)
            if callback is not None:
                callback(record)
        return history

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` to `path` atomically (see `onnxgrad.train.checkpoint`)."""
        save_checkpoint(path, self.state_dict())

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by `save_checkpoint` or by `fit`.

        Raises:
            CheckpointError: the file cannot be read.
            GradientError: its parameters do not fit this trainer.
        """
        self.load_state_dict(load_checkpoint(path))

    def _write_checkpoint(self, path, setup, where, history, written) -> None:
        epoch, batch, rng_state, sums = where
        state = self.state_dict()
        state["fit"] = {
            "setup": setup,
            "epoch": epoch,
            "batch": batch,
            "rng": rng_state,
            "sums": list(sums),
            "history": history,
        }
        save_checkpoint(path, state)
        written[0] += 1
        logger.info("checkpoint '%s' at step %d", path, self.steps)
        kill_after = os.environ.get(KILL_AFTER_CHECKPOINT)
        if kill_after and written[0] >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    def _resume(self, path, setup: dict) -> dict:
        state = load_checkpoint(path)
        where = state.get("fit")
        if where is None:
            raise CheckpointError(
                f"'{path}' holds no position in the data (it was written by save_checkpoint, "
                "not by fit): load it with load_checkpoint and call fit without resume"
            )
        if where["setup"] != setup:
            raise CheckpointError(
                f"'{path}' was written by a run with {where['setup']}, but this run has {setup}: "
                "resume with the same data, seed and batch size, or start afresh"
            )
        self.load_state_dict(state)
        return where

    def _batches(self, feeds, batch_size, shuffle, rng):
        """The batches of `feeds` as feed dicts (targets included under their input name)."""
        inputs, targets = self._unzip(feeds)
        for batch, target in datalib.batches(inputs, targets, batch_size, shuffle, rng):
            yield batch if self.target_name is None else {**batch, self.target_name: target}

    # Evaluation.

    def evaluate(self, inputs, targets=None, batch_size: int = 256) -> dict:
        """The mean loss over the data (and, for cross_entropy and nll, the accuracy), with
        the model in inference mode.

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
        if self._eval_model is None:
            session = self._session  # the training graph is already in inference mode
        else:
            if self._eval_session is None:
                self._eval_session = Session(
                    self._eval_model, backend=self.backend, threads=self.threads
                )
            session = self._eval_session
        inputs, targets = self._unzip(feeds)
        total, seen, correct, counted = 0.0, 0, 0, 0
        for batch, target in datalib.batches(inputs, targets, batch_size):
            if self.target_name is not None:
                batch = {**batch, self.target_name: target}
            values = session.run(names, {**batch, **self._params, **self._buffers})
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
        """The model's output for `inputs`, computed with the current parameters in
        inference mode.

        Raises:
            GradientError: the model has no output besides the loss to return.
        """
        if self.output is None:
            raise GradientError(
                "the model has no single output besides the loss: name it with output= when "
                "creating the Trainer"
            )
        if self._predict_session is None:
            model, _ = set_modes(self.forward_model)
            self._predict_session = Session(model, backend=self.backend, threads=self.threads)
        feeds = self._feeds(inputs, None, with_targets=False)
        results = [
            self._predict_session.run([self.output], {**batch, **self._params, **self._buffers})[0]
            for batch, _ in datalib.batches(feeds, None, batch_size)
        ]
        return np.concatenate(results, axis=0)

    # Export.

    def save(self, path: str | os.PathLike, *, ema: bool = False) -> None:
        """Write the original model with the trained parameters (see `onnxgrad.export`), and
        the updated BatchNormalization running statistics when batchnorm="train".

        Args:
            path: the model file to write.
            ema: write the moving average of the weights instead of the weights (needs
                `ema=` at construction).

        Raises:
            GradientError: ema=True on a trainer without a moving average.
        """
        weights = self._params
        if ema:
            if self._ema is None:
                raise GradientError(
                    "save(ema=True) needs a moving average: create the Trainer with ema=0.999 "
                    "(or another decay)"
                )
            weights = self._ema
        save_model(self._source, {**weights, **self._buffers}, path)

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
        self._samples(feeds)  # inputs and targets agree on the batch size
        return feeds

    def _samples(self, feeds: Mapping[str, np.ndarray]) -> int:
        """The batch size of a step's feeds; an input whose first dimension the model fixes
        (a recurrent state laid out [directions, batch, hidden]) is not batched."""
        return datalib.num_samples({k: v for k, v in feeds.items() if k not in self._fixed_first})

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


def _select(
    model: onnx.ModelProto, trainable: Trainable, train_after: str | None = None
) -> list[str]:
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
        chosen: list[str] = []
        bad = []
        for pattern in trainable:
            if pattern in floats:
                chosen.append(pattern)
            elif any(c in pattern for c in "*?["):
                hits = [c for c in candidates if fnmatch.fnmatchcase(c, pattern)]
                if not hits:
                    raise GradientError(
                        f"trainable pattern '{pattern}' matches no trainable parameter; they "
                        f"are: {', '.join(candidates) or '(none)'}"
                    )
                chosen.extend(hits)
            else:
                bad.append(pattern)
        if bad:
            raise GradientError(
                f"cannot train {', '.join(repr(n) for n in bad)}: not a floating-point "
                f"initializer of the model; its trainable parameters are: "
                f"{', '.join(candidates) or '(none)'}"
            )
        order = {t.name: i for i, t in enumerate(model.graph.initializer)}
        names = sorted(dict.fromkeys(chosen), key=order.__getitem__)
    if train_after is not None:
        after = set(parameters_after(model, train_after))
        names = [n for n in names if n in after]
    if not names:
        where = f" after node '{train_after}'" if train_after is not None else ""
        raise GradientError(
            f"no parameter is selected for training{where}: the model has "
            f"{len(candidates)} trainable parameter(s) ({', '.join(candidates) or 'none'}); "
            "check trainable= and train_after="
        )
    return names


def parameters_after(model: onnx.ModelProto, node_name: str) -> list[str]:
    """The trainable parameters read only by nodes downstream of node `node_name`.

    Downstream means reached from the node's outputs; the node itself is not downstream,
    so its own weights stay frozen ("fine-tune everything after the backbone's last layer").

    Raises:
        GradientError: no node has that name.
    """
    nodes = list(model.graph.node)
    index = next((i for i, n in enumerate(nodes) if n.name == node_name), None)
    if index is None:
        names = [n.name for n in nodes]
        close = [n for n in names if node_name.lower() in n.lower()][:8] or names[:8]
        raise GradientError(
            f"train_after: the model has no node named '{node_name}' (of {len(names)} nodes; "
            f"for example {', '.join(close)}); `onnxgrad info` lists the graph"
        )
    reached = {o for o in nodes[index].output if o}
    downstream: set[int] = set()
    # Nodes are topologically sorted (the ONNX spec requires it), so one pass suffices.
    for i, node in enumerate(nodes):
        if i != index and any(name in reached for name in node.input if name):
            downstream.add(i)
            reached.update(o for o in node.output if o)
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, set()).add(i)
    return [p for p in trainable_parameters(model) if readers.get(p, set()) <= downstream]


def _read_only(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    views = {}
    for name, value in arrays.items():
        view = value.view()
        view.flags.writeable = False
        views[name] = view
    return views


def _check_controls(clip_norm, clip_value, accumulate, ema) -> None:
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if clip_value is not None and not clip_value > 0:
        raise ValueError(f"clip_value must be > 0, got {clip_value}")
    if int(accumulate) != accumulate or accumulate < 1:
        raise ValueError(f"accumulate must be a whole number >= 1, got {accumulate}")
    if ema is not None and not 0.0 <= ema < 1.0:
        raise ValueError(f"ema (the decay) must lie in [0, 1), got {ema}")


def _with_checkpoint(err: NonFiniteLossError, checkpoint) -> NonFiniteLossError:
    """The error, told where the last good state is."""
    if Path(checkpoint).is_file():
        where = f"the last good checkpoint is '{checkpoint}': fix the cause, then resume from it"
    else:
        where = f"no checkpoint had been written to '{checkpoint}' yet"
    return NonFiniteLossError(f"{err}. Training stopped; {where}")


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


def _fixed_first_dims(model: onnx.ModelProto) -> set[str]:
    """The graph inputs whose first dimension is a fixed number, not a batch size."""
    out = set()
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and tt.shape.dim and tt.shape.dim[0].HasField("dim_value"):
            out.add(vi.name)
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
