"""What-if pairs: branched from the scenario's own history, moving the plant the way the plan says, told to the
model as a plant would tell them, and what the pair loss teaches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from plant.catalog import BSM1
from plant.config import DataConfig
from plant.scenarios import scenarios, splits
from plant.whatif import BLOWERS, CLOSED_MOVES, WhatIf, draw_plans, generate_pairs, pairs_path
from training.config import ConfigError, with_overrides
from training.loop import combined_gradient, pair_loss, pair_scale, train
from training.prepare import Prepared, pair_tensors, prepare

PAIRS = ["data.whatif_every_hours=6", "data.whatif_hours=2"]


@pytest.fixture(scope="module")
def pair_cfg(tiny_cfg, tiny_data):
    return with_overrides(tiny_cfg, PAIRS)


@pytest.fixture(scope="module")
def pairs(pair_cfg) -> list[WhatIf]:
    return generate_pairs(pair_cfg.data, splits(pair_cfg.data)["train"], pair_cfg.train.history, progress=False)


@pytest.fixture(scope="module")
def prepared(pair_cfg) -> Prepared:
    return prepare(pair_cfg)


@pytest.fixture(scope="module")
def blower_pairs(pair_cfg) -> list[WhatIf]:
    """The blower stream's pairs alone (data.whatif_blower_every_hours, the first stream off): plants under their
    loops only."""
    cfg = with_overrides(pair_cfg, ["data.whatif_every_hours=0", "data.whatif_blower_every_hours=6"])
    every = generate_pairs(cfg.data, splits(cfg.data)["train"], cfg.train.history, progress=False)
    assert all((w.move == BLOWERS).all() for w in every)  # the first stream off gives none of its pairs
    return [w for w in every if len(w)]


def test_pairs_start_from_the_scenarios_own_history(pairs: list[WhatIf], tiny_data) -> None:
    """Each pair's history is the training scenario's data up to its origin (the branching's base run is the
    scenario as simulated), on the same clock."""
    assert sum(len(w) for w in pairs) >= 12
    for w in pairs:
        sd = tiny_data[w.scenario]
        L = w.x_hist.shape[1]
        for i, k in enumerate(w.origin):
            np.testing.assert_array_equal(w.x_hist[i], sd.x[k - L + 1 : k + 1])
            np.testing.assert_array_equal(w.u_hist[i], sd.u[k - L + 1 : k + 1])
            np.testing.assert_array_equal(w.s_hist[i], sd.s[k - L + 1 : k + 1])
            assert w.t_last[i] == sd.t_minutes[k]


def test_each_pair_moves_the_plant_the_way_its_plan_says(pairs: list[WhatIf]) -> None:
    """More air: more oxygen in reactor 5; more internal recycle: more nitrate in reactor 2; a setpoint up: that
    loop's variable up. Plan a is always the higher one."""
    so5, sno2 = BSM1.target_names.index("SO_5"), BSM1.target_names.index("SNO_2")
    checked = 0
    for w in pairs:
        for i, move in enumerate(w.move):
            if move == "KLa_5" and w.u_a[i, 0, 2] > w.u_b[i, 0, 2] + 1:
                assert w.x_a[i, -1, so5] > w.x_b[i, -1, so5], (w.scenario, i)
            elif move == "Q_intr" and w.u_a[i, 0, 3] > w.u_b[i, 0, 3] + 100:
                assert w.x_a[i, -1, sno2] > w.x_b[i, -1, sno2], (w.scenario, i)
            elif w.closed[i]:
                j = BSM1.setpoint_names.index(str(move))
                assert (w.s_a[i, :, j] > w.s_b[i, :, j]).all(), (w.scenario, i)
                if move == "SO_5_setpoint":
                    assert w.x_a[i, -1, so5] > w.x_b[i, -1, so5], (w.scenario, i)
            else:
                continue
            checked += 1
    assert checked >= 10


def test_a_pair_is_told_what_a_plant_tells(prepared: Prepared, pairs: list[WhatIf]) -> None:
    """A control plan sends every control's future and no setpoint; a setpoint plan leaves the looped controls
    to their loops (flag 0) and sends the setpoints' history and plan. dx is the plant's change, normalised."""
    x_hist, u_hist, u_a, u_b, dx = pair_tensors(prepared, pairs)
    closed = torch.from_numpy(np.concatenate([w.closed for w in pairs]))
    loop_flags, sp_flags = prepared.flag_columns("controls"), prepared.flag_columns("setpoints")
    for u in (u_a, u_b):
        assert (u[closed][..., loop_flags] == 0).all() and (u[~closed][..., loop_flags] == 1).all()
        assert (u[closed][..., sp_flags] == 1).all() and (u[~closed][..., sp_flags] == 0).all()
    assert (u_hist[~closed][..., sp_flags] == 0).all()
    x_a = np.concatenate([w.x_a for w in pairs])
    x_b = np.concatenate([w.x_b for w in pairs])
    n = prepared.n_targets
    np.testing.assert_allclose(dx[..., :n].numpy(), (x_a - x_b) / prepared.x_std[:n], rtol=1e-4, atol=1e-5)
    assert len(x_hist) == len(closed) and closed.any() and (~closed).any()


