"""Triton adapter for the generation step (decoupled): requests in, responses out through each
request's response sender, as text deltas (STREAM true) or one whole answer.

Scheduler `inflight` (default): `execute` hands each request to the instance's engine
(`vlm_serving.generation.engine`) and returns; the engine's thread answers. Scheduler `static`:
`execute` runs one `generate` over the dynamic batch (`vlm_serving.generation.batch`)."""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving import tasks
from vlm_serving.backend.common import error_response, model_parameters, optional_input, read_request_id, required_input
from vlm_serving.generation.cancellation import CancellationBoard
from vlm_serving.deploy.render import LANGUAGE_IMAGE_TENSORS
from vlm_serving.generation.batch import BatchGenerator, GenerationRequest, RequestUpdate, run_batch
from vlm_serving.generation.engine import EngineFull, EngineLoop, EngineStats, InflightEngine, RequestSink
from vlm_serving.generation.loading import load_model, load_tokenizer
from vlm_serving.generation.sampling import ParameterError, SamplingParams
from vlm_serving.generation.scheduling import EngineLimits
from vlm_serving.generation.structured import ResponseFormat
from vlm_serving.tracing import GenerationSpans, ModelTracing

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Qwen2.5-VL's clips: read where they come (a model repository rendered before video input sends
# none, and its prompts hold no clip); `check_request` refuses video tokens without them.
VIDEO_LANGUAGE_TENSORS = ("VIDEO_GRID_THW", "SECOND_PER_GRID_TS")


def _scalar(request, name: str, default):
    value = optional_input(request, name)
    return default if value is None else value.reshape(-1)[0].item()


def read_params(request) -> SamplingParams:
    """The request's parameters; those it leaves out stay None (the model's defaults apply)."""
    stop = optional_input(request, "STOP")
    response_format = optional_input(request, "RESPONSE_FORMAT")

    def given(name: str, kind):
        value = _scalar(request, name, None)
        return None if value is None else kind(value)

    return SamplingParams(
        # Absent: unset (until the answer or the context ends); 0 or less is refused by `validate`.
        max_tokens=given("MAX_TOKENS", int),
        temperature=given("TEMPERATURE", float),
        top_p=given("TOP_P", float),
        top_k=given("TOP_K", int),
        seed=given("SEED", int),
        stop=() if stop is None else tuple(s.decode("utf-8") for s in stop.reshape(-1)),
        repetition_penalty=given("REPETITION_PENALTY", float),
        presence_penalty=given("PRESENCE_PENALTY", float),
        frequency_penalty=given("FREQUENCY_PENALTY", float),
        logprobs=bool(given("LOGPROBS", bool)),
        top_logprobs=given("TOP_LOGPROBS", int) or 0,
        stream=bool(given("STREAM", bool)),
        response_format=ResponseFormat.from_wire(
            "" if response_format is None else response_format.reshape(-1)[0].decode("utf-8")),
    )


def to_response(update: RequestUpdate, version: str, image_info: bytes) -> "pb_utils.InferenceResponse":
    tensors = {
        "TEXT": np.array([[update.text.encode("utf-8")]], dtype=np.object_),
        "TOKEN_IDS": np.array([update.token_ids], dtype=np.int64).reshape(1, -1),
        "FINISH_REASON": np.array([[update.finish_reason.encode()]], dtype=np.object_),
        "PROMPT_TOKENS": np.array([[update.prompt_tokens]], dtype=np.int32),
        "COMPLETION_TOKENS": np.array([[update.completion_tokens]], dtype=np.int32),
        "IMAGE_TOKENS": np.array([[update.image_tokens]], dtype=np.int32),
        "CACHED_TOKENS": np.array([[update.cached_tokens]], dtype=np.int32),
        "CONFIDENCE": np.array([[update.confidence]], dtype=np.float32),
        "MODEL_VERSION": np.array([[version.encode()]], dtype=np.object_),
        "IMAGE_INFO": np.array([[image_info]], dtype=np.object_),
    }
    if update.logprobs:  # a request that does not ask pays nothing: no JSON, no tensor
        tensors["TOKEN_LOGPROBS"] = np.array([[json.dumps(update.logprobs).encode()]], dtype=np.object_)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


