"""The Kubernetes manifests under keda/ checked against the code they deploy.

No cluster runs here, so each promise a manifest makes is checked where it can be: the example
trigger's metadata goes through the real gRPC scaler (started from the ConfigMap's own config,
over a real Prometheus), the probes' paths and ports are asked of the real HTTP and gRPC
servers, the metrics-api example's valueLocation is resolved in the real REST answer and its
token (made by its own script) is required by the real service, the TLS example's
certificates (made by its own script) carry a real mutual-TLS call, and the TLS and
metrics-api variants are checked to differ from the default set only where they mean to.
What keeps KEDA answered through a rollout or a crash (two replicas, one replaced at a time,
a disruption budget, spread over nodes, a volume each, a pause before SIGTERM) and who may
connect (the network policies, with their namespaces set through kustomize) are read from
the manifests; tests/test_two_replicas.py runs the replicas themselves.
"""

from __future__ import annotations

import base64
import copy
import inspect
import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import requests
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forecaster.config import Settings, load_settings, with_overrides
from forecaster.models import MODEL_FACTORIES
from forecaster.scaler.bridge import ScalerBridge
from forecaster.scaler.generated import externalscaler_pb2 as pb
from forecaster.scaler.generated import externalscaler_pb2_grpc as pb_grpc
from forecaster.service import Service
from forecaster.spec import (
    IGNORED_KEDA_KEYS,
    METADATA_KEYS,
    TriggerSpec,
    parse_trigger_metadata,
)
from tests.support.prometheus import PrometheusServer
from tests.support.waiting import wait_for, wait_for_call

ROOT = Path(__file__).parent.parent
KEDA = ROOT / "keda"
TLS = KEDA / "examples" / "tls"
METRICS_API = KEDA / "examples" / "metrics-api"
YAML_FILES = sorted(KEDA.rglob("*.yaml"))
TEST_QUERY = "sum(demo_requests)"  # what the test Prometheus holds (tests/conftest.py)
# KEDA's authentication parameters for the external scaler (keda.sh/docs/2.17/scalers/external).
KEDA_TLS_PARAMETERS = {"caCert", "tlsClientCert", "tlsClientKey"}


# -- reading the manifests -------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _resources(folder: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists (files and folders, recursively), patches not applied."""
    kustomization = _docs(folder / "kustomization.yaml")[0]
    found: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        found.extend(_resources(path) if path.is_dir() else _docs(path))
    return found


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, (kind, name, len(matches))
    return matches[0]


def _config_text(configmap: dict[str, Any]) -> str:
    (text,) = configmap["data"].values()
    return str(text)


def _trigger(scaled_object: dict[str, Any]) -> dict[str, Any]:
    (trigger,) = scaled_object["spec"]["triggers"]
    return dict(trigger)


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _local(doc: dict[str, Any]) -> bool:
    """Kustomize reads an object annotated local-config and never applies it."""
    annotations = doc["metadata"].get("annotations") or {}
    return annotations.get("config.kubernetes.io/local-config") == "true"


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only: all these manifests use) against labels."""
    assert set(selector) == {"matchLabels"}, selector
    return bool(selector["matchLabels"].items() <= labels.items())


ALL = _resources(KEDA)
BASE = [doc for doc in ALL if not _local(doc)]
CONFIGMAP = _one(BASE, "ConfigMap", "forecaster-config")
STATEFULSET = _one(BASE, "StatefulSet", "forecaster")
POD_LABELS = STATEFULSET["spec"]["template"]["metadata"]["labels"]
NETWORK = _one(ALL, "ConfigMap", "forecaster-network")
POLICIES = {d["metadata"]["name"]: d for d in BASE if d["kind"] == "NetworkPolicy"}
SCALED_OBJECT = _one(BASE, "ScaledObject")
TRIGGER = _trigger(SCALED_OBJECT)
EXAMPLE_SERVER = TRIGGER["metadata"]["serverAddress"]
EXAMPLE_QUERY = TRIGGER["metadata"]["query"]


def _test_config(text: str, prometheus_url: str) -> str:
    """The config with the example Prometheus and query swapped for the test server's."""
    assert EXAMPLE_SERVER in text and EXAMPLE_QUERY in text
    return text.replace(EXAMPLE_SERVER, prometheus_url).replace(EXAMPLE_QUERY, TEST_QUERY)


def _test_metadata(metadata: dict[str, str], prometheus_url: str) -> dict[str, str]:
    return {**metadata, "serverAddress": prometheus_url, "query": TEST_QUERY}


def _spec(settings: Settings, metadata: dict[str, str]) -> TriggerSpec:
    spec, unknown = parse_trigger_metadata(
        {**settings.defaults, **metadata}, known_models=MODEL_FACTORIES
    )
    assert unknown == []
    return spec


