"""Deployment: a real Prometheus scrapes the real service with the shipped config; the dashboard's queries
parse and use only metrics the service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.test_service import make_body

DEPLOY = ROOT / "deploy"


def prometheus_binary(tmp_root: Path) -> str:
    """Debian's prometheus: from PATH, else the package's binary unpacked from `apt-get download`."""
    found = shutil.which("prometheus")
    if found:
        return found
    target = ROOT / ".ci" / "cache" / "prometheus"
    binary = target / "usr" / "bin" / "prometheus"
    if not binary.exists():
        target.mkdir(parents=True, exist_ok=True)
        dl = subprocess.run(["apt-get", "download", "prometheus"], cwd=target, capture_output=True, text=True)
        debs = list(target.glob("prometheus_*.deb"))
        if not debs:
            pytest.fail(f"cannot get Debian's prometheus package: {dl.stderr[-500:]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True)
    return str(binary)


@contextmanager
def running_prometheus(folder: Path, config: str) -> Iterator[httpx.Client]:
    """A real Prometheus with ``config`` on a free port of 127.0.0.1, ready; yields a client of its API."""
    (folder / "prometheus.yml").write_text(config)
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", folder / "alerts.yml")  # rule_files, beside the config
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus_binary(folder),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if api.get("/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield api
    finally:
        api.close()
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture
def prometheus(tmp_path: Path, serve, trained_store):
    store, _ = trained_store
    service = serve(store)
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert '"kovae:8000"' in config
    with running_prometheus(tmp_path, config.replace('"kovae:8000"', f'"127.0.0.1:{service.port}"')) as api:
        yield service, api


def shipped_scrape_seconds() -> int:
    scrape = re.search(r"scrape_interval: (\d+)s", (DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape, "the shipped prometheus.yml states its scrape interval in seconds"
    return int(scrape.group(1))


def as_grafana_sends(expr: str) -> str:
    """A dashboard query as Grafana sends it: $__rate_interval at four scrapes of the shipped config (the
    datasource's timeInterval)."""
    return expr.replace("$__rate_interval", f"{4 * shipped_scrape_seconds()}s")


def query(api: httpx.Client, expr: str) -> dict:
    r = api.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def wait_for(api: httpx.Client, expr: str, seconds: float = 60) -> list[dict]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = query(api, expr)["result"]
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"Prometheus never saw {expr}")


def test_prometheus_scrapes_requests_errors_and_latency(prometheus, trained_store) -> None:
    from modelcard.runtime import ModelRuntime

    service, api = prometheus
    store, version = trained_store
    rt = ModelRuntime(store / version)
    for seed in range(5):
        assert service.client.post("/forecast", json=make_body(rt, seed=seed)).status_code == 200
    assert service.client.post("/forecast", json={"horizon": -1}).status_code == 422

    ok = wait_for(api, 'kovae_http_requests_total{route="/forecast",status_class="2xx"}')
    assert ok[0]["metric"]["method"] == "POST" and ok[0]["metric"]["job"] == "kovae-forecast"
    assert float(ok[0]["value"][1]) == 5
    bad = wait_for(api, 'kovae_http_requests_total{route="/forecast",status_class="4xx"}')
    assert float(bad[0]["value"][1]) == 1
    errors = wait_for(api, "kovae_errors_total")
    assert {e["metric"]["type"] for e in errors} == {"invalid_request"}
    buckets = wait_for(api, 'kovae_http_request_duration_seconds_bucket{route="/forecast",status_class="2xx"}')
    assert {"le", "route", "status_class"} <= set(buckets[0]["metric"])
    info = wait_for(api, "kovae_model_info")
    assert info[0]["metric"]["version"] == version


