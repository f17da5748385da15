"""The images, built and run for real on a Docker engine (``deploy/docker/engine.sh`` starts one; .ci/run does).

Skipped only where no engine answers; CI always has one.
"""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from modelcard.runtime import ModelRuntime
from modelcard.store import current_version
from tests.conftest import ROOT, free_port
from tests.test_service import make_body


def _engine() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _engine(), reason="no Docker engine: run deploy/docker/engine.sh (CI does)")
SERVE = "kovae-forecast:test"
TRAIN = "kovae-train:test"


def docker(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out


@pytest.fixture(scope="module")
def serve_image() -> str:
    subprocess.run(["bash", "deploy/docker/base-image.sh"], cwd=ROOT, check=True, capture_output=True)
    docker("build", "--network", "host", "-t", SERVE, ".")
    return SERVE


def test_serve_image_runs_as_non_root_without_torch(serve_image: str) -> None:
    assert docker("image", "inspect", serve_image, "--format", "{{.Config.User}}").stdout.strip() == "10001"
    out = docker("run", "--rm", "--entrypoint", "id", serve_image).stdout
    assert out.startswith("uid=10001(kovae)")
    probe = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is not None)"
    assert docker("run", "--rm", "--entrypoint", "python", serve_image, "-c", probe).stdout.split() == ["True", "True"]


def test_serve_container_forecasts_and_turns_healthy_on_another_port(serve_image: str) -> None:
    """The committed model served from the image, on a port other than 8000: the HEALTHCHECK must follow it."""
    port = free_port()
    name = f"kovae-test-{port}"
    docker(
        "run", "-d", "--name", name, "--network", "host", "-e", f"KOVAE_PORT={port}",
        "--health-interval", "1s", "--health-start-period", "0s", serve_image,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        store = ROOT / "models"
        assert ready is not None and ready.json()["model_version"] == current_version(store)
        rt = ModelRuntime(store / current_version(store))
        r = httpx.post(f"{url}/forecast", json=make_body(rt, horizon=12) | {"quantiles": [0.1, 0.9]}, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["series"][0]["forecast"]["SNH_eff"]["mean"]) == 12
        deadline = time.monotonic() + 30
        health = ""
        while time.monotonic() < deadline and health != "healthy":
            health = docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
            time.sleep(0.5)
        assert health == "healthy"
    finally:
        docker("rm", "-f", name, check=False)


def test_train_image_has_cpu_torch_and_its_entrypoint_answers_help() -> None:
    build = subprocess.run(
        ["bash", "deploy/docker/build-train.sh", TRAIN], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert "usage: python -m training.run" in docker("run", "--rm", TRAIN, "--help").stdout
    version = docker("run", "--rm", "--entrypoint", "python", TRAIN, "-c", "import torch; print(torch.__version__)")
    assert version.stdout.strip() == "2.13.0+cpu"


def test_compose_brings_up_the_service_and_a_prometheus_that_scrapes_it(serve_image: str) -> None:
    """deploy/compose.yaml with docker-compose: the service (2 workers) and Prometheus (Debian's package on the
    same base image) on their own network; Prometheus scrapes the service by its compose name."""
    api_port, prom_port = free_port(), free_port()
    env = {**os.environ, "KOVAE_API_PORT": str(api_port), "KOVAE_PROMETHEUS_PORT": str(prom_port)}
    compose = ["docker-compose", "-f", "deploy/compose.yaml", "-p", f"kovaetest{api_port}"]
    up = subprocess.run([*compose, "up", "-d", "--build", "kovae", "prometheus"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1800)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        api = f"http://127.0.0.1:{api_port}"
        assert wait_http(f"{api}/readyz")
        store = ROOT / "models"
        rt = ModelRuntime(store / current_version(store))
        for seed in range(3):
            assert httpx.post(f"{api}/forecast", json=make_body(rt, seed=seed), timeout=30).status_code == 200
        prom = f"http://127.0.0.1:{prom_port}"

        def scraped() -> float:
            r = httpx.get(f"{prom}/api/v1/query", params={"query": 'sum(kovae_http_requests_total{route="/forecast"})'})
            result = r.json()["data"]["result"]
            return float(result[0]["value"][1]) if result else 0.0

        assert wait_http(f"{prom}/-/ready")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and scraped() < 3:
            time.sleep(1)
        assert scraped() >= 3
        targets = httpx.get(f"{prom}/api/v1/targets").json()["data"]["activeTargets"]
        assert [(t["scrapeUrl"], t["health"]) for t in targets] == [("http://kovae:8000/metrics", "up")]
    finally:
        subprocess.run([*compose, "down", "-v"], cwd=ROOT, env=env, capture_output=True, timeout=300)


def wait_http(url: str, seconds: float = 90) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False
