"""Response formats through the real stack (gateway -> Triton -> the engine's grammar masks)."""

from __future__ import annotations

import json
import re
import subprocess

import grpc
import jsonschema
import pytest

from tests.integration.conftest import KEY, PNG
from vlm_client import VLMClient, response_format
from vlm_serving import tasks

pytestmark = pytest.mark.integration
SCHEMA = {
    "type": "object",
    "properties": {"kind": {"enum": ["photo", "document", "diagram"]},
                   "objects": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
                   "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["kind", "objects", "count"], "additionalProperties": False,
}


@pytest.fixture
def client(gateway):
    with VLMClient(gateway.address, api_key=KEY, timeout=120) as client:
        yield client


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral", "auto"])
def test_a_json_schema_answer_validates_unary_and_streamed(client, model):
    shape = response_format(json_schema=SCHEMA)
    for seed in range(3):
        answer = client.generate(model, "Describe the picture as JSON.", [PNG], max_tokens=96, temperature=1.0,
                                 seed=seed, response_format=shape)
        assert answer.finish_reason == 1, answer  # STOP
        jsonschema.validate(json.loads(answer.text), SCHEMA)
    streamed = list(client.stream(model, "Describe the picture as JSON.", [PNG], max_tokens=96, response_format=shape))
    jsonschema.validate(json.loads("".join(message.text for message in streamed)), SCHEMA)


def test_regex_and_choice_answers_match(client):
    answer = client.generate("qwen2.5-vl", "A name and a number", max_tokens=32, temperature=1.0, seed=3,
                             response_format=response_format(regex=r"[A-Z][a-z]{2,8} [0-9]{1,3}"))
    assert re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{1,3}", answer.text), answer.text
    answer = client.generate("pixtral", "Is it a photo?", [PNG], max_tokens=8,
                             response_format=response_format(choices=["yes", "no"]))
    assert answer.text in ("yes", "no")


@pytest.mark.parametrize("shape, message", [
    (response_format(json_schema="{nope"), "the schema is not JSON"),  # refused by the gateway
    (response_format(json_schema={"type": "object", "not": {"required": ["a"]}}), "#/not is not supported"),
    (response_format(regex="(?<=a)b"), "Lookbehind is not supported"),  # refused when the engine compiles it
])
def test_a_bad_format_is_invalid_argument_on_config_response_format(client, shape, message):
    with pytest.raises(grpc.RpcError) as refused:
        client.generate("pixtral", "hi", max_tokens=8, response_format=shape)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.response_format" in refused.value.details() and message in refused.value.details()


def test_the_cli_takes_a_json_schema_file(gateway, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    image = tmp_path / "picture.png"
    image.write_bytes(PNG)
    result = subprocess.run([".venv/bin/vlm", "--address", gateway.address, "generate", "--model", "pixtral",
                             "--image", str(image), "--json-schema", str(schema), "--max-tokens", "96", "What is it?"],
                            capture_output=True, text=True, timeout=120, env={"VLM_API_KEY": KEY, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), SCHEMA)


RESULT_OF = {"TASK_CAPTION": "caption", "TASK_OCR": "text_lines", "TASK_DOCUMENT": "document",
             "TASK_GROUNDING": "detections", "TASK_CHART": "table"}


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral", "auto"])
@pytest.mark.parametrize("task", sorted(RESULT_OF) + ["TASK_VQA"])
def test_each_task_returns_its_result_type(client, model, task):
    from vlm.v1 import vlm_pb2

    structured = task.removeprefix("TASK_").lower() in tasks.STRUCTURED
    answer = client.generate(model, "cats and dogs", [PNG, PNG], max_tokens=1024 if structured else 48,
                             task=vlm_pb2.Task.Value(task))
    if structured:  # the schema brings the JSON to its end (free text runs to max_tokens on the tiny models)
        assert answer.finish_reason == vlm_pb2.FINISH_REASON_STOP, (answer.finish_reason, answer.text[-200:])
    if answer.finish_reason == vlm_pb2.FINISH_REASON_LENGTH:  # free text the tiny model did not end: cut, no result
        assert answer.WhichOneof("result") is None and "max_tokens cut the answer" in answer.result_error
    else:
        assert answer.WhichOneof("result") == RESULT_OF.get(task) and not answer.result_error, answer.result_error
    for item in list(answer.detections.detections) + list(answer.text_lines.lines):
        assert item.image_index in (0, 1)  # two images: each item says which
        if item.HasField("box"):
            assert 0 <= item.box.x_min <= item.box.x_max <= 120 and 0 <= item.box.y_min <= item.box.y_max <= 90


def test_the_cli_prints_a_grounding_result(gateway, tmp_path):
    image = tmp_path / "picture.png"
    image.write_bytes(PNG)
    result = subprocess.run([".venv/bin/vlm", "--address", gateway.address, "generate", "--model", "qwen2.5-vl",
                             "--image", str(image), "--task", "grounding", "--max-tokens", "1024", "cats"],
                            capture_output=True, text=True, timeout=120, env={"VLM_API_KEY": KEY, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "--- detections (label, box x_min y_min x_max y_max in pixels of the file as stored, image)" in result.stdout
    as_json = subprocess.run([".venv/bin/vlm", "--address", gateway.address, "generate", "--model", "qwen2.5-vl",
                              "--image", str(image), "--task", "grounding", "--max-tokens", "1024", "--json", "cats"],
                             capture_output=True, text=True, timeout=120, env={"VLM_API_KEY": KEY, "PATH": "/usr/bin:/bin"})
    assert "detections" in json.loads(as_json.stdout)


ZOOM = {"name": "zoom", "description": "Zoom into a region of the picture", "parameters": {
    "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                                             "minItems": 4, "maxItems": 4}},
    "required": ["box"], "additionalProperties": False}}
WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}


@pytest.mark.parametrize("model", ["qwen2.5-vl", "pixtral", "auto"])
def test_a_required_tool_call_comes_back_typed_and_valid(client, model):
    for seed, choice in enumerate(["required", "zoom"]):
        answer = client.generate(model, "Look closer", [PNG], max_tokens=160, temperature=1.0, seed=seed,
                                 tools=[ZOOM, WEATHER], tool_choice=choice)
        [call] = answer.tool_calls
        assert choice == "required" or call.name == "zoom"
        schema = {"zoom": ZOOM, "get_weather": WEATHER}[call.name]["parameters"]
        jsonschema.validate(json.loads(call.arguments), schema)
    answer = client.generate(model, "Look closer", [PNG], max_tokens=16, tools=[ZOOM], tool_choice="none")
    assert not answer.tool_calls


def test_the_cli_calls_a_tool(gateway, tmp_path):
    tool = tmp_path / "zoom.json"
    tool.write_text(json.dumps(ZOOM))
    result = subprocess.run([".venv/bin/vlm", "--address", gateway.address, "generate", "--model", "pixtral",
                             "--tool", str(tool), "--tool-choice", "zoom", "--max-tokens", "160", "Look closer"],
                            capture_output=True, text=True, timeout=120, env={"VLM_API_KEY": KEY, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "--- tool call\nzoom({\"box\":[" in result.stdout
