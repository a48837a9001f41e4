"""The Kubernetes manifests: every overlay rendered by `kubectl kustomize`, validated offline against
the schemas of Kubernetes 1.32 (kubernetes-validate, strict: no unknown fields), and read for what a
rolling update on GPU nodes needs."""

from __future__ import annotations

import copy
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO_ROOT, require_tool

KUBERNETES_VERSION = "1.32.0"  # the kubectl client Debian ships (1.32.4)
OVERLAYS = REPO_ROOT / "deploy" / "kubernetes" / "overlays"


def render(overlay: str) -> list[dict]:
    require_tool(shutil.which("kubectl") is not None, "kubectl not installed (Debian: kubectl)")
    rendered = subprocess.run(["kubectl", "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def one(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    return doc


def container(docs: list[dict], deployment: str) -> dict:
    [only] = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_every_overlay_renders_and_validates_against_kubernetes_schemas(overlay):
    docs = render(overlay)
    kinds = sorted({doc["kind"] for doc in docs})
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "Namespace"} <= set(kinds)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "vlm"


def test_the_validator_rejects_a_broken_manifest():
    deployment = copy.deepcopy(one(render("gpu"), "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(one(render("gpu"), "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["tcpSocket"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_gpu_servers_request_gpus_and_the_laptop_overlay_does_not():
    gpu = container(render("gpu"), "triton")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "registry.example.com/vlm-serving/triton" in gpu["image"]
    cpu = container(render("cpu-dev"), "triton")
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert {"name": "VLM_PROFILE", "value": "cpu"} in cpu["env"]
    # Configs are rendered at start for the node's GPU count, then Triton serves them.
    assert "nvidia-smi -L" in gpu["args"][0] and "vlm_serving.deploy.render" in gpu["args"][0]


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_probes_drain_and_triton_discovery(overlay):
    docs = render(overlay)
    triton, gateway = container(docs, "triton"), container(docs, "gateway")
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live" and "startupProbe" in triton
    assert gateway["readinessProbe"]["grpc"]["port"] == 50051 and "tcpSocket" in gateway["livenessProbe"]
    env = {item["name"]: item for item in gateway["env"]}
    headless = one(docs, "Service", "triton-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert env["VLM_TRITON_URL"]["value"] == f"dns:///triton-headless:{headless['ports'][0]['port']}"
    # The drain fits the grace period: preStop sleep + VLM_DRAIN_GRACE_S < terminationGracePeriodSeconds.
    spec = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    drain = float(env["VLM_DRAIN_GRACE_S"]["value"]) + gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain < spec["terminationGracePeriodSeconds"]
    triton_spec = one(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    assert "--exit-timeout-secs=60" in triton["args"][0] and 60 < triton_spec["terminationGracePeriodSeconds"]
    for name in ("gateway", "triton"):
        assert one(docs, "Deployment", name)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_keys_from_a_secret_only_the_gateway_reaches_triton_and_budgets_keep_capacity(overlay):
    docs = render(overlay)
    env = {item["name"]: item for item in container(docs, "gateway")["env"]}
    secret_name = env["VLM_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"]
    assert secret_name.startswith("vlm-api-keys") and "value" not in env["VLM_API_KEYS"]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if overlay == "cpu-dev":  # generated with the documented local keys
        assert [s["metadata"]["name"] for s in secrets] == [secret_name]
    else:  # created by the operator (kubectl create secret): never in the manifests
        assert secrets == []
    policy = one(docs, "NetworkPolicy", "triton-from-gateway-only")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "vlm-triton"}
    inference = [rule for rule in policy["ingress"] if {"port": 8001, "protocol": "TCP"} in rule["ports"]]
    assert [rule["from"] for rule in inference] == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "vlm-gateway"}}}]]
    assert one(docs, "PodDisruptionBudget", "gateway")["spec"]["minAvailable"] == 1
    assert one(docs, "PodDisruptionBudget", "triton")["spec"]["maxUnavailable"] == 1
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    for name, port in (("gateway", "9090"), ("triton", "8002")):
        annotations = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == port