# -- every file --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(KEDA)))
def test_every_document_names_its_api_version_kind_and_name(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert isinstance(doc.get("kind"), str) and doc["kind"], doc
        if doc["kind"] not in ("Kustomization", "Component"):  # these need no name
            assert isinstance(doc["metadata"]["name"], str) and doc["metadata"]["name"], doc


def test_the_default_set_is_forecaster_the_demo_workload_and_its_scaled_object() -> None:
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in BASE)
    assert kinds == sorted([
        "Namespace/forecaster", "ServiceAccount/forecaster", "ConfigMap/forecaster-config",
        "StatefulSet/forecaster", "Service/forecaster", "PodDisruptionBudget/forecaster",
        "NetworkPolicy/forecaster-grpc", "NetworkPolicy/forecaster-http",
        "Namespace/shop", "Deployment/web", "Service/web", "ScaledObject/web",
    ])
    assert [d["metadata"]["name"] for d in ALL if _local(d)] == ["forecaster-network"]
    assert not any(d["kind"] in ("Secret", "TriggerAuthentication") for d in BASE)


KUSTOMIZATIONS = sorted(p.parent for p in KEDA.rglob("kustomization.yaml"))
MONITORING = KEDA / "examples" / "monitoring"
METRICS_TOKEN = MONITORING / "metrics-token"


def _is_component(folder: Path) -> bool:
    """A kustomize Component: a part another kustomization adds, never built alone."""
    return bool(_docs(folder / "kustomization.yaml")[0]["kind"] == "Component")


def _secret_data(secret: dict[str, Any]) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize built in)")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_kustomization_builds(folder: Path, tmp_path: Path) -> None:
    # On a copy: the TLS example needs the certificates its script makes, and the metrics-api
    # example the token its script makes, both kept out of the tree.
    copy_root = tmp_path / "keda"
    shutil.copytree(KEDA, copy_root, ignore=shutil.ignore_patterns("certs", "api-token"))
    target = copy_root / folder.relative_to(KEDA)
    if folder == TLS:
        subprocess.run([str(target / "gen-certs.sh")], check=True, capture_output=True,
                       timeout=60)
    if folder == METRICS_API:
        subprocess.run([str(target / "gen-token.sh")], check=True, capture_output=True,
                       timeout=60)
    if _is_component(folder):  # added, as its comment says, to the default set
        base = copy_root / "kustomization.yaml"
        kustomization = _docs(base)[0]
        kustomization["components"] = [str(folder.relative_to(KEDA))]
        base.write_text(yaml.safe_dump(kustomization), encoding="utf-8")
        target = copy_root
    built = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d is not None]
    assert docs
    assert not any(_local(d) for d in docs)  # the network settings are never applied
    if folder == TLS:
        workload = _one(docs, "StatefulSet", "forecaster")
        assert "grpc" not in _container(workload)["startupProbe"]
        assert workload["spec"]["volumeClaimTemplates"]  # the patch keeps the state volume
        assert {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"} == {
            "forecaster-tls", "forecaster-client-tls"
        }
        config = _config_text(_one(docs, "ConfigMap", "forecaster-config"))
        assert yaml.safe_load(config)["tls"]["clientCAFile"]
    if folder == METRICS_API:
        _check_built_api_token(docs, (target / "api-token").read_bytes())
    if folder == METRICS_TOKEN:
        _check_built_metrics_token(docs)


