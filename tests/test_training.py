"""The stable KoVAE and the retraining CLI: stability by construction, learning, resume, NaN guard, promotion."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from modelcard.store import current_version, set_current
from tests.conftest import clone_version
from training import forecast as forecasting
from training import loop, publish, run
from training import prepare as preparation
from training.config import ModelConfig, TrainConfig
from training.model import KoVAE, PlanLayout, StableKoopman


def test_spectral_radius_bounded_for_any_parameters() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        k = StableKoopman(z_dim=12, u_dim=3, real_modes=4, rho_max=0.999)
        with torch.no_grad():
            for p in (k.pair_logit, k.pair_angle, k.real_atanh):
                p.copy_(torch.randn(p.shape, generator=g) * (10.0 if trial % 2 else 1.0))
        A = k.matrix().detach().double()
        rho = torch.linalg.eigvals(A).abs().max().item()
        assert rho <= 0.999 * (1 + 1e-6)  # rho_max is held in float32
        assert same_spectrum(k.eigenvalues(), np.linalg.eigvals(A.numpy()), atol=1e-6)


def same_spectrum(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    """Equal as multisets of complex numbers (ordering of near-equal values may differ)."""
    b = list(b)
    for lam in a:
        j = int(np.argmin(np.abs(np.array(b) - lam)))
        if abs(b[j] - lam) > atol:
            return False
        b.pop(j)
    return not b


def test_free_rollout_of_10000_steps_stays_bounded() -> None:
    torch.manual_seed(1)
    k = StableKoopman(z_dim=16, u_dim=2, real_modes=4, rho_max=0.999)
    with torch.no_grad():
        k.pair_logit.fill_(20.0)  # every radius at rho_max, the worst case
        k.real_atanh.fill_(20.0)
        A, drive = k.matrix(), torch.ones(2) @ k.B.T + 1.0
        z = torch.full((16,), 5.0)
        bound = z.norm() + drive.norm() / (1 - 0.999)  # A is normal, so ||A^n|| = rho^n
        peak = 0.0
        for _ in range(10_000):
            z = A @ z + drive
            peak = max(peak, z.norm().item())
    assert np.isfinite(peak) and peak <= bound.item() * 1.001


def test_residual_fading_is_bounded_for_any_parameters_and_fades() -> None:
    """The learned fading factor of the decoder's miss lies in [0, 1] whatever its parameter, so the miss it
    carries can never grow, and it fades with lead time."""
    model = KoVAE(3, 2, ModelConfig(z_dim=8, h_dim=16, real_modes=2, rho_max=0.99)).eval()
    with torch.no_grad():
        for value in (-1e4, -3.0, 0.0, 3.0, 1e4):
            model.decay_logit.fill_(value)
            g = model.residual_decay()
            assert torch.all(g >= 0) and torch.all(g <= 1)
        model.decay_logit.fill_(1.0)  # g about 0.73: the loop above left it at 1, where nothing fades
        g = model.residual_decay()
        x, z, u = torch.ones(1, 4, 3), torch.zeros(1, 4, 8), torch.zeros(1, 4, 2)
        corr = model.correction(x, z, u, g, 10_000)
        assert torch.all(corr[0, -1].abs() <= corr[0, 0].abs())  # it fades
        # A sensor down for the last 2 steps hands on its last measured miss, faded by those 2 steps too; one never
        # measured hands on nothing.
        x[0, -2:, 0], x[0, :, 1] = float("nan"), float("nan")
        gap = model.correction(x, z, u, g, 5)
    assert torch.allclose(gap[0, :, 0], corr[0, :5, 0] * g[0] ** 2) and torch.all(gap[0, :, 1] == 0)
    assert torch.allclose(gap[0, :, 2], corr[0, :5, 2])


def test_forecast_loss_is_that_of_the_served_forecast_with_step_weights() -> None:
    """The training loss scores the forecast the graph serves (latent rollout plus the fading miss), and the
    step weights follow persistence's error: the first steps, where persistence is good, weigh most."""
    torch.manual_seed(0)
    model = KoVAE(3, 2, ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0)).eval()
    x, u = torch.randn(4, 30, 3).cumsum(1) * 0.1, torch.randn(4, 30, 2)
    tcfg = TrainConfig()
    with torch.no_grad():
        pred = model.losses(x[:, :20], u[:, :20], x[:, 20:], u[:, 20:], tcfg)["pred"]
        served = model.forecast(x[:, :20], u[:, :20], u[:, 20:], residual_decay=model.residual_decay())
    assert float(pred) == pytest.approx(float(((served - x[:, 20:]) ** 2).mean()), rel=1e-5)
    w = loop.step_weights(x[:, :20], x[:, 20:], power=0.5)
    assert w.mean() == pytest.approx(1.0) and w[0] > w[-1]
    assert torch.allclose(loop.step_weights(x[:, :20], x[:, 20:], power=0.0), torch.ones(10))
    with torch.no_grad():
        weighted = model.losses(x[:, :20], u[:, :20], x[:, 20:], u[:, 20:], tcfg, w)["pred"]
        per_step = ((served - x[:, 20:]) ** 2).mean((0, 2))
    assert float(weighted) == pytest.approx(float((per_step * w).sum() / w.sum()), rel=1e-5)


def test_direct_ridge_reaches_the_best_possible_error_of_a_known_process() -> None:
    """The influent-floor forecaster on a daily cycle plus AR(1) noise: the best any forecaster can do h steps
    ahead is the innovation spread sigma * sqrt(sum_{k<h} phi^2k); the ridge must reach it, and not beat it."""
    from modelcard.card import Calendar
    from training.evaluate import DirectRidge

    rng = np.random.default_rng(0)
    phi, sigma, n = 0.97, 0.1, 30 * 96

    def series() -> tuple[np.ndarray, np.ndarray]:
        minutes = 15.0 * np.arange(n)
        noise = np.zeros(n)
        for t in range(1, n):
            noise[t] = phi * noise[t - 1] + sigma * rng.standard_normal()
        x = np.stack([np.sin(2 * np.pi * minutes / 1440) + noise, rng.standard_normal(n)], 1)
        return x, minutes

    model = DirectRidge([0], lags=8, calendar=Calendar(daily=1, weekly=0), ridge=1e-8)
    model.fit([series(), series()], (1, 20))
    x, minutes = series()
    last = np.arange(7, n - 20)
    x_hist = np.stack([x[i - 7 : i + 1] for i in last])
    for h in (1, 20):
        rmse = np.sqrt(np.mean((model.forecast(x_hist, minutes[last], h)[:, 0] - x[last + h, 0]) ** 2))
        best = sigma * np.sqrt(np.sum(phi ** (2 * np.arange(h))))
        assert rmse == pytest.approx(best, rel=0.06)


