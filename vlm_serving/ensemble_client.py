"""Call a family's Triton ensemble through `tritonclient` (the gRPC stream API it needs).

Used by the tests and the benchmarks; the public gRPC gateway builds the same tensors. Messages
follow `vlm_serving.preprocessing.chat`; images are encoded files, one per image part.
"""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

_PARAMETER_TENSORS = {
    "max_tokens": ("MAX_TOKENS", "INT32", np.int32),
    "temperature": ("TEMPERATURE", "FP32", np.float32),
    "top_p": ("TOP_P", "FP32", np.float32),
    "top_k": ("TOP_K", "INT32", np.int32),
    "seed": ("SEED", "INT64", np.int64),
    "repetition_penalty": ("REPETITION_PENALTY", "FP32", np.float32),
    "presence_penalty": ("PRESENCE_PENALTY", "FP32", np.float32),
    "frequency_penalty": ("FREQUENCY_PENALTY", "FP32", np.float32),
    "logprobs": ("LOGPROBS", "BOOL", np.bool_),
    "top_logprobs": ("TOP_LOGPROBS", "INT32", np.int32),
    "stream": ("STREAM", "BOOL", np.bool_),
    # Model "auto" only.
    "confidence_threshold": ("CONFIDENCE_THRESHOLD", "FP32", np.float32),
    "fallback": ("FALLBACK", "BOOL", np.bool_),
}
# Parameters whose default is what the models take for an absent tensor: not sent at the default.
_DEFAULTS = {"logprobs": False, "top_logprobs": 0}
_STRING_TENSORS = {"request_id": "REQUEST_ID", "detail": "DETAIL", "response_format": "RESPONSE_FORMAT", "task": "TASK",
                   "tools": "TOOLS"}


@dataclass
class ResponseChunk:
    """One response of an ensemble: a text delta, or the last one with usage."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    confidence: float = 0.0
    model_version: str = ""
    # Per image: {"kind": "photo"|"document"|"diagram", "width": W, "height": H} as processed.
    images: list[dict] = field(default_factory=list)
    # Model "auto" only: {"family"} on every response; the last adds {"reason", "attempts"}.
    route: dict = field(default_factory=dict)
    # With logprobs: per token of token_ids, {"token": its text alone, "bytes": its UTF-8 bytes,
    # "logprob", "top_logprobs": [{"token", "bytes", "logprob"}, ...] most likely first}.
    logprobs: list[dict] = field(default_factory=list)
    # Prompt tokens the engine's prefix cache held (the last response only).
    cached_tokens: int = 0


def parse_response(result) -> ResponseChunk:
    """A tritonclient InferResult (sync or asyncio client) as a chunk."""
    text = result.as_numpy("TEXT").reshape(-1)[0].decode("utf-8")
    token_ids = result.as_numpy("TOKEN_IDS").reshape(-1).tolist()
    route_info = result.as_numpy("ROUTE_INFO")
    route = {} if route_info is None else json.loads(route_info.reshape(-1)[0])
    token_logprobs = result.as_numpy("TOKEN_LOGPROBS")
    token_logprobs = b"" if token_logprobs is None else token_logprobs.reshape(-1)[0]
    logprobs = json.loads(token_logprobs) if token_logprobs else []
    if not result.get_response().parameters["triton_final_response"].bool_param:
        return ResponseChunk(text=text, token_ids=token_ids, finished=False, route=route, logprobs=logprobs)

    def scalar(name):
        return result.as_numpy(name).reshape(-1)[0]

    return ResponseChunk(
        text=text,
        token_ids=token_ids,
        finished=True,
        finish_reason=scalar("FINISH_REASON").decode(),
        prompt_tokens=int(scalar("PROMPT_TOKENS")),
        completion_tokens=int(scalar("COMPLETION_TOKENS")),
        image_tokens=int(scalar("IMAGE_TOKENS")),
        confidence=float(scalar("CONFIDENCE")),
        model_version=scalar("MODEL_VERSION").decode(),
        images=json.loads(scalar("IMAGE_INFO")),
        route=route,
        logprobs=logprobs,
        # New in issue 25: a server not yet upgraded (a rolling update) sends none.
        cached_tokens=0 if result.as_numpy("CACHED_TOKENS") is None else int(scalar("CACHED_TOKENS")),
    )


@dataclass
class EnsembleResult(ResponseChunk):
    """A whole call: the joined text and tokens, the last response's usage, and every delta."""

    # The text of each response in arrival order (one when not streaming).
    deltas: list[str] = field(default_factory=list)


