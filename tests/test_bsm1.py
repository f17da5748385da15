"""bsm2-python 0.0.16 defects and how plant.bsm1 handles them, against the real simulator."""

from __future__ import annotations

import numpy as np
import pytest

from plant import bsm1, influent
from plant.catalog import BSM1


def test_rain_influent_repairs_malformed_flows_and_converts_units() -> None:
    data, repairs = influent.load_influent("rain")
    assert [(r.row, r.column, r.raw) for r in repairs] == [
        (997, 15, "30.044.50"),
        (999, 15, "27.446.67"),
        (1000, 15, "26.880.33"),
    ]
    q = data[:, 1 + bsm1.Q]
    assert q[997] == pytest.approx(30044.5)  # 1000 m3/d -> m3/d
    assert q[997] == pytest.approx((q[996] + q[998]) / 2, rel=0.01)
    assert 15_000 < np.median(q) < 25_000
    dry, dry_repairs = influent.load_influent("dry")
    assert dry_repairs == []
    assert np.median(dry[:, 1 + bsm1.Q]) == pytest.approx(np.median(q), rel=0.05)  # same units now


def _rows(n: int = 6) -> list[list[str]]:
    return [[str(i * 0.01), *["1"] * 14, "20.5", *["1"] * 6] for i in range(n)]


def test_parse_refuses_what_it_cannot_repair() -> None:
    rows = _rows()
    rows[3][15] = "abc"
    with pytest.raises(influent.InfluentError, match=r"row 3 column 15: cannot parse 'abc'"):
        influent.parse_influent_rows(rows, "x.csv", 1000.0)
    rows = _rows()
    rows[3][15] = "90.1.2"  # repairs to 90.12, far from its neighbours (20.5)
    with pytest.raises(influent.InfluentError, match="does not fit its neighbours"):
        influent.parse_influent_rows(rows, "x.csv", 1000.0)
    rows = _rows()
    with pytest.raises(influent.InfluentError, match="unit of Q"):
        influent.parse_influent_rows(rows, "x.csv", 1.0)  # 20.5 m3/d is no plant


def test_influent_window_slices_and_shifts_time() -> None:
    data, _ = influent.load_influent("bsm2")
    w = influent.influent_window(data, 28.0, 1.0)
    assert w[0, 0] == 0.0 and w[-1, 0] >= 1.0
    assert len(w) < 200  # a window, not the 58k-row file the simulator would scan every step
    with pytest.raises(influent.InfluentError, match="outside the influent"):
        influent.influent_window(data, 600.0, 14.0)


def _short_influent(days: float = 0.25) -> np.ndarray:
    data, _ = influent.load_influent("dry")
    return data[data[:, 0] <= days + 0.02]


def test_blanket_estimate_stays_in_the_layer_it_is_in() -> None:
    """Defect 5: bsm2-python's own settler output, on a washout profile (a clear layer between denser ones),
    puts the blanket hundreds of metres up a 4 m settler; blanket_height keeps it in its layer, leaves a
    monotone profile's estimate as it is, and calls a settler full of sludge full."""
    from bsm2_python.bsm2.settler1d_bsm2 import get_output

    plant = bsm1.Plant(influent.influent_window(influent.load_influent("dry")[0], 0.0, 0.05))
    st = plant.sim.settler
    n, height, threshold = int(st.layer[1]), float(st.dim[1]), float(st.sedpar[6])

    def estimate(tss: np.ndarray) -> float:
        state = np.ones(12 * n)
        state[7 * n : 8 * n] = tss  # TSS per layer, top first
        return get_output(state, plant.sim.ys_in, n, st.tempmodel, st.q_r, st.q_w, st.dim, st.asm1par, st.sedpar)[3]

    washout = np.full(n, 6000.0)
    washout[:5] = [3200.0, 3100.0, 3050.0, 2900.0, 3051.0]  # layer 3 clear: 6 whole layers of sludge below it
    raw = estimate(washout)
    assert raw > 100 * height
    assert bsm1.blanket_height(washout, threshold, height, raw) == pytest.approx(7 * height / n)  # its top
    monotone = np.array([15.0, 22.0, 37.0, 84.0, 405.0, 405.0, 406.0, 406.0, 4500.0, 7800.0])
    raw = estimate(monotone)
    assert 0.4 < raw < 1.2 and bsm1.blanket_height(monotone, threshold, height, raw) == raw
    assert bsm1.blanket_height(np.full(n, 5000.0), threshold, height, estimate(np.full(n, 5000.0))) == height
    # The measurement the data hold is the bounded one.
    plant.sim.ys_tss_internal, plant.sim.sludge_height = washout, estimate(washout)
    blanket = bsm1.measurements_from_plant(plant, plant.sim.y_in_all[0])[BSM1.target_names.index("blanket")]
    assert blanket == pytest.approx(7 * height / n)


