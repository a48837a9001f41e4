"""The in-flight engine against plain transformers `generate`, one request alone each time."""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

from tests.conftest import FAMILIES, picture
from tests.families import ENDING_PROMPTS, Family, ask, joined_text
from tests.reference import (
    grammar_greedy, openai_penalized_greedy, served_size, transformers_generate, transformers_logprobs,
)
from vlm_serving.generation.batch import BatchGenerator, GenerationRequest
from vlm_serving.generation.engine import EngineFull, EngineLimits, EngineLoop, InflightEngine, OutOfMemory, RequestSink
from vlm_serving.generation.sampling import ParameterError, SamplingParams
from vlm_serving.generation.structured import ResponseFormat


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints):
    return Family(request.param, checkpoints / request.param)


@dataclass
class Caller:
    """One request's side: what it received, in order, and whether it has gone away."""

    updates: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    cancelled: bool = False
    # "update", "final" or "error" per response, in the order they came.
    received: list = field(default_factory=list)

    def sink(self) -> RequestSink:
        def update(update):
            self.received.append("final" if update.finished else "update")
            self.updates.append(update)

        def error(exc):
            self.received.append("error")
            self.errors.append(exc)

        return RequestSink(update, error, lambda: self.cancelled)

    @property
    def answered_once(self) -> bool:
        """Exactly one final response (an update that ends the request, or an error), and it came last."""
        ends = [kind for kind in self.received if kind != "update"]
        return len(ends) == 1 and self.received[-1] == ends[0]

    @property
    def final(self):
        assert self.updates and self.updates[-1].finished and not self.errors
        assert not any(update.finished for update in self.updates[:-1])
        return self.updates[-1]

    @property
    def done(self) -> bool:
        return bool(self.errors) or bool(self.updates and self.updates[-1].finished)


def drive(engine: InflightEngine, arrivals: dict[int, list], check=lambda engine: None, limit: int = 5000) -> int:
    """Step the engine, submitting each (caller, request) at its step number; the steps taken."""
    step = submitted = 0
    while (arrivals and step <= max(arrivals)) or not engine.idle:
        for caller, request in arrivals.get(step, []) if step == submitted else []:
            engine.submit(request, caller.sink())
        submitted = step + 1
        if not engine.step() and not engine.idle:  # the waiting rows' grammars are compiling
            assert engine.wakeup.wait(timeout=60), "a grammar never finished compiling"
            engine.wakeup.clear()
            continue
        check(engine)
        step += 1
        assert step < limit
    return step


def reference(family: Family, messages, pictures, max_tokens: int) -> list[int]:
    size = served_size(family.name, family.checkpoint)
    return family.until_eos(transformers_generate(family.name, family.checkpoint, messages, pictures, max_tokens, size))


CASES = [
    (ask("What is in the picture?", 1), [picture(200, 120, seed=1)], 14),
    (ask("Hello there, no picture at all in this rather longer prompt of many words"), [], 20),
    (ask("Describe it.", 1), [picture(64, 64, seed=2)], 6),
    (ask("Compare these two images", 2), [picture(90, 140, seed=3), picture(120, 40, seed=4)], 17),
    (ask("Hi"), [], 9),
]


@pytest.mark.parametrize("chunk", [512, 24])
def test_staggered_greedy_requests_equal_plain_generate_alone(family, chunk):
    """Requests join while others run (steps 0, 0, 3, 5, 11) and leave at different lengths; a
    24-token chunk makes the prompts with images prefill over several steps beside running rows."""
    engine = InflightEngine(family.generator, EngineLimits(prefill_chunk_tokens=chunk))
    callers = [Caller() for _ in CASES]
    steps = (0, 0, 3, 5, 11)
    arrivals: dict[int, list] = {}
    for caller, step, (messages, pictures, max_tokens) in zip(callers, steps, CASES):
        arrivals.setdefault(step, []).append((caller, family.request(messages, pictures, max_tokens=max_tokens)))
    running = []
    drive(engine, arrivals, check=lambda engine: running.append(engine.stats.running))
    assert max(running) >= 3, "requests that arrived later joined the rows already running"
    served = []
    for caller, (messages, pictures, max_tokens) in zip(callers, CASES):
        assert caller.final.token_ids == reference(family, messages, pictures, max_tokens)
        served.append(tuple(caller.final.token_ids))
    assert len(set(served)) == len(served), "different inputs must give different tokens"


