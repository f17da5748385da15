"""The heavy offline work on a real Dask cluster: a scheduler and two worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, free_port


@pytest.fixture(scope="module")
def dask_scheduler() -> str:
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dask = str(Path(sys.executable).with_name("dask"))
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1",
             "--no-dashboard", "--memory-limit", "4GiB"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_data_generation_on_dask_gives_what_a_local_run_gives(dask_scheduler, tiny_cfg, tiny_data, tmp_path) -> None:
    from plant.scenarios import generate

    cfg = replace(tiny_cfg.data, cache_dir=str(tmp_path / "dask-cache"), executor=dask_scheduler)
    remote = generate(cfg, progress=False)
    assert list(remote) == list(tiny_data)
    for sid, local in tiny_data.items():
        assert np.array_equal(remote[sid].x, local.x) and np.array_equal(remote[sid].u, local.u), sid
        assert np.array_equal(remote[sid].t_minutes, local.t_minutes) and remote[sid].seed == local.seed
    manifests = [json.loads((Path(d) / "manifest.json").read_text()) for d in (cfg.cache_dir, tiny_cfg.data.cache_dir)]
    assert manifests[0] == manifests[1]
    names = [sorted(p.name for p in Path(d).glob("*.npz")) for d in (cfg.cache_dir, tiny_cfg.data.cache_dir)]
    assert names[0] == names[1] and len(names[0]) == len(tiny_data)


def test_per_scenario_evaluation_on_dask_prints_what_a_local_run_prints(dask_scheduler, trained_store) -> None:
    store, _ = trained_store

    def bench(*extra: str) -> list[str]:
        cmd = [sys.executable, "bench/accuracy.py", "--store", str(store), "--samples", "8", *extra]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
        return [line for line in out.splitlines() if line.strip()]

    local, remote = bench(), bench("--executor", dask_scheduler)
    assert remote == local and any(line.startswith("all ") for line in local)
