"""Calibration on validation: the naive blends, the gap pull, the loops' pull, the residual fading and the
interval width, and recalibrating a stored version (``training.recalibrate``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from modelcard.store import current_version
from tests.conftest import clone_version
from training import calibrate as calibration
from training import forecast as forecasting
from training import interval_width as width_fit
from training import prepare as preparation
from training.config import ModelConfig
from training.model import KoVAE, PlanLayout


def test_blend_weights_fit_one_weight_where_the_naive_forecasts_coincide() -> None:
    """Where the day-earlier and the last value are the same regressor (a day ahead) the least squares is
    singular: the weight towards the last value is fitted alone. Elsewhere both weights come back exactly."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((500, 2, 3)), rng.standard_normal((500, 2, 3))
    A[:, 1] = B[:, 1]  # step 2: the two naive forecasts coincide
    T = 0.3 * A + 0.6 * B
    T[:, 1] = 0.7 * B[:, 1]
    s, q = calibration.blend_weights(A, B, T)
    assert np.allclose(q[0], 0.6) and np.allclose(s[0], 0.3 / (1 - 0.6))
    assert np.allclose(q[1], 0.7) and np.allclose(s[1], 0.0)


def test_adaptive_blend_weights_find_the_factor_of_the_models_own_error() -> None:
    """Each window keeps its own weight of yesterday, s = c / (c + m2); the fit finds by how much c should be
    scaled (here 1/4 at the first step, as the 15-min forecast needed, 4 at the second) and the weight of the last
    value, from truths that are exactly such blends. Windows whose truth was not measured count for nothing,
    whatever their T holds."""
    rng = np.random.default_rng(1)
    n = 600
    s = rng.uniform(0.05, 0.95, (n, 2, 3))
    A, B = rng.standard_normal((n, 2, 3)), rng.standard_normal((n, 2, 3))
    factor = np.array([0.25, 4.0])[None, :, None]
    a = calibration.rescaled(s, factor) * A
    T = a + 0.3 * (B - a)
    seen = np.ones((n, 2, 3), bool)
    seen[:50] = False
    T[:50] = 1e3  # a missing truth (the caller fills it with anything)
    f, q = calibration.adaptive_blend_weights(s, A, B, T, seen)
    assert np.allclose(f[0], 0.25) and np.allclose(f[1], 4.0)
    assert np.allclose(q, 0.3)
    assert calibration.rescaled(np.array([0.0, 0.5, 1.0]), 3.0) == pytest.approx([0.0, 0.75, 1.0])


def test_naive_blends_are_refitted_only_where_held_out_validation_says_so(trained_store, tiny_cfg) -> None:
    """The blend weights towards the naive forecasts are refitted on validation at the lead times where refits
    on either half beat the learned weights on the other half; elsewhere the learned weights stay. At the
    refitted steps the validation error does not grow."""
    from export.onnx_export import load_model
    from training import evaluate as ev

    store, version = trained_store
    model, card = load_model(store / version)
    p = preparation.prepare(tiny_cfg)
    calib = {"residual_decay": card["calibration"]["residual_decay"]}
    with torch.no_grad():  # the weights training starts from (the stored ones are refitted already)
        model.seasonal_logit.fill_(-3.0)
        model.persistence_logit.fill_(-3.0)
    before_s, before_q = model.seasonal_logit.data.clone(), model.persistence_logit.data.clone()
    before = ev.nmse_by_step(forecasting.predict(model, p, p.val, 0, calib)[0], p.val.x_fut, p.x_std)
    steps = calibration.fit_naive_blends(model, p, calib)["refitted_steps"]
    after = ev.nmse_by_step(forecasting.predict(model, p, p.val, 0, calib)[0], p.val.x_fut, p.x_std)
    changed = [k + 1 for k in range(before_q.shape[0]) if not torch.equal(before_q[k], model.persistence_logit[k])]
    assert steps and set(changed) <= set(steps)
    kept = [k for k in range(before_s.shape[0]) if k + 1 not in steps]
    assert torch.equal(before_s[kept], model.seasonal_logit.data[kept])
    idx = np.array(steps) - 1
    assert np.all(after[idx] <= before[idx] * 1.001)


