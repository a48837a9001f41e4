"""The gateway's only contact with Triton: ensemble calls on the gRPC stream API, model state.

Small requests share one long-lived `ModelStreamInfer` stream, with responses routed back by
request id: a stream per request cost a fifth of the gateway's CPU (see perf/RESULTS.md). The
stream is owned by two tasks, a writer and a reader, so no caller ever awaits inside it: a caller
who gives up (cancelled, deadline) only forgets its own request. Requests whose images and videos exceed
`large_request_bytes` travel on a connection of their own, one stream each, so their megabytes
never queue ahead of small requests' bytes (TCP delivers a connection's bytes in order, whatever
HTTP/2 streams they belong to). Triton's errors become `ApiError`s with the status code a caller
can act on (`to_api_error`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2_grpc
from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE
from tritonclient.grpc._infer_result import InferResult
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

from gateway import tracing
from gateway.errors import ApiError, invalid_argument
from vlm_serving.pipelines import pipeline, serving_models
from vlm_serving.ensemble_client import ResponseChunk, build_inputs, parse_response
from vlm_serving.errors import CALLER_ERROR_PREFIX, INTERNAL_ERROR_PREFIX
from vlm_serving.generation.sampling import SamplingParams

log = logging.getLogger("gateway")
# Preprocessing's errors about one image or video: "image <k>: ..." (k counts the request's images).
_MEDIA_ERROR = re.compile(r"(image|video) (\d+): (.*)", re.S)
# Triton core's own messages (the stream API carries no status code): anchored, so that a model's
# message that merely mentions "not found" is never taken for a missing model.
_TRITON_MODEL_NOT_READY = re.compile(r"^Request for unknown model: '[^']*' (is not found|has no available versions"
                                     r"|version \S+ is not (found|at ready state))")
_TRITON_QUEUE_FULL = re.compile(r"^Exceeds maximum queue size")
# A Python model's stub process died (killed, out of memory). Triton 2.51 does not start a new one and
# keeps the model READY: every request to it fails so until the model is unloaded and loaded again.
_DEAD_STUB = re.compile(r"Stub process '(?P<model>\w+?)_\d+_\d+' is not healthy")
# What Triton core puts in front of a message: the request's id, the ensemble whose step failed.
_TRITON_PREFIXES = re.compile(r"^(\[request id: [^\]]*\] |in ensemble '[^']*', )+")


class TritonError(enum.Enum):
    """What a Triton error provably is: one classification, for failover (triton_pool) and for
    the caller's status code (`to_api_error`)."""

    CALLER = "the request is invalid (our models' prefix)"
    INTERNAL = "a model failed (our models' prefix)"
    TRANSPORT = "the connection or stream failed (status UNAVAILABLE): the server may be gone"
    DEADLINE = "the deadline passed"
    QUEUE_FULL = "refused before it ran: the model's queue is full"
    MODEL_NOT_READY = "refused before it ran: the model is not loaded on that server"
    OTHER = "anything else"


def classify(exc: InferenceServerException) -> tuple[TritonError, str]:
    """The error's kind and its message without Triton's prefixes."""
    text = _TRITON_PREFIXES.sub("", exc.message() or str(exc))
    status = str(exc.status() or "")
    if text.startswith(CALLER_ERROR_PREFIX):
        return TritonError.CALLER, text[len(CALLER_ERROR_PREFIX):]
    if text.startswith(INTERNAL_ERROR_PREFIX):
        return TritonError.INTERNAL, text[len(INTERNAL_ERROR_PREFIX):]
    if status == str(grpc.StatusCode.UNAVAILABLE):
        return TritonError.TRANSPORT, text
    if status == str(grpc.StatusCode.DEADLINE_EXCEEDED):
        return TritonError.DEADLINE, text
    if _TRITON_QUEUE_FULL.match(text):
        return TritonError.QUEUE_FULL, text
    if _TRITON_MODEL_NOT_READY.match(text):
        return TritonError.MODEL_NOT_READY, text
    return TritonError.OTHER, text


def pipeline_ready(index: list[dict], ensemble: str) -> bool:
    """Whether every model `ensemble` needs to answer (`serving_models`: for the router, itself and
    Qwen2.5-VL's pipeline) has a READY version in Triton's repository index.

    Triton's own per-model readiness looks at the newest version only, so a failed load of a new
    version reads as "not ready" although the previous version goes on serving; this reads what
    actually serves.
    """
    ready = {entry.get("name") for entry in index if entry.get("state") == "READY"}
    return all(name in ready for name in serving_models(ensemble))


