"""The onnxruntime backend behind the Session API (onnxruntime is an optional extra)."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxgrad.errors import ExecutionError
from onnxgrad.importer import load

logger = logging.getLogger(__name__)


class OrtSession:
    """Runs a model in onnxruntime's CPU provider.

    Every initializer is also listed as a graph input, so that feeds can override it
    exactly as with the numpy backend.
    """

    def __init__(self, model, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError as err:
            raise ExecutionError(
                "backend='onnxruntime' needs onnxruntime: pip install 'onnxgrad[ort]'"
            ) from err
        self.model = load(model, convert=False, infer_shapes=False)
        runnable = onnx.ModelProto()
        runnable.CopyFrom(self.model)
        listed = {i.name for i in runnable.graph.input}
        for t in runnable.graph.initializer:
            if t.name not in listed:
                runnable.graph.input.append(
                    onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                )
        self.initializers = {t.name for t in runnable.graph.initializer}
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(
                runnable.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExecutionError(f"onnxruntime cannot load the model: {first}") from err

    def run(self, output_names, feeds) -> list[np.ndarray]:
        try:
            return self._session.run(
                None if output_names is None else list(output_names),
                {k: np.asarray(v) for k, v in feeds.items()},
            )
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExecutionError(f"onnxruntime failed: {first}") from err
