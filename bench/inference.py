"""Latency of one 96-step forecast: ONNX Runtime vs PyTorch eager, batch 1 and 64, in the same run.

``python bench/inference.py [--store models] [--version V] [--iters 300]``. Needs the train extra (torch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from bench.cli import served_version
from export.onnx_export import load_model
from modelcard.runtime import ModelRuntime


def timed(fn, iters: int) -> np.ndarray:
    for _ in range(10):
        fn()
    out = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default="models")
    parser.add_argument("--version")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="threads for both runtimes")
    args = parser.parse_args()
    version = served_version(parser, Path(args.store), args.version)
    rt = ModelRuntime(Path(args.store) / version, threads=args.threads)
    model, card = load_model(Path(args.store) / version)
    cfg = model.cfg
    torch.set_num_threads(args.threads)
    L, H = card["history"]["length"], card["max_horizon"]
    print(f"model {version}: history {L}, horizon {H}, threads {args.threads}")
    print(f"{'batch':>5} {'runtime':<12} {'median ms':>10} {'p99 ms':>8}")
    rng = np.random.default_rng(0)
    decay = card["calibration"].get("residual_decay")  # what the graph adds
    decay = None if decay is None else torch.tensor(decay, dtype=torch.float32)
    for batch in (1, 64):
        xn = rng.standard_normal((batch, L, len(rt.x_mean))).astype(np.float32)
        un = rng.standard_normal((batch, L, model.u_dim)).astype(np.float32)
        ufn = rng.standard_normal((batch, H, model.u_dim)).astype(np.float32)
        noise = np.zeros((batch, 0, H, cfg.z_dim), np.float32)  # mean only, like eager forecast()
        feeds = {"x_hist": xn, "u_hist": un, "u_fut": ufn, "noise": noise}
        ort_ms = timed(lambda f=feeds: rt.session.run(["mean"], f), args.iters)
        tx, tu, tuf = (torch.from_numpy(a) for a in (xn, un, ufn))

        def eager(tx=tx, tu=tu, tuf=tuf) -> None:
            with torch.no_grad():
                model.forecast(tx, tu, tuf, residual_decay=decay)

        torch_ms = timed(eager, args.iters)
        for name, ms in (("onnxruntime", ort_ms), ("torch eager", torch_ms)):
            print(f"{batch:>5} {name:<12} {np.median(ms):>10.3f} {np.percentile(ms, 99):>8.3f}")
        print(f"{batch:>5} {'ratio':<12} {np.median(torch_ms) / np.median(ort_ms):>9.2f}x (eager / ORT, medians)")


if __name__ == "__main__":
    main()
