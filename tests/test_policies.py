"""Operating policies do what they say on short simulations, the catalog's loops are validated, and a branched
run leaves its base run unchanged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from modelcard.card import loop_limits
from plant import bsm1
from plant.branching import Plan, run_with_branches
from plant.catalog import BSM1, CatalogError, catalog_from_dict
from plant.operation import HONEST_HELD, OPEN_LOOP, POLICIES, Scenario, operation, setpoints_at
from training.config import load_config

DAYS = 0.75  # a short dry-weather run per policy, no stabilisation: enough to see each policy at work


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple]:
    """Each policy on the same dry-weather window (its own seed): (operation, x, u, s in catalog order)."""
    cfg = load_config("tiny").data
    out = {}
    for policy in POLICIES:
        sc = Scenario(f"dry@{policy}", "dry", 0.0, DAYS, 11, "normal", False, policy)
        op = operation(cfg, sc)
        _, x, u, s = bsm1.simulate(
            op.influent, op.controls, 15, loops=op.loops, cascades=op.cascades, caps=op.caps, wastage=op.wastage
        )
        out[policy] = (op, x, u, setpoints_at(s, op.loops, BSM1.setpoint_names))
    return out


def control(name: str) -> int:
    return BSM1.control_names.index(name)


def measurement(name: str) -> int:
    return BSM1.target_names.index(name)


def test_open_loop_excited_applies_its_designed_moves_and_logs_no_setpoint(runs) -> None:
    op, _, u, s = runs["open_loop_excited"]
    schedule = op.controls[: len(u) * 15].reshape(len(u), 15, -1).mean(1)
    np.testing.assert_allclose(u, schedule)  # no loop touches them
    assert np.isnan(s).all()
    for j, name in enumerate(BSM1.control_names):
        assert len(np.unique(op.controls[:, j])) >= 3, name  # stepped, not held
    starts = np.flatnonzero(np.diff(op.controls[:, control("KLa_5")]))
    assert len(starts) > 1 and np.diff(starts).min() >= 15  # each level held at least 15 minutes


def test_the_open_loop_policies_are_those_without_loops(runs) -> None:
    """plant.operation.OPEN_LOOP (what the blower pairs read, without building a scenario) says which policies
    run with every loop off."""
    assert {policy for policy, (op, *_) in runs.items() if not op.loops} == OPEN_LOOP


def test_open_loop_fixed_runs_one_output(runs) -> None:
    _, _, u, s = runs["open_loop_fixed"]
    assert np.ptp(u, axis=0).max() == 0 and np.isnan(s).all()


def test_constant_setpoints_hold_the_do(runs) -> None:
    _, x, u, s = runs["constant_setpoints"]
    assert np.ptp(s, axis=0).max() == 0 and np.isfinite(s).all()
    unsaturated = u[:, control("KLa_5")] < 0.95 * bsm1.KLA_LIMITS[1]
    late = np.arange(len(x)) > 8  # after the loop's first two hours
    off = np.abs(x[:, measurement("SO_5")] - s[:, 0])[unsaturated & late]
    assert off.size > 10 and np.median(off) < 0.2
    assert (u[:, control("KLa_3")] == 240).all() and np.ptp(u[:, control("KLa_5")]) > 5  # the loop moves KLa5


def test_scheduled_setpoints_switch_between_a_day_and_a_night_level(runs) -> None:
    op, _, _, s = runs["scheduled_setpoints"]
    drawn = next(n for n in op.notes if n.get("kind") == "policy")
    morning = drawn["hours"][0]
    hours = np.arange(1, len(s) + 1) * 15 / 60
    night, day = s[hours < morning - 0.25, 0], s[(hours > morning + 0.25) & (hours < drawn["hours"][1] - 0.25), 0]
    assert np.allclose(night, drawn["do_day_night"][1]) and np.allclose(day, drawn["do_day_night"][0])


def test_ammonia_cascade_moves_the_do_setpoint_with_ammonium(runs) -> None:
    op, x, _, s = runs["ammonia_cascade"]
    cascade = op.cascades[0]
    assert len(op.cascades) == 1 and np.ptp(s[:, 0]) > 0.5
    # Its integral raises the DO setpoint while ammonium is above the cascade's target and lowers it below.
    rising, above = np.diff(s[:, 0]), x[1:, measurement("SNH_5")] - cascade.ammonium
    free = (s[1:, 0] > cascade.pi.lo + 0.05) & (s[1:, 0] < cascade.pi.hi - 0.05) & (np.abs(above) > 0.2)
    assert free.sum() >= 5 and np.mean(np.sign(rising[free]) == np.sign(above[free])) > 0.8
    top = s[1:, 0] >= cascade.pi.hi - 1e-9  # at its highest DO only with ammonium above the target
    assert top.any() and np.mean(above[top] > 0) > 0.8
    assert HONEST_HELD["ammonia_cascade"] == ("SO_5_setpoint",)  # a plant cannot plan what the cascade decides


def test_moving_setpoints_dither_the_loop_outputs_and_move_kla3_open_loop(runs) -> None:
    """The dither must reach what the simulator applied, not only the operation: against the same window run
    without it, each loop's applied output (KLa_5, Q_intr) moves wherever its dither is on and the undithered
    output has room inside the loop's limits (at a limit, a push outwards is clipped away). KLa_3, open loop,
    takes several values."""
    op, _, u, s = runs["moving_setpoints"]
    assert np.isfinite(s).all()
    plain = operation(
        load_config("tiny").data,
        Scenario("dry@moving_setpoints", "dry", 0.0, DAYS, 11, "normal", False, "moving_setpoints"),
    )
    for loop, same in zip(op.loops, plain.loops, strict=True):
        assert np.array_equal(loop.dither, same.dither)  # the fixture's window, drawn again
        same.dither = None
    _, _, u_plain, _ = bsm1.simulate(
        plain.influent,
        plain.controls,
        15,
        loops=plain.loops,
        cascades=plain.cascades,
        caps=plain.caps,
        wastage=plain.wastage,
    )
    assert [BSM1.control_names[loop.control] for loop in op.loops] == ["KLa_5", "Q_intr"]
    for loop in op.loops:
        on = (loop.dither[: len(u) * 15].reshape(len(u), 15) != 0).any(1)
        was = u_plain[:, loop.control]
        room = on & (was > loop.pi.lo) & (was < loop.pi.hi)
        assert room.sum() >= 3 and np.all(u[room, loop.control] != was[room])
    assert len(np.unique(u[:, control("KLa_3")])) >= 2


def test_the_counterfactual_bench_tells_where_the_loop_has_no_air_left(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/counterfactual.py splits the DO setpoint pair by whether its +0.5 plan ran KLa_5 at the loop's
    limit (where the plant's answer shrinks, and the model's answers were 2.5-3.6 times the plant's): on the real
    simulator, a setpoint the loop can reach leaves the air below it, one it cannot (5 g O2/m3) runs at it. The
    plant's own answers, taken as the forecast, score an R^2 of 1 in every row printed."""
    from bench.counterfactual import PLANS, print_windows, setpoint_answers

    cfg = replace(load_config("tiny").data, scenario_days=0.5)
    sc = Scenario("dry@constant_setpoints", "dry", 0.0, 0.5, 5, "normal", False, "constant_setpoints")
    windows = []
    for setpoint, at_limit in ((1.0, False), (5.0, True)):
        op = operation(cfg, sc)
        op.loops[0].setpoint[:] = setpoint
        branched = run_with_branches(op, [12, 24], [p for p in PLANS["closed"] if p.closed], 8)
        answers, limited = setpoint_answers(branched.x_plan, branched, 8)
        assert limited.tolist() == [at_limit, at_limit]
        assert set(answers) == {"SO_5", "SNH_eff"} and np.ptp(answers["SNH_eff"][1]) > 0
        windows.append((f"sp{setpoint:g}", answers, limited))
    print_windows(windows, "2 h")
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("sp")]
    assert [" ".join(r[1:-5]) for r in rows] == ["all", "air below", "all", "air at limit"]
    assert all(r[-4] == r[-2] == "1.00" for r in rows)  # each variable's R^2


