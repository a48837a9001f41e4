"""The Kubernetes manifests: every overlay rendered by `kubectl kustomize`, validated offline against
the schemas of Kubernetes 1.32 (kubernetes-validate, strict: no unknown fields), and read for what a
rolling update on GPU nodes needs and for what limits a compromised pod (non-root, no API token, network
policies, metrics off the public Service)."""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO_ROOT, require_tool

KUBERNETES_VERSION = "1.32.0"  # the kubectl client Debian ships (1.32.4)
OVERLAYS = REPO_ROOT / "deploy" / "kubernetes" / "overlays"
# NVIDIA's tritonserver images create the user `triton-server` with uid and gid 1000 (server/build.py:
# "Create a user that can be used to run triton as non-root"), and deploy/triton.Dockerfile builds on them.
TRITON_IMAGE_USER = 1000
GATEWAY_LABELS = {"app.kubernetes.io/name": "vlm-gateway"}
TRITON_LABELS = {"app.kubernetes.io/name": "vlm-triton"}
KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def render(overlay: str | Path) -> list[dict]:
    require_tool(shutil.which("kubectl") is not None, "kubectl not installed (Debian: kubectl)")
    rendered = subprocess.run(["kubectl", "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def one(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(docs: list[dict], deployment: str) -> dict:
    [only] = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}


def selects(policy: dict, labels: dict) -> bool:
    selector = policy["spec"]["podSelector"]
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are read here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def rules(docs: list[dict], labels: dict, direction: str) -> list[dict]:
    """Every ingress or egress rule of the policies that select pods with `labels` (policies add up)."""
    key = direction.lower()
    return [rule for policy in docs if policy["kind"] == "NetworkPolicy" and selects(policy, labels)
            and direction in policy["spec"]["policyTypes"] for rule in policy["spec"].get(key, [])]


def as_key(peer: dict) -> str:
    return yaml.safe_dump(peer, sort_keys=True)


def allowed(rules_: list[dict], peer_key: str) -> set[tuple[str, str, int]]:
    """(peer, protocol, port) for every rule; a rule with no peers or no ports allows everything,
    which these rules must never do."""
    found = set()
    for rule in rules_:
        assert rule.get(peer_key) and rule.get("ports"), f"a rule that allows any peer or any port: {rule}"
        for peer in rule[peer_key]:
            for port in rule["ports"]:
                found.add((as_key(peer), port.get("protocol", "TCP"), port["port"]))
    return found


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_every_overlay_renders_and_validates_against_kubernetes_schemas(overlay):
    docs = render(overlay)
    kinds = sorted({doc["kind"] for doc in docs})
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "Namespace", "ServiceAccount"} <= set(kinds)
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
    # One unloaded model must not take the server (and every other model) out of discovery.
    assert "--strict-readiness=false" in triton["args"][0]
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


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_every_container_runs_as_a_fixed_non_root_user_with_nothing_to_escalate(overlay):
    docs = render(overlay)
    specs = pod_specs(docs)
    assert set(specs) == {"gateway", "triton"}
    for name, spec in specs.items():
        pod = spec.get("securityContext", {})
        assert pod.get("fsGroup", 0) > 0, f"{name}: a fixed fsGroup for its volumes"
        for container in spec["containers"] + spec.get("initContainers", []):
            own = container.get("securityContext", {})
            effective = {**pod, **own}  # the container's fields override the pod's
            where = f"{name}/{container['name']}"
            assert effective.get("runAsNonRoot") is True, where
            assert effective.get("runAsUser", 0) > 0 and effective.get("runAsGroup", 0) > 0, f"{where}: fixed uid and gid"
            assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert own.get("allowPrivilegeEscalation") is False and not own.get("privileged"), where
            assert own.get("capabilities") == {"drop": ["ALL"]}, f"{where}: every capability dropped, none added"
            assert own.get("readOnlyRootFilesystem") is True, where
    triton = specs["triton"]["securityContext"]
    assert triton["runAsUser"] == triton["runAsGroup"] == triton["fsGroup"] == TRITON_IMAGE_USER


