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


def prometheus_binary(name: str = "prometheus") -> str:
    """Debian's ``prometheus`` (or its ``promtool``): from PATH, else the package's unpacked from `apt-get download`."""
    found = shutil.which(name)
    if found:
        return found
    target = ROOT / ".ci" / "cache" / "prometheus"
    binary = target / "usr" / "bin" / name
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
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(config)
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", folder / "alerts.yml")  # rule_files, beside the config
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus_binary(),
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
    datasource's timeInterval), $__range the dashboard's default time range."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "kovae.json").read_text())
    hours = re.fullmatch(r"now-(\d+)h", dashboard["time"]["from"])
    assert hours and dashboard["time"]["to"] == "now", dashboard["time"]
    return expr.replace("$__rate_interval", f"{4 * shipped_scrape_seconds()}s").replace("$__range", f"{hours[1]}h")


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


def test_prometheus_scrapes_a_protected_metrics_page_with_the_commented_bearer_key(
    tmp_path: Path, serve, trained_store
) -> None:
    """KOVAE_PROTECT_INFO: the shipped config with its commented ``authorization`` line taken in scrapes the page;
    without it the target is down (401)."""
    store, _ = trained_store
    service = serve(store, KOVAE_API_KEYS='["k1"]', KOVAE_PROTECT_INFO="true")
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    line = "    # authorization: {credentials_file: /etc/prometheus/kovae-key}"
    assert line in config
    (tmp_path / "key").write_text("k1\n")
    config = config.replace('"kovae:8000"', f'"127.0.0.1:{service.port}"')
    with running_prometheus(tmp_path / "open", config) as api:
        assert float(wait_for(api, 'up{job="kovae-forecast"}')[0]["value"][1]) == 0
    keyed = config.replace(line, line.replace("# ", "").replace("/etc/prometheus/kovae-key", str(tmp_path / "key")))
    with running_prometheus(tmp_path / "keyed", keyed) as api:
        assert wait_for(api, "kovae_model_ready == 1")


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


def alert_case(interval: str, series: dict[str, str], at: str, alert: str, fired: list[dict[str, str]]) -> dict:
    """One promtool rule test: ``series`` (selector: values) fed at ``interval``; at ``at``, ``alert`` firing once
    per label set in ``fired``, with the shipped annotations rendered for it."""
    import yaml

    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    rule = next(r for r in rules if r.get("alert") == alert)

    def rendered(labels: dict[str, str]) -> dict[str, str]:
        render = lambda text: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)  # noqa: E731
        return {k: render(v) for k, v in rule.get("annotations", {}).items()}

    expected = [{"exp_labels": {**rule["labels"], **lab}, "exp_annotations": rendered(lab)} for lab in fired]
    return {
        "interval": interval,
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": expected}],
    }


def test_the_alerts_fire_on_what_they_are_for_and_only_that(tmp_path: Path) -> None:
    """promtool's rule tests on the shipped alerts: a pod's first refused version, a pod with no model, every plant
    call failing at a plant's pace beside busy probes, and two deployments on versions of their own."""
    pod = {"job": "kovae-forecast", "instance": "a"}
    refused = {'kovae_model_refused{job="kovae-forecast",instance="a"}': "0x20 1x60"}  # the version first refused
    unready = {'kovae_model_ready{job="kovae-forecast",instance="a"}': "0x80"}
    calls = 'kovae_http_requests_total{job="kovae-forecast",method="%s",route="%s",status_class="%s"}'
    failing = {  # one /forecast in 5 min, every one a 500, beside one pod's probes and scrapes (all 2xx)
        calls % ("POST", "/forecast", "5xx"): " ".join(str(k // 5) for k in range(31)),
        calls % ("GET", "/readyz", "2xx"): "0+12x30",
        calls % ("GET", "/metrics", "2xx"): "0+12x30",
    }
    info = 'kovae_model_info{namespace="%s",job="kovae-forecast",instance="%s",version="%s"}'
    versions = {info % ("plant-a", "a1", "v1"): "1x20", info % ("plant-b", "b1", "v2"): "1x20"}
    versions |= {info % ("plant-b", "b2", "v3"): "1x20"}  # plant-a on one version; plant-b's pods on two
    cases = [
        alert_case("15s", refused, "15m", "KovaeModelRefused", [pod]),
        alert_case("15s", unready, "15m", "KovaeNotReady", [pod]),
        alert_case("1m", failing, "25m", "KovaeServerErrors", [{"job": "kovae-forecast"}]),
        alert_case("1m", versions, "15m", "KovaeVersionsDiffer", [{"namespace": "plant-b", "job": "kovae-forecast"}]),
    ]
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": cases}
    (tmp_path / "cases.yml").write_text(json.dumps(spec))  # JSON is YAML
    done = subprocess.run(
        [prometheus_binary("promtool"), "test", "rules", "cases.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


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
    # The kubelet's grace period holds the preStop sleep and the service's drain, or requests in flight are killed.
    from service.settings import Settings

    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(env.get("KOVAE_SHUTDOWN_GRACE_S") or Settings.model_fields["shutdown_grace_s"].default)
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["kovae"]
    assert float(compose["stop_grace_period"].removesuffix("s")) > drain
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
    assert sorted(p.name for p in store.iterdir()) == sorted([".lock", "CURRENT", served])  # .lock: the store's lock


def test_the_promote_job_rolls_the_store_back_and_needs_no_torch(tmp_path) -> None:
    """The hand-run Job (not in the kustomization: an apply must not move what is served) validates strictly, and
    its command, with the README's sed applied, serves the named version of a store without torch."""
    import sys

    import yaml

    text = (K8S / "tools" / "promote-job.yaml").read_text()
    assert "promote-job.yaml" not in (K8S / "kustomization.yaml").read_text()
    exe = Path(sys.executable).with_name("kubernetes-validate")
    out = subprocess.run([str(exe), "--strict", "tools/promote-job.yaml"], cwd=K8S, capture_output=True, text=True)
    assert out.returncode == 0 and "passed for resource" in out.stdout, out.stdout + out.stderr
    store = tmp_path / "models"
    shutil.copytree(ROOT / "models", store)
    served = (store / "CURRENT").read_text().strip()
    older = sorted(p.name for p in store.iterdir() if p.is_dir() and p.name != served)[-1]
    job = yaml.safe_load(text.replace("VERSION_TO_SERVE", older))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]} == {"/models": False}
    no_torch = tmp_path / "no_torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text("raise ImportError('torch is not in the serving image')\n")
    command = [str(store) if arg == "/models" else arg for arg in container["command"]]
    env = {
        **{e["name"]: e["value"] for e in container["env"]},
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": f"{no_torch.parent}:{ROOT}",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (store / "CURRENT").read_text().strip() == older != served