def test_gradients_are_finite_and_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0)
    model = KoVAE(4, 2, cfg)
    t = torch.linspace(0, 6, 40)
    x = torch.stack([torch.sin(t + i) for i in range(4)], -1).repeat(8, 1, 1) + 0.01 * torch.randn(8, 40, 4)
    u = torch.randn(8, 40, 2) * 0.1
    tcfg = TrainConfig()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        losses = model.losses(x[:, :20], u[:, :20], x[:, 20:], u[:, 20:], tcfg)
        opt.zero_grad()
        losses["total"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        first = first if first is not None else {k: float(v.detach()) for k, v in losses.items()}
    assert float(losses["pred"].detach()) < 0.5 * first["pred"]
    assert float(losses["total"].detach()) < first["total"]


def test_tiny_model_beats_persistence_on_held_out_scenarios(trained_store) -> None:
    store, version = trained_store
    metrics = json.loads((store / version / "metrics.json").read_text())
    head = metrics["headline"]
    assert head["kovae"] and set(head["kovae"]) == set(head["persistence"])  # the loop below must run
    for h in head["kovae"]:
        assert head["kovae"][h]["nrmse_all"] < head["persistence"][h]["nrmse_all"]
    # At its longest horizon it beats the better of persistence and seasonal naive (pooled skill > 0). The mean
    # of per-variable ratios to persistence is not asserted: a variable that hardly moves swings it.
    longest = metrics["regimes"]["all"]["pooled_skill_all"]
    assert longest[max(longest, key=int)] > 0
    assert 0.6 < metrics["coverage_80_test"] < 0.95
    assert current_version(store) == version
    for name in (
        "card.json",
        "model.onnx",
        "plans.onnx",
        "weights.pt",
        "report.md",
        "loss.png",
        "log.csv",
        "metrics.json",
    ):
        assert (store / version / name).stat().st_size > 0


def test_the_report_says_where_the_model_loses_to_the_naive_forecasts() -> None:
    """A model with the best mean NRMSE that loses in one regime was reported as beating every baseline, while the
    gate (the worst regime's pooled skill) scored it below 0."""
    from training.report import losses_in_words

    headline = {"kovae": {"16": {"nrmse_all": 0.5}}, "persistence": {"16": {"nrmse_all": 0.7}}}
    regimes = {
        "normal/constant_setpoints": {"pooled_skill_all": {"1": 0.1, "16": -0.139}},
        "storm/open_loop_fixed": {"pooled_skill_all": {"1": 0.2, "16": 0.3}},
        "all": {"pooled_skill_all": {"1": 0.15, "16": 0.05}},
    }
    lines = losses_in_words({"headline": headline, "regimes": regimes}, 15)
    assert lines[0] == "- At 4 h the KoVAE (mean NRMSE 0.500) beats every baseline's mean NRMSE."
    assert lines[1:] == [
        "- **In normal/constant_setpoints the KoVAE loses to the better naive forecast** (pooled skill, all "
        "variables: -0.139 at 4 h)."
    ]


@pytest.fixture
def prepared(tiny_cfg, tiny_data):
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, epochs=4, checkpoint_every=2))
    return cfg, preparation.prepare(cfg)


def test_serving_feeds_the_model_what_training_fed_it(trained_store, prepared) -> None:
    """Engineering-unit arrays through the service runtime (scalers and calendar inputs from the card)
    give the forecast training evaluated: the two paths build the model's inputs the same way."""
    from export.onnx_export import load_model
    from modelcard.card import Calendar
    from modelcard.runtime import ModelRuntime

    store, version = trained_store
    _, p = prepared
    model, card = load_model(store / version)
    assert Calendar.from_card(card) == p.calendar and p.calendar.size == 4  # tiny: daily harmonics only
    w = p.test
    # The honest request: the looped controls left to their loops (NaN), the setpoints' history and plan sent.
    u_fut, s_hist, s_fut = p.request(w, "honest")
    assert np.isnan(u_fut[..., p.looped]).any() and s_hist is not None
    torch_mean, _ = forecasting.predict(model, p, w, calib=card["calibration"])
    measured = w.x_hist[..., : p.n_targets]  # the service is sent measurements; the looped controls are in u
    runtime = ModelRuntime(store / version)
    served = runtime.predict(measured, w.u_hist, u_fut, w.t_last, s_hist=s_hist, s_fut=s_fut).mean
    assert served.shape == torch_mean.shape  # the measurements, then the looped controls' forecasts
    assert np.max(np.abs(served - torch_mean) / p.x_std) < 1e-3
    shifted = runtime.predict(measured, w.u_hist, u_fut, w.t_last + 360, s_hist=s_hist, s_fut=s_fut).mean
    assert np.max(np.abs(shifted - torch_mean) / p.x_std) > 1e-2  # the clock matters


def test_resume_continues_exactly(prepared, tmp_path: Path) -> None:
    cfg, p = prepared
    straight, log_a = loop.train(cfg, p, tmp_path / "a")
    loop.train(cfg, p, tmp_path / "b", stop_after=2)  # "killed" after epoch 2 (checkpointed at 2)
    resumed, log_b = loop.train(cfg, p, tmp_path / "b", resume=True)
    assert [r["train_loss"] for r in log_a] == [r["train_loss"] for r in log_b]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_with_other_settings_than_the_run_is_refused_naming_them(prepared, tmp_path: Path) -> None:
    """A run started with 300 epochs and resumed without the override stopped at the preset's 20 and exported,
    silently; another width crashed in load_state_dict. Both are refused, naming the setting."""
    cfg, p = prepared
    loop.train(cfg, p, tmp_path / "r", stop_after=2)
    for change, named in [
        (replace(cfg, train=replace(cfg.train, epochs=cfg.train.epochs + 5)), r"train\.epochs: \d+ in the checkpoint"),
        (replace(cfg, model=replace(cfg.model, h_dim=cfg.model.h_dim * 2)), r"model\.h_dim: \d+ in the checkpoint"),
    ]:
        with pytest.raises(loop.TrainingFailed, match=named):
            loop.train(change, p, tmp_path / "r", resume=True)
    loop.train(replace(cfg, train=replace(cfg.train, calibration_samples=40)), p, tmp_path / "r", resume=True)


