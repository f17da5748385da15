"""Stage 1 of a run: the data the model sees. Scenarios -> scalers fitted on training -> windows -> tensors.

Everything downstream (loop, calibration, evaluation, export) takes a ``Prepared`` and never re-derives a scaler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modelcard.card import Calendar, known_inputs, window_clock
from training.catalog import SAMPLE_MINUTES
from training.config import RunConfig
from training.data import Windows, config_hash, generate, heldout_windows, make_windows, splits


@dataclass
class Prepared:
    x_mean: np.ndarray
    x_std: np.ndarray
    u_mean: np.ndarray
    u_std: np.ndarray
    train: Windows
    val: Windows
    test: Windows
    train_series: list[tuple[np.ndarray, np.ndarray]]  # whole normalised training scenarios (for ARX)
    data_hash: str
    calendar: Calendar  # clock inputs (model.calendar_daily, model.calendar_weekly)
    split_ids: dict[str, tuple[str, ...]] = field(default_factory=dict)
    x_range: tuple[np.ndarray, np.ndarray] | None = None  # (min, max) over the training scenarios
    u_range: tuple[np.ndarray, np.ndarray] | None = None

    def nx(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.x_mean) / self.x_std).astype(np.float32)

    def nu(self, u: np.ndarray, minutes: np.ndarray) -> np.ndarray:
        """The model's known inputs: scaled controls, then calendar features of the same steps."""
        return known_inputs(u, minutes, (self.u_mean, self.u_std), self.calendar)

    def inputs(self, w: Windows) -> tuple[np.ndarray, np.ndarray]:
        """Known inputs over each window's history and future."""
        t_hist, t_fut = window_clock(w.t_last, w.u_hist.shape[1], w.u_fut.shape[1], SAMPLE_MINUTES)
        return self.nu(w.u_hist, t_hist), self.nu(w.u_fut, t_fut)

    def dx(self, x: np.ndarray) -> np.ndarray:
        return x * self.x_std + self.x_mean


def prepare(cfg: RunConfig) -> Prepared:
    data = generate(cfg.data)
    ids = splits(cfg.data)
    train = [data[i] for i in ids["train"]]
    x_all = np.concatenate([d.x for d in train])
    u_all = np.concatenate([d.u for d in train])
    x_mean, u_mean = x_all.mean(0), u_all.mean(0)
    # Floor the std so a near-constant series cannot blow up its normalised values.
    x_std = np.maximum(x_all.std(0), 1e-3 * np.maximum(np.abs(x_mean), 1e-3))
    u_std = np.maximum(u_all.std(0), 1e-3 * np.maximum(np.abs(u_mean), 1e-3))
    t = cfg.train
    H = t.horizon
    calendar = Calendar(cfg.model.calendar_daily, cfg.model.calendar_weekly)
    return Prepared(
        x_mean,
        x_std,
        u_mean,
        u_std,
        make_windows(train, t.history, H, t.window_stride),
        heldout_windows([data[i] for i in ids["val"]], t.history, H, t.max_eval_windows),
        heldout_windows([data[i] for i in ids["test"]], t.history, H, t.max_eval_windows),
        [(((d.x - x_mean) / x_std), known_inputs(d.u, d.t_minutes, (u_mean, u_std), calendar)) for d in train],
        config_hash(cfg.data),
        calendar,
        ids,
        (x_all.min(0), x_all.max(0)),
        (u_all.min(0), u_all.max(0)),
    )


def tensors(p: Prepared, w: Windows) -> tuple[torch.Tensor, ...]:
    """(x_hist, u_hist, x_fut, u_fut) normalised, the u's with their calendar columns."""
    u_hist, u_fut = p.inputs(w)
    return tuple(torch.from_numpy(a) for a in (p.nx(w.x_hist), u_hist, p.nx(w.x_fut), u_fut))
