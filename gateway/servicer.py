"""`vlm.v1.VisionLanguageService`: validate, fetch allowlisted images and videos, call the family's ensemble."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
from tritonclient.utils import InferenceServerException
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway import image_urls, media_budget, migration, tracing
from gateway.affinity import RequestKey
from gateway.errors import ApiError
from gateway.keys import caller_var
from gateway.observability import Metrics, log_after_answer, request_id_var
from gateway.quotas import Quotas
from gateway.settings import Settings
from gateway.triton_backend import is_unloaded, pipeline_ready, to_api_error
from gateway.triton_pool import NoServerReady, TritonPool
from gateway.validation import ValidatedRequest, holds_video, validate
from vlm_serving import tasks, tools
from vlm_serving.generation.structured import TOOL_CALL
from vlm_serving.pipelines import FAMILIES, ROUTER
from vlm_serving.preprocessing.images import stored_geometry

log = logging.getLogger("gateway")

IMAGE_KINDS = {"photo": vlm_pb2.IMAGE_KIND_PHOTO, "document": vlm_pb2.IMAGE_KIND_DOCUMENT,
               "diagram": vlm_pb2.IMAGE_KIND_DIAGRAM}
ROUTE_REASONS = {"image_kind": vlm_pb2.ROUTE_REASON_IMAGE_KIND, "low_confidence": vlm_pb2.ROUTE_REASON_LOW_CONFIDENCE,
                 "default": vlm_pb2.ROUTE_REASON_DEFAULT, "fallback_failed": vlm_pb2.ROUTE_REASON_FALLBACK_FAILED,
                 "specialist_failed": vlm_pb2.ROUTE_REASON_SPECIALIST_FAILED, "video": vlm_pb2.ROUTE_REASON_VIDEO}
FINISH_REASONS = {
    "stop": vlm_pb2.FINISH_REASON_STOP,
    "length": vlm_pb2.FINISH_REASON_LENGTH,
    "cancelled": vlm_pb2.FINISH_REASON_CANCELLED,
}


class VisionLanguageServicer(vlm_pb2_grpc.VisionLanguageServiceServicer):
    def __init__(self, settings: Settings, backend: TritonPool, metrics: Metrics):
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        # The public name of each family, for the answers model "auto" routes.
        self.public_names = {ensemble: name for name, ensemble in reversed(settings.models.items())}
        # The requests being handled (their tasks), and how they end when a drain's grace ends.
        self.running: set[asyncio.Task] = set()
        self.ended: ApiError | None = None
        self.quotas = Quotas(settings.model_capacity)
        self.media = media_budget.MediaBudget(settings.max_inflight_media_bytes)

    def _answering_model(self, requested: str, chunk) -> str:
        family = chunk.route.get("family")
        return self.public_names.get(family, family) if family else requested

    def _finish(self, message, chunk, outcome: "Outcome | None") -> None:
        """Finish reason, usage, confidence, route and the task's result onto a GenerateResponse or
        the last stream message."""
        if outcome is not None:
            outcome.write(message)
        message.finish_reason = FINISH_REASONS.get(chunk.finish_reason, vlm_pb2.FINISH_REASON_UNSPECIFIED)
        message.usage.CopyFrom(vlm_pb2.Usage(
            prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens, image_tokens=chunk.image_tokens,
            cached_tokens=chunk.cached_tokens,
        ))
        message.confidence = chunk.confidence
        message.model_version = chunk.model_version
        if chunk.route:
            # An attempt's "error" is new in ROUTE_INFO: a router not yet upgraded sends none.
            attempts = [vlm_pb2.RouteAttempt(model=self.public_names.get(a["family"], a["family"]),
                                             model_version=a["model_version"], confidence=a["confidence"],
                                             completion_tokens=a["completion_tokens"], error=a.get("error", ""))
                        for a in chunk.route["attempts"]]
            reason = ROUTE_REASONS[chunk.route["reason"]]
        else:
            attempts = [vlm_pb2.RouteAttempt(model=message.model, model_version=chunk.model_version,
                                             confidence=chunk.confidence, completion_tokens=chunk.completion_tokens)]
            reason = vlm_pb2.ROUTE_REASON_REQUESTED
        message.route.CopyFrom(vlm_pb2.Route(attempts=attempts, reason=reason, images=[
            vlm_pb2.ProcessedImage(kind=IMAGE_KINDS[image["kind"]], width=image["width"], height=image["height"])
            for image in chunk.images]))

    def collector(self, request, answer: vlm_pb2.GenerateResponse):
        """A `deliver` that folds every chunk into `answer` (a whole GenerateResponse)."""
        async def collect(chunk, call, outcome):
            answer.text += chunk.text
            answer.logprobs.extend(token_logprobs(chunk.logprobs))
            answer.request_id = call.request_id
            answer.model = self._answering_model(request.model, chunk)
            if chunk.finished:
                self._finish(answer, chunk, outcome)

        return collect

    def stream_message(self, request, chunk, call, outcome) -> vlm_pb2.GenerateStreamResponse:
        message = vlm_pb2.GenerateStreamResponse(text=chunk.text, model=self._answering_model(request.model, chunk),
                                                 request_id=call.request_id, logprobs=token_logprobs(chunk.logprobs))
        if chunk.finished:
            self._finish(message, chunk, outcome)
        return message

    async def Generate(self, request, context):
        answer = vlm_pb2.GenerateResponse(model=request.model)
        await self._serve(request, context, "Generate", False, self.collector(request, answer))
        return answer

    async def GenerateStream(self, request, context):
        # Written with context.write (not yielded), so the deadline also covers the wait for a
        # slow reader: a yield would hand that wait to gRPC, out of reach of our deadline.
        async def send(chunk, call, outcome):
            await context.write(self.stream_message(request, chunk, call, outcome))

        await self._serve(request, context, "GenerateStream", True, send)

    async def ListModels(self, request, context):
        try:
            index = await self.backend.repository_index()
            models = [await model_info(self.backend, name, ensemble, index)
                      for name, ensemble in sorted(self.settings.models.items())]
        except InferenceServerException as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the inference server is unavailable ({exc.message()})")
        return vlm_pb2.ListModelsResponse(models=models)

    async def _serve(self, request, context, method: str, stream: bool, deliver) -> None:
        error = await self.handle(request, context, method, stream, deliver)
        if error is not None:
            await context.abort_with_status(error.to_status())

    async def handle(self, request, context, method: str, stream: bool, deliver) -> ApiError | None:
        """One request to its end, with metrics and logs, whichever API it came by; every way it can
        fail ends in the ApiError returned. `context` needs `time_remaining()` (seconds, or None)
        and `set_trailing_metadata(pairs)`; `deliver(chunk, call, outcome)` sends each chunk."""
        model = request.model if request.model in self.settings.models else "unknown"
        task = asyncio.current_task()
        self.running.add(task)
        try:
            with self.media.hold():  # the request's images and videos, given back however it ends
                return await self._handle(request, context, model, method, stream, deliver, task)
        finally:
            self.running.discard(task)

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def end_remaining(self) -> None:
        """At the end of a drain's grace: every request still running ends with UNAVAILABLE (its
        generation row freed in Triton), never with gRPC's CANCELLED, which a caller may take for
        a call that never ran (what gRPC answers to calls that race a server's shutdown)."""
        self.ended = ApiError(grpc.StatusCode.UNAVAILABLE, "this gateway stopped (a drain's grace period ended) "
                              "before the answer was complete; it may have run in part")
        for task in self.running:
            task.cancel()

    async def _handle(self, request, context, model: str, method: str, stream: bool, deliver,
                      task: asyncio.Task) -> ApiError | None:
        caller = caller_var.get()
        with self.metrics.track(model, method, caller.name if caller else "") as outcome:
            refusal = self.quotas.admit(caller, model)  # before any of the request is read
            try:
                error = refusal if refusal is not None else await self._attempt(request, context, stream, deliver)
            except asyncio.CancelledError:  # the caller went away, its own deadline passed, or a drain ended
                if self.ended is not None and task.uncancel() == 0:
                    error = self.ended
                else:
                    remaining = context.time_remaining()
                    expired = remaining is not None and remaining <= 0
                    outcome["code"] = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                    raise
            finally:
                if refusal is None:
                    self.quotas.release(caller, model)
            if refusal is not None:
                self.metrics.child(self.metrics.quota_refusals, caller.name, refusal.limit).inc()
            if error is not None:
                outcome["code"] = error.code
                log.info("request refused", extra={"fields": {"model": model, "method": method,
                                                               "code": error.code.name, "error": error.message}})
            return error

    async def _attempt(self, request, context, stream: bool, deliver) -> ApiError | None:
        request_id = request.request_id
        try:
            media_budget.cover(media_budget.media_bytes(request))  # before they are held any longer
            with tracing.span("validate") as span:
                if holds_video(request, self.settings):  # probing video headers: off the loop that serves everyone
                    call = await asyncio.to_thread(validate, request, self.settings, stream)
                else:
                    call = validate(request, self.settings, stream)
                span.set_attribute(tracing.REQUEST_ID_ATTRIBUTE, call.request_id)
            request_id = call.request_id
            request_id_var.set(request_id)
            tracing.tag_request(request_id)
            context.set_trailing_metadata((("x-request-id", request_id),))
            remaining = context.time_remaining()
            timeout = self.settings.default_timeout_s
            if remaining is not None:  # a deadline already passed leaves 0 or less: _generate sends nothing
                timeout = min(remaining, timeout)
            try:
                # One deadline over everything the request waits for: image fetches, Triton, the reader.
                async with asyncio.timeout(timeout) as scope:
                    await self._generate(call, deliver, scope)
            except TimeoutError:
                if not scope.expired():
                    raise
                return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no complete answer within the deadline of {timeout:.1f}s")
        except ApiError as error:
            return error
        except Exception:
            log.exception("unexpected failure", extra={"fields": {"model": request.model}})
            return ApiError(grpc.StatusCode.INTERNAL,
                            f"internal error in the gateway (request id {request_id or 'unset'}); "
                            "the gateway logged the details under this id")
        return None

    async def _generate(self, call: ValidatedRequest, deliver, deadline: asyncio.Timeout) -> None:
        migration.deadline_var.set(deadline.when())  # a stream is continued elsewhere only within it
        with tracing.span("fetch media") as span:
            span.set_attributes({"vlm.images": len(call.images), "vlm.videos": len(call.videos)})
            fetched = await image_urls.fetch_all([*call.images, *call.videos], self.settings)
        images, videos = fetched[:len(call.images)], fetched[len(call.images):]
        if asyncio.get_running_loop().time() >= deadline.when():
            # The deadline passed before the request was read (validating it took longer) or while its
            # images and videos were fetched, and its timer has not fired yet: nobody waits for the answer, so
            # Triton never sees the request (where its images would be decoded and encoded for no one).
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "the deadline passed before the request was sent to the model; it was not sent")
        started, first = time.perf_counter(), None
        log.debug("request", extra={"fields": {"model": call.model, "images": len(images), "videos": len(videos),
                                               "max_tokens": call.params.max_tokens, "stream": call.params.stream}})
        routing = None
        if call.ensemble == ROUTER:
            routing = {"confidence_threshold": call.confidence_threshold, "fallback": call.fallback}
        wire_tools = tools.to_wire(call.tools)
        chunks = self.backend.generate(call.ensemble, call.messages, images, call.params, call.request_id,
                                       call.detail, routing, call.task, wire_tools, videos,
                                       affinity=RequestKey(call.ensemble, call.messages, images, videos, call.detail,
                                                           wire_tools))
        text, outcome = [], None
        with tracing.span("triton infer") as span:
            try:
                async with aclosing(chunks):
                    async for chunk in chunks:
                        text.append(chunk.text)
                        if chunk.finished and (call.task or call.tools):
                            outcome = Outcome.of(call, chunk.route.get("family") or call.ensemble, "".join(text), chunk, images)
                        if first is None and chunk.text:
                            first = time.perf_counter() - started
                            span.add_event("first token")
                            self.metrics.child(self.metrics.first_token, call.model).observe(first)
                        if chunk.finished:
                            span.set_attributes({"vlm.completion_tokens": chunk.completion_tokens,
                                                 "vlm.finish_reason": chunk.finish_reason})
                            self.metrics.count_usage(call.model, chunk.prompt_tokens, chunk.completion_tokens,
                                                     chunk.image_tokens)
                            self.quotas.charge(caller_var.get(), chunk.completion_tokens)
                            for image in chunk.images:
                                self.metrics.child(self.metrics.images, call.model, image["kind"]).inc()
                            if chunk.route:
                                self.metrics.child(self.metrics.routed, chunk.route["reason"]).inc()
                            # One line per request, at the end: enough to trace it, cheap on the hot path.
                            log_after_answer(log, "done", {
                                "model": call.model, "images": len(images), "stream": call.params.stream,
                                "finish_reason": chunk.finish_reason, "completion_tokens": chunk.completion_tokens,
                                "latency_s": round(time.perf_counter() - started, 4)})
                        await deliver(chunk, call, outcome)
            except InferenceServerException as exc:
                raise to_api_error(exc, call.model, [image.field for image in call.images],
                                   [video.field for video in call.videos]) from None
            except NoServerReady as exc:  # said with the model's public name
                raise ApiError(grpc.StatusCode.UNAVAILABLE, f"model {call.model!r} is not ready on any inference server "
                               f"({exc.states}); retry with backoff", retry_after_s=exc.retry_after_s) from None