def test_the_gap_pull_comes_back_for_each_lead_time_from_the_last_value() -> None:
    """Truths that move from the forecast towards a down sensor's last value by a weight that depends on the
    lead time from that value (0.8 two steps after it, falling by 0.1 a row) give that weight back, per row
    and variable; a variable that takes no pull gets 0, a missing truth counts for nothing, and the pull cuts
    the down variables' error."""
    from training.gaps import DownSensors, pull_table

    rng = np.random.default_rng(0)
    n, H, nx = 400, 4, 3
    forecast, last = rng.standard_normal((n, H, nx)), rng.standard_normal((n, H, nx))
    var, age = rng.integers(0, 2, n), rng.integers(1, 3, n)  # variable 2 is never down
    rows = age[:, None] + np.arange(H)[None]
    g = np.where(var[:, None] == 0, 0.9 - 0.1 * rows, 0.0)
    truth = forecast.copy()
    i = np.arange(n)
    truth[i, :, var] += g * (last[i, :, var] - forecast[i, :, var])
    truth[:20] = np.nan  # not measured: counts for nothing (a NaN let through would spoil every sum)
    down = DownSensors(forecast, forecast, last, truth, var, age)
    table = pull_table(*down.pull_sums(np.ones(nx), n_rows=6), smooth=1)
    assert np.allclose(table[1:6, 0], 0.9 - 0.1 * np.arange(1, 6), atol=1e-9)
    assert np.allclose(table[:, 1:], 0.0)
    without, with_pull = (e.sum(0) for e in down.errors(table, np.ones(nx)))
    assert with_pull[0] < 1e-12 < without[0] and without[2] == with_pull[2] == 0.0


def test_the_gap_pull_fit_reads_what_the_model_serves(trained_store, tiny_cfg) -> None:
    """What fit_gap_pull regresses on is what the model serves: with a table set, the served forecast of a
    window with one sensor down is the forecast without it plus g[age + k - 1] (last value - the forecast the
    naive blends read, under the plan held). Checked on validation windows whose plans move (the plan held
    differs from the plan) and with gaps that meet an earlier outage of every sensor, 5 to 10 steps before the
    end (the age counts from before both)."""
    from export.onnx_export import load_model
    from modelcard.card import last_observed
    from training.gaps import DownSensors, down_sensors

    store, version = trained_store
    model, card = load_model(store / version)
    p = preparation.prepare(tiny_cfg)
    faded = {"residual_decay": card["calibration"]["residual_decay"]}
    w = p.val
    L, H = w.x_hist.shape[1], w.x_fut.shape[1]
    x = w.x_hist.copy()
    x[:, L - 10 : L - 5, : p.n_targets] = np.nan
    gapped, var, age = down_sensors(replace(w, x_hist=x), p.n_targets, seed=3)
    assert np.isin(age, np.arange(5, 10)).sum() == 0 and (age == 10).sum() > 1  # gaps of 5-10 steps count 10

    def served(held: bool) -> np.ndarray:
        return forecasting.predict(model, p, gapped, 0, faded, held=held)[0].astype(np.float64)

    model.gap_pull = None
    without, reads = served(False), served(True)
    assert np.abs(reads - without).max() > 1e-3  # the plan held is not the plan everywhere
    g = np.random.default_rng(0).uniform(0.0, 1.0, (H + L, model.x_dim))
    model.gap_pull = torch.tensor(g, dtype=torch.float32)
    pulled = served(False)
    last = np.repeat(last_observed(gapped.x_hist)[:, None], H, 1)
    X, _, cells = DownSensors(without, reads, last, w.x_fut, var, age).regressors(p.x_std, len(g))
    i = np.arange(len(var))
    expected = without[i, :, var] + g[cells] * X * p.x_std[var][:, None]
    assert np.allclose(pulled[i, :, var], expected, atol=1e-4 * p.x_std[var].max())


