"""Named keys on the real stack: keys made by the `vlm keys` command in a process of its own, read by a
real gateway process from its key file, added and revoked while it runs; a tokens-per-minute quota
charged with the completion tokens real generation reported; names (never keys) in the gateway's log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from tests.integration.conftest import start_gateway

pytestmark = pytest.mark.integration


def vlm_keys(path, *args) -> str:
    result = subprocess.run([sys.executable, "-m", "vlm_client.cli", "keys", "--file", str(path), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def details(error) -> dict:
    found = {}
    for detail in rpc_status.from_call(error).details:
        for kind in (error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


def test_keys_from_the_file_quotas_on_real_answers_and_reloads_without_a_restart(triton, tmp_path):
    path = tmp_path / "keys.jsonl"
    bot = vlm_keys(path, "add", "ci-bot", "--tokens-per-minute", "2")
    gateway = start_gateway(triton.grpc_url, tmp_path, VLM_API_KEYS_FILE=str(path))
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = vlm_pb2_grpc.VisionLanguageServiceStub(channel)
            as_bot = (("authorization", f"Bearer {bot}"),)
            ask = vlm_pb2.GenerateRequest(model="pixtral", messages=[vlm_pb2.Message(
                role="user", parts=[vlm_pb2.Part(text="Say something.")])], config=vlm_pb2.GenerationConfig(
                max_tokens=8, temperature=0))
            answer = stub.Generate(ask, metadata=as_bot, timeout=120)
            used = answer.usage.completion_tokens
            assert used >= 2  # over the 2 a minute: the next request is refused until the bucket refills
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(ask, metadata=as_bot, timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            found = details(caught.value)
            [violation] = found["QuotaFailure"].violations
            assert violation.subject == "ci-bot" and violation.description.startswith("tokens_per_minute:")
            # Back to one token at 2 a minute (30 s a token): the answer's own count was charged.
            delay = found["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
            assert (used - 1) * 30 - 5 < delay <= (used - 1) * 30

            ops = vlm_keys(path, "add", "ops", "--scope", "admin")  # while the gateway runs
            admin = vlm_pb2_grpc.ModelAdminServiceStub(channel)
            assert admin.ListBackends(vlm_pb2.ListBackendsRequest(), metadata=(("authorization", f"Bearer {ops}"),),
                                      timeout=30).backends
            listed = vlm_keys(path, "list")
            assert bot not in listed and ops not in listed and listed.splitlines()[0].startswith("ci-bot\tscope=user")

            bot_id = bot.split("_")[1]  # revoked: its line deleted
            path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if bot_id not in line))
            deadline = time.monotonic() + 5
            while True:
                try:
                    stub.ListModels(vlm_pb2.ListModelsRequest(), metadata=as_bot, timeout=30)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    break
                assert time.monotonic() < deadline, "the revoked key still works"
                time.sleep(0.1)
    finally:
        gateway.stop()
    log = gateway.log_path.read_text()
    assert bot not in log and ops not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [line.get("key") for line in lines if line["message"] == "done"] == ["ci-bot"]
    refused = [line for line in lines if line["message"] == "request refused"]
    assert refused[0]["key"] == "ci-bot" and refused[0]["code"] == "RESOURCE_EXHAUSTED"
    audit = [line for line in lines if line["logger"] == "gateway.audit"]
    assert [(line["key"], line["rpc"], line["result"]) for line in audit] == [("ops", "ListBackends", "OK")]