def test_upstream_lagged_recycle_defect_gives_negative_effluent_flow() -> None:
    """Canary: raw bsm2-python 0.0.16 mixes the previous step's recycle flow into reactor 1."""
    from bsm2_python.bsm1_ol import BSM1OL

    sim = BSM1OL(data_in=_short_influent(), timestep=bsm1.STEP_DAYS, tempmodel=False)
    klas = np.array([0, 0, 240, 240, 84.0])
    for i in range(5):
        sim.step(i, klas)
    sim.qintr = 5 * bsm1.Q0  # raise the internal recycle without touching the lagged stream
    sim.step(5, klas)
    assert sim.ys_eff[bsm1.Q] < 0, "bsm2-python fixed the lagged recycle; revisit plant.bsm1.Plant"


def test_plant_keeps_effluent_flow_positive_across_recycle_moves() -> None:
    plant = bsm1.Plant(_short_influent())
    flows = []
    for qintr in (5 * bsm1.Q0, 0.0, 3 * bsm1.Q0, 4.5 * bsm1.Q0):
        plant.set_controls(np.array([240.0, 240.0, 84.0, qintr]))
        for _ in range(3):
            inflow = plant.step()
            flows.append(plant.sim.ys_eff[bsm1.Q])
            # Mass balance of water: effluent = influent - waste sludge (385 m3/d), within the settler's lag.
            assert plant.sim.ys_eff[bsm1.Q] == pytest.approx(inflow[bsm1.Q] - 385.0, rel=0.05)
    assert min(flows) > 0


def test_step_count_follows_timesteps_not_simtime() -> None:
    plant = bsm1.Plant(_short_influent(0.05))
    assert plant.n_steps == len(plant.sim.simtime) - 1
    for _ in range(plant.n_steps):
        plant.step()
    with pytest.raises(IndexError):
        plant.step()


def test_pid_class_does_not_integrate_so_we_stay_open_loop() -> None:
    """Canary: PID.output with a constant error returns a constant (no integral action)."""
    from bsm2_python.bsm2.aerationcontrol import PID

    pid = PID(k=10.0, t_i=0.1, t_d=0.0, t_t=1.0, offset=0.0, min_value=-1e9, max_value=1e9, setpoint=2.0)
    outputs = [pid.output(1.0, 1 / 1440) for _ in range(50)]
    assert max(outputs) - min(outputs) < 1e-9, "PID now integrates; closed-loop classes may be usable"


def test_carbon_dosing_corrupts_upstream_state_and_plant_refuses_it() -> None:
    from bsm2_python.bsm2.asm1_bsm2 import carbonaddition

    upstream = np.full(21, 10.0)
    upstream[bsm1.Q] = 1000.0
    before = upstream.copy()
    carbonaddition(upstream, 2.0, 400000.0)
    assert not np.array_equal(upstream, before), "carbonaddition no longer edits its input in place"

    plant = bsm1.Plant(_short_influent(0.05))  # the check passes on the shipped configuration
    plant.sim.reactor3.carb = 2.0
    with pytest.raises(ValueError, match="carbon dosing"):
        bsm1.check_no_carbon_dosing(plant.sim)


