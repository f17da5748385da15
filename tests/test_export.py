"""ONNX export: parity across dynamic shapes, metadata, checksums, eigenvalues, refusal on parity failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import onnx_export as E
from modelcard.card import CardError, read_card, stability_summary
from modelcard.runtime import ModelRuntime
from tests.test_training import same_spectrum
from training.config import ModelConfig
from training.model import KoVAE, PlanLayout


def _load(store: Path, version: str) -> tuple[KoVAE, dict]:
    return E.load_model(store / version)


@pytest.mark.parametrize(
    ("batch", "history", "horizon", "samples"), [(1, 16, 16, 1), (5, 8, 3, 4), (64, 32, 16, 2), (2, 16, 16, 0)]
)
def test_onnx_matches_torch_across_dynamic_shapes(trained_store, batch, history, horizon, samples) -> None:
    store, version = trained_store
    model, card = _load(store, version)
    calib = card["calibration"]
    graph = E.ForecastGraph(model, card["max_horizon"], calib)
    sess = ort.InferenceSession(str(store / version / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = E._example(batch, history, horizon, samples, (model.x_dim, model.u_dim, model.cfg.z_dim), seed=7)
    with torch.no_grad():
        mean, smp = (t.numpy() for t in graph(*feeds))
        direct = model.forecast(*feeds[:3], residual_decay=torch.tensor(calib["residual_decay"])).numpy()
    got_mean, got_smp = sess.run(None, {n: t.numpy() for n, t in zip(E.INPUTS, feeds, strict=True)})
    assert got_mean.shape == (batch, horizon, model.x_dim) and got_smp.shape == (batch, samples, horizon, model.x_dim)
    assert np.max(np.abs(got_mean - mean)) < 1e-4
    assert np.max(np.abs(got_mean - direct)) < 1e-4  # the frozen graph is the trained model
    assert np.max(np.abs(got_smp - smp) / E.sample_scale(graph, feeds[0], feeds[1], feeds[2]), initial=0.0) < 1e-4


def test_parity_holds_with_dropout_and_both_corrections() -> None:
    """The default model trains with dropout: export must run (and compare) it in eval mode. The fading miss
    and the day-earlier miss (a 6-step "day" here, shorter than the horizon) are in the graph, with dynamic
    history and horizon."""
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.5, seasonal_steps=6, seasonal_adaptive=False)
    model = KoVAE(5, 2, cfg)
    with torch.no_grad():
        model.seasonal_logit.fill_(0.0)
        model.persistence_logit.fill_(-1.0)
    model.train()
    graph = E.ForecastGraph(model, 12, {"spread_scale": [1.0] * 5, "residual_decay": [0.9] * 5})
    onnx_bytes = E.to_onnx_bytes(graph, 10, {})
    assert E.parity(graph, onnx_bytes, 10) < 1e-4
    assert not graph.training and not model.training
    feeds = E._example(2, 10, 12, 0, (5, 2, 8), seed=3)
    with torch.no_grad():
        direct = model.forecast(*feeds[:3], residual_decay=torch.full((5,), 0.9))
        assert torch.allclose(graph(*feeds)[0], direct, atol=1e-5)  # the graph is the trained forecast
        model.persistence_logit.fill_(-1e4)  # the seasonal blend alone
        base = torch.zeros(2, 12, 5)
        blended = model.seasonal(feeds[0], base)
        model.persistence_logit.fill_(0.0)  # then half-way to the last value as well
        both = model.seasonal(feeds[0], base)
    # Half-way to the same time a day (6 steps) earlier up to k = 6; beyond a day nothing is known.
    assert torch.allclose(blended[:, :6], 0.5 * feeds[0][:, 9 - 6 + 1 : 10], atol=1e-6)
    assert torch.all(blended[:, 6:] == 0)
    assert torch.allclose(both, blended + 0.5 * (feeds[0][:, -1:] - blended), atol=1e-6)


def test_graph_axes_are_dynamic_and_free_of_eig(trained_store) -> None:
    store, version = trained_store
    proto = onnx.load(str(store / version / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["x_hist"][:2] == ["batch", "history"] and dims["u_fut"][:2] == ["batch", "horizon"]
    assert dims["noise"][:3] == ["batch", "samples", "horizon"]
    ops = {n.op_type for n in proto.graph.node}
    assert "GRU" in ops and "Loop" not in ops and not any("Eig" in op for op in ops)
    onnx.checker.check_model(proto)


def test_metadata_round_trips_through_onnxruntime(trained_store) -> None:
    store, version = trained_store
    card = read_card(store / version)
    sess = ort.InferenceSession(str(store / version / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["version"] == card["version"] == version
    assert meta["data_hash"] == card["data"]["config_hash"]
    assert float(meta["spectral_radius"]) == card["stability"]["spectral_radius"]
    eig = np.array(json.loads(meta["eigenvalues"]))
    assert np.allclose(eig[:, 0], [e["real"] for e in card["stability"]["eigenvalues"]])


def test_the_card_carries_the_loops_output_limits_the_model_was_trained_with(trained_store) -> None:
    """The graph clips a loop's forecast to the limits its card names (export.onnx_export.load_model): a card
    without them once gave the exported default KLa_5's 360 1/d bound where training clipped at the loop's 240."""
    store, version = trained_store
    model, card = _load(store, version)
    loops = {loop["control"]: loop for loop in card["variables"]["loops"]}
    assert loops["KLa_5"]["output_max"] == 240.0 and loops["Q_intr"]["output_max"] == 92230.0
    u_mean, u_std = (np.array([v[k] for v in card["variables"]["controls"]]) for k in ("mean", "std"))
    assert np.isclose(model.plan.limits[0][1], (240.0 - u_mean[2]) / u_std[2], atol=1e-5)


def test_card_eigenvalues_match_numpy_and_the_model(trained_store) -> None:
    store, version = trained_store
    model, card = _load(store, version)
    A = np.array(card["operator"]["A"])
    numpy_eig = np.linalg.eigvals(A)
    card_eig = np.array([e["real"] + 1j * e["imag"] for e in card["stability"]["eigenvalues"]])
    assert same_spectrum(card_eig, numpy_eig, atol=1e-9)
    assert same_spectrum(model.koopman.eigenvalues(), numpy_eig, atol=1e-6)
    st = card["stability"]
    assert st["spectral_radius"] == pytest.approx(np.abs(numpy_eig).max())
    assert st["spectral_radius"] <= card["model"]["rho_max"] * (1 + 1e-6) and st["stable"]
    assert st["stability_margin"] == pytest.approx(1 - st["spectral_radius"])
    decay = card["calibration"]["residual_decay"]
    assert st["residual_decay_max"] == pytest.approx(max(decay)) and min(decay) >= 0
    assert st["residual_decay_max"] <= 1
    for g, half_life in zip(decay, st["residual_half_life_hours"].values(), strict=True):
        assert (g ** (half_life * 4) if g > 0 else 0.5) == pytest.approx(0.5)  # 4 samples per hour
    slowest = max(e["decay_hours"] for e in st["eigenvalues"])
    assert st["slowest_decay_hours"] == pytest.approx(slowest)
    assert slowest == pytest.approx(-0.25 / np.log(np.abs(numpy_eig).max()))


def test_stability_summary_units() -> None:
    r, period_steps = 0.99, 96  # one-day oscillation at 15-minute steps
    lam = r * np.exp(2j * np.pi / period_steps)
    A = np.array([[lam.real, -lam.imag], [lam.imag, lam.real]])
    s = stability_summary(A, 15)
    assert s["oscillation_periods_hours"] == [pytest.approx(24.0)]
    assert s["eigenvalues"][0]["decay_hours"] == pytest.approx(-0.25 / np.log(0.99))


def test_tampered_model_is_refused_on_load(store_copy) -> None:
    store, version = store_copy
    path = store / version / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CardError, match="does not match"):
        ModelRuntime(store / version)


def test_exporter_refuses_on_parity_failure_and_writes_nothing(trained_store, tmp_path, monkeypatch) -> None:
    store, version = trained_store
    model, card = _load(store, version)
    monkeypatch.setattr(E, "PARITY_TOL", -1.0)  # no export can pass: stands in for a broken exporter
    target = tmp_path / "v-new"
    with pytest.raises(E.ParityError, match="differs from PyTorch by"):
        E.export_version(model, card, target)
    assert not target.exists()


def test_exporter_refuses_a_graph_that_is_not_the_model_and_writes_nothing(
    trained_store, tmp_path, monkeypatch
) -> None:
    """The parity checks must measure a real mismatch, not only a tolerance set below zero: the stored graphs
    against the model with one decoder bias moved by 1e-2 differ by more than 1e-3, and an exporter that wrote
    such a graph (either one) is refused at the normal tolerance with nothing written."""
    store, version = trained_store
    model, card = _load(store, version)
    history = card["history"]["length"]
    stale = {plans: (store / version / (E.PLANS_FILE if plans else E.ONNX_FILE)).read_bytes() for plans in (0, 1)}
    graph = E.ForecastGraph(model, card["max_horizon"], card["calibration"])
    assert E.parity(graph, stale[0], history) <= E.PARITY_TOL  # the stored graph is this model
    with torch.no_grad():
        model.decoder[-1].bias += 1e-2
    assert E.parity(graph, stale[0], history) > 1e-3
    assert E.plans_parity(graph, stale[1], history) > 1e-3
    real = E.to_onnx_bytes
    for broken, words in ((0, "ONNX Runtime differs from PyTorch by"), (1, "the plans graph differs from PyTorch")):
        # An exporter whose graph (the forecast one, then the plans one) was frozen before the bias moved.
        monkeypatch.setattr(E, "to_onnx_bytes", lambda g, h, m, b=broken: stale[b] if g.plans == b else real(g, h, m))
        target = tmp_path / f"v-{broken}"
        with pytest.raises(E.ParityError, match=words):
            E.export_version(model, card, target)
        assert not target.exists()


def test_calendar_contract_reads_every_card_version_and_repeats_weekly() -> None:
    from modelcard.card import Calendar

    def card(calendar: dict | None) -> dict:
        return {"variables": {} if calendar is None else {"calendar": calendar}}

    assert Calendar.from_card(card(None)) == Calendar(0, 0)  # card_version 1: no clock inputs
    assert Calendar.from_card(card({"harmonics": 2})) == Calendar(2, 0)  # early version 2: daily only
    cal = Calendar(2, 2)
    assert Calendar.from_card(card(cal.to_card())) == cal and len(cal.to_card()["features"]) == cal.size == 8
    minutes = np.arange(0, 7 * 1440, 15.0)
    f = cal.features(minutes)
    assert f.shape == (len(minutes), 8) and np.allclose(cal.features(minutes + 7 * 1440), f, atol=1e-5)
    day = 1440 // 15
    assert np.allclose(f[day:, :4], f[:-day, :4], atol=1e-5) and not np.allclose(f[day:, 4:], f[:-day, 4:])


@pytest.mark.parametrize("fed", [False, True])
def test_decoder_reads_the_controls_of_each_step_in_both_graphs(fed: bool) -> None:
    """model.decoder_controls: x[t] = D(z[t], u_c[t]). With B = 0 the latent path ignores the controls, so a
    forecast can move with a planned control only through the decoder; both exported graphs must agree with
    the model, and the calendar column (not a control) must not reach the decoder."""
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, decoder_controls=fed)
    model = KoVAE(4, 3, cfg, PlanLayout(2)).eval()  # u: 2 controls, then 1 calendar column
    with torch.no_grad():
        model.koopman.B.zero_()
    graph = E.ForecastGraph(model, 12, {"spread_scale": [1.0] * 4, "residual_decay": [0.9] * 4})
    assert E.parity(graph, E.to_onnx_bytes(graph, 10, {}), 10) < 1e-4
    plans = E.ForecastGraph(model, 12, {"spread_scale": [1.0] * 4, "residual_decay": [0.9] * 4}, plans=True)
    assert E.plans_parity(graph, E.to_onnx_bytes(plans, 10, {}), 10) < 1e-4
    x, u, uf, noise = E._example(1, 10, 12, 0, (4, 3, 8), seed=5)
    moved, clock = uf.clone(), uf.clone()
    moved[:, 4, 0] += 1.0  # one control, at one step
    clock[:, 4, 2] += 1.0  # the calendar column
    with torch.no_grad():
        base, step, cal = (graph(x, u, f, noise)[0] for f in (uf, moved, clock))
    changed = (step - base).abs().amax(-1)[0]
    assert torch.equal(cal, base)
    if fed:
        assert changed[4] > 1e-4 and torch.all(changed[torch.arange(12) != 4] == 0)
    else:
        assert torch.all(changed == 0)


def test_a_plans_effect_passes_the_naive_blends_whole_in_both_graphs() -> None:
    """The naive blends read the forecast under the plan held (training.model.held_plan): a plan's effect on the
    forecast is the decoded rollouts' difference, not that difference shrunk by the blends (blending each plan's
    own forecast once shrank every what-if by (1 - s)(1 - q)). A card from before it keeps its old forecast."""
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6)
    plan = PlanLayout(2, looped=(1,), setpoints=1)  # u: 2 controls, a loop flag, a setpoint and its flag, calendar
    model = KoVAE(4, 6, cfg, plan).eval()
    with torch.no_grad():
        model.seasonal_logit.fill_(0.0)  # halfway to yesterday
        model.persistence_logit.fill_(0.0)  # then halfway to the last value
    calib = {"spread_scale": [1.0] * 4, "residual_decay": [0.9] * 4}
    graph = E.ForecastGraph(model, 12, calib)
    assert E.parity(graph, E.to_onnx_bytes(graph, 10, {}), 10) < 1e-4
    plans_graph = E.ForecastGraph(model, 12, calib, plans=True)
    assert E.plans_parity(graph, E.to_onnx_bytes(plans_graph, 10, {}), 10) < 1e-4
    x, u, uf, noise = E._example(1, 10, 12, 0, (4, 6, 8), seed=7)
    u[..., 2:5], uf[..., 2:5] = 1.0, 1.0  # the loop's control given, its setpoint sent, over history and plan
    moved = uf.clone()
    moved[:, :, 0] += 1.0  # control 0 one unit higher over the whole horizon
    decay = torch.full((4,), 0.9)
    with torch.no_grad():
        effect = graph(x, u, moved, noise)[0] - graph(x, u, uf, noise)[0]
        z0 = model.encode(x, u)[0][:, -1]
        raw = model.decode_plan(*model.rollout(z0, moved)) - model.decode_plan(*model.rollout(z0, uf))
        assert torch.allclose(effect, raw, atol=1e-5) and effect.abs().max() > 1e-3
        old = KoVAE(4, 6, ModelConfig(**{**cfg.__dict__, "blend_held_plan": False}), plan).eval()
        old.load_state_dict(model.state_dict())
        shrunk = old.forecast(x, u, moved, residual_decay=decay) - old.forecast(x, u, uf, residual_decay=decay)
    assert not torch.allclose(shrunk, raw, atol=1e-3)  # the old forecast shrinks it


def test_a_loop_drives_the_plant_with_its_forecast_control_clipped_to_its_limits_in_both_graphs() -> None:
    """model.loop_feedback: a control left to its loop drives the latent state with the model's forecast of it,
    clipped to the loop's output limits, and the loop's setpoint reaches the plant only through that control. A
    higher setpoint where the loop already asks for more than its limit moves only what the decoder reads the
    setpoint for (the fast outputs), not the slow ones; within the limits it moves them too. Both graphs agree."""
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, loop_feedback=True)
    # u: 2 controls (the second looped), its loop flag, a setpoint and its flag, a calendar column. x: 3
    # measurements (the first fast), then the looped control's forecast.
    tight = PlanLayout(2, looped=(1,), setpoints=1, fast=(0, 3), limits=((-0.5, 0.5),))
    wide = PlanLayout(2, looped=(1,), setpoints=1, fast=(0, 3), limits=((-50.0, 50.0),))
    model, free = KoVAE(4, 6, cfg, tight).eval(), KoVAE(4, 6, cfg, wide).eval()
    with torch.no_grad():
        model.decoder[-1].bias[3] = 3.0  # the loop asks for 3 (normalised): above the tight limit of 0.5
        assert model.skip is not None
        model.skip.weight[3, 3] = 2.0  # and 2 more per unit of setpoint
    free.load_state_dict(model.state_dict())
    calib = {"spread_scale": [1.0] * 4, "residual_decay": [0.9] * 4}
    graph = E.ForecastGraph(model, 12, calib)
    assert E.parity(graph, E.to_onnx_bytes(graph, 10, {}), 10) < 1e-4
    assert E.plans_parity(graph, E.to_onnx_bytes(E.ForecastGraph(model, 12, calib, plans=True), 10, {}), 10) < 1e-4
    x, u, uf, noise = E._example(1, 10, 12, 0, (4, 6, 8), seed=3)
    u[..., 2], u[..., 4] = 1.0, 1.0  # the history: the control applied, the setpoint logged
    uf[..., 1:4], uf[..., 4] = 0.0, 1.0  # the plan: the control left to its loop, the setpoint sent (at 0)
    higher = uf.clone()
    higher[..., 3] += 1.0
    with torch.no_grad():
        z0 = model.encode(x, u)[0][:, -1]
        z, used = model.rollout(z0, uf)
        assert torch.all(model.decode_plan(z, used)[..., 3] == 0.5)  # the control forecast at its limit
        served = graph(x, u, uf, E._example(1, 10, 12, 20, (4, 6, 8), seed=3)[3])
        assert all(t[..., 3].abs().max() <= 0.5 + 1e-6 for t in served)  # mean and samples within the limits
        effect = graph(x, u, higher, noise)[0] - graph(x, u, uf, noise)[0]
        assert effect[..., 0].abs().max() > 1e-3  # the fast output reads the setpoint
        assert effect[..., 1:].abs().max() < 1e-6  # no more air: the slow outputs stay
        loose = free.forecast(x, u, higher, residual_decay=torch.full((4,), 0.9))
        loose = loose - free.forecast(x, u, uf, residual_decay=torch.full((4,), 0.9))
        assert loose[..., 1:3].abs().max() > 1e-3  # within the limits, the setpoint's air moves the plant
        given = uf.clone()
        given[..., 1:3] = torch.tensor([0.25, 1.0])  # the control's future given: it drives the plant as sent
        assert torch.all(model.rollout(z0, given)[1][..., 1] == 0.25)


def test_yesterdays_weight_follows_how_well_yesterday_repeated() -> None:
    """model.seasonal_adaptive: where the last samples of the history repeat the day before exactly (BSM1's dry
    file), the forecast takes yesterday whole; where they miss by a standard deviation, c / (c + 1); a history too
    short to compare reads a miss of 1. The graph computes the same for any history length."""
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, seasonal_check=3)
    model = KoVAE(2, 2, cfg).eval()
    with torch.no_grad():
        model.seasonal_logit.fill_(0.0)  # c = 1
        model.persistence_logit.fill_(-1e4)  # no pull to the last value
    day = torch.randn(1, 6, 2)
    repeating = torch.cat([day, day], 1)  # (1, 12, 2): the last 3 samples equal those a day (6) earlier
    shifted = repeating.clone()
    shifted[:, -3:] += 1.0  # missed by exactly 1 over the checked samples
    weights = [model.seasonal_weights(x, 4)[0, 0].tolist() for x in (repeating, shifted, repeating[:, :6])]
    assert weights == [pytest.approx([1.0, 1.0]), pytest.approx([0.5, 0.5]), pytest.approx([0.5, 0.5])]
    with torch.no_grad():
        blended = model.seasonal(repeating, torch.zeros(1, 4, 2))
    assert torch.allclose(blended, repeating[:, 6:10], atol=1e-6)  # yesterday, whole
    graph = E.ForecastGraph(model, 6, {"spread_scale": [1.0] * 2, "residual_decay": [0.9] * 2})
    assert E.parity(graph, E.to_onnx_bytes(graph, 12, {}), 12) < 1e-4


@pytest.mark.parametrize("last_seen", [True, False])
def test_a_sensor_down_takes_the_blends_of_a_longer_lead_in_both_graphs(last_seen: bool) -> None:
    """model.blend_last_seen: a variable whose last 2 samples are missing takes the weight of its last value that
    lead k + 2 has (its last value is 2 steps older than the others'), the others that of lead k; cards written
    before it, lead k for every variable. The graph computes the same with the gap in the history."""
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, blend_last_seen=last_seen)
    model = KoVAE(2, 2, cfg).eval()
    q = torch.linspace(0.9, 0.1, model.persistence_logit.shape[0])  # the pull to the last value falls with the lead
    with torch.no_grad():
        model.seasonal_logit.fill_(-1e4)  # no pull to yesterday
        model.persistence_logit.copy_(torch.logit(q)[:, None].expand(-1, 2))
    x = torch.randn(1, 12, 2)
    x[:, -2:, 0] = float("nan")
    with torch.no_grad():
        out = model.seasonal(x, torch.zeros(1, 4, 2))
    shift = 2 if last_seen else 0
    assert torch.allclose(out[0, :, 0], q[shift : shift + 4] * x[0, -3, 0], atol=1e-6)
    assert torch.allclose(out[0, :, 1], q[:4] * x[0, -1, 1], atol=1e-6)
    graph = E.ForecastGraph(model, 6, {"spread_scale": [1.0] * 2, "residual_decay": [0.9] * 2})
    u_hist, u_fut = (
        np.random.default_rng(i).standard_normal((1, n, 2)).astype(np.float32) for i, n in ((1, 12), (2, 6))
    )
    assert E.parity(graph, E.to_onnx_bytes(graph, 12, {}), 12, [(x.numpy(), u_hist, u_fut)]) < 1e-4


def test_a_down_sensor_is_pulled_to_its_last_value_by_the_weight_of_its_age_in_both_graphs() -> None:
    """KoVAE.gap_pull (calibration.gap_pull): a variable whose last 3 samples are missing moves towards its last
    value by the table's weight at row k + 3 (its lead time from that value), on top of the blends; a variable
    measured at the history's end is left alone, and a model without the table is unchanged. The forecast and
    plans graphs compute the same."""
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6)
    model = KoVAE(2, 2, cfg).eval()
    with torch.no_grad():
        model.seasonal_logit.fill_(-1e4)
        model.persistence_logit.fill_(-1e4)  # no blends: what moves is the pull
    x = torch.randn(1, 12, 2)
    x[:, -3:, 0] = float("nan")
    with torch.no_grad():
        assert torch.equal(model.seasonal(x, torch.ones(1, 4, 2)), torch.ones(1, 4, 2))
        model.gap_pull = torch.linspace(0.0, 0.9, 10)[:, None].repeat(1, 2)
        out = model.seasonal(x, torch.ones(1, 4, 2))
    g = model.gap_pull[3:7, 0]  # rows k + 3 - 1 for k = 1..4
    assert torch.allclose(out[0, :, 0], 1 + g * (x[0, -4, 0] - 1), atol=1e-6)
    assert torch.equal(out[0, :, 1], torch.ones(4))
    calib = {"spread_scale": [1.0] * 2, "residual_decay": [0.9] * 2}
    u_hist, u_fut = (
        np.random.default_rng(i).standard_normal((1, n, 2)).astype(np.float32) for i, n in ((1, 12), (2, 6))
    )
    graph = E.ForecastGraph(model, 6, calib)
    assert E.parity(graph, E.to_onnx_bytes(graph, 12, {}), 12, [(x.numpy(), u_hist, u_fut)]) < 1e-4
    plans = E.to_onnx_bytes(E.ForecastGraph(model, 6, calib, plans=True), 12, {})
    assert E.plans_parity(graph, plans, 12, x) < 1e-4


def test_a_plan_held_drives_its_loops_at_their_served_forecast() -> None:
    """model.loop_feedback with the naive blends: under the plan held, each step's loop drives the plant at the
    value the served forecast gives the control (the decoder's value, its fading miss and the blends towards
    yesterday and the last value), clipped to the loop's limits; a plan that is the plan held rolls out exactly
    so. Checked step by step against the model's own ``seasonal`` and ``correction``."""
    torch.manual_seed(1)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, loop_feedback=True)
    plan = PlanLayout(2, looped=(1,), setpoints=1, fast=(0, 3), limits=((-0.6, 0.6),))
    model = KoVAE(4, 6, cfg, plan).eval()
    with torch.no_grad():
        model.seasonal_logit.fill_(0.0)
        model.persistence_logit.fill_(-1.0)
    x, u, uf, _ = E._example(1, 10, 12, 0, (4, 6, 8), seed=4)
    u[..., 2], u[..., 4] = 1.0, 1.0  # the history: the control applied, the setpoint logged
    uf[..., 1:3], uf[..., 4] = 0.0, 1.0  # the plan: the loop decides, the setpoint sent
    uf[..., 0], uf[..., 3] = u[0, -1, 0], u[0, -1, 3]  # and the open-loop control and the setpoint held
    decay = torch.full((4,), 0.9)
    with torch.no_grad():
        mu = model.encode(x, u)[0]
        decoded, shift, z = model.served(x, u, mu, uf, decay)
        used = model.shifted(decoded, shift)[..., 3]  # the control's served forecast: the value that drove each step
        assert torch.allclose(used, model.forecast(x, u, uf, residual_decay=decay)[..., 3])
        corr = model.correction(x, mu, u, decay, 12)
        state = mu[:, -1]
        for k in range(12):
            need = model.decode_looped(state, uf[:, k])
            trajectory = torch.zeros(1, 12, 4)
            trajectory[:, k, 3] = need[:, 0]
            served = model.seasonal(x, trajectory + corr)[:, k, 3]
            assert torch.allclose(used[:, k], served.clamp(-0.6, 0.6), atol=1e-5)
            state = z[:, k]
        assert (used.abs() < 0.6).any()  # not every step at a limit: the blend is what is checked