def user_message(prompt: str, image_count: int) -> list[dict[str, Any]]:
    """One user turn: the images first, then the text."""
    return [{"role": "user", "content": [{"type": "image"}] * image_count + [{"type": "text", "text": prompt}]}]


def build_inputs(messages: list[dict[str, Any]], images: list[bytes], videos: list[bytes] = (),
                 **params: Any) -> list[grpcclient.InferInput]:
    """The ensemble's inputs; `videos`: the encoded clips of the messages' video parts, in order."""
    def tensor(name: str, dtype: str, array: np.ndarray) -> grpcclient.InferInput:
        item = grpcclient.InferInput(name, list(array.shape), dtype)
        item.set_data_from_numpy(array)
        return item

    inputs = [tensor("MESSAGES", "BYTES", np.array([[json.dumps(messages).encode()]], dtype=np.object_))]
    if images:
        inputs.append(tensor("IMAGES", "BYTES", np.array([images], dtype=np.object_)))
    if videos:
        inputs.append(tensor("VIDEOS", "BYTES", np.array([list(videos)], dtype=np.object_)))
    stop = params.pop("stop", None)
    if stop:
        inputs.append(tensor("STOP", "BYTES", np.array([[s.encode() for s in stop]], dtype=np.object_)))
    # Stream migration: the answer's token ids delivered already (another server's responses' TOKEN_IDS).
    continuation = params.pop("continuation", None)
    if continuation:
        inputs.append(tensor("CONTINUATION", "INT64", np.array([list(continuation)], dtype=np.int64)))
    for key, value in params.items():
        if value is None or value == "" or (key in _DEFAULTS and value == _DEFAULTS[key]):
            continue
        if key in _STRING_TENSORS:
            inputs.append(tensor(_STRING_TENSORS[key], "BYTES", np.array([[value.encode()]], dtype=np.object_)))
            continue
        name, dtype, numpy_type = _PARAMETER_TENSORS[key]
        inputs.append(tensor(name, dtype, np.array([[value]], dtype=numpy_type)))
    return inputs


def _merge(result: EnsembleResult, response) -> bool:
    """Fold one response into the result; True when it was the last."""
    chunk = parse_response(response)
    result.deltas.append(chunk.text)
    if chunk.finished:  # usage, finish reason and version come with the last response only
        for name in (f.name for f in fields(ResponseChunk) if f.name not in ("text", "token_ids", "logprobs")):
            setattr(result, name, getattr(chunk, name))
    result.text += chunk.text
    result.token_ids += chunk.token_ids
    result.logprobs += chunk.logprobs
    return chunk.finished


def generate(
    url: str,
    model: str,
    messages: list[dict[str, Any]],
    images: list[bytes] = (),
    timeout: float = 120.0,
    on_delta=None,
    **params: Any,
) -> EnsembleResult:
    """One request on its own stream; raises `InferenceServerException` with Triton's error."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, build_inputs(messages, list(images), **params), enable_empty_final_response=False)
        result = EnsembleResult()
        while True:
            try:
                response, error = responses.get(timeout=timeout)
            except queue.Empty:
                raise InferenceServerException(f"no response from {model} within {timeout:.0f}s") from None
            if error is not None:
                raise error
            final = _merge(result, response)
            if on_delta is not None and result.deltas[-1]:
                on_delta(result.deltas[-1])
            if final:
                return result
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
