"""Model-repository hot reload under load: explicit LoadModel through the gateway, and poll mode."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from tests.integration.conftest import KEY, make_repository, start_gateway, start_server
from vlm_client import VLMClient
from vlm_serving import tiny_checkpoints
from vlm_serving.pipelines import pipeline
from vlm_serving.ensemble_client import generate, user_message

pytestmark = pytest.mark.integration
ADMIN_KEY = "e2e-admin-key"
GENERATE = "qwen2_5_vl_generate"


def add_version(repository: Path, version: int, checkpoint: Path | None = None, broken: str | None = None) -> None:
    """What an operator ships: a new version folder, with its own weights or with a fault."""
    folder = repository / GENERATE / str(version)
    folder.mkdir()
    if broken:
        (folder / "model.py").write_text(
            f"class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError({broken!r})\n"
        )
    else:
        (folder / "model.py").write_text((repository / GENERATE / "1" / "model.py").read_text())
    if checkpoint:
        (folder / "checkpoint").symlink_to(checkpoint)
    # Triton compares modification times at one-second granularity: a load in the same second as
    # the write would be repeated by the next load.
    time.sleep(1.1)


def start_stack(root: Path, checkpoints: Path, models: str = "qwen2.5-vl=qwen2_5_vl", **triton_options):
    repository = make_repository(root / "model_repository", checkpoints)
    triton = start_server(repository, **triton_options)
    try:
        gateway = start_gateway(triton.grpc_url, root, VLM_MODELS=models, VLM_ADMIN_API_KEYS=ADMIN_KEY)
    except BaseException:
        triton.stop()
        raise
    return repository, triton, gateway


@pytest.fixture(scope="module")
def stack(tmp_path_factory, checkpoints):
    """For tests that leave the repository and the loaded models as they found them."""
    repository, triton, gateway = start_stack(
        tmp_path_factory.mktemp("reload"), checkpoints, load_models=(*pipeline("qwen2_5_vl"), "cancel"))
    yield repository, triton, gateway
    gateway.stop()
    triton.stop()


@pytest.fixture
def own_stack(tmp_path, checkpoints):
    """For a test that changes the repository: nobody else sees its versions and configs."""
    repository, triton, gateway = start_stack(tmp_path, checkpoints, load_models=(*pipeline("qwen2_5_vl"), "cancel"))
    yield repository, triton, gateway
    gateway.stop()
    triton.stop()


def admin(gateway, key=ADMIN_KEY):
    channel = grpc.insecure_channel(gateway.address)
    return vlm_pb2_grpc.ModelAdminServiceStub(channel), (("authorization", f"Bearer {key}"),)


class Load:
    """Clients that call Generate without pause (no retries: every failure counts) until stopped."""

    def __init__(self, address: str, clients: int = 4, model: str = "qwen2.5-vl"):
        self.model = model
        self.results: list[tuple[float, str, str]] = []
        self.attempts: list[tuple[tuple[str, str], ...]] = []  # per answer: (model, version) tried
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(address,)) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, address: str) -> None:
        with VLMClient(address, api_key=KEY, retries=0, timeout=60) as client:
            while not self.stopping.is_set():
                try:
                    answer = client.generate(self.model, "Name the colours.", max_tokens=4)
                    self.results.append((time.monotonic(), answer.model_version, answer.text))
                    self.attempts.append(tuple((a.model, a.model_version) for a in answer.route.attempts))
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")

    def answered_between(self, start: float, end: float) -> int:
        return sum(start <= at <= end for at, _, _ in self.results)

    def wait_for_answers_after(self, since: float, count: int, timeout: float = 120) -> None:
        """Until `count` answers completed after `since`; fails saying how far it got (a loaded machine
        is slow, never silently short)."""
        deadline = time.monotonic() + timeout
        while self.answered_between(since, float("inf")) < count:
            if self.failures or time.monotonic() > deadline:
                pytest.fail(f"{self.answered_between(since, float('inf'))} of {count} answers within {timeout} s; "
                            f"failures: {self.failures[:3]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()


def test_admin_rpcs_need_the_admin_scope(stack):
    _, _, gateway = stack
    for key, code in ((KEY, grpc.StatusCode.PERMISSION_DENIED), ("nobody", grpc.StatusCode.UNAUTHENTICATED)):
        stub, metadata = admin(gateway, key)
        for method, request in ((stub.LoadModel, vlm_pb2.LoadModelRequest(model="qwen2.5-vl")),
                                (stub.UnloadModel, vlm_pb2.UnloadModelRequest(model="qwen2.5-vl"))):
            with pytest.raises(grpc.RpcError) as caught:
                method(request, metadata=metadata, timeout=10)
            assert caught.value.code() == code
    stub, metadata = admin(gateway)
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadModel(vlm_pb2.LoadModelRequest(model="gpt-4"), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_three_reloads_under_load_fail_no_request(own_stack, tmp_path, capsys):
    """Every request sent during the reloads is answered, and answers keep coming during each load."""
    repository, triton, gateway = own_stack
    second = tmp_path / "weights-v2"
    tiny_checkpoints.main([str(second), "--seed", "7", "--family", "qwen2_5_vl"])
    stub, metadata = admin(gateway)
    load = Load(gateway.address)
    reloads = {}  # name -> (start, end) on the monotonic clock
    try:
        load.wait_for_answers_after(0, 20)
        # 1. A new version with new weights.
        add_version(repository, 2, checkpoint=second / "qwen2_5_vl")
        started = time.monotonic()
        reply = stub.LoadModel(vlm_pb2.LoadModelRequest(model="qwen2.5-vl"), metadata=metadata, timeout=300)
        reloads["new version"] = (started, time.monotonic())
        # Version 1 is unloaded (the policy serves the latest): gone from the listing, not UNAVAILABLE.
        assert [(v.version, v.state) for v in reply.model.versions] == [("2", "READY")]
        switched_at = time.monotonic()
        # 2. A changed config for the serving version.
        config = repository / GENERATE / "config.pbtxt"
        text = config.read_text()
        assert 'max_tokens_limit" value: { string_value: "4096"' in text
        config.write_text(text.replace('string_value: "4096"', 'string_value: "2048"')
                          .replace('"max_running" value: { string_value: "16"', '"max_running" value: { string_value: "8"'))
        time.sleep(1.1)
        started = time.monotonic()
        stub.LoadModel(vlm_pb2.LoadModelRequest(model="qwen2.5-vl"), metadata=metadata, timeout=300)
        reloads["changed config"] = (started, time.monotonic())
        served = triton_grpc.InferenceServerClient(triton.grpc_url).get_model_config(GENERATE, as_json=True)["config"]
        assert served["parameters"]["max_tokens_limit"]["string_value"] == "2048"
        assert served["parameters"]["max_running"]["string_value"] == "8"
        # 3. A broken version: the load fails, says why, and version 2 goes on serving.
        add_version(repository, 3, broken="weights for version 3 are corrupt")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.LoadModel(vlm_pb2.LoadModelRequest(model="qwen2.5-vl"), metadata=metadata, timeout=300)
        reloads["broken version"] = (started, time.monotonic())
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "weights for version 3 are corrupt" in caught.value.details()
        assert f"loading {GENERATE} failed; the previous version keeps serving" in caught.value.details()
        load.wait_for_answers_after(time.monotonic(), 20)  # answers after the failed load, too
    finally:
        load.stop()
    total = len(load.results) + len(load.failures)
    assert load.failures == [], load.failures[:5]
    during = {name: load.answered_between(start, end) for name, (start, end) in reloads.items()}
    assert all(during.values()), f"no answer while a load ran: {during}"
    versions = [version for _, version, _ in load.results]
    assert "1" in versions and "2" in versions and "3" not in versions
    after = [(version, text) for at, version, text in load.results if at > switched_at + 1]
    assert after and {version for version, _ in after} == {"2"}
    texts = {version: {text for _, v, text in load.results if v == version} for version in ("1", "2")}
    assert len(texts["1"]) == 1 and len(texts["2"]) == 1 and texts["1"] != texts["2"], "each version answers its own way"
    with VLMClient(gateway.address, api_key=KEY) as client:
        [model] = client.list_models()
        assert model.ready and [(v.version, v.state) for v in model.versions] == [("2", "READY"), ("3", "UNAVAILABLE")]
        assert "corrupt" in model.versions[1].reason
    with capsys.disabled():
        print(f"\nreload under load: {total} requests, 0 failed; per load: seconds (answers meanwhile) "
              + ", ".join(f"{name} {end - start:.1f} ({during[name]})" for name, (start, end) in reloads.items()))


def test_reloading_a_family_under_routed_load_drops_nothing(tmp_path, checkpoints):
    """Model auto calls both families for each of these requests (the tiny Qwen is never confident
    enough, so Pixtral answers again); a new Qwen version goes live under that load."""
    repository, triton, gateway = start_stack(
        tmp_path, checkpoints, models="qwen2.5-vl=qwen2_5_vl,pixtral=pixtral,auto=auto")
    second = tmp_path / "weights-v2"
    tiny_checkpoints.main([str(second), "--seed", "7", "--family", "qwen2_5_vl"])
    stub, metadata = admin(gateway)
    load = Load(gateway.address, model="auto")
    try:
        load.wait_for_answers_after(0, 10)
        add_version(repository, 2, checkpoint=second / "qwen2_5_vl")
        started = time.monotonic()
        reply = stub.LoadModel(vlm_pb2.LoadModelRequest(model="qwen2.5-vl"), metadata=metadata, timeout=300)
        loaded = time.monotonic()
        assert [(v.version, v.state) for v in reply.model.versions] == [("2", "READY")]
        load.wait_for_answers_after(loaded, 10)
    finally:
        load.stop()
        gateway.stop()
        triton.stop()
    assert load.failures == [], load.failures[:5]
    assert load.answered_between(started, loaded) > 0, "no routed answer while Qwen's new version loaded"
    assert {attempts[-1] for attempts in load.attempts} == {("pixtral", "1")}, "Pixtral answers every routed request"
    assert {attempts[0] for attempts in load.attempts} == {("qwen2.5-vl", "1"), ("qwen2.5-vl", "2")}


def test_unload_and_load_are_seen_by_health_and_list_models(stack):
    _, _, gateway = stack
    stub, metadata = admin(gateway)
    reply = stub.UnloadModel(vlm_pb2.UnloadModelRequest(model="qwen2.5-vl"), metadata=metadata, timeout=60)
    # Answered once the unload is complete: no version left, none UNLOADING.
    assert not reply.model.ready and list(reply.model.versions) == []
    with VLMClient(gateway.address, api_key=KEY, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate("qwen2.5-vl", "anyone?", max_tokens=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "qwen2.5-vl" in caught.value.details()
        deadline = time.monotonic() + 10
        while gateway.health() == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gateway.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert stub.LoadModel(vlm_pb2.LoadModelRequest(model="qwen2.5-vl"), metadata=metadata, timeout=300).model.ready
        gateway.wait_serving(10)
        assert client.generate("qwen2.5-vl", "back?", max_tokens=2).usage.completion_tokens == 2


def test_poll_mode_serves_a_new_version_once_without_reload_loops(tmp_path, checkpoints):
    repository, triton, gateway = start_stack(tmp_path, checkpoints, model_control="poll")
    try:
        stub, metadata = admin(gateway)
        for method, request in ((stub.LoadModel, vlm_pb2.LoadModelRequest(model="qwen2.5-vl")),
                                (stub.UnloadModel, vlm_pb2.UnloadModelRequest(model="qwen2.5-vl"))):
            with pytest.raises(grpc.RpcError) as caught:
                method(request, metadata=metadata, timeout=30)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "polls its model repository" in caught.value.details() and "by itself" in caught.value.details()
        url = triton.grpc_url
        assert generate(url, "qwen2_5_vl", user_message("v?", 0), [], max_tokens=2).model_version == "1"
        add_version(repository, 2)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if generate(url, "qwen2_5_vl", user_message("v?", 0), [], max_tokens=2).model_version == "2":
                break
            time.sleep(0.5)
        else:
            pytest.fail("poll mode never served version 2")
        log = triton.log_path.read_text()
        start_loads = log.count(f"successfully loaded '{GENERATE}'")
        time.sleep(6)  # three poll cycles
        log = triton.log_path.read_text()
        assert log.count(f"successfully loaded '{GENERATE}'") == start_loads, "the poller reloaded an unchanged model"
        # One load at start and one for version 2: no reload caused by bytecode written at import.
        assert start_loads == 2 and log.count(f"{GENERATE} version 2: loaded") == 1
        assert not list(repository.rglob("__pycache__"))
    finally:
        gateway.stop()
        triton.stop()
