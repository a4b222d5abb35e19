"""Reverse-mode autodiff over ONNX graphs: the builder, the emitter and the rules."""