def test_weight_decay_spares_the_operator_spectrum() -> None:
    """Decay would pull every radius towards rho_max / 2: only weight matrices are decayed."""
    model = KoVAE(3, 2, ModelConfig(z_dim=6, h_dim=8, real_modes=2))
    opt = loop.make_optimizer(model, TrainConfig(weight_decay=0.5, lr=0.1))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for v in model.parameters():
        v.grad = torch.zeros_like(v)
    opt.step()  # zero gradients: only decay moves a parameter
    for name, value in model.named_parameters():
        moved = not torch.equal(value, before[name])
        assert moved == (value.ndim >= 2), name


def test_nan_loss_rolls_back_and_halves_the_learning_rate(prepared, tmp_path: Path, capsys) -> None:
    cfg, p = prepared
    _, log = loop.train(cfg, p, tmp_path / "nan", inject_nan_at=[3])
    assert len(log) == cfg.train.epochs
    assert log[2]["lr"] == pytest.approx(loop.learning_rate(cfg, 2) / 2)  # epoch 3 redone at half the rate
    assert "rolled back to epoch 2" in capsys.readouterr().err
    with pytest.raises(loop.TrainingFailed, match="NaN/inf 4 times"):
        loop.train(cfg, p, tmp_path / "nan2", inject_nan_at=[1, 1, 1, 1])


def test_promotion_gate_keeps_the_better_model(store_copy, tiny_cfg, tiny_data, tmp_path: Path) -> None:
    store, version = store_copy
    p = preparation.prepare(tiny_cfg)
    served = publish.score_served(store, p, tiny_cfg.train.history)
    assert served is not None and served[0] == version
    metrics = json.loads((store / version / "metrics.json").read_text())
    assert served[1] == pytest.approx(metrics["score"], rel=1e-3)  # ONNX re-evaluation agrees with training

    def candidate(name: str) -> Path:
        """A version exported into a run folder, as training.run leaves it for the gate."""
        clone_version(store, version, name)
        target = tmp_path / "runs" / name / "export" / name
        target.parent.mkdir(parents=True)
        (store / name).rename(target)
        return target

    worse = candidate("worse")  # the score is a skill: higher is better
    publish.promote_if_better(store, worse, served[1] - 0.5, p, tiny_cfg, force=False, never=False)
    assert current_version(store) == version
    assert (worse / "model.onnx").exists() and not (store / "worse").exists()  # the store is left alone
    assert json.loads((worse / "gate.json").read_text())["passed"] is False
    publish.promote_if_better(store, worse, served[1] - 0.5, p, tiny_cfg, force=True, never=False)
    assert current_version(store) == "worse"
    set_current(store, version)
    tie = candidate("tie")  # the same score to float noise (PyTorch against ONNX Runtime) does not pass
    publish.promote_if_better(store, tie, served[1] + 1e-6, p, tiny_cfg, force=False, never=False)
    assert current_version(store) == version and not (store / "tie").exists()
    assert "ties" in json.loads((tie / "gate.json").read_text())["why"]
    # A higher score bought with a deeper loss to the naive forecasts in one cell and lead time does not pass.
    deeper = candidate("deeper")
    regimes = json.loads(json.dumps(served[2]))
    cell = next(c for c in regimes if c != "all")
    step = list(regimes[cell]["pooled_skill_all"])[-1]
    regimes[cell]["pooled_skill_all"][step] = min(0.0, served[2][cell]["pooled_skill_all"][step]) - 0.1
    publish.promote_if_better(store, deeper, served[1] + 0.5, p, tiny_cfg, force=False, never=False, regimes=regimes)
    gate = json.loads((deeper / "gate.json").read_text())
    assert current_version(store) == version and gate["passed"] is False and "> served" in gate["why"]
    assert len(gate["deepened_losses"]) == 1 and gate["deepened_losses"][0].startswith(f"{cell} at ")
    better = candidate("better")
    publish.promote_if_better(
        store, better, served[1] + 0.5, p, tiny_cfg, force=False, never=False, regimes=json.loads(json.dumps(served[2]))
    )
    assert current_version(store) == "better"
    assert json.loads((store / "better" / "gate.json").read_text())["passed"] is True
    assert sorted(d.name for d in store.iterdir() if d.is_dir()) == ["better", version, "worse"]
    kept = candidate("kept")
    publish.promote_if_better(store, kept, served[1] + 1.0, p, tiny_cfg, force=False, never=True)
    assert current_version(store) == "better" and (store / "kept" / "card.json").exists()