def test_the_card_carries_the_gap_pull_that_calibration_fitted(trained_store, tiny_cfg) -> None:
    """calibration.gap_pull is fitted on validation with sensors down and comes back into the rebuilt model
    (export.onnx_export.load_model, what re-export and these tests read): without it a re-exported graph would
    lose the pull. Refitting the loaded model gives the same table; a variable takes it only at the lead times
    where it cut that variable's error on held-out validation halves."""
    from export.onnx_export import load_model
    from training.gaps import fit_gap_pull

    store, version = trained_store
    model, card = load_model(store / version)
    stored = card["calibration"]["gap_pull"]
    fit = card["calibration"]["gap_pull_fit"]
    p = preparation.prepare(tiny_cfg)
    assert stored is not None and fit["variables"], "the tiny model takes a pull for some variable"
    assert torch.allclose(model.gap_pull, torch.tensor(stored))
    decay = {"residual_decay": card["calibration"]["residual_decay"]}
    refit = fit_gap_pull(model, p, lambda w, held: forecasting.predict(model, p, w, 0, decay, held=held)[0])
    assert np.allclose(refit["table"], stored, atol=1e-4)
    names = p.output_names
    taken = {names[j] for j in np.flatnonzero(np.abs(np.array(stored)).sum(0))}
    assert taken <= set(fit["variables"]) and all(fit["kept_hours"][v] > 0 for v in fit["variables"])
    assert all(h == 0 for v, h in fit["kept_hours"].items() if v not in fit["variables"])


