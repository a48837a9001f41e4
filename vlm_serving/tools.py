"""Function calling: tools shown to the model in its family's conventions, calls constrained to a
tool's parameter schema, and calls parsed from the answer.

Light (no model code): the gateway validates tools and parses calls, preprocessing writes the tools
and an earlier round's calls and results into the prompt (it knows the family), the generation step
wraps the call grammar in the family's call markers (`CALL_WRAPPERS`).

Formats: Qwen2.5-VL answers `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the Qwen2.5
tool format); Pixtral answers `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral's). Neither
tiny nor released vision checkpoint's chat template renders tools, calls or results, so the tool
list is written into the system turn, and calls and results into assistant and user turns, as those
families' text templates write them (`apply_tools`, `tool_turns`). Mistral's markers are control
tokens in Mistral's own tokenizers; the tiny Pixtral tokenizer has none, and in any tokenizer these
blocks reach the template as message text, which `preprocessing.prompt.PromptTokenizer.prompt_ids`
encodes as text (no control token comes from a message): the model reads the markers spelled out, as
a caller could also type them. One call per answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from vlm_serving.generation.structured import TOOL_CALL, ResponseFormat, schema_violations

AUTO, NONE, REQUIRED, NAMED = "auto", "none", "required", "named"
TOOL_CHOICES = (AUTO, NONE, REQUIRED, NAMED)
CALL_WRAPPERS = {"qwen2_5_vl": ("<tool_call>\n", "\n</tool_call>"), "pixtral": ("[TOOL_CALLS][", "]")}
MAX_TOOLS = 32
# Calls one assistant message of a conversation may carry.
MAX_CALLS = 32
# Characters of a tool's description.
MAX_DESCRIPTION_CHARS = 8192
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A call's id, as a request may send it back (protos/vlm/v1/vlm.proto, ToolCall.id).
CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    # JSON Schema of the arguments object, as JSON text.
    parameters: str = '{"type":"object","properties":{}}'

    def as_function(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": json.loads(self.parameters)}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, compact


def violations(tools: list[Tool], choice: str, named: str) -> list[tuple[str, str]]:
    """(field, what is wrong) for the tools and the choice among them."""
    problems = []
    if len(tools) > MAX_TOOLS:
        problems.append(("tools", f"{len(tools)} tools is over the limit of {MAX_TOOLS}"))
    names = [tool.name for tool in tools]
    for i, tool in enumerate(tools):
        if len(tool.description) > MAX_DESCRIPTION_CHARS:
            problems.append((f"tools[{i}].description", f"{len(tool.description)} characters is over the limit of "
                                                         f"{MAX_DESCRIPTION_CHARS}"))
        if not NAME.fullmatch(tool.name):
            problems.append((f"tools[{i}].name", f"{tool.name!r}: 1 to 64 letters, digits, '_' or '-'"))
        if names.count(tool.name) > 1:
            problems.append((f"tools[{i}].name", f"{tool.name!r} is given twice"))
        for problem in schema_violations(tool.parameters):
            problems.append((f"tools[{i}].parameters", problem.replace("json_schema: ", "")))
        if not problems and json.loads(tool.parameters).get("type") != "object":
            problems.append((f"tools[{i}].parameters", 'the arguments are a JSON object: use {"type": "object", ...}'))
    if choice in (REQUIRED, NAMED) and not tools:
        problems.append(("tool_choice", f"tool_choice {choice} needs tools"))
    if choice == NAMED and named not in names:
        problems.append(("tool_choice.name", f"{named!r} is not one of the tools ({', '.join(names) or 'none given'})"))
    return problems


def to_wire(tools: list[Tool]) -> str:
    """The tools as the TOOLS tensor carries them to preprocessing ("" for none)."""
    return json.dumps([tool.as_function() for tool in tools], separators=(",", ":")) if tools else ""


def system_text(functions: list[dict], family: str) -> str:
    """The tools block of the system turn, in the family's convention."""
    listed = "\n".join(json.dumps(function, ensure_ascii=False) for function in functions)
    if family == "qwen2_5_vl":  # Qwen2.5's tool template
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                f"{listed}\n</tools>\n\nFor each function call, return a json object with function name and "
                "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    return (f"[AVAILABLE_TOOLS]{json.dumps(functions, ensure_ascii=False)}[/AVAILABLE_TOOLS]\n"
            'To call a function, answer [TOOL_CALLS][{"name": <function-name>, "arguments": <args-json-object>}].')


