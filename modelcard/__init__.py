"""The model contract that training and the service both sit on, with no torch and no web framework.

``card`` (the model card: variables, units, scalers, limits, calendar, eigenvalues), ``validate`` (a card's
numbers checked before it serves), ``store`` (the versioned model store and its CURRENT pointer), ``runtime``
(one version run through ONNX Runtime in engineering units) and ``objective`` (what setpoint advice minimises,
and its limits). Imports flow one way: service, plant and training -> modelcard; nothing here imports upward.
"""
