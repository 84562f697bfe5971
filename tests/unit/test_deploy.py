"""Deployment files, validated offline (no Docker engine or cluster exists here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from scanner_gateway.config import Settings
from scanner_gateway.metrics import GatewayMetrics
from scanner_gateway.upstream.discovery import DnsUpstream

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30"
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def check_jsonschema(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", *args], capture_output=True, text=True)


def test_compose_file_matches_the_compose_spec(tmp_path):
    ok = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text((ROOT / "compose.yaml").read_text().replace("restart: unless-stopped", "restart: [sometimes]", 1))
    assert check_jsonschema("--builtin-schema", "vendor.compose-spec", str(broken)).returncode != 0  # it can fail


def test_compose_profiles_give_one_engine_each_and_the_gateway_finds_it():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["vllm"]["profiles"] == ["gpu"] and services["vllm-cpu"]["profiles"] == ["cpu"]
    for engine in ("vllm", "vllm-cpu"):
        assert "engine" in services[engine]["networks"]["default"]["aliases"]
        assert "healthcheck" in services[engine]
    assert services["gateway"]["environment"]["SCANNER_UPSTREAMS"] == "http://engine:8000"
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("gateway", "prometheus", "grafana"):
        assert "profiles" not in services[name]  # they come up with either profile


KEDA_API = "keda.sh/v1alpha1"


def validate_manifest(doc: dict) -> None:
    """Against Kubernetes' schemas, or KEDA's for its kinds (a CRD the first do not hold:
    cloudcoil's models, generated from KEDA's CRDs; a field they do not know is dropped
    on the way through, so a round trip that changes the document is an unknown field)."""
    if doc["apiVersion"] != KEDA_API:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    from cloudcoil.models.keda import v1alpha1

    model = getattr(v1alpha1, doc["kind"])
    again = model.model_validate(doc).model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert again == doc, f"fields KEDA's {doc['kind']} does not have: {doc} != {again}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_validate(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate_manifest(doc)


def test_keda_validation_can_fail():
    scaled = yaml.safe_load((ROOT / "deploy/k8s/engine-keda.yaml").read_text())
    validate_manifest(scaled)
    for broken in ({**scaled, "spec": {**scaled["spec"], "maxReplicaCount": "eight"}},
                   {**scaled, "spec": {**scaled["spec"], "maxReplicas": 8}}):  # the HPA's spelling
        with pytest.raises((AssertionError, ValueError)):
            validate_manifest(broken)


def test_kubernetes_validation_can_fail():
    deployment = next(d for d in yaml.safe_load_all((ROOT / "deploy/k8s/gateway.yaml").read_text())
                      if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_gateway_probes_and_upstreams_match_the_engine_statefulset():
    docs = {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d}
    container = docs[("Deployment", "scanner-gateway")]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # The replicas are the headless Service's records: the autoscalers' maximum is the only count.
    upstreams = Settings(upstreams=docs[("ConfigMap", "scanner-gateway")]["data"]["SCANNER_UPSTREAMS"])
    assert upstreams.upstream_urls() == [] and upstreams.upstream_names() == [DnsUpstream("http", "vllm", 8000)]
    service = docs[("Service", "vllm")]["spec"]
    assert service["clusterIP"] == "None" and service["ports"][0]["port"] == 8000
    assert not service.get("publishNotReadyAddresses")  # only ready replicas get records
    engines = docs[("StatefulSet", "vllm")]
    assert engines["spec"]["serviceName"] == "vllm" and service["selector"] == engines["spec"]["selector"]["matchLabels"]
    for autoscaler in (docs[("HorizontalPodAutoscaler", "vllm")], docs[("ScaledObject", "vllm")]):
        assert autoscaler["spec"]["scaleTargetRef"]["name"] == "vllm"


def known_metric_names() -> set[str]:
    names = set()
    for family in GatewayMetrics().registry.collect():
        names |= {s.name for s in family.samples} | {family.name}
    names |= {n + suffix for n in names for suffix in ("_total", "_bucket", "_sum", "_count")}
    return names | {"scanner_gpu_utilization_ratio", "scanner_gpu_memory_used_bytes", "scanner_gpu_memory_total_bytes"}


def test_grafana_dashboard_queries_only_metrics_that_exist():
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/scanner-gateway.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\b(scanner_[a-z_]+)", e)}
    assert used and used <= known_metric_names(), used - known_metric_names()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("scans per second", "latency", "queue depth", "rejections", "gpu utilisation"):
        assert wanted in titles


def test_alert_rules_use_only_metrics_that_exist():
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs = [r["expr"] for group in rules["groups"] for r in group["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b(scanner_[a-z_]+)", e)}
    assert len(exprs) >= 6 and used <= known_metric_names(), used - known_metric_names()
    names = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    assert {"ScannerNoHealthyReplica", "ScannerServerErrors", "ScannerOverloaded", "ScannerEventLoopLag"} <= names


def keda_queries() -> list[str]:
    scaled = yaml.safe_load((ROOT / "deploy/k8s/engine-keda.yaml").read_text())
    return [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]


def test_keda_triggers_read_the_gateway_queue_and_the_engine_queue():
    queries = keda_queries()
    assert any("scanner_admission_queue_depth" in q for q in queries)
    assert any("vllm:num_requests_waiting" in q for q in queries)
    used = {m for q in queries for m in re.findall(r"\b(scanner_[a-z_]+)", q)}
    assert used <= known_metric_names(), used - known_metric_names()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent (apt-get install prometheus; CI has it)")
def test_keda_queries_are_promql(tmp_path):
    rules = {"groups": [{"name": "keda", "rules": [{"record": f"keda:q{i}", "expr": q}
                                                   for i, q in enumerate(keda_queries())]}]}
    (tmp_path / "keda.yml").write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", str(tmp_path / "keda.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "keda:bad", "expr": "sum(scanner_admission_queue_depth"}]}]}))
    assert subprocess.run(["promtool", "check", "rules", str(tmp_path / "bad.yml")], capture_output=True).returncode != 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent (apt-get install prometheus; CI has it)")
def test_alert_rules_are_valid_and_fire_on_their_symptoms():
    """promtool checks the config and rules, and runs alerts-test.yml: each alert fires on
    synthetic series showing its symptom (and not before its `for`)."""
    directory = ROOT / "deploy/prometheus"
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts-test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=directory, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_gateway_and_engine():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"gateway:8080", "engine:8000"}
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_dockerfile_runs_as_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER gateway$", text, re.M) and "HEALTHCHECK" in text and "/health" in text
    assert 'CMD ["scanner-gateway", "serve"]' in text


def test_every_engine_we_start_fetches_no_media_and_answers_the_gateway_only():
    from scanner_gateway.engine.launcher import (
        NO_MEDIA_HOST,
        EngineOptions,
        engine_command,
        engine_env,
    )

    media_flag = f"--allowed-media-domains={NO_MEDIA_HOST}"
    launcher = engine_command(EngineOptions(model="/m"), "vllm")
    assert launcher[launcher.index("--allowed-media-domains") + 1] == NO_MEDIA_HOST  # `up`, `engine`, bench
    assert engine_env("/m", base={})["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"

    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    gpu = services["vllm"]
    assert media_flag in gpu["command"] and gpu["environment"]["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert gpu["environment"]["VLLM_API_KEY"] == services["gateway"]["environment"]["SCANNER_UPSTREAM_API_KEY"]
    assert services["vllm-cpu"]["environment"]["SCANNER_UPSTREAM_API_KEY"] == gpu["environment"]["VLLM_API_KEY"]
    assert "scanner-gateway\", \"engine\"" in (ROOT / "deploy/docker/engine-cpu.Dockerfile").read_text()
    for engine in ("vllm", "vllm-cpu"):
        assert "ports" not in services[engine]  # reachable from the compose network only

    docs = {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d}
    vllm = docs[("StatefulSet", "vllm")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in vllm["env"]}
    assert media_flag in vllm["args"] and env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"]["value"] == "0"
    gateway = docs[("Deployment", "scanner-gateway")]["spec"]["template"]["spec"]["containers"][0]
    gateway_env = {e["name"]: e for e in gateway["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"] == gateway_env["SCANNER_UPSTREAM_API_KEY"]["valueFrom"]
    policy = docs[("NetworkPolicy", "vllm")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app": "vllm"} and policy["policyTypes"] == ["Ingress"]
    allowed = [peer.get("podSelector", {}).get("matchLabels") for rule in policy["ingress"] for peer in rule["from"]]
    assert {"app": "scanner-gateway"} in allowed

    gpu_docs = (ROOT / "docs" / "operations.md").read_text()
    serve = re.search(r"[^\n]*vllm serve Ostrakon.*?\n(?=\S)", re.sub(r"\\\n\s*", " ", gpu_docs)).group(0)
    assert f"--allowed-media-domains {NO_MEDIA_HOST}" in serve and "--api-key" in serve
    assert "VLLM_MEDIA_URL_ALLOW_REDIRECTS=0" in serve
    for text in (serve, (ROOT / "compose.yaml").read_text(), *(p.read_text() for p in MANIFESTS)):
        assert "--allowed-local-media-path" not in text


def test_the_kubernetes_gateway_names_the_image_the_documented_build_makes():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    built = re.search(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text()).group(1)
    assert built == f"scanner-gateway:{version}"
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text()) if d]
    images = [c["image"] for d in docs if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]]
    assert images == [built]