@pytest.mark.parametrize("limit", [3.0, 0.3])
def test_the_answer_pulls_a_loops_forecast_to_its_last_value_alike_for_every_plan_in_both_graphs(limit) -> None:
    """calibration.loop_pull moves the answer of a control its loop decides, only: by q[k] (last value - the plan
    held's forecast of it), within the loop's limits. The measurements' forecasts and what drove the rollout stay
    as they were, a control the plan gives is answered as given, and every plan moves alike, so a plan's effect on
    the air passes whole (where no limit cuts it). Both graphs agree."""
    torch.manual_seed(1)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, loop_feedback=True)
    plan = PlanLayout(2, looped=(1,), setpoints=1, fast=(0, 3), limits=((-limit, limit),))
    model = KoVAE(4, 6, cfg, plan).eval()
    x, u, uf, noise = E._example(1, 10, 12, 0, (4, 6, 8), seed=4)
    u[..., 2], u[..., 4] = 1.0, 1.0  # the history: the control applied, the setpoint logged
    uf[..., 1:3], uf[..., 4] = 0.0, 1.0  # the plan: the loop decides, the setpoint sent
    uf[..., 0], uf[..., 3] = u[0, -1, 0], u[0, -1, 3]  # the open-loop control and the setpoint held: the plan held
    higher, given = uf.clone(), uf.clone()
    higher[..., 3] += 0.5
    given[..., 1:3] = torch.tensor([2.0, 1.0])  # the control given, past the tight limit
    calib = {"spread_scale": [1.0] * 4, "residual_decay": [0.9] * 4}
    graph = E.ForecastGraph(model, 12, calib)
    with torch.no_grad():
        before, moved_before, given_before = (graph(x, u, plan, noise)[0] for plan in (uf, higher, given))
        model.loop_pull = torch.linspace(0.9, 0.0, 8)[:, None]  # past its last row, its last row (0)
        after, moved_after, given_after = (graph(x, u, plan, noise)[0] for plan in (uf, higher, given))
    q = torch.cat([torch.linspace(0.9, 0.0, 8), torch.zeros(4)])
    assert torch.equal(after[..., :3], before[..., :3])  # the measurements as they were
    expected = (before[..., 3] + q * (x[0, -1, 3] - before[..., 3])).clamp(-limit, limit)  # last value -0.68
    assert torch.allclose(after[..., 3], expected, atol=1e-5) and (after - before).abs().max() > 1e-2
    assert torch.equal(given_after, given_before) and torch.all(given_after[..., 3] == 2.0)  # as given, unclipped
    if limit == 3.0:
        effect_before, effect_after = moved_before - before, moved_after - after
        assert torch.allclose(effect_after, effect_before, atol=1e-5) and effect_after[..., 3].abs().max() > 1e-3
    else:
        assert torch.any(after[..., 3] == -limit)  # the limit cuts the pull somewhere
    assert E.parity(graph, E.to_onnx_bytes(graph, 10, {}), 10) < 1e-4
    plans = E.to_onnx_bytes(E.ForecastGraph(model, 12, calib, plans=True), 10, {})
    assert E.plans_parity(graph, plans, 10) < 1e-4