def test_blower_pairs_turn_tanks_3_and_4_down_while_the_loops_run(
    pair_cfg, prepared: Prepared, pairs: list[WhatIf], blower_pairs: list[WhatIf]
) -> None:
    """A blower pair holds the blowers of tanks 3 and 4 (a) or turns both down by one factor in
    data.whatif_blower_factor (b) with the loops on, and the DO loop makes up for the air in tank 5. It is told
    as POST /optimize tells a plan: KLa_3 and KLa_4 planned, the looped controls left to their loops. The stream
    is cached apart: adding it leaves the first stream's pairs where they were."""
    kla3, kla4, kla5 = (BSM1.control_names.index(c) for c in ("KLa_3", "KLa_4", "KLa_5"))
    assert sum(len(w) for w in blower_pairs) >= 4
    assert {w.scenario for w in blower_pairs} == {w.scenario for w in pairs if w.closed.any()}
    for w in blower_pairs:
        assert w.closed.all()
        ratio = w.u_b[..., kla3] / w.u_a[..., kla3]
        np.testing.assert_allclose(w.u_b[..., kla4] / w.u_a[..., kla4], ratio)
        np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio))
        assert ((ratio > 0.5 - 1e-9) & (ratio < 0.8 + 1e-9)).all()  # 1 - f, f in (0.2, 0.5)
        assert (w.u_b[:, -1, kla5] >= w.u_a[:, -1, kla5] - 1e-9).all()  # the DO loop adds air in tank 5
        assert (w.u_b[:, -1, kla5] > w.u_a[:, -1, kla5]).mean() > 0.5
    _, _, u_a, u_b, _ = pair_tensors(prepared, blower_pairs)
    assert (u_a[..., prepared.flag_columns("controls")] == 0).all()  # left to their loops
    assert (u_a[..., kla3] > u_b[..., kla3]).all()  # the blowers planned, as applied
    with_blowers = with_overrides(pair_cfg, ["data.whatif_blower_every_hours=6"]).data
    sc = next(sc for sc in scenarios(pair_cfg.data) if sc.id == blower_pairs[0].scenario)
    history = pair_cfg.train.history
    assert pairs_path(with_blowers, sc, history) == pairs_path(pair_cfg.data, sc, history)
    assert pairs_path(with_blowers, sc, history, "blowers") != pairs_path(with_blowers, sc, history)


def test_a_pair_holds_the_setpoint_its_plant_cannot_know(prepared: Prepared, pairs: list[WhatIf]) -> None:
    """Under the ammonium cascade the DO setpoint's future is the cascade's, not the plant's to send: a pair that
    moves the nitrate setpoint holds it at its last value; one that moves the DO setpoint (the cascade off) sends
    its plan."""
    w = next(w for w in pairs if w.closed.any())
    k = int(np.flatnonzero(w.closed)[0])
    do, no = BSM1.setpoint_names.index("SO_5_setpoint"), BSM1.setpoint_names.index("SNO_2_setpoint")
    s_a = w.s_a[k : k + 1].copy()
    s_a[..., do] = w.s_hist[k, -1, do] + 0.7  # the cascade raised it after the origin
    cascade = replace(prepared, policies={**prepared.policies, w.scenario: "ammonia_cascade"})
    sp_flags = prepared.flag_columns("setpoints")
    value = sp_flags[0] - len(BSM1.setpoint_names)  # the setpoint values come just before their flags
    for move, sent in (("SNO_2_setpoint", w.s_hist[k, -1, do]), ("SO_5_setpoint", w.s_hist[k, -1, do] + 0.7)):
        one = replace(w, **{f: getattr(w, f)[k : k + 1] for f in WhatIf.__dataclass_fields__ if f != "scenario"})
        one = replace(one, move=np.array([move]), s_a=s_a)
        u_a = pair_tensors(cascade, [one])[2]
        expected = (sent - prepared.s_mean[do]) / prepared.s_std[do]
        np.testing.assert_allclose(u_a[0, :, value + do].numpy(), expected, rtol=1e-5)
        assert (u_a[0, :, sp_flags[no]] == 1).all()