def apply_tools(messages: list[dict], functions: list[dict], family: str) -> list[dict]:
    """The messages with the tools block added to the system turn (one is added if there is none);
    a system message's content is one string here (chat.template_messages joins its parts).
    The block is the service's text; no caller's text becomes a control token (see PromptTokenizer.prompt_ids)."""
    if not functions:
        return messages
    block = system_text(functions, family)
    if messages and messages[0].get("role") == "system":
        text = messages[0]["content"]
        return [{"role": "system", "content": f"{text}\n\n{block}" if text else block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def tool_turns(messages: list[dict], family: str) -> list[dict]:
    """The messages with an earlier round's calls and results as turns the family's chat template
    renders (neither public template takes tool_calls or a "tool" role): each assistant message
    that made calls holds them after its text, written as the family writes calls; a run of tool
    messages becomes one user turn of their results. Pixtral's template needs user and assistant
    turns to alternate, so there a user message right after the results joins their turn.

    Qwen2.5's tool template: `<tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>` per call,
    one per line after the text; each result as `<tool_response>\\n...\\n</tool_response>`, one per line.
    Mistral's (mistral_common, tokenizer V3): `[TOOL_CALLS][{"name": .., "arguments": {..}, "id": ..}, ..]`,
    each result as `[TOOL_RESULTS]{"content": .., "call_id": ..}[/TOOL_RESULTS]` (content parsed
    when it is JSON). Tool messages' content is one string here (chat.template_messages)."""
    turns: list[dict] = []
    results: list[str] = []  # the run of tool results being gathered
    for message in messages:
        if message["role"] == "tool":
            results.append(_result_text(message, family))
            continue
        if results:
            joined = _RESULT_SEPARATORS[family].join(results)
            results = []
            if family == "pixtral" and message["role"] == "user":
                turns.append({**message, "content": [{"type": "text", "text": joined}, *_parts(message["content"])]})
                continue
            turns.append({"role": "user", "content": joined})
        turns.append(_with_calls(message, family) if message.get("tool_calls") else message)
    if results:
        turns.append({"role": "user", "content": _RESULT_SEPARATORS[family].join(results)})
    return turns


# Between two results of one run: Qwen writes each block on a line of its own, Mistral back to back.
_RESULT_SEPARATORS = {"qwen2_5_vl": "\n", "pixtral": ""}


def _parts(content: str | list | None) -> list[dict]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def _with_calls(message: dict, family: str) -> dict:
    """An assistant message whose calls follow its text (parts kept, so the template renders them)."""
    calls = message["tool_calls"]
    if family == "qwen2_5_vl":
        written = "\n".join("<tool_call>\n" + json.dumps({"name": call["name"], "arguments": json.loads(call["arguments"])},
                                                         ensure_ascii=False) + "\n</tool_call>" for call in calls)
    else:
        written = "[TOOL_CALLS]" + json.dumps([{"name": call["name"], "arguments": json.loads(call["arguments"])}
                                               | ({"id": call["id"]} if call.get("id") else {}) for call in calls],
                                              ensure_ascii=False)
    parts = _parts(message["content"])
    if parts and family == "qwen2_5_vl":  # the calls start on a line of their own after the text
        written = "\n" + written
    return {"role": "assistant", "content": [*parts, {"type": "text", "text": written}]}


def _result_text(message: dict, family: str) -> str:
    if family == "qwen2_5_vl":
        return f"<tool_response>\n{message['content']}\n</tool_response>"
    try:  # as mistral_common: JSON content is written as the value it holds
        content = json.loads(message["content"])
    except ValueError:
        content = message["content"]
    return f"[TOOL_RESULTS]{json.dumps({'content': content, 'call_id': message['tool_call_id']}, ensure_ascii=False)}[/TOOL_RESULTS]"


def call_schema(tools: list[Tool]) -> dict:
    """One call of any of `tools`: its name and arguments valid under its parameters."""
    options = [{"type": "object", "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
                "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_format(tools: list[Tool], choice: str, named: str) -> ResponseFormat:
    """What the answer must be: a call (required: of any tool; named: of that one), else free."""
    if choice == REQUIRED:
        chosen = tools
    elif choice == NAMED:
        chosen = [tool for tool in tools if tool.name == named]
    else:
        return ResponseFormat()
    return ResponseFormat(TOOL_CALL, schema=json.dumps(call_schema(chosen), separators=(",", ":")))


# Qwen2.5-VL's call sits between its markers; Pixtral's is the JSON value after its marker, read by a
# JSON decoder (which stops at the value's end: text and brackets after it are not the call's).
_MARKERS = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>|\[TOOL_CALLS\]\s*", re.S)


def parse_calls(text: str, tools: list[Tool]) -> list[ToolCall]:
    """The calls in `text` (either family's markers, or a bare call when the text is one), each of a
    known tool with arguments valid under its schema; what does not validate is not a call."""
    from jsonschema import Draft202012Validator

    found, position, decoder = [], 0, json.JSONDecoder()
    while match := _MARKERS.search(text, position):
        position = match.end()
        try:
            if match.group(1) is not None:
                value = json.loads(match.group(1))
            else:
                value, position = decoder.raw_decode(text, match.end())
        except json.JSONDecodeError:
            continue
        found += value if isinstance(value, list) else [value]
    if not found:
        try:
            value = json.loads(text.strip())
            found = value if isinstance(value, list) else [value]
        except json.JSONDecodeError:
            return []
    by_name = {tool.name: tool for tool in tools}
    calls = []
    for item in found:
        if not isinstance(item, dict) or item.get("name") not in by_name or not isinstance(item.get("arguments"), dict):
            continue
        validator = Draft202012Validator(json.loads(by_name[item["name"]].parameters))
        if validator.is_valid(item["arguments"]):
            calls.append(ToolCall(item["name"], json.dumps(item["arguments"], separators=(",", ":"))))
    return calls
