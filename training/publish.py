"""Stage 5 of a run: the model card, the exported version, and the promotion gate.

The version is exported into the run folder first. It enters the store (copied whole through a staging folder)
and becomes current only if its held-out score beats the served version re-scored through ONNX Runtime, so
runs that are not promoted never litter the served store.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelcard.card import CARD_VERSION, CardError, atomic_write, last_observed, read_card
from modelcard.objective import Objective, trained_ranges
from modelcard.runtime import ModelRuntime
from modelcard.store import (
    ANY,
    GATE_FILE,
    StoreChanged,
    add_version,
    check_same_plant,
    current_version,
    plant_of,
    set_current,
    version_dir,
)
from plant.catalog import Catalog, loop_dict, model_store
from training import evaluate as ev
from training.config import RunConfig
from training.model import KoVAE
from training.prepare import Prepared
from training.scoring import GATE_RULE, scored_table


def card_variables(
    items: list[dict], mean: np.ndarray, std: np.ndarray, seen: tuple[np.ndarray, np.ndarray] | None
) -> list[dict]:
    """Catalog entries (name, unit, description, physical bounds) with the scalers and the training range."""
    out = []
    for j, v in enumerate(items):
        entry = {**v, "mean": float(mean[j]), "std": float(std[j])}
        if seen is not None:
            entry["training_range"] = {"min": float(seen[0][j]), "max": float(seen[1][j])}
        out.append(entry)
    return out


def build_card(version: str, cfg: RunConfig, p: Prepared, metrics: dict, calib: dict, seconds: float) -> dict:
    cat = p.catalog.to_dict()
    L = cfg.train.history
    card = {
        "card_version": CARD_VERSION,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sample_minutes": p.catalog.sample_minutes,
        "catalog": {"name": p.catalog.name, "timezone": p.catalog.timezone},
        "variables": {
            "measurements": card_variables(cat["measurements"], p.x_mean, p.x_std, p.x_range),
            "controls": card_variables(cat["controls"], p.u_mean, p.u_std, p.u_range),
            "calendar": p.calendar.to_card(),
            **(
                {
                    "setpoint_inputs": {
                        "variables": card_variables(cat["setpoints"], p.s_mean, p.s_std, p.s_range),
                        "columns": "after the controls: each one's z-scored value (0 when unknown), then a flag per "
                        "variable (1 = known), over the history and the horizon; the caller may send them",
                        "trained_with": {
                            "loop_unknown_share": cfg.train.loop_unknown_share,
                            "setpoint_share": cfg.train.setpoint_share,
                            "setpoint_held_share": cfg.train.setpoint_held_share,
                        },
                    }
                }
                if p.n_setpoints
                else {}
            ),
            **(
                {
                    "disturbance_inputs": {
                        "variables": [p.catalog.targets[i].name for i in p.disturbances],
                        "columns": "after the calendar: each one's z-scored value (0 when unknown), then a flag per "
                        "variable (1 = known); the history carries the measured values, the horizon a forecast "
                        "when the caller gives one",
                        "trained_with": {
                            "share": cfg.train.forecast_share,
                            "noise_at_horizon": cfg.train.forecast_noise,
                        },
                    }
                }
                if p.disturbances
                else {}
            ),
            **(
                {
                    # With the controller's output limits: the graph clips the loops' forecast to them
                    # (model.loop_feedback), as training did (training.prepare.Prepared.plan).
                    "loops": [{"measurement": "", **loop_dict(loop)} for loop in p.catalog.loops]
                }
                if p.looped
                else {}
            ),
            "control_timing": "a control value at time t is the mean applied over the interval ending at t",
        },
        "scaling": {"kind": "zscore", "where": "outside_graph", "formula": "(value - mean) / std"},
        "history": {"length": L, "min": max(2, L // 2), "max": 2 * L, "max_missing_share": cfg.data.max_missing},
        "max_horizon": cfg.train.horizon,
        "model": {"type": "KoVAE", **cfg.model.__dict__},
        "calibration": calib,
        "metrics": {
            k: metrics[k]
            for k in (
                "headline",
                "regimes",
                "score",
                "score_rule",
                "by_regime",
                "requests",
                "loop_outputs",
                "request",
                "coverage_80_test",
                "top5_variables",
                "test_scenarios",
            )
            if k in metrics
        },
        "data": {"config_hash": p.data_hash, "splits": {k: list(v) for k, v in p.split_ids.items()}},
        "training": {"seconds": seconds, "epochs": cfg.train.epochs, "config": cfg.to_dict()},
    }
    objective = None if p.catalog.optimizer is None else narrowed_objective(p.catalog.optimizer, card["variables"])
    if objective is not None:
        card["optimizer"] = objective
    elif p.catalog.optimizer is not None and unplannable_setpoints(p.catalog.optimizer, card["variables"]):
        print(f"note: {NO_LOOPS_NO_ADVICE}", file=sys.stderr)
    return card


NO_LOOPS_NO_ADVICE = (
    "model.setpoint_inputs is off, so the model has no loops and cannot plan the setpoints the catalog's [optimizer] "
    "decides: the card gets no optimizer table and POST /optimize answers 409 (the forecasts are served as usual)"
)


def unplannable_setpoints(objective: Objective, variables: dict) -> list[str]:
    """The setpoints an objective decides that a card's model has no loop for (``variables.loops``: none where
    the model does not read the setpoints, model.setpoint_inputs off)."""
    plannable = {loop["setpoint"] for loop in variables.get("loops", [])}
    return [name for name in objective.setpoints if name not in plannable]


def narrowed_objective(objective: Objective, variables: dict) -> dict | None:
    """The catalog's objective for setpoint advice as the card keeps it, each bound narrowed to the training range
    the card's ``variables`` give: a plan never asks the model about setpoints or controls outside its data. A
    variable whose bounds the data do not span (a setpoint never moved in training) is left to the plant; with
    none left, there is no advice (None).

    An objective that decides setpoints the model has no loops for (``unplannable_setpoints``) gives no advice
    either: such a model cannot plan them, and a plan of the other controls alone would hold the loops' controls
    at their last value, where the plant's loops will move them (the DO loop adds air when the blowers before it
    are cut), so its energy and effluent figures would be wrong."""
    if unplannable_setpoints(objective, variables):
        return None
    out, seen = objective.to_dict(), trained_ranges(variables)
    for key in ("setpoints", "controls"):
        for name, (lo, hi) in list(out[key].items()):
            if name not in seen:
                continue
            lo, hi = max(lo, seen[name][0]), min(hi, seen[name][1])
            if lo < hi:
                out[key][name] = [float(lo), float(hi)]
            else:
                del out[key][name]
    return out if out["setpoints"] or out["controls"] else None


def check_comparable(rt: ModelRuntime, version: str, catalog: Catalog) -> None:
    """The gate compares models of one plant only: the served one must forecast the same variables from the same
    controls. A store serving another catalog's model is the wrong store for this run: raises saying so."""
    if rt.measurements == list(catalog.target_names) and rt.controls == list(catalog.control_names):
        return
    served = plant_of(rt.card) or "?"
    if served != catalog.name:
        raise CardError(
            f"served version {version} is a model of catalog {served!r}, this run's is {catalog.name!r}: each "
            "catalog's models belong in a store of their own (python -m training.run without --store puts them "
            "in models/<catalog name>)"
        )
    raise CardError(f"served version {version} has other variables; compare by hand or use --force")


