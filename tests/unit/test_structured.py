"""Constrained decoding in the in-flight engine: sampled answers always take their format."""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest

from tests.conftest import FAMILIES, picture
from tests.families import Family, ask
from tests.reference import served_size, transformers_generate
from tests.unit.test_engine import Caller, drive
from vlm_serving.generation.engine import EngineLoop, InflightEngine
from vlm_serving.generation.sampling import ParameterError
from vlm_serving.generation.scheduling import EngineLimits
from vlm_serving.generation.structured import ResponseFormat
from vlm_serving.tools import Tool

SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}},
                "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "arrays and enums": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["photo", "document", "diagram"]},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
            "flag": {"type": "boolean"},
        },
        "required": ["kind", "tags", "flag"], "additionalProperties": False,
    },
    "bounded numbers": {
        "type": "object",
        "properties": {
            "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 4096},
                    "minItems": 4, "maxItems": 4},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["box", "score"], "additionalProperties": False,
    },
    "array of objects with references": {
        "type": "array",
        "items": {"$ref": "#/$defs/item"},
        "minItems": 1,
        "maxItems": 3,
        "$defs": {"item": {"type": "object", "properties": {
            "label": {"type": "string", "minLength": 1, "maxLength": 8},
            "count": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "null"}]}},
            "required": ["label", "count"], "additionalProperties": False}},
    },
}
REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
CHOICES = ("yes", "no", "maybe not")


def formats():
    """(name, format, validator, max_tokens, least share ending with STOP)."""
    cases = [(f"json_schema: {name}", ResponseFormat("json_schema", schema=json.dumps(schema)),
              lambda text, schema=schema: jsonschema.validate(json.loads(text), schema), 96, 0.9)
             for name, schema in SCHEMAS.items()]
    # Any JSON object, from random weights: nesting is a random walk, so many run long.
    cases.append(("json_object", ResponseFormat("json_object"), lambda text: _is_object(json.loads(text)), 256, 0.2))
    cases.append(("regex", ResponseFormat("regex", pattern=REGEX), lambda text: _check(re.fullmatch(REGEX, text)), 32, 0.9))
    cases.append(("choice", ResponseFormat("choice", choices=CHOICES), lambda text: _check(text in CHOICES), 16, 0.9))
    return cases


def _is_object(value):
    assert isinstance(value, dict), value


def _check(ok):
    assert ok


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints):
    return Family(request.param, checkpoints / request.param)


@pytest.mark.parametrize("name, response_format, validate, max_tokens, least", formats(), ids=[case[0] for case in formats()])
def test_every_sampled_answer_that_stops_takes_its_format(family, name, response_format, validate, max_tokens, least):
    """50 answers sampled at temperature 1 from random weights, in one running batch: every one
    that ends with STOP validates (no exceptions); the share ending with STOP within max_tokens is
    printed (-s) and bounded below."""
    engine = InflightEngine(family.generator, EngineLimits(max_running=64, cache_tokens=1 << 20))
    callers = [Caller() for _ in range(50)]
    for seed, caller in enumerate(callers):
        request = family.request(ask("Answer in the format asked."), [], max_tokens=max_tokens, temperature=1.0, seed=seed,
                                 response_format=response_format)
        engine.submit(request, caller.sink())
    drive(engine, {})
    finals = [caller.final for caller in callers]
    stopped = [final for final in finals if final.finish_reason == "stop"]
    for final in stopped:
        validate(final.text)
    share = len(stopped) / len(finals)
    print(f"{family.name} {name}: {len(stopped)} of {len(finals)} ended with STOP ({share:.0%})")
    assert share >= least, f"only {share:.0%} ended within {max_tokens} tokens"
    assert len({final.text for final in stopped}) > 1, "sampling with different seeds gives different answers"


def test_rows_with_and_without_formats_share_a_batch_and_free_rows_stay_exact(family):
    schema = SCHEMAS["arrays and enums"]
    free = [(ask("What is in the picture?", 1), [picture(200, 120, seed=1)], 12), (ask("Hello there"), [], 10)]
    free_callers = [Caller() for _ in free]
    constrained = [Caller() for _ in range(3)]
    arrivals = {0: [(free_callers[0], family.request(free[0][0], free[0][1], max_tokens=free[0][2]))]}
    arrivals[2] = [(caller, family.request(ask("Tags?", 1), [picture(64, 64, seed=5)], max_tokens=64,
                                           temperature=1.0, seed=seed, stream=True,
                                           response_format=ResponseFormat("json_schema", schema=json.dumps(schema))))
                   for seed, caller in enumerate(constrained)]
    arrivals[4] = [(free_callers[1], family.request(free[1][0], free[1][1], max_tokens=free[1][2]))]
    drive(InflightEngine(family.generator), arrivals)
    size = served_size(family.name, family.checkpoint)
    for caller, (messages, pictures, max_tokens) in zip(free_callers, free):
        expected = family.until_eos(transformers_generate(family.name, family.checkpoint, messages, pictures, max_tokens, size))
        assert caller.final.token_ids == expected
    for caller in constrained:
        text = "".join(update.text for update in caller.updates)  # streamed deltas join to the document
        assert caller.final.finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)


