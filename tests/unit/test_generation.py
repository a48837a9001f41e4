import json

import numpy as np
import pytest
import torch

from tests.conftest import FAMILIES, picture
from tests.families import ENDING_PROMPTS, Family, ask, joined_text
from tests.reference import openai_penalized_greedy, served_size, transformers_generate, transformers_logprobs
from vlm_serving.generation.batch import BatchGenerator
from vlm_serving.generation.loading import load_model
from vlm_serving.generation.sampling import SamplingParams


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints):
    return Family(request.param, checkpoints / request.param)


def test_batched_greedy_equals_plain_generate_per_request(family):
    cases = [
        (ask("What is in the picture?", 1), [picture(200, 120, seed=1)]),
        (ask("Describe it.", 1), [picture(64, 64, seed=2)]),
        (ask("Hello there, no picture"), []),
        (ask("Compare these two images", 2), [picture(90, 140, seed=3), picture(120, 40, seed=4)]),
    ]
    outputs = family.run([family.request(m, p, max_tokens=12) for m, p in cases])
    served = []
    for (messages, pictures), updates in zip(cases, outputs):
        assert len(updates) == 1 and updates[0].finished
        expected = family.until_eos(transformers_generate(family.name, family.checkpoint, messages, pictures, 12,
                                                          served_size(family.name, family.checkpoint)))
        assert updates[0].token_ids == expected
        served.append(tuple(updates[0].token_ids))
    assert len(set(served)) == len(served), "different inputs must give different tokens"


def test_stream_deltas_join_to_the_unary_text(family):
    messages, pictures = ask("What is in the picture?", 1), [picture(150, 100, seed=7)]
    [unary] = family.run([family.request(messages, pictures, max_tokens=20)])
    [stream] = family.run([family.request(messages, pictures, max_tokens=20, stream=True)])
    assert len(stream) > 1 and stream[-1].finished and not any(u.finished for u in stream[:-1])
    assert "".join(u.text for u in stream) == unary[0].text
    assert sum((u.token_ids for u in stream), []) == unary[0].token_ids
    assert stream[-1].completion_tokens == unary[0].completion_tokens == len(unary[0].token_ids) + (unary[0].finish_reason == "stop")


def test_each_request_keeps_its_own_max_tokens_and_usage(family):
    requests = [family.request(ask("one", 1), [picture(64, 64)], max_tokens=n) for n in (3, 9, 5)]
    outputs = family.run(requests)
    for request, n, [final] in zip(requests, (3, 9, 5), outputs):
        assert final.finish_reason == "length" and final.completion_tokens == n == len(final.token_ids)
        assert final.prompt_tokens == len(request.input_ids) and final.image_tokens == request.image_tokens > 0


def test_stop_sequence_ends_the_text_before_it(family):
    messages = ask("Tell me a story")
    [[full]] = family.run([family.request(messages, [], max_tokens=24)])
    text = full.text
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    [[stopped]] = family.run([family.request(messages, [], max_tokens=24, stop=(stop,))])
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]
    assert stopped.completion_tokens < 24


def test_seeded_sampling_repeats_and_greedy_neighbours_are_untouched(family):
    pictures = [picture(100, 100, seed=9)]
    messages = ask("Sample something", 1)
    sampled = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=100)
    first = family.run([family.request(messages, pictures, seed=1, **sampled), family.request(messages, pictures, max_tokens=16)])
    again = family.run([family.request(messages, pictures, seed=1, **sampled)])
    other = family.run([family.request(messages, pictures, seed=2, **sampled)])
    assert first[0][0].token_ids == again[0][0].token_ids
    assert first[0][0].token_ids != other[0][0].token_ids
    greedy = family.until_eos(transformers_generate(family.name, family.checkpoint, messages, pictures, 16,
                                                    served_size(family.name, family.checkpoint)))
    assert first[1][0].token_ids == greedy
    assert first[0][0].token_ids != greedy


