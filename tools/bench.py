"""Benchmark onnxgrad's training step against PyTorch eager, and its forward against onnxruntime.

Three workloads, each defined in PyTorch and exported with torch.onnx.export (TorchScript
exporter, opset 17):

- mlp: 784-512-512-10 with ReLU, batch 128, cross-entropy.
- cnn: conv 3x3 32, ReLU, max-pool 2, conv 3x3 64, ReLU, max-pool 2, linear 3136-128, ReLU,
  linear 128-10, on 1x28x28, batch 64, cross-entropy.
- transformer: a pre-norm encoder layer (d 128, 4 heads, feed-forward 512, GELU), sequence
  64, batch 16, MSE against a target of the input's shape.

A training step is forward, loss, backward and an SGD update: `onnxgrad.Trainer.step` on
one side, `zero_grad / forward / loss / backward / step` in PyTorch on the other. Both run
in one process, in alternating rounds (the order flips every round), and the medians of
the per-step times are compared as the ratio onnxgrad / torch. The same Trainer with
`backend="onnxruntime"` (the training graph run by an InferenceSession) is timed against
PyTorch the same way, in a pairing of its own. The forward pass alone is
compared with onnxruntime (`InferenceSession`, intra-op threads set to match). Everything
runs at 1 and 2 threads: `torch.set_num_threads`, threadpoolctl for numpy's BLAS and
onnxruntime's session options.

Memory growth during a step is measured in a fresh subprocess per (workload, framework):
the peak resident set size during one step (Linux VmHWM, reset through
/proc/self/clear_refs before the step) minus the resident size before it, after warm-up
steps, with glibc's malloc set to return every large block to the system at once and
`malloc_trim(0)` before the step (so that free memory a framework's earlier steps left
in the heap does not hide the growth); the least of three steps. For
onnxgrad the tracemalloc peak (numpy reports its buffers to tracemalloc) is given too.

The timed runs use malloc as onnxgrad's Session leaves it (freed blocks kept for reuse,
see `onnxgrad.runtime.plan.keep_freed_memory`); PyTorch runs in the same process, under
the same allocator settings. ONNXGRAD_MALLOC=default in the environment turns that off.

    python tools/bench.py                 # the table
    python tools/bench.py --json out.json # and the numbers as JSON
    python tools/bench.py --workloads mlp --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("onnxgrad.bench")

WORKLOADS = ("mlp", "cnn", "transformer")
TARGETS = {"mlp": 0.8, "cnn": 0.65, "transformer": 0.8}
LR = 0.01


# 1. The workloads, in PyTorch.


def _torch_models():
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 512)
            self.fc2 = nn.Linear(512, 512)
            self.fc3 = nn.Linear(512, 10)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
            self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
            self.fc1 = nn.Linear(3136, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))

    class Encoder(nn.Module):
        """x + MHA(LN(x)), then h + FFN(LN(h)) with exact GELU; attention in plain ops."""

        def __init__(self, d: int = 128, heads: int = 4, ff: int = 512):
            super().__init__()
            self.heads = heads
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.ff1 = nn.Linear(d, ff)
            self.ff2 = nn.Linear(ff, d)
            self.scale = 1.0 / math.sqrt(d // heads)

        def forward(self, x):
            batch, seq, d = x.shape
            qkv = self.qkv(self.ln1(x)).reshape(batch, seq, 3, self.heads, d // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            attn = torch.matmul(torch.softmax(scores, dim=-1), v)
            x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, d))
            return x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x))))

    return {"mlp": MLP, "cnn": CNN, "transformer": Encoder}


@dataclass
class Workload:
    """One benchmark workload: the torch module, its ONNX export, a batch and the loss."""

    name: str
    module: object
    onnx_bytes: bytes
    x: np.ndarray
    target: np.ndarray
    loss: str


def make_workload(name: str, seed: int = 0) -> Workload:
    """Build, seed and export one workload."""
    import torch

    torch.manual_seed(seed)
    module = _torch_models()[name]()
    rng = np.random.default_rng(seed)
    if name == "mlp":
        x = rng.standard_normal((128, 784)).astype(np.float32)
        target = rng.integers(0, 10, 128).astype(np.int64)
        loss = "cross_entropy"
    elif name == "cnn":
        x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
        target = rng.integers(0, 10, 64).astype(np.int64)
        loss = "cross_entropy"
    else:
        x = rng.standard_normal((16, 64, 128)).astype(np.float32)
        target = rng.standard_normal((16, 64, 128)).astype(np.float32)
        loss = "mse"
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            module,
            (torch.from_numpy(x),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
        )
    return Workload(name, module, buf.getvalue(), x, target, loss)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# 2. The steps being timed.


def torch_step(w: Workload) -> Callable[[], float]:
    """A closure running one PyTorch training step on the workload's batch."""
    import torch

    module = w.module
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    x = torch.from_numpy(w.x)
    target = torch.from_numpy(w.target)
    if w.loss == "cross_entropy":
        loss_fn = torch.nn.functional.cross_entropy
    else:
        loss_fn = torch.nn.functional.mse_loss

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(x), target)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def onnxgrad_step(w: Workload, backend: str = "numpy", threads: int = 1) -> Callable[[], float]:
    """A closure running one onnxgrad training step on the workload's batch.

    With backend="onnxruntime" its InferenceSession gets `threads` intra-op threads, so that
    it is compared with PyTorch at the same thread count.
    """
    import onnxgrad
    from onnxgrad.optim import SGD

    trainer = onnxgrad.Trainer(
        w.onnx_bytes, loss=w.loss, optimizer=SGD(LR), backend=backend, threads=threads
    )
    return lambda: trainer.step(w.x, w.target)