def test_interval_width_follows_its_driver_so_every_regime_is_covered_alike() -> None:
    """Two regimes: calm windows (driver at z = 0) miss by N(0, 1), wet ones (z = 2) by N(0, e^1.2): one width per
    variable covers the calm ones too often and the wet ones too rarely. The fit finds gamma = 0.6 and covers
    both 80%; where the misses do not grow with the driver it keeps gamma 0. The samples' band is their N(0, 1)
    10-90% range."""
    rng = np.random.default_rng(0)
    n, H, nx = 2000, 4, 2
    level = np.repeat([0.0, 2.0], n // 2)
    groups = np.repeat(["calm", "loaded"], n // 2)
    truth = rng.standard_normal((n, H, nx)) * np.exp(0.6 * level)[:, None, None]
    mean = np.zeros((n, H, nx))
    dev = np.broadcast_to(np.array([-1.2816, 1.2816])[None, :, None, None], (n, 2, H, nx))
    gamma, spread = width_fit.fit_width(mean, dev, truth, level, groups)
    assert gamma == pytest.approx(0.6) and np.allclose(spread, 1.0, atol=0.05)
    band = mean[:, None] + spread * dev * np.exp(gamma * level)[:, None, None, None]
    for c in width_fit.coverage_by_group(band, truth, groups).values():
        assert c == pytest.approx(0.8, abs=0.02)
    assert width_fit.fit_width(mean, dev, truth, level, np.full(n, "one"))[0] == pytest.approx(0.6)  # quarters
    plain = rng.standard_normal((n, H, nx))
    assert width_fit.fit_width(mean, dev, plain, level, groups)[0] <= 0.05


def test_the_width_of_an_output_a_loops_limit_holds_is_fitted_on_the_band_the_graph_serves() -> None:
    """The graph keeps a sample whose loop ran at its limit as drawn, however the width scales the rest: the
    band's edge stays on the limit. Fitted as a scaled band, the width pulled that edge below the limit, missed
    every truth sitting on it and grew until the band the graph serves covered far more than 80%. Fitted from
    the samples (``SaturatingSamples``), it covers 80% as served."""
    from training import evaluate as ev
    from training.forecast import SaturatingSamples

    rng = np.random.default_rng(0)
    n, s, h, limit = 300, 200, 3, 0.5
    drawn = rng.normal(0.0, 2.0, (n, s, h))  # twice as wide as the truth's spread: the width must narrow it
    samples = SaturatingSamples(np.zeros((n, h)), np.minimum(drawn, limit), drawn >= limit)
    truth = np.minimum(rng.normal(0.0, 1.0, (n, h)), limit)[..., None]  # the loop's output never passes its limit
    mean, band = np.zeros((n, h, 1)), samples.band(np.ones(n))[..., None]

    def served(f: float) -> float:
        return ev.interval_coverage(width_fit.widened(mean, band, np.full((n, 1, 1, 1), f), {0: samples}), truth)

    exact = width_fit.fit_spread(mean, band - mean[:, None], truth, np.ones(n), {0: samples})[0]
    plain = width_fit.fit_spread(mean, band - mean[:, None], truth, np.ones(n))[0]
    assert served(exact) == pytest.approx(0.8, abs=0.01) and exact < 1
    assert served(plain) > 0.9, (plain, served(plain))


def test_the_samples_the_width_is_fitted_on_are_the_graphs_at_every_width() -> None:
    """``saturating_parts`` keeps an output's samples where a loop's limit holds them, in band space, so that
    the width's fit (``SaturatingSamples.band``) sees the band ``calibrated_samples`` serves at any factor: the
    same samples kept at the limit (those at or past it, on either side), the others widened about the mean in
    band space; only outputs with a limit are kept. 101 samples: the 10% and 90% quantiles are samples
    themselves, so both bands agree to rounding."""
    from training import evaluate as ev
    from training.forecast import SaturatingSamples, saturating_parts
    from training.model import band_space, calibrated_samples

    g = torch.Generator().manual_seed(3)
    b, s, h, x = 5, 101, 4, 3
    mean = torch.randn(b, h, x, generator=g) * 0.3
    raw = (mean.unsqueeze(1) + torch.randn(b, s, h, x, generator=g)).clamp(-0.8, 0.6)  # the loop clips column 2
    inf = torch.tensor(float("inf"))
    limits = (torch.stack([-inf, -inf, torch.tensor(-0.8)]), torch.stack([inf, inf, torch.tensor(0.6)]))
    bounds = (torch.full((x,), -3.0), torch.full((x,), 3.0))
    columns = torch.nonzero(torch.isfinite(limits[0]) | torch.isfinite(limits[1]))[:, 0]
    assert columns.tolist() == [2]
    kept = SaturatingSamples(*(part[..., 0] for part in saturating_parts(mean, raw, columns, bounds, limits)))
    assert kept.pinned.any() and not kept.pinned.all()
    for f in (0.4, 1.0, 2.5):
        served = calibrated_samples(mean, raw, torch.full((b, x), f), bounds, limits)[..., 2].double()
        expected = band_space(torch.from_numpy(ev.sample_band(served.numpy()[..., None])[..., 0]), -3.0, 3.0)
        assert np.allclose(kept.band(np.full(b, f)), expected.numpy(), atol=1e-5), f


def test_interval_width_module_reads_the_driver_and_the_known_input_flags() -> None:
    """IntervalWidth (the graph's and evaluation's width): spread * exp(gamma * the driver's clipped highest
    measured value over the history) * ratio ** (share of the kind's future flags set); a driver never measured
    counts as 0, and a plans batch (one history, several futures) gets one width per plan."""
    from training.model import IntervalWidth

    calib = {
        "spread_scale": [2.0, 3.0],
        "width": {"driver": 0, "gamma": 0.5, "known": [{"columns": [1, 2], "ratio": [0.25, 1.0]}]},
    }
    width = IntervalWidth(2, calib)
    nan = float("nan")
    driver = torch.tensor([[1.0, nan, 0.5], [9.0, 9.0, 0.0], [nan, nan, nan]])
    x_hist = torch.stack([driver, torch.zeros(3, 3)], -1)
    u_fut = torch.zeros(3, 3, 3)
    u_fut[1, :, 1:] = 1.0  # the second window: every flag set
    u_hist = torch.zeros(3, 3, 3)
    got = width(x_hist, u_fut, u_hist)  # highest z: 1, 9 (clipped to 3), never measured (0)
    want = torch.tensor([[2.0 * np.exp(0.5), 3.0 * np.exp(0.5)], [2.0 * np.exp(1.5) * 0.25, 3.0 * np.exp(1.5)], [2, 3]])
    assert torch.allclose(got, want.float(), rtol=1e-5)
    plans = torch.zeros(3, 3, 3)
    plans[1, :, 1] = 1.0  # half the flags
    got = width(x_hist[:1], plans, u_hist[:1])
    assert got.shape == (3, 2) and torch.allclose(got[1], got[0] * torch.tensor([0.5, 1.0]), rtol=1e-5)
    assert torch.equal(
        IntervalWidth(2, {"spread_scale": [2.0, 3.0]})(x_hist, u_fut, u_hist), torch.tensor([[2.0, 3.0]] * 3)
    )


def test_interval_width_tells_a_plan_that_moved_from_one_that_stood_still_in_both_graphs() -> None:
    """The width's motion ratios (calibration ``width.motion``): a history whose setpoint or open-loop control
    moved over its last ``steps`` samples takes the "moved" ratio, one that stood still (within MOTION_TOL, or
    never measured) the "still" ratio; a move older than that window does not count. Both exported graphs apply
    it from the history, and a calibration without it leaves the width as it was."""
    from export import onnx_export as E
    from training.config import ModelConfig
    from training.model import MOTION_TOL, IntervalWidth, KoVAE, PlanLayout, plan_moved

    nan = float("nan")
    u_hist = torch.zeros(4, 12, 4)
    u_hist[1, -3:, 2] = 0.5  # the setpoint moved within the last 6 samples
    u_hist[2, :4, 2] = 0.5  # it moved, but before them
    u_hist[3, :, 2] = nan  # never measured
    u_hist[3, -2:, 0] = MOTION_TOL / 2  # a control that moved less than the tolerance
    assert plan_moved(u_hist, [0, 2], 6).tolist() == [0.0, 1.0, 0.0, 0.0]
    motion = {"columns": [0, 2], "steps": 6, "moved": [2.0, 1.0], "still": [0.5, 1.0]}
    calib = {"spread_scale": [1.0, 3.0], "width": {"driver": None, "gamma": 0.0, "known": [], "motion": motion}}
    width = IntervalWidth(2, calib)
    x_hist, u_fut = torch.zeros(4, 12, 2), torch.zeros(4, 3, 4)
    want = torch.tensor([[0.5, 3.0], [2.0, 3.0], [0.5, 3.0], [0.5, 3.0]])
    assert torch.allclose(width(x_hist, u_fut, u_hist), want)
    assert torch.equal(
        IntervalWidth(2, {"spread_scale": [1.0, 3.0]})(x_hist, u_fut, u_hist), torch.tensor([[1.0, 3.0]] * 4)
    )

    torch.manual_seed(0)
    model = KoVAE(2, 4, ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6), PlanLayout(2))
    graph = E.ForecastGraph(model.eval(), 8, {**calib, "residual_decay": [0.9, 0.9]})
    assert E.parity(graph, E.to_onnx_bytes(graph, 12, {}), 12) < 1e-4
    plans = E.ForecastGraph(model, 8, {**calib, "residual_decay": [0.9, 0.9]}, plans=True)
    assert E.plans_parity(graph, E.to_onnx_bytes(plans, 12, {}), 12) < 1e-4
    noise = torch.randn(1, 50, 3, 8)
    with torch.no_grad():
        spread = [graph(x_hist[:1], u, u_fut[:1], noise)[1][..., 0].std(1).mean() for u in (u_hist[:1], u_hist[1:2])]
    assert spread[1] > 2 * spread[0]  # the moved history's samples spread 4 times as far on variable 0


def test_calibration_covers_a_plan_that_moved_and_one_that_stood_still_alike(trained_store, tiny_cfg) -> None:
    """The trained run's card holds the motion ratios (``width.motion``, on the plan's open-loop controls and
    setpoints), each within MOTION_RATIO, and with them the validation windows whose plan moved over the history's
    last day and those whose plan stood still are each covered close to 80% in the honest request (the tiny
    preset's validation: a moving-setpoints plant and an open-loop excited one)."""
    from export.onnx_export import load_model
    from training import evaluate as ev
    from training.model import STEPS_PER_DAY, plan_moved

    store, version = trained_store
    model, card = load_model(store / version)
    calib = card["calibration"]
    motion = calib["width"]["motion"]
    p = preparation.prepare(tiny_cfg)
    assert motion["columns"] == p.motion_columns() and motion["steps"] == STEPS_PER_DAY
    for key in ("moved", "still"):
        assert all(width_fit.MOTION_RATIO[0] <= r <= width_fit.MOTION_RATIO[1] for r in motion[key])
    _, uh, _, _ = preparation.tensors(p, p.val, seed=1)
    moved = plan_moved(uh, motion["columns"], motion["steps"]).numpy() > 0.5
    assert 0 < moved.sum() < len(moved)
    _, band = forecasting.predict(model, p, p.val, calib["samples"], calib, seed=1)
    for rows in (moved, ~moved):
        assert abs(ev.interval_coverage(band[rows], p.val.x_fut[rows]) - 0.8) < 0.04


def test_a_held_forecast_copies_only_the_windows_the_honest_request_tells_alike(trained_store, tiny_cfg) -> None:
    """``predict(..., same_as=honest)``, how a run scores the held request without paying for its sampled forecast
    twice: the windows the two requests tell alike (the open-loop plant's) are the honest forecast's, band and
    all, and the others (the moving setpoints', whose plan moves) are the held request's own forecast."""
    from export.onnx_export import load_model

    store, version = trained_store
    model, card = load_model(store / version)
    calib, n = card["calibration"], card["calibration"]["samples"]
    p = preparation.prepare(tiny_cfg)
    honest = forecasting.predict(model, p, p.val, n, calib, seed=2)
    full = forecasting.predict(model, p, p.val, n, calib, seed=2, request="held")
    copied = forecasting.predict(model, p, p.val, n, calib, seed=2, request="held", same_as=("honest", *honest))
    told = [preparation.tensors(p, p.val, request=r) for r in ("honest", "held")]
    alike = forecasting.told_alike(told[0][1], told[1][1]) & forecasting.told_alike(told[0][3], told[1][3])
    assert 0 < alike.sum() < len(alike)
    np.testing.assert_allclose(copied[0], full[0], rtol=1e-5, atol=1e-5)  # every window's mean is the held one
    assert np.array_equal(copied[1][alike], honest[1][alike])
    np.testing.assert_allclose(full[1][alike], honest[1][alike], rtol=1e-5, atol=1e-5)
    assert not np.allclose(copied[1][~alike], honest[1][~alike])  # forecast, not copied
    assert np.isfinite(copied[1]).all()
    # What it cannot honour it refuses: a held plan (it would copy a forecast of another plan), or a band asked
    # of a forecast that has none.
    with pytest.raises(ValueError, match="same_as"):
        forecasting.predict(model, p, p.val, 0, calib, request="held", held=True, same_as=("honest", *honest))
    with pytest.raises(ValueError, match="same_as"):
        forecasting.predict(model, p, p.val, n, calib, request="held", same_as=("honest", honest[0], None))


def test_residual_fading_chosen_on_validation_is_no_worse_than_the_learned_one(trained_store, tiny_cfg) -> None:
    """Per variable, the fading calibration picks gives validation errors (before the blends) no larger than the
    learned one, and each g stays in (0, 1)."""
    from export.onnx_export import load_model

    store, version = trained_store
    model, _ = load_model(store / version)
    p = preparation.prepare(tiny_cfg)
    chosen = calibration.fit_residual_decay(model, p)
    assert chosen.shape == (model.x_dim,) and np.all((chosen > 0) & (chosen < 1))
    with torch.no_grad():
        learned = model.residual_decay().double().numpy()

    def errors(g: np.ndarray) -> np.ndarray:
        with calibration.blends_off(model):
            mean = forecasting.predict(model, p, p.val, 0, {"residual_decay": g.tolist()})[0]
        return np.nanmean(((mean - p.val.x_fut) / p.x_std) ** 2, axis=(0, 1))

    assert np.all(errors(chosen) <= errors(learned) + 1e-12)
    assert np.any(chosen != learned)  # the tiny model too is better served by another fading somewhere


def test_calibration_leaves_the_loops_own_blends_as_trained() -> None:
    """Under model.loop_feedback the loops drive the plant at their blended forecast, so the blends and the
    fading of the looped controls move every other variable's forecast: calibration turns the others' blends off
    (to fit them) but keeps the loops', and never refits the loops' own. Without feedback every output is fitted."""
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, loop_feedback=True)
    plan = PlanLayout(2, looped=(1,), setpoints=1, fast=(0, 3), limits=((-1.0, 1.0),))
    model = KoVAE(4, 6, cfg, plan)
    assert calibration.calibrated_columns(model).tolist() == [True, True, True, False]
    with torch.no_grad():
        model.seasonal_logit.fill_(0.5)
        model.persistence_logit.fill_(0.25)
    with calibration.blends_off(model):
        assert torch.all(model.seasonal_logit[:, :3] == -1e4) and torch.all(model.seasonal_logit[:, 3] == 0.5)
        assert torch.all(model.persistence_logit[:, :3] == -1e4) and torch.all(model.persistence_logit[:, 3] == 0.25)
    assert torch.all(model.seasonal_logit == 0.5)  # restored
    plain = KoVAE(4, 6, replace(cfg, loop_feedback=False), plan)
    assert calibration.calibrated_columns(plain).all()