def test_repetition_penalty_matches_transformers(family):
    messages = ask("Repeat repeat repeat")
    [[penalized]] = family.run([family.request(messages, [], max_tokens=16, repetition_penalty=1.5)])
    request = family.request(messages, [])
    ids = torch.from_numpy(request.input_ids)[None]
    with torch.inference_mode():
        out = family.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, repetition_penalty=1.5
        )
    assert penalized.token_ids == family.until_eos(out[0, ids.shape[1] :].tolist())


def test_confidence_is_the_mean_token_log_probability(family):
    request = family.request(ask("How confident are you?"), [], max_tokens=8)
    [[final]] = family.run([request])
    sequence = torch.tensor([request.input_ids.tolist() + final.token_ids])
    with torch.inference_mode():
        logits = family.model(input_ids=sequence).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(request.input_ids) - 1
    chosen = [logprobs[start + i, token].item() for i, token in enumerate(final.token_ids)]
    assert final.confidence == pytest.approx(float(np.mean(chosen)), abs=1e-4)
    assert final.confidence < 0


def test_cancelled_request_finishes_early_and_its_neighbour_completes(family):
    requests = [family.request(ask("long answer"), [], max_tokens=30, stream=True),
                family.request(ask("keep going"), [], max_tokens=30)]
    outputs = family.run(requests, is_cancelled=lambda index: index == 0)
    assert outputs[0][-1].finish_reason == "cancelled" and outputs[0][-1].completion_tokens == 1
    assert outputs[1][-1].finish_reason == "length" and outputs[1][-1].completion_tokens == 30


def test_int8_model_quantizes_linear_layers_and_answers(family):
    quantized = load_model(family.checkpoint, "int8")
    modules = list(quantized.modules())
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in modules)
    assert not any(type(m) is torch.nn.Linear for m in modules), "every nn.Linear is quantized"
    generator = BatchGenerator(family.name, quantized, family.generator.tokenizer)
    updates = []
    generator.generate([family.request(ask("int8?", 1), [picture(64, 64)], max_tokens=6)], lambda i, u: updates.append(u))
    assert updates[-1].finished and updates[-1].completion_tokens == 6


class ScriptedGenerator:
    """Calls on_update as a real generator would: a delta then a final per row, rows in turn."""

    def __init__(self, rows, fail_after=None):
        self.rows = rows
        self.fail_after = fail_after  # raise once this many rows have finished
        self.asked_cancelled = []

    def generate(self, requests, on_update, is_cancelled):
        from vlm_serving.generation.batch import RequestUpdate

        for index in range(self.rows):
            if self.fail_after == index:
                raise RuntimeError("CUDA error: an illegal memory access")
            self.asked_cancelled.append(is_cancelled(index))
            on_update(index, RequestUpdate(text="a", token_ids=[1]))
            self.asked_cancelled.append(is_cancelled(index))
            on_update(index, RequestUpdate(text="b", token_ids=[2], finished=True, finish_reason="stop"))


def deliver(generator, failing_sends=(), failing_errors=()):
    from vlm_serving.generation.batch import run_batch

    finals, logged = {}, []

    def send_update(index, update):
        if (index, update.finished) in failing_sends:
            raise ValueError("could not build the response")
        if update.finished:
            finals.setdefault(index, []).append("final")

    def send_error(index, exc):
        if index in failing_errors:
            raise OSError("the response sender is closed")
        finals.setdefault(index, []).append(f"error: {exc}")

    run_batch(generator, [None] * generator.rows, send_update, send_error, log_error=logged.append)
    return finals, logged


def test_a_row_whose_final_cannot_be_sent_still_ends_with_an_error():
    finals, logged = deliver(ScriptedGenerator(3), failing_sends={(1, True)})
    assert finals == {0: ["final"], 1: ["error: could not build the response"], 2: ["final"]}
    assert logged