def _check_built_api_token(docs: list[dict[str, Any]], token: bytes) -> None:
    """One token, in a Secret forecaster mounts as its apiToken file and in the Secret the
    TriggerAuthentication hands KEDA, in the ScaledObject's namespace."""
    assert token and token == token.strip()  # KEDA's header would carry a newline
    workload = _one(docs, "StatefulSet", "forecaster")
    container = _container(workload)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    token_file = Path(env["FORECASTER_API_TOKEN_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == token_file.parent]
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == mount["name"]]
    secrets = {(d["metadata"]["namespace"], d["metadata"]["name"]): _secret_data(d)
               for d in docs if d["kind"] == "Secret"}
    ours = secrets[(workload["metadata"]["namespace"], volume["secret"]["secretName"])]
    assert ours[token_file.name] == token
    scaled_object = _one(docs, "ScaledObject", "web")
    trigger = _trigger(scaled_object)
    assert trigger["metadata"]["authMode"] == "bearer"
    auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "token"  # the metrics-api trigger's bearer token
    namespace = scaled_object["metadata"]["namespace"]
    assert auth["metadata"]["namespace"] == namespace
    assert secrets[(namespace, ref["name"])][ref["key"]] == token


def _check_built_metrics_token(docs: list[dict[str, Any]]) -> None:
    """forecaster's metricsToken comes from the Secret the ServiceMonitor sends, in the
    namespace both live in."""
    monitor = _one(_docs(MONITORING / "servicemonitors.yaml"), "ServiceMonitor", "forecaster")
    (endpoint,) = monitor["spec"]["endpoints"]
    credentials = endpoint["authorization"]["credentials"]
    workload = _one(docs, "StatefulSet", "forecaster")
    (entry,) = [e for e in _container(workload)["env"] if e["name"] == "FORECASTER_METRICS_TOKEN"]
    assert entry["valueFrom"]["secretKeyRef"] == credentials
    assert monitor["metadata"]["namespace"] == workload["metadata"]["namespace"]
    assert load_settings(None, env={entry["name"]: "a-token"}).metrics_token == "a-token"


def test_the_metrics_token_component_reads_the_secret_the_service_monitor_sends() -> None:
    """The same check as on the built set, on the component's patch as written."""
    component = _docs(METRICS_TOKEN / "kustomization.yaml")[0]
    assert component["kind"] == "Component"
    _check_built_metrics_token(
        [doc for patch in component["patches"] for doc in _docs(METRICS_TOKEN / patch["path"])]
    )


# -- the trigger ---------------------------------------------------------------------------------


EXTERNAL_TRIGGERS = {
    "default": TRIGGER,
    "tls": _trigger(_one(_docs(TLS / "scaledobject.yaml"), "ScaledObject")),
}


@pytest.mark.parametrize("example", sorted(EXTERNAL_TRIGGERS))
def test_trigger_metadata_holds_only_keys_the_scaler_reads(example: str) -> None:
    trigger = EXTERNAL_TRIGGERS[example]
    assert trigger["type"] == "external"
    metadata = trigger["metadata"]
    assert set(metadata) <= set(METADATA_KEYS) | IGNORED_KEDA_KEYS
    assert all(isinstance(value, str) for value in metadata.values())  # KEDA sends strings
    host, _, port = metadata["scalerAddress"].rpartition(":")
    assert host == "forecaster.forecaster.svc.cluster.local" and port == "50051"
    assert trigger["useCachedMetrics"] is True


@pytest.mark.parametrize("example", ["default", "tls", "metrics-api"])
def test_every_trigger_asks_for_average_value(example: str) -> None:
    """With AverageValue the HPA asks for planned load / targetValue replicas; with Value it
    would multiply that by the current count, and KEDA applies no fallback."""
    folder = {"default": KEDA, "tls": TLS, "metrics-api": METRICS_API}[example]
    trigger = _trigger(_one(_docs(folder / "scaledobject.yaml"), "ScaledObject"))
    assert trigger["metricType"] == "AverageValue"


def test_scaled_object_has_fallback_bounds_and_a_slow_scale_down() -> None:
    spec = SCALED_OBJECT["spec"]
    assert spec["scaleTargetRef"]["name"] == "web"
    assert 1 <= spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    assert spec["fallback"]["failureThreshold"] >= 1
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300


def test_configured_target_is_the_one_the_trigger_asks_about(tmp_path: Path) -> None:
    """The ConfigMap warms up shop/web before KEDA asks; that only helps if KEDA's trigger
    resolves to the same target (same namespace, name, metric name and spec)."""
    settings = load_settings(_write(tmp_path, _config_text(CONFIGMAP)), env={})
    assert EXAMPLE_SERVER in [server.url for server in settings.servers]  # else refused
    (target,) = settings.targets
    assert (target.namespace, target.name) == (
        SCALED_OBJECT["metadata"]["namespace"], SCALED_OBJECT["metadata"]["name"]
    )
    assert _spec(settings, dict(target.metadata)) == _spec(settings, TRIGGER["metadata"])


# The KEDA release that added a ScaledObject field (KEDA's changelog and versioned docs): the
# newest of those the manifests set is the KEDA they need.
KEDA_FIELD_SINCE = {
    "useCachedMetrics": (2, 9),  # trigger: cache the poll's value for the HPA's reads
    "activationTargetValue": (2, 8),  # metrics-api trigger metadata
    "fallback": (2, 4),
}
KEDA_MINIMUM = re.compile(r"need KEDA (\d+)\.(\d+) or later")


def _keys(node: Any) -> Iterator[str]:
    """Every mapping key in a document, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _keys(item)


def test_one_keda_minimum_is_stated_and_it_is_what_the_fields_need() -> None:
    """The newest field a shipped ScaledObject sets decides the KEDA it needs; the manifests,
    the guide and the README state that one version."""
    sources = [folder / "scaledobject.yaml" for folder in (KEDA, TLS, METRICS_API)]
    used = {key for path in sources for doc in _docs(path) if doc["kind"] == "ScaledObject"
            for key in _keys(doc) if key in KEDA_FIELD_SINCE}
    needed = max(KEDA_FIELD_SINCE[key] for key in used)
    for path in [*sources, ROOT / "docs" / "deploy.md", ROOT / "README.md"]:
        stated = {tuple(map(int, found)) for found in KEDA_MINIMUM.findall(path.read_text())}
        assert stated == {needed}, (path.relative_to(ROOT), stated, needed)


EXAMPLES = {"default": KEDA, "tls": TLS, "metrics-api": METRICS_API}
METRIC_ROUTE = r"/api/v1/targets/([^/]+)/([^/]+)/([^/]+)/metric"


def _example_settings(example: str, folder: Path) -> Settings:
    """The config an example deploys, its tls block left out (its files exist in a pod only)."""
    config = _config_patch() if example == "tls" else CONFIGMAP
    raw = yaml.safe_load(_config_text(config))
    raw.pop("tls", None)
    return load_settings(_write(folder, yaml.safe_dump(raw)), env={})


def _landing_target(settings: Settings, scaled_object: dict[str, Any]) -> dict[str, str]:
    """The metadata of the configured target a ScaledObject's trigger resolves to."""
    trigger = _trigger(scaled_object)
    key: tuple[str, ...]
    if trigger["type"] == "external":
        key = (scaled_object["metadata"]["namespace"], scaled_object["metadata"]["name"],
               trigger["metadata"]["metricName"])
    else:
        route = re.fullmatch(METRIC_ROUTE, urlsplit(trigger["metadata"]["url"]).path)
        assert route, trigger["metadata"]["url"]
        key = route.groups()
    (target,) = [t for t in settings.targets
                 if (t.namespace, t.name, t.metadata.get("metricName")) == key]
    return dict(target.metadata)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_the_controller_replays_each_scaled_objects_own_stabilization_window(
    example: str, tmp_path: Path
) -> None:
    """forecaster's SLO controller replays the HPA with the trigger's scaleDownStabilization
    (300s unless given); it must be the ScaledObject's window, on the trigger KEDA sends and
    on the configured target the trigger lands on (all a metrics-api trigger has)."""
    scaled_object = _one(_docs(EXAMPLES[example] / "scaledobject.yaml"), "ScaledObject")
    behavior = scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    window = behavior["scaleDown"]["stabilizationWindowSeconds"]
    settings = _example_settings(example, tmp_path)
    target = _landing_target(settings, scaled_object)
    assert _spec(settings, target).scale_down_stabilization_seconds == window
    trigger = _trigger(scaled_object)
    if trigger["type"] == "external":
        assert _spec(settings, trigger["metadata"]).scale_down_stabilization_seconds == window


# -- the StatefulSet against the image and the config ------------------------------------------


def test_statefulset_runs_the_image_as_its_user_with_the_config_it_mounts(tmp_path: Path) -> None:
    pod = STATEFULSET["spec"]["template"]["spec"]
    container = _container(STATEFULSET)
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid = re.findall(r"^USER\s+(\d+)", dockerfile, flags=re.MULTILINE)[-1]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["tmp"] == "/tmp" and "emptyDir" in volumes["tmp"]
    # --config names a key of the ConfigMap, under the path that ConfigMap is mounted at.
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    (config_volume,) = [n for n, v in volumes.items() if "configMap" in v]
    assert volumes[config_volume]["configMap"]["name"] == CONFIGMAP["metadata"]["name"]
    assert config_path.parent == Path(mounts[config_volume])
    assert config_path.name in CONFIGMAP["data"]
    assert args == ["serve", "--config", str(config_path)]
    (cmd,) = re.findall(r"^CMD\s+(\[.*\])\s*$", dockerfile, flags=re.MULTILINE)
    assert json.loads(cmd) == args  # the same as the image's default command
    resources = container["resources"]
    assert resources["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert resources["limits"] == {"memory": "1536Mi"}


# Measured with `auto` targets of 14 days at 5 minutes (bench/README.md): the service idle and
# what 1,000 targets add to it at the peak of a refit round (bench_scaler_load.py, 2026-12-02),
# a fit worker's RSS (the same run), one target's saved state (bench_restart.py).
SERVICE_IDLE_MB = 269.8
SERVICE_MB_PER_1000_TARGETS = 232.0
STEADY_MB_PER_1000_TARGETS = 183.6  # above idle at every point of the 2026-12-05 run
FIT_WORKER_MB = 212.0
STATE_KB_PER_TARGET = 143.0


def _quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory or storage quantity in the binary units these manifests use."""
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * {"Mi": 2**20, "Gi": 2**30}[unit]


def test_max_targets_fits_the_replicas_memory_and_volume(tmp_path: Path) -> None:
    """maxTargets is what one replica is sized for: that many targets at their peak, with the
    fit workers, within the memory limit; their saved state twice over on the volume."""
    engine = load_settings(_write(tmp_path, _config_text(CONFIGMAP)), env={}).engine
    resources = _container(STATEFULSET)["resources"]
    limit = _quantity_bytes(resources["limits"]["memory"])
    request = _quantity_bytes(resources["requests"]["memory"])
    peak_mb = (SERVICE_IDLE_MB + SERVICE_MB_PER_1000_TARGETS * engine.max_targets / 1000
               + FIT_WORKER_MB * engine.fit_workers)
    assert peak_mb * 1e6 <= limit, (engine.max_targets, peak_mb)
    # Steady state (the targets forecast, the workers idle) within the request: a pod above
    # its request is among the first evicted when the node runs short of memory.
    steady_mb = (SERVICE_IDLE_MB + STEADY_MB_PER_1000_TARGETS * engine.max_targets / 1000
                 + FIT_WORKER_MB * engine.fit_workers)
    assert steady_mb * 1e6 <= request, (engine.max_targets, steady_mb)
    (claim,) = STATEFULSET["spec"]["volumeClaimTemplates"]
    storage = _quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert 2 * STATE_KB_PER_TARGET * 1e3 * engine.max_targets <= storage


def test_ports_and_probes_point_where_the_config_serves(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, _config_text(CONFIGMAP)), env={})
    container = _container(STATEFULSET)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.http_port, "grpc": settings.grpc_port}
    assert container["startupProbe"]["grpc"]["port"] == settings.grpc_port
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    service = _one(BASE, "Service", "forecaster")
    assert {p["name"]: (p["port"], p["targetPort"], p["appProtocol"])
            for p in service["spec"]["ports"]} == {
        "http": (8080, "http", "http"), "grpc": (50051, "grpc", "grpc")
    }
    assert service["spec"]["type"] == "ClusterIP"  # one address in front of every replica
    assert service["spec"]["selector"].items() <= POD_LABELS.items()
    assert STATEFULSET["spec"]["selector"]["matchLabels"].items() <= POD_LABELS.items()


# -- staying available: replicas, rollouts, drains, nodes, state --------------------------------


def test_two_replicas_are_replaced_one_at_a_time_and_wait_for_readiness() -> None:
    """KEDA has one to ask throughout a rollout: a StatefulSet replaces one pod at a time
    (from a partition of 0: all of them) and moves on only when the new one has been Ready for
    minReadySeconds. It cannot surge: a pod's volume belongs to that pod."""
    spec = STATEFULSET["spec"]
    assert spec["replicas"] == 2
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    rolling = spec["updateStrategy"].get("rollingUpdate", {})
    assert rolling.get("partition", 0) == 0
    assert rolling.get("maxUnavailable", 1) == 1  # the default; more would leave none
    assert spec["minReadySeconds"] >= 5
    assert spec["podManagementPolicy"] == "Parallel"  # start together; updates stay serial


def test_a_disruption_budget_keeps_one_replica_through_drains() -> None:
    budget = _one(BASE, "PodDisruptionBudget", "forecaster")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["minAvailable"] == 1 < STATEFULSET["spec"]["replicas"]
    assert _matches(budget["spec"]["selector"], POD_LABELS)
    assert budget["metadata"]["namespace"] == STATEFULSET["metadata"]["namespace"]


def test_replicas_prefer_different_nodes() -> None:
    anti = STATEFULSET["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert set(anti) == {"preferredDuringSchedulingIgnoredDuringExecution"}  # not required:
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]  # one node still runs both
    assert 1 <= term["weight"] <= 100
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert _matches(term["podAffinityTerm"]["labelSelector"], POD_LABELS)


def test_each_replica_keeps_its_state_on_a_volume_that_outlives_its_pod() -> None:
    spec = STATEFULSET["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    mounts = {m["name"]: m for m in _container(STATEFULSET)["volumeMounts"]}
    mount = mounts[claim["metadata"]["name"]]
    assert mount["mountPath"] == "/var/lib/forecaster" and not mount.get("readOnly", False)
    # The service saves its state there.
    env = {e["name"]: e["value"] for e in _container(STATEFULSET).get("env", [])}
    assert load_settings(None, env=env).state_dir == Path(mount["mountPath"])
    # From the claim, not from a pod volume of the same name (which would shadow it).
    pod_volumes = {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert claim["metadata"]["name"] not in pod_volumes
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain", "whenScaled": "Retain"
    }
    assert spec["template"]["spec"]["securityContext"]["fsGroup"] == 10001  # writable by it


def test_a_stopping_pod_pauses_then_closes_within_its_grace_period() -> None:
    """preStop: serve on while kube-proxy drops the terminating pod, then SIGTERM makes the
    gRPC front send GOAWAY; all of it, and the front's grace for calls in flight, within
    terminationGracePeriodSeconds."""
    pod = STATEFULSET["spec"]["template"]["spec"]
    pause = _container(STATEFULSET)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = inspect.signature(ScalerBridge.stop).parameters["grace_seconds"].default
    assert 1 <= pause <= 10
    assert pause + grace + 10 <= pod["terminationGracePeriodSeconds"]  # 10 s for the engine


# -- who may connect -----------------------------------------------------------------------------


def _namespaces(rule: dict[str, Any]) -> list[dict[str, str]]:
    """Each `from` peer's namespace labels; a peer that is not a namespace selector fails."""
    peers = rule["from"]
    assert peers, "an empty `from` admits everyone"
    assert all(set(peer) == {"namespaceSelector"} for peer in peers), peers
    return [peer["namespaceSelector"]["matchLabels"] for peer in peers]


def _by_name(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


def test_network_policies_admit_only_keda_to_grpc_and_named_clients_to_http() -> None:
    settings = NETWORK["data"]
    ports = {p["name"] for p in _container(STATEFULSET)["ports"]}
    covered: dict[str, list[dict[str, str]]] = {}
    for policy in POLICIES.values():
        spec = policy["spec"]
        assert policy["metadata"]["namespace"] == STATEFULSET["metadata"]["namespace"]
        assert _matches(spec["podSelector"], POD_LABELS)
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in ports and port["protocol"] == "TCP", port
                covered.setdefault(port["port"], []).extend(_namespaces(rule))
    # Once a policy selects the pods, a port no rule names is closed; both are named.
    assert set(covered) == ports == {"grpc", "http"}
    assert covered["grpc"] == [_by_name(settings["kedaNamespace"])]
    assert covered["http"] == [
        _by_name(settings["kedaNamespace"]),  # KEDA's metrics-api trigger
        _by_name(settings["monitoringNamespace"]),  # Prometheus, scraping /metrics
        {"forecaster-http-client": "true"},  # REST API clients the guide names
    ]


def _field(doc: Any, path: str) -> Any:
    """The value at a kustomize fieldPath (dots; `[a.b/c]` for a key holding dots)."""
    for part in re.findall(r"\[[^\]]+\]|[^.]+", path):
        key = part.strip("[]")
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    return doc


def test_kustomize_copies_the_network_settings_into_the_policies() -> None:
    """As written, each replacement's target already holds its source's value: the files read
    the same with and without kustomize."""
    kustomization = _docs(KEDA / "forecaster" / "kustomization.yaml")[0]
    targets = set()
    for replacement in kustomization["replacements"]:
        source = replacement["source"]
        assert (source["kind"], source["name"]) == ("ConfigMap", NETWORK["metadata"]["name"])
        value = _field(NETWORK, source["fieldPath"])
        for target in replacement["targets"]:
            policy = POLICIES[target["select"]["name"]]
            assert target["select"]["kind"] == policy["kind"]
            for path in target["fieldPaths"]:
                assert _field(policy, path) == value, path
                targets.add((policy["metadata"]["name"], path))
    assert len(targets) == 3  # KEDA's namespace twice, Prometheus' once


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize built in)")
def test_changed_network_settings_reach_the_built_policies(tmp_path: Path) -> None:
    copy_root = tmp_path / "keda"
    shutil.copytree(KEDA, copy_root, ignore=shutil.ignore_patterns("certs"))
    settings_file = copy_root / "forecaster" / "network.yaml"
    network = _docs(settings_file)[0]
    network["data"] = {"kedaNamespace": "autoscaling", "monitoringNamespace": "observability"}
    settings_file.write_text(yaml.safe_dump(network), encoding="utf-8")
    built = subprocess.run(["kubectl", "kustomize", str(copy_root)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d is not None]
    (grpc_rule,) = _one(docs, "NetworkPolicy", "forecaster-grpc")["spec"]["ingress"]
    (http_rule,) = _one(docs, "NetworkPolicy", "forecaster-http")["spec"]["ingress"]
    assert _namespaces(grpc_rule) == [_by_name("autoscaling")]
    assert _namespaces(http_rule)[:2] == [_by_name("autoscaling"), _by_name("observability")]


# -- the real service, started from the ConfigMap's config -------------------------------------


class HeldFits(Executor):
    """A fit pool that never runs its fits: these tests check interfaces, which answer with the
    current value until a first fit; a model fit would only take CPU from the other tests."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return Future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def _write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _start(settings: Settings) -> Service:
    settings = with_overrides(
        settings, grpc_port=0, http_port=0, host="127.0.0.1",
        engine=replace(settings.engine, fit_workers=1, refresh_seconds=1.0),
    )
    service = Service(settings, fit_pool=HeldFits())
    service.start()
    return service


@pytest.fixture(scope="module")
def service(
    prometheus: PrometheusServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("configmap")
    text = _test_config(_config_text(CONFIGMAP), prometheus.url)
    started = _start(load_settings(_write(folder, text), env={}))
    yield started
    started.stop()



def _unavailable(exc: Exception) -> bool:
    """UNAVAILABLE: the first refresh is still on its way."""
    return isinstance(exc, grpc.RpcError) and exc.code() is grpc.StatusCode.UNAVAILABLE


def _metrics(stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef, name: str) -> float:
    request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=name)
    (value,) = wait_for_call(lambda: stub.GetMetrics(request, timeout=10), timeout=30,
                             retry=_unavailable, what="GetMetrics").metricValues
    return float(value.metricValueFloat)


def test_example_trigger_is_accepted_by_the_real_scaler(
    service: Service, prometheus: PrometheusServer
) -> None:
    metadata = _test_metadata(TRIGGER["metadata"], prometheus.url)
    ref = pb.ScaledObjectRef(name=SCALED_OBJECT["metadata"]["name"],
                             namespace=SCALED_OBJECT["metadata"]["namespace"],
                             scalerMetadata=metadata)
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        (spec,) = stub.GetMetricSpec(ref, timeout=10).metricSpecs
        assert spec.metricName == metadata["metricName"]
        assert spec.targetSizeFloat == float(metadata["targetValue"])
        value = _metrics(stub, ref, spec.metricName)
        assert math.isfinite(value) and value > 0
        assert stub.IsActive(ref, timeout=10).result is True  # above activationValue "0"
    # KEDA's trigger landed on the target the ConfigMap registered at start-up: one, not two.
    assert len(service.engine) == 1


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_each_probe_is_answered_by_the_real_server(service: Service, probe: str) -> None:
    spec = _container(STATEFULSET)[probe]
    if "grpc" in spec:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")), timeout=5
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        return
    path = spec["httpGet"]["path"]
    routes = {rule.rule for rule in service.app.url_map.iter_rules()}
    assert path in routes, f"the app serves no {path}"
    answer = requests.get(f"http://127.0.0.1:{service.http_port}{path}", timeout=5)
    # /readyz too: ready as soon as the gRPC scaler serves, whatever Prometheus holds.
    assert answer.status_code == 200, answer.text


def _json_path(document: Any, path: str) -> Any:
    """The value at a simple GJSON path (dot-separated keys, numeric list indexes)."""
    for part in path.split("."):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


def test_metrics_api_value_location_resolves_in_the_real_answer(
    service: Service, prometheus: PrometheusServer
) -> None:
    scaled_object = _one(_docs(METRICS_API / "scaledobject.yaml"), "ScaledObject")
    trigger = _trigger(scaled_object)
    assert trigger["type"] == "metrics-api"
    metadata = trigger["metadata"]
    assert metadata.get("format", "json") == "json"
    url = urlsplit(metadata["url"])
    assert (url.hostname, url.port) == ("forecaster.forecaster.svc", 8080)
    # The URL names a configured target, with the trigger's targetValue.
    route = re.fullmatch(METRIC_ROUTE, url.path)
    assert route, url.path
    namespace, name, metric = route.groups()
    (target,) = [t for t in service.settings.targets if (t.namespace, t.name) == (namespace, name)]
    assert target.metadata["metricName"] == metric
    assert float(target.metadata["targetValue"]) == float(metadata["targetValue"])

    def answered() -> tuple[requests.Response] | None:  # a tuple: a 4xx response is falsy
        answer = requests.get(f"http://127.0.0.1:{service.http_port}{url.path}", timeout=10)
        return None if answer.status_code == 503 else (answer,)

    def fetch() -> requests.Response:
        return wait_for(answered, timeout=30, what=f"{url.path} past its first 503s")[0]

    ref = pb.ScaledObjectRef(name=name, namespace=namespace,
                             scalerMetadata=_test_metadata(TRIGGER["metadata"], prometheus.url))
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        for _ in range(3):  # a refresh may land between the two reads: retry
            answer = fetch()
            assert answer.status_code == 200, answer.text
            value = _json_path(answer.json(), metadata["valueLocation"])
            assert isinstance(value, int | float) and math.isfinite(value)
            if value == pytest.approx(_metrics(stub, ref, metric), rel=1e-9):
                break
        assert value == pytest.approx(_metrics(stub, ref, metric), rel=1e-9)


# -- the examples differ from the default set only where they mean to -------------------------


def _config_patch() -> dict[str, Any]:
    return _one(_docs(TLS / "config-tls.yaml"), "ConfigMap", CONFIGMAP["metadata"]["name"])


def test_tls_example_is_the_default_set_plus_tls() -> None:
    base = yaml.safe_load(_config_text(CONFIGMAP))
    with_tls = yaml.safe_load(_config_text(_config_patch()))
    assert {k: v for k, v in with_tls.items() if k != "tls"} == base
    expected = copy.deepcopy(SCALED_OBJECT)
    scaled_object = _one(_docs(TLS / "scaledobject.yaml"), "ScaledObject")
    expected["spec"]["triggers"][0]["authenticationRef"] = (
        scaled_object["spec"]["triggers"][0]["authenticationRef"]
    )
    assert scaled_object == expected
    kustomization = _docs(TLS / "kustomization.yaml")[0]
    assert {"../../forecaster", "../../demo"} <= set(kustomization["resources"])


def test_tls_example_wires_secrets_to_keda_and_to_the_config() -> None:
    kustomization = _docs(TLS / "kustomization.yaml")[0]
    secrets = {(s["namespace"], s["name"]): {f.split("=")[0] for f in s["files"]}
               for s in kustomization["secretGenerator"]}
    # KEDA's side: the TriggerAuthentication the trigger names, in the ScaledObject's namespace.
    scaled_object = _one(_docs(TLS / "scaledobject.yaml"), "ScaledObject")
    namespace = scaled_object["metadata"]["namespace"]
    auth = _one(_docs(TLS / "triggerauthentication.yaml"), "TriggerAuthentication")
    assert auth["metadata"]["namespace"] == namespace
    assert _trigger(scaled_object)["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = auth["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in refs} == KEDA_TLS_PARAMETERS
    for ref in refs:
        assert ref["key"] in secrets[(namespace, ref["name"])]
    # forecaster's side: each tls file is a key of the Secret mounted where the config says.
    tls = yaml.safe_load(_config_text(_config_patch()))["tls"]
    patch = _one(_docs(TLS / "statefulset-tls.yaml"), "StatefulSet", "forecaster")
    (mount,) = _container(patch)["volumeMounts"]
    (volume,) = patch["spec"]["template"]["spec"]["volumes"]
    assert mount["name"] == volume["name"]
    keys = secrets[("forecaster", volume["secret"]["secretName"])]
    assert set(tls) == {"certFile", "keyFile", "clientCAFile"}
    for path in tls.values():
        assert Path(path).parent == Path(mount["mountPath"]) and Path(path).name in keys


def test_tls_example_carries_a_mutual_tls_call(
    prometheus: PrometheusServer, tmp_path: Path
) -> None:
    """The example's own script makes the certificates; forecaster loads them through the TLS
    config; a client presenting KEDA's certificate, dialling the scalerAddress name, gets an
    answer, and one without a certificate does not."""
    certs = tmp_path / "certs"
    subprocess.run([str(TLS / "gen-certs.sh"), str(certs)], check=True, capture_output=True,
                   timeout=60)
    text = _test_config(_config_text(_config_patch()), prometheus.url)
    text = text.replace("/etc/forecaster-tls/tls.crt", str(certs / "server.crt"))
    text = text.replace("/etc/forecaster-tls/tls.key", str(certs / "server.key"))
    text = text.replace("/etc/forecaster-tls/ca.crt", str(certs / "ca.crt"))
    settings = load_settings(_write(tmp_path, text), env={})
    assert settings.tls is not None and settings.tls.client_ca_file is not None
    scaled_object = _one(_docs(TLS / "scaledobject.yaml"), "ScaledObject")
    metadata = _test_metadata(_trigger(scaled_object)["metadata"], prometheus.url)
    server_name = metadata["scalerAddress"].rpartition(":")[0]
    ref = pb.ScaledObjectRef(name="web", namespace="shop", scalerMetadata=metadata)
    options = [("grpc.ssl_target_name_override", server_name)]
    ca = (certs / "ca.crt").read_bytes()
    service = _start(settings)
    try:
        keda = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=(certs / "client.key").read_bytes(),
            certificate_chain=(certs / "client.crt").read_bytes(),
        )
        with grpc.secure_channel(f"127.0.0.1:{service.grpc_port}", keda, options) as channel:
            (spec,) = pb_grpc.ExternalScalerStub(channel).GetMetricSpec(ref, timeout=10).metricSpecs
        assert spec.metricName == metadata["metricName"]
        anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
        with (
            grpc.secure_channel(f"127.0.0.1:{service.grpc_port}", anonymous, options) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            pb_grpc.ExternalScalerStub(channel).GetMetricSpec(ref, timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop()


def test_metrics_api_example_sends_the_token_forecaster_requires(
    prometheus: PrometheusServer, tmp_path: Path
) -> None:
    """The example's own script makes the token; the kustomization puts that one file in the
    Secret forecaster mounts and in the one the TriggerAuthentication reads; forecaster,
    started with the patch's environment, refuses the trigger's URL without the token and
    answers it with the token KEDA sends."""
    token_file = tmp_path / "api-token"
    subprocess.run([str(METRICS_API / "gen-token.sh"), str(token_file)], check=True,
                   capture_output=True, timeout=60)
    token = token_file.read_text(encoding="utf-8")
    assert len(token) == 64 and token == token.strip()
    kustomization = _docs(METRICS_API / "kustomization.yaml")[0]
    secrets = {(s["namespace"], s["name"]): dict(f.split("=") for f in s["files"])
               for s in kustomization["secretGenerator"]}
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True  # names as written
    # KEDA's side: the trigger's TriggerAuthentication reads a key made from the token file.
    docs = _docs(METRICS_API / "scaledobject.yaml")
    trigger = _trigger(_one(docs, "ScaledObject"))
    auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], trigger["metadata"]["authMode"]) == ("token", "bearer")
    keda_file = secrets[(auth["metadata"]["namespace"], ref["name"])][ref["key"]]
    # forecaster's side: the patch names a file of the mounted Secret, made from the same file.
    (patch,) = kustomization["patches"]
    workload = _one(_docs(METRICS_API / patch["path"]), "StatefulSet", "forecaster")
    container = _container(workload)
    (mount,) = container["volumeMounts"]
    (volume,) = workload["spec"]["template"]["spec"]["volumes"]
    assert mount["name"] == volume["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    mounted = Path(env["FORECASTER_API_TOKEN_FILE"])
    assert mounted.parent == Path(mount["mountPath"])
    secret = secrets[(STATEFULSET["metadata"]["namespace"], volume["secret"]["secretName"])]
    assert secret[mounted.name] == keda_file
    # The real service, with that environment and the token file where the pod has it.
    env["FORECASTER_API_TOKEN_FILE"] = str(token_file)
    text = _test_config(_config_text(CONFIGMAP), prometheus.url)
    service = _start(load_settings(_write(tmp_path, text), env=env))
    try:
        url = f"http://127.0.0.1:{service.http_port}{urlsplit(trigger['metadata']['url']).path}"
        assert requests.get(url, timeout=10).status_code == 401
        wrong = {"Authorization": f"Bearer {token[::-1]}"}
        assert requests.get(url, headers=wrong, timeout=10).status_code == 401
        keda = {"Authorization": f"Bearer {token}"}

        def answered() -> tuple[requests.Response] | None:  # a tuple: a 4xx response is falsy
            answer = requests.get(url, headers=keda, timeout=10)
            return None if answer.status_code == 503 else (answer,)

        (answer,) = wait_for(answered, timeout=30, what="the metric past its first 503s")
        assert answer.status_code == 200, answer.text
        assert math.isfinite(answer.json()[trigger["metadata"]["valueLocation"]])
    finally:
        service.stop()


def test_metrics_api_example_is_the_default_set_with_its_own_trigger() -> None:
    kustomization = _docs(METRICS_API / "kustomization.yaml")[0]
    assert set(kustomization["resources"]) == {
        "../../forecaster", "../../demo", "scaledobject.yaml"
    }
    scaled_object = _one(_docs(METRICS_API / "scaledobject.yaml"), "ScaledObject")
    expected = copy.deepcopy(SCALED_OBJECT)
    expected["spec"]["triggers"] = scaled_object["spec"]["triggers"]
    assert scaled_object == expected
    trigger = _trigger(scaled_object)
    assert trigger["metadata"]["valueLocation"] == "value"
    assert trigger["useCachedMetrics"] is True