def test_the_loops_pull_is_kept_only_where_it_cuts_the_error_of_windows_it_was_not_fitted_on() -> None:
    """calibration.loop_pull: per lead time, least squares of the truth minus the served forecast on the last
    value minus the plan held's forecast, where the loop decides; kept per 2-h block of lead times where each
    half's fit cuts the other half's error there. A block whose truth moves away from the last value (the fit
    clips the pull to 0) and a loop closed in one half only are never kept."""
    rng = np.random.default_rng(0)
    n, H, block = 40, 2 * calibration.LOOP_BLOCK, calibration.LOOP_BLOCK
    served, last = rng.normal(size=(n, H, 2)), rng.normal(size=(n, H, 2))
    held = served + 0.1 * rng.normal(size=(n, H, 2))  # the plan held is not the plan
    truth = served + 0.6 * (last - held) + 0.01 * rng.normal(size=(n, H, 2))
    truth[:, block:, 0] = served[:, block:, 0] - 0.5 * (last - held)[:, block:, 0]  # away from the last value
    first = np.arange(n) < n // 2
    closed = np.stack([np.ones(n, bool), first], 1)  # the second loop decides in the first half only
    table, fits = calibration.loop_pull_table(served, held, last, truth, closed, first)
    assert np.allclose(table[:block, 0], 0.6, atol=0.02) and np.all(table[block:, 0] == 0)
    assert fits[0]["kept_steps"] == list(range(1, block + 1)) and min(fits[0]["held_out_cut"]) > 0.5
    assert np.all(table[:, 1] == 0) and fits[1] == {"kept_steps": [], "held_out_cut": []}


