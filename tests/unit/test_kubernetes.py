"""The Kubernetes manifests: every overlay and every optional component rendered by `kubectl kustomize`,
validated offline against the schemas of Kubernetes 1.32 (kubernetes-validate, strict: no unknown fields;
KEDA's ScaledObject, whose schema kubernetes-validate lacks, field by field), and read for what a
rolling update on GPU nodes needs, what limits a compromised pod (non-root, no API token, network
policies, metrics off the public Service), what each family's server needs (its models, GPUs, memory)
and that scale-down and rolling updates drain within the grace periods the gateway's settings call for."""

from __future__ import annotations

import copy
import functools
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO_ROOT, require_tool

KUBERNETES_VERSION = "1.32.0"  # the kubectl client Debian ships (1.32.4)
OVERLAYS = REPO_ROOT / "deploy" / "kubernetes" / "overlays"
COMPONENTS = REPO_ROOT / "deploy" / "kubernetes" / "components"
# Rendered and checked: every overlay, and the gpu overlay with each optional component and with all of them.
VARIANTS = ("cpu-dev", "gpu", "gpu-autoscaled", "gpu+read-only-many", "gpu+webui", "gpu+tracing",
            "gpu+read-only-many+webui+tracing+keda")
# NVIDIA's tritonserver images create the user `triton-server` with uid and gid 1000 (server/build.py:
# "Create a user that can be used to run triton as non-root"), and deploy/triton.Dockerfile builds on them.
TRITON_IMAGE_USER = 1000
GATEWAY_LABELS = {"app.kubernetes.io/name": "vlm-gateway"}
TRITON_LABELS = {"app.kubernetes.io/name": "vlm-triton"}
KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def render(overlay: str | Path) -> list[dict]:
    """An overlay (a folder, or a name under overlays/), or `overlay+component+...`: the overlay with
    those components of components/ added, as the gpu overlay's commented `components:` lines do."""
    if isinstance(overlay, str) and "+" in overlay:
        return copy.deepcopy(_render_with_components(overlay))
    return copy.deepcopy(_render(str(OVERLAYS / overlay)))


@functools.cache
def _render(folder: str) -> list[dict]:
    require_tool(shutil.which("kubectl") is not None, "kubectl not installed (Debian: kubectl)")
    rendered = subprocess.run(["kubectl", "kustomize", folder], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@functools.cache
def _render_with_components(variant: str) -> list[dict]:
    import tempfile

    overlay, *components = variant.split("+")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            # kustomize takes no absolute root
            "resources": [os.path.relpath(OVERLAYS / overlay, folder)],
            "components": [os.path.relpath(COMPONENTS / name, folder) for name in components]}))
        return _render(folder)


def one(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(docs: list[dict], deployment: str) -> dict:
    [only] = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")}


def triton_deployments(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Deployment"
            and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "vlm-triton"]


def env_of(container_: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container_.get("env", [])}


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



# --- rendering and validation ------------------------------------------------------------------------

# KEDA's ScaledObject (keda.sh/v1alpha1), whose schema kubernetes-validate does not have: the fields KEDA 2's
# CRD defines, checked here one by one; its HPA behavior is Kubernetes' own type, validated as such.
SCALED_OBJECT_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                        "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
SCALE_TARGET_FIELDS = {"apiVersion", "kind", "name", "envSourceContainerName"}
ADVANCED_FIELDS = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig", "scalingModifiers"}
HPA_CONFIG_FIELDS = {"name", "behavior"}
TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
METRIC_TYPES = {"AverageValue", "Value", "Utilization"}
# What each scaler this project uses requires in its metadata (KEDA's scaler docs).
TRIGGER_METADATA = {"prometheus": {"serverAddress", "query", "threshold"}, "cpu": {"value"}}


def validate_scaled_object(doc: dict) -> None:
    """KEDA's ScaledObject field by field (unknown fields and wrong types rejected, as --strict does for
    Kubernetes' own kinds), its HPA behavior through Kubernetes' schema."""
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= SCALED_OBJECT_FIELDS, set(spec) - SCALED_OBJECT_FIELDS
    assert set(spec["scaleTargetRef"]) <= SCALE_TARGET_FIELDS and isinstance(spec["scaleTargetRef"]["name"], str)
    for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec.get(field, 0), int) and spec.get(field, 0) >= 0, field
    assert spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
    advanced = spec.get("advanced", {})
    assert set(advanced) <= ADVANCED_FIELDS, set(advanced) - ADVANCED_FIELDS
    hpa_config = advanced.get("horizontalPodAutoscalerConfig", {})
    assert set(hpa_config) <= HPA_CONFIG_FIELDS, set(hpa_config) - HPA_CONFIG_FIELDS
    if "behavior" in hpa_config:
        kubernetes_validate.validate({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "behavior"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                     "maxReplicas": spec["maxReplicaCount"], "behavior": hpa_config["behavior"]}},
            KUBERNETES_VERSION, strict=True)
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert set(trigger) <= TRIGGER_FIELDS, set(trigger) - TRIGGER_FIELDS
        assert trigger.get("metricType", "AverageValue") in METRIC_TYPES
        metadata = trigger["metadata"]
        assert all(isinstance(value, str) for value in metadata.values()), "KEDA's trigger metadata holds strings only"
        assert TRIGGER_METADATA[trigger["type"]] <= set(metadata), (trigger["type"], set(metadata))


