"""The ONNX exporter (torch): writes a version's model.onnx with parity checks and completes its card."""
