"""The model contract that training and the service both sit on, with no torch and no web framework.

``card`` (the model card: variables, units, scalers, limits, calendar, eigenvalues), ``store`` (the versioned
model store and its CURRENT pointer) and ``runtime`` (one version run through ONNX Runtime in engineering
units). Imports flow one way: service, plant and training -> modelcard; nothing here imports upward.
"""