def test_a_branch_does_not_leak_into_the_base_run() -> None:
    """Branching at two origins under five plans gives the base run of an unbranched simulation bit for bit,
    and the plans themselves move the plant (more air, more oxygen, open loop; the blowers of tanks 3 and 4
    turned down under the loops, and the DO loop adds air in tank 5)."""
    cfg = replace(load_config("tiny").data, scenario_days=0.5)
    sc = Scenario("dry@constant_setpoints", "dry", 0.0, 0.5, 5, "normal", False, "constant_setpoints")
    plans = [
        Plan("up", False, {control("KLa_5"): 1.3}),
        Plan("down", False, {control("KLa_5"): 0.7}),
        Plan("do+", True, shifts={"SO_5_setpoint": 0.5}),
        Plan("do-", True, shifts={"SO_5_setpoint": -0.5}),
        Plan("blowers-", True, {control("KLa_3"): 0.6, control("KLa_4"): 0.6}),
    ]
    op = operation(cfg, sc)
    op.loops[0].setpoint[:] = 1.0  # a DO the loop can still raise: KLa5 keeps room below its limit
    branched = run_with_branches(op, [12, 24], plans, 8)
    op = operation(cfg, sc)
    op.loops[0].setpoint[:] = 1.0
    _, x, u, s = bsm1.simulate(op.influent, op.controls, 15, loops=op.loops, caps=op.caps, wastage=op.wastage)
    np.testing.assert_array_equal(branched.x, x)
    np.testing.assert_array_equal(branched.u, u)
    np.testing.assert_array_equal(branched.s, s)
    so5 = measurement("SO_5")
    assert (branched.x_plan["up"][:, -1, so5] > branched.x_plan["down"][:, -1, so5]).all()
    assert (branched.x_plan["do+"][:, -1, so5] > branched.x_plan["do-"][:, -1, so5] + 0.5).all()
    kla5 = control("KLa_5")
    assert (branched.u_plan["do+"][:, -1, kla5] > branched.u_plan["do-"][:, -1, kla5]).all()  # the air it needs
    after = np.array(branched.origins)[:, None] + np.arange(1, 9)  # the base run over each branch's horizon
    for name in ("KLa_3", "KLa_4"):
        np.testing.assert_allclose(branched.u_plan["blowers-"][..., control(name)], 0.6 * u[after, control(name)])
    assert (branched.u_plan["blowers-"][:, -1, kla5] > u[after[:, -1], kla5]).all()  # the loop makes up for it
    with pytest.raises(ValueError, match="driven by a loop"):
        run_with_branches(operation(cfg, sc), [12], [Plan("kla5", True, {kla5: 0.5})], 8)


