"""Give a stored version the answer's pull of its loops' forecasts, as a new version, without training again:
``python -m training.loop_pull --version V --as W [--store models]``.

Calibration fits the pull for every model trained since it existed (``training.calibrate.fit_loop_pull``). A
version trained before keeps its weights and every other calibrated term: the pull is fitted on the version's
own validation windows (its data regenerated from its stored config, checked against the card's data hash), its
loops' held-out scores computed again, and the whole exported (parity-checked) into a new version that enters
the store unserved, with the gate's verdict. The measurements' forecasts are the version's own, to float32
rounding (the pull moves the looped controls' answer only, ``KoVAE.loop_shift``), so the gate, which scores
them, ties: serve it by hand, ``python -m training.promote W``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from modelcard.card import CardError, atomic_write, read_card
from modelcard.store import check_version_name, version_dir
from modelcard.validate import check_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.loop_pull", description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="the stored version to start from")
    parser.add_argument("--as", dest="new", required=True, help="the new version's name")
    parser.add_argument("--store", default="models", help="model store folder (default: models)")
    args = parser.parse_args(argv)
    store = Path(args.store)
    try:
        source = version_dir(store, args.version)
        card = read_card(source)
        check_version_name(args.new)
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if (store / args.new).exists():
        print(f"error: --as {args.new}: the store holds that version already", file=sys.stderr)
        return 2
    if not card["model"].get("loop_feedback"):
        print(f"error: {args.version} has no loops' feedback (model.loop_feedback): nothing to pull", file=sys.stderr)
        return 2

    from export.onnx_export import ParityError, export_version, load_model
    from training.calibrate import fit_loop_pull, predict
    from training.config import config_from_dict
    from training.prepare import prepare
    from training.publish import promote_if_better
    from training.report import loop_scores, report_markdown

    model, card = load_model(source)
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
    fit = fit_loop_pull(model, p, calib)
    if fit["table"] is None:
        print(
            f"{args.version}: the pull cut no loop's error on held-out validation windows; nothing stored",
            file=sys.stderr,
        )
        return 1
    calib.update(loop_pull=fit.pop("table"), loop_pull_fit=fit)
    metrics = json.loads((source / "metrics.json").read_text())
    metrics["loop_outputs"] = loop_scores(predict(model, p, p.test, 0, calib)[0], p, p.test)
    metrics["calibration"] = calib
    new_card = {**card, "version": args.new, "created_at": None, "calibration": calib}
    new_card["metrics"] = {**card["metrics"], "loop_outputs": metrics["loop_outputs"]}
    for loop, r in metrics["loop_outputs"].items():
        steps = ", ".join(f"{s}: {r['rmse'][s]:.4g} (last value {r['persistence_rmse'][s]:.4g})" for s in r["rmse"])
        print(f"{loop} RMSE by lead step, {r['unit']}: {steps}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / args.new
        shutil.copytree(source, candidate, ignore=shutil.ignore_patterns("card.*", "*.onnx", "gate.json"))
        try:
            w = p.test
            u_hist, u_fut = p.inputs(w)
            export_version(model, new_card, candidate, [(p.nx(w.x_hist[:8]), u_hist[:8], u_fut[:8])])
        except ParityError as exc:
            print(f"error: export refused: {exc}", file=sys.stderr)
            return 1
        try:
            check_card(read_card(candidate), args.new)  # before the gate: the folder goes with this function
        except CardError as exc:
            print(f"error: {exc}; nothing stored", file=sys.stderr)
            return 1
        atomic_write(candidate / "metrics.json", json.dumps(metrics, indent=1).encode())
        seconds, regimes = card["training"]["seconds"], {"regimes": metrics["regimes"]}
        report = report_markdown(args.new, metrics, calib, seconds, p.catalog)
        atomic_write(candidate / "report.md", report.encode())
        # The gate's verdict is recorded as for any candidate; it scores the measurements, which the pull leaves
        # as they were, so it ties the source's score: promotion is by hand.
        rc = promote_if_better(store, candidate, metrics["score"], p, cfg, force=False, never=True, **regimes)
    if rc == 0:
        print(f"serve it: python -m training.promote {args.new}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
