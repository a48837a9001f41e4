"""Starting Triton with environment overrides, and stopping it without leaving stub processes."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from tests.conftest import encode, picture
from tests.integration.conftest import KEY, make_repository, start_gateway, start_server
from vlm_client import VLMClient
from vlm_serving.pipelines import pipeline
from vlm_serving.ensemble_client import generate, user_message

pytestmark = pytest.mark.integration


def stub_processes(repository: Path) -> list[int]:
    """Python-backend stubs still running for models of `repository`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" in cmdline and str(repository) in cmdline:
            found.append(int(pid))
    return found


def test_int8_language_models_and_encoders_by_environment_answer_and_stop_leaves_no_stubs(tmp_path, checkpoints):
    repository = make_repository(tmp_path / "model_repository", checkpoints)
    server = start_server(
        repository,
        load_models=(*pipeline("qwen2_5_vl"), *pipeline("pixtral")),
        extra_env={
            "VLM_QWEN2_5_VL_GENERATE_QUANTIZATION": "int8",
            "VLM_PIXTRAL_GENERATE_QUANTIZATION": "int8",
            "VLM_QWEN2_5_VL_ENCODER_VARIANT": "int8",
            "VLM_PIXTRAL_ENCODER_VARIANT": "int8",
        },
    )
    try:
        assert len(stub_processes(repository)) >= 4
        for family in ("qwen2_5_vl", "pixtral"):
            result = generate(server.grpc_url, family, user_message("int8?", 1), [encode(picture(96, 64))], max_tokens=8)
            assert result.completion_tokens == 8 and result.token_ids
        log = server.log_path.read_text()
        assert "quantization=int8" in log and "encoder.int8.onnx" in log
    finally:
        server.stop()
    assert stub_processes(repository) == []


def test_a_missing_checkpoint_fails_start_up_with_the_reason(tmp_path):
    repository = make_repository(tmp_path / "model_repository", tmp_path / "no-weights")
    with pytest.raises(RuntimeError, match="no checkpoint at .*make models"):
        start_server(repository, load_models=("pixtral_generate",))
    assert stub_processes(repository) == []


def test_overload_is_refused_at_once_not_queued_forever(tmp_path, checkpoints):
    """With a queue of one, a burst gets some answers and clear refusals, and nothing hangs."""
    from concurrent.futures import ThreadPoolExecutor

    from tritonclient.utils import InferenceServerException

    from vlm_serving.deploy.render import Batching

    repository = make_repository(
        tmp_path / "model_repository", checkpoints, generate_batching=Batching(1, (1,), 100, 1)
    )
    server = start_server(repository, load_models=tuple(pipeline("pixtral")))

    def call(_):
        try:
            return generate(server.grpc_url, "pixtral", user_message("busy?", 0), [], max_tokens=48, timeout=60)
        except InferenceServerException as exc:
            return exc

    def through_gateway(_):
        with VLMClient(gateway.address, api_key=KEY, retries=0, timeout=60) as client:
            try:
                return client.generate("pixtral", "busy?", max_tokens=48).usage.completion_tokens
            except grpc.RpcError as error:
                return error

    gateway = None
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
        gateway = start_gateway(server.grpc_url, tmp_path, VLM_MODELS="pixtral=pixtral")
        with ThreadPoolExecutor(12) as pool:
            via_gateway = list(pool.map(through_gateway, range(12)))
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
    refused = [r for r in results if isinstance(r, Exception)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert answered and all(r.completion_tokens == 48 for r in answered)
    assert refused and all("Exceeds maximum queue size" in r.message() for r in refused)
    # Through the public API the same overload is RESOURCE_EXHAUSTED, with what to do about it.
    gateway_refused = [r for r in via_gateway if isinstance(r, grpc.RpcError)]
    assert 48 in via_gateway and gateway_refused
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry with backoff" in r.details()
               for r in gateway_refused), [(r.code(), r.details()) for r in gateway_refused]
