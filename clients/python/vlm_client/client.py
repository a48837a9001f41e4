"""Sync and asyncio clients: one deadline per call, retries only where no work can have been done."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from vlm_client.images import to_image
from vlm_client.videos import to_video

# Retried by any call: only what provably did no work. The gateway marks such refusals (a full
# queue, a model not loaded yet) with google.rpc.RetryInfo. A CANCELLED the client did not cause is
# one too: the gateway never ends a call it ran with CANCELLED (a drain ends the calls left with
# UNAVAILABLE), while gRPC answers CANCELLED to a call that raced a server's shutdown before any of
# it ran (grpc/grpc#41785): a drain's moment, retried on the connection to the next replica.
# Reads (ListModels) are also retried on
# UNAVAILABLE: running them twice is harmless. Every call first waits for a connection, at most
# `connect_timeout` seconds, so a gateway that is starting is not mistaken for a failure, and one
# that is down is reported within seconds (gRPC's own wait_for_ready would wait out the deadline).
IDEMPOTENT_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
DEFAULT_ADDRESS = "localhost:50051"
# The short names `build_request` takes for a task and an image detail (vlm.v1's enums, unspecified left out).
TASKS = tuple(name.removeprefix("TASK_").lower() for name in vlm_pb2.Task.keys()[1:])
DETAILS = tuple(name.removeprefix("IMAGE_DETAIL_").lower() for name in vlm_pb2.ImageDetail.keys()[1:])


class GatewayUnreachable(grpc.RpcError):
    """No connection to the gateway within the client's `connect_timeout`: nothing was sent.
    Its code is UNAVAILABLE, as for any failed connection; it is not retried (waiting for the
    connection was the retry)."""

    def __init__(self, address: str, waited_s: float):
        super().__init__(f"no connection to the gateway at {address} within {waited_s:.3g}s")
        self.address = address

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self.args[0]


def retry_info_delay(error: grpc.RpcError) -> float | None:
    """The delay a google.rpc.RetryInfo detail of the error asks for, or None (not retryable)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def to_dict(message) -> dict:
    """A message as JSON-ready data with every field, those at their default (0, "", []) too, named
    as in the .proto file: proto3's own JSON leaves defaults out, and consumers then miss keys."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def response_format(*, json_schema: dict | str | None = None, json_object: bool = False, regex: str | None = None,
                    choices: Iterable[str] | None = None) -> vlm_pb2.ResponseFormat:
    """A ResponseFormat for `build_request(..., response_format=...)`: give exactly one of a JSON
    Schema (a dict or JSON text), json_object, a regex or choices."""
    given = [json_schema is not None, json_object, regex is not None, choices is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of json_schema, json_object, regex or choices")
    Format = vlm_pb2.ResponseFormat
    if json_schema is not None:
        schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return Format(type=Format.RESPONSE_FORMAT_JSON_SCHEMA, json_schema=schema)
    if json_object:
        return Format(type=Format.RESPONSE_FORMAT_JSON_OBJECT)
    if regex is not None:
        return Format(type=Format.RESPONSE_FORMAT_REGEX, regex=regex)
    return Format(type=Format.RESPONSE_FORMAT_CHOICE, choices=list(choices))


def build_request(
    model: str,
    prompt: str | None = None,
    images: Iterable[Any] = (),
    messages: Iterable[vlm_pb2.Message] | None = None,
    request_id: str = "",
    detail: int | str | None = None,
    routing: dict[str, Any] | None = None,
    task: int | str | None = None,
    tools: Iterable[dict | vlm_pb2.Tool] = (),
    tool_choice: str | None = None,
    videos: Iterable[Any] = (),
    **config: Any,
) -> vlm_pb2.GenerateRequest:
    """A request from a prompt, images and videos (one user turn: images, videos, then the prompt),
    or from ready-made messages. `videos`: paths, bytes, URLs or `to_video(source, fps, max_frames)`
    for a clip sampled otherwise than at the service's defaults. `detail`:
    an ImageDetail value or its short name ("auto", "low", "high"); None: the model's default.
    `routing` (model "auto"): RoutingOptions fields, e.g. {"confidence_threshold": -0.5}.
    `task`: a Task value or its short name ("grounding", "ocr", ...); the answer then carries the
    task's typed result. `tools`: functions the model may call ({"name", "description", "parameters":
    a JSON Schema dict or text}); `tool_choice`: "auto" (default), "none", "required" or a tool's name.
    `config`: GenerationConfig fields (see `response_format` for shapes)."""
    if isinstance(detail, str):
        detail = vlm_pb2.ImageDetail.Value(f"IMAGE_DETAIL_{detail.upper()}")
    if isinstance(task, str):
        task = vlm_pb2.Task.Value(f"TASK_{task.upper()}")
    tool_messages = [tool if isinstance(tool, vlm_pb2.Tool) else vlm_pb2.Tool(
        name=tool["name"], description=tool.get("description", ""),
        parameters=tool["parameters"] if isinstance(tool.get("parameters"), str) else json.dumps(tool.get("parameters", {})))
        for tool in tools]
    modes = {"auto": vlm_pb2.ToolChoice.TOOL_CHOICE_AUTO, "none": vlm_pb2.ToolChoice.TOOL_CHOICE_NONE,
             "required": vlm_pb2.ToolChoice.TOOL_CHOICE_REQUIRED}
    choice = None
    if tool_choice:
        choice = vlm_pb2.ToolChoice(mode=modes.get(tool_choice, vlm_pb2.ToolChoice.TOOL_CHOICE_NAMED),
                                    name="" if tool_choice in modes else tool_choice)
    if messages is None:
        parts = [vlm_pb2.Part(image=to_image(image)) for image in images]
        parts += [vlm_pb2.Part(video=to_video(video)) for video in videos]
        if prompt:
            parts.append(vlm_pb2.Part(text=prompt))
        messages = [vlm_pb2.Message(role="user", parts=parts)]
    return vlm_pb2.GenerateRequest(
        model=model, messages=list(messages), config=vlm_pb2.GenerationConfig(**config), request_id=request_id,
        detail=detail or vlm_pb2.IMAGE_DETAIL_UNSPECIFIED,
        routing=vlm_pb2.RoutingOptions(**routing) if routing else None,
        task=task or vlm_pb2.TASK_UNSPECIFIED,
        tools=tool_messages,
        tool_choice=choice,
    )


class _Attempts:
    """One call's retries under one absolute deadline: every attempt gets only what is left."""

    def __init__(self, client: "_Base", timeout: float | None, idempotent: bool):
        self.deadline = time.monotonic() + (timeout or client.timeout)
        self.retries, self.backoff, self.idempotent = client.retries, client.backoff, idempotent
        self.connect_timeout_s = client.connect_timeout
        self.attempt = 0

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def connect_timeout(self) -> float:
        """How long this attempt may wait for a connection: the client's connect_timeout, within the deadline."""
        return min(self.connect_timeout_s, self.remaining())

    def delay_before_retry(self, error: grpc.RpcError) -> float | None:
        """How long to wait before the next attempt, or None to give up and raise `error`."""
        if isinstance(error, GatewayUnreachable):
            return None
        asked = retry_info_delay(error)
        if asked is None and error.code() == grpc.StatusCode.CANCELLED:
            asked = 0.0  # never caused here (a local cancel ends these loops otherwise): see the top
        if asked is None and not (self.idempotent and error.code() in IDEMPOTENT_RETRYABLE):
            return None
        delay = max(asked or 0.0, self.backoff * (2**self.attempt) * (0.5 + random.random() / 2))
        if self.attempt >= self.retries or time.monotonic() + delay >= self.deadline:
            return None
        self.attempt += 1
        return delay


