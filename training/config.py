"""Every knob of data generation, the model and training, in plain dataclasses.

A run's configuration is a preset (``tiny`` or ``default``), optionally overlaid by a TOML file with
``[data]``, ``[model]`` and ``[train]`` tables, then by ``section.field=value`` command-line overrides.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from plant.config import ConfigError, DataConfig
from plant.operation import POLICIES


@dataclass(frozen=True)
class ModelConfig:
    z_dim: int = 64
    h_dim: int = 256
    real_modes: int = 8  # z_dim - real_modes latent coordinates form 2x2 rotation-scaling blocks
    rho_max: float = 0.999  # every eigenvalue of A has modulus <= rho_max, by construction
    # With one mask per sequence the same rate drops whole features for a whole day: 0.2 (the element-wise
    # default before it) cost pooled skill (0.231 / 0.417 / 0.230 against 0.246 / 0.424 / 0.233 at 0.1; README).
    dropout: float = 0.1
    # One dropout mask per sequence, kept at every step (training.model.SequenceDropout); cards written before it:
    # a new mask per element (nn.Dropout). Training only: the served graph has no dropout.
    dropout_per_sequence: bool = True
    layer_norm: bool = True  # on the encoder's GRU output
    # The decoder: one hidden layer reading z and the same step's controls, x = D(z, u_c) (training.model). Two
    # layers scored a gate of 0.301 against 0.291, at 4 times the decoder's work (1,000 plans: 172 against 90 ms).
    decoder_layers: int = 1
    decoder_dim: int = 0  # hidden width of the decoder (0: h_dim, as in cards written before it)
    decoder_controls: bool = True  # cards written before it: false (export.onnx_export.load_model)
    decoder_skip: bool = True  # a linear path from the plan to x beside the decoder's MLP (older cards: none)
    # The decoder reads the plan for the catalog's fast variables only (modelcard.card.fast_outputs); the others
    # are decoded from z alone, so a loop's correlation in the data (more air with more ammonium) cannot pass as
    # an instant response of effluent ammonium to the air. Cards written before it: every output read the plan.
    decoder_fast_only: bool = True
    # The naive blends read the forecast under the plan held, so a plan's effect passes whole (training.model
    # .held_plan); cards written before it blend each plan's own forecast.
    blend_held_plan: bool = True
    calendar_daily: int = 2  # sin/cos harmonics of the time of day, known inputs beside the controls (0: none)
    calendar_weekly: int = 2  # sin/cos harmonics of the time of week (weekend flows are lower)
    disturbance_inputs: bool = True  # the disturbances (influent) as known inputs: measured, and forecast if given
    setpoint_inputs: bool = True  # the catalog's loop setpoints as optional known inputs (history and plan)
    seasonal_steps: int = 96  # samples per day: the forecast carries the decoder's miss one day earlier (0: none)
    # The weight of the same time yesterday follows how well yesterday matched today over the last seasonal_check
    # samples of the history (training.model.KoVAE.seasonal_weights): BSM1's dry file repeats its day, BSM2's
    # does not. Cards written before it: one weight per lead time and variable.
    seasonal_adaptive: bool = True
    # The decoder's miss is carried from each variable's last measured step, faded by its age (a sensor down for
    # the last 2 h still hands on its level); cards written before it: from the last step only.
    correction_last_seen: bool = True
    # A variable whose last measurement is a steps old takes the naive blends' weights of lead time k + a: a sensor
    # down for 2 h is forecast 2 h further from what it last said (training.model.KoVAE.blend_leads). Cards written
    # before it: lead k for every variable.
    blend_last_seen: bool = True
    seasonal_check: int = 32
    # The first this many latent coordinates (the daily harmonics first) take no input from the plan and alone
    # decode the exogenous outputs, the influent (training.model.KoVAE.exo_head): no what-if can move the influent.
    # Cards written before it: 0, every output decoded from all of z.
    exogenous_modes: int = 24
    # A control left to its loop drives the latent state with the model's own forecast of it, clipped to the
    # loop's output limits (the catalog's ``output_min``/``output_max``), and a loop's setpoint reaches the plant
    # only through that control (training.model.KoVAE.loop_inputs): a higher DO setpoint adds no air once the
    # blower is at its limit. Cards written before it: the setpoint drove the latent state directly.
    loop_feedback: bool = False


@dataclass(frozen=True)
class TrainConfig:
    history: int = 128  # 32 h at 15 minutes: a day, and 8 h to see whether yesterday repeats (model.seasonal_check)
    horizon: int = 96  # maximum forecast horizon, also the longest rollout trained
    epochs: int = 30  # the best-on-validation epoch is kept (epoch 15 in the committed run)
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    window_stride: int = 8  # stride between training windows (2 h: neighbours overlap almost entirely anyway)
    curriculum_epochs: int = 8  # rollout length grows from curriculum_start to horizon over these epochs
    curriculum_start: int = 8
    alpha: float = 1.0  # multi-step forecast loss
    step_weight_power: float = 1.0  # horizon step k weighted by persistence's error at k to the power -this
    beta: float = 0.01  # KL of the posterior against the linear transition prior
    gamma: float = 0.1  # eigenvalue penalty (the guarantee never depends on it)
    eig_target: str = "<=1"  # or "==1"
    lin_weight: float = 0.0  # rolled-out vs encoded future latents; 0.1 drifted (val forecast MSE 0.49 vs 0.33)
    rec_weight: float = 1.0
    gap_share: float = 0.3  # share of training windows given an artificial sensor gap in their history
    forecast_share: float = 0.5  # share of training windows given a (noisy) forecast of the future disturbances
    forecast_noise: float = 0.3  # its error at the horizon's end (training std units), growing as sqrt(lead time)
    # What each training window is told of each loop (training.loop.with_requests), drawn per window and loop: a
    # closed loop's control left to the loop (as a plant under control sends), else given with its setpoint told
    # or hidden; a told setpoint planned or held at its last value.
    loop_unknown_share: float = 0.7
    setpoint_share: float = 0.5  # windows with the control given: chance that the loop's setpoint is told too
    setpoint_held_share: float = 0.4
    # What-if pairs (data.whatif_every_hours): each batch also fits the difference of the model's forecasts under
    # a pair's two plans to the plant's (training.loop.pair_loss), this much of it, on this many pairs.
    pair_weight: float = 0.0
    pair_batch: int = 32
    # The pairs' gradient loses its part that opposes the forecast loss's and is scaled to at most its size
    # (training.loop.combined_gradient): the what-if fit may neither cost forecast accuracy to first order nor
    # drown the forecast's gradient in the optimiser's step size.
    pair_balance: bool = True
    checkpoint_every: int = 10
    seed: int = 0
    threads: int = 2
    # Read by nothing: the service answers the quantiles each request asks for, the card's intervals are fitted for
    # 10-90% (training.evaluate.INTERVAL). Kept, and validated, so that configs and cards that name it still load.
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    # Samples per forecast when the interval width is fitted and scored, written into the card (calibration.samples),
    # and what the service draws when a request gives no count: the 10-90% range of fewer samples covers less.
    calibration_samples: int = 100
    # The variable whose highest value over the history widens the interval (training.model.IntervalWidth): ""
    # is the catalog's first disturbance (BSM1: the influent flow), "none" a width that follows no variable.
    width_driver: str = ""
    max_eval_windows: int = 200  # at most this many validation/test windows per scenario


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # What-if pairs every 3 h, 80% of a looped plant's moving a setpoint: the DO setpoint's effect on effluent
    # ammonium needs many (R^2 -1.94 with pairs every 12 h at half, 0.42 every 6 h, 0.59 here; README), and the
    # loops driving the plant with the control they will apply, up to their limits (model.loop_feedback); and
    # every 6 h of a looped plant the blowers of tanks 3 and 4 turned down under the loops (KLa_5's answer to
    # them: R^2 0.20, gain 0.11 without; README).
    "default": {
        "data": {"whatif_every_hours": 3.0, "whatif_setpoint_share": 0.8, "whatif_blower_every_hours": 6.0},
        "model": {"loop_feedback": True},
        "train": {"pair_weight": 0.1},
    },
    # Small and fast: CI and tests. Short scenarios, a small network, a few epochs.
    "tiny": {
        "data": {
            "cache_dir": "data_cache/tiny",
            "bsm2_windows": 3,
            "scenario_days": 2.5,
            "warmup_days": 0.5,
            "stabilize": False,
            "later_windows": (),
            # Trains dry and bsm2-00 (open loop, excited) and rain (moving setpoints); one window held out closed
            # and open loop for each of validation and test.
            "policy_cycle": ("open_loop_excited", "moving_setpoints"),
            "val_scenarios": ("bsm2-01@moving_setpoints", "bsm2-01@open_loop_excited"),
            "test_scenarios": ("bsm2-02@constant_setpoints", "bsm2-02@open_loop_excited"),
        },
        # No weekly inputs: 2.5-day scenarios cannot teach a weekly cycle (with them the tiny model lost to
        # persistence on its held-out scenario).
        "model": {
            "z_dim": 16,
            "h_dim": 32,
            "real_modes": 4,
            "exogenous_modes": 6,
            "dropout": 0.0,
            "calendar_weekly": 0,
            "seasonal_steps": 16,
            "seasonal_check": 4,
        },
        "train": {
            "history": 20,
            "horizon": 16,
            "epochs": 20,
            "batch_size": 32,
            "window_stride": 2,
            "curriculum_epochs": 2,
            "curriculum_start": 4,
            "checkpoint_every": 5,
            "calibration_samples": 32,
            "max_eval_windows": 100,
        },
    },
}


def _coerce(value: Any, like: Any, where: str) -> Any:
    """Convert a TOML or command-line value to the type of the field's default."""
    if isinstance(like, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return bool(value)
    if isinstance(like, tuple):
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = like[0] if like else ""
        return tuple(_coerce(v, inner, where) for v in value)
    if isinstance(value, bool):  # TOML's true is no number: int(True) would train 1 epoch
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(like, int) and isinstance(value, float):  # TOML's 5.7 was 5 epochs; the command line refuses it
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    try:
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    return str(value)


def _element_like(section: Any, f: Any) -> Any:
    """A list field's value to coerce to: its current one, unless empty (a preset's ()), then an element of the
    annotated type, so that data.later_windows=[40] reads 40 as a number there too."""
    current = getattr(section, f.name)
    if not isinstance(current, tuple) or current:
        return current
    inner = str(f.type).removeprefix("tuple[").split(",")[0].split("]")[0].strip()
    return ({"int": 0, "float": 0.0, "bool": False}.get(inner, ""),)


def _apply(section: Any, values: dict[str, Any], name: str) -> Any:
    known = {f.name: _element_like(section, f) for f in fields(section)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            meant = f"did you mean {name}.{close[0]}? " if close else ""
            raise ConfigError(f"unknown setting {name}.{key}; {meant}known: {', '.join(sorted(known))}")
        changes[key] = _coerce(value, known[key], f"{name}.{key}")
    return replace(section, **changes)


def _merge(cfg: RunConfig, tables: dict[str, dict[str, Any]]) -> RunConfig:
    for name, values in tables.items():
        if name not in ("data", "model", "train"):
            raise ConfigError(f"unknown config section [{name}]; use [data], [model] or [train]")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name} must be a table ([{name}] with settings under it): {values!r}")
        cfg = replace(cfg, **{name: _apply(getattr(cfg, name), values, name)})
    return cfg


def load_config(
    preset: str = "default", path: str | Path | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Preset, then TOML file, then ``section.field=value`` overrides; validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = _merge(RunConfig(), PRESETS[preset])
    if path is not None:
        try:
            with open(path, "rb") as f:
                cfg = _merge(cfg, tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
    return with_overrides(cfg, overrides or [])


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` with ``section.field=value`` overrides applied (command lines, a stored run's config), validated."""
    for item in overrides:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot:
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. train.epochs=5)")
        cfg = _merge(cfg, {section: {name: value}})
    validate(cfg)
    return cfg


def config_from_dict(tables: dict[str, dict[str, Any]]) -> RunConfig:
    """A run's configuration as stored in a model card (``training.config``) or ``config.json``."""
    cfg = _merge(RunConfig(), tables)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    problems = []
    if not 0 < d.scenario_days <= 14:
        problems.append("data.scenario_days must be in (0, 14] (the dry and rain influents hold 14 days)")
    if not 0 <= d.warmup_days < d.scenario_days:
        problems.append("data.warmup_days must be >= 0 and shorter than data.scenario_days")
    if len(d.kla_ranges) != 2 or any(len(r) != 2 or not 0 <= r[0] <= r[1] <= 240 for r in d.kla_ranges):
        problems.append("data.kla_ranges must be two [lo, hi] pairs (KLa3, KLa4) within [0, 240] 1/d")
    names = ("do_setpoints", "no_setpoints", "setpoint_hours", "hold_hours", "dither_minutes", "wastage")
    for name in (*names, "wastage_temperatures"):
        pair = getattr(d, name)
        strict = name == "wastage_temperatures"  # a division by hi - lo
        if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (strict and pair[0] == pair[1]):
            problems.append(f"data.{name} must be [lo, hi] with 0 < lo {'<' if strict else '<='} hi")
    if d.whatif_every_hours < 0 or d.whatif_hours <= 0:
        problems.append("data.whatif_every_hours must be >= 0 (0: no what-if pairs) and data.whatif_hours > 0")
    # The [lo, hi] pairs below hold two numbers each: a shorter list failed with an IndexError, a longer one passed
    # with its extra values ignored. A pair of another length is named once, and its range left unchecked.
    pairs = ("whatif_factor", "whatif_blower_factor", "whatif_do_shift", "whatif_no_shift")
    pairs += ("excite_kla34", "excite_kla5", "excite_qintr", "excite_minutes")
    two = {name: len(getattr(d, name)) == 2 for name in pairs}
    problems += [
        f"data.{name} must be [lo, hi], two numbers: {list(getattr(d, name))}" for name in pairs if not two[name]
    ]
    if two["whatif_factor"] and not 0 < d.whatif_factor[0] <= d.whatif_factor[1] < 1:
        problems.append("data.whatif_factor must be [lo, hi] with 0 < lo <= hi < 1 (a control x (1 +- f))")
    if d.whatif_blower_every_hours < 0:
        problems.append("data.whatif_blower_every_hours must be >= 0 (0: no blower pairs)")
    if two["whatif_blower_factor"] and not 0 < d.whatif_blower_factor[0] <= d.whatif_blower_factor[1] < 1:
        problems.append("data.whatif_blower_factor must be [lo, hi] with 0 < lo <= hi < 1 (the blowers x (1 - f))")
    if not 0 <= d.whatif_setpoint_share <= 1:
        problems.append("data.whatif_setpoint_share must be in [0, 1] (a share of a closed-loop plant's origins)")
    for name in ("whatif_do_shift", "whatif_no_shift"):
        if two[name] and not 0 < getattr(d, name)[0] <= getattr(d, name)[1]:
            problems.append(f"data.{name} must be [lo, hi] with 0 < lo <= hi (g/m3)")
    if t.pair_weight < 0 or t.pair_batch < 1:
        problems.append("train.pair_weight must be >= 0 and train.pair_batch >= 1")
    if d.max_inflow <= 0:
        problems.append("data.max_inflow must be > 0 m3/d")
    if not 0 <= d.dither_share <= 1:
        problems.append("data.dither_share must be in [0, 1]")
    named = {name.partition("@")[2] for name in (*d.val_scenarios, *d.test_scenarios)} - {""}
    unknown = (set(d.policy_cycle) | named) - set(POLICIES)
    if not d.policy_cycle or unknown:
        known = ", ".join(POLICIES)
        problems.append(f"data.policy_cycle and ID@POLICY entries name policies ({known}); unknown: {sorted(unknown)}")
    for name in ("excite_kla34", "excite_kla5"):
        if two[name] and not 0 <= getattr(d, name)[0] <= getattr(d, name)[1] <= 360:
            problems.append(f"data.{name} must be [lo, hi] within [0, 360] 1/d")
    qintr, minutes = d.excite_qintr, d.excite_minutes
    if (two["excite_qintr"] and not 0 <= qintr[0] <= qintr[1]) or (
        two["excite_minutes"] and not 1 <= minutes[0] <= minutes[1]
    ):
        problems.append("data.excite_qintr and data.excite_minutes must be [lo, hi] with lo <= hi (minutes >= 1)")
    unknown = set(d.regime_cycle) - {"normal", "storm", "stress"}
    if not d.regime_cycle or unknown:
        problems.append(f"data.regime_cycle must list normal, storm or stress (unknown: {sorted(unknown)})")
    last_day = max([d.bsm2_windows - 1, *d.later_windows], default=0) * d.scenario_days + d.scenario_days
    if d.bsm2_windows < 0 or last_day > 609:
        problems.append(f"data.bsm2_windows and data.later_windows reach day {last_day:g}, beyond BSM2's 609 days")
    if any(w < d.bsm2_windows for w in d.later_windows):
        problems.append("data.later_windows must come after the training windows (index >= data.bsm2_windows)")
    if d.source not in ("bsm1", "historian"):
        problems.append('data.source must be "bsm1" (simulate) or "historian" (an imported folder)')
    if not 0 <= d.max_missing < 1:
        problems.append("data.max_missing must be in [0, 1)")
    for name in ("gap_share", "setpoint_share", "loop_unknown_share", "setpoint_held_share"):
        if not 0 <= getattr(t, name) <= 1:
            problems.append(f"train.{name} must be in [0, 1]")
    if not 0 <= t.forecast_share <= 1 or t.forecast_noise < 0:
        problems.append("train.forecast_share must be in [0, 1] and train.forecast_noise >= 0")
    if d.workers < 1:
        problems.append("data.workers must be >= 1")
    if d.executor != "local" and not d.executor.startswith("tcp://"):
        problems.append('data.executor must be "local" or a Dask scheduler address "tcp://HOST:PORT"')
    if m.z_dim < 2 or m.real_modes < 0 or (m.z_dim - m.real_modes) % 2 or m.real_modes > m.z_dim:
        problems.append("model.z_dim - model.real_modes must be a non-negative even number")
    if m.exogenous_modes < 0 or m.exogenous_modes % 2 or m.exogenous_modes > m.z_dim - m.real_modes:
        problems.append("model.exogenous_modes must be an even number from 0 to model.z_dim - model.real_modes")
    if not (0 <= m.calendar_daily <= 12 and 0 <= m.calendar_weekly <= 12):
        problems.append("model.calendar_daily and model.calendar_weekly must be in 0..12")
    if not 0 < m.rho_max < 1:
        problems.append("model.rho_max must be in (0, 1): with |lambda| = 1 a constant input grows without bound")
    if t.history < 4 or t.horizon < 2 or t.epochs < 1 or t.batch_size < 1:
        problems.append(
            "train.history >= 4, train.horizon >= 2, train.epochs >= 1 and train.batch_size >= 1: "
            f"{t.history}, {t.horizon}, {t.epochs}, {t.batch_size} (the report's ARX(4) baseline reads 4 past steps; "
            "the ONNX graph is traced at 2 or more steps, and a horizon of 1 cannot be)"
        )
    if t.eig_target not in ("<=1", "==1"):
        problems.append("train.eig_target must be '<=1' or '==1'")
    if any(not 0 < q < 1 for q in t.quantiles):
        problems.append("train.quantiles must lie in (0, 1)")
    if not 0 <= m.dropout < 1:
        problems.append(f"model.dropout must be in [0, 1): {m.dropout} (at 1 every feature is dropped)")
    if m.h_dim < 1 or m.decoder_layers < 0 or m.decoder_dim < 0:
        problems.append("model.h_dim >= 1, model.decoder_layers >= 0 and model.decoder_dim >= 0")
    if not (math.isfinite(t.lr) and t.lr > 0 and math.isfinite(t.min_lr) and 0 <= t.min_lr <= t.lr):
        problems.append(f"train.lr must be a positive number and train.min_lr in [0, lr]: {t.lr}, {t.min_lr}")
    if t.checkpoint_every < 1 or t.threads < 1 or t.calibration_samples < 2:
        problems.append(
            f"train.checkpoint_every >= 1, train.threads >= 1 and train.calibration_samples >= 2: "
            f"{t.checkpoint_every}, {t.threads}, {t.calibration_samples}"
        )
    if t.window_stride < 1 or t.max_eval_windows < 1 or t.curriculum_epochs < 0:
        problems.append(
            "train.window_stride >= 1, train.max_eval_windows >= 1 and train.curriculum_epochs >= 0: "
            f"{t.window_stride}, {t.max_eval_windows}, {t.curriculum_epochs}"
        )
    if not 1 <= t.curriculum_start <= t.horizon:
        problems.append(f"train.curriculum_start must be in 1..train.horizon ({t.horizon}): {t.curriculum_start}")
    weights = ("alpha", "beta", "gamma", "lin_weight", "rec_weight", "weight_decay", "step_weight_power")
    negative = [f"train.{w}" for w in weights if getattr(t, w) < 0]
    if negative or not t.grad_clip > 0:
        problems.append(f"loss weights must be >= 0 and train.grad_clip > 0: {', '.join(negative) or 'grad_clip'}")
    if not t.quantiles or list(t.quantiles) != sorted(set(t.quantiles)):
        problems.append(f"train.quantiles must be a non-empty increasing list: {list(t.quantiles)}")
    if m.seasonal_steps < 0 or m.seasonal_check < 1:
        problems.append(
            f"model.seasonal_steps >= 0 and model.seasonal_check >= 1: {m.seasonal_steps}, {m.seasonal_check}"
        )
    for name, seed in (("data.seed", d.seed), ("train.seed", t.seed)):
        if not 0 <= seed < 2**32:  # numpy's and the scenarios' generators take no other
            problems.append(f"{name} must be in 0..2**32 - 1: {seed}")
    if m.loop_feedback and not m.decoder_controls:
        problems.append(
            "model.loop_feedback needs model.decoder_controls (the loops' controls are forecast by decoding them "
            "with the plan): set model.loop_feedback=false or model.decoder_controls=true"
        )
    if d.storms_per_week < 0:
        problems.append(f"data.storms_per_week must be >= 0: {d.storms_per_week}")
    # NaN passes every comparison above (and --show-config would print it, which is no JSON): refused by name.
    for section, name in ((d, "data"), (m, "model"), (t, "train")):
        for f in fields(section):
            values = getattr(section, f.name)
            for v in values if isinstance(values, tuple) else (values,):
                if isinstance(v, float) and not math.isfinite(v):
                    problems.append(f"{name}.{f.name} must be a finite number: {values}")
                    break
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