def unloading(index: list[dict], ensemble: str) -> bool:
    """Whether any model of the pipeline is still unloading (Triton unloads in the background)."""
    models = set(pipeline(ensemble))
    return any(entry.get("name") in models and entry.get("state") == "UNLOADING" for entry in index)


def is_unloaded(entry: dict) -> bool:
    """A version Triton unloaded or that left the repository: listed by Triton, gone for the caller."""
    return entry.get("state") == "UNAVAILABLE" and entry.get("reason") == "unloaded"


def unavailable(reason: str) -> InferenceServerException:
    return InferenceServerException(reason, status=str(grpc.StatusCode.UNAVAILABLE))


def to_api_error(exc: InferenceServerException, model: str, image_fields: list[str],
                 video_fields: list[str] = ()) -> ApiError:
    """Map by what the error provably is (`classify`); anything unknown is INTERNAL (never a
    retryable guess). An error about the k-th image or video names that part's field."""
    kind, text = classify(exc)
    if kind is TritonError.CALLER:
        media = _MEDIA_ERROR.match(text)
        if media:
            fields = image_fields if media.group(1) == "image" else video_fields
            if int(media.group(2)) < len(fields):
                return invalid_argument([(fields[int(media.group(2))], media.group(3))])
        if text.startswith("response_format"):  # found when the generation step compiled it
            return invalid_argument([("config.response_format", text)])
        return invalid_argument([("messages", text)])
    if kind is TritonError.INTERNAL:
        return ApiError(grpc.StatusCode.INTERNAL, f"inference failed: {text}")
    dead_stub = _DEAD_STUB.search(text)
    if dead_stub:
        step = dead_stub.group("model")
        return ApiError(grpc.StatusCode.UNAVAILABLE,
                        f"model {model!r} is unavailable: the process of its step {step!r} on the inference server died "
                        f"({text}); retry with backoff. Operators: reload the step (unload and load {step}, or "
                        "restart Triton); Triton does not restart it")
    if kind is TritonError.TRANSPORT:
        return ApiError(grpc.StatusCode.UNAVAILABLE,
                        f"the inference server is unavailable ({exc.message() or exc}); retry with backoff")
    if kind is TritonError.DEADLINE:
        return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the answer was complete")
    # Refused before it ran: the only errors a client may retry (they carry RetryInfo).
    if kind is TritonError.QUEUE_FULL:
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {model!r} is at capacity (queue full); retry with backoff",
            retry_after_s=0.5,
        )
    if kind is TritonError.MODEL_NOT_READY:
        return ApiError(grpc.StatusCode.UNAVAILABLE, f"model {model!r} is not ready on the inference server ({text})",
                        retry_after_s=1.0)
    return ApiError(grpc.StatusCode.INTERNAL, f"inference failed: {text}")


def _describe(exc: BaseException | None) -> InferenceServerException:
    """Why the shared stream ended, as the error its waiters get (always UNAVAILABLE: retryable)."""
    if isinstance(exc, grpc.RpcError):
        return unavailable(f"the stream to Triton failed: {exc.code().name}: {exc.details()}")
    if isinstance(exc, InferenceServerException):
        return exc
    if exc is None or isinstance(exc, asyncio.CancelledError):
        return unavailable("the stream to Triton was closed")
    return unavailable(f"the stream to Triton failed: {type(exc).__name__}: {exc}")


