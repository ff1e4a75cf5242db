"""Deployment: BN folding, ONNX export + sidecar, the ONNX Runtime runner, INT8 quantization."""
