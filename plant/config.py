"""The data settings: which plant data a run uses and how the simulated plant is run.

``DataConfig`` is the ``[data]`` table of a run's configuration. It lives here, beside the code that reads it, so
that the plant side (simulation, scenarios, historian import) needs nothing from ``training``;
``training.config`` puts it into a run's configuration with the model and training settings and validates it.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass(frozen=True)
class DataConfig:
    # "bsm1": the simulated plant (everything below); "historian": a folder written by
    # `python -m training.data import` (data.cache_dir), with the catalog it was imported with.
    source: str = "bsm1"
    catalog: str = ""  # a plant catalog (TOML); "": the built-in BSM1 catalog
    max_missing: float = 0.5  # a window with more of any variable's history missing is dropped
    cache_dir: str = "data_cache"
    bsm2_windows: int = 32  # consecutive windows of the 609-day BSM2 influent (days 0-448)
    scenario_days: float = 14.0  # simulated length of each scenario (dry/rain files hold 14 days)
    warmup_days: float = 2.0  # discarded at the start of every scenario
    stabilize: bool = True  # start from bsm2-python's steady state for the scenario's first influent row
    seed: int = 2024
    # How the plant is run: its operating policy (plant.operation.POLICIES). BSM2 window w runs
    # policy_cycle[w % len(policy_cycle)] (dry and rain, where they train: its first two); a val or test entry
    # "ID@POLICY" runs that window under that policy. A third of the cycle is open loop with designed
    # excitation: a control's own effect on the plant can be learned only where no loop moves it with the load.
    policy_cycle: tuple[str, ...] = (
        "open_loop_excited",
        "constant_setpoints",
        "moving_setpoints",
        "open_loop_excited",
        "scheduled_setpoints",
        "ammonia_cascade",
        "open_loop_excited",
        "open_loop_fixed",
        "constant_setpoints",
    )
    # open_loop_excited: each control in steps over its working range, each level held 15 min to 12 h
    # (log-uniform), each control on its own clock.
    excite_kla34: tuple[float, float] = (120.0, 240.0)  # KLa3, KLa4 (1/d)
    excite_kla5: tuple[float, float] = (30.0, 240.0)  # 1/d
    excite_qintr: tuple[float, float] = (10_000.0, 92_000.0)  # m3/d
    excite_minutes: tuple[float, float] = (15.0, 720.0)
    # What-if pairs for training (plant.whatif): every this many hours of each training scenario (0: none), the
    # plant branched and run whatif_hours on under two plans from the same state: KLa_5 or Q_intr x (1 +- f),
    # every loop off, or under the loops a setpoint +- d (g/m3). The model learns each control's effect from them.
    whatif_every_hours: float = 0.0
    whatif_hours: float = 6.0
    whatif_factor: tuple[float, float] = (0.15, 0.4)
    # On a plant under its loops, the share of origins whose pair moves a loop's setpoint (the DO's or the
    # nitrate's, alike), the rest a control open loop: what an operator under loops asks is a setpoint's effect.
    whatif_setpoint_share: float = 0.5
    whatif_do_shift: tuple[float, float] = (0.3, 0.8)
    whatif_no_shift: tuple[float, float] = (0.2, 0.5)
    # Blower pairs (a second stream, plants under their loops only; 0: none): every this many hours, the blowers of
    # tanks 3 and 4 as scheduled against both turned down by f, the loops on (what POST /optimize advises).
    whatif_blower_every_hours: float = 0.0
    whatif_blower_factor: tuple[float, float] = (0.2, 0.5)
    # moving_setpoints: DO in reactor 5 (through KLa5) and nitrate in reactor 2 (through Qintr) follow setpoints
    # an operator moves, with excitation on the loop outputs; KLa3 and KLa4 move open loop. The other closed-loop
    # policies draw their setpoints from the same ranges.
    do_setpoints: tuple[float, float] = (1.0, 3.0)  # g O2/m3, each held setpoint_hours
    no_setpoints: tuple[float, float] = (0.5, 2.0)  # g N/m3
    setpoint_hours: tuple[float, float] = (4.0, 24.0)
    kla_ranges: tuple[tuple[float, float], ...] = ((180.0, 240.0), (180.0, 240.0))  # KLa3, KLa4 (1/d)
    hold_hours: tuple[float, float] = (2.0, 12.0)  # each open-loop KLa level is held this long
    dither_share: float = 0.3  # share of the time the loop outputs carry a random offset (excitation)
    dither_kla: float = 40.0  # 1/d, largest offset on KLa5
    dither_qintr: float = 15_000.0  # m3/d, largest offset on Qintr
    dither_minutes: tuple[float, float] = (15.0, 120.0)
    # The operator's sludge age: wastage flow (m3/d) from cold to warm, set per scenario from its mean water
    # temperature between wastage_temperatures (degC); plant.bsm1.seasonal_wastage.
    wastage: tuple[float, float] = (140.0, 385.0)
    wastage_temperatures: tuple[float, float] = (11.0, 18.0)
    design_load: bool = True  # scale BSM2's influent to BSM1's design load (plant.influent.design_load_factors)
    # Regimes: BSM2 window w runs regime_cycle[w % len(regime_cycle)]: normal operation, added storms, or stress
    # (a low-aeration and an overload episode). dry is normal, rain is storm.
    regime_cycle: tuple[str, ...] = ("normal", "storm", "normal", "stress", "normal", "normal", "storm", "normal")
    storms_per_week: float = 2.0
    max_inflow: float = 92_230.0  # m3/d the plant's inlet passes (5 x BSM1's design flow); more overflows upstream
    # BSM2 windows after every training window, operated normally: the "later" period. 32-35 validate (the
    # most recent data before the test period, as a plant would calibrate), 36 and 40 are test scenarios.
    later_windows: tuple[int, ...] = (32, 33, 34, 35, 36, 40)
    # storm, normal, stress, and four of the later period, each policy at least once: the interval width is
    # fitted on these regimes and policies alike.
    val_scenarios: tuple[str, ...] = (
        "bsm2-09@open_loop_excited",
        "bsm2-10@constant_setpoints",
        "bsm2-11@moving_setpoints",
        "bsm2-32@ammonia_cascade",
        "bsm2-33@scheduled_setpoints",
        "bsm2-34@open_loop_fixed",
        "bsm2-35@constant_setpoints",
    )
    # Every held-out regime (normal: dry and bsm2-12; storm: rain and bsm2-14; later: bsm2-36 and bsm2-40) under
    # every policy, BSM1's standard strategy on its own dry file among them: forecasts are judged per cell.
    test_scenarios: tuple[str, ...] = (
        "dry@constant_setpoints",
        "dry@open_loop_excited",
        "dry@open_loop_fixed",
        "bsm2-12@moving_setpoints",
        "bsm2-12@scheduled_setpoints",
        "bsm2-12@ammonia_cascade",
        "rain@constant_setpoints",
        "rain@scheduled_setpoints",
        "rain@ammonia_cascade",
        "bsm2-14@open_loop_excited",
        "bsm2-14@open_loop_fixed",
        "bsm2-14@moving_setpoints",
        "bsm2-36@constant_setpoints",
        "bsm2-36@open_loop_excited",
        "bsm2-36@ammonia_cascade",
        "bsm2-40@open_loop_fixed",
        "bsm2-40@moving_setpoints",
        "bsm2-40@scheduled_setpoints",
    )
    workers: int = 2  # local processes (data.executor = "local")
    executor: str = "local"  # or "tcp://HOST:PORT": a Dask scheduler runs the simulations (plant.executor)
