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
    # How the plant is run (plant.operation.operation): DO in reactor 5 (through KLa5) and nitrate in
    # reactor 2 (through Qintr) follow moving setpoints under PI control, with excitation on the loop outputs;
    # KLa3 and KLa4 move open loop.
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
    design_load: bool = True  # scale BSM2's influent to BSM1's design load (plant.bsm1.design_load_factors)
    # Regimes: BSM2 window w runs regime_cycle[w % len(regime_cycle)]: normal operation, added storms, or stress
    # (a low-aeration and an overload episode). dry is normal, rain is storm.
    regime_cycle: tuple[str, ...] = ("normal", "storm", "normal", "stress", "normal", "normal", "storm", "normal")
    storms_per_week: float = 2.0
    max_inflow: float = 92_230.0  # m3/d the plant's inlet passes (5 x BSM1's design flow); more overflows upstream
    # BSM2 windows after every training window, operated normally: the "later" period. 32-35 validate (the
    # most recent data before the test period, as a plant would calibrate), 36 and 40 are test scenarios.
    later_windows: tuple[int, ...] = (32, 33, 34, 35, 36, 40)
    # storm, normal, stress, and four of the later period: the interval width is fitted on these regimes alike
    val_scenarios: tuple[str, ...] = ("bsm2-09", "bsm2-10", "bsm2-11", "bsm2-32", "bsm2-33", "bsm2-34", "bsm2-35")
    test_scenarios: tuple[str, ...] = ("dry", "bsm2-12", "rain", "bsm2-14", "bsm2-36", "bsm2-40")
    workers: int = 2  # local processes (data.executor = "local")
    executor: str = "local"  # or "tcp://HOST:PORT": a Dask scheduler runs the simulations (plant.executor)