def tls_credentials(ca_file: str | None = None, cert_file: str | None = None,
                    key_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS to a gateway that serves it: trust `ca_file` (default: $VLM_CA_FILE; unset: the system's
    authorities) and, for mutual TLS, present `cert_file` with its `key_file` (default: $VLM_CERT_FILE,
    $VLM_KEY_FILE). None (plain text) when none of them is set."""
    ca_file = ca_file or os.environ.get("VLM_CA_FILE") or None
    cert_file = cert_file or os.environ.get("VLM_CERT_FILE") or None
    key_file = key_file or os.environ.get("VLM_KEY_FILE") or None
    if bool(cert_file) != bool(key_file):
        raise ValueError("cert_file and key_file (--cert-file/--key-file, $VLM_CERT_FILE/$VLM_KEY_FILE) go "
                         "together: a client certificate needs its private key")
    if not (ca_file or cert_file):
        return None

    def read(path: str | None, name: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as exc:
            raise ValueError(f"{name}: {path}: {exc.strerror}; give a PEM file") from None

    return grpc.ssl_channel_credentials(read(ca_file, "ca_file (--ca-file, $VLM_CA_FILE)"),
                                        read(key_file, "key_file (--key-file, $VLM_KEY_FILE)"),
                                        read(cert_file, "cert_file (--cert-file, $VLM_CERT_FILE)"))


class _Base:
    """`address`: the gateway's host:port (default: $VLM_ADDRESS, else localhost:50051); `api_key`
    (default: $VLM_API_KEY); `timeout`: each call's deadline in seconds, its retries included;
    `connect_timeout`: how long a call waits for a connection to the gateway before failing with
    GatewayUnreachable (UNAVAILABLE), within that deadline; `ca_file`, `cert_file`, `key_file`: TLS
    (see `tls_credentials`; default: plain text)."""

    def __init__(self, address: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.25, connect_timeout: float = 5.0,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None):
        self.address = address or os.environ.get("VLM_ADDRESS") or DEFAULT_ADDRESS
        self.credentials = tls_credentials(ca_file, cert_file, key_file)
        key = api_key if api_key is not None else os.environ.get("VLM_API_KEY", "")
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.connect_timeout = connect_timeout


class VLMClient(_Base):
    """Blocking client. `with VLMClient(...) as client: client.generate("pixtral", "Hi")`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.channel = (grpc.secure_channel(self.address, self.credentials) if self.credentials
                        else grpc.insecure_channel(self.address))
        self.stub = vlm_pb2_grpc.VisionLanguageServiceStub(self.channel)
        self.admin = vlm_pb2_grpc.ModelAdminServiceStub(self.channel)
        # Whether a call went through since the channel was made or a call found no connection:
        # until then each call first waits for one (a check costs a thread and about 2 ms).
        self._connection_seen = False

    def connected(self, timeout: float = 0.2) -> bool:
        """Whether the channel has (or makes within `timeout` s) a connection to the gateway."""
        if self._connection_seen:
            return True
        try:
            self.wait_connected(timeout)
            return True
        except GatewayUnreachable:
            return False

    def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a connection to the gateway, at most `timeout` s (default: connect_timeout);
        raise GatewayUnreachable if none is made."""
        timeout = self.connect_timeout if timeout is None else timeout
        # Its polling thread may raise at a close of the channel while a second check is pending:
        # checks are kept rare (see _connect) and a timed-out one is cancelled.
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()
            raise GatewayUnreachable(self.address, timeout) from None

    def _connect(self, attempts: _Attempts) -> None:
        """Before a call: wait for a connection (at most connect_timeout) unless one was seen."""
        if not self._connection_seen:
            self.wait_connected(attempts.connect_timeout())
            self._connection_seen = True

    def _note_failure(self, error: grpc.RpcError) -> None:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self._connection_seen = False  # perhaps gone: the next call waits for a connection again

    def __enter__(self) -> "VLMClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None, idempotent: bool = False):
        attempts = _Attempts(self, timeout, idempotent)
        while True:
            try:
                self._connect(attempts)
                return method(request, timeout=attempts.remaining(), metadata=self.metadata)
            except grpc.RpcError as error:
                self._note_failure(error)
                delay = attempts.delay_before_retry(error)
                if delay is None:
                    raise
                time.sleep(delay)

    def generate(self, model: str, prompt: str | None = None, images: Iterable[Any] = (), *,
                 timeout: float | None = None, **kwargs: Any) -> vlm_pb2.GenerateResponse:
        return self._call(self.stub.Generate, build_request(model, prompt, images, **kwargs), timeout)

    def stream(self, model: str, prompt: str | None = None, images: Iterable[Any] = (), *,
               timeout: float | None = None, **kwargs: Any) -> Iterator[vlm_pb2.GenerateStreamResponse]:
        """Text deltas as they come; a refusal that did no work is retried, never a stream that
        has sent its first message."""
        request = build_request(model, prompt, images, **kwargs)
        attempts = _Attempts(self, timeout, idempotent=False)
        while True:
            self._connect(attempts)
            call = self.stub.GenerateStream(request, timeout=attempts.remaining(), metadata=self.metadata)
            received = False
            try:
                for message in call:
                    received = True
                    yield message
                return
            except grpc.RpcError as error:
                self._note_failure(error)
                delay = None if received else attempts.delay_before_retry(error)
                if delay is None:
                    raise
                time.sleep(delay)
            finally:
                call.cancel()

    def list_models(self, timeout: float | None = None) -> list[vlm_pb2.ModelInfo]:
        return list(self._call(self.stub.ListModels, vlm_pb2.ListModelsRequest(), timeout, idempotent=True).models)

    def load_model(self, model: str, timeout: float | None = 600.0) -> vlm_pb2.LoadModelResponse:
        """Put the repository's current versions and config of `model` live (admin key)."""
        return self._call(self.admin.LoadModel, vlm_pb2.LoadModelRequest(model=model), timeout)

    def unload_model(self, model: str, timeout: float | None = 120.0) -> vlm_pb2.UnloadModelResponse:
        return self._call(self.admin.UnloadModel, vlm_pb2.UnloadModelRequest(model=model), timeout)

    def list_backends(self, timeout: float | None = None) -> list[vlm_pb2.Backend]:
        """The inference servers behind the gateway and their state (admin key)."""
        return list(self._call(self.admin.ListBackends, vlm_pb2.ListBackendsRequest(), timeout, idempotent=True).backends)


class AsyncVLMClient(_Base):
    """asyncio client. `async with AsyncVLMClient(...) as client: await client.generate(...)`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _loop_channel(self) -> grpc.aio.Channel:
        """The channel of the running event loop, made on first use (a client built at module
        level, or reused across `asyncio.run` calls, gets a channel of each loop)."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel = (grpc.aio.secure_channel(self.address, self.credentials) if self.credentials
                             else grpc.aio.insecure_channel(self.address))
            self._loop = loop
            self._stub = vlm_pb2_grpc.VisionLanguageServiceStub(self._channel)
        return self._channel

    @property
    def stub(self) -> vlm_pb2_grpc.VisionLanguageServiceStub:
        """The stub on the running event loop's channel."""
        self._loop_channel()
        return self._stub

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a connection to the gateway, at most `timeout` s (default: connect_timeout);
        raise GatewayUnreachable if none is made."""
        timeout = self.connect_timeout if timeout is None else timeout
        channel = self._loop_channel()
        if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise GatewayUnreachable(self.address, timeout) from None

    async def __aenter__(self) -> "AsyncVLMClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None and self._loop is asyncio.get_running_loop():
            await self._channel.close()
        self._channel = None

    async def _call(self, method_name: str, request, timeout: float | None, idempotent: bool = False):
        attempts = _Attempts(self, timeout, idempotent)
        while True:
            try:
                await self.wait_connected(attempts.connect_timeout())
                return await getattr(self.stub, method_name)(request, timeout=attempts.remaining(),
                                                             metadata=self.metadata)
            except grpc.RpcError as error:
                delay = attempts.delay_before_retry(error)
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def generate(self, model: str, prompt: str | None = None, images: Iterable[Any] = (), *,
                       timeout: float | None = None, **kwargs: Any) -> vlm_pb2.GenerateResponse:
        return await self._call("Generate", build_request(model, prompt, images, **kwargs), timeout)

    async def stream(self, model: str, prompt: str | None = None, images: Iterable[Any] = (), *,
                     timeout: float | None = None, **kwargs: Any) -> AsyncIterator[vlm_pb2.GenerateStreamResponse]:
        request = build_request(model, prompt, images, **kwargs)
        attempts = _Attempts(self, timeout, idempotent=False)
        while True:
            await self.wait_connected(attempts.connect_timeout())
            call = self.stub.GenerateStream(request, timeout=attempts.remaining(), metadata=self.metadata)
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.aio.AioRpcError as error:
                delay = None if received else attempts.delay_before_retry(error)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def list_models(self, timeout: float | None = None) -> list[vlm_pb2.ModelInfo]:
        return list((await self._call("ListModels", vlm_pb2.ListModelsRequest(), timeout, idempotent=True)).models)
