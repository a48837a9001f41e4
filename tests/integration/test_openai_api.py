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


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral", "auto"])
def test_a_system_message_is_answered_over_both_apis(gateway, model):
    from vlm.v1 import vlm_pb2

    from vlm_client import VLMClient

    system = "You are a terse assistant. Answer in one sentence."
    answer = sdk(gateway).chat.completions.create(
        model=model, max_tokens=6, messages=[{"role": "system", "content": system}, *ask()])
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
    messages = [vlm_pb2.Message(role="system", parts=[vlm_pb2.Part(text=system)]),
                vlm_pb2.Message(role="user", parts=[vlm_pb2.Part(image=vlm_pb2.Image(data=PNG)),
                                                    vlm_pb2.Part(text="What is in the picture?")])]
    with VLMClient(gateway.address, api_key=KEY, timeout=120) as client:
        assert client.generate(model, messages=messages, max_tokens=6).usage.completion_tokens >= 1


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral", "auto"])
def test_the_official_sdk_completes_a_whole_tool_loop(gateway, model):
    """What an agent framework does: call with tools, run the function the model asked for, send
    the assistant's turn back as the SDK returned it with the tool's result, and get an answer."""
    client = sdk(gateway)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                               "parameters": {"type": "object", "properties": {"city": {
                                                   "type": "string", "maxLength": 12}}, "required": ["city"]}}}]
    messages = [{"role": "system", "content": "You can look up the weather."}, *ask("What is the weather there?")]
    first = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                           max_tokens=256)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 18})}]
    second = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were in the prompt
    streamed = list(client.chat.completions.create(model=model, messages=messages[:-2], tools=tools, stream=True,
                                                   tool_choice="required", max_tokens=256))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ""  # no call markup as text
    assert [c.function.name for s in streamed if s.choices for c in s.choices[0].delta.tool_calls or ()] == ["get_weather"]


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral"])
def test_logprobs_come_from_the_engine(gateway, model):
    answer = sdk(gateway).chat.completions.create(model=model, messages=ask(), max_tokens=5, temperature=0,
                                                  logprobs=True, top_logprobs=3)
    tokens = answer.choices[0].logprobs.content
    assert 1 <= len(tokens) <= answer.usage.completion_tokens
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in tokens).startswith(answer.choices[0].message.content[:1])
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the most likely


def test_a_model_is_retrieved(gateway):
    client = sdk(gateway)
    assert client.models.retrieve("pixtral").id == "pixtral"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_an_unset_max_tokens_is_not_cut_at_64(triton, tmp_path):
    unbounded = start_gateway(triton.grpc_url, tmp_path, VLM_DEFAULT_MAX_TOKENS="")
    try:
        # The tiny Pixtral answers this prompt in about 500 tokens and its end token.
        answer = sdk(unbounded).chat.completions.create(
            model="pixtral", messages=[{"role": "user", "content": "Tell me a long story"}])
    finally:
        unbounded.stop()
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens > 64, answer.usage


def test_the_sdk_never_repeats_a_request_that_timed_out(triton, tmp_path):
    impatient = start_gateway(triton.grpc_url, tmp_path, VLM_DEFAULT_TIMEOUT_S="1")
    try:
        def timed_out() -> float:
            text = httpx.get(f"http://127.0.0.1:{impatient.metrics_port}/metrics", timeout=5).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("vlm_requests_total{") and 'code="DEADLINE_EXCEEDED"' in line)

        retrying = openai.OpenAI(base_url=f"http://{impatient.http_address}/v1", api_key=KEY, max_retries=2, timeout=60)
        with pytest.raises(openai.InternalServerError) as failed:
            retrying.chat.completions.create(model="qwen2.5-vl", max_tokens=3000,
                                             messages=[{"role": "user", "content": "Tell me a long story"}])
        assert failed.value.status_code == 504
        assert failed.value.response.headers["x-should-retry"] == "false"
        assert timed_out() == 1, "the SDK repeated a request whose work had run"
    finally:
        impatient.stop()


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral"])
def test_a_second_turn_reports_the_prompt_tokens_the_prefix_cache_held(gateway, model):
    """A chat's second turn resends the first (its image included): the engine starts from the
    first turn's kept blocks, and both APIs say how many prompt tokens that was."""
    from vlm_client import VLMClient

    client = sdk(gateway)
    turn = ask("Describe the picture in a few words, please.")
    first = client.chat.completions.create(model=model, messages=turn, max_tokens=6, temperature=0)
    second_turn = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "And what colour dominates?"}]
    second = client.chat.completions.create(model=model, messages=second_turn, max_tokens=6, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    print(f"{model}: second turn {cached} of {second.usage.prompt_tokens} prompt tokens from the cache")
    # Whole blocks of the first prompt (image included) are reused: at least all but its last two blocks.
    assert first.usage.prompt_tokens - 32 <= cached < second.usage.prompt_tokens
    with VLMClient(gateway.address, api_key=KEY) as grpc_client:
        again = grpc_client.generate(model, "Describe the picture in a few words, please.", [PNG], max_tokens=4,
                                     temperature=0.0)
    assert again.usage.cached_tokens >= first.usage.prompt_tokens - 32, again.usage
