"""The gateway's only contact with Triton: ensemble calls on the gRPC stream API, model state.

All requests share one long-lived `ModelStreamInfer` stream, with responses routed back by request
id: a stream per request cost a fifth of the gateway's CPU (see perf/RESULTS.md). Triton's
errors become `ApiError`s with the status code a caller can act on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2_grpc
from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE
from tritonclient.grpc._infer_result import InferResult
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

from gateway.errors import ApiError, invalid_argument
from vlm_serving.deploy.render import pipeline
from vlm_serving.ensemble_client import ResponseChunk, build_inputs, parse_response
from vlm_serving.errors import CALLER_ERROR_PREFIX, INTERNAL_ERROR_PREFIX
from vlm_serving.sampling import SamplingParams

log = logging.getLogger("gateway")
_IMAGE_ERROR = re.compile(r"image (\d+): (.*)", re.S)


def pipeline_ready(index: list[dict], ensemble: str) -> bool:
    """Whether every model of the pipeline has a READY version in Triton's repository index.

    Triton's own per-model readiness looks at the newest version only, so a failed load of a new
    version reads as "not ready" although the previous version goes on serving; this reads what
    actually serves.
    """
    ready = {entry.get("name") for entry in index if entry.get("state") == "READY"}
    return all(name in ready for name in pipeline(ensemble))


def to_api_error(exc: InferenceServerException, model: str, ensemble: str, image_fields: list[str]) -> ApiError:
    message = exc.message() or str(exc)
    status = str(exc.status() or "")
    text = message.split(f"in ensemble '{ensemble}', ", 1)[-1]
    # Our models' own errors first (vlm_serving.errors); the rest are Triton's or the network's.
    if text.startswith(CALLER_ERROR_PREFIX):
        text = text[len(CALLER_ERROR_PREFIX) :]
        image = _IMAGE_ERROR.match(text)
        if image and int(image.group(1)) < len(image_fields):
            return invalid_argument([(image_fields[int(image.group(1))], image.group(2))])
        return invalid_argument([("messages", text)])
    if "UNAVAILABLE" in status or "failed to connect" in message or "Connection refused" in message:
        return ApiError(grpc.StatusCode.UNAVAILABLE, f"the inference server is unavailable ({message}); retry with backoff")
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in message:
        return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the answer was complete")
    if "Exceeds maximum queue size" in message:
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {model!r} is at capacity (queue full); retry with backoff"
        )
    if "unknown model" in message or "is not ready" in message or "not found" in message or "unavailable" in message:
        return ApiError(grpc.StatusCode.UNAVAILABLE, f"model {model!r} is not ready on the inference server ({text})")
    return ApiError(grpc.StatusCode.INTERNAL, f"inference failed: {text.removeprefix(INTERNAL_ERROR_PREFIX)}")


class _SharedStream:
    """One ModelStreamInfer call carrying many requests; a reader task routes responses by id.

    When the call fails (Triton stopped, connection lost) every request waiting on it gets the
    error, and the next request opens a new call.
    """

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub):
        self.call = stub.ModelStreamInfer()
        self.waiting: dict[str, asyncio.Queue] = {}
        self.write_lock = asyncio.Lock()  # grpc.aio allows one write in flight per call
        self.failed: InferenceServerException | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    raise InferenceServerException("the stream to Triton ended", status="StatusCode.UNAVAILABLE")
                queue = self.waiting.get(response.infer_response.id)
                if queue is not None:  # else: the caller gave up on this request already
                    queue.put_nowait(response)
        except grpc.RpcError as exc:
            self.failed = InferenceServerException(exc.details() or str(exc), status=str(exc.code()))
        except InferenceServerException as exc:
            self.failed = exc
        for queue in self.waiting.values():
            queue.put_nowait(self.failed)

    async def submit(self, request, request_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.waiting[request_id] = queue
        try:
            async with self.write_lock:
                await self.call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            self.waiting.pop(request_id, None)
            self.failed = self.failed or InferenceServerException(str(exc), status="StatusCode.UNAVAILABLE")
            raise self.failed from None
        return queue

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


class TritonBackend:
    def __init__(self, url: str):
        self.url = url
        self.client = triton_aio.InferenceServerClient(url)
        options = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                   ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE)]
        self._channel = grpc.aio.insecure_channel(url, options=options)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._stream: _SharedStream | None = None
        self._pending: set[asyncio.Task] = set()

    def _shared_stream(self) -> _SharedStream:
        if self._stream is None or self._stream.failed is not None:
            self._stream = _SharedStream(self._stub)
        return self._stream

    async def generate(
        self,
        ensemble: str,
        messages: list[dict],
        images: list[bytes],
        params: SamplingParams,
        request_id: str,
    ) -> AsyncIterator[ResponseChunk]:
        """The ensemble's responses as chunks.

        A consumer that stops early (client cancel, deadline) cancels the Triton stream and puts
        the request on the cancellation board, which frees its row in the running batch.
        Raises InferenceServerException for Triton's errors (see `to_api_error`).
        """
        # Triton-side id: unique per call, so no caller can name (and cancel) another's request.
        triton_id = f"{request_id}.{uuid.uuid4().hex}"
        inputs = build_inputs(
            messages,
            images,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=list(params.stop),
            repetition_penalty=params.repetition_penalty,
            stream=params.stream,
            request_id=triton_id,
        )

        # tritonclient's own request builder (a private helper of the pinned 2.73 release).
        request = _get_inference_request(
            model_name=ensemble, inputs=inputs, model_version="", request_id=triton_id, outputs=None,
            sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None,
        )
        stream = self._shared_stream()
        finished = False
        try:
            responses = await stream.submit(request, triton_id)
            while True:
                response = await responses.get()
                if isinstance(response, InferenceServerException):
                    raise response
                if response.error_message:
                    raise InferenceServerException(response.error_message)
                chunk = parse_response(InferResult(response.infer_response))
                finished = chunk.finished
                yield chunk
                if finished:
                    return
        finally:
            stream.waiting.pop(triton_id, None)
            if not finished:
                # Whatever ended the call early (caller gone, deadline, error), make sure generation
                # stops: a harmless no-op for a request Triton already ended. Not awaited, so it
                # never holds up the caller.
                task = asyncio.get_running_loop().create_task(self.cancel(triton_id))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def cancel(self, triton_id: str) -> None:
        ids = triton_aio.InferInput("REQUEST_IDS", [1], "BYTES")
        ids.set_data_from_numpy(np.array([triton_id.encode()], dtype=np.object_))
        try:
            await self.client.infer("cancel", [ids], client_timeout=5.0)
        except InferenceServerException as exc:
            log.warning("could not cancel in Triton", extra={"fields": {"triton_id": triton_id, "error": exc.message()}})

    async def server_live(self) -> bool:
        # Liveness, not readiness: with strict readiness one unloaded model makes the whole server
        # "not ready", while the others go on serving (the pipelines' states say what serves).
        try:
            return await self.client.is_server_live()
        except InferenceServerException:
            return False

    async def repository_index(self) -> list[dict]:
        index = await self.client.get_model_repository_index(as_json=True)
        return index.get("models", [])

    async def model_parameters(self, name: str) -> dict[str, str]:
        config = (await self.client.get_model_config(name, as_json=True))["config"]
        return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}

    async def load_model(self, name: str) -> None:
        await self.client.load_model(name)

    async def unload_model(self, name: str) -> None:
        await self.client.unload_model(name)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        await self._channel.close()
        await self.client.close()