# The matrix products of one training step, as (batch, M, K, N): forward, then the weight
# and input gradients that the step needs (the input's own gradient is never needed).
_MLP = [(784, 512), (512, 512), (512, 10)]
PRODUCTS = {
    "mlp": [(1, 128, i, o) for i, o in _MLP]  # x·Wᵀ
    + [(1, i, 128, o) for i, o in _MLP]  # dW = xᵀ·dy
    + [(1, 128, o, i) for i, o in _MLP[1:]],  # dx = dy·W
    "cnn": [
        # im2col products: conv1 (1→32, 3×3 on 28×28), conv2 (32→64 on 14×14), then fc.
        (1, 32, 9, 64 * 784),
        (1, 64, 288, 64 * 196),
        (1, 64, 3136, 128),
        (1, 64, 128, 10),
        (1, 32, 64 * 784, 9),  # conv1 dW
        (1, 64, 64 * 196, 288),  # conv2 dW
        (1, 288, 64, 64 * 196),  # conv2 dX (columns, before col2im)
        (1, 3136, 64, 128),  # fc1 dW
        (1, 64, 128, 3136),  # fc1 dx
        (1, 128, 64, 10),  # fc2 dW
        (1, 64, 10, 128),  # fc2 dx
    ],
    "transformer": [
        (1, 1024, 128, 384),  # qkv
        (64, 64, 32, 64),  # q·kᵀ per head
        (64, 64, 64, 32),  # softmax·v
        (1, 1024, 128, 128),  # proj
        (1, 1024, 128, 512),  # ff1
        (1, 1024, 512, 128),  # ff2
    ]
    + [(1, i, 1024, o) for i, o in [(128, 384), (128, 128), (128, 512), (512, 128)]]  # dW
    + [(1, 1024, o, i) for i, o in [(128, 384), (128, 128), (128, 512), (512, 128)]]  # dx
    + [(64, 64, 64, 32), (64, 64, 32, 64), (64, 64, 64, 32), (64, 32, 64, 64)],  # attention
}


def products_run(name: str) -> Callable[[], None]:
    """A closure running only the step's matrix products in numpy (float32, exact shapes).

    This is the floor for an executor that calls numpy's BLAS: everything else a step does
    (im2col, col2im, elementwise ops, the update) comes on top of it.
    """
    rng = np.random.default_rng(0)
    operands = []
    for batch, m, k, n in PRODUCTS[name]:
        lead = (batch,) if batch > 1 else ()
        a = rng.standard_normal(lead + (m, k)).astype(np.float32)
        b = rng.standard_normal(lead + (k, n)).astype(np.float32)
        operands.append((a, b, np.empty(lead + (m, n), np.float32)))

    def run() -> None:
        for a, b, out in operands:
            np.matmul(a, b, out=out)

    return run