def validate(doc: dict) -> None:
    if doc["kind"] == "ScaledObject":
        validate_scaled_object(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_overlay_and_component_renders_and_validates_against_kubernetes_schemas(variant):
    docs = render(variant)
    kinds = sorted({doc["kind"] for doc in docs})
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Namespace", "ServiceAccount",
            "ConfigMap"} <= set(kinds)
    assert "HorizontalPodAutoscaler" in kinds or "ScaledObject" in kinds
    for doc in docs:
        validate(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "vlm"


def test_the_validators_reject_a_broken_manifest():
    deployment = copy.deepcopy(one(render("gpu"), "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = copy.deepcopy(one(render("gpu"), "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["tcpSocket"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = one(render("gpu-autoscaled"), "ScaledObject", "gateway")
    for breakage in (lambda s: s["spec"].update(maxReplicas=3),  # HPA's name, not KEDA's
                     lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=64),  # not a string
                     lambda s: s["spec"]["triggers"][0]["metadata"].pop("query")):
        broken = copy.deepcopy(scaled)
        breakage(broken)
        with pytest.raises(AssertionError):
            validate(broken)
    broken = copy.deepcopy(scaled)
    broken["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policy"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_every_reference_to_a_config_map_or_secret_names_one_the_manifests_hold_or_the_operator_creates():
    """Generated ConfigMaps get a hash in their name: every reference must have been rewritten to it, and
    every key read must be in it. Secrets are the operator's (vlm-api-keys, optional vlm-object-store)."""
    for variant in VARIANTS:
        docs = render(variant)
        config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        for name, spec in pod_specs(docs).items():
            for container_ in spec["containers"] + spec.get("initContainers", []):
                for item in container_.get("env", []):
                    ref = item.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        assert ref["name"] in config_maps, f"{variant} {name}: {ref['name']} is not rendered"
                        assert ref["key"] in config_maps[ref["name"]], f"{variant} {name}: no key {ref['key']}"
                    ref = item.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"].startswith("vlm-api-keys"), ref
                for source in container_.get("envFrom", []):
                    assert source["secretRef"] == {"name": "vlm-object-store", "optional": True}, source


# --- one Triton Deployment per family on GPUs ----------------------------------------------------------

def test_gpu_servers_are_one_deployment_per_family_each_loading_its_own_pipeline():
    from vlm_serving.pipelines import FAMILIES, PRIMARY, ROUTER, pipeline

    docs = render("gpu")
    servers = {d["spec"]["template"]["metadata"]["labels"]["vlm.serving/family"]: d for d in triton_deployments(docs)}
    assert sorted(servers) == sorted(FAMILIES)
    for family, deployment in servers.items():
        [triton] = deployment["spec"]["template"]["spec"]["containers"]
        assert "registry.example.com/vlm-serving/triton" in triton["image"]
        gpus = triton["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus >= 1 and triton["resources"]["requests"]["nvidia.com/gpu"] == gpus
        # Its family's pipeline, the cancel model, and the router beside its primary family (which it
        # answers with alone when the other family's call fails).
        loaded = env_of(triton)["VLM_LOAD_MODELS"]["value"].split()
        assert loaded == pipeline(family) + ["cancel"] + ([ROUTER] if family == PRIMARY else [])
        # Each family's servers are selected apart (their own Deployment and PDB), all discovered together.
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector == {**TRITON_LABELS, "vlm.serving/family": family}
        pdb = one(docs, "PodDisruptionBudget", deployment["metadata"]["name"])
        assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert one(docs, "Service", "triton-headless")["spec"]["selector"] == TRITON_LABELS
    cpu = triton_deployments(render("cpu-dev"))
    assert len(cpu) == 1 and env_of(cpu[0]["spec"]["template"]["spec"]["containers"][0])["VLM_LOAD_MODELS"]["value"] == "*"
    assert "nvidia.com/gpu" not in cpu[0]["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})


# An 80 GB H100 as nvidia-smi reports it (81,559 MiB); the rest of a server's memory is for the encoder,
# activations, a prefill chunk and CUDA's own.
H100_GIB = 81_559 / 1024
GPU_SHARE = 0.85


@functools.cache
def family_memory(family: str) -> tuple[int, int]:
    """(bytes of bf16 weights, bytes of key/value cache per token) of the published checkpoint's config
    (perf.engine.real_config: Qwen2.5-VL-7B-Instruct, Pixtral-12B), the model built on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    from perf.engine import real_config

    config = real_config(family)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # keys and values, bf16
    return sum(p.numel() for p in model.parameters()) * 2, per_token


def cache_tokens(triton: dict) -> int:
    from vlm_serving.deploy.render import PROFILES

    args = shlex.split(env_of(triton)["VLM_RENDER_ARGS"]["value"])
    return int(args[args.index("--cache-tokens") + 1]) if "--cache-tokens" in args else PROFILES["gpu"].engine.cache_tokens


def test_each_family_fits_its_gpus_and_both_would_not_fit_one():
    """The issue's arithmetic, computed: one H100 per family holds its weights and its cache budget; both
    families at the gpu profile's budget on one GPU would not fit. docs/deployment.md gives the same numbers."""
    from vlm_serving.deploy.render import PROFILES

    docs = render("gpu")
    doc = (REPO_ROOT / "docs" / "deployment.md").read_text()
    for deployment in triton_deployments(docs):
        family = deployment["spec"]["template"]["metadata"]["labels"]["vlm.serving/family"]
        [triton] = deployment["spec"]["template"]["spec"]["containers"]
        weights, per_token = family_memory(family)
        tokens = cache_tokens(triton)
        # Each GPU holds one generation instance: the weights and its own cache budget.
        per_gpu = (weights + tokens * per_token) / 2**30
        assert per_gpu <= GPU_SHARE * H100_GIB, f"{family}: {per_gpu:.1f} GiB on one GPU"
        for number in (f"{weights / 1e9:.2f} GB", f"{per_token // 1024} KiB", f"{tokens:,}",
                       f"{tokens * per_token / 2**30:.0f} GiB", f"{per_gpu:.1f} GiB"):
            assert number in doc, f"docs/deployment.md should say {number} for {family}"
    default = PROFILES["gpu"].engine.cache_tokens
    both = sum(w + default * t for w, t in map(family_memory, ("qwen2_5_vl", "pixtral"))) / 2**30
    assert both > H100_GIB and f"{both:.1f} GiB" in doc


def run_triton_start(tmp_path: Path, variant: str, family: str, gpus: int) -> tuple[list[str], Path]:
    """The Triton container's start script, as the manifest has it, run here: nvidia-smi stands for a
    container with `gpus` GPUs, tritonserver records its arguments; the renderer is the real one (the
    repository from the checkout, the tiny checkpoints). The manifest's absolute paths point into tmp_path."""
    docs = render(variant)
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    [deployment] = [d for d in triton_deployments(docs)
                    if d["spec"]["template"]["metadata"]["labels"].get("vlm.serving/family", family) == family]
    [triton] = deployment["spec"]["template"]["spec"]["containers"]
    env = {}
    for name, item in env_of(triton).items():
        ref = item.get("valueFrom", {}).get("configMapKeyRef")
        env[name] = config_maps[ref["name"]][ref["key"]] if ref else item["value"]
    stubs, models = tmp_path / "bin", tmp_path / "models"
    stubs.mkdir(parents=True)
    (stubs / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in range(gpus)))
    (stubs / "tritonserver").write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path}/tritonserver.args\n')
    (stubs / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this venv's, as the image's
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    script = (triton["args"][0].replace("/model-source", str(REPO_ROOT / "model_repository"))
              .replace("/models", str(models)).replace("/weights", str(REPO_ROOT / "build" / "models")))
    models.mkdir()
    result = subprocess.run([*triton["command"], script], env={**os.environ, **env, "PATH": f"{stubs}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return (tmp_path / "tritonserver.args").read_text().split("\n")[:-1], models


def test_the_triton_container_renders_for_its_gpus_and_loads_its_family_with_tracing_when_set(tmp_path, checkpoints):
    from vlm_serving.deploy.render import PROFILES
    from vlm_serving.deploy.triton_server import GRPC_KEEPALIVE_FLAGS, trace_flags

    args, models = run_triton_start(tmp_path / "plain", "gpu", "qwen2_5_vl", gpus=2)
    config = (models / "qwen2_5_vl_generate" / "config.pbtxt").read_text()
    # The device plugin numbers a container's GPUs 0..n-1: both, by their ids.
    assert "gpus: [ 0, 1 ]" in config
    [triton] = [d for d in triton_deployments(render("gpu")) if "qwen" in d["metadata"]["name"]][0]["spec"]["template"]["spec"]["containers"]
    assert f'key: "cache_tokens" value: {{ string_value: "{cache_tokens(triton)}" }}' in config
    assert cache_tokens(triton) != PROFILES["gpu"].engine.cache_tokens
    loads = [arg.removeprefix("--load-model=") for arg in args if arg.startswith("--load-model=")]
    assert loads == env_of(triton)["VLM_LOAD_MODELS"]["value"].split()
    assert all(flag in args for flag in GRPC_KEEPALIVE_FLAGS) and "--strict-readiness=false" in args
    assert not [arg for arg in args if arg.startswith("--trace-config")], "tracing is off by default"
    args, _ = run_triton_start(tmp_path / "traced", "gpu+tracing", "pixtral", gpus=1)
    endpoint = one(render("gpu+tracing"), "ConfigMap", next(
        d["metadata"]["name"] for d in render("gpu+tracing") if d["metadata"]["name"].startswith("vlm-triton")))["data"]["otlp-endpoint"]
    assert endpoint and [arg for arg in args if arg.startswith("--trace-config")] == trace_flags(endpoint)


# --- draining: scale-down and rolling updates lose no request --------------------------------------------

# CoreDNS's default TTL for the answers of the kubernetes plugin (its `ttl` option): a gateway may go on
# resolving a pod that left the headless Service this long.
DNS_TTL_S = 5
# The gateway's stop outlasts the drain's grace by its own margin (gateway/server.py, `stop`).
GATEWAY_STOP_MARGIN_S = 5


def setting(env: dict[str, dict], variable: str, default: float) -> float:
    return float(env[variable]["value"]) if variable in env else default


@pytest.mark.parametrize("variant", ["cpu-dev", "gpu", "gpu-autoscaled"])
def test_scale_down_and_rolling_updates_drain_within_the_grace_periods(variant):
    """The numbers agree with the gateway's settings (their defaults read from gateway/settings.py): a
    gateway drains for as long as a request may run, and its pod waits for that; a Triton pod leaves
    the gateways' DNS answer before it stops taking requests, finishes every request a gateway may still
    be waiting for, and its pod waits for that."""
    from gateway.settings import Settings

    defaults = Settings()
    docs = render(variant)
    gateway = container(docs, "gateway")
    env = env_of(gateway)
    longest_request = setting(env, "VLM_DEFAULT_TIMEOUT_S", defaults.default_timeout_s)
    drain = setting(env, "VLM_DRAIN_GRACE_S", defaults.drain_grace_s)
    assert drain >= longest_request, "a drain shorter than a request's deadline cancels requests"
    gateway_spec = pod_specs(docs)["gateway"]
    pre_stop = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + drain + GATEWAY_STOP_MARGIN_S < gateway_spec["terminationGracePeriodSeconds"]
    resolve = setting(env, "VLM_TRITON_RESOLVE_S", defaults.triton_resolve_s)
    for deployment in triton_deployments(docs):
        spec = deployment["spec"]["template"]["spec"]
        [triton] = spec["containers"]
        exit_timeout = int(re.search(r"--exit-timeout-secs=(\d+)", triton["args"][0]).group(1))
        assert exit_timeout >= longest_request, "Triton would stop requests a gateway still waits for"
        triton_pre_stop = triton["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert triton_pre_stop >= resolve + DNS_TTL_S, "new requests would reach a stopping server"
        assert triton_pre_stop + exit_timeout < spec["terminationGracePeriodSeconds"]
    for name in ["gateway"] + [d["metadata"]["name"] for d in triton_deployments(docs)]:
        assert one(docs, "Deployment", name)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --- volumes that fill themselves ----------------------------------------------------------------------

def fill_arguments(container_: dict) -> dict[str, str]:
    assert container_["command"] == ["python3", "-m", "vlm_serving.deploy.fill_volumes"]
    args = container_["args"]
    return dict(zip(args[::2], args[1::2]))


def test_each_gpu_pod_fills_its_own_read_write_once_volume_from_the_object_store():
    docs = render("gpu")
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for deployment in triton_deployments(docs):
        spec = deployment["spec"]["template"]["spec"]
        [fill] = spec["initContainers"]
        args = fill_arguments(fill)
        env = env_of(fill)
        # The pod's own family, from its label; the checkpoints from the ConfigMap's weights-source.
        assert args["--families"] == "$(VLM_FAMILY)"
        label = env["VLM_FAMILY"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert label == "metadata.labels['vlm.serving/family']"
        assert "vlm.serving/family" in deployment["spec"]["template"]["metadata"]["labels"]
        ref = env["VLM_WEIGHTS_SOURCE"]["valueFrom"]["configMapKeyRef"]
        assert config_maps[ref["name"]][ref["key"]].startswith("s3://") and args["--weights-source"] == "$(VLM_WEIGHTS_SOURCE)"
        assert env["VLM_PROFILE"] == env_of(spec["containers"][0])["VLM_PROFILE"], "the variant Triton serves is exported"
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        claim = volumes["weights"]["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in claim, "any default class"
        assert "emptyDir" in volumes["model-source"]
        mounts = {mount["mountPath"]: mount for mount in fill["volumeMounts"]}
        assert args["--weights"] in mounts and args["--repository"] in mounts
        assert not any(mount.get("readOnly") for mount in mounts.values())
        triton_mounts = {mount["mountPath"]: mount for mount in spec["containers"][0]["volumeMounts"]}
        for path in (args["--weights"], args["--repository"]):
            assert triton_mounts[path]["readOnly"] is True and triton_mounts[path]["name"] == mounts[path]["name"]
    # The repository comes from the image, where the Dockerfile puts it.
    assert "COPY model_repository model_repository" in (REPO_ROOT / "deploy" / "triton.Dockerfile").read_text()
    assert args["--repository-source"] == "/opt/vlm/model_repository"
    assert "WORKDIR /opt/vlm" in (REPO_ROOT / "deploy" / "triton.Dockerfile").read_text()


def test_read_only_many_volumes_are_filled_once_by_a_job_the_servers_wait_for():
    from vlm_serving.deploy.fill_volumes import FILLED_MARKER
    from vlm_serving.pipelines import FAMILIES

    docs = render("gpu+read-only-many")
    claims = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"vlm-model-repository", "vlm-weights"}
    assert all("ReadOnlyMany" in claim["accessModes"] for claim in claims.values())
    job = pod_specs(docs)["vlm-fill-volumes"]
    [fill] = job["containers"]
    args = fill_arguments(fill)
    assert args["--families"].split(",") == list(FAMILIES)
    job_volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if "persistentVolumeClaim" in v}
    for deployment in triton_deployments(docs):
        spec = deployment["spec"]["template"]["spec"]
        [wait] = spec["initContainers"]
        assert wait["name"] == "wait-for-fill" and f"/weights/$VLM_FAMILY/{FILLED_MARKER}" in wait["args"][0]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for name in ("weights", "model-source"):
            assert set(volumes[name]) == {"name", "persistentVolumeClaim"}
            assert volumes[name]["persistentVolumeClaim"]["readOnly"] is True
            assert volumes[name]["persistentVolumeClaim"]["claimName"] == job_volumes[name]


# --- the gateway's settings, the Ingress and the web UI ---------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gateway_reads_every_setting_the_manifests_give_it(variant):
    """Each variable set on the gateway (values, the Secret, the generated vlm-gateway ConfigMap) is one
    that gateway/settings.py or gateway/tracing.py reads: a misspelt name would be ignored in silence. Each
    ConfigMap key is documented in docs/deployment.md."""
    docs = render(variant)
    env = container(docs, "gateway")["env"]
    read = set(re.findall(r'"(VLM_[A-Z0-9_]+)"', (REPO_ROOT / "gateway" / "settings.py").read_text()
                          + (REPO_ROOT / "gateway" / "tracing.py").read_text()))
    assert {item["name"] for item in env} <= read, {item["name"] for item in env} - read
    config_map = {item["name"]: item["valueFrom"]["configMapKeyRef"] for item in env
                  if "configMapKeyRef" in item.get("valueFrom", {})}
    [generated] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("vlm-gateway-")]
    assert {ref["name"] for ref in config_map.values()} == {generated["metadata"]["name"]}
    assert {name: ref["key"] for name, ref in config_map.items()} == {
        "VLM_IMAGE_URL_ALLOWLIST": "image-url-allowlist",
        "VLM_IMAGE_URL_ALLOWED_NETWORKS": "image-url-allowed-networks",
        "VLM_MODEL_CAPACITY": "model-capacity",
        "VLM_OTLP_ENDPOINT": "otlp-endpoint",
    }
    assert set(generated["data"]) == set(config_map_keys := {ref["key"] for ref in config_map.values()})
    documented = (REPO_ROOT / "docs" / "deployment.md").read_text()
    for key in config_map_keys:
        assert f"| `{key}` |" in documented, f"docs/deployment.md: the ConfigMap key {key}"


def test_model_capacity_is_the_rows_a_gateway_may_fill():
    """VLM_MODEL_CAPACITY (per gateway): the rows one server decodes together x a family's servers / the gateways."""
    from vlm_serving.deploy.render import PROFILES

    docs = render("gpu")
    [generated] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("vlm-gateway-")]
    servers = min(d["spec"]["replicas"] for d in triton_deployments(docs))
    gateways = one(docs, "HorizontalPodAutoscaler", "gateway")["spec"]["minReplicas"]
    assert int(generated["data"]["model-capacity"]) == PROFILES["gpu"].engine.max_running * servers // gateways
    assert all(cache_tokens(d["spec"]["template"]["spec"]["containers"][0]) >= PROFILES["gpu"].engine.max_running
               for d in triton_deployments(docs))


def ingress_routes(docs: list[dict]) -> dict[str, tuple[str, str]]:
    ingress = one(docs, "Ingress", "vlm")["spec"]
    [rule] = ingress["rules"]
    assert rule["host"] in [host for tls in ingress["tls"] for host in tls["hosts"]], "the host is served over TLS"
    assert all(tls["secretName"] for tls in ingress["tls"])
    services = {d["metadata"]["name"]: {p["name"] for p in d["spec"]["ports"]} for d in docs if d["kind"] == "Service"}
    routes = {}
    for path in rule["http"]["paths"]:
        service = path["backend"]["service"]
        assert service["port"]["name"] in services[service["name"]], service
        routes[path["path"]] = (service["name"], service["port"]["name"])
    return routes


def test_the_ingress_serves_the_api_over_tls_and_the_web_ui_only_when_added():
    assert ingress_routes(render("gpu")) == {"/": ("gateway", "http")}
    assert "webui" not in pod_specs(render("gpu"))
    docs = render("gpu+webui")
    assert ingress_routes(docs) == {"/v1": ("gateway", "http"), "/": ("webui", "http")}
    webui = container(docs, "webui")
    assert webui["args"][:2] == ["--address", f"gateway:{dict((p['name'], p['port']) for p in one(docs, 'Service', 'gateway')['spec']['ports'])['grpc']}"]
    assert env_of(webui)["VLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"].startswith("vlm-api-keys")
    # It reaches the gateways' gRPC port and DNS only.
    egress = allowed(rules(docs, {"app.kubernetes.io/name": "vlm-webui"}, "Egress"), "to")
    assert egress == {(as_key(KUBE_DNS), "UDP", 53), (as_key(KUBE_DNS), "TCP", 53),
                      (as_key({"podSelector": {"matchLabels": GATEWAY_LABELS}}), "TCP", 50051)}


def test_the_web_ui_image_pins_agree_and_copy_only_what_exists():
    from tests.unit.test_deployment import pins

    development = pins("requirements.txt")
    for requirements in ("deploy/webui-requirements.txt", "deploy/fill-requirements.txt"):
        for name, version in pins(requirements).items():
            if name in development and name != "python-dateutil":  # botocore needs < 3: the file says so
                assert development[name] == version, f"{requirements}: {name}=={version}, requirements.txt {development[name]}"
    assert pins("deploy/fill-requirements.txt")["fsspec"] == development["fsspec"]
    for dockerfile in ("deploy/webui.Dockerfile", "deploy/triton.Dockerfile"):
        for line in (REPO_ROOT / dockerfile).read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (REPO_ROOT / source).exists(), f"{dockerfile}: {source} does not exist"


# --- autoscaling on serving signals ----------------------------------------------------------------------

def test_triton_scales_on_its_queue_and_time_to_first_token_and_the_gateway_on_requests_in_flight():
    from gateway.settings import Settings

    docs = render("gpu-autoscaled")
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d["spec"] for d in docs if d["kind"] == "ScaledObject"}
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "KEDA's autoscalers only: never two on one target"
    public = {family: name for name, family in Settings().models.items()}
    engine_metrics = (REPO_ROOT / "vlm_serving" / "backend" / "generate_model.py").read_text()
    gateway_metrics = (REPO_ROOT / "gateway" / "observability.py").read_text()
    assert '("waiting", ' in engine_metrics and 'f"vlm_engine_{name}"' in engine_metrics
    assert '"vlm_time_to_first_token_seconds"' in gateway_metrics and '"vlm_requests_in_flight"' in gateway_metrics
    for deployment in triton_deployments(docs):
        name = deployment["metadata"]["name"]
        family = deployment["spec"]["template"]["metadata"]["labels"]["vlm.serving/family"]
        assert "replicas" not in deployment["spec"], "the autoscaler owns the count"
        queries = {t["name"]: t["metadata"]["query"] for t in scaled[name]["triggers"]}
        assert f'vlm_engine_waiting{{model="{family}_generate"}}' in queries["queue"]
        assert f'vlm_time_to_first_token_seconds_bucket{{model="{public[family]}"}}' in queries["time-to-first-token"]
        behavior = scaled[name]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        # One server at a time, each draining within its grace period (test_scale_down_and_rolling_updates_drain...).
        assert behavior["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    in_flight = [t for t in scaled["gateway"]["triggers"] if t["type"] == "prometheus"]
    assert [t["metadata"]["query"] for t in in_flight] == ["sum(vlm_requests_in_flight)"]
    assert in_flight[0]["metricType"] == "AverageValue"
@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_and_triton_discovery(variant):
    docs = render(variant)
    gateway = container(docs, "gateway")
    for deployment in triton_deployments(docs):
        [triton] = deployment["spec"]["template"]["spec"]["containers"]
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        # One unloaded model must not take the server (and every other model) out of discovery.
        assert "--strict-readiness=false" in triton["args"][0]
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live" and "startupProbe" in triton
    assert gateway["readinessProbe"]["grpc"]["port"] == 50051 and "tcpSocket" in gateway["livenessProbe"]
    headless = one(docs, "Service", "triton-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert env_of(gateway)["VLM_TRITON_URL"]["value"] == f"dns:///triton-headless:{headless['ports'][0]['port']}"


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
    for deployment in triton_deployments(docs):
        assert one(docs, "PodDisruptionBudget", deployment["metadata"]["name"])["spec"]["maxUnavailable"] == 1
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"], "CPU where no serving signal is scraped"


@pytest.mark.parametrize("overlay", VARIANTS)
def test_every_container_runs_as_a_fixed_non_root_user_with_nothing_to_escalate(overlay):
    docs = render(overlay)
    specs = pod_specs(docs)
    assert "gateway" in specs and triton_deployments(docs)
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
    for deployment in triton_deployments(docs):
        triton = deployment["spec"]["template"]["spec"]["securityContext"]
        assert triton["runAsUser"] == triton["runAsGroup"] == triton["fsGroup"] == TRITON_IMAGE_USER


@pytest.mark.parametrize(("dockerfile", "pod"), [("Dockerfile", "gateway"), ("deploy/webui.Dockerfile", "webui")])
def test_the_gateway_and_web_ui_pods_run_as_the_user_their_images_declare(dockerfile, pod):
    user = [line.split()[1] for line in (REPO_ROOT / dockerfile).read_text().splitlines() if line.startswith("USER ")]
    assert len(user) == 1 and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user[0]), \
        "the image names a numeric non-root uid:gid (kubelet can check runAsNonRoot only on numbers)"
    uid, gid = (int(part) for part in user[0].split(":"))
    pod_spec = pod_specs(render("gpu+webui"))[pod]["securityContext"]
    assert (pod_spec["runAsUser"], pod_spec["runAsGroup"], pod_spec["fsGroup"]) == (uid, gid, gid)


@pytest.mark.parametrize("overlay", VARIANTS)
def test_triton_writes_only_to_volumes_under_its_read_only_root(overlay):
    docs = render(overlay)
    for deployment in triton_deployments(docs):
        spec = deployment["spec"]["template"]["spec"]
        [triton] = spec["containers"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        writable = {mount["mountPath"]: volumes[mount["name"]] for mount in triton["volumeMounts"] if not mount.get("readOnly")}
        env = {item["name"]: item.get("value") for item in triton["env"]}
        # The rendered repository, temporary files, the Python backend's shared memory (tmpfs), and HOME for
        # the caches of CUDA (~/.nv), PyTorch and Hugging Face.
        for path in ("/models", "/tmp", "/dev/shm", env.get("HOME")):
            assert path in writable and "emptyDir" in writable[path], f"{path} must be a writable emptyDir"
        assert writable["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        assert all(mount.get("readOnly") for mount in triton["volumeMounts"] if mount["mountPath"] in ("/model-source", "/weights"))


@pytest.mark.parametrize("overlay", VARIANTS)
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
    deployments = {"gateway": [one(docs, "Deployment", "gateway")], "triton": triton_deployments(docs)}
    for name, labels, port in (("gateway", GATEWAY_LABELS, 9090), ("triton", TRITON_LABELS, 8002)):
        service = one(docs, "Service", f"{name}-metrics")
        assert service["spec"]["selector"] == labels and service["spec"]["clusterIP"] == "None"
        [metrics] = service["spec"]["ports"]
        assert metrics["port"] == port and metrics["targetPort"] == "metrics"
        annotations = service["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                               "prometheus.io/path": "/metrics"}
        for deployment in deployments[name]:
            [container_] = deployment["spec"]["template"]["spec"]["containers"]
            assert {p["name"]: p["containerPort"] for p in container_["ports"]}["metrics"] == port
            # Scraped once: through the Service's endpoints, not also as annotated pods.
            template = deployment["spec"]["template"]["metadata"]
            assert not any(key.startswith("prometheus.io/") for key in template.get("annotations", {}))


