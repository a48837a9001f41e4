"""Task answers through the real stack (gateway -> Triton -> the engine): an answer max_tokens cut
is never passed off as a whole result, whatever the task and family, unary, streamed and over HTTP."""

from __future__ import annotations

import base64

import openai
import pytest
from vlm.v1 import vlm_pb2

from tests.integration.conftest import KEY, PNG
from vlm_client import VLMClient
from vlm_serving import tasks

pytestmark = pytest.mark.integration


@pytest.fixture
def client(gateway):
    with VLMClient(gateway.address, api_key=KEY, timeout=120) as client:
        yield client


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral"])
def test_every_task_cut_by_max_tokens_has_no_result_and_says_so(client, model):
    for task in tasks.TASKS:
        ask = dict(model=model, prompt="cats and dogs", images=[PNG, PNG], max_tokens=2,
                   task=vlm_pb2.Task.Value(f"TASK_{task.upper()}"))
        for answer in (client.generate(**ask), list(client.stream(**ask))[-1]):
            assert answer.finish_reason == vlm_pb2.FINISH_REASON_LENGTH, (task, answer.text)
            assert answer.WhichOneof("result") is None, (task, answer)
            assert answer.result_error.startswith(f"max_tokens cut the answer before its {task} result was complete"), task


def test_a_cut_task_answer_over_http_has_no_result(gateway):
    sdk = openai.OpenAI(base_url=f"http://{gateway.http_address}/v1", api_key=KEY, max_retries=0, timeout=120)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}
    answer = sdk.chat.completions.create(model="pixtral", max_tokens=2, extra_body={"vlm": {"task": "grounding"}},
                                         messages=[{"role": "user", "content": [image, {"type": "text", "text": "cats"}]}])
    assert answer.choices[0].finish_reason == "length" and "result" not in answer.model_extra["vlm"], answer
    assert answer.model_extra["vlm"]["result_error"].startswith("max_tokens cut the answer before its grounding result")
