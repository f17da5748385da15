"""ONNX export and the model-card contract. `export.card` and `export.store` import no torch (the service uses them)."""