def test_a_greedy_answer_cut_by_max_tokens_ends_with_length(family):
    caller = Caller()
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
              "additionalProperties": False}
    drive(InflightEngine(family.generator), {0: [(caller, family.request(
        ask("Long text"), [], max_tokens=6, response_format=ResponseFormat("json_schema", schema=json.dumps(schema))))]})
    assert caller.final.finish_reason == "length" and caller.final.completion_tokens == 6
    assert caller.final.text.startswith('{"te'), "the grammar leads"
    with pytest.raises(json.JSONDecodeError):  # incomplete, as the docs say
        json.loads(caller.final.text)


@pytest.mark.parametrize("response_format, message", [
    (ResponseFormat("json_schema", schema="{not json"), "the schema is not JSON"),
    (ResponseFormat("json_schema", schema='{"type": "objekt"}'), "not a valid JSON Schema at type"),
    (ResponseFormat("json_schema", schema='{"not": {"type": "string"}}'), "#/not is not supported"),
    (ResponseFormat("json_schema", schema='{"$ref": "http://example.com/s.json"}'), "refers outside the schema"),
    (ResponseFormat("regex", pattern="(?<=a)b"), "Lookbehind is not supported"),
    (ResponseFormat("regex", pattern="[a-z"), "regex: not supported"),
    (ResponseFormat("choice", choices=()), "give 1 to 64 choices"),
    (ResponseFormat("choice", choices=("a", "a")), "the choices repeat"),
])
def test_a_bad_format_is_refused_before_any_generation_naming_the_problem(family, response_format, message):
    """Broken rules are refused at submission; what only the grammar engine finds (it compiles off
    the caller's thread) is the request's one answer, before it takes a row."""
    engine = InflightEngine(family.generator)
    caller = Caller()
    try:
        engine.submit(family.request(ask("hi"), [], response_format=response_format), caller.sink())
    except ParameterError as exc:
        error = exc
    else:
        drive(engine, {})
        assert not caller.updates and len(caller.errors) == 1
        error = caller.errors[0]
    assert isinstance(error, ParameterError) and message in str(error)
    assert engine.idle and engine.stats.prefill_tokens == 0


def test_compiled_formats_are_cached_by_their_canonical_form_within_a_byte_bound(family):
    from vlm_serving.generation.grammar import FormatCompiler

    compiler = FormatCompiler.for_tokenizer(family.generator.tokenizer, family.generator.model.config.get_text_config().vocab_size,
                                            family.generator.eos_ids)
    first = compiler.compile(ResponseFormat("json_schema", schema=json.dumps(SCHEMAS["nested objects"], sort_keys=True)))
    assert compiler.compile(ResponseFormat("json_schema", schema=json.dumps(SCHEMAS["nested objects"], sort_keys=True))) is first
    nested = ResponseFormat("json_schema", schema=json.dumps(SCHEMAS["nested objects"], sort_keys=True)).to_wire()
    compiler.cache_bytes = compiler.cached_bytes + 1  # room for this grammar only
    for name in ("arrays and enums", "bounded numbers", "array of objects with references"):
        compiler.compile(ResponseFormat("json_schema", schema=json.dumps(SCHEMAS[name], sort_keys=True)))
        assert compiler.cached_bytes <= compiler.cache_bytes or len(compiler.cache) == 1
    assert nested not in compiler.cache, "the least recently used grammar was evicted"
    assert compiler.cached_bytes == sum(grammar.memory_size_bytes for grammar in compiler.cache.values())


class HeldCompiler:
    """The engine's real compiler with each compile held until `release` (a real vocabulary's
    compile takes seconds), counting the compiles."""

    def __init__(self, family: Family):
        from vlm_serving.generation.grammar import FormatCompiler

        self.compiler = FormatCompiler.for_tokenizer(family.generator.tokenizer,
                                                     family.generator.model.config.get_text_config().vocab_size,
                                                     family.generator.eos_ids)
        self.release = threading.Event()
        self.compiles = 0
        compile_now = self.compiler._compile

        def held(response_format):
            self.compiles += 1
            assert self.release.wait(timeout=60)
            return compile_now(response_format)

        self.compiler._compile = held


