"""What do the plant's variables under feedback control miss? Train with the loops' setpoints as known inputs.

``python bench/setpoint_oracle.py [--preset default] [section.field=value ...]``  (about 10 min on 2 cores)

Dissolved oxygen in reactor 5 and nitrate in reactor 2 follow setpoints under PI control (training.data
.operation); the served model is told the KLa and Q_intr the loops applied, never the setpoints, and those two
variables hold back most of its plant skill (bench/accuracy.py's breakdown). This experiment trains the same
KoVAE, same preset and seed, with each loop's setpoint added to the controls (history and future, read by the
latent dynamics and the decoder alike), and prints the same per-regime table as training. A plant whose control
system plans setpoints, as a supervisory controller or an operator does, could send them. The result is
printed, never stored or served.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.influent_oracle import oracle_args, train_and_score
from modelcard.store import current_version
from training import evaluate as ev
from training import prepare as preparation
from training import report
from training.catalog import Catalog, Variable
from training.config import RunConfig, load_config
from training.data import ScenarioData, load_data, loop_setpoints, scenarios

SETPOINTS = (
    Variable("SO_5_setpoint", "g O2/m3", "DO setpoint of reactor 5 (the KLa5 loop)", 0.0, 10.0, "control"),
    Variable("SNO_2_setpoint", "g N/m3", "nitrate setpoint of reactor 2 (the Q_intr loop)", 0.0, 10.0, "control"),
)


def setpoints_known(cfg: RunConfig) -> preparation.Prepared:
    """The run's data with the loops' setpoints appended to each scenario's controls, and to the catalog."""
    if cfg.data.source != "bsm1":
        raise SystemExit("the setpoints are known for the simulated plant only (data.source = bsm1)")
    catalog, data, ids, data_hash = load_data(cfg)
    by_id = {sc.id: sc for sc in scenarios(cfg.data)}
    with_setpoints: dict[str, ScenarioData] = {
        sid: replace(d, u=np.concatenate([d.u, loop_setpoints(cfg.data, by_id[sid], d.t_minutes)], 1))
        for sid, d in data.items()
    }
    extended = Catalog(catalog.name, catalog.sample_minutes, catalog.timezone, (*catalog.variables, *SETPOINTS))
    return preparation.prepare_data(cfg, extended, with_setpoints, ids, data_hash)


def main() -> None:
    args = oracle_args(__doc__)
    cfg = load_config(args.preset, None, args.overrides)
    p = setpoints_known(cfg)
    metrics, calib = train_and_score(cfg, p)
    print(f"\nwith the loops' setpoints as known inputs ({', '.join(v.name for v in SETPOINTS)}):")
    report.print_headline(metrics, calib, p.catalog)
    served = current_version(Path(args.store))
    if served is not None:
        stored = json.loads((Path(args.store) / served / "metrics.json").read_text())
        print(f"\nserved model {served}, setpoints not known:")
        print("\n".join(ev.regime_lines(stored["regimes"], p.catalog.sample_minutes)))
        print(f"gate score {stored['score']:.4f}")


if __name__ == "__main__":
    main()