RESULT_FIELDS = {tasks.Detections: "detections", tasks.TextLines: "text_lines", tasks.Document: "document",
                 tasks.Table: "table", tasks.Caption: "caption"}


def token_logprobs(entries: list[dict]) -> list[vlm_pb2.TokenLogprob]:
    """The engine's per-token log-probabilities (ResponseChunk.logprobs) as the API's messages."""
    return [vlm_pb2.TokenLogprob(token=entry["token"], bytes=bytes(entry["bytes"]), logprob=entry["logprob"],
                                 top_logprobs=[vlm_pb2.TokenLogprob(token=top["token"], bytes=bytes(top["bytes"]),
                                                                    logprob=top["logprob"])
                                               for top in entry.get("top_logprobs", ())])
            for entry in entries]


def _box(box: tasks.Box | None) -> vlm_pb2.Box | None:
    return None if box is None else vlm_pb2.Box(x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max)


def result_message(result):
    """The proto of a task's typed result."""
    if isinstance(result, tasks.Detections):
        return vlm_pb2.Detections(detections=[vlm_pb2.Detection(label=d.label, box=_box(d.box), image_index=d.image)
                                              for d in result.detections], boxes_outside=result.boxes_outside)
    if isinstance(result, tasks.TextLines):
        return vlm_pb2.TextLines(lines=[vlm_pb2.TextLine(text=line.text, box=_box(line.box), image_index=line.image)
                                        for line in result.lines], boxes_outside=result.boxes_outside)
    if isinstance(result, tasks.Document):
        return vlm_pb2.Document(markdown=result.markdown)
    if isinstance(result, tasks.Table):
        return vlm_pb2.Table(header=result.header, rows=[vlm_pb2.Table.Row(cells=row) for row in result.rows])
    return vlm_pb2.Caption(text=result.text)