def forward_runs(w: Workload, threads: int) -> tuple[Callable, Callable]:
    """Closures running the forward pass in onnxgrad and in onnxruntime."""
    import onnxruntime as ort

    import onnxgrad

    session = onnxgrad.Session(w.onnx_bytes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    ort_session = ort.InferenceSession(w.onnx_bytes, options, providers=["CPUExecutionProvider"])
    feeds = {"input": w.x}
    return (lambda: session.run(["output"], feeds)), (lambda: ort_session.run(["output"], feeds))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_pair(
    a: Callable, b: Callable, rounds: int, inner: int, clock: str = "wall"
) -> tuple[float, float]:
    """Median seconds per call of `a` and of `b`, in alternating rounds of `inner` calls.

    clock="cpu" counts this process's CPU time instead of wall time: steadier on a
    machine shared with other work, and meaningful at 1 thread only (at more, it adds up
    the threads).
    """
    now = CLOCKS[clock]
    for fn in (a, b):  # warm-up: plans compiled, caches filled
        for _ in range(2):
            fn()
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        order = ((0, a), (1, b)) if r % 2 == 0 else ((1, b), (0, a))
        for index, fn in order:
            for _ in range(inner):
                start = now()
                fn()
                times[index].append(now() - start)
    return statistics.median(times[0]), statistics.median(times[1])


# 3. Memory growth during one step, in a fresh process.

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc():
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def _fix_malloc() -> None:
    """Large blocks go straight to mmap and back to the system when freed."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def _release_free_memory() -> None:
    """Hand every free page of the heap back to the system, holes included."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def memory_worker(name: str, framework: str) -> dict:
    """Peak RSS growth (MiB) of one step after warm-up; tracemalloc peak for onnxgrad."""
    _fix_malloc()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1, user_api="blas"):
        w = make_workload(name)
        step = torch_step(w) if framework == "torch" else onnxgrad_step(w)
        for _ in range(3):
            step()
        gc.collect()
        out: dict = {}
        growth = []
        for _ in range(3):
            _release_free_memory()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_kib("VmRSS")
            step()
            growth.append((_status_kib("VmHWM") - before) / 1024)
        out["rss_growth_mib"] = min(growth)
        if framework == "onnxgrad":
            # numpy reports its buffers to tracemalloc, so this peak counts them exactly.
            tracemalloc.start()
            step()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out["tracemalloc_peak_mib"] = peak / 2**20
    return out


def measure_memory(name: str, framework: str) -> dict:
    """Run `memory_worker` in a subprocess and return its numbers."""
    cmd = [sys.executable, __file__, "--memory-worker", name, framework]
    env = {**os.environ, "ONNXGRAD_MALLOC": "default"}  # measure the peak, not the pool
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        logger.warning("memory worker %s/%s failed: %s", name, framework, done.stderr[-2000:])
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


# 4. The benchmark.


def blas_info() -> list[dict]:
    """numpy's BLAS libraries as threadpoolctl sees them (kernel = architecture)."""
    from threadpoolctl import threadpool_info

    return [
        {k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for d in threadpool_info()
    ]


def run(names, threads_list, rounds: int, inner: int, memory: bool, clock: str = "wall") -> dict:
    """Every measurement, as a dict (what --json writes)."""
    import onnxruntime
    import torch
    from threadpoolctl import threadpool_limits

    result = {
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpus": os.cpu_count(),
            "blas": blas_info(),
            "env": {
                k: os.environ[k]
                for k in (
                    "OPENBLAS_CORETYPE",
                    "OPENBLAS_L2_SIZE",
                    "OMP_NUM_THREADS",
                    "ONNXGRAD_MALLOC",
                )
                if k in os.environ
            },
        },
        "clock": clock,
        "step": [],
        "forward": [],
        "memory": [],
    }
    workloads = {name: make_workload(name) for name in names}
    for threads in threads_list:
        torch.set_num_threads(threads)
        with threadpool_limits(threads, user_api="blas"):
            for name, w in workloads.items():
                t_torch, t_ours = time_pair(torch_step(w), onnxgrad_step(w), rounds, inner, clock)
                products_torch, t_products = time_pair(
                    torch_step(w), products_run(name), rounds, inner, clock
                )
                ort_torch, t_ort = time_pair(
                    torch_step(w),
                    onnxgrad_step(w, "onnxruntime", threads),
                    rounds,
                    inner,
                    clock,
                )
                result["step"].append(
                    {
                        "workload": name,
                        "threads": threads,
                        "torch_ms": t_torch * 1e3,
                        "onnxgrad_ms": t_ours * 1e3,
                        "ratio": t_ours / t_torch,
                        "target": TARGETS[name],
                        "ort_backend_ms": t_ort * 1e3,
                        "ort_backend_ratio": t_ort / ort_torch,
                        "products_ms": t_products * 1e3,
                        "products_ratio": t_products / products_torch,
                    }
                )
                ours, theirs = forward_runs(w, threads)
                f_ours, f_ort = time_pair(ours, theirs, rounds, inner, clock)
                result["forward"].append(
                    {
                        "workload": name,
                        "threads": threads,
                        "ort_ms": f_ort * 1e3,
                        "onnxgrad_ms": f_ours * 1e3,
                        "ratio": f_ours / f_ort,
                    }
                )
    if memory:
        for name in names:
            row = {"workload": name}
            for framework in ("torch", "onnxgrad"):
                for key, value in measure_memory(name, framework).items():
                    row[f"{framework}_{key}"] = value
            result["memory"].append(row)
    return result


