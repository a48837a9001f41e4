"""`vlm.v1.ModelAdminService`: load and unload models in Triton (explicit model control).

A model is its family's pipeline: `<family>_preprocess`, `<family>_encoder`, `<family>_embed` and
`<family>_generate`, then the `<family>` ensemble (`vlm_serving.deploy.render.pipeline`). Triton loads a new copy beside the serving one and switches when it is
ready, so requests keep being answered during a load; a failed load leaves the old copy serving.
"""

from __future__ import annotations

import logging
import time

import grpc
from tritonclient.utils import InferenceServerException
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway.settings import Settings
from gateway.servicer import model_info
from gateway.triton_backend import TritonBackend
from vlm_serving.deploy.render import pipeline

log = logging.getLogger("gateway.admin")


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
        for triton_model in pipeline(ensemble):
            try:
                await self.backend.load_model(triton_model)
            except InferenceServerException as exc:
                log.warning("load failed", extra={"fields": {"model": request.model, "triton_model": triton_model,
                                                             "error": exc.message()}})
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"loading {triton_model} failed; the previous version keeps serving: {exc.message()}",
                )
        seconds = time.perf_counter() - started
        log.info("loaded", extra={"fields": {"model": request.model, "load_seconds": round(seconds, 2)}})
        info = await model_info(self.backend, request.model, ensemble, await self.backend.repository_index())
        return vlm_pb2.LoadModelResponse(model=info, load_seconds=seconds)

    async def UnloadModel(self, request, context):
        ensemble = await self._ensemble(request.model, context)
        for triton_model in reversed(pipeline(ensemble)):
            try:
                await self.backend.unload_model(triton_model)
            except InferenceServerException as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"unloading {triton_model} failed: {exc.message()}")
        log.info("unloaded", extra={"fields": {"model": request.model}})
        info = await model_info(self.backend, request.model, ensemble, await self.backend.repository_index())
        return vlm_pb2.UnloadModelResponse(model=info)
