"""Three replicas of the real service sharing one model store, behind a real HAProxy on 127.0.0.1, scraped by
a real Prometheus: a version promoted mid-run reaches every replica with no failed request, and a replica
killed mid-run is routed around (its failed requests are counted and bounded)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from modelcard.runtime import ModelRuntime
from modelcard.store import set_current
from tests.conftest import clone_version, free_port, wait_for
from tests.test_deploy import DEPLOY, as_grafana_sends, query, running_prometheus
from tests.test_service import make_body

HAPROXY_CFG = """
global
    maxconn 512
defaults
    mode http
    timeout connect 1s
    timeout client 15s
    timeout server 15s
    option http-buffer-request
    retries 3
    retry-on conn-failure empty-response response-timeout
    option redispatch 1
frontend kovae
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    default-server inter 300ms fall 2 rise 2
{servers}
"""


def haproxy_binary() -> str:
    """Debian's haproxy: from PATH, else installed with apt-get (these machines run as root; .ci/run does it)."""
    if shutil.which("haproxy") is None:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "haproxy"]):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                pytest.fail(f"cannot install Debian's haproxy ({' '.join(cmd)}): {out.stderr[-500:]}")
    return shutil.which("haproxy") or pytest.fail("haproxy not found after installing it")


@pytest.fixture
def cluster(serve, store_copy, tmp_path: Path):
    haproxy = haproxy_binary()
    store, version = store_copy
    replicas = [serve(store, KOVAE_POLL_INTERVAL_S="0.3") for _ in range(3)]
    port = free_port()
    servers = "\n".join(f"    server r{i} 127.0.0.1:{r.port} check" for i, r in enumerate(replicas))
    (tmp_path / "haproxy.cfg").write_text(HAPROXY_CFG.format(port=port, servers=servers))
    proxy = subprocess.Popen([haproxy, "-f", str(tmp_path / "haproxy.cfg")], stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15)
    assert wait_for(lambda: _ok(client, "/readyz"))
    yield store, version, replicas, client
    client.close()
    proxy.terminate()
    proxy.wait(timeout=10)


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.TransportError:
        return False


def test_promotion_and_a_killed_replica_behind_haproxy(cluster, tmp_path: Path) -> None:
    store, version, replicas, client = cluster
    rt = ModelRuntime(store / version)
    body = make_body(rt, horizon=8)
    outcomes: list[tuple[float, int, str]] = []  # (time, status, served version); status 0: no answer
    stop = threading.Event()

    def load(rate: float = 40, seconds: float = 14) -> None:  # bounded: at most rate * seconds requests
        with httpx.Client(base_url=str(client.base_url), timeout=15) as c:
            t0 = time.monotonic()
            for i in range(int(rate * seconds)):
                if stop.is_set():
                    break
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                try:
                    r = c.post("/forecast", json=body)
                    outcomes.append((time.monotonic(), r.status_code, r.json().get("model_version", "")))
                except (httpx.TransportError, ValueError):
                    outcomes.append((time.monotonic(), 0, ""))

    # Prometheus scrapes every replica.
    targets = ", ".join(f'"127.0.0.1:{r.port}"' for r in replicas)
    config = (
        "global: {scrape_interval: 1s}\nscrape_configs:\n"
        f"  - job_name: kovae-forecast\n    static_configs: [{{targets: [{targets}]}}]\n"
    )
    with running_prometheus(tmp_path, config) as api:
        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(3)
        # 1. A new version promoted into the shared store: every replica switches, no request fails.
        new = clone_version(store, version, "v-next")
        set_current(store, new)
        promoted_at = time.monotonic()
        assert wait_for(lambda: all(r.client.get("/readyz").json()["model_version"] == new for r in replicas), 10)
        switched_at = time.monotonic()
        time.sleep(2)
        # 2. One replica killed: HAProxy routes around it.
        victim = replicas[0]
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        worker.join(timeout=60)
        stop.set()
        # 3. Prometheus saw all three replicas, and the dashboard's queries aggregate them.
        assert wait_for(lambda: len(query(api, 'up{job="kovae-forecast"}')["result"]) == 3, 20)
        total = query(api, 'sum(kovae_http_requests_total{route="/forecast"})')["result"]
        panels = json.loads((DEPLOY / "grafana" / "dashboards" / "kovae.json").read_text())["panels"]
        rate_expr = next(p["targets"][0]["expr"] for p in panels if p["title"] == "Request rate by route")
        rate = {r["metric"]["route"]: float(r["value"][1]) for r in query(api, as_grafana_sends(rate_expr))["result"]}
        version_expr = next(p["targets"][0]["expr"] for p in panels if p["title"].startswith("Model version"))
        by_version = query(api, version_expr)["result"]

    before_kill = [o for o in outcomes if o[0] < killed_at]
    after_kill = [o for o in outcomes if o[0] >= killed_at]
    failed_before = sum(1 for o in before_kill if o[1] != 200)
    failed_after = sum(1 for o in after_kill if o[1] != 200)
    print(
        f"\nscale-out: {len(outcomes)} requests through HAProxy; promotion reached 3 of 3 replicas in "
        f"{switched_at - promoted_at:.2f} s with {failed_before} failed; after killing one replica "
        f"{failed_after} of {len(after_kill)} failed"
    )
    assert failed_before == 0
    assert len(after_kill) > 50 and failed_after <= 2  # only requests in flight on the killed replica may fail
    assert {o[2] for o in after_kill if o[1] == 200} == {new}
    assert float(total[0]["value"][1]) > 100  # the three replicas' counters, summed
    assert rate["/forecast"] > 5  # the dashboard's request-rate panel, over all replicas
    assert {v["metric"]["version"]: float(v["value"][1]) for v in by_version}[new] == 1