def test_a_closed_loop_branch_keeps_the_blowers_within_their_caps() -> None:
    """A blower failure caps KLa_3 at 100 1/d: a plan under the loops that scales tanks 3 and 4 up runs them at
    the cap, never past it (as an open-loop plan does)."""
    cfg = replace(load_config("tiny").data, scenario_days=0.5)
    sc = Scenario("dry@constant_setpoints", "dry", 0.0, 0.5, 5, "normal", False, "constant_setpoints")
    op = operation(cfg, sc)
    op.caps = np.full_like(op.controls, np.nan)
    op.caps[:, control("KLa_3")] = 100.0
    branched = run_with_branches(op, [12], [Plan("blowers+", True, {control("KLa_3"): 1.5, control("KLa_4"): 0.5})], 8)
    kla3 = branched.u_plan["blowers+"][..., control("KLa_3")]
    assert (kla3 <= 100.0 + 1e-9).all() and (kla3 > 99.0).all()


def test_catalog_loops_are_validated_by_name() -> None:
    data = BSM1.to_dict()
    assert [loop["control"] for loop in data["loops"]] == ["KLa_5", "Q_intr"]
    assert catalog_from_dict(data).loops == BSM1.loops
    cases = [
        ({"control": "KLa_9", "setpoint": "SO_5_setpoint"}, r"loop 1: control 'KLa_9' is not a variable"),
        ({"control": "KLa_5", "setpoint": "SO_5"}, r"loop 1: setpoint 'SO_5' is a measurement"),
        (
            {"control": "KLa_5", "setpoint": "SO_5_setpoint", "measurement": "KLa_3"},
            r"measurement 'KLa_3' is a control",
        ),
        ({"control": "KLa_5"}, r"loop 1: missing setpoint"),
        ({"control": "KLa_5", "setpoint": "SO_5_setpoint", "gain": 3}, r"unknown key\(s\) 'gain'"),
        (
            {"control": "KLa_5", "setpoint": "SO_5_setpoint", "output_max": 400},
            r"loop 1: output_max must be a number within KLa_5's bounds 0.0 to 360.0",
        ),
        (
            {"control": "KLa_5", "setpoint": "SO_5_setpoint", "output_min": "low"},
            r"loop 1: output_min must be a number",
        ),
        (
            {"control": "KLa_5", "setpoint": "SO_5_setpoint", "output_min": 200, "output_max": 100},
            r"loop 1: output_min 200 must be below output_max 100",
        ),
    ]
    for loop, message in cases:
        with pytest.raises(CatalogError, match=message):
            catalog_from_dict({**data, "loops": [loop]})
    twice = [{"control": "KLa_5", "setpoint": "SO_5_setpoint"}, {"control": "KLa_5", "setpoint": "SNO_2_setpoint"}]
    with pytest.raises(CatalogError, match="control KLa_5 is in more than one loop"):
        catalog_from_dict({**data, "loops": twice})
    # The controller's output limits: the DO loop's blower gives 240 1/d at most (the control's bounds say 360).
    assert [(loop.output_min, loop.output_max) for loop in BSM1.loops] == [(None, 240.0), (None, 92230.0)]
    assert loop_limits(BSM1.to_dict()) == [(0.0, 240.0), (0.0, 92230.0)]
