"""`vlm.v1.ModelAdminService`: load and unload models in Triton (explicit model control).

A model is its family's pipeline: `<family>_preprocess`, `<family>_encoder`, `<family>_embed` and
`<family>_generate`, then the `<family>` ensemble; the router `auto` is only itself
(`vlm_serving.pipelines.own_models`). Triton loads a new copy beside the serving one and switches when it is
ready, so requests keep being answered during a load; a failed load leaves the old copy serving.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from tritonclient.utils import InferenceServerException
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway.settings import Settings
from gateway.servicer import model_info
from gateway.triton_backend import TritonBackend, unloading
from vlm_serving.pipelines import own_models

log = logging.getLogger("gateway.admin")
# Triton's answer to a load or unload while it polls its repository.
_POLL_MODE = "explicit model load / unload is not allowed if polling is enabled"
POLL_MODE_REFUSAL = (
    "the inference server polls its model repository (model control mode poll) and loads changes "
    "there by itself; LoadModel and UnloadModel work only in explicit mode. `vlm models` shows what serves"
)


class ModelAdminServicer(vlm_pb2_grpc.ModelAdminServiceServicer):
    def __init__(self, settings: Settings, backend: TritonBackend):
        self.settings = settings
        self.backend = backend

    async def _ensemble(self, name: str, context) -> str:
        if name not in self.settings.models:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {name!r} is not served here; available: {', '.join(sorted(self.settings.models))}")
        return self.settings.models[name]

    async def LoadModel(self, request, context):
        ensemble = await self._ensemble(request.model, context)
        started = time.perf_counter()
        for triton_model in own_models(ensemble):
            try:
                await self.backend.load_model(triton_model)
            except InferenceServerException as exc:
                if exc.message() == _POLL_MODE:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, POLL_MODE_REFUSAL)
                log.warning("load failed", extra={"fields": {"model": request.model, "triton_model": triton_model,
                                                             "error": exc.message()}})
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"loading {triton_model} failed; the previous version keeps serving: {exc.message()}",
                )
        index = await self._settled_index(ensemble, context)
        seconds = time.perf_counter() - started
        log.info("loaded", extra={"fields": {"model": request.model, "load_seconds": round(seconds, 2)}})
        info = await model_info(self.backend, request.model, ensemble, index)
        return vlm_pb2.LoadModelResponse(model=info, load_seconds=seconds)

    async def UnloadModel(self, request, context):
        ensemble = await self._ensemble(request.model, context)
        for triton_model in reversed(own_models(ensemble)):
            try:
                await self.backend.unload_model(triton_model)
            except InferenceServerException as exc:
                if exc.message() == _POLL_MODE:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, POLL_MODE_REFUSAL)
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"unloading {triton_model} failed: {exc.message()}")
        index = await self._settled_index(ensemble, context)
        log.info("unloaded", extra={"fields": {"model": request.model}})
        return vlm_pb2.UnloadModelResponse(model=await model_info(self.backend, request.model, ensemble, index))

    async def _settled_index(self, ensemble: str, context) -> list[dict]:
        """Triton's repository index once no version of the pipeline is UNLOADING any more.

        Triton unloads in the background (a replaced or unloaded version first finishes its
        requests in flight): the reply waits for that, within the call's deadline, so it reports
        where the model ends up, not a state that lasts a second.
        """
        index = await self.backend.repository_index()
        while unloading(index, ensemble) and (context.time_remaining() or 60) > 1:
            await asyncio.sleep(0.2)
            index = await self.backend.repository_index()
        return index
