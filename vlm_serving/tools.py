"""Function calling: tools shown to the model in its family's conventions, calls constrained to a
tool's parameter schema, and calls parsed from the answer.

Light (no model code): the gateway validates tools and parses calls, preprocessing writes the tools
into the prompt (it knows the family), the generation step wraps the call grammar in the family's
call markers (`CALL_WRAPPERS`).

Formats: Qwen2.5-VL answers `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the Qwen2.5
tool format); Pixtral answers `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral's). Neither
tiny nor released vision checkpoint's chat template renders tools, so the tool list is written into
the system turn as those families' text templates do. One call per answer.
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
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
        if not _NAME.match(tool.name):
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
    """The messages with the tools block added to the system turn (one is added if there is none).
    The block is the service's text: callers' text never becomes the markers (see chat.prompt_ids)."""
    if not functions:
        return messages
    block = system_text(functions, family)
    if messages and messages[0].get("role") == "system":
        content = messages[0]["content"]
        text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        return [{"role": "system", "content": f"{text}\n\n{block}" if text else block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


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


_MARKERS = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>|\[TOOL_CALLS\]\s*(\[.*\]|\{.*\})", re.S)


def parse_calls(text: str, tools: list[Tool]) -> list[ToolCall]:
    """The calls in `text` (either family's markers, or a bare call when the text is one), each of a
    known tool with arguments valid under its schema; what does not validate is not a call."""
    from jsonschema import Draft202012Validator

    found = []
    for match in _MARKERS.finditer(text):
        candidate = match.group(1) or match.group(2)
        try:
            value = json.loads(candidate)
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
