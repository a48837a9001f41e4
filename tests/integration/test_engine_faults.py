"""One bad call never fails a generation instance (issue 24): any client of Triton's port can call
`<family>_generate` directly, not only the ensembles, and a malformed call is refused alone
(INVALID_ARGUMENT naming the input) while the streams beside it run on."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import picture
from tests.families import Family, ask
from tests.reference import served_size, transformers_generate
from vlm_serving.ensemble_client import generate, parse_response, user_message
from vlm_serving.errors import CALLER_ERROR_PREFIX
from vlm_serving.generation.batch import GenerationRequest

pytestmark = pytest.mark.integration
GENERATE = "qwen2_5_vl_generate"
LONG_PROMPT = "a very long answer"  # the tiny Qwen runs 2,000 tokens on it without an end token


def generate_inputs(request: GenerationRequest, **replaced: np.ndarray) -> list[grpcclient.InferInput]:
    """The request as the generate model's inputs (what the ensemble's embed step sends it, one
    batch row), with `replaced` tensors put in place of (or beside) those."""
    hidden = request.image_embeds.shape[1] if request.image_embeds is not None else 64
    tensors = {
        "INPUT_IDS": request.input_ids[None],
        "IMAGE_EMBEDS": (request.image_embeds if request.image_embeds is not None
                         else np.zeros((0, hidden), np.float32))[None],
        "IMAGE_GRID_THW": request.language_tensors["image_grid_thw"][None],
        "IMAGE_TOKENS": np.array([[request.image_tokens]], np.int32),
        "MAX_TOKENS": np.array([[request.params.max_tokens]], np.int32),
        **replaced,
    }
    inputs = []
    for name, value in tensors.items():
        item = grpcclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == np.object_ else
                                     {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
                                      np.dtype(np.float32): "FP32"}[value.dtype])
        item.set_data_from_numpy(value)
        inputs.append(item)
    return inputs


def call_directly(url: str, inputs: list[grpcclient.InferInput], timeout: float = 60.0):
    """One call to the generate model on a stream of its own: the final response (parsed), or the
    error Triton sent instead."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(GENERATE, inputs, enable_empty_final_response=False)
        while True:
            try:
                result, error = responses.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no final response from {GENERATE} within {timeout:.0f} s")
            if error is not None:
                return error
            chunk = parse_response(result)
            if chunk.finished:
                return chunk
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def test_malformed_direct_calls_are_refused_alone_while_streams_run(triton, checkpoints):
    family = Family("qwen2_5_vl", checkpoints / "qwen2_5_vl")
    messages, pictures = ask("What is in the picture?", 1), [picture(200, 120, seed=1)]
    good = family.request(messages, pictures, max_tokens=8)
    vocab, hidden = family.generator.vocab_size, family.generator.hidden_size
    out_of_vocabulary = good.input_ids.copy()
    out_of_vocabulary[2] = vocab
    grid = good.language_tensors["image_grid_thw"].copy()
    grid[0, 2] += 2
    bad_calls = [
        ("a token id past the vocabulary", {"INPUT_IDS": out_of_vocabulary[None]},
         f"INPUT_IDS[2] = {vocab} is outside this model's vocabulary"),
        ("a grid that does not match the image tokens", {"IMAGE_GRID_THW": grid[None]}, "IMAGE_GRID_THW[0] = "),
        ("image rows of another width", {"IMAGE_EMBEDS": good.image_embeds[None, :, :-1].copy()},
         f"IMAGE_EMBEDS rows are {hidden - 1} wide"),
        ("MAX_TOKENS 0", {"MAX_TOKENS": np.array([[0]], np.int32)}, "max_tokens=0 must be in [1, "),
        ("a negative MAX_TOKENS", {"MAX_TOKENS": np.array([[-5]], np.int32)}, "max_tokens=-5 must be in [1, "),
        ("a stop sequence beside a response format",
         {"STOP": np.array([[b"}"]], np.object_), "RESPONSE_FORMAT": np.array([[b'{"type":"json_object"}']], np.object_)},
         "stop sequences cannot end a constrained answer"),
    ]

    started = [threading.Event() for _ in range(3)]
    finished_at: list[float] = []
    results: list = [None] * 3

    def stream(index: int) -> None:
        try:
            results[index] = generate(triton.grpc_url, "qwen2_5_vl", user_message(LONG_PROMPT, 0), max_tokens=1000,
                                      stream=True, on_delta=lambda delta: started[index].set(), timeout=300)
        except InferenceServerException as exc:
            results[index] = exc
        finally:
            finished_at.append(time.monotonic())
            started[index].set()

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(timeout=240)
    refused_at = []
    for problem, tensors, message in bad_calls:
        sent = time.monotonic()
        error = call_directly(triton.grpc_url, generate_inputs(good, **tensors))
        refused_at.append(time.monotonic())
        print(f"{problem}: refused in {refused_at[-1] - sent:.3f} s")
        assert isinstance(error, InferenceServerException), f"{problem}: answered {error}"
        assert error.message().startswith(CALLER_ERROR_PREFIX) and message in error.message(), (problem, error.message())
    answer = call_directly(triton.grpc_url, generate_inputs(good))  # the same call, well formed, beside them
    for thread in threads:
        thread.join(timeout=300)
    assert max(refused_at) < min(finished_at), "every bad call was refused while the streams ran"
    for result in results:
        assert not isinstance(result, Exception), result
        assert (result.finish_reason, result.completion_tokens) == ("length", 1000)
    expected = transformers_generate(family.name, family.checkpoint, messages, pictures, 8,
                                     served_size(family.name, family.checkpoint))
    assert answer.finish_reason in ("stop", "length") and answer.token_ids == family.until_eos(expected)
