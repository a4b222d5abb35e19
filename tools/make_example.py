"""Make the example in models/: a small digits CNN, pre-trained briefly, and its data.

The model is deliberately undertrained (a few hundred images, two epochs) so that
fine-tuning it with onnxgrad on the rest of the data visibly helps. Everything is
deterministic: the same torch build gives the same files.

Outputs (all under models/ unless --out says otherwise):

- digits_cnn.onnx: the pre-trained CNN, input "input" float32 [N, 1, 8, 8], output
  "logits" float32 [N, 10]; BatchNormalization stays a node (not folded into the Conv).
- digits_train.npz: the images for fine-tuning ("input", "target" int64), disjoint from
  the ones pre-training used.
- digits_test.npz: held-out images for evaluation, disjoint from both.

Run: python tools/make_example.py [--out models]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from torch import nn

logger = logging.getLogger("make_example")

SEED = 0
PRETRAIN = 300
"""Images used for pre-training; fine-tuning and testing get the rest."""
TEST = 500
"""Held-out images, taken from the end of the shuffled data."""
EPOCHS = 2
BATCH = 32
LR = 0.05


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU-MaxPool, Conv-ReLU, Flatten, Linear: 8x8 digit images to 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def digits_splits(seed: int = SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits data, shuffled once, as disjoint pretrain / train / test splits.

    Returns:
        {split: (images float32 [N, 1, 8, 8] in [0, 1], labels int64 [N])}.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    test_start = len(labels) - TEST
    return {
        "pretrain": (images[:PRETRAIN], labels[:PRETRAIN]),
        "train": (images[PRETRAIN:test_start], labels[PRETRAIN:test_start]),
        "test": (images[test_start:], labels[test_start:]),
    }


def pretrain(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> None:
    """A few epochs of plain SGD on the pre-training split, in a fixed order."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    order_rng = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(y), generator=order_rng)
        total = 0.0
        for start in range(0, len(y), BATCH):
            idx = perm[start : start + BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        logger.info("pre-training epoch %d: loss %.4f", epoch + 1, total / len(y))
    model.eval()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the model (in eval mode) on the given images."""
    with torch.no_grad():
        logits = model(torch.from_numpy(images))
    return float((logits.argmax(1).numpy() == labels).mean())


def export(model: nn.Module, path: Path) -> None:
    """Legacy TorchScript exporter, opset 17, dynamic batch, BatchNormalization kept.

    Exporting in eval mode with constant folding on folds BatchNormalization into the
    preceding Conv; constant folding off keeps it as a node (in inference form), which is
    what fine-tuning with a frozen BatchNormalization is meant to exercise.
    """
    example = torch.zeros(1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,
        )
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    if "BatchNormalization" not in ops:
        raise RuntimeError(f"BatchNormalization was folded away; the graph has only {ops}")


def main(argv: list[str] | None = None) -> int:
    """Build the example files; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    splits = digits_splits()
    model = DigitsCNN()
    pretrain(model, *splits["pretrain"])
    logger.info("held-out accuracy after pre-training: %.3f", accuracy(model, *splits["test"]))

    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out / "digits_cnn.onnx")
    for split in ("train", "test"):
        images, labels = splits[split]
        np.savez_compressed(args.out / f"digits_{split}.npz", input=images, target=labels)
        logger.info("wrote %s: %d images", args.out / f"digits_{split}.npz", len(labels))
    logger.info("wrote %s", args.out / "digits_cnn.onnx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
