"""Log-probabilities, presence/frequency penalties and an unset max_tokens through the real Triton
ensembles (both families) and model `auto`, against transformers' own forward and OpenAI's formula."""

from __future__ import annotations

import json

import pytest
from tritonclient.utils import InferenceServerException

from tests.conftest import FAMILIES, encode, picture
from tests.families import ENDING_PROMPTS, joined_text
from tests.reference import openai_penalized_greedy, served_size, transformers_logprobs
from vlm_serving.ensemble_client import generate, user_message

pytestmark = pytest.mark.integration
PICTURES = [picture(200, 120, seed=1)]
MESSAGES = user_message("What is in the picture?", 1)


def assert_the_models_own(result, family: str, checkpoint, top: int) -> None:
    """Each token's entry against the log-softmax of transformers' forward over the same prompt
    (the processor's tensors) with the answer appended; alternatives sorted, the greedy choice first."""
    assert len(result.logprobs) == len(result.token_ids) > 0 and joined_text(result.logprobs) == result.text
    expected = transformers_logprobs(family, checkpoint, MESSAGES, PICTURES, result.token_ids,
                                     served_size(family, checkpoint))
    for position, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
        assert entry["logprob"] == pytest.approx(expected[position, token].item(), abs=1e-4)
        values = [alternative["logprob"] for alternative in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(expected[position].topk(top).values.tolist(), abs=1e-4)
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"], "greedy: the chosen token is the likeliest"


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_are_the_models_own_whole_and_streamed(triton, checkpoints, family):
    asked = dict(max_tokens=12, logprobs=True, top_logprobs=4)
    whole = generate(triton.grpc_url, family, MESSAGES, [encode(p) for p in PICTURES], **asked)
    assert_the_models_own(whole, family, checkpoints / family, 4)
    streamed = generate(triton.grpc_url, family, MESSAGES, [encode(p) for p in PICTURES], stream=True, **asked)
    assert len(streamed.deltas) > 1 and streamed.token_ids == whole.token_ids
    assert [entry["bytes"] for entry in streamed.logprobs] == [entry["bytes"] for entry in whole.logprobs]
    assert [entry["logprob"] for entry in streamed.logprobs] == pytest.approx(
        [entry["logprob"] for entry in whole.logprobs], abs=1e-5)
    plain = generate(triton.grpc_url, family, MESSAGES, [encode(p) for p in PICTURES], max_tokens=12)
    assert plain.token_ids == whole.token_ids and plain.logprobs == []


@pytest.mark.parametrize("routing,family", [(dict(fallback=False), "qwen2_5_vl"),
                                            (dict(confidence_threshold=0.0), "pixtral")])
def test_auto_passes_on_the_answering_familys_logprobs(triton, checkpoints, routing, family):
    """With the fallback off Qwen2.5-VL answers (streamed at once); below the threshold Qwen's held
    answer is replaced by Pixtral's, and so are its log-probabilities."""
    result = generate(triton.grpc_url, "auto", MESSAGES, [encode(p) for p in PICTURES], max_tokens=10,
                      logprobs=True, top_logprobs=2, stream=True, **routing)
    assert result.route["family"] == family
    assert_the_models_own(result, family, checkpoints / family, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_end_token_has_no_logprob(triton, family):
    result = generate(triton.grpc_url, family, user_message(ENDING_PROMPTS[family], 0), [], max_tokens=40, logprobs=True)
    assert result.finish_reason == "stop" and result.completion_tokens == len(result.token_ids) + 1 == len(result.logprobs) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_penalties_change_greedy_output_as_openais_formula_says(triton, checkpoints, family):
    from transformers import AutoModelForImageTextToText

    from vlm_serving.generation.batch import BatchGenerator
    from vlm_serving.generation.loading import load_tokenizer
    from vlm_serving.preprocessing.preprocess import load_preprocessor

    messages = user_message("What is in the picture?", 0)
    prompt = load_preprocessor(family, checkpoints / family)([], json.dumps(messages)).input_ids.tolist()
    model = AutoModelForImageTextToText.from_pretrained(checkpoints / family, local_files_only=True).eval()
    eos = BatchGenerator(family, model, load_tokenizer(checkpoints / family)).eos_ids
    plain = generate(triton.grpc_url, family, messages, [], max_tokens=20)
    assert plain.token_ids == openai_penalized_greedy(model, eos, prompt, 20, 0.0, 0.0)
    for presence, frequency in ((1.5, 0.5), (-1.0, -0.5)):
        penalized = generate(triton.grpc_url, family, messages, [], max_tokens=20, presence_penalty=presence,
                             frequency_penalty=frequency)
        assert penalized.token_ids == openai_penalized_greedy(model, eos, prompt, 20, presence, frequency)
        if presence > 0:
            assert penalized.token_ids != plain.token_ids


def test_an_unset_max_tokens_runs_past_the_old_default_of_64(triton):
    """The tiny Pixtral answers this prompt in 500 tokens and its end token."""
    result = generate(triton.grpc_url, "pixtral", user_message("Tell me a long story", 0), [])
    assert result.finish_reason == "stop" and result.completion_tokens > 64


def test_out_of_range_values_are_refused_naming_the_field(triton):
    for params, message in ((dict(logprobs=True, top_logprobs=21), "top_logprobs=21 must be in [0, 20]"),
                            (dict(presence_penalty=2.5), "presence_penalty=2.5 must be in [-2, 2]")):
        with pytest.raises(InferenceServerException, match=message.replace("[", "\\[").replace("]", "\\]")):
            generate(triton.grpc_url, "qwen2_5_vl", user_message("hello", 0), [], max_tokens=4, **params)
