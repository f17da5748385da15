"""The forecast service: FastAPI + ONNX Runtime. Imports no torch."""
