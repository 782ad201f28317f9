"""Layer 6: export (TorchScript, ONNX) and Triton: model repository, request checks, server and client."""