def test_a_samples_loop_answers_the_disturbance_of_its_own_step_and_the_mean_stays() -> None:
    """The loops decide each step's control from the state the step starts from; a sample's loop also sees its
    step's disturbance (its noise). Decided from the state alone, every sample ran the first step's control
    alike and the loops' 15-min band had no width. The mean forecast, which has no noise, is as it was."""
    torch.manual_seed(1)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, loop_feedback=True)
    model = KoVAE(4, 6, cfg, PlanLayout(2, looped=(1,), setpoints=1, fast=(0, 3), limits=((-3.0, 3.0),))).eval()
    with torch.no_grad():
        model.koopman.log_noise.fill_(0.0)  # noise of one latent unit a step
    x, u, uf, noise = E._example(1, 10, 12, 30, (4, 6, 8), seed=4)
    u[..., 2], u[..., 4] = 1.0, 1.0  # the history: the control applied, the setpoint logged
    uf[..., 1:3], uf[..., 4] = 0.0, 1.0  # the plan: the loop decides, the setpoint sent
    calib = {"spread_scale": [1.0] * 4, "residual_decay": [0.9] * 4}
    graph = E.ForecastGraph(model, 12, calib)
    with torch.no_grad():
        mean, samples = graph(x, u, uf, noise)
        alone = graph(x, u, uf, noise[:, :0])[0]  # no samples asked for
    assert torch.allclose(mean, alone, atol=1e-5)  # the same to float rounding (other batch sizes)
    assert samples[0, :, 0, 3].std() > 1e-3  # the loop's first step differs between samples
    assert E.parity(graph, E.to_onnx_bytes(graph, 10, {}), 10) < 1e-4


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_the_loops_forecast_is_the_decoders_for_any_depth(layers: int) -> None:
    """``decode_looped`` (what each step's loops ask for, from z's first-layer product) is the decoder's own
    output for the looped controls, with or without hidden layers (with none, the first layer is the output)."""
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, decoder_layers=layers, loop_feedback=True)
    model = KoVAE(4, 6, cfg, PlanLayout(2, looped=(1,), setpoints=1, fast=(0, 3), limits=((-2.0, 2.0),))).eval()
    z, u = torch.randn(5, 8), torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(model.decode_looped(z, u), model.decode(z, u)[:, 3:], atol=1e-6)
        assert torch.allclose(model.decode_looped(z, u, model.first_layer(z)), model.decode(z, u)[:, 3:], atol=1e-6)