def test_kla_step_changes_oxygen_in_that_reactor() -> None:
    inflow = _short_influent(0.3)
    n = 6 * 60
    low = np.tile([240.0, 240.0, 20.0, 3 * bsm1.Q0], (n, 1))
    high = np.tile([240.0, 240.0, 220.0, 3 * bsm1.Q0], (n, 1))
    _, x_low, _, _ = bsm1.simulate(inflow, low)
    _, x_high, _, _ = bsm1.simulate(inflow, high)
    so5 = 7  # SO_5 among plant.catalog.BSM1's targets
    assert x_high[-1, so5] - x_low[-1, so5] > 0.3  # g O2/m3, from the (oxygen-hungry) unstabilised start
    assert np.all(x_high[4:, so5] > x_low[4:, so5])  # after the first hour, at every sample
    assert x_low.shape == (n // 15, len(BSM1.targets)) and np.all(np.isfinite(x_low))


@pytest.mark.parametrize("name", ["dry", "bsm2"])
def test_influent_clock_starts_on_a_monday_at_midnight(name: str) -> None:
    """The calendar inputs assume influent day 0 is a Monday starting at midnight: check both cycles."""
    data, _ = influent.load_influent(name)
    t, q = data[:, 0], data[:, 1 + bsm1.Q]
    days = min(int(t[-1]), 448)
    day = np.floor(t).astype(int)
    daily = np.array([q[day == d].mean() for d in range(days)])
    by_weekday = [daily[d::7].mean() for d in range(7)]
    assert set(np.argsort(by_weekday)[:2]) == {5, 6}  # Saturday and Sunday have the lowest flows
    hour = ((t % 1) * 24).astype(int)
    by_hour = [q[hour == h].mean() for h in range(24)]
    assert int(np.argmin(by_hour)) in range(2, 7) and int(np.argmax(by_hour)) in range(8, 12)  # night low, morning peak


def test_influent_repairs_are_reported_once() -> None:
    """bsm2-python adds handlers to the root logger on import; with them each repair printed twice."""
    import subprocess
    import sys

    code = "from plant import bsm1, influent; bsm1.import_bsm1ol(); influent.load_influent('rain')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "repaired row 997" in line]
    assert len(lines) == 1, out.stdout + out.stderr


def test_pi_saturates_without_winding_up() -> None:
    """An unreachable setpoint holds the output at its limit; once the error reverses, the output leaves the
    limit within a few steps instead of unwinding a huge integral."""
    pi = bsm1.PI(kp=10.0, ti_days=0.01, tt_days=0.005, lo=0.0, hi=100.0, bias=50.0)
    outs = [pi.step(setpoint=10.0, measured=0.0) for _ in range(2000)]
    assert outs[-1] == 100.0 and abs(pi.integral) < 1.0
    after = [pi.step(setpoint=0.0, measured=10.0) for _ in range(5)]
    assert after[-1] < 100.0
    no_guard = bsm1.PI(kp=10.0, ti_days=0.01, tt_days=1e9, lo=0.0, hi=100.0, bias=50.0)
    for _ in range(2000):
        no_guard.step(setpoint=10.0, measured=0.0)
    assert abs(no_guard.integral) > 10 * abs(pi.integral)  # what the back-calculation prevents


@pytest.mark.slow
def test_do_and_nitrate_loops_follow_a_setpoint_step() -> None:
    """One day of dry weather under the BSM1 benchmark's two PI loops, with setpoint steps at noon: dissolved
    oxygen in reactor 5 reaches its new setpoint within 1 hour, nitrate in reactor 2 within 4 hours."""
    data, _ = influent.load_influent("dry")
    n = 1440
    sp_do = np.where(np.arange(n) < 720, 2.0, 1.0)
    sp_no = np.where(np.arange(n) < 720, 1.0, 2.0)
    controls = np.tile(np.array(bsm1.DEFAULT_CONTROLS), (n, 1))
    loops = [bsm1.do_loop(sp_do), bsm1.nitrate_loop(sp_no)]
    t, x, u, _ = bsm1.simulate(data, controls, 15, stabilize=True, loops=loops)
    hours = t / 60
    so5, sno2 = x[:, 7], x[:, 4]
    assert abs(so5[(hours > 8) & (hours <= 12)].mean() - 2.0) < 0.1
    assert np.all(np.abs(so5[(hours > 13) & (hours <= 24)] - 1.0) < 0.1)  # within 1 h of the step
    assert abs(sno2[(hours > 16) & (hours <= 24)].mean() - 2.0) < 0.15  # within 4 h of the step
    assert u[:, 2].std() > 5 and u[:, 3].std() > 1000  # the applied KLa5 and Qintr are what u records
    assert np.all((u[:, 2] >= 0) & (u[:, 2] <= bsm1.KLA_LIMITS[1]))


def test_a_storm_raises_flow_dilutes_solubles_and_flushes_particulates() -> None:
    data, _ = influent.load_influent("dry")
    storm = influent.Storm(start_day=2.0, hours=12.0, peak_factor=3.0, flush_factor=2.0, flush_hours=2.0)
    wet = influent.add_storm(data, storm)
    t = data[:, 0]
    q, q_wet = data[:, 1 + bsm1.Q], wet[:, 1 + bsm1.Q]
    during = (t > 2.0) & (t < 2.5)
    outside = (t < 2.0) | (t > 2.5)
    assert np.allclose(wet[outside], data[outside])  # nothing changes outside the event
    assert (q_wet[during] / q[during]).max() == pytest.approx(3.0, rel=0.01)  # the peak, at mid-event
    assert np.all(q_wet[during] >= q[during])
    for c in influent.SOLUBLE:  # dissolved load conserved, concentration diluted
        assert np.allclose(wet[:, 1 + c] * q_wet, data[:, 1 + c] * q)
    assert np.all(wet[during, 1 + bsm1.SNH] <= data[during, 1 + bsm1.SNH])
    tss_load, tss_load_wet = data[:, 1 + bsm1.TSS] * q, wet[:, 1 + bsm1.TSS] * q_wet
    front = (t > 2.0) & (t < 2.0 + 1 / 24)
    assert np.all(tss_load_wet[front] > 1.5 * tss_load[front])  # first flush
    assert np.allclose(wet[:, 1 + bsm1.TEMP], data[:, 1 + bsm1.TEMP])
    tail = (t > 2.35) & (t < 2.45)
    assert np.all(wet[tail, 1 + bsm1.TSS] < data[tail, 1 + bsm1.TSS])  # diluted once the flush has passed


def test_inlet_capacity_overflows_the_peak_of_overlapping_storms() -> None:
    """Two storms on top of each other multiply their peaks; the plant's inlet passes at most its capacity, the
    rest overflows upstream with the same composition, and flows below the capacity are untouched."""
    data, _ = influent.load_influent("dry")
    both = data
    for start in (2.0, 2.05):
        both = influent.add_storm(both, influent.Storm(start, 12.0, 4.0, 2.0, 2.0))
    q = both[:, 1 + bsm1.Q]
    assert q.max() > 10 * bsm1.Q0
    capped = influent.cap_inflow(both, 5 * bsm1.Q0)
    q_cap = capped[:, 1 + bsm1.Q]
    assert q_cap.max() == pytest.approx(5 * bsm1.Q0)
    assert np.array_equal(q_cap[q <= 5 * bsm1.Q0], q[q <= 5 * bsm1.Q0])
    assert np.array_equal(np.delete(capped, 1 + bsm1.Q, axis=1), np.delete(both, 1 + bsm1.Q, axis=1))


def test_random_storms_are_seeded_and_varied() -> None:
    a = influent.random_storms(28.0, np.random.default_rng(7), per_week=1.5)
    b = influent.random_storms(28.0, np.random.default_rng(7), per_week=1.5)
    assert a == b and len(a) >= 2
    assert len({round(s.hours, 3) for s in a}) == len(a) and all(1.5 <= s.peak_factor <= 4.0 for s in a)
    assert all(0 <= s.start_day <= 28 for s in a) and [s.start_day for s in a] == sorted(s.start_day for s in a)


def test_design_load_scaling_brings_bsm2_to_bsm1_design_and_keeps_its_dynamics() -> None:
    """BSM2's raw influent carries 1.8 times BSM1's particulate load; scaled, its mean flow and flow-weighted
    concentrations equal the dry (design) influent's, while its daily pattern and temperature are untouched."""
    raw, _ = influent.load_influent("bsm2")
    dry, _ = influent.load_influent("dry")
    f = influent.design_load_factors(raw, dry)
    scaled = raw * f
    q, q_dry = scaled[:, 1 + bsm1.Q], dry[:, 1 + bsm1.Q]
    assert q.mean() == pytest.approx(q_dry.mean())
    for c in influent.DESIGN_COMPONENTS:
        want = (dry[:, 1 + c] * q_dry).sum() / q_dry.sum()
        assert (scaled[:, 1 + c] * q).sum() / q.sum() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert f[1 + bsm1.XS] < 0.6 and f[0] == 1.0 and f[1 + bsm1.TEMP] == 1.0
    assert np.allclose(np.corrcoef(raw[:2000, 1 + bsm1.Q], q[:2000])[0, 1], 1.0)


def test_overload_multiplies_concentrations_inside_the_episode_only() -> None:
    data, _ = influent.load_influent("dry")
    out = influent.add_overload(data, start_day=3.0, hours=12.0, factor=1.5)
    t = data[:, 0]
    inside = (t >= 3.0) & (t <= 3.5)
    assert np.allclose(out[~inside], data[~inside])
    assert np.allclose(out[inside, 1 + bsm1.SNH], 1.5 * data[inside, 1 + bsm1.SNH])
    assert np.allclose(out[:, 1 + bsm1.Q], data[:, 1 + bsm1.Q]) and np.allclose(out[:, 1 + bsm1.TEMP], 15.0)


def test_seasonal_wastage_lengthens_sludge_age_in_the_cold() -> None:
    assert bsm1.seasonal_wastage(19.0) == 385.0 and bsm1.seasonal_wastage(9.5) == 140.0
    assert 140.0 < bsm1.seasonal_wastage(13.0) < bsm1.seasonal_wastage(16.0) < 385.0


def test_actuator_cap_limits_a_loop_without_winding_it_up() -> None:
    """A blower that cannot deliver (KLa capped at 30 for 2 hours) holds KLa5 at the cap although the DO loop
    asks for more; afterwards DO is back at its setpoint within an hour."""
    data, _ = influent.load_influent("dry")
    n = 8 * 60
    controls = np.tile(np.array(bsm1.DEFAULT_CONTROLS), (n, 1))
    caps = np.full((n, 4), np.nan)
    caps[120:240, :3] = 30.0
    t, x, u, _ = bsm1.simulate(data, controls, 15, loops=[bsm1.do_loop(np.full(n, 2.0))], caps=caps)
    during = (t > 120) & (t <= 240)
    assert np.all(u[during, :3] <= 30.0 + 1e-9) and x[during, 7].min() < 1.0  # DO collapses
    assert abs(x[(t > 300), 7].mean() - 2.0) < 0.1


def test_a_repair_warning_is_printed_once_though_bsm2_python_adds_root_handlers() -> None:
    """bsm2-python adds two handlers to the root logger when first imported: each repair of the rain file (and
    every later log line of a process that reads an influent first) came out twice."""
    import subprocess
    import sys

    code = (
        "import logging; from plant.influent import load_influent; load_influent('rain'); "
        "print(logging.getLogger().handlers)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    printed = out.stdout + out.stderr
    assert printed.count("repaired row 997 column 15") == 1, printed
    assert "[]" in out.stdout  # the root logger as it was