def test_a_row_whose_delta_cannot_be_sent_ends_at_once_and_stops_generating():
    generator = ScriptedGenerator(2)
    finals, _ = deliver(generator, failing_sends={(0, False)})
    assert finals == {0: ["error: could not build the response"], 1: ["final"]}
    assert generator.asked_cancelled == [False, True, False, False]


def test_a_failed_batch_ends_every_unfinished_row_even_when_one_error_cannot_be_sent():
    finals, logged = deliver(ScriptedGenerator(4, fail_after=1), failing_errors={1})
    assert finals == {0: ["final"], 2: ["error: CUDA error: an illegal memory access"],
                      3: ["error: CUDA error: an illegal memory access"]}
    assert any("could not send its final error" in line for line in logged)


@pytest.mark.parametrize("images", [0, 2])
def test_the_model_gets_exactly_the_processors_inputs(family, images):
    """Names and values of what the language model is given, against transformers' processor:
    the pixels (and Pixtral's image sizes) go to the vision encoder, whose rows arrive as
    `inputs_embeds`; everything else the processor returns reaches the model as it is."""
    from tests.reference import VIDEO_ONLY, model_input_names, processor_inputs

    messages = ask("Compare these", images)
    pictures = [picture(90, 140, seed=3), picture(120, 40, seed=4)][:images]
    request = family.request(messages, pictures)
    ids = torch.from_numpy(request.input_ids)[None]
    given = family.generator.model_inputs([request], ids, torch.ones_like(ids))
    reference = processor_inputs(family.name, family.checkpoint, messages, pictures,
                                 served_size(family.name, family.checkpoint))
    to_encoder = {"pixel_values", "image_sizes"}
    expected = set(model_input_names(family.name, family.checkpoint)) - VIDEO_ONLY - to_encoder
    if images:
        expected.add("inputs_embeds")
    else:
        expected -= {"image_grid_thw"}  # no images, no grid: the processor returns none either
    assert set(given) == expected
    assert set(reference) - to_encoder <= expected
    for name in set(reference) - to_encoder:
        assert np.array_equal(given[name][0].numpy() if given[name].dim() > 1 and name != "image_grid_thw"
                              else given[name].numpy(), reference[name]), name


@pytest.fixture(scope="module")
def instruct_defaults(checkpoints, tmp_path_factory):
    """The tiny Qwen2.5-VL with an instruct-style generation_config.json: sampling on, a penalty."""
    directory = tmp_path_factory.mktemp("instruct") / "qwen2_5_vl"
    directory.mkdir()
    for item in (checkpoints / "qwen2_5_vl").iterdir():
        if item.name != "generation_config.json":
            (directory / item.name).symlink_to(item)
    config = json.loads((checkpoints / "qwen2_5_vl" / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=2.0)
    (directory / "generation_config.json").write_text(json.dumps(config))
    return Family("qwen2_5_vl", directory)


def test_checkpoint_sampling_defaults_fill_only_what_a_request_leaves_unset(instruct_defaults):
    generator = instruct_defaults.generator
    assert (generator.defaults.temperature, generator.defaults.top_p, generator.defaults.top_k,
            generator.defaults.repetition_penalty) == (0.7, 0.8, 20, 2.0)
    unset = SamplingParams().resolve(generator.defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.7, 0.8, 20, 2.0)
    explicit = SamplingParams(temperature=0.0, repetition_penalty=1.0, top_k=0).resolve(generator.defaults)
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.repetition_penalty) == (0.0, 0.8, 0, 1.0)


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_a_requests_parameters_apply_once_not_on_top_of_the_checkpoints(instruct_defaults, penalty):
    family = instruct_defaults
    messages, pictures = ask("What is in the picture?", 1), [picture(200, 120, seed=1)]
    [updates] = family.run([family.request(messages, pictures, max_tokens=48, temperature=0.0,
                                           repetition_penalty=penalty)])
    expected = transformers_generate(family.name, family.checkpoint, messages, pictures, 48,
                                     served_size(family.name, family.checkpoint), repetition_penalty=penalty)
    assert updates[-1].token_ids == family.until_eos(expected)


