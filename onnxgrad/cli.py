"""The command line: `onnxgrad train | grad | check | info | ops | export-weights | run`.

This is the only module of onnxgrad that prints. Every `OnnxgradError` (and every file
system error) ends the command with one line, ``onnxgrad: error: ...``, on stderr and exit
status 2; ``--debug`` shows the traceback instead and turns on debug logging.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxgrad.errors import OnnxgradError, UsageError

logger = logging.getLogger(__name__)

PROG = "onnxgrad"
LOSS_KINDS = ("cross_entropy", "mse", "l1", "bce_with_logits", "nll")
OPTIMIZERS = ("sgd", "adam", "adamw")
BACKENDS = ("numpy", "onnxruntime")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).

    Returns:
        The exit status: 0 on success, 2 on a user error, 130 when interrupted.
    """
    parser = _build_parser()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        return _fail(err, debug)
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0

    restore = _configure_logging(args.debug, args.verbose)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`onnxgrad info m.onnx | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OnnxgradError, OSError) as err:
        return _fail(err, args.debug)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


# The parser.


def _build_parser() -> argparse.ArgumentParser:
    from onnxgrad import __version__

    parser = _Parser(
        prog=PROG,
        description="Fine-tune ONNX models, and build gradient graphs any ONNX runtime can run.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # Common options may come before or after the subcommand; SUPPRESS keeps a subcommand
    # from resetting what was given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logging",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show info logging (training progress, graph building)",
    )
    parser.set_defaults(debug=False, verbose=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="show info logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # train
    p = commands.add_parser(
        "train",
        parents=[common],
        help="fine-tune a model on data from an .npz file",
        description="Fine-tune MODEL on DATA and write the tuned model. The held-out loss and "
        "accuracy (on --eval, else on a --val-split of DATA) are shown before and after.",
    )
    p.add_argument("model", metavar="MODEL", help="the .onnx model to fine-tune")
    p.add_argument(
        "--data",
        required=True,
        metavar="DATA.npz",
        help="training data: one array per model input, and 'target'",
    )
    p.add_argument(
        "-o",
        "--output-model",
        required=True,
        metavar="OUT.onnx",
        dest="out",
        help="where to write the tuned model",
    )
    p.add_argument(
        "--loss",
        default="cross_entropy",
        type=_choice("--loss", LOSS_KINDS),
        help=f"the loss: {', '.join(LOSS_KINDS)} (default: cross_entropy)",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="NAME",
        help="the model output the loss reads (default: the only output)",
    )
    p.add_argument(
        "--optimizer",
        default="adam",
        type=_choice("--optimizer", OPTIMIZERS),
        help="sgd, adam or adamw (default: adam)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float("--lr"),
        default=None,
        help="learning rate (default: 0.01 for sgd, 0.001 for adam and adamw)",
    )
    p.add_argument(
        "--momentum",
        type=_nonnegative_float("--momentum"),
        default=0.0,
        help="SGD momentum (default: 0)",
    )
    p.add_argument(
        "--weight-decay",
        type=_nonnegative_float("--weight-decay"),
        default=None,
        help="weight decay (default: 0, or 0.01 for adamw)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int("--epochs"),
        default=5,
        help="passes over the data (default: 5)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=32,
        help="samples per step (default: 32)",
    )
    p.add_argument(
        "--trainable",
        nargs="+",
        metavar="NAME_OR_GLOB",
        default=None,
        help="parameters to train, by name or glob (default: all trainable ones)",
    )
    p.add_argument(
        "--val-split",
        type=_fraction("--val-split"),
        default=None,
        help="share of DATA held out for evaluation when --eval is not given "
        "(default: 0.1; 0 to train on everything)",
    )
    p.add_argument(
        "--eval",
        default=None,
        metavar="DATA.npz",
        dest="eval_data",
        help="held-out data to evaluate before, during and after training",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the validation split and the shuffling (default: 0)",
    )
    p.add_argument(
        "--backend",
        default="numpy",
        type=_choice("--backend", BACKENDS),
        help="the executor: numpy or onnxruntime (default: numpy)",
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    _add_training_controls(p)
    p.set_defaults(run=_cmd_train)

    # grad
    p = commands.add_parser(
        "grad",
        parents=[common],
        help="write the training graph (forward and backward)",
        description="Write a model that computes the loss and its gradients, with standard "
        "ONNX ops only. --loss names a model output, or a loss kind to append first (it adds "
        "a 'target' input).",
    )
    p.add_argument("model", metavar="MODEL", help="the .onnx model")
    p.add_argument(
        "-o",
        "--output-model",
        required=True,
        metavar="TRAINING.onnx",
        dest="out",
        help="where to write the gradient model",
    )
    p.add_argument(
        "--loss",
        default=None,
        metavar="NAME",
        help=f"a model output, or one of {', '.join(LOSS_KINDS)} (default: the only output)",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="NAME",
        help="with a loss kind: the output it reads (default: the only output)",
    )
    p.add_argument(
        "--wrt",
        nargs="+",
        default=None,
        metavar="NAME_OR_GLOB",
        help="tensors to differentiate with respect to; globs match trainable "
        "parameters (default: every trainable parameter)",
    )
    _add_step_options(p)
    p.set_defaults(run=_cmd_grad)

    # export-weights
    p = commands.add_parser(
        "export-weights",
        parents=[common],
        help="write a model's weights to .safetensors or .npz",
        description="Write the floating-point initializers of MODEL under their ONNX names "
        "(for PyTorch exports, the state_dict keys). .safetensors needs the safetensors "
        "package (pip install onnxgrad[safetensors]).",
    )
    p.add_argument("model", metavar="MODEL", help="the .onnx model")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="WEIGHTS",
        dest="out",
        help="the file to write: .safetensors or .npz",
    )
    p.add_argument(
        "--trainable-only",
        action="store_true",
        help="only the trainable parameters (not BatchNormalization statistics or constants)",
    )
    p.set_defaults(run=_cmd_export_weights)

    # check
    p = commands.add_parser(
        "check",
        parents=[common],
        help="pre-flight report and float64 gradient check before training",
        description="Check MODEL before training: the gradient state and kernel of every node "
        "between the loss and the parameters, every problem at once, repairs for common "
        "export traps, and finite differences against the gradient of every parameter in "
        "float64. Exit status 0 when all passes, 1 when a problem is found or a gradient is "
        "off, 2 on a usage or load error.",
    )
    p.add_argument("model", metavar="MODEL", help="the .onnx model")
    p.add_argument(
        "--data",
        default=None,
        metavar="DATA.npz",
        help="input arrays by input name (default: random inputs)",
    )
    p.add_argument(
        "--loss",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the outputs the loss reads (default: every floating-point output)",
    )
    p.add_argument(
        "--wrt",
        nargs="+",
        default=None,
        metavar="NAME_OR_GLOB",
        help="parameters to check (default: every trainable parameter)",
    )
    p.add_argument(
        "--samples",
        type=_positive_int("--samples"),
        default=2,
        help="rows taken from --data, and the length of symbolic dimensions (default: 2)",
    )
    p.add_argument(
        "--directions",
        type=_positive_int("--directions"),
        default=3,
        help="random directions per parameter (default: 3)",
    )
    p.add_argument(
        "--eps",
        type=_positive_float("--eps"),
        default=1e-6,
        help="finite-difference step (default: 1e-6)",
    )
    p.add_argument(
        "--rtol",
        type=_positive_float("--rtol"),
        default=1e-5,
        help="relative tolerance (default: 1e-5)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--fix", action="store_true", help="apply the repairs (needs -o)")
    p.add_argument(
        "-o",
        "--output-model",
        default=None,
        metavar="OUT.onnx",
        dest="out",
        help="with --fix: where to write the repaired model",
    )
    p.set_defaults(run=_cmd_check)

    # info
    p = commands.add_parser(
        "info",
        parents=[common],
        help="show inputs, outputs, parameters, ops, missing rules",
        description="Describe MODEL: inputs, outputs, trainable parameters, weights held in "
        "Constant or ConstantOfShape nodes (which `check --fix` makes trainable), op types, "
        "and the ops on the path to the outputs that lack a gradient rule.",
    )
    p.add_argument("model", metavar="MODEL", help="the .onnx model")
    p.set_defaults(run=_cmd_info)

    # ops
    p = commands.add_parser(
        "ops",
        parents=[common],
        help="list every op type and its gradient state",
        description="Print the gradient registry: every ai.onnx op type with its state (rule, "
        "zero, non_differentiable, unsupported), the newest opset of its schema and whether "
        "the numpy executor has a kernel; then the count per state.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead")
    p.set_defaults(run=_cmd_ops)

    # run
    p = commands.add_parser(
        "run",
        parents=[common],
        help="run a model on data from an .npz file",
        description="Run MODEL on DATA; print the output shapes, and the accuracy when DATA "
        "holds a 'target' array.",
    )
    p.add_argument("model", metavar="MODEL", help="the .onnx model")
    p.add_argument(
        "--data",
        required=True,
        metavar="DATA.npz",
        help="one array per model input (and optionally 'target')",
    )
    p.add_argument(
        "-o",
        "--output-data",
        default=None,
        metavar="OUT.npz",
        dest="out",
        help="write the outputs here, one array per output name",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=256,
        help="samples per run (default: 256)",
    )
    p.add_argument(
        "--backend",
        default="numpy",
        type=_choice("--backend", BACKENDS),
        help="the executor: numpy or onnxruntime (default: numpy)",
    )
    p.set_defaults(run=_cmd_run)
    return parser


def _choice(option: str, choices: Sequence[str]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid {option} '{value}': choose one of {', '.join(choices)}"
            )
        return value

    return parse


def _number(option: str, kind: type, ok: Callable[[float], bool], what: str):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be {what}, got '{value}'") from None
        if not ok(number):
            raise argparse.ArgumentTypeError(f"{option} must be {what}, got {value}")
        return number

    return parse


def _positive_int(option: str):
    return _number(option, int, lambda v: v >= 1, "a whole number >= 1")


def _positive_float(option: str):
    return _number(option, float, lambda v: v > 0 and np.isfinite(v), "a number > 0")


def _nonnegative_float(option: str):
    return _number(option, float, lambda v: v >= 0 and np.isfinite(v), "a number >= 0")


def _fraction(option: str):
    return _number(option, float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


# train


def _cmd_train(args: argparse.Namespace) -> int:
    from onnxgrad.importer import graph_inputs, load, trainable_parameters
    from onnxgrad.train import data
    from onnxgrad.train.trainer import Trainer

    # 1. The model, the data, and what to evaluate on.
    _check_writable(args.out)
    _check_training_controls(args)
    model = load(args.model)
    input_names = [i.name for i in graph_inputs(model)]
    inputs, targets = _load_data(args.data, input_names)
    if args.eval_data is not None:
        if args.val_split:
            raise UsageError("give either --eval or --val-split, not both")
        held, held_targets = _load_data(args.eval_data, input_names)
        held_from = f"'{args.eval_data}'"
    else:
        fraction = 0.1 if args.val_split is None else args.val_split
        if fraction > 0:
            rng = np.random.default_rng(args.seed)
            (inputs, targets), (held, held_targets) = data.split(inputs, targets, fraction, rng)
            held_from = f"a {fraction:g} validation split of '{args.data}'"
        else:
            held, held_targets, held_from = None, None, ""

    # 2. The trainer.
    # The path, not the loaded proto: `save` writes into the original file's graph and opset.
    optimizer = _optimizer(args)
    trainable = None
    if args.trainable is not None:
        trainable = _expand(args.trainable, trainable_parameters(model), "--trainable")
    n_train = data.num_samples(inputs, targets)
    trainer = Trainer(
        args.model,
        loss=args.loss,
        optimizer=optimizer,
        trainable=trainable,
        output=args.output,
        backend=args.backend,
        **_training_controls(args, n_train),
    )
    print(f"model: {args.model}")
    print(
        f"training on {n_train} samples from '{args.data}': loss {args.loss}, {optimizer}, "
        f"{args.epochs} epoch(s) of batch size {args.batch_size}"
    )
    sizes = [int(np.prod(p.shape)) for p in trainer.parameters.values()]
    print(f"trainable parameters: {len(sizes)} tensor(s), {sum(sizes):,} element(s)")

    # 3. Held-out scores before, per epoch, and after.
    def evaluate() -> str:
        scores = trainer.evaluate(held, held_targets, batch_size=max(args.batch_size, 256))
        return _scores(scores)

    if held is not None:
        print(f"held-out: {data.num_samples(held, held_targets)} samples from {held_from}")
        print(f"before: {evaluate()}")

    def report(record: dict) -> None:
        line = f"epoch {record['epoch']}/{args.epochs}: train loss {record['loss']:.4f}"
        if record["val_loss"] is not None:
            scores = {"loss": record["val_loss"], "accuracy": record["val_accuracy"]}
            line += f", held-out {_scores(scores)}"
        print(f"{line} ({record['seconds']:.1f} s)", flush=True)

    history = trainer.fit(
        inputs,
        targets,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=True,
        seed=args.seed,
        progress=args.progress,
        validation_data=None if held is None else (held, held_targets),
        callback=report,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        log=args.log,
    )
    if held is not None:
        print(f"after: {evaluate()}")
    _write_plot(args, history)

    # 4. The tuned model.
    trainer.save(args.out, ema=args.ema is not None)
    print(f"wrote {args.out}")
    return 0


def _add_training_controls(p: argparse.ArgumentParser) -> None:
    """The fine-tuning controls of `train`: what trains, modes, schedule, clipping, ..."""
    p.add_argument(
        "--train-after",
        default=None,
        metavar="NODE",
        help="train only the parameters read by nodes downstream of NODE (with --trainable: "
        "both must select a parameter)",
    )
    p.add_argument(
        "--batchnorm",
        default="frozen",
        type=_choice("--batchnorm", ("frozen", "train")),
        help="frozen: BatchNormalization uses its stored statistics (default); train: batch "
        "statistics, running statistics updated and saved",
    )
    p.add_argument("--dropout", action="store_true", help="turn Dropout on at its ratio")
    p.add_argument(
        "--schedule",
        default="constant",
        type=_choice("--schedule", ("constant", "step", "cosine")),
        help="learning-rate schedule over the run: constant, step or cosine (default: constant)",
    )
    p.add_argument(
        "--warmup",
        type=_nonnegative_int("--warmup"),
        default=0,
        metavar="STEPS",
        help="optimizer steps of linear warm-up before the schedule (default: 0)",
    )
    p.add_argument(
        "--step-size",
        type=_positive_int("--step-size"),
        default=None,
        metavar="STEPS",
        help="--schedule step: steps between decays (default: a third of the run)",
    )
    p.add_argument(
        "--gamma",
        type=_positive_float("--gamma"),
        default=0.1,
        help="--schedule step: the decay factor (default: 0.1)",
    )
    p.add_argument(
        "--min-lr",
        type=_nonnegative_float("--min-lr"),
        default=0.0,
        help="--schedule cosine: the final learning rate (default: 0)",
    )
    p.add_argument(
        "--clip-norm",
        type=_positive_float("--clip-norm"),
        default=None,
        help="clip the gradients' global L2 norm to this",
    )
    p.add_argument(
        "--clip-value",
        type=_positive_float("--clip-value"),
        default=None,
        help="clip each gradient element to [-value, value]",
    )
    p.add_argument(
        "--accumulate",
        type=_positive_int("--accumulate"),
        default=1,
        metavar="N",
        help="average the gradients of N batches into one step (default: 1)",
    )
    p.add_argument(
        "--ema",
        type=_number("--ema", float, lambda v: 0 <= v < 1, "a decay in [0, 1)"),
        default=None,
        metavar="DECAY",
        help="keep a moving average of the weights (e.g. 0.999) and write it as the model",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="CKPT.npz",
        help="checkpoint file, written at each epoch's end (and every --checkpoint-every steps)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int("--checkpoint-every"),
        default=0,
        metavar="N",
        help="optimizer steps between checkpoints",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint when it exists (same data, seed and batch size)",
    )
    p.add_argument(
        "--log",
        default=None,
        metavar="FILE",
        help="per-epoch metrics to FILE: .csv or .jsonl",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="draw the loss curve into PNG (needs matplotlib: pip install onnxgrad[plot])",
    )


def _nonnegative_int(option: str):
    return _number(option, int, lambda v: v >= 0, "a whole number >= 0")


def _check_training_controls(args: argparse.Namespace) -> None:
    """Fail before training on options that cannot be honoured."""
    from onnxgrad.train.metrics import log_format, require_matplotlib

    if (args.resume or args.checkpoint_every) and args.checkpoint is None:
        raise UsageError("--resume and --checkpoint-every need --checkpoint PATH")
    for path in (args.checkpoint, args.log, args.plot):
        if path is not None:
            _check_writable(path)
    if args.log is not None:
        log_format(args.log)
    if args.plot is not None:
        require_matplotlib()


def _training_controls(args: argparse.Namespace, n_train: int) -> dict:
    """Trainer keyword arguments from the training controls."""
    from onnxgrad.train.data import num_batches
    from onnxgrad.train.schedules import make_schedule

    per_epoch = -(-num_batches(n_train, args.batch_size) // args.accumulate)
    schedule = make_schedule(
        args.schedule,
        per_epoch * args.epochs,
        warmup_steps=args.warmup,
        step_size=args.step_size,
        gamma=args.gamma,
        eta_min=args.min_lr,
    )
    return {
        "train_after": args.train_after,
        "batchnorm": args.batchnorm,
        "dropout": args.dropout,
        "schedule": schedule,
        "clip_norm": args.clip_norm,
        "clip_value": args.clip_value,
        "accumulate": args.accumulate,
        "ema": args.ema,
    }


def _write_plot(args: argparse.Namespace, history: list[dict]) -> None:
    if args.plot is None:
        return
    from onnxgrad.train.metrics import plot_history

    plot_history(history, args.plot)
    print(f"wrote {args.plot}")


def _optimizer(args: argparse.Namespace):
    from onnxgrad.train import optim

    try:
        if args.optimizer == "sgd":
            return optim.SGD(
                lr=args.lr or 0.01, momentum=args.momentum, weight_decay=args.weight_decay or 0.0
            )
        if args.momentum:
            raise UsageError(f"--momentum applies to sgd only, not {args.optimizer}")
        if args.optimizer == "adam":
            return optim.Adam(lr=args.lr or 1e-3, weight_decay=args.weight_decay or 0.0)
        decay = 0.01 if args.weight_decay is None else args.weight_decay
        return optim.AdamW(lr=args.lr or 1e-3, weight_decay=decay)
    except ValueError as err:
        raise UsageError(f"bad {args.optimizer} settings: {err}") from err


def _scores(scores: dict) -> str:
    text = f"loss {scores['loss']:.4f}"
    if scores.get("accuracy") is not None:
        text += f", accuracy {scores['accuracy']:.2%}"
    return text


# grad


def _cmd_grad(args: argparse.Namespace) -> int:
    from onnxgrad.export import export_training_model
    from onnxgrad.importer import graph_inputs, load, trainable_parameters
    from onnxgrad.train.losses import append_loss

    if args.optimizer is not None or args.training_info or args.opset is not None:
        return _cmd_grad_step(args)

    # 1. The loss: a model output, or a loss appended on one.
    _check_writable(args.out)
    model = load(args.model)
    loss = args.loss
    outputs = [o.name for o in model.graph.output]
    if loss is not None and loss not in outputs and loss not in LOSS_KINDS:
        raise UsageError(
            f"--loss '{loss}' is neither an output of the model ({', '.join(outputs)}) nor a "
            f"loss kind ({', '.join(LOSS_KINDS)})"
        )
    if loss in LOSS_KINDS and loss not in outputs:
        model, loss = append_loss(model, loss, output=args.output)
    elif args.output is not None:
        raise UsageError("--output goes with a loss kind for --loss (it names what the loss reads)")

    # 2. The gradient graph, written atomically (weights external above 2 GiB).
    wrt = None if args.wrt is None else _expand(args.wrt, trainable_parameters(model), "--wrt")
    export_training_model(model, args.out, loss=loss, wrt=wrt)

    # 3. What it takes and gives.
    grad = onnx.load_model(args.out, load_external_data=False)
    forward = len(model.graph.node)
    inputs = [i.name for i in graph_inputs(grad)]
    outputs = [o.name for o in grad.graph.output]
    backward = len(grad.graph.node) - forward
    print(f"wrote {args.out}: {forward} forward and {backward} backward nodes")
    print(f"inputs: {', '.join(inputs)}")
    print(f"outputs: {', '.join(outputs)}")
    return 0


def _add_step_options(p: argparse.ArgumentParser) -> None:
    """`grad` options that write the whole training step (onnxgrad.train.step)."""
    p.add_argument(
        "--optimizer",
        default=None,
        type=_choice("--optimizer", OPTIMIZERS),
        help="write the whole training step with this optimizer (sgd, adam, adamw): forward, "
        "loss, backward, update; see onnxgrad.train.step for its input and output names",
    )
    p.add_argument(
        "--lr",
        type=_nonnegative_float("--lr"),
        default=None,
        help="learning rate, the default of the step's 'lr' input (default: 0.01 for sgd, "
        "0.001 for adam and adamw)",
    )
    p.add_argument(
        "--momentum", type=_nonnegative_float("--momentum"), default=0.0, help="SGD momentum"
    )
    p.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    p.add_argument(
        "--weight-decay",
        type=_nonnegative_float("--weight-decay"),
        default=None,
        help="weight decay (default: 0, or 0.01 for adamw)",
    )
    p.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=None,
        metavar=("BETA1", "BETA2"),
        help="Adam's moment decay rates (default: 0.9 0.999)",
    )
    p.add_argument(
        "--eps", type=_nonnegative_float("--eps"), default=None, help="Adam's ε (default: 1e-8)"
    )
    p.add_argument(
        "--clip-norm",
        type=_positive_float("--clip-norm"),
        default=None,
        help="clip the gradients by their global L2 norm before the update",
    )
    p.add_argument(
        "--training-info",
        action="store_true",
        help="embed the step in a copy of the model as an ONNX TrainingInfoProto instead",
    )
    p.add_argument(
        "--opset",
        type=_positive_int("--opset"),
        default=None,
        help="write the graph at this default-domain opset (and its IR version)",
    )


def _cmd_grad_step(args: argparse.Namespace) -> int:
    """`grad` with --optimizer, --training-info or --opset."""
    from onnxgrad.autodiff.builder import gradient_model
    from onnxgrad.importer import graph_inputs, load, trainable_parameters
    from onnxgrad.train import optim
    from onnxgrad.train.losses import append_loss
    from onnxgrad.train.step import build_step_model, convert_opset, save_model_atomically
    from onnxgrad.train.training_info import embed_training_info

    _check_writable(args.out)
    model = load(args.model)
    outputs = [o.name for o in model.graph.output]
    loss = args.loss if args.loss is not None else (outputs[0] if len(outputs) == 1 else None)
    if loss is None:
        raise UsageError(f"the model has several outputs ({', '.join(outputs)}): give --loss")
    wrt = None if args.wrt is None else _expand(args.wrt, trainable_parameters(model), "--wrt")

    # 1. Without an optimizer: the gradient graph, at another opset.
    if args.optimizer is None:
        if args.training_info:
            raise UsageError("--training-info needs --optimizer: the step's update is part of it")
        if loss in LOSS_KINDS and loss not in outputs:
            model, loss = append_loss(model, loss, output=args.output)
        result = convert_opset(gradient_model(model, wrt=wrt, loss=loss), args.opset)
        save_model_atomically(result, args.out)
        print(f"wrote {args.out}: gradient graph at opset {args.opset}")
        print(f"inputs: {', '.join(i.name for i in graph_inputs(result))}")
        print(f"outputs: {', '.join(o.name for o in result.graph.output)}")
        return 0

    # 2. The optimizer, as `train` builds it, with Adam's extra settings.
    if args.optimizer != "sgd" and (args.momentum or args.nesterov):
        raise UsageError(f"--momentum and --nesterov apply to sgd only, not {args.optimizer}")
    if args.optimizer == "sgd" and (args.betas is not None or args.eps is not None):
        raise UsageError("--betas and --eps apply to adam and adamw, not sgd")
    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 1e-3)
    try:
        if args.optimizer == "sgd":
            optimizer = optim.SGD(lr, args.momentum, args.nesterov, args.weight_decay or 0.0)
        else:
            kind = optim.Adam if args.optimizer == "adam" else optim.AdamW
            decay = args.weight_decay
            if decay is None:
                decay = 0.01 if args.optimizer == "adamw" else 0.0
            betas = tuple(args.betas) if args.betas is not None else (0.9, 0.999)
            eps = 1e-8 if args.eps is None else args.eps
            optimizer = kind(lr, betas, eps, decay)
    except ValueError as err:
        raise UsageError(f"bad {args.optimizer} settings: {err}") from err

    # 3. The step, standalone or embedded in the model.
    step = build_step_model(
        model, loss, optimizer, wrt, args.clip_norm, args.opset, output=args.output
    )
    result = embed_training_info(step) if args.training_info else step
    save_model_atomically(result, args.out)
    what = "model with its training step as TrainingInfoProto" if args.training_info else "step"
    print(f"wrote {args.out}: {what} ({optimizer}, {len(step.graph.node)} nodes)")
    if args.training_info:
        info = result.training_info[0]
        print(f"algorithm inputs: {', '.join(i.name for i in info.algorithm.input) or '(none)'}")
        print(f"update bindings: {len(info.update_binding)}")
    else:
        print(f"inputs: {', '.join(i.name for i in step.graph.input)}")
        print(f"outputs: {', '.join(o.name for o in step.graph.output)}")
    return 0


def _cmd_export_weights(args: argparse.Namespace) -> int:
    from onnxgrad.export import export_weights

    _check_writable(args.out)
    names = export_weights(args.model, args.out, trainable_only=args.trainable_only)
    print(f"wrote {args.out}: {len(names)} tensor(s)")
    return 0


def _expand(patterns: Sequence[str], candidates: Sequence[str], option: str) -> list[str]:
    """Names for a list of names and globs; a glob matches among `candidates`."""
    out: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            hits = [c for c in candidates if fnmatch.fnmatchcase(c, pattern)]
            if not hits:
                raise UsageError(
                    f"{option} pattern '{pattern}' matches no trainable parameter; they are: "
                    f"{', '.join(candidates) or '(none)'}"
                )
        else:
            hits = [pattern]
        out.extend(h for h in hits if h not in out)
    return out


def _check_writable(path: str | os.PathLike) -> Path:
    """Fail before the work, not after it, when the output's folder is missing."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write '{path}': folder '{folder}' does not exist")
    if path.is_dir():
        raise UsageError(f"cannot write '{path}': it is a folder")
    return path


# check


def _cmd_check(args: argparse.Namespace) -> int:
    from onnxgrad import check
    from onnxgrad.importer import graph_inputs, load, trainable_parameters
    from onnxgrad.train.data import load_npz

    # 1. Options that go together, and the data.
    if args.fix != (args.out is not None):
        raise UsageError("--fix and -o OUT.onnx go together: --fix writes the repaired model")
    if args.out is not None:
        _check_writable(args.out)
    data = None
    wrt = args.wrt
    if args.data is not None or (wrt and any(c in w for w in wrt for c in "*?[")):
        model = load(args.model)
        if args.data is not None:
            data, _ = load_npz(args.data, [i.name for i in graph_inputs(model)])
        if wrt:
            wrt = _expand(wrt, trainable_parameters(model), "--wrt")

    # 2. The check, the report, the repaired model.
    report = check.check(
        args.model,
        data=data,
        loss=args.loss,
        wrt=wrt,
        samples=args.samples,
        directions=args.directions,
        eps=args.eps,
        rtol=args.rtol,
        seed=args.seed,
        fix=args.fix,
    )
    print(check.render(report))
    if report.repaired is not None:
        check.save(report.repaired, args.out)
        print(f"wrote {args.out}")
    return 0 if report.ok else 1


# info


def _cmd_ops(args: argparse.Namespace) -> int:
    import json

    from onnxgrad import opsdoc

    if args.json:
        print(json.dumps(opsdoc.as_dicts(), indent=1))
    else:
        print(opsdoc.table())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from onnxgrad.check import constant_weights
    from onnxgrad.importer import (
        graph_inputs,
        load,
        op_label,
        opset_of,
        read,
        trainable_parameters,
    )

    original = read(args.model)
    model = load(args.model)
    graph = model.graph
    before, after = opset_of(original), opset_of(model)
    about = [f"IR {original.ir_version}"]
    about.append(f"opset {before}" if before == after else f"opset {before}, loaded as {after}")
    if original.producer_name:
        about.append(f"made by {original.producer_name} {original.producer_version}".strip())
    print(f"model: {args.model} ({'; '.join(about)})")

    # 1. Inputs and outputs.
    print("inputs:")
    for vi in graph_inputs(model):
        print(f"  {vi.name}: {_type_text(vi.type)}")
    print("outputs:")
    for vi in graph.output:
        print(f"  {vi.name}: {_type_text(vi.type)}")

    # 2. Trainable parameters.
    params = trainable_parameters(model)
    dims = {t.name: list(t.dims) for t in graph.initializer}
    counts = {p: int(np.prod(dims[p])) for p in params}
    total = sum(counts.values())
    print(f"trainable parameters: {len(params)} tensor(s), {total:,} element(s)")
    width = max((len(p) for p in params), default=0)
    for p in params:
        print(f"  {p:<{width}}  {dims[p]!s:<16}  {counts[p]:>10,}")

    # 3. Weights that nodes hold: they compute, but only initializers are trainable.
    held = constant_weights(original)
    if held:
        total = sum(w.elements for w in held)
        print(
            f"weights held in Constant/ConstantOfShape nodes (not trainable): {len(held)} "
            f"tensor(s), {total:,} element(s)"
        )
        print(f"  `onnxgrad check {args.model} --fix -o FIXED.onnx` makes them parameters")
        width = max(len(w.name) for w in held)
        for w in held:
            shape = str(list(w.shape))
            print(f"  {w.name:<{width}}  {shape:<16}  {w.elements:>10,}  {w.op_type} '{w.node}'")
    else:
        print("weights held in Constant/ConstantOfShape nodes: none")

    # 4. Op types.
    ops = Counter(op_label(n) for n in graph.node)
    print(f"ops: {len(graph.node)} node(s), {len(ops)} type(s)")
    for op, count in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {op:<24} {count:>5}")

    # 5. Nodes on the way from parameters and float inputs to the outputs with no rule.
    missing = _missing_rules(model, params)
    if missing:
        print(f"missing gradient rules: {len(missing)} node(s) on the path to the outputs")
        for node in missing:
            print(f"  {op_label(node):<24} node '{node.name}'")
    else:
        print("missing gradient rules: none (every op on the path to the outputs has one)")
    return 0


def _missing_rules(model: onnx.ModelProto, params: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes between a parameter or float input and an output that have no gradient rule.

    Gradients flow from the outputs back to the parameters and float inputs; nodes that
    neither of them reaches (shape arithmetic on constants) need no rule, and ops declared
    non-differentiable stop the flow.
    """
    from onnxgrad.autodiff.rules import RULE, lookup
    from onnxgrad.importer import FLOAT_TYPES, graph_inputs

    graph = model.graph
    float_inputs = [
        i.name for i in graph_inputs(model) if i.type.tensor_type.elem_type in FLOAT_TYPES
    ]
    reached = set(params) | set(float_inputs)
    for node in graph.node:
        if any(i in reached for i in node.input if i):
            entry = lookup(node.op_type, node.domain)
            if entry is None or entry.state == RULE:
                reached.update(o for o in node.output if o)
    reaches = {o.name for o in graph.output}
    on_path = []
    for node in reversed(graph.node):
        if any(o in reaches for o in node.output):
            reaches.update(i for i in node.input if i)
            on_path.append(node)
    return [
        n
        for n in reversed(on_path)
        if any(i in reached for i in n.input if i) and lookup(n.op_type, n.domain) is None
    ]


def _type_text(tp: onnx.TypeProto) -> str:
    if not tp.HasField("tensor_type"):
        return tp.WhichOneof("value") or "unknown"
    tt = tp.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "unknown"
    if not tt.HasField("shape"):
        return f"{dtype} (shape unknown)"
    dims = [
        str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
    ]
    return f"{dtype} [{', '.join(dims)}]"


# run


def _cmd_run(args: argparse.Namespace) -> int:
    from onnxgrad.importer import load
    from onnxgrad.runtime.session import Session
    from onnxgrad.train import data

    if args.out is not None:
        _check_writable(args.out)
    model = load(args.model)
    session = Session(model, backend=args.backend)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    inputs, targets = _load_data(args.data, input_names, need_targets=False)
    n = data.num_samples(inputs, targets)

    # 1. Run in batches, then join the batches of each output.
    start = time.perf_counter()
    parts: list[list[np.ndarray]] = [[] for _ in output_names]
    for batch, _ in data.batches(inputs, None, args.batch_size):
        for k, value in enumerate(session.run(output_names, batch)):
            parts[k].append(np.asarray(value))
    outputs = {name: _join(name, p, n) for name, p in zip(output_names, parts)}
    seconds = time.perf_counter() - start

    # 2. Report.
    print(f"ran {args.model} on {n} samples from '{args.data}' ({seconds:.2f} s, {args.backend})")
    for name, value in outputs.items():
        print(f"  {name}: {value.dtype.name} {list(value.shape)}")
    if targets is not None:
        accuracy = _accuracy(outputs[output_names[0]], targets)
        if accuracy is not None:
            print(f"accuracy: {accuracy:.2%} ({output_names[0]} against 'target')")
    if args.out is not None:
        _savez_atomically(Path(args.out), outputs)
        print(f"wrote {args.out}")
    return 0


def _join(name: str, parts: list[np.ndarray], n: int) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if all(p.ndim >= 1 for p in parts) and sum(len(p) for p in parts) == n:
        return np.concatenate(parts, axis=0)
    raise UsageError(
        f"output '{name}' has no batch dimension, so it cannot be joined over batches: "
        "rerun with a --batch-size of at least the number of samples"
    )


def _accuracy(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Top-1 accuracy for [N, C] scores and [N] integer targets, else None."""
    if scores.ndim != 2 or targets.ndim != 1 or targets.dtype.kind not in "iu":
        return None
    if len(scores) != len(targets):
        return None
    return float(np.mean(np.argmax(scores, axis=1) == targets))


def _savez_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write next to the target, then rename: a failure never leaves half a file."""
    folder = _check_writable(path).parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Shared.


def _load_data(path: str, input_names: Sequence[str], need_targets: bool = True):
    from onnxgrad.train.data import DataError, load_npz

    inputs, targets = load_npz(path, input_names)
    if need_targets and targets is None:
        raise DataError(
            f"'{path}' has no 'target' array: save the targets with np.savez(..., target=...)"
        )
    return inputs, targets


def _configure_logging(debug: bool, verbose: bool) -> Callable[[], None]:
    """Send onnxgrad's logging to stderr; returns a function that undoes it.

    Undoing matters when `main` runs inside another program (or a test session).
    """
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    package = logging.getLogger("onnxgrad")
    saved = (package.handlers[:], package.level, package.propagate)
    package.handlers[:] = [handler]
    package.setLevel(level)
    package.propagate = False

    def restore() -> None:
        package.handlers[:], level_before, package.propagate = saved
        package.setLevel(level_before)

    return restore


def _fail(err: BaseException, debug: bool) -> int:
    if debug:
        raise err
    if isinstance(err, OSError) and err.filename is not None:
        message = f"{err.strerror or err}: '{err.filename}'"
    else:
        message = str(err) or type(err).__name__
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