def test_promote_cli_and_rollback(store_copy, tmp_path: Path, capsys) -> None:
    from training.promote import main

    store, version = store_copy
    clone_version(store, version, "v2")
    assert main(["v2", "--store", str(store)]) == 0
    assert current_version(store) == "v2"
    assert main([version, "--store", str(store)]) == 0  # rollback
    assert current_version(store) == version
    assert main(["nope", "--store", str(store)]) == 2
    assert current_version(store) == version
    clone_version(store, version, "v3")
    (store / "v3").rename(tmp_path / "v3")
    assert main(["--add", str(tmp_path / "v3"), "--promote", "--store", str(store)]) == 0
    assert current_version(store) == "v3"
    assert main(["--add", str(tmp_path / "v3"), "--store", str(store)]) == 2  # never overwritten
    assert main(["--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "* v3  score " in listing and f"  {version}  score " in listing


def test_cli_refuses_bad_overrides(capsys) -> None:
    assert run.main(["--preset", "tiny", "train.epochs=zero"]) == 2
    assert "train.epochs: expected a number" in capsys.readouterr().err


def test_accuracy_bench_reproduces_the_stored_metrics_through_onnx(trained_store) -> None:
    """bench/accuracy.py rebuilds the held-out windows from the card alone and scores them with ONNX Runtime, in
    the request a plant can send: its overall row and its per regime/policy tables (honest, then held, applied
    and bare) must give the figures training stored (computed with PyTorch)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    store, version = trained_store
    out = subprocess.run(
        [sys.executable, "bench/accuracy.py", "--store", str(store), "--samples", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    stored = json.loads((store / version / "metrics.json").read_text())
    lines = out.splitlines()
    for h, want in stored["headline"]["kovae"].items():
        row = next(r.split() for r in lines if r.split()[:3] == ["all", str(stored["test_windows"]), h])
        assert float(row[3].rstrip("%")) == pytest.approx(100 * want["rel_rmse_top5"], abs=0.06)
        assert float(row[4]) == pytest.approx(want["nrmse_all"], abs=6e-4)
        assert float(row[5].rstrip("%")) == pytest.approx(100 * want["skill_vs_persistence"], abs=0.06)

    def table_after(title: str, want: dict) -> None:
        after = lines[next(i for i, r in enumerate(lines) if r.startswith(title)) :]
        for cell, r in want.items():
            row = next(x.split() for x in after if x.split()[:2] == [cell, str(r["windows"])])
            cells = [*r["pooled_skill_all"].values(), *r["pooled_skill_plant"].values()]
            assert [float(c) for c in row[2 : 2 + len(cells)]] == pytest.approx(cells, abs=2e-3)

    # The gate's figure per regime/policy cell; the tiny test scenario runs closed loop and open loop.
    assert set(stored["regimes"]) == {"normal/constant_setpoints", "normal/open_loop_excited", "all"}
    table_after("pooled skill per regime/policy", stored["regimes"])
    for request, r in stored["requests"].items():
        table_after(f"told otherwise, {request}", r["regimes"])
    # The honest request differs from the applied one where the loops are closed, and nowhere else.
    honest, applied = stored["regimes"], stored["requests"]["applied"]["regimes"]
    skill = lambda table, cell: list(table[cell]["pooled_skill_all"].values())  # noqa: E731
    assert skill(honest, "normal/open_loop_excited") == pytest.approx(skill(applied, "normal/open_loop_excited"))
    assert skill(honest, "normal/constant_setpoints") != pytest.approx(skill(applied, "normal/constant_setpoints"))
    assert "what the loops will apply" in out and "KLa_5" in out
    # The air the loop will apply, against the last value, as the report stored it (yesterday too: the bench reads
    # it from the history, which the tiny model's 20 steps do not reach, the report from the scenario).
    loop = stored["loop_outputs"]["KLa_5"]
    m = re.search(r"KLa_5 .* windows: [\d.]+ h ([\d.e+-]+) \(([\d.e+-]+) / ([\d.e+-]+)\)", out)
    assert m is not None, out
    assert [float(v) for v in m.groups()[:2]] == pytest.approx(
        [loop["rmse"]["1"], loop["persistence_rmse"]["1"]], rel=2e-3
    )
    assert loop["yesterday_rmse"]["1"] > 0
    assert re.search(r"80% band coverage: every lead time [\d.]+%", out) and 0 < loop["coverage_80"] <= 1
    assert "met  " in out or "NOT MET" in out


def test_influent_oracle_bench_feeds_the_true_future_influent(prepared) -> None:
    """bench/influent_oracle.py appends the influent of each future step to the known inputs: a one-lag ARX
    given them forecasts the influent almost exactly, and far better than the same ARX without them."""
    import importlib.util

    from tests.conftest import ROOT
    from training.evaluate import ARX

    spec = importlib.util.spec_from_file_location("influent_oracle", ROOT / "bench" / "influent_oracle.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def influent_error(p: preparation.Prepared) -> float:
        w = p.test
        pred = ARX(1).fit(p.train_series).forecast(p.nx(w.x_hist), p.inputs(w)[1])
        return float(np.sqrt(np.mean((pred - p.nx(w.x_fut))[..., bench.INFLUENT] ** 2)))

    cfg, _ = prepared
    as_run = replace(cfg.model, disturbance_inputs=False, setpoint_inputs=False)  # as the bench runs
    p = preparation.prepare(replace(cfg, model=as_run))
    known = bench.influent_known(p)
    assert known.inputs(known.test)[1].shape[-1] == p.inputs(p.test)[1].shape[-1] + len(bench.INFLUENT)
    assert influent_error(known) < 0.05 < 0.3 < influent_error(p)


def test_influent_oracle_bench_trains_scores_and_prints_on_the_tiny_preset(tiny_cfg, tiny_data) -> None:
    """The oracle bench runs to its end (it once crashed after its training: the baselines were fitted with the
    influent and scored without it) and prints the per-regime table of the model it trained."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run(
        [sys.executable, "bench/influent_oracle.py", "--preset", "tiny", f"data.cache_dir={tiny_cfg.data.cache_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "with the true future influent as a known input" in out.stdout and "gate score" in out.stdout


def test_scenarios_store_the_setpoints_the_loops_followed(prepared, tiny_data) -> None:
    """Each cached scenario stores its loops' setpoints (the catalog's setpoint variables), the ones drawn from
    the scenario's seed (plant.operation.operation), each interval's mean; an open-loop plant logs none. The
    simulated DO follows its setpoint wherever the loop is not saturated, which a setpoint drawn in another
    order would not."""
    from plant.bsm1 import KLA_LIMITS
    from plant.operation import operation
    from plant.scenarios import scenarios

    cfg, p = prepared
    assert p.catalog.setpoint_names == ("SO_5_setpoint", "SNO_2_setpoint")
    closed = 0
    for sid, d in tiny_data.items():
        sc = next(s for s in scenarios(cfg.data) if s.id == sid)
        op = operation(cfg.data, sc)
        if not op.loops:
            assert np.isnan(d.s).all(), sid
            continue
        closed += 1
        minutes = np.round(d.t_minutes - sc.start_day * 1440).astype(int)
        drawn = np.stack([[loop.setpoint[m - 15 : m].mean() for m in minutes] for loop in op.loops], 1)
        np.testing.assert_allclose(d.s, drawn)
        assert np.all((d.s[:, 0] >= cfg.data.do_setpoints[0]) & (d.s[:, 0] <= cfg.data.do_setpoints[1]))
        # Where KLa5 is below its limit the loop holds the oxygen at its setpoint (another scenario's setpoints
        # miss it by 0.4-1.5 g O2/m3 here).
        oxygen = d.x[:, p.catalog.target_names.index("SO_5")]
        held = d.u[:, p.catalog.control_names.index("KLa_5")] < 0.95 * KLA_LIMITS[1]
        assert held.mean() > 0.3 and np.median(np.abs(oxygen - d.s[:, 0])[held]) < 0.2, sid
    assert closed >= 2


def test_requests_tell_what_a_plant_can_send_and_training_draws_every_kind(prepared) -> None:
    """The honest request leaves each closed loop's control to its loop (its column 0, its flag 0) and sends the
    loop's setpoint (value, flag 1); an open-loop window (no setpoint logged) gets its controls planned and no
    setpoint; "applied" gives every control's true future. Training draws per window and loop what each is told:
    a closed loop's control left to it in about train.loop_unknown_share of the windows, and then always with its
    setpoint; setpoints held at their last value in about train.setpoint_held_share of those told."""
    import torch

    from training.loop import with_requests

    cfg, p = prepared
    n_u, n_l, n_s = len(p.u_mean), len(p.looped), p.n_setpoints
    assert (n_l, n_s) == (2, 2) and p.fed_columns() == n_u + n_l + 2 * n_s
    assert [p.catalog.control_names[c] for c in p.looped] == ["KLa_5", "Q_intr"]
    closed = p.closed_loops(p.test)
    assert closed.any() and (~closed).any()  # the tiny test set holds a closed- and an open-loop scenario
    honest_h, honest_f = p.inputs(p.test, request="honest")
    applied_h, applied_f = p.inputs(p.test, request="applied")
    np.testing.assert_array_equal(honest_h, applied_h)  # the history is what it was
    for j, c in enumerate(p.looped):
        k = closed[:, j]
        assert (honest_f[k][..., c] == 0).all() and (honest_f[k][..., n_u + j] == 0).all()
        assert (honest_f[~k][..., n_u + j] == 1).all() and (applied_f[..., n_u + j] == 1).all()
        np.testing.assert_array_equal(honest_f[~k][..., c], applied_f[~k][..., c])
    flags = honest_f[..., n_u + n_l + n_s : n_u + n_l + 2 * n_s]
    assert (flags[closed.all(1)] == 1).all() and (flags[~closed.any(1)] == 0).all()
    held = p.inputs(p.test, request="held")[1][..., n_u + n_l : n_u + n_l + n_s]
    np.testing.assert_array_equal(held[closed.all(1)], np.repeat(held[closed.all(1)][:, :1], held.shape[1], 1))

    t = cfg.train
    uh, uf = (torch.from_numpy(a) for a in p.inputs(p.train, request="applied"))
    closed_t = torch.from_numpy(p.closed_loops(p.train))
    gh, gf = with_requests(uh, uf, closed_t, p, t, torch.Generator().manual_seed(0))
    unknown = gf[:, 0, n_u : n_u + n_l] == 0  # (N, loops): the control left to its loop
    assert not unknown[~closed_t].any()  # an open loop's control is always planned
    share = unknown[closed_t].float().mean()
    assert abs(share - t.loop_unknown_share) < 0.1
    told = gf[:, 0, n_u + n_l + n_s :][:, list(p.loop_setpoints)] == 1
    assert told[unknown].all()  # a control left to its loop always comes with its setpoint
    for j, sp in enumerate(p.loop_setpoints):
        value = n_u + n_l + sp
        k = told[:, j] & closed_t[:, j]
        planned = (gf[k][..., value] == uf[k][..., value]).all(1)
        held = (gf[k][..., value] == gh[k][:, -1:, value]).all(1)  # held at the history's last value
        assert (planned | held).all() and (held & ~planned).any()
    np.testing.assert_array_equal(gf[..., n_u + n_l + 2 * n_s :].numpy(), uf[..., n_u + n_l + 2 * n_s :].numpy())


def test_pooled_skill_has_the_known_answer_and_a_still_variable_cannot_dominate_it() -> None:
    from training.evaluate import pooled_skill, skill

    rng = np.random.default_rng(0)
    n, H, nx = 4000, 3, 4
    true = rng.standard_normal((n, H, nx))
    scale = np.ones(nx)
    ref = true + rng.standard_normal((n, H, nx))  # error variance 1
    worse = true + 2 * rng.standard_normal((n, H, nx))  # error variance 4: not the better reference
    model = true + 0.5 * rng.standard_normal((n, H, nx))  # error variance 1/4: skill 1 - sqrt(1/4) = 0.5
    assert pooled_skill(model, [ref, worse], true, scale) == pytest.approx(np.full(H, 0.5), abs=0.03)
    assert pooled_skill(ref, [ref, worse], true, scale) == pytest.approx(np.zeros(H))
    # A variable that hardly moves (SNO_2 at 0.0005 g N/m3): persistence is almost exact there, so a mean of
    # per-variable ratios explodes on an absolute error of 0.02, while the pooled skill barely notices it.
    true[..., 3] = 5e-4
    ref[..., 3] = 5e-4 + 1e-9
    model[..., 3] = 5e-4 + 0.02
    scale = np.array([1.0, 1.0, 1.0, 0.5])  # its std over all test scenarios, where it does move
    pooled = pooled_skill(model, [ref], true, scale)
    assert np.all(pooled > 0.45)
    rmse = lambda f: np.sqrt(np.mean((f - true) ** 2, axis=0))  # noqa: E731
    assert np.mean(skill(rmse(model), rmse(ref)), axis=-1).max() < -1e5  # the metric that breaks


def test_a_forecast_missing_where_the_truth_was_measured_scores_no_skill() -> None:
    """The model's error was averaged over what it answered, the references' over every window: a NaN forecast
    on the hardest windows left them out of the model's side alone, and its skill rose (-0.27 -> 0.69)."""
    from training.evaluate import pooled_skill

    rng = np.random.default_rng(1)
    true = rng.standard_normal((200, 3, 2))
    ref = true + rng.standard_normal(true.shape)
    model = true + 1.2 * rng.standard_normal(true.shape)
    model[:100, 1:] = np.nan  # unanswered at steps 2 and 3 on half the windows
    skill = pooled_skill(model, [ref], true, np.ones(2))
    assert np.isfinite(skill[0]) and np.isnan(skill[1:]).all()
    true[:100, 1:] = np.nan  # nothing measured there either: nothing to answer
    assert np.isfinite(pooled_skill(model, [ref], true, np.ones(2))).all()


def test_gate_score_is_the_worst_regime() -> None:
    """A model that is excellent on one regime and worse than naive on another scores by the bad one."""
    from training.evaluate import gate_score

    regimes = {
        "normal": {"pooled_skill_all": {"1": 0.9, "20": 0.9, "96": 0.9}},
        "storm": {"pooled_skill_all": {"1": -0.3, "20": 0.3, "96": 0.3}},
        "all": {"pooled_skill_all": {"1": 0.5, "20": 0.7, "96": 0.7}},
    }
    assert gate_score(regimes) == pytest.approx(0.1)
    # A regime with nothing scored (NaN) makes the score NaN in any order: min() skipped it when it came second.
    for order in (["normal", "unscored"], ["unscored", "normal"]):
        scored = {"unscored": {"pooled_skill_all": {"1": float("nan")}}, "normal": regimes["normal"]}
        assert np.isnan(gate_score({k: scored[k] for k in order}))


def test_served_accuracy_with_a_sensor_down_is_what_the_report_states(trained_store, tiny_cfg) -> None:
    """The report's figure for one sensor's last 2 hours missing, reproduced through ONNX Runtime (what the
    service runs, with NaN for the missing samples as the service sends them): the served model forecasts
    through the gap as accurately as the report says."""
    from modelcard.runtime import ModelRuntime
    from training.gaps import with_gap
    from training.scoring import scored_table

    store, version = trained_store
    metrics = json.loads((store / version / "metrics.json").read_text())
    p = preparation.prepare(tiny_cfg)
    w = with_gap(p.test, "last_2h", p.catalog.sample_minutes, p.n_targets)
    assert np.isnan(w.x_hist[:, -1, : p.n_targets]).any()
    u_fut, s_hist, s_fut = p.request(w, "honest")  # what the report scores: the request a plant can send
    rt = ModelRuntime(store / version)
    mean = rt.predict(w.x_hist[..., : p.n_targets], w.u_hist, u_fut, w.t_last, s_hist=s_hist, s_fut=s_fut).mean
    table = scored_table(p, mean, None, w, {k: "all" for k in p.groups})
    stated = metrics["history_gaps"]["last_2h"]
    assert table["all"]["pooled_skill_all"] == pytest.approx(stated, abs=2e-3)


def test_dropout_keeps_one_mask_per_sequence_and_old_cards_keep_element_wise_dropout() -> None:
    """A (batch, steps, features) tensor loses the same features at every step of a sequence, a different set
    per sequence; the kept ones are scaled by 1 / (1 - p); eval mode passes x through. A card written before
    model.dropout_per_sequence rebuilds nn.Dropout (its training, as run)."""
    from export.onnx_export import model_config
    from training.model import SequenceDropout, dropout

    torch.manual_seed(0)
    layer = SequenceDropout(0.5).train()
    out = layer(torch.ones(64, 96, 32))
    kept = out != 0
    assert torch.equal(kept, kept[:, :1].expand_as(kept))  # the same features at every step
    assert not torch.equal(kept[0], kept[1])  # another mask per sequence
    assert set(out.unique().tolist()) == {0.0, 2.0} and 0.4 < kept.float().mean().item() < 0.6
    rows = layer(torch.ones(512, 32)) != 0
    assert not torch.equal(rows[:, :1].expand_as(rows), rows)  # (rows, features): a mask per element
    x = torch.randn(4, 8, 16)
    assert torch.equal(layer.eval()(x), x)
    assert isinstance(dropout(ModelConfig()), SequenceDropout)
    old = model_config({"model": {"type": "kovae", "dropout": 0.2}})
    assert not old.dropout_per_sequence and isinstance(dropout(old), torch.nn.Dropout)


def test_decoder_width_is_its_own_setting_and_old_cards_keep_h_dim() -> None:
    widths = lambda m: [layer.out_features for layer in m.decoder if isinstance(layer, torch.nn.Linear)]  # noqa: E731
    two = {"z_dim": 8, "h_dim": 32, "real_modes": 2, "decoder_layers": 2}
    assert widths(KoVAE(5, 3, ModelConfig(**two, decoder_dim=16))) == [16, 16, 5]
    assert widths(KoVAE(5, 3, ModelConfig(**two))) == [32, 32, 5]  # decoder_dim 0


def test_default_decoder_reads_z_and_the_controls_and_old_cards_z_alone() -> None:
    """The default decoder has one hidden layer over z and the step's controls (2 of the 3 known inputs here);
    a card from before decoder_controls rebuilds a decoder over z alone, so its weights still load."""
    from export.onnx_export import model_config

    model = KoVAE(5, 3, ModelConfig(z_dim=8, h_dim=32, real_modes=2), PlanLayout(2))
    assert (model.decoder[0].in_features, model.decoder[0].out_features) == (8 + 2, 32)
    assert [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)] == [32, 5]
    card_model = {"type": "KoVAE", **ModelConfig(z_dim=8, h_dim=32, real_modes=2).__dict__}
    assert model_config({"model": card_model}).decoder_controls
    del card_model["decoder_controls"]  # a card written before it
    legacy = KoVAE(5, 3, model_config({"model": card_model}), PlanLayout(2))
    assert legacy.decoder[0].in_features == 8


def test_headline_skill_leaves_out_a_variable_persistence_forecasts_exactly() -> None:
    """BSM1's files hold the temperature at 15 C: persistence is exact there, and 1 - RMSE / 0 must not enter the
    mean skill (it printed -7e11 % for one held-out scenario)."""
    from training import evaluate as ev

    rmse = np.array([[0.5, 0.2, 0.01]])
    ref = np.array([[1.0, 0.4, 1e-5]])  # the third variable moves only in the solver's last digits
    head = ev.headline({"rmse": rmse, "mean_abs_true": np.ones_like(rmse)}, {"rmse": ref}, np.ones(3), [0, 1, 2])
    assert head["1"]["skill_vs_persistence"] == pytest.approx(0.5)


def test_only_fast_outputs_read_the_plan_so_a_loops_correlation_cannot_decode_as_a_response() -> None:
    """Effluent ammonium learned more air -> more ammonium from the decoder's reading of KLa (under a DO loop they
    rise together): the what-if sign was wrong at 82% of closed-plant origins. With model.decoder_fast_only a
    slow output decodes the same under any plan from the same z, a fast one does not; cards from before it keep
    every output reading the plan."""
    from export.onnx_export import model_config

    z, plan_a, plan_b = torch.randn(6, 8), torch.randn(6, 4), torch.randn(6, 4)
    layout = PlanLayout(2, (), 0, (1, 3))
    model = KoVAE(5, 4, ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0), layout).eval()
    moved = (model.decode(z, plan_a) - model.decode(z, plan_b)).abs().amax(0)
    assert torch.all(moved[[0, 2, 4]] == 0) and torch.all(moved[[1, 3]] > 1e-4)
    card_model = {"type": "KoVAE", **ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0).__dict__}
    del card_model["decoder_fast_only"]  # a card written before it
    legacy = KoVAE(5, 4, model_config({"model": card_model}), layout).eval()
    legacy.load_state_dict(model.state_dict())  # the mask is not a weight: old weights load
    assert torch.all((legacy.decode(z, plan_a) - legacy.decode(z, plan_b)).abs().amax(0) > 1e-4)