def test_stop_sequences_and_max_tokens_per_row_in_one_running_batch(family):
    messages = ask("Tell me a story")
    full = Caller()
    drive(InflightEngine(family.generator), {0: [(full, family.request(messages, [], max_tokens=24))]})
    text = full.final.text
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stopped, short, streamed = Caller(), Caller(), Caller()
    drive(InflightEngine(family.generator), {
        0: [(stopped, family.request(messages, [], max_tokens=24, stop=(stop,)))],
        1: [(short, family.request(messages, [], max_tokens=3)),
            (streamed, family.request(messages, [], max_tokens=24, stream=True))],
    })
    assert stopped.final.finish_reason == "stop" and stopped.final.text == text[: text.index(stop)]
    assert short.final.finish_reason == "length" and short.final.completion_tokens == 3
    assert len(streamed.updates) > 1 and "".join(u.text for u in streamed.updates) == text


def test_seeded_sampling_repeats_beside_greedy_rows(family):
    pictures, messages = [picture(100, 100, seed=9)], ask("Sample something", 1)
    sampled = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=100)
    runs = []
    for seed, stagger in ((1, 0), (1, 4), (2, 0)):
        sampler, greedy = Caller(), Caller()
        arrivals = {0: [(greedy, family.request(messages, pictures, max_tokens=16))]}
        arrivals.setdefault(stagger, []).append((sampler, family.request(messages, pictures, seed=seed, **sampled)))
        drive(InflightEngine(family.generator), arrivals)
        runs.append((sampler.final.token_ids, greedy.final.token_ids))
    assert runs[0][0] == runs[1][0], "a seed repeats its sample wherever in the batch the row runs"
    assert runs[0][0] != runs[2][0]
    assert runs[0][1] == runs[1][1] == runs[2][1] == reference(family, messages, pictures, 16)


