"""The OpenAI-compatible HTTP API on the real stack, with the official `openai` SDK and curl."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time

import httpx2 as httpx
import openai
import pytest

from tests.conftest import REPO_ROOT
from tests.integration.conftest import KEY, PNG, start_gateway
from tests.integration.test_inflight import engine_metric, wait_for

pytestmark = pytest.mark.integration
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}


def sdk(gateway, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{gateway.http_address}/v1", api_key=key, max_retries=0, timeout=120)


def ask(text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [IMAGE, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral", "auto"])
def test_unary_and_streamed_chat_with_a_base64_image_agree(gateway, model):
    client = sdk(gateway)
    answer = client.chat.completions.create(model=model, messages=ask(), max_tokens=12)
    assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1
    assert len(answer.model_extra["vlm"]["route"]["images"]) == 1
    chunks = list(client.chat.completions.create(model=model, messages=ask(), max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_models_and_errors_arrive_as_the_sdks_types(gateway, tmp_path):
    client = sdk(gateway)
    assert {model.id for model in client.models.list().data} == {"qwen2.5-vl", "pixtral", "auto"}
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, key="wrong").chat.completions.create(model="pixtral", messages=ask())
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=ask())
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()}}]}]
    with pytest.raises(openai.BadRequestError) as bad_image:
        client.chat.completions.create(model="pixtral", messages=bad)
    assert bad_image.value.body["param"] == "messages[0].content[0].image_url.url"


def test_an_oversized_request_is_413(triton, tmp_path):
    small = start_gateway(triton.grpc_url, tmp_path, VLM_MAX_REQUEST_BYTES="20000")
    try:
        with pytest.raises(openai.APIStatusError) as too_big:
            sdk(small).chat.completions.create(model="pixtral", messages=ask("x" * 30000))
        assert too_big.value.status_code == 413
    finally:
        small.stop()


def test_a_client_that_disconnects_mid_stream_frees_the_generation_row(gateway, triton):
    body = {"model": "qwen2.5-vl", "stream": True, "max_tokens": 3900,
            "messages": [{"role": "user", "content": "Tell me a long story"}]}
    before = engine_metric(triton, "vlm_engine_decode_tokens_total")
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"http://{gateway.http_address}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {KEY}"}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
    wait_for(lambda: engine_metric(triton, "vlm_engine_running") == 0)
    time.sleep(1.5)
    decoded = engine_metric(triton, "vlm_engine_decode_tokens_total") - before
    assert decoded < 3000, "the row stopped long before its 3,900 tokens"
    assert engine_metric(triton, "vlm_engine_running") == 0


def test_the_readmes_curl_examples_run(gateway):
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- curl-examples -->\n```bash\n(.*?)```", readme, re.S).group(1)
    script = block.replace("http://localhost:8080", f"http://{gateway.http_address}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT, env={"VLM_API_KEY": KEY, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(answers) >= 3 and all("choices" in a or "data" in a for a in answers), result.stdout
