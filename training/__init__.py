"""Data generation, training and evaluation of the stable KoVAE forecaster (needs the `train` extra)."""
