"""Calls parsed from answers in each family's markers (vlm_serving.tools.parse_calls)."""

from __future__ import annotations

import json

import pytest

from vlm_serving import tools
from vlm_serving.tools import Tool, ToolCall

WEATHER = Tool("get_weather", "The weather at a place", json.dumps({
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
OSLO = ToolCall("get_weather", '{"city":"Oslo"}')


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}] See [1] and [the docs].',
    '[TOOL_CALLS] {"name": "get_weather", "arguments": {"city": "Oslo"}}\n{"note": [2]}',
    'Checking [now]. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}][/TOOL_CALLS]',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call> and [a bracket]',
])
def test_a_call_is_found_whatever_text_or_brackets_follow_it(text):
    assert tools.parse_calls(text, [WEATHER]) == [OSLO]


def test_each_marked_call_is_found_in_order_and_a_broken_one_is_no_call():
    text = ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}] then '
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Bergen"}}] [x] '
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Tro')
    assert tools.parse_calls(text, [WEATHER]) == [OSLO, ToolCall("get_weather", '{"city":"Bergen"}')]