def test_repetition_penalty_and_confidence_match_transformers(family):
    """Both rows in one running batch (the second joins at step 2); the references are transformers'
    own `generate` with `repetition_penalty` and the model's own log-probabilities."""
    penalized_request = family.request(ask("Repeat repeat repeat"), [], max_tokens=16, repetition_penalty=1.5)
    confident_request = family.request(ask("How confident are you?"), [], max_tokens=8)
    callers = [Caller(), Caller()]
    drive(InflightEngine(family.generator), {0: [(callers[0], penalized_request)], 2: [(callers[1], confident_request)]})
    ids = torch.from_numpy(penalized_request.input_ids)[None]
    with torch.inference_mode():
        out = family.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                    do_sample=False, repetition_penalty=1.5)
    assert callers[0].final.token_ids == family.until_eos(out[0, ids.shape[1] :].tolist())
    final = callers[1].final
    sequence = torch.tensor([confident_request.input_ids.tolist() + final.token_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(family.model(input_ids=sequence).logits[0].float(), dim=-1)
    start = len(confident_request.input_ids) - 1
    chosen = [logprobs[start + i, token].item() for i, token in enumerate(final.token_ids)]
    assert final.confidence == pytest.approx(sum(chosen) / len(chosen), abs=1e-4) and final.confidence < 0


def test_a_short_request_finishes_long_before_a_long_one_that_started_first(family):
    """Asserting order, not time: the long request is mid-way when the short one arrives. (The tiny
    Pixtral ends every greedy answer with its end token within about a thousand tokens: of 90 prompts
    tried, "answer list" ran longest.)"""
    prompt = "a very long answer" if family.name == "qwen2_5_vl" else "answer list"
    order = []
    long, short = Caller(), Caller()
    drive(InflightEngine(family.generator), {
        0: [(long, family.request(ask(prompt), [], max_tokens=2000))],
        20: [(short, family.request(ask("short", 1), [picture(64, 64)], max_tokens=5))],
    }, check=lambda engine: order.extend(name for name, c in (("long", long), ("short", short))
                                          if c.done and name not in order))
    assert order == ["short", "long"]
    assert short.final.completion_tokens == 5 and long.final.completion_tokens > 1000


def test_a_cancelled_row_frees_its_slot_for_a_waiting_request_at_the_next_step(family):
    engine = InflightEngine(family.generator, EngineLimits(max_running=1))
    running, waiting = Caller(), Caller()
    engine.submit(family.request(ask("keep going"), [], max_tokens=200), running.sink())
    engine.submit(family.request(ask("waiting"), [], max_tokens=4), waiting.sink())
    for _ in range(5):  # one forward per step: the first prefills (choosing a token), each later one decodes one
        engine.step()
    assert engine.stats.running == 1 and engine.stats.waiting == 1
    running.cancelled = True
    engine.step()
    assert running.final.finish_reason == "cancelled" and running.final.completion_tokens == 5
    assert engine.stats.waiting == 0 and engine.stats.running == 1, "the waiting request took the freed row"
    drive(engine, {})
    assert waiting.final.completion_tokens == 4


def test_callers_that_leave_while_waiting_or_prefilling_end_cancelled_and_nothing_follows(family):
    engine = InflightEngine(family.generator, EngineLimits(max_running=1, prefill_chunk_tokens=8))
    prefilling, waiting, after = Caller(), Caller(), Caller()
    engine.submit(family.request(ask("a prompt long enough for several chunks", 1), [picture(64, 64)],
                                 max_tokens=50, stream=True), prefilling.sink())
    engine.submit(family.request(ask("waiting"), [], max_tokens=50, stream=True), waiting.sink())
    engine.step()
    assert engine.stats.prefilling == 1 and engine.stats.waiting == 1
    prefilling.cancelled = waiting.cancelled = True
    engine.submit(family.request(ask("after"), [], max_tokens=3), after.sink())
    drive(engine, {})
    for caller in (prefilling, waiting):
        assert caller.final.finish_reason == "cancelled" and caller.final.completion_tokens == 0
        assert len(caller.updates) == 1
    assert after.final.completion_tokens == 3


def test_the_cache_budget_is_never_exceeded_and_queue_overflow_is_refused(family):
    requests = [family.request(ask("question " * n, n % 2), [picture(64, 64)] if n % 2 else [], max_tokens=10 + 7 * n)
                for n in range(6)]
    reserves = [len(r.input_ids) + r.params.max_tokens for r in requests]
    # Admission counts what rows need now (prompts, shared prefixes once): a budget of the longest
    # row's whole life twice (whole blocks), less than the six rows need together.
    budget = -(-2 * max(reserves) // 16) * 16
    assert budget < sum(reserves)
    engine = InflightEngine(family.generator, EngineLimits(max_running=8, cache_tokens=budget, max_waiting=6))
    callers = [Caller() for _ in requests]
    for caller, request in zip(callers, requests):
        engine.submit(request, caller.sink())
    with pytest.raises(EngineFull, match="Exceeds maximum queue size"):
        engine.submit(family.request(ask("one too many"), [], max_tokens=4), Caller().sink())
    peaks = []
    drive(engine, {}, check=lambda engine: peaks.append((engine.stats.cache_tokens_used, engine.stats.running)))
    assert all(c.final.completion_tokens > 0 for c in callers)
    assert max(used for used, _ in peaks) <= budget
    assert engine.stats.peak_cache_tokens <= budget
    assert 1 < max(running for _, running in peaks) < len(requests), "the budget, not max_running, limited the batch"


def test_a_request_that_can_never_fit_is_refused_naming_the_limit(family):
    engine = InflightEngine(family.generator, EngineLimits(cache_tokens=100))
    with pytest.raises(ParameterError, match="key/value-cache budget of 100 tokens"):
        engine.submit(family.request(ask("hello"), [], max_tokens=100), Caller().sink())


def test_a_caller_whose_sends_fail_ends_alone(family):
    engine = InflightEngine(family.generator)
    broken, fine = Caller(), Caller()
    sink = broken.sink()

    def send(update):
        raise ConnectionError("gone")

    sink.send_update = send
    engine.submit(family.request(ask("one"), [], max_tokens=8, stream=True), sink)
    engine.submit(family.request(ask("two"), [], max_tokens=8), fine.sink())
    drive(engine, {})
    assert isinstance(broken.errors[0], ConnectionError) and fine.final.completion_tokens == 8


def test_the_loop_thread_serves_concurrent_submitters_and_stops_cleanly(family):
    engine = InflightEngine(family.generator)
    loop = EngineLoop(engine).start()
    requests = [family.request(ask(f"question {i}"), [], max_tokens=5 + i) for i in range(6)]
    alone = [updates[-1].token_ids for updates in family.run(requests)]
    callers = [Caller() for _ in requests]
    threads = [threading.Thread(target=engine.submit, args=(request, caller.sink()))
               for request, caller in zip(requests, callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    left = Caller()
    loop.stop(grace_s=30, reason=RuntimeError("unused"))
    assert [caller.final.token_ids for caller in callers] == alone
    engine.submit(family.request(ask("late"), [], max_tokens=4), left.sink())
    engine.fail_all(RuntimeError("the model is unloading"))
    assert "unloading" in str(left.errors[0])


def test_logprobs_are_the_models_own_with_sorted_alternatives_and_cost_nothing_unasked(family):
    """Against transformers' own forward over the processor's tensors (image included), with a
    row that asks nothing running beside it."""
    messages, pictures = ask("What is in the picture?", 1), [picture(200, 120, seed=1)]
    asking, plain = Caller(), Caller()
    drive(InflightEngine(family.generator), {
        0: [(asking, family.request(messages, pictures, max_tokens=10, logprobs=True, top_logprobs=5))],
        2: [(plain, family.request(ask("Hello there"), [], max_tokens=10, stream=True))],
    })
    final = asking.final
    assert len(final.logprobs) == len(final.token_ids) == 10
    expected = transformers_logprobs(family.name, family.checkpoint, messages, pictures, final.token_ids,
                                     served_size(family.name, family.checkpoint))
    for position, (token, entry) in enumerate(zip(final.token_ids, final.logprobs)):
        data = family.generator.token_bytes(token)
        assert (entry["token"], entry["bytes"]) == (data.decode("utf-8", errors="replace"), list(data))
        assert entry["logprob"] == pytest.approx(expected[position, token].item(), abs=1e-4)
        top = entry["top_logprobs"]
        values = [alternative["logprob"] for alternative in top]
        assert values == sorted(values, reverse=True) and len(top) == 5
        assert values == pytest.approx(expected[position].topk(5).values.tolist(), abs=1e-4)
        assert top[0]["bytes"] == entry["bytes"] and top[0]["logprob"] == entry["logprob"], "greedy chose the likeliest"
    assert joined_text(final.logprobs) == final.text
    assert plain.updates and all(update.logprobs == [] for update in plain.updates)


def test_streamed_logprobs_join_to_the_whole_answers_and_the_end_token_has_none(family):
    request = dict(max_tokens=40, logprobs=True, top_logprobs=2)
    whole, streamed = Caller(), Caller()
    drive(InflightEngine(family.generator), {0: [(whole, family.request(ask(ENDING_PROMPTS[family.name]), [], **request))],
                                             1: [(streamed, family.request(ask(ENDING_PROMPTS[family.name]), [],
                                                                           stream=True, **request))]})
    final = whole.final
    assert final.finish_reason == "stop" and final.completion_tokens == len(final.token_ids) + 1
    assert len(final.logprobs) == len(final.token_ids) and joined_text(final.logprobs) == final.text
    assert len(streamed.updates) > 1
    assert all(len(update.logprobs) == len(update.token_ids) for update in streamed.updates)
    joined = [entry for update in streamed.updates for entry in update.logprobs]
    assert [(e["bytes"], [t["bytes"] for t in e["top_logprobs"]]) for e in joined] == \
        [(e["bytes"], [t["bytes"] for t in e["top_logprobs"]]) for e in final.logprobs]
    assert [e["logprob"] for e in joined] == pytest.approx([e["logprob"] for e in final.logprobs], abs=1e-5)


def test_a_stop_sequence_cuts_the_text_and_keeps_the_generated_tokens_logprobs(family):
    messages = ask("Tell me a story")
    full = Caller()
    drive(InflightEngine(family.generator), {0: [(full, family.request(messages, [], max_tokens=24))]})
    text = full.final.text
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stopped = Caller()
    drive(InflightEngine(family.generator), {0: [(stopped, family.request(messages, [], max_tokens=24, stop=(stop,),
                                                                          logprobs=True))]})
    final = stopped.final
    assert final.finish_reason == "stop" and final.text == text[: text.index(stop)]
    assert len(final.logprobs) == len(final.token_ids) == final.completion_tokens
    assert joined_text(final.logprobs).startswith(final.text + stop)
    assert all(entry["top_logprobs"] == [] for entry in final.logprobs)


PENALTIES = [(1.5, 0.5), (0.0, 2.0), (-1.0, -0.5)]


def test_presence_and_frequency_penalties_follow_openais_formula(family):
    """Three penalized rows and an unpenalized one in one running batch (joining at steps 0-3); the
    unpenalized answer repeats a token within 20 tokens."""
    messages = ask("What is in the picture?")
    callers = [Caller() for _ in range(len(PENALTIES) + 1)]
    requests = [family.request(messages, [], max_tokens=20, presence_penalty=presence, frequency_penalty=frequency)
                for presence, frequency in PENALTIES] + [family.request(messages, [], max_tokens=20)]
    drive(InflightEngine(family.generator), {step: [(caller, request)]
                                             for step, (caller, request) in enumerate(zip(callers, requests))})
    prompt = requests[0].input_ids.tolist()
    plain = callers[-1].final.token_ids
    assert plain == openai_penalized_greedy(family.model, family.eos, prompt, 20, 0.0, 0.0) and len(set(plain)) < len(plain)
    for caller, (presence, frequency) in zip(callers, PENALTIES):
        assert caller.final.token_ids == openai_penalized_greedy(family.model, family.eos, prompt, 20, presence, frequency)
    assert callers[0].final.token_ids != plain and callers[1].final.token_ids != plain, "the penalties changed the answer"


def test_an_unset_max_tokens_runs_to_the_limit_the_context_or_the_cache_budget(family):
    messages = ask("Tell me a story")
    prompt = len(family.request(messages, []).input_ids)
    limited = BatchGenerator(family.name, family.model, family.generator.tokenizer, max_tokens_limit=7)
    small_context = BatchGenerator(family.name, family.model, family.generator.tokenizer)
    small_context.max_context = prompt + 5
    for generator, limits, expected in ((limited, EngineLimits(), 7), (small_context, EngineLimits(), 5),
                                        (family.generator, EngineLimits(cache_tokens=prompt + 6), 6)):
        caller = Caller()
        drive(InflightEngine(generator, limits), {0: [(caller, family.request(messages, []))]})
        assert (caller.final.finish_reason, caller.final.completion_tokens) == ("length", expected)
    with pytest.raises(ParameterError, match=f"the prompt's {prompt} tokens leave no room for an answer within {prompt}"):
        InflightEngine(family.generator, EngineLimits(cache_tokens=prompt)).submit(family.request(messages, []), Caller().sink())


def test_requests_without_max_tokens_still_fill_every_row_of_the_cpu_profile(family):
    """An unset max_tokens reserves the whole context per row (4,096 tokens on the tiny checkpoints,
    prompt included): the CPU profile's 65,536-token budget admits 16 such rows, its max_running."""
    from vlm_serving.deploy.render import PROFILES

    limits = PROFILES["cpu"].engine
    engine = InflightEngine(family.generator, limits)
    callers = [Caller() for _ in range(limits.max_running + 1)]
    for n, caller in enumerate(callers):
        engine.submit(family.request(ask(f"question {n}"), []), caller.sink())
    engine.step()
    stats = engine.stats  # rows that ended with their first token (an end token) count as admitted
    assert (stats.running + stats.prefilling + stats.finished, stats.waiting) == (limits.max_running, 1)
    for caller in callers:
        caller.cancelled = True
    drive(engine, {})


# ----- one request never fails another (issue 24) -----


def malformed(family: Family) -> list[tuple[str, GenerationRequest, str]]:
    """(what is wrong, a request with that fault and nothing else, what its error says)."""
    good = family.request(ask("What is in the picture?", 1), [picture(200, 120, seed=1)], max_tokens=8)
    vocab = family.generator.vocab_size

    def with_id(value):
        ids = good.input_ids.copy()
        ids[2] = value
        return replace(good, input_ids=ids)

    cases = [
        ("a token id past the vocabulary", with_id(vocab), f"INPUT_IDS[2] = {vocab} is outside this model's vocabulary"),
        ("a negative token id", with_id(-1), "INPUT_IDS[2] = -1 is outside"),
        ("ids that are not integers", replace(good, input_ids=good.input_ids.astype(np.float32)),
         "INPUT_IDS must be one row of integer token ids, got float32"),
        ("an empty prompt", replace(good, input_ids=good.input_ids[:0], image_embeds=None), "INPUT_IDS is empty"),
        ("image rows of another width", replace(good, image_embeds=good.image_embeds[:, :-1]),
         f"IMAGE_EMBEDS rows are {family.generator.hidden_size - 1} wide"),
        ("one image row too few", replace(good, image_embeds=good.image_embeds[1:]), "image token(s) but"),
        ("max_tokens 0", replace(good, params=SamplingParams(max_tokens=0)), "max_tokens=0 must be in [1, "),
    ]
    if family.generator.marks_modalities:
        grid = good.language_tensors["image_grid_thw"]
        wider = grid.copy()
        wider[0, 2] += 2
        t, h, w = grid[0].tolist()
        cases += [
            ("a grid that makes more image tokens than the prompt holds", replace(good, language_tensors={"image_grid_thw": wider}),
             f"IMAGE_GRID_THW[0] = {[t, h, w + 2]} makes {t * h * (w + 2) // 4} image tokens but image 0 of the prompt "
             f"has {good.image_tokens}"),
            ("a grid of two images for one", replace(good, language_tensors={"image_grid_thw": np.concatenate([grid, grid])}),
             "IMAGE_GRID_THW describes 2 image(s) but the prompt holds 1 run(s) of image tokens"),
            ("no grid", replace(good, language_tensors={}), "IMAGE_GRID_THW describes 0 image(s)"),
            ("a grid of odd patches", replace(good, language_tensors={"image_grid_thw": np.array([[1, h - 1, w]])}),
             "is not a grid of patches"),
        ]
    return cases


def test_malformed_requests_are_refused_at_submission_and_the_running_rows_finish(family):
    """Each one is submitted while two rows run (one with an image): its submitter gets the error,
    and the running rows still give transformers' own tokens."""
    engine = InflightEngine(family.generator)
    running = [Caller() for _ in CASES[:2]]
    for caller, (messages, pictures, max_tokens) in zip(running, CASES[:2]):
        engine.submit(family.request(messages, pictures, max_tokens=max_tokens), caller.sink())
    for _ in range(3):
        engine.step()
    assert engine.stats.running == 2
    for problem, request, message in malformed(family):
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.submit(request, Caller().sink())
        engine.step()
    drive(engine, {})
    for caller, (messages, pictures, max_tokens) in zip(running, CASES[:2]):
        assert caller.answered_once and caller.final.token_ids == reference(family, messages, pictures, max_tokens)


class FaultyModel:
    """The model, with faults injected: `embed_fault(ids)` before a prompt's embeddings are looked
    up and `forward_fault(inputs)` before each forward may return an exception, which is raised."""

    def __init__(self, model, embed_fault=lambda ids: None, forward_fault=lambda inputs: None):
        self._model, self._embed_fault, self._forward_fault = model, embed_fault, forward_fault

    def __getattr__(self, name):
        return getattr(self._model, name)

    def get_input_embeddings(self):
        embeddings = self._model.get_input_embeddings()

        def embed(ids):
            error = self._embed_fault(ids)
            if error is not None:
                raise error
            return embeddings(ids)

        return embed

    def __call__(self, **inputs):
        error = self._forward_fault(inputs)
        if error is not None:
            raise error
        return self._model(**inputs)


@contextmanager
def failing_last_layer(model, fault):
    """The model's last decoder layer raises what `fault(paged step)` returns (if anything): a
    failure midway through a forward, after the layers before it have written their keys."""
    def hook(module, args, kwargs):
        error = fault(kwargs["paged_step"])
        if error is not None:
            raise error

    handle = model.model.language_model.layers[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


GROUP = [CASES[0], CASES[1], CASES[3]]  # two prompts with images and one without, of different lengths


@pytest.mark.parametrize("where", ["embeddings", "forward"])
def test_a_fault_in_one_row_of_a_prefill_group_of_three_fails_that_row_alone(family, where):
    """The middle row of a group of three faults: building its embeddings (pinned on it at once),
    or in every prefill forward that holds it (the group's rows are then prefilled one at a time)."""
    requests = [family.request(messages, pictures, max_tokens=max_tokens) for messages, pictures, max_tokens in GROUP]
    faulty = len(requests[1].input_ids)
    assert len({len(request.input_ids) for request in requests}) == 3
    injected = RuntimeError("injected fault")
    prefills = []  # the rows of each prefill forward

    def forward_fault(inputs):
        lengths = inputs["paged_step"].prefill_ends  # one chunk each: to the prompts' ends
        if not lengths:
            return None
        prefills.append(len(lengths))
        return injected if where == "forward" and faulty in lengths else None

    engine = InflightEngine(family.generator, EngineLimits(prefill_chunk_tokens=4096))  # one chunk: whole prompts
    engine.model = FaultyModel(family.model, forward_fault=forward_fault,
                               embed_fault=lambda ids: injected if where == "embeddings" and len(ids) == faulty else None)
    callers = [Caller() for _ in requests]
    drive(engine, {0: list(zip(callers, requests))})
    assert prefills == ([2] if where == "embeddings" else [3, 1, 1, 1])
    assert all(caller.answered_once for caller in callers)
    assert callers[1].errors == [injected] and not callers[1].updates
    for caller, (messages, pictures, max_tokens) in zip(callers[::2], GROUP[::2]):
        assert caller.final.token_ids == reference(family, messages, pictures, max_tokens)


OUT_OF_MEMORY = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                 RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                              "you tried to allocate 1073741824 bytes.")]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "cpu"])
def test_out_of_memory_prefilling_a_group_prefills_its_rows_one_at_a_time(family, error):
    """Memory for one prompt at a time: every row is answered, with transformers' own tokens."""
    engine = InflightEngine(family.generator)
    engine.model = FaultyModel(family.model, forward_fault=lambda inputs: error if len(inputs["paged_step"].chunks) > 1
                               else None)
    callers = [Caller() for _ in GROUP]
    drive(engine, {0: [(caller, family.request(messages, pictures, max_tokens=max_tokens))
                       for caller, (messages, pictures, max_tokens) in zip(callers, GROUP)]})
    for caller, (messages, pictures, max_tokens) in zip(callers, GROUP):
        assert caller.answered_once and caller.final.token_ids == reference(family, messages, pictures, max_tokens)


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "cpu"])
def test_out_of_memory_in_a_forward_preempts_the_newest_row_and_every_row_stays_exact(family, error):
    """Memory for two rows in a forward, not three: the third row to join is preempted when it
    joins (midway through the forward that packs its prompt beside the two decoding rows, after
    the first layers wrote their keys), runs once a row has left, and every row gets
    transformers' own tokens."""
    callers = [Caller() for _ in GROUP]
    arrivals = {step: [(caller, family.request(messages, pictures, max_tokens=max_tokens))]
                for step, caller, (messages, pictures, max_tokens) in zip((0, 1, 4), callers, GROUP)}
    three_rows = lambda step: error if step.rows == 3 else None  # noqa: E731
    engine = InflightEngine(family.generator)
    with failing_last_layer(family.model, three_rows):
        drive(engine, arrivals)
    assert engine.stats.preempted >= 1
    for caller, (messages, pictures, max_tokens) in zip(callers, GROUP):
        assert caller.answered_once and caller.final.token_ids == reference(family, messages, pictures, max_tokens)


