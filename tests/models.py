"""Test-only PyTorch models for gradient parity, and their ONNX exports.

Three small models cover the layers fine-tuning meets most: an MLP, a CNN with
BatchNormalization (eval mode, kept as a node) and both pooling kinds, and a pre-norm
transformer encoder block with multi-head self-attention written out in plain ops. Each
is exported with both torch exporters: the legacy TorchScript one (opset 17) and the
dynamo one (opset 18), always with a dynamic batch dimension.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

EXPORTERS = ("legacy", "dynamo")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MLP(nn.Module):
    """Linear-ReLU-Linear-Tanh-Linear."""

    input_shape = (4, 6)

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Conv-BatchNorm-ReLU-MaxPool, Conv-ReLU-AvgPool, Flatten, Linear."""

    input_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=1)
        self.pool2 = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool1(torch.relu(self.bn(self.conv1(x))))
        x = self.pool2(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + MHA(LN(x)), then h + FFN(LN(h)), GELU inside.

    The attention scale 1/√(d_model/heads) is a buffer, so that it follows the model's
    dtype: written as `/ math.sqrt(...)`, the dynamo exporter stores it rounded to float32
    even in a float64 model, and the exported graph then differs from torch's by ~1e-8.
    """

    input_shape = (3, 5, 16)

    def __init__(self, d_model: int = 16, heads: int = 2, hidden: int = 32):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.register_buffer("scale", torch.tensor(1.0 / math.sqrt(d_model // heads)))
        self.ff1 = nn.Linear(d_model, hidden)
        self.ff2 = nn.Linear(hidden, d_model)

    def _split(self, t, batch, seq):
        # [B, S, D] -> [B, H, S, D/H]
        return t.reshape(batch, seq, self.heads, -1).transpose(1, 2)

    def forward(self, x):
        batch, seq, d_model = x.shape
        h = self.ln1(x)
        q = self._split(self.q(h), batch, seq)
        k = self._split(self.k(h), batch, seq)
        v = self._split(self.v(h), batch, seq)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.matmul(torch.softmax(scores, dim=-1), v)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, d_model))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x))))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "transformer": EncoderBlock,
}


def build(kind: str, dtype: str = "float32", seed: int = 0) -> nn.Module:
    """The model in eval mode with seeded random weights (BatchNorm statistics included)."""
    torch.manual_seed(seed)
    model = MODELS[kind]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.to(DTYPES[dtype]).eval()


def example_input(kind: str, dtype: str = "float32", seed: int = 1) -> np.ndarray:
    """A seeded random input of the model's example shape."""
    shape = MODELS[kind].input_shape
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype)


def export(model: nn.Module, kind: str, exporter: str, path: Path) -> Path:
    """Export with the legacy (opset 17) or dynamo (opset 18) exporter, batch dim dynamic.

    BatchNormalization stays a node: in eval mode the legacy exporter folds it into the
    Conv when constant folding is on, and the dynamo exporter's graph optimizer does the
    same, so both are turned off for models that have one (and left on, as users run the
    exporters, for the others: folding stores some weights transposed under new names).
    Exporter chatter (warnings, logging, printed progress) is silenced.
    """
    keep_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    dtype = next(model.parameters()).dtype
    x = torch.from_numpy(example_input(kind, str(dtype).removeprefix("torch.")))
    with quiet():
        if exporter == "legacy":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                training=torch.onnx.TrainingMode.EVAL,
                do_constant_folding=not keep_bn,
            )
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=18,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes={"x": {0: batch}},
                optimize=not keep_bn,
                verbose=False,
                report=False,
            )
            program.save(str(path))
        else:
            raise ValueError(f"unknown exporter '{exporter}'")
    return path


@dataclass
class Mapping:
    """Which ONNX initializer holds which torch parameter.

    Attributes:
        onnx_to_torch: initializer name -> (parameter name, transposed).
    """

    onnx_to_torch: dict[str, tuple[str, bool]]

    def torch_grad(self, grads: dict[str, np.ndarray], init: str) -> np.ndarray:
        """The torch gradient laid out like the initializer."""
        name, transposed = self.onnx_to_torch[init]
        return grads[name].T if transposed else grads[name]


def map_parameters(model: onnx.ModelProto, module: nn.Module) -> Mapping:
    """Match initializers to torch parameters: by name first, else by value (or its transpose).

    The legacy exporter may store a parameter under a generated name (onnx::MatMul_12),
    transposed for MatMul; the dynamo exporter keeps state_dict names.

    Raises:
        LookupError: a parameter has no initializer, or a value matches twice.
    """
    params = {n: p.detach().cpu().numpy() for n, p in module.named_parameters()}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mapping: dict[str, tuple[str, bool]] = {}
    for name in params:
        if name in inits and inits[name].shape == params[name].shape:
            mapping[name] = (name, False)
    found = {p for p, _ in mapping.values()}
    for init, value in inits.items():
        if init in mapping or value.ndim == 0:
            continue
        for name, p in params.items():
            if name in found:
                continue
            hit = None
            if value.shape == p.shape and np.array_equal(value, p):
                hit = (name, False)
            elif p.ndim == 2 and value.shape == p.T.shape and np.array_equal(value, p.T):
                hit = (name, True)
            if hit:
                mapping[init] = hit
                found.add(name)
                break
    missing = sorted(set(params) - found)
    if missing:
        raise LookupError(f"no initializer holds the parameter(s) {missing}")
    return Mapping(mapping)


def torch_gradients(
    module: nn.Module, x: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Output, d loss/d parameter and d loss/d input for loss = sum(output * weights)."""
    module.zero_grad(set_to_none=True)
    inp = torch.from_numpy(x.copy()).requires_grad_(True)
    out = module(inp)
    loss = (out * torch.from_numpy(weights)).sum()
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in module.named_parameters()}
    return out.detach().numpy(), grads, inp.grad.detach().numpy()


@contextlib.contextmanager
def quiet():
    """Silence exporter chatter: warnings, torch's and onnxscript's logging, printed lines."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
