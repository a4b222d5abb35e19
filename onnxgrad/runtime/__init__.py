"""The executor: compile an ONNX graph once, run it with numpy kernels or onnxruntime."""