def test_no_plan_moves_the_exogenous_outputs_and_old_cards_decode_them_from_all_of_z() -> None:
    """With model.exogenous_modes the influent is decoded from latent coordinates the plan does not drive: two
    plans from one history forecast the same influent to the bit, and the plant outputs differ. A card from
    before it has no such coordinates, and its plans move every output."""
    from export.onnx_export import model_config

    torch.manual_seed(0)
    layout = PlanLayout(2, (), 0, None, (0, 2))  # u: 2 controls, then 2 calendar columns; outputs 0 and 2 exogenous
    cfg = ModelConfig(z_dim=8, h_dim=16, real_modes=2, dropout=0.0, exogenous_modes=4)
    x_hist, u_hist, plan_a = torch.randn(3, 10, 5), torch.randn(3, 10, 4), torch.randn(3, 6, 4)
    plan_b = torch.cat([torch.randn(3, 6, 2), plan_a[..., 2:]], -1)  # another plan, the same clock
    model = KoVAE(5, 4, cfg, layout).eval()
    with torch.no_grad():
        moved = model.plan_effect(x_hist, u_hist, plan_a, plan_b).abs().amax((0, 1))
    assert torch.all(moved[[0, 2]] == 0) and torch.all(moved[[1, 3, 4]] > 1e-4), moved
    card_model = {"type": "KoVAE", **cfg.__dict__}
    del card_model["exogenous_modes"]  # a card written before it
    legacy = KoVAE(5, 4, model_config({"model": card_model}), layout).eval()
    with torch.no_grad():
        assert torch.all(legacy.plan_effect(x_hist, u_hist, plan_a, plan_b).abs().amax((0, 1)) > 1e-4)


