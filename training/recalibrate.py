"""Fit some calibrated terms of a stored version again, as a new version, without training again:
``python -m training.recalibrate --version V --as W --refit width [loop_pull] [--store models] [--run-dir D]``.

``width``: the interval width (``training.interval_width.fit_interval_width``), after a change in how the samples
are drawn or the width is fitted. ``loop_pull``: the answer's pull of the loops' forecasts
(``training.calibrate.fit_loop_pull``), for a version trained before it existed; it moves the loops' samples
too, so refit the width with it. The weights and every other
calibrated term are kept. The terms are fitted on the version's own validation windows (its data regenerated
from its stored config, checked against the card's data hash), the held-out evaluation run again, and the whole
exported (parity-checked) into ``D/export/W`` (default ``runs/W``), whence the gate's verdict takes it into the
store unserved. Neither
term moves the measurements' mean forecasts (the pull moves the looped controls' answer only,
``KoVAE.loop_shift``; the width the bands only), so the gate, which scores them, ties: serve it by hand,
``python -m training.promote W``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from modelcard.card import CardError, read_card
from modelcard.store import check_version_name, version_dir

TERMS = ("width", "loop_pull")  # the pull is fitted first: the width's samples take it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.recalibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="the stored version to start from")
    parser.add_argument("--as", dest="new", required=True, help="the new version's name")
    parser.add_argument("--refit", nargs="+", choices=TERMS, required=True, help="the terms to fit again")
    parser.add_argument("--store", default="models", help="model store folder (default: models)")
    parser.add_argument(
        "--run-dir", help="where the new version is written before the gate stores it (default: runs/<new name>)"
    )
    args = parser.parse_args(argv)
    store = Path(args.store)
    try:
        source = version_dir(store, args.version)
        card = read_card(source)
        check_version_name(args.new)
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or f"runs/{args.new}")
    if run_dir.exists() and not run_dir.is_dir():
        print(f"error: --run-dir {run_dir} is a file, not a folder", file=sys.stderr)
        return 2
    try:  # the training log and the kept epoch: what the report and its plots read
        source_metrics = json.loads((source / "metrics.json").read_text())
        log, kept_epoch = source_metrics["log"], source_metrics["kept_epoch"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(
            f"error: {args.version}'s metrics.json (with the training log and kept epoch) cannot be read: {exc}",
            file=sys.stderr,
        )
        return 2
    if (store / args.new).exists():
        print(f"error: --as {args.new}: the store holds that version already", file=sys.stderr)
        return 2
    if "loop_pull" in args.refit and not card["model"].get("loop_feedback"):
        print(
            f"error: --refit loop_pull: {args.version} has no loops' feedback (model.loop_feedback): nothing to pull",
            file=sys.stderr,
        )
        return 2

    import numpy as np

    from export.onnx_export import ParityError, load_model
    from training.calibrate import fit_loop_pull
    from training.config import config_from_dict
    from training.interval_width import fit_interval_width
    from training.prepare import prepare
    from training.publish import build_card, export_candidate, promote_if_better
    from training.report import print_headline, write_outputs
    from training.scoring import evaluate_all

    try:
        model, card = load_model(source)
    except CardError as exc:  # e.g. its weights.pt missing or damaged
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = config_from_dict(card["training"]["config"])
    p = prepare(cfg)
    if p.data_hash != card["data"]["config_hash"]:
        print(
            f"error: the data regenerated from {args.version}'s config hash to {p.data_hash}, its card says "
            f"{card['data']['config_hash']}: not the data it was calibrated on",
            file=sys.stderr,
        )
        return 2
    calib = dict(card["calibration"])
    if "loop_pull" in args.refit:
        fit = fit_loop_pull(model, p, calib)
        if fit["table"] is None and calib.get("loop_pull") is None and "width" not in args.refit:
            print(
                f"{args.version}: the pull cut no loop's error on held-out validation windows, and it has none: "
                "nothing would change; nothing stored",
                file=sys.stderr,
            )
            return 1
        steps = {c: f["kept_steps"] for c, f in fit.get("loops", {}).items()}
        print(f"the loops' pull, lead steps kept per loop: {steps}", file=sys.stderr)
        calib.update(loop_pull=fit.pop("table"), loop_pull_fit=fit)
    if "width" in args.refit:
        calib.update(fit_interval_width(model, p, np.array(calib["residual_decay"]), calib["samples"]))
    metrics, kept = evaluate_all(model, p, cfg, calib)
    seconds = card["training"]["seconds"]
    metrics.update(
        training_seconds=seconds,
        calibration=calib,
        log=log,
        kept_epoch=kept_epoch,
        recalibrated={"from": args.version, "refit": list(args.refit)},
    )
    print_headline(metrics, calib, p.catalog)
    new_card = build_card(args.new, cfg, p, metrics, calib, seconds)
    # Written as a training run writes its version (``training.run``): into the run folder, whence the gate
    # copies it into the store; a version the store refuses stays there, as the gate's message says.
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs = write_outputs(run_dir, args.new, metrics, calib, seconds, kept, p)
    if (source / "log.csv").is_file():
        shutil.copy2(source / "log.csv", run_dir / "log.csv")
        outputs.append("log.csv")
    try:
        candidate = export_candidate(run_dir, args.new, model, new_card, p, cfg, outputs)
    except ParityError as exc:
        print(f"error: export refused: {exc}", file=sys.stderr)
        return 1
    # The store refuses a card the service would (modelcard.store.add_version), and the candidate stays here.
    # The gate's verdict is recorded as for any candidate; it scores the measurements' mean forecasts, which
    # these terms leave as they were, so it ties the source's score: promotion is by hand.
    regimes = {"regimes": metrics["regimes"]}
    rc = promote_if_better(store, candidate, metrics["score"], p, cfg, force=False, never=True, **regimes)
    if rc == 0:
        print(f"serve it: python -m training.promote {args.new}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