def test_no_interval_width_ratio_is_fitted_on_outputs_the_request_gives(trained_store) -> None:
    """A looped control's output where the request gives the control is the plan, not a forecast: fitted on it
    (a band of no width that its float32 round trip puts beside the truth), the loops' ratio of the interval
    width ran to the bisection's end, 2^10, for every way of telling, and the loops' band over an influent
    forecast was 2.6 times wider than without one. Where a way of telling always gives the loops' controls
    (them given, or no setpoints sent: open loop) their ratio is 1; where it leaves them to their loops (an
    influent forecast sent) it is fitted on their forecasts, inside the bisection's range."""
    from modelcard.card import read_card

    store, version = trained_store
    card = read_card(store / version)
    width, loops = card["calibration"]["width"], len(card["variables"]["loops"])
    ratio = {k["input"]: k["ratio"][-loops:] for k in width["known"]}
    assert loops and {"looped controls given", "no setpoints", "disturbance forecast"} <= set(ratio)
    assert ratio["looped controls given"] == ratio["no setpoints"] == [1.0] * loops
    assert all(2**-5.9 < r < 2**9.9 for r in ratio["disturbance forecast"]), ratio


def test_the_influents_interval_width_takes_no_ratio_for_how_the_plan_is_told_or_moved(trained_store) -> None:
    """No plan moves the influent, so its width is the same however the plant is run: fitted with the plant's,
    it took the weather of the few validation runs of each policy (1.35 times wider open loop, a storm among
    them; in a storm under moving setpoints its band covered 64% of the held-out flows). Its ratios for the
    looped controls given, no setpoints sent and a plan that moved or stood still are 1; an influent forecast,
    which does narrow it, keeps its fitted ratio."""
    from modelcard.card import exogenous_outputs, read_card

    store, version = trained_store
    card = read_card(store / version)
    width, influent = card["calibration"]["width"], exogenous_outputs(card["variables"])
    assert influent and width.get("motion"), "the tiny model has an influent and a motion ratio to check"
    ratios = {k["input"]: [k["ratio"][i] for i in influent] for k in width["known"]}
    ratios |= {key: [width["motion"][key][i] for i in influent] for key in ("moved", "still")}
    told = ratios.pop("disturbance forecast")
    assert ratios and all(r == [1.0] * len(influent) for r in ratios.values()), ratios
    assert told != [1.0] * len(influent), told


