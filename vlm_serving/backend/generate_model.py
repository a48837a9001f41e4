"""Triton adapter for `vlm_serving.generation.batch` (decoupled): a batch of requests in, responses out
through each request's response sender, as text deltas (STREAM true) or one whole answer."""

from __future__ import annotations

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving.backend.common import error_response, model_parameters, optional_input, required_input
from vlm_serving.generation.cancellation import CancellationBoard
from vlm_serving.deploy.render import LANGUAGE_IMAGE_TENSORS
from vlm_serving.generation.batch import BatchGenerator, GenerationRequest, RequestUpdate, run_batch
from vlm_serving.generation.loading import load_model, load_tokenizer
from vlm_serving.generation.sampling import ParameterError, SamplingParams

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request, name: str, default):
    value = optional_input(request, name)
    return default if value is None else value.reshape(-1)[0].item()


def read_params(request) -> SamplingParams:
    """The request's parameters; those it leaves out stay None (the model's defaults apply)."""
    stop = optional_input(request, "STOP")

    def given(name: str, kind):
        value = _scalar(request, name, None)
        return None if value is None else kind(value)

    return SamplingParams(
        max_tokens=given("MAX_TOKENS", int) or SamplingParams().max_tokens,
        temperature=given("TEMPERATURE", float),
        top_p=given("TOP_P", float),
        top_k=given("TOP_K", int),
        seed=given("SEED", int),
        stop=() if stop is None else tuple(s.decode("utf-8") for s in stop.reshape(-1)),
        repetition_penalty=given("REPETITION_PENALTY", float),
        stream=bool(given("STREAM", bool)),
    )


def to_response(update: RequestUpdate, version: str, image_info: bytes) -> "pb_utils.InferenceResponse":
    tensors = {
        "TEXT": np.array([[update.text.encode("utf-8")]], dtype=np.object_),
        "TOKEN_IDS": np.array([update.token_ids], dtype=np.int64).reshape(1, -1),
        "FINISH_REASON": np.array([[update.finish_reason.encode()]], dtype=np.object_),
        "PROMPT_TOKENS": np.array([[update.prompt_tokens]], dtype=np.int32),
        "COMPLETION_TOKENS": np.array([[update.completion_tokens]], dtype=np.int32),
        "IMAGE_TOKENS": np.array([[update.image_tokens]], dtype=np.int32),
        "CONFIDENCE": np.array([[update.confidence]], dtype=np.float32),
        "MODEL_VERSION": np.array([[version.encode()]], dtype=np.object_),
        "IMAGE_INFO": np.array([[image_info]], dtype=np.object_),
    }
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


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
        started = time.perf_counter()
        model = load_model(parameters["checkpoint"], parameters["quantization"], device)
        self.generator = BatchGenerator(self.family, model, load_tokenizer(parameters["checkpoint"]), device)
        if parameters.get("sampling_defaults") != self.generator.defaults.to_json():
            self.logger.log_warn(
                f"{args['model_name']}: the checkpoint's sampling defaults {self.generator.defaults.to_json()} "
                f"differ from the rendered config's {parameters.get('sampling_defaults')} (ListModels shows the "
                "latter); re-render the configs for this checkpoint"
            )
        self.logger.log_info(
            f"{args['model_name']} version {self.version}: loaded {parameters['checkpoint']} quantization={parameters['quantization']} "
            f"on {device} in {time.perf_counter() - started:.1f}s"
        )

    def _read(self, request) -> GenerationRequest:
        input_ids = required_input(request, "INPUT_IDS").reshape(-1)
        params = read_params(request)
        params.validate(self.max_tokens_limit)
        if len(input_ids) + params.max_tokens > self.generator.max_context:
            raise ParameterError(
                f"prompt of {len(input_ids)} tokens + max_tokens {params.max_tokens} exceeds the model's "
                f"context of {self.generator.max_context} tokens; shorten the prompt or lower max_tokens"
            )
        language_tensors = {
            name.lower(): required_input(request, name)[0] for name, _, _ in LANGUAGE_IMAGE_TENSORS[self.family]
        }
        generation_request = GenerationRequest(
            input_ids=input_ids.astype(np.int64),
            params=params,
            image_embeds=required_input(request, "IMAGE_EMBEDS")[0],
            language_tensors=language_tensors,
            image_tokens=int(_scalar(request, "IMAGE_TOKENS", 0)),
        )
        self.generator.check_images(generation_request)
        return generation_request

    def execute(self, requests):
        accepted, senders, request_ids, image_infos = [], [], [], []
        for request in requests:
            sender = request.get_response_sender()
            try:
                accepted.append(self._read(request))
            except (ParameterError, ValueError) as exc:
                sender.send(error_response(exc), flags=FINAL)
                continue
            except Exception as exc:  # never leave a request's stream open
                sender.send(error_response(exc, caller_error=False), flags=FINAL)
                continue
            senders.append((request, sender))
            request_id = optional_input(request, "REQUEST_ID")
            request_ids.append("" if request_id is None else request_id.reshape(-1)[0].decode("utf-8"))
            image_info = optional_input(request, "IMAGE_INFO")
            image_infos.append(b"[]" if image_info is None else bytes(image_info.reshape(-1)[0]))
        if not accepted:
            return None

        def is_cancelled(index: int) -> bool:
            return senders[index][0].is_cancelled() or self.cancellations.is_cancelled(request_ids[index])

        run_batch(
            self.generator, accepted,
            send_update=lambda index, update: senders[index][1].send(
                to_response(update, self.version, image_infos[index]), flags=FINAL if update.finished else 0),
            send_error=lambda index, exc: senders[index][1].send(error_response(exc, caller_error=False), flags=FINAL),
            is_cancelled=is_cancelled,
            log_error=lambda message: self.logger.log_error(f"{self.family}: {message}"),
        )
        return None
