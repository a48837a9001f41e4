"""System messages and tool loops through the real Triton ensembles, for both families and `auto`:
the answer's tokens equal plain transformers `generate` on the checkpoint's own template given the
turns as that template takes them (written out here by hand, in each family's format)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.conftest import FAMILIES, encode, picture
from tests.integration.test_ensembles import until_eos
from tests.integration.test_routing import chart_png
from tests.reference import served_size, transformers_generate
from vlm_serving.ensemble_client import generate
from vlm_serving.tools import Tool, system_text, to_wire

pytestmark = pytest.mark.integration
PHOTO = picture(150, 100, seed=21)
CHART = chart_png()
PICTURES = {"photo": (encode(PHOTO), PHOTO), "chart": (CHART, Image.open(io.BytesIO(CHART)))}  # (sent, transformers')
IMAGE = {"type": "image"}
SYSTEM = [{"type": "text", "text": "You answer in one sentence."}, {"type": "text", "text": "Name the main colour first."}]
QUESTION = {"role": "user", "content": [IMAGE, {"type": "text", "text": "What is the weather where this was taken?"}]}
WEATHER = Tool("get_weather", "The weather now", '{"type":"object","properties":{"city":{"type":"string"}}}')
# (model, image): `auto` answers a photo from Qwen2.5-VL (or Pixtral, on low confidence) and a chart from Pixtral.
CASES = [(family, "photo") for family in FAMILIES] + [("auto", "photo"), ("auto", "chart")]


def answer(triton, model: str, kind: str, messages: list, **params):
    result = generate(triton.grpc_url, model, messages, [PICTURES[kind][0]], max_tokens=12, **params)
    family = result.route["family"] if model == "auto" else model
    if model == "auto" and kind == "chart":
        assert family == "pixtral" and result.route["reason"] == "image_kind"
    assert result.finish_reason in ("length", "stop") and result.completion_tokens > 0
    return result, family


def expected_tokens(checkpoints, family: str, kind: str, turns: list) -> list[int]:
    checkpoint = checkpoints / family
    return until_eos(family, checkpoint, transformers_generate(family, checkpoint, turns, [PICTURES[kind][1]], 12,
                                                               served_size(family, checkpoint)))


@pytest.mark.parametrize("model,kind", CASES)
def test_a_system_message_with_an_image_answers_as_transformers_does(triton, checkpoints, model, kind):
    result, family = answer(triton, model, kind, [{"role": "system", "content": SYSTEM}, QUESTION])
    # Pixtral's template takes the system message as a string: its parts joined by a blank line.
    system = "\n\n".join(part["text"] for part in SYSTEM) if family == "pixtral" else SYSTEM
    assert result.token_ids == expected_tokens(checkpoints, family, kind, [{"role": "system", "content": system}, QUESTION])


LOOP = [
    {"role": "system", "content": SYSTEM},
    QUESTION,
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "name": "get_weather",
                                                           "arguments": '{"city":"Paris"}'}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


def loop_as_the_template_takes_it(family: str) -> list:
    """The loop in the family's own format: Qwen2.5's tool template, Mistral's (tokenizer V3) calls
    and results, as user and assistant turns; the tools block after the system text."""
    functions = [WEATHER.as_function()]
    if family == "qwen2_5_vl":
        system = "".join(part["text"] for part in SYSTEM)
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        results = '<tool_response>\n{"temp": 21}\n</tool_response>'
    else:
        system = "\n\n".join(part["text"] for part in SYSTEM)
        call = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]'
        results = '[TOOL_RESULTS]{"content": {"temp": 21}, "call_id": "call_1"}[/TOOL_RESULTS]'
    return [{"role": "system", "content": f"{system}\n\n{system_text(functions, family)}"}, QUESTION,
            {"role": "assistant", "content": call}, {"role": "user", "content": results}]


@pytest.mark.parametrize("model,kind", CASES)
def test_a_tool_loop_answers_as_transformers_does_on_the_familys_format(triton, checkpoints, model, kind):
    result, family = answer(triton, model, kind, LOOP, tools=to_wire([WEATHER]))
    assert result.token_ids == expected_tokens(checkpoints, family, kind, loop_as_the_template_takes_it(family))


def test_a_tool_message_that_answers_no_call_is_refused_through_triton(triton):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=r"messages\[1\]: a tool message answers a call"):
        generate(triton.grpc_url, "pixtral", [{"role": "user", "content": "hi"},
                                              {"role": "tool", "tool_call_id": "call_1", "content": "21"}], [])
