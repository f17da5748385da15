"""bench/peers.py on the tiny model: every peer trains and forecasts through the bench's own code path, and the
figures it prints are the product's metric functions on the same forecasts."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from bench import peers as bench
from training import evaluate as ev


@pytest.fixture(scope="module")
def run(trained_store: tuple[Path, str], tiny_cache: str, tmp_path_factory: pytest.TempPathFactory):
    """One quick run of the bench (peers trained, every model scored, one counterfactual origin), its output."""
    store, version = trained_store
    out = tmp_path_factory.mktemp("peers")
    args = bench.parse_args(
        ["--store", str(store), "--version", version, "--quick", "--out", str(out), f"data.cache_dir={tiny_cache}"]
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = bench.run(args)
    return result, printed.getvalue(), out


def forecasts(b: bench.Bench, request: str) -> dict[str, np.ndarray]:
    """Each model's mean forecast of the held-out windows, recomputed through the bench's forecast functions."""
    w = b.p.test
    out = {"kovae": bench.kovae_forecast(b.rt, b.p, w, request)[0]}
    out |= {peer.name: bench.peer_forecast(peer, b.p, w, request) for peer in b.peers}
    return out


@pytest.mark.slow
def test_every_peer_trains_and_forecasts(run) -> None:
    b, printed, out = run
    assert [peer.name for peer in b.peers] == ["mamko", "gru", "lightgbm"]
    w, nx = b.p.test, len(b.p.x_mean)
    persistence = ev.persistence(w)
    for name, mean in forecasts(b, "honest").items():
        assert mean.shape == (len(w.x_hist), w.x_fut.shape[1], nx if name != "kovae" else mean.shape[-1]), name
        assert np.isfinite(mean).all(), name
        assert not np.allclose(mean[..., : b.p.n_targets], persistence[..., : b.p.n_targets]), name
    for peer in b.peers:
        assert peer.train_seconds > 0
        assert f"trained {peer.name} in" in printed
    assert (out / "peers_comparison.png").stat().st_size > 10_000
    assert (out / "peers.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("request_", bench.SCORED_REQUESTS)
def test_printed_scores_are_the_products_metrics(run, request_: str) -> None:
    """Pooled skill per cell, the KoVAE's 80% coverage and the guide's top-5 relative error, recomputed from the
    forecasts with ``training.evaluate``'s functions, equal what the bench holds and prints."""
    b, printed, _ = run
    p, w = b.p, b.p.test
    n = p.n_targets
    scored = p.scored(w)
    cells = np.array([p.cells()[s] for s in w.scenario])
    naive = [ev.persistence(scored), ev.seasonal_naive(scored)]
    plant = p.catalog.plant_positions()
    top5 = bench.top5_indices(p)
    section = printed.split(f"\n{request_} request")[1].split("\n\n")[0].splitlines()
    for name, mean in forecasts(b, request_).items():
        table = b.results[name].tables[request_]
        for cell in [*dict.fromkeys(cells.tolist()), "all"]:
            k = cells == cell if cell != "all" else np.ones(len(cells), bool)
            skill_all = ev.pooled_skill(mean[k][..., :n], [f[k] for f in naive], scored.x_fut[k], p.test_scale[:n])
            skill_plant = ev.pooled_skill(
                mean[k][..., plant], [f[k][..., plant] for f in naive], scored.x_fut[k][..., plant], p.test_scale[plant]
            )
            for step, value in table[cell]["pooled_skill_all"].items():
                assert value == pytest.approx(skill_all[int(step) - 1], abs=1e-9), (name, cell, step)
            for step, value in table[cell]["pooled_skill_plant"].items():
                assert value == pytest.approx(skill_plant[int(step) - 1], abs=1e-9), (name, cell, step)
        rel = ev.relative_rmse(ev.error_table(mean[..., :n], scored.x_fut))
        for h, value in b.results[name].guide[request_].items():
            assert value == pytest.approx(float(np.mean(rel[int(h) - 1, top5])), abs=1e-9)
        # The printed row of the "all" cell: its pooled skills, in order, and the guide's figure.
        row = next(
            line
            for line in section
            if line.split()[:2] == ["all", name] or (line.split()[0] == name and line.endswith("%"))
        )
        steps = list(table["all"]["pooled_skill_all"])
        expected = [f"{table['all']['pooled_skill_all'][s]:.3f}" for s in steps]
        expected += [f"{table['all']['pooled_skill_plant'][s]:.3f}" for s in steps]
        assert row.split()[-(len(expected) + 3 + len(b.results[name].guide[request_])) :][: len(expected)] == expected
        assert row.split()[-1] == f"{100 * rel[int(list(b.results[name].guide[request_])[-1]) - 1, top5].mean():.1f}%"
    if request_ == "honest":
        mean, band = bench.kovae_forecast(b.rt, p, w, "honest", b.samples)
        cover = b.results["kovae"].tables["honest"]["all"]["coverage_80"]
        assert cover == pytest.approx(ev.interval_coverage(band, scored.x_fut), abs=1e-12)
        assert 0.0 < cover < 1.0


@pytest.mark.slow
def test_counterfactual_asks_a_peer_what_it_asks_the_kovae(run) -> None:
    """The peers' runtime adapter (what ``bench/counterfactual.forecasts`` calls) forecasts the held-out windows
    exactly as the scored path does, and every model got a sign share from the simulator's branches."""
    b, printed, _ = run
    w = b.p.scored(b.p.test)
    u_fut, s_hist, s_fut = b.p.request(b.p.test, "honest")
    for peer in b.peers:
        adapter = bench.PeerRuntime(peer, b.p)
        got = adapter.predict(w.x_hist, w.u_hist, u_fut, w.t_last, s_hist=s_hist, s_fut=s_fut).mean
        np.testing.assert_allclose(got, bench.peer_forecast(peer, b.p, b.p.test, "honest"), rtol=1e-5, atol=1e-5)
    assert set(b.signs) == {"kovae", "mamko", "gru", "lightgbm"}
    for model, signs in b.signs.items():
        finite = [v for k, v in signs.items() if k != "mean" and np.isfinite(v)]
        assert finite, model
        assert signs["mean"] == pytest.approx(np.mean(finite))
        assert all(0.0 <= v <= 1.0 for v in finite)
    assert "counterfactual sign share" in printed
    met = sum(m for _, m in b.checks)
    assert f"{met} of {len(b.checks)} met" in printed