class EngineMetrics:
    """The engine's state on Triton's metrics endpoint (`vlm_engine_*`), at most once a second
    (each update crosses to the server process) and whenever the engine falls idle."""

    INTERVAL_S = 1.0
    GAUGES = (("running", "Rows in the running batch"), ("waiting", "Requests waiting for a row"),
              ("prefilling", "Rows being prefilled"), ("cache_tokens_used", "Key/value-cache token slots in use"),
              ("cached_blocks", "Full key/value-cache blocks kept for prefix reuse"))
    COUNTERS = (("steps", "Engine steps"), ("step_seconds", "Seconds spent in engine steps"),
                ("decode_tokens", "Tokens decoded (one per running row and step)"),
                ("prefill_tokens", "Prompt tokens prefilled"),
                ("cached_tokens", "Prompt tokens found in the prefix cache instead of prefilled"),
                ("preempted", "Rows preempted (recomputed later) for cache room or device memory"))

    def __init__(self, model: str, version: str, cache_budget: int, log_error):
        labels = {"model": model, "version": version}
        # The families must outlive their metrics (Triton refuses updates to a deleted family's).
        self.families = []

        def metric(name: str, text: str, kind):
            family = pb_utils.MetricFamily(name, text, kind)
            self.families.append(family)
            return family.Metric(labels=labels)

        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.gauges = {name: metric(f"vlm_engine_{name}", text, gauge) for name, text in self.GAUGES}
        self.counters = {name: metric(f"vlm_engine_{name}_total", text, counter) for name, text in self.COUNTERS}
        self.budget = metric("vlm_engine_cache_tokens_budget", "Key/value-cache token slots allowed", gauge)
        self.budget.set(cache_budget)
        self.reported = EngineStats()
        self.last = 0.0
        self.log_error = log_error

    def update(self, stats: EngineStats) -> None:
        now = time.monotonic()
        idle = not (stats.running or stats.waiting or stats.prefilling)
        if now - self.last < self.INTERVAL_S and not idle:
            return
        self.last = now
        try:
            for name, gauge in self.gauges.items():
                gauge.set(getattr(stats, name))
            for name, counter in self.counters.items():
                increase = getattr(stats, name) - getattr(self.reported, name)
                if increase:
                    counter.increment(increase)
                    setattr(self.reported, name, getattr(stats, name))
        except Exception as exc:  # metrics never fail a request
            self.log_error(f"engine metrics not updated: {exc!r}")


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        self.family = parameters["family"]
        self.version = args["model_version"]
        device = "cpu"
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.max_tokens_limit = int(parameters["max_tokens_limit"])
        self.logger = pb_utils.Logger
        self.cancellations = CancellationBoard()
        self.tracing = ModelTracing()
        started = time.perf_counter()
        model = load_model(parameters["checkpoint"], parameters["quantization"], device)
        self.generator = BatchGenerator(self.family, model, load_tokenizer(parameters["checkpoint"]), device,
                                        max_tokens_limit=self.max_tokens_limit)
        if parameters.get("sampling_defaults") != self.generator.defaults.to_json():
            self.logger.log_warn(
                f"{args['model_name']}: the checkpoint's sampling defaults {self.generator.defaults.to_json()} "
                f"differ from the rendered config's {parameters.get('sampling_defaults')} (ListModels shows the "
                "latter); re-render the configs for this checkpoint"
            )
        self.scheduler = parameters.get("scheduler", "static")
        if self.scheduler == "inflight":
            limits = EngineLimits.from_parameters(parameters)
            self.engine = InflightEngine(self.generator, limits)
            # The tasks' schemas (one image) compile in the background from now: at a real
            # vocabulary each takes seconds, which their first requests would otherwise wait.
            self.engine.prepare_formats([tasks.output_format(task, 1) for task in tasks.STRUCTURED])
            log_error = lambda message: self.logger.log_error(f"{self.family}: {message}")  # noqa: E731
            self.metrics = EngineMetrics(args["model_name"], self.version, limits.cache_tokens, log_error)
            self.engine.on_step = self.metrics.update
            self.loop = EngineLoop(self.engine, log_error=log_error)
            self.loop.start()
        self.logger.log_info(
            f"{args['model_name']} version {self.version}: loaded {parameters['checkpoint']} quantization={parameters['quantization']} "
            f"on {device} in {time.perf_counter() - started:.1f}s; scheduler {self.scheduler}"
        )

    def _read(self, request) -> GenerationRequest:
        """The request as the generator takes it, checked whole (`BatchGenerator.check_request`):
        any caller of Triton's port reaches this model directly, not only the ensembles."""
        input_ids = required_input(request, "INPUT_IDS")
        if input_ids.shape[0] != 1:
            raise ValueError(f"INPUT_IDS must be one prompt per request ([1, tokens]), got shape {list(input_ids.shape)}")
        params = read_params(request)
        if params.response_format.constrained and self.scheduler != "inflight":
            raise ParameterError("response_format needs the in-flight scheduler (render --scheduler inflight)")
        continuation = optional_input(request, "CONTINUATION")
        continuation = () if continuation is None else tuple(continuation.reshape(-1).tolist())
        if continuation and self.scheduler != "inflight":
            raise ParameterError("CONTINUATION needs the in-flight scheduler (render --scheduler inflight)")
        # Copies: in flight, the engine reads them after `execute` has returned and Triton may have
        # released the request's input buffers.
        language_tensors = {}
        for name, _, _ in LANGUAGE_IMAGE_TENSORS[self.family]:
            value = optional_input(request, name) if name in VIDEO_LANGUAGE_TENSORS else required_input(request, name)
            if value is not None:
                language_tensors[name.lower()] = value[0].copy()
        generation_request = GenerationRequest(
            input_ids=input_ids[0].astype(np.int64),
            params=params,
            image_embeds=required_input(request, "IMAGE_EMBEDS")[0].copy(),
            language_tensors=language_tensors,
            image_tokens=int(_scalar(request, "IMAGE_TOKENS", 0)),
            continuation=continuation,
        )
        self.generator.check_request(generation_request)
        return generation_request

    def execute(self, requests):
        accepted = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                generation_request = self._read(request)
            except (ParameterError, ValueError) as exc:
                sender.send(error_response(exc), flags=FINAL)
                continue
            except Exception as exc:  # never leave a request's stream open
                sender.send(error_response(exc, caller_error=False), flags=FINAL)
                continue
            image_info = optional_input(request, "IMAGE_INFO")
            image_info = b"[]" if image_info is None else bytes(image_info.reshape(-1)[0])
            accepted.append((generation_request, sender, self._sink(request, sender, read_request_id(request), image_info)))
        if self.scheduler == "inflight":
            for generation_request, sender, sink in accepted:
                self._submit(generation_request, sender, sink)
        elif accepted:
            sinks = [sink for _, _, sink in accepted]
            run_batch(
                self.generator, [generation_request for generation_request, _, _ in accepted],
                send_update=lambda index, update: sinks[index].send_update(update),
                send_error=lambda index, exc: sinks[index].send_error(exc),
                is_cancelled=lambda index: sinks[index].is_cancelled(),
                log_error=lambda message: self.logger.log_error(f"{self.family}: {message}"),
            )
        return None

    def _sink(self, request, sender, request_id: str, image_info: bytes) -> RequestSink:
        sink = RequestSink(
            send_update=lambda update: sender.send(to_response(update, self.version, image_info),
                                                   flags=FINAL if update.finished else 0),
            # A ParameterError after submission is the request's own: a format the grammar engine cannot compile.
            send_error=lambda exc: sender.send(error_response(exc, caller_error=isinstance(exc, ParameterError)),
                                               flags=FINAL),
            is_cancelled=lambda: request.is_cancelled() or self.cancellations.is_cancelled(request_id),
        )
        return self._traced(sink, request, request_id) if self.tracing.enabled else sink

    def _traced(self, sink: RequestSink, request, request_id: str) -> RequestSink:
        """The sink, recording the request's queue wait and generation spans on the way."""
        spans = GenerationSpans(self.tracing, request, request_id)

        def send_update(update):
            spans.update(update)
            sink.send_update(update)

        def send_error(exc):
            spans.failed(exc)
            sink.send_error(exc)

        return RequestSink(send_update=send_update, send_error=send_error, is_cancelled=sink.is_cancelled,
                           on_admitted=spans.admitted, on_refused=spans.refused)

    def _submit(self, generation_request: GenerationRequest, sender, sink: RequestSink) -> None:
        try:
            self.engine.submit(generation_request, sink)
        except (ParameterError, ValueError) as exc:
            sink.on_refused(exc)
            sender.send(error_response(exc), flags=FINAL)
        except EngineFull as exc:
            sink.on_refused(exc)
            # Triton core's own queue-full message: the gateway answers RESOURCE_EXHAUSTED (retryable).
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def finalize(self):
        if self.scheduler == "inflight":
            self.loop.stop(grace_s=30.0, reason=RuntimeError("the generation model was unloaded mid-request; retry"))
        self.tracing.shutdown()