class _SharedStream:
    """One ModelStreamInfer call carrying many requests; a writer task sends, a reader task routes.

    Callers only put requests on the outbox and read their own queue, so a caller's cancellation
    can never cancel the call. Any exit of either task (the call failed or ended, `close()`, a bug)
    fails every waiter at once with UNAVAILABLE and marks the stream dead, so the next request
    opens a new one.
    """

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, max_backlog: int):
        self.call = stub.ModelStreamInfer()
        self.max_backlog = max_backlog
        self.waiting: dict[str, asyncio.Queue] = {}
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.failed: InferenceServerException | None = None
        self.closing = False
        loop = asyncio.get_running_loop()
        self.writer = loop.create_task(self._guarded(self._write()))
        self.reader = loop.create_task(self._guarded(self._read()))

    def submit(self, request, triton_id: str) -> asyncio.Queue:
        """Queue the request for writing (never awaits); its responses arrive on the returned queue."""
        if self.failed is not None:
            raise self.failed
        responses: asyncio.Queue = asyncio.Queue()
        self.waiting[triton_id] = responses
        self.outbox.put_nowait((request, triton_id))
        return responses

    def forget(self, triton_id: str) -> None:
        self.waiting.pop(triton_id, None)

    async def _write(self) -> None:
        while True:
            request, triton_id = await self.outbox.get()
            if triton_id in self.waiting:  # else its caller gave up before its turn: nothing to send
                await self.call.write(request)

    async def _read(self) -> None:
        while True:
            response = await self.call.read()
            if response is grpc.aio.EOF:
                raise unavailable("the stream to Triton ended")
            self._route(response)

    def _route(self, response) -> None:
        triton_id = response.infer_response.id
        responses = self.waiting.get(triton_id)
        if responses is None:  # the caller gave up on this request already
            return
        if responses.qsize() >= self.max_backlog:
            # The caller stopped reading; the reader cannot wait for it without stalling everyone.
            self.waiting.pop(triton_id)
            responses.put_nowait(ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the stream fell more than {self.max_backlog} responses behind its reader; read it faster",
            ))
            return
        responses.put_nowait(response)

    async def _guarded(self, work) -> None:
        reason = None
        try:
            await work
        except BaseException as exc:
            reason = exc
            raise
        finally:
            self._fail(_describe(reason))

    def _fail(self, error: InferenceServerException) -> None:
        if self.failed is None:
            self.failed = error
            if not self.closing:
                log.warning("stream to Triton ended", extra={"fields": {"error": error.message(),
                                                                         "in_flight": len(self.waiting)}})
        waiting, self.waiting = self.waiting, {}
        for responses in waiting.values():
            responses.put_nowait(self.failed)
        self.call.cancel()
        for task in (self.writer, self.reader):
            if task is not asyncio.current_task():
                task.cancel()

    def close(self) -> None:
        self.closing = True
        self._fail(unavailable("the stream to Triton was closed"))