def test_a_compiling_format_holds_only_its_own_row_and_is_compiled_once(family):
    engine = InflightEngine(family.generator)
    held = HeldCompiler(family)
    engine.formats = held.compiler
    schema = ResponseFormat("json_schema", schema=json.dumps(SCHEMAS["arrays and enums"]))
    constrained = [Caller() for _ in range(2)]
    submitted = threading.Event()

    def submit_constrained():
        for seed, caller in enumerate(constrained):
            engine.submit(family.request(ask("Tags?"), [], max_tokens=64, temperature=1.0, seed=seed,
                                         response_format=schema), caller.sink())
        submitted.set()

    threading.Thread(target=submit_constrained, daemon=True).start()
    assert submitted.wait(timeout=10), "submission (Triton's execute thread) waited for the compile"
    free = Caller()
    engine.submit(family.request(ask("Hello there"), [], max_tokens=10), free.sink())
    for _ in range(200):
        if free.done:
            break
        engine.step()
    assert free.done and not free.errors, "the free request was served while the format compiled"
    assert not any(caller.updates or caller.errors for caller in constrained) and engine.stats.waiting == 2
    assert not engine.step(), "with only compiling rows left the loop has nothing to do (it sleeps)"
    held.release.set()
    drive(engine, {})
    assert held.compiles == 1, "the same format asked for twice while compiling is compiled once"
    for caller in constrained:
        assert caller.final.finish_reason == "stop"
        jsonschema.validate(json.loads(caller.final.text), SCHEMAS["arrays and enums"])


def test_the_loop_wakes_when_a_format_is_compiled(family):
    engine = InflightEngine(family.generator)
    held = HeldCompiler(family)
    engine.formats = held.compiler
    loop = EngineLoop(engine).start()
    try:
        caller = Caller()
        engine.submit(family.request(ask("Tags?"), [], max_tokens=64, response_format=ResponseFormat(
            "json_schema", schema=json.dumps(SCHEMAS["bounded numbers"]))), caller.sink())
        time.sleep(1.5)  # the loop has gone to sleep (it waits up to 1 s at a time when idle)
        released = time.monotonic()
        held.release.set()
        deadline = released + 30
        while not caller.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert caller.done and not caller.errors
        print(f"answered {time.monotonic() - released:.3f} s after the compile ended")
    finally:
        loop.stop(grace_s=0, reason=RuntimeError("test over"))


def test_masks_are_filled_on_another_thread_while_the_forward_runs(family):
    """Each forward of a constrained row waits (up to 5 s) for its step's masks to be filled: they
    can only be ready by then if the fill began before the forward and runs beside it."""
    from vlm_serving.generation.grammar import MaskFiller

    engine = InflightEngine(family.generator)
    filled, fill_threads, seen = threading.Event(), set(), []

    class SignallingFiller(MaskFiller):
        def fill(self, *args):
            masks = super().fill(*args)
            fill_threads.add(threading.get_ident())
            filled.set()
            return masks

    class ForwardBesideTheFill:
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def __call__(self, *args, **kwargs):
            out = self.model(*args, **kwargs)
            seen.append(filled.wait(timeout=5))
            filled.clear()
            return out

    engine.masks = SignallingFiller(engine.vocab_size)
    engine.model = ForwardBesideTheFill(engine.model)
    caller = Caller()
    drive(engine, {0: [(caller, family.request(ask("Tags?"), [], max_tokens=64, response_format=ResponseFormat(
        "json_schema", schema=json.dumps(SCHEMAS["arrays and enums"]))))]})
    jsonschema.validate(json.loads(caller.final.text), SCHEMAS["arrays and enums"])
    assert seen and all(seen), f"masks ready during {sum(seen)} of {len(seen)} forwards"
    assert threading.get_ident() not in fill_threads


WEATHER = Tool("get_weather", "The weather at a place", json.dumps({
    "type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}))
ZOOM = Tool("zoom", "Zoom into a region", json.dumps({
    "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                                             "minItems": 4, "maxItems": 4}},
    "required": ["box"], "additionalProperties": False}))


@pytest.mark.parametrize("choice, named", [("required", ""), ("named", "zoom")])
def test_every_sampled_tool_call_parses_and_its_arguments_validate(family, choice, named):
    from vlm_serving import tools

    tool_list = [WEATHER, ZOOM]
    engine = InflightEngine(family.generator, EngineLimits(max_running=64, cache_tokens=1 << 20))
    callers = [Caller() for _ in range(50)]
    for seed, caller in enumerate(callers):
        engine.submit(family.request(ask("Use a tool."), [], max_tokens=160, temperature=1.0, seed=seed,
                                     response_format=tools.call_format(tool_list, choice, named)), caller.sink())
    drive(engine, {})
    stopped = [caller.final for caller in callers if caller.final.finish_reason == "stop"]
    wrapper = tools.CALL_WRAPPERS[family.name]
    for final in stopped:
        assert final.text.startswith(wrapper[0]) and final.text.endswith(wrapper[1]), final.text
        [call] = tools.parse_calls(final.text, tool_list)
        schema = json.loads({tool.name: tool for tool in tool_list}[call.name].parameters)
        jsonschema.validate(json.loads(call.arguments), schema)
        assert choice != "named" or call.name == named
    print(f"{family.name} tool_choice {choice}: {len(stopped)} of 50 ended with STOP")
    assert len(stopped) >= 45
    assert choice == "named" or {tools.parse_calls(f.text, tool_list)[0].name for f in stopped} == {"get_weather", "zoom"}