def test_dashboard_queries_parse_and_use_only_exported_metrics(prometheus, trained_store) -> None:
    service, api = prometheus
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "kovae.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    # The request panels' rates follow the scrape interval, as Grafana sets $__rate_interval: at least four scrapes
    # (the datasource's timeInterval, which must be the shipped scrape interval). A fixed [1m] leaves a plant whose
    # Prometheus scrapes every 30 s or more with gaps.
    datasource = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert f"timeInterval: {shipped_scrape_seconds()}s" in datasource
    rates = [e for e in exprs if "rate(kovae_http_request" in e or "rate(kovae_inference" in e]
    assert rates and all("[$__rate_interval]" in e for e in rates), rates
    exported = set(re.findall(r"^# TYPE (\S+) ", service.client.get("/metrics").text, re.M))
    for expr in exprs:
        query(api, as_grafana_sends(expr))  # Prometheus parses and evaluates it
        for name in re.findall(r"\b(kovae_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert name in exported or base in exported, f"{expr}: {name} is not exported"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("request rate", "error", "latency", "inference", "batch", "horizon", "version", "spectral", "reload"):
        assert topic in titles


def test_the_alert_rules_load_evaluate_and_use_only_exported_metrics(prometheus) -> None:
    """The shipped rules: Prometheus loads every one from the shipped config and evaluates it without error, and
    each names only metrics the service exports (a renamed metric would leave an alert that never fires)."""
    service, api = prometheus
    exported = set(re.findall(r"^# TYPE (\S+) ", service.client.get("/metrics").text, re.M))
    deadline, rules = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        groups = api.get("/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        time.sleep(0.5)
    names = {r["name"] for r in rules}
    assert {"KovaeDown", "KovaeModelRefused", "KovaeServerErrors", "KovaeSlowForecasts"} <= names
    for rule in rules:
        assert rule["health"] == "ok", rule
        for name in re.findall(r"\b(kovae_[a-z_]+)", rule["query"]):
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert name in exported or base in exported, f"{rule['name']}: {name} is not exported"
    assert not [r for r in rules if r["name"] == "KovaeDown" and r["state"] != "inactive"]  # the service is up


K8S = DEPLOY / "k8s"


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    """Every manifest validates strictly (unknown fields refused) against the Kubernetes schemas, and the
    kustomization lists them all."""
    import sys

    import yaml

    manifests = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]) == set(manifests)
    exe = Path(sys.executable).with_name("kubernetes-validate")
    out = subprocess.run([str(exe), "--strict", *manifests], cwd=K8S, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed for resource") == len(manifests)
    kinds = {yaml.safe_load((K8S / m).read_text())["kind"] for m in manifests}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job"} <= kinds


def test_kubernetes_deployment_matches_the_service_and_the_image() -> None:
    """The manifest's port, probes, scrape annotations and user agree with the service and the Dockerfile."""
    import yaml

    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    port = container["ports"][0]["containerPort"]
    assert env["KOVAE_PORT"] == str(port) == pod["metadata"]["annotations"]["prometheus.io/port"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[env["KOVAE_MODEL_STORE"]]["readOnly"] is True
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert pod["spec"]["securityContext"]["runAsUser"] == int(uid)
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["memory"] and requests["memory"] and requests["cpu"]
    service = yaml.safe_load((K8S / "service.yaml").read_text())
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # Production habits: the HPA owns the count (an apply must not reset it), /forecast is never open for want of
    # a Secret, no Service injects KOVAE_* variables, endpoints drop a pod before it stops, one pod out at a time.
    assert "replicas" not in deployment["spec"]
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert not keys["KOVAE_API_KEYS"].get("optional", False)
    assert pod["spec"]["enableServiceLinks"] is False
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert yaml.safe_load((K8S / "pdb.yaml").read_text())["spec"] == {
        "maxUnavailable": 1,
        "selector": deployment["spec"]["selector"],
    }


def test_the_seed_job_fills_an_empty_store_once_and_needs_no_torch(tmp_path) -> None:
    """The seed Job's own command, run as the manifest has it (sh, its env), with the repository's store as the
    image's and torch shadowed by a module that refuses import (the serving image has none): an empty store gets
    the committed default whole and serves it; a store that serves a version is left as it is."""
    import sys

    import yaml

    job = yaml.safe_load((K8S / "seed-models-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    volume = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert volume == yaml.safe_load((K8S / "models-pvc.yaml").read_text())["metadata"]["name"]
    assert {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]} == {"/models": False}
    no_torch = tmp_path / "no_torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text("raise ImportError('torch is not in the serving image')\n")
    store = tmp_path / "models"
    env = {
        **{e["name"]: e["value"] for e in container["env"]},
        "SEED_FROM": str(ROOT / "models"),
        "KOVAE_MODEL_STORE": str(store),
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": f"{no_torch.parent}:{ROOT}",
    }

    def seed() -> subprocess.CompletedProcess:
        return subprocess.run(container["command"], env=env, capture_output=True, text=True, timeout=120)

    first = seed()
    assert first.returncode == 0, first.stdout + first.stderr
    served = (ROOT / "models" / "CURRENT").read_text().strip()
    assert (store / "CURRENT").read_text().strip() == served
    for f in (ROOT / "models" / served).iterdir():
        assert (store / served / f.name).read_bytes() == f.read_bytes(), f.name
    (store / "CURRENT").unlink()  # a seed stopped between its copy and CURRENT: the next try serves the copy
    again = seed()
    assert again.returncode == 0, again.stdout + again.stderr
    assert (store / "CURRENT").read_text().strip() == served
    (store / "CURRENT").write_text("a-version-the-training-job-promoted\n")  # the store is no longer the seed's
    again = seed()
    assert again.returncode == 0 and "left as it is" in again.stdout, again.stdout + again.stderr
    assert (store / "CURRENT").read_text() == "a-version-the-training-job-promoted\n"
    assert sorted(p.name for p in store.iterdir()) == sorted(["CURRENT", served])