def score_served(store: Path, p: Prepared, candidate_history: int) -> tuple[str, float, dict[str, Any]] | None:
    """Re-evaluate the currently served version on this run's held-out windows through ONNX Runtime: its
    version, gate score and scored table (``training.scoring.scored_table``)."""
    version = current_version(store)
    if version is None:
        return None
    rt = ModelRuntime(version_dir(store, version))
    check_comparable(rt, version, p.catalog)
    w = p.test
    L = min(candidate_history, rt.card["history"]["max"])
    H = w.x_fut.shape[1]
    if rt.card["history"]["min"] > L or rt.max_horizon < H:
        raise CardError(f"served version {version} cannot forecast these windows; compare by hand or use --force")
    # The honest request, as the served version can take it: one without loops cannot leave a control to its
    # loop, so the plant holds it at its last value (what hold_controls sends).
    u_fut, s_hist, s_fut = p.request(w, "honest")
    if not rt.looped:
        u_fut = np.where(np.isnan(u_fut), last_observed(w.u_hist)[:, None], u_fut)
    n = p.n_targets
    x_hist = w.x_hist[:, -L:, :n]
    s_hist = None if s_hist is None else s_hist[:, -L:]
    try:
        mean = rt.predict(x_hist, w.u_hist[:, -L:], u_fut, w.t_last, s_hist=s_hist, s_fut=s_fut).mean[..., :n]
    except Exception as exc:  # e.g. ONNX Runtime refusing the inputs of a model with other known inputs
        why = f"served version {version} failed on these windows ({exc}); compare by hand or use --force"
        raise CardError(why) from None
    table = scored_table(p, mean, None, w)
    return version, ev.gate_score(table), table


# Scores closer than this are a tie, which does not pass: the candidate is scored in PyTorch, the served version
# through ONNX Runtime, and the same weights differ by about 1e-8 (a recalibrated default once "passed" by 1.7e-8).
GATE_TIE = 1e-4