def test_fast_outputs_are_the_catalogs_fast_variables_loop_measurements_and_looped_controls() -> None:
    from modelcard.card import fast_outputs
    from plant.catalog import BSM1

    variables = BSM1.to_dict()
    names = [*BSM1.target_names, *(loop.control for loop in BSM1.loops)]
    assert [names[i] for i in fast_outputs(variables)] == ["SNO_2", "SO_3", "SO_4", "SO_5", "KLa_5", "Q_intr"]
    for v in variables["measurements"]:
        v.pop("fast", None)
    assert [names[i] for i in fast_outputs(variables)] == ["SNO_2", "SO_5", "KLa_5", "Q_intr"]  # the loops' own
    variables.pop("loops")
    assert fast_outputs(variables) == []


@pytest.mark.slow
def test_a_terminated_run_says_how_to_resume_and_leaves_the_store_alone(
    tmp_path: Path, tiny_cache: str, tiny_data
) -> None:
    """SIGTERM (or Ctrl-C) in the middle of training: exit 130 with the command that resumes the run from its
    last checkpoint, no traceback, and nothing in the store."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    store, run_dir = tmp_path / "store", tmp_path / "runs" / "t1"
    argv = ["--preset", "tiny", "--store", str(store), "--run-dir", str(run_dir), f"data.cache_dir={tiny_cache}"]
    argv += ["train.epochs=1000", "train.checkpoint_every=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.run", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / "checkpoints" / "last.pt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    resume = f"resume with: python -m training.run {' '.join(argv)} --resume"
    assert resume in err
    assert not store.exists() or not any(store.iterdir())


def test_one_run_per_folder_and_no_resume_of_nothing(tmp_path: Path) -> None:
    """Two runs writing one --run-dir at once deleted each other's export; --resume of a folder with no run
    prepared the data first and left an empty folder behind."""
    import fcntl

    busy = tmp_path / "runs" / "busy"
    busy.mkdir(parents=True)
    with open(busy / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run writing it now
        assert run.main(["--preset", "tiny", "--store", str(tmp_path / "s"), "--run-dir", str(busy)]) == 2
    assert not (tmp_path / "s").exists()
    nothing = tmp_path / "runs" / "nothing"
    assert run.main(["--preset", "tiny", "--run-dir", str(nothing), "--resume"]) == 2
    assert not nothing.exists()


def test_flags_that_contradict_or_name_a_file_are_refused_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    """--store or --run-dir naming a file failed with a traceback after the whole run; --force with --no-promote
    dropped --force silently; a run stopped before its first checkpoint was told to --resume, which is refused."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for flags, words in (
        (["--force", "--no-promote"], "give one"),
        (["--store", str(a_file)], "--store"),
        (["--run-dir", str(a_file)], "--run-dir"),
        (["--run-dir", str(tmp_path / "bad name")], "--run-dir's folder name"),  # it blamed --version, not given
    ):
        assert run.main(["--preset", "tiny", "--store", str(tmp_path / "s"), *flags]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "s").exists()

    def stopped(*_: object) -> int:
        raise KeyboardInterrupt  # as Ctrl-C (or SIGTERM, its handler) during data preparation

    monkeypatch.setattr(run, "run", stopped)
    argv = ["--preset", "tiny", "--store", str(tmp_path / "s"), "--run-dir", str(tmp_path / "runs" / "early")]
    assert run.main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing to resume; rerun: python -m training.run --preset tiny" in err and "--resume" not in err