def format_table(result: dict) -> str:
    """The results as plain-text tables."""
    lines = []
    m = result["machine"]
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']})" for b in m["blas"])
    lines.append(
        f"numpy {m['numpy']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"{m['cpus']} CPUs, BLAS: {blas}"
    )
    if m["env"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in m["env"].items()))
    lines.append("")
    clock = "CPU time" if result.get("clock") == "cpu" else "wall time"
    lines.append(f"training step (forward, loss, backward, SGD), median ms of {clock}")
    lines.append(
        f"{'workload':<12}{'threads':>8}{'torch':>10}{'onnxgrad':>10}{'ratio':>8}{'target':>8}"
        f"{'ort backend':>14}{'ratio':>8}{'products':>10}{'ratio':>8}"
    )
    for r in result["step"]:
        met = "ok" if r["ratio"] <= r["target"] else "--"
        lines.append(
            f"{r['workload']:<12}{r['threads']:>8}{r['torch_ms']:>10.2f}{r['onnxgrad_ms']:>10.2f}"
            f"{r['ratio']:>8.2f}{r['target']:>6.2f} {met if r['threads'] == 1 else '  '}"
            f"{r['ort_backend_ms']:>14.2f}{r['ort_backend_ratio']:>8.2f}"
            f"{r['products_ms']:>10.2f}{r['products_ratio']:>8.2f}"
        )
    lines.append(
        "(ort backend: the same Trainer with backend='onnxruntime'; products: the step's "
        "matrix products alone, in numpy, the floor for onnxgrad's executor; each ratio "
        "against a PyTorch run of its own pairing)"
    )
    lines.append("")
    lines.append(f"forward only, median ms of {clock}")
    lines.append(f"{'workload':<12}{'threads':>8}{'ort':>10}{'onnxgrad':>10}{'ratio':>8}")
    for r in result["forward"]:
        lines.append(
            f"{r['workload']:<12}{r['threads']:>8}{r['ort_ms']:>10.2f}{r['onnxgrad_ms']:>10.2f}"
            f"{r['ratio']:>8.2f}"
        )
    if result["memory"]:
        lines.append("")
        lines.append(
            "memory growth during one step, MiB (peak RSS minus RSS before; tracemalloc peak "
            "of numpy buffers)"
        )
        lines.append(f"{'workload':<12}{'torch rss':>11}{'onnxgrad rss':>14}{'tracemalloc':>13}")
        for r in result["memory"]:
            lines.append(
                f"{r['workload']:<12}{r.get('torch_rss_growth_mib', float('nan')):>11.1f}"
                f"{r.get('onnxgrad_rss_growth_mib', float('nan')):>14.1f}"
                f"{r.get('onnxgrad_tracemalloc_peak_mib', float('nan')):>13.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: run the benchmark, print the tables, maybe write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    parser.add_argument("--inner", type=int, default=5, help="steps per framework per round")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a busy machine; 1 thread only)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("WORKLOAD", "FRAMEWORK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker)))
        return 0
    result = run(
        args.workloads, args.threads, args.rounds, args.inner, not args.no_memory, args.clock
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