def promote_if_better(
    store: Path,
    candidate: Path,
    score: float,
    p: Prepared,
    cfg: RunConfig,
    *,
    force: bool,
    never: bool,
    regimes: dict[str, Any] | None = None,
) -> int:
    """The promotion gate. The candidate version (a folder outside the store) enters the store and becomes
    current only if its held-out score beats the served one's re-scored on the same windows by more than GATE_TIE
    and, given its scored table (``regimes``), it loses to the naive forecasts in no cell and at no lead time more
    than the served version does (``training.evaluate.deepened_losses``) (or ``force``);
    ``never`` stores it without promoting. Otherwise it stays where it is, and the store is left alone.
    The verdict is written into the version as ``gate.json`` (``python -m training.promote`` lists it)."""
    version = candidate.name
    try:
        served = score_served(store, p, cfg.train.history)
        problem = None
    except CardError as exc:
        served, problem = None, str(exc)
    # A first model must at least tie the naive forecasts in its worst regime (score >= 0, that regime's skill
    # averaged over the scored lead times): serving one that loses to the last value or yesterday there is worse
    # than serving none. A NaN score (nothing scored) never passes.
    first_ok = math.isfinite(score) and score >= 0
    deeper = (
        []
        if served is None or regimes is None
        else ev.deepened_losses(regimes, served[2], GATE_TIE, p.catalog.sample_minutes)
    )
    passed = problem is None and (first_ok if served is None else score > served[1] + GATE_TIE and not deeper)
    if problem is not None:
        why = f"not comparable with the served model: {problem}"
    elif served is None:
        why = (
            f"no model was served; score {score:.4f} >= 0"
            if passed
            else f"no model was served, but score {score:.4f} is not >= 0: in its worst regime the forecast loses to "
            "the better of the last value and the same time yesterday (report.md's table says where)"
        )
    else:
        higher = score > served[1] + GATE_TIE
        verdict = ">" if higher else (f"ties (within {GATE_TIE:g})" if abs(score - served[1]) <= GATE_TIE else "<=")
        why = f"score {score:.4f} {verdict} served {served[0]}'s {served[1]:.4f} on the same held-out windows"
        if deeper:
            why += "; it loses more to the naive forecasts than the served version in " + "; ".join(deeper)
    gate = {
        "score": score,
        "served_version": served[0] if served else None,
        "served_score": served[1] if served else None,
        "passed": passed,
        "deepened_losses": deeper,
        "forced": force and not passed,
        "why": why,
        "rule": GATE_RULE,
    }
    atomic_write(candidate / GATE_FILE, json.dumps(gate, indent=1).encode())
    try:
        check_same_plant(store, read_card(candidate, verify=False))
    except CardError as exc:  # the wrong store: neither --force nor --no-promote puts the model there
        print(
            f"not stored: {exc}. The version is in {candidate}: `python -m training.promote --store "
            f"{model_store(p.catalog)} --add {candidate} --promote` serves it from its own store",
            file=sys.stderr,
        )
        return 2
    if never or passed or force:
        try:
            add_version(store, candidate)
        except CardError as exc:  # a card the service would refuse (modelcard.validate): kept out of the store
            print(f"not stored: {exc}. The version is in {candidate}", file=sys.stderr)
            return 2
        shutil.rmtree(candidate)
    if never:
        print(f"stored {version} in {store}, not promoted, as asked (gate: {why})", file=sys.stderr)
    elif passed or force:
        # Promoted only over the version it was compared with (or, with none served, over none): scoring takes
        # minutes, and a rollback or another run's promotion meanwhile must stand.
        replacing = served[0] if served else (None if problem is None else ANY)
        try:
            set_current(store, version, replacing=replacing)
        except StoreChanged as exc:
            compared = f"the served {replacing}" if replacing else "no served version"
            print(
                f"stored {version} in {store}, not promoted: {exc} while the gate compared {version} with "
                f"{compared}. `python -m training.promote --store {store} {version}` serves it",
                file=sys.stderr,
            )
            return 1
        print(f"stored {version} in {store} and promoted it ({'forced; ' if force else ''}{why})", file=sys.stderr)
    else:
        print(
            f"not promoted ({why}); the store is unchanged. The version is in {candidate}: "
            f"`python -m training.promote --add {candidate}` stores it, --force would have promoted it",
            file=sys.stderr,
        )
    return 0


def export_candidate(
    run_dir: Path,
    version: str,
    model: KoVAE,
    card: dict[str, Any],
    p: Prepared,
    cfg: RunConfig,
    files: list[str],
) -> Path:
    """Export ONNX (parity-checked) and the run's outputs into ``run_dir/export/<version>``, a complete version
    folder that the gate may add to the store. Raises ``export.onnx_export.ParityError`` when ONNX and PyTorch
    differ (nothing is left behind)."""
    from export.onnx_export import export_version  # torch exporter; imported when a version is written

    candidate = run_dir / "export" / version
    shutil.rmtree(candidate, ignore_errors=True)
    try:
        w = p.test
        u_hist, u_fut = p.inputs(w)  # the honest request: loop flags both ways across the windows
        sample = [(p.nx(w.x_hist[:8]), u_hist[:8], u_fut[:8])]
        export_version(model, card, candidate, sample)
        torch.save(model.state_dict(), candidate / "weights.pt")
        atomic_write(candidate / "config.json", json.dumps(cfg.to_dict(), indent=1).encode())
        for name in files:
            shutil.copy2(run_dir / name, candidate / name)
    except BaseException:
        shutil.rmtree(candidate, ignore_errors=True)
        raise
    return candidate