def test_a_model_without_setpoint_inputs_is_not_told_a_closed_loops_future(tiny_cfg, tiny_data) -> None:
    """A model that reads no setpoints cannot leave a control to its loop, and its honest request sent the loops'
    true future output (the air and recycle the loops would apply), so its report and gate scored it on what no
    plant has. Where a loop was closed the control is now held at its last value; the applied diagnostic keeps
    the truth."""
    from training.config import with_overrides
    from training.prepare import prepare
    from training.requests import closed_loops

    p = prepare(with_overrides(tiny_cfg, ["model.setpoint_inputs=false"]))
    w, catalog = p.test, p.catalog
    assert p.n_setpoints == 0 and catalog.loops
    honest, _, _ = p.request(w, "honest")
    closed = closed_loops(w, [catalog.setpoint_names.index(lp.setpoint) for lp in catalog.loops])
    assert closed.any() and (~closed).any()  # the tiny test set has looped and open-loop windows
    for j, lp in enumerate(catalog.loops):
        c, k = catalog.control_names.index(lp.control), closed[:, j]
        np.testing.assert_array_equal(honest[k, :, c], np.repeat(w.u_hist[k, -1:, c], w.u_fut.shape[1], 1))
        np.testing.assert_array_equal(honest[~k, :, c], w.u_fut[~k, :, c])  # open loop: the plan, as sent
    np.testing.assert_array_equal(p.request(w, "applied")[0], w.u_fut)


