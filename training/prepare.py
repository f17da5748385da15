"""Stage 1 of a run: the data the model sees. Scenarios -> scalers fitted on training -> windows -> tensors.

Everything downstream (loop, calibration, evaluation, export) takes a ``Prepared`` and never re-derives a scaler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modelcard.card import Calendar, known_inputs, window_clock
from training.catalog import BSM1, Catalog
from training.config import RunConfig
from training.data import Windows, heldout_windows, load_data, make_windows


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
    groups: dict[str, str] = field(default_factory=dict)  # scenario id -> evaluation group (regime or "later")
    test_scale: np.ndarray | None = None  # per variable, its std over all test scenarios (pooled skill's scale)
    catalog: Catalog = BSM1
    missing: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> variable -> missing share
    dropped: dict[str, int] = field(default_factory=dict)  # split -> windows dropped for missing data

    def nx(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.x_mean) / self.x_std).astype(np.float32)

    def nu(self, u: np.ndarray, minutes: np.ndarray) -> np.ndarray:
        """The model's known inputs: scaled controls, then calendar features of the same steps."""
        return known_inputs(u, minutes, (self.u_mean, self.u_std), self.calendar)

    def inputs(self, w: Windows) -> tuple[np.ndarray, np.ndarray]:
        """Known inputs over each window's history and future."""
        t_hist, t_fut = window_clock(w.t_last, w.u_hist.shape[1], w.u_fut.shape[1], self.catalog.sample_minutes)
        return self.nu(w.u_hist, t_hist), self.nu(w.u_fut, t_fut)

    def dx(self, x: np.ndarray) -> np.ndarray:
        return x * self.x_std + self.x_mean


def prepare(cfg: RunConfig) -> Prepared:
    catalog, data, ids, data_hash = load_data(cfg)
    train = [data[i] for i in ids["train"]]
    x_all = np.concatenate([d.x for d in train])
    u_all = np.concatenate([d.u for d in train])
    x_mean, u_mean = np.nanmean(x_all, 0), np.nanmean(u_all, 0)
    # Floor the std so a near-constant series cannot blow up its normalised values.
    x_std = np.maximum(np.nanstd(x_all, 0), 1e-3 * np.maximum(np.abs(x_mean), 1e-3))
    u_std = np.maximum(np.nanstd(u_all, 0), 1e-3 * np.maximum(np.abs(u_mean), 1e-3))
    test_x = np.concatenate([data[i].x for i in ids["test"]])
    t = cfg.train
    H, day = t.horizon, catalog.steps_per_day
    calendar = Calendar(cfg.model.calendar_daily, cfg.model.calendar_weekly)
    windows = {
        "train": make_windows(
            train, t.history, H, t.window_stride, steps_per_day=day, max_missing=cfg.data.max_missing
        ),
        **{
            k: heldout_windows([data[i] for i in ids[k]], t.history, H, t.max_eval_windows, day)
            for k in ("val", "test")
        },
    }
    names = [*catalog.target_names, *catalog.control_names]
    missing = {
        k: dict(
            zip(
                names,
                np.isnan(np.concatenate([np.concatenate([d.x, d.u], 1) for d in part])).mean(0).tolist(),
                strict=True,
            )
        )
        for k, part in ((k, [data[i] for i in ids[k]]) for k in ("train", "val", "test"))
    }
    return Prepared(
        x_mean,
        x_std,
        u_mean,
        u_std,
        windows["train"],
        windows["val"],
        windows["test"],
        [(((d.x - x_mean) / x_std), known_inputs(d.u, d.t_minutes, (u_mean, u_std), calendar)) for d in train],
        data_hash,
        calendar,
        ids,
        (np.nanmin(x_all, 0), np.nanmax(x_all, 0)),
        (np.nanmin(u_all, 0), np.nanmax(u_all, 0)),
        {sid: d.group for sid, d in data.items()},
        np.maximum(np.nanstd(test_x, 0), 1e-12),
        catalog,
        missing,
        {k: w.dropped for k, w in windows.items()},
    )


def tensors(p: Prepared, w: Windows) -> tuple[torch.Tensor, ...]:
    """(x_hist, u_hist, x_fut, u_fut) normalised, the u's with their calendar columns."""
    u_hist, u_fut = p.inputs(w)
    return tuple(torch.from_numpy(a) for a in (p.nx(w.x_hist), u_hist, p.nx(w.x_fut), u_fut))
