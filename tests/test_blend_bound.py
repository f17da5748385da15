"""bench/blend_bound.py on the tiny model: the oracle blend is the least-squares blend it says it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import blend_bound as bench
from modelcard.card import read_card
from training.config import config_from_dict, with_overrides


def test_the_oracle_blend_recovers_a_known_mixture_and_keeps_what_it_cannot_fit() -> None:
    rng = np.random.default_rng(0)
    model, yesterday, last = (rng.normal(size=(50, 3, 2)) for _ in range(3))
    truth = last + 0.3 * (model - last) + 0.6 * (yesterday - last)
    truth[:, 2, 1] = np.nan  # nothing to fit on: the model's forecast stays
    yesterday[:5, 0, 0] = np.nan  # before the history: the last value stands in
    out = bench.oracle_blend(truth, model, yesterday, last)
    np.testing.assert_allclose(out[:, 1], truth[:, 1], atol=1e-9)
    np.testing.assert_array_equal(out[:, 2, 1], model[:, 2, 1])
    assert np.isfinite(out).all()
    # Yesterday shifted by today's offset is a fourth forecast: a truth that follows it is recovered with it.
    offset = rng.normal(size=(50, 3, 2))
    shifted = last + 0.5 * (yesterday + offset - last)
    out = bench.oracle_blend(shifted, model, yesterday, last, offset)
    np.testing.assert_allclose(out[5:, 0], shifted[5:, 0], atol=1e-9)


def test_the_day_offset_is_todays_last_value_less_the_same_time_yesterday() -> None:
    day, H = 4, 3
    x_hist = np.arange(2 * 7 * 2, dtype=float).reshape(2, 7, 2)  # 7 steps: longer than a day of 4
    x_hist[1, 2, 1] = np.nan  # a day before the last step of window 1, variable 1: unknown
    last = np.repeat(x_hist[:, -1][:, None], H, 1)
    offset = bench.day_offset(x_hist, last, day)
    np.testing.assert_array_equal(offset[0], np.full((H, 2), 2.0 * day))  # each step is 2 above the one before
    np.testing.assert_array_equal(offset[1, :, 1], np.zeros(H))
    assert (bench.day_offset(x_hist[:, -day:], last, day) == 0).all()  # no day before: nothing to shift by


def test_no_fixed_blend_falls_below_the_model_alone_or_the_better_naive_forecast(
    trained_store: tuple[Path, str], tiny_cache: str
) -> None:
    """Fitted in sample, the blend is at least as good as each forecast it blends, in every cell and step: the
    model alone (a = 1, b = 0) and both naive forecasts (skill 0)."""
    store, version = trained_store
    card = read_card(store / version)
    result = bench.bound(
        store, version, with_overrides(config_from_dict(card["training"]["config"]), [f"data.cache_dir={tiny_cache}"])
    )
    assert result
    for cell, row in result.items():
        for step, oracle in row["oracle blend"].items():
            assert oracle >= max(row["model alone"][step], 0.0) - 1e-9, (cell, step)
            assert row["oracle + offset"][step] >= oracle - 1e-9, (cell, step)  # one more forecast to blend