def test_recalibrate_refuses_a_pull_without_loops_a_taken_name_a_bad_one_and_no_log(store_copy, capsys) -> None:
    """``python -m training.recalibrate`` refuses, by name, the loops' pull for a version whose loops do not
    drive its plant, a new name the store holds already, an invalid one, and a version without the training log
    its report needs; the store is left as it was."""
    from training.recalibrate import main as recalibrate

    store, version = store_copy
    before = sorted(p.name for p in store.iterdir())
    given = ["--store", str(store), "--version", version, "--refit"]
    assert recalibrate([*given, "width", "loop_pull", "--as", "v2"]) == 2
    assert "--refit loop_pull" in (err := capsys.readouterr().err) and "no loops' feedback" in err
    assert recalibrate([*given, "width", "--as", version]) == 2
    assert "holds that version already" in capsys.readouterr().err
    assert recalibrate([*given, "width", "--as", "../out"]) == 2
    assert "error:" in capsys.readouterr().err
    bare = clone_version(store, version, "v1-bare")  # a version without its training log: refused before the work
    (store / bare / "metrics.json").unlink()
    assert recalibrate(["--store", str(store), "--version", bare, "--refit", "width", "--as", "v3"]) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert sorted(p.name for p in store.iterdir()) == sorted([*before, bare])