def test_a_sample_whose_loop_runs_at_its_limit_stays_there_however_the_width_scales_it() -> None:
    """A sample whose loop ran its control at the output limit keeps it there when the interval width scales
    the samples' deviations towards the mean (a spread scale below 1): scaled with the others, the band of a
    saturated loop stopped short of the limit it sat on (KLa_5 at 240 1/d). The other samples, and every
    measurement, are scaled as before; both graphs agree."""
    torch.manual_seed(1)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, seasonal_steps=6, loop_feedback=True)
    model = KoVAE(4, 6, cfg, PlanLayout(2, looped=(1,), setpoints=1, fast=(0, 3), limits=((-0.4, 0.4),))).eval()
    with torch.no_grad():
        model.koopman.log_noise.fill_(0.0)  # noise of one latent unit a step: samples reach the limits
    x, u, uf, noise = E._example(1, 10, 12, 30, (4, 6, 8), seed=4)
    u[..., 2], u[..., 4] = 1.0, 1.0  # the history: the control applied, the setpoint logged
    uf[..., 1:3], uf[..., 4] = 0.0, 1.0  # the plan: the loop decides, the setpoint sent
    bounds = {"lo": [-5.0] * 4, "hi": [5.0] * 4}
    wide, narrow = ({"spread_scale": [s] * 4, "residual_decay": [0.9] * 4, "band_bounds": bounds} for s in (1.0, 0.5))
    with torch.no_grad():
        mean, drawn = E.ForecastGraph(model, 12, wide)(x, u, uf, noise)
        graph = E.ForecastGraph(model, 12, narrow)
        mean_n, scaled = graph(x, u, uf, noise)
    assert torch.equal(mean, mean_n)
    at_limit = drawn[..., 3].abs() >= 0.4 - 1e-6
    assert at_limit.any() and not at_limit.all()
    assert torch.equal(scaled[..., 3][at_limit], drawn[..., 3][at_limit])  # kept at the limit
    inside = ~at_limit & ((drawn[..., 3] - mean[:, None, :, 3]).abs() > 1e-3)
    assert torch.all(
        (scaled[..., 3] - mean[:, None, :, 3]).abs()[inside] < (drawn[..., 3] - mean[:, None, :, 3]).abs()[inside]
    )
    measured = (drawn[..., :3] - mean[:, None, :, :3]).abs() > 1e-3
    assert torch.all(
        (scaled[..., :3] - mean[:, None, :, :3]).abs()[measured]
        < (drawn[..., :3] - mean[:, None, :, :3]).abs()[measured]
    )
    assert E.parity(graph, E.to_onnx_bytes(graph, 10, {}), 10) < 1e-4
    plans = E.to_onnx_bytes(E.ForecastGraph(model, 12, narrow, plans=True), 10, {})
    assert E.plans_parity(graph, plans, 10) < 1e-4