@dataclass
class Outcome:
    """What the gateway reads in a whole answer: a task's typed result (or why there is none) and
    the tool calls."""

    result: object = None
    error: str = ""
    tool_calls: list = field(default_factory=list)

    @classmethod
    def of(cls, call: ValidatedRequest, family: str, text: str, chunk, images: list[bytes]) -> "Outcome":
        """From the final chunk (each image's served size) and the images as sent (their headers:
        stored size and EXIF orientation; Triton has already accepted them)."""
        outcome = cls(tool_calls=tools.parse_calls(text, call.tools) if call.tools else [])
        cut = chunk.finish_reason == "length"
        if call.params.response_format.type == TOOL_CALL and not outcome.tool_calls:
            outcome.error = ("max_tokens cut the call before it was complete (finish reason LENGTH); raise max_tokens"
                             if cut else "the answer holds no valid call")
        if call.task:
            try:
                geometry = [tasks.ImageGeometry(*stored_geometry(data), image["width"], image["height"])
                            for data, image in zip(images, chunk.images)]
                outcome.result = tasks.parse(call.task, family, text, geometry, cut=cut)
            except tasks.CutAnswer as exc:
                outcome.error = str(exc)
            except (tasks.ParseError, tasks.TaskError) as exc:
                outcome.error = f"the answer holds no {call.task} result: {exc}"
        return outcome

    def write(self, message) -> None:
        if self.result is not None:
            getattr(message, RESULT_FIELDS[type(self.result)]).CopyFrom(result_message(self.result))
        message.result_error = self.error
        # Each call gets an id the caller sends back with its result (Message.tool_call_id).
        message.tool_calls.extend(vlm_pb2.ToolCall(name=c.name, arguments=c.arguments, id=f"call_{uuid.uuid4().hex[:24]}")
                                  for c in self.tool_calls)


