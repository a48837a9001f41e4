"""`vlm.v1.ModelAdminService`: load and unload models in Triton (explicit model control).

A model is its family's pipeline: `<family>_preprocess`, `<family>_encoder`, `<family>_embed` and
`<family>_generate`, then the `<family>` ensemble; the router `auto` is only itself
(`vlm_serving.pipelines.own_models`). Triton loads a new copy beside the serving one and switches when it is
ready, so requests keep being answered during a load; a failed load leaves the old copy serving.
Every call reaches every live inference server of the pool at once, and answers each one's result.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from tritonclient.utils import InferenceServerException
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway.keys import caller_var
from gateway.settings import Settings
from gateway.servicer import model_info
from gateway.triton_backend import unloading
from gateway.triton_pool import TritonPool
from vlm_serving.pipelines import own_models

log = logging.getLogger("gateway.admin")
# One line per admin call, for whoever must answer "who changed what, when": its own logger, so it can
# be routed (or kept) apart from the rest.
audit_log = logging.getLogger("gateway.audit")
# Triton's answer to a load or unload while it polls its repository.
_POLL_MODE = "explicit model load / unload is not allowed if polling is enabled"
POLL_MODE_REFUSAL = (
    "the inference server polls its model repository (model control mode poll) and loads changes "
    "there by itself; LoadModel and UnloadModel work only in explicit mode. `vlm models` shows what serves"
)


def audited(rpc):
    """Write the audit line of each call of `rpc`: who (the key's name), what (the RPC, its model),
    and the result (OK or the status code it ended with)."""
    @functools.wraps(rpc)
    async def call(self, request, context):
        result = "UNKNOWN"
        try:
            response = await rpc(self, request, context)
            result = "OK"
            return response
        except asyncio.CancelledError:
            result = "CANCELLED"
            raise
        except Exception:
            code = context.code()  # what context.abort set; none: an unexpected failure
            result = code.name if code is not None else "UNKNOWN"
            raise
        finally:
            caller = caller_var.get()
            audit_log.info("admin call", extra={"fields": {
                "key": caller.name if caller else "", "rpc": rpc.__name__,
                "model": getattr(request, "model", ""), "result": result}})

    return call


class ModelAdminServicer(vlm_pb2_grpc.ModelAdminServiceServicer):
    def __init__(self, settings: Settings, backend: TritonPool):
        self.settings = settings
        self.backend = backend

    async def _ensemble(self, name: str, context) -> str:
        if name not in self.settings.models:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {name!r} is not served here; available: {', '.join(sorted(self.settings.models))}")
        return self.settings.models[name]

    async def _on_every_server(self, operation: str, triton_model: str, context) -> dict[str, str]:
        try:
            results = await self.backend.on_every_server(operation, triton_model)
        except InferenceServerException as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc.message()}; retry when a server is back")
        if any(error == _POLL_MODE for error in results.values()):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, POLL_MODE_REFUSAL)
        return results

    @audited
    async def LoadModel(self, request, context):
        ensemble = await self._ensemble(request.model, context)
        started = time.perf_counter()
        for triton_model in own_models(ensemble):
            results = await self._on_every_server("load_model", triton_model, context)
            failed = {address: error for address, error in results.items() if error}
            if failed:
                log.warning("load failed", extra={"fields": {"model": request.model, "triton_model": triton_model,
                                                             "errors": failed}})
                loaded = [address for address, error in results.items() if not error]
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"loading {triton_model} failed; the previous version keeps serving: "
                    + "; ".join(f"on {a}: {e}" for a, e in failed.items())
                    + (f" (it loaded on {', '.join(loaded)})" if loaded else ""),
                )
        index = await self._settled_index(ensemble, context)
        seconds = time.perf_counter() - started
        log.info("loaded", extra={"fields": {"model": request.model, "load_seconds": round(seconds, 2),
                                             "backends": sorted(results)}})
        info = await model_info(self.backend, request.model, ensemble, index)
        return vlm_pb2.LoadModelResponse(model=info, load_seconds=seconds, backends=backend_results(results))

    @audited
    async def UnloadModel(self, request, context):
        ensemble = await self._ensemble(request.model, context)
        for triton_model in reversed(own_models(ensemble)):
            results = await self._on_every_server("unload_model", triton_model, context)
            failed = {address: error for address, error in results.items() if error}
            if failed:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"unloading {triton_model} failed on "
                                    + "; ".join(f"{a}: {e}" for a, e in failed.items()))
        index = await self._settled_index(ensemble, context)
        log.info("unloaded", extra={"fields": {"model": request.model}})
        return vlm_pb2.UnloadModelResponse(model=await model_info(self.backend, request.model, ensemble, index),
                                           backends=backend_results(results))

    @audited
    async def ListBackends(self, request, context):
        return vlm_pb2.ListBackendsResponse(backends=[
            vlm_pb2.Backend(address=server.address, healthy=server.healthy, outstanding_requests=server.outstanding,
                            ready_models=[name for name, ensemble in sorted(self.settings.models.items())
                                          if server.serves(ensemble)],
                            last_error=server.last_error, retired=server.retired)
            for server in self.backend.states()])

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


def backend_results(results: dict[str, str]) -> list[vlm_pb2.BackendResult]:
    return [vlm_pb2.BackendResult(address=address, error=error) for address, error in sorted(results.items())]
