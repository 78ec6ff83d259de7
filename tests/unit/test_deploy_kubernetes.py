"""deploy/kubernetes: every manifest against its schema, and against forged itself.

No cluster runs here. Kubernetes' own kinds are validated strictly (unknown fields rejected) against
the API schemas the `kubernetes-validate` package ships, for the oldest Kubernetes these manifests
target and the newest it knows. The inference gateway's InferencePool and EndpointPickerConfig are
validated against deploy/kubernetes/schemas/ (written for forged from the documented API: no registry
package ships them; schemas/README.md). Then the manifests are held to forged: its forged.yaml loads
through forged's own config validation, the probes, port, key file path and drain time agree with
it, and every metric the endpoint picker is told to read is one forged exports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from forged import config
from forged.api.auth import parse_keys
from forged.metrics import LiveState, Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
SCHEMAS = {("inference.networking.k8s.io/v1", "InferencePool"): DEPLOY / "schemas" / "inferencepool-v1.json"}
EPP_SCHEMA = DEPLOY / "schemas" / "endpointpickerconfig-v1alpha1.json"
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def epp_config() -> dict[str, Any]:
    return yaml.safe_load(find("ConfigMap", "forged-epp-config")["data"]["forged-plugins.yaml"])


def forged_container() -> dict[str, Any]:
    [container] = [c for c in find("Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "forged"]
    return container


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.LoadedConfig:
    """The pod's forged.yaml, loaded by forged with the packaged profiles, as the pod would."""
    (tmp_path / "forged.yaml").write_text(find("ConfigMap", "forged-config")["data"]["forged.yaml"])
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(REPO / "etc" / "forged" / "sku_profiles.yaml", profiles)
    monkeypatch.setenv("FORGED_PROFILES_DIR", str(profiles))
    return config.load(tmp_path)


# ---------------------------------------------------------------- schemas

def test_every_manifest_has_a_schema_and_passes_it() -> None:
    docs = documents()
    assert {d["kind"] for _, d in docs} == {"Secret", "ConfigMap", "Deployment", "Service", "InferencePool"}
    for filename, doc in docs:
        schema = SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            jsonschema.validate(doc, json.loads(schema.read_text()))
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_validators_reject_what_a_cluster_would() -> None:
    """The checks above can fail: an unknown field, a wrong type, a missing required field."""
    deployment = find("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    schema = json.loads(SCHEMAS[("inference.networking.k8s.io/v1", "InferencePool")].read_text())
    pool = find("InferencePool")
    del pool["spec"]["endpointPickerRef"]["port"]  # required while kind is (by default) Service
    with pytest.raises(jsonschema.ValidationError, match="'port' is a required property"):
        jsonschema.validate(pool, schema)
    pool = find("InferencePool")
    pool["spec"]["targetPorts"] = [{"number": 70000}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, schema)
    epp = epp_config()
    epp["plugins"][1]["parameters"]["engineConfigs"][0]["kvUsageMetric"] = "forge_kv_cache_usage_ratio"
    with pytest.raises(jsonschema.ValidationError, match="kvUsageMetric"):
        jsonschema.validate(epp, json.loads(EPP_SCHEMA.read_text()))


def test_the_endpoint_picker_config_passes_its_schema_and_refers_to_what_it_defines() -> None:
    epp = epp_config()
    jsonschema.validate(epp, json.loads(EPP_SCHEMA.read_text()))
    names = {p.get("name") or p["type"] for p in epp["plugins"]}
    refs = [p["pluginRef"] for profile in epp["schedulingProfiles"] for p in profile["plugins"]]
    refs += [s["pluginRef"] for s in epp["data"]["sources"]]
    refs += [e["pluginRef"] for s in epp["data"]["sources"] for e in s["extractors"]]
    assert set(refs) <= names


# ---------------------------------------------------------------- the manifests and forged

def test_the_pods_forged_yaml_is_valid_forged_config_and_needs_keys(settings: config.LoadedConfig) -> None:
    http = settings.settings.listen.http
    assert not config.is_loopback(http.host) and http.api_keys_file is not None
    assert http.metrics_without_key and not settings.settings.listen.unix.enabled
    container = forged_container()
    assert container["args"] == ["--config-dir", "/etc/forged", "run"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/forged"
    # The key file forged reads is the one the init container copies out of the Secret.
    [init] = find("Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][-1] == http.api_keys_file
    assert http.api_keys_file.startswith(mounts["api-keys"] + "/")
    secret = find("Secret")
    assert init["command"][-2].endswith("/" + next(iter(secret["stringData"])))
    assert parse_keys(secret["stringData"]["api-keys"], "forged-secret.yaml")  # a key forged accepts


def test_probes_port_gpu_and_shutdown_agree_with_forged(settings: config.LoadedConfig) -> None:
    container = forged_container()
    [port] = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", settings.settings.listen.http.port)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    pod = find("Deployment")["spec"]["template"]["spec"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    # SIGTERM comes after the preStop pause; forged then drains for at most drain_timeout_s.
    assert pod["terminationGracePeriodSeconds"] > pause + settings.settings.server.drain_timeout_s


def test_service_and_pool_select_the_pods_on_forgeds_port() -> None:
    labels = find("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = find("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pool = find("InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [forged_container()["ports"][0]["containerPort"]]


def test_the_endpoint_picker_reads_gauges_forged_exports() -> None:
    """Each metric named in the picker's engine config is a gauge in forged's /metrics, and the pods
    carry the engine label that selects that config."""
    extractor = next(p for p in epp_config()["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    [engine] = extractor["engineConfigs"]
    labels = find("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["inference.networking.k8s.io/engine-type"] == engine["name"] == extractor["defaultEngine"]
    live = LiveState(active_sessions=1, queue_depth=2, max_sessions=4, max_queue_depth=8, target_ttft_p99_ms=1.0,
                     kv_blocks_total=100, kv_blocks_used=25, kv_blocks_cached=0, memory_used_bytes=1,
                     memory_total_bytes=2,
                     kv_tokens_per_block=32)
    exported = {f.name: f for f in text_string_to_metric_families(Metrics(lambda: live).exposition().decode())}
    expected = {"queuedRequestsSpec": 2, "runningRequestsSpec": 1, "kvUsageSpec": 0.25}
    for key, value in expected.items():
        family = exported[engine[key]]
        assert family.type == "gauge" and family.samples[0].value == value, key
    info = exported[engine["cacheInfoSpec"]]
    assert info.samples[0].labels == {"block_size": "32", "num_gpu_blocks": "100"}
    assert engine["loraSpec"] == ""  # forged serves no LoRA adapters: the picker must not look for them