def test_out_of_memory_with_one_row_fails_it_naming_the_memory(family):
    """Nothing to preempt: the row, retried alone (as a prompt among others would be), ends with an
    error saying out of memory, and the next request runs."""
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    alone, after = Caller(), Caller()
    engine = InflightEngine(family.generator)
    engine.submit(family.request(ask("one"), [], max_tokens=5), alone.sink())
    with failing_last_layer(family.model, lambda step: error):
        engine.step()
        engine.step()
    drive(engine, {0: [(after, family.request(ask("two"), [], max_tokens=3))]})
    [failure] = alone.errors
    assert alone.answered_once and isinstance(failure, OutOfMemory) and "out of memory" in str(failure)
    assert after.final.completion_tokens == 3


def test_a_budget_too_small_for_all_rows_at_once_preempts_and_every_row_stays_exact(family):
    """The rows' prompts fit together but not their growth: the newest rows are preempted (blocks
    freed, recomputed later from prompt + chosen tokens) and every row still gets transformers'
    own tokens. The block tables are instrumented: the budget is never exceeded."""
    requests = [family.request(messages, pictures, max_tokens=max_tokens) for messages, pictures, max_tokens in CASES]
    budget = -(-max(len(r.input_ids) + r.params.max_tokens for r in requests) // 4) * 4
    engine = InflightEngine(family.generator, EngineLimits(cache_tokens=budget, block_tokens=4))
    used, grow = [], engine.blocks.grow

    def counted_grow(row, tokens):
        try:
            grow(row, tokens)
        finally:
            used.append(engine.blocks.used)

    engine.blocks.grow = counted_grow
    callers = [Caller() for _ in requests]
    drive(engine, {0: list(zip(callers, requests))})
    assert engine.stats.preempted >= 1
    assert max(used) * 4 <= budget and engine.blocks.peak_used * 4 <= budget
    for caller, (messages, pictures, max_tokens) in zip(callers, CASES):
        assert caller.answered_once and caller.final.token_ids == reference(family, messages, pictures, max_tokens)


def test_a_fault_that_escapes_a_step_answers_every_row_once_and_the_loop_serves_on(family, monkeypatch):
    """A bug in the step itself (here: choosing the tokens of a group's first step) ends what the
    engine holds (rows running, prefilling, waiting), each with one error, and later requests are served."""
    from vlm_serving.generation import engine as engine_module

    engine = InflightEngine(family.generator, EngineLimits(max_running=2))
    running = Caller()
    engine.submit(family.request(ask("keep going"), [], max_tokens=50), running.sink())
    engine.step()
    group, waiting = [Caller(), Caller()], Caller()
    engine.submit(family.request(ask("one"), [], max_tokens=5), group[0].sink())
    engine.submit(family.request(ask("two"), [], max_tokens=5), waiting.sink())
    real = engine_module.choose_tokens
    faults = []

    def choose_tokens(scores, params, generators):
        if not faults:
            faults.append(RuntimeError("a bug"))
            raise faults[0]
        return real(scores, params, generators)

    monkeypatch.setattr(engine_module, "choose_tokens", choose_tokens)
    loop = EngineLoop(engine).start()
    deadline = time.monotonic() + 60
    while not all(caller.done for caller in (running, group[0], waiting)) and time.monotonic() < deadline:
        time.sleep(0.01)
    later = Caller()
    engine.submit(family.request(ask("later"), [], max_tokens=3), later.sink())
    loop.stop(grace_s=30, reason=RuntimeError("unused"))
    for caller in (running, group[0], waiting):
        assert caller.answered_once and caller.errors == faults
    assert later.final.completion_tokens == 3


# ----- confidence over what the response format allows (issue 24) -----


@pytest.mark.parametrize("response_format", [ResponseFormat("choice", choices=("a",)),
                                             ResponseFormat("regex", pattern="Paris"),
                                             ResponseFormat("choice", choices=("yes", "no", "maybe"))],
                         ids=["one choice", "one match", "three choices"])
def test_confidence_is_taken_over_the_tokens_the_format_allows(family, response_format):
    """Against greedy decoding on transformers' own forward with xgrammar's allowed tokens: the
    same tokens, and the confidence is the mean of their log-probabilities renormalised over
    what the format allowed. "a" is one path of tokens (each step forced: certain, 0); "Paris" is
    one string with several tokenizations (only their choice counts); logprobs stay the model's own."""
    request = family.request(ask("Answer."), [], max_tokens=16, logprobs=True, response_format=response_format)
    caller = Caller()
    engine = InflightEngine(family.generator)
    drive(engine, {0: [(caller, request)]})
    final = caller.final
    matcher = engine.formats.row(response_format).matcher
    tokens, values = grammar_greedy(family.model, matcher, engine.vocab_size, request.input_ids.tolist(), 16)
    assert final.finish_reason == "stop" and final.token_ids == tokens[:-1]
    assert final.confidence == pytest.approx(sum(values) / len(values), abs=1e-5)
    own = transformers_logprobs(family.name, family.checkpoint, ask("Answer."), [], tokens)
    model_confidence = sum(own[i, token].item() for i, token in enumerate(tokens)) / len(tokens)
    assert [entry["logprob"] for entry in final.logprobs] == pytest.approx(
        [own[i, token].item() for i, token in enumerate(final.token_ids)], abs=1e-4)
    assert final.confidence > model_confidence + 0.5, "forced tokens no longer count as doubt"
    if response_format.choices == ("a",):
        assert final.confidence == pytest.approx(0.0, abs=1e-6)


def test_stop_sequences_beside_a_response_format_are_refused_naming_stop(family):
    engine = InflightEngine(family.generator)
    with pytest.raises(ParameterError, match="stop sequences cannot end a constrained answer"):
        engine.submit(family.request(ask("hi"), [], stop=("}",), response_format=ResponseFormat("json_object")),
                      Caller().sink())
    assert engine.idle


def test_preempted_rows_stream_each_token_once(family):
    """Under a budget too small for all rows, streamed rows that are preempted and resumed send
    every token once: the streamed tokens join to the greedy reference."""
    requests = [family.request(messages, pictures, max_tokens=max_tokens, stream=True)
                for messages, pictures, max_tokens in CASES]
    budget = -(-max(len(r.input_ids) + r.params.max_tokens for r in requests) // 4) * 4
    engine = InflightEngine(family.generator, EngineLimits(cache_tokens=budget, block_tokens=4))
    callers = [Caller() for _ in requests]
    drive(engine, {0: list(zip(callers, requests))})
    assert engine.stats.preempted >= 1
    for caller, (messages, pictures, max_tokens) in zip(callers, CASES):
        streamed = [token for update in caller.updates for token in update.token_ids]
        assert caller.answered_once and streamed == reference(family, messages, pictures, max_tokens)


def test_a_preempted_seeded_sampling_row_draws_what_it_draws_with_room(family):
    """The newest row (sampling, seeded) is preempted when both rows grow; resumed, it goes on
    with its own generator where it stopped: the same tokens as with room to spare."""
    long_answer = "a very long answer" if family.name == "qwen2_5_vl" else "answer list"  # no end token early
    greedy = family.request(ask(long_answer), [], max_tokens=30)
    sampled = family.request(ask("Tell me something"), [], max_tokens=24, temperature=0.9, seed=7)
    each_alone = max(len(request.input_ids) + request.params.max_tokens for request in (greedy, sampled))
    budget = -(-max(each_alone, len(greedy.input_ids) + len(sampled.input_ids) + 8) // 4) * 4

    def run(limits):
        engine = InflightEngine(family.generator, limits)
        callers = Caller(), Caller()
        drive(engine, {0: [(callers[0], greedy)], 1: [(callers[1], sampled)]})
        return engine.stats.preempted, callers[1].final

    preempted, tight = run(EngineLimits(cache_tokens=budget, block_tokens=4))
    unpreempted, roomy = run(EngineLimits())
    assert preempted >= 1 and unpreempted == 0
    assert tight.token_ids == roomy.token_ids