class TritonBackend:
    """Triton over gRPC for the gateway.

    `keepalive_s`: ping period on the connections, so a half-open connection fails its requests
    within `keepalive_s` plus the same again for the answer (Triton must accept such pings: see
    `vlm_serving.deploy.triton_server.GRPC_KEEPALIVE_FLAGS`). `connect_timeout_s`: how long a
    request waits for a connection to Triton that is down before it is refused (retryably: it was
    never sent). Reconnect attempts back off to at most `connect_timeout_s` / 2, so a Triton that
    comes back is reached within that bound, not after gRPC's default backoff of up to 120 s.
    `large_request_bytes`: image and video bytes
    above which a request gets a stream of its own on the bulk connection. `max_stream_backlog`:
    responses a request may have waiting for its reader before it is failed. `credentials`: TLS to
    Triton (None: plain text).
    """

    def __init__(self, url: str, keepalive_s: float = 30.0, large_request_bytes: int = 1 << 20,
                 max_stream_backlog: int = 1024, connect_timeout_s: float = 2.0,
                 credentials: grpc.ChannelCredentials | None = None):
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.large_request_bytes = large_request_bytes
        self.max_stream_backlog = max_stream_backlog
        keepalive_ms = int(keepalive_s * 1000)
        options = [
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", keepalive_ms),
            ("grpc.http2.ping_timeout_ms", keepalive_ms),  # any unanswered ping, keepalive or not
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", int(connect_timeout_s * 250)),
            ("grpc.max_reconnect_backoff_ms", int(connect_timeout_s * 500)),
            # Without it, channels with equal arguments share one connection (gRPC's global pool).
            ("grpc.use_local_subchannel_pool", 1),
        ]
        # The health probes' and admin calls' client reconnects as fast as the requests' channels: with
        # gRPC's default backoff (up to 120 s) a Triton back after an outage stayed "not serving" for seconds.
        self.client = triton_aio.InferenceServerClient(url, creds=credentials, channel_args=options)
        def channel() -> grpc.aio.Channel:
            if credentials is None:
                return grpc.aio.insecure_channel(url, options=options)
            return grpc.aio.secure_channel(url, credentials, options=options)

        self._channel = channel()
        self._bulk_channel = channel()
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._bulk_stub = service_pb2_grpc.GRPCInferenceServiceStub(self._bulk_channel)
        self._stream: _SharedStream | None = None
        self._pending: set[asyncio.Task] = set()

    async def _connected(self, channel: grpc.aio.Channel) -> None:
        """Wait (briefly) for the channel's connection; refuse the unsent request if Triton stays down.

        Only a request sent on a ready connection can have reached Triton: this refusal carries
        RetryInfo, the stream failures after it do not (the work may have run).
        """
        if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot connect to the inference server at {self.url} (no connection within "
                f"{self.connect_timeout_s:g} s); the request was not sent; retry with backoff",
                retry_after_s=self.connect_timeout_s,
            ) from None

    def _shared_stream(self) -> _SharedStream:
        if self._stream is None or self._stream.failed is not None:
            self._stream = _SharedStream(self._stub, self.max_stream_backlog)
        return self._stream

    async def _on_shared_stream(self, request, triton_id: str) -> AsyncIterator:
        await self._connected(self._channel)
        stream = self._shared_stream()
        responses = stream.submit(request, triton_id)
        try:
            while True:
                response = await responses.get()
                if isinstance(response, Exception):
                    raise response
                yield response
        finally:
            stream.forget(triton_id)

    async def _on_own_stream(self, request, metadata: list[tuple[str, str]] = ()) -> AsyncIterator:
        await self._connected(self._bulk_channel)
        call = self._bulk_stub.ModelStreamInfer(metadata=metadata or None)
        try:
            await call.write(request)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise unavailable("the stream to Triton ended")
                yield response
        except grpc.RpcError as exc:
            raise _describe(exc) from None
        finally:
            call.cancel()  # a no-op once Triton sent the final response

    async def generate(
        self,
        ensemble: str,
        messages: list[dict],
        images: list[bytes],
        params: SamplingParams,
        request_id: str,
        detail: str | None = None,
        routing: dict | None = None,
        task: str | None = None,
        tools: str = "",
        videos: list[bytes] = (),
        continuation: list[int] = (),
    ) -> AsyncIterator[ResponseChunk]:
        """The ensemble's responses as chunks (`routing`: model "auto"'s confidence_threshold and
        fallback; `videos`: the encoded clips of the messages' video parts, in their order;
        `continuation`: the answer's token ids another server delivered, see gateway/migration.py).

        A consumer that stops early (client cancel, deadline) puts the request on the
        cancellation board, which frees its row in the running batch.
        Raises InferenceServerException for Triton's errors (see `to_api_error`) and ApiError
        when the consumer falls too far behind.
        """
        # Triton-side id: unique per call, so no caller can name (and cancel) another's request.
        triton_id = f"{request_id}.{uuid.uuid4().hex}"
        inputs = build_inputs(
            messages,
            images,
            videos=list(videos),
            continuation=list(continuation),
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=list(params.stop),
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logprobs=params.logprobs,
            top_logprobs=params.top_logprobs,
            stream=params.stream,
            response_format=params.response_format.to_wire(),
            request_id=triton_id,
            detail=detail,
            task=task,
            tools=tools,
            **(routing or {}),
        )
        # tritonclient's own request builder (a private helper of the pinned 2.73 release).
        request = _get_inference_request(
            model_name=ensemble, inputs=inputs, model_version="", request_id=triton_id, outputs=None,
            sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None,
        )
        # Triton reads a trace context from the call's metadata only, which on the shared stream
        # belongs to every request on it: a traced request travels on a stream of its own.
        trace_context = tracing.trace_headers()
        if trace_context or sum(map(len, images)) + sum(map(len, videos)) > self.large_request_bytes:
            responses = self._on_own_stream(request, trace_context)
        else:
            responses = self._on_shared_stream(request, triton_id)
        finished = False
        try:
            async with aclosing(responses):
                async for response in responses:
                    if response.error_message:
                        raise InferenceServerException(response.error_message)
                    chunk = parse_response(InferResult(response.infer_response))
                    finished = chunk.finished
                    yield chunk
                    if finished:
                        return
        finally:
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
        except grpc.aio.UsageError:  # the gateway is shutting down: its connections are closed
            pass

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
        if self._pending:  # the cancellations of requests that just ended: let them reach Triton
            await asyncio.wait(self._pending, timeout=self.connect_timeout_s)
        if self._stream is not None:
            self._stream.close()
        for task in list(self._pending):
            task.cancel()
        await self._channel.close()
        await self._bulk_channel.close()
        await self.client.close()