def test_recalibrating_the_width_refits_it_and_keeps_every_other_term_and_the_forecast(
    store_copy, tiny_cfg, tmp_path: Path
) -> None:
    """``--refit width`` on a version whose width went stale (here its spread times 4, as after a change in how
    the samples are drawn) stores a new, unserved version that carries the width fitted afresh (the one training
    fitted), every other calibrated term of its source, the source's mean forecasts through ONNX Runtime, and
    held-out metrics computed again with the width it carries (the coverage training measured)."""
    from modelcard.card import read_card, write_card
    from modelcard.runtime import ModelRuntime
    from training.recalibrate import main as recalibrate

    store, version = store_copy
    fitted = read_card(store / version)
    stale = clone_version(store, version, "v1-stale")
    card = read_card(store / stale, verify=False)
    card["calibration"]["spread_scale"] = [4 * s for s in card["calibration"]["spread_scale"]]
    write_card(store / stale, card)
    given = ["--store", str(store), "--run-dir", str(tmp_path / "run"), "--version", stale, "--as", "v1-width"]
    assert recalibrate([*given, "--refit", "width"]) == 0
    assert current_version(store) == version and (store / "v1-width" / "gate.json").is_file()
    new = read_card(store / "v1-width")
    assert new["calibration"] == fitted["calibration"]
    for name in ("weights.pt", "config.json", "log.csv"):  # the run's own, carried over
        assert (store / "v1-width" / name).read_bytes() == (store / version / name).read_bytes(), name
    assert {"loss.png", "error_vs_horizon.png", "forecast_examples.png"} <= {
        f.name for f in (store / "v1-width").iterdir()
    }
    assert new["metrics"]["coverage_80_test"] == fitted["metrics"]["coverage_80_test"]
    metrics = json.loads((store / "v1-width" / "metrics.json").read_text())
    assert metrics["recalibrated"] == {"from": stale, "refit": ["width"]}
    p = preparation.prepare(tiny_cfg)
    w = p.test
    u_fut, s_hist, s_fut = p.request(w, "honest")
    args = (w.x_hist[..., : p.n_targets], w.u_hist, u_fut, w.t_last)
    old, now = (ModelRuntime(store / v).predict(*args, s_hist=s_hist, s_fut=s_fut).mean for v in (version, "v1-width"))
    assert np.max(np.abs(old - now) / p.x_std[: old.shape[-1]]) < 1e-5
