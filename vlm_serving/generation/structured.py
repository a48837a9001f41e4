"""What shape an answer must take (`ResponseFormat`), and the checks any process can run on it.

Light on purpose: the gateway validates formats with it before a request reaches Triton; the
generation step compiles them into token masks (`grammar.py`, xgrammar).

On the wire (the RESPONSE_FORMAT tensor, `SamplingParams.response_format`) a format is compact
JSON: {"type": "json_schema", "schema": {...}}, {"type": "json_object"}, {"type": "regex",
"pattern": "..."}, {"type": "choice", "choices": [...]}; free text is the empty string.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

TEXT, JSON_OBJECT, JSON_SCHEMA, REGEX, CHOICE = "text", "json_object", "json_schema", "regex", "choice"
# A function call (vlm_serving/tools.py): JSON valid under `schema`, inside the family's call markers.
TOOL_CALL = "tool_call"
FORMAT_TYPES = (TEXT, JSON_OBJECT, JSON_SCHEMA, REGEX, CHOICE, TOOL_CALL)

MAX_SCHEMA_BYTES = 64 * 1024
# The JSON Schema keywords the grammar enforces (xgrammar 0.2.8; each covered by the sampled tests).
# Others are refused rather than silently ignored: an answer must always validate against its schema.
ENFORCED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern",
})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment"})
MAX_PATTERN_CHARS = 1024
MAX_CHOICES = 64
MAX_CHOICE_CHARS = 256


@dataclass(frozen=True)
class ResponseFormat:
    type: str = TEXT
    # JSON_SCHEMA: the schema as compact JSON text.
    schema: str = ""
    # REGEX: the pattern the whole answer must match.
    pattern: str = ""
    # CHOICE: the answer is exactly one of these.
    choices: tuple[str, ...] = ()

    @property
    def constrained(self) -> bool:
        return self.type != TEXT

    def to_wire(self) -> str:
        """Compact JSON for the RESPONSE_FORMAT tensor ("" for free text)."""
        if not self.constrained:
            return ""
        value: dict = {"type": self.type}
        if self.type in (JSON_SCHEMA, TOOL_CALL):
            value["schema"] = json.loads(self.schema)
        elif self.type == REGEX:
            value["pattern"] = self.pattern
        elif self.type == CHOICE:
            value["choices"] = list(self.choices)
        return json.dumps(value, separators=(",", ":"))

    @classmethod
    def from_wire(cls, text: str) -> "ResponseFormat":
        """The inverse of `to_wire`; raises ValueError naming what is wrong."""
        if not text:
            return cls()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"response_format is not JSON ({exc})") from None
        if not isinstance(value, dict) or value.get("type") not in FORMAT_TYPES:
            raise ValueError(f"response_format type must be one of {', '.join(FORMAT_TYPES)}")
        schema = value.get("schema")
        return cls(
            type=value["type"],
            schema="" if schema is None else json.dumps(schema, separators=(",", ":")),
            pattern=str(value.get("pattern", "")),
            choices=tuple(str(choice) for choice in value.get("choices", ())),
        )

    def violations(self) -> list[str]:
        """What is wrong with the format itself, before any model sees it (empty: nothing)."""
        if self.type not in FORMAT_TYPES:
            return [f"type must be one of {', '.join(FORMAT_TYPES)}"]
        if self.type in (JSON_SCHEMA, TOOL_CALL):
            return schema_violations(self.schema)
        if self.type == REGEX:
            if not self.pattern:
                return ["regex: the pattern is empty"]
            if len(self.pattern) > MAX_PATTERN_CHARS:
                return [f"regex: the pattern has {len(self.pattern)} characters, over the limit of {MAX_PATTERN_CHARS}"]
        if self.type == CHOICE:
            if not 1 <= len(self.choices) <= MAX_CHOICES:
                return [f"choice: give 1 to {MAX_CHOICES} choices (got {len(self.choices)})"]
            if not all(0 < len(choice) <= MAX_CHOICE_CHARS for choice in self.choices):
                return [f"choice: each choice must be 1 to {MAX_CHOICE_CHARS} characters"]
            if len(set(self.choices)) != len(self.choices):
                return ["choice: the choices repeat"]
        return []


@functools.lru_cache(maxsize=256)
def _schema_problems(schema_text: str) -> tuple[str, ...]:
    return tuple(_check_schema(schema_text))


def schema_violations(schema_text: str) -> list[str]:
    """Why `schema_text` is not a usable JSON Schema (draft 2020-12), or nothing. Cached by the
    text: checking a schema costs milliseconds, and callers send the same few schemas again and again."""
    return list(_schema_problems(schema_text))


def _check_schema(schema_text: str) -> list[str]:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not schema_text:
        return ["json_schema: the schema is empty"]
    if len(schema_text.encode()) > MAX_SCHEMA_BYTES:
        return [f"json_schema: the schema has {len(schema_text.encode())} bytes, over the limit of {MAX_SCHEMA_BYTES}"]
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as exc:
        return [f"json_schema: the schema is not JSON ({exc})"]
    if not isinstance(schema, dict):
        return ["json_schema: the schema must be a JSON object"]
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path) or "the top level"
        return [f"json_schema: not a valid JSON Schema at {where}: {exc.message}"]
    return _unenforced(schema, "#")


def _unenforced(schema, where: str) -> list[str]:
    """Keywords the grammar would not enforce, and references outside the schema, with where."""
    if isinstance(schema, bool):
        return []
    problems = []
    for key, value in schema.items():
        at = f"{where}/{key}"
        if key == "$ref" and not str(value).startswith("#"):
            problems.append(f"json_schema: {at} refers outside the schema ({value!r}); only local references "
                            "(#/$defs/...) are followed")
        elif key not in ENFORCED_KEYWORDS | ANNOTATIONS:
            problems.append(f"json_schema: {at} is not supported (enforced keywords: {', '.join(sorted(ENFORCED_KEYWORDS))})")
        elif key in ("properties", "$defs", "definitions"):
            for name, sub in value.items():
                problems += _unenforced(sub, f"{at}/{name}")
        elif key in ("items", "additionalProperties") and isinstance(value, (dict, bool)):
            problems += _unenforced(value, at)
        elif key in ("prefixItems", "anyOf"):
            for index, sub in enumerate(value):
                problems += _unenforced(sub, f"{at}/{index}")
    return problems
