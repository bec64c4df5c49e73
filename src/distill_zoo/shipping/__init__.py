"""Shipping the student: compression report, ONNX/TorchScript export, quantization."""