def test_confidence_is_taken_before_any_checkpoint_penalty(instruct_defaults):
    from tests.reference import processor_inputs

    family = instruct_defaults
    messages = ask("Tell me more")
    [updates] = family.run([family.request(messages, [], max_tokens=8, temperature=0.0, repetition_penalty=1.0)])
    inputs = processor_inputs(family.name, family.checkpoint, messages, [])
    batch = {name: torch.from_numpy(value)[None] for name, value in inputs.items()}
    with torch.inference_mode():
        out = family.model.generate(**batch, max_new_tokens=8, do_sample=False, repetition_penalty=1.0,
                                    output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, batch["input_ids"].shape[1]:]
    logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, tokens)]
    assert updates[-1].confidence == pytest.approx(float(np.mean(logprobs[: updates[-1].completion_tokens])), abs=1e-4)


def test_logprobs_are_the_models_own_and_streamed_ones_join_to_the_whole_answers(family):
    messages, pictures = ask("What is in the picture?", 1), [picture(200, 120, seed=1)]
    asked = dict(max_tokens=10, logprobs=True, top_logprobs=3)
    [[whole], streamed, [plain]] = family.run([family.request(messages, pictures, **asked),
                                               family.request(messages, pictures, stream=True, **asked),
                                               family.request(messages, pictures, max_tokens=10)])
    expected = transformers_logprobs(family.name, family.checkpoint, messages, pictures, whole.token_ids,
                                     served_size(family.name, family.checkpoint))
    assert len(whole.logprobs) == len(whole.token_ids) == 10 and joined_text(whole.logprobs) == whole.text
    for position, (token, entry) in enumerate(zip(whole.token_ids, whole.logprobs)):
        assert entry["logprob"] == pytest.approx(expected[position, token].item(), abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(expected[position].topk(3).values.tolist(), abs=1e-4)
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]
    assert len(streamed) > 1 and all(len(update.logprobs) == len(update.token_ids) for update in streamed)
    assert [e["bytes"] for update in streamed for e in update.logprobs] == [e["bytes"] for e in whole.logprobs]
    assert plain.logprobs == []


def test_the_end_token_has_no_logprob(family):
    [[final]] = family.run([family.request(ask(ENDING_PROMPTS[family.name]), [], max_tokens=40, logprobs=True)])
    assert final.finish_reason == "stop" and final.completion_tokens == len(final.token_ids) + 1 == len(final.logprobs) + 1


def test_presence_and_frequency_penalties_follow_openais_formula(family):
    messages = ask("What is in the picture?")
    penalties = [(1.5, 0.5), (0.0, 2.0), (-1.0, -0.5), (None, None)]
    requests = [family.request(messages, [], max_tokens=20, presence_penalty=presence, frequency_penalty=frequency)
                for presence, frequency in penalties]
    outputs = family.run(requests)
    prompt = requests[0].input_ids.tolist()
    for [final], (presence, frequency) in zip(outputs, penalties):
        assert final.token_ids == openai_penalized_greedy(family.model, family.eos, prompt, 20, presence or 0.0,
                                                          frequency or 0.0)
    plain = outputs[-1][0].token_ids
    assert outputs[0][0].token_ids != plain and outputs[1][0].token_ids != plain


def test_an_unset_max_tokens_runs_to_the_limit_or_the_context(family):
    messages = ask("Tell me a story")
    prompt = len(family.request(messages, []).input_ids)
    limited = BatchGenerator(family.name, family.model, family.generator.tokenizer, max_tokens_limit=7)
    small_context = BatchGenerator(family.name, family.model, family.generator.tokenizer)
    small_context.max_context = prompt + 5
    for generator, expected in ((limited, 7), (small_context, 5)):
        updates = []
        generator.generate([family.request(messages, [])], lambda i, update: updates.append(update))
        assert (updates[-1].finish_reason, updates[-1].completion_tokens) == ("length", expected)
