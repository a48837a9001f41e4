"""A continued request (issue 29: stream migration): the engine takes the tokens another server
already delivered and goes on from there, so that the caller's joined stream equals one
uninterrupted run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.conftest import FAMILIES, picture
from tests.families import Family, ask
from tests.unit.test_engine import Caller, drive
from vlm_serving.generation.engine import InflightEngine
from vlm_serving.generation.sampling import ParameterError
from vlm_serving.generation.structured import ResponseFormat

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                      "count": {"type": "integer"}},
                     "required": ["name", "count"], "additionalProperties": False})


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints):
    return Family(request.param, checkpoints / request.param)


def streamed(family: Family, request) -> Caller:
    caller = Caller()
    drive(InflightEngine(family.generator), {0: [(caller, request)]})
    assert caller.answered_once and not caller.errors
    return caller


def continued(family: Family, request, updates: int) -> tuple[str, list[int], Caller]:
    """The first run's first `updates` responses as delivered (text, tokens), and a second engine
    continuing the request from those tokens."""
    whole = streamed(family, request)
    delivered = whole.updates[:updates]
    assert not any(update.finished for update in delivered)
    text = "".join(update.text for update in delivered)
    tokens = [token for update in delivered for token in update.token_ids]
    return text, tokens, streamed(family, replace(request, continuation=tuple(tokens)))


def check_seam(whole: Caller, text: str, tokens: list[int], rest: Caller) -> None:
    """The delivered part and the continuation join to the uninterrupted answer: text, tokens,
    finish reason and usage (completion tokens count the whole answer)."""
    assert text + "".join(update.text for update in rest.updates) == "".join(update.text for update in whole.updates)
    assert tokens + [t for update in rest.updates for t in update.token_ids] == [
        t for update in whole.updates for t in update.token_ids]
    assert rest.final.finish_reason == whole.final.finish_reason
    assert rest.final.completion_tokens == whole.final.completion_tokens
    assert rest.final.prompt_tokens == whole.final.prompt_tokens


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_greedy_continuation_equals_the_tail_of_an_uninterrupted_run(family, cut):
    request = family.request(ask("Describe the picture in detail", 1), [picture(120, 90, seed=5)],
                             max_tokens=24, stream=True, logprobs=True)
    whole = streamed(family, request)
    assert len(whole.updates) > cut + 1, "the answer streams in several deltas"
    text, tokens, rest = continued(family, request, cut)
    check_seam(whole, text, tokens, rest)
    delivered_logprobs = [entry for update in whole.updates[:cut] for entry in update.logprobs]
    assert [entry["token"] for entry in delivered_logprobs + [e for u in rest.updates for e in u.logprobs]] == [
        entry["token"] for update in whole.updates for entry in update.logprobs]


def test_a_continued_json_schema_answer_resumes_with_the_grammar_advanced(family):
    response_format = ResponseFormat("json_schema", schema=SCHEMA)
    request = family.request(ask("Give me a record"), [], max_tokens=80, stream=True, response_format=response_format)
    whole = streamed(family, request)
    answer = "".join(update.text for update in whole.updates)
    assert whole.final.finish_reason == "stop"
    json.loads(answer)
    text, tokens, rest = continued(family, request, 2)
    check_seam(whole, text, tokens, rest)
    assert text and text != answer, "cut inside the document"


def test_a_continuation_the_format_refuses_is_refused_naming_it(family):
    response_format = ResponseFormat("json_schema", schema=SCHEMA)
    request = family.request(ask("Give me a record"), [], max_tokens=40, stream=True, response_format=response_format)
    not_json = family.generator.tokenizer.encode("hello", add_special_tokens=False)
    caller = streamed_with_error(family, replace(request, continuation=tuple(not_json)))
    assert isinstance(caller.errors[0], ParameterError) and "CONTINUATION[0]" in str(caller.errors[0])


def streamed_with_error(family: Family, request) -> Caller:
    caller = Caller()
    drive(InflightEngine(family.generator), {0: [(caller, request)]})
    assert caller.answered_once and caller.errors
    return caller


def test_seeded_sampling_continues_with_the_draws_it_would_have_made(family):
    request = family.request(ask("Tell me something"), [], max_tokens=20, stream=True, temperature=0.9, seed=11)
    whole = streamed(family, request)
    text, tokens, rest = continued(family, request, 4)
    check_seam(whole, text, tokens, rest)


@pytest.mark.parametrize("problem, params, expected", [
    ("past max_tokens", dict(max_tokens=3, stream=True), "max_tokens"),
    ("not streamed", dict(max_tokens=20, stream=False), "STREAM"),
])
def test_continuations_that_cannot_continue_are_refused(family, problem, params, expected):
    request = family.request(ask("Hi"), [], **params)
    tokens = family.generator.tokenizer.encode("one two three", add_special_tokens=False)[:3]
    with pytest.raises(ParameterError, match=expected):
        InflightEngine(family.generator).submit(replace(request, continuation=tuple(tokens)), Caller().sink())


def test_continuation_tokens_outside_the_vocabulary_or_ending_the_answer_are_refused(family):
    request = family.request(ask("Hi"), [], max_tokens=20, stream=True)
    engine = InflightEngine(family.generator)
    with pytest.raises(ValueError, match=r"CONTINUATION\[1\]"):
        engine.submit(replace(request, continuation=(5, family.generator.vocab_size)), Caller().sink())
    with pytest.raises(ParameterError, match="end-of-sequence"):
        engine.submit(replace(request, continuation=(5, next(iter(family.eos)))), Caller().sink())
    assert engine.idle