def test_the_pair_loss_teaches_what_the_plans_do(pair_cfg, prepared: Prepared, tmp_path) -> None:
    """Trained with the pair loss, the model's what-if changes miss the plant's by less than the same training
    without it."""
    cfg = with_overrides(pair_cfg, ["train.epochs=6", "train.pair_weight=1.0"])
    batch = pair_tensors(prepared, generate_pairs(cfg.data, prepared.split_ids["train"], cfg.train.history))
    assert batch is not None
    scale = pair_scale(batch[-1])
    misses = {}
    for weight in (0.0, 1.0):
        run = replace(cfg, train=replace(cfg.train, pair_weight=weight))
        model, log = train(run, prepared, tmp_path / f"w{weight}")
        with torch.no_grad():
            misses[weight] = float(pair_loss(model, batch, scale))
        assert (log[-1]["pair_loss"] > 0) == (weight > 0)
    assert misses[1.0] < 0.8 * misses[0.0], misses


def test_the_pairs_gradient_never_opposes_nor_outweighs_the_forecasts() -> None:
    """Balanced, the pair term's gradient keeps only what does not oppose the forecast loss's and is no larger
    than it; a small one that agrees passes whole; unbalanced, the gradients simply add."""
    layer = torch.nn.Linear(3, 1, bias=False)
    x = torch.tensor([[1.0, 2.0, -1.0]])

    def grads(pair_target: float, pair_weight: float, balance: bool) -> tuple[torch.Tensor, ...]:
        layer.weight.grad = None
        forecast = (layer(x) - 1.0).pow(2).sum()
        pair = pair_weight * ((layer(x) - pair_target).pow(2).sum() + layer.weight[0, 0] ** 2)
        g_f, g_p = (torch.autograd.grad(t, layer.weight, retain_graph=True)[0] for t in (forecast, pair))
        combined_gradient(layer, forecast, pair, balance=balance)
        assert layer.weight.grad is not None
        return g_f, g_p, layer.weight.grad - g_f  # what the pairs added

    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0.1, 0.2]]))
    g_f, g_p, added = grads(pair_target=-3.0, pair_weight=10.0, balance=True)  # a large pull the other way
    assert (g_f * g_p).sum() < 0 and g_p.norm() > g_f.norm()
    assert abs(float((added * g_f).sum())) < 1e-4 * float(g_f.norm() ** 2)  # orthogonal to the forecast's
    assert float(added.norm()) <= float(g_f.norm()) * (1 + 1e-5)
    torch.testing.assert_close(grads(-3.0, 10.0, balance=False)[2], g_p)
    g_f, g_p, added = grads(pair_target=2.0, pair_weight=0.01, balance=True)  # a small pull the same way
    assert (g_f * g_p).sum() > 0 and g_p.norm() < g_f.norm()
    torch.testing.assert_close(added, g_p)


def test_what_if_settings_are_validated_by_name(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match=r"data\.whatif_factor"):
        with_overrides(tiny_cfg, ["data.whatif_factor=[0.2,1.5]"])
    with pytest.raises(ConfigError, match=r"data\.whatif_do_shift"):
        with_overrides(tiny_cfg, ["data.whatif_do_shift=[0,0.5]"])
    with pytest.raises(ConfigError, match=r"data\.whatif_blower_factor"):
        with_overrides(tiny_cfg, ["data.whatif_blower_factor=[0.2,1.0]"])
    with pytest.raises(ConfigError, match=r"train\.pair_weight"):
        with_overrides(tiny_cfg, ["train.pair_weight=-1"])


@pytest.mark.parametrize("share", [0.0, 0.8, 1.0])
def test_a_plant_under_loops_moves_its_setpoints_at_the_configured_share(share: float) -> None:
    """data.whatif_setpoint_share: on a plant under its loops, that share of the origins moves a setpoint (the
    DO's and the nitrate's alike, the loops on), the rest a control open loop; an open-loop plant never does."""
    cfg = DataConfig(whatif_setpoint_share=share)
    rng = np.random.default_rng(0)
    now = {"SO_5_setpoint": 2.0, "SNO_2_setpoint": 1.0}
    drawn = [draw_plans(cfg, True, now, rng) for _ in range(2000)]
    moved = [name for name, closed, _ in drawn if closed]
    assert all(name in CLOSED_MOVES for name in moved)
    assert abs(len(moved) / len(drawn) - share) < 0.03
    if moved:
        assert abs(moved.count("SO_5_setpoint") / len(moved) - 0.5) < 0.05
    assert not any(draw_plans(cfg, False, {}, rng)[1] for _ in range(200))
