"""Training and evaluation of the stable KoVAE forecaster on the plant's data (``plant``; needs the `train` extra)."""