def test_the_gateway_pod_runs_as_the_user_its_image_declares():
    user = [line.split()[1] for line in (REPO_ROOT / "Dockerfile").read_text().splitlines() if line.startswith("USER ")]
    assert len(user) == 1 and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user[0]), \
        "the gateway image names a numeric non-root uid:gid (kubelet can check runAsNonRoot only on numbers)"
    uid, gid = (int(part) for part in user[0].split(":"))
    pod = pod_specs(render("gpu"))["gateway"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_triton_writes_only_to_volumes_under_its_read_only_root(overlay):
    docs = render(overlay)
    spec = pod_specs(docs)["triton"]
    triton = container(docs, "triton")
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    writable = {mount["mountPath"]: volumes[mount["name"]] for mount in triton["volumeMounts"] if not mount.get("readOnly")}
    env = {item["name"]: item.get("value") for item in triton["env"]}
    # The rendered repository, temporary files, the Python backend's shared memory (tmpfs), and HOME for
    # the caches of CUDA (~/.nv), PyTorch and Hugging Face.
    for path in ("/models", "/tmp", "/dev/shm", env.get("HOME")):
        assert path in writable and "emptyDir" in writable[path], f"{path} must be a writable emptyDir"
    assert writable["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert all(mount.get("readOnly") for mount in triton["volumeMounts"] if mount["mountPath"] in ("/model-source", "/weights"))


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_no_pod_gets_a_service_account_token(overlay):
    docs = render(overlay)
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for name, spec in pod_specs(docs).items():
        assert spec.get("automountServiceAccountToken") is False, name
        account = spec.get("serviceAccountName")
        assert account in accounts, f"{name}: its own ServiceAccount, not the namespace's default"
        assert accounts[account].get("automountServiceAccountToken") is False, account


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_gateways_reach_only_dns_and_triton_and_only_gateways_reach_triton(overlay):
    docs = render(overlay)
    egress = allowed(rules(docs, GATEWAY_LABELS, "Egress"), "to")
    triton_pods = as_key({"podSelector": {"matchLabels": TRITON_LABELS}})
    assert egress == {(as_key(KUBE_DNS), "UDP", 53), (as_key(KUBE_DNS), "TCP", 53), (triton_pods, "TCP", 8001)}
    ingress = allowed(rules(docs, TRITON_LABELS, "Ingress"), "from")
    assert ingress == {(as_key({"podSelector": {"matchLabels": GATEWAY_LABELS}}), "TCP", 8001),
                       (as_key(MONITORING), "TCP", 8002)}
    # The gateways' public ports are open to all; their metrics port to the monitoring namespace only.
    public = [rule for rule in rules(docs, GATEWAY_LABELS, "Ingress") if "from" not in rule]
    assert sorted(port["port"] for rule in public for port in rule["ports"]) == [8080, 50051]
    private = [rule for rule in rules(docs, GATEWAY_LABELS, "Ingress") if "from" in rule]
    assert allowed(private, "from") == {(as_key(MONITORING), "TCP", 9090)}


def test_the_documented_image_host_policy_adds_egress_to_those_hosts_only(tmp_path):
    """The pattern the gpu overlay documents for VLM_IMAGE_URL_ALLOWLIST's hosts: a NetworkPolicy of the
    operator's own with their addresses (NetworkPolicy has no hostnames), added to the overlay."""
    example = OVERLAYS / "gpu" / "gateway-egress-image-hosts.yaml"
    shutil.copy(example, tmp_path / example.name)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(OVERLAYS / "gpu", tmp_path), example.name]}))  # kustomize takes no absolute root
    docs = render(tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    added = allowed(rules(docs, GATEWAY_LABELS, "Egress"), "to") - allowed(rules(render("gpu"), GATEWAY_LABELS, "Egress"), "to")
    blocks = [yaml.safe_load(to).get("ipBlock") for to, _, port in added if port in (80, 443)]
    assert blocks and len(blocks) == len(added), added
    assert all(ipaddress.ip_network(block["cidr"]).prefixlen > 0 for block in blocks), "not the whole internet"
    assert "gateway-egress-image-hosts.yaml" in (OVERLAYS / "gpu" / "kustomization.yaml").read_text()


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_metrics_are_scraped_through_their_own_services_not_the_public_one(overlay):
    docs = render(overlay)
    public = one(docs, "Service", "gateway")["spec"]["ports"]
    assert {port["name"] for port in public} == {"grpc", "http"}
    assert all(port["port"] != 9090 and port["targetPort"] != "metrics" for port in public)
    for name, labels, port in (("gateway", GATEWAY_LABELS, 9090), ("triton", TRITON_LABELS, 8002)):
        service = one(docs, "Service", f"{name}-metrics")
        assert service["spec"]["selector"] == labels and service["spec"]["clusterIP"] == "None"
        [metrics] = service["spec"]["ports"]
        assert metrics["port"] == port and metrics["targetPort"] == "metrics"
        assert {p["name"]: p["containerPort"] for p in container(docs, name)["ports"]}["metrics"] == port
        annotations = service["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                               "prometheus.io/path": "/metrics"}
        # Scraped once: through the Service's endpoints, not also as annotated pods.
        template = one(docs, "Deployment", name)["spec"]["template"]["metadata"]
        assert not any(key.startswith("prometheus.io/") for key in template.get("annotations", {}))


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_the_gateway_reads_every_setting_the_manifests_give_it(overlay):
    """Each variable set on the gateway (values, the Secret, the optional vlm-gateway ConfigMap) is one
    that gateway/settings.py reads: a misspelt name would be ignored in silence."""
    env = container(render(overlay), "gateway")["env"]
    read = set(re.findall(r'"(VLM_[A-Z0-9_]+)"', (REPO_ROOT / "gateway" / "settings.py").read_text()))
    assert {item["name"] for item in env} <= read, {item["name"] for item in env} - read
    config_map = {item["name"]: item["valueFrom"]["configMapKeyRef"] for item in env
                  if "configMapKeyRef" in item.get("valueFrom", {})}
    assert {name: (ref["name"], ref["key"], ref["optional"]) for name, ref in config_map.items()} == {
        "VLM_IMAGE_URL_ALLOWLIST": ("vlm-gateway", "image-url-allowlist", True),
        "VLM_IMAGE_URL_ALLOWED_NETWORKS": ("vlm-gateway", "image-url-allowed-networks", True),
    }
