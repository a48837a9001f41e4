"""Sync and asyncio clients: deadlines on every call, retries with backoff on UNAVAILABLE."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from vlm_client.images import to_image

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def build_request(
    model: str,
    prompt: str | None = None,
    images: Iterable[Any] = (),
    messages: Iterable[vlm_pb2.Message] | None = None,
    request_id: str = "",
    **config: Any,
) -> vlm_pb2.GenerateRequest:
    """A request from a prompt and images (one user turn), or from ready-made messages."""
    if messages is None:
        parts = [vlm_pb2.Part(image=to_image(image)) for image in images]
        if prompt:
            parts.append(vlm_pb2.Part(text=prompt))
        messages = [vlm_pb2.Message(role="user", parts=parts)]
    return vlm_pb2.GenerateRequest(
        model=model, messages=list(messages), config=vlm_pb2.GenerationConfig(**config), request_id=request_id
    )


def _delays(retries: int, backoff: float) -> Iterator[float]:
    for attempt in range(retries):
        yield backoff * (2**attempt) * (0.5 + random.random() / 2)


class _Base:
    def __init__(self, address: str = "localhost:50051", api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.25):
        self.address = address
        key = api_key if api_key is not None else os.environ.get("VLM_API_KEY", "")
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff


class VLMClient(_Base):
    """Blocking client. `with VLMClient(...) as client: client.generate("pixtral", "Hi")`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = vlm_pb2_grpc.VisionLanguageServiceStub(self.channel)
        self.admin = vlm_pb2_grpc.ModelAdminServiceStub(self.channel)

    def __enter__(self) -> "VLMClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None):
        for delay in [*_delays(self.retries, self.backoff), None]:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or delay is None:
                    raise
                time.sleep(delay)

    def generate(self, model: str, prompt: str | None = None, images: Iterable[Any] = (), *,
                 timeout: float | None = None, **kwargs: Any) -> vlm_pb2.GenerateResponse:
        return self._call(self.stub.Generate, build_request(model, prompt, images, **kwargs), timeout)

    def stream(self, model: str, prompt: str | None = None, images: Iterable[Any] = (), *,
               timeout: float | None = None, **kwargs: Any) -> Iterator[vlm_pb2.GenerateStreamResponse]:
        """Text deltas as they come; retried on UNAVAILABLE only before the first one arrived."""
        request = build_request(model, prompt, images, **kwargs)
        for delay in [*_delays(self.retries, self.backoff), None]:
            call = self.stub.GenerateStream(request, timeout=timeout or self.timeout, metadata=self.metadata)
            received = False
            try:
                for message in call:
                    received = True
                    yield message
                return
            except grpc.RpcError as error:
                if received or error.code() not in RETRYABLE or delay is None:
                    raise
                time.sleep(delay)
            finally:
                call.cancel()

    def list_models(self, timeout: float | None = None) -> list[vlm_pb2.ModelInfo]:
        return list(self._call(self.stub.ListModels, vlm_pb2.ListModelsRequest(), timeout).models)

    def load_model(self, model: str, timeout: float | None = 600.0) -> vlm_pb2.LoadModelResponse:
        """Put the repository's current versions and config of `model` live (admin key)."""
        return self._call(self.admin.LoadModel, vlm_pb2.LoadModelRequest(model=model), timeout)

    def unload_model(self, model: str, timeout: float | None = 120.0) -> vlm_pb2.UnloadModelResponse:
        return self._call(self.admin.UnloadModel, vlm_pb2.UnloadModelRequest(model=model), timeout)


class AsyncVLMClient(_Base):
    """asyncio client. `async with AsyncVLMClient(...) as client: await client.generate(...)`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = vlm_pb2_grpc.VisionLanguageServiceStub(self.channel)

    async def __aenter__(self) -> "AsyncVLMClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, timeout: float | None):
        for delay in [*_delays(self.retries, self.backoff), None]:
            try:
                return await method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE or delay is None:
                    raise
                await asyncio.sleep(delay)

    async def generate(self, model: str, prompt: str | None = None, images: Iterable[Any] = (), *,
                       timeout: float | None = None, **kwargs: Any) -> vlm_pb2.GenerateResponse:
        return await self._call(self.stub.Generate, build_request(model, prompt, images, **kwargs), timeout)

    async def stream(self, model: str, prompt: str | None = None, images: Iterable[Any] = (), *,
                     timeout: float | None = None, **kwargs: Any) -> AsyncIterator[vlm_pb2.GenerateStreamResponse]:
        request = build_request(model, prompt, images, **kwargs)
        for delay in [*_delays(self.retries, self.backoff), None]:
            call = self.stub.GenerateStream(request, timeout=timeout or self.timeout, metadata=self.metadata)
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.aio.AioRpcError as error:
                if received or error.code() not in RETRYABLE or delay is None:
                    raise
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def list_models(self, timeout: float | None = None) -> list[vlm_pb2.ModelInfo]:
        return list((await self._call(self.stub.ListModels, vlm_pb2.ListModelsRequest(), timeout)).models)