def test_a_setpoint_log_with_a_gap_at_the_origin_keeps_its_loop_closed(tiny_cfg, tiny_data) -> None:
    """A loop was taken as closed only where its setpoint was logged at the history's last step: a plant's
    setpoint log with a gap there opened it, and the honest request sent the loop's true future output."""
    from dataclasses import replace

    from training.prepare import prepare

    p = prepare(tiny_cfg)
    closed = p.closed_loops(p.test)
    k = np.flatnonzero(closed[:, 0])[:3]
    s_hist = p.test.s_hist.copy()
    s_hist[k, -8:, :] = np.nan  # the log's last 2 h missing
    w = replace(p.test, s_hist=s_hist)
    assert p.closed_loops(w)[k].all()
    u_fut, _, _ = p.request(w, "honest")
    assert np.isnan(u_fut[k, :, p.looped[0]]).all()  # left to its loop, as before the gap


def test_a_setpoint_a_controller_decides_is_held_in_a_plants_own_honest_request() -> None:
    """Every setpoint of a plant's own data was sent as planned in its honest request, a cascade's DO setpoint
    too, whose future no plant knows. A catalog now says so (``planned = false``), and the request holds it."""
    from plant.catalog import BSM1, CatalogError, catalog_from_dict
    from training.requests import held_setpoints

    data = BSM1.to_dict()
    for v in data["setpoints"]:
        if v["name"] == "SO_5_setpoint":
            v["planned"] = False
    plant = catalog_from_dict(data, "cascade.toml")
    assert plant.unplanned_setpoints == ("SO_5_setpoint",)
    assert held_setpoints(plant)["historian"] == (plant.setpoint_names.index("SO_5_setpoint"),)
    assert held_setpoints(BSM1)["historian"] == ()  # every setpoint planned: as before
    assert catalog_from_dict(plant.to_dict(), "again").unplanned_setpoints == ("SO_5_setpoint",)  # kept
    data["measurements"][0]["planned"] = False
    with pytest.raises(CatalogError, match="planned = false is for a setpoint a controller decides, not a disturbance"):
        catalog_from_dict(data, "wrong.toml")


def test_a_held_setpoint_is_held_whether_or_not_a_loop_uses_it() -> None:
    """A setpoint the plant cannot plan was held only where a loop used it and was closed: one a catalog marks
    ``planned = false`` without a loop sent its true future in the honest request."""
    from training.data import Windows
    from training.requests import request_arrays

    N, L, H = 2, 4, 3
    w = Windows(
        *(np.zeros((N, n, 1)) for n in (L, L, H, H)),
        np.ones((N, L, 2)),  # both setpoints logged at 1 ...
        np.full((N, H, 2), 5.0),  # ... and planned to 5
        np.zeros((N, H, 1)),
        np.zeros(N),
        np.array(["a", "b"]),
        0,
    )
    _, _, s_fut = request_arrays(w, "honest", [], [], {"a": (0,)})
    assert (s_fut[0, :, 0] == 1).all() and (s_fut[1, :, 0] == 5).all()  # held in "a" only, no loop needed
    assert (s_fut[:, :, 1] == 5).all()  # the other setpoint: planned


def test_training_holds_a_setpoint_at_its_last_logged_value(tiny_cfg, tiny_data) -> None:
    """Training's held setpoint copied the history's last step: where a plant's log missed it, the 0 there
    (the training mean, flag 0), while the honest request and the service hold the last logged value."""
    from training.config import with_overrides
    from training.loop import with_requests
    from training.prepare import prepare

    cfg = with_overrides(tiny_cfg, ["train.loop_unknown_share=1.0", "train.setpoint_held_share=1.0"])
    p = prepare(cfg)
    n_u, n_l, n_s = len(p.u_mean), len(p.looped), p.n_setpoints
    uh, uf = (torch.from_numpy(a) for a in p.inputs(p.train, request="applied"))
    closed = torch.from_numpy(p.closed_loops(p.train))
    sp = p.loop_setpoints[0]
    value, flag = n_u + n_l + sp, n_u + n_l + n_s + sp
    k = closed[:, 0]
    logged = uh[k, -3, value].clone()
    uh[k, -2:, value], uh[k, -2:, flag] = 0.0, 0.0  # the log's last two steps missing
    _, gf = with_requests(uh, uf, closed, p, cfg.train, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gf[k, :, value], logged[:, None].expand(-1, gf.shape[1]))