async def model_info(backend: TritonPool, name: str, ensemble: str, index: list[dict]) -> vlm_pb2.ModelInfo:
    """What ListModels says of one model: the versions of the generation step behind its ensemble."""
    info = vlm_pb2.ModelInfo(name=name, family=ensemble)
    versioned = ensemble if ensemble == ROUTER else f"{ensemble}_generate"
    for entry in index:
        if entry.get("name") == versioned and not is_unloaded(entry):
            info.versions.add(version=entry.get("version", ""), state=entry.get("state", ""),
                              reason=entry.get("reason", ""))
    info.ready = pipeline_ready(index, ensemble)
    if not info.ready:
        return info
    if ensemble == ROUTER:
        # What a request to the router may ask: what every family that can answer accepts (Qwen2.5-VL
        # alone while Pixtral is not ready: routing keeps its answer), and the sampling defaults they
        # share (one they differ in stays unset: it is the answering model's).
        families = [await model_info(backend, name, family, index) for family in FAMILIES]
        families = [family for family in families if family.ready]
        info.context_tokens = min(family.context_tokens for family in families)
        info.max_tokens = min(family.max_tokens for family in families)
        for field_name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            values = {getattr(f.defaults, field_name) if f.defaults.HasField(field_name) else None for f in families}
            if len(values) == 1 and None not in values:
                setattr(info.defaults, field_name, values.pop())
        return info
    parameters = await backend.model_parameters(f"{ensemble}_generate")
    info.quantization = parameters.get("quantization", "")
    info.context_tokens = int(parameters.get("context_tokens") or 0)
    limit = int(parameters.get("max_tokens_limit") or 0)
    # The limit requests are validated against, within the context (which the prompt shares).
    info.max_tokens = min(limit, info.context_tokens) if info.context_tokens else limit
    if parameters.get("sampling_defaults"):
        info.defaults.CopyFrom(vlm_pb2.GenerationConfig(**json.loads(parameters["sampling_defaults"])))
    return info
